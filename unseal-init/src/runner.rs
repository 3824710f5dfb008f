//! Drives Vault: opening the key store, then passes of observe → decide → act, once
//! (`--once`) or for ever (sidecar). Decisions come from [`crate::unseal`]; this module holds
//! the I/O and the ordering guarantees (the init step, from `sys/init` to the last stored key,
//! in `runner/init.rs`):
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
use crate::hsm::PinFailure;
use crate::hsm_actor::HsmHandle;
use crate::journal::{self, JournalError};
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
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

mod init;
pub mod rekey;
pub mod rotate;

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
        "Vault is not initialised but the store already holds {0} unseal key(s), probably of an earlier Vault; refusing to initialise. If this is a member of a raft cluster that lost its data, list the other members in vault.raftPeers and it rejoins them once one answers (initialising here would start a second cluster and replace the first one's keys in a shared store); only if those keys belong to no running Vault, remove them with `unseal-init hsm delete`, or set options.overwriteExistingKeys"
    )]
    StaleKeys(usize),
    /// Not enough readable keys to unseal.
    #[error("{}", missing_keys_text(*.needed, *.found, .unreadable))]
    MissingKeys {
        /// Needed.
        needed: u32,
        /// Readable keys found.
        found: usize,
        /// Keys present but not decryptable.
        unreadable: Vec<String>,
    },
    /// Vault is sealed and the store itself is gone (a deleted Secret), not merely short of
    /// keys.
    #[error(
        "Vault is sealed and needs {} unseal keys, but {store} not found: the store of the encrypted unseal keys was deleted (or never created under this name and namespace), and this Vault's keys exist nowhere else. Members of this Vault that are still unsealed keep serving: do not restart them. Restore the Secret from a backup (e.g. `kubectl apply -f` a saved copy of it): this sidecar then unseals Vault at its next pass. Without a copy, the still-unsealed members are the last way into the data: take a raft snapshot from one of them (`vault operator raft snapshot save`) before they reseal",
        threshold_text(*.needed)
    )]
    StoreMissing {
        /// What is gone (`Secret <namespace>/<name>`).
        store: String,
        /// Keys needed.
        needed: u32,
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
    #[error("Vault's sys/init answer does not match the request: {0}")]
    InitAnswer(String),
    /// `sys/init` was sent and its connection broke before the answer arrived.
    #[error(
        "Vault may have initialised; its keys are lost: sys/init was sent but no answer arrived ({cause}). {now}. Vault hands its keys out only in that answer, so nothing can recover them. What to do: check `vault status` once Vault is back; if it reports Initialized true, nobody holds its keys and it can never be unsealed: stop it, delete its data (the raft directory on its volume) and start it again so that unseal-init initialises it afresh; if it reports Initialized false, start unseal-init again and it initialises Vault"
    )]
    InitLost {
        /// The transport failure.
        cause: String,
        /// What Vault reported right after.
        now: String,
    },
    /// The init journal was written for another Vault.
    #[error(
        "the init journal {journal} does not belong to this Vault: {why}. It is kept untouched and nothing was stored from it. If it is this Vault under another address, set vault.address back to the journal's; otherwise move the file away (it holds the other Vault's keys, encrypted)"
    )]
    JournalForeign {
        /// The journal.
        journal: PathBuf,
        /// Why.
        why: String,
    },
    /// Finishing the journal would overwrite a value someone stored after the init.
    #[error(
        "the store holds a different `{name}` than the one found when Vault was initialised; refusing to overwrite it with the init journal {journal}'s value (both are kept: compare them, e.g. with `unseal-init hsm list`, before removing either)"
    )]
    JournalConflict {
        /// The name.
        name: String,
        /// The journal.
        journal: PathBuf,
    },
    /// The key pair cannot encrypt an unseal key: initialising would lose them.
    #[error(
        "refusing to initialise Vault: the {bits}-bit HSM key with {scheme} encrypts at most {capacity} bytes, but Vault's unseal keys are up to {UNSEAL_KEY_MAX_LEN} characters; use an RSA key of 2048 bits or more"
    )]
    KeyTooSmall {
        /// Key size.
        bits: usize,
        /// Scheme for new values.
        scheme: &'static str,
        /// Longest value it encrypts.
        capacity: usize,
    },
    /// Raft join did not succeed.
    #[error("raft join to {0} did not complete")]
    JoinFailed(String),
    /// Another initialiser won the race to `sys/init`, and its keys cannot reach this store.
    #[error(
        "Vault was initialised by someone else (another unseal-init, or an operator) just as this one was about to: its keys went to whoever initialised it, and this store (mode hsm: data objects on this process's own token) can never receive them. Run one initialiser per Vault in mode hsm, or give every initialiser one shared Secret (mode hsm-k8s), where the others wait for the keys"
    )]
    InitialisedElsewhere,
    /// Vault was initialised elsewhere, and its keys did not reach the shared store in time.
    #[error(
        "Vault was initialised by another initialiser and is sealed, but its keys did not appear in the shared store within {}: it needs {needed} and the store holds {found} readable ones; check the other initialiser's log (its keys may have been lost)",
        humantime::format_duration(*.waited)
    )]
    KeysNeverArrived {
        /// Needed.
        needed: u32,
        /// Readable keys found.
        found: usize,
        /// How long this run waited.
        waited: Duration,
    },
}

