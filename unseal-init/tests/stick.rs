//! The program on tokens that behave like a Nitrokey HSM 2 on OpenSC 0.23 + pcscd, where
//! SoftHSM2 is too forgiving: a software TPM behind the TPM2 PKCS#11 module (a real token
//! that also leaves failed decrypts active, does OAEP-SHA256, shares one serial across slots
//! and loses its logins when the TPM restarts), and SoftHSM2 behind the OpenSC stand-in module
//! (late token, C-string attributes, sticky failed decrypts). Every run is the real binary
//! against a real OpenBao; results are cross-checked with pkcs11-tool and OpenBao's API.

mod common;

use common::stick::*;
use common::{assert_no_secrets, default_names, wait_http};
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::USER_PIN;
use nitrokey_e2e::token::{Scheme, Token};
use nitrokey_e2e::tpm::{TPM_SERIAL, Tpm};
use std::time::{Duration, Instant};

fn start_bao() -> OpenBao {
    OpenBao::start().expect("openbao")
}

fn config_path(config: &std::path::Path) -> String {
    config.display().to_string()
}

/// A configuration selecting `token` by its label, `bank-vaults`, as users do.
fn by_label(dir: &std::path::Path, token: &dyn Token, bao: &OpenBao) -> std::path::PathBuf {
    write_token_config(
        dir,
        token,
        &bao.address(),
        Select::Label("bank-vaults"),
        "",
        "",
    )
}

/// Bank-Vaults values with a PKCS#1 v1.5 `vault-unseal-0` (written before v1.33) unseal,
/// `hsm migrate` rewrites them, and a share that cannot be decrypted at all is named and
/// skipped while the other shares still unseal. `current` is the scheme the program is
/// expected to write on this token.
fn legacy_values_unseal_migrate_and_survive_a_bad_share(token: &dyn Token, current: Scheme) {
    let mut bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = init_like_bank_vaults(&bao, token, Scheme::Pkcs1v15);
    assert!(bao.seal_status().expect("status").sealed);
    let config = write_token_config(dir.path(), token, &bao.address(), Select::SlotId, "", "");

    let first = once_ok(token, &config);
    let status = bao.seal_status().expect("status");
    assert!(
        status.initialized && !status.sealed,
        "{status:?}\n{}",
        first.text
    );

    let cfg = config_path(&config);
    let migrate = run_args(
        token,
        &["hsm", "migrate", "--config", &cfg],
        Duration::from_secs(60),
    );
    assert_eq!(
        migrate.code,
        Some(0),
        "hsm migrate failed:\n{}",
        migrate.text
    );
    for (i, key) in vault.keys.iter().enumerate() {
        let name = format!("vault-unseal-{i}");
        let (scheme, plain) = decrypt_stored_on(token, &name);
        assert_eq!(scheme, current, "{name} rewritten with another scheme");
        assert_eq!(&plain, key, "{name} does not hold its key after migrating");
    }
    let (_, root) = decrypt_stored_on(token, "vault-root");
    assert_eq!(root, vault.root, "vault-root changed by migrating");

    // One share replaced by bytes no scheme decrypts (leading 00 01 is never valid
    // PKCS#1 v1.5 encryption padding); the other four are enough.
    let mut junk: Vec<u8> = (0..256u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    junk[0] = 0x00;
    junk[1] = 0x01;
    token
        .run_pkcs11_tool(
            true,
            &[
                "--delete-object",
                "--type",
                "data",
                "--label",
                "vault-unseal-0",
            ],
        )
        .expect("delete vault-unseal-0");
    token
        .write_data("vault-unseal-0", &junk)
        .expect("write junk");
    bao.restart().expect("restart openbao");
    assert!(bao.seal_status().expect("status").sealed);
    let second = once_ok(token, &config);
    assert!(
        !bao.seal_status().expect("status").sealed,
        "{}",
        second.text
    );
    assert!(
        second
            .text
            .lines()
            .any(|l| l.contains("vault-unseal-0") && (l.contains("WARN") || l.contains("ERROR"))),
        "the undecryptable vault-unseal-0 was not reported by name:\n{}",
        second.text
    );

    let mut secrets = vault.keys.clone();
    secrets.push(vault.root.clone());
    secrets.push(USER_PIN.to_owned());
    for run in [&first, &migrate, &second] {
        assert_no_secrets(&run.text, &secrets);
    }
}

#[test]
fn tpm_legacy_values_unseal_after_a_failed_decrypt_and_migrate() {
    let tpm = Tpm::new().expect("tpm token");
    legacy_values_unseal_migrate_and_survive_a_bad_share(&tpm, Scheme::OaepSha256);
}

#[test]
fn opensc_legacy_values_unseal_after_a_failed_decrypt_and_migrate() {
    // SoftHSM2 alone ends a failed decrypt; OpenSC with a SmartCard-HSM does not.
    let token = ShimToken::new(&[("NKSHIM_STICKY_DECRYPT", "1")]);
    legacy_values_unseal_migrate_and_survive_a_bad_share(&token, Scheme::OaepSha1);
}

#[test]
fn once_waits_for_a_token_that_appears_after_start() {
    let token = ShimToken::new(&[
        ("NKSHIM_TOKEN_DELAY_MS", "3000"),
        ("NKSHIM_OPENSC_LABELS", "1"),
    ]);
    let bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    // Selected by label, as users do: OpenSC decorates it with " (UserPIN)".
    let config = by_label(dir.path(), &token, &bao);
    let started = Instant::now();
    let run = once_ok(&token, &config);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "finished before the token appeared:\n{}",
        run.text
    );
    let status = bao.seal_status().expect("status");
    assert!(status.initialized && !status.sealed, "{status:?}");
    let mut labels = token.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, default_names());
}

