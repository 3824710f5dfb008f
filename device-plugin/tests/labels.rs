//! Node labels through the real binary: `nitrokey.com/hsm.present` and `.count` follow the
//! plugged-in sticks and are removed when the last one goes and when the plugin exits, as an
//! NFD feature file (`nodeLabels: nfd`) or on the Node through an API stand-in (`api`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Plugin, TIMEOUT};
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::usb::{Testbed, UsbDeviceSpec};

fn wait_until(what: &str, plugin: &Plugin, check: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            plugin.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn feature_file(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("nitrokey-hsm")).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfd_feature_file_follows_the_sticks() {
    let testbed = Testbed::new().unwrap();
    let first = testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let features = dir.path().join("features.d");
    std::fs::create_dir(&features).unwrap();
    let plugin_dir = dir.path().join("plugins");
    let _kubelet = FakeKubelet::start(&plugin_dir).await.unwrap();
    let mut plugin = Plugin::start(
        &testbed,
        &plugin_dir,
        &[
            "--node-labels",
            "nfd",
            "--nfd-features-dir",
            features.to_str().unwrap(),
        ],
    );
    let has = |count: usize| {
        feature_file(&features).is_some_and(|t| {
            t.contains("nitrokey.com/hsm.present=true\n")
                && t.contains(&format!("nitrokey.com/hsm.count={count}\n"))
        })
    };
    wait_until("count=1", &plugin, || has(1));
    let second = testbed
        .add(&UsbDeviceSpec::nitrokey_hsm("DENK0000002").at(1, 3).port(2))
        .unwrap();
    wait_until("count=2", &plugin, || has(2));
    testbed.remove(&first).unwrap();
    wait_until("count=1 after an unplug", &plugin, || has(1));
    testbed.remove(&second).unwrap();
    wait_until("no file without sticks", &plugin, || {
        feature_file(&features).is_none()
    });
    testbed.add_nitrokey_hsm("DENK0000001", 1, 4).unwrap();
    wait_until("count=1 again", &plugin, || has(1));
    assert!(plugin.terminate().success());
    assert!(feature_file(&features).is_none(), "removed on exit");
    assert_eq!(
        std::fs::read_dir(&features).unwrap().count(),
        0,
        "no temporary files left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_labels_follow_the_sticks_and_go_on_exit() {
    let testbed = Testbed::new().unwrap();
    let stick = testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().unwrap();
    let kubeconfig = api.kubeconfig(dir.path()).unwrap();
    let plugin_dir = dir.path().join("plugins");
    let _kubelet = FakeKubelet::start(&plugin_dir).await.unwrap();
    let mut plugin = Plugin::start_with_env(
        &testbed,
        &plugin_dir,
        &["--node-labels", "api"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "node-1"),
        ],
    );
    let labels = |count: Option<&str>| {
        let labels = api.node_labels("node-1");
        match count {
            Some(n) => {
                labels.get("nitrokey.com/hsm.present").map(String::as_str) == Some("true")
                    && labels.get("nitrokey.com/hsm.count").map(String::as_str) == Some(n)
            }
            None => {
                !labels.contains_key("nitrokey.com/hsm.present")
                    && !labels.contains_key("nitrokey.com/hsm.count")
            }
        }
    };
    wait_until("count=1", &plugin, || labels(Some("1")));
    testbed.remove(&stick).unwrap();
    wait_until("labels removed with the last stick", &plugin, || {
        labels(None) && !api.requests().is_empty()
    });
    testbed.add_nitrokey_hsm("DENK0000001", 1, 5).unwrap();
    wait_until("count=1 again", &plugin, || labels(Some("1")));
    assert!(plugin.terminate().success());
    assert!(
        labels(None),
        "removed on exit: {:?}",
        api.node_labels("node-1")
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/node-1"),
        "only its own node is touched: {:?}",
        api.requests()
    );
}

#[test]
fn api_labels_need_the_node_name() {
    let out = std::process::Command::new(common::binary())
        .args(["--node-labels", "api"])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NODE_NAME"), "{stderr}");
}