/// Longest unseal key Vault hands out: a 32-byte key plus the Shamir share's byte, in hex.
const UNSEAL_KEY_MAX_LEN: usize = 66;
/// Room a root token may need: Vault 1.10+ tokens (`hvs.…`) run to about 100 characters.
const ROOT_TOKEN_ROOM: usize = 128;

/// True when `err` comes from a Kubernetes API server that did not answer (no connection, a
/// timeout, 429 or a 5xx): waiting fixes it, as it fixes a Vault that is not up yet. A
/// refusal (403, a rejected certificate) is not waited for.
pub fn store_unreachable(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(k) = e.downcast_ref::<kube::Error>() {
            return match k {
                kube::Error::Api(status) => status.code == 429 || status.code >= 500,
                kube::Error::Service(_) | kube::Error::HyperError(_) => {
                    !crate::vault::error_chain(k)
                        .to_ascii_lowercase()
                        .contains("certificate")
                }
                _ => false,
            };
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod store_unreachable_tests {
    use super::store_unreachable;
    use kube::core::Status;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("answer", "Reason").with_code(code).boxed())
    }

    #[test]
    fn only_an_api_server_that_does_not_answer_is_waited_for() {
        for code in [429, 500, 503, 504] {
            assert!(store_unreachable(&api(code)), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 422] {
            assert!(!store_unreachable(&api(code)), "{code}");
        }
        let refused = kube::Error::Service("client error (Connect): Connection refused".into());
        assert!(store_unreachable(&refused));
        let untrusted = kube::Error::Service("invalid peer certificate: UnknownIssuer".into());
        assert!(!store_unreachable(&untrusted));
        assert!(!store_unreachable(
            &kube::Error::LinesCodecMaxLineLengthExceeded
        ));
        // Found below the wrappers the store puts around it.
        let wrapped = anyhow::Error::new(api(503)).context("reading the Secret");
        assert!(store_unreachable(wrapped.as_ref()));
    }
}

fn threshold_text(needed: u32) -> String {
    if needed == 0 {
        "its (not yet reported) number of".to_owned()
    } else {
        needed.to_string()
    }
}

/// The text of [`PassError::MissingKeys`]: an empty store says what that most likely means,
/// since "needs 3 unseal keys but the store holds 0" alone reads like a wait.
fn missing_keys_text(needed: u32, found: usize, unreadable: &[String]) -> String {
    if found == 0 && unreadable.is_empty() {
        let threshold = if needed == 0 {
            " (it reports no key threshold: an init started and never completed its answer)"
                .to_owned()
        } else {
            format!(" (it needs {needed})")
        };
        return format!(
            "Vault is initialised and sealed but the store holds none of its unseal keys{threshold}: the keys were probably lost (a sys/init whose answer never reached the store, e.g. the process was killed during it, or the keys were removed since); Vault hands them out only once, so nothing can recover them from it. If this Vault holds no data yet, stop it, delete its data (the raft directory on its volume) and start it again so that unseal-init initialises it afresh; otherwise restore the store from a backup"
        );
    }
    format!(
        "Vault is sealed and needs {needed} unseal keys but the store holds {found} readable ones{}",
        unreadable_note(unreadable)
    )
}

fn unreadable_note(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (unreadable: {})", names.join(", "))
    }
}

impl PassError {
    /// True for errors after which the program must exit non-zero even when a stop was
    /// requested: keys were lost, and exiting 0 would hide it.
    pub fn is_fatal(&self) -> bool {
        matches!(self, PassError::InitLost { .. })
    }

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

/// True for a failed raft join: expected while the leader is not yet able to take members
/// (OpenBao answers `HTTP 500: failed to get raft challenge` on every cold start).
fn join_failure(err: &PassError) -> bool {
    matches!(
        err,
        PassError::JoinFailed(_)
            | PassError::Vault(VaultError::Status {
                endpoint: "sys/storage/raft/join",
                ..
            })
    )
}

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

    /// Records that keys are missing (`beaten`: because another initialiser won `sys/init`);
    /// returns since when, and whether an init was lost to another initialiser meanwhile.
    fn keys_missing_since(&self, beaten: bool) -> (Instant, bool) {
        let mut since = self
            .short_of_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = since.get_or_insert((Instant::now(), false));
        entry.1 |= beaten;
        *entry
    }

    fn keys_arrived(&self) {
        if let Ok(mut since) = self.short_of_keys.lock() {
            *since = None;
        }
    }

