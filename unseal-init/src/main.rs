//! `unseal-init` entry point: parse flags, load the configuration, start logging, and hand
//! over to the sidecar loop, the one-shot pass, or an `hsm` subcommand. Exit codes: 0 done,
//! 1 failure, 2 invalid configuration or usage (a missing PIN included), 3 PIN rejected or
//! blocked (`--once` and subcommands; the sidecar stays up and waits for a different PIN
//! instead).
//!
//! Configuration and usage errors, and a subcommand's failure, are `error: …` lines on stderr,
//! as clap's and the device plugin's are: they are answers to whoever ran the command. A run's
//! failures are log lines (ERROR), in the log format chosen, as everything else it reports.

use nitrokey_common::logging::{self, LogFormat};
use std::process::ExitCode;
use std::sync::Arc;
use unseal_init::cli::{Cli, Command};
use unseal_init::config::{self, Config, Env, FileConfig};
use unseal_init::runner::{self, Runner};
use unseal_init::shutdown::Shutdown;
use unseal_init::telemetry::{self, Telemetry};
use unseal_init::vault::VaultClient;
use unseal_init::{ConfirmationRequired, exit, pcscd, pin, sidecar};

fn init_logging(format: &str) {
    // `--log-format` is free text: anything but `json` means text.
    let format = if format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    // cryptoki logs every vendor-defined mechanism a token lists as an ERROR; they are normal.
    // kube logs every failed request as an ERROR without saying what it asked for; the
    // caller reports the same failure with the Secret named, at the level it deserves.
    logging::init(
        format,
        &["cryptoki::mechanism", "kube_client::client::builder"],
        None,
    );
}

fn load_config(cli: &Cli) -> Result<Config, config::ConfigError> {
    let file = match &cli.config {
        Some(path) => config::read_file(path)?,
        None => FileConfig::default(),
    };
    config::resolve(file, &cli.overrides, &Env::from_process())
}

/// Turns SIGTERM and Ctrl-C into a stop request. The work is never dropped: it reads the
/// request where stopping is safe (see [`shutdown`]).
fn watch_signals(shutdown: Shutdown) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; stopping once nothing is left half-done"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received; stopping once nothing is left half-done"),
        }
        shutdown.request();
    });
}

async fn unseal(cfg: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let telemetry = Telemetry::new();
    telemetry.heartbeat();
    if !cfg.once {
        let addr = telemetry::serve(cfg.metrics_address, telemetry.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {}: {e}", cfg.metrics_address))?;
        tracing::info!(address = %addr, "metrics, /healthz and /readyz listening");
    }
    if cfg.hsm.daemon {
        pcscd::start().await?;
    }
    if cfg.once {
        let cfg_deadline = cfg.deadline;
        let deadline_hit = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(limit) = cfg.deadline {
            let (hit, stop) = (Arc::clone(&deadline_hit), shutdown.clone());
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                tracing::warn!(deadline = %humantime::format_duration(limit), "deadline reached (--deadline); stopping once nothing is left half-done");
                hit.store(true, std::sync::atomic::Ordering::SeqCst);
                stop.request();
            });
        }
        let opened = runner::open_keyring(
            &cfg,
            Arc::clone(&telemetry),
            &shutdown,
            Some(cfg.hsm.token_wait_timeout),
        )
        .await?;
        let vault = VaultClient::new(&cfg.vault.address, cfg.vault.ca_cert.as_deref())?
            .with_telemetry(Arc::clone(&telemetry));
        let runner = Runner::new(
            cfg,
            Arc::new(vault),
            opened.keyring,
            Some(opened.hsm),
            telemetry,
            shutdown,
        );
        runner.start().await?;
        if runner.pass(true).await? == runner::PassOutcome::Stopped {
            if deadline_hit.load(std::sync::atomic::Ordering::SeqCst) {
                anyhow::bail!(
                    "Vault was not unsealed within the deadline of {} (--deadline, UNSEAL_INIT_DEADLINE); the log above says what it waited for",
                    humantime::format_duration(cfg_deadline.unwrap_or_default())
                );
            }
            tracing::info!("stopped on request before Vault was unsealed");
        }
        return Ok(());
    }
    sidecar::run(cfg, telemetry, shutdown).await
}

fn main() -> ExitCode {
    let cli = Cli::parse_env_aware();
    init_logging(&cli.overrides.log_format);
    let cfg = match load_config(&cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::CONFIG as u8);
        }
    };
    // Without modulePath, OpenSC's module was looked for; finding none is a configuration
    // problem to report with where it looked, not a load failure of a path never chosen.
    if cfg.hsm.module_searched
        && !cfg.hsm.module_path.exists()
        && let Err(e) = config::pick_module(
            &config::module_candidates(std::env::consts::ARCH),
            std::path::Path::exists,
        )
    {
        eprintln!("error: invalid value for hsm.modulePath: {e}");
        return ExitCode::from(exit::CONFIG as u8);
    }
    // The CA file is configuration too: a missing or unreadable one is reported now, before
    // pcscd, the token and the PIN are touched, not after a login.
    if cli.command.is_none()
        && let Err(e) = VaultClient::new(&cfg.vault.address, cfg.vault.ca_cert.as_deref())
    {
        eprintln!("error: invalid value for vault.caCert: {e}");
        return ExitCode::from(exit::CONFIG as u8);
    }
    // One thread is enough: every PKCS#11 call runs on the HSM thread, everything else here
    // waits on the network.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE as u8);
        }
    };
    let subcommand = cli.command.is_some();
    let result = runtime.block_on(async {
        match &cli.command {
            Some(Command::Hsm { command }) => unseal_init::commands::run(&cfg, command).await,
            Some(Command::Rekey {
                secret_shares,
                secret_threshold,
            }) => {
                let shutdown = Shutdown::new();
                watch_signals(shutdown.clone());
                runner::rekey::command(cfg, *secret_shares, *secret_threshold, shutdown).await
            }
            None => {
                let shutdown = Shutdown::new();
                watch_signals(shutdown.clone());
                unseal(cfg, shutdown).await
            }
        }
    });
    // Stops a pcscd the run started (its task holds the child, killed on drop) before exiting.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match pin::pin_failure(&e) {
                // No PIN at all is a configuration problem, not a refused PIN.
                Some(pin::PinFailure::Missing) => exit::CONFIG,
                Some(_) => exit::PIN,
                None if e.downcast_ref::<ConfirmationRequired>().is_some() => exit::CONFIG,
                None if e
                    .downcast_ref::<unseal_init::rekey::RekeyInputError>()
                    .is_some() =>
                {
                    exit::CONFIG
                }
                None => exit::FAILURE,
            };
            // The whole cause chain once, each cause once (several errors here carry their
            // cause in their own message too).
            let text = unseal_init::vault::error_chain(e.as_ref());
            if subcommand || code == exit::CONFIG {
                eprintln!("error: {text}");
            } else {
                tracing::error!("{text}");
            }
            ExitCode::from(code as u8)
        }
    }
}
