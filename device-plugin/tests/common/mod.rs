//! Runs the real `device-plugin` binary as a child process inside a umockdev testbed, for the
//! integration tests and the benchmark.
//!
//! [`Node`] is the usual scene (sticks, kubelet stand-in, plugin) in one value, so that its
//! parts always go in the right order: the plugin and the kubelet stand-in stop before the
//! directory holding their sockets is removed (or files are left behind in it), and the
//! testbed goes last.

#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::usb::{Testbed, UsbDevice};

/// Patience for anything that should take milliseconds; generous for slow CI machines.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_device-plugin"))
}

/// A free TCP port on 127.0.0.1, outside the range client connections take theirs from.
pub fn free_address() -> SocketAddr {
    let port = nitrokey_e2e::ports::free_port().expect("a free port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running device plugin; killed when dropped (its log is printed if the test failed).
pub struct Plugin {
    child: Option<Child>,
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_address: SocketAddr,
    /// The device-plugin directory.
    pub dir: PathBuf,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Plugin {
    /// Starts the plugin under `testbed` on `dir` with `--grace-period 2s`, `--node-labels
    /// none`, RUST_LOG=debug and
    /// the extra `args` (later flags win).
    pub fn start(testbed: &Testbed, dir: &Path, args: &[&str]) -> Plugin {
        Self::start_with_env(testbed, dir, args, &[])
    }

    /// [`start`](Self::start) with extra environment variables (`NITROKEY_DEVICE_PLUGIN_*`
    /// variables of the test process itself are not passed on).
    pub fn start_with_env(
        testbed: &Testbed,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Plugin {
        let log_dir = tempfile::tempdir().expect("log dir");
        let log = log_dir.path().join("device-plugin.log");
        let metrics_address = free_address();
        let mut command = testbed.command(binary());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("NITROKEY_DEVICE_PLUGIN_") {
                command.env_remove(key);
            }
        }
        command
            .arg("--plugin-dir")
            .arg(dir)
            .arg("--metrics-address")
            .arg(metrics_address.to_string())
            .arg("--grace-period")
            .arg("2s")
            // Never the host's NFD directory; tests of node labels choose their own.
            .arg("--node-labels")
            .arg("none")
            .args(args)
            .env("RUST_LOG", "debug,h2=info,tower=info,hyper_util=info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log file"),
            );
        let child = command.spawn().expect("start device-plugin");
        Plugin {
            child: Some(child),
            metrics_address,
            dir: dir.to_owned(),
            log,
            _log_dir: log_dir,
        }
    }

    /// Process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything the plugin logged so far.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// When the plugin logged each line containing every one of `needles`, by the timestamp it
    /// wrote itself (text format: the line's first word, RFC 3339), in log order.
    ///
    /// Timing checks use these rather than clocks read around the test's own calls: on a
    /// loaded machine a call such as `Testbed::remove` may return long after the plugin saw
    /// the event, and only the plugin's own times say when it acted.
    pub fn logged_at(&self, needles: &[&str]) -> Vec<(SystemTime, String)> {
        self.logs()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| {
                let stamp = l.split_whitespace().next()?;
                let at = humantime::parse_rfc3339_weak(stamp).ok()?;
                Some((at, l.to_owned()))
            })
            .collect()
    }

    /// Sends a signal to the plugin.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits up to `timeout` for the plugin to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(TIMEOUT)
            .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", self.logs()))
    }

    /// GET on the plugin's HTTP endpoint: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.metrics_address);
        let response = reqwest::get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// Polls GET `path` until it answers `status`.
    pub async fn wait_http(&self, path: &str, status: u16) {
        let url = format!("http://{}{path}", self.metrics_address);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().as_u16() == status
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} never answered {status}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a metric line (`name{labels}` exactly as exposed).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- device-plugin log -----\n{}\n-----------------------------",
                self.logs()
            );
        }
    }
}

/// Sorted IDs `<stick>-0..n-1` for each stick.
pub fn unit_ids(sticks: &[&str], shares: u32) -> Vec<String> {
    let mut ids: Vec<String> = sticks
        .iter()
        .flat_map(|s| (0..shares).map(move |n| format!("{s}-{n}")))
        .collect();
    ids.sort();
    ids
}

/// Units the plugin advertises per stick unless told otherwise (`--shares-per-device`).
pub const DEFAULT_SHARES: u32 = 2;

/// A node with sticks plugged in and the plugin registered with a kubelet stand-in.
///
/// Fields drop in declaration order: the plugin, then the kubelet stand-in, then the directory
/// holding their sockets, then the testbed.
pub struct Node {
    /// The running plugin, serving in [`dir`](Self::dir).
    pub plugin: Plugin,
    /// The kubelet stand-in the plugin registered with.
    pub kubelet: FakeKubelet,
    /// The device-plugin directory (kubelet.sock and the plugin's socket).
    pub dir: tempfile::TempDir,
    /// The sticks plugged in at the start, in the order given (for [`Testbed::remove`]).
    pub sticks: Vec<UsbDevice>,
    /// The umockdev testbed the plugin runs in.
    pub testbed: Testbed,
}

impl Node {
    /// Plugs in `sticks` (serials) on bus 1 at device numbers 2, 3, ..., starts the kubelet
    /// stand-in and the plugin with the extra `args`, and waits until the kubelet lists
    /// [`DEFAULT_SHARES`] units per stick.
    pub async fn start(sticks: &[&str], args: &[&str]) -> Node {
        Self::start_with_shares(sticks, DEFAULT_SHARES, args).await
    }

    /// [`start`](Self::start) for a plugin advertising `shares` units per stick (as `args` ask).
    pub async fn start_with_shares(sticks: &[&str], shares: u32, args: &[&str]) -> Node {
        let testbed = Testbed::new().expect("umockdev testbed");
        let sticks: Vec<UsbDevice> = (2..)
            .zip(sticks)
            .map(|(devnum, serial)| testbed.add_nitrokey_hsm(serial, 1, devnum).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
        let plugin = Plugin::start(&testbed, dir.path(), args);
        let units = sticks.len() * shares as usize;
        kubelet
            .wait_for_devices(|d| d.len() == units, TIMEOUT)
            .await
            .unwrap();
        Node {
            plugin,
            kubelet,
            dir,
            sticks,
            testbed,
        }
    }
}
