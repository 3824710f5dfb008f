//! The Helm chart: rendered by Helm's own engine into the same valid objects as the
//! kustomizations, linted, versioned with the release, and placed at the kubelet directory of
//! the distribution it is installed on.

use std::process::Command;

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::Value;

use nitrokey_e2e::host::repo;
use nitrokey_e2e::manifests::*;

use super::checks::*;

#[test]
fn helm_chart_renders_into_the_same_valid_objects() {
    let openbao = serde_json::json!({"vault": {"enabled": true, "flavor": "openbao",
        "image": {"repository": "quay.io/openbao/openbao", "tag": "2.7.2"}}});
    let cases = [
        ("defaults", serde_json::json!({}), "vault", 1, 0),
        (
            "native sidecar, cert-manager",
            serde_json::json!({"vault": {"enabled": true, "tls": {"certManager": {"enabled": true}}},
                "unsealInit": {"nativeSidecar": true}}),
            "vault",
            1,
            1,
        ),
        (
            "vault",
            serde_json::json!({"vault": {"enabled": true}}),
            "vault",
            1,
            1,
        ),
        ("openbao", openbao, "openbao", 1, 1),
        (
            "monitoring",
            serde_json::json!({"vault": {"enabled": true}, "monitoring": {
                "podMonitor": {"enabled": true}, "prometheusRule": {"enabled": true},
                "dashboard": {"enabled": true}}}),
            "vault",
            1,
            1,
        ),
        (
            "vault only",
            serde_json::json!({"devicePlugin": {"enabled": false}, "vault": {"enabled": true}}),
            "vault",
            0,
            1,
        ),
        (
            "dra",
            serde_json::json!({"devicePlugin": {"mode": "dra"}}),
            "vault",
            1,
            0,
        ),
    ];
    for (label, values, namespace, daemonsets, statefulsets) in cases {
        let objects = helm_render(&values, namespace);
        let origin = format!("{CHART} ({label})");
        check_objects(&origin, &objects);
        let count = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).count();
        assert_eq!(count("DaemonSet"), daemonsets, "{origin}");
        assert_eq!(count("StatefulSet"), statefulsets, "{origin}");
        // Cluster-scoped objects have no namespace; the device plugin's live in its own
        // namespace (created by the chart, labelled for the Pod Security level it needs), the
        // rest in the release's.
        let cluster_scoped = [
            "ClusterRole",
            "ClusterRoleBinding",
            "Namespace",
            "DeviceClass",
        ];
        for o in objects
            .iter()
            .filter(|o| !cluster_scoped.iter().any(|k| o["kind"] == *k))
        {
            let plugin = o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-device-plugin"));
            let expected = if plugin { PLUGIN_NAMESPACE } else { namespace };
            assert_eq!(
                o["metadata"]["namespace"], expected,
                "{origin}: {} in namespace {expected}",
                o["metadata"]["name"]
            );
        }
        let namespaces: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Namespace")
            .collect();
        assert_eq!(
            namespaces.len(),
            daemonsets,
            "{origin}: the plugin's namespace"
        );
        for ns in namespaces {
            assert_eq!(ns["metadata"]["name"], PLUGIN_NAMESPACE, "{origin}");
            assert_eq!(
                ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
                "{origin}: the plugin's namespace admits host network and host paths"
            );
        }
    }
    // Values reach the rendered configs.
    let custom = serde_json::json!({"devicePlugin": {"resourceName": "example.com/hsm", "sharesPerDevice": 3,
        "devices": [{"vendor": "0x20a0", "product": "0x4230", "serial": "DENK01234567"}]}});
    let objects = helm_render(&custom, "vault");
    let cm: Vec<ConfigMap> = of_kind(&objects, "ConfigMap");
    let config: Value =
        serde_saphyr::from_str(&cm[0].data.as_ref().expect("data")["config.yaml"]).expect("config");
    assert_eq!(config["resourceName"], "example.com/hsm");
    assert_eq!(config["sharesPerDevice"], 3);
    assert_eq!(config["devices"][0]["serial"], "DENK01234567");
}

