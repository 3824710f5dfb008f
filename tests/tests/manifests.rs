//! Checks every Kubernetes manifest the project ships, without a cluster.
//!
//! Each kustomization under `deploy/` is rendered with `kubectl kustomize`, and the Helm chart
//! with Helm's own engine; every object is parsed into its `k8s-openapi` type and serialised back,
//! once with the newest API types and once with those of the oldest Kubernetes the project
//! supports (1.26), and any field lost on the way (a misspelt or misplaced field, or one that
//! older API server rejects or silently drops) fails the test. The programs' configs embedded in
//! the manifests are parsed and validated by the programs' own configuration code. On top of
//! that, what an operator would trip over is asserted: image names and tags against the
//! Dockerfile, ports and probes against the configs, TLS between unseal-init and Vault, the PIN
//! as a mounted file, the device plugin's mounts and privileges, RBAC limited to what the
//! programs call, and one name for each thing across manifests and documentation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Service, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const DEVICE_PLUGIN_IMAGE: &str = "ghcr.io/nitrokey-vault/device-plugin";
const UNSEAL_INIT_IMAGE: &str = "ghcr.io/nitrokey-vault/unseal-init";
const RESOURCE: &str = "nitrokey.com/hsm";
const DEVICE_PLUGIN_BIN: &str = "/usr/local/bin/device-plugin";
const UNSEAL_INIT_BIN: &str = "/usr/local/bin/unseal-init";
const UNSEAL_INIT_PORT: i32 = 9091;
const VAULT_PORT: i32 = 8200;
const VAULT_CLUSTER_PORT: i32 = 8201;
/// Where kubelets keep their directory: the upstream default, and microk8s'.
const KUBELET_ROOTS: [&str; 2] = [
    "/var/lib/kubelet",
    "/var/snap/microk8s/common/var/lib/kubelet",
];
/// The device plugin's own namespace, in kustomize and Helm alike.
const PLUGIN_NAMESPACE: &str = "nitrokey-system";
const OPENSC_MODULE: &str = "/usr/lib/opensc-pkcs11.so";
/// The oldest Kubernetes every shipped manifest must be valid on.
const MIN_KUBERNETES: &str = "1.26";
/// Native sidecars (`restartPolicy: Always` on an init container) exist from this version on.
const NATIVE_SIDECAR_KUBERNETES: &str = "1.29";
/// Dynamic Resource Allocation (`resource.k8s.io/v1`) is GA from this version on: the DRA
/// driver's renderings need it, and their DRA kinds have no 1.26 types to check against.
const DRA_KUBERNETES: &str = "1.34";
/// The renderings that deploy or use the DRA driver.
const DRA_ORIGINS: [&str; 3] = [
    "deploy/overlays/device-plugin-dra",
    "deploy/examples/dra",
    "deploy/overlays/vault-single-dra",
];
/// The Secret holding the stick's user PIN, the same name everywhere.
const PIN_SECRET: &str = "vault-hsm-pin";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the repository")
        .to_path_buf()
}

/// Workspace version (`[workspace.package] version`), the release tag of the image.
fn release_version() -> String {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("read Cargo.toml");
    let mut in_section = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if in_section && line.starts_with("version") {
            let value = line.split_once('=').expect("version = ...").1.trim();
            return value.trim_matches('"').to_string();
        }
    }
    panic!("no [workspace.package] version in Cargo.toml");
}

/// Parses a multi-document YAML stream into JSON values, skipping empty documents.
fn parse_stream(yaml: &str, origin: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("{origin}: YAML does not parse: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Every kustomization under deploy/ that renders on its own (components are rendered through
/// the kustomizations that include them).
fn kustomizations() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read deploy/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                let text = std::fs::read_to_string(&path).expect("read kustomization");
                let doc: Value = serde_saphyr::from_str(&text).expect("kustomization parses");
                if doc["kind"] != "Component" {
                    out.push(dir.clone());
                }
            }
        }
    }
    out.sort();
    out
}

fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl is installed (scripts/install-deps.sh installs it into .venv)");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_stream(
        &String::from_utf8_lossy(&out.stdout),
        &dir.display().to_string(),
    )
}

fn rel(dir: &Path) -> String {
    dir.strip_prefix(repo())
        .unwrap_or(dir)
        .display()
        .to_string()
}

/// All rendered kustomizations, keyed by their path relative to the repository.
fn rendered() -> BTreeMap<String, Vec<Value>> {
    kustomizations()
        .iter()
        .map(|d| (rel(d), kustomize(d)))
        .collect()
}

/// The Kubernetes version a rendering needs: 1.29 where unseal-init runs as a native sidecar,
/// the project's minimum everywhere else.
fn needed_kubernetes(objects: &[Value]) -> &'static str {
    if objects.iter().any(|o| {
        o["apiVersion"]
            .as_str()
            .is_some_and(|a| a.starts_with("resource.k8s.io/"))
    }) {
        return DRA_KUBERNETES;
    }
    let native = workload_pod_specs(objects).iter().any(|(_, spec)| {
        spec.init_containers
            .iter()
            .flatten()
            .any(|c| c.restart_policy.as_deref() == Some("Always"))
    });
    if native {
        NATIVE_SIDECAR_KUBERNETES
    } else {
        MIN_KUBERNETES
    }
}

// ---------------------------------------------------------------------------------------------
// Typed round trips through the newest and the oldest supported API types.

/// Paths present in `original` that are missing or different in `round_tripped`.
fn lost_fields(original: &Value, round_tripped: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_tripped) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &here, out),
                    // An explicit null or empty value may legitimately be dropped.
                    None if value.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Parses `object` as `T` and serialises it back; returns the fields the type does not know.
fn lost_in_round_trip<T: DeserializeOwned + Serialize>(
    object: &Value,
) -> Result<Vec<String>, String> {
    let typed: T =
        serde_json::from_value(object.clone()).map_err(|e| format!("does not parse: {e}"))?;
    let back = serde_json::to_value(&typed).expect("k8s-openapi types serialise");
    let mut lost = Vec::new();
    lost_fields(object, &back, "", &mut lost);
    Ok(lost)
}

/// Fields of `object` unknown to the API types of one `k8s-openapi` crate (one Kubernetes
/// version); an error for a kind without a typed check.
/// With `resource` (the newest types only), DRA's `resource.k8s.io/v1` kinds too.
macro_rules! lost_for_version {
    ($k8s:ident, $object:expr $(, $resource:ident)?) => {{
        use $k8s::api::{
            apps::v1 as apps, core::v1 as core, policy::v1 as policy, rbac::v1 as rbac,
        };
        let object: &Value = $object;
        let kind = object["kind"].as_str().unwrap_or_default();
        let api = object["apiVersion"].as_str().unwrap_or_default();
        match (api, kind) {
            ("v1", "Namespace") => lost_in_round_trip::<core::Namespace>(object),
            ("v1", "ServiceAccount") => lost_in_round_trip::<core::ServiceAccount>(object),
            ("v1", "ConfigMap") => lost_in_round_trip::<core::ConfigMap>(object),
            ("v1", "Secret") => lost_in_round_trip::<core::Secret>(object),
            ("v1", "Service") => lost_in_round_trip::<core::Service>(object),
            ("apps/v1", "DaemonSet") => lost_in_round_trip::<apps::DaemonSet>(object),
            ("apps/v1", "StatefulSet") => lost_in_round_trip::<apps::StatefulSet>(object),
            ("apps/v1", "Deployment") => lost_in_round_trip::<apps::Deployment>(object),
            ("rbac.authorization.k8s.io/v1", "Role") => lost_in_round_trip::<rbac::Role>(object),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                lost_in_round_trip::<rbac::RoleBinding>(object)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                lost_in_round_trip::<rbac::ClusterRole>(object)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                lost_in_round_trip::<rbac::ClusterRoleBinding>(object)
            }
            ("policy/v1", "PodDisruptionBudget") => {
                lost_in_round_trip::<policy::PodDisruptionBudget>(object)
            }
            $(
                ("resource.k8s.io/v1", "DeviceClass") => {
                    lost_in_round_trip::<$k8s::api::$resource::v1::DeviceClass>(object)
                }
                ("resource.k8s.io/v1", "ResourceClaimTemplate") => {
                    lost_in_round_trip::<$k8s::api::$resource::v1::ResourceClaimTemplate>(object)
                }
                ("resource.k8s.io/v1", "ResourceClaim") => {
                    lost_in_round_trip::<$k8s::api::$resource::v1::ResourceClaim>(object)
                }
            )?
            ("cert-manager.io/v1", "Certificate") => Ok(certificate_problems(object)),
            ("monitoring.coreos.com/v1", "PodMonitor") => Ok(typed_problems::<PodMonitor>(object)),
            ("monitoring.coreos.com/v1", "PrometheusRule") => {
                Ok(typed_problems::<PrometheusRule>(object))
            }
            _ => Err(format!("no typed check for {api} {kind}: add it here")),
        }
    }};
}

