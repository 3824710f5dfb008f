//! The operator subcommands (`hsm info|keygen|list|delete|migrate`), raft join, and the
//! supervised pcscd, against a SoftHSM2 token and real OpenBao servers.

mod common;

use common::*;
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::{Scheme, Token};
use std::time::Duration;

/// pcscd's socket path is fixed (`/run/pcscd/pcscd.comm`), so the tests that start one take
/// turns.
static PCSCD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pcscd_turn() -> std::sync::MutexGuard<'static, ()> {
    PCSCD.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pid of the pcscd a run logged starting.
fn pcscd_pid(log: &str) -> u32 {
    log.lines()
        .find(|l| l.contains("pcscd is answering"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pcscd pid logged:\n{log}"))
}

/// Waits until `pid` is gone (or a zombie of a parent that exited); 30 s is a bound for a
/// loaded machine, not a measurement.
fn assert_gone(pid: u32) {
    let started = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "pcscd {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hsm_cmd(hsm: &SoftHsm, config: &std::path::Path, args: &[&str]) -> Run {
    let mut cmd = command(hsm);
    cmd.arg("--config").arg(config).arg("hsm").args(args);
    run(cmd, Duration::from_secs(60))
}

#[test]
fn info_keygen_list_and_delete_replace_the_pkcs11_tool_steps() {
    let hsm = SoftHsm::without_key().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, "http://127.0.0.1:1", "");

    let info = hsm_cmd(&hsm, &config, &["info"]);
    assert_eq!(info.code, Some(0), "{}", info.text);
    assert!(
        info.stdout.contains(&format!("Slot {}", hsm.slot_id())),
        "{}",
        info.stdout
    );
    assert!(
        info.stdout.contains("token label:   bank-vaults"),
        "{}",
        info.stdout
    );
    assert!(
        info.stdout.contains("RSA-PKCS-OAEP") || info.stdout.contains("RSA_PKCS_OAEP"),
        "{}",
        info.stdout
    );

    let keygen = hsm_cmd(&hsm, &config, &["keygen"]);
    assert_eq!(keygen.code, Some(0), "{}", keygen.text);
    assert!(
        keygen
            .stdout
            .contains("generated RSA key pair `bank-vaults` (2048 bits"),
        "{}",
        keygen.stdout
    );
    let again = hsm_cmd(&hsm, &config, &["keygen"]);
    assert!(again.stdout.contains("already exists"), "{}", again.stdout);
    // The private key is sensitive and never leaves the token, as pkcs11-tool reports.
    let privs = hsm
        .run_pkcs11_tool(true, &["--list-objects", "--type", "privkey"])
        .expect("list");
    assert_eq!(privs.matches("Private Key Object").count(), 1, "{privs}");
    assert!(privs.contains("sensitive"), "{privs}");
    assert!(privs.contains("never extractable"), "{privs}");

    // A Bank-Vaults style duplicate (it never de-duplicated) plus a current value.
    let ct = hsm
        .encrypt_with_public_key(b"vault-test", Scheme::OaepSha1)
        .expect("enc");
    hsm.write_data("vault-test", &ct).expect("write");
    hsm.write_data("vault-test", &ct).expect("write");
    let list = hsm_cmd(&hsm, &config, &["list"]);
    assert_eq!(list.code, Some(0), "{}", list.text);
    assert!(
        list.stdout.contains("Key pair: bank-vaults (RSA 2048 bits"),
        "{}",
        list.stdout
    );
    assert_eq!(
        list.stdout.matches("vault-test: 256 bytes, legacy").count(),
        2,
        "{}",
        list.stdout
    );

    // migrate leaves exactly one current object.
    let m = hsm_cmd(&hsm, &config, &["migrate"]);
    assert_eq!(m.code, Some(0), "{}", m.text);
    assert_eq!(hsm.data_labels().expect("labels"), ["vault-test"]);
    assert_eq!(decrypt_stored(&hsm, "vault-test"), "vault-test");
    let list = hsm_cmd(&hsm, &config, &["list"]);
    assert!(
        list.stdout
            .contains("vault-test: 269 bytes, v1 RSA-OAEP-SHA1"),
        "{}",
        list.stdout
    );

    // delete needs --yes; without it nothing goes.
    let refused = hsm_cmd(&hsm, &config, &["delete", "--label", "vault-test"]);
    assert_eq!(refused.code, Some(2), "{}", refused.text);
    assert!(refused.text.contains("--yes"), "{}", refused.text);
    assert_eq!(hsm.data_labels().expect("labels"), ["vault-test"]);
    let deleted = hsm_cmd(&hsm, &config, &["delete", "--label", "vault-test", "--yes"]);
    assert_eq!(deleted.code, Some(0), "{}", deleted.text);
    assert!(deleted.stdout.contains("deleted"), "{}", deleted.stdout);
    assert!(hsm.data_labels().expect("labels").is_empty());
}

#[test]
fn raft_follower_joins_the_leader_and_is_unsealed_with_the_same_keys() {
    let hsm = SoftHsm::new().expect("token");
    let leader = OpenBao::start_raft("leader").expect("leader");
    let follower = OpenBao::start_raft("follower").expect("follower");
    let dir = tempfile::tempdir().expect("tempdir");

    let leader_cfg = write_config(dir.path(), &hsm, &leader.address(), "");
    run_once_ok(&hsm, &leader_cfg);
    assert!(!leader.seal_status().expect("status").sealed);

    let follower_dir = tempfile::tempdir().expect("tempdir");
    let follower_cfg = follower_dir.path().join("follower.yaml");
    std::fs::write(
        &follower_cfg,
        format!(
            "journalDir: {}\nvault:\n  address: {}\n  raftLeaderAddress: {}\nhsm:\n  modulePath: {}\n  slotId: {}\n  pin: banzai\n",
            journal_dir(follower_dir.path()).display(),
            follower.address(),
            leader.address(),
            hsm.module().display(),
            hsm.slot_id()
        ),
    )
    .expect("write");
    let r = run_once_ok(&hsm, &follower_cfg);
    assert!(r.text.contains("joining leader vault"), "{}", r.text);
    assert!(!r.text.contains("initializing vault"), "{}", r.text);
    let status = follower
        .wait_for(Duration::from_secs(30), |s| s.initialized && !s.sealed)
        .expect("follower unsealed");
    assert!(status.initialized);

    let root = decrypt_stored(&hsm, "vault-root");
    let (code, body) = leader
        .get_with_token("/v1/sys/storage/raft/configuration", &root)
        .expect("raft configuration");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"follower\""),
        "follower not in raft configuration: {body}"
    );
}

