//! Benchmark of the sidecar as it runs in a Vault pod: how long Vault stays sealed once
//! unseal-init acts (split into time in the HSM, in Vault's API and the rest), how many HSM
//! operations one init and one unseal cost, how many it spends per minute while Vault is
//! unsealed (the goal is none), and how much memory it holds after idling. Optionally the
//! same unseal through the OpenSC-like PKCS#11 shim, which adds a USB stick's latencies.
//!
//! The real `unseal-init` binary runs as the sidecar against a SoftHSM2 token and a real
//! OpenBao server, reached through a recording proxy; figures come from the sidecar's
//! `/metrics`, its log (read as it is written), the proxy's timeline of Vault requests and
//! `/proc`. Prints a markdown table (no pass/fail).
//!
//! Card work is counted as PKCS#11 calls: a second run loads SoftHSM2 behind OpenSC's call
//! logger, pkcs11-spy, on a fresh token and a fresh OpenBao, and counts the calls in its log
//! from start to `sys/init` sent, per first init (storing and verifying every value, and its
//! unseal) and per unseal. On a stick each of them is card or reader work.
//!
//! Memory after idling is read twice: on SoftHSM2, and as users run it with a stick, OpenSC's
//! module over the sidecar's own pcscd (`hsm.daemon`), which maps OpenSC's and pcsc-lite's
//! libraries; there the card is an emulated SmartCard-HSM (`tests/smartcard-hsm/card.py`)
//! behind pcscd's virtual reader (Debian package vsmartcard-vpcd).
//!
//! `cargo bench -p nitrokey-unseal-init --bench unseal`. `UNSEAL_BENCH_ROUNDS` sets the
//! number of unseal rounds (default 10), `BENCH_IDLE_SECS` the idle phase (default 60).
//! The shim row needs `cargo build -p nitrokey-pkcs11-shim` (same profile) first.

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{Context, bail};
use common::faults::{self, Trigger, Watched, is_event, poll};
use common::proxy::{self, Seen, Tap};
use nitrokey_e2e::kube_api::KubeApi;
use nitrokey_e2e::openbao::{OpenBao, free_port, http};
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::Token;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// OpenSC's PKCS#11 call logger.
const PKCS11_SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so";

/// PKCS#11 calls by function name, from a pkcs11-spy log (each call starts with `N: C_Name`).
#[derive(Debug, Clone, Default)]
struct Calls(BTreeMap<String, u64>);

impl Calls {
    fn read(log: &Path) -> Self {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            if let Some((n, name)) = line.split_once(": ")
                && n.bytes().all(|b| b.is_ascii_digit())
                && name.starts_with("C_")
            {
                *calls.entry(name.trim().to_owned()).or_default() += 1;
            }
        }
        Self(calls)
    }

    fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(f, n)| (f.clone(), n - before.0.get(f).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }

    fn get(&self, f: &str) -> u64 {
        self.0.get(f).copied().unwrap_or(0)
    }

    fn text(&self) -> String {
        let total: u64 = self.0.values().sum();
        let mut parts: Vec<(&String, &u64)> = self.0.iter().collect();
        parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = parts.iter().map(|(f, n)| format!("{f} {n}")).collect();
        format!("{total} ({})", parts.join(", "))
    }
}

/// The sidecar's unseal period during the benchmark.
const PERIOD: &str = "1s";
/// Latencies the shim adds, as measured on a Nitrokey HSM 2 with OpenSC 0.23.
const SHIM_LATENCY: &str = "initialize=2000,decrypt=150,read=50";

