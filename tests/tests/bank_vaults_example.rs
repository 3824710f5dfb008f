//! The example for Bank-Vaults' vault-operator (`deploy/examples/vault-operator/vault.yaml`):
//! the operator's own `Vault` custom resource, requesting the device plugin's resource.
//!
//! The resource is checked against the part of vault-operator's `Vault` schema it uses,
//! written here from the operator's published API (`pkg/apis/vault/v1alpha1/vault_types.go`:
//! `VaultSpec`, `UnsealConfig`, `HSMUnsealConfig`, `Resources`; Kubernetes types where the
//! operator embeds them). Unknown fields are refused, as the operator's CRD does with its
//! structural schema, so a misspelt key fails here instead of being pruned by the API server.
//! Its `unsealConfig.hsm` is also read by unseal-init's own configuration parser: the README
//! promises that the section moves to unseal-init's `hsm:` unchanged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvVar, PersistentVolumeClaim, ResourceRequirements, Toleration, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nitrokey_e2e::host::repo;
use serde::Deserialize;

const EXAMPLE: &str = "deploy/examples/vault-operator/vault.yaml";
/// The device plugin's resource, as `deploy/base/device-plugin/config.yaml` advertises it.
const RESOURCE: &str = "nitrokey.com/hsm";

/// `Vault` (group `vault.banzaicloud.com`, version `v1alpha1`).
// The schema names every field the example may carry; the checks read only some of them.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Vault {
    api_version: String,
    kind: String,
    metadata: serde_json::Value,
    spec: VaultSpec,
}

/// The `VaultSpec` fields the example uses (all optional in the operator's API but `config`).
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VaultSpec {
    size: Option<i32>,
    image: Option<String>,
    bank_vaults_image: Option<String>,
    service_account: Option<String>,
    unseal_config: Option<UnsealConfig>,
    envs_config: Option<Vec<EnvVar>>,
    resources: Option<Resources>,
    volume_claim_templates: Option<Vec<PersistentVolumeClaim>>,
    volume_mounts: Option<Vec<VolumeMount>>,
    node_selector: Option<BTreeMap<String, String>>,
    tolerations: Option<Vec<Toleration>>,
    /// Vault's own configuration, free-form in the operator's API.
    config: serde_json::Value,
}

/// `UnsealConfig`: the example uses only its HSM variant.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UnsealConfig {
    hsm: Option<HsmUnsealConfig>,
}

/// `HSMUnsealConfig`: `modulePath` and `keyLabel` have no `omitempty` in the operator's API.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HsmUnsealConfig {
    daemon: Option<bool>,
    module_path: String,
    slot_id: Option<u32>,
    token_label: Option<String>,
    pin: Option<String>,
    key_label: String,
}

/// `Resources`: requirements per container the operator creates.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Resources {
    vault: Option<ResourceRequirements>,
    bank_vaults: Option<ResourceRequirements>,
    hsm_daemon: Option<ResourceRequirements>,
}

fn example_text() -> String {
    std::fs::read_to_string(repo().join(EXAMPLE)).expect("the vault-operator example exists")
}

fn example() -> Vault {
    serde_saphyr::from_str(&example_text())
        .unwrap_or_else(|e| panic!("{EXAMPLE} does not fit vault-operator's Vault schema: {e}"))
}

#[test]
fn the_example_fits_the_operators_vault_schema() {
    let vault = example();
    assert_eq!(vault.api_version, "vault.banzaicloud.com/v1alpha1");
    assert_eq!(vault.kind, "Vault");
    assert!(
        vault.metadata["name"].is_string(),
        "{EXAMPLE}: metadata.name"
    );
    let spec = &vault.spec;
    assert!(spec.size.is_some_and(|s| s >= 1), "{EXAMPLE}: size");
    assert!(
        spec.config.is_object(),
        "{EXAMPLE}: config is Vault's configuration"
    );
    // Every volume mounted into Vault comes from a claim template of the same name.
    let claims: Vec<_> = spec
        .volume_claim_templates
        .iter()
        .flatten()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    for mount in spec.volume_mounts.iter().flatten() {
        assert!(
            claims.contains(&mount.name),
            "{EXAMPLE}: volume {} has no claim template",
            mount.name
        );
    }
}

