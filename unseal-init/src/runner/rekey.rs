//! `unseal-init rekey`, and finishing a rekey an earlier run left: the I/O around the
//! decisions in [`crate::rekey`], which also states the guarantees.

use super::{PassError, Runner};
use crate::journal::{self, EntryAction, Journal};
use crate::keyring::{KeyringError, unseal_key_name};
use crate::rekey::{self, OnDisk, Resume, VaultSide};
use crate::secret::Secret;
use crate::vault::{VaultApi, VaultError};
use anyhow::Context;
use nitrokey_common::backoff::Backoff;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How a rekey found on disk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Vault uses the new keys, and the store holds them.
    NewKeys {
        /// Shares stored.
        shares: usize,
    },
    /// The rekey never took effect: Vault uses the old keys, which the store still holds.
    Cancelled,
}

/// How `unseal-init rekey` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RekeyOutcome {
    /// Vault's keys were rotated and the new ones stored.
    Rekeyed {
        /// New shares.
        shares: u8,
        /// New threshold.
        threshold: u8,
    },
    /// A rekey an earlier run left was finished instead of starting another.
    Earlier(Finished),
    /// A stop was requested before the new keys existed; nothing changed.
    Stopped,
}

enum Progress {
    Nothing,
    WaitForVault,
    Finished(Finished),
}

/// Writes a marker file durably, holding this process's id for whoever reads it.
fn touch_durable(dir: &Path, name: &str) -> Result<(), journal::JournalError> {
    journal::write_file(dir, name, format!("{}\n", std::process::id()).as_bytes()).map(drop)
}

/// Why the unauthenticated rekey endpoints answer "unsupported operation" on OpenBao 2.4+.
fn explain(e: VaultError) -> anyhow::Error {
    match &e {
        VaultError::Status { message, .. } if message.contains("unsupported operation") => {
            anyhow::Error::new(e).context(
                "Vault refuses the sys/rekey endpoints: OpenBao 2.4 and later disable them unless its listener sets `disable_unauthed_rekey_endpoints = false`",
            )
        }
        _ => e.into(),
    }
}

impl Runner {
    pub(super) fn rekey_dir(&self) -> PathBuf {
        self.cfg.journal_dir.join(rekey::SUBDIR)
    }

    fn rekey_on_disk(&self) -> Result<(OnDisk, Option<Journal>), journal::JournalError> {
        let dir = self.rekey_dir();
        let j = journal::read(&dir)?;
        let disk = OnDisk {
            intent: dir.join(rekey::INTENT).exists(),
            journal: j.is_some(),
            verified: dir.join(rekey::VERIFIED).exists(),
        };
        Ok((disk, j))
    }