/// What `/metrics` says at one moment.
#[derive(Debug, Clone, Default)]
struct Metrics {
    hsm_ops: BTreeMap<String, f64>,
    hsm_seconds: f64,
    vault_seconds: f64,
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            match name {
                "unseal_init_hsm_operations_total" => {
                    let op = labels
                        .split("op=\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .unwrap_or("?");
                    *m.hsm_ops.entry(op.to_owned()).or_default() += value;
                }
                "unseal_init_hsm_operation_seconds_sum" => m.hsm_seconds += value,
                "unseal_init_vault_request_seconds_sum" => m.vault_seconds += value,
                _ => {}
            }
        }
        m
    }

    fn fetch(base: &str) -> anyhow::Result<Self> {
        let (status, body) = http(base, "GET", "/metrics", None)?;
        if status != 200 {
            bail!("{base}/metrics returned {status}");
        }
        Ok(Self::parse(&body))
    }

    fn total(&self) -> f64 {
        self.hsm_ops.values().sum()
    }

    /// Operations, HSM time and Vault API time since `before`.
    fn since(&self, before: &Self) -> Delta {
        let by_op = self
            .hsm_ops
            .iter()
            .map(|(op, n)| {
                (
                    op.clone(),
                    n - before.hsm_ops.get(op).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, n)| *n > 0.0)
            .collect();
        Delta {
            ops: self.total() - before.total(),
            by_op,
            hsm: Duration::from_secs_f64((self.hsm_seconds - before.hsm_seconds).max(0.0)),
            vault: Duration::from_secs_f64((self.vault_seconds - before.vault_seconds).max(0.0)),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Delta {
    ops: f64,
    by_op: BTreeMap<String, f64>,
    hsm: Duration,
    vault: Duration,
}

impl Delta {
    fn ops_text(&self) -> String {
        let parts: Vec<String> = self
            .by_op
            .iter()
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        if parts.is_empty() {
            format!("{}", self.ops)
        } else {
            format!("{} ({})", self.ops, parts.join(", "))
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

/// Resident memory of a process in KiB, from `/proc/<pid>/status`.
struct Memory {
    rss: u64,
    /// Heap and other private memory (`RssAnon`).
    anon: u64,
    /// Mapped files: the binary and its libraries (`RssFile`).
    file: u64,
    peak: u64,
}

impl Memory {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} missing in /proc/{pid}/status"))
        };
        Ok(Self {
            rss: field("VmRSS:")?,
            anon: field("RssAnon:")?,
            file: field("RssFile:")?,
            peak: field("VmHWM:")?,
        })
    }

    fn text(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        format!(
            "{:.1} MiB: {:.1} MiB anonymous, {:.1} MiB mapped files (peak {:.1} MiB)",
            mib(self.rss),
            mib(self.anon),
            mib(self.file),
            mib(self.peak)
        )
    }
}

/// One Vault request as the proxy saw it.
struct Exchange {
    line: String,
    start: Instant,
    end: Instant,
    /// `sealed` in the reply, when it has one.
    sealed: Option<bool>,
}

impl Exchange {
    fn is(&self, method: &str, path: &str) -> bool {
        self.line.starts_with(&format!("{method} {path} "))
    }
}

/// Records every Vault request the sidecar makes, with its timing; keeps no body (some carry
/// keys).
#[derive(Default)]
struct Timeline(Mutex<Vec<Exchange>>);

impl Tap for Timeline {
    fn response(&self, seen: &Seen, body: String) -> Option<String> {
        let sealed = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["sealed"].as_bool());
        if let Ok(mut all) = self.0.lock() {
            all.push(Exchange {
                line: seen.line.clone(),
                start: seen.at,
                end: Instant::now(),
                sealed,
            });
        }
        Some(body)
    }
}

impl Timeline {
    fn len(&self) -> usize {
        self.0.lock().map(|a| a.len()).unwrap_or(0)
    }
}

/// A running sidecar with its metrics endpoint.
struct Sidecar {
    run: Watched,
    metrics: String,
}

impl Sidecar {
    fn start(
        hsm: &SoftHsm,
        dir: &Path,
        vault: &str,
        port: u16,
        module: Option<&Path>,
        trigger: Option<Trigger>,
    ) -> anyhow::Result<Self> {
        let env = [
            ("NKSHIM_MODULE", hsm.module().display().to_string()),
            ("NKSHIM_LATENCY", SHIM_LATENCY.to_owned()),
            ("NKSHIM_OPENSC_LABELS", "1".to_owned()),
        ];
        Self::start_wrapped(
            hsm,
            dir,
            vault,
            port,
            module.map(|m| (m, &env[..])),
            trigger,
        )
    }

    /// The sidecar loading `wrapper` (a module in front of SoftHSM2) with its environment.
    fn start_wrapped(
        hsm: &SoftHsm,
        dir: &Path,
        vault: &str,
        port: u16,
        wrapper: Option<(&Path, &[(&str, String)])>,
        trigger: Option<Trigger>,
    ) -> anyhow::Result<Self> {
        let config = common::write_config(
            dir,
            hsm,
            vault,
            &format!("unsealPeriod: {PERIOD}\nmetricsAddress: 127.0.0.1:{port}\n"),
        );
        let mut cmd = common::command(hsm);
        if let Some((module, env)) = wrapper {
            let text = std::fs::read_to_string(&config)?.replace(
                &format!("modulePath: {}", hsm.module().display()),
                &format!("modulePath: {}", module.display()),
            );
            std::fs::write(&config, text)?;
            cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        }
        cmd.arg("--config").arg(&config);
        Ok(Self {
            run: Watched::spawn(cmd, trigger),
            metrics: format!("http://127.0.0.1:{port}"),
        })
    }

    fn wait_line(&self, message: &str, count: usize, timeout: Duration) -> anyhow::Result<Instant> {
        poll(timeout, || {
            self.run.seen_at(|l| is_event(l, message)).len() >= count
        });
        match self.run.seen_at(|l| is_event(l, message)).get(count - 1) {
            Some(at) => Ok(*at),
            None => bail!(
                "`{message}` (#{count}) not logged within {timeout:?}; last lines:\n{}",
                self.run.tail(20)
            ),
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        self.run.signal(libc::SIGTERM);
        if self.run.wait_exit(Duration::from_secs(30)).is_none() {
            bail!("sidecar did not stop on SIGTERM:\n{}", self.run.tail(20));
        }
        Ok(())
    }
}

/// One sealed → unsealed round: Vault restarted (sealed), the sidecar unseals it.
struct Round {
    /// From the sidecar's first `seal-status` that saw Vault sealed to the `sys/unseal` reply
    /// that said unsealed: the time Vault stays sealed once the sidecar acts.
    pass: Duration,
    /// Time inside Vault requests during the pass, as the proxy saw them.
    vault: Duration,
    /// From Vault answering again to unsealed, including the wait for the next period.
    end_to_end: Duration,
    cost: Delta,
}

fn unseal_rounds(
    bao: &mut OpenBao,
    sidecar: &Sidecar,
    timeline: &Timeline,
    rounds: usize,
) -> anyhow::Result<Vec<Round>> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        let done = sidecar.run.seen_at(|l| is_event(l, faults::UNSEALED)).len();
        let before = Metrics::fetch(&sidecar.metrics)?;
        let mark = timeline.len();
        bao.restart()?;
        let back = Instant::now();
        sidecar.wait_line(faults::UNSEALED, done + 1, Duration::from_secs(120))?;
        let after = Metrics::fetch(&sidecar.metrics)?;
        let all = timeline.0.lock().map_err(|_| anyhow::anyhow!("timeline"))?;
        let round = &all[mark.min(all.len())..];
        let first = round
            .iter()
            .position(|e| e.is("GET", "/v1/sys/seal-status") && e.sealed == Some(true))
            .context("no seal-status saw the restarted Vault sealed")?;
        let last = first
            + round[first..]
                .iter()
                .position(|e| e.is("PUT", "/v1/sys/unseal") && e.sealed == Some(false))
                .context("no sys/unseal reply said unsealed")?;
        let pass = &round[first..=last];
        out.push(Round {
            pass: pass[pass.len() - 1].end.duration_since(pass[0].start),
            vault: pass.iter().map(|e| e.end.duration_since(e.start)).sum(),
            end_to_end: pass[pass.len() - 1].end.saturating_duration_since(back),
            cost: after.since(&before),
        });
    }
    Ok(out)
}

fn round_rows(rows: &mut Vec<(String, String)>, what: &str, rounds: &[Round]) {
    let n = rounds.len();
    let pass: Vec<Duration> = rounds.iter().map(|r| r.pass).collect();
    let e2e: Vec<Duration> = rounds.iter().map(|r| r.end_to_end).collect();
    let hsm: Vec<Duration> = rounds.iter().map(|r| r.cost.hsm).collect();
    let vault: Vec<Duration> = rounds.iter().map(|r| r.vault).collect();
    let (p, h, v) = (median(&pass), median(&hsm), median(&vault));
    rows.push((
        format!("sealed → unsealed, {what}: sidecar's pass, median of {n}"),
        format!(
            "{} = HSM {} + Vault API {} + rest {}",
            ms(p),
            ms(h),
            ms(v),
            ms(p.saturating_sub(h + v))
        ),
    ));
    rows.push((
        format!("sealed → unsealed, {what}: Vault back → unsealed (≤ {PERIOD} period), median"),
        ms(median(&e2e)),
    ));
    if let Some(last) = rounds.last() {
        rows.push((
            format!("HSM operations per unseal, {what}"),
            last.cost.ops_text(),
        ));
    }
}

/// Counts PKCS#11 calls through pkcs11-spy on a fresh token and a fresh OpenBao: start-up,
/// first init (with its unseal) and `rounds` unseals.
fn count_calls(rows: &mut Vec<(String, String)>, rounds: usize) -> anyhow::Result<()> {
    let spy = Path::new(PKCS11_SPY);
    if !spy.exists() {
        rows.push((
            "PKCS#11 calls".into(),
            format!("skipped: {PKCS11_SPY} not installed (Debian package opensc)"),
        ));
        return Ok(());
    }
    let hsm = SoftHsm::new()?;
    let mut bao = OpenBao::start()?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("pkcs11-spy.log");
    let env = [
        ("PKCS11SPY", hsm.module().display().to_string()),
        ("PKCS11SPY_OUTPUT", log.display().to_string()),
    ];
    let at_init: Arc<Mutex<Option<Calls>>> = Arc::new(Mutex::new(None));
    let (snapshot, spy_log) = (at_init.clone(), log.clone());
    let trigger = Trigger {
        matches: Box::new(|l: &str| is_event(l, faults::INITIALIZING)),
        action: Box::new(move |_| {
            if let Ok(mut s) = snapshot.lock() {
                *s = Some(Calls::read(&spy_log));
            }
        }),
    };
    let sidecar = Sidecar::start_wrapped(
        &hsm,
        dir.path(),
        &bao.address(),
        free_port()?,
        Some((spy, &env[..])),
        Some(trigger),
    )?;
    sidecar.wait_line(faults::UNSEALED, 1, Duration::from_secs(180))?;
    let after_init = Calls::read(&log);
    let before_init = at_init
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .context("no PKCS#11 call count when init started")?;
    rows.push((
        "PKCS#11 calls, start-up to `sys/init` sent (module, login, key, scheme probe, pre-flight)"
            .into(),
        before_init.text(),
    ));
    let init = after_init.since(&before_init);
    rows.push((
        "PKCS#11 calls per first init (5 keys + root token stored, each read back and decrypted; its unseal)".into(),
        init.text(),
    ));
    let mut per_unseal = Vec::new();
    for _ in 0..rounds {
        let done = sidecar.run.seen_at(|l| is_event(l, faults::UNSEALED)).len();
        let before = Calls::read(&log);
        bao.restart()?;
        sidecar.wait_line(faults::UNSEALED, done + 1, Duration::from_secs(120))?;
        per_unseal.push(Calls::read(&log).since(&before));
    }
    if let (Some(first), Some(last)) = (per_unseal.first(), per_unseal.last()) {
        rows.push((
            "PKCS#11 calls per unseal, first after start-up (threshold 3)".into(),
            first.text(),
        ));
        rows.push((
            format!("PKCS#11 calls per unseal, later ones (last of {rounds})"),
            last.text(),
        ));
        let decrypts: u64 = per_unseal.iter().map(|c| c.get("C_Decrypt")).sum();
        let inits: u64 = per_unseal.iter().map(|c| c.get("C_DecryptInit")).sum();
        rows.push((
            "`C_Decrypt` calls per decryption (`C_DecryptInit`)".into(),
            format!("{decrypts} / {inits}"),
        ));
    }
    sidecar.stop()
}

/// OpenSC's PKCS#11 module, as the images install it.
const OPENSC_MODULE: &str = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so";
/// vsmartcard's virtual reader driver for pcscd (Debian package vsmartcard-vpcd).
const VPCD_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";
/// The emulated SmartCard-HSM that answers pcscd's virtual reader.
const CARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/smartcard-hsm/card.py"
);
/// The emulated card's user PIN.
const CARD_PIN: &str = "648219";
/// The system's Python, which runs the card (with Debian's python3-cryptography), rather than
/// a virtual environment's first on PATH.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// The emulated card's process, ended with the benchmark.
struct CardProcess(std::process::Child);

