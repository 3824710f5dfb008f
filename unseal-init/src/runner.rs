//! Drives Vault: opening the key store, then passes of observe → decide → act, once
//! (`--once`) or for ever (sidecar). Decisions come from [`crate::unseal`]; this module holds
//! the pass and the watch loop, its steps one file each: `init.rs` (from `sys/init` to the last
//! stored key), `unseal_step.rs` (the keys to `sys/unseal`), `raft.rs` (joining peers instead
//! of initialising), `store_watch.rs` (a deleted Secret, keys still arriving), [`rekey`]
//! (`unseal-init rekey` and finishing one left behind), `error.rs` ([`PassError`]). The
//! ordering guarantees:
//!
//! - `sys/init`'s keys are sealed on the host and written to the [`journal`] before anything
//!   else, stored and verified one by one, and the journal is removed only after the last;
//!   every pass first finishes a journal it finds — once Vault answers and shows it is the
//!   journal's Vault, and never over a value the init did not find in the store.
//! - From before `sys/init` is sent until its answer is journalled, the in-flight marker
//!   holds Vault's container in its `preStop` hook, and `/healthz` counts the wait as alive.
//! - A `sys/init` whose connection broke after it was sent is reported as lost keys, never
//!   as success.
//! - Nothing is unsealed before every key is stored.
//! - A pass with Vault unsealed touches neither the token nor the Kubernetes API.

use crate::config::{Config, Mode};
use crate::hsm::HsmError;
use crate::hsm_actor::HsmHandle;
use crate::journal;
use crate::keypair;
use crate::keyring::{Keyring, KeyringError, PreflightOutcome, TEST_KEY};
use crate::secret_store::SecretStore;
use crate::shutdown::Shutdown;
use crate::storage::Storage;
use crate::telemetry::Telemetry;
use crate::token_store::TokenStore;
use crate::unseal::{
    Observation, Pace, Pacer, ShortOfKeys, Step, VaultView, already_initialised, next_step,
    short_of_keys, store_needed,
};
use crate::vault::{VaultApi, VaultError};
use nitrokey_common::backoff::Backoff;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod error;
mod init;
mod raft;
pub mod rekey;
pub mod rotate;
mod store_watch;
mod unseal_step;

use raft::join_failure;

pub use error::{PassError, store_unreachable};

/// The token, the key store on it (or in a Secret), and what was found there.
pub struct Opened {
    /// The HSM thread.
    pub hsm: HsmHandle,
    /// The key store.
    pub keyring: Keyring,
}

/// The key store as a one-shot command sees it ([`open_keyring`] with no stop signal):
/// waiting for the token as `--once` does, up to the configured `tokenWaitTimeout`.
pub async fn open_for_command(cfg: &Config, telemetry: Arc<Telemetry>) -> anyhow::Result<Opened> {
    open_keyring(
        cfg,
        telemetry,
        &Shutdown::new(),
        Some(cfg.hsm.token_wait_timeout),
    )
    .await
}

