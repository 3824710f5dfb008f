//! Allocate and GetPreferredAllocation through the fake kubelet, against the real binary.

mod common;

use common::{Node, TIMEOUT};
use nitrokey_proto::v1beta1::{AllocateRequest, ContainerAllocateRequest};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_valid_unknown_and_unhealthy_ids() {
    let node = Node::start(&["DENK0000001", "DENK0000002"], &["--grace-period", "1m"]).await;

    // One unit.
    let response = node.kubelet.allocate(&["DENK0000001-0"]).await.unwrap();
    assert_eq!(response.devices.len(), 1);
    let device = &response.devices[0];
    assert_eq!(device.host_path, "/dev/bus/usb/001/002");
    assert_eq!(device.container_path, "/dev/bus/usb/001/002");
    assert_eq!(device.permissions, "rw");
    assert_eq!(response.envs["NITROKEY_HSM_SERIALS"], "DENK0000001");
    assert_eq!(
        response.envs["NITROKEY_HSM_DEVICES"],
        "/dev/bus/usb/001/002"
    );

    // Both units of one stick: one device node, one serial.
    let response = node
        .kubelet
        .allocate(&["DENK0000001-1", "DENK0000001-0"])
        .await
        .unwrap();
    assert_eq!(response.devices.len(), 1);
    assert_eq!(response.envs["NITROKEY_HSM_SERIALS"], "DENK0000001");

    // Units of two sticks.
    let response = node
        .kubelet
        .allocate(&["DENK0000001-1", "DENK0000002-0"])
        .await
        .unwrap();
    let mut hosts: Vec<&str> = response
        .devices
        .iter()
        .map(|d| d.host_path.as_str())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["/dev/bus/usb/001/002", "/dev/bus/usb/001/003"]);
    assert_eq!(
        response.envs["NITROKEY_HSM_SERIALS"],
        "DENK0000001,DENK0000002"
    );
    assert_eq!(
        response.envs["NITROKEY_HSM_DEVICES"],
        "/dev/bus/usb/001/002,/dev/bus/usb/001/003"
    );

    // Several containers in one request.
    let response = node
        .kubelet
        .allocate_request(AllocateRequest {
            container_requests: vec![
                ContainerAllocateRequest {
                    devices_ids: vec!["DENK0000001-0".into()],
                },
                ContainerAllocateRequest {
                    devices_ids: vec!["DENK0000002-1".into()],
                },
            ],
        })
        .await
        .unwrap();
    assert_eq!(response.container_responses.len(), 2);
    assert_eq!(
        response.container_responses[1].envs["NITROKEY_HSM_SERIALS"],
        "DENK0000002"
    );

    // Unknown IDs: a gRPC error, and the plugin keeps serving.
    for unknown in ["NOPE-0", "DENK0000001-2", "DENK0000001", ""] {
        let status = node.kubelet.allocate(&[unknown]).await.expect_err(unknown);
        assert_eq!(status.code(), Code::NotFound, "{unknown}: {status:?}");
        assert!(status.message().contains("unknown device"), "{status:?}");
    }
    let status = node.kubelet.allocate(&[]).await.expect_err("empty request");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Unhealthy: unplugged stick within its grace period.
    node.testbed.remove(&node.sticks[1]).unwrap();
    node.kubelet.wait_for_unhealthy(2, TIMEOUT).await.unwrap();
    let status = node
        .kubelet
        .allocate(&["DENK0000002-0"])
        .await
        .expect_err("unhealthy");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("unhealthy"), "{status:?}");
    let status = node
        .kubelet
        .allocate(&["DENK0000001-0", "DENK0000002-1"])
        .await
        .expect_err("mixed");
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Still alive and serving.
    node.kubelet.allocate(&["DENK0000001-0"]).await.unwrap();
    assert_eq!(node.plugin.http_get("/healthz").await.0, 200);
    assert_eq!(
        node.plugin
            .metric("nitrokey_device_plugin_allocations_total{result=\"ok\"}")
            .await,
        Some(6.0)
    );
    assert_eq!(
        node.plugin
            .metric("nitrokey_device_plugin_allocations_total{result=\"unknown\"}")
            .await,
        Some(4.0)
    );
    assert_eq!(
        node.plugin
            .metric("nitrokey_device_plugin_allocations_total{result=\"unhealthy\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_packs_units_onto_few_sticks() {
    let node = Node::start(&["A", "B"], &[]).await;

    // Two units: both of one stick.
    let got = node
        .kubelet
        .preferred_allocation(&["A-0", "B-0", "A-1", "B-1"], &[], 2)
        .await
        .unwrap();
    assert_eq!(got, ["A-0", "A-1"]);
    // One unit when A is half used: take B's... no: A's last unit keeps B whole.
    let got = node
        .kubelet
        .preferred_allocation(&["A-1", "B-0", "B-1"], &[], 1)
        .await
        .unwrap();
    assert_eq!(got, ["A-1"]);
    // must_include is honoured and its stick filled first.
    let got = node
        .kubelet
        .preferred_allocation(&["A-0", "A-1", "B-0", "B-1"], &["B-1"], 2)
        .await
        .unwrap();
    assert_eq!(got, ["B-1", "B-0"]);
    // Exactly allocation_size.
    let got = node
        .kubelet
        .preferred_allocation(&["A-0", "A-1", "B-0", "B-1"], &[], 3)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    // Impossible requests are errors, not panics.
    let status = node
        .kubelet
        .preferred_allocation(&["A-0"], &[], 2)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = node
        .kubelet
        .preferred_allocation(&["A-0"], &[], -1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}
