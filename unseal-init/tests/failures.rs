//! Failure cases against real peers: wrong PIN (one login attempt only; `--once` exits, the
//! sidecar stays up unready until the PIN file changes), missing key, wrong slot or label,
//! invalid configuration, keys of another Vault, and OpenBao dying at the two dangerous
//! moments (after init answered, after the keys were stored).

mod common;

use common::proxy::{self, Action};
use common::*;
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use nitrokey_e2e::token::Token;
use std::time::{Duration, Instant};

#[test]
fn wrong_pin_is_tried_exactly_once_and_exits_non_zero() {
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "unsealPeriod: 200ms\n");
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .arg("--once")
        .env("BANK_VAULTS_HSM_PIN", "wrong-pin-4711");
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(3), "{}", r.text);
    assert_eq!(r.text.matches("HSM login attempt").count(), 1, "{}", r.text);
    assert!(r.text.contains("CKR_PIN_INCORRECT"), "{}", r.text);
    assert!(
        !r.text.contains("wrong-pin-4711"),
        "PIN printed:\n{}",
        r.text
    );
    // Nothing was initialised and the right PIN still works.
    assert!(!bao.seal_status().expect("status").initialized);
    hsm.data_labels().expect("correct PIN still accepted");
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a child of this test process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

/// Counts `C_Login` calls as the existing wrong-PIN test does: one log line per call.
fn login_attempts(log: &str) -> usize {
    log.matches("HSM login attempt").count()
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn sample(metrics: &str, name: &str) -> Option<String> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_owned)
}

