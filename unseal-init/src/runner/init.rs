//! The init step of a [`Runner`]: `sys/init` and everything between its answer and the last
//! stored key — the in-flight marker, the journal written before anything else, storing and
//! verifying every value, and finishing a journal an earlier run left — with the guarantees
//! listed in [`crate::runner`].

use super::{PassError, Runner};
use crate::journal::{self, Belongs, EntryAction, Journal};
use crate::keyring::{KeyringError, ROOT_KEY};
use crate::secret::Secret;
use crate::unseal::init_storage_plan;
use crate::vault::VaultError;
use nitrokey_common::backoff::Backoff;
use std::time::{Duration, Instant};

/// Longest unseal key Vault hands out: a 32-byte key plus the Shamir share's byte, in hex.
pub(super) const UNSEAL_KEY_MAX_LEN: usize = 66;
/// Room a root token may need: Vault 1.10+ tokens (`hvs.…`) run to about 100 characters.
const ROOT_TOKEN_ROOM: usize = 128;

impl Runner {
    pub(super) fn journal_dir(&self) -> &std::path::Path {
        &self.cfg.journal_dir
    }

    /// Stores whatever an earlier run left in the init journal, then removes it. True when
    /// there is no journal (any more); false while Vault does not answer, so that nobody can
    /// tell whether the journal is this Vault's (it waits, durable).
    pub async fn finish_journal(&self) -> Result<bool, PassError> {
        let Some(j) = journal::read(self.journal_dir())? else {
            self.telemetry.journal_pending(false);
            return Ok(true);
        };
        self.telemetry.journal_pending(true);
        let seen = match self.vault.seal_status().await {
            Ok(s) => Some(journal::VaultSeen {
                initialized: s.initialized,
                shares: s.shares,
                threshold: s.threshold,
            }),
            // Not answering, or a proxy in front of it answering for it: nothing can be told
            // about the journal yet, and it is durable.
            Err(VaultError::Unreachable { .. }) => None,
            Err(VaultError::Status { status, .. }) if status >= 500 => None,
            Err(e) => return Err(e.into()),
        };
        let path = journal::path(self.journal_dir());
        match journal::belongs(&j, self.vault.address(), seen) {
            Belongs::Yes => {}
            Belongs::WaitForVault => {
                tracing::info!(path = %path.display(), "an init journal waits for Vault to answer before it is finished");
                return Ok(false);
            }
            Belongs::No(why) => {
                return Err(PassError::JournalForeign { journal: path, why });
            }
        }
        let _critical = self.telemetry.critical();
        tracing::info!(
            path = %path.display(),
            entries = j.entries.len(),
            vault = j.vault.as_str(),
            "resuming init journal"
        );
        self.complete(&j).await?;
        Ok(true)
    }

    /// Stores every journal entry, verifying each, and removes the journal after the last.
    /// A failing store (a stick pulled, the API server away) is retried for up to
    /// `hsm.tokenWaitTimeout`; after that, or on a PIN problem or a stop request, the journal
    /// stays for the next pass or start.
    async fn complete(&self, j: &Journal) -> Result<(), PassError> {
        let give_up = Instant::now() + self.cfg.hsm.token_wait_timeout;
        for (i, entry) in j.to_store() {
            let mut delays = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
            let mut attempt = 1;
            loop {
                self.telemetry.heartbeat();
                let cause = match self.store_entry(j, entry).await {
                    Ok(true) => break,
                    Ok(false) => {
                        return Err(PassError::JournalConflict {
                            name: entry.name.clone(),
                            journal: journal::path(self.journal_dir()),
                        });
                    }
                    Err(cause) => cause,
                };
                let remaining: Vec<String> = j.entries[i..]
                    .iter()
                    .filter(|e| !e.journal_only)
                    .map(|e| e.name.clone())
                    .collect();
                let delay = delays.next();
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
                attempt += 1;
            }
            if entry.name == ROOT_KEY {
                tracing::info!(key = entry.name.as_str(), "root token stored in key store");
            } else {
                tracing::info!(key = entry.name.as_str(), "unseal key stored in key store");
            }
        }
        if j.journal_only() > 0 {
            let kept = journal::retire(self.journal_dir(), j)?;
            tracing::warn!(
                path = %kept.display(),
                unstored = j.journal_only(),
                "init journal complete; the keys beyond those asked for stay in it, encrypted, and are not stored"
            );
        } else {
            journal::remove(self.journal_dir())?;
            tracing::info!("init journal complete; removed");
        }
        self.telemetry.journal_pending(false);
        Ok(())
    }