/// Opens the token (waiting for it: up to `token_wait`, or until `shutdown` without one),
/// logs in, finds (or generates) the key pair, picks the scheme and the storage backend.
pub async fn open_keyring(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    shutdown: &Shutdown,
    token_wait: Option<Duration>,
) -> anyhow::Result<Opened> {
    let hsm = HsmHandle::start(&cfg.hsm, Arc::clone(&telemetry)).await?;
    let t = Arc::clone(&telemetry);
    hsm.wait_for_token(token_wait, shutdown, move |reason| t.token_problem(reason))
        .await?;
    // A refused PIN must never be presented twice: only a token that was busy or away (no
    // verdict on the PIN) is tried again.
    let mut attempt = 1;
    loop {
        match hsm.with(|h| h.login()).await? {
            Ok(()) => break,
            Err(e @ HsmError::Lost { .. }) if attempt < 5 && !shutdown.requested() => {
                tracing::warn!(error = %e, attempt, "HSM token busy or unavailable at login; trying again");
                shutdown
                    .sleep_or_stop(Duration::from_millis(250) * attempt)
                    .await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // A key rotation cut short may have left the configured label on no pair, or on a pair
    // the stored values are not sealed to yet: settled before the pair is looked up (and
    // before a missing one could be generated).
    rotate::settle(cfg, &hsm).await?;
    let generate = cfg.hsm.generate_key;
    let (key, info) = match hsm
        .call("find_key", move |h| keypair::ensure(h, generate))
        .await
    {
        Err(HsmError::KeyMissing(label)) if ha_member(cfg) => {
            return Err(anyhow::anyhow!(
                "RSA key pair `{label}` not found on the token. This Vault is one member of a cluster whose sticks must all hold the same key pair, and the stored keys are encrypted with it: a key pair generated on this stick (hsm.generateKey, `unseal-init hsm keygen`) could never read them. Import the cluster's key pair instead: the DKEK share and `sc-hsm-tool --unwrap-key` of the wrapped key, as deploy/README.md's \"HA: one stick per node\" shows"
            ));
        }
        other => other?,
    };
    tracing::info!(
        label = info.label,
        id = info.id_hex,
        bits = info.bits,
        fingerprint = info.fingerprint,
        "found RSA key pair in HSM"
    );
    tracing::info!("the HSM decrypts only; encrypting on the host with the extracted public key");
    let probe_key = key.clone();
    let scheme = hsm
        .call("probe_scheme", move |h| {
            keypair::probe_scheme(h, &probe_key)
        })
        .await?;
    let storage = storage_for(cfg, &hsm).await?;
    tracing::info!(storage = storage.kind(), "storage backend");
    let keyring = Keyring::new(Arc::new(hsm.clone()), key, scheme, storage);
    Ok(Opened { hsm, keyring })
}

/// The key store the configuration selects: the token's data objects, or the Secret in mode
/// hsm-k8s.
pub async fn storage_for(cfg: &Config, hsm: &HsmHandle) -> anyhow::Result<Arc<dyn Storage>> {
    use anyhow::Context;
    Ok(match (cfg.mode, &cfg.kubernetes) {
        (Mode::HsmK8s, Some(k)) => Arc::new(
            SecretStore::connect(k.namespace.as_deref(), &k.name)
                .await
                .context("connecting to the Kubernetes API")?,
        ),
        _ => Arc::new(TokenStore::new(hsm.clone())),
    })
}

/// True for a member of a Vault cluster sharing one key store (mode hsm-k8s with raft peers
/// or a raft leader): every member's stick must hold the same key pair.
pub fn ha_member(cfg: &Config) -> bool {
    cfg.mode == Mode::HsmK8s
        && (cfg.vault.raft_leader_address.is_some() || !cfg.vault.raft_peers.is_empty())
}

/// One Vault, one key store.
pub struct Runner {
    cfg: Config,
    vault: Arc<dyn VaultApi>,
    keyring: Keyring,
    hsm: Option<HsmHandle>,
    telemetry: Arc<Telemetry>,
    shutdown: Shutdown,
    vault_was_up: Mutex<Option<(bool, Instant)>>,
    /// Since when Vault has been sealed with keys missing from the store (another initialiser
    /// may be storing them), and whether this process saw its own `sys/init` refused for it.
    short_of_keys: Mutex<Option<(Instant, bool)>>,
    /// The other raft members (`vault.raftPeers`), asked before this Vault is initialised.
    peers: Vec<Arc<dyn VaultApi>>,
    /// The store found missing at the last look (`Secret <ns>/<name>`), reported once per
    /// change.
    store_missing: Mutex<Option<String>>,
    /// The stored keys the last unseal could not read, with why: each is reported once per
    /// change, not on every pass.
    unreadable_seen: Mutex<Vec<(String, String)>>,
    /// Whether a start that finds the shared store missing waits for Vault's answer before
    /// anything creates it (see [`Runner::guarding_the_store`]).
    guard_store: bool,
}

/// How long a raft join may keep failing before it is reported as an error: a follower
/// starting with its cluster cannot join until the leader is initialised and unsealed.
const JOIN_PATIENCE: Duration = Duration::from_secs(120);

/// How the sidecar paces the next pass after `result`. Pure.
fn pace_of(result: &Result<PassOutcome, PassError>) -> Pace {
    match result {
        Ok(PassOutcome::VaultUnreachable) => Pace::Soon,
        Ok(_) => Pace::Period,
        Err(e) if join_failure(e) => Pace::Soon,
        Err(PassError::MissingKeys { unreadable, .. }) if !unreadable.is_empty() => Pace::Slower,
        Err(PassError::WrongKeys { .. }) => Pace::Slower,
        Err(_) => Pace::Period,
    }
}

/// Result of a pass that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassOutcome {
    /// Vault is initialised and unsealed.
    Unsealed,
    /// Vault did not answer.
    VaultUnreachable,
    /// A stop was requested; nothing is left half-done.
    Stopped,
    /// Vault was initialised by another initialiser whose keys are expected in the shared
    /// store (sidecar passes only; `wait` passes look again themselves).
    WaitingForKeys,
}

impl Runner {
    /// Builds a runner. `hsm` (when the token is in use) is re-opened after suspicious
    /// failures.
    pub fn new(
        cfg: Config,
        vault: Arc<dyn VaultApi>,
        keyring: Keyring,
        hsm: Option<HsmHandle>,
        telemetry: Arc<Telemetry>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            cfg,
            vault,
            keyring,
            hsm,
            telemetry,
            shutdown,
            vault_was_up: Mutex::new(None),
            short_of_keys: Mutex::new(None),
            peers: Vec::new(),
            store_missing: Mutex::new(None),
            unreadable_seen: Mutex::new(Vec::new()),
            guard_store: false,
        }
        .with_peer_addresses()
    }

    /// A start that finds the shared store (the Secret) missing asks Vault before the identity
    /// record and the pre-flight would create it afresh: for an initialised Vault that reports
    /// [`PassError::StoreMissing`] instead. The sidecar does this; it starts before its Vault
    /// and runs again in every restarted pod, where a Secret created afresh would hide a
    /// deletion from every member.
    pub fn guarding_the_store(mut self) -> Self {
        self.guard_store = true;
        self
    }

    /// The key store.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Vault's status and, when a decision needs it, the unseal key names in the store (kept
    /// for the unseal that may follow, so the token is listed once per pass).
    async fn observe(&self) -> Result<(Observation, Vec<String>, Option<String>), PassError> {
        let vault = match self.vault.seal_status().await {
            Ok(s) => {
                self.telemetry.vault_status(s.initialized, s.sealed);
                self.note_vault_up(true, None);
                Some(VaultView {
                    initialized: s.initialized,
                    sealed: s.sealed,
                    threshold: s.threshold,
                })
            }
            Err(e @ VaultError::Unreachable { .. }) => {
                self.telemetry.vault_unreachable();
                self.note_vault_up(false, Some(&e));
                None
            }
            Err(e) => return Err(e.into()),
        };
        let follower = self.raft_follower();
        let peer = match vault {
            Some(v) if !v.initialized && !follower => self.initialized_peer().await,
            _ => None,
        };
        let names = if store_needed(vault, follower) {
            Some(self.keyring.unseal_keys().await?)
        } else {
            None
        };
        // A sealed Vault short of keys: is the store there at all? One more read, only then.
        if let (Some(v), Some(names)) = (vault, &names)
            && v.initialized
            && v.sealed
        {
            let absent = if names.len() < (v.threshold as usize).max(1) {
                self.keyring
                    .storage()
                    .absent()
                    .await
                    .map_err(KeyringError::from)?
            } else {
                None
            };
            self.note_store_missing(absent);
        }
        let obs = Observation {
            vault,
            stored_keys: names.as_ref().map(Vec::len),
            raft_follower: follower,
            initialized_peer: peer.is_some(),
            overwrite_existing_keys: self.cfg.options.overwrite_existing_keys,
        };
        Ok((obs, names.unwrap_or_default(), peer))
    }

    /// Logs reachability changes once (with the whole cause) instead of on every poll, and a
    /// reminder every minute while Vault stays unreachable.
    fn note_vault_up(&self, up: bool, err: Option<&VaultError>) {
        if let Ok(mut was) = self.vault_was_up.lock() {
            let now = Instant::now();
            match (*was, up, err) {
                (Some((true, _)), true, _) => return,
                (_, true, _) => {
                    tracing::info!(address = self.vault.address(), "Vault API is answering")
                }
                (Some((false, since)), false, Some(e)) => {
                    if now - since < Duration::from_secs(60) {
                        tracing::debug!(reason = %e, "Vault still unreachable");
                        return;
                    }
                    // Waited for by policy (no connection, a timeout, a gateway error), yet
                    // a minute of it is worth an operator's attention.
                    tracing::warn!(reason = %e, "still waiting for Vault's API");
                }
                (_, false, Some(e)) => tracing::info!(reason = %e, "waiting for Vault's API"),
                (_, false, None) => {}
            }
            *was = Some((up, now));
        }
    }

    /// What a start does before anything else: finish an init journal, then the pre-flight
    /// check of the key store. A Kubernetes API server that does not answer is waited for
    /// here, with backoff and the reason on `/readyz`, instead of ending the process and
    /// leaving the retry to the kubelet's much slower restart back-off. Returns `Ok` early
    /// when a stop is requested meanwhile (the pass that follows then stops at once).
    pub async fn start(&self) -> Result<(), PassError> {
        let mut delays = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let mut waited = false;
        loop {
            match self.start_once().await {
                Err(e) if store_unreachable(&e) && !self.shutdown.requested() => {
                    if !waited {
                        tracing::warn!(error = %crate::vault::error_chain(&e), "the Kubernetes API server is not answering; waiting for it (/readyz reports not ready meanwhile)");
                        waited = true;
                    }
                    self.telemetry
                        .store_problem(Some("Kubernetes API server unreachable"));
                    self.telemetry.heartbeat();
                    if self.shutdown.sleep_or_stop(delays.next()).await.is_stop() {
                        return Ok(());
                    }
                }
                other => {
                    if waited && other.is_ok() {
                        tracing::info!("the Kubernetes API server is answering again");
                    }
                    if waited {
                        self.telemetry.store_problem(None);
                    }
                    return other;
                }
            }
        }
    }

    async fn start_once(&self) -> Result<(), PassError> {
        self.check_store_present().await?;
        if self.shutdown.requested() {
            return Ok(());
        }
        // Before anything is written: a store recording another key pair is refused here.
        self.keyring.check_identity().await?;
        if journal::clear_stale_in_flight(self.journal_dir())? {
            tracing::info!(
                path = %journal::in_flight_path(self.journal_dir()).display(),
                "removed an in-flight marker left by a process stopped during sys/init"
            );
        }
        self.finish_journal().await?;
        self.finish_rekey().await?;
        if self.cfg.options.pre_flight_checks {
            match self.keyring.preflight().await? {
                PreflightOutcome::Read => tracing::info!(
                    key = TEST_KEY,
                    "pre-flight check passed: read and decrypted"
                ),
                PreflightOutcome::Written => tracing::info!(
                    key = TEST_KEY,
                    "pre-flight check passed: written, read back and decrypted"
                ),
            }
        }
        Ok(())
    }

    /// One pass: act until Vault is unsealed, or report why not. With `wait`, an unreachable
    /// Vault is polled with backoff instead of ending the pass. Ends early (`Stopped`) when a
    /// stop was requested, but never between `sys/init` and the journal.
    pub async fn pass(&self, wait: bool) -> Result<PassOutcome, PassError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut joined = false;
        let mut join_refused = false;
        loop {
            if self.shutdown.requested() {
                return Ok(PassOutcome::Stopped);
            }
            // A journal waits for Vault to show it is the journal's Vault; until then no
            // decision is taken on a store that lacks its keys.
            if !self.finish_journal().await? {
                if !wait {
                    return Ok(PassOutcome::VaultUnreachable);
                }
                self.telemetry.heartbeat();
                if self.shutdown.sleep_or_stop(backoff.next()).await.is_stop() {
                    return Ok(PassOutcome::Stopped);
                }
                continue;
            }
            let (obs, names, peer) = self.observe().await?;
            let step = next_step(&obs);
            tracing::debug!(?step, "next step");
            match step {
                Step::WaitForVault if wait => {
                    self.telemetry.heartbeat();
                    if self.shutdown.sleep_or_stop(backoff.next()).await.is_stop() {
                        return Ok(PassOutcome::Stopped);
                    }
                }
                Step::WaitForVault => return Ok(PassOutcome::VaultUnreachable),
                Step::Done => {
                    // Unsealed by whoever initialised it: said once, since a store of this
                    // process's own will never hold the keys to do it again.
                    let beaten = self
                        .short_of_keys
                        .lock()
                        .ok()
                        .and_then(|s| *s)
                        .is_some_and(|(_, beaten)| beaten);
                    self.keys_arrived();
                    if beaten && self.cfg.mode != Mode::HsmK8s {
                        return Err(PassError::InitialisedElsewhere);
                    }
                    return Ok(PassOutcome::Unsealed);
                }
                Step::Initialize => match self.initialize().await {
                    Err(PassError::Vault(VaultError::Status {
                        status: 400,
                        message,
                        ..
                    })) if already_initialised(&message) => {
                        self.keys_missing_since(true);
                        if self.cfg.mode != Mode::HsmK8s {
                            return Err(PassError::InitialisedElsewhere);
                        }
                        tracing::info!(
                            "Vault was initialised by another initialiser meanwhile; waiting for its keys to appear in the shared store"
                        );
                    }
                    other => other?,
                },
                Step::JoinRaft => {
                    if joined {
                        return Err(PassError::JoinFailed(
                            self.cfg
                                .vault
                                .raft_leader_address
                                .clone()
                                .unwrap_or_default(),
                        ));
                    }
                    match self.join().await {
                        // A leader not yet initialised and unsealed refuses members: waited
                        // for when this pass waits (bounded by --deadline), as the sidecar's
                        // next pass does.
                        Err(e) if wait && join_failure(&e) => {
                            if join_refused {
                                tracing::debug!(error = %e, "raft join still failing");
                            } else {
                                tracing::info!(
                                    error = %e,
                                    "could not join the raft cluster yet, as expected while its leader is not yet initialised and unsealed; trying again shortly"
                                );
                                join_refused = true;
                            }
                            self.telemetry.heartbeat();
                            if self.shutdown.sleep_or_stop(backoff.next()).await.is_stop() {
                                return Ok(PassOutcome::Stopped);
                            }
                        }
                        other => {
                            other?;
                            joined = true;
                        }
                    }
                }
                Step::JoinPeer => {
                    let peer = peer.unwrap_or_default();
                    if joined {
                        return Err(PassError::JoinFailed(peer));
                    }
                    tracing::warn!(
                        peer = peer.as_str(),
                        "Vault is not initialised but its raft peer is: this member lost its data; rejoining the cluster instead of initialising"
                    );
                    self.join_to(&peer).await?;
                    joined = true;
                }
                Step::Unseal { threshold } => {
                    let result = self.unseal(threshold as usize, &names).await;
                    self.telemetry.unseal_attempt(result.is_ok());
                    match result {
                        Err(PassError::Vault(VaultError::Unreachable { .. })) if wait => continue,
                        other => other?,
                    }
                }
                Step::RefuseStaleKeys { found } => return Err(PassError::StaleKeys(found)),
                Step::MissingKeys { needed, found } => {
                    let shared = self.cfg.mode == Mode::HsmK8s;
                    // No threshold yet: Vault is being initialised right now, and not by this
                    // process (which never looks while its own sys/init is in flight).
                    let (since, beaten) = self.keys_missing_since(needed == 0);
                    let waited = since.elapsed();
                    match short_of_keys(needed, shared, waited, self.cfg.hsm.token_wait_timeout) {
                        ShortOfKeys::Wait => {
                            tracing::debug!(
                                needed,
                                found,
                                "waiting for another initialiser's keys"
                            );
                            if !wait {
                                return Ok(PassOutcome::WaitingForKeys);
                            }
                            self.telemetry.heartbeat();
                            if self.shutdown.sleep_or_stop(backoff.next()).await.is_stop() {
                                return Ok(PassOutcome::Stopped);
                            }
                        }
                        ShortOfKeys::Fail if beaten && !shared => {
                            return Err(PassError::InitialisedElsewhere);
                        }
                        ShortOfKeys::Fail if beaten => {
                            return Err(PassError::KeysNeverArrived {
                                needed,
                                found,
                                waited,
                            });
                        }
                        ShortOfKeys::Fail => {
                            if let Some(store) = self.missing_store() {
                                return Err(PassError::StoreMissing { store, needed });
                            }
                            return Err(PassError::MissingKeys {
                                needed,
                                found,
                                unreadable: Vec::new(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Sidecar mode: a pass every `unsealPeriod` until a stop is requested; returns early only
    /// on a PIN problem (which the caller waits out).
    pub async fn watch(&self) -> Result<(), PassError> {
        let period = self.cfg.unseal_period;
        self.telemetry
            .set_liveness_window(period * 3 + Duration::from_secs(60));
        let mut last_error: Option<(String, Instant)> = None;
        let mut pacer = Pacer::new(period);
        // Since when a raft join has been failing (expected while the leader starts).
        let mut joining_since: Option<Instant> = None;
        loop {
            self.telemetry.heartbeat();
            let result = self.pass(false).await;
            let pace = pace_of(&result);
            match result {
                Ok(PassOutcome::Stopped) => return Ok(()),
                // Another initialiser's keys are on their way; said once, at INFO, where
                // the race was seen.
                Ok(PassOutcome::WaitingForKeys) => {}
                Ok(outcome) => {
                    if outcome == PassOutcome::Unsealed {
                        joining_since = None;
                    }
                    if last_error.take().is_some() {
                        tracing::info!("unseal pass succeeded again");
                    }
                }
                Err(e) if e.pin_failure().is_some() || e.is_fatal() => return Err(e),
                Err(e) if join_failure(&e) && self.join_patience(&mut joining_since, &e) => {}
                Err(e) => {
                    if e.suspects_token()
                        && let Some(hsm) = &self.hsm
                    {
                        let _ = hsm.with(|h| h.reset_session()).await;
                    }
                    let text = e.to_string();
                    let now = Instant::now();
                    let repeat = matches!(&last_error, Some((t, at)) if *t == text && now - *at < Duration::from_secs(300));
                    if !repeat {
                        let retry = match pace {
                            Pace::Slower => format!(
                                "retrying after unsealPeriod, then less and less often (at most every {})",
                                humantime::format_duration(crate::unseal::SLOWEST.max(period))
                            ),
                            Pace::Soon => "retrying shortly".to_owned(),
                            Pace::Period => "retrying every unsealPeriod".to_owned(),
                        };
                        tracing::error!(error = %text, "unseal pass failed; {retry}");
                        last_error = Some((text, now));
                    }
                }
            }
            let pause = pacer.next(pace);
            tracing::debug!(
                ?pace,
                retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "next pass"
            );
            self.telemetry.heartbeat();
            if self.shutdown.sleep_or_stop(pause).await.is_stop() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests;