#[test]
fn sidecar_is_unready_naming_the_missing_token_until_it_appears() {
    // The card is out until the test puts it in, so what the sidecar says meanwhile is judged
    // from its answers, not from how long it took to start on a loaded machine.
    let card = tempfile::tempdir().expect("tempdir");
    let control = card.path().join("card");
    std::fs::write(&control, "removed").expect("card out");
    let token = ShimToken::new(&[("NKSHIM_CONTROL", &control.display().to_string())]);
    let bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let sidecar = Sidecar::start(&token, dir.path(), &bao.address(), "");

    // While the token is missing: up, not ready, and saying why. (The very first answers may
    // come before the token is looked for, and say only that Vault is not ready yet.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let body = wait_http(&sidecar.endpoints, "/readyz", 503, Duration::from_secs(30));
        if body.to_lowercase().contains("token") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said the token is missing: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        body.to_lowercase().contains("token"),
        "/readyz does not say the token is missing: {body}"
    );
    assert!(
        !bao.seal_status().expect("status").initialized,
        "initialised without a token"
    );

    std::fs::write(&control, "present").expect("card in");
    bao.wait_for(Duration::from_secs(60), |s| s.initialized && !s.sealed)
        .expect("sidecar initialised and unsealed once the token appeared");
    wait_http(&sidecar.endpoints, "/readyz", 200, Duration::from_secs(30));
    let run = sidecar.stop();
    assert_eq!(run.code, Some(0), "{}", run.text);
}

#[test]
fn attribute_values_are_safe_for_a_module_reading_c_strings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("cstring-report.txt");
    let token = ShimToken::new(&[
        ("NKSHIM_CSTRING_ATTRS", "1"),
        ("NKSHIM_REPORT", &report.display().to_string()),
        // glibc fills freed memory with a non-zero byte and, without its thread cache (which
        // zeroes part of a reused chunk), hands it out again as is: what follows an
        // unterminated buffer is then garbage rather than, by luck, a zero.
        (
            "GLIBC_TUNABLES",
            "glibc.malloc.tcache_count=0:glibc.malloc.perturb=165",
        ),
    ]);
    let bao = start_bao();
    let config = write_token_config(dir.path(), &token, &bao.address(), Select::SlotId, "", "");
    let cfg = config_path(&config);
    let run = run_args(
        &token,
        &["--config", &cfg, "--once"],
        Duration::from_secs(120),
    );

    // What the module was given: every string value must end where its length says.
    let text = std::fs::read_to_string(&report).expect("shim report");
    let lines: Vec<&str> = text.lines().collect();
    let overread: Vec<&&str> = lines
        .iter()
        .filter(|l| {
            let n = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse::<usize>().ok())
            };
            n("declared=") != n("cstring=")
        })
        .collect();
    assert!(
        overread.is_empty(),
        "values a C-string reader reads past their length:\n{overread:#?}"
    );

    assert!(
        lines.iter().filter(|l| l.starts_with("CKA_LABEL ")).count() >= default_names().len(),
        "fewer labels given to the module than objects stored:\n{text}"
    );

    assert_eq!(
        run.code,
        Some(0),
        "unseal-init --once failed:\n{}",
        run.text
    );
    assert!(!bao.seal_status().expect("status").sealed);

    // What landed on the token: exactly the names, nothing after them.
    let mut pairs = label_application_pairs(&token);
    pairs.sort();
    let want: Vec<(String, String)> = default_names()
        .into_iter()
        .map(|n| (n.clone(), n))
        .collect();
    assert_eq!(pairs, want, "CKA_LABEL / CKA_APPLICATION on the token");
}

