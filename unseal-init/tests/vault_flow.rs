//! End to end against real peers: a SoftHSM2 token set up like a freshly initialised stick and a real
//! OpenBao server. The program runs as a child process exactly as an operator runs it; results
//! are cross-checked with independent clients (pkcs11-tool, OpenBao's API).

mod common;

use common::*;
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::USER_PIN;
use nitrokey_e2e::token::{Scheme, Token};
use std::time::Duration;

#[test]
fn init_stores_every_key_before_unsealing_and_restarts_unseal_from_the_store() {
    let (hsm, mut bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "");

    let first = run_once_ok(&hsm, &config);
    let status = bao.seal_status().expect("status");
    assert!(status.initialized && !status.sealed, "{status:?}");
    assert_eq!((status.n, status.t), (5, 3));

    // Every key is stored before the first unseal call.
    let unsealing = first
        .text
        .find("vault is sealed, unsealing")
        .expect("unseal logged");
    for i in 0..5 {
        let line = format!("key=\"vault-unseal-{i}\"");
        let stored = first
            .text
            .find(&line)
            .unwrap_or_else(|| panic!("{line} missing:\n{}", first.text));
        assert!(
            stored < unsealing,
            "vault-unseal-{i} stored after unsealing began"
        );
    }
    assert!(first.text.find("root token stored").expect("root stored") < unsealing);

    // pkcs11-tool sees exactly one object per name.
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, default_names());

    // CKA_APPLICATION = CKA_LABEL and CKA_PRIVATE, as pkcs11-tool shows them.
    let listing = hsm
        .run_pkcs11_tool(true, &["--list-objects", "--type", "data"])
        .expect("list");
    assert!(
        listing.contains("application:    'vault-root'"),
        "{listing}"
    );
    assert_eq!(listing.matches("private").count(), 7, "{listing}");

    // The stored root token, decrypted by pkcs11-tool, is accepted by OpenBao.
    let root = decrypt_stored(&hsm, "vault-root");
    let (code, _) = bao.get_with_token("/v1/sys/auth", &root).expect("auth");
    assert_eq!(code, 200, "decrypted root token rejected");
    assert_eq!(decrypt_stored(&hsm, "vault-test"), "vault-test");

    // A restarted OpenBao comes up sealed; the next run unseals it from the stored keys
    // without initialising again.
    bao.restart().expect("restart");
    assert!(bao.seal_status().expect("status").sealed);
    let second = run_once_ok(&hsm, &config);
    assert!(
        !second.text.contains("initializing vault"),
        "{}",
        second.text
    );
    assert!(!bao.seal_status().expect("status").sealed);

    // Independently: three keys decrypted by pkcs11-tool unseal a restarted OpenBao.
    bao.restart().expect("restart");
    let keys: Vec<String> = (0..5)
        .map(|i| decrypt_stored(&hsm, &format!("vault-unseal-{i}")))
        .collect();
    for k in &keys[2..5] {
        bao.unseal(k)
            .expect("unseal with pkcs11-tool-decrypted key");
    }
    assert!(!bao.seal_status().expect("status").sealed);

    // No secret in anything the program printed.
    let mut secrets = keys.clone();
    secrets.push(root);
    secrets.push(USER_PIN.to_owned());
    assert_no_secrets(&first.text, &secrets);
    assert_no_secrets(&second.text, &secrets);
}

