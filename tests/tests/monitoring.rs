//! The monitoring objects (`deploy/components/monitoring`): the alerting rules pass
//! `promtool check rules` and their unit tests (`tests/monitoring/alerts.test.yaml`), and every
//! metric the rules and the Grafana dashboard name is one the programs export, read from a
//! scrape of the real programs: the device plugin under an emulated stick (umockdev) with the
//! kubelet stand-in, and unseal-init beside a real OpenBao with a SoftHSM2 token.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nitrokey_e2e::bins;
use nitrokey_e2e::host::repo;
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::openbao::{self, OpenBao};
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::unseal_init;
use nitrokey_e2e::usb::Testbed;
use serde_json::Value;

/// The prefixes of the programs' metrics: a name in an expression with one of them must be
/// exported.
const PREFIXES: [&str; 2] = ["nitrokey_device_plugin_", "unseal_init_"];

/// The objects of `deploy/overlays/monitoring`, rendered by kustomize.
fn rendered() -> Vec<Value> {
    kustomize("deploy/overlays/monitoring")
}

/// The objects of the kustomization at `dir` (relative to the repository).
fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("kubectl is installed (scripts/install-deps.sh installs it into .venv)");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple::<Value>(&String::from_utf8_lossy(&out.stdout))
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn rule_groups() -> Value {
    rendered()
        .into_iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .map(|o| o["spec"]["groups"].clone())
        .expect("a PrometheusRule")
}

