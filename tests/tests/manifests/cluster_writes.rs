//! What the manifests may change in a cluster: no node status is patched (the device plugin
//! advertises the resource), and the Secret holding the unseal keys' ciphertexts is never
//! pruned or deleted by a GitOps tool or Helm.

use nitrokey_e2e::host::repo;
use nitrokey_e2e::manifests::*;

#[test]
fn nothing_patches_node_status() {
    let mut offenders = Vec::new();
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "md") {
                continue;
            }
            for needle in [
                "/status/capacity",
                "nitrokey.com~1hsm",
                "nodes/status",
                "--subresource=status",
                "--subresource status",
            ] {
                if text.contains(needle) {
                    offenders.push(format!("{}: {needle}", rel(&path)));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "the device plugin advertises the resource; no node status patching: {offenders:?}"
    );
}

/// The Secret holding the unseal keys' ciphertexts is never pruned or deleted by a GitOps
/// tool or Helm: the annotations each tool reads for that (Argo CD's sync options, Flux's
/// prune switch, Helm's resource policy) are on every rendering that ships it.
#[test]
fn the_unseal_key_secret_is_kept_by_gitops_tools() {
    let mut seen = 0;
    for (dir, objects) in rendered() {
        for secret in objects
            .iter()
            .filter(|o| o["kind"] == "Secret" && o["metadata"]["name"] == "vault-unseal-keys")
        {
            seen += 1;
            let annotations = &secret["metadata"]["annotations"];
            for (key, value) in [
                (
                    "argocd.argoproj.io/sync-options",
                    "Prune=false,Delete=false",
                ),
                ("kustomize.toolkit.fluxcd.io/prune", "disabled"),
                ("helm.sh/resource-policy", "keep"),
            ] {
                assert_eq!(
                    annotations[key], value,
                    "{dir}: Secret vault-unseal-keys {key}"
                );
            }
        }
    }
    assert!(seen > 0, "some overlay ships the Secret (vault-ha)");
}
