//! Checks every Kubernetes manifest the project ships, without a cluster.
//!
//! Each kustomization under `deploy/` is rendered with `kubectl kustomize`, and the Helm chart
//! with Helm's own engine; every object is parsed into its `k8s-openapi` type and serialised back,
//! and any field lost on the way (a misspelt or misplaced field the API server would drop or
//! reject) fails the test. On top of that, what an operator would trip over is asserted: image
//! names and tags against the Dockerfile, ports and probe paths against the programs' defaults,
//! the native sidecar's shape and its one HSM unit, the device plugin's mounts and privileges,
//! RBAC limited to what the programs use, and every program config against its documented keys.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Service};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const IMAGE: &str = "ghcr.io/nitrokey-vault/nitrokey-vault";
const RESOURCE: &str = "nitrokey.com/hsm";
const DEVICE_PLUGIN_BIN: &str = "/usr/local/bin/device-plugin";
const UNSEAL_INIT_BIN: &str = "/usr/local/bin/unseal-init";
const DEVICE_PLUGIN_PORT: i32 = 9400;
const UNSEAL_INIT_PORT: i32 = 9091;
const VAULT_PORT: i32 = 8200;
const VAULT_CLUSTER_PORT: i32 = 8201;
const PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
const OPENSC_MODULE: &str = "/usr/lib/opensc-pkcs11.so";

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
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: YAML does not parse: {e}"))
        })
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
                let doc: Value = serde_yaml::from_str(&text).expect("kustomization parses");
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
        .expect("kubectl is installed (scripts/install-deps.sh installs it)");
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

fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Result<T, String> {
    let typed: T =
        serde_json::from_value(object.clone()).map_err(|e| format!("does not parse: {e}"))?;
    let back = serde_json::to_value(&typed).expect("k8s-openapi types serialise");
    let mut lost = Vec::new();
    lost_fields(object, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "fields unknown to the API (misspelt or misplaced): {}",
            lost.join(", ")
        ))
    }
}

/// Parses one rendered object into its typed API struct; unknown kinds fail.
fn check_typed(object: &Value) -> Result<(), String> {
    use k8s_openapi::api::{
        apps::v1 as apps, core::v1 as core, policy::v1 as policy, rbac::v1 as rbac,
    };
    let kind = object["kind"].as_str().unwrap_or_default();
    let api = object["apiVersion"].as_str().unwrap_or_default();
    match (api, kind) {
        ("v1", "Namespace") => round_trip::<core::Namespace>(object).map(drop),
        ("v1", "ServiceAccount") => round_trip::<core::ServiceAccount>(object).map(drop),
        ("v1", "ConfigMap") => round_trip::<core::ConfigMap>(object).map(drop),
        ("v1", "Secret") => round_trip::<core::Secret>(object).map(drop),
        ("v1", "Service") => round_trip::<core::Service>(object).map(drop),
        ("apps/v1", "DaemonSet") => round_trip::<apps::DaemonSet>(object).map(drop),
        ("apps/v1", "StatefulSet") => round_trip::<apps::StatefulSet>(object).map(drop),
        ("apps/v1", "Deployment") => round_trip::<apps::Deployment>(object).map(drop),
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<rbac::Role>(object).map(drop),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            round_trip::<rbac::RoleBinding>(object).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            round_trip::<rbac::ClusterRole>(object).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<rbac::ClusterRoleBinding>(object).map(drop)
        }
        ("policy/v1", "PodDisruptionBudget") => {
            round_trip::<policy::PodDisruptionBudget>(object).map(drop)
        }
        _ => Err(format!("no typed check for {api} {kind}: add it here")),
    }
}

// ---------------------------------------------------------------------------------------------
// Program configuration schemas (the documented key sets; the programs' loaders reject others).

/// Expected JSON type of a config value.
#[derive(Clone, Copy, Debug)]
enum Ty {
    Str,
    Int,
    Bool,
    Map,
    List,
}

