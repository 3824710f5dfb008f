//! Replug recovery through the real binary: a stick held by running pods is unplugged and
//! plugged back in at another address; the plugin asks a pod-resources stand-in who holds it
//! and, through the real `kube` client talking to an API stand-in, creates Events on those
//! pods (`onReplug: event`) or evicts them (`onReplug: evict`), or does nothing (`none`).

mod common;

use std::time::Duration;

use common::{Plugin, TIMEOUT};
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::pod_resources::FakePodResources;
use nitrokey_e2e::usb::{Testbed, UsbDeviceSpec};

const RESOURCE: &str = "nitrokey.com/hsm";

/// Fields drop in this order: the plugin stops before the peers it talks to, and the directory
/// holding their sockets goes last, when nothing can create anything in it any more.
struct Scene {
    plugin: Plugin,
    kubelet: FakeKubelet,
    pods: FakePodResources,
    api: KubeApi,
    testbed: Testbed,
    _dir: tempfile::TempDir,
}

/// One stick held by `vault/vault-0` (unit 0) and `vault/configurer` (unit 1), another stick's
/// unit held by `other/app`; the plugin runs with `--on-replug mode`.
async fn scene(mode: &str) -> Scene {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("DENK01234567", 1, 2).unwrap();
    testbed
        .add(&UsbDeviceSpec::nitrokey_hsm("DENK07654321").at(1, 3).port(2))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plugin_dir = dir.path().join("device-plugins");
    let kubelet = FakeKubelet::start(&plugin_dir).await.unwrap();
    let pods = FakePodResources::start(dir.path().join("pod-resources.sock")).unwrap();
    pods.set_pods(vec![
        FakePodResources::pod("vault", "vault-0", RESOURCE, &["DENK01234567-0"]),
        FakePodResources::pod("vault", "configurer", RESOURCE, &["DENK01234567-1"]),
        FakePodResources::pod("other", "app", RESOURCE, &["DENK07654321-0"]),
        FakePodResources::pod("gpu", "train", "example.com/gpu", &["DENK01234567-0"]),
    ]);
    let api = KubeApi::start().unwrap();
    let kubeconfig = api.kubeconfig(dir.path()).unwrap();
    let plugin = Plugin::start_with_env(
        &testbed,
        &plugin_dir,
        &[
            "--grace-period",
            "1m",
            "--on-replug",
            mode,
            "--pod-resources-socket",
            pods.path().to_str().unwrap(),
        ],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "node-1"),
        ],
    );
    kubelet
        .wait_for_devices(|d| d.len() == 4, TIMEOUT)
        .await
        .unwrap();
    Scene {
        plugin,
        kubelet,
        pods,
        api,
        testbed,
        _dir: dir,
    }
}

/// Unplugs DENK01234567 from 001/002 and plugs it back in at 001/007.
async fn replug(s: &Scene) {
    let stick = UsbDeviceSpec::nitrokey_hsm("DENK01234567").at(1, 2);
    s.testbed
        .remove(&nitrokey_e2e::usb::UsbDevice { spec: stick })
        .unwrap();
    s.kubelet.wait_for_unhealthy(2, TIMEOUT).await.unwrap();
    s.testbed
        .add(&UsbDeviceSpec::nitrokey_hsm("DENK01234567").at(1, 7).port(1))
        .unwrap();
    s.kubelet
        .wait_for_devices(|d| d.iter().all(|d| d.health == "Healthy"), TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_on_each_pod_holding_the_replugged_stick() {
    let s = scene("event").await;
    replug(&s).await;
    let events = s
        .api
        .wait_for(TIMEOUT, |_| {
            let events = s.api.events();
            (events.len() >= 2).then_some(events)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", s.plugin.logs()));
    let mut pods: Vec<&str> = events
        .iter()
        .map(|e| e["involvedObject"]["name"].as_str().unwrap_or_default())
        .collect();
    pods.sort_unstable();
    assert_eq!(pods, ["configurer", "vault-0"], "only the stick's holders");
    for event in &events {
        assert_eq!(event["involvedObject"]["namespace"], "vault");
        assert_eq!(event["involvedObject"]["kind"], "Pod");
        assert_eq!(event["reason"], "NitrokeyHsmReplugged");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["source"]["host"], "node-1");
        assert_eq!(
            event["message"],
            "stick DENK01234567 re-plugged at /dev/bus/usb/001/007; the pod still sees \
             /dev/bus/usb/001/002; restart it"
        );
    }
    assert!(s.api.evictions().is_empty(), "event mode never evicts");
    assert_eq!(
        s.plugin
            .metric("nitrokey_device_plugin_replugs_total")
            .await,
        Some(1.0)
    );
    assert_eq!(
        s.plugin
            .metric("nitrokey_device_plugin_replug_actions_total{action=\"event\",result=\"ok\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_mode_evicts_one_pod_of_the_stick_and_respects_a_budget() {
    let s = scene("evict").await;
    // A PodDisruptionBudget keeps configurer for now.
    s.api.block_eviction("vault", "configurer", true);
    s.api.block_eviction("vault", "vault-0", true);
    replug(&s).await;
    // The first attempt is refused (429) ...
    s.api
        .wait_for(TIMEOUT, |requests| {
            requests
                .iter()
                .find(|r| r.path.ends_with("/eviction") && r.status == 429)
                .cloned()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", s.plugin.logs()));
    s.api.block_eviction("vault", "vault-0", false);
    s.api.block_eviction("vault", "configurer", false);
    // ... and retried (by the client's own retry of 429, or the plugin's next round) until
    // accepted.
    let evicted = s
        .api
        .wait_for(Duration::from_secs(30), |_| {
            s.api.evictions().first().cloned()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", s.plugin.logs()));
    assert!(evicted.starts_with("vault/"), "{evicted}");
    // Never two pods of one stick at once: the other one waits while the first is listed.
    assert_eq!(s.api.evictions().len(), 1);
    let evicted_event = s
        .api
        .wait_for(TIMEOUT, |_| {
            s.api.events().into_iter().find(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("evicted by nitrokey-device-plugin"))
            })
        })
        .unwrap();
    assert_eq!(
        format!(
            "vault/{}",
            evicted_event["involvedObject"]["name"].as_str().unwrap()
        ),
        evicted
    );
    // The refused attempt came first, for the same pod (retried, not skipped).
    let attempts: Vec<(String, u16)> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/eviction"))
        .map(|r| (r.path, r.status))
        .collect();
    assert_eq!(attempts.first().map(|a| a.1), Some(429), "{attempts:?}");
    assert_eq!(attempts.last().map(|a| a.1), Some(201), "{attempts:?}");
    assert_eq!(
        attempts.first().map(|a| &a.0),
        attempts.last().map(|a| &a.0)
    );
    let _ = &s.pods;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_mode_only_counts() {
    let s = scene("none").await;
    replug(&s).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while s
        .plugin
        .metric("nitrokey_device_plugin_replugs_total")
        .await
        != Some(1.0)
    {
        assert!(std::time::Instant::now() < deadline, "{}", s.plugin.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.api.requests().is_empty(), "{:?}", s.api.requests());
}
