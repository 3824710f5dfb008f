//! Every kustomization under `deploy/` rendered and checked: typed objects matching the
//! programs, the Kubernetes version each needs, the variant each overlay names, and the DRA
//! manifests against what the driver publishes.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::StatefulSet;
use serde_json::Value;

use nitrokey_e2e::manifests::*;

use super::checks::*;

/// A device plugin config as the program reads it (`nitrokey_device_plugin::config`).
fn device_plugin_config(text: &str, at: &str) -> nitrokey_device_plugin::config::Config {
    device_plugin_config_in(text, at, None)
}

#[test]
fn the_expected_kustomizations_exist() {
    let found: BTreeSet<String> = kustomizations().iter().map(|d| rel(d)).collect();
    for expected in [
        "deploy/base/device-plugin",
        "deploy/overlays/vault-single",
        "deploy/overlays/vault-ha",
        "deploy/overlays/openbao-single",
        "deploy/overlays/native-sidecar",
        "deploy/overlays/minikube",
        "deploy/overlays/device-plugin-dra",
        "deploy/examples/dra",
        "deploy/overlays/vault-single-dra",
    ] {
        assert!(
            found.contains(expected),
            "missing kustomization {expected}; found {found:?}"
        );
    }
}

#[test]
fn every_kustomization_renders_into_valid_typed_objects_that_match_the_programs() {
    let all = rendered();
    assert!(!all.is_empty());
    // Every rendering is checked, so one report shows every broken example.
    let mut failures = Vec::new();
    for (origin, objects) in &all {
        assert!(!objects.is_empty(), "{origin} renders nothing");
        if let Err(panic) = std::panic::catch_unwind(|| check_objects(origin, objects)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(message);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The examples deploy what they say they deploy.
    let count = |origin: &str, kind: &str| all[origin].iter().filter(|o| o["kind"] == kind).count();
    assert_eq!(count("deploy/base/device-plugin", "DaemonSet"), 1);
    for overlay in [
        "deploy/overlays/vault-single",
        "deploy/overlays/vault-ha",
        "deploy/overlays/openbao-single",
        "deploy/overlays/native-sidecar",
    ] {
        assert_eq!(count(overlay, "StatefulSet"), 1, "{overlay}");
    }
    assert_eq!(count("deploy/overlays/minikube", "DaemonSet"), 1);
    assert_eq!(count("deploy/overlays/minikube", "StatefulSet"), 1);
}

#[test]
fn every_example_runs_on_the_oldest_supported_kubernetes_except_the_native_sidecar_one() {
    let all = rendered();
    for (origin, objects) in &all {
        let expected = if origin == "deploy/overlays/native-sidecar" {
            NATIVE_SIDECAR_KUBERNETES
        } else if DRA_ORIGINS.contains(&origin.as_str()) {
            DRA_KUBERNETES
        } else {
            MIN_KUBERNETES
        };
        assert_eq!(needed_kubernetes(objects), expected, "{origin}");
    }
    // The native-sidecar variant is the single-node example with unseal-init moved, nothing
    // else changed.
    let sts = |origin: &str| -> StatefulSet {
        of_kind::<StatefulSet>(&all[origin], "StatefulSet").remove(0)
    };
    let classic = sts("deploy/overlays/vault-single");
    let native = sts("deploy/overlays/native-sidecar");
    let classic_spec = classic.spec.template.spec.expect("pod spec");
    let native_spec = native.spec.template.spec.expect("pod spec");
    let mut moved = native_spec
        .init_containers
        .clone()
        .expect("init containers")[0]
        .clone();
    assert_eq!(moved.restart_policy.take().as_deref(), Some("Always"));
    assert_eq!(
        Some(&moved),
        classic_spec
            .containers
            .iter()
            .find(|c| c.name == moved.name),
        "the native sidecar must be the same container"
    );
    assert_eq!(
        native_spec.containers.len() + 1,
        classic_spec.containers.len()
    );
}

#[test]
fn an_older_api_server_would_reject_what_the_newest_types_accept() {
    // The 1.26 check is what catches fields that only newer clusters know; prove it does.
    let mount: Value = serde_saphyr::from_str(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers:\n        - name: c\n          image: i:1\n          volumeMounts: [{name: sys, mountPath: /sys, readOnly: true, recursiveReadOnly: IfPossible}]\n      volumes: [{name: sys, hostPath: {path: /sys}}]\n",
    )
    .expect("yaml");
    assert!(check_typed(&mount).is_ok(), "{:?}", check_typed(&mount));
    let err = check_typed_oldest(&mount, MIN_KUBERNETES).expect_err("1.30 field on 1.26");
    assert!(err.contains("recursiveReadOnly"), "{err}");

    let sidecar: Value = serde_saphyr::from_str(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: x}\nspec:\n  serviceName: x\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      initContainers: [{name: s, image: i:1, restartPolicy: Always}]\n      containers: [{name: c, image: i:1}]\n",
    )
    .expect("yaml");
    let err = check_typed_oldest(&sidecar, MIN_KUBERNETES).expect_err("1.29 field on 1.26");
    assert!(err.contains("restartPolicy"), "{err}");
    assert!(check_typed_oldest(&sidecar, NATIVE_SIDECAR_KUBERNETES).is_ok());
}

#[test]
fn overlays_deploy_the_variant_they_name() {
    let all = rendered();
    let server_image = |origin: &str| -> String {
        let (_, spec) = workload_pod_specs(&all[origin])
            .into_iter()
            .find(|(w, _)| w.starts_with("StatefulSet"))
            .expect("sts");
        spec.containers
            .iter()
            .find(|c| has_port(c, VAULT_PORT))
            .and_then(|c| c.image.clone())
            .expect("server image")
    };
    assert!(server_image("deploy/overlays/vault-single").starts_with("hashicorp/vault:"));
    assert!(server_image("deploy/overlays/vault-ha").starts_with("hashicorp/vault:"));
    assert!(server_image("deploy/overlays/openbao-single").starts_with("quay.io/openbao/openbao:"));
    let replicas = |origin: &str| {
        of_kind::<StatefulSet>(&all[origin], "StatefulSet")[0]
            .spec
            .replicas
            .unwrap_or(1)
    };
    assert_eq!(replicas("deploy/overlays/vault-single"), 1);
    assert!(
        replicas("deploy/overlays/vault-ha") >= 3,
        "HA needs a raft quorum"
    );
}

#[test]
fn round_trip_detects_misspelt_fields() {
    // The typed check is what catches typos; prove it does on a known-bad object.
    let good: Value = serde_saphyr::from_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: None, ports: [{port: 1}]}\n",
    )
    .expect("yaml");
    assert!(check_typed(&good).is_ok(), "{:?}", check_typed(&good));
    let mut bad = good.clone();
    bad["spec"]["clusterIp"] = Value::String("None".into());
    let err = check_typed(&bad).expect_err("misspelt field must be reported");
    assert!(err.contains(".spec.clusterIp"), "{err}");
    let mut misplaced = good;
    misplaced["spec"]["ports"][0]["containerPort"] = Value::from(1);
    assert!(check_typed(&misplaced).is_err());
}

