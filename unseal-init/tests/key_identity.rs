//! Several sticks, one key pair: which key pair the values in a shared Secret are encrypted
//! with is recorded beside them, and a token holding another key pair is refused at start,
//! naming both fingerprints, before it writes anything. Two SoftHSM2 tokens with different
//! RSA pairs, a real OpenBao and the Kubernetes API stand-in; fingerprints are computed
//! independently from the DER public key pkcs11-tool exports.

mod common;

use common::{command, run, write_config};
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::Token;
use sha2::Digest;
use std::path::Path;
use std::time::Duration;

const ANNOTATION: &str = "nitrokey.com/hsm-key-fingerprint";
const SECRET: &str = "vault-unseal-keys";

/// `SHA256:` and the hex SHA-256 of the token's DER SubjectPublicKeyInfo.
fn fingerprint(token: &dyn Token) -> String {
    let der = token.public_key_der().expect("export public key");
    format!("SHA256:{}", hex::encode(sha2::Sha256::digest(&der)))
}

/// One `--once` run in hsm-k8s mode with `token`.
fn once_k8s(token: &SoftHsm, config: &Path, kubeconfig: &Path) -> common::Run {
    let mut cmd = command(token);
    cmd.arg("--config")
        .arg(config)
        .args(["--once", "--mode", "hsm-k8s"])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    run(cmd, Duration::from_secs(120))
}

fn hsm_cmd(token: &SoftHsm, config: &Path, kubeconfig: &Path, sub: &str) -> common::Run {
    let mut cmd = command(token);
    cmd.arg("--config")
        .arg(config)
        .args(["hsm", sub])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    run(cmd, Duration::from_secs(60))
}

#[test]
fn a_token_with_another_key_pair_is_refused_before_it_writes_the_shared_secret() {
    let (first, second) = (
        SoftHsm::new().expect("first token"),
        SoftHsm::new().expect("second token"),
    );
    let (fp_first, fp_second) = (fingerprint(&first), fingerprint(&second));
    assert_ne!(
        fp_first, fp_second,
        "the two tokens must hold different pairs"
    );
    let mut bao = OpenBao::start().expect("openbao");
    let api = KubeApi::start().expect("kube api");
    let (dir_first, dir_second) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let kubeconfig = api
        .kubeconfig_in(dir_first.path(), "vault")
        .expect("kubeconfig");
    let extra = format!("kubernetes:\n  secretName: {SECRET}\n");
    let config_first = write_config(dir_first.path(), &first, &bao.address(), &extra);
    let config_second = write_config(dir_second.path(), &second, &bao.address(), &extra);

    // The operator compares sticks before deploying: both commands print the fingerprint.
    let info = hsm_cmd(&second, &config_second, &kubeconfig, "info");
    assert_eq!(info.code, Some(0), "{}", info.text);
    assert!(info.stdout.contains(&fp_second), "{}", info.stdout);
    let list = hsm_cmd(&first, &config_first, &kubeconfig, "list");
    assert_eq!(list.code, Some(0), "{}", list.text);
    assert!(list.stdout.contains(&fp_first), "{}", list.stdout);

    let init = once_k8s(&first, &config_first, &kubeconfig);
    assert_eq!(init.code, Some(0), "{}", init.text);
    let recorded = api.secret_annotations("vault", SECRET);
    assert_eq!(recorded.get(ANNOTATION), Some(&fp_first), "{recorded:?}");
    let before = api.secret("vault", SECRET).expect("secret written");

    // Vault sealed again: the second token could neither unseal nor must it write.
    bao.restart().expect("restart OpenBao");
    let mark = api.requests().len();
    let refused = once_k8s(&second, &config_second, &kubeconfig);
    assert_eq!(refused.code, Some(1), "{}", refused.text);
    assert!(
        refused.text.contains(&fp_first) && refused.text.contains(&fp_second),
        "the refusal names both fingerprints:\n{}",
        refused.text
    );
    let writes: Vec<String> = api.requests()[mark..]
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(writes.is_empty(), "the second token wrote: {writes:?}");
    assert_eq!(api.secret("vault", SECRET).as_ref(), Some(&before));
    assert_eq!(
        api.secret_annotations("vault", SECRET).get(ANNOTATION),
        Some(&fp_first)
    );
    assert!(bao.seal_status().expect("status").sealed);

    // The right stick still unseals from the untouched Secret.
    let again = once_k8s(&first, &config_first, &kubeconfig);
    assert_eq!(again.code, Some(0), "{}", again.text);
    assert!(!bao.seal_status().expect("status").sealed);
}
