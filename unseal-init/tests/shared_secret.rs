//! The shared Secret of mode hsm-k8s, guarded: a Secret deleted while Vault is unsealed is
//! named when the sidecar next needs it (log, `/readyz`, metric) and unsealing resumes once it
//! is restored; a stick whose key pair does not open the Secret's values reports each value
//! once and retries ever less often, instead of decrypting and warning on every pass. A real
//! OpenBao, SoftHSM2 tokens and the Kubernetes API stand-in; idle passes stay free of API calls.

mod common;

use common::faults::{Watched, poll};
use common::{HEADER_LEN, command, write_config};
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::openbao::{self, OpenBao};
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::{Scheme, Token};
use std::path::Path;
use std::time::Duration;

const NAMESPACE: &str = "vault";
const SECRET: &str = "vault-unseal-keys";

/// A sidecar in mode hsm-k8s for `hsm` and `bao`, its metrics on a free port; `extra` goes
/// into the `hsm:` section (it ends the file).
fn sidecar(
    hsm: &SoftHsm,
    bao: &OpenBao,
    dir: &Path,
    kubeconfig: &Path,
    extra: &str,
    log: &str,
) -> (Watched, String) {
    let port = openbao::free_port().expect("port");
    let config = write_config(
        dir,
        hsm,
        &bao.address(),
        &format!(
            "{extra}kubernetes:\n  secretName: {SECRET}\nunsealPeriod: 200ms\nmetricsAddress: 127.0.0.1:{port}\n"
        ),
    );
    let mut cmd = command(hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["--mode", "hsm-k8s"])
        .env("RUST_LOG", log)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    (
        Watched::spawn(cmd, None),
        format!("http://127.0.0.1:{port}"),
    )
}

/// `/readyz`'s status and body.
fn readyz(base: &str) -> Option<(u16, String)> {
    openbao::http(base, "GET", "/readyz", None).ok()
}

/// The value of the sample `name` (with its labels, exactly as exposed) in a scrape.
fn metric(base: &str, name: &str) -> Option<f64> {
    let (_, text) = openbao::http(base, "GET", "/metrics", None).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Seal-status requests the sidecar made so far: one per pass.
fn passes(base: &str) -> f64 {
    metric(
        base,
        "unseal_init_vault_request_seconds_count{endpoint=\"sys/seal-status\"}",
    )
    .unwrap_or(0.0)
}

/// Stops the sidecar with SIGTERM and expects a clean exit.
fn stop(mut w: Watched) -> String {
    w.signal(libc::SIGTERM);
    let status = w.wait_exit(Duration::from_secs(30));
    let log = w.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        w.tail(40)
    );
    log
}

#[test]
fn a_secret_deleted_while_vault_is_unsealed_is_named_when_next_needed_and_restoring_it_unseals() {
    let hsm = SoftHsm::new().expect("token");
    let mut bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let api = KubeApi::start().expect("kube api");
    let kubeconfig = api
        .kubeconfig_in(dir.path(), NAMESPACE)
        .expect("kubeconfig");
    // Keys that did not arrive are waited for 1 s (another initialiser may be storing them).
    let (w, base) = sidecar(
        &hsm,
        &bao,
        dir.path(),
        &kubeconfig,
        "  tokenWaitTimeout: 1s\n",
        "info",
    );
    assert!(
        poll(Duration::from_secs(120), || readyz(&base)
            .is_some_and(|(s, _)| s == 200)),
        "{}",
        w.tail(40)
    );
    let data = api.secret(NAMESPACE, SECRET).expect("Secret created");
    let annotations = api.secret_annotations(NAMESPACE, SECRET);

    // Deleted while Vault is unsealed: idle passes make no API call, so nothing notices yet.
    api.delete_secret(NAMESPACE, SECRET);
    let calls = api.requests().len();
    let start = passes(&base);
    assert!(poll(Duration::from_secs(60), || passes(&base) >= start + 5.0));
    assert_eq!(api.requests().len(), calls, "API calls while idle");
    assert_eq!(readyz(&base).map(|(s, _)| s), Some(200));

    // Vault reseals: the sidecar needs the keys and names what is gone, on /readyz, in the
    // metrics and in its log.
    bao.restart().expect("restart");
    let named = "Secret vault/vault-unseal-keys not found";
    assert!(
        poll(Duration::from_secs(60), || readyz(&base)
            .is_some_and(|(s, body)| s == 503 && body.contains(named))),
        "{:?}\n{}",
        readyz(&base),
        w.tail(40)
    );
    assert_eq!(
        metric(&base, "unseal_init_key_store_missing"),
        Some(1.0),
        "{}",
        w.tail(20)
    );
    assert!(
        poll(Duration::from_secs(60), || w
            .logged(|l| l.contains("ERROR")
                && l.contains(named)
                && l.contains("Restore the Secret from a backup"))),
        "{}",
        w.tail(40)
    );
    let warned = w.seen_at(|l| l.contains("WARN") && l.contains(named)).len();
    assert_eq!(
        warned,
        1,
        "said once, at WARN, when first seen:\n{}",
        w.log()
    );
    assert!(
        !w.logged(|l| l.contains("readable ones")),
        "not only a count of readable keys:\n{}",
        w.log()
    );
    assert!(bao.seal_status().expect("status").sealed);

    // Restored from a backup: unsealed at the next pass, ready, the flag cleared.
    api.restore_secret(NAMESPACE, SECRET, data, annotations);
    bao.wait_for(Duration::from_secs(60), |s| !s.sealed)
        .expect("unsealed from the restored Secret");
    assert!(
        poll(Duration::from_secs(30), || readyz(&base)
            .is_some_and(|(s, _)| s == 200)),
        "{:?}",
        readyz(&base)
    );
    assert_eq!(metric(&base, "unseal_init_key_store_missing"), Some(0.0));
    let log = stop(w);
    assert!(log.contains("the key store is there again"), "{log}");

    // Deleted again, and the whole pod restarted: the new sidecar does not create the Secret
    // afresh (which would hide the deletion from every other member) but waits for it, saying
    // why, and unseals once it is restored.
    let data = api.secret(NAMESPACE, SECRET).expect("Secret");
    let annotations = api.secret_annotations(NAMESPACE, SECRET);
    api.delete_secret(NAMESPACE, SECRET);
    bao.restart().expect("restart");
    let (w, base) = sidecar(
        &hsm,
        &bao,
        dir.path(),
        &kubeconfig,
        "  tokenWaitTimeout: 1s\n",
        "info",
    );
    assert!(
        poll(Duration::from_secs(60), || readyz(&base)
            .is_some_and(|(s, body)| s == 503 && body.contains(named))),
        "{:?}\n{}",
        readyz(&base),
        w.tail(40)
    );
    assert_eq!(metric(&base, "unseal_init_key_store_missing"), Some(1.0));
    assert!(w.logged(|l| l.contains("WARN") && l.contains(named)));
    assert_eq!(api.secret(NAMESPACE, SECRET), None, "not created afresh");
    assert!(w.exited().is_none(), "waits in-process:\n{}", w.log());
    api.restore_secret(NAMESPACE, SECRET, data, annotations);
    bao.wait_for(Duration::from_secs(60), |s| !s.sealed)
        .expect("unsealed from the restored Secret");
    assert!(
        poll(Duration::from_secs(30), || readyz(&base)
            .is_some_and(|(s, _)| s == 200)),
        "{:?}",
        readyz(&base)
    );
    let log = stop(w);
    assert!(log.contains("the key store is there again"), "{log}");

    // Every API request named the program.
    let agent = concat!("nitrokey-unseal-init/", env!("CARGO_PKG_VERSION"));
    let requests = api.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(
            r.user_agent.as_deref(),
            Some(agent),
            "{} {}",
            r.method,
            r.path
        );
    }
}

