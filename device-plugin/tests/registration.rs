//! Registration with the kubelet: first registration, kubelet restarts, a kubelet that comes
//! up after the plugin, a rejected registration, shutdown. Each scenario runs the real binary
//! against the fake kubelet, with emulated sticks.

mod common;

use std::time::{Duration, Instant};

use common::{Node, Plugin, TIMEOUT, unit_ids};
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::usb::Testbed;
use nitrokey_proto::v1beta1::DevicePluginOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_and_lists_two_units_per_stick() {
    let node = Node::start(&["DENK01234567"], &[]).await;

    let registration = node.kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    assert_eq!(registration.request.version, "v1beta1");
    assert_eq!(registration.request.endpoint, "nitrokey-hsm.sock");
    assert_eq!(registration.request.resource_name, "nitrokey.com/hsm");
    let announced = registration
        .request
        .options
        .expect("options in RegisterRequest");
    assert!(announced.get_preferred_allocation_available);
    assert!(!announced.pre_start_required);
    // Answered by the plugin while Register was in flight.
    assert_eq!(
        registration.plugin_options,
        Some(DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true
        })
    );

    let list = node.kubelet.device_list().unwrap();
    assert_eq!(list.ids(), unit_ids(&["DENK01234567"], 2));
    assert_eq!(list.healthy_ids().len(), 2);
    assert!(node.dir.path().join("nitrokey-hsm.sock").exists());

    node.plugin.wait_http("/readyz", 200).await;
    assert_eq!(node.plugin.http_get("/healthz").await.0, 200);
    let (status, metrics) = node.plugin.http_get("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        "nitrokey_device_plugin_sticks{health=\"healthy\"} 1",
        "nitrokey_device_plugin_units{health=\"healthy\"} 2",
        "nitrokey_device_plugin_registrations_total{result=\"ok\"} 1",
        "nitrokey_device_plugin_registered 1",
        "nitrokey_device_plugin_list_and_watch_streams 1",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    assert_eq!(
        node.kubelet.registration_count(),
        1,
        "registered exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sticks_and_custom_resource_and_shares() {
    let node = Node::start_with_shares(
        &["DENK0000001", "DENK0000002"],
        3,
        &[
            "--resource-name",
            "example.com/stick",
            "--shares-per-device",
            "3",
        ],
    )
    .await;
    let registration = node.kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    assert_eq!(registration.request.resource_name, "example.com/stick");
    let list = node.kubelet.device_list().unwrap();
    assert_eq!(list.ids(), unit_ids(&["DENK0000001", "DENK0000002"], 3));
    assert_eq!(list.healthy_ids().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sticks_default_shares() {
    let node = Node::start(&["DENK0000001", "DENK0000002"], &[]).await;
    let list = node.kubelet.device_list().unwrap();
    assert_eq!(list.ids(), unit_ids(&["DENK0000001", "DENK0000002"], 2));
    assert_eq!(list.healthy_ids().len(), 4);
    node.plugin.wait_http("/readyz", 200).await;
    assert_eq!(
        node.plugin
            .metric("nitrokey_device_plugin_sticks{health=\"healthy\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_leads_to_reregistration() {
    let mut node = Node::start(&["DENK01234567"], &[]).await;
    node.kubelet.wait_for_registration(TIMEOUT).await.unwrap();

    for round in 2..=4 {
        // A real kubelet, a new process, takes far longer than the kernel's timer tick to
        // restart; without a pause this one could re-create kubelet.sock within one tick on
        // the recycled inode, indistinguishable from the old socket (see `FileId`).
        tokio::time::sleep(Duration::from_millis(25)).await;
        let before = node.kubelet.device_list().unwrap().updates;
        let restarted_at = node.kubelet.restart().await.unwrap();
        let registration = node
            .kubelet
            .wait_for_registrations(round, TIMEOUT)
            .await
            .unwrap();
        assert!(registration.received_at >= restarted_at);
        let list = node
            .kubelet
            .wait_for_list(
                |l| l.connected && l.updates > before && l.devices.len() == 2,
                TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(list.healthy_ids(), unit_ids(&["DENK01234567"], 2));
        assert!(
            node.dir.path().join("nitrokey-hsm.sock").exists(),
            "socket served again"
        );
    }
    node.plugin.wait_http("/readyz", 200).await;
    // Settle: no duplicate registrations trail behind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        node.kubelet.registration_count(),
        4,
        "one registration per kubelet start"
    );
    assert_eq!(
        node.plugin
            .metric("nitrokey_device_plugin_kubelet_restarts_total")
            .await,
        Some(3.0)
    );
    // Routine restarts are no failures: nothing counted, nothing above INFO logged.
    assert_eq!(
        node.plugin
            .metric("nitrokey_device_plugin_registrations_total{result=\"unreachable\"}")
            .await
            .unwrap_or(0.0),
        0.0
    );
    let logs = node.plugin.logs();
    let loud: Vec<&str> = logs
        .lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("cannot see"))
        .collect();
    assert!(loud.is_empty(), "routine restarts logged {loud:#?}");
    // A kubelet may restart again before the plugin reads its answer, so not every restart
    // ends in this line (the restart counter above counts them all), but the last one does.
    let registrations: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("registered with the kubelet") || l.contains("registered again"))
        .collect();
    assert!(
        registrations
            .last()
            .is_some_and(|l| l.contains("the kubelet restarted; registered again")),
        "{logs}"
    );
    assert_eq!(
        registrations.len() - 1,
        logs.matches("registered again").count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_socket_appearing_after_start_up() {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(&testbed, dir.path(), &[]);
    // Serving, not registered: alive but not ready.
    plugin.wait_http("/healthz", 200).await;
    assert_eq!(plugin.http_get("/readyz").await.0, 503);
    assert!(dir.path().join("nitrokey-hsm.sock").exists());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A starting kubelet removes the plugin's socket too; the plugin serves again and registers.
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    plugin.wait_http("/readyz", 200).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kubelet.registration_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_kubelet_socket_is_never_registered_with_then_a_new_one_is() {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A kubelet.sock left by a dead kubelet: nobody listens on it.
    let mut kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    kubelet.stop().await;
    assert!(kubelet.socket_path().exists());
    let plugin = Plugin::start(&testbed, dir.path(), &[]);
    plugin.wait_http("/healthz", 200).await;
    // The plugin keeps probing in the background: once it has probed twice (each probe says
    // so), nothing may have been counted or registered. Counting its probes rather than
    // waiting a fixed time keeps this meaningful on a loaded machine.
    let deadline = Instant::now() + TIMEOUT;
    while plugin
        .logs()
        .matches("kubelet.sock is not accepting connections yet")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "{}", plugin.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(plugin.http_get("/readyz").await.0, 503);
    assert_eq!(
        plugin
            .metric("nitrokey_device_plugin_registrations_total{result=\"unreachable\"}")
            .await
            .unwrap_or(0.0),
        0.0,
        "a socket nobody listens on is no failed registration:\n{}",
        plugin.logs()
    );

    let restarted_at = kubelet.restart().await.unwrap();
    let registration = kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    assert!(registration.received_at >= restarted_at);
    kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    plugin.wait_http("/readyz", 200).await;
    assert_eq!(
        kubelet.registrations().len(),
        1,
        "exactly one Register call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_failing_the_call_is_retried_counted_and_warned_about() {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    kubelet.fail_next_registrations(2);
    let plugin = Plugin::start(&testbed, dir.path(), &[]);
    kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    let attempts = kubelet.registrations();
    assert_eq!(
        attempts.len(),
        3,
        "two failures, then success: {attempts:?}"
    );
    // Backoff: 100 ms, then 200 ms.
    let gaps: Vec<Duration> = attempts
        .windows(2)
        .map(|w| w[1].received_at - w[0].received_at)
        .collect();
    assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(200), "{gaps:?}");
    plugin.wait_http("/readyz", 200).await;
    assert_eq!(
        plugin
            .metric("nitrokey_device_plugin_registrations_total{result=\"unreachable\"}")
            .await,
        Some(2.0)
    );
    let warned = plugin
        .logs()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("registration failed; retrying"))
        .count();
    assert_eq!(warned, 2, "{}", plugin.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_socket_deleted_is_served_again() {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let _plugin = Plugin::start(&testbed, dir.path(), &[]);
    kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    let socket = dir.path().join("nitrokey-hsm.sock");
    std::fs::remove_file(&socket).unwrap();
    kubelet.wait_for_registrations(2, TIMEOUT).await.unwrap();
    kubelet
        .wait_for_devices(|d| d.len() == 2, TIMEOUT)
        .await
        .unwrap();
    assert!(socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_registration_ends_the_process() {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    kubelet.reject_registrations(Some("resource nitrokey.com/hsm is already registered"));
    let mut plugin = Plugin::start(&testbed, dir.path(), &[]);
    let status = plugin
        .wait_exit(TIMEOUT)
        .expect("plugin exits after a rejected registration");
    assert_eq!(status.code(), Some(1), "{}", plugin.logs());
    let logs = plugin.logs();
    assert!(
        logs.contains("already registered"),
        "the kubelet's reason is logged:\n{logs}"
    );
    assert!(
        !dir.path().join("nitrokey-hsm.sock").exists(),
        "socket removed on exit"
    );
    assert_eq!(
        kubelet.registrations().len(),
        1,
        "a rejection is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_serving_and_removes_the_socket() {
    let mut node = Node::start(&["DENK01234567"], &[]).await;
    let status = node.plugin.terminate();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        node.plugin.logs()
    );
    assert!(!node.dir.path().join("nitrokey-hsm.sock").exists());
    assert!(
        node.dir.path().join("kubelet.sock").exists(),
        "the kubelet's socket is left alone"
    );
    node.kubelet
        .wait_for_list(|l| !l.connected, TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_also_shuts_down() {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut plugin = Plugin::start(&testbed, dir.path(), &[]);
    plugin.wait_http("/healthz", 200).await;
    plugin.signal(libc::SIGINT);
    let status = plugin.wait_exit(TIMEOUT).expect("exit after SIGINT");
    assert!(status.success());
    assert!(!dir.path().join("nitrokey-hsm.sock").exists());
}
