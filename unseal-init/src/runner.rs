//! Drives Vault: start-up of the key store, then passes of observe → decide → act, once
//! (`--once`) or for ever (sidecar). Decisions come from [`crate::unseal::next_step`]; this
//! file holds the I/O and the ordering guarantees (keys stored before any unseal).

use crate::config::{Config, Mode};
use crate::hsm::Hsm;
use crate::keyring::{Keyring, KeyringError, ROOT_KEY, unseal_key_name};
use crate::secret_store::SecretStore;
use crate::storage::{SharedHsm, Storage};
use crate::telemetry::Telemetry;
use crate::unseal::{Observation, Step, VaultView, init_storage_plan, next_step};
use crate::vault::{VaultClient, VaultError};
use crate::{keypair, secret::Secret};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    /// Vault is uninitialised but the store holds another Vault's keys.
    #[error(
        "Vault is not initialised but the store already holds {0} unseal key(s), probably of an earlier Vault; refusing to initialise (remove them with `unseal-init hsm delete`, or set options.overwriteExistingKeys)"
    )]
    StaleKeys(usize),
    /// Not enough keys to unseal.
    #[error("Vault is sealed and needs {needed} unseal keys but the store holds {found}")]
    MissingKeys {
        /// Needed.
        needed: u32,
        /// Found.
        found: usize,
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
    /// Vault was initialised but the keys could not all be stored.
    #[error("Vault was initialised but storing `{name}` failed: {source}")]
    StoreAfterInit {
        /// Key name.
        name: String,
        /// Cause.
        source: KeyringError,
    },
    /// Raft join did not succeed.
    #[error("raft join to {0} did not complete")]
    JoinFailed(String),
}

impl PassError {
    /// True when the token may be in a stale state worth re-opening before the next pass.
    pub fn suspects_token(&self) -> bool {
        matches!(
            self,
            PassError::MissingKeys { .. }
                | PassError::Keyring(KeyringError::Hsm(_))
                | PassError::Keyring(KeyringError::Storage(crate::storage::StorageError::Hsm(_)))
                | PassError::Keyring(KeyringError::Decrypt { .. })
        )
    }

    /// True when no later pass can succeed without an operator.
    pub fn is_fatal(&self) -> bool {
        match self {
            PassError::Keyring(e) | PassError::StoreAfterInit { source: e, .. } => e.is_fatal(),
            _ => false,
        }
    }
}

/// Opens the token, logs in, finds (or generates) the key pair, picks the scheme and the
/// storage backend. Blocking: call from a blocking context or accept the short stall.
pub async fn open_keyring(
    cfg: &Config,
    telemetry: Arc<Telemetry>,
) -> anyhow::Result<(SharedHsm, Keyring)> {
    use anyhow::Context;
    let mut hsm = Hsm::open(&cfg.hsm, telemetry)?;
    hsm.login()?;
    let (key, info) = keypair::ensure(&mut hsm, cfg.hsm.generate_key)?;
    tracing::info!(
        label = info.label,
        id = info.id_hex,
        bits = info.bits,
        "found RSA key pair in HSM"
    );
    tracing::info!("the HSM decrypts only; encrypting on the host with the extracted public key");
    let scheme = keypair::probe_scheme(&mut hsm, &key)?;
    let shared: SharedHsm = Arc::new(Mutex::new(hsm));
    let storage = match (cfg.mode, &cfg.kubernetes) {
        (Mode::HsmK8s, Some(k)) => {
            let store = SecretStore::connect(k.namespace.as_deref(), &k.name)
                .await
                .context("connecting to the Kubernetes API")?;
            Storage::Kubernetes(Box::new(store))
        }
        _ => Storage::Hsm(shared.clone()),
    };
    tracing::info!(storage = storage.kind(), "storage backend");
    Ok((shared.clone(), Keyring::new(shared, key, scheme, storage)))
}

/// One Vault, one key store.
pub struct Runner {
    cfg: Config,
    vault: VaultClient,
    keyring: Keyring,
    telemetry: Arc<Telemetry>,
    vault_was_up: Mutex<Option<bool>>,
}

/// Result of a pass that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassOutcome {
    /// Vault is initialised and unsealed.
    Unsealed,
    /// Vault did not answer.
    VaultUnreachable,
}

