//! The key store's presence: a deleted Secret is named (log, `/readyz`, metric) when a pass
//! next needs it, and keys another initialiser is storing are waited for only so long.

use super::*;

impl Runner {
    /// Records that keys are missing (`beaten`: because another initialiser won `sys/init`);
    /// returns since when, and whether an init was lost to another initialiser meanwhile.
    pub(super) fn keys_missing_since(&self, beaten: bool) -> (Instant, bool) {
        let mut since = self
            .short_of_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = since.get_or_insert((Instant::now(), false));
        entry.1 |= beaten;
        *entry
    }

    pub(super) fn keys_arrived(&self) {
        if let Ok(mut since) = self.short_of_keys.lock() {
            *since = None;
        }
    }

    /// Reports a store that went missing (or came back) once per change: log, `/readyz`, and
    /// `unseal_init_key_store_missing`.
    pub(super) fn note_store_missing(&self, now: Option<String>) {
        let Ok(mut was) = self.store_missing.lock() else {
            return;
        };
        if *was == now {
            return;
        }
        self.telemetry.store_missing(now.as_deref());
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
    pub(super) async fn check_store_present(&self) -> Result<(), PassError> {
        let storage = self.keyring.storage();
        // An init or rekey journal is finished into the store whatever happened to it: its
        // keys exist nowhere else (a verified rekey's old keys no longer open Vault).
        if !self.guard_store
            || !storage.shared()
            || journal::path(self.journal_dir()).exists()
            || journal::path(&self.rekey_dir()).exists()
        {
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

    pub(super) fn missing_store(&self) -> Option<String> {
        self.store_missing.lock().ok().and_then(|s| s.clone())
    }
}
