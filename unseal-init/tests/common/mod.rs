//! Shared setup for the end-to-end tests: a SoftHSM2 token set up like a freshly initialised stick, a
//! real OpenBao server, a configuration file pointing at both, and a runner for the real
//! `unseal-init` binary with a timeout.

#![allow(dead_code)]

pub mod faults;
pub mod matrix;
pub mod proxy;
pub mod stick;

use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use nitrokey_e2e::token::{Scheme, Token};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Length of the header this program puts before the RSA ciphertext.
pub const HEADER_LEN: usize = 13;

/// Names stored after a default init.
pub fn default_names() -> Vec<String> {
    let mut names: Vec<String> = (0..5).map(|i| format!("vault-unseal-{i}")).collect();
    names.push("vault-root".into());
    names.push("vault-test".into());
    names.sort();
    names
}

/// The init journal directory every config written by [`write_config`] in `dir` uses.
pub fn journal_dir(dir: &Path) -> PathBuf {
    dir.join("journal")
}

/// Writes a configuration file in `dir` for `hsm` and `bao` plus `extra` YAML lines; the init
/// journal goes to [`journal_dir`].
pub fn write_config(dir: &Path, hsm: &SoftHsm, vault: &str, extra: &str) -> PathBuf {
    let path = dir.join("unseal-init.yaml");
    let text = format!(
        "mode: hsm\njournalDir: {}\nvault:\n  address: {vault}\nhsm:\n  modulePath: {}\n  slotId: {}\n  pin: {USER_PIN}\n  keyLabel: bank-vaults\n{extra}",
        journal_dir(dir).display(),
        hsm.module().display(),
        hsm.slot_id()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// The program under test with the token's environment (SoftHSM2, the TPM token or the shim),
/// output captured.
pub fn command(token: &dyn Token) -> Command {
    let mut cmd = Command::new(stick::program());
    cmd.envs(token.env())
        .env("RUST_LOG", "info")
        .env_remove("VAULT_ADDR")
        .env_remove("BANK_VAULTS_HSM_PIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Output of a finished run.
pub struct Run {
    /// Exit code (None if killed).
    pub code: Option<i32>,
    /// stdout and stderr together.
    pub text: String,
    /// stdout alone.
    pub stdout: String,
}

fn collect(out: Output) -> Run {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    Run {
        code: out.status.code(),
        text,
        stdout,
    }
}

/// Runs to completion, killing the process after `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> Run {
    let child = cmd.spawn().expect("spawn unseal-init");
    wait(child, timeout)
}

/// Waits for a spawned run, killing it after `timeout`.
pub fn wait(mut child: Child, timeout: Duration) -> Run {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            let run = collect(out);
            panic!(
                "unseal-init did not finish within {timeout:?}:\n{}",
                run.text
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    collect(child.wait_with_output().expect("output"))
}

/// Runs `--config FILE --once` and expects success.
pub fn run_once_ok(hsm: &SoftHsm, config: &Path) -> Run {
    let mut cmd = command(hsm);
    cmd.arg("--config").arg(config).arg("--once");
    let r = run(cmd, Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "unseal-init --once failed:\n{}", r.text);
    r
}

/// Decrypts a stored value (header stripped) with pkcs11-tool, independently of the program.
pub fn decrypt_stored(hsm: &SoftHsm, label: &str) -> String {
    let raw = hsm.read_data(label).expect("read object");
    assert_eq!(&raw[..3], b"NKV", "{label} lacks the format header");
    assert_eq!(
        raw.len(),
        HEADER_LEN + 256,
        "{label} has an unexpected length"
    );
    let plain = hsm
        .decrypt(&raw[HEADER_LEN..], Scheme::OaepSha1)
        .expect("pkcs11-tool decrypt");
    String::from_utf8(plain).expect("utf-8")
}

/// Asserts that none of `secrets` appears in `text`.
pub fn assert_no_secrets(text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!s.is_empty());
        assert!(
            !text.contains(s.as_str()),
            "a secret value appeared in the output:\n{text}"
        );
    }
}

/// Starts the sidecar (no `--once`) on a config for `vault` with a 300 ms unseal period and
/// its endpoints on a free port; returns the child and the endpoints' base URL.
pub fn spawn_sidecar(hsm: &SoftHsm, dir: &Path, vault: &str) -> (Child, String) {
    let port = nitrokey_e2e::openbao::free_port().expect("port");
    let config = write_config(
        dir,
        hsm,
        vault,
        &format!("unsealPeriod: 300ms\nmetricsAddress: 127.0.0.1:{port}\n"),
    );
    let mut cmd = command(hsm);
    cmd.arg("--config").arg(&config);
    let child = cmd.spawn().expect("spawn");
    (child, format!("http://127.0.0.1:{port}"))
}

/// Starts a token and a server.
pub fn peers() -> (SoftHsm, OpenBao, tempfile::TempDir) {
    let hsm = SoftHsm::new().expect("softhsm token");
    let bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    (hsm, bao, dir)
}

/// Polls an HTTP GET on 127.0.0.1 until it returns `want` or `timeout` passes.
pub fn wait_http(addr: &str, path: &str, want: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((status, body)) = nitrokey_e2e::openbao::http(addr, "GET", path, None)
            && status == want
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}{path} did not return {want} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