/// Fields of `object` that `T` does not know, or why it does not parse.
fn typed_problems<T: DeserializeOwned>(object: &Value) -> Vec<String> {
    match serde_json::from_value::<T>(object.clone()) {
        Ok(_) => Vec::new(),
        Err(e) => vec![e.to_string()],
    }
}

// The Prometheus Operator's `monitoring.coreos.com/v1` kinds the monitoring component uses,
// written from its API reference (PodMonitorSpec, PodMetricsEndpoint, PrometheusRuleSpec,
// RuleGroup, Rule): the fields used here, unknown ones refused as its CRDs' schemas do.

/// `PodMonitor`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct PodMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace_selector: Option<Value>,
    job_label: Option<String>,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct PodMetricsEndpoint {
    port: Option<String>,
    path: Option<String>,
    scheme: Option<String>,
    interval: Option<String>,
    scrape_timeout: Option<String>,
}

/// `PrometheusRule`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PrometheusRuleSpec,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct RuleGroup {
    name: String,
    interval: Option<String>,
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

/// cert-manager's `Certificate` has no `k8s-openapi` type: its spec keys are checked against
/// cert-manager v1's documented ones, and the names unseal-init and the peers use must be in it.
fn certificate_problems(object: &Value) -> Vec<String> {
    let known = [
        "secretName",
        "issuerRef",
        "dnsNames",
        "ipAddresses",
        "commonName",
        "duration",
        "renewBefore",
        "privateKey",
        "usages",
        "secretTemplate",
    ];
    let mut problems: Vec<String> = object["spec"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, _)| format!(".spec.{k}"))
        .collect();
    for required in ["secretName", "issuerRef"] {
        if object["spec"].get(required).is_none() {
            problems.push(format!(".spec.{required} is missing"));
        }
    }
    let ips = object["spec"]["ipAddresses"].as_array().cloned();
    if !ips.unwrap_or_default().iter().any(|ip| ip == "127.0.0.1") {
        problems.push(".spec.ipAddresses must name 127.0.0.1 (unseal-init's address)".into());
    }
    problems
}

/// Parses one rendered object into its typed API struct with the newest types; unknown kinds
/// and unknown fields fail.
fn check_typed(object: &Value) -> Result<(), String> {
    let lost = lost_for_version!(k8s_openapi, object, resource)?;
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fields unknown to the API (misspelt or misplaced): {}",
            lost.join(", ")
        ))
    }
}

/// The same with Kubernetes 1.26's API types. `needs` is the version the rendering declares:
/// where it is 1.29, init containers' `restartPolicy` (native sidecars) is the one field
/// allowed to be missing from 1.26.
fn check_typed_oldest(object: &Value, needs: &str) -> Result<(), String> {
    // DRA's kinds do not exist before 1.34; a rendering holding them declares 1.34, and they
    // are checked with the newest types only.
    if object["apiVersion"]
        .as_str()
        .is_some_and(|a| a.starts_with("resource.k8s.io/"))
    {
        return if needs == DRA_KUBERNETES {
            Ok(())
        } else {
            Err(format!("a DRA kind needs Kubernetes {DRA_KUBERNETES}"))
        };
    }
    let lost = lost_for_version!(k8s_openapi_1_26, object)?;
    let native_sidecar_field = |path: &str| {
        path.starts_with(".spec.template.spec.initContainers[") && path.ends_with("].restartPolicy")
    };
    // A pod's resource claims (`resourceClaims`, and `resources.claims` of its containers)
    // take the 1.34 form where the rendering declares 1.34.
    let claim_field = |path: &str| {
        path.starts_with(".spec.template.spec.resourceClaims[")
            || (path.starts_with(".spec.template.spec.containers[")
                && path.contains("].resources.claims"))
    };
    let unexpected: Vec<String> = lost
        .into_iter()
        .filter(|p| !(needs == NATIVE_SIDECAR_KUBERNETES && native_sidecar_field(p)))
        .filter(|p| !(needs == DRA_KUBERNETES && claim_field(p)))
        .collect();
    if unexpected.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fields Kubernetes {MIN_KUBERNETES} does not have (its API server rejects them, or \
             drops them silently): {}",
            unexpected.join(", ")
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The programs' configs, through the programs' own configuration code.

/// An unseal-init config as the program reads it: parsed and validated by `unseal_init::config`.
/// The PIN file exists only in the pod, so validation runs with a stand-in file at its path;
/// returns the validated config and the `hsm.pinFile` the manifest names.
fn unseal_init_config(text: &str, at: &str) -> (unseal_init::config::Config, Option<PathBuf>) {
    use unseal_init::config;
    let mut file =
        config::parse_file(text).unwrap_or_else(|e| panic!("{at}: unseal-init rejects it: {e}"));
    let pin_file = file.hsm.pin_file.take();
    let stand_in = tempfile::NamedTempFile::new().expect("PIN stand-in");
    std::fs::write(stand_in.path(), "stand-in").expect("write PIN stand-in");
    if pin_file.is_some() {
        file.hsm.pin_file = Some(stand_in.path().to_path_buf());
    }
    let resolved = config::resolve(
        file,
        &unseal_init::cli::Overrides::default(),
        &config::Env::default(),
    )
    .unwrap_or_else(|e| panic!("{at}: unseal-init rejects it: {e}"));
    (resolved, pin_file)
}

/// A device plugin config as the program reads it (`nitrokey_device_plugin::config`).
fn device_plugin_config(text: &str, at: &str) -> nitrokey_device_plugin::config::Config {
    device_plugin_config_in(text, at, None)
}

/// The same in a container whose NODE_NAME comes from the downward API (`spec.nodeName`), as
/// the program sees it there: set to a node's name.
fn device_plugin_config_in(
    text: &str,
    at: &str,
    c: Option<&Container>,
) -> nitrokey_device_plugin::config::Config {
    use nitrokey_device_plugin::config::{Cli, Config, FileConfig};
    let file = FileConfig::from_yaml(text)
        .unwrap_or_else(|e| panic!("{at}: the device plugin rejects it: {e}"));
    let node_from_downward_api = c.is_some_and(|c| {
        c.env.iter().flatten().any(|e| {
            e.name == "NODE_NAME"
                && e.value_from
                    .as_ref()
                    .and_then(|v| v.field_ref.as_ref())
                    .is_some_and(|f| f.field_path == "spec.nodeName")
        })
    });
    let cli = Cli {
        node_name: node_from_downward_api.then(|| "node-1".to_owned()),
        ..Cli::default()
    };
    Config::merge(file, &cli).unwrap_or_else(|e| panic!("{at}: the device plugin rejects it: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Helpers over rendered objects.

fn of_kind<T: DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<T> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .map(|o| serde_json::from_value(o.clone()).expect("typed object"))
        .collect()
}

fn all_containers(spec: &PodSpec) -> Vec<&Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect()
}

fn workload_pod_specs(objects: &[Value]) -> Vec<(String, PodSpec)> {
    let mut out = Vec::new();
    for ds in of_kind::<DaemonSet>(objects, "DaemonSet") {
        let spec = ds.spec.template.spec.expect("DaemonSet has a pod spec");
        out.push((
            format!("DaemonSet/{}", ds.metadata.name.unwrap_or_default()),
            spec,
        ));
    }
    for sts in of_kind::<StatefulSet>(objects, "StatefulSet") {
        let spec = sts.spec.template.spec.expect("StatefulSet has a pod spec");
        out.push((
            format!("StatefulSet/{}", sts.metadata.name.unwrap_or_default()),
            spec,
        ));
    }
    out
}

fn port_named(c: &Container, name: &str) -> Option<i32> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// (path, port, scheme) of an HTTP probe, with a named port resolved against the container's
/// ports.
fn http_probe(
    c: &Container,
    probe: Option<&k8s_openapi::api::core::v1::Probe>,
) -> Option<(String, i32, String)> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let get = probe?.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => port_named(c, name)?,
    };
    Some((
        get.path.clone().unwrap_or_default(),
        port,
        get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
    ))
}

