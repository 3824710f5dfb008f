//! Drives Vault: opening the key store, then passes of observe → decide → act, once
//! (`--once`) or for ever (sidecar). Decisions come from [`crate::unseal`]; this file holds the
//! I/O and the ordering guarantees:
//!
//! - `sys/init`'s keys are sealed on the host and written to the [`journal`] before anything
//!   else, stored and verified one by one, and the journal is removed only after the last;
//!   every pass first finishes a journal it finds.
//! - Nothing is unsealed before every key is stored.
//! - A pass with Vault unsealed touches neither the token nor the Kubernetes API.

use crate::config::{Config, Mode};
use crate::hsm::HsmError;
use crate::hsm::PinFailure;
use crate::hsm_actor::HsmHandle;
use crate::journal::{self, EntryAction, Journal, JournalError};
use crate::keypair;
use crate::keyring::{Keyring, KeyringError, PreflightOutcome, ROOT_KEY, TEST_KEY};
use crate::secret::Secret;
use crate::secret_store::SecretStore;
use crate::shutdown::Shutdown;
use crate::storage::Storage;
use crate::telemetry::Telemetry;
use crate::token_store::TokenStore;
use crate::unseal::{Observation, Step, VaultView, init_storage_plan, next_step, store_needed};
use crate::vault::{VaultClient, VaultError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why a pass did not end with Vault unsealed.
#[derive(Debug, Error)]
pub enum PassError {
    /// The key store failed.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// Vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The init journal could not be read or written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Vault is uninitialised but the store holds another Vault's keys.
    #[error(
        "Vault is not initialised but the store already holds {0} unseal key(s), probably of an earlier Vault; refusing to initialise (remove them with `unseal-init hsm delete`, or set options.overwriteExistingKeys)"
    )]
    StaleKeys(usize),
    /// Not enough readable keys to unseal.
    #[error("Vault is sealed and needs {needed} unseal keys but the store holds {found} readable ones{}", unreadable_note(.unreadable))]
    MissingKeys {
        /// Needed.
        needed: u32,
        /// Readable keys found.
        found: usize,
        /// Keys present but not decryptable.
        unreadable: Vec<String>,
    },
    /// The stored keys do not unseal this Vault.
    #[error(
        "Vault is still sealed after submitting {submitted} stored unseal keys: the keys in the store do not belong to this Vault ({detail})"
    )]
    WrongKeys {
        /// Keys submitted.
        submitted: usize,
        /// Vault's last answer.
        detail: String,
    },
    /// Vault was initialised and not every key is stored yet; the journal holds the rest.
    #[error(
        "Vault was initialised but {} of its keys are not stored yet ({}); they are safe in the init journal {} and the next pass or start stores them: {cause}",
        .remaining.len(), .remaining.join(", "), .journal.display()
    )]
    InitPending {
        /// Names not stored yet.
        remaining: Vec<String>,
        /// The journal holding them.
        journal: PathBuf,
        /// Why storing stopped.
        cause: KeyringError,
    },
    /// `sys/init` answered with something that cannot be kept whole.
    #[error("Vault's sys/init answer is not what was asked for: {0}")]
    InitAnswer(String),
    /// Raft join did not succeed.
    #[error("raft join to {0} did not complete")]
    JoinFailed(String),
}

fn unreadable_note(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (unreadable: {})", names.join(", "))
    }
}

impl PassError {
    /// The PIN problem behind this error, if any: the only kind no later pass can fix.
    pub fn pin_failure(&self) -> Option<PinFailure> {
        match self {
            PassError::Keyring(k) | PassError::InitPending { cause: k, .. } => k.pin_failure(),
            _ => None,
        }
    }

    /// True when the token may be in a stale state worth re-opening before the next pass.
    pub fn suspects_token(&self) -> bool {
        match self {
            PassError::MissingKeys { .. } => true,
            PassError::Keyring(k) | PassError::InitPending { cause: k, .. } => {
                k.hsm().is_some_and(HsmError::is_transient)
            }
            _ => false,
        }
    }
}