impl Runner {
    /// Builds a runner.
    pub fn new(
        cfg: Config,
        vault: VaultClient,
        keyring: Keyring,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            cfg,
            vault,
            keyring,
            telemetry,
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

    async fn observe(&self) -> Result<Observation, PassError> {
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
        Ok(Observation {
            vault,
            stored_keys: self.keyring.unseal_key_count().await?,
            raft_follower: self.raft_follower(),
            overwrite_existing_keys: self.cfg.options.overwrite_existing_keys,
        })
    }

    /// Logs reachability changes once instead of on every poll.
    fn note_vault_up(&self, up: bool, err: Option<&VaultError>) {
        if let Ok(mut was) = self.vault_was_up.lock() {
            if *was != Some(up) {
                match (up, err) {
                    (true, _) => {
                        tracing::info!(address = self.vault.address(), "Vault API is answering")
                    }
                    (false, Some(e)) => tracing::info!(reason = %e, "waiting for Vault's API"),
                    (false, None) => {}
                }
                *was = Some(up);
            } else if let Some(e) = err {
                tracing::debug!(reason = %e, "Vault still unreachable");
            }
        }
    }

    /// Pre-flight check of the key store.
    pub async fn preflight(&self) -> Result<(), PassError> {
        if self.cfg.options.pre_flight_checks {
            self.keyring.preflight().await?;
            tracing::info!(
                key = crate::keyring::TEST_KEY,
                "pre-flight check passed: written, read back and decrypted"
            );
        }
        Ok(())
    }

    /// One pass: act until Vault is unsealed, or report why not. With `wait`, an unreachable
    /// Vault is polled with backoff instead of ending the pass.
    pub async fn pass(&self, wait: bool) -> Result<PassOutcome, PassError> {
        let mut backoff = Duration::from_millis(200);
        let mut joined = false;
        loop {
            let obs = self.observe().await?;
            let step = next_step(&obs);
            tracing::debug!(?step, "next step");
            match step {
                Step::WaitForVault if wait => {
                    tokio::time::sleep(backoff).await;
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
                    let result = self.unseal(threshold as usize).await;
                    self.telemetry.unseal_attempt(result.is_ok());
                    match result {
                        Err(PassError::Vault(VaultError::Unreachable { .. })) if wait => continue,
                        other => other?,
                    }
                }
                Step::RefuseStaleKeys { found } => return Err(PassError::StaleKeys(found)),
                Step::MissingKeys { needed, found } => {
                    return Err(PassError::MissingKeys { needed, found });
                }
            }
        }
    }

    async fn initialize(&self) -> Result<(), PassError> {
        let o = self.cfg.options;
        tracing::info!(
            shares = o.secret_shares,
            threshold = o.secret_threshold,
            "initializing vault"
        );
        let result = self.vault.init(o.secret_shares, o.secret_threshold).await?;
        self.telemetry.vault_init();
        let shares = result.keys.len();
        let mut secrets: Vec<Secret> = result.keys;
        if o.store_root_token {
            secrets.push(result.root_token);
        }
        let plan = init_storage_plan(shares, o.store_root_token);
        // Vault no longer has these secrets and this process holds the only copy: storing
        // never gives up on a non-fatal failure (a re-plugged stick, a Kubernetes API
        // outage), and the loop keeps /healthz alive so the container is not restarted.
        for (name, value) in plan.iter().zip(secrets.iter()) {
            let mut delay = Duration::from_millis(500);
            let mut attempt = 1;
            loop {
                self.telemetry.heartbeat();
                match self.keyring.store(name, value).await {
                    Ok(()) => break,
                    Err(e) if !e.is_fatal() => {
                        tracing::error!(key = name.as_str(), attempt, error = %e, retry_in = ?delay, "storing a key of the just-initialised Vault failed; retrying until it succeeds");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                        attempt += 1;
                    }
                    Err(source) => {
                        return Err(PassError::StoreAfterInit {
                            name: name.clone(),
                            source,
                        });
                    }
                }
            }
            if name == ROOT_KEY {
                tracing::info!(key = name.as_str(), "root token stored in key store");
            } else {
                tracing::info!(key = name.as_str(), "unseal key stored in key store");
            }
        }
        Ok(())
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

    async fn unseal(&self, threshold: usize) -> Result<(), PassError> {
        tracing::info!("vault is sealed, unsealing");
        self.vault.unseal_reset().await?;
        let stored = self.keyring.unseal_key_count().await?;
        let mut submitted = 0;
        let mut last = String::from("no answer");
        for i in 0..stored {
            if submitted == threshold {
                break;
            }
            let name = unseal_key_name(i);
            let key = match self.keyring.load(&name).await {
                Ok(Some(k)) => k,
                Ok(None) => continue,
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(key = name.as_str(), error = %e, "skipping unreadable unseal key");
                    continue;
                }
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
            return Err(PassError::MissingKeys {
                needed: threshold as u32,
                found: submitted,
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

    /// Sidecar mode: a pass every `unsealPeriod` for ever; returns only on a fatal error.
    pub async fn watch(&self) -> anyhow::Result<()> {
        let period = self.cfg.unseal_period;
        self.telemetry
            .set_liveness_window(period * 3 + Duration::from_secs(60));
        let mut last_error: Option<String> = None;
        loop {
            self.telemetry.heartbeat();
            match self.pass(false).await {
                Ok(_) => last_error = None,
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    if e.suspects_token() {
                        self.keyring.reopen_token();
                    }
                    let text = e.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::error!(error = %text, "unseal pass failed; retrying every unsealPeriod");
                    }
                    last_error = Some(text);
                }
            }
            self.telemetry.heartbeat();
            tokio::time::sleep(period).await;
        }
    }
}