fn has_port(c: &Container, port: i32) -> bool {
    c.ports.iter().flatten().any(|p| p.container_port == port)
}

fn runs(c: &Container, bin: &str) -> bool {
    c.command.as_ref().is_some_and(|cmd| cmd[0] == bin)
}

/// The config files a program container reads: `--config PATH`, with `$(POD_NAME)` expanded for
/// each pod of a StatefulSet. Returns (pod name or "", file name) pairs and the mount directory.
fn config_files(c: &Container, pods: &[String]) -> (String, Vec<(String, String)>) {
    let args = c.args.clone().unwrap_or_default();
    let i = args
        .iter()
        .position(|a| a == "--config")
        .unwrap_or_else(|| panic!("container {} passes no --config", c.name));
    let path = args.get(i + 1).expect("--config has a value");
    let (dir, file) = path.rsplit_once('/').expect("absolute config path");
    let files = if file.contains("$(POD_NAME)") {
        assert!(
            c.env.iter().flatten().any(|e| e.name == "POD_NAME"
                && e.value_from
                    .as_ref()
                    .and_then(|v| v.field_ref.as_ref())
                    .map(|f| f.field_path.as_str())
                    == Some("metadata.name")),
            "{}: $(POD_NAME) in args needs env POD_NAME from metadata.name",
            c.name
        );
        pods.iter()
            .map(|p| (p.clone(), file.replace("$(POD_NAME)", p)))
            .collect()
    } else {
        vec![(String::new(), file.to_string())]
    };
    (dir.to_string(), files)
}

/// The volume mounted at `dir` (exactly) in container `c` of pod `spec`.
fn volume_at<'a>(spec: &'a PodSpec, c: &Container, dir: &str) -> Option<&'a Volume> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)?;
    spec.volumes.iter().flatten().find(|v| v.name == mount.name)
}

/// Whether `file` (an absolute path) is a file that a mounted Secret volume provides in `c`:
/// returns the Secret's name and key.
fn secret_file(spec: &PodSpec, c: &Container, file: &str) -> Option<(String, String)> {
    let (dir, name) = file.rsplit_once('/')?;
    let secret = volume_at(spec, c, dir)?.secret.as_ref()?;
    let key = match &secret.items {
        Some(items) => items.iter().find(|i| i.path == name)?.key.clone(),
        None => name.to_string(),
    };
    Some((secret.secret_name.clone().unwrap_or_default(), key))
}

/// The ConfigMap mounted at `dir` in container `c` of pod `spec`.
fn mounted_config_map<'a>(
    spec: &PodSpec,
    c: &Container,
    dir: &str,
    cms: &'a [ConfigMap],
) -> &'a ConfigMap {
    let volume =
        volume_at(spec, c, dir).unwrap_or_else(|| panic!("{}: nothing mounted at {dir}", c.name));
    let cm_name = &volume
        .config_map
        .as_ref()
        .expect("config volume is a ConfigMap")
        .name;
    cms.iter()
        .find(|cm| cm.metadata.name.as_deref() == Some(cm_name.as_str()))
        .unwrap_or_else(|| {
            panic!(
                "{}: ConfigMap {cm_name} is not part of the manifests",
                c.name
            )
        })
}

fn config_text<'a>(cm: &'a ConfigMap, file: &str) -> &'a str {
    cm.data
        .as_ref()
        .and_then(|d| d.get(file))
        .unwrap_or_else(|| panic!("ConfigMap {:?} has no key {file}", cm.metadata.name))
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

// ---------------------------------------------------------------------------------------------
// The checks, shared by kustomize output and Helm output.

/// Checks one rendered set of objects (one kustomization or one chart rendering).
fn check_objects(origin: &str, objects: &[Value]) {
    let needs = needed_kubernetes(objects);
    let mut problems = Vec::new();
    for object in objects {
        let name = format!("{} {}", object["kind"], object["metadata"]["name"]);
        if let Err(e) = check_typed(object) {
            problems.push(format!("{name}: {e}"));
        }
        if let Err(e) = check_typed_oldest(object, needs) {
            problems.push(format!("{name}: {e}"));
        }
        assert_ne!(
            object["kind"], "Node",
            "{origin}: manifests must not touch Node objects"
        );
    }
    assert!(
        problems.is_empty(),
        "{origin}:\n  {}",
        problems.join("\n  ")
    );

    check_images(origin, objects);
    check_device_plugin(origin, objects);
    check_vault(origin, objects);
}

fn check_images(origin: &str, objects: &[Value]) {
    let version = release_version();
    for (workload, spec) in workload_pod_specs(objects) {
        for c in all_containers(&spec) {
            let image = c
                .image
                .as_deref()
                .unwrap_or_else(|| panic!("{origin} {workload}: {} has no image", c.name));
            let (name, tag) = image
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("{origin} {workload}: image {image} has no tag"));
            assert!(
                !tag.is_empty() && tag != "latest",
                "{origin} {workload}: image {image} is not pinned"
            );
            let cmd = c.command.clone().unwrap_or_default();
            match name {
                DEVICE_PLUGIN_IMAGE | UNSEAL_INIT_IMAGE => {
                    assert_eq!(
                        tag, version,
                        "{origin} {workload}: {image} must be the release tag {version}"
                    );
                    // Each image carries one program (and only unseal-init's the smart-card
                    // stack), so the image decides what the container may run.
                    let bin = if name == DEVICE_PLUGIN_IMAGE {
                        DEVICE_PLUGIN_BIN
                    } else {
                        UNSEAL_INIT_BIN
                    };
                    assert_eq!(
                        cmd,
                        vec![bin.to_string()],
                        "{origin} {workload}: {} in {image} must run {bin}",
                        c.name
                    );
                }
                "hashicorp/vault" => {
                    assert_eq!(
                        cmd.first().map(String::as_str),
                        Some("vault"),
                        "{origin}: Vault runs `vault`"
                    );
                    assert!(
                        c.env.iter().flatten().all(|e| !e.name.starts_with("BAO_")),
                        "{origin}: BAO_* on Vault"
                    );
                }
                "quay.io/openbao/openbao" => {
                    assert_eq!(
                        cmd.first().map(String::as_str),
                        Some("bao"),
                        "{origin}: OpenBao runs `bao`"
                    );
                    assert!(
                        c.env
                            .iter()
                            .flatten()
                            .all(|e| !e.name.starts_with("VAULT_")),
                        "{origin}: VAULT_* on OpenBao"
                    );
                }
                other => panic!("{origin} {workload}: unexpected image {other}"),
            }
        }
    }
}

