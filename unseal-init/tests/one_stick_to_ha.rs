//! Moving from one stick to HA as the deploy guide does it ("From one stick to HA"): the old
//! stick's key pair cannot be copied, so every stored value is decrypted with the old token
//! (`hsm reveal`) and piped into `hsm store` on a new token with another key pair, in mode
//! `hsm-k8s`, into the Secret the HA overlay reads (Kubernetes API stand-in, through a
//! kubeconfig as from an operator's machine). A real OpenBao initialised with the old token is
//! then unsealed from the Secret with the new token alone.

mod common;

use common::*;
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use nitrokey_e2e::token::Token;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const NAMESPACE: &str = "vault";
const SECRET: &str = "vault-unseal-keys";

/// A configuration for `token` and the Vault at `vault`, in its own file under `dir`.
fn config_for(dir: &Path, name: &str, token: &SoftHsm, vault: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::create_dir_all(dir.join(name)).expect("journal parent");
    std::fs::write(
        &path,
        format!(
            "mode: hsm\njournalDir: {}\nvault:\n  address: {vault}\nhsm:\n  modulePath: {}\n  slotId: {}\n  pin: {USER_PIN}\n  keyLabel: bank-vaults\n",
            journal_dir(&dir.join(name)).display(),
            token.module().display(),
            token.slot_id()
        ),
    )
    .expect("write config");
    path
}

/// The guide's `$NEW` options: mode hsm-k8s, the Secret by namespace and name.
const NEW: [&str; 6] = [
    "--mode",
    "hsm-k8s",
    "--k8s-secret-namespace",
    NAMESPACE,
    "--k8s-secret-name",
    SECRET,
];

#[test]
fn values_move_from_the_old_sticks_key_pair_to_the_new_one_in_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = SoftHsm::new().expect("old token");
    let new = SoftHsm::new().expect("new token");
    let fingerprint = |token: &SoftHsm| {
        let der = token.public_key_der().expect("public key");
        format!("SHA256:{}", hex::encode(sha2::Sha256::digest(&der)))
    };
    assert_ne!(fingerprint(&old), fingerprint(&new), "two key pairs");

    let mut bao = OpenBao::start().expect("openbao");
    let old_config = config_for(dir.path(), "old", &old, &bao.address());
    let first = run_once_ok(&old, &old_config);
    assert!(!bao.seal_status().expect("status").sealed, "{}", first.text);

    let api = KubeApi::start().expect("API stand-in");
    let kubeconfig = api.kubeconfig(dir.path()).expect("kubeconfig");
    let new_config = config_for(dir.path(), "new", &new, &bao.address());
    let root = old_value(&old, &old_config, "vault-root");
    assert!(root.len() >= 26, "a root token: {} characters", root.len());
    let names: Vec<String> = (0..5)
        .map(|i| format!("vault-unseal-{i}"))
        .chain(["vault-root".into(), "vault-test".into()])
        .collect();
    for name in &names {
        let mut reveal = command(&old);
        reveal
            .arg("--config")
            .arg(&old_config)
            .args(["hsm", "reveal", name]);
        let mut reveal = reveal.spawn().expect("spawn hsm reveal");
        let piped = reveal.stdout.take().expect("reveal's stdout");
        let mut store = command(&new);
        store
            .arg("--config")
            .arg(&new_config)
            .args(["hsm", "store", name])
            .args(NEW)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::from(piped));
        let stored = run(store, Duration::from_secs(120));
        let revealed = wait(reveal, Duration::from_secs(120));
        assert_eq!(
            revealed.code,
            Some(0),
            "hsm reveal {name}:\n{}",
            revealed.text
        );
        assert_eq!(stored.code, Some(0), "hsm store {name}:\n{}", stored.text);
        for out in [&stored.text, &revealed.text] {
            assert!(!out.contains(&root), "the root token in a log:\n{out}");
        }
    }

    // The Secret holds every name, recorded as encrypted with the new key pair, and no value
    // in clear.
    let secret = api
        .secret(NAMESPACE, SECRET)
        .expect("the Secret was written");
    for name in &names {
        assert!(
            secret.contains_key(name),
            "{name} missing: {:?}",
            secret.keys()
        );
    }
    let annotations = api.secret_annotations(NAMESPACE, SECRET);
    assert_eq!(
        annotations.get("nitrokey.com/hsm-key-fingerprint"),
        Some(&fingerprint(&new)),
        "{annotations:?}"
    );
    for bytes in secret.values() {
        assert!(
            !bytes.windows(root.len()).any(|w| w == root.as_bytes()),
            "the root token in clear in the Secret"
        );
    }

    // The new token alone unseals the Vault the old one initialised, from the Secret.
    bao.restart().expect("restart openbao");
    assert!(bao.seal_status().expect("status").sealed);
    let mut once = command(&new);
    once.arg("--config")
        .arg(&new_config)
        .args(NEW)
        .arg("--once")
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    let unsealed = run(once, Duration::from_secs(120));
    assert_eq!(unsealed.code, Some(0), "{}", unsealed.text);
    assert!(
        !bao.seal_status().expect("status").sealed,
        "{}",
        unsealed.text
    );
}

/// A value as `hsm reveal` prints it from the old token.
fn old_value(token: &SoftHsm, config: &Path, name: &str) -> String {
    let mut cmd = command(token);
    cmd.arg("--config")
        .arg(config)
        .args(["hsm", "reveal", name]);
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{}", r.text);
    r.stdout
}