#[test]
fn sidecar_serves_probes_and_unseals_again_after_vault_restarts() {
    let (hsm, mut bao, dir) = peers();
    let (mut child, metrics) = spawn_sidecar(&hsm, dir.path(), &bao.address());

    wait_http(&metrics, "/healthz", 200, Duration::from_secs(60));
    wait_http(&metrics, "/readyz", 200, Duration::from_secs(60));
    let status = bao.seal_status().expect("status");
    assert!(status.initialized && !status.sealed);

    bao.restart().expect("restart");
    // Sealed again: not ready until the sidecar unseals it on its own.
    bao.wait_for(Duration::from_secs(30), |s| !s.sealed)
        .expect("sidecar unsealed the restarted server");
    wait_http(&metrics, "/readyz", 200, Duration::from_secs(30));

    let text = wait_http(&metrics, "/metrics", 200, Duration::from_secs(5));
    assert!(text.contains("unseal_init_vault_initialized 1"), "{text}");
    assert!(text.contains("unseal_init_vault_sealed 0"), "{text}");
    assert!(text.contains("unseal_init_vault_init_total 1"), "{text}");
    assert!(
        text.contains("unseal_init_unseal_attempts_total{result=\"success\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("unseal_init_hsm_operations_total{op=\"decrypt\"}"),
        "{text}"
    );
    assert!(
        text.contains("unseal_init_hsm_login_attempts_total 1"),
        "{text}"
    );

    // SIGTERM ends the sidecar cleanly.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // A bound for a loaded machine, not a measurement.
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "{:?}", out.status);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut secrets: Vec<String> = (0..5)
        .map(|i| decrypt_stored(&hsm, &format!("vault-unseal-{i}")))
        .collect();
    secrets.push(decrypt_stored(&hsm, "vault-root"));
    secrets.push(USER_PIN.to_owned());
    assert_no_secrets(&text, &secrets);
}

#[test]
fn stale_keys_block_a_new_init_unless_overwrite_is_allowed() {
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    run_once_ok(&hsm, &config);
    let old_root = decrypt_stored(&hsm, "vault-root");

    // A brand-new Vault with the same token: the stored keys belong to the old one.
    let fresh = OpenBao::start().expect("openbao");
    let config = write_config(dir.path(), &hsm, &fresh.address(), "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).arg("--once");
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(r.text.contains("refusing to initialise"), "{}", r.text);
    assert!(!fresh.seal_status().expect("status").initialized);
    assert_eq!(
        decrypt_stored(&hsm, "vault-root"),
        old_root,
        "old keys must be untouched"
    );

    // Explicitly allowed, with fewer shares than before: the keys are replaced, one object per
    // name, the earlier Vault's surplus keys are removed, and unseal works.
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .arg("--once")
        .arg("--overwrite-existing-keys")
        .args(["--secret-shares", "3", "--secret-threshold", "2"]);
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{}", r.text);
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    let mut want: Vec<String> = default_names()
        .into_iter()
        .filter(|n| n != "vault-unseal-3" && n != "vault-unseal-4")
        .collect();
    want.sort();
    assert_eq!(labels, want, "{}", r.text);
    assert!(
        r.text.contains("removed an earlier Vault's unseal key"),
        "{}",
        r.text
    );
    assert_ne!(decrypt_stored(&hsm, "vault-root"), old_root);
    assert!(!fresh.seal_status().expect("status").sealed);
}

#[test]
fn bank_vaults_values_unseal_and_migrate_to_the_current_format() {
    let (hsm, mut bao, dir) = peers();
    let (keys, root) = bao.init(5, 3).expect("init");
    // What Bank-Vaults left on a stick: bare ciphertext, OAEP-SHA1 (≥ v1.33) for some values
    // and PKCS#1 v1.5 (older) for others.
    for (i, key) in keys.iter().enumerate() {
        let scheme = if i % 2 == 0 {
            Scheme::OaepSha1
        } else {
            Scheme::Pkcs1v15
        };
        let ct = hsm
            .encrypt_with_public_key(key.as_bytes(), scheme)
            .expect("encrypt");
        assert_eq!(ct.len(), 256);
        hsm.write_data(&format!("vault-unseal-{i}"), &ct)
            .expect("write");
    }
    let ct = hsm
        .encrypt_with_public_key(root.as_bytes(), Scheme::OaepSha1)
        .expect("encrypt");
    hsm.write_data("vault-root", &ct).expect("write");

    let config = write_config(
        dir.path(),
        &hsm,
        &bao.address(),
        "options:\n  preFlightChecks: false\n",
    );
    let r = run_once_ok(&hsm, &config);
    assert!(!bao.seal_status().expect("status").sealed, "{}", r.text);

    // migrate re-writes every value with the header; nothing is duplicated or lost.
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&config).args(["hsm", "migrate"]);
    let m = run(cmd, Duration::from_secs(60));
    assert_eq!(m.code, Some(0), "{}", m.text);
    assert!(m.stdout.contains("6 value(s) migrated"), "{}", m.stdout);
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(&decrypt_stored(&hsm, &format!("vault-unseal-{i}")), key);
    }
    assert_eq!(decrypt_stored(&hsm, "vault-root"), root);
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    let mut want = default_names();
    want.retain(|n| n != "vault-test");
    assert_eq!(labels, want);

    // Migrated values still unseal.
    bao.restart().expect("restart");
    run_once_ok(&hsm, &config);
    assert!(!bao.seal_status().expect("status").sealed);
    let mut secrets = keys.clone();
    secrets.push(root);
    assert_no_secrets(&r.text, &secrets);
    assert_no_secrets(&m.text, &secrets);
}