fn type_ok(ty: Ty, v: &Value) -> bool {
    match ty {
        Ty::Str => v.is_string(),
        Ty::Int => v.is_u64() || v.is_i64(),
        Ty::Bool => v.is_boolean(),
        Ty::Map => v.is_object(),
        Ty::List => v.is_array(),
    }
}

fn device_plugin_schema() -> BTreeMap<&'static str, Ty> {
    BTreeMap::from([
        ("resourceName", Ty::Str),
        ("devices", Ty::List),
        ("devices[].vendor", Ty::Str),
        ("devices[].product", Ty::Str),
        ("devices[].serial", Ty::Str),
        ("sharesPerDevice", Ty::Int),
        ("gracePeriod", Ty::Str),
        ("pluginDir", Ty::Str),
        ("metricsAddress", Ty::Str),
        ("logFormat", Ty::Str),
    ])
}

fn unseal_init_schema() -> BTreeMap<&'static str, Ty> {
    BTreeMap::from([
        ("mode", Ty::Str),
        ("vault", Ty::Map),
        ("vault.address", Ty::Str),
        ("vault.caCert", Ty::Str),
        ("vault.raftLeaderAddress", Ty::Str),
        ("hsm", Ty::Map),
        ("hsm.daemon", Ty::Bool),
        ("hsm.modulePath", Ty::Str),
        ("hsm.slotId", Ty::Int),
        ("hsm.tokenLabel", Ty::Str),
        ("hsm.tokenSerial", Ty::Str),
        ("hsm.pin", Ty::Str),
        ("hsm.pinFile", Ty::Str),
        ("hsm.keyLabel", Ty::Str),
        ("hsm.generateKey", Ty::Bool),
        ("options", Ty::Map),
        ("options.secretShares", Ty::Int),
        ("options.secretThreshold", Ty::Int),
        ("options.storeRootToken", Ty::Bool),
        ("options.preFlightChecks", Ty::Bool),
        ("kubernetes", Ty::Map),
        ("kubernetes.secretNamespace", Ty::Str),
        ("kubernetes.secretName", Ty::Str),
        ("unsealPeriod", Ty::Str),
        ("metricsAddress", Ty::Str),
    ])
}

/// Checks `config` against a schema of dotted keys (`a.b`, `list[].field`); returns problems.
fn schema_problems(
    config: &Value,
    schema: &BTreeMap<&str, Ty>,
    prefix: &str,
    out: &mut Vec<String>,
) {
    let Some(map) = config.as_object() else {
        out.push(format!("`{prefix}` must be a mapping"));
        return;
    };
    for (key, value) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(ty) = schema.get(path.as_str()) else {
            out.push(format!("unknown key `{path}`"));
            continue;
        };
        if !type_ok(*ty, value) {
            out.push(format!("`{path}` must be {ty:?}, found {value}"));
            continue;
        }
        match ty {
            Ty::Map => schema_problems(value, schema, &path, out),
            Ty::List => {
                for item in value.as_array().into_iter().flatten() {
                    schema_problems(item, schema, &format!("{path}[]"), out);
                }
            }
            _ => {}
        }
    }
}

fn port_of(address: &str) -> i32 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("address `{address}` has no port"))
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

/// (path, port) of an HTTP probe, with a named port resolved against the container's ports.
fn http_probe(
    c: &Container,
    probe: Option<&k8s_openapi::api::core::v1::Probe>,
) -> Option<(String, i32)> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let get = probe?.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => port_named(c, name)?,
    };
    Some((get.path.clone().unwrap_or_default(), port))
}

fn has_port(c: &Container, port: i32) -> bool {
    c.ports.iter().flatten().any(|p| p.container_port == port)
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

/// The ConfigMap mounted at `dir` in container `c` of pod `spec`.
fn mounted_config_map<'a>(
    spec: &PodSpec,
    c: &Container,
    dir: &str,
    cms: &'a [ConfigMap],
) -> &'a ConfigMap {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {dir}", c.name));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{}: volume {} is not defined", c.name, mount.name));
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