/// Starts the sidecar with `args` and waits until it reports the refused PIN on `/readyz`.
fn start_sidecar_with_refused_pin(
    hsm: &SoftHsm,
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    let port = nitrokey_e2e::openbao::free_port().expect("port");
    let metrics = format!("http://127.0.0.1:{port}");
    let mut cmd = command(hsm);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("UNSEAL_INIT_METRICS_ADDRESS", format!("127.0.0.1:{port}"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn");
    let body = wait_http(&metrics, "/readyz", 503, Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut body = body;
    while !body.contains("PIN rejected") {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never named the rejected PIN: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
        body = wait_http(&metrics, "/readyz", 503, Duration::from_secs(5));
    }
    (child, metrics)
}

#[test]
fn sidecar_with_a_wrong_pin_stays_up_unready_and_never_logs_in_again() {
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "unsealPeriod: 200ms\n");
    let (mut child, metrics) = start_sidecar_with_refused_pin(
        &hsm,
        &config,
        &[],
        &[("BANK_VAULTS_HSM_PIN", "wrong-pin-4711")],
    );
    // Many unseal periods later it is still running, live but not ready, and has not tried
    // the PIN again.
    std::thread::sleep(Duration::from_secs(6));
    assert!(child.try_wait().expect("try_wait").is_none(), "exited");
    wait_http(&metrics, "/healthz", 200, Duration::from_secs(5));
    let ready = wait_http(&metrics, "/readyz", 503, Duration::from_secs(5));
    assert!(ready.contains("HSM user PIN rejected"), "{ready}");
    let text = wait_http(&metrics, "/metrics", 200, Duration::from_secs(5));
    assert_eq!(
        sample(&text, "unseal_init_hsm_pin_rejected").as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        sample(&text, "unseal_init_hsm_login_attempts_total").as_deref(),
        Some("1"),
        "{text}"
    );

    sigterm(child.id());
    let r = wait(child, Duration::from_secs(15));
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert_eq!(login_attempts(&r.text), 1, "{}", r.text);
    assert_eq!(r.text.matches("CKR_PIN_INCORRECT").count(), 1, "{}", r.text);
    assert!(r.text.contains("waiting to be restarted"), "{}", r.text);
    assert_no_secrets(&r.text, &["wrong-pin-4711".to_owned()]);
    assert!(!bao.seal_status().expect("status").initialized);
    hsm.data_labels().expect("correct PIN still accepted");
}

#[test]
fn sidecar_logs_in_again_only_when_the_pin_file_changes() {
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "unsealPeriod: 200ms\n");
    let pin_file = dir.path().join("pin");
    // Rewritten as the kubelet does for a mounted Secret: a new file renamed into place.
    let set_pin = |value: &str| {
        let tmp = dir.path().join("pin.new");
        std::fs::write(&tmp, format!("{value}\n")).expect("write pin");
        std::fs::rename(&tmp, &pin_file).expect("rename pin");
    };
    set_pin("wrong-pin-0815");
    let pin_arg = pin_file.to_str().expect("utf-8 path");
    let (child, metrics) =
        start_sidecar_with_refused_pin(&hsm, &config, &["--hsm-pin-file", pin_arg], &[]);

    // The same wrong value written again is not a change: no second try.
    set_pin("wrong-pin-0815");
    std::thread::sleep(Duration::from_secs(5));
    let text = wait_http(&metrics, "/metrics", 200, Duration::from_secs(5));
    assert_eq!(
        sample(&text, "unseal_init_hsm_login_attempts_total").as_deref(),
        Some("1"),
        "{text}"
    );
    assert!(!bao.seal_status().expect("status").initialized);

    set_pin(USER_PIN);
    let mut child = child;
    if let Err(e) = bao.wait_for(Duration::from_secs(90), |s| s.initialized && !s.sealed) {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!(
            "not unsealed after the PIN file was corrected: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_http(&metrics, "/readyz", 200, Duration::from_secs(30));
    let text = wait_http(&metrics, "/metrics", 200, Duration::from_secs(5));
    assert_eq!(
        sample(&text, "unseal_init_hsm_pin_rejected").as_deref(),
        Some("0"),
        "{text}"
    );
    assert_eq!(
        sample(&text, "unseal_init_hsm_login_attempts_total").as_deref(),
        Some("2"),
        "{text}"
    );
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, default_names());

    sigterm(child.id());
    let r = wait(child, Duration::from_secs(15));
    assert_eq!(r.code, Some(0), "{}", r.text);
    // Two logins in all: the wrong PIN once, the corrected one once.
    assert_eq!(login_attempts(&r.text), 2, "{}", r.text);
    assert_eq!(r.text.matches("CKR_PIN_INCORRECT").count(), 1, "{}", r.text);
    assert!(r.text.contains("the PIN file changed"), "{}", r.text);
    assert_no_secrets(&r.text, &["wrong-pin-0815".to_owned(), USER_PIN.to_owned()]);
}

#[test]
fn missing_key_pair_is_reported_and_generated_only_when_enabled() {
    let hsm = SoftHsm::without_key().expect("token");
    let bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text.contains("RSA key pair `bank-vaults` not found"),
        "{}",
        r.text
    );
    assert!(!bao.seal_status().expect("status").initialized);

    // A member of a cluster sharing one Secret is not told to generate a key pair of its own
    // (the stored keys are encrypted with the cluster's), but to import the cluster's.
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["--once", "--mode", "hsm-k8s", "--k8s-secret-name", "keys"])
        .arg("--raft-leader-address")
        .arg(bao.address());
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text.contains("RSA key pair `bank-vaults` not found")
            && r.text.contains("--unwrap-key")
            && r.text.contains("HA: one stick per node")
            && !r.text.contains("hsm.generateKey or run"),
        "{}",
        r.text
    );

    // Only one half present is a clear error too.
    hsm.generate_key_pair("bank-vaults").expect("keygen");
    hsm.delete_object("pubkey", "bank-vaults")
        .expect("delete pubkey");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text
            .contains("incomplete: private key found but no public key"),
        "{}",
        r.text
    );

    // With generation enabled and no pair at all, the pair is made on the token and used.
    hsm.delete_object("privkey", "bank-vaults")
        .expect("delete privkey");
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .arg("--once")
        .arg("--hsm-generate-key");
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(!bao.seal_status().expect("status").sealed);
    let keys = hsm
        .run_pkcs11_tool(true, &["--list-objects", "--type", "privkey"])
        .expect("list");
    assert!(keys.contains("bank-vaults"), "{keys}");
    assert!(
        keys.contains("sensitive") || keys.contains("never extractable"),
        "{keys}"
    );
}