#[test]
fn daemon_mode_supervises_pcscd_and_stops_it_on_exit() {
    let _turn = pcscd_turn();
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "  daemon: true\n");
    // The `hsm:` block is last in the generated file, so the indented line extends it.
    let text = std::fs::read_to_string(&config).expect("read");
    assert!(
        text.contains("keyLabel: bank-vaults\n  daemon: true"),
        "{text}"
    );
    let r = run_once_ok(&hsm, &config);
    assert!(r.text.contains("pcscd is answering"), "{}", r.text);
    assert!(!bao.seal_status().expect("status").sealed);
    // The supervised pcscd went away with the program.
    assert_gone(pcscd_pid(&r.text));
}

#[test]
fn every_hsm_subcommand_starts_its_own_pcscd_in_daemon_mode() {
    let _turn = pcscd_turn();
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, "http://127.0.0.1:1", "");
    for args in [
        &["info", "--hsm-daemon"][..],
        &["list", "--hsm-daemon"],
        &["keygen", "--hsm-daemon"],
    ] {
        let r = hsm_cmd(&hsm, &config, args);
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.text);
        assert!(
            r.text.contains("pcscd is answering"),
            "{args:?}: {}",
            r.text
        );
        assert_gone(pcscd_pid(&r.text));
    }
    // Without the flag none is started.
    let r = hsm_cmd(&hsm, &config, &["list"]);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(!r.text.contains("pcscd"), "{}", r.text);
}

