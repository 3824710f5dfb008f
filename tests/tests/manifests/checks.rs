//! The checks of one rendering: every object typed with the newest and with Kubernetes 1.26's
//! API types, the programs' embedded configs parsed by their own configuration code, and what an
//! operator would trip over in the device plugin's and Vault's pods (images, ports, probes,
//! TLS, the PIN file, mounts, privileges, RBAC).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Service};
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;

use nitrokey_e2e::manifests::*;

/// The same with Kubernetes 1.26's API types. `needs` is the version the rendering declares:
/// where it is 1.29, init containers' `restartPolicy` (native sidecars) is the one field
/// allowed to be missing from 1.26.
pub fn check_typed_oldest(object: &Value, needs: &str) -> Result<(), String> {
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
    let lost = nitrokey_e2e::lost_for_version!(k8s_openapi_1_26, object)?;
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
pub fn unseal_init_config(text: &str, at: &str) -> (unseal_init::config::Config, Option<PathBuf>) {
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

/// The same in a container whose NODE_NAME comes from the downward API (`spec.nodeName`), as
/// the program sees it there: set to a node's name.
pub fn device_plugin_config_in(
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

/// Checks one rendered set of objects (one kustomization or one chart rendering).
pub fn check_objects(origin: &str, objects: &[Value]) {
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

pub fn check_images(origin: &str, objects: &[Value]) {
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

pub fn check_device_plugin(origin: &str, objects: &[Value]) {
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
pub fn check_dra_driver(
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

pub fn check_vault(origin: &str, objects: &[Value]) {
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
pub fn check_init_in_flight_hook(
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
pub fn check_secret_access(
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