/// The token, the key store on it (or in a Secret), and what was found there.
pub struct Opened {
    /// The HSM thread.
    pub hsm: HsmHandle,
    /// The key store.
    pub keyring: Keyring,
}

/// Opens the token (waiting for it: up to `token_wait`, or until `shutdown` without one),
/// logs in, finds (or generates) the key pair, picks the scheme and the storage backend.
pub async fn open_keyring(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
    shutdown: &Shutdown,
    token_wait: Option<Duration>,
) -> anyhow::Result<Opened> {
    use anyhow::Context;
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
    let generate = cfg.hsm.generate_key;
    let (key, info) = hsm
        .call("find_key", move |h| keypair::ensure(h, generate))
        .await?;
    tracing::info!(
        label = info.label,
        id = info.id_hex,
        bits = info.bits,
        "found RSA key pair in HSM"
    );
    tracing::info!("the HSM decrypts only; encrypting on the host with the extracted public key");
    let probe_key = key.clone();
    let scheme = hsm
        .call("probe_scheme", move |h| {
            keypair::probe_scheme(h, &probe_key)
        })
        .await?;
    let storage: Arc<dyn Storage> = match (cfg.mode, &cfg.kubernetes) {
        (Mode::HsmK8s, Some(k)) => Arc::new(
            SecretStore::connect(k.namespace.as_deref(), &k.name)
                .await
                .context("connecting to the Kubernetes API")?,
        ),
        _ => Arc::new(TokenStore::new(hsm.clone())),
    };
    tracing::info!(storage = storage.kind(), "storage backend");
    let keyring = Keyring::new(Arc::new(hsm.clone()), key, scheme, storage);
    Ok(Opened { hsm, keyring })
}

/// One Vault, one key store.
pub struct Runner {
    cfg: Config,
    vault: VaultClient,
    keyring: Keyring,
    hsm: Option<HsmHandle>,
    telemetry: Arc<Telemetry>,
    shutdown: Shutdown,
    vault_was_up: Mutex<Option<(bool, Instant)>>,
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
}