    /// Vault's side of a rekey; `None` when it does not answer.
    async fn rekey_vault_side(&self) -> Result<Option<VaultSide>, PassError> {
        let status = match self.vault.seal_status().await {
            Ok(s) => s,
            Err(VaultError::Unreachable { .. }) => return Ok(None),
            Err(VaultError::Status { status, .. }) if status >= 500 => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if status.sealed {
            return Ok(Some(VaultSide {
                initialized: status.initialized,
                sealed: true,
                rekey_started: false,
                verification_pending: false,
            }));
        }
        let rekey = match self.vault.rekey_status().await {
            Ok(r) => r,
            Err(VaultError::Unreachable { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(VaultSide {
            initialized: status.initialized,
            sealed: false,
            rekey_started: rekey.started,
            verification_pending: rekey.started && !rekey.verification_nonce.is_empty(),
        }))
    }

    /// Finishes a rekey an earlier run left (see [`crate::rekey`]), waiting for Vault to
    /// answer while one is on disk; returns at once when there is none, and when a stop is
    /// requested (the files stay for the next start). Run at every start, before the
    /// pre-flight check and any unseal: until it is done, the store may hold keys Vault does
    /// not use yet.
    pub async fn finish_rekey(&self) -> Result<(), PassError> {
        let mut delays = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let mut said = false;
        loop {
            match self.resume_rekey().await? {
                Progress::Nothing | Progress::Finished(_) => return Ok(()),
                Progress::WaitForVault => {
                    if !said {
                        tracing::info!("a rekey journal waits for Vault to answer");
                        said = true;
                    }
                    self.telemetry.heartbeat();
                    if self.shutdown.sleep_or_stop(delays.next()).await.is_stop() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One look at a rekey on disk, and what follows from it.
    async fn resume_rekey(&self) -> Result<Progress, PassError> {
        let dir = self.rekey_dir();
        let (disk, j) = self.rekey_on_disk()?;
        if !disk.intent && !disk.journal {
            // A marker left after the journal's removal means nothing any more.
            journal::remove_file(&dir, rekey::VERIFIED)?;
            return Ok(Progress::Nothing);
        }
        let vault = if disk.journal && disk.verified {
            None
        } else {
            self.rekey_vault_side().await?
        };
        let step = rekey::resume(disk, vault);
        tracing::info!(?step, "resuming a rekey left by an earlier run");
        let journal_path = journal::path(&dir);
        if let Some(j) = &j
            && j.vault.trim_end_matches('/') != self.vault.address().trim_end_matches('/')
        {
            return Err(PassError::JournalForeign {
                journal: journal_path,
                why: format!(
                    "it holds a rekey of the Vault at {}, and this run talks to {}",
                    j.vault,
                    self.vault.address()
                ),
            });
        }
        match (step, j) {
            (Resume::Nothing, _) => Ok(Progress::Nothing),
            (Resume::WaitForVault, _) => Ok(Progress::WaitForVault),
            (Resume::Cancel, _) => {
                self.vault.rekey_cancel().await?;
                // A journal write the fault cut short leaves only its temporary file.
                journal::remove(&dir)?;
                journal::remove_file(&dir, rekey::INTENT)?;
                tracing::warn!(
                    "cancelled a rekey an earlier run started before Vault's new keys were journalled; Vault keeps the old keys, which the store holds"
                );
                Ok(Progress::Finished(Finished::Cancelled))
            }
            (Resume::DropIntent, _) => {
                journal::remove(&dir)?;
                journal::remove_file(&dir, rekey::INTENT)?;
                tracing::info!(
                    "an earlier rekey never handed out new keys (Vault holds no rekey); the old keys stay"
                );
                Ok(Progress::Finished(Finished::Cancelled))
            }
            (Resume::Refuse, _) => Err(PassError::JournalForeign {
                journal: journal_path,
                why: "a rekey other than the journal's is in progress in Vault, so whether Vault uses the journal's keys cannot be found out; cancel that rekey (`DELETE sys/rekey/init`) and start again".to_owned(),
            }),
            (Resume::Foreign, _) => Err(PassError::JournalForeign {
                journal: journal_path,
                why: "Vault reports it is not initialised, so its storage was replaced since the rekey and the journal's keys open nothing it has".to_owned(),
            }),
            (_, None) => Ok(Progress::Nothing),
            (Resume::Store, Some(j)) => self.store_rekeyed(&j).await.map(Progress::Finished),
            (Resume::Verify, Some(j)) => self.settle(&j, self.verify_journal(&j).await?).await,
            (Resume::UnsealWithJournal, Some(j)) => {
                self.settle(&j, self.unseal_with_journal(&j).await?).await
            }
            (Resume::Probe, Some(j)) => self.settle(&j, self.probe_journal(&j).await?).await,
        }
    }

    /// Acts on whether Vault uses the journal's keys.
    async fn settle(&self, j: &Journal, current: bool) -> Result<Progress, PassError> {
        let dir = self.rekey_dir();
        if current {
            touch_durable(&dir, rekey::VERIFIED)?;
            tracing::info!("new unseal keys verified with Vault");
            return self.store_rekeyed(j).await.map(Progress::Finished);
        }
        journal::remove(&dir)?;
        journal::remove_file(&dir, rekey::INTENT)?;
        tracing::warn!(
            "Vault does not use the rekey journal's keys (the rekey was lost before it was verified); the old keys, which the store holds, stay valid; journal removed"
        );
        Ok(Progress::Finished(Finished::Cancelled))
    }

    /// The journal's keys, decrypted on the token.
    async fn journal_keys(&self, j: &Journal) -> Result<Vec<Secret>, PassError> {
        let mut keys = Vec::new();
        for (_, e) in j.to_store() {
            keys.push(self.keyring.open(&e.name, &e.sealed).await?);
        }
        Ok(keys)
    }

    /// Submits the journal's keys to the pending verification; true once Vault switched.
    async fn verify_journal(&self, j: &Journal) -> Result<bool, PassError> {
        // Vault gives each verification attempt a new nonce: ask for the current one.
        let nonce = self.vault.rekey_verify_status().await?.nonce;
        // Each key decrypted when it is submitted: the token does no more than Vault needs.
        for (_, e) in j.to_store() {
            let key = self.keyring.open(&e.name, &e.sealed).await?;
            match self.vault.rekey_verify(&key, &nonce).await {
                Ok(v) if v.complete => return Ok(true),
                Ok(_) => {}
                Err(VaultError::Status {
                    status, message, ..
                }) if rekey::keys_refused(status, &message) => {
                    return Err(PassError::JournalForeign {
                        journal: journal::path(&self.rekey_dir()),
                        why: "the verification pending in Vault refuses the journal's keys: it belongs to another rekey; cancel it (`DELETE sys/rekey/init`) and start again".to_owned(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Vault came back sealed: unseals it with the journal's keys; true when they open it.
    async fn unseal_with_journal(&self, j: &Journal) -> Result<bool, PassError> {
        self.vault.unseal_reset().await?;
        for (_, e) in j.to_store() {
            let key = self.keyring.open(&e.name, &e.sealed).await?;
            match self.vault.unseal(&key).await {
                Ok(s) if !s.sealed => {
                    tracing::info!("successfully unsealed vault with the rekey journal's keys");
                    return Ok(true);
                }
                Ok(_) => {}
                Err(VaultError::Status {
                    status, message, ..
                }) if rekey::keys_refused(status, &message) => {
                    let _ = self.vault.unseal_reset().await;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Every new key submitted, and still sealed: they are not its keys (any threshold of
        // Vault's own opens it).
        let _ = self.vault.unseal_reset().await;
        Ok(false)
    }

    /// Vault is unsealed with nothing pending: a rekey with the journal's keys, cancelled
    /// before anything is verified, says whether they are Vault's.
    async fn probe_journal(&self, j: &Journal) -> Result<bool, PassError> {
        // All decrypted before the probe starts: a token failure midway would leave it open.
        let keys = self.journal_keys(j).await?;
        let s = self.vault.seal_status().await?;
        let shares = u8::try_from(s.shares.max(1)).unwrap_or(u8::MAX);
        let threshold = u8::try_from(s.threshold.max(1)).unwrap_or(u8::MAX);
        let nonce = self.vault.rekey_init(shares, threshold).await?.nonce;
        let mut verdict = Ok(false);
        for key in &keys {
            match self.vault.rekey_update(key, &nonce).await {
                Ok(u) if u.complete => {
                    // Keys of a rekey that is cancelled below: never used.
                    drop(u);
                    verdict = Ok(true);
                    break;
                }
                Ok(_) => {}
                Err(VaultError::Status {
                    status, message, ..
                }) if rekey::keys_refused(status, &message) => break,
                Err(e) => {
                    verdict = Err(e.into());
                    break;
                }
            }
        }
        if matches!(verdict, Ok(true)) {
            // Recorded before the cancel: should the cancel fail, the next start stores the
            // journal's keys instead of asking Vault to verify them against this probe.
            touch_durable(&self.rekey_dir(), rekey::VERIFIED)?;
        }
        self.vault.rekey_cancel().await?;
        verdict
    }

    /// Stores the journal's keys over the old ones (each verified by decrypting it), removes
    /// keys beyond the new share count, then the journal and its markers.
    async fn store_rekeyed(&self, j: &Journal) -> Result<Finished, PassError> {
        let dir = self.rekey_dir();
        let _critical = self.telemetry.critical();
        let mut shares = 0;
        for (_, entry) in j.to_store() {
            let name = entry.name.as_str();
            let stored = self
                .keyring
                .storage()
                .get(name)
                .await
                .map_err(KeyringError::from)?;
            match journal::entry_action(j, name, stored.as_deref(), &entry.sealed) {
                EntryAction::Conflict => {
                    return Err(PassError::JournalConflict {
                        name: entry.name.clone(),
                        journal: journal::path(&dir),
                    });
                }
                EntryAction::KeepNewer | EntryAction::AlreadyStored | EntryAction::Write => {
                    self.keyring.store_sealed(name, &entry.sealed, None).await?;
                }
            }
            shares += 1;
            tracing::info!(key = name, "new unseal key stored in key store");
        }
        self.remove_stale_keys(shares, "old unseal key beyond the new share count removed")
            .await?;
        journal::remove_file(&dir, rekey::INTENT)?;
        journal::remove(&dir)?;
        journal::remove_file(&dir, rekey::VERIFIED)?;
        tracing::info!(
            shares,
            "rekey complete; the store holds Vault's new unseal keys"
        );
        Ok(Finished::NewKeys { shares })
    }

    /// `unseal-init rekey`: finishes a rekey an earlier run left, or rotates Vault's unseal
    /// keys to `shares`/`threshold` (default: what Vault has now) with the keys in the store.
    pub async fn rekey(
        &self,
        shares: Option<u8>,
        threshold: Option<u8>,
    ) -> anyhow::Result<RekeyOutcome> {
        self.keyring.check_identity().await?;
        let dir = self.rekey_dir();
        match self.resume_rekey().await? {
            Progress::Nothing => {}
            Progress::Finished(f) => return Ok(RekeyOutcome::Earlier(f)),
            Progress::WaitForVault => anyhow::bail!(
                "an earlier rekey is pending in {} and Vault at {} does not answer; nothing was changed (run again once Vault answers)",
                dir.display(),
                self.vault.address()
            ),
        }
        let status = self.vault.seal_status().await?;
        if !status.initialized {
            anyhow::bail!(
                "Vault at {} is not initialised: there are no keys to rotate",
                self.vault.address()
            );
        }
        if status.sealed {
            anyhow::bail!(
                "Vault at {} is sealed: a rekey needs it unsealed (start unseal-init without a subcommand, or with --once, to unseal it)",
                self.vault.address()
            );
        }
        let (new_shares, new_threshold) =
            rekey::target(status.shares, status.threshold, shares, threshold)?;
        let pending = self.vault.rekey_status().await.map_err(explain)?;
        if pending.started {
            anyhow::bail!(
                "a rekey is already in progress in Vault (nonce {}), started by someone else; nothing was changed. Cancel it if it is nobody's (`DELETE sys/rekey/init`, `bao operator rekey -cancel`) and run again",
                pending.nonce
            );
        }
        // The current keys Vault needs, read before anything is asked of it.
        let needed = usize::try_from(status.threshold).unwrap_or(usize::MAX);
        let names = self.keyring.unseal_keys().await?;
        let mut current = Vec::new();
        let mut replaces = std::collections::BTreeMap::new();
        for name in &names {
            if let Some(bytes) = self
                .keyring
                .storage()
                .get(name)
                .await
                .map_err(KeyringError::from)?
            {
                replaces.insert(name.clone(), journal::digest(&bytes));
                if current.len() < needed {
                    match self.keyring.open(name, &bytes).await {
                        Ok(k) => current.push(k),
                        Err(e) if e.is_about_the_value() => {
                            tracing::warn!(key = name.as_str(), error = %e, "skipping unreadable unseal key");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        if current.len() < needed {
            anyhow::bail!(
                "Vault needs {needed} unseal keys to authorise a rekey, and the store holds {} readable ones; nothing was changed",
                current.len()
            );
        }
        journal::check_writable(&dir)?;
        if self.shutdown.requested() {
            return Ok(RekeyOutcome::Stopped);
        }
        touch_durable(&dir, rekey::INTENT)?;
        let nonce = match self.vault.rekey_init(new_shares, new_threshold).await {
            Ok(s) => s.nonce,
            Err(e) => {
                journal::remove_file(&dir, rekey::INTENT)?;
                return Err(explain(e));
            }
        };
        tracing::info!(
            shares = new_shares,
            threshold = new_threshold,
            "rekey started"
        );
        let mut answer = None;
        for key in &current {
            if self.shutdown.requested() {
                self.cancel_started(&dir).await?;
                tracing::info!(
                    "stopped on request before Vault handed out new keys; rekey cancelled, the old keys stay"
                );
                return Ok(RekeyOutcome::Stopped);
            }
            match self.vault.rekey_update(key, &nonce).await {
                Ok(u) if u.complete => {
                    answer = Some(u);
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    self.cancel_started(&dir).await?;
                    return Err(anyhow::Error::new(e)
                        .context("Vault refused a stored unseal key for the rekey; rekey cancelled, the old keys stay"));
                }
            }
        }
        drop(current);
        let Some(answer) = answer else {
            self.cancel_started(&dir).await?;
            anyhow::bail!(
                "Vault did not hand out new keys after the stored ones; rekey cancelled, the old keys stay"
            );
        };
        tracing::info!(
            keys = answer.keys.len(),
            "rekey answered; encrypting the new keys on the host"
        );
        // The new keys take effect only once verified: whatever is wrong with them now, the
        // rekey is cancelled and the old keys stay.
        let mut entries = Vec::with_capacity(answer.keys.len());
        let mut problem = None;
        if answer.keys.len() != usize::from(new_shares) {
            problem = Some(format!(
                "asked for {new_shares} keys, Vault returned {}",
                answer.keys.len()
            ));
        }
        for (i, key) in answer.keys.iter().enumerate() {
            let v = key.expose();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                problem = Some(format!("new key {i} is not a hex string"));
                break;
            }
            let name = unseal_key_name(i);
            match self.keyring.seal(&name, key) {
                Ok(sealed) => entries.push(journal::Entry {
                    name,
                    sealed,
                    journal_only: false,
                }),
                Err(e) => {
                    problem = Some(e.to_string());
                    break;
                }
            }
        }
        let returned = u32::try_from(answer.keys.len()).unwrap_or(u32::MAX);
        drop(answer);
        if let Some(problem) = problem {
            self.cancel_started(&dir).await?;
            anyhow::bail!(
                "Vault's rekey answer cannot be kept ({problem}); rekey cancelled, the old keys stay"
            );
        }
        let j = Journal {
            vault: self.vault.address().to_owned(),
            created_ms: crate::keyring::now_ms(),
            owner: Some(journal::Owner {
                shares_asked: u32::from(new_shares),
                keys_returned: returned,
                threshold: u32::from(new_threshold),
                replaces,
            }),
            entries,
        };
        if let Err(e) = journal::write(&dir, &j) {
            self.cancel_started(&dir).await?;
            return Err(anyhow::Error::new(e)
                .context("cannot journal the new keys; rekey cancelled, the old keys stay"));
        }
        tracing::info!(path = %journal::path(&dir).display(), "rekey journal written");
        journal::remove_file(&dir, rekey::INTENT)?;
        // From here on, stopping is never the safer choice: finish.
        match self.resume_rekey().await? {
            Progress::Finished(Finished::NewKeys { .. }) => Ok(RekeyOutcome::Rekeyed {
                shares: new_shares,
                threshold: new_threshold,
            }),
            Progress::Finished(Finished::Cancelled) => anyhow::bail!(
                "Vault lost the rekey before its new keys were verified; the old keys stay valid and stored"
            ),
            Progress::Nothing | Progress::WaitForVault => anyhow::bail!(
                "Vault stopped answering before the new keys were verified; they are safe in the rekey journal {} and the next start (or `unseal-init rekey`) finishes it",
                journal::path(&dir).display()
            ),
        }
    }

    /// Cancels the rekey this run started, then removes the intent.
    async fn cancel_started(&self, dir: &Path) -> Result<(), PassError> {
        self.vault.rekey_cancel().await?;
        journal::remove_file(dir, rekey::INTENT)?;
        Ok(())
    }
}

/// Runs `unseal-init rekey`: opens the token and store as a start does, rotates Vault's keys
/// and says what happened on stdout (names and counts only).
pub async fn command(
    cfg: crate::config::Config,
    shares: Option<u8>,
    threshold: Option<u8>,
    shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<()> {
    if let (Some(n), Some(t)) = (shares, threshold) {
        rekey::check(n, t)?;
    }
    let telemetry = crate::telemetry::Telemetry::new();
    if cfg.hsm.daemon {
        crate::pcscd::start().await?;
    }
    let opened = super::open_keyring(
        &cfg,
        Arc::clone(&telemetry),
        &shutdown,
        Some(cfg.hsm.token_wait_timeout),
    )
    .await?;
    let vault: Arc<dyn VaultApi> = Arc::new(
        crate::vault::VaultClient::new(&cfg.vault.address, cfg.vault.ca_cert.as_deref())
            .context("Vault client")?
            .with_telemetry(Arc::clone(&telemetry)),
    );
    let runner = Runner::new(
        cfg,
        vault,
        opened.keyring,
        Some(opened.hsm),
        telemetry,
        shutdown,
    );
    match runner.rekey(shares, threshold).await? {
        RekeyOutcome::Rekeyed { shares, threshold } => println!(
            "rekeyed: Vault's unseal keys are new ({shares} shares, threshold {threshold}), stored as {}",
            names_text(usize::from(shares))
        ),
        RekeyOutcome::Earlier(Finished::NewKeys { shares }) => println!(
            "finished an earlier rekey: Vault's new unseal keys are stored as {}; run again for another",
            names_text(shares)
        ),
        RekeyOutcome::Earlier(Finished::Cancelled) => println!(
            "an earlier rekey never took effect and was cleared; Vault keeps the stored keys; run again to rekey"
        ),
        RekeyOutcome::Stopped => println!("stopped on request; nothing was changed"),
    }
    Ok(())
}

fn names_text(shares: usize) -> String {
    match shares {
        0 => "nothing".to_owned(),
        1 => unseal_key_name(0),
        n => format!("{}..{}", unseal_key_name(0), n - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::tests::Scene;
    use std::fs;

    /// The unseal keys the store holds, in order.
    async fn stored(scene: &Scene) -> Vec<String> {
        let mut out = Vec::new();
        for name in scene.ring.unseal_keys().await.expect("names") {
            let key = scene.ring.load(&name).await.expect("load").expect("value");
            out.push(key.expose().to_owned());
        }
        out
    }

    /// The files in the rekey's directory.
    fn rekey_files(scene: &Scene) -> usize {
        fs::read_dir(scene.dir.path().join(rekey::SUBDIR))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_rekey_stores_exactly_the_keys_vault_switched_to() {
        let scene = Scene::initialised().await;
        let old = stored(&scene).await;
        let outcome = scene.runner().rekey(Some(3), Some(2)).await.expect("rekey");
        assert_eq!(
            outcome,
            RekeyOutcome::Rekeyed {
                shares: 3,
                threshold: 2
            }
        );
        let new = stored(&scene).await;
        assert_eq!(
            new,
            scene.vault.issued_keys(),
            "the store holds Vault's keys"
        );
        assert_eq!(new.len(), 3);
        assert!(new.iter().all(|k| !old.contains(k)));
        assert_eq!(rekey_files(&scene), 0);
        assert!(!scene.vault.rekey_started());
        scene.vault.seal();
        assert_eq!(
            scene.runner().pass(false).await.expect("unseal"),
            super::super::PassOutcome::Unsealed
        );
    }

    #[tokio::test]
    async fn an_answer_short_of_keys_cancels_the_rekey_and_keeps_the_old_keys() {
        let scene = Scene::initialised().await;
        let old = stored(&scene).await;
        scene.vault.answer_rekey_with(2);
        let err = scene
            .runner()
            .rekey(Some(3), Some(2))
            .await
            .expect_err("a short answer is refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("asked for 3 keys, Vault returned 2"),
            "{text}"
        );
        assert!(text.contains("old keys stay"), "{text}");
        assert!(!scene.vault.rekey_started(), "cancelled");
        assert_eq!(
            scene.vault.issued_keys(),
            old,
            "Vault still uses the old keys"
        );
        assert_eq!(stored(&scene).await, old);
        assert_eq!(rekey_files(&scene), 0);
    }

    #[tokio::test]
    async fn a_store_short_of_keys_or_a_bad_request_changes_nothing() {
        let scene = Scene::initialised().await;
        let err = scene
            .runner()
            .rekey(None, Some(6))
            .await
            .expect_err("refused");
        assert!(
            err.downcast_ref::<rekey::RekeyInputError>().is_some(),
            "{err:#}"
        );
        for i in 0..3 {
            scene
                .ring
                .storage()
                .delete(&unseal_key_name(i))
                .await
                .expect("delete");
        }
        let err = scene.runner().rekey(None, None).await.expect_err("refused");
        assert!(
            format!("{err:#}")
                .contains("needs 3 unseal keys to authorise a rekey, and the store holds 2"),
            "{err:#}"
        );
        assert_eq!(scene.vault.calls("rekey_init"), 0);
        assert_eq!(rekey_files(&scene), 0);
    }

    #[tokio::test]
    async fn a_start_cancels_a_rekey_whose_keys_never_reached_the_journal() {
        let scene = Scene::initialised().await;
        let old = stored(&scene).await;
        // What a run killed between `sys/rekey/init` and the journal leaves.
        let dir = scene.dir.path().join(rekey::SUBDIR);
        touch_durable(&dir, rekey::INTENT).expect("intent");
        scene.vault.rekey_init(3, 2).await.expect("rekey init");
        scene.runner().start().await.expect("start");
        assert!(!scene.vault.rekey_started(), "cancelled");
        assert_eq!(stored(&scene).await, old);
        assert_eq!(rekey_files(&scene), 0);
    }

    #[tokio::test]
    async fn a_rekey_journal_of_another_vault_is_refused_and_kept() {
        let scene = Scene::initialised().await;
        let old = stored(&scene).await;
        let runner = scene.runner();
        let sealed = scene
            .ring
            .seal("vault-unseal-0", &Secret::from("ab"))
            .expect("seal");
        let j = Journal {
            vault: "https://10.0.0.9:8200".to_owned(),
            created_ms: 1,
            owner: Some(journal::Owner {
                shares_asked: 1,
                keys_returned: 1,
                threshold: 1,
                replaces: std::collections::BTreeMap::new(),
            }),
            entries: vec![journal::Entry {
                name: "vault-unseal-0".to_owned(),
                sealed,
                journal_only: false,
            }],
        };
        journal::write(&runner.rekey_dir(), &j).expect("journal");
        let err = runner.start().await.expect_err("refused");
        assert!(
            matches!(&err, PassError::JournalForeign { why, .. } if why.contains("10.0.0.9")),
            "{err:?}"
        );
        assert!(
            journal::read(&runner.rekey_dir()).expect("read").is_some(),
            "kept"
        );
        assert_eq!(stored(&scene).await, old);
    }

    #[tokio::test]
    async fn a_start_verifies_and_stores_a_journalled_rekey() {
        let scene = Scene::initialised().await;
        let old = stored(&scene).await;
        // A rekey journalled and then stopped before verification.
        let runner = scene.runner();
        let keys: Vec<Secret> = old.iter().map(|k| Secret::from(k.as_str())).collect();
        let nonce = scene.vault.rekey_init(3, 2).await.expect("init").nonce;
        let mut answer = None;
        for k in &keys {
            let u = scene.vault.rekey_update(k, &nonce).await.expect("update");
            if u.complete {
                answer = Some(u);
                break;
            }
        }
        let answer = answer.expect("new keys");
        let entries = answer
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| journal::Entry {
                name: unseal_key_name(i),
                sealed: scene.ring.seal(&unseal_key_name(i), k).expect("seal"),
                journal_only: false,
            })
            .collect();
        let mut replaces = std::collections::BTreeMap::new();
        for name in scene.ring.unseal_keys().await.expect("names") {
            let bytes = scene
                .ring
                .storage()
                .get(&name)
                .await
                .expect("get")
                .expect("value");
            replaces.insert(name, journal::digest(&bytes));
        }
        let j = Journal {
            vault: crate::memory_vault::ADDRESS.to_owned(),
            created_ms: 1,
            owner: Some(journal::Owner {
                shares_asked: 3,
                keys_returned: 3,
                threshold: 2,
                replaces,
            }),
            entries,
        };
        journal::write(&runner.rekey_dir(), &j).expect("journal");
        assert_eq!(
            scene.vault.issued_keys(),
            old,
            "not verified yet: the old keys open Vault"
        );
        runner.start().await.expect("start");
        let new: Vec<String> = answer.keys.iter().map(|k| k.expose().to_owned()).collect();
        assert_eq!(scene.vault.issued_keys(), new);
        assert_eq!(stored(&scene).await, new);
        assert_eq!(rekey_files(&scene), 0);
    }
}
