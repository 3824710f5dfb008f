//! One thread owns the PKCS#11 module and its session; the rest of the program reaches it
//! through [`HsmHandle`], an async handle that sends it jobs.
//!
//! PKCS#11 calls block, and on a real stick they are slow (seconds for `C_Initialize`,
//! ~150 ms per decrypt over CCID). On their own thread they never stall the runtime that
//! serves `/healthz` and talks to Vault, and the session is never shared between threads.
//! Retrying a lost token happens here, with the runtime's timers, one attempt per job.

use crate::config::HsmConfig;
use crate::hsm::{Hsm, HsmError};
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;
use nitrokey_common::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce(&mut Hsm) + Send>;

/// How a lost token is waited for before an operation gives up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per operation.
    pub attempts: u32,
    /// First pause; doubles up to `max_delay`.
    pub first_delay: Duration,
    /// Longest pause.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Joins the HSM thread when the last handle goes, so the module is finalised before the
/// process exits: a `C_Finalize` racing the library's own exit-time destructors can crash
/// the process after its work is done.
struct Joiner(std::sync::Mutex<Option<std::thread::JoinHandle<()>>>);

impl Drop for Joiner {
    fn drop(&mut self) {
        if let Some(thread) = self.0.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

/// Cheap, cloneable access to the HSM thread.
#[derive(Clone)]
pub struct HsmHandle {
    // Declared before `joiner`: the last handle closes the channel first, which ends the
    // thread's loop, and only then joins it.
    jobs: mpsc::UnboundedSender<Job>,
    _joiner: Arc<Joiner>,
    retry: RetryPolicy,
    /// When a lost token was last reported at WARN: while a stick stays unplugged, one line
    /// a minute is enough.
    last_warned: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl HsmHandle {
    /// Starts the HSM thread and loads the module on it.
    pub async fn start(cfg: &HsmConfig, telemetry: Arc<Telemetry>) -> Result<Self, HsmError> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("hsm".to_owned())
            .spawn(move || {
                let mut hsm = match Hsm::load(&cfg, telemetry) {
                    Ok(h) => {
                        let _ = ready_tx.send(Ok(()));
                        h
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when every handle is dropped. `Hsm`'s Drop closes the session and calls
                // C_Finalize (cryptoki never does), here on the thread that made every other
                // call, before the last handle's join returns: a module reloaded next (a
                // changed PIN file, a lost token) then initialises afresh.
                while let Some(job) = rx.blocking_recv() {
                    job(&mut hsm);
                }
                drop(hsm);
            })
            .map_err(|e| HsmError::Other(format!("cannot start the HSM thread: {e}")))?;
        let joiner = Arc::new(Joiner(std::sync::Mutex::new(Some(thread))));
        ready_rx.await.map_err(|_| HsmError::ThreadGone)??;
        Ok(Self {
            jobs,
            _joiner: joiner,
            retry: RetryPolicy::default(),
            last_warned: Arc::default(),
        })
    }

    /// Runs `f` on the HSM thread, once, and returns what it returns.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Hsm) -> T + Send + 'static,
    ) -> Result<T, HsmError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |hsm: &mut Hsm| {
                let _ = tx.send(f(hsm));
            }))
            .map_err(|_| HsmError::ThreadGone)?;
        rx.await.map_err(|_| HsmError::ThreadGone)
    }

    /// Runs `f` on the HSM thread; while the token is lost, waits (without blocking the
    /// runtime) and tries again, up to the retry policy.
    pub async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl Fn(&mut Hsm) -> Result<T, HsmError> + Send + Sync + 'static,
    ) -> Result<T, HsmError> {
        let f = Arc::new(f);
        let mut delays = Backoff::new(self.retry.first_delay, self.retry.max_delay);
        let mut attempt = 1;
        loop {
            let job = Arc::clone(&f);
            match self.with(move |hsm| job(hsm)).await? {
                Ok(v) => return Ok(v),
                Err(e @ (HsmError::Lost { .. } | HsmError::NoSlot { .. })) => {
                    if attempt >= self.retry.attempts {
                        return Err(HsmError::Unavailable {
                            op,
                            attempts: attempt,
                            last: e.to_string(),
                        });
                    }
                    if attempt == 1 && self.warn_due() {
                        tracing::warn!(op, error = %e, "HSM token unavailable; re-opening");
                    } else {
                        tracing::debug!(op, attempt, error = %e, "HSM token still unavailable");
                    }
                    tokio::time::sleep(delays.next()).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn warn_due(&self) -> bool {
        let Ok(mut last) = self.last_warned.lock() else {
            return true;
        };
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now - t < Duration::from_secs(60)) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Waits until the configured token is present and selected. With a `timeout` (one-shot
    /// runs) gives up after it; without (the sidecar) waits until `shutdown`. `waiting` is
    /// told what is seen, once per change, so `/readyz` and the log can say why nothing
    /// happens. pcscd needs a moment to find a reader and power the card, and a stick can be
    /// plugged in at any time.
    pub async fn wait_for_token(
        &self,
        timeout: Option<Duration>,
        shutdown: &Shutdown,
        mut waiting: impl FnMut(Option<&'static str>),
    ) -> Result<(), HsmError> {
        let start = tokio::time::Instant::now();
        let mut last_seen: Option<String> = None;
        let mut last_reinit = start;
        let mut last_reminder = start;
        loop {
            match self.with(|hsm| hsm.select()).await? {
                Ok(true) => {
                    waiting(None);
                    return Ok(());
                }
                Ok(false) => {}
                Err(e @ HsmError::Lost { .. }) => {
                    tracing::debug!(error = %e, "listing slots failed");
                }
                Err(e) => return Err(e),
            }
            let (wanted, seen) = self.with(|hsm| hsm.describe_search()).await?;
            let now = tokio::time::Instant::now();
            if last_seen.as_deref() != Some(seen.as_str()) {
                tracing::info!(
                    wanted = wanted.as_str(),
                    seen = seen.as_str(),
                    "waiting for the HSM token"
                );
                waiting(Some("HSM token not present"));
                last_seen = Some(seen.clone());
                last_reminder = now;
            } else if now - last_reminder >= Duration::from_secs(60) {
                tracing::info!(
                    waited = ?(now - start),
                    seen = seen.as_str(),
                    "still waiting for the HSM token"
                );
                last_reminder = now;
            }
            if let Some(limit) = timeout
                && now - start >= limit
            {
                return Err(HsmError::TokenTimeout {
                    wanted,
                    seen,
                    waited: humantime::format_duration(limit).to_string(),
                });
            }
            // Some modules see a token that appeared only after a fresh C_Initialize.
            if now - last_reinit >= Duration::from_secs(10) {
                last_reinit = now;
                self.with(|hsm| hsm.reinitialize()).await??;
            }
            if shutdown
                .sleep_or_stop(Duration::from_millis(500))
                .await
                .is_stop()
            {
                return Err(HsmError::Other(
                    "stopped while waiting for the HSM token".to_owned(),
                ));
            }
        }
    }
}