fn config_from(cm: &ConfigMap, file: &str) -> Value {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(file))
        .unwrap_or_else(|| panic!("ConfigMap {:?} has no key {file}", cm.metadata.name));
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{file}: YAML does not parse: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The checks, shared by kustomize output and Helm output.

/// Checks one rendered set of objects (one kustomization or one chart rendering).
fn check_objects(origin: &str, objects: &[Value]) {
    let mut problems = Vec::new();
    for object in objects {
        if let Err(e) = check_typed(object) {
            problems.push(format!(
                "{} {}: {e}",
                object["kind"], object["metadata"]["name"]
            ));
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
            match name {
                IMAGE => {
                    assert_eq!(
                        tag, version,
                        "{origin} {workload}: {image} must be the release tag {version}"
                    );
                    let cmd = c.command.clone().unwrap_or_default();
                    assert!(
                        cmd.len() == 1
                            && (cmd[0] == DEVICE_PLUGIN_BIN || cmd[0] == UNSEAL_INIT_BIN),
                        "{origin} {workload}: {} must run one of the image's programs, got {cmd:?}",
                        c.name
                    );
                }
                "hashicorp/vault" => {
                    assert_eq!(
                        c.command.as_ref().map(|c| c[0].as_str()),
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
                        c.command.as_ref().map(|c| c[0].as_str()),
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

fn check_device_plugin(origin: &str, objects: &[Value]) {
    let cms: Vec<ConfigMap> = of_kind(objects, "ConfigMap");
    for ds in of_kind::<DaemonSet>(objects, "DaemonSet") {
        let name = ds.metadata.name.clone().unwrap_or_default();
        let ns = ds.metadata.namespace.clone();
        let spec = ds.spec.template.spec.expect("pod spec");
        let c = spec
            .containers
            .iter()
            .find(|c| {
                c.command
                    .as_ref()
                    .is_some_and(|cmd| cmd[0] == DEVICE_PLUGIN_BIN)
            })
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
        assert_eq!(
            spec.automount_service_account_token,
            Some(false),
            "{at}: must not mount an API token"
        );
        assert!(
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .is_some(),
            "{at}: resource requests"
        );

        // Probes and port match the program's defaults.
        assert!(
            has_port(c, DEVICE_PLUGIN_PORT),
            "{at}: container port {DEVICE_PLUGIN_PORT}"
        );
        assert_eq!(
            http_probe(c, c.liveness_probe.as_ref()),
            Some(("/healthz".into(), DEVICE_PLUGIN_PORT)),
            "{at}: liveness"
        );
        assert_eq!(
            http_probe(c, c.readiness_probe.as_ref()),
            Some(("/readyz".into(), DEVICE_PLUGIN_PORT)),
            "{at}: readiness"
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

        // Mounts: the kubelet's plugin directory and the host's USB view.
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
        assert_eq!(
            host_path_of(PLUGIN_DIR).map(|p| p.0),
            Some(PLUGIN_DIR.to_string()),
            "{at}: plugin dir hostPath"
        );
        assert_eq!(
            host_path_of("/dev/bus/usb"),
            Some(("/dev/bus/usb".into(), true)),
            "{at}: /dev/bus/usb read-only hostPath"
        );
        assert_eq!(
            host_path_of("/sys"),
            Some(("/sys".into(), true)),
            "{at}: /sys read-only"
        );
        assert_eq!(
            host_path_of("/run/udev"),
            Some(("/run/udev".into(), true)),
            "{at}: /run/udev read-only"
        );

        // Its ServiceAccount has no RBAC at all.
        let sa = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        for binding in objects
            .iter()
            .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
        {
            let subjects = binding["subjects"].as_array().cloned().unwrap_or_default();
            assert!(
                !subjects
                    .iter()
                    .any(|s| s["name"] == sa.as_str() && s["namespace"].as_str() == ns.as_deref()),
                "{at}: the device plugin needs no API access, but {} binds its ServiceAccount",
                binding["metadata"]["name"]
            );
        }

        // Config: documented keys, and values that agree with the pod.
        let (dir, files) = config_files(c, &[]);
        let cm = mounted_config_map(&spec, c, &dir, &cms);
        for (_, file) in files {
            let config = config_from(cm, &file);
            let mut problems = Vec::new();
            schema_problems(&config, &device_plugin_schema(), "", &mut problems);
            assert!(problems.is_empty(), "{at}: {file}: {}", problems.join("; "));
            assert_eq!(config["resourceName"], RESOURCE, "{at}: resourceName");
            let plugin_dir = config["pluginDir"].as_str().unwrap_or(PLUGIN_DIR);
            assert!(
                host_path_of(plugin_dir).is_some(),
                "{at}: pluginDir {plugin_dir} is not mounted"
            );
            let metrics = config["metricsAddress"].as_str().unwrap_or("0.0.0.0:9400");
            assert_eq!(
                port_of(metrics),
                DEVICE_PLUGIN_PORT,
                "{at}: metricsAddress vs container port"
            );
            assert!(
                config["sharesPerDevice"].as_u64().unwrap_or(2) >= 1,
                "{at}: sharesPerDevice >= 1"
            );
            if let Some(format) = config["logFormat"].as_str() {
                assert!(
                    ["text", "json"].contains(&format),
                    "{at}: logFormat {format}"
                );
            }
            for matcher in config["devices"].as_array().into_iter().flatten() {
                for key in ["vendor", "product"] {
                    let v = matcher[key]
                        .as_str()
                        .unwrap_or_else(|| panic!("{at}: devices[].{key} is required"));
                    let hex = v
                        .strip_prefix("0x")
                        .unwrap_or_else(|| panic!("{at}: {key} {v} is not 0x-hex"));
                    assert!(
                        u16::from_str_radix(hex, 16).is_ok(),
                        "{at}: {key} {v} is not a USB id"
                    );
                }
            }
        }
    }
}

fn check_vault(origin: &str, objects: &[Value]) {
    let cms: Vec<ConfigMap> = of_kind(objects, "ConfigMap");
    let services: Vec<Service> = of_kind(objects, "Service");
    let roles: Vec<Role> = of_kind(objects, "Role");
    let bindings: Vec<RoleBinding> = of_kind(objects, "RoleBinding");
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

        // The native sidecar.
        let sidecars: Vec<&Container> = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| {
                c.command
                    .as_ref()
                    .is_some_and(|cmd| cmd[0] == UNSEAL_INIT_BIN)
            })
            .collect();
        assert_eq!(
            sidecars.len(),
            1,
            "{at}: exactly one unseal-init init container"
        );
        let side = sidecars[0];
        assert_eq!(
            side.restart_policy.as_deref(),
            Some("Always"),
            "{at}: unseal-init must be a native sidecar"
        );
        assert!(
            spec.containers.iter().all(|c| c
                .command
                .as_ref()
                .is_none_or(|cmd| cmd[0] != UNSEAL_INIT_BIN)),
            "{at}: unseal-init belongs in initContainers"
        );
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
        for c in &spec.containers {
            let asks = c.resources.as_ref().is_some_and(|r| {
                r.limits.as_ref().is_some_and(|l| l.contains_key(RESOURCE))
                    || r.requests
                        .as_ref()
                        .is_some_and(|l| l.contains_key(RESOURCE))
            });
            assert!(
                !asks,
                "{at}: only unseal-init talks to the stick; {} must not take a unit",
                c.name
            );
        }
        let pin = side
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "BANK_VAULTS_HSM_PIN");
        let pin_ref = pin
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.secret_key_ref.as_ref());
        assert!(
            pin_ref.is_some(),
            "{at}: BANK_VAULTS_HSM_PIN must come from a Secret"
        );
        assert!(
            has_port(side, UNSEAL_INIT_PORT),
            "{at}: unseal-init port {UNSEAL_INIT_PORT}"
        );
        assert_eq!(
            http_probe(side, side.liveness_probe.as_ref()),
            Some(("/healthz".into(), UNSEAL_INIT_PORT)),
            "{at}: sidecar liveness"
        );
        if let Some(probe) = http_probe(side, side.readiness_probe.as_ref()) {
            assert_eq!(
                probe,
                ("/readyz".into(), UNSEAL_INIT_PORT),
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
        let pcscd_volume =
            pcscd.and_then(|m| spec.volumes.iter().flatten().find(|v| v.name == m.name));
        assert!(
            pcscd_volume.is_some_and(|v| v.empty_dir.is_some())
                && pcscd.is_some_and(|m| m.read_only != Some(true)),
            "{at}: pcscd needs a writable emptyDir at /run/pcscd"
        );

        // The server container.
        let server = spec
            .containers
            .iter()
            .find(|c| has_port(c, VAULT_PORT))
            .unwrap_or_else(|| panic!("{at}: no container listens on {VAULT_PORT}"));
        assert!(
            has_port(server, VAULT_CLUSTER_PORT),
            "{at}: cluster port {VAULT_CLUSTER_PORT}"
        );
        let hcl_mount = server
            .command
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix("-config="))
            .unwrap_or_else(|| panic!("{at}: the server needs -config=FILE"));
        let (hcl_dir, hcl_file) = hcl_mount.rsplit_once('/').expect("absolute -config path");
        let hcl_cm = mounted_config_map(&spec, server, hcl_dir, &cms);
        let hcl = hcl_cm
            .data
            .as_ref()
            .and_then(|d| d.get(hcl_file))
            .expect("server config in ConfigMap");
        assert!(
            hcl.contains(&format!("address         = \"0.0.0.0:{VAULT_PORT}\"")),
            "{at}: listener on {VAULT_PORT}"
        );
        let raft_path = hcl
            .lines()
            .map(str::trim)
            .find_map(|l| {
                l.strip_prefix("path")
                    .map(|p| p.trim().trim_start_matches('=').trim().trim_matches('"'))
            })
            .expect("raft storage path");
        assert!(
            server
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| raft_path.starts_with(&m.mount_path) && m.mount_path != "/"),
            "{at}: raft path {raft_path} is not on a mounted volume"
        );
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

        // unseal-init configs, one per pod where they differ.
        let (dir, files) = config_files(side, &pods);
        let cm = mounted_config_map(&spec, side, &dir, &cms);
        let mut leaders = 0;
        for (pod, file) in files {
            let config = config_from(cm, &file);
            let at = format!("{at} {file}");
            let mut problems = Vec::new();
            schema_problems(&config, &unseal_init_schema(), "", &mut problems);
            assert!(problems.is_empty(), "{at}: {}", problems.join("; "));
            let mode = config["mode"].as_str().unwrap_or("hsm");
            assert!(["hsm", "hsm-k8s"].contains(&mode), "{at}: mode {mode}");
            let address = config["vault"]["address"].as_str().expect("vault.address");
            assert!(
                address.starts_with("http://127.0.0.1:")
                    || address.starts_with("https://127.0.0.1:"),
                "{at}: Vault is in the pod"
            );
            assert_eq!(port_of(address), VAULT_PORT, "{at}: vault.address port");
            assert_eq!(
                port_of(config["metricsAddress"].as_str().unwrap_or(":9091")),
                UNSEAL_INIT_PORT,
                "{at}: metricsAddress"
            );
            assert_eq!(
                config["hsm"]["modulePath"], OPENSC_MODULE,
                "{at}: the image provides {OPENSC_MODULE}"
            );
            assert!(
                config["hsm"].get("pin").is_none(),
                "{at}: the PIN belongs in a Secret, not in a ConfigMap"
            );
            let shares = config["options"]["secretShares"].as_u64().unwrap_or(5);
            let threshold = config["options"]["secretThreshold"].as_u64().unwrap_or(3);
            assert!(
                threshold >= 1 && threshold <= shares,
                "{at}: threshold {threshold} of {shares} shares"
            );
            match config["vault"]["raftLeaderAddress"].as_str() {
                None => leaders += 1,
                Some(leader) => {
                    let expected = format!(
                        "http://{name}-0.{}:{VAULT_PORT}",
                        sts_spec.service_name.as_deref().unwrap_or_default()
                    );
                    assert_eq!(
                        leader, expected,
                        "{at}: followers join pod 0 through the headless Service"
                    );
                    assert_ne!(pod, format!("{name}-0"), "{at}: pod 0 must not join itself");
                }
            }
            check_secret_access(&at, mode, &config, &spec, side, &ns, &roles, &bindings);
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

/// hsm-k8s mode needs a token and exactly the Secret's permissions; hsm mode needs no token.
#[allow(clippy::too_many_arguments)]
fn check_secret_access(
    at: &str,
    mode: &str,
    config: &Value,
    spec: &PodSpec,
    side: &Container,
    ns: &str,
    roles: &[Role],
    bindings: &[RoleBinding],
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
    if mode != "hsm-k8s" {
        assert!(
            !has_token,
            "{at}: mode {mode} does not use the API; mount no token"
        );
        return;
    }
    assert!(
        has_token,
        "{at}: hsm-k8s needs an API token in the unseal-init container"
    );
    let secret_ns = config["kubernetes"]["secretNamespace"]
        .as_str()
        .unwrap_or(ns);
    let secret = config["kubernetes"]["secretName"]
        .as_str()
        .expect("kubernetes.secretName");
    assert_eq!(
        secret_ns, ns,
        "{at}: the Secret must be in the pod's namespace ({ns}), where the Role is"
    );
    let sa = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let allowed = |verb: &str| {
        bindings
            .iter()
            .filter(|b| b.metadata.namespace.as_deref().unwrap_or("default") == ns)
            .filter(|b| {
                b.subjects
                    .iter()
                    .flatten()
                    .any(|s| s.kind == "ServiceAccount" && s.name == sa)
            })
            .filter_map(|b| {
                roles.iter().find(|r| {
                    b.role_ref.kind == "Role"
                        && r.metadata.name.as_deref() == Some(&b.role_ref.name)
                })
            })
            .flat_map(|r| r.rules.iter().flatten())
            .any(|rule| {
                rule.api_groups.iter().flatten().any(|g| g.is_empty())
                    && rule.resources.iter().flatten().any(|r| r == "secrets")
                    && rule.verbs.iter().any(|v| v == verb)
                    && rule
                        .resource_names
                        .as_ref()
                        .is_none_or(|n| n.is_empty() || n.iter().any(|n| n == secret))
            })
    };
    for verb in ["get", "create", "update"] {
        assert!(
            allowed(verb),
            "{at}: ServiceAccount {sa} may not {verb} Secret {ns}/{secret}"
        );
    }
    // Nothing beyond the one Secret, except `create`, which RBAC cannot narrow by name.
    for role in roles {
        for rule in role.rules.iter().flatten() {
            let unnamed = rule.resource_names.as_ref().is_none_or(|n| n.is_empty());
            assert!(
                !unnamed || rule.verbs.iter().all(|v| v == "create"),
                "{at}: Role {:?} grants {:?} on every Secret",
                role.metadata.name,
                rule.verbs
            );
        }
    }
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
        "deploy/overlays/minikube",
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
    for (origin, objects) in &all {
        assert!(!objects.is_empty(), "{origin} renders nothing");
        check_objects(origin, objects);
    }
    // The examples deploy what they say they deploy.
    let count = |origin: &str, kind: &str| all[origin].iter().filter(|o| o["kind"] == kind).count();
    assert_eq!(count("deploy/base/device-plugin", "DaemonSet"), 1);
    for overlay in [
        "deploy/overlays/vault-single",
        "deploy/overlays/vault-ha",
        "deploy/overlays/openbao-single",
    ] {
        assert_eq!(count(overlay, "StatefulSet"), 1, "{overlay}");
    }
    assert_eq!(count("deploy/overlays/minikube", "DaemonSet"), 1);
    assert_eq!(count("deploy/overlays/minikube", "StatefulSet"), 1);
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
fn the_release_tag_is_set_in_one_place_and_matches_the_dockerfile() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let version = release_version();
    assert!(
        dockerfile.contains(&format!("org.opencontainers.image.version=\"{version}\"")),
        "the Dockerfile's version label must be {version}"
    );
    // Only the images component names a tag for the project's image.
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
                if text.contains(&format!("{IMAGE}:"))
                    || (text.contains(IMAGE) && text.contains("newTag"))
                {
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
    let good: Value = serde_yaml::from_str(
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
fn config_schema_check_rejects_unknown_and_mistyped_keys() {
    let config: Value =
        serde_yaml::from_str("mode: hsm\nhsm: {slotID: 0, daemon: 'yes'}\nunsealPeriod: 5s\n")
            .expect("yaml");
    let mut problems = Vec::new();
    schema_problems(&config, &unseal_init_schema(), "", &mut problems);
    assert!(
        problems.iter().any(|p| p.contains("hsm.slotID")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("hsm.daemon")),
        "{problems:?}"
    );
    assert_eq!(problems.len(), 2, "{problems:?}");
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
        "vault-hsm-pin",
    ] {
        assert!(
            text.contains(needed),
            "setup.sh must deploy/create {needed}"
        );
    }
    // The Secret name the script creates is the one the manifests read the PIN from.
    let objects = kustomize(&repo().join("deploy/overlays/vault-single"));
    let (_, spec) = workload_pod_specs(&objects)
        .into_iter()
        .next()
        .expect("vault pod");
    let pin_secret = all_containers(&spec)
        .into_iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "BANK_VAULTS_HSM_PIN")
        .and_then(|e| e.value_from.clone())
        .and_then(|v| v.secret_key_ref)
        .map(|s| s.name)
        .expect("PIN secret ref");
    assert!(
        text.contains(&format!("secret generic {pin_secret} ")),
        "setup.sh must create Secret {pin_secret}"
    );
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
        ("defaults", serde_json::json!({}), "kube-system", 1, 0),
        (
            "vault",
            serde_json::json!({"vault": {"enabled": true}}),
            "vault",
            1,
            1,
        ),
        ("openbao", openbao, "openbao", 1, 1),
        (
            "vault only",
            serde_json::json!({"devicePlugin": {"enabled": false}, "vault": {"enabled": true}}),
            "vault",
            0,
            1,
        ),
    ];
    for (label, values, namespace, daemonsets, statefulsets) in cases {
        let objects = helm_render(&values, namespace);
        let origin = format!("{CHART} ({label})");
        check_objects(&origin, &objects);
        let count = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).count();
        assert_eq!(count("DaemonSet"), daemonsets, "{origin}");
        assert_eq!(count("StatefulSet"), statefulsets, "{origin}");
        for o in &objects {
            assert_eq!(
                o["metadata"]["namespace"], namespace,
                "{origin}: {} in the release namespace",
                o["metadata"]["name"]
            );
        }
    }
    // Values reach the rendered configs.
    let custom = serde_json::json!({"devicePlugin": {"resourceName": "example.com/hsm", "sharesPerDevice": 3,
        "devices": [{"vendor": "0x20a0", "product": "0x4230", "serial": "DENK01234567"}]}});
    let objects = helm_render(&custom, "kube-system");
    let cm: Vec<ConfigMap> = of_kind(&objects, "ConfigMap");
    let config: Value =
        serde_yaml::from_str(&cm[0].data.as_ref().expect("data")["config.yaml"]).expect("config");
    assert_eq!(config["resourceName"], "example.com/hsm");
    assert_eq!(config["sharesPerDevice"], 3);
    assert_eq!(config["devices"][0]["serial"], "DENK01234567");
}

#[test]
fn helm_chart_lints_clean_and_versions_with_the_release() {
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join(CHART).join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(
        chart["appVersion"],
        release_version().as_str(),
        "appVersion is the image tag"
    );
    let values: Value = serde_yaml::from_str(
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
