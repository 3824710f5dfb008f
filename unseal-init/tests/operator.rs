//! The operator subcommands (`hsm info|keygen|list|delete|migrate`), raft join, and the
//! supervised pcscd, against a SoftHSM2 token and real OpenBao servers.

mod common;

use common::*;
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::{Scheme, Token};
use std::time::Duration;

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
    let pid: u32 = r
        .text
        .lines()
        .find(|l| l.contains("pcscd is answering"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pcscd pid logged:\n{}", r.text));
    let started = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "pcscd {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
