//! Metrics, health and readiness: the Prometheus registry, the numbers the program updates,
//! and the answers of the HTTP endpoint that exposes them (`/metrics`, `/healthz`,
//! `/readyz`; the server is the one both programs share, [`nitrokey_common::health`]).
//!
//! Metric values never carry secrets: labels are operation names and results only.

use nitrokey_common::health::{self, Probes};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Label set naming an HSM operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// Operation (`login`, `decrypt`, `create_object`, ...).
    pub op: String,
}

/// Label set naming a Vault API endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// Endpoint (`sys/seal-status`, `sys/unseal`, ...).
    pub endpoint: String,
}

/// Label set naming an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failure`.
    pub result: String,
}

/// What unseal-init last saw of Vault, as the `state` label of `unseal_init_vault_state`.
/// The variants are the label values, hence lower case.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum VaultState {
    /// Initialised and sealed.
    sealed,
    /// Initialised and unsealed.
    unsealed,
    /// Not initialised.
    uninitialized,
    /// Not answering (or answering with an error).
    unreachable,
}

impl VaultState {
    const ALL: [Self; 4] = [
        Self::sealed,
        Self::unsealed,
        Self::uninitialized,
        Self::unreachable,
    ];
}

/// Label set of `unseal_init_vault_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: VaultState,
}

/// Count and total time of one HSM operation, for the benchmark and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTotals {
    /// Calls.
    pub count: u64,
    /// Summed wall time.
    pub time: Duration,
}

/// Everything the program reports about itself.
pub struct Telemetry {
    registry: Mutex<Registry>,
    initialized: Gauge,
    sealed: Gauge,
    unseal_attempts: Family<ResultLabel, Counter>,
    vault_state: Family<StateLabel, Gauge>,
    journal_pending: Gauge,
    init_total: Counter,
    hsm_ops: Family<OpLabel, Counter>,
    hsm_seconds: Family<OpLabel, Histogram>,
    hsm_login_attempts: Counter,
    pin_rejected: Gauge,
    vault_seconds: Family<EndpointLabel, Histogram>,
    totals: Mutex<BTreeMap<&'static str, OpTotals>>,
    vault_totals: Mutex<BTreeMap<&'static str, OpTotals>>,
    ready: AtomicBool,
    pin_problem: Mutex<Option<&'static str>>,
    token_problem: Mutex<Option<&'static str>>,
    store_problem: Mutex<Option<&'static str>>,
    /// The key store found missing (`Secret vault/x`); named on `/readyz` only while Vault is
    /// not ready, since a serving Vault keeps its pod ready.
    missing_store: Mutex<Option<String>>,
    store_missing: Gauge,
    /// Milliseconds since `born` at the last heartbeat: a monotonic clock, so an NTP step
    /// never makes the process look dead.
    heartbeat_ms: AtomicU64,
    born: Instant,
    liveness_window: Mutex<Duration>,
    /// Work in progress that must not be interrupted (see [`Telemetry::critical`]).
    critical: AtomicU64,
}