#[test]
fn info_without_a_usable_slot_says_so_and_fails() {
    let hsm = SoftHsm::without_key().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, "http://127.0.0.1:1", "");
    // The same module with no token initialised: one empty slot, as SoftHSM2 shows it.
    let tokens = dir.path().join("no-tokens");
    std::fs::create_dir(&tokens).expect("mkdir");
    let conf = dir.path().join("empty-softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("write");
    let mut cmd = command(&hsm);
    cmd.env("SOFTHSM2_CONF", &conf)
        .arg("--config")
        .arg(&config)
        .args(["hsm", "info"]);
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.stdout.starts_with("Library: "), "{}", r.stdout);
    assert!(
        r.text.contains(
            "error: no usable HSM slot: 1 slot(s) listed, none with an initialised token"
        ),
        "{}",
        r.text
    );
}

#[test]
fn an_unset_module_path_finds_opensc_where_debian_puts_it() {
    let _turn = pcscd_turn();
    let hsm = SoftHsm::without_key().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("opensc.yaml");
    std::fs::write(&config, "hsm:\n  pin: 123456\n").expect("write");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).args(["hsm", "info"]);
    let r = run(cmd, Duration::from_secs(60));
    // OpenSC loads from the multiarch directory; with no pcscd it sees no reader at all.
    assert!(r.stdout.contains("Library: OpenSC"), "{}", r.text);
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.text.contains("no usable HSM slot"), "{}", r.text);
    assert!(r.text.contains("pcscd running"), "{}", r.text);
}

/// A stand-in for pcscd that writes two lines to stderr (one in pcsc-lite's format), then
/// listens on pcscd's socket until it is killed.
const FAKE_PCSCD: &str = r#"#!/usr/bin/env python3
import os, socket, sys
sys.stderr.write("00000000 ifdwrapper.c:477:IFDControl() Card not transacted: 606\n")
sys.stderr.write("a line in no known format\n")
sys.stderr.flush()
path = "/run/pcscd/pcscd.comm"
try:
    os.unlink(path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(8)
while True:
    c, _ = s.accept()
    c.close()
"#;

#[test]
fn pcscd_messages_become_structured_log_lines() {
    use std::io::BufRead;
    let _turn = pcscd_turn();
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("pcscd");
    std::fs::write(&fake, FAKE_PCSCD).expect("write");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let port = nitrokey_e2e::openbao::free_port().expect("port");
    // Sidecar mode against a Vault that never answers: it keeps running until SIGTERM.
    let config = write_config(
        dir.path(),
        &hsm,
        "http://127.0.0.1:1",
        &format!("metricsAddress: 127.0.0.1:{port}\n"),
    );
    let mut cmd = command(&hsm);
    cmd.env("UNSEAL_INIT_PCSCD", &fake)
        .arg("--config")
        .arg(&config)
        .args(["--hsm-daemon", "--log-format", "json"]);
    let mut child = cmd.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !lines
        .iter()
        .any(|l: &String| l.contains("a line in no known format"))
        || !lines.iter().any(|l| l.contains("Card not transacted"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("pcscd's lines never appeared:\n{}", lines.join("\n"));
            }
        }
    }
    // SAFETY: kill(2) on a child of this test process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    reader.join().expect("reader");
    lines.extend(rx.try_iter());
    assert_eq!(status.code(), Some(0), "{}", lines.join("\n"));
    // Every line is JSON: nothing of pcscd's reached the log unwrapped.
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let relayed = events
        .iter()
        .find(|e| e["message"] == "pcscd: Card not transacted: 606")
        .unwrap_or_else(|| panic!("{}", lines.join("\n")));
    assert_eq!(relayed["level"], "WARN", "{relayed}");
    assert_eq!(
        relayed["source"], "ifdwrapper.c:477:IFDControl()",
        "{relayed}"
    );
    assert_eq!(relayed["target"], "pcscd", "{relayed}");
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "pcscd: a line in no known format" && e["level"] == "WARN"),
        "{}",
        lines.join("\n")
    );
    // The stand-in went away with the program.
    assert_gone(pcscd_pid(
        &events
            .iter()
            .filter(|e| e["message"] == "pcscd is answering")
            .map(|e| format!("pcscd is answering pid={}", e["pid"]))
            .collect::<Vec<_>>()
            .join("\n"),
    ));
}