#[test]
fn wrong_slot_or_label_lists_what_was_seen() {
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once").args([
        "--hsm-slot-id",
        "4242",
        "--hsm-token-wait-timeout",
        "1s",
    ]);
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.text.contains("waiting for the HSM token"), "{}", r.text);
    assert!(
        r.text
            .contains("no HSM slot matches slotId 4242 after waiting 1s"),
        "{}",
        r.text
    );
    assert!(r.text.contains(&hsm.slot_id().to_string()), "{}", r.text);
    assert!(r.text.contains("bank-vaults"), "{}", r.text);

    // A label is matched instead of the slot id when given alone, decorations tolerated.
    let cfg_label = dir.path().join("label.yaml");
    std::fs::write(
        &cfg_label,
        format!(
            "journalDir: {}\nvault:\n  address: {}\nhsm:\n  modulePath: {}\n  tokenLabel: \"bank-vaults (UserPIN)\"\n  pin: {USER_PIN}\n",
            journal_dir(dir.path()).display(),
            bao.address(),
            hsm.module().display()
        ),
    )
    .expect("write");
    let r = run_once_ok(&hsm, &cfg_label);
    assert!(
        r.text.contains(&format!("slot={}", hsm.slot_id())),
        "{}",
        r.text
    );

    std::fs::write(
        &cfg_label,
        format!(
            "journalDir: {}\nvault:\n  address: {}\nhsm:\n  modulePath: {}\n  tokenLabel: nokey\n  tokenWaitTimeout: 1s\n  pin: {USER_PIN}\n",
            journal_dir(dir.path()).display(),
            bao.address(),
            hsm.module().display()
        ),
    )
    .expect("write");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&cfg_label).arg("--once");
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.text.contains("tokenLabel `nokey`"), "{}", r.text);
}