#[test]
fn sidecar_unseals_again_after_the_tpm_restarts() {
    let mut tpm = Tpm::new().expect("tpm token");
    let mut bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let sidecar = Sidecar::start(&tpm, dir.path(), &bao.address(), "");
    bao.wait_for(Duration::from_secs(60), |s| s.initialized && !s.sealed)
        .expect("sidecar initialised and unsealed");

    // The module in the sidecar keeps listing the slot, but its logins are gone.
    tpm.restart_tpm().expect("restart swtpm");
    bao.restart().expect("restart openbao");
    assert!(bao.seal_status().expect("status").sealed);
    let unsealed = bao.wait_for(Duration::from_secs(30), |s| !s.sealed);
    let run = sidecar.stop();
    assert!(
        unsealed.is_ok(),
        "sidecar did not unseal after the TPM restarted:\n{}",
        run.text
    );
}

#[test]
fn a_serial_shared_by_two_tpm_tokens_is_refused_naming_both() {
    let tpm = Tpm::new().expect("tpm token");
    tpm.init_token(1, "second").expect("second token");
    let slots = tpm.slots().expect("slots");
    let sharing: Vec<_> = slots
        .iter()
        .filter(|s| s.serial.as_deref() == Some(TPM_SERIAL))
        .collect();
    assert!(
        sharing.len() >= 2,
        "the TPM no longer shows two tokens with one serial: {slots:?}"
    );

    let bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_token_config(
        dir.path(),
        &tpm,
        &bao.address(),
        Select::Serial(TPM_SERIAL),
        "",
        "",
    );
    let cfg = config_path(&config);
    let run = run_args(&tpm, &["--config", &cfg, "--once"], Duration::from_secs(60));
    assert!(
        matches!(run.code, Some(1) | Some(2)),
        "an ambiguous tokenSerial was accepted (exit {:?}):\n{}",
        run.code,
        run.text
    );
    for label in ["bank-vaults", "second"] {
        assert!(
            run.text.contains(label),
            "the error does not name token `{label}`:\n{}",
            run.text
        );
    }
    assert!(run.text.contains(TPM_SERIAL), "{}", run.text);
    assert!(!bao.seal_status().expect("status").initialized);
    assert!(tpm.data_labels().expect("labels").is_empty());
}