/// The schema check refuses what the operator's CRD would not keep.
#[test]
fn the_schema_check_refuses_a_misspelt_field() {
    let text = example_text().replace("keyLabel: bank-vaults", "keylabel: bank-vaults");
    let err = serde_saphyr::from_str::<Vault>(&text).expect_err("a misspelt field is refused");
    assert!(err.to_string().contains("keylabel"), "{err}");
}

#[test]
fn the_hsm_daemon_requests_one_stick_from_the_device_plugin() {
    let spec = example().spec;
    let hsm = spec
        .unseal_config
        .and_then(|u| u.hsm)
        .expect("unsealConfig.hsm");
    assert_eq!(
        hsm.daemon,
        Some(true),
        "the operator's pcscd container runs"
    );
    let resources = spec.resources.expect("resources");
    let daemon = resources
        .hsm_daemon
        .clone()
        .expect("resources.hsmDaemon: the operator's pcscd container requests the stick");
    let one = Quantity("1".into());
    let requests = daemon.requests.unwrap_or_default();
    let limits = daemon.limits.unwrap_or_default();
    assert_eq!(limits.get(RESOURCE), Some(&one), "limits.{RESOURCE}");
    // The kubelet admits an extended resource only with requests equal to limits.
    assert_eq!(
        requests.get(RESOURCE),
        limits.get(RESOURCE),
        "requests = limits"
    );
    // Only the container that talks to the stick holds a unit.
    for (name, other) in [
        ("vault", &resources.vault),
        ("bankVaults", &resources.bank_vaults),
    ] {
        let holds = |r: &Option<ResourceRequirements>| {
            r.as_ref().is_some_and(|r| {
                r.limits.as_ref().is_some_and(|l| l.contains_key(RESOURCE))
                    || r.requests
                        .as_ref()
                        .is_some_and(|l| l.contains_key(RESOURCE))
            })
        };
        assert!(
            !holds(other),
            "resources.{name} must not request {RESOURCE}"
        );
    }
    let device_plugin_config =
        std::fs::read_to_string(repo().join("deploy/base/device-plugin/config.yaml"))
            .expect("device plugin config");
    assert!(
        device_plugin_config.contains(&format!("resourceName: {RESOURCE}")),
        "the device plugin advertises {RESOURCE}"
    );
}

#[test]
fn the_pin_comes_from_a_secret_and_the_hsm_section_reads_as_unseal_inits() {
    let spec = example().spec;
    let hsm = spec
        .unseal_config
        .and_then(|u| u.hsm)
        .expect("unsealConfig.hsm");
    assert!(hsm.pin.is_none(), "{EXAMPLE}: no PIN in the resource");
    let pin_env = spec
        .envs_config
        .iter()
        .flatten()
        .find(|e| e.name == "BANK_VAULTS_HSM_PIN")
        .expect("BANK_VAULTS_HSM_PIN in envsConfig");
    assert!(pin_env.value.is_none(), "the PIN is not written in clear");
    assert!(
        pin_env
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .is_some(),
        "the PIN comes from a Secret"
    );
    // The same section, moved unchanged into unseal-init's `hsm:`, is accepted by unseal-init.
    let section = serde_json::json!({
        "daemon": hsm.daemon,
        "modulePath": hsm.module_path,
        "slotId": hsm.slot_id,
        "tokenLabel": hsm.token_label,
        "keyLabel": hsm.key_label,
    });
    let section: serde_json::Map<String, serde_json::Value> = section
        .as_object()
        .expect("object")
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let text = format!("mode: hsm\nhsm: {}\n", serde_json::Value::Object(section));
    let file = unseal_init::config::parse_file(&text)
        .unwrap_or_else(|e| panic!("unseal-init rejects the operator's hsm section: {e}"));
    assert_eq!(file.hsm.key_label.as_deref(), Some(hsm.key_label.as_str()));
    assert_eq!(file.hsm.slot_id, hsm.slot_id.map(u64::from));
    assert_eq!(file.hsm.daemon, hsm.daemon);
}