#[test]
fn hsm_k8s_mode_keeps_only_ciphertext_in_the_secret() {
    let (hsm, mut bao, dir) = peers();
    let api = KubeApi::start().expect("kube api");
    let kubeconfig = api.kubeconfig_in(dir.path(), "vault").expect("kubeconfig");
    let config = write_config(
        dir.path(),
        &hsm,
        &bao.address(),
        "kubernetes:\n  secretName: vault-unseal-keys\n",
    );
    // One pass in hsm-k8s mode against the Secret API stand-in.
    let once_k8s = || {
        let mut cmd = command(&hsm);
        cmd.arg("--config")
            .arg(&config)
            .arg("--once")
            .arg("--mode")
            .arg("hsm-k8s")
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        run(cmd, Duration::from_secs(120))
    };
    let first = once_k8s();
    assert_eq!(first.code, Some(0), "{}", first.text);
    assert!(!bao.seal_status().expect("status").sealed);

    // The Secret holds every name; the token holds no data object.
    let data = api
        .secret("vault", "vault-unseal-keys")
        .expect("secret created");
    let mut names: Vec<String> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(names, default_names());
    assert!(hsm.data_labels().expect("labels").is_empty());

    // Values are ciphertext in this program's format; pkcs11-tool decrypts the root token and
    // OpenBao accepts it.
    let root_ct = &data["vault-root"];
    assert_eq!(&root_ct[..3], b"NKV");
    let root = String::from_utf8(
        hsm.decrypt(&root_ct[HEADER_LEN..], Scheme::OaepSha1)
            .expect("decrypt"),
    )
    .expect("utf-8");
    let (code, _) = bao.get_with_token("/v1/sys/auth", &root).expect("auth");
    assert_eq!(code, 200);
    let keys: Vec<String> = (0..5)
        .map(|i| {
            let ct = &data[&format!("vault-unseal-{i}")];
            String::from_utf8(
                hsm.decrypt(&ct[HEADER_LEN..], Scheme::OaepSha1)
                    .expect("dec"),
            )
            .expect("utf-8")
        })
        .collect();
    for (name, value) in &data {
        for secret in keys.iter().chain([&root]) {
            assert!(
                !String::from_utf8_lossy(value).contains(secret.as_str()),
                "{name} holds a secret in clear"
            );
        }
    }

    // Restarted OpenBao is unsealed from the Secret.
    bao.restart().expect("restart");
    let second = once_k8s();
    assert_eq!(second.code, Some(0), "{}", second.text);
    assert!(!bao.seal_status().expect("status").sealed);
    let mut secrets = keys;
    secrets.push(root);
    assert_no_secrets(&first.text, &secrets);
    assert_no_secrets(&second.text, &secrets);
}