#[test]
fn tpm_init_store_unseal_and_unseal_again_with_oaep_sha256() {
    let tpm = Tpm::new().expect("tpm token");
    let mut bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_token_config(dir.path(), &tpm, &bao.address(), Select::SlotId, "", "");

    let first = once_ok(&tpm, &config);
    let status = bao.seal_status().expect("status");
    assert!(status.initialized && !status.sealed, "{status:?}");
    let mut labels = tpm.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, default_names());

    // pkcs11-tool decrypts every value on the TPM with OAEP-SHA256.
    let (scheme, test) = decrypt_stored_on(&tpm, "vault-test");
    assert_eq!((scheme, test.as_str()), (Scheme::OaepSha256, "vault-test"));
    let (_, root) = decrypt_stored_on(&tpm, "vault-root");
    let (code, _) = bao.get_with_token("/v1/sys/auth", &root).expect("auth");
    assert_eq!(code, 200, "decrypted root token rejected");
    let keys: Vec<String> = (0..5)
        .map(|i| decrypt_stored_on(&tpm, &format!("vault-unseal-{i}")).1)
        .collect();

    bao.restart().expect("restart openbao");
    assert!(bao.seal_status().expect("status").sealed);
    let second = once_ok(&tpm, &config);
    assert!(
        !second.text.contains("initializing vault"),
        "{}",
        second.text
    );
    assert!(!bao.seal_status().expect("status").sealed);

    // Independently: three keys decrypted by pkcs11-tool unseal a restarted OpenBao.
    bao.restart().expect("restart openbao");
    for k in &keys[..3] {
        bao.unseal(k)
            .expect("unseal with a pkcs11-tool-decrypted key");
    }
    assert!(!bao.seal_status().expect("status").sealed);

    let mut secrets = keys;
    secrets.push(root);
    secrets.push(USER_PIN.to_owned());
    assert_no_secrets(&first.text, &secrets);
    assert_no_secrets(&second.text, &secrets);
}

#[test]
fn sidecar_through_opensc_unseals_after_the_card_is_pulled_and_put_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("card");
    std::fs::write(&control, "present").expect("control file");
    let token = ShimToken::new(&[("NKSHIM_CONTROL", &control.display().to_string())]);
    let mut bao = start_bao();
    let sidecar = Sidecar::start(&token, dir.path(), &bao.address(), "");
    bao.wait_for(Duration::from_secs(60), |s| s.initialized && !s.sealed)
        .expect("sidecar initialised and unsealed");
    wait_http(&sidecar.endpoints, "/readyz", 200, Duration::from_secs(30));

    std::fs::write(&control, "removed").expect("pull the card");
    bao.restart().expect("restart openbao");
    wait_http(&sidecar.endpoints, "/readyz", 503, Duration::from_secs(30));
    assert!(bao.seal_status().expect("status").sealed);

    std::fs::write(&control, "present").expect("put the card back");
    let unsealed = bao.wait_for(Duration::from_secs(30), |s| !s.sealed);
    let run = sidecar.stop();
    assert!(
        unsealed.is_ok(),
        "sidecar did not unseal after the card came back:\n{}",
        run.text
    );
}

/// An operator runs `hsm list` while the sidecar holds its session on the TPM. Without a
/// resource manager the TPM has room for three loaded objects, and the sidecar's logged-in
/// session keeps them: the second process's login fails with `CKR_GENERAL_ERROR` before the
/// PIN is judged. The command must then fail saying so (or succeed, should the module one day
/// share the TPM), and leave the sidecar unsealing as before.
#[test]
fn an_operator_command_beside_the_tpm_sidecar_fails_clearly_and_leaves_it_working() {
    let tpm = Tpm::new().expect("tpm token");
    let mut bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let sidecar = Sidecar::start(&tpm, dir.path(), &bao.address(), "");
    bao.wait_for(Duration::from_secs(60), |s| s.initialized && !s.sealed)
        .expect("sidecar initialised and unsealed");

    let cfg = config_path(&dir.path().join("unseal-init.yaml"));
    let list = run_args(
        &tpm,
        &["--config", &cfg, "hsm", "list"],
        Duration::from_secs(60),
    );
    if list.code != Some(0) {
        assert_eq!(list.code, Some(1), "{}", list.text);
        assert!(
            list.text.contains("held by another process") && list.text.contains("tpm2-abrmd"),
            "the failure does not say why:\n{}",
            list.text
        );
        assert!(!list.text.contains("panicked"), "{}", list.text);
    }

    // The sidecar carries on: a sealed Vault is unsealed again.
    bao.restart().expect("restart openbao");
    let unsealed = bao.wait_for(Duration::from_secs(30), |s| !s.sealed);
    let run = sidecar.stop();
    assert!(unsealed.is_ok(), "sidecar did not unseal:\n{}", run.text);
    assert_no_secrets(&list.text, &[USER_PIN.to_owned()]);
    // Nothing is left broken on the token: once the sidecar is gone, the command works.
    let after = run_args(
        &tpm,
        &["--config", &cfg, "hsm", "list"],
        Duration::from_secs(60),
    );
    assert_eq!(after.code, Some(0), "{}", after.text);
    for name in default_names() {
        assert!(after.stdout.contains(&name), "{name}:\n{}", after.stdout);
    }
}