/// RBAC rules bound to ServiceAccount `sa` in `ns`, through RoleBindings and
/// ClusterRoleBindings of the rendered objects.
fn rules_of(objects: &[Value], sa: &str, ns: &str) -> Vec<PolicyRule> {
    let roles: Vec<Role> = of_kind(objects, "Role");
    let cluster_roles: Vec<ClusterRole> = of_kind(objects, "ClusterRole");
    let mut out = Vec::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        let binding_ns = binding["metadata"]["namespace"].as_str().unwrap_or(ns);
        let binds = binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == sa
                    && s["namespace"].as_str().unwrap_or(binding_ns) == ns
            });
        if !binds {
            continue;
        }
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let rules = if binding["roleRef"]["kind"] == "ClusterRole" {
            cluster_roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(role_name))
                .and_then(|r| r.rules.clone())
        } else {
            roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(role_name))
                .and_then(|r| r.rules.clone())
        };
        out.extend(rules.unwrap_or_default());
    }
    out
}

fn check_device_plugin(origin: &str, objects: &[Value]) {
    let cms: Vec<ConfigMap> = of_kind(objects, "ConfigMap");
    for ds in of_kind::<DaemonSet>(objects, "DaemonSet") {
        let name = ds.metadata.name.clone().unwrap_or_default();
        let ns = ds.metadata.namespace.clone().unwrap_or_default();
        let spec = ds.spec.template.spec.expect("pod spec");
        let c = spec
            .containers
            .iter()
            .find(|c| runs(c, DEVICE_PLUGIN_BIN))
            .unwrap_or_else(|| panic!("{origin}: DaemonSet {name} does not run the device plugin"));
        let at = format!("{origin} DaemonSet/{name}");

        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{at}: priority class"
        );
        assert!(
            spec.tolerations.as_ref().is_some_and(|t| !t.is_empty()),
            "{at}: needs tolerations"
        );
        assert!(
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .is_some(),
            "{at}: resource requests"
        );

        // Privileges: none beyond the owner's access to the kubelet's directory.
        let sc = c.security_context.clone().unwrap_or_default();
        assert_ne!(sc.privileged, Some(true), "{at}: must not be privileged");
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{at}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{at}: readOnlyRootFilesystem"
        );
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert!(
            caps.drop.iter().flatten().any(|c| c == "ALL"),
            "{at}: must drop ALL capabilities"
        );
        assert!(
            caps.add.iter().flatten().next().is_none(),
            "{at}: must add no capability"
        );

        // Mounts: the kubelet's plugin directory and the host's USB view, read-only.
        let host_path_of = |mount_path: &str| -> Option<(String, bool)> {
            let m = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == mount_path)?;
            let v = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
            Some((
                v.host_path.as_ref()?.path.clone(),
                m.read_only.unwrap_or(false),
            ))
        };
        for (path, read_only) in [("/dev/bus/usb", true), ("/sys", true), ("/run/udev", true)] {
            assert_eq!(
                host_path_of(path),
                Some((path.to_string(), read_only)),
                "{at}: {path} must be a read-only hostPath"
            );
        }

        // API access: whatever the plugin is granted, never Secrets, never wildcards, never
        // the verbs that lead to more privilege.
        let sa = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        for rule in rules_of(objects, &sa, &ns) {
            let resources = rule.resources.clone().unwrap_or_default();
            assert!(
                !resources
                    .iter()
                    .any(|r| r == "*" || r.starts_with("secrets")),
                "{at}: the device plugin must not reach Secrets: {rule:?}"
            );
            assert!(
                !rule
                    .verbs
                    .iter()
                    .any(|v| ["*", "escalate", "bind", "impersonate"].contains(&v.as_str())),
                "{at}: {rule:?}"
            );
        }

        // Config: parsed by the device plugin itself, and agreeing with the pod.
        let (dir, files) = config_files(c, &[]);
        let cm = mounted_config_map(&spec, c, &dir, &cms);
        for (_, file) in files {
            let config =
                device_plugin_config_in(config_text(cm, &file), &format!("{at} {file}"), Some(c));
            check_dra_driver(&at, &config, &host_path_of, &rules_of(objects, &sa, &ns));
            assert_eq!(config.resource_name, RESOURCE, "{at}: resourceName");
            assert!(
                host_path_of(&config.plugin_dir.display().to_string()).is_some_and(|(host, _)| {
                    KUBELET_ROOTS
                        .iter()
                        .any(|root| host == format!("{root}/device-plugins"))
                }),
                "{at}: pluginDir {} is not mounted from a kubelet's device-plugins directory \
                 ({KUBELET_ROOTS:?})",
                config.plugin_dir.display()
            );
            // Probes reach the port the program serves them on.
            let port = i32::from(config.metrics_address.port());
            assert!(has_port(c, port), "{at}: container port {port}");
            for (probe, path) in [
                (c.liveness_probe.as_ref(), "/healthz"),
                (c.readiness_probe.as_ref(), "/readyz"),
            ] {
                assert_eq!(
                    http_probe(c, probe),
                    Some((path.into(), port, "HTTP".into())),
                    "{at}: probe {path}"
                );
            }
        }
    }
}

/// In DRA mode, the kubelet's registry, the driver's own directory and the CDI directory are
/// mounted from the host at the paths the driver announces, and the driver may read claims and
/// write slices; in device-plugin mode, it is granted nothing of DRA.
fn check_dra_driver(
    at: &str,
    config: &nitrokey_device_plugin::config::Config,
    host_path_of: &dyn Fn(&str) -> Option<(String, bool)>,
    rules: &[PolicyRule],
) {
    use nitrokey_device_plugin::config::Mode;
    use nitrokey_device_plugin::dra::run::{dra_socket, registration_socket};
    let granted = |resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups
                .iter()
                .flatten()
                .any(|g| g == "resource.k8s.io")
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    if config.mode != Mode::Dra {
        assert!(
            !granted("resourceslices", "patch"),
            "{at}: DRA rights without DRA mode"
        );
        return;
    }
    let dirs = [
        registration_socket(&config.kubelet_dir),
        dra_socket(&config.kubelet_dir),
    ]
    .map(|p| p.parent().expect("socket directory").display().to_string());
    for dir in dirs
        .iter()
        .chain([&config.cdi_spec_dir.display().to_string()])
    {
        assert_eq!(
            host_path_of(dir),
            Some((dir.clone(), false)),
            "{at}: {dir} must be a writable hostPath at the same path"
        );
    }
    for (resource, verb) in [
        ("resourceslices", "get"),
        ("resourceslices", "patch"),
        ("resourceslices", "create"),
        ("resourceclaims", "get"),
    ] {
        assert!(granted(resource, verb), "{at}: needs {verb} on {resource}");
    }
}

/// The unseal-init container `side` asks for exactly one unit of the device plugin's
/// extended resource (requests equal to limits, as Kubernetes requires of them).
fn check_one_unit(at: &str, side: &Container) {
    let res = side.resources.clone().unwrap_or_default();
    let req = res
        .requests
        .unwrap_or_default()
        .get(RESOURCE)
        .map(|q| q.0.clone());
    let lim = res
        .limits
        .unwrap_or_default()
        .get(RESOURCE)
        .map(|q| q.0.clone());
    assert_eq!(
        lim.as_deref(),
        Some("1"),
        "{at}: unseal-init must limit {RESOURCE} to 1"
    );
    assert_eq!(req, lim, "{at}: {RESOURCE} requests must equal limits");
}

