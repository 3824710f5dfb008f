//! What the manifest tests share: the kustomizations and the Helm chart rendered into JSON
//! objects, their round trip through the `k8s-openapi` types (a field lost on the way is one
//! the API server would reject or drop), and accessors for the pods, containers, mounts and
//! RBAC rules the tests check. Checks that need the programs' own configuration code or an
//! older Kubernetes' API types live beside the tests (`tests/manifests/checks.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::host::repo;

pub const DEVICE_PLUGIN_IMAGE: &str = "ghcr.io/nitrokey-vault/device-plugin";

pub const UNSEAL_INIT_IMAGE: &str = "ghcr.io/nitrokey-vault/unseal-init";

pub const RESOURCE: &str = "nitrokey.com/hsm";

pub const DEVICE_PLUGIN_BIN: &str = "/usr/local/bin/device-plugin";

pub const UNSEAL_INIT_BIN: &str = "/usr/local/bin/unseal-init";

pub const UNSEAL_INIT_PORT: i32 = 9091;

pub const VAULT_PORT: i32 = 8200;

pub const VAULT_CLUSTER_PORT: i32 = 8201;

/// Where kubelets keep their directory: the upstream default, and microk8s'.
pub const KUBELET_ROOTS: [&str; 2] = [
    "/var/lib/kubelet",
    "/var/snap/microk8s/common/var/lib/kubelet",
];

/// The device plugin's own namespace, in kustomize and Helm alike.
pub const PLUGIN_NAMESPACE: &str = "nitrokey-system";

pub const OPENSC_MODULE: &str = "/usr/lib/opensc-pkcs11.so";

/// The oldest Kubernetes every shipped manifest must be valid on.
pub const MIN_KUBERNETES: &str = "1.26";

/// Native sidecars (`restartPolicy: Always` on an init container) exist from this version on.
pub const NATIVE_SIDECAR_KUBERNETES: &str = "1.29";

/// Dynamic Resource Allocation (`resource.k8s.io/v1`) is GA from this version on: the DRA
/// driver's renderings need it, and their DRA kinds have no 1.26 types to check against.
pub const DRA_KUBERNETES: &str = "1.34";

/// The renderings that deploy or use the DRA driver.
pub const DRA_ORIGINS: [&str; 3] = [
    "deploy/overlays/device-plugin-dra",
    "deploy/examples/dra",
    "deploy/overlays/vault-single-dra",
];

/// The Secret holding the stick's user PIN, the same name everywhere.
pub const PIN_SECRET: &str = "vault-hsm-pin";

