//! Benchmark of the device plugin as it runs on a node (not a timed test: it prints figures).
//!
//! Runs the real (optimised) `device-plugin` binary inside a umockdev testbed against the fake
//! kubelet and measures:
//!
//! 1. USB add → ListAndWatch update latency, and USB remove → update latency: from the moment
//!    the harness asks umockdev to plug/unplug an emulated stick to the moment the fake kubelet
//!    has received the new device list.
//! 2. kubelet.sock re-created → Register received: a kubelet restart (every socket deleted,
//!    kubelet.sock created anew) until the plugin's Register call arrives, and until its first
//!    ListAndWatch message arrives.
//! 3. Soak: 1,000 kubelet restarts and 1,000 unplug/replug cycles back to back, each cycle
//!    timed until the kubelet holds the right list again, with file descriptors, threads and
//!    resident memory before and after; and 200 ListAndWatch streams opened and dropped.
//! 4. Idle cost: resident memory and CPU time of the daemon over 30 s with two sticks,
//!    from /proc/<pid>/status and /proc/<pid>/stat.
//!
//! `cargo bench -p nitrokey-device-plugin`; `NITROKEY_BENCH_ROUNDS` (default 30),
//! `NITROKEY_BENCH_SOAK_CYCLES` (default 1000) and `NITROKEY_BENCH_IDLE_SECS` (default 30)
//! change the sample counts and the idle window.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Node, TIMEOUT};
use nitrokey_e2e::usb::UsbDeviceSpec;

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
    let mean = samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64;
    println!(
        "{label:<48} n={:<4} min {:>6.2} ms  p50 {:>6.2} ms  p95 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms  mean {:>6.2} ms",
        samples.len(),
        ms(samples[0]),
        ms(at(0.5)),
        ms(at(0.95)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
        mean
    );
}

/// Open file descriptors, threads and VmRSS (KiB) of a process.
fn footprint(pid: u32) -> (usize, u64, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (fds, field("Threads:"), field("VmRSS:"))
}

fn print_footprint(label: &str, before: (usize, u64, u64), after: (usize, u64, u64)) {
    println!(
        "{label:<48} fds {} -> {}, threads {} -> {}, RSS {:.2} -> {:.2} MiB",
        before.0,
        after.0,
        before.1,
        after.1,
        before.2 as f64 / 1024.0,
        after.2 as f64 / 1024.0
    );
}

