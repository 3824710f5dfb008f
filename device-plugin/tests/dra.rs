//! The DRA mode against its peers: umockdev for USB hotplug, the API stand-in for
//! ResourceSlices and ResourceClaims, and the kubelet stand-in for registration and the node
//! service. A stick plugged in appears in the node's slice with its attributes and leaves it
//! when unplugged; a claim allocated to it is prepared into a CDI spec naming its device node
//! and environment, idempotently, and unprepared even by a restarted driver.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Plugin, TIMEOUT};
use nitrokey_e2e::kube_api::{KubeApi, node_uid};
use nitrokey_e2e::kube_api_dra::allocated_claim;
use nitrokey_e2e::kubelet_dra::{DraEvent, FakeDraKubelet, NodeService};
use nitrokey_e2e::usb::Testbed;
use serde_json::Value;

const DRIVER: &str = "hsm.nitrokey.com";
const NODE: &str = "node-a";
const SLICE: &str = "node-a-hsm.nitrokey.com";

fn start_driver(testbed: &Testbed, dir: &Path, api: &KubeApi) -> Plugin {
    start_driver_with(testbed, dir, api, &[])
}

fn start_driver_with(testbed: &Testbed, dir: &Path, api: &KubeApi, extra: &[&str]) -> Plugin {
    let kubeconfig = api.kubeconfig(dir).unwrap();
    let kubelet_dir = dir.join("kubelet");
    let cdi_dir = dir.join("cdi");
    let mut args = vec![
        "--mode",
        "dra",
        "--kubelet-dir",
        kubelet_dir.to_str().unwrap(),
        "--cdi-spec-dir",
        cdi_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Plugin::start_with_env(
        testbed,
        &dir.join("device-plugins"),
        &args,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
    )
}

/// The node's slice once `ok` holds for it.
async fn wait_for_slice(api: &KubeApi, plugin: &Plugin, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(slice) = api.dra().slice(SLICE)
            && ok(&slice)
        {
            return slice;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slice not as expected: {:?}\n{}",
            api.dra().slice(SLICE),
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn device_names(slice: &Value) -> Vec<String> {
    slice["spec"]["devices"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| d["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn claim_reads(api: &KubeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/resourceclaims/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_follows_hotplug_and_claims_are_prepared_through_cdi() {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().unwrap();
    let kubelet = FakeDraKubelet::start(&dir.path().join("kubelet")).unwrap();
    let mut plugin = start_driver(&testbed, dir.path(), &api);

    let registered = kubelet.wait_for_driver(DRIVER, 0, TIMEOUT).await.unwrap();
    assert_eq!(registered.service, NodeService::V1);
    assert_eq!(
        Path::new(&registered.info.endpoint),
        dir.path().join("kubelet/plugins/hsm.nitrokey.com/dra.sock")
    );
    assert_eq!(
        registered.socket,
        dir.path()
            .join("kubelet/plugins_registry/hsm.nitrokey.com-reg.sock")
    );
    // Ready once the kubelet said it registered the driver.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while plugin.metric("nitrokey_device_plugin_registered").await != Some(1.0) {
        assert!(tokio::time::Instant::now() < deadline, "{}", plugin.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let empty = wait_for_slice(&api, &plugin, |_| true).await;
    assert_eq!(empty["spec"]["driver"], DRIVER);
    assert_eq!(empty["spec"]["nodeName"], NODE);
    assert_eq!(empty["spec"]["pool"]["name"], NODE);
    // Owned by its Node, so that it goes with the Node.
    assert_eq!(
        empty["metadata"]["ownerReferences"],
        serde_json::json!([{"apiVersion": "v1", "kind": "Node", "name": NODE,
            "uid": node_uid(NODE), "controller": true}])
    );
    assert!(device_names(&empty).is_empty(), "no stick yet: {empty}");
    let first_generation = empty["spec"]["pool"]["generation"].as_i64().unwrap();

    // Plugged in: the device appears with its attributes, in a newer generation.
    let stick = testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    let slice = wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;
    assert_eq!(device_names(&slice), ["denk0000001"]);
    assert!(slice["spec"]["pool"]["generation"].as_i64().unwrap() > first_generation);
    assert_eq!(
        slice["spec"]["devices"][0]["attributes"],
        serde_json::json!({
            "serial": {"string": "DENK0000001"},
            "vendorId": {"string": "20a0"},
            "productId": {"string": "4230"},
            "firmware": {"version": "1.1.0"},
            "usbPath": {"string": "1-1"},
            "model": {"string": "Nitrokey HSM"},
        })
    );
    let applies: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(SLICE))
        .collect();
    assert!(
        applies.iter().all(|r| r
            .user_agent
            .as_deref()
            .is_some_and(|a| a.starts_with("nitrokey-device-plugin/"))),
        "{applies:?}"
    );

    // A claim allocated to it is prepared into a CDI spec.
    api.dra().put_claim(allocated_claim(
        "vault",
        "vault-0-hsm",
        "uid-1",
        &[("hsm", DRIVER, NODE, "denk0000001")],
        "vault-0",
    ));
    let claim = [("vault", "uid-1", "vault-0-hsm")];
    let prepared = kubelet.prepare(DRIVER, &claim).await.unwrap();
    let devices = prepared["uid-1"].clone().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].pool_name, NODE);
    assert_eq!(devices[0].device_name, "denk0000001");
    assert_eq!(devices[0].request_names, ["hsm"]);
    assert_eq!(
        devices[0].cdi_device_ids,
        ["hsm.nitrokey.com/hsm=uid-1-denk0000001"]
    );
    let spec_path = dir.path().join("cdi/hsm.nitrokey.com-claim-uid-1.json");
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    assert_eq!(spec["kind"], "hsm.nitrokey.com/hsm");
    assert_eq!(spec["devices"][0]["name"], "uid-1-denk0000001");
    assert_eq!(
        spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"],
        "/dev/bus/usb/001/002"
    );
    assert_eq!(
        spec["containerEdits"]["env"],
        serde_json::json!([
            "NITROKEY_HSM_SERIALS=DENK0000001",
            "NITROKEY_HSM_DEVICES=/dev/bus/usb/001/002"
        ])
    );

    // Asked again: the same answer, from the checkpoint (no second API read).
    assert_eq!(claim_reads(&api), 1);
    let again = kubelet.prepare(DRIVER, &claim).await.unwrap();
    assert_eq!(again["uid-1"].as_ref().unwrap(), &devices);
    assert_eq!(claim_reads(&api), 1);

    // Replugged at another address (and port): the slice follows, and so does the claim's
    // spec, for containers started from now on.
    testbed.remove(&stick).unwrap();
    wait_for_slice(&api, &plugin, |s| device_names(s).is_empty()).await;
    let stick = testbed.add_nitrokey_hsm("DENK0000001", 1, 5).unwrap();
    let slice = wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;
    assert_eq!(
        slice["spec"]["devices"][0]["attributes"]["usbPath"]["string"],
        "1-4"
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let spec: Value =
            serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
        if spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] == "/dev/bus/usb/001/005"
        {
            assert_eq!(
                spec["containerEdits"]["env"][1],
                "NITROKEY_HSM_DEVICES=/dev/bus/usb/001/005"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spec not moved: {spec}\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = kubelet.prepare(DRIVER, &claim).await.unwrap();
    assert_eq!(
        again["uid-1"].as_ref().unwrap(),
        &devices,
        "same CDI device IDs"
    );
    // onReplug: event (the default): the pod the claim is reserved for is told.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let event = loop {
        if let Some(e) = api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "NitrokeyHsmReplugged")
        {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Event:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event["involvedObject"]["name"], "vault-0");
    assert_eq!(event["involvedObject"]["uid"], "vault-0-uid");
    assert_eq!(event["type"], "Warning");
    assert!(
        event["message"].as_str().is_some_and(
            |m| m.contains("/dev/bus/usb/001/005") && m.contains("/dev/bus/usb/001/002")
        ),
        "{event}"
    );

    // A restarted driver unprepares what the earlier run prepared.
    let seen = kubelet.events().len();
    assert!(plugin.terminate().success(), "{}", plugin.logs());
    let plugin = start_driver(&testbed, dir.path(), &api);
    kubelet
        .wait_for_driver(DRIVER, seen, TIMEOUT)
        .await
        .unwrap();
    assert!(
        kubelet.events()[seen..]
            .iter()
            .any(|e| matches!(e, DraEvent::Unregistered(_))),
        "the stopped driver's socket went away: {:?}",
        kubelet.events()
    );
    assert!(spec_path.exists(), "the spec outlives the restart");
    let unprepared = kubelet.unprepare(DRIVER, &claim).await.unwrap();
    assert_eq!(unprepared["uid-1"], Ok(()));
    assert!(!spec_path.exists(), "spec removed:\n{}", plugin.logs());
    let checkpoint: Value = serde_json::from_str(
        &std::fs::read_to_string(
            dir.path()
                .join("kubelet/plugins/hsm.nitrokey.com/checkpoint.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(checkpoint["claims"], serde_json::json!({}));
    // Unpreparing again (the kubelet repeats what it is unsure of) succeeds.
    assert_eq!(
        kubelet.unprepare(DRIVER, &claim).await.unwrap()["uid-1"],
        Ok(())
    );

    // Unplugged: the device leaves the slice.
    let before = wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;
    testbed.remove(&stick).unwrap();
    let after = wait_for_slice(&api, &plugin, |s| device_names(s).is_empty()).await;
    assert!(
        after["spec"]["pool"]["generation"].as_i64()
            > before["spec"]["pool"]["generation"].as_i64()
    );
    // The Node deleted: the garbage collector takes the slice with it.
    assert_eq!(api.dra().delete_owned_by(&node_uid(NODE)), 1);
    assert!(api.dra().slice(SLICE).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_the_driver_cannot_serve_are_refused_with_the_reason() {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().unwrap();
    let kubelet = FakeDraKubelet::start(&dir.path().join("kubelet")).unwrap();
    let plugin = start_driver(&testbed, dir.path(), &api);
    kubelet.wait_for_driver(DRIVER, 0, TIMEOUT).await.unwrap();
    testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;

    api.dra().put_claim(allocated_claim(
        "ns",
        "gone",
        "uid-2",
        &[("hsm", DRIVER, NODE, "denk0000009")],
        "p",
    ));
    api.dra().put_claim(allocated_claim(
        "ns",
        "elsewhere",
        "uid-3",
        &[("hsm", DRIVER, "node-b", "denk0000001")],
        "p",
    ));
    api.dra().put_claim(allocated_claim(
        "ns",
        "recreated",
        "uid-new",
        &[("hsm", DRIVER, NODE, "denk0000001")],
        "p",
    ));
    let answers = kubelet
        .prepare(
            DRIVER,
            &[
                ("ns", "uid-2", "gone"),
                ("ns", "uid-3", "elsewhere"),
                ("ns", "uid-old", "recreated"),
                ("ns", "uid-4", "missing"),
                ("ns", "../../escape", "gone"),
                ("ns", "uid-6", "../../../api/v1/namespaces/ns/secrets/x"),
            ],
        )
        .await
        .unwrap();
    let error = |uid: &str| answers[uid].clone().unwrap_err();
    assert!(
        error("uid-2").contains("denk0000009") && error("uid-2").contains("not plugged in"),
        "{answers:?}"
    );
    assert!(error("uid-3").contains("node-b"), "{answers:?}");
    assert!(error("uid-old").contains("recreated"), "{answers:?}");
    assert!(error("uid-4").contains("not found"), "{answers:?}");
    assert!(
        error("../../escape").contains("not a Kubernetes UID"),
        "{answers:?}"
    );
    assert!(
        error("uid-6").contains("not a Kubernetes object name"),
        "{answers:?}"
    );
    let specs = std::fs::read_dir(dir.path().join("cdi")).unwrap().count();
    assert_eq!(specs, 0, "no spec for a refused claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_or_older_kubelet_registers_the_driver_again() {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().unwrap();
    // A 1.33 kubelet knows only the v1beta1 node service; it wipes the node's slices when it
    // restarts.
    let kubelet =
        FakeDraKubelet::start_knowing(&dir.path().join("kubelet"), &[NodeService::V1beta1])
            .unwrap()
            .wiping(api.dra(), NODE);
    let plugin = start_driver(&testbed, dir.path(), &api);
    let registered = kubelet.wait_for_driver(DRIVER, 0, TIMEOUT).await.unwrap();
    assert_eq!(registered.service, NodeService::V1beta1);
    testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;
    api.dra().put_claim(allocated_claim(
        "ns",
        "c",
        "uid-5",
        &[("hsm", DRIVER, NODE, "denk0000001")],
        "p",
    ));
    let answers = kubelet
        .prepare(DRIVER, &[("ns", "uid-5", "c")])
        .await
        .unwrap();
    assert_eq!(
        answers["uid-5"].as_ref().unwrap()[0].cdi_device_ids,
        ["hsm.nitrokey.com/hsm=uid-5-denk0000001"]
    );

    // The kubelet restarts: it wipes the node's slices, finds the socket still there and
    // registers the driver again, which publishes its slice again.
    let seen = kubelet.events().len();
    kubelet.restart();
    kubelet
        .wait_for_driver(DRIVER, seen, TIMEOUT)
        .await
        .unwrap();
    let slice = wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;
    assert_eq!(device_names(&slice), ["denk0000001"]);
    assert!(
        plugin.logs().contains("publishing it again"),
        "{}",
        plugin.logs()
    );
    let answers = kubelet
        .unprepare(DRIVER, &[("ns", "uid-5", "c")])
        .await
        .unwrap();
    assert_eq!(answers["uid-5"], Ok(()));

    // Someone empties the registry: the driver serves its socket again, and is registered
    // again (from its log line to the kubelet's new registration, judged by events).
    let seen = kubelet.events().len();
    kubelet.remove_socket("hsm.nitrokey.com-reg.sock").unwrap();
    kubelet
        .wait_for_driver(DRIVER, seen, TIMEOUT)
        .await
        .unwrap();
    assert!(
        kubelet.events()[seen..]
            .iter()
            .any(|e| matches!(e, DraEvent::Unregistered(_))),
        "{:?}",
        kubelet.events()
    );
    assert!(
        plugin.logs().contains("serving it again"),
        "{}",
        plugin.logs()
    );
    assert!(
        plugin.logs().contains("registered with the kubelet"),
        "{}",
        plugin.logs()
    );
}

/// `onReplug: evict`: a stick replugged under a prepared claim gets the pod the claim is
/// reserved for evicted (found through the claim's `status.reservedFor`, not the kubelet's
/// pod-resources API); a PodDisruptionBudget's refusal is logged and tried again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_mode_evicts_the_pod_the_replugged_sticks_claim_is_reserved_for() {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().unwrap();
    let kubelet = FakeDraKubelet::start(&dir.path().join("kubelet")).unwrap();
    let plugin = start_driver_with(&testbed, dir.path(), &api, &["--on-replug", "evict"]);
    kubelet.wait_for_driver(DRIVER, 0, TIMEOUT).await.unwrap();
    let stick = testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;
    api.dra().put_claim(allocated_claim(
        "vault",
        "vault-0-hsm",
        "uid-7",
        &[("hsm", DRIVER, NODE, "denk0000001")],
        "vault-0",
    ));
    let claim = [("vault", "uid-7", "vault-0-hsm")];
    assert!(kubelet.prepare(DRIVER, &claim).await.unwrap()["uid-7"].is_ok());

    // A PodDisruptionBudget does not allow the eviction yet.
    api.block_eviction("vault", "vault-0", true);
    testbed.remove(&stick).unwrap();
    wait_for_slice(&api, &plugin, |s| device_names(s).is_empty()).await;
    testbed.add_nitrokey_hsm("DENK0000001", 1, 5).unwrap();
    api.wait_for(TIMEOUT, |requests| {
        requests
            .iter()
            .find(|r| r.path.ends_with("/vault-0/eviction") && r.status == 429)
            .cloned()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", plugin.logs()));
    api.block_eviction("vault", "vault-0", false);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !plugin.logs().lines().any(|l| {
        l.contains("WARN") && l.contains("eviction refused by a PodDisruptionBudget; trying again")
    }) {
        assert!(tokio::time::Instant::now() < deadline, "{}", plugin.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Tried again by the driver's backoff, and accepted.
    let evicted = api
        .wait_for(Duration::from_secs(30), |_| {
            api.evictions().first().cloned()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", plugin.logs()));
    assert_eq!(evicted, "vault/vault-0");
    let event = api
        .wait_for(TIMEOUT, |_| {
            api.events().into_iter().find(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("evicted by nitrokey-device-plugin"))
            })
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", plugin.logs()));
    // Named by the uid in the claim's reservation, so `kubectl describe pod` lists it.
    assert_eq!(event["involvedObject"]["name"], "vault-0");
    assert_eq!(event["involvedObject"]["uid"], "vault-0-uid");
    assert!(
        event["message"].as_str().is_some_and(
            |m| m.contains("/dev/bus/usb/001/005") && m.contains("/dev/bus/usb/001/002")
        ),
        "{event}"
    );
    assert_eq!(api.evictions().len(), 1);
    let attempts: Vec<u16> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/eviction"))
        .map(|r| r.status)
        .collect();
    assert_eq!(attempts.first(), Some(&429), "{attempts:?}");
    assert_eq!(attempts.last(), Some(&201), "{attempts:?}");
    assert!(
        plugin
            .metric("nitrokey_device_plugin_replug_actions_total{action=\"evict\",result=\"ok\"}")
            .await
            == Some(1.0),
        "{}",
        plugin.logs()
    );
    // The holders came from the claim, not from the pod-resources API or pod lookups.
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method == "GET" && r.path.contains("/pods/")),
        "{:?}",
        api.requests()
    );
    let reserved = &api.dra().claim("vault", "vault-0-hsm").unwrap()["status"]["reservedFor"];
    assert_eq!(reserved, &serde_json::json!([]), "the pod is gone");
}

/// A stick replugged while the driver was down: at its next start the driver finds the
/// prepared claim's stick at another device node, rewrites the spec and tells the pod the
/// claim is reserved for (`onReplug: event`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stick_replugged_while_the_driver_was_down_is_acted_on_at_start() {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().unwrap();
    let kubelet = FakeDraKubelet::start(&dir.path().join("kubelet")).unwrap();
    let mut plugin = start_driver(&testbed, dir.path(), &api);
    kubelet.wait_for_driver(DRIVER, 0, TIMEOUT).await.unwrap();
    let stick = testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    wait_for_slice(&api, &plugin, |s| !device_names(s).is_empty()).await;
    api.dra().put_claim(allocated_claim(
        "vault",
        "vault-0-hsm",
        "uid-8",
        &[("hsm", DRIVER, NODE, "denk0000001")],
        "vault-0",
    ));
    let claim = [("vault", "uid-8", "vault-0-hsm")];
    assert!(kubelet.prepare(DRIVER, &claim).await.unwrap()["uid-8"].is_ok());
    assert!(plugin.terminate().success(), "{}", plugin.logs());

    testbed.remove(&stick).unwrap();
    testbed.add_nitrokey_hsm("DENK0000001", 1, 6).unwrap();
    assert!(api.events().is_empty());
    let plugin = start_driver(&testbed, dir.path(), &api);
    let event = api
        .wait_for(TIMEOUT, |_| {
            api.events()
                .into_iter()
                .find(|e| e["reason"] == "NitrokeyHsmReplugged")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", plugin.logs()));
    assert_eq!(event["involvedObject"]["name"], "vault-0");
    assert_eq!(event["involvedObject"]["uid"], "vault-0-uid");
    assert!(
        event["message"].as_str().is_some_and(
            |m| m.contains("/dev/bus/usb/001/006") && m.contains("/dev/bus/usb/001/002")
        ),
        "{event}"
    );
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("cdi/hsm.nitrokey.com-claim-uid-8.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"],
        "/dev/bus/usb/001/006"
    );
}
