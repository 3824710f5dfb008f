//! Soak: many kubelet restarts and many unplug/replug cycles against one plugin process, each
//! followed by a check of the device list the kubelet sees, then a check that the process did
//! not grow (file descriptors, threads, resident memory).
//!
//! Each loop runs up to `NITROKEY_SOAK_CYCLES` cycles (default 1,000) but stops at its time
//! budget (`NITROKEY_SOAK_SECS`, default 25 s), printing how many ran, so that CI stays fast
//! on slow machines; the benchmark runs the full count and prints latencies.

mod common;

use std::time::{Duration, Instant};

use common::{Node, TIMEOUT, unit_ids};
use nitrokey_e2e::usb::UsbDeviceSpec;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Open file descriptors, threads and VmRSS (KiB) of a process.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    fds: usize,
    threads: u64,
    rss_kib: u64,
}

fn footprint(pid: u32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("status field")
    };
    Footprint {
        fds,
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
    }
}

/// The footprint once it settles (the old server generation winds down in the background).
async fn settled(pid: u32, baseline: Footprint) -> Footprint {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = footprint(pid);
        let within = now.fds <= baseline.fds + 2
            && now.threads <= baseline.threads + 1
            && now.rss_kib <= baseline.rss_kib + 2048;
        if within || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_no_growth(what: &str, before: Footprint, after: Footprint, cycles: u64) {
    eprintln!("{what}: {cycles} cycles; before {before:?}, after {after:?}");
    assert!(
        after.fds <= before.fds + 2,
        "{what}: file descriptors grew {} -> {}",
        before.fds,
        after.fds
    );
    assert!(
        after.threads <= before.threads + 1,
        "{what}: threads grew {} -> {}",
        before.threads,
        after.threads
    );
    assert!(
        after.rss_kib <= before.rss_kib + 2048,
        "{what}: RSS grew {} -> {} KiB",
        before.rss_kib,
        after.rss_kib
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restarts_keep_the_right_list_and_no_growth() {
    let cycles = env_number("NITROKEY_SOAK_CYCLES", 1000);
    let budget = Duration::from_secs(env_number("NITROKEY_SOAK_SECS", 25));
    let mut node = Node::start(&["DENK0000001"], &["--log-format", "json"]).await;
    let want = unit_ids(&["DENK0000001"], 2);
    let mut baseline = None;
    let started = Instant::now();
    let mut ran = 0;
    while ran < cycles && started.elapsed() < budget {
        let restarted_at = node.kubelet.restart().await.unwrap();
        node.kubelet
            .wait_for_registration_since(restarted_at, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("cycle {ran}: {e}\n{}", node.plugin.logs()));
        let list = node
            .kubelet
            .wait_for_list(
                |l| l.connected && l.received_at > Some(restarted_at),
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|e| panic!("cycle {ran}: {e}"));
        assert_eq!(list.ids(), want, "cycle {ran}");
        assert_eq!(list.healthy_ids().len(), 2, "cycle {ran}");
        ran += 1;
        // Measure after a warm-up: first-use allocations are no growth.
        if ran == 20 {
            baseline = Some(footprint(node.plugin.pid()));
        }
    }
    println!(
        "kubelet restarts: {ran} of {cycles} in {:?}",
        started.elapsed()
    );
    assert!(ran >= 50, "only {ran} restarts fit the budget");
    let before = baseline.expect("warm-up done");
    let after = settled(node.plugin.pid(), before).await;
    assert_no_growth("kubelet restarts", before, after, ran);
    assert_eq!(
        node.plugin
            .metric("nitrokey_device_plugin_registrations_total{result=\"unreachable\"}")
            .await
            .unwrap_or(0.0),
        0.0,
        "no restart counted as a failure"
    );
    // A kubelet deletes sockets by name after listing them; when that catches the plugin's
    // fresh socket, the plugin must serve and register once more. Rare, never a failure.
    let registrations = node.kubelet.registration_count();
    println!(
        "registrations: {registrations} for {} kubelet starts",
        ran + 1
    );
    assert!(
        node.kubelet.registrations().iter().all(|r| r.accepted),
        "every Register call was accepted"
    );
    assert!(registrations <= 2 * (ran as usize + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replugs_keep_the_right_list_and_no_growth() {
    let cycles = env_number("NITROKEY_SOAK_CYCLES", 1000);
    let budget = Duration::from_secs(env_number("NITROKEY_SOAK_SECS", 25));
    let node = Node::start(
        &["DENKSTAY0001"],
        &[
            "--grace-period",
            "1h",
            "--log-format",
            "json",
            "--on-replug",
            "none",
        ],
    )
    .await;
    let want = unit_ids(&["DENKSTAY0001", "DENKSWAP0001"], 2);
    let mut baseline = None;
    let started = Instant::now();
    let mut ran = 0;
    while ran < cycles && started.elapsed() < budget {
        // A new address every cycle, two ports in turn, as a user replugging would.
        let devnum = 3 + (ran % 120) as u8;
        let spec = UsbDeviceSpec::nitrokey_hsm("DENKSWAP0001")
            .at(1, devnum)
            .port(2 + (ran % 2) as u8);
        let stick = node.testbed.add(&spec).unwrap();
        let list = node
            .kubelet
            .wait_for_devices(
                |d| d.len() == 4 && d.iter().all(|d| d.health == "Healthy"),
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|e| panic!("cycle {ran}: {e}\n{}", node.plugin.logs()));
        assert_eq!(list.ids(), want, "cycle {ran}");
        let allocated = node.kubelet.allocate(&["DENKSWAP0001-0"]).await.unwrap();
        assert_eq!(
            allocated.devices[0].host_path,
            spec.dev_path(),
            "cycle {ran}: Allocate hands out the current node"
        );
        node.testbed.remove(&stick).unwrap();
        let list = node
            .kubelet
            .wait_for_unhealthy(2, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("cycle {ran}: {e}"));
        assert_eq!(
            list.healthy_ids(),
            unit_ids(&["DENKSTAY0001"], 2),
            "cycle {ran}"
        );
        ran += 1;
        if ran == 20 {
            baseline = Some(footprint(node.plugin.pid()));
        }
    }
    println!(
        "unplug/replug cycles: {ran} of {cycles} in {:?}",
        started.elapsed()
    );
    assert!(ran >= 50, "only {ran} cycles fit the budget");
    let before = baseline.expect("warm-up done");
    let after = settled(node.plugin.pid(), before).await;
    assert_no_growth("unplug/replug", before, after, ran);
}
