//! The DRA driver's RBAC against what its own configuration makes it call, in the DRA overlay
//! and in every Helm rendering with `devicePlugin.mode: dra`: its slice (and its Node, the
//! slice's owner), the claims it prepares and reads again on a replug, Events whenever
//! `onReplug` is not `none`, and evictions exactly when it is `evict`.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::PolicyRule;
use nitrokey_device_plugin::config::{Cli, Config, FileConfig, Mode, OnReplug};
use nitrokey_e2e::host::repo;
use nitrokey_e2e::manifests::*;
use serde_json::Value;

/// Whether `rules` allow `verb` on `resource` of API group `group` ("" for the core group).
fn granted(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

/// The driver's configuration (as the program reads it) and the rules bound to its
/// ServiceAccount, for each DaemonSet running the device plugin in DRA mode.
fn dra_drivers(origin: &str, objects: &[Value]) -> Vec<(Config, Vec<PolicyRule>)> {
    let cms: Vec<ConfigMap> = of_kind(objects, "ConfigMap");
    let mut out = Vec::new();
    for ds in of_kind::<DaemonSet>(objects, "DaemonSet") {
        let ns = ds
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let spec = ds
            .spec
            .template
            .spec
            .unwrap_or_else(|| panic!("{origin}: DaemonSet without a pod spec"));
        let Some(c) = spec.containers.iter().find(|c| runs(c, DEVICE_PLUGIN_BIN)) else {
            continue;
        };
        let (dir, files) = config_files(c, &[]);
        let cm = mounted_config_map(&spec, c, &dir, &cms);
        for (_, file) in files {
            let text = config_text(cm, &file);
            let parsed = FileConfig::from_yaml(text)
                .unwrap_or_else(|e| panic!("{origin}: the device plugin rejects {file}: {e}"));
            let cli = Cli {
                node_name: Some("node-1".into()),
                ..Cli::default()
            };
            let config = Config::merge(parsed, &cli)
                .unwrap_or_else(|e| panic!("{origin}: the device plugin rejects {file}: {e}"));
            if config.mode == Mode::Dra {
                let sa = spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".into());
                out.push((config, rules_of(objects, &sa, &ns)));
            }
        }
    }
    out
}

/// What the driver calls is granted, and evictions only where it evicts.
fn check(at: &str, config: &Config, rules: &[PolicyRule]) {
    for (group, resource, verb) in [
        ("resource.k8s.io", "resourceslices", "get"),
        ("resource.k8s.io", "resourceslices", "create"),
        ("resource.k8s.io", "resourceslices", "patch"),
        ("resource.k8s.io", "resourceclaims", "get"),
        ("", "nodes", "get"),
    ] {
        assert!(
            granted(rules, group, resource, verb),
            "{at}: needs {verb} on {resource}"
        );
    }
    assert_eq!(
        granted(rules, "", "events", "create"),
        config.on_replug != OnReplug::None,
        "{at}: Events are granted exactly when onReplug creates them ({:?})",
        config.on_replug
    );
    assert_eq!(
        granted(rules, "", "pods/eviction", "create"),
        config.on_replug == OnReplug::Evict,
        "{at}: evictions are granted exactly with onReplug: evict ({:?})",
        config.on_replug
    );
}

#[test]
fn the_dra_overlay_grants_what_its_config_calls_and_documents_evict() {
    let dir = repo().join("deploy/overlays/device-plugin-dra");
    let objects = kustomize(&dir);
    let drivers = dra_drivers("device-plugin-dra", &objects);
    assert_eq!(drivers.len(), 1, "one DRA DaemonSet");
    for (config, rules) in &drivers {
        check("device-plugin-dra", config, rules);
    }
    // The rule onReplug: evict needs is there to uncomment.
    let rbac = std::fs::read_to_string(dir.join("rbac.yaml")).unwrap();
    assert!(
        rbac.contains("  # onReplug: evict\n  # - apiGroups: [\"\"]\n  #   resources: [\"pods/eviction\"]\n  #   verbs: [\"create\"]\n"),
        "{rbac}"
    );
}

#[test]
fn helm_in_dra_mode_grants_what_each_on_replug_calls() {
    for on_replug in ["none", "event", "evict"] {
        for node_labels in ["nfd", "api"] {
            let values = serde_json::json!({"devicePlugin": {
                "mode": "dra", "onReplug": on_replug, "nodeLabels": node_labels}});
            let objects = helm_render(&values, "nitrokey-system");
            let at = format!("helm {values}");
            let drivers = dra_drivers(&at, &objects);
            assert_eq!(drivers.len(), 1, "{at}: one DRA DaemonSet");
            for (config, rules) in &drivers {
                assert_eq!(format!("{:?}", config.on_replug).to_lowercase(), on_replug);
                check(&at, config, rules);
            }
        }
    }
}