/// The unseal-init container of a Vault pod: a regular container beside Vault, or a native
/// sidecar (an init container with `restartPolicy: Always`); never a plain init container,
/// which would have to finish before Vault could even start.
fn unseal_init_container<'a>(at: &str, spec: &'a PodSpec) -> &'a Container {
    let regular: Vec<&Container> = spec
        .containers
        .iter()
        .filter(|c| runs(c, UNSEAL_INIT_BIN))
        .collect();
    let init: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| runs(c, UNSEAL_INIT_BIN))
        .collect();
    assert_eq!(
        regular.len() + init.len(),
        1,
        "{at}: exactly one unseal-init container"
    );
    if let Some(side) = init.first() {
        assert_eq!(
            side.restart_policy.as_deref(),
            Some("Always"),
            "{at}: an unseal-init init container must be a native sidecar: a plain one would \
             wait for a Vault that starts only after it"
        );
        side
    } else {
        regular[0]
    }
}

fn check_vault(origin: &str, objects: &[Value]) {
    let cms: Vec<ConfigMap> = of_kind(objects, "ConfigMap");
    let services: Vec<Service> = of_kind(objects, "Service");
    for sts in of_kind::<StatefulSet>(objects, "StatefulSet") {
        let name = sts.metadata.name.clone().unwrap_or_default();
        let ns = sts
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let at = format!("{origin} StatefulSet/{name}");
        let sts_spec = sts.spec.clone();
        let replicas = sts_spec.replicas.unwrap_or(1);
        let pods: Vec<String> = (0..replicas).map(|i| format!("{name}-{i}")).collect();
        let spec = sts_spec.template.spec.clone().expect("pod spec");
        let side = unseal_init_container(&at, &spec);

        // Its one HSM unit, or with DRA its resource claim (and then no unit).
        let claimed = side
            .resources
            .as_ref()
            .and_then(|r| r.claims.as_ref())
            .into_iter()
            .flatten()
            .any(|c| {
                spec.resource_claims
                    .iter()
                    .flatten()
                    .any(|p| p.name == c.name && p.resource_claim_template_name.is_some())
            });
        let res = side.resources.clone().unwrap_or_default();
        if claimed {
            assert!(
                !res.limits.unwrap_or_default().contains_key(RESOURCE)
                    && !res.requests.unwrap_or_default().contains_key(RESOURCE),
                "{at}: a stick through a claim and a {RESOURCE} unit besides"
            );
        } else {
            check_one_unit(&at, side);
        }
        for c in all_containers(&spec)
            .into_iter()
            .filter(|c| c.name != side.name)
        {
            let asks = c.resources.as_ref().is_some_and(|r| {
                r.limits.as_ref().is_some_and(|l| l.contains_key(RESOURCE))
                    || r.requests
                        .as_ref()
                        .is_some_and(|l| l.contains_key(RESOURCE))
                    || r.claims.as_ref().is_some_and(|c| !c.is_empty())
            });
            assert!(
                !asks,
                "{at}: only unseal-init talks to the stick; {} must not take a unit",
                c.name
            );
        }
        // The PIN never travels in the environment (visible in `kubectl describe`, inherited
        // by pcscd): it is a mounted file.
        for c in all_containers(&spec) {
            assert!(
                c.env
                    .iter()
                    .flatten()
                    .all(|e| e.name != "BANK_VAULTS_HSM_PIN"),
                "{at}: {} passes the PIN in the environment; mount it (hsm.pinFile)",
                c.name
            );
        }
        assert_eq!(
            http_probe(side, side.liveness_probe.as_ref()),
            Some(("/healthz".into(), UNSEAL_INIT_PORT, "HTTP".into())),
            "{at}: sidecar liveness"
        );
        if let Some(probe) = http_probe(side, side.readiness_probe.as_ref()) {
            assert_eq!(
                probe,
                ("/readyz".into(), UNSEAL_INIT_PORT, "HTTP".into()),
                "{at}: sidecar readiness"
            );
        }
        let sc = side.security_context.clone().unwrap_or_default();
        assert_ne!(
            sc.privileged,
            Some(true),
            "{at}: unseal-init must not be privileged"
        );
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{at}: unseal-init allowPrivilegeEscalation"
        );
        assert!(
            sc.capabilities
                .unwrap_or_default()
                .drop
                .iter()
                .flatten()
                .any(|c| c == "ALL"),
            "{at}: unseal-init must drop ALL capabilities"
        );
        let pcscd = side
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/run/pcscd");
        assert!(
            volume_at(&spec, side, "/run/pcscd").is_some_and(|v| v.empty_dir.is_some())
                && pcscd.is_some_and(|m| m.read_only != Some(true)),
            "{at}: pcscd needs a writable emptyDir at /run/pcscd"
        );

        // The server container: TLS from a mounted Secret, probes over HTTPS.
        let server = spec
            .containers
            .iter()
            .find(|c| has_port(c, VAULT_PORT))
            .unwrap_or_else(|| panic!("{at}: no container listens on {VAULT_PORT}"));
        assert!(
            has_port(server, VAULT_CLUSTER_PORT),
            "{at}: cluster port {VAULT_CLUSTER_PORT}"
        );
        for probe in [&server.readiness_probe, &server.liveness_probe] {
            let (_, port, scheme) = http_probe(server, probe.as_ref())
                .unwrap_or_else(|| panic!("{at}: the server needs HTTP probes"));
            assert_eq!(
                (port, scheme.as_str()),
                (VAULT_PORT, "HTTPS"),
                "{at}: probes speak TLS"
            );
        }
        let hcl_mount = server
            .command
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix("-config="))
            .unwrap_or_else(|| panic!("{at}: the server needs -config=FILE"));
        let (hcl_dir, hcl_file) = hcl_mount.rsplit_once('/').expect("absolute -config path");
        let hcl = config_text(mounted_config_map(&spec, server, hcl_dir, &cms), hcl_file);
        let hcl_value = |key: &str| -> Option<String> {
            hcl.lines().map(str::trim).find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        assert_eq!(
            hcl_value("address").as_deref(),
            Some(format!("0.0.0.0:{VAULT_PORT}").as_str()),
            "{at}: listener on {VAULT_PORT}"
        );
        assert_ne!(
            hcl_value("tls_disable").as_deref(),
            Some("true"),
            "{at}: TLS is on by default"
        );
        let mut tls_secret = None;
        for key in ["tls_cert_file", "tls_key_file"] {
            let file = hcl_value(key).unwrap_or_else(|| panic!("{at}: listener needs {key}"));
            let (secret, _) = secret_file(&spec, server, &file)
                .unwrap_or_else(|| panic!("{at}: {key} {file} is not on a mounted Secret"));
            tls_secret = Some(secret);
        }
        let raft_path = hcl_value("path").expect("raft storage path");
        assert!(
            sts_spec
                .volume_claim_templates
                .iter()
                .flatten()
                .any(|pvc| server
                    .volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == pvc.metadata.name.clone().unwrap_or_default()
                        && raft_path.starts_with(&m.mount_path))),
            "{at}: raft data must live on the StatefulSet's persistent volume"
        );
        let headless = services.iter().find(|s| {
            s.metadata.name.as_deref() == Some(sts_spec.service_name.as_deref().unwrap_or(""))
        });
        let headless = headless.unwrap_or_else(|| {
            panic!(
                "{at}: serviceName {:?} has no Service",
                sts_spec.service_name
            )
        });
        let hs = headless.spec.clone().unwrap_or_default();
        assert_eq!(
            hs.cluster_ip.as_deref(),
            Some("None"),
            "{at}: serviceName must be headless"
        );
        assert_eq!(
            hs.publish_not_ready_addresses,
            Some(true),
            "{at}: sealed peers must resolve"
        );

        // unseal-init configs, one per pod where they differ, as unseal-init reads them.
        let (dir, files) = config_files(side, &pods);
        let cm = mounted_config_map(&spec, side, &dir, &cms);
        let mut leaders = 0;
        for (pod, file) in files {
            let at = format!("{at} {file}");
            let text = config_text(cm, &file);
            let raw: Value = serde_saphyr::from_str(text).expect("config is YAML");
            assert!(
                raw["hsm"].get("pin").is_none(),
                "{at}: the PIN belongs in a Secret, not in a ConfigMap"
            );
            let (config, pin_file) = unseal_init_config(text, &at);
            let pin_file = pin_file
                .unwrap_or_else(|| panic!("{at}: hsm.pinFile must name the mounted PIN Secret"));
            let pin_file = pin_file.display().to_string();
            let (secret, _) = secret_file(&spec, side, &pin_file)
                .unwrap_or_else(|| panic!("{at}: hsm.pinFile {pin_file} is not a mounted Secret"));
            assert_eq!(secret, PIN_SECRET, "{at}: the PIN Secret's name");

            assert!(
                config.vault.address == format!("https://127.0.0.1:{VAULT_PORT}"),
                "{at}: unseal-init reaches Vault in the pod over TLS, got {}",
                config.vault.address
            );
            let ca = config
                .vault
                .ca_cert
                .clone()
                .map(|p| p.display().to_string())
                .or_else(|| env_value(side, "VAULT_CACERT"))
                .unwrap_or_else(|| panic!("{at}: unseal-init needs Vault's CA (VAULT_CACERT)"));
            let (ca_secret, ca_key) = secret_file(&spec, side, &ca)
                .unwrap_or_else(|| panic!("{at}: the CA {ca} is not on a mounted Secret"));
            assert_eq!(
                (Some(ca_secret), ca_key.as_str()),
                (tls_secret.clone(), "ca.crt"),
                "{at}: the CA is the ca.crt of Vault's certificate Secret"
            );
            assert_eq!(
                i32::from(config.metrics_address.port()),
                UNSEAL_INIT_PORT,
                "{at}: metricsAddress"
            );
            // The init journal outlives the container and the pod, like Vault's data.
            let journal = config.journal_dir.display().to_string();
            let on_pvc = side.volume_mounts.iter().flatten().any(|m| {
                journal.starts_with(&m.mount_path)
                    && sts_spec
                        .volume_claim_templates
                        .iter()
                        .flatten()
                        .any(|pvc| pvc.metadata.name.as_deref() == Some(m.name.as_str()))
            });
            assert!(
                on_pvc,
                "{at}: the init journal {journal} must be on the StatefulSet's persistent volume"
            );
            check_init_in_flight_hook(&at, &spec, server, side, &journal);
            assert_eq!(
                config.hsm.module_path,
                Path::new(OPENSC_MODULE),
                "{at}: the image provides {OPENSC_MODULE}"
            );
            match config.vault.raft_leader_address.as_deref() {
                None => leaders += 1,
                Some(leader) => {
                    let expected = format!(
                        "https://{name}-0.{}:{VAULT_PORT}",
                        sts_spec.service_name.as_deref().unwrap_or_default()
                    );
                    assert_eq!(
                        leader, expected,
                        "{at}: followers join pod 0 through the headless Service, over TLS"
                    );
                    assert_ne!(pod, format!("{name}-0"), "{at}: pod 0 must not join itself");
                }
            }
            check_secret_access(&at, &config, &spec, side, &ns, objects);
        }
        assert_eq!(
            leaders, 1,
            "{at}: exactly one pod may initialise Vault (no raftLeaderAddress)"
        );
        if replicas > 1 {
            let anti = spec
                .affinity
                .as_ref()
                .and_then(|a| a.pod_anti_affinity.as_ref())
                .and_then(|p| {
                    p.required_during_scheduling_ignored_during_execution
                        .as_ref()
                });
            assert!(
                anti.is_some_and(|terms| terms
                    .iter()
                    .any(|t| t.topology_key == "kubernetes.io/hostname")),
                "{at}: HA pods need one node (one stick) each: required anti-affinity on the hostname"
            );
        }
    }
}