#[test]
fn pods_starting_at_once_in_hsm_k8s_mode_all_create_or_patch_the_secret() {
    // Three pods of an HA StatefulSet (podManagementPolicy: Parallel) start with no Secret yet:
    // each one's first write finds nothing to patch and creates it; the API server lets one
    // create win and answers the others 409 AlreadyExists, which must mean "patch again".
    let hsm = nitrokey_e2e::softhsm::SoftHsm::new().expect("token");
    let api = KubeApi::start_holding_creates(3).expect("kube api");
    let closed = format!(
        "http://127.0.0.1:{}",
        nitrokey_e2e::openbao::free_port().expect("port")
    );
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let children: Vec<std::process::Child> = dirs
        .iter()
        .map(|dir| {
            let kubeconfig = api.kubeconfig_in(dir.path(), "vault").expect("kubeconfig");
            let config = write_config(
                dir.path(),
                &hsm,
                &closed,
                "kubernetes:\n  secretName: vault-unseal-keys\n",
            );
            let mut cmd = command(&hsm);
            cmd.arg("--config")
                .arg(&config)
                .args(["--once", "--mode", "hsm-k8s", "--deadline", "3s"])
                .env("KUBECONFIG", &kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST");
            cmd.spawn().expect("spawn")
        })
        .collect();
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| wait(c, Duration::from_secs(90)))
        .collect();
    let requests = api.requests();
    let creates = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v1/namespaces/vault/secrets")
        .count();
    let served: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let logs: Vec<&str> = runs.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(
        creates,
        3,
        "every pod tried to create it: {served:?}\n{}",
        logs.join("\n----\n")
    );
    for r in &runs {
        // The pre-flight write went through for every pod; only Vault (never reachable here)
        // ends the run, at the deadline.
        assert!(r.text.contains("pre-flight check passed"), "{}", r.text);
        assert!(!r.text.contains("already exists"), "{}", r.text);
        assert!(r.text.contains("within the deadline"), "{}", r.text);
    }
    let data = api
        .secret("vault", "vault-unseal-keys")
        .expect("secret created");
    assert_eq!(data.keys().cloned().collect::<Vec<_>>(), ["vault-test"]);
}

/// Three initialisers started together against one uninitialised Vault, each with its own
/// journal directory, as three `--once` runs. Returns each run's exit code and output.
fn three_initialisers(
    bao: &OpenBao,
    configure: impl Fn(usize, &std::path::Path) -> std::process::Command,
) -> Vec<Run> {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let children: Vec<std::process::Child> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let mut cmd = configure(i, dir.path());
            cmd.arg("--once");
            cmd.spawn().expect("spawn")
        })
        .collect();
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| wait(c, Duration::from_secs(180)))
        .collect();
    assert!(bao.seal_status().expect("status").initialized);
    runs
}

#[test]
fn initialisers_racing_in_hsm_k8s_mode_all_end_with_vault_unsealed_from_the_shared_secret() {
    let (hsm, bao, dir) = peers();
    let api = KubeApi::start().expect("kube api");
    let kubeconfig = api.kubeconfig_in(dir.path(), "vault").expect("kubeconfig");
    let runs = three_initialisers(&bao, |_, own| {
        let config = write_config(
            own,
            &hsm,
            &bao.address(),
            "kubernetes:\n  secretName: vault-unseal-keys\n",
        );
        let mut cmd = command(&hsm);
        cmd.arg("--config")
            .arg(&config)
            .args(["--mode", "hsm-k8s"])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    });
    let logs: Vec<&str> = runs.iter().map(|r| r.text.as_str()).collect();
    let all = logs.join("\n----\n");
    for r in &runs {
        assert_eq!(
            r.code,
            Some(0),
            "someone else's init is not an error:\n{all}"
        );
    }
    let initialised = logs
        .iter()
        .filter(|l| l.contains("init journal complete"))
        .count();
    assert_eq!(initialised, 1, "exactly one initialised:\n{all}");
    assert!(!bao.seal_status().expect("status").sealed);
    let data = api
        .secret("vault", "vault-unseal-keys")
        .expect("secret created");
    let mut names: Vec<String> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(names, default_names());
}

