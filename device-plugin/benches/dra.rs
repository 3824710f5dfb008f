//! Benchmark of the DRA mode (not a timed test: it prints figures).
//!
//! Runs the real (optimised) `device-plugin` binary with `--mode dra` inside a umockdev testbed,
//! against the kubelet DRA stand-in and the Kubernetes API stand-in, and measures:
//!
//! 1. USB add → ResourceSlice applied with the stick, and USB remove → applied without it: from
//!    the moment the harness asks umockdev to plug/unplug an emulated stick to the moment the
//!    API stand-in received the server-side apply (its own receipt time);
//! 2. `NodePrepareResources` and `NodeUnprepareResources` of one claim, as the kubelet stand-in
//!    sees them (prepare includes the driver's read of the claim from the API stand-in);
//! 3. resident memory of the DRA driver and of the device-plugin mode beside it, each idle
//!    with one stick after the work above (`VmRSS` from /proc).
//!
//! `cargo bench -p nitrokey-device-plugin --bench dra`; `NITROKEY_BENCH_ROUNDS` (default 30)
//! changes the sample counts.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Node, Plugin, TIMEOUT};
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::kube_api_dra::allocated_claim;
use nitrokey_e2e::kubelet_dra::FakeDraKubelet;
use nitrokey_e2e::usb::{Testbed, UsbDeviceSpec};

const DRIVER: &str = "hsm.nitrokey.com";
const NODE: &str = "bench-node";
const SLICE: &str = "bench-node-hsm.nitrokey.com";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// min / median / p95 / p99 / max of a sample, in milliseconds.
fn summary(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{label:<52} n={:<4} min {:>6.2} ms  p50 {:>6.2} ms  p95 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
        samples.len(),
        ms(samples[0]),
        ms(at(0.5)),
        ms(at(0.95)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
    );
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// When the API stand-in received the first apply of the slice after `since` for which
/// `devices_ok` holds of its device count.
async fn applied_after(
    api: &KubeApi,
    plugin: &Plugin,
    since: Instant,
    devices_ok: impl Fn(usize) -> bool,
) -> Instant {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let found = api.requests().into_iter().find(|r| {
            r.method == "PATCH"
                && r.path.ends_with(SLICE)
                && r.at >= since
                && devices_ok(r.body["spec"]["devices"].as_array().map_or(0, Vec::len))
        });
        if let Some(r) = found {
            return r.at;
        }
        assert!(Instant::now() < deadline, "no apply:\n{}", plugin.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn dra(rounds: u64) -> f64 {
    let testbed = Testbed::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().unwrap();
    let kubelet = FakeDraKubelet::start(&dir.path().join("kubelet")).unwrap();
    let kubeconfig = api.kubeconfig(dir.path()).unwrap();
    let kubelet_dir = dir.path().join("kubelet");
    let cdi_dir = dir.path().join("cdi");
    let plugin = Plugin::start_with_env(
        &testbed,
        &dir.path().join("device-plugins"),
        &[
            "--mode",
            "dra",
            "--kubelet-dir",
            kubelet_dir.to_str().unwrap(),
            "--cdi-spec-dir",
            cdi_dir.to_str().unwrap(),
        ],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
            ("RUST_LOG", "info"),
        ],
    );
    kubelet.wait_for_driver(DRIVER, 0, TIMEOUT).await.unwrap();
    applied_after(
        &api,
        &plugin,
        Instant::now() - Duration::from_secs(60),
        |_| true,
    )
    .await;

    let (mut add, mut remove, mut prepare, mut unprepare) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let devnum = 3 + (round % 100) as u8;
        let spec = UsbDeviceSpec::nitrokey_hsm("DENKBENCH001")
            .at(1, devnum)
            .port(2 + (round % 2) as u8);
        let start = Instant::now();
        let stick = testbed.add(&spec).unwrap();
        add.push(applied_after(&api, &plugin, start, |n| n == 1).await - start);

        let uid = format!("bench-{round}");
        let name = format!("claim-{round}");
        api.dra().put_claim(allocated_claim(
            "bench",
            &name,
            &uid,
            &[("hsm", DRIVER, NODE, "denkbench001")],
            "pod",
        ));
        let claim = [("bench", uid.as_str(), name.as_str())];
        let start = Instant::now();
        let answer = kubelet.prepare(DRIVER, &claim).await.unwrap();
        prepare.push(start.elapsed());
        assert!(answer[&uid].is_ok(), "{answer:?}\n{}", plugin.logs());
        let start = Instant::now();
        let answer = kubelet.unprepare(DRIVER, &claim).await.unwrap();
        unprepare.push(start.elapsed());
        assert!(answer[&uid].is_ok(), "{answer:?}");

        let start = Instant::now();
        testbed.remove(&stick).unwrap();
        remove.push(applied_after(&api, &plugin, start, |n| n == 0).await - start);
    }
    summary("USB add -> ResourceSlice applied with the stick", &mut add);
    summary(
        "USB remove -> ResourceSlice applied without it",
        &mut remove,
    );
    summary("NodePrepareResources (one claim, API read)", &mut prepare);
    summary("NodeUnprepareResources (one claim)", &mut unprepare);

    testbed
        .add(&UsbDeviceSpec::nitrokey_hsm("DENKSTAY0001").at(1, 2))
        .unwrap();
    applied_after(
        &api,
        &plugin,
        Instant::now() - Duration::from_secs(1),
        |n| n == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_mib(plugin.pid())
}

fn main() {
    let rounds = env_number("NITROKEY_BENCH_ROUNDS", 30);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "DRA mode benchmark ({} build of {})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        common::binary().display()
    );
    runtime.block_on(async {
        let dra_rss = dra(rounds).await;
        let node = Node::start(&["DENKSTAY0001"], &[]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let plugin_rss = rss_mib(node.plugin.pid());
        println!(
            "resident memory, idle with one stick: DRA mode {dra_rss:.2} MiB, device-plugin mode {plugin_rss:.2} MiB"
        );
    });
}