impl Telemetry {
    /// A fresh registry with every metric registered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("unseal_init");
        let initialized = Gauge::default();
        let sealed = Gauge::default();
        let unseal_attempts = Family::<ResultLabel, Counter>::default();
        let init_total = Counter::default();
        let hsm_ops = Family::<OpLabel, Counter>::default();
        let hsm_seconds = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
        });
        let hsm_login_attempts = Counter::default();
        let pin_rejected = Gauge::default();
        let vault_seconds = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        registry.register(
            "vault_request_seconds",
            "Vault API request latency",
            vault_seconds.clone(),
        );
        registry.register(
            "vault_initialized",
            "1 when Vault reports it is initialised",
            initialized.clone(),
        );
        registry.register(
            "vault_sealed",
            "1 when Vault reports it is sealed (0 also while it is unreachable: see vault_state)",
            sealed.clone(),
        );
        registry.register(
            "unseal_attempts",
            "Unseal runs by result",
            unseal_attempts.clone(),
        );
        let vault_state = Family::<StateLabel, Gauge>::default();
        registry.register(
            "vault_state",
            "1 for what Vault last answered (sealed, unsealed, uninitialized) or unreachable, 0 for the others; all 0 before the first look",
            vault_state.clone(),
        );
        let journal_pending = Gauge::default();
        registry.register(
            "init_journal_pending",
            "1 while an init journal holds keys not yet all stored (they are safe in it, encrypted)",
            journal_pending.clone(),
        );
        registry.register(
            "vault_init",
            "Vault initialisations performed",
            init_total.clone(),
        );
        registry.register("hsm_operations", "PKCS#11 operations", hsm_ops.clone());
        registry.register(
            "hsm_operation_seconds",
            "PKCS#11 operation latency",
            hsm_seconds.clone(),
        );
        registry.register(
            "hsm_login_attempts",
            "C_Login calls made",
            hsm_login_attempts.clone(),
        );
        registry.register(
            "hsm_pin_rejected",
            "1 while the user PIN is refused (rejected, blocked or missing) and a different one is awaited",
            pin_rejected.clone(),
        );
        let store_missing = Gauge::default();
        registry.register(
            "key_store_missing",
            "1 while the key store itself was last found missing (mode hsm-k8s: the Secret holding the encrypted unseal keys deleted); looked at only when Vault is sealed",
            store_missing.clone(),
        );
        Arc::new(Self {
            registry: Mutex::new(registry),
            store_missing,
            initialized,
            sealed,
            unseal_attempts,
            vault_state,
            journal_pending,
            init_total,
            hsm_ops,
            hsm_seconds,
            hsm_login_attempts,
            pin_rejected,
            vault_seconds,
            totals: Mutex::new(BTreeMap::new()),
            vault_totals: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            pin_problem: Mutex::new(None),
            token_problem: Mutex::new(None),
            store_problem: Mutex::new(None),
            missing_store: Mutex::new(None),
            heartbeat_ms: AtomicU64::new(0),
            born: Instant::now(),
            liveness_window: Mutex::new(Duration::from_secs(60)),
            critical: AtomicU64::new(0),
        })
    }

    /// Records one HSM operation and its duration.
    pub fn hsm_op(&self, op: &'static str, took: Duration) {
        let label = OpLabel { op: op.to_owned() };
        self.hsm_ops.get_or_create(&label).inc();
        self.hsm_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if let Ok(mut totals) = self.totals.lock() {
            let entry = totals.entry(op).or_default();
            entry.count += 1;
            entry.time += took;
        }
    }

    /// Records one Vault API request and its duration.
    pub fn vault_request(&self, endpoint: &'static str, took: Duration) {
        self.vault_seconds
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.to_owned(),
            })
            .observe(took.as_secs_f64());
        if let Ok(mut totals) = self.vault_totals.lock() {
            let entry = totals.entry(endpoint).or_default();
            entry.count += 1;
            entry.time += took;
        }
    }

    /// Vault request totals so far, by endpoint.
    pub fn vault_totals(&self) -> BTreeMap<&'static str, OpTotals> {
        self.vault_totals
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    /// Records one `C_Login` call.
    pub fn login_attempt(&self) {
        self.hsm_login_attempts.inc();
    }

    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records that the token is not there (`Some(reason)`, shown on `/readyz`) or is back.
    pub fn token_problem(&self, reason: Option<&'static str>) {
        if let Ok(mut p) = self.token_problem.lock() {
            *p = reason;
        }
    }

    /// Records that the key store cannot be reached (`Some(reason)`, shown on `/readyz`: the
    /// Kubernetes API server away) or is reachable again.
    pub fn store_problem(&self, reason: Option<&'static str>) {
        if let Ok(mut p) = self.store_problem.lock() {
            *p = reason;
        }
    }

    /// Records that the key store itself is gone (`Some(what)`, e.g. `Secret vault/x`: shown on
    /// `/readyz` while Vault is not ready, and as `unseal_init_key_store_missing`) or is there
    /// again (`None`).
    pub fn store_missing(&self, what: Option<&str>) {
        self.store_missing.set(i64::from(what.is_some()));
        if let Ok(mut m) = self.missing_store.lock() {
            *m = what.map(str::to_owned);
        }
    }

    /// Records that no login is possible with the PIN in use (`Some(reason)`, shown on
    /// `/readyz`) or that a new PIN is being tried (`None`).
    pub fn pin_problem(&self, reason: Option<&'static str>) {
        self.pin_rejected.set(i64::from(reason.is_some()));
        if let Ok(mut p) = self.pin_problem.lock() {
            *p = reason;
        }
    }

    /// HSM operation totals so far, by operation.
    pub fn hsm_totals(&self) -> BTreeMap<&'static str, OpTotals> {
        self.totals.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Records Vault's latest status; ready means initialised and unsealed.
    pub fn vault_status(&self, initialized: bool, sealed: bool) {
        self.initialized.set(i64::from(initialized));
        self.sealed.set(i64::from(sealed));
        self.ready.store(initialized && !sealed, Ordering::SeqCst);
        self.set_vault_state(match (initialized, sealed) {
            (false, _) => VaultState::uninitialized,
            (true, true) => VaultState::sealed,
            (true, false) => VaultState::unsealed,
        });
    }

    /// Marks Vault unreachable (not ready).
    pub fn vault_unreachable(&self) {
        self.ready.store(false, Ordering::SeqCst);
        self.set_vault_state(VaultState::unreachable);
    }

    /// One state at 1, the others at 0: an unreachable Vault never reads as unsealed.
    fn set_vault_state(&self, now: VaultState) {
        for state in VaultState::ALL {
            self.vault_state
                .get_or_create(&StateLabel { state })
                .set(i64::from(state == now));
        }
    }

    /// Whether an init journal holds keys that are not all stored yet.
    pub fn journal_pending(&self, pending: bool) {
        self.journal_pending.set(i64::from(pending));
    }

    /// Counts an unseal run.
    pub fn unseal_attempt(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.unseal_attempts
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a Vault initialisation.
    pub fn vault_init(&self) {
        self.init_total.inc();
    }

    /// The main loop calls this every pass; `/healthz` fails when it stops.
    pub fn heartbeat(&self) {
        self.heartbeat_ms.store(self.uptime_ms(), Ordering::SeqCst);
    }

    /// How long the loop may be silent before `/healthz` fails.
    pub fn set_liveness_window(&self, window: Duration) {
        if let Ok(mut w) = self.liveness_window.lock() {
            *w = window;
        }
    }

    /// Marks work that must run to its end as alive for `/healthz` until the guard is dropped:
    /// a `sys/init` in flight and the storing of its keys. Its length is Vault's and the
    /// store's, not this program's, and a restart in the middle would lose the keys Vault hands
    /// out, so no silence during it counts as a hang.
    pub fn critical(&self) -> CriticalWork<'_> {
        self.critical.fetch_add(1, Ordering::SeqCst);
        self.heartbeat();
        CriticalWork { telemetry: self }
    }

    /// True while work marked with [`Telemetry::critical`] runs.
    pub fn in_critical_work(&self) -> bool {
        self.critical.load(Ordering::SeqCst) > 0
    }

    /// True while the loop has reported recently, or critical work is in progress.
    pub fn alive(&self) -> bool {
        if self.in_critical_work() {
            return true;
        }
        let window = self
            .liveness_window
            .lock()
            .map(|w| *w)
            .unwrap_or(Duration::from_secs(60));
        let age = self
            .uptime_ms()
            .saturating_sub(self.heartbeat_ms.load(Ordering::SeqCst));
        Duration::from_millis(age) <= window
    }

    /// True when Vault was last seen initialised and unsealed and the PIN was not refused.
    pub fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why `/readyz` fails, if it does. A refused PIN comes first: Vault may still be
    /// unsealed, but this sidecar can no longer unseal it again.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(reason) = self.pin_problem.lock().ok().and_then(|p| *p) {
            return Some(reason.to_owned());
        }
        if let Some(reason) = self.token_problem.lock().ok().and_then(|p| *p) {
            return Some(reason.to_owned());
        }
        if let Some(reason) = self.store_problem.lock().ok().and_then(|p| *p) {
            return Some(reason.to_owned());
        }
        if self.ready.load(Ordering::SeqCst) {
            return None;
        }
        match self.missing_store.lock().ok().and_then(|m| m.clone()) {
            Some(what) => Some(format!(
                "{what} not found: the encrypted unseal keys are gone"
            )),
            None => Some("vault not ready".to_owned()),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock()
            && prometheus_client::encoding::text::encode(&mut out, &registry).is_err()
        {
            out.clear();
        }
        out
    }
}