/// The TPM pads its token label with spaces to 32 bytes, and its model string with NULs;
/// `tokenLabel` selects the token all the same.
#[test]
fn tpm_token_is_selected_by_its_space_padded_label() {
    let tpm = Tpm::new().expect("tpm token");
    let bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = by_label(dir.path(), &tpm, &bao);
    let cfg = config_path(&config);
    let info = run_args(
        &tpm,
        &["--config", &cfg, "hsm", "info"],
        Duration::from_secs(60),
    );
    assert_eq!(info.code, Some(0), "{}", info.text);
    assert!(!info.stdout.contains('\0'), "NUL in: {:?}", info.stdout);
    once_ok(&tpm, &config);
    assert!(!bao.seal_status().expect("status").sealed);
}

/// A changed PIN file reloads the module. Through pkcs11-spy, which stays loaded across
/// `dlclose`, the reload works only if the first load was finalised: without `C_Finalize` the
/// second `C_Initialize` answers `CKR_CRYPTOKI_ALREADY_INITIALIZED` and the sidecar would exit.
#[test]
fn a_reload_after_a_changed_pin_file_finalises_a_module_that_stays_resident() {
    let Some(token) = SpyToken::new() else {
        eprintln!("skipping: {PKCS11_SPY} not installed (Debian package opensc)");
        return;
    };
    let bao = start_bao();
    let dir = tempfile::tempdir().expect("tempdir");
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, "not-the-pin\n").expect("write PIN file");
    let port = nitrokey_e2e::openbao::free_port().expect("port");
    let config = dir.path().join("unseal-init.yaml");
    std::fs::write(
        &config,
        format!(
            "mode: hsm\nvault:\n  address: {}\nhsm:\n  modulePath: {}\n  slotId: {}\n  pinFile: {}\n  keyLabel: bank-vaults\njournalDir: {}\nunsealPeriod: 300ms\nmetricsAddress: 127.0.0.1:{port}\n",
            bao.address(),
            token.module().display(),
            token.slot_id(),
            pin_file.display(),
            dir.path().join("journal").display(),
        ),
    )
    .expect("write config");
    let mut cmd = common::command(&token);
    cmd.arg("--config").arg(&config);
    let sidecar = Sidecar::spawn(cmd, format!("http://127.0.0.1:{port}"));

    let refused = wait_http(&sidecar.endpoints, "/readyz", 503, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !token.calls().iter().any(|c| c == "C_Login") {
        assert!(Instant::now() < deadline, "no login attempt: {refused}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&pin_file, format!("{USER_PIN}\n")).expect("write PIN file");
    let unsealed = bao.wait_for(Duration::from_secs(120), |s| s.initialized && !s.sealed);
    let run = sidecar.stop();
    let log = token.log();
    unsealed.unwrap_or_else(|e| panic!("not unsealed after the PIN changed: {e}\n{}", run.text));
    assert!(
        !log.contains("CKR_CRYPTOKI_ALREADY_INITIALIZED"),
        "the reload found the module still initialised:\n{}",
        run.text
    );
    let calls = token.calls();
    let inits: Vec<usize> = positions(&calls, "C_Initialize");
    let finals: Vec<usize> = positions(&calls, "C_Finalize");
    assert!(inits.len() >= 2, "no reload: {calls:?}");
    // Every C_Initialize after the first follows a C_Finalize, and the last load is finalised
    // at exit too.
    for pair in inits.windows(2) {
        assert!(
            finals.iter().any(|f| pair[0] < *f && *f < pair[1]),
            "C_Initialize without C_Finalize before it: {calls:?}"
        );
    }
    assert!(
        finals.last() > inits.last(),
        "not finalised at exit: {calls:?}"
    );
    assert_eq!(run.code, Some(0), "{}", run.text);
}

fn positions(calls: &[String], name: &str) -> Vec<usize> {
    calls
        .iter()
        .enumerate()
        .filter(|(_, c)| *c == name)
        .map(|(i, _)| i)
        .collect()
}