/// Workspace version (`[workspace.package] version`), the release tag of the image.
pub fn release_version() -> String {
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
pub fn parse_stream(yaml: &str, origin: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("{origin}: YAML does not parse: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Every kustomization under deploy/ that renders on its own (components are rendered through
/// the kustomizations that include them).
pub fn kustomizations() -> Vec<PathBuf> {
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

pub fn kustomize(dir: &Path) -> Vec<Value> {
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

pub fn rel(dir: &Path) -> String {
    dir.strip_prefix(repo())
        .unwrap_or(dir)
        .display()
        .to_string()
}

/// All rendered kustomizations, keyed by their path relative to the repository.
pub fn rendered() -> BTreeMap<String, Vec<Value>> {
    kustomizations()
        .iter()
        .map(|d| (rel(d), kustomize(d)))
        .collect()
}

/// The Kubernetes version a rendering needs: 1.29 where unseal-init runs as a native sidecar,
/// the project's minimum everywhere else.
pub fn needed_kubernetes(objects: &[Value]) -> &'static str {
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
pub fn lost_fields(original: &Value, round_tripped: &Value, path: &str, out: &mut Vec<String>) {
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
pub fn lost_in_round_trip<T: DeserializeOwned + Serialize>(
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
#[macro_export]
macro_rules! lost_for_version {
    ($k8s:ident, $object:expr $(, $resource:ident)?) => {{
        use $k8s::api::{
            apps::v1 as apps, core::v1 as core, policy::v1 as policy, rbac::v1 as rbac,
        };
        let object: &::serde_json::Value = $object;
        let kind = object["kind"].as_str().unwrap_or_default();
        let api = object["apiVersion"].as_str().unwrap_or_default();
        match (api, kind) {
            ("v1", "Namespace") => $crate::manifests::lost_in_round_trip::<core::Namespace>(object),
            ("v1", "ServiceAccount") => $crate::manifests::lost_in_round_trip::<core::ServiceAccount>(object),
            ("v1", "ConfigMap") => $crate::manifests::lost_in_round_trip::<core::ConfigMap>(object),
            ("v1", "Secret") => $crate::manifests::lost_in_round_trip::<core::Secret>(object),
            ("v1", "Service") => $crate::manifests::lost_in_round_trip::<core::Service>(object),
            ("apps/v1", "DaemonSet") => $crate::manifests::lost_in_round_trip::<apps::DaemonSet>(object),
            ("apps/v1", "StatefulSet") => $crate::manifests::lost_in_round_trip::<apps::StatefulSet>(object),
            ("apps/v1", "Deployment") => $crate::manifests::lost_in_round_trip::<apps::Deployment>(object),
            ("rbac.authorization.k8s.io/v1", "Role") => $crate::manifests::lost_in_round_trip::<rbac::Role>(object),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                $crate::manifests::lost_in_round_trip::<rbac::RoleBinding>(object)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                $crate::manifests::lost_in_round_trip::<rbac::ClusterRole>(object)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                $crate::manifests::lost_in_round_trip::<rbac::ClusterRoleBinding>(object)
            }
            ("policy/v1", "PodDisruptionBudget") => {
                $crate::manifests::lost_in_round_trip::<policy::PodDisruptionBudget>(object)
            }
            $(
                ("resource.k8s.io/v1", "DeviceClass") => {
                    $crate::manifests::lost_in_round_trip::<$k8s::api::$resource::v1::DeviceClass>(object)
                }
                ("resource.k8s.io/v1", "ResourceClaimTemplate") => {
                    $crate::manifests::lost_in_round_trip::<$k8s::api::$resource::v1::ResourceClaimTemplate>(object)
                }
                ("resource.k8s.io/v1", "ResourceClaim") => {
                    $crate::manifests::lost_in_round_trip::<$k8s::api::$resource::v1::ResourceClaim>(object)
                }
            )?
            ("cert-manager.io/v1", "Certificate") => Ok($crate::manifests::certificate_problems(object)),
            ("monitoring.coreos.com/v1", "PodMonitor") => Ok($crate::manifests::typed_problems::<$crate::manifests::PodMonitor>(object)),
            ("monitoring.coreos.com/v1", "PrometheusRule") => {
                Ok($crate::manifests::typed_problems::<$crate::manifests::PrometheusRule>(object))
            }
            _ => Err(format!("no typed check for {api} {kind}: add it here")),
        }
    }};
}

/// Fields of `object` that `T` does not know, or why it does not parse.
pub fn typed_problems<T: DeserializeOwned>(object: &Value) -> Vec<String> {
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
pub struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct PodMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace_selector: Option<Value>,
    job_label: Option<String>,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct PodMetricsEndpoint {
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
pub struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PrometheusRuleSpec,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct RuleGroup {
    name: String,
    interval: Option<String>,
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct Rule {
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
pub fn certificate_problems(object: &Value) -> Vec<String> {
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
pub fn check_typed(object: &Value) -> Result<(), String> {
    let lost = crate::lost_for_version!(k8s_openapi, object, resource)?;
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fields unknown to the API (misspelt or misplaced): {}",
            lost.join(", ")
        ))
    }
}

pub fn of_kind<T: DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<T> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .map(|o| serde_json::from_value(o.clone()).expect("typed object"))
        .collect()
}

pub fn all_containers(spec: &PodSpec) -> Vec<&Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect()
}

pub fn workload_pod_specs(objects: &[Value]) -> Vec<(String, PodSpec)> {
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

pub fn port_named(c: &Container, name: &str) -> Option<i32> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// (path, port, scheme) of an HTTP probe, with a named port resolved against the container's
/// ports.
pub fn http_probe(
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

pub fn has_port(c: &Container, port: i32) -> bool {
    c.ports.iter().flatten().any(|p| p.container_port == port)
}

pub fn runs(c: &Container, bin: &str) -> bool {
    c.command.as_ref().is_some_and(|cmd| cmd[0] == bin)
}

/// The config files a program container reads: `--config PATH`, with `$(POD_NAME)` expanded for
/// each pod of a StatefulSet. Returns (pod name or "", file name) pairs and the mount directory.
pub fn config_files(c: &Container, pods: &[String]) -> (String, Vec<(String, String)>) {
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
pub fn volume_at<'a>(spec: &'a PodSpec, c: &Container, dir: &str) -> Option<&'a Volume> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)?;
    spec.volumes.iter().flatten().find(|v| v.name == mount.name)
}

/// Whether `file` (an absolute path) is a file that a mounted Secret volume provides in `c`:
/// returns the Secret's name and key.
pub fn secret_file(spec: &PodSpec, c: &Container, file: &str) -> Option<(String, String)> {
    let (dir, name) = file.rsplit_once('/')?;
    let secret = volume_at(spec, c, dir)?.secret.as_ref()?;
    let key = match &secret.items {
        Some(items) => items.iter().find(|i| i.path == name)?.key.clone(),
        None => name.to_string(),
    };
    Some((secret.secret_name.clone().unwrap_or_default(), key))
}

/// The ConfigMap mounted at `dir` in container `c` of pod `spec`.
pub fn mounted_config_map<'a>(
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

pub fn config_text<'a>(cm: &'a ConfigMap, file: &str) -> &'a str {
    cm.data
        .as_ref()
        .and_then(|d| d.get(file))
        .unwrap_or_else(|| panic!("ConfigMap {:?} has no key {file}", cm.metadata.name))
}

pub fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

// ---------------------------------------------------------------------------------------------
// The checks, shared by kustomize output and Helm output.

/// RBAC rules bound to ServiceAccount `sa` in `ns`, through RoleBindings and
/// ClusterRoleBindings of the rendered objects.
pub fn rules_of(objects: &[Value], sa: &str, ns: &str) -> Vec<PolicyRule> {
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

/// The unseal-init container `side` asks for exactly one unit of the device plugin's
/// extended resource (requests equal to limits, as Kubernetes requires of them).
pub fn check_one_unit(at: &str, side: &Container) {
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
pub fn unseal_init_container<'a>(at: &str, spec: &'a PodSpec) -> &'a Container {
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

/// Files whose text a user reads or runs: documentation, manifests, scripts.
pub fn user_facing_files() -> Vec<PathBuf> {
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

pub const CHART: &str = "deploy/helm/nitrokey-vault";

pub const HELM_PY: &str = r#"
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

pub fn helm_binary() -> bool {
    Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn helm_python(mode: &str, values: &Value, name: &str, namespace: &str) -> String {
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

pub fn helm_render(values: &Value, namespace: &str) -> Vec<Value> {
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

/// The host paths of the device plugin's DaemonSet that lie under the kubelet's directory.
pub fn kubelet_host_paths(objects: &[Value]) -> Vec<String> {
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