#[test]
fn invalid_configuration_exits_2_naming_the_field() {
    let hsm = SoftHsm::without_key().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("hsm:\n  slotID: 1\n", "slotID"),
        (
            "options:\n  secretShares: 3\n  secretThreshold: 5\n",
            "options.secretThreshold",
        ),
        ("mode: vault\n", "mode"),
        ("hsm: [1, 2\n", "invalid configuration file"),
        ("unsealPeriod: often\n", "unsealPeriod"),
    ];
    for (text, field) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, text).expect("write");
        let mut cmd = command(&hsm);
        cmd.arg("--config").arg(&path).arg("--once");
        let r = run(cmd, Duration::from_secs(10));
        assert_eq!(r.code, Some(2), "{text}: {}", r.text);
        assert!(r.text.contains(field), "{text}: {}", r.text);
        assert!(!r.text.contains("panicked"), "{}", r.text);
        assert_error_line(&r);
    }
    let mut cmd = command(&hsm);
    cmd.arg("--secret-shares").arg("many");
    let r = run(cmd, Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert_error_line(&r);
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(dir.path().join("absent.yaml"));
    let r = run(cmd, Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.text.contains("absent.yaml"), "{}", r.text);
    assert_error_line(&r);
    // A bad value from the environment is reported under the variable's name.
    let mut cmd = command(&hsm);
    cmd.env("BANK_VAULTS_HSM_SLOT_ID", "slot-one")
        .args(["hsm", "info"]);
    let r = run(cmd, Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(
        r.text
            .contains("environment variable BANK_VAULTS_HSM_SLOT_ID"),
        "{}",
        r.text
    );
    // Absurd durations are configuration errors, never a panic.
    for period in [
        "100000000000000000000h",
        "18446744073709551616s",
        "0.0000000001ms",
    ] {
        let mut cmd = command(&hsm);
        cmd.args(["--once", "--unseal-period", period]);
        let r = run(cmd, Duration::from_secs(10));
        assert_eq!(r.code, Some(2), "{period}: {}", r.text);
        assert!(r.text.contains("--unseal-period"), "{period}: {}", r.text);
        assert!(!r.text.contains("panicked"), "{period}: {}", r.text);
        assert_error_line(&r);
    }
    // Every duration from the environment is reported under the variable's name.
    for (var, value) in [
        ("BANK_VAULTS_UNSEAL_PERIOD", "abc"),
        ("BANK_VAULTS_UNSEAL_PERIOD", "10ms"),
        ("UNSEAL_INIT_DEADLINE", "soon"),
        ("UNSEAL_INIT_TOKEN_WAIT_TIMEOUT", "0s"),
        ("UNSEAL_INIT_METRICS_ADDRESS", "nowhere"),
    ] {
        let mut cmd = command(&hsm);
        cmd.env(var, value).arg("--once");
        let r = run(cmd, Duration::from_secs(10));
        assert_eq!(r.code, Some(2), "{var}={value}: {}", r.text);
        assert!(
            r.text.contains(&format!("environment variable {var}")),
            "{var}={value}: {}",
            r.text
        );
        assert_error_line(&r);
    }
}

/// A value the configuration refuses is reported with the layer it came from, whichever that
/// is: the flag, its environment variable, or the file's key.
#[test]
fn a_refused_value_names_the_flag_the_variable_or_the_file() {
    let hsm = SoftHsm::without_key().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shares.yaml");
    std::fs::write(&path, "options:\n  secretShares: 0\n").expect("write");
    let from_flag = {
        let mut cmd = command(&hsm);
        cmd.args(["--once", "--secret-shares", "0"]);
        cmd
    };
    let from_env = {
        let mut cmd = command(&hsm);
        cmd.env("BANK_VAULTS_SECRET_SHARES", "0").arg("--once");
        cmd
    };
    let from_file = {
        let mut cmd = command(&hsm);
        cmd.arg("--config").arg(&path).arg("--once");
        cmd
    };
    for (cmd, source) in [
        (from_flag, "(from flag --secret-shares)"),
        (
            from_env,
            "(from environment variable BANK_VAULTS_SECRET_SHARES)",
        ),
        (from_file, "(from the configuration file)"),
    ] {
        let r = run(cmd, Duration::from_secs(10));
        assert_eq!(r.code, Some(2), "{source}: {}", r.text);
        assert!(
            r.text.contains(&format!(
                "options.secretShares {source}: must be at least 1"
            )),
            "{source}: {}",
            r.text
        );
        assert_error_line(&r);
    }
}

/// A configuration or usage error is one `error: …` line, as clap's own are: no timestamped
/// log line, no panic.
fn assert_error_line(r: &Run) {
    let first = r.text.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{}", r.text);
    assert!(!r.text.contains(" ERROR "), "{}", r.text);
    assert!(!r.text.contains("panicked"), "{}", r.text);
}

#[test]
fn values_the_file_cannot_mean_exit_2_naming_the_field() {
    let hsm = SoftHsm::without_key().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        // A quoted value is a string, not a boolean or a number.
        ("hsm:\n  daemon: \"yes\"\n", "hsm.daemon", "without quotes"),
        ("hsm:\n  slotId: \"0\"\n", "hsm.slotId", "without quotes"),
        (
            "options:\n  storeRootToken: \"false\"\n",
            "options.storeRootToken",
            "without quotes",
        ),
        // Addresses the HTTP client could never use.
        (
            "vault:\n  address: \"http://[::1\"\n",
            "vault.address",
            "http://[::1",
        ),
        (
            "vault:\n  address: http://127.0.0.1:99999\n",
            "vault.address",
            "127.0.0.1:99999",
        ),
        (
            "vault:\n  address: \"http://\"\n",
            "vault.address",
            "http://",
        ),
        // Bank-Vaults' socket key: named, with the reason.
        (
            "hsm:\n  daemonSocket: /run/pcscd/pcscd.comm\n",
            "daemonSocket",
            "not supported",
        ),
    ];
    for (text, field, detail) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, text).expect("write");
        let mut cmd = command(&hsm);
        cmd.arg("--config").arg(&path).arg("--once");
        let r = run(cmd, Duration::from_secs(10));
        assert_eq!(r.code, Some(2), "{text}: {}", r.text);
        assert!(r.text.contains(field), "{text}: {}", r.text);
        assert!(r.text.contains(detail), "{text}: {}", r.text);
        assert_error_line(&r);
    }
    // An unknown key's error lists the keys that exist, and daemonSocket is not among them.
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "hsm:\n  socket: x\n").expect("write");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&path).args(["hsm", "info"]);
    let r = run(cmd, Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.text.contains("unknown field `socket`"), "{}", r.text);
    assert!(r.text.contains("modulePath"), "{}", r.text);
    assert!(!r.text.contains("daemonSocket"), "{}", r.text);
}