#[test]
fn a_stick_whose_key_pair_does_not_open_the_secret_reports_once_and_backs_off() {
    let hsm = SoftHsm::new().expect("token");
    let other = SoftHsm::new().expect("a token with another key pair");
    let mut bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let api = KubeApi::start().expect("kube api");
    let kubeconfig = api
        .kubeconfig_in(dir.path(), NAMESPACE)
        .expect("kubeconfig");
    let (w, base) = sidecar(
        &hsm,
        &bao,
        dir.path(),
        &kubeconfig,
        "",
        "info,unseal_init::runner=debug",
    );
    assert!(
        poll(Duration::from_secs(120), || readyz(&base)
            .is_some_and(|(s, _)| s == 200)),
        "{}",
        w.tail(40)
    );

    // The unseal keys rewritten under another key pair (a Secret restored from another
    // cluster, say), the recorded fingerprint left as it was; then Vault reseals.
    let mut data = api.secret(NAMESPACE, SECRET).expect("Secret created");
    for i in 0..5 {
        let name = format!("vault-unseal-{i}");
        let header = data[&name][..HEADER_LEN].to_vec();
        let ct = other
            .encrypt_with_public_key(format!("{i:02x}").repeat(33).as_bytes(), Scheme::OaepSha1)
            .expect("encrypt under the other key pair");
        data.insert(name, [header, ct].concat());
    }
    let annotations = api.secret_annotations(NAMESPACE, SECRET);
    api.restore_secret(NAMESPACE, SECRET, data, annotations);
    let decrypts = || metric(&base, "unseal_init_hsm_operations_total{op=\"decrypt\"}");
    let before = decrypts().expect("decrypts so far");
    let failures = || {
        metric(
            &base,
            "unseal_init_unseal_attempts_total{result=\"failure\"}",
        )
        .unwrap_or(0.0)
    };
    bao.restart().expect("restart");

    // Four failing passes.
    assert!(
        poll(Duration::from_secs(90), || failures() >= 4.0),
        "{}",
        w.tail(40)
    );
    let log = w.log();
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("skipping unreadable unseal key"))
        .count();
    assert_eq!(warns, 5, "each value reported once, not per pass:\n{log}");
    let errors = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("unseal pass failed"))
        .count();
    assert_eq!(errors, 1, "the failure reported once:\n{log}");
    // Every pass tries each value (a C_Decrypt each; SoftHSM2 answers a wrong key's padding
    // with CKR_GENERAL_ERROR, which re-opens the token and tries that value once more): a
    // bounded number per pass, and the passes themselves are bounded below.
    let passes_now = failures() + 1.0;
    let spent = decrypts().expect("decrypts") - before;
    assert!(
        spent <= 2.0 * 5.0 * passes_now,
        "{spent} decrypts in {passes_now} passes\n{log}"
    );
    // And the passes come ever less often: the delays the sidecar chose, as it logged them,
    // double from the period.
    let delays: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("next pass") && l.contains("Slower"))
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(delays.len() >= 3, "{log}");
    assert_eq!(delays[..3], [200, 400, 800], "{log}");
    assert!(bao.seal_status().expect("status").sealed);
    stop(w);
}