impl Runner {
    /// Builds a runner. `hsm` (when the token is in use) is re-opened after suspicious
    /// failures.
    pub fn new(
        cfg: Config,
        vault: VaultClient,
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
        }
    }

    /// The key store.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn raft_follower(&self) -> bool {
        self.cfg
            .vault
            .raft_leader_address
            .as_deref()
            .is_some_and(|l| l.trim_end_matches('/') != self.vault.address())
    }

    /// Vault's status and, when a decision needs it, the unseal key names in the store (kept
    /// for the unseal that may follow, so the token is listed once per pass).
    async fn observe(&self) -> Result<(Observation, Vec<String>), PassError> {
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
        let names = if store_needed(vault, follower) {
            Some(self.keyring.unseal_keys().await?)
        } else {
            None
        };
        let obs = Observation {
            vault,
            stored_keys: names.as_ref().map(Vec::len),
            raft_follower: follower,
            overwrite_existing_keys: self.cfg.options.overwrite_existing_keys,
        };
        Ok((obs, names.unwrap_or_default()))
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
                    tracing::info!(reason = %e, "still waiting for Vault's API");
                }
                (_, false, Some(e)) => tracing::info!(reason = %e, "waiting for Vault's API"),
                (_, false, None) => {}
            }
            *was = Some((up, now));
        }
    }

    /// What a start does before anything else: finish an init journal, then the pre-flight
    /// check of the key store.
    pub async fn start(&self) -> Result<(), PassError> {
        self.finish_journal().await?;
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
        let mut backoff = Duration::from_millis(200);
        let mut joined = false;
        self.finish_journal().await?;
        loop {
            if self.shutdown.requested() {
                return Ok(PassOutcome::Stopped);
            }
            let (obs, names) = self.observe().await?;
            let step = next_step(&obs);
            tracing::debug!(?step, "next step");
            match step {
                Step::WaitForVault if wait => {
                    self.telemetry.heartbeat();
                    if self.shutdown.sleep_or_stop(backoff).await.is_stop() {
                        return Ok(PassOutcome::Stopped);
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Step::WaitForVault => return Ok(PassOutcome::VaultUnreachable),
                Step::Done => return Ok(PassOutcome::Unsealed),
                Step::Initialize => self.initialize().await?,
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
                    self.join().await?;
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
                    return Err(PassError::MissingKeys {
                        needed,
                        found,
                        unreadable: Vec::new(),
                    });
                }
            }
        }
    }

    fn journal_dir(&self) -> &std::path::Path {
        &self.cfg.journal_dir
    }

    /// Stores whatever an earlier run left in the init journal, then removes it.
    pub async fn finish_journal(&self) -> Result<(), PassError> {
        let Some(j) = journal::read(self.journal_dir())? else {
            return Ok(());
        };
        tracing::info!(
            path = %journal::path(self.journal_dir()).display(),
            entries = j.entries.len(),
            vault = j.vault.as_str(),
            "resuming init journal"
        );
        self.complete(&j).await
    }

    /// Stores every journal entry, verifying each, and removes the journal after the last.
    /// A failing store (a stick pulled, the API server away) is retried for up to
    /// `hsm.tokenWaitTimeout`; after that, or on a PIN problem or a stop request, the journal
    /// stays for the next pass or start.
    async fn complete(&self, j: &Journal) -> Result<(), PassError> {
        let give_up = Instant::now() + self.cfg.hsm.token_wait_timeout;
        for (i, entry) in j.entries.iter().enumerate() {
            let mut delay = Duration::from_millis(500);
            let mut attempt = 1;
            loop {
                self.telemetry.heartbeat();
                let cause = match self.store_entry(&entry.name, &entry.sealed).await {
                    Ok(()) => break,
                    Err(cause) => cause,
                };
                let remaining: Vec<String> =
                    j.entries[i..].iter().map(|e| e.name.clone()).collect();
                let retry = cause.pin_failure().is_none()
                    && !self.shutdown.requested()
                    && Instant::now() + delay < give_up;
                if !retry {
                    if self.shutdown.requested() {
                        tracing::warn!(
                            remaining = remaining.join(", ").as_str(),
                            "stopping with keys not stored yet; they are safe in the init journal"
                        );
                    }
                    return Err(PassError::InitPending {
                        remaining,
                        journal: journal::path(self.journal_dir()),
                        cause,
                    });
                }
                tracing::error!(
                    key = entry.name.as_str(),
                    attempt,
                    error = %cause,
                    retry_in = ?delay,
                    "storing a key of the just-initialised Vault failed; it is safe in the init journal; retrying until it succeeds"
                );
                if self.shutdown.sleep_or_stop(delay).await.is_stop() {
                    continue;
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                attempt += 1;
            }
            if entry.name == ROOT_KEY {
                tracing::info!(key = entry.name.as_str(), "root token stored in key store");
            } else {
                tracing::info!(key = entry.name.as_str(), "unseal key stored in key store");
            }
        }
        journal::remove(self.journal_dir())?;
        tracing::info!("init journal complete; removed");
        Ok(())
    }

    async fn store_entry(&self, name: &str, sealed: &[u8]) -> Result<(), KeyringError> {
        let stored = self.keyring.storage().get(name).await?;
        match journal::entry_action(stored.as_deref(), sealed) {
            EntryAction::KeepNewer => {
                tracing::warn!(
                    key = name,
                    "the store holds a value written after the init journal; keeping it"
                );
                Ok(())
            }
            EntryAction::AlreadyStored | EntryAction::Write => {
                self.keyring.store_sealed(name, sealed, None).await
            }
        }
    }

    async fn initialize(&self) -> Result<(), PassError> {
        let o = self.cfg.options;
        // Before Vault hands out keys, make sure they will have somewhere durable to go.
        journal::check_writable(self.journal_dir())?;
        tracing::info!(
            shares = o.secret_shares,
            threshold = o.secret_threshold,
            "initializing vault"
        );
        // Never raced against a stop request or a timeout: dropping this request would not
        // stop Vault from initialising, and its answer is the only copy of the keys.
        let result = self.vault.init(o.secret_shares, o.secret_threshold).await?;
        self.telemetry.vault_init();
        tracing::info!(
            keys = result.keys.len(),
            "sys/init answered; encrypting the keys on the host"
        );
        let problems = result.problems(o.secret_shares);
        let mut values: Vec<&Secret> = result.keys.iter().collect();
        if o.store_root_token && !result.root_token.is_empty() {
            values.push(&result.root_token);
        }
        let plan = init_storage_plan(result.keys.len(), o.store_root_token);
        let mut entries = Vec::with_capacity(values.len());
        let mut unsealable = Vec::new();
        for (name, value) in plan.iter().zip(values) {
            match self.keyring.seal(name, value) {
                Ok(sealed) => entries.push(journal::Entry {
                    name: name.clone(),
                    sealed,
                }),
                Err(e) => unsealable.push(e.to_string()),
            }
        }
        // The clear values are not needed any more; dropping zeroes them.
        drop(result);
        let j = Journal {
            vault: self.vault.address().to_owned(),
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            entries,
        };
        if !j.entries.is_empty() {
            self.write_journal_or_store(&j).await?;
        }
        if !problems.is_empty() || !unsealable.is_empty() {
            let all: Vec<String> = problems.into_iter().chain(unsealable).collect();
            tracing::error!(
                problems = all.join("; ").as_str(),
                "Vault's sys/init answer does not match the request; every key it returned that could be encrypted is being stored"
            );
            if !j.entries.is_empty() {
                self.complete(&j).await?;
            }
            return Err(PassError::InitAnswer(all.join("; ")));
        }
        self.complete(&j).await?;
        if o.overwrite_existing_keys {
            self.remove_stale_keys(usize::from(o.secret_shares)).await?;
        }
        Ok(())
    }

    /// After an init that replaced an earlier Vault's keys, removes that Vault's
    /// `vault-unseal-N` beyond the new share count: they unseal nothing any more.
    async fn remove_stale_keys(&self, shares: usize) -> Result<(), PassError> {
        for name in self.keyring.unseal_keys().await? {
            if crate::keyring::unseal_key_index(&name).is_some_and(|i| i >= shares) {
                let removed = self
                    .keyring
                    .storage()
                    .delete(&name)
                    .await
                    .map_err(KeyringError::from)?;
                tracing::info!(
                    key = name.as_str(),
                    removed,
                    "removed an earlier Vault's unseal key"
                );
            }
        }
        Ok(())
    }

    /// Writes the journal. Should that fail although the directory took a write moments ago
    /// (disk full, volume gone), this process holds the only copy of the keys: it then stores
    /// them directly and retries — both the journal and the store — until one of them holds
    /// them, never giving up and never returning with the keys only in memory.
    async fn write_journal_or_store(&self, j: &Journal) -> Result<(), PassError> {
        let mut delay = Duration::from_millis(500);
        loop {
            match journal::write(self.journal_dir(), j) {
                Ok(path) => {
                    tracing::info!(path = %path.display(), entries = j.entries.len(), "init journal written");
                    return Ok(());
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot write the init journal; storing the keys directly and retrying until the journal or the store holds them"
                ),
            }
            let mut all_stored = true;
            for entry in &j.entries {
                self.telemetry.heartbeat();
                if let Err(e) = self.store_entry(&entry.name, &entry.sealed).await {
                    tracing::error!(key = entry.name.as_str(), error = %e, "storing a key without a journal failed; retrying");
                    all_stored = false;
                    break;
                }
            }
            if all_stored {
                tracing::info!("every key stored without the journal");
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn join(&self) -> Result<(), PassError> {
        let leader = self
            .cfg
            .vault
            .raft_leader_address
            .clone()
            .unwrap_or_default();
        let ca = match &self.cfg.vault.ca_cert {
            Some(p) => std::fs::read_to_string(p).ok(),
            None => None,
        };
        tracing::info!(leader = leader.as_str(), "joining leader vault...");
        if !self.vault.raft_join(&leader, ca.as_deref()).await? {
            return Err(PassError::JoinFailed(leader));
        }
        // The follower reports itself initialised once the join took; give it a moment.
        for _ in 0..50 {
            if let Ok(s) = self.vault.seal_status().await
                && s.initialized
            {
                tracing::info!(leader = leader.as_str(), "joined raft leader");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(PassError::JoinFailed(leader))
    }

    /// Submits stored keys until Vault is unsealed: any `threshold` readable keys will do, so
    /// one unreadable value (corrupted, written with another key) does not block the rest.
    async fn unseal(&self, threshold: usize, names: &[String]) -> Result<(), PassError> {
        tracing::info!("vault is sealed, unsealing");
        self.vault.unseal_reset().await?;
        let mut submitted = 0;
        let mut unreadable = Vec::new();
        let mut last = String::from("no answer");
        for name in names {
            if submitted == threshold {
                break;
            }
            let key = match self.keyring.load(name).await {
                Ok(Some(k)) => k,
                Ok(None) => continue,
                Err(e) if e.is_about_the_value() => {
                    tracing::warn!(key = name.as_str(), error = %e, "skipping unreadable unseal key");
                    unreadable.push(name.clone());
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            submitted += 1;
            match self.vault.unseal(&key).await {
                Ok(status) if !status.sealed => {
                    self.telemetry.vault_status(status.initialized, false);
                    tracing::info!("successfully unsealed vault");
                    return Ok(());
                }
                Ok(status) => last = format!("progress {}/{}", status.progress, status.threshold),
                Err(VaultError::Status {
                    status, message, ..
                }) => {
                    let _ = self.vault.unseal_reset().await;
                    return Err(PassError::WrongKeys {
                        submitted,
                        detail: format!("HTTP {status}: {message}"),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        if submitted < threshold {
            let _ = self.vault.unseal_reset().await;
            return Err(PassError::MissingKeys {
                needed: u32::try_from(threshold).unwrap_or(u32::MAX),
                found: submitted,
                unreadable,
            });
        }
        // A raft follower finishes joining after the last key and only then reports unsealed.
        for _ in 0..75 {
            match self.vault.seal_status().await {
                Ok(s) if !s.sealed => {
                    self.telemetry.vault_status(s.initialized, false);
                    tracing::info!("successfully unsealed vault");
                    return Ok(());
                }
                Ok(s) if s.progress > 0 => break,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let _ = self.vault.unseal_reset().await;
        Err(PassError::WrongKeys {
            submitted,
            detail: last,
        })
    }

    /// Sidecar mode: a pass every `unsealPeriod` until a stop is requested; returns early only
    /// on a PIN problem (which the caller waits out).
    pub async fn watch(&self) -> Result<(), PassError> {
        let period = self.cfg.unseal_period;
        self.telemetry
            .set_liveness_window(period * 3 + Duration::from_secs(60));
        let mut last_error: Option<(String, Instant)> = None;
        loop {
            self.telemetry.heartbeat();
            match self.pass(false).await {
                Ok(PassOutcome::Stopped) => return Ok(()),
                Ok(_) => {
                    if last_error.take().is_some() {
                        tracing::info!("unseal pass succeeded again");
                    }
                }
                Err(e) if e.pin_failure().is_some() => return Err(e),
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
                        tracing::error!(error = %text, "unseal pass failed; retrying every unsealPeriod");
                        last_error = Some((text, now));
                    }
                }
            }
            self.telemetry.heartbeat();
            if self.shutdown.sleep_or_stop(period).await.is_stop() {
                return Ok(());
            }
        }
    }
}