#[test]
fn an_oversized_pin_file_is_refused_by_name_without_being_read() {
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    // 300 MB that occupy no disk: the program must not read, hold or send them.
    let pin = dir.path().join("huge-pin");
    std::fs::File::create(&pin)
        .and_then(|f| f.set_len(300 * 1024 * 1024))
        .expect("sparse file");
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .arg("--once")
        .arg("--hsm-pin-file")
        .arg(&pin);
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.text.contains("hsm.pinFile"), "{}", r.text);
    assert!(r.text.contains(&pin.display().to_string()), "{}", r.text);
    assert!(r.text.contains("more than 256 bytes"), "{}", r.text);
    assert_eq!(login_attempts(&r.text), 0, "{}", r.text);
    assert_error_line(&r);
    assert!(!bao.seal_status().expect("status").initialized);

    // A FIFO would block the open for ever: refused before it is opened.
    let fifo = dir.path().join("pin-fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8 path")).expect("no NUL");
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .arg("--once")
        .arg("--hsm-pin-file")
        .arg(&fifo);
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.text.contains("is not a regular file"), "{}", r.text);
    assert_error_line(&r);
}

#[test]
fn a_missing_ca_file_is_a_configuration_error_before_any_login() {
    let (hsm, bao, dir) = peers();
    let absent = dir.path().join("no-such-ca.pem");
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .arg("--once")
        .arg("--vault-cacert")
        .arg(&absent);
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.text.contains("vault.caCert"), "{}", r.text);
    assert!(r.text.contains(&absent.display().to_string()), "{}", r.text);
    assert_eq!(login_attempts(&r.text), 0, "{}", r.text);
    assert_error_line(&r);
    // The same from VAULT_CACERT, for the sidecar too.
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .env("VAULT_CACERT", &absent);
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.text.contains("no-such-ca.pem"), "{}", r.text);
    assert_eq!(login_attempts(&r.text), 0, "{}", r.text);
}

#[test]
fn the_extra_empty_softhsm_slot_gets_an_error_that_says_what_to_set() {
    let (hsm, bao, dir) = peers();
    let config = dir.path().join("no-slot.yaml");
    std::fs::write(
        &config,
        format!(
            "journalDir: {}\nvault:\n  address: {}\nhsm:\n  modulePath: {}\n  pin: {USER_PIN}\n",
            journal_dir(dir.path()).display(),
            bao.address(),
            hsm.module().display()
        ),
    )
    .expect("write");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let r = run(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text.contains(
            "several HSM slots hold a token and no slotId, tokenLabel or tokenSerial is set"
        ),
        "{}",
        r.text
    );
    assert!(r.text.contains(&hsm.slot_id().to_string()), "{}", r.text);
    assert!(r.text.contains("set hsm.slotId"), "{}", r.text);
    assert!(!r.text.contains("the only slot"), "{}", r.text);
    assert_eq!(login_attempts(&r.text), 0, "{}", r.text);
}