/// microk8s keeps the kubelet's directory elsewhere: the overlay (kustomize) and
/// `devicePlugin.kubeletRootDir` (Helm) move every host path under it, and only those.
#[test]
fn kubelet_directory_follows_the_distribution() {
    const MICROK8S: &str = "/var/snap/microk8s/common/var/lib/kubelet";
    let expected = |root: &str| {
        vec![
            format!("{root}/device-plugins"),
            format!("{root}/pod-resources"),
        ]
    };
    let mut base = kubelet_host_paths(&kustomize(&repo().join("deploy/base/device-plugin")));
    base.sort();
    assert_eq!(base, expected("/var/lib/kubelet"));
    let mut micro = kubelet_host_paths(&kustomize(
        &repo().join("deploy/overlays/device-plugin-microk8s"),
    ));
    micro.sort();
    assert_eq!(micro, expected(MICROK8S));
    for (root, values) in [
        ("/var/lib/kubelet", serde_json::json!({})),
        (
            MICROK8S,
            serde_json::json!({"devicePlugin": {"kubeletRootDir": format!("{MICROK8S}/")}}),
        ),
    ] {
        let mut paths = kubelet_host_paths(&helm_render(&values, "vault"));
        paths.sort();
        assert_eq!(paths, expected(root), "Helm with {values}");
    }
}

#[test]
fn helm_chart_lints_clean_and_versions_with_the_release() {
    let chart: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join(CHART).join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(
        chart["appVersion"],
        release_version().as_str(),
        "appVersion is the image tag"
    );
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join(CHART).join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    // Every `.Values.x.y` a template names exists in values.yaml (typos render as empty).
    let templates = repo().join(CHART).join("templates");
    for entry in std::fs::read_dir(&templates).expect("templates/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("template");
        for (i, _) in text.match_indices(".Values.") {
            let key: String = text[i + 8..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            let mut node = &values;
            for part in key.trim_end_matches('.').split('.') {
                node = node.get(part).unwrap_or_else(|| {
                    panic!("{}: .Values.{key} is not in values.yaml", rel(&path))
                });
            }
        }
    }
    for vals in [
        serde_json::json!({}),
        serde_json::json!({"vault": {"enabled": true}}),
    ] {
        let report: Value = if helm_binary() {
            let out = Command::new("helm")
                .args(["lint", "--strict"])
                .arg(repo().join(CHART))
                .args([
                    "--set",
                    &format!(
                        "vault.enabled={}",
                        vals["vault"]["enabled"].as_bool().unwrap_or(false)
                    ),
                ])
                .output()
                .expect("helm");
            assert!(
                out.status.success(),
                "helm lint: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            continue;
        } else {
            serde_json::from_str(&helm_python("lint", &vals, "hsm", "default"))
                .expect("lint report")
        };
        assert!(
            report["errors"].as_array().is_some_and(|e| e.is_empty()),
            "helm lint: {report}"
        );
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["severity"].as_u64().unwrap_or(3) >= 2)
            .collect();
        assert!(serious.is_empty(), "helm lint --strict: {serious:?}");
    }
    // An invalid flavor is refused with a clear message, not rendered into a broken pod.
    if helm_binary() {
        let out = Command::new("helm")
            .args(["template", "hsm"])
            .arg(repo().join(CHART))
            .args([
                "--set",
                "vault.enabled=true",
                "--set",
                "vault.flavor=consul",
            ])
            .output()
            .expect("helm");
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("vault.flavor")
        );
        return;
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(HELM_PY)
        .arg(repo().join(CHART))
        .arg(r#"{"vault": {"enabled": true, "flavor": "consul"}}"#)
        .args(["hsm", "vault", "render"])
        .output()
        .expect("python3");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("vault.flavor"));
}

// ---------------------------------------------------------------------------------------------
// minikube passthrough script, run against stand-ins for VBoxManage and minikube that keep the
// VM's state in files and refuse what VirtualBox refuses (modifying a running VM).