/// Work that must not be interrupted; `/healthz` answers alive while it exists.
pub struct CriticalWork<'a> {
    telemetry: &'a Telemetry,
}

impl Drop for CriticalWork<'_> {
    fn drop(&mut self) {
        // The heartbeat first, so that the window restarts from the end of the work.
        self.telemetry.heartbeat();
        self.telemetry.critical.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A timer for one HSM operation.
pub struct OpTimer<'a> {
    telemetry: &'a Telemetry,
    op: &'static str,
    start: Instant,
}

impl<'a> OpTimer<'a> {
    /// Starts timing `op`.
    pub fn start(telemetry: &'a Telemetry, op: &'static str) -> Self {
        Self {
            telemetry,
            op,
            start: Instant::now(),
        }
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        self.telemetry.hsm_op(self.op, self.start.elapsed());
    }
}

impl Probes for Telemetry {
    fn metrics(&self) -> String {
        self.encode()
    }

    fn live(&self) -> Result<String, String> {
        if self.in_critical_work() {
            Ok("ok: Vault's sys/init or the storing of its keys in progress".to_owned())
        } else if self.alive() {
            Ok("ok".to_owned())
        } else {
            Err("main loop stalled".to_owned())
        }
    }

    fn ready(&self) -> Result<String, String> {
        match self.not_ready_reason() {
            None => Ok("vault initialised and unsealed".to_owned()),
            Some(reason) => Err(reason),
        }
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until the runtime stops.
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> std::io::Result<SocketAddr> {
    health::serve(addr, telemetry, std::future::pending()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dashboard reading `vault_state` never shows an unreachable Vault as unsealed, nor a
    /// stale state once Vault answers again.
    #[test]
    fn vault_state_names_one_state_at_a_time() {
        let t = Telemetry::new();
        let state = |t: &Telemetry, s: &str| {
            let text = t.encode();
            let line = format!("unseal_init_vault_state{{state=\"{s}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()).map(str::to_owned))
                .unwrap_or_else(|| panic!("no {line}in\n{text}"))
        };
        t.vault_status(true, false);
        assert_eq!(state(&t, "unsealed"), "1");
        t.vault_unreachable();
        assert_eq!(state(&t, "unreachable"), "1");
        assert_eq!(state(&t, "unsealed"), "0");
        assert_eq!(state(&t, "sealed"), "0");
        t.vault_status(true, true);
        assert_eq!(state(&t, "sealed"), "1");
        assert_eq!(state(&t, "unreachable"), "0");
        t.vault_status(false, true);
        assert_eq!(state(&t, "uninitialized"), "1");
        assert_eq!(state(&t, "sealed"), "0");
        t.journal_pending(true);
        assert!(t.encode().contains("unseal_init_init_journal_pending 1"));
    }

    #[test]
    fn exposition_names_the_metrics_and_readiness_follows_status() {
        let t = Telemetry::new();
        t.hsm_op("decrypt", Duration::from_millis(3));
        t.hsm_op("decrypt", Duration::from_millis(5));
        t.login_attempt();
        t.unseal_attempt(true);
        t.vault_status(true, false);
        let text = t.encode();
        assert!(
            text.contains("unseal_init_hsm_operations_total{op=\"decrypt\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("unseal_init_hsm_login_attempts_total 1"),
            "{text}"
        );
        assert!(text.contains("unseal_init_vault_sealed 0"), "{text}");
        assert!(t.ready());
        assert!(text.contains("unseal_init_hsm_pin_rejected 0"), "{text}");
        // A refused PIN makes the sidecar unready even while Vault is still unsealed.
        t.pin_problem(Some("HSM user PIN rejected"));
        assert_eq!(
            t.not_ready_reason().as_deref(),
            Some("HSM user PIN rejected")
        );
        assert!(t.encode().contains("unseal_init_hsm_pin_rejected 1"));
        t.pin_problem(None);
        assert!(t.ready());
        t.vault_status(true, true);
        assert!(!t.ready());
        assert_eq!(t.not_ready_reason().as_deref(), Some("vault not ready"));
        // A deleted Secret is named on /readyz and flagged in the metrics until it is back.
        assert!(t.encode().contains("unseal_init_key_store_missing 0"));
        t.store_missing(Some("Secret vault/vault-unseal-keys"));
        assert!(t.encode().contains("unseal_init_key_store_missing 1"));
        assert!(
            t.not_ready_reason()
                .is_some_and(|r| r.starts_with("Secret vault/vault-unseal-keys not found")),
            "{:?}",
            t.not_ready_reason()
        );
        t.store_missing(None);
        assert!(t.encode().contains("unseal_init_key_store_missing 0"));
        assert_eq!(t.not_ready_reason().as_deref(), Some("vault not ready"));
        let totals = t.hsm_totals();
        assert_eq!(totals["decrypt"].count, 2);
        assert_eq!(totals["decrypt"].time, Duration::from_millis(8));
    }

    #[test]
    fn liveness_expires_without_heartbeat() {
        let t = Telemetry::new();
        t.heartbeat();
        assert!(t.alive());
        t.set_liveness_window(Duration::ZERO);
        // The heartbeat is on a monotonic clock: any time after it is "too late" here.
        std::thread::sleep(Duration::from_millis(2));
        assert!(!t.alive());
    }

    #[test]
    fn critical_work_is_alive_however_long_it_is_silent() {
        let t = Telemetry::new();
        t.set_liveness_window(Duration::ZERO);
        let work = t.critical();
        std::thread::sleep(Duration::from_millis(2));
        assert!(t.alive(), "silent during sys/init, and alive");
        assert!(t.live().is_ok_and(|m| m.contains("sys/init")));
        drop(work);
        std::thread::sleep(Duration::from_millis(2));
        assert!(!t.alive(), "the window applies again once the work ended");
    }
}
