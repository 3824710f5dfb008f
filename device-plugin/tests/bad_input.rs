//! Hostile or broken clients on the plugin's socket: garbage bytes, HTTP/1.1, a path as
//! HTTP/2 `:authority` (what kubelets before 1.26 send), unknown methods, huge and numerous
//! IDs, and hundreds of `ListAndWatch` streams opened and dropped. Each must get an error (or
//! a closed connection), leave the plugin serving the kubelet, and leave memory bounded.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Node, Plugin, TIMEOUT};
use nitrokey_e2e::kubelet::{FakeKubelet, connect_unix};
use nitrokey_proto::v1beta1::device_plugin_client::DevicePluginClient;
use nitrokey_proto::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Empty,
    PreferredAllocationRequest,
};
use tonic::Code;

const SOCKET: &str = "nitrokey-hsm.sock";

/// The plugin still answers the kubelet.
async fn still_serving(kubelet: &FakeKubelet, plugin: &Plugin) {
    let response = kubelet
        .allocate(&["DENK01234567-0"])
        .await
        .unwrap_or_else(|e| panic!("Allocate after bad input: {e}\n{}", plugin.logs()));
    assert_eq!(response.devices[0].host_path, "/dev/bus/usb/001/002");
    assert_eq!(plugin.http_get("/healthz").await.0, 200);
}

/// Writes `bytes` to the socket and reads until the server closes the connection.
fn send_raw(path: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(path).expect("connect to the plugin socket");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    stream.write_all(bytes).expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

/// An HTTP/2 frame: length, type, flags, stream ID, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK "literal header field without indexing, new name", no Huffman coding.
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x00);
    for s in [name, value] {
        block.push(u8::try_from(s.len()).expect("short header"));
        block.extend_from_slice(s.as_bytes());
    }
}