/// While `sys/init` is unanswered, unseal-init holds a marker in its journal directory; a
/// stopping Vault drops the answer (the only copy of the keys), so the server container's
/// preStop hook must wait while the marker exists, through a path that names the same volume,
/// with a shell the Vault and OpenBao images have, bounded so that the pod's grace period
/// leaves Vault 30 s of its own shutdown.
fn check_init_in_flight_hook(
    at: &str,
    spec: &PodSpec,
    server: &Container,
    side: &Container,
    journal: &str,
) {
    let (side_mount, server_mount) = side
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| journal.starts_with(&m.mount_path))
        .find_map(|m| {
            let theirs = server
                .volume_mounts
                .iter()
                .flatten()
                .find(|s| s.name == m.name && s.sub_path.is_none())?;
            Some((m, theirs))
        })
        .unwrap_or_else(|| {
            panic!("{at}: the server container must mount the volume of the init journal {journal}")
        });
    let mut seen = server_mount.mount_path.trim_end_matches('/').to_owned();
    if let Some(sub) = &side_mount.sub_path {
        seen = format!("{seen}/{sub}");
    }
    seen.push_str(&journal[side_mount.mount_path.trim_end_matches('/').len()..]);
    let marker = format!(
        "{}/{}",
        seen.trim_end_matches('/'),
        unseal_init::journal::IN_FLIGHT
    );
    let command = server
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
        .unwrap_or_else(|| panic!("{at}: the server container needs a preStop exec hook"));
    assert_eq!(
        command.first().map(String::as_str),
        Some("/bin/sh"),
        "{at}: the preStop hook runs /bin/sh (the Vault and OpenBao images have no bash)"
    );
    let script = command.join(" ");
    assert!(
        script.contains(&format!("[ -e {marker} ]")),
        "{at}: the preStop hook must wait while {marker} exists: {script}"
    );
    let bound: i64 = script
        .split("-lt ")
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!("{at}: the preStop wait needs a bound (`-lt SECONDS`): {script}")
        });
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        bound >= 60 && grace >= bound + 30,
        "{at}: terminationGracePeriodSeconds {grace} must cover the preStop wait ({bound} s, at least 60) plus 30 s for Vault's shutdown"
    );
}

