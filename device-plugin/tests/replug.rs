//! Replug recovery through the real binary: a stick held by running pods is unplugged and
//! plugged back in at another address; the plugin asks a pod-resources stand-in who holds it
//! and, through the real `kube` client talking to an API stand-in, creates Events on those
//! pods (`onReplug: event`) or evicts them (`onReplug: evict`), or does nothing (`none`).

mod common;

use std::time::Duration;

use common::{Plugin, TIMEOUT};
use nitrokey_e2e::kube_api::{KubeApi, pod_uid};
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
    scene_with(mode, &[]).await
}

/// [`scene`] with the plugin's extra flags `args`.
async fn scene_with(mode: &str, args: &[&str]) -> Scene {
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
        ]
        .iter()
        .chain(args)
        .copied()
        .collect::<Vec<&str>>(),
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
    replug_at(s, UsbDeviceSpec::nitrokey_hsm("DENK01234567").at(1, 2), 7).await;
}

/// Unplugs the stick `spec` describes and plugs it back in, same port, at device number `to`.
async fn replug_at(s: &Scene, spec: UsbDeviceSpec, to: u8) {
    let again = UsbDeviceSpec {
        devnum: to,
        ..spec.clone()
    };
    s.testbed
        .remove(&nitrokey_e2e::usb::UsbDevice { spec })
        .unwrap();
    s.kubelet.wait_for_unhealthy(2, TIMEOUT).await.unwrap();
    s.testbed.add(&again).unwrap();
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
        // Named by uid as well, or `kubectl describe pod` would not list it.
        let name = event["involvedObject"]["name"].as_str().unwrap_or_default();
        assert_eq!(event["involvedObject"]["uid"], pod_uid("vault", name));
        assert_eq!(event["reportingComponent"], "nitrokey-device-plugin");
        assert_eq!(event["reportingInstance"], "node-1");
        assert_eq!(
            event["message"],
            "stick DENK01234567 re-plugged at /dev/bus/usb/001/007; the pod still sees \
             /dev/bus/usb/001/002; restart it"
        );
    }
    assert!(s.api.evictions().is_empty(), "event mode never evicts");
    let agents: Vec<Option<String>> = s.api.requests().into_iter().map(|r| r.user_agent).collect();
    assert!(
        agents.iter().all(|a| a
            .as_deref()
            .is_some_and(|a| a.starts_with("nitrokey-device-plugin/"))),
        "every API request names the program: {agents:?}"
    );
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
    // ... said and counted ...
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !s
        .plugin
        .logs()
        .contains("eviction refused by a PodDisruptionBudget; trying again later")
    {
        assert!(std::time::Instant::now() < deadline, "{}", s.plugin.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.plugin
            .metric(
                "nitrokey_device_plugin_replug_actions_total{action=\"evict\",result=\"refused\"}"
            )
            .await
            .is_some_and(|n| n >= 1.0)
    );
    // ... and retried by the plugin's own backoff until accepted.
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

/// A budget that never allows a pod's eviction holds up neither the recovery of another
/// stick's pods nor anything for ever: each refusal is said and counted, and after
/// `--eviction-retry-for` the plugin gives up on the pod and says so in an Event on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refusing_for_good_holds_up_no_other_pod_and_ends_in_an_event() {
    let s = scene_with("evict", &["--eviction-retry-for", "1s"]).await;
    s.api.block_eviction("vault", "vault-0", true);
    replug(&s).await;
    s.api
        .wait_for(TIMEOUT, |requests| {
            requests
                .iter()
                .find(|r| r.path.ends_with("vault-0/eviction") && r.status == 429)
                .cloned()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", s.plugin.logs()));
    // The other stick comes back at another address too: its pod is evicted although
    // vault-0's budget never gives way.
    replug_at(
        &s,
        UsbDeviceSpec::nitrokey_hsm("DENK07654321").at(1, 3).port(2),
        8,
    )
    .await;
    s.api
        .wait_for(TIMEOUT, |_| {
            s.api
                .evictions()
                .contains(&"other/app".to_owned())
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", s.plugin.logs()));
    let gave_up = s
        .api
        .wait_for(TIMEOUT, |_| {
            s.api
                .events()
                .into_iter()
                .find(|e| e["message"].as_str().is_some_and(|m| m.contains("gave up")))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", s.plugin.logs()));
    assert_eq!(gave_up["involvedObject"]["name"], "vault-0");
    assert_eq!(
        gave_up["involvedObject"]["uid"],
        pod_uid("vault", "vault-0")
    );
    let message = gave_up["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("eviction refused by a PodDisruptionBudget 2 times"),
        "{message}"
    );
    assert!(!s.api.evictions().contains(&"vault/vault-0".to_owned()));
    let metric = |result: &str| {
        format!(
            "nitrokey_device_plugin_replug_actions_total{{action=\"evict\",result=\"{result}\"}}"
        )
    };
    assert_eq!(s.plugin.metric(&metric("refused")).await, Some(2.0));
    assert_eq!(s.plugin.metric(&metric("gave_up")).await, Some(1.0));
    let logs = s.plugin.logs();
    let warned = |text: &str| {
        logs.lines()
            .filter(|l| l.contains("WARN") && l.contains(text))
            .count()
    };
    assert_eq!(
        warned("refused by a PodDisruptionBudget; trying again later"),
        1,
        "{logs}"
    );
    assert_eq!(warned("for too long; giving up on this pod"), 1, "{logs}");
}