async fn soak(cycles: u64) {
    let mut node = Node::start(
        &["DENKSTAY0001"],
        &["--grace-period", "1h", "--on-replug", "none"],
    )
    .await;
    let pid = node.plugin.pid();

    let before = footprint(pid);
    let mut restarts = Vec::new();
    for _ in 0..cycles {
        let created = node.kubelet.restart().await.unwrap();
        node.kubelet
            .wait_for_registration_since(created, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", node.plugin.logs()));
        let list = node
            .kubelet
            .wait_for_list(
                |l| l.connected && l.received_at > Some(created) && l.healthy_ids().len() == 2,
                TIMEOUT,
            )
            .await
            .unwrap();
        restarts.push(list.received_at.unwrap() - created);
    }
    summary("soak: kubelet restart -> right list", &mut restarts);
    tokio::time::sleep(Duration::from_millis(500)).await;
    print_footprint("soak: after the restarts", before, footprint(pid));

    let before = footprint(pid);
    let mut replugs = Vec::new();
    for cycle in 0..cycles {
        let spec = UsbDeviceSpec::nitrokey_hsm("DENKSWAP0001")
            .at(1, 3 + (cycle % 120) as u8)
            .port(2 + (cycle % 2) as u8);
        let start = Instant::now();
        let stick = node.testbed.add(&spec).unwrap();
        node.kubelet
            .wait_for_devices(
                |d| d.len() == 4 && d.iter().all(|d| d.health == "Healthy"),
                TIMEOUT,
            )
            .await
            .unwrap();
        node.testbed.remove(&stick).unwrap();
        node.kubelet.wait_for_unhealthy(2, TIMEOUT).await.unwrap();
        replugs.push(start.elapsed());
    }
    summary("soak: plug + unplug cycle -> right lists", &mut replugs);
    tokio::time::sleep(Duration::from_millis(500)).await;
    print_footprint("soak: after the replugs", before, footprint(pid));

    let before = footprint(pid);
    let socket = node.dir.path().join("nitrokey-hsm.sock");
    let mut open = Vec::new();
    for _ in 0..200 {
        let channel = nitrokey_e2e::kubelet::connect_unix(&socket, TIMEOUT)
            .await
            .unwrap();
        let mut client =
            nitrokey_proto::v1beta1::device_plugin_client::DevicePluginClient::new(channel);
        let mut stream = client
            .list_and_watch(nitrokey_proto::v1beta1::Empty {})
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap();
        open.push((client, stream));
    }
    let during = footprint(pid);
    drop(open);
    tokio::time::sleep(Duration::from_secs(1)).await;
    print_footprint("200 ListAndWatch streams: open", before, during);
    print_footprint("200 ListAndWatch streams: dropped", before, footprint(pid));
}

async fn usb_latency(rounds: u64) {
    let node = Node::start(&["DENKSTAY0001"], &["--grace-period", "1h"]).await;

    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let (mut helper_add, mut helper_remove) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate ports and addresses, as a user replugging would.
        let devnum = 3 + (round % 100) as u8;
        let spec = UsbDeviceSpec::nitrokey_hsm("DENKBENCH001")
            .at(1, devnum)
            .port(2 + (round % 2) as u8);
        let before = node.kubelet.device_list().unwrap().updates;
        let start = Instant::now();
        let stick = node.testbed.add(&spec).unwrap();
        helper_add.push(start.elapsed());
        let list = node
            .kubelet
            .wait_for_list(
                |l| {
                    l.updates > before
                        && l.healthy_ids()
                            .iter()
                            .filter(|id| id.starts_with("DENKBENCH001"))
                            .count()
                            == 2
                },
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", node.plugin.logs()));
        add.push(list.received_at.unwrap() - start);

        let before = list.updates;
        let start = Instant::now();
        node.testbed.remove(&stick).unwrap();
        helper_remove.push(start.elapsed());
        let list = node
            .kubelet
            .wait_for_list(
                |l| l.updates > before && l.unhealthy_ids().len() == 2,
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", node.plugin.logs()));
        remove.push(list.received_at.unwrap() - start);
    }
    summary("USB add -> ListAndWatch update (Healthy)", &mut add);
    summary("USB remove -> ListAndWatch update (Unhealthy)", &mut remove);
    summary("  (umockdev: add + uevent, round trip)", &mut helper_add);
    summary(
        "  (umockdev: uevent + remove, round trip)",
        &mut helper_remove,
    );
}

async fn restart_latency(rounds: u64) {
    let mut node = Node::start(&["DENKSTAY0001"], &[]).await;
    node.kubelet.wait_for_registration(TIMEOUT).await.unwrap();

    let (mut register, mut listed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let before = node.kubelet.device_list().map_or(0, |l| l.updates);
        let created = node.kubelet.restart().await.unwrap();
        let registration = node
            .kubelet
            .wait_for_registration_since(created, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", node.plugin.logs()));
        register.push(registration.received_at - created);
        let list = node
            .kubelet
            .wait_for_list(
                |l| l.connected && l.updates > before && l.devices.len() == 2,
                TIMEOUT,
            )
            .await
            .unwrap();
        listed.push(list.received_at.unwrap() - created);
        // Let the plugin settle, as between real restarts.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    summary(
        "kubelet.sock re-created -> Register received",
        &mut register,
    );
    summary("kubelet.sock re-created -> first ListAndWatch", &mut listed);
}

/// CPU time per thread of a process from /proc/<pid>/task/<tid>/schedstat (nanoseconds,
/// finer than the clock ticks of /proc/<pid>/stat).
fn schedstat_by_thread(pid: u32) -> HashMap<String, u64> {
    let mut threads = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
            let ns = text
                .split(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            threads.insert(task.file_name().to_string_lossy().into_owned(), ns);
        }
    }
    threads
}

/// CPU time spent between two [`schedstat_by_thread`] samples by the threads alive at the
/// end (a thread that exited in between, e.g. an idle blocking-pool thread, is not counted).
fn schedstat_delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> Duration {
    let ns = after
        .iter()
        .map(|(tid, end)| end.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    Duration::from_nanos(ns)
}

/// utime + stime of a process, and its VmRSS / VmHWM in KiB.
fn proc_usage(pid: u32) -> (Duration, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let cpu = Duration::from_secs_f64(ticks as f64 / hz as f64);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

async fn idle_cost(seconds: u64) {
    let node = Node::start(&["DENK0000001", "DENK0000002"], &[]).await;
    node.plugin.wait_http("/readyz", 200).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pid = node.plugin.pid();
    let (cpu_before, rss_before, _) = proc_usage(pid);
    let fine_before = schedstat_by_thread(pid);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed();
    let (cpu_after, rss_after, hwm) = proc_usage(pid);
    let fine_after = schedstat_by_thread(pid);
    let fine = schedstat_delta(&fine_before, &fine_after);
    let cpu = cpu_after.saturating_sub(cpu_before);
    println!(
        "{:<48} {:.1} s idle, two sticks registered: {:.3} ms on CPU (schedstat) = {:.4} % of one core; \
         utime+stime {:.0} ms in the window, {:.0} ms since start (/proc/pid/stat, 10 ms ticks)",
        "Idle daemon CPU time",
        elapsed.as_secs_f64(),
        fine.as_secs_f64() * 1000.0,
        fine.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        cpu.as_secs_f64() * 1000.0,
        cpu_after.as_secs_f64() * 1000.0,
    );
    println!(
        "{:<48} RSS {:.1} MiB at start of window, {:.1} MiB at end, peak (VmHWM) {:.1} MiB",
        "Idle daemon memory",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    // What the resident memory is made of: the process's own (anonymous: heap, stacks) and
    // pages of mapped files (the binary and its libraries, shared with every other user of
    // the same files), and the proportional share (PSS) of all of it.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |text: &str, key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let binary = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .split('\n')
        .fold((false, 0.0), |(in_binary, total), line| {
            if line.contains(" /") && line.split_whitespace().count() >= 6 {
                (line.ends_with("/device-plugin"), total)
            } else if in_binary && line.starts_with("Rss:") {
                (in_binary, total + kib(line, "Rss:"))
            } else {
                (in_binary, total)
            }
        })
        .1;
    println!(
        "{:<48} anonymous {:.1} MiB, file-backed {:.1} MiB (of which the device-plugin binary {:.1} MiB), PSS {:.1} MiB, threads {}",
        "Idle daemon memory, by kind",
        kib(&status, "RssAnon:"),
        kib(&status, "RssFile:"),
        binary,
        kib(&rollup, "Pss:"),
        kib(&status, "Threads:") * 1024.0,
    );
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is not supported, everything runs.
    let rounds = env_number("NITROKEY_BENCH_ROUNDS", 30);
    let idle = env_number("NITROKEY_BENCH_IDLE_SECS", 30);
    let cycles = env_number("NITROKEY_BENCH_SOAK_CYCLES", 1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "device-plugin benchmark ({} build of {})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        common::binary().display()
    );
    runtime.block_on(async {
        usb_latency(rounds).await;
        restart_latency(rounds).await;
        soak(cycles).await;
        idle_cost(idle).await;
    });
}