#[test]
#[should_panic(expected = "slotID")]
fn configs_are_checked_by_the_programs_own_parsers() {
    // A misspelt key is refused by unseal-init itself, naming the key.
    unseal_init_config("mode: hsm\nhsm: {slotID: 0}\n", "example");
}

#[test]
#[should_panic(expected = "sharesPerDevice")]
fn device_plugin_configs_are_checked_by_its_own_parser() {
    device_plugin_config(
        "resourceName: nitrokey.com/hsm\nsharesPerDevice: 0\n",
        "example",
    );
}

#[test]
fn dra_manifests_select_what_the_driver_publishes() {
    use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaimTemplate};
    use nitrokey_device_plugin::dra::names::{ATTR_SERIAL, DRIVER_NAME};
    let all = rendered();
    let classes: Vec<DeviceClass> =
        of_kind(&all["deploy/overlays/device-plugin-dra"], "DeviceClass");
    assert_eq!(classes.len(), 1);
    assert_eq!(classes[0].metadata.name.as_deref(), Some("nitrokey-hsm"));
    let selectors: Vec<String> = classes[0]
        .spec
        .as_ref()
        .and_then(|s| s.selectors.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|s| Some(s.cel.as_ref()?.expression.clone()))
        .collect();
    assert_eq!(selectors, [format!("device.driver == \"{DRIVER_NAME}\"")]);
    let templates: Vec<ResourceClaimTemplate> =
        of_kind(&all["deploy/examples/dra"], "ResourceClaimTemplate");
    assert!(!templates.is_empty());
    let by_serial = format!("device.attributes[\"{DRIVER_NAME}\"].{ATTR_SERIAL} == ");
    let mut pinned = 0;
    for t in &templates {
        let spec = t.spec.as_ref().expect("template spec");
        let requests = spec
            .spec
            .as_ref()
            .and_then(|s| s.devices.as_ref())
            .and_then(|d| d.requests.as_ref());
        for request in requests.into_iter().flatten() {
            let exactly = request.exactly.as_ref().expect("an exact request");
            assert_eq!(exactly.device_class_name, "nitrokey-hsm");
            pinned += exactly
                .selectors
                .iter()
                .flatten()
                .filter(|s| {
                    s.cel
                        .as_ref()
                        .is_some_and(|c| c.expression.starts_with(&by_serial))
                })
                .count();
        }
    }
    assert_eq!(
        pinned, 1,
        "one template pins a stick by its serial attribute"
    );
}

#[test]
fn the_dra_vault_variant_claims_a_template_it_ships() {
    use k8s_openapi::api::resource::v1::ResourceClaimTemplate;
    let all = rendered();
    let objects = &all["deploy/overlays/vault-single-dra"];
    let templates: BTreeSet<String> =
        of_kind::<ResourceClaimTemplate>(objects, "ResourceClaimTemplate")
            .into_iter()
            .filter_map(|t| t.metadata.name)
            .collect();
    let sts = of_kind::<StatefulSet>(objects, "StatefulSet").remove(0);
    let spec = sts.spec.template.spec.expect("pod spec");
    let claims = spec.resource_claims.clone().unwrap_or_default();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert!(
        templates.contains(
            claims[0]
                .resource_claim_template_name
                .as_deref()
                .unwrap_or_default()
        ),
        "{claims:?} not among {templates:?}"
    );
    let side = unseal_init_container("vault-single-dra", &spec);
    let wants: Vec<&str> = side
        .resources
        .iter()
        .flat_map(|r| r.claims.iter().flatten())
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(wants, [claims[0].name.as_str()]);
}