    /// Clients for `vault.raftPeers`, trusting the same CA as Vault's own. A peer whose client
    /// cannot be built (the CA file, already checked for Vault's own client) is left out with
    /// a warning rather than stopping the unseal of this Vault.
    fn with_peer_addresses(mut self) -> Self {
        for address in &self.cfg.vault.raft_peers {
            match crate::vault::VaultClient::new(address, self.cfg.vault.ca_cert.as_deref()) {
                Ok(client) => self.peers.push(Arc::new(client)),
                Err(e) => tracing::warn!(peer = address.as_str(), error = %e, "raft peer left out"),
            }
        }
        self
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

    /// Replaces the raft peers (tests use in-memory Vaults).
    pub fn with_peers(mut self, peers: Vec<Arc<dyn VaultApi>>) -> Self {
        self.peers = peers;
        self
    }

    /// The first raft peer that answers initialised. Peers that do not answer are skipped: on
    /// a cluster's first start the others are not up yet (a StatefulSet starts them after this
    /// one), and only a peer that answers initialised proves a cluster exists.
    async fn initialized_peer(&self) -> Option<String> {
        for peer in &self.peers {
            match peer.seal_status().await {
                Ok(s) if s.initialized => return Some(peer.address().to_owned()),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(peer = peer.address(), reason = %e, "raft peer not answering")
                }
            }
        }
        None
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
    async fn observe(&self) -> Result<(Observation, Vec<String>, Option<String>), PassError> {
        let vault = match self.vault.seal_status().await {
            Ok(s) => {
                self.telemetry.vault_status(s.initialized, s.sealed);
                self.note_vault_up(true, None);
                if s.initialized && !s.sealed && self.missing_store().is_some() {
                    // Serving: the pod stays ready; the metric and the log keep the news.
                    self.telemetry.store_problem(None);
                }
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

    /// Reports a store that went missing (or came back) once per change: log, `/readyz`, and
    /// `unseal_init_key_store_missing`.
    fn note_store_missing(&self, now: Option<String>) {
        let Ok(mut was) = self.store_missing.lock() else {
            return;
        };
        // Every time, since an unsealed Vault clears the readiness reason meanwhile.
        self.telemetry.store_missing(now.as_deref());
        if *was == now {
            return;
        }
        match &now {
            Some(what) => tracing::warn!(
                store = what.as_str(),
                "{what} not found: the store of this Vault's encrypted unseal keys is gone; once sealed, Vault cannot be unsealed until the Secret is restored (from a backup)"
            ),
            None => tracing::info!(
                store = was.as_deref().unwrap_or_default(),
                "the key store is there again"
            ),
        }
        *was = now;
    }

    /// Before the identity record and the pre-flight write to a shared store (and so create a
    /// Secret that does not exist): a missing Secret is right on a first start, but for an
    /// initialised Vault it held the keys, and a Secret created afresh would hide that it was
    /// deleted. So when it is missing, Vault's answer is awaited first: initialised means
    /// [`PassError::StoreMissing`], reported like a deletion found later.
    async fn check_store_present(&self) -> Result<(), PassError> {
        let storage = self.keyring.storage();
        // An init journal is finished into the store whatever happened to it: its keys exist
        // nowhere else.
        if !self.guard_store || !storage.shared() || journal::path(self.journal_dir()).exists() {
            return Ok(());
        }
        let Some(what) = storage.absent().await.map_err(KeyringError::from)? else {
            if self.missing_store().is_some() {
                self.note_store_missing(None);
            }
            return Ok(());
        };
        // Short pauses: `/healthz` expects a heartbeat within a minute before the pass loop runs.
        let mut delays = Backoff::new(crate::unseal::SOON_FIRST, Duration::from_secs(5));
        loop {
            match self.vault.seal_status().await {
                Ok(s) if !s.initialized => return Ok(()),
                Ok(s) => {
                    self.telemetry.vault_status(s.initialized, s.sealed);
                    self.note_store_missing(Some(what.clone()));
                    if !s.sealed {
                        // Serving: the pod stays ready; the metric and the log keep the news.
                        self.telemetry.store_problem(None);
                    }
                    return Err(PassError::StoreMissing {
                        store: what,
                        needed: s.threshold,
                    });
                }
                Err(e @ VaultError::Unreachable { .. }) => {
                    self.telemetry.vault_unreachable();
                    self.note_vault_up(false, Some(&e));
                }
                // Nothing to tell from (a rejected certificate, an error answer): the start
                // goes on as without this check, and the passes report Vault's problem.
                Err(e) => {
                    tracing::debug!(error = %e, "Vault's state unknown; the key store is created if needed");
                    return Ok(());
                }
            }
            self.telemetry.heartbeat();
            if self.shutdown.sleep_or_stop(delays.next()).await.is_stop() {
                return Ok(());
            }
        }
    }

    fn missing_store(&self) -> Option<String> {
        self.store_missing.lock().ok().and_then(|s| s.clone())
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
                    if waited && !matches!(other, Err(PassError::StoreMissing { .. })) {
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

    async fn join(&self) -> Result<(), PassError> {
        let leader = self
            .cfg
            .vault
            .raft_leader_address
            .clone()
            .unwrap_or_default();
        self.join_to(&leader).await
    }

    /// Joins this Vault to the raft cluster `leader` belongs to.
    async fn join_to(&self, leader: &str) -> Result<(), PassError> {
        let leader = leader.to_owned();
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
        let before = self
            .unreadable_seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let mut seen = Vec::new();
        let result = self.submit_keys(threshold, names, &before, &mut seen).await;
        if let Ok(mut s) = self.unreadable_seen.lock() {
            *s = seen;
        }
        result
    }

    /// [`Runner::unseal`]'s work; `seen` collects the keys found unreadable (and why), and
    /// those already in `before` are not reported again.
    async fn submit_keys(
        &self,
        threshold: usize,
        names: &[String],
        before: &[(String, String)],
        seen: &mut Vec<(String, String)>,
    ) -> Result<(), PassError> {
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
                    let entry = (name.clone(), e.to_string());
                    // The same key failing the same way again is no news.
                    if before.contains(&entry) {
                        tracing::debug!(key = name.as_str(), error = %e, "unseal key still unreadable");
                    } else {
                        tracing::warn!(key = name.as_str(), error = %e, "skipping unreadable unseal key");
                    }
                    seen.push(entry);
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

    /// A failed raft join within [`JOIN_PATIENCE`] of the first: reported at INFO the first
    /// time (a follower starting with its cluster meets it on every cold start), at DEBUG
    /// after, and true; false once it has failed for longer, so it is reported as an error.
    fn join_patience(&self, since: &mut Option<Instant>, err: &PassError) -> bool {
        match since {
            None => {
                *since = Some(Instant::now());
                tracing::info!(
                    error = %err,
                    "could not join the raft cluster yet, as expected while its leader is not yet initialised and unsealed; trying again shortly"
                );
            }
            Some(first) if first.elapsed() < JOIN_PATIENCE => {
                tracing::debug!(error = %err, "raft join still failing");
            }
            Some(_) => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Overrides;
    use crate::config::{self, Env, FileConfig};
    use crate::envelope::Scheme;
    use crate::journal::Journal;
    use crate::keyring::soft::{self, SoftDecrypter};
    use crate::keyring::{ROOT_KEY, unseal_key_name};
    use crate::memory_vault::MemoryVault;
    use crate::secret::Secret;
    use crate::storage::memory::MemoryStore;
    use std::sync::atomic::Ordering;

    /// One Vault, one key store on a software key, and the journal's directory.
    struct Scene {
        dir: tempfile::TempDir,
        ring: Keyring,
        store: Arc<MemoryStore>,
        dec: Arc<SoftDecrypter>,
        vault: Arc<MemoryVault>,
    }

    impl Scene {
        /// A fresh Vault and an empty store. The software key is 1024 bits to keep key
        /// generation fast; OAEP-SHA256 then holds only 62 bytes, too few for an unseal key,
        /// so new values use OAEP-SHA1 (86 bytes).
        fn new() -> Self {
            Self::with_scheme(Scheme::OaepSha1)
        }

        fn with_scheme(scheme: Scheme) -> Self {
            let (dec, host) = soft::pair();
            let store = Arc::new(MemoryStore::new());
            let ring = Keyring::new(dec.clone(), host, scheme, store.clone());
            Self {
                dir: tempfile::tempdir().expect("tempdir"),
                ring,
                store,
                dec,
                vault: Arc::new(MemoryVault::new()),
            }
        }

        /// A Vault initialised by a first pass, its keys in the store.
        async fn initialised() -> Self {
            let scene = Self::new();
            assert_eq!(scene.pass().await.expect("init"), PassOutcome::Unsealed);
            scene
        }

        /// The defaults an operator gets (5 shares, threshold 3, root token stored), with the
        /// journal in the scene's directory.
        fn config(&self) -> Config {
            let mut cfg = config::resolve(
                FileConfig::default(),
                &Overrides::default(),
                &Env::default(),
            )
            .expect("the defaults are valid");
            cfg.journal_dir = self.dir.path().to_owned();
            cfg
        }

        fn runner_for(&self, cfg: Config, vault: &Arc<MemoryVault>) -> Runner {
            Runner::new(
                cfg,
                vault.clone(),
                self.ring.clone(),
                None,
                Telemetry::new(),
                Shutdown::new(),
            )
        }

        fn runner(&self) -> Runner {
            self.runner_for(self.config(), &self.vault)
        }

        async fn pass(&self) -> Result<PassOutcome, PassError> {
            self.runner().pass(false).await
        }

        async fn load(&self, name: &str) -> String {
            self.ring
                .load(name)
                .await
                .expect("load")
                .unwrap_or_else(|| panic!("`{name}` is not in the store"))
                .expose()
                .to_owned()
        }

        async fn names(&self) -> Vec<String> {
            self.store.names().await.expect("names")
        }

        fn store_ops(&self) -> Vec<usize> {
            ["get", "put", "names", "prune", "delete"]
                .iter()
                .map(|op| self.store.count(op))
                .collect()
        }

        fn decrypts(&self) -> usize {
            self.dec.calls.load(Ordering::SeqCst)
        }

        fn journal(&self) -> PathBuf {
            journal::path(self.dir.path())
        }

        /// Every key `vault` issued (and its root token) is in the store, one value per name,
        /// and opens to exactly what it handed out.
        async fn assert_store_holds(&self, vault: &MemoryVault) {
            for (i, key) in vault.issued_keys().iter().enumerate() {
                let name = unseal_key_name(i);
                assert_eq!(&self.load(&name).await, key, "{name}");
                assert_eq!(self.store.raw(&name).len(), 1, "{name}: one value per name");
            }
            assert_eq!(self.load(ROOT_KEY).await, vault.root_token());
            assert_eq!(self.store.raw(ROOT_KEY).len(), 1);
        }

        fn close(self) {
            self.dir.close().expect("remove the temporary directory");
        }
    }

    /// The names a store holds for `shares` unseal keys and the root token, sorted.
    fn names_for(shares: usize) -> Vec<String> {
        let mut all: Vec<String> = (0..shares).map(unseal_key_name).collect();
        all.push(ROOT_KEY.to_owned());
        all.sort();
        all
    }

    /// RSA-1024 with OAEP-SHA256 holds 62 bytes and an unseal key is up to 66 characters:
    /// initialising would hand out keys that cannot be stored.
    #[tokio::test]
    async fn a_key_too_small_for_unseal_keys_is_refused_before_init() {
        let scene = Scene::with_scheme(Scheme::OaepSha256);
        let err = scene.pass().await.expect_err("must refuse");
        let text = err.to_string();
        assert!(
            matches!(err, PassError::KeyTooSmall { capacity: 62, .. }),
            "{text}"
        );
        assert!(text.contains("1024-bit") && text.contains("2048"), "{text}");
        assert_eq!(scene.vault.calls("init"), 0, "Vault was not initialised");
        assert_eq!(scene.store.count("put"), 0);
        scene.close();
    }

    #[tokio::test]
    async fn a_fresh_vault_is_initialised_stored_and_unsealed_in_one_pass() {
        let scene = Scene::initialised().await;
        assert!(scene.vault.is_unsealed());
        assert_eq!(scene.vault.calls("init"), 1);
        assert_eq!(scene.vault.issued_keys().len(), 5);
        assert_eq!(scene.names().await, names_for(5));
        scene.assert_store_holds(&scene.vault).await;
        assert!(
            !scene.journal().exists(),
            "the journal is removed once every key is stored"
        );
        scene.close();
    }

    #[tokio::test]
    async fn a_store_failing_after_init_keeps_the_keys_in_the_journal_until_the_next_pass() {
        let scene = Scene::new();
        let mut cfg = scene.config();
        cfg.hsm.token_wait_timeout = Duration::from_millis(1);
        let r = scene.runner_for(cfg, &scene.vault);
        // Two keys go in, then the store goes away.
        scene.store.fail_puts_after(2, 1);

        let err = r.pass(false).await.expect_err("the store failed");
        let PassError::InitPending {
            remaining, journal, ..
        } = &err
        else {
            panic!("expected InitPending, got {err:?}");
        };
        assert_eq!(
            remaining,
            &[
                "vault-unseal-2",
                "vault-unseal-3",
                "vault-unseal-4",
                "vault-root"
            ]
        );
        assert_eq!(journal, &scene.journal());
        assert_eq!(
            scene.vault.calls("unseal"),
            0,
            "nothing unsealed before every key is stored"
        );

        let bytes = std::fs::read(journal).expect("the journal is kept");
        let mut secrets = scene.vault.issued_keys();
        secrets.push(scene.vault.root_token());
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the journal holds a clear key"
            );
        }
        let message = err.to_string();
        assert!(
            secrets.iter().all(|s| !message.contains(s.as_str())),
            "{message}"
        );

        assert_eq!(
            r.pass(false).await.expect("second pass"),
            PassOutcome::Unsealed
        );
        assert!(scene.vault.is_unsealed());
        assert_eq!(scene.vault.calls("init"), 1, "no second init");
        assert!(!scene.journal().exists());
        assert_eq!(scene.names().await, names_for(5));
        scene.assert_store_holds(&scene.vault).await;
        scene.close();
    }

    #[tokio::test]
    async fn one_corrupted_key_does_not_stop_the_others_from_unsealing() {
        let scene = Scene::initialised().await;
        scene.vault.seal();
        scene.store.insert("vault-unseal-0", vec![7u8; 128]);
        let submitted = scene.vault.calls("unseal");

        assert_eq!(scene.pass().await.expect("unseal"), PassOutcome::Unsealed);
        assert!(scene.vault.is_unsealed());
        assert_eq!(
            scene.vault.calls("unseal") - submitted,
            3,
            "only the three readable keys are submitted"
        );
        scene.close();
    }

    #[tokio::test]
    async fn an_unsealed_vault_costs_the_store_and_the_token_nothing() {
        let scene = Scene::initialised().await;
        let (ops, decrypts) = (scene.store_ops(), scene.decrypts());
        assert_eq!(scene.pass().await.expect("pass"), PassOutcome::Unsealed);
        assert_eq!(scene.store_ops(), ops, "store operations during the pass");
        assert_eq!(scene.decrypts(), decrypts, "decrypts");
        scene.close();
    }

    #[test]
    fn passes_after_expected_waits_come_soon_and_repeating_failures_slower() {
        let join = PassError::Vault(VaultError::Status {
            endpoint: "sys/storage/raft/join",
            status: 500,
            message: "failed to get raft challenge".to_owned(),
        });
        assert_eq!(pace_of(&Err(join)), Pace::Soon);
        assert_eq!(pace_of(&Err(PassError::JoinFailed("x".into()))), Pace::Soon);
        assert_eq!(pace_of(&Ok(PassOutcome::VaultUnreachable)), Pace::Soon);
        assert_eq!(pace_of(&Ok(PassOutcome::Unsealed)), Pace::Period);
        let wrong_key = PassError::MissingKeys {
            needed: 3,
            found: 0,
            unreadable: vec!["vault-unseal-0".into()],
        };
        assert_eq!(pace_of(&Err(wrong_key)), Pace::Slower);
        let empty = PassError::MissingKeys {
            needed: 3,
            found: 0,
            unreadable: Vec::new(),
        };
        assert_eq!(pace_of(&Err(empty)), Pace::Period);
        let unseal = PassError::Vault(VaultError::Status {
            endpoint: "sys/unseal",
            status: 500,
            message: "boom".to_owned(),
        });
        assert_eq!(pace_of(&Err(unseal)), Pace::Period);
    }

    #[test]
    fn an_empty_store_for_an_initialised_vault_says_the_keys_were_probably_lost() {
        let text = PassError::MissingKeys {
            needed: 0,
            found: 0,
            unreadable: Vec::new(),
        }
        .to_string();
        assert!(
            text.contains("keys were probably lost")
                && text.contains("delete its data")
                && text.contains("no key threshold")
                && !text.contains("needs 0"),
            "{text}"
        );
        let text = PassError::MissingKeys {
            needed: 3,
            found: 1,
            unreadable: vec!["vault-unseal-1".into()],
        }
        .to_string();
        assert!(
            text.contains("needs 3 unseal keys but the store holds 1 readable ones")
                && text.contains("(unreadable: vault-unseal-1)"),
            "{text}"
        );
        let text = PassError::StoreMissing {
            store: "Secret vault/vault-unseal-keys".into(),
            needed: 3,
        }
        .to_string();
        assert!(
            text.contains("Secret vault/vault-unseal-keys not found")
                && text.contains("Restore the Secret from a backup"),
            "{text}"
        );
    }

    /// Vault initialised by an init whose keys never reached the store: the pass says the keys
    /// were probably lost, not merely that it "needs 3".
    #[tokio::test]
    async fn an_initialised_vault_with_an_empty_store_is_reported_as_lost_keys() {
        let scene = Scene::new();
        scene.vault.init(5, 3).await.expect("init elsewhere");
        let err = scene.pass().await.expect_err("nothing to unseal with");
        assert!(
            matches!(err, PassError::MissingKeys { found: 0, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("the keys were probably lost"), "{text}");
        scene.close();
    }

    /// A stick that cannot decrypt the stored keys (another key pair's values) reports each
    /// key once, not on every pass.
    #[tokio::test]
    async fn unreadable_keys_are_reported_once_per_change() {
        let scene = Scene::initialised().await;
        scene.vault.seal();
        let (other, other_host) = soft::pair();
        let r = Runner::new(
            scene.config(),
            scene.vault.clone(),
            Keyring::new(other, other_host, Scheme::OaepSha1, scene.store.clone()),
            None,
            Telemetry::new(),
            Shutdown::new(),
        );
        for _ in 0..3 {
            let err = r.pass(false).await.expect_err("unreadable");
            assert!(
                matches!(&err, PassError::MissingKeys { unreadable, .. } if unreadable.len() == 5),
                "{err:?}"
            );
            assert_eq!(pace_of(&Err(err)), Pace::Slower);
        }
        let seen = r.unreadable_seen.lock().expect("seen").clone();
        assert_eq!(seen.len(), 5, "{seen:?}");
        scene.close();
    }

    #[tokio::test]
    async fn stale_keys_block_init_unless_overwriting_is_allowed() {
        let scene = Scene::initialised().await;
        let fresh = Arc::new(MemoryVault::new());
        let err = scene
            .runner_for(scene.config(), &fresh)
            .pass(false)
            .await
            .expect_err("stale keys");
        assert!(matches!(err, PassError::StaleKeys(5)), "{err:?}");
        assert_eq!(
            fresh.calls("init"),
            0,
            "Vault was never asked to initialise"
        );
        scene.assert_store_holds(&scene.vault).await;

        let mut cfg = scene.config();
        cfg.options.overwrite_existing_keys = true;
        cfg.options.secret_shares = 3;
        cfg.options.secret_threshold = 2;
        assert_eq!(
            scene
                .runner_for(cfg, &fresh)
                .pass(false)
                .await
                .expect("overwrite"),
            PassOutcome::Unsealed
        );
        assert!(fresh.is_unsealed());
        assert_eq!(
            scene.names().await,
            names_for(3),
            "the earlier Vault's surplus keys are removed"
        );
        scene.assert_store_holds(&fresh).await;
        scene.close();
    }

    /// A member that lost its data, while a raft peer answers initialised, rejoins: it never
    /// initialises, not even with `overwriteExistingKeys`, and the shared store is untouched.
    #[tokio::test]
    async fn a_member_that_lost_its_data_rejoins_its_peers_instead_of_initialising() {
        let scene = Scene::initialised().await;
        let lost = Arc::new(MemoryVault::new());
        let mut cfg = scene.config();
        cfg.options.overwrite_existing_keys = true;
        let peers: Vec<Arc<dyn VaultApi>> = vec![Arc::new(MemoryVault::new()), scene.vault.clone()];
        let err = scene
            .runner_for(cfg, &lost)
            .with_peers(peers)
            .pass(false)
            .await
            .expect_err("the in-memory Vault cannot complete a raft join");
        assert!(matches!(err, PassError::JoinFailed(_)), "{err:?}");
        assert_eq!(lost.calls("raft_join"), 1, "it asked to join the cluster");
        assert_eq!(lost.calls("init"), 0, "it never initialised");
        scene.assert_store_holds(&scene.vault).await;
        scene.close();
    }

    #[tokio::test]
    async fn a_short_init_answer_is_an_error_but_every_returned_key_is_stored() {
        let scene = Scene::new();
        scene.vault.answer_init_with(3);

        let err = scene.pass().await.expect_err("short answer");
        let PassError::InitAnswer(problem) = &err else {
            panic!("expected InitAnswer, got {err:?}");
        };
        assert!(
            problem.contains("asked for 5 unseal keys, Vault returned 3"),
            "{problem}"
        );
        assert_eq!(scene.names().await, names_for(3));
        for (i, key) in scene.vault.issued_keys().iter().take(3).enumerate() {
            assert_eq!(&scene.load(&unseal_key_name(i)).await, key);
        }
        assert_eq!(scene.load(ROOT_KEY).await, scene.vault.root_token());
        assert!(!scene.journal().exists());
        assert_eq!(scene.vault.calls("unseal"), 0);
        scene.close();
    }

    #[tokio::test]
    async fn an_unreachable_vault_ends_the_pass_without_touching_the_store() {
        let scene = Scene::new();
        scene.vault.set_unreachable(true);
        assert_eq!(
            scene.pass().await.expect("pass"),
            PassOutcome::VaultUnreachable
        );
        assert_eq!(scene.store_ops(), [0, 0, 0, 0, 0]);
        assert_eq!(scene.decrypts(), 0);
        assert_eq!(scene.vault.calls("init"), 0);
        scene.close();
    }

    #[tokio::test]
    async fn keys_of_another_vault_are_reported_as_wrong_keys() {
        let scene = Scene::initialised().await;
        let other = Arc::new(MemoryVault::new());
        other.init(5, 3).await.expect("init the other Vault");
        let err = scene
            .runner_for(scene.config(), &other)
            .pass(false)
            .await
            .expect_err("wrong keys");
        let PassError::WrongKeys { submitted, detail } = &err else {
            panic!("expected WrongKeys, got {err:?}");
        };
        assert!(
            (1..=3).contains(submitted),
            "never more keys than the threshold: {submitted}"
        );
        assert!(detail.contains("HTTP 400"), "{detail}");
        assert!(!other.is_unsealed());
        scene.close();
    }

    /// A Vault whose first init left its keys in the journal (the store failed after two).
    async fn journal_left_behind(scene: &Scene) {
        let mut cfg = scene.config();
        cfg.hsm.token_wait_timeout = Duration::from_millis(1);
        scene.store.fail_puts_after(2, 1);
        let err = scene
            .runner_for(cfg, &scene.vault)
            .pass(false)
            .await
            .expect_err("the store failed");
        assert!(matches!(err, PassError::InitPending { .. }), "{err:?}");
        assert!(scene.journal().exists());
    }

    #[tokio::test]
    async fn a_sys_init_in_flight_holds_the_marker_and_counts_as_alive() {
        let scene = Scene::new();
        let r = scene.runner();
        // Any silence is too long here, except during the init.
        r.telemetry.set_liveness_window(Duration::ZERO);
        let (t, marker) = (
            Arc::clone(&r.telemetry),
            journal::in_flight_path(scene.dir.path()),
        );
        let seen = Arc::new(Mutex::new(None));
        let seen_in = Arc::clone(&seen);
        scene.vault.during_init(move || {
            std::thread::sleep(Duration::from_millis(5));
            *seen_in.lock().expect("seen") = Some((t.alive(), marker.exists()));
        });
        assert_eq!(r.pass(false).await.expect("init"), PassOutcome::Unsealed);
        assert_eq!(
            *seen.lock().expect("seen"),
            Some((true, true)),
            "(alive, marker present) while sys/init was in flight"
        );
        assert!(!journal::in_flight_path(scene.dir.path()).exists());
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            !r.telemetry.alive(),
            "the window applies again after the init"
        );
        scene.close();
    }

    #[tokio::test]
    async fn a_dropped_init_answer_is_reported_as_lost_keys_never_as_success() {
        let scene = Scene::new();
        scene.vault.drop_init_answer();
        let err = scene.pass().await.expect_err("keys lost");
        let text = err.to_string();
        assert!(matches!(err, PassError::InitLost { .. }), "{err:?}");
        assert!(err.is_fatal());
        assert!(
            text.contains("Vault may have initialised; its keys are lost")
                && text.contains("reports it is initialised now")
                && text.contains("delete its data"),
            "{text}"
        );
        assert_eq!(scene.store.count("put"), 0);
        assert!(!journal::in_flight_path(scene.dir.path()).exists());
        assert!(!scene.journal().exists());
        scene.close();
    }

    #[tokio::test]
    async fn a_journal_of_another_vault_is_refused_and_kept() {
        let scene = Scene::new();
        journal_left_behind(&scene).await;
        let before = std::fs::read(scene.journal()).expect("journal");
        let names = scene.names().await;

        // A fresh Vault (its storage wiped, or another one) at the same address.
        let fresh = Arc::new(MemoryVault::new());
        let err = scene
            .runner_for(scene.config(), &fresh)
            .pass(false)
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, PassError::JournalForeign { why, .. } if why.contains("not initialised")),
            "{err:?}"
        );
        // One initialised with another seal configuration.
        let other = Arc::new(MemoryVault::new());
        other.init(3, 2).await.expect("init the other Vault");
        let err = scene
            .runner_for(scene.config(), &other)
            .pass(false)
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("3 key shares with threshold 2"), "{text}");
        assert!(text.contains("kept untouched"), "{text}");
        assert_eq!(fresh.calls("init"), 0, "nobody initialised the fresh Vault");
        assert_eq!(std::fs::read(scene.journal()).expect("kept"), before);
        assert_eq!(scene.names().await, names, "nothing stored from it");

        // Its own Vault takes it.
        assert_eq!(scene.pass().await.expect("finish"), PassOutcome::Unsealed);
        scene.assert_store_holds(&scene.vault).await;
        scene.close();
    }

    #[tokio::test]
    async fn finishing_a_journal_never_overwrites_a_value_stored_since() {
        let scene = Scene::new();
        journal_left_behind(&scene).await;
        let theirs = vec![9u8; 128];
        scene.store.insert("vault-unseal-3", theirs.clone());
        let err = scene.pass().await.expect_err("refused");
        assert!(
            matches!(&err, PassError::JournalConflict { name, .. } if name == "vault-unseal-3"),
            "{err:?}"
        );
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(scene.store.raw("vault-unseal-3"), [theirs]);
        assert!(scene.journal().exists(), "the journal is kept");
        assert_eq!(scene.vault.calls("unseal"), 0);
        scene.close();
    }

    #[tokio::test]
    async fn a_vault_answering_more_keys_than_asked_gets_only_those_stored() {
        let scene = Scene::new();
        scene.vault.issue_keys_on_init(500);
        let err = scene.pass().await.expect_err("mismatch reported");
        let text = err.to_string();
        assert!(matches!(err, PassError::InitAnswer(_)), "{err:?}");
        assert!(
            text.contains("asked for 5 unseal keys, Vault returned 500")
                && text.contains("the other 495 are kept"),
            "{text}"
        );
        assert_eq!(scene.names().await, names_for(5), "at most what was asked");
        let issued = scene.vault.issued_keys();
        for (i, key) in issued.iter().take(5).enumerate() {
            assert_eq!(&scene.load(&unseal_key_name(i)).await, key);
        }
        assert_eq!(scene.load(ROOT_KEY).await, scene.vault.root_token());
        // Everything Vault handed out is kept, encrypted, where no start resumes it.
        assert!(!scene.journal().exists());
        let kept: Vec<_> = std::fs::read_dir(scene.dir.path())
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.to_string_lossy().contains("unstored-keys"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let j = Journal::from_bytes(&std::fs::read(&kept[0]).expect("read")).expect("parse");
        assert_eq!(j.entries.len(), 501);
        assert_eq!(j.journal_only(), 495);
        for (i, entry) in j.entries.iter().enumerate().skip(5).take(495) {
            assert_eq!(entry.name, unseal_key_name(i));
            let opened = scene
                .ring
                .open(&entry.name, &entry.sealed)
                .await
                .expect("open");
            assert_eq!(opened.expose(), issued[i]);
        }
        // The keys asked for unseal it.
        assert_eq!(scene.pass().await.expect("unseal"), PassOutcome::Unsealed);
        scene.close();
    }

    #[tokio::test]
    async fn losing_the_init_race_in_hsm_mode_says_this_store_cannot_have_the_keys() {
        let scene = Scene::new();
        scene.vault.beaten_to_init();
        let err = scene.pass().await.expect_err("beaten");
        assert!(matches!(err, PassError::InitialisedElsewhere), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("initialised by someone else") && text.contains("can never receive them"),
            "{text}"
        );
        assert_eq!(scene.store.count("put"), 0);
        assert!(!scene.journal().exists());
        // The next pass says the same, not "needs 3 keys".
        let again = scene.pass().await.expect_err("still beaten");
        assert!(
            matches!(
                again,
                PassError::MissingKeys { .. } | PassError::InitialisedElsewhere
            ),
            "{again:?}"
        );
        scene.close();
    }

    #[tokio::test]
    async fn losing_the_init_race_with_a_shared_store_waits_for_the_winners_keys() {
        let scene = Scene::new();
        scene.vault.beaten_to_init();
        let mut cfg = scene.config();
        cfg.mode = Mode::HsmK8s;
        cfg.hsm.token_wait_timeout = Duration::from_secs(30);
        let r = scene.runner_for(cfg, &scene.vault);
        // The winner stores its keys a moment later, into the same store.
        let (ring, vault) = (scene.ring.clone(), scene.vault.clone());
        let winner = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (i, key) in vault.issued_keys().iter().enumerate() {
                ring.store(&unseal_key_name(i), &Secret::from(key.as_str()))
                    .await
                    .expect("winner stores");
            }
        });
        assert_eq!(r.pass(true).await.expect("unsealed"), PassOutcome::Unsealed);
        winner.await.expect("winner");
        assert!(scene.vault.is_unsealed());
        assert_eq!(scene.vault.calls("init"), 1);
        scene.close();
    }

    #[tokio::test]
    async fn a_shared_store_waits_for_the_winners_keys_only_so_long() {
        let scene = Scene::new();
        scene.vault.beaten_to_init();
        let mut cfg = scene.config();
        cfg.mode = Mode::HsmK8s;
        cfg.hsm.token_wait_timeout = Duration::from_millis(300);
        let r = scene.runner_for(cfg, &scene.vault);
        let err = r.pass(true).await.expect_err("never arrived");
        assert!(
            matches!(
                err,
                PassError::KeysNeverArrived {
                    needed: 3,
                    found: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("did not appear in the shared store"),
            "{err}"
        );
        // A sidecar pass waits without an error meanwhile.
        let mut cfg = scene.config();
        cfg.mode = Mode::HsmK8s;
        let sidecar = scene.runner_for(cfg, &scene.vault);
        assert_eq!(
            sidecar.pass(false).await.expect("waiting"),
            PassOutcome::WaitingForKeys
        );
        scene.close();
    }
}