impl Drop for CardProcess {
    fn drop(&mut self) {
        faults::signal_child(&self.0, libc::SIGTERM);
        let _ = self.0.wait();
    }
}

/// The sidecar as users run it with a stick: OpenSC's module over its own pcscd (`hsm.daemon`)
/// and a SmartCard-HSM, here the emulated one behind pcscd's virtual reader. It generates
/// the key pair on the card, initialises a fresh OpenBao, stores the values on the card and
/// unseals; after `idle` unsealed its memory is read beside the SoftHSM2 figure.
fn opensc_memory(rows: &mut Vec<(String, String)>, idle: Duration) -> anyhow::Result<()> {
    let what = format!(
        "sidecar RSS after {} s idle, OpenSC 0.23 + pcscd + emulated SmartCard-HSM",
        idle.as_secs()
    );
    let cryptography = std::process::Command::new(SYSTEM_PYTHON)
        .args(["-c", "import cryptography"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing = [OPENSC_MODULE, VPCD_DRIVER, "/usr/sbin/pcscd"]
        .into_iter()
        .find(|p| !Path::new(p).exists())
        .or((!cryptography).then_some("/usr/bin/python3's cryptography"));
    if let Some(missing) = missing {
        rows.push((
            what,
            format!(
                "skipped: {missing} missing (Debian packages opensc, pcscd, vsmartcard-vpcd, \
                 python3-cryptography)"
            ),
        ));
        return Ok(());
    }
    let bao = OpenBao::start()?;
    let dir = tempfile::tempdir()?;
    let pin = dir.path().join("pin");
    std::fs::write(&pin, CARD_PIN)?;
    let port = free_port()?;
    let config = dir.path().join("unseal-init.yaml");
    std::fs::write(
        &config,
        format!(
            "mode: hsm\njournalDir: {}\nunsealPeriod: {PERIOD}\nmetricsAddress: 127.0.0.1:{port}\n\
             vault:\n  address: {}\nhsm:\n  daemon: true\n  modulePath: {OPENSC_MODULE}\n  \
             pinFile: {}\n  keyLabel: bank-vaults\n  generateKey: true\n",
            common::journal_dir(dir.path()).display(),
            bao.address(),
            pin.display()
        ),
    )?;
    // The card connects to the virtual reader once the sidecar's pcscd has loaded it.
    let _card = CardProcess(
        std::process::Command::new(SYSTEM_PYTHON)
            .arg(CARD)
            .args(["--pin", CARD_PIN])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("start the emulated SmartCard-HSM")?,
    );
    let mut cmd = std::process::Command::new(common::stick::program());
    cmd.env("RUST_LOG", "info")
        .env_remove("VAULT_ADDR")
        .env_remove("BANK_VAULTS_HSM_PIN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .arg("--config")
        .arg(&config);
    let sidecar = Sidecar {
        run: Watched::spawn(cmd, None),
        metrics: format!("http://127.0.0.1:{port}"),
    };
    sidecar.wait_line(faults::UNSEALED, 1, Duration::from_secs(300))?;
    std::thread::sleep(idle);
    rows.push((what, Memory::of(sidecar.run.pid())?.text()));
    sidecar.stop()
}

/// The HA overlay's sidecar: mode hsm-k8s, the keys in a Secret of the Kubernetes API
/// stand-in, SoftHSM2, its own single-node OpenBao. Its resident memory after `idle`, and the
/// API requests it made meanwhile (the stand-in logs every one).
fn k8s_memory(rows: &mut Vec<(String, String)>, idle: Duration) -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    let bao = OpenBao::start()?;
    let api = KubeApi::start()?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = api.kubeconfig_in(dir.path(), "vault")?;
    let port = free_port()?;
    let config = common::write_config(
        dir.path(),
        &hsm,
        &bao.address(),
        &format!(
            "kubernetes:\n  secretName: vault-unseal-keys\nunsealPeriod: {PERIOD}\n\
             metricsAddress: 127.0.0.1:{port}\n"
        ),
    );
    let mut cmd = common::command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .args(["--mode", "hsm-k8s"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    let sidecar = Sidecar {
        run: Watched::spawn(cmd, None),
        metrics: format!("http://127.0.0.1:{port}"),
    };
    sidecar.wait_line(faults::UNSEALED, 1, Duration::from_secs(300))?;
    let before = api.requests().len();
    std::thread::sleep(idle);
    let requests = api.requests().len() - before;
    rows.push((
        format!(
            "sidecar RSS after {} s idle, mode hsm-k8s (Secret through the Kubernetes API stand-in), SoftHSM2",
            idle.as_secs()
        ),
        Memory::of(sidecar.run.pid())?.text(),
    ));
    rows.push((
        format!("Kubernetes API requests per idle minute, mode hsm-k8s, period {PERIOD}"),
        format!("{:.1}", requests as f64 * 60.0 / idle.as_secs_f64()),
    ));
    sidecar.stop()
}

fn shim_module() -> Result<PathBuf, String> {
    nitrokey_e2e::bins::pkcs11_shim().map_err(|e| format!("{e:#}"))
}

fn main() -> anyhow::Result<()> {
    let env_num = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(default)
    };
    let rounds = env_num("UNSEAL_BENCH_ROUNDS", 10) as usize;
    let idle = Duration::from_secs(env_num("BENCH_IDLE_SECS", 60));
    let hsm = SoftHsm::new()?;
    let mut bao = OpenBao::start()?;
    let dir = tempfile::tempdir()?;
    let timeline = Arc::new(Timeline::default());
    let vault = proxy::start_tap(&bao.address(), timeline.clone());
    let mut rows: Vec<(String, String)> = Vec::new();

    // HSM work before the init (module, login, key lookup, scheme probe, pre-flight) is read
    // the moment the sidecar logs that it sends `sys/init`: nothing touches the token again
    // until Vault answers, which takes seconds with raft storage.
    let at_init: Arc<Mutex<Option<anyhow::Result<Metrics>>>> = Arc::new(Mutex::new(None));
    let snapshot = at_init.clone();
    let port = free_port()?;
    let trigger = Trigger {
        matches: Box::new(|l: &str| is_event(l, faults::INITIALIZING)),
        action: Box::new(move |_| {
            if let Ok(mut s) = snapshot.lock() {
                *s = Some(Metrics::fetch(&format!("http://127.0.0.1:{port}")));
            }
        }),
    };
    let spawned = Instant::now();
    let sidecar = Sidecar::start(&hsm, dir.path(), &vault.address, port, None, Some(trigger))?;
    let init_sent = sidecar.wait_line(faults::INITIALIZING, 1, Duration::from_secs(120))?;
    let unsealed = sidecar.wait_line(faults::UNSEALED, 1, Duration::from_secs(180))?;
    let before_init = poll(Duration::from_secs(10), || {
        at_init.lock().is_ok_and(|s| s.is_some())
    })
    .then(|| at_init.lock().ok()?.take())
    .flatten()
    .context("no metrics snapshot when init started")??;
    let after_init = Metrics::fetch(&sidecar.metrics)?;
    let startup = before_init.since(&Metrics::default());
    rows.push((
        "start-up to `sys/init` sent (module, login, key, probe, pre-flight)".into(),
        format!(
            "{}, {} in HSM; HSM operations {}",
            ms(init_sent.duration_since(spawned)),
            ms(startup.hsm),
            startup.ops_text()
        ),
    ));
    let init = after_init.since(&before_init);
    let took = unsealed.duration_since(init_sent);
    rows.push((
        "init pass: `sys/init` sent → unsealed (5 keys + root stored, verified)".into(),
        format!(
            "{} = HSM {} + Vault API {} + rest {}",
            ms(took),
            ms(init.hsm),
            ms(init.vault),
            ms(took.saturating_sub(init.hsm + init.vault))
        ),
    ));
    rows.push((
        "HSM operations per init (incl. its unseal)".into(),
        init.ops_text(),
    ));

    // Idle with Vault unsealed: the sidecar should leave the token alone entirely.
    let idle_start = Metrics::fetch(&sidecar.metrics)?;
    let requests_before = timeline.len();
    std::thread::sleep(idle);
    let idle_end = Metrics::fetch(&sidecar.metrics)?;
    let requests = timeline.len() - requests_before;
    let idle_ops = idle_end.since(&idle_start);
    let per_minute = idle_ops.ops * 60.0 / idle.as_secs_f64();
    rows.push((
        format!(
            "HSM operations per idle minute, Vault unsealed, period {PERIOD} (target 0; over {} s)",
            idle.as_secs()
        ),
        if idle_ops.by_op.is_empty() {
            format!("{per_minute:.1}")
        } else {
            format!("{per_minute:.1} ({})", idle_ops.ops_text())
        },
    ));
    rows.push((
        format!("Vault API requests per idle minute, period {PERIOD}"),
        format!("{:.1}", requests as f64 * 60.0 / idle.as_secs_f64()),
    ));
    rows.push((
        format!("sidecar RSS after {} s idle, SoftHSM2", idle.as_secs()),
        Memory::of(sidecar.run.pid())?.text(),
    ));

    let soft = unseal_rounds(&mut bao, &sidecar, &timeline, rounds)?;
    round_rows(&mut rows, "SoftHSM2", &soft);
    sidecar.stop()?;

    match shim_module() {
        Ok(shim) => {
            let spawned = Instant::now();
            let sidecar = Sidecar::start(
                &hsm,
                dir.path(),
                &vault.address,
                free_port()?,
                Some(&shim),
                None,
            )?;
            let ready = poll(Duration::from_secs(120), || {
                http(&sidecar.metrics, "GET", "/readyz", None).is_ok_and(|(s, _)| s == 200)
            });
            if !ready {
                bail!("sidecar on the shim never ready:\n{}", sidecar.run.tail(20));
            }
            rows.push((
                format!("start-up to ready, OpenSC-like shim ({SHIM_LATENCY})"),
                ms(spawned.elapsed()),
            ));
            let shim_rounds = unseal_rounds(&mut bao, &sidecar, &timeline, rounds.min(5))?;
            round_rows(
                &mut rows,
                &format!("OpenSC-like shim ({SHIM_LATENCY})"),
                &shim_rounds,
            );
            sidecar.stop()?;
        }
        Err(why) => {
            println!("skipping the OpenSC-like shim: {why}");
            rows.push((
                "sealed → unsealed, OpenSC-like shim".into(),
                "skipped: shim not built".into(),
            ));
        }
    }

    count_calls(&mut rows, rounds.min(5))?;
    k8s_memory(&mut rows, idle)?;
    opensc_memory(&mut rows, idle)?;

    let build = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    println!(
        "\nunseal-init sidecar benchmark ({build}; SoftHSM2 token, OpenBao single-node raft, 5 shares / threshold 3, unsealPeriod {PERIOD})\n"
    );
    println!("| figure | value |\n|---|---|");
    for (what, value) in rows {
        println!("| {what} | {value} |");
    }
    Ok(())
}