    /// Stores one journal entry; false (nothing written) when the store holds a value under
    /// its name that the init did not find there.
    async fn store_entry(&self, j: &Journal, entry: &journal::Entry) -> Result<bool, KeyringError> {
        let name = entry.name.as_str();
        let stored = self.keyring.storage().get(name).await?;
        match journal::entry_action(j, name, stored.as_deref(), &entry.sealed) {
            EntryAction::KeepNewer => {
                tracing::warn!(
                    key = name,
                    "the store holds a value written after the init journal; keeping it"
                );
                Ok(true)
            }
            EntryAction::Conflict => Ok(false),
            EntryAction::AlreadyStored | EntryAction::Write => self
                .keyring
                .store_sealed(name, &entry.sealed, None)
                .await
                .map(|()| true),
        }
    }

    /// What the store holds, before `sys/init`, under the names an init may write: the
    /// values the journal is allowed to replace. One listing; values are read only for names
    /// present (none in a fresh store).
    async fn replaceable(&self) -> Result<std::collections::BTreeMap<String, String>, PassError> {
        let mut out = std::collections::BTreeMap::new();
        let names = self
            .keyring
            .storage()
            .names()
            .await
            .map_err(KeyringError::from)?;
        for name in names {
            if name != ROOT_KEY && crate::keyring::unseal_key_index(&name).is_none() {
                continue;
            }
            let stored = self
                .keyring
                .storage()
                .get(&name)
                .await
                .map_err(KeyringError::from)?;
            if let Some(bytes) = stored {
                out.insert(name, journal::digest(&bytes));
            }
        }
        Ok(out)
    }

    /// After a `sys/init` whose answer never arrived: what Vault says now, for the report.
    async fn init_lost(&self, cause: VaultError) -> PassError {
        let now = match self.vault.seal_status().await {
            Ok(s) if s.initialized => {
                "Vault reports it is initialised now, so the keys are gone".to_owned()
            }
            Ok(_) => {
                "Vault reports it is not initialised now, but it may still be finishing".to_owned()
            }
            Err(e) => format!("Vault could not be asked whether it initialised ({e})"),
        };
        PassError::InitLost {
            cause: cause.to_string(),
            now,
        }
    }