/// Sends one gRPC request (`GetDevicePluginOptions`, empty message) with this `:authority`
/// and returns the error code of the RST_STREAM the server answers with, or `None` when it
/// answers with HEADERS.
fn request_with_authority(path: &std::path::Path, authority: &str) -> Option<u32> {
    let mut stream = UnixStream::connect(path).expect("connect to the plugin socket");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let mut block = Vec::new();
    literal(&mut block, ":method", "POST");
    literal(&mut block, ":scheme", "http");
    literal(
        &mut block,
        ":path",
        "/v1beta1.DevicePlugin/GetDevicePluginOptions",
    );
    literal(&mut block, ":authority", authority);
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // DATA: an empty message, END_STREAM
    stream.write_all(&out).expect("write");
    let mut buffer = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => panic!("connection closed without an answer"),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        // Walk the frames received so far.
        let mut at = 0;
        while buffer.len() >= at + 9 {
            let len = usize::from(buffer[at]) << 16
                | usize::from(buffer[at + 1]) << 8
                | usize::from(buffer[at + 2]);
            if buffer.len() < at + 9 + len {
                break;
            }
            let kind = buffer[at + 3];
            let id = u32::from_be_bytes(buffer[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
            if kind == 0x3 && id == 1 && len == 4 {
                return Some(u32::from_be_bytes(
                    buffer[at + 9..at + 13].try_into().unwrap(),
                ));
            }
            if kind == 0x1 && id == 1 {
                return None; // answered with HEADERS: accepted
            }
            at += 9 + len;
        }
    }
    panic!("no answer to a request with :authority {authority:?}");
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_http1_get_the_connection_closed() {
    let node = Node::start(&["DENK01234567"], &[]).await;
    let socket = node.dir.path().join(SOCKET);
    let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    let answer = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || send_raw(&socket, &garbage)
    })
    .await
    .unwrap();
    assert!(
        answer.len() < 1024,
        "garbage got {} bytes back",
        answer.len()
    );
    let answer = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || send_raw(&socket, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "HTTP/1.1 is not served"
    );
    still_serving(&node.kubelet, &node.plugin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_as_authority_is_refused_and_explained() {
    let node = Node::start(&["DENK01234567"], &[]).await;
    let socket = node.dir.path().join(SOCKET);
    let path_authority = socket.to_string_lossy().into_owned();
    let (refused, accepted) = tokio::task::spawn_blocking(move || {
        (
            request_with_authority(&socket, &path_authority),
            request_with_authority(&socket, "localhost"),
        )
    })
    .await
    .unwrap();
    assert_eq!(refused, Some(1), "RST_STREAM PROTOCOL_ERROR for a path");
    assert_eq!(
        accepted, None,
        "localhost, as kubelets since 1.26 send, is served"
    );
    let deadline = Instant::now() + TIMEOUT;
    while !node
        .plugin
        .logs()
        .contains("the kubelet must be 1.26 or newer")
    {
        assert!(
            Instant::now() < deadline,
            "not explained:\n{}",
            node.plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_serving(&node.kubelet, &node.plugin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_and_huge_ids_get_short_grpc_errors() {
    let node = Node::start(&["DENK01234567"], &[]).await;
    let channel = connect_unix(&node.dir.path().join(SOCKET), TIMEOUT)
        .await
        .unwrap();

    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<Empty, Empty, _>(
            tonic::Request::new(Empty {}),
            tonic::codegen::http::uri::PathAndQuery::from_static("/v1beta1.DevicePlugin/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    let mut client = DevicePluginClient::new(channel);
    let many: Vec<String> = (0..10_000).map(|n| format!("ghost{n}-0")).collect();
    let huge = vec!["x".repeat(1 << 20)];
    for ids in [many.clone(), huge.clone()] {
        let status = client
            .allocate(AllocateRequest {
                container_requests: vec![ContainerAllocateRequest { devices_ids: ids }],
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().len() < 300,
            "{} bytes of error message",
            status.message().len()
        );
    }
    let status = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["DENK01234567-0".into()],
                must_include_device_i_ds: vec!["ghost-0".into()],
                allocation_size: 1,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("ghost-0"), "{}", status.message());
    let status = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: many,
                must_include_device_i_ds: huge,
                allocation_size: i32::MAX,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().len() < 300);

    let longest = node.plugin.logs().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2_000, "a log line of {longest} bytes");
    still_serving(&node.kubelet, &node.plugin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_watch_streams_opened_and_dropped_leave_no_growth() {
    let node = Node::start(&["DENK01234567"], &[]).await;
    let socket = node.dir.path().join(SOCKET);
    let streams = "nitrokey_device_plugin_list_and_watch_streams";
    let mut after_round = Vec::new();
    let before = rss_kib(node.plugin.pid());
    for _ in 0..3 {
        let mut open = Vec::new();
        for _ in 0..200 {
            let channel = connect_unix(&socket, TIMEOUT).await.unwrap();
            let mut client = DevicePluginClient::new(channel);
            let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
            let first = stream.message().await.unwrap().expect("a first list");
            assert_eq!(first.devices.len(), 2);
            open.push((client, stream));
        }
        assert_eq!(node.plugin.metric(streams).await, Some(201.0));
        drop(open);
        let deadline = Instant::now() + TIMEOUT;
        while node.plugin.metric(streams).await != Some(1.0) {
            assert!(Instant::now() < deadline, "streams never closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Memory is handed back shortly after the burst; poll for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rss = rss_kib(node.plugin.pid());
        while rss > before + 2048 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            rss = rss_kib(node.plugin.pid());
        }
        after_round.push(rss);
    }
    // Memory may grow once (buffers kept by the allocator), but not with every round.
    let last = *after_round.last().unwrap();
    assert!(
        last <= after_round[0] + 1024,
        "RSS keeps growing: {before} KiB before, {after_round:?} KiB after each round of 200"
    );
    assert!(
        last <= before + 4096,
        "RSS grew from {before} KiB to {last} KiB"
    );
    eprintln!("RSS {before} KiB, after each round of 200 streams: {after_round:?} KiB");
    still_serving(&node.kubelet, &node.plugin).await;
}