#[test]
fn initialisers_racing_in_hsm_mode_say_their_token_cannot_have_the_winners_keys() {
    let bao = OpenBao::start().expect("openbao");
    let tokens: Vec<nitrokey_e2e::softhsm::SoftHsm> = (0..3)
        .map(|_| nitrokey_e2e::softhsm::SoftHsm::new().expect("token"))
        .collect();
    let runs = three_initialisers(&bao, |i, own| {
        let config = write_config(own, &tokens[i], &bao.address(), "");
        let mut cmd = command(&tokens[i]);
        cmd.arg("--config").arg(&config);
        cmd
    });
    let all = runs
        .iter()
        .map(|r| r.text.as_str())
        .collect::<Vec<_>>()
        .join("\n----\n");
    let winners = runs.iter().filter(|r| r.code == Some(0)).count();
    assert_eq!(winners, 1, "exactly one initialises and unseals:\n{all}");
    for r in runs.iter().filter(|r| r.code != Some(0)) {
        assert_eq!(r.code, Some(1), "{all}");
        assert!(
            r.text.lines().any(|l| l.contains("ERROR")
                && l.contains("initialised by someone else")
                && l.contains("can never receive them")),
            "a loser must say its store cannot have the keys:\n{}",
            r.text
        );
    }
    assert!(!bao.seal_status().expect("status").sealed);
}

/// A journal left by a run killed right after writing it belongs to its Vault: a start that
/// talks to another Vault refuses it by name, initialises nothing and stores nothing, and
/// the journal's own Vault later gets every key.
#[test]
fn a_journal_is_finished_only_into_the_vault_it_was_written_for() {
    use common::faults::{self, Trigger, Watched};
    let (hsm, bao, dir) = peers();
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    let trigger = Trigger {
        matches: Box::new(|l: &str| faults::is_event(l, faults::JOURNAL_WRITTEN)),
        action: Box::new(|run| run.send(libc::SIGKILL)),
    };
    let mut first = Watched::start(&hsm, &config, true, Some(trigger));
    first.wait_exit(Duration::from_secs(120));
    assert!(
        first.fired(),
        "the journal was never written:\n{}",
        first.log()
    );
    let journal = journal_dir(dir.path()).join("init-journal.json");
    let before = std::fs::read(&journal).expect("journal left behind");

    // The same volume, another Vault.
    let other = OpenBao::start().expect("another openbao");
    let other_config = write_config(dir.path(), &hsm, &other.address(), "");
    let mut cmd = command(&hsm);
    cmd.arg("--config").arg(&other_config).arg("--once");
    let refused = run(cmd, Duration::from_secs(120));
    assert_eq!(refused.code, Some(1), "{}", refused.text);
    assert!(
        refused.text.lines().any(|l| l.contains("ERROR")
            && l.contains("does not belong to this Vault")
            && l.contains(&bao.address())),
        "{}",
        refused.text
    );
    assert!(
        !other.seal_status().expect("status").initialized,
        "nothing initialised it"
    );
    assert_eq!(
        std::fs::read(&journal).expect("kept"),
        before,
        "kept untouched"
    );
    let labels = hsm.data_labels().expect("labels");
    assert!(
        labels
            .iter()
            .all(|l| !l.starts_with("vault-unseal") && l != "vault-root"),
        "nothing stored from it: {labels:?}"
    );

    // Its own Vault takes it.
    let config = write_config(dir.path(), &hsm, &bao.address(), "");
    let done = run_once_ok(&hsm, &config);
    assert!(done.text.contains("resuming init journal"), "{}", done.text);
    assert!(!journal.exists());
    assert!(!bao.seal_status().expect("status").sealed);
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, default_names());
}
