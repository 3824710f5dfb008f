//! Submitting the stored unseal keys to `sys/unseal`, each decrypted on the token just before
//! it is sent and zeroed after.

use super::*;

impl Runner {
    /// Submits stored keys until Vault is unsealed: any `threshold` readable keys will do, so
    /// one unreadable value (corrupted, written with another key) does not block the rest.
    pub(super) async fn unseal(&self, threshold: usize, names: &[String]) -> Result<(), PassError> {
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
    pub(super) async fn submit_keys(
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
}