/// hsm-k8s mode needs a token and exactly what unseal-init calls on its one Secret (`get` to
/// read, `patch` to write; the Secret ships with the manifests, so no `create`, which RBAC
/// cannot narrow to a name); hsm mode needs no token at all.
fn check_secret_access(
    at: &str,
    config: &unseal_init::config::Config,
    spec: &PodSpec,
    side: &Container,
    ns: &str,
    objects: &[Value],
) {
    let projected_token = side.volume_mounts.iter().flatten().any(|m| {
        m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount"
            && spec.volumes.iter().flatten().any(|v| {
                v.name == m.name
                    && v.projected.as_ref().is_some_and(|p| {
                        p.sources
                            .iter()
                            .flatten()
                            .any(|s| s.service_account_token.is_some())
                    })
            })
    });
    let has_token = projected_token || spec.automount_service_account_token != Some(false);
    let Some(kubernetes) = config
        .kubernetes
        .as_ref()
        .filter(|_| config.mode == unseal_init::config::Mode::HsmK8s)
    else {
        assert!(
            !has_token,
            "{at}: mode hsm does not use the API; mount no token"
        );
        return;
    };
    assert!(
        has_token,
        "{at}: hsm-k8s needs an API token in the unseal-init container"
    );
    let secret = kubernetes.name.as_str();
    assert_eq!(
        kubernetes.namespace.as_deref().unwrap_or(ns),
        ns,
        "{at}: the Secret must be in the pod's namespace ({ns}), where the Role is"
    );
    assert!(
        objects
            .iter()
            .any(|o| o["kind"] == "Secret" && o["metadata"]["name"] == secret),
        "{at}: the Secret {secret} must ship with the manifests (so no `create` is needed)"
    );
    let sa = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let rules = rules_of(objects, &sa, ns);
    let mut granted = BTreeSet::new();
    for rule in &rules {
        let names = rule.resource_names.clone().unwrap_or_default();
        assert!(
            names == [secret],
            "{at}: ServiceAccount {sa} may reach more than Secret {secret}: {rule:?}"
        );
        assert!(
            rule.resources.iter().flatten().all(|r| r == "secrets")
                && rule.api_groups.iter().flatten().all(|g| g.is_empty()),
            "{at}: {rule:?}"
        );
        granted.extend(rule.verbs.iter().cloned());
    }
    let expected: BTreeSet<String> = ["get", "patch"].map(String::from).into();
    assert_eq!(
        granted, expected,
        "{at}: ServiceAccount {sa} must be granted exactly what unseal-init calls on {secret}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests.

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

/// Files whose text a user reads or runs: documentation, manifests, scripts.
fn user_facing_files() -> Vec<PathBuf> {
    let mut out = vec![repo().join("README.md"), repo().join("Dockerfile")];
    let mut stack = vec![repo().join("deploy"), repo().join("scripts")];
    for krate in ["device-plugin", "unseal-init"] {
        out.push(repo().join(krate).join("README.md"));
    }
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_release_tag_is_set_in_one_place_and_matches_the_dockerfile() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let version = release_version();
    assert!(
        dockerfile.contains(&format!("org.opencontainers.image.version=\"{version}\"")),
        "the Dockerfile's version label must be {version}"
    );
    // Only the images component names a tag for the project's images in the manifests.
    let mut tagged = Vec::new();
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if !path.ends_with("helm") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("read");
                let names_image = [DEVICE_PLUGIN_IMAGE, UNSEAL_INIT_IMAGE].iter().any(|i| {
                    text.contains(&format!("{i}:")) || (text.contains(i) && text.contains("newTag"))
                });
                if names_image {
                    tagged.push(rel(&path));
                }
            }
        }
    }
    assert_eq!(
        tagged,
        vec!["deploy/components/images/kustomization.yaml".to_string()],
        "image tag set in several places"
    );
    // Wherever documentation or scripts name one of the images with a tag, it is this release.
    let mut wrong = Vec::new();
    for file in user_facing_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for image in [
            DEVICE_PLUGIN_IMAGE,
            UNSEAL_INIT_IMAGE,
            "ghcr.io/nitrokey-vault/nitrokey-vault",
        ] {
            for (i, _) in text.match_indices(&format!("{image}:")) {
                let tag: String = text[i + image.len() + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || ".-_".contains(*c))
                    .collect();
                if tag != version || image.ends_with("/nitrokey-vault") {
                    wrong.push(format!("{}: {image}:{tag}", rel(&file)));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "images must be named {DEVICE_PLUGIN_IMAGE}:{version} or {UNSEAL_INIT_IMAGE}:{version}: {wrong:#?}"
    );
}

#[test]
fn the_images_component_names_each_project_image_and_its_tag() {
    // Pointing every overlay at another registry is one edit there: newName and newTag.
    let path = repo().join("deploy/components/images/kustomization.yaml");
    let text = std::fs::read_to_string(&path).expect("read the images component");
    let doc: Value = serde_saphyr::from_str(&text).expect("the images component parses");
    let entries = doc["images"].as_array().expect("images: a list");
    for image in [DEVICE_PLUGIN_IMAGE, UNSEAL_INIT_IMAGE] {
        let entry = entries
            .iter()
            .find(|e| e["name"] == image)
            .unwrap_or_else(|| panic!("no entry for {image}"));
        assert_eq!(entry["newName"], image, "{image}: newName");
        assert_eq!(
            entry["newTag"],
            release_version().as_str(),
            "{image}: newTag"
        );
    }
}

#[test]
fn one_pin_secret_name_and_no_pin_on_a_command_line() {
    // Every place that creates or names the PIN Secret uses one name, and creates it from a
    // file: a PIN on a command line ends up in shell history and the process list.
    let mut problems = Vec::new();
    for file in user_facing_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            if line.contains("--from-literal=pin") {
                problems.push(format!("{}: {}", rel(&file), line.trim()));
            }
            if let Some(i) = line.find("create secret generic ") {
                let name = line[i + 22..].split_whitespace().next().unwrap_or_default();
                let about_pin = line.contains("pin=") || line.contains("PIN");
                if about_pin && name != PIN_SECRET {
                    problems.push(format!("{}: Secret {name}: {}", rel(&file), line.trim()));
                }
            }
            for stale in ["secretKeyRef: {name: hsm-pin", "secretName: hsm-pin"] {
                if line.contains(stale) {
                    problems.push(format!("{}: {}", rel(&file), line.trim()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn supported_kubernetes_versions_are_stated_and_agree() {
    let chart: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join(CHART).join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(
        chart["kubeVersion"],
        format!(">={MIN_KUBERNETES}.0-0").as_str(),
        "the chart installs where the manifests are valid"
    );
    let guide = std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README.md");
    assert!(
        guide.contains(&format!("Kubernetes {MIN_KUBERNETES}"))
            && guide.contains(&format!("Kubernetes {NATIVE_SIDECAR_KUBERNETES}")),
        "deploy/README.md states the supported versions ({MIN_KUBERNETES}+, native sidecars \
         {NATIVE_SIDECAR_KUBERNETES}+)"
    );
}

#[test]
fn user_facing_text_speaks_of_the_project_itself() {
    let mut found = Vec::new();
    for file in user_facing_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            if lower.contains("seed recipe")
                || lower.contains("the seed's")
                || lower.contains("the seed ")
            {
                found.push(format!("{}:{}: {}", rel(&file), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

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
fn minikube_script_is_clean_shell_and_never_patches_nodes() {
    let script = repo().join("deploy/minikube/setup.sh");
    let text = std::fs::read_to_string(&script).expect("deploy/minikube/setup.sh");
    assert!(
        text.starts_with("#!/usr/bin/env bash"),
        "setup.sh needs a bash shebang"
    );
    assert!(
        text.contains("set -euo pipefail"),
        "setup.sh must stop at the first failure"
    );
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "setup.sh syntax: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needed in [
        "deploy/base/device-plugin",
        "deploy/overlays/vault-single",
        PIN_SECRET,
        "vault-tls",
    ] {
        assert!(
            text.contains(needed),
            "setup.sh must deploy/create {needed}"
        );
    }
    // The Secrets the script creates are the ones the manifests mount.
    let objects = kustomize(&repo().join("deploy/overlays/vault-single"));
    let (_, spec) = workload_pod_specs(&objects)
        .into_iter()
        .next()
        .expect("vault pod");
    let secrets: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
        .collect();
    assert_eq!(
        secrets,
        [PIN_SECRET, "vault-tls"].map(String::from).into(),
        "the single-node example mounts the PIN and TLS Secrets"
    );
    for secret in &secrets {
        assert!(
            text.contains(&format!("secret generic {secret} --from-file")),
            "setup.sh must create Secret {secret} from files"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Helm chart: rendered by Helm's own engine (a `helm` binary when installed, otherwise Helm's Go
// SDK through the PyPI package helm-python-sdk), then held to the same checks as kustomize output.

const CHART: &str = "deploy/helm/nitrokey-vault";

const HELM_PY: &str = r#"
import json, sys
import helm_python as helm
chart, values, name, namespace, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if mode == "lint":
    print(json.dumps(helm.lint(chart, values, strict=True)))
else:
    with helm.Chart.load(chart) as c:
        out = c.render(values, name=name, namespace=namespace, is_install=True)
    print("\n---\n".join(v for k, v in sorted(out.items()) if not k.endswith("NOTES.txt")))
"#;

fn helm_binary() -> bool {
    Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn helm_python(mode: &str, values: &Value, name: &str, namespace: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(HELM_PY)
        .arg(repo().join(CHART))
        .arg(values.to_string())
        .args([name, namespace, mode])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "Helm {mode} failed (needs a `helm` binary or `pip install helm-python-sdk`, as \
         scripts/install-deps.sh does):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helm_render(values: &Value, namespace: &str) -> Vec<Value> {
    let text = if helm_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("values.json");
        std::fs::write(&file, values.to_string()).expect("write values");
        let out = Command::new("helm")
            .args(["template", "hsm"])
            .arg(repo().join(CHART))
            .args(["--namespace", namespace, "--values"])
            .arg(&file)
            .output()
            .expect("helm");
        assert!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        helm_python("render", values, "hsm", namespace)
    };
    parse_stream(&text, CHART)
}

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

/// The host paths of the device plugin's DaemonSet that lie under the kubelet's directory.
fn kubelet_host_paths(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| o["kind"] == "DaemonSet")
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
        .filter(|p| p.contains("/kubelet/"))
        .collect()
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

const FAKE_VBOXMANAGE: &str = r#"#!/usr/bin/env bash
s="$FAKE_STATE"; echo "VBoxManage $*" >> "$s/log"
case "$1" in
  --version) echo 7.0.20r163906 ;;
  list) if [ -f "$s/extpack" ]; then printf 'Extension Packs: 1\nPack no. 0:   Oracle VM VirtualBox Extension Pack\nUsable:       true\n'; else echo 'Extension Packs: 0'; fi ;;
  showvminfo)
    [ -f "$s/exists" ] || { echo "Could not find a registered machine named '$2'" >&2; exit 1; }
    echo "VMState=\"$(cat "$s/state")\""
    [ -f "$s/ehci" ] && echo 'ehci="on"' || echo 'ehci="off"'
    n=1; while read -r v p; do echo "USBFilterVendorId$n=\"$v\""; echo "USBFilterProductId$n=\"$p\""; n=$((n+1)); done < "$s/filters" ;;
  modifyvm)
    [ "$(cat "$s/state")" != running ] || { echo "VBoxManage: error: machine is locked (running)" >&2; exit 1; }
    touch "$s/ehci" ;;
  usbfilter)
    [ "$(cat "$s/state")" != running ] || { echo "VBoxManage: error: machine is locked (running)" >&2; exit 1; }
    v=""; p=""; while [ $# -gt 0 ]; do case "$1" in --vendorid) v=$2;; --productid) p=$2;; esac; shift; done
    echo "$v $p" >> "$s/filters" ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"#;

const FAKE_MINIKUBE: &str = r#"#!/usr/bin/env bash
s="$FAKE_STATE"; echo "minikube $*" >> "$s/log"
[ "$1" = -p ] && shift 2
case "$1" in
  config) [ "$2" = get ] && echo virtualbox; exit 0 ;;
  start) touch "$s/exists"; echo running > "$s/state" ;;
  stop) echo poweroff > "$s/state" ;;
  status) [ "$(cat "$s/state")" = running ] ;;
  ssh)
    [ "$(cat "$s/state")" = running ] || exit 1
    echo "Bus 001 Device 001: ID 1d6b:0002 Linux Foundation 2.0 root hub"
    if [ -f "$s/ehci" ] && grep -q '^20a0 4230$' "$s/filters"; then echo "Bus 001 Device 002: ID 20a0:4230 Nitrokey HSM"; fi ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"#;

struct FakeVm {
    dir: tempfile::TempDir,
}

impl FakeVm {
    /// A running minikube VM without USB passthrough, the Extension Pack installed.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        for (name, body) in [("VBoxManage", FAKE_VBOXMANAGE), ("minikube", FAKE_MINIKUBE)] {
            let path = bin.join(name);
            std::fs::write(&path, body).expect("write stand-in");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state");
        for (file, content) in [
            ("exists", ""),
            ("state", "running\n"),
            ("filters", ""),
            ("extpack", ""),
            ("log", ""),
        ] {
            std::fs::write(state.join(file), content).expect("state file");
        }
        FakeVm { dir }
    }

    fn state(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join("state").join(file)
    }

    /// Runs setup.sh (passthrough only) and returns (success, output, VBoxManage/minikube calls).
    fn run(&self) -> (bool, String, Vec<String>) {
        std::fs::write(self.state("log"), "").expect("reset log");
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg(repo().join("deploy/minikube/setup.sh"))
            .env("PATH", path)
            .env("FAKE_STATE", self.dir.path().join("state"))
            .env("SKIP_DEPLOY", "1")
            .output()
            .expect("run setup.sh");
        let log = std::fs::read_to_string(self.state("log")).expect("log");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success(),
            text,
            log.lines().map(str::to_string).collect(),
        )
    }
}

#[test]
fn minikube_passthrough_is_idempotent_and_modifies_only_a_stopped_vm() {
    let vm = FakeVm::new();
    let (ok, output, calls) = vm.run();
    assert!(ok, "first run failed:\n{output}");
    let index = |needle: &str| calls.iter().position(|c| c.contains(needle));
    let count =
        |calls: &[String], needle: &str| calls.iter().filter(|c| c.contains(needle)).count();
    assert_eq!(count(&calls, "modifyvm"), 1, "{calls:#?}");
    assert_eq!(count(&calls, "usbfilter add"), 1, "{calls:#?}");
    let stop = index(" stop").expect("the running VM is stopped first");
    assert!(
        stop < index("modifyvm").expect("modifyvm"),
        "modifyvm before stop: {calls:#?}"
    );
    assert!(
        index("usbfilter add").expect("filter") < index(" start").expect("restarted"),
        "{calls:#?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.contains("--vendorid 20a0 --productid 4230")),
        "{calls:#?}"
    );
    assert!(
        output.contains("20a0:4230"),
        "the script shows the stick it found:\n{output}"
    );

    // Second run: everything is in place, nothing is changed, the VM is not stopped.
    let (ok, output, calls) = vm.run();
    assert!(ok, "second run failed:\n{output}");
    for change in ["modifyvm", "usbfilter", " stop", " start"] {
        assert_eq!(
            count(&calls, change),
            0,
            "second run must not `{change}`: {calls:#?}"
        );
    }
    let filters = std::fs::read_to_string(vm.state("filters")).expect("filters");
    assert_eq!(
        filters.lines().count(),
        1,
        "exactly one USB filter: {filters}"
    );
}

#[test]
fn minikube_passthrough_stops_with_a_clear_error_when_a_check_fails() {
    let vm = FakeVm::new();
    std::fs::remove_file(vm.state("extpack")).expect("remove extension pack");
    let (ok, output, calls) = vm.run();
    assert!(!ok, "must fail without the Extension Pack");
    assert!(output.contains("Extension Pack"), "{output}");
    assert!(
        !calls
            .iter()
            .any(|c| c.contains("modifyvm") || c.contains("usbfilter")),
        "{calls:#?}"
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