/// Every PromQL expression of the rules and the dashboard, with where it comes from.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in rule_groups().as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().unwrap_or("record").to_owned();
            out.push((
                format!("alert {name}"),
                rule["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    let dashboard = rendered()
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap")
        .and_then(|o| o["data"]["nitrokey-vault.json"].as_str().map(str::to_owned))
        .expect("the dashboard ConfigMap");
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            out.push((
                format!("panel {}", panel["title"]),
                target["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    out
}

/// Metric names with one of [`PREFIXES`] in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if is_name(bytes[i]) && (i == 0 || !is_name(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !is_name(bytes[j]))
                .unwrap_or(bytes.len());
            let word = &expr[i..end];
            if PREFIXES.iter().any(|p| word.starts_with(p)) {
                names.insert(word.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// The sample names a scrape can hold, from its `# TYPE` lines: counters as `_total`,
/// histograms as `_bucket`, `_sum`, `_count`, info metrics as `_info`.
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            "info" => {
                out.insert(format!("{name}_info"));
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

fn scrape(base: &str) -> Option<String> {
    let response = reqwest::blocking::get(format!("{base}/metrics")).ok()?;
    response
        .status()
        .is_success()
        .then(|| response.text().ok())
        .flatten()
}

/// Kills and reaps a child on drop, so a failing assertion leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `/metrics` of the device plugin, registered with the kubelet stand-in, one stick plugged in.
fn device_plugin_scrape() -> String {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let work = tempfile::tempdir().expect("tempdir");
    let testbed = Testbed::new().expect("umockdev testbed");
    let _stick = testbed
        .add_nitrokey_hsm("DENK01234567", 1, 2)
        .expect("emulated stick");
    let plugin_dir = work.path().join("device-plugins");
    let kubelet = runtime
        .block_on(FakeKubelet::start(&plugin_dir))
        .expect("kubelet stand-in");
    let port = openbao::free_port().expect("port");
    let mut command = testbed.command(bins::path("device-plugin").expect("device-plugin built"));
    command
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .arg("--metrics-address")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--node-labels", "none", "--on-replug", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _plugin = Reaped(command.spawn().expect("device-plugin starts"));
    runtime
        .block_on(kubelet.wait_for_registration(Duration::from_secs(30)))
        .expect("the device plugin registers");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(text) = scrape(&base)
            && text.contains("nitrokey_device_plugin_registered 1")
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the device plugin's /metrics never showed it registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/metrics` of the unseal-init sidecar once it has initialised and unsealed OpenBao.
fn unseal_init_scrape() -> String {
    let token = SoftHsm::new().expect("SoftHSM2 token");
    let bao = OpenBao::start().expect("OpenBao");
    let work = tempfile::tempdir().expect("tempdir");
    let port = openbao::free_port().expect("port");
    let mut command =
        unseal_init::command(&token, &bao.address(), &work.path().join("journal"), port)
            .expect("unseal-init command");
    command
        .arg("--unseal-period")
        .arg("300ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _sidecar = Reaped(command.spawn().expect("unseal-init starts"));
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(text) = scrape(&base)
            && text.contains("unseal_init_vault_state{state=\"unsealed\"} 1")
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "unseal-init never reported OpenBao unsealed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn alerts_pass_promtool_and_their_unit_tests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = serde_json::json!({ "groups": rule_groups() });
    // JSON is YAML: promtool reads it as a rules file.
    std::fs::write(dir.path().join("rules.yaml"), groups.to_string()).expect("rules.yaml");
    std::fs::copy(
        repo().join("tests/monitoring/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .expect("copy the unit tests");
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("promtool is installed (scripts/install-deps.sh unpacks it into .venv)");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert has a unit test.
    let tests = std::fs::read_to_string(repo().join("tests/monitoring/alerts.test.yaml"))
        .expect("unit tests");
    for (origin, _) in expressions()
        .iter()
        .filter(|(o, _)| o.starts_with("alert "))
    {
        let name = origin.trim_start_matches("alert ");
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{origin} has no promtool unit test"
        );
    }
}

#[test]
fn rules_and_dashboard_name_only_metrics_the_programs_export() {
    let mut exported_names = exported(&device_plugin_scrape());
    exported_names.extend(exported(&unseal_init_scrape()));
    let mut unknown = Vec::new();
    for (origin, expr) in expressions() {
        let names = metric_names(&expr);
        assert!(
            !names.is_empty(),
            "{origin}: no metric of the programs in `{expr}`"
        );
        for name in names {
            if !exported_names.contains(&name) {
                unknown.push(format!("{origin}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not exported by the programs:\n  {}\nexported: {exported_names:?}",
        unknown.join("\n  ")
    );
}

/// Each PodMonitor selects the pods of its program, in their namespace, on a port their
/// container names.
#[test]
fn pod_monitors_select_the_programs_pods_and_ports() {
    let monitors: Vec<Value> = rendered()
        .into_iter()
        .filter(|o| o["kind"] == "PodMonitor")
        .collect();
    assert_eq!(monitors.len(), 2, "one PodMonitor per program");
    for (dir, kind) in [
        ("deploy/base/device-plugin", "DaemonSet"),
        ("deploy/overlays/vault-single", "StatefulSet"),
    ] {
        let workload = kustomize(dir)
            .into_iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("{dir}: a {kind}"));
        let template = &workload["spec"]["template"];
        let labels = template["metadata"]["labels"]
            .as_object()
            .expect("pod labels");
        let monitor = monitors
            .iter()
            .find(|m| {
                m["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
            .unwrap_or_else(|| panic!("no PodMonitor selects the pods of {dir}"));
        assert_eq!(
            monitor["metadata"]["namespace"], workload["metadata"]["namespace"],
            "{dir}: the PodMonitor lives in the pods' namespace"
        );
        let ports: Vec<String> = template["spec"]["containers"]
            .as_array()
            .into_iter()
            .chain(template["spec"]["initContainers"].as_array())
            .flatten()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        for endpoint in monitor["spec"]["podMetricsEndpoints"]
            .as_array()
            .expect("endpoints")
        {
            let port = endpoint["port"].as_str().expect("a named port");
            assert!(
                ports.iter().any(|p| p == port),
                "{dir}: no container port {port} in {ports:?}"
            );
        }
    }
}

/// The Helm chart ships the same alerts and dashboard as the kustomize component (its
/// `files/monitoring` links to the component's files).
#[test]
fn helm_ships_the_same_alerts_and_dashboard() {
    const RENDER: &str = r#"
import json, sys
import helm_python as helm
with helm.Chart.load(sys.argv[1]) as c:
    out = c.render(json.loads(sys.argv[2]), name="hsm", namespace="vault", is_install=True)
print("\n---\n".join(v for k, v in sorted(out.items()) if k.endswith("monitoring.yaml")))
"#;
    let values = serde_json::json!({"vault": {"enabled": true}, "monitoring": {
        "podMonitor": {"enabled": true}, "prometheusRule": {"enabled": true},
        "dashboard": {"enabled": true}}});
    let out = Command::new("python3")
        .arg("-c")
        .arg(RENDER)
        .arg(repo().join("deploy/helm/nitrokey-vault"))
        .arg(values.to_string())
        .output()
        .expect("python3 with helm-python-sdk (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let helm: Vec<Value> =
        serde_saphyr::from_multiple::<Value>(&String::from_utf8_lossy(&out.stdout))
            .expect("rendered YAML parses")
            .into_iter()
            .filter(|v| !v.is_null())
            .collect();
    let of = |objects: &[Value], kind: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let kustomize = rendered();
    assert_eq!(
        of(&helm, "PrometheusRule")["spec"],
        of(&kustomize, "PrometheusRule")["spec"]
    );
    let dashboard = |cm: Value| -> Value {
        serde_json::from_str(
            cm["data"]["nitrokey-vault.json"]
                .as_str()
                .expect("dashboard"),
        )
        .expect("JSON")
    };
    assert_eq!(
        dashboard(of(&helm, "ConfigMap")),
        dashboard(of(&kustomize, "ConfigMap"))
    );
    assert_eq!(
        helm.iter().filter(|o| o["kind"] == "PodMonitor").count(),
        2,
        "one PodMonitor per program"
    );
}

/// The name check itself: suffixes follow the metric type, and only the programs' names count.
#[test]
fn metric_names_are_read_as_prometheus_writes_them() {
    let scrape = "# TYPE unseal_init_unseal_attempts counter\n# TYPE unseal_init_hsm_operation_seconds histogram\n# TYPE nitrokey_device_plugin_build info\n# TYPE unseal_init_vault_state gauge\n";
    let names = exported(scrape);
    for name in [
        "unseal_init_unseal_attempts_total",
        "unseal_init_hsm_operation_seconds_bucket",
        "nitrokey_device_plugin_build_info",
        "unseal_init_vault_state",
    ] {
        assert!(names.contains(name), "{name} in {names:?}");
    }
    assert!(!names.contains("unseal_init_unseal_attempts"));
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(unseal_init_hsm_operation_seconds_bucket[5m]))) and on(instance) nitrokey_device_plugin_registered == 0"
        )
        .into_iter()
        .collect::<Vec<_>>(),
        ["nitrokey_device_plugin_registered", "unseal_init_hsm_operation_seconds_bucket"]
    );
}
