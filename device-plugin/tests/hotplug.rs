//! USB changes at run time, through umockdev uevents that reach libusb's hotplug callbacks in
//! the plugin process: add, remove (Unhealthy, then dropped after the grace period), replug
//! (same IDs, new path, Healthy), the rescan fallback, sticks without a serial, serial filters,
//! and a node without USB (starts, says what it cannot see, advertises 0, picks up a stick).

mod common;

use std::time::Duration;

use common::{Node, Plugin, TIMEOUT, unit_ids};
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::usb::{Testbed, UsbDeviceSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_at_runtime() {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let plugin = Plugin::start(&testbed, dir.path(), &["--grace-period", "1s"]);
    kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    let list = kubelet
        .wait_for_list(|l| l.connected, TIMEOUT)
        .await
        .unwrap();
    assert!(list.devices.is_empty(), "no stick yet: {list:?}");
    assert!(
        plugin.logs().contains("hotplug"),
        "runs on hotplug events:\n{}",
        plugin.logs()
    );

    let first = testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    let list = kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(list.healthy_ids(), unit_ids(&["DENK0000001"], 2));

    let second = testbed.add_nitrokey_hsm("DENK0000002", 1, 3).unwrap();
    let list = kubelet
        .wait_for_devices(|d| d.len() == 4, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(list.healthy_ids().len(), 4);

    testbed.remove(&first).unwrap();
    let list = kubelet.wait_for_unhealthy(2, TIMEOUT).await.unwrap();
    assert_eq!(list.unhealthy_ids(), unit_ids(&["DENK0000001"], 2));
    assert_eq!(list.healthy_ids(), unit_ids(&["DENK0000002"], 2));
    assert_eq!(
        plugin
            .metric("nitrokey_device_plugin_sticks{health=\"unhealthy\"}")
            .await,
        Some(1.0)
    );

    // After the grace period the unplugged stick is dropped from the list.
    let list = kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    // Judged from the plugin's own log times, not from when `remove` returned here (later than
    // the uevent on a loaded machine): from the line its USB thread writes on the event (before
    // the inventory notes the unplug) to the first list without the stick (after the drop).
    let unplugged = plugin.logged_at(&["stick unplugged", "/dev/bus/usb/001/002"]);
    let (unplugged_at, _) = unplugged
        .first()
        .unwrap_or_else(|| panic!("no unplug logged:\n{}", plugin.logs()));
    let dropped_at = plugin
        .logged_at(&["device list changed", "DENK0000002"])
        .into_iter()
        .find(|(at, line)| at >= unplugged_at && !line.contains("DENK0000001"))
        .map(|(at, _)| at)
        .unwrap_or_else(|| panic!("no drop logged:\n{}", plugin.logs()));
    let kept = dropped_at.duration_since(*unplugged_at).unwrap_or_default();
    // Log times are wall-clock: a few milliseconds allow for the clock being slewed.
    assert!(
        kept >= Duration::from_millis(995),
        "kept for the grace period (1 s), not {kept:?}:\n{}",
        plugin.logs()
    );
    assert_eq!(list.healthy_ids(), unit_ids(&["DENK0000002"], 2));

    testbed.remove(&second).unwrap();
    kubelet
        .wait_for_devices(
            |d| d.iter().all(|d| d.health == "Unhealthy") && d.len() == 2,
            TIMEOUT,
        )
        .await
        .unwrap();
    kubelet
        .wait_for_devices(|d| d.is_empty(), TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replug_keeps_ids_changes_path_and_heals() {
    let node = Node::start(&["DENK01234567"], &["--grace-period", "1m"]).await;
    let list = node.kubelet.device_list().unwrap();
    let ids = list.ids();
    let before = node.kubelet.allocate(&["DENK01234567-0"]).await.unwrap();
    assert_eq!(before.envs["NITROKEY_HSM_DEVICES"], "/dev/bus/usb/001/002");

    node.testbed.remove(&node.sticks[0]).unwrap();
    let list = node
        .kubelet
        .wait_for_devices(|d| d.iter().all(|d| d.health == "Unhealthy"), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(list.ids(), ids, "kept, unhealthy, within the grace period");

    // Plugged into another port: new bus address, same serial.
    let replugged = node
        .testbed
        .add(&UsbDeviceSpec::nitrokey_hsm("DENK01234567").at(1, 5).port(3))
        .unwrap();
    let list = node
        .kubelet
        .wait_for_devices(
            |d| d.iter().all(|d| d.health == "Healthy") && d.len() == 2,
            TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(list.ids(), ids, "same IDs after replug");
    let after = node.kubelet.allocate(&["DENK01234567-0"]).await.unwrap();
    assert_eq!(after.envs["NITROKEY_HSM_DEVICES"], replugged.dev_path());
    assert_eq!(after.devices[0].host_path, "/dev/bus/usb/001/005");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescan_fallback_notices_changes() {
    let node = Node::start(
        &["DENK0000001"],
        &[
            "--discovery",
            "rescan",
            "--rescan-interval",
            "200ms",
            "--grace-period",
            "1m",
        ],
    )
    .await;
    assert!(
        node.plugin.logs().contains("periodic rescan"),
        "{}",
        node.plugin.logs()
    );
    node.testbed.add_nitrokey_hsm("DENK0000002", 1, 3).unwrap();
    node.kubelet
        .wait_for_devices(|d| d.len() == 4, TIMEOUT)
        .await
        .unwrap();
    node.testbed.remove(&node.sticks[0]).unwrap();
    let list = node.kubelet.wait_for_unhealthy(2, TIMEOUT).await.unwrap();
    assert_eq!(list.unhealthy_ids(), unit_ids(&["DENK0000001"], 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stick_without_serial_is_named_after_its_port() {
    let testbed = Testbed::new().unwrap();
    testbed
        .add(
            &UsbDeviceSpec::nitrokey_hsm("unused")
                .at(1, 4)
                .port(2)
                .without_serial(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let _plugin = Plugin::start(&testbed, dir.path(), &[]);
    let list = kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(list.ids(), unit_ids(&["usb-1-2"], 2));
    let response = kubelet.allocate(&["usb-1-2-1"]).await.unwrap();
    assert_eq!(response.envs["NITROKEY_HSM_SERIALS"], "usb-1-2");
    assert_eq!(
        response.envs["NITROKEY_HSM_DEVICES"],
        "/dev/bus/usb/001/004"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matchers_select_vendor_product_and_serial() {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("WANTED", 1, 2).unwrap();
    testbed.add_nitrokey_hsm("OTHER", 1, 3).unwrap();
    let mut other_product = UsbDeviceSpec::nitrokey_hsm("START").at(1, 4);
    other_product.product = 0x4108;
    testbed.add(&other_product).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let plugin = Plugin::start(
        &testbed,
        dir.path(),
        &["--device", "20a0:4230:WANTED", "--device", "0x20a0:0x4108"],
    );
    let list = kubelet
        .wait_for_devices(|d| d.len() == 4, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(list.ids(), unit_ids(&["START", "WANTED"], 2));
    // A later non-matching stick stays invisible: once the plugin has looked at it (and said
    // so), the list is unchanged. Waiting for that line, not a fixed time, keeps this check
    // meaningful on a loaded machine.
    testbed.add_nitrokey_hsm("LATE", 1, 5).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while plugin
        .logged_at(&["does not match any configured serial", "LATE"])
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "{}", plugin.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        kubelet.device_list().unwrap().ids(),
        unit_ids(&["START", "WANTED"], 2)
    );
}

/// libusb failing to start (as in a container without the host's USB view) is a clear error
/// and a non-zero exit, not a panic. The failure is injected with a preloaded `libusb_init`
/// that returns LIBUSB_ERROR_OTHER, built with the C compiler.
#[test]
fn libusb_failing_to_start_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("fail_init.c");
    let shim = dir.path().join("libfail_init.so");
    std::fs::write(
        &source,
        "int libusb_init(void **ctx) { (void)ctx; return -99; }\n",
    )
    .unwrap();
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&source)
        .status();
    assert!(
        built.is_ok_and(|s| s.success()),
        "cc could not build the libusb_init shim"
    );
    let plugin_dir = dir.path().join("plugins");
    let output = std::process::Command::new(common::binary())
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .args(["--metrics-address", &common::free_address().to_string()])
        .env("LD_PRELOAD", &shim)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("libusb could not start"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!plugin_dir.join("nitrokey-hsm.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_usb_starts_says_what_it_cannot_see_and_picks_up_a_stick_later() {
    // An empty testbed: no USB device, so no /dev/bus/usb; and no /run/udev in it either.
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let plugin = Plugin::start(&testbed, dir.path(), &[]);
    kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    let list = kubelet
        .wait_for_list(|l| l.connected && l.updates >= 1, TIMEOUT)
        .await
        .unwrap();
    assert!(list.devices.is_empty(), "0 units advertised: {list:?}");
    plugin.wait_http("/readyz", 200).await;
    let logs = plugin.logs();
    for (path, fallback) in [
        ("/run/udev", "periodic rescan"),
        ("/dev/bus/usb", "named after its port"),
    ] {
        let line = logs
            .lines()
            .find(|l| l.contains(&format!("cannot see {path}")))
            .unwrap_or_else(|| panic!("nothing said about {path}:\n{logs}"));
        assert!(line.contains("WARN") && line.contains(fallback), "{line}");
    }
    testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    let list = kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(list.healthy_ids(), unit_ids(&["DENK01234567"], 2));
}
