//! The local end-to-end demo: the whole mission on one machine, with no hardware and no
//! cluster, using the same real stand-ins as the tests.
//!
//! 1. a SoftHSM2 token set up like a freshly initialised stick;
//! 2. an emulated Nitrokey HSM on USB (umockdev), so libusb in the device plugin finds it;
//! 3. the device plugin registering `nitrokey.com/hsm` with a kubelet stand-in, then a stick
//!    unplugged and plugged in again;
//! 4. a real OpenBao server, sealed and uninitialised;
//! 5. `unseal-init --once` initialising and unsealing it, keys stored on the token;
//! 6. the token's objects and OpenBao's seal status.
//!
//! Every process it starts is stopped when it ends, also on Ctrl-C (exit status 130, no
//! helper's traceback) or SIGTERM (143).

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nitrokey_e2e::bins;
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::openbao::{self, OpenBao};
use nitrokey_e2e::softhsm::{self, SoftHsm};
use nitrokey_e2e::token::Token;
use nitrokey_e2e::unseal_init;
use nitrokey_e2e::usb::Testbed;
use nitrokey_proto::v1beta1::Device;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::signal::unix::{SignalKind, signal};

/// Serial number of the emulated stick (the format of a real Nitrokey HSM's).
const SERIAL: &str = "DENK01234567";
/// How long any one step may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit status after Ctrl-C, as a shell reports a program ended by SIGINT (128 + 2).
const EXIT_INTERRUPTED: u8 = 130;
/// Exit status after SIGTERM (128 + 15).
const EXIT_TERMINATED: u8 = 143;