#[test]
fn keys_of_another_vault_fail_clearly_without_looping() {
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    run_once_ok(&hsm, &config);
    let other = OpenBao::start().expect("openbao");
    let (other_keys, _) = other.init(5, 3).expect("init");
    let config = write_config(dir.path(), &hsm, &other.address(), "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.text.contains("do not belong to this Vault"), "{}", r.text);
    assert_eq!(
        r.text.matches("vault is sealed, unsealing").count(),
        1,
        "{}",
        r.text
    );
    let status = other.seal_status().expect("status");
    assert!(status.sealed);
    assert_eq!(status.progress, 0, "unseal progress must be reset");
    assert_no_secrets(&r.text, &other_keys);
}

fn kill_pid(pid: u32) {
    // SAFETY: kill(2) on a child of this test process.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Runs `unseal-init --once` while OpenBao is killed at `request` (after answering it, or
/// instead of answering it), checks that every key is on the token while OpenBao is down, then
/// starts OpenBao again and returns the run's result once it ends.
fn once_with_openbao_killed_at(request: &'static str, action: Action) -> (Run, OpenBao) {
    let (hsm, mut bao, dir) = peers();
    let pid = bao.pid().expect("pid");
    let proxy = proxy::start(&bao.address(), request, action, move || kill_pid(pid));
    let config = write_config(dir.path(), &hsm, &proxy.address, "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let child = cmd.spawn().expect("spawn");
    proxy.wait_fired(request, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    // OpenBao is down; the keys it handed out must be on the token already.
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, default_names());
    bao.kill().expect("reap");
    bao.start_again().expect("restart");
    let r = wait(child, Duration::from_secs(90));
    assert_eq!(r.code, Some(0), "{}", r.text);
    let status = bao.seal_status().expect("status");
    assert!(status.initialized && !status.sealed, "{status:?}");
    (r, bao)
}

#[test]
fn openbao_killed_right_after_init_loses_no_key() {
    once_with_openbao_killed_at("PUT /v1/sys/init", Action::HookAfterResponse);
}

#[test]
fn openbao_killed_between_storage_and_unseal_is_unsealed_by_the_same_run() {
    let (r, _bao) = once_with_openbao_killed_at("PUT /v1/sys/unseal", Action::HookInstead);
    assert_eq!(
        r.text.matches("initializing vault").count(),
        1,
        "{}",
        r.text
    );
}

#[test]
fn token_unplugged_while_storing_the_new_keys_loses_nothing() {
    let (hsm, bao, dir) = peers();
    let hsm = std::sync::Arc::new(hsm);
    // The proxy's thread outlives the test; a strong reference in its hook would keep the
    // token's temporary directory (test keys included) from ever being removed.
    let unplugged = std::sync::Arc::downgrade(&hsm);
    let proxy = proxy::start(
        &bao.address(),
        "PUT /v1/sys/init",
        Action::HookAfterResponse,
        move || {
            let Some(token) = unplugged.upgrade() else {
                return;
            };
            // The answer to sys/init is delivered only after the token has gone.
            token.unplug().expect("unplug");
            let back = token;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                back.reinsert().expect("reinsert");
            });
        },
    );
    let r = once_through(&hsm, &bao, dir.path(), &proxy);
    assert!(
        r.text.contains("retrying until it succeeds"),
        "token loss not seen:\n{}",
        r.text
    );
}

/// Runs `--once` against OpenBao through `proxy` (whose hook disturbs something while
/// `sys/init`'s answer is held) and checks what must hold whatever the hook did: the run
/// succeeds, every key is on the token, and OpenBao is initialised and unsealed.
fn once_through(hsm: &SoftHsm, bao: &OpenBao, dir: &std::path::Path, proxy: &proxy::Proxy) -> Run {
    let config = write_config(dir, hsm, &proxy.address, "");
    let mut cmd = command(hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let r = run(cmd, Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(proxy.fired.load(std::sync::atomic::Ordering::SeqCst));
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, default_names(), "{}", r.text);
    let status = bao.seal_status().expect("status");
    assert!(status.initialized && !status.sealed, "{status:?}");
    r
}

#[test]
fn sidecar_unseals_once_an_unplugged_token_is_back() {
    let (hsm, mut bao, dir) = peers();
    let (child, metrics) = spawn_sidecar(&hsm, dir.path(), &bao.address());
    wait_http(&metrics, "/readyz", 200, Duration::from_secs(60));

    // Token gone while Vault restarts sealed: the sidecar cannot unseal, stays alive, and
    // reports not ready.
    hsm.unplug().expect("unplug");
    bao.restart().expect("restart");
    wait_http(&metrics, "/readyz", 503, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert!(bao.seal_status().expect("status").sealed);
    wait_http(&metrics, "/healthz", 200, Duration::from_secs(5));

    hsm.reinsert().expect("reinsert");
    let mut child = child;
    if let Err(e) = bao.wait_for(Duration::from_secs(30), |s| !s.sealed) {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!(
            "not unsealed after the token came back: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_http(&metrics, "/readyz", 200, Duration::from_secs(30));
    let text = wait_http(&metrics, "/metrics", 200, Duration::from_secs(5));
    assert!(text.contains("unseal_init_unseal_attempts_total"), "{text}");
    child.kill().expect("kill");
    let out = child.wait_with_output().expect("output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("unseal pass failed"), "{log}");
    assert!(log.contains("HSM token unavailable; re-opening"), "{log}");
    // Every login used the PIN that worked; none was rejected.
    assert!(!log.contains("CKR_PIN_INCORRECT"), "{log}");
}

/// Answers every request with a 200 status and an endless body, the way a broken proxy or a
/// hostile endpoint might; returns its address.
fn endless_body_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200000000\r\n\r\n";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                // Until the client hangs up (or 200 MB went out).
                for _ in 0..(200_000_000 / chunk.len()) {
                    if stream.write_all(&chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn an_endless_vault_answer_is_cut_off_and_a_deadline_ends_the_run() {
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = endless_body_server();
    let config = write_config(dir.path(), &hsm, &vault, "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text.contains("larger than 1048576 bytes"),
        "the oversized body was not refused:\n{}",
        r.text
    );
    // Nothing was initialised, so no journal was ever written.
    assert!(!journal_dir(dir.path()).join("init-journal.json").exists());

    // A Vault that never answers: --deadline ends the run, saying so, instead of waiting for
    // ever.
    let closed = format!(
        "http://127.0.0.1:{}",
        nitrokey_e2e::openbao::free_port().expect("port")
    );
    let config = write_config(dir.path(), &hsm, &closed, "");
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["--once", "--deadline", "2s"]);
    // `run` kills it after 60 s, which would show as no exit code: ending by itself with 1 and
    // the deadline's message is the check, whatever the machine's load made the 2 s take.
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.text.contains("within the deadline"), "{}", r.text);
    assert!(r.text.contains("Connect"), "the cause is named: {}", r.text);
}

#[test]
fn a_journal_that_cannot_be_written_after_init_still_loses_no_key() {
    let (hsm, bao, dir) = peers();
    let journal = journal_dir(dir.path());
    let broken = journal.clone();
    // The directory took its probe write before sys/init; by the time the answer arrives it
    // is gone and a file stands in its place (a volume lost, a disk full: nothing writable).
    let proxy = proxy::start(
        &bao.address(),
        "PUT /v1/sys/init",
        Action::HookAfterResponse,
        move || {
            let _ = std::fs::remove_dir_all(&broken);
            std::fs::write(&broken, b"not a directory").expect("replace the journal directory");
        },
    );
    let r = once_through(&hsm, &bao, dir.path(), &proxy);
    assert!(
        r.text.contains("cannot write the init journal"),
        "{}",
        r.text
    );
    assert!(journal.is_file(), "the stand-in file is left as it was");
}

/// Answers every request with `status` and `body` (HTML, as a proxy's error page would be);
/// returns its address.
fn fixed_answer_server(status: &'static str, body: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body.as_bytes());
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_gateway_error_is_waited_for_and_a_vault_error_page_is_cut() {
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");

    // A proxy in front of a Vault that is away answers 502: waited for, like a refused
    // connection, until the deadline.
    let gateway = fixed_answer_server(
        "502 Bad Gateway",
        "<html><body><h1>502 Bad Gateway</h1></body></html>".to_owned(),
    );
    let config = write_config(dir.path(), &hsm, &gateway, "");
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["--once", "--deadline", "3s"]);
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.text.contains("waiting for Vault's API"), "{}", r.text);
    assert!(
        r.text.contains("HTTP 502 from a proxy in front of Vault"),
        "{}",
        r.text
    );
    assert!(r.text.contains("within the deadline of 3s"), "{}", r.text);

    // Vault itself failing (500) is not waited for; its HTML page is cut to one short line.
    let page = format!(
        "<html>\n<head><title>500 Internal Server Error</title></head>\n<body>{}</body></html>",
        "x".repeat(1000 * 1000)
    );
    let broken = fixed_answer_server("500 Internal Server Error", page);
    let config = write_config(dir.path(), &hsm, &broken, "");
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["--once", "--deadline", "10m"]);
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    let line = r
        .text
        .lines()
        .find(|l| l.contains("returned HTTP 500"))
        .unwrap_or_else(|| panic!("no HTTP 500 error line:\n{}", r.text));
    assert!(line.contains("500 Internal Server Error"), "{line}");
    assert!(line.contains("bytes in all)"), "{line}");
    assert!(line.len() < 600, "{} characters: {line}", line.len());
    assert!(!r.text.contains("within the deadline"), "{}", r.text);
}

/// `openssl s_server` with a fresh self-signed certificate: a TLS peer no built-in root
/// trusts. Killed when dropped.
struct UntrustedTls {
    child: std::process::Child,
    address: String,
}

impl UntrustedTls {
    fn start(dir: &std::path::Path) -> Self {
        let (key, cert) = (dir.join("tls.key"), dir.join("tls.crt"));
        let status = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl req");
        assert!(status.success());
        let port = nitrokey_e2e::openbao::free_port().expect("port");
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(port.to_string())
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "s_server not listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            address: format!("https://127.0.0.1:{port}"),
        }
    }
}

impl Drop for UntrustedTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_rejected_certificate_ends_once_at_once_saying_it_will_not_fix_itself() {
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = UntrustedTls::start(dir.path());
    let config = write_config(dir.path(), &hsm, &tls.address, "");
    let mut cmd = command(&hsm);
    // A deadline far beyond the test's own limit: ending proves it did not wait.
    cmd.arg("--config")
        .arg(&config)
        .args(["--once", "--deadline", "1h"]);
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.text
            .contains("presented a TLS certificate this program does not trust"),
        "{}",
        r.text
    );
    assert!(r.text.contains("will not fix itself"), "{}", r.text);
    assert!(r.text.contains("vault.caCert"), "{}", r.text);
    assert!(!r.text.contains("waiting for Vault's API"), "{}", r.text);
    let error = r
        .text
        .lines()
        .find(|l| l.contains("does not trust"))
        .unwrap_or_default();
    assert!(error.contains("ERROR"), "{error}");
}

#[test]
fn a_sidecar_started_during_an_api_outage_waits_and_unseals_once_the_api_is_back() {
    let (hsm, bao, dir) = peers();
    // The kubeconfig names an API server that is not there yet (connection refused).
    let api_port = nitrokey_e2e::openbao::free_port().expect("port");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{api_port}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: vault\ncurrent-context: c\n"
        ),
    )
    .expect("kubeconfig");
    let port = nitrokey_e2e::openbao::free_port().expect("port");
    let metrics = format!("http://127.0.0.1:{port}");
    let config = write_config(
        dir.path(),
        &hsm,
        &bao.address(),
        &format!(
            "unsealPeriod: 300ms\nmetricsAddress: 127.0.0.1:{port}\nkubernetes:\n  secretName: vault-unseal-keys\n"
        ),
    );
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["--mode", "hsm-k8s"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    let mut child = cmd.spawn().expect("spawn");

    // Not ready, saying why, and still running: it waits in-process.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = wait_http(&metrics, "/readyz", 503, Duration::from_secs(60));
        if body.contains("Kubernetes API server unreachable") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never named the API server: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_http(&metrics, "/healthz", 200, Duration::from_secs(5));
    assert!(child.try_wait().expect("try_wait").is_none(), "exited");
    assert!(!bao.seal_status().expect("status").initialized);

    // The API server comes back where the kubeconfig says: the same process initialises
    // Vault, stores the keys in the Secret and unseals.
    let api = nitrokey_e2e::kube_api::KubeApi::start_on(api_port).expect("kube api");
    if let Err(e) = bao.wait_for(Duration::from_secs(120), |s| s.initialized && !s.sealed) {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!(
            "not unsealed after the API server came back: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_http(&metrics, "/readyz", 200, Duration::from_secs(30));
    let data = api
        .secret("vault", "vault-unseal-keys")
        .expect("secret created");
    let mut names: Vec<String> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(names, default_names());

    sigterm(child.id());
    let r = wait(child, Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert_eq!(
        r.text
            .matches("the Kubernetes API server is not answering; waiting for it")
            .count(),
        1,
        "{}",
        r.text
    );
    assert!(r.text.contains("Connection refused"), "{}", r.text);
    // The connection error names what it tried to reach.
    assert!(
        r.text
            .contains(&format!("(API server http://127.0.0.1:{api_port}/)")),
        "{}",
        r.text
    );
    // kube's own ERROR line, which names nothing, is not repeated in the log.
    assert!(!r.text.contains("failed with error"), "{}", r.text);
    assert!(!r.text.contains(" ERROR "), "{}", r.text);
    assert!(
        r.text
            .contains("the Kubernetes API server is answering again"),
        "{}",
        r.text
    );
    assert_eq!(login_attempts(&r.text), 1, "{}", r.text);
}

/// Vault's request log names the caller: every request carries the program's User-Agent.
/// A listener in Vault's place reads the first request and closes the connection.
#[test]
fn vault_requests_carry_the_programs_user_agent() {
    use std::io::Read;
    let hsm = SoftHsm::new().expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    // Polled, so a program that never connects (it exited first) fails the test instead of
    // hanging it.
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let head = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return format!("no request within 60 s: {e}"),
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    });
    let config = write_config(dir.path(), &hsm, &address, "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let mut w = common::faults::Watched::spawn(cmd, None);
    let head = head.join().expect("listener");
    w.kill();
    let agent = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    assert_eq!(
        agent,
        concat!("nitrokey-unseal-init/", env!("CARGO_PKG_VERSION")),
        "{head}"
    );
}