    pub(super) async fn initialize(&self) -> Result<(), PassError> {
        let o = self.cfg.options;
        // Before Vault hands out keys, make sure they can be encrypted and will have somewhere
        // durable to go: afterwards there is no way back.
        let capacity = self.keyring.capacity();
        if capacity < UNSEAL_KEY_MAX_LEN {
            return Err(PassError::KeyTooSmall {
                bits: self.keyring.key_bits(),
                scheme: self.keyring.scheme().name(),
                capacity,
            });
        }
        if o.store_root_token && capacity < ROOT_TOKEN_ROOM {
            tracing::warn!(
                capacity,
                "the HSM key may be too small for Vault's root token; the unseal keys fit, and a root token that does not is reported (a new one can be made with the unseal keys)"
            );
        }
        journal::check_writable(self.journal_dir())?;
        let replaces = self.replaceable().await?;
        // From here until the keys are stored, silence is Vault's or the store's, not a hang.
        let _critical = self.telemetry.critical();
        let in_flight = journal::InFlight::hold(self.journal_dir())?;
        tracing::info!(
            shares = o.secret_shares,
            threshold = o.secret_threshold,
            "initializing vault"
        );
        // Never raced against a stop request or a timeout: dropping this request would not
        // stop Vault from initialising, and its answer is the only copy of the keys.
        let result = match self.vault.init(o.secret_shares, o.secret_threshold).await {
            Ok(r) => r,
            Err(e @ VaultError::Interrupted { .. }) => {
                drop(in_flight);
                return Err(self.init_lost(e).await);
            }
            Err(e) => return Err(e.into()),
        };
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
        let asked = usize::from(o.secret_shares);
        let mut entries = Vec::with_capacity(values.len());
        let mut unsealable = Vec::new();
        for (name, value) in plan.iter().zip(values) {
            match self.keyring.seal(name, value) {
                Ok(sealed) => entries.push(journal::Entry {
                    name: name.clone(),
                    sealed,
                    // A misbehaving Vault's keys beyond those asked for are journalled, not
                    // written to a token that fills up long before.
                    journal_only: crate::keyring::unseal_key_index(name)
                        .is_some_and(|i| i >= asked),
                }),
                Err(e) => unsealable.push(e.to_string()),
            }
        }
        let keys_returned = u32::try_from(result.keys.len()).unwrap_or(u32::MAX);
        // The clear values are not needed any more; dropping zeroes them.
        drop(result);
        let j = Journal {
            vault: self.vault.address().to_owned(),
            created_ms: crate::keyring::now_ms(),
            owner: Some(journal::Owner {
                shares_asked: u32::from(o.secret_shares),
                keys_returned,
                threshold: u32::from(o.secret_threshold),
                replaces,
            }),
            entries,
        };
        if !j.entries.is_empty() {
            self.write_journal_or_store(&j).await?;
        }
        // The answer is on disk: Vault's container may stop now.
        drop(in_flight);
        if !problems.is_empty() || !unsealable.is_empty() {
            let mut all: Vec<String> = problems.into_iter().chain(unsealable).collect();
            let unstored = j.journal_only();
            if unstored > 0 {
                all.push(format!(
                    "only the {asked} asked for are stored; the other {unstored} are kept, encrypted, in {}",
                    journal::kept_path(self.journal_dir(), j.created_ms).display()
                ));
            }
            tracing::error!(
                problems = all.join("; ").as_str(),
                "Vault's sys/init answer does not match the request; every key it returned that could be encrypted is being stored or kept"
            );
            if !j.entries.is_empty() {
                self.complete(&j).await?;
            }
            return Err(PassError::InitAnswer(all.join("; ")));
        }
        self.complete(&j).await?;
        if o.overwrite_existing_keys {
            self.remove_stale_keys(
                usize::from(o.secret_shares),
                "removed an earlier Vault's unseal key",
            )
            .await?;
        }
        Ok(())
    }

    /// Removes the `vault-unseal-N` at or beyond `shares`: after an init that replaced an
    /// earlier Vault's keys, or a rekey to fewer shares, they unseal nothing any more.
    /// `what` is the log message naming which of the two it was.
    pub(super) async fn remove_stale_keys(
        &self,
        shares: usize,
        what: &'static str,
    ) -> Result<(), PassError> {
        let shares = u8::try_from(shares).unwrap_or(u8::MAX);
        for name in crate::rekey::stale_names(&self.keyring.unseal_keys().await?, shares) {
            let removed = self
                .keyring
                .storage()
                .delete(&name)
                .await
                .map_err(KeyringError::from)?;
            tracing::info!(key = name.as_str(), removed, "{what}");
        }
        Ok(())
    }

    /// Writes the journal. Should that fail although the directory took a write moments ago
    /// (disk full, volume gone), this process holds the only copy of the keys: it then stores
    /// them directly and retries — both the journal and the store — until one of them holds
    /// them, never giving up and never returning with the keys only in memory.
    async fn write_journal_or_store(&self, j: &Journal) -> Result<(), PassError> {
        let mut delays = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            match journal::write(self.journal_dir(), j) {
                Ok(path) => {
                    self.telemetry.journal_pending(true);
                    tracing::info!(path = %path.display(), entries = j.entries.len(), "init journal written");
                    return Ok(());
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot write the init journal; storing the keys directly and retrying until the journal or the store holds them"
                ),
            }
            let mut all_stored = true;
            for (_, entry) in j.to_store() {
                self.telemetry.heartbeat();
                match self.store_entry(j, entry).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(
                            key = entry.name.as_str(),
                            "the store holds a value under this name written since the init; not overwriting it; retrying the journal"
                        );
                        all_stored = false;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(key = entry.name.as_str(), error = %e, "storing a key without a journal failed; retrying");
                        all_stored = false;
                        break;
                    }
                }
            }
            if all_stored {
                tracing::info!("every key stored without the journal");
                return Ok(());
            }
            tokio::time::sleep(delays.next()).await;
        }
    }
}