/// Resolves when the demo is asked to stop; names the signal and the exit status that goes
/// with it.
async fn stop_requested() -> (&'static str, u8) {
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => ("Ctrl-C", EXIT_INTERRUPTED),
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => ("SIGTERM", EXIT_TERMINATED),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Listen before anything is started, so a signal can never find the demo deaf.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let _ = stop_tx.send(Some(stop_requested().await));
    });
    let stopped = |rx: &tokio::sync::watch::Receiver<_>| *rx.borrow();
    // Dropping `run` on a signal drops every harness it holds, which stops their processes.
    let outcome = tokio::select! {
        biased;
        Ok(()) = stop_rx.changed() => Err(None),
        result = run() => result.map_err(Some),
    };
    let outcome = match outcome {
        // Ctrl-C reaches the whole foreground process group: a helper the demo was waiting on
        // can die of it a moment before the runtime reports the signal to the demo itself.
        Err(Some(error)) => {
            let reported = tokio::time::timeout(Duration::from_millis(500), async {
                while stopped(&stop_rx).is_none() && stop_rx.changed().await.is_ok() {}
            })
            .await;
            match reported {
                Ok(()) if stopped(&stop_rx).is_some() => Err(None),
                _ => Err(Some(error)),
            }
        }
        other => other,
    };
    match outcome {
        Ok(()) => {
            println!("\nDone. Every process the demo started has been stopped.");
            ExitCode::SUCCESS
        }
        Err(None) => {
            let (name, code) = stopped(&stop_rx).unwrap_or(("a signal", EXIT_INTERRUPTED));
            eprintln!("\ninterrupted ({name}). Every process the demo started has been stopped.");
            ExitCode::from(code)
        }
        Err(Some(error)) => {
            eprintln!("\ndemo failed: {error:#}");
            eprintln!("Every process the demo started has been stopped.");
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` with SIGINT ignored, so that processes it starts inherit the ignored disposition:
/// the emulated-USB helper is a Python program that the terminal's Ctrl-C would otherwise
/// end with a traceback, while the demo stops it in order itself.
fn with_sigint_ignored<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigaction(2) with a zeroed, then filled struct; the previous action is put back
    // unchanged, so the runtime's handler keeps working afterwards.
    unsafe {
        let mut ignore: libc::sigaction = std::mem::zeroed();
        ignore.sa_sigaction = libc::SIG_IGN;
        let mut previous: libc::sigaction = std::mem::zeroed();
        let saved = libc::sigaction(libc::SIGINT, &ignore, &mut previous) == 0;
        let result = f();
        if saved {
            libc::sigaction(libc::SIGINT, &previous, std::ptr::null_mut());
        }
        result
    }
}

fn step(n: u8, text: &str) {
    println!("\n[{n}/6] {text}");
}

fn detail(text: impl AsRef<str>) {
    println!("      {}", text.as_ref());
}

/// Prints a child's output lines, indented under the current step.
async fn forward(stream: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<()> {
    let mut lines = BufReader::new(stream).lines();
    while let Some(line) = lines.next_line().await? {
        detail(format!("| {line}"));
    }
    Ok(())
}

/// Orders object labels the way Bank-Vaults writes them: test value, unseal keys, root token.
fn label_order(label: &str) -> (u8, u32, String) {
    match label.strip_prefix("vault-unseal-").map(str::parse::<u32>) {
        _ if label == "vault-test" => (0, 0, String::new()),
        Some(Ok(n)) => (1, n, String::new()),
        _ if label == "vault-root" => (2, 0, String::new()),
        _ => (3, 0, label.to_owned()),
    }
}

fn units(devices: &[Device], health: &str) -> Vec<String> {
    let mut ids: Vec<String> = devices
        .iter()
        .filter(|d| d.health == health)
        .map(|d| d.id.clone())
        .collect();
    ids.sort();
    ids
}

async fn run() -> anyhow::Result<()> {
    println!("NitroKey HSM for Vault on Kubernetes: local demo (no hardware, no cluster)");
    let device_plugin = bins::path("device-plugin")?;
    // Both programs must be built before any peer starts.
    bins::path("unseal-init")?;
    let work = tempfile::Builder::new()
        .prefix("nitrokey-demo-")
        .tempdir()?;

    step(
        1,
        "HSM token: SoftHSM2, initialised like a fresh NitroKey HSM stick",
    );
    let token = tokio::task::spawn_blocking(SoftHsm::new).await??;
    detail(format!(
        "token '{}' in slot {}, user PIN set, RSA-2048 key pair '{}'",
        softhsm::TOKEN_LABEL,
        token.slot_id(),
        softhsm::KEY_LABEL
    ));

    step(
        2,
        "USB: an emulated Nitrokey HSM (umockdev), seen by libusb",
    );
    let testbed = with_sigint_ignored(Testbed::new)?;
    let stick = testbed.add_nitrokey_hsm(SERIAL, 1, 2)?;
    detail(format!(
        "20a0:4230 serial {SERIAL} plugged in at {}",
        stick.dev_path()
    ));

    step(
        3,
        "device-plugin: advertises nitrokey.com/hsm to a kubelet stand-in",
    );
    let plugin_dir = work.path().join("device-plugins");
    let kubelet = FakeKubelet::start(&plugin_dir).await?;
    let plugin_log = work.path().join("device-plugin.log");
    let metrics_port = openbao::free_port()?;
    let log = std::fs::File::create(&plugin_log)?;
    let mut command = tokio::process::Command::from(testbed.command(&device_plugin));
    command
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .arg("--metrics-address")
        .arg(format!("127.0.0.1:{metrics_port}"))
        // No cluster here: no pod-resources socket to ask, no node to label.
        .args(["--node-labels", "none", "--on-replug", "none"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the terminal's Ctrl-C is the demo's to handle, in order.
        .process_group(0)
        .kill_on_drop(true);
    let mut plugin = command.spawn().context("starting device-plugin")?;
    let show_plugin_log = || std::fs::read_to_string(&plugin_log).unwrap_or_default();
    let registration = kubelet
        .wait_for_registration(STEP_TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "device-plugin did not register; its log:\n{}",
                show_plugin_log()
            )
        })?;
    detail(format!(
        "Register: resource {} version {} endpoint {}",
        registration.request.resource_name,
        registration.request.version,
        registration.request.endpoint
    ));
    let list = kubelet
        .wait_for_devices(
            |d| units(d, nitrokey_proto::HEALTHY).len() == 2,
            STEP_TIMEOUT,
        )
        .await?;
    detail(format!(
        "ListAndWatch: 2 healthy units {:?} (node allocatable nitrokey.com/hsm = 2)",
        units(&list.devices, nitrokey_proto::HEALTHY)
    ));
    let first = format!("{SERIAL}-0");
    let allocation = kubelet.allocate(&[&first]).await?;
    for spec in &allocation.devices {
        detail(format!(
            "Allocate {first}: container gets {} ({})",
            spec.container_path, spec.permissions
        ));
    }
    let mut envs: Vec<_> = allocation.envs.iter().collect();
    envs.sort();
    for (key, value) in envs {
        detail(format!("  env {key}={value}"));
    }
    let unplugged_at = Instant::now();
    testbed.remove(&stick)?;
    kubelet
        .wait_for_devices(
            |d| units(d, nitrokey_proto::UNHEALTHY).len() == 2,
            STEP_TIMEOUT,
        )
        .await?;
    detail(format!(
        "stick unplugged: both units Unhealthy after {:.1?}",
        unplugged_at.elapsed()
    ));
    let replugged_at = Instant::now();
    let stick = testbed.add_nitrokey_hsm(SERIAL, 1, 3)?;
    kubelet
        .wait_for_devices(
            |d| units(d, nitrokey_proto::HEALTHY).len() == 2,
            STEP_TIMEOUT,
        )
        .await?;
    let moved = kubelet.allocate(&[&first]).await?;
    detail(format!(
        "plugged in again at {}: Healthy after {:.1?}, same IDs, Allocate now hands out {}",
        stick.dev_path(),
        replugged_at.elapsed(),
        moved
            .devices
            .first()
            .map(|d| d.host_path.as_str())
            .unwrap_or("nothing")
    ));

    step(4, "Vault: a real OpenBao server, sealed and uninitialised");
    let bao = tokio::task::spawn_blocking(OpenBao::start).await??;
    let status = bao.seal_status()?;
    detail(format!(
        "{}  initialized={} sealed={}",
        bao.address(),
        status.initialized,
        status.sealed
    ));

    step(
        5,
        "unseal-init --once: initialise OpenBao, keep the keys on the HSM, unseal",
    );
    let mut command = tokio::process::Command::from(unseal_init::command(
        &token,
        &bao.address(),
        &work.path().join("unseal-init-journal"),
        openbao::free_port()?,
    )?);
    command
        .arg("--once")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().context("starting unseal-init")?;
    let stdout = child.stdout.take().context("unseal-init stdout")?;
    let stderr = child.stderr.take().context("unseal-init stderr")?;
    let (out, err, exit) = tokio::join!(forward(stdout), forward(stderr), child.wait());
    out?;
    err?;
    let exit = exit?;
    if !exit.success() {
        bail!("unseal-init --once failed ({exit})");
    }

    step(6, "Result");
    let objects = token.run_pkcs11_tool(true, &["--list-objects", "--type", "data"])?;
    let mut labels: Vec<&str> = objects
        .lines()
        .filter_map(|l| l.trim().strip_prefix("label:"))
        .map(|l| l.trim().trim_matches('\''))
        .collect();
    labels.sort_by_key(|label| label_order(label));
    detail(format!(
        "pkcs11-tool --list-objects --type data: {}",
        labels.join(", ")
    ));
    let status = bao.seal_status()?;
    detail(format!(
        "OpenBao seal status: initialized={} sealed={} (threshold {} of {} shares)",
        status.initialized, status.sealed, status.t, status.n
    ));
    if !status.initialized || status.sealed {
        bail!("OpenBao is not initialised and unsealed");
    }

    // Stop the plugin before its testbed goes away, and say so.
    plugin.start_kill().ok();
    plugin.wait().await.ok();
    Ok(())
}
