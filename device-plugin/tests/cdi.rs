//! CDI through the real binary: with `--cdi`, `Allocate` names the stick as a CDI device and
//! the spec file follows hotplug (new device node after a replug, stick gone after an unplug)
//! and is removed on exit.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, Plugin, TIMEOUT};
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::usb::{Testbed, UsbDeviceSpec};

fn spec(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("nitrokey.com-hsm.json")).ok()?;
    Some(serde_json::from_str(&text).expect("the spec is whole JSON (written atomically)"))
}

fn wait_spec(dir: &Path, plugin: &Plugin, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if spec(dir).as_ref().is_some_and(&check) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CDI spec never matched; last: {:?}\n{}",
            spec(dir),
            plugin.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn paths(spec: &serde_json::Value) -> Vec<String> {
    spec["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            format!(
                "{}@{}",
                d["name"].as_str().unwrap_or_default(),
                d["containerEdits"]["deviceNodes"][0]["path"]
                    .as_str()
                    .unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_names_cdi_devices_and_the_spec_follows_hotplug() {
    let testbed = Testbed::new().unwrap();
    let stick = testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cdi_dir = dir.path().join("cdi");
    let plugin_dir = dir.path().join("plugins");
    let kubelet = FakeKubelet::start(&plugin_dir).await.unwrap();
    let mut plugin = Plugin::start(
        &testbed,
        &plugin_dir,
        &[
            "--cdi",
            "--cdi-spec-dir",
            cdi_dir.to_str().unwrap(),
            "--grace-period",
            "1m",
        ],
    );
    kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    wait_spec(&cdi_dir, &plugin, |s| {
        paths(s) == ["DENK01234567@/dev/bus/usb/001/002"]
    });
    let spec_now = spec(&cdi_dir).unwrap();
    assert_eq!(spec_now["kind"], "nitrokey.com/hsm");
    assert_eq!(
        spec_now["devices"][0]["containerEdits"]["env"][1],
        "NITROKEY_HSM_DEVICES=/dev/bus/usb/001/002"
    );

    let response = kubelet.allocate(&["DENK01234567-0"]).await.unwrap();
    let names: Vec<&str> = response
        .cdi_devices
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["nitrokey.com/hsm=DENK01234567"]);
    assert_eq!(response.devices[0].host_path, "/dev/bus/usb/001/002");

    testbed.remove(&stick).unwrap();
    wait_spec(&cdi_dir, &plugin, |s| paths(s).is_empty());
    testbed
        .add(&UsbDeviceSpec::nitrokey_hsm("DENK01234567").at(1, 9))
        .unwrap();
    wait_spec(&cdi_dir, &plugin, |s| {
        paths(s) == ["DENK01234567@/dev/bus/usb/001/009"]
    });

    assert!(plugin.terminate().success());
    assert!(spec(&cdi_dir).is_none(), "spec removed on exit");
    assert_eq!(
        std::fs::read_dir(&cdi_dir).unwrap().count(),
        0,
        "no temporary file left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cdi_allocate_names_no_cdi_device() {
    let node = Node::start(&["DENK01234567"], &[]).await;
    let response = node.kubelet.allocate(&["DENK01234567-0"]).await.unwrap();
    assert!(response.cdi_devices.is_empty());
}
