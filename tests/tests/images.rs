//! Builds both container images with `scripts/build-images.sh` (the script an operator runs)
//! and runs them under podman the way the manifests run them.
//!
//! The images are built from this build's debug binaries (`--bin-dir`): the release build an
//! operator's run starts with takes minutes on a small machine and links against the same
//! libraries. Each test loads its OCI archive into a podman store of its own in a temporary
//! directory and runs the container with the manifests' security context: read-only root
//! filesystem, every capability dropped, no privilege escalation, no writable `/tmp` or `/run`
//! beyond the volumes the manifests mount, and the manifests' mounts, environment, command and
//! configuration files (`deploy/base/*`).
//!
//! - device-plugin: registers `nitrokey.com/hsm` with the kubelet stand-in through the mounted
//!   device-plugin directory, streams its device list (this machine's sticks: usually none), and
//!   registers again after the kubelet restarts, as user 0 like the DaemonSet.
//! - unseal-init: with pcscd in daemon mode and no reader, it reports the missing token on
//!   `/readyz` and initialises nothing, as the image's own user 65532 (the non-root set-up the
//!   deploy guide describes); with a SoftHSM2 token mounted in (token directory and module), it
//!   initialises and unseals a real OpenBao server on 127.0.0.1, as user 0 like the StatefulSet.
//!   Both use the host's network namespace to reach OpenBao on loopback, the only interface
//!   the sandboxes these tests run in have.
//!
//! Podman runs containers here with runc and explicit ulimits (crun refuses cgroup v1 hybrid
//! mode; podman's default ulimits exceed the hard limits of sandboxes without
//! CAP_SYS_RESOURCE). Without podman, buildah, runc, mmdebstrap or root the tests say so and
//! skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nitrokey_e2e::bins;
use nitrokey_e2e::dockerfile;
use nitrokey_e2e::host::{self, repo};
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::openbao::{self, OpenBao};
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::Token;
use serde_json::Value;

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    host::unavailable(
        &["podman", "buildah", "runc", "mmdebstrap"],
        "building root filesystems and running podman here",
    )
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds `target`'s OCI archive into `out` with the operator's script, from the debug binaries
/// of this build; the root filesystem tarball is cached beside image_rootfs.rs's.
fn build_image(target: &str, out: &Path) -> PathBuf {
    let program = bins::path(target).expect("the workspace's binaries are built");
    let bin_dir = program.parent().expect("binary directory");
    let started = Instant::now();
    let output = run(
        &format!("scripts/build-images.sh {target}"),
        Command::new(repo().join("scripts/build-images.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--out")
            .arg(out)
            .arg("--cache")
            .arg(Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-rootfs"))
            .arg("--fast-compression")
            .arg(target),
    );
    let archive = out.join(format!("{target}-{}.oci.tar", env!("CARGO_PKG_VERSION")));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        printed.lines().last().map(str::trim),
        Some(archive.to_string_lossy().as_ref()),
        "the script names the archive it wrote:\n{printed}"
    );
    let size = std::fs::metadata(&archive).expect("archive written").len();
    println!(
        "{target}: OCI archive {:.1} MiB (debug binary, gzip level 1) in {:.1?}",
        size as f64 / 1048576.0,
        started.elapsed()
    );
    archive
}

/// A podman store of its own (storage, run state, temporary files) in a temporary directory;
/// on drop every container and image in it is removed, then the directory.
struct Podman {
    dir: tempfile::TempDir,
    /// The run state: podman refuses a run root longer than 50 characters, which a test's
    /// own temporary directory can be, so it lives directly under /tmp (removed on drop too).
    run: tempfile::TempDir,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podman-")
            .tempdir()
            .expect("podman directory");
        std::fs::create_dir(dir.path().join("tmp")).expect("podman tmp");
        let run = tempfile::Builder::new()
            .prefix("nkv-podman-")
            .tempdir_in("/tmp")
            .expect("podman run directory");
        Podman { dir, run }
    }

    fn command(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.env("TMPDIR", d.join("tmp"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(self.run.path())
            .arg("--tmpdir")
            .arg(d.join("libpod"))
            .args([
                "--storage-driver",
                "overlay",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--runtime",
                "runc",
            ]);
        cmd
    }

    fn podman(&self, what: &str, args: &[&str]) -> String {
        let out = run(what, self.command().args(args));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Loads an OCI archive; returns the image's name as the archive carries it.
    fn load(&self, archive: &Path) -> String {
        let out = run(
            "podman load",
            self.command().arg("load").arg("--input").arg(archive),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("Loaded image: "))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| panic!("podman load named no image:\n{text}"))
    }

    /// Starts a container detached, with the manifests' security context and `flags` (mounts,
    /// environment, user, network); returns its id.
    fn start(&self, image: &str, flags: &[String], args: &[&str]) -> String {
        let mut cmd = self.command();
        cmd.args([
            "run",
            "--detach",
            "--read-only",
            // Kubernetes mounts no tmpfs of its own on /tmp or /run: only the pod's volumes.
            "--read-only-tmpfs=false",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
        ])
        .args(flags)
        .arg(image)
        .args(args);
        let out = run(&format!("podman run {image}"), &mut cmd);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn logs(&self, id: &str) -> String {
        let out = self
            .command()
            .args(["logs", id])
            .output()
            .expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn is_running(&self, id: &str) -> bool {
        self.podman(
            "podman inspect",
            &["inspect", "--format", "{{.State.Running}}", id],
        ) == "true"
    }

    /// Stops a container as the kubelet does (SIGTERM, then SIGKILL after the grace period);
    /// returns its exit code.
    fn stop(&self, id: &str, grace_seconds: u32) -> i64 {
        self.podman(
            "podman stop",
            &["stop", "--time", &grace_seconds.to_string(), id],
        );
        self.podman(
            "podman inspect",
            &["inspect", "--format", "{{.State.ExitCode}}", id],
        )
        .parse()
        .expect("exit code")
    }

    /// The image's config as podman sees it (`podman image inspect`).
    fn image_config(&self, image: &str) -> Value {
        let text = self.podman("podman image inspect", &["image", "inspect", image]);
        let mut all: Vec<Value> = serde_json::from_str(&text).expect("inspect output is JSON");
        all.pop().expect("one image")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
        let _ = self.command().args(["rmi", "--all", "--force"]).output();
        // Anything podman left mounted under the store would keep the directory from going.
        let prefixes = [
            self.dir.path().to_string_lossy().into_owned(),
            self.run.path().to_string_lossy().into_owned(),
        ];
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut left: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| prefixes.iter().any(|p| m.starts_with(p.as_str())))
            .collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in left {
            let _ = Command::new("umount").args(["--lazy", mount]).output();
        }
    }
}

/// The image's config matches the Dockerfile's stage: user, entrypoint and every label (the
/// revision filled in, the base-image label left out: these images start from mmdebstrap's
/// root filesystem, not from that image).
fn assert_config_follows_the_dockerfile(podman: &Podman, image: &str, target: &str) {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("read Dockerfile");
    let ins = dockerfile::parse(&text);
    let stage = dockerfile::stage_of(&ins, target).expect("the Dockerfile has the target");
    let config = podman.image_config(image);
    let config = &config["Config"];
    assert_eq!(
        config["User"].as_str(),
        dockerfile::last(&ins, stage, "USER"),
        "{target}: user"
    );
    let entrypoint: Value =
        serde_json::from_str(dockerfile::last(&ins, stage, "ENTRYPOINT").expect("ENTRYPOINT"))
            .expect("ENTRYPOINT in JSON form");
    assert_eq!(config["Entrypoint"], entrypoint, "{target}: entrypoint");
    let labels: BTreeMap<String, String> =
        serde_json::from_value(config["Labels"].clone()).expect("labels");
    for (key, value) in dockerfile::labels(&ins, stage) {
        if key == "org.opencontainers.image.base.name" {
            assert!(
                !labels.contains_key(&key),
                "{target}: {key} would be untrue"
            );
            continue;
        }
        let got = labels
            .get(&key)
            .unwrap_or_else(|| panic!("{target}: label {key} missing: {labels:?}"));
        if value.contains("${REVISION}") {
            assert!(
                !got.is_empty() && !got.contains('$'),
                "{target}: {key}={got}"
            );
        } else {
            assert_eq!(got, &value, "{target}: label {key}");
        }
    }
}

/// `-v` for a bind mount, read-only unless `rw`.
fn mount(host: &Path, inside: &str, rw: bool) -> String {
    format!(
        "--volume={}:{inside}:{}",
        host.display(),
        if rw { "rw" } else { "ro" }
    )
}

fn dir_in(base: &Path, name: &str) -> PathBuf {
    let path = base.join(name);
    std::fs::create_dir_all(&path).expect("create directory");
    path
}

/// A directory holding one manifest file under the name the manifests mount it as.
fn config_dir(base: &Path, name: &str, manifest_file: &str, mounted_as: &str) -> PathBuf {
    let dir = dir_in(base, name);
    std::fs::copy(repo().join(manifest_file), dir.join(mounted_as)).expect("copy the config");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_plugin_image_registers_with_the_kubelet_through_the_mounted_plugin_directory() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("image-device-plugin-")
        .tempdir()
        .expect("work directory");
    let w = work.path();
    let archive = build_image("device-plugin", &w.join("dist"));
    let podman = Podman::new();
    let image = podman.load(&archive);
    assert_eq!(
        image,
        format!(
            "ghcr.io/nitrokey-vault/device-plugin:{}",
            env!("CARGO_PKG_VERSION")
        ),
        "the archive carries the name the manifests use"
    );
    assert_config_follows_the_dockerfile(&podman, &image, "device-plugin");

    let mut kubelet = FakeKubelet::start(w.join("device-plugins"))
        .await
        .expect("kubelet stand-in");
    // The DaemonSet's volumes: hostPaths (empty stand-ins where this machine has nothing to
    // offer: no stick, no udev database, no pod-resources socket) and the ConfigMap.
    let config = config_dir(
        w,
        "config",
        "deploy/base/device-plugin/config.yaml",
        "config.yaml",
    );
    let flags = [
        "--user=0:0".to_owned(),
        "--network=none".to_owned(),
        "--env=NODE_IP=127.0.0.1".to_owned(),
        "--env=NODE_NAME=node-a".to_owned(),
        mount(kubelet.dir(), "/var/lib/kubelet/device-plugins", true),
        mount(&dir_in(w, "dev-bus-usb"), "/dev/bus/usb", false),
        mount(Path::new("/sys"), "/sys", false),
        mount(
            &dir_in(w, "pod-resources"),
            "/var/lib/kubelet/pod-resources",
            false,
        ),
        mount(
            &dir_in(w, "nfd"),
            "/etc/kubernetes/node-feature-discovery/features.d",
            true,
        ),
        mount(&dir_in(w, "run-udev"), "/run/udev", false),
        mount(&config, "/etc/nitrokey-device-plugin", false),
        "--entrypoint=/usr/local/bin/device-plugin".to_owned(),
    ];
    let id = podman.start(
        &image,
        &flags,
        &["--config", "/etc/nitrokey-device-plugin/config.yaml"],
    );

    let registration = match kubelet.wait_for_registration(Duration::from_secs(60)).await {
        Ok(r) => r,
        Err(e) => panic!("{e}\ncontainer log:\n{}", podman.logs(&id)),
    };
    assert_eq!(registration.request.resource_name, "nitrokey.com/hsm");
    assert!(
        kubelet.dir().join(&registration.request.endpoint).exists(),
        "the plugin's socket {} is in the mounted directory",
        registration.request.endpoint
    );
    // The list streams over ListAndWatch; its units are whatever sticks this machine's /sys
    // shows (on a build machine: none).
    let list = kubelet
        .wait_for_devices(|_| true, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainer log:\n{}", podman.logs(&id)));
    println!(
        "device-plugin in its image: registered, {} unit(s) listed",
        list.devices.len()
    );

    // A kubelet restart deletes every socket in the directory; the plugin in the container
    // sees that through the mount and registers again.
    kubelet.restart().await.expect("kubelet restart");
    if let Err(e) = kubelet
        .wait_for_registrations(2, Duration::from_secs(60))
        .await
    {
        panic!("{e}\ncontainer log:\n{}", podman.logs(&id));
    }
    assert!(podman.is_running(&id), "{}", podman.logs(&id));
    let code = podman.stop(&id, 10);
    assert_eq!(
        code,
        0,
        "SIGTERM ends the plugin cleanly:\n{}",
        podman.logs(&id)
    );
    drop(kubelet);
}

/// Polls `url` until its body satisfies `done` (or `timeout` passes); returns the last body.
fn poll_http(
    address: &str,
    path: &str,
    timeout: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    let mut last = (0, String::new());
    while Instant::now() < deadline {
        if let Ok(answer) = openbao::http(address, "GET", path, None) {
            if done(answer.0, &answer.1) {
                return answer;
            }
            last = answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    last
}

#[test]
fn unseal_init_image_reports_a_missing_token_then_unseals_openbao_with_a_mounted_token() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("image-unseal-init-")
        .tempdir()
        .expect("work directory");
    let w = work.path();
    let archive = build_image("unseal-init", &w.join("dist"));
    let podman = Podman::new();
    let image = podman.load(&archive);
    assert_eq!(
        image,
        format!(
            "ghcr.io/nitrokey-vault/unseal-init:{}",
            env!("CARGO_PKG_VERSION")
        ),
        "the archive carries the name the manifests use"
    );
    assert_config_follows_the_dockerfile(&podman, &image, "unseal-init");

    let bao = OpenBao::start().expect("start OpenBao");
    // The StatefulSet's unseal-init volumes: its ConfigMap, the PIN Secret as a file, the
    // journal's persistent volume, and emptyDirs for pcscd's socket and /tmp.
    let config = config_dir(
        w,
        "config",
        "deploy/base/vault/unseal-init.yaml",
        "config.yaml",
    );
    let pin = dir_in(w, "hsm-pin");
    std::fs::write(pin.join("pin"), nitrokey_e2e::softhsm::USER_PIN).expect("PIN file");
    // The manifests' command and configuration; Vault's address and the metrics port are the
    // test's, since the pod's 127.0.0.1:8200 and :9091 are the host's here.
    let args = |metrics: u16| {
        vec![
            "--config".to_owned(),
            "/etc/unseal-init/config.yaml".to_owned(),
            "--vault-addr".to_owned(),
            bao.address(),
            "--metrics-address".to_owned(),
            format!("127.0.0.1:{metrics}"),
        ]
    };
    let volumes = |user: &str, journal: &Path| {
        vec![
            format!("--user={user}"),
            "--network=host".to_owned(),
            "--env=HOME=/tmp".to_owned(),
            mount(&config, "/etc/unseal-init", false),
            mount(&pin, "/etc/hsm", false),
            mount(journal, "/var/lib/unseal-init", true),
            // emptyDirs are world-writable directories (the kubelet creates them 0777).
            "--mount=type=tmpfs,destination=/run/pcscd,tmpfs-size=1m,tmpfs-mode=0777".to_owned(),
            "--mount=type=tmpfs,destination=/tmp,tmpfs-size=16m,tmpfs-mode=0777".to_owned(),
            "--entrypoint=/usr/local/bin/unseal-init".to_owned(),
        ]
    };

    // 1. As the image's own user, pcscd in daemon mode and no reader: not ready, saying why.
    let journal = dir_in(w, "journal-nonroot");
    run(
        "chown",
        Command::new("chown")
            .arg("65532:65532")
            .arg(&journal)
            .arg(pin.join("pin")),
    );
    let metrics = openbao::free_port().expect("free port");
    let argv = args(metrics);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let id = podman.start(&image, &volumes("65532:65532", &journal), &argv);
    let endpoints = format!("http://127.0.0.1:{metrics}");
    let (code, body) = poll_http(
        &endpoints,
        "/readyz",
        Duration::from_secs(60),
        |code, body| code == 503 && body.to_lowercase().contains("token"),
    );
    assert!(
        code == 503 && body.to_lowercase().contains("token"),
        "/readyz does not report the missing token ({code}): {body}\n{}",
        podman.logs(&id)
    );
    assert!(
        !bao.seal_status().expect("status").initialized,
        "initialised without a token"
    );
    let logs = podman.logs(&id);
    assert!(podman.is_running(&id), "{logs}");
    let code = podman.stop(&id, 30);
    assert_eq!(code, 0, "SIGTERM ends unseal-init cleanly:\n{logs}");

    // 2. As the StatefulSet runs it (user 0, no capability), a SoftHSM2 token mounted in as
    // the stick: module and token directory, the configuration pointing at them.
    let token = SoftHsm::new().expect("SoftHSM2 token");
    let module = nitrokey_e2e::softhsm::module_path().expect("SoftHSM2 module");
    let softhsm = dir_in(w, "softhsm");
    std::fs::write(
        softhsm.join("softhsm2.conf"),
        "directories.tokendir = /opt/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
    )
    .expect("SoftHSM2 config");
    std::fs::set_permissions(
        pin.join("pin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .expect("PIN file mode");
    run(
        "chown",
        Command::new("chown").arg("0:0").arg(pin.join("pin")),
    );
    let journal = dir_in(w, "journal-root");
    let metrics = openbao::free_port().expect("free port");
    let mut argv = args(metrics);
    argv.extend([
        "--hsm-module-path".to_owned(),
        "/opt/softhsm/libsofthsm2.so".to_owned(),
        "--hsm-slot-id".to_owned(),
        token.slot_id().to_string(),
    ]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut flags = volumes("0:0", &journal);
    flags.extend([
        "--env=SOFTHSM2_CONF=/opt/softhsm/softhsm2.conf".to_owned(),
        mount(
            &softhsm.join("softhsm2.conf"),
            "/opt/softhsm/softhsm2.conf",
            false,
        ),
        mount(&module, "/opt/softhsm/libsofthsm2.so", false),
        mount(&token.tokens_dir(), "/opt/softhsm/tokens", true),
    ]);
    let id = podman.start(&image, &flags, &argv);
    if let Err(e) = bao.wait_for(Duration::from_secs(120), |s| s.initialized && !s.sealed) {
        panic!(
            "OpenBao not initialised and unsealed from the container: {e}\n{}",
            podman.logs(&id)
        );
    }
    let endpoints = format!("http://127.0.0.1:{metrics}");
    let (code, body) = poll_http(&endpoints, "/readyz", Duration::from_secs(30), |code, _| {
        code == 200
    });
    assert_eq!(code, 200, "/readyz: {body}\n{}", podman.logs(&id));
    let mut labels = token.data_labels().expect("the token's objects");
    labels.sort();
    let mut expected: Vec<String> = (0..5).map(|i| format!("vault-unseal-{i}")).collect();
    expected.extend(["vault-root".to_owned(), "vault-test".to_owned()]);
    expected.sort();
    assert_eq!(labels, expected, "the keys are on the mounted token");
    let logs = podman.logs(&id);
    assert!(
        !logs.contains(nitrokey_e2e::softhsm::USER_PIN),
        "the PIN appears in the container's log"
    );
    let code = podman.stop(&id, 30);
    assert_eq!(code, 0, "SIGTERM ends unseal-init cleanly:\n{logs}");
}
