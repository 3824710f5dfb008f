//! Rotating Vault's unseal keys (`unseal-init rekey`): the decisions, pure and tested without
//! I/O. The I/O is in `runner/rekey.rs`.
//!
//! Vault hands the new keys out exactly once, in the answer to the last `sys/rekey/update`.
//! The rekey is therefore always started with verification required: Vault keeps the current
//! keys valid until a threshold of the new ones is submitted to `sys/rekey/verify`, and this
//! program submits them only once their ciphertexts are in the write-ahead journal
//! ([`crate::journal`], in the [`SUBDIR`] of the journal directory). So at every moment either
//! the current keys open Vault (and the store holds them), or the new ones do (and the journal
//! or the store holds them):
//!
//! 1. an intent file ([`INTENT`]) is written before `sys/rekey/init`: a later start that finds
//!    it without a journal cancels the rekey Vault may still hold (`DELETE sys/rekey/init`);
//! 2. the new keys are sealed on the host and journalled, then the intent goes;
//! 3. the new keys are verified with Vault, and a [`VERIFIED`] marker is written;
//! 4. each new key replaces the old one in the store (verified by decrypting it), keys
//!    beyond the new share count are removed, then the journal and the marker.
//!
//! A start that finds a journal without the marker does not know whether Vault switched: it
//! finds out ([`resume`]) by verifying (a verification still pending), unsealing (Vault came
//! back sealed: its rekey state died with it), or a probe rekey with the journal's keys that
//! is then cancelled (Vault unsealed with nothing pending).

use thiserror::Error;

/// Subdirectory of the journal directory holding a rekey's journal and markers.
pub const SUBDIR: &str = "rekey";
/// Written before `sys/rekey/init`; removed once the new keys are journalled or the rekey is
/// cancelled.
pub const INTENT: &str = "rekey-started";
/// Written once Vault verified the journal's keys (it unseals with them only from then on).
pub const VERIFIED: &str = "rekey-verified";
/// Vault's largest share count.
pub const MAX_SHARES: u8 = 255;

/// Flags that cannot make a valid seal configuration (exit code 2, nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid rekey request: {0}")]
pub struct RekeyInputError(pub String);

/// The new share count and threshold: what was asked, else what Vault has now
/// (`current_shares`, `current_threshold` from its seal status). Pure.
pub fn target(
    current_shares: u32,
    current_threshold: u32,
    shares: Option<u8>,
    threshold: Option<u8>,
) -> Result<(u8, u8), RekeyInputError> {
    let to_u8 = |v: u32, what: &str| {
        u8::try_from(v).map_err(|_| {
            RekeyInputError(format!("Vault reports {v} {what}, more than {MAX_SHARES}"))
        })
    };
    let n = match shares {
        Some(n) => n,
        None => to_u8(current_shares, "key shares")?,
    };
    let t = match threshold {
        Some(t) => t,
        None => to_u8(current_threshold, "as threshold")?,
    };
    check(n, t)?;
    Ok((n, t))
}

/// Vault's rules for a seal configuration, said before Vault is asked. Pure.
pub fn check(shares: u8, threshold: u8) -> Result<(), RekeyInputError> {
    if shares == 0 {
        return Err(RekeyInputError(
            "--secret-shares must be at least 1".to_owned(),
        ));
    }
    if threshold == 0 {
        return Err(RekeyInputError(
            "--secret-threshold must be at least 1".to_owned(),
        ));
    }
    if threshold > shares {
        return Err(RekeyInputError(format!(
            "--secret-threshold {threshold} is more than --secret-shares {shares}: no set of keys could ever unseal Vault"
        )));
    }
    if shares > 1 && threshold == 1 {
        return Err(RekeyInputError(format!(
            "--secret-threshold 1 with {shares} shares: Vault requires a threshold of at least 2 when there is more than one share"
        )));
    }
    Ok(())
}

/// What is on disk of a rekey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnDisk {
    /// The intent file.
    pub intent: bool,
    /// The journal of new keys.
    pub journal: bool,
    /// The verified marker.
    pub verified: bool,
}

/// What Vault says, when it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultSide {
    /// Initialised (one that is not lost its storage: no rekey of it can be finished).
    pub initialized: bool,
    /// Sealed (a rekey in progress died with the seal).
    pub sealed: bool,
    /// A rekey is in progress (`sys/rekey/init` `started`); unknown while sealed.
    pub rekey_started: bool,
    /// The new keys wait for verification (`verification_nonce` set).
    pub verification_pending: bool,
}

/// What to do about a rekey found on disk at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Nothing on disk.
    Nothing,
    /// Vault does not answer: nothing can be decided yet (the files are durable).
    WaitForVault,
    /// Only the intent: cancel the rekey Vault holds (`DELETE sys/rekey/init`; the current
    /// keys stay valid), then remove the intent.
    Cancel,
    /// Only the intent, and Vault holds no rekey: remove the intent.
    DropIntent,
    /// Vault verified the journal's keys: store them.
    Store,
    /// A verification is pending: submit the journal's keys to it.
    Verify,
    /// Vault came back sealed, so its rekey state is gone: whether the journal's keys or the
    /// stored ones open it says which set is Vault's.
    UnsealWithJournal,
    /// Vault is unsealed with nothing pending: a probe rekey with the journal's keys (then
    /// cancelled) says whether they are Vault's.
    Probe,
    /// Someone else's rekey is in progress over ours: nothing is touched; the operator
    /// decides (the journal is kept).
    Refuse,
    /// Vault reports it is not initialised: its storage was replaced since, and the journal's
    /// keys open nothing it has; the journal is kept for the operator.
    Foreign,
}

/// Decides the next step for a rekey found on disk, given Vault (`None`: not answering). Pure.
pub fn resume(disk: OnDisk, vault: Option<VaultSide>) -> Resume {
    if !disk.journal {
        if !disk.intent {
            return Resume::Nothing;
        }
        return match vault {
            None => Resume::WaitForVault,
            Some(v) if !v.sealed && v.rekey_started => Resume::Cancel,
            Some(_) => Resume::DropIntent,
        };
    }
    if disk.verified {
        return Resume::Store;
    }
    match vault {
        None => Resume::WaitForVault,
        Some(v) if !v.initialized => Resume::Foreign,
        Some(v) if v.sealed => Resume::UnsealWithJournal,
        Some(v) if v.verification_pending => Resume::Verify,
        Some(v) if v.rekey_started => Resume::Refuse,
        Some(_) => Resume::Probe,
    }
}

/// Whether Vault's refusal of the journal's keys (in a probe, an unseal or a verification)
/// says they are not its keys, as opposed to a failure that says nothing about them. Vault
/// and OpenBao answer a wrong set with "invalid key", "incorrect key shares" or a failed
/// decryption of the root key (observed with OpenBao 2.7: HTTP 500 "failed to read root key:
/// invalid key: … message authentication failed" for a probe, HTTP 400 "rekey verification
/// failed; incorrect key shares supplied" for a verification). Pure.
pub fn keys_refused(status: u16, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    (status == 400 || status == 500)
        && (m.contains("invalid key")
            || m.contains("incorrect key")
            || m.contains("message authentication failed"))
}

/// The unseal key names (`vault-unseal-N`) a rekey to `shares` leaves behind: those at or
/// beyond the new count unseal nothing any more. Pure.
pub fn stale_names(names: &[String], shares: u8) -> Vec<String> {
    names
        .iter()
        .filter(|n| crate::keyring::unseal_key_index(n).is_some_and(|i| i >= usize::from(shares)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_defaults_to_what_vault_has_and_is_checked() {
        assert_eq!(target(5, 3, None, None), Ok((5, 3)));
        assert_eq!(target(5, 3, Some(3), Some(2)), Ok((3, 2)));
        assert_eq!(target(5, 3, Some(7), None), Ok((7, 3)));
        assert_eq!(target(1, 1, None, None), Ok((1, 1)));
        let err = target(5, 3, Some(2), None).unwrap_err().to_string();
        assert!(
            err.contains("threshold 3 is more than --secret-shares 2"),
            "{err}"
        );
        let err = target(5, 3, None, Some(6)).unwrap_err().to_string();
        assert!(
            err.contains("threshold 6") && err.contains("shares 5"),
            "{err}"
        );
        assert!(
            target(5, 3, Some(0), None)
                .unwrap_err()
                .0
                .contains("at least 1")
        );
        assert!(
            target(5, 3, None, Some(0))
                .unwrap_err()
                .0
                .contains("at least 1")
        );
        assert!(
            target(5, 3, None, Some(1))
                .unwrap_err()
                .0
                .contains("at least 2")
        );
        assert!(target(300, 3, None, None).unwrap_err().0.contains("300"));
    }

    const UNSEALED: VaultSide = VaultSide {
        initialized: true,
        sealed: false,
        rekey_started: false,
        verification_pending: false,
    };

    fn disk(intent: bool, journal: bool, verified: bool) -> OnDisk {
        OnDisk {
            intent,
            journal,
            verified,
        }
    }

    #[test]
    fn an_intent_alone_cancels_whatever_rekey_vault_still_holds() {
        let started = VaultSide {
            rekey_started: true,
            ..UNSEALED
        };
        let verifying = VaultSide {
            rekey_started: true,
            verification_pending: true,
            ..UNSEALED
        };
        let sealed = VaultSide {
            sealed: true,
            ..UNSEALED
        };
        let intent = disk(true, false, false);
        assert_eq!(resume(disk(false, false, false), None), Resume::Nothing);
        assert_eq!(resume(intent, None), Resume::WaitForVault);
        assert_eq!(resume(intent, Some(started)), Resume::Cancel);
        // The new keys were handed out but never journalled: they must never take effect.
        assert_eq!(resume(intent, Some(verifying)), Resume::Cancel);
        assert_eq!(resume(intent, Some(UNSEALED)), Resume::DropIntent);
        assert_eq!(resume(intent, Some(sealed)), Resume::DropIntent);
    }

    #[test]
    fn a_journal_is_finished_or_found_out_never_dropped_blindly() {
        let j = disk(false, true, false);
        assert_eq!(resume(j, None), Resume::WaitForVault);
        assert_eq!(
            resume(
                j,
                Some(VaultSide {
                    sealed: true,
                    ..UNSEALED
                })
            ),
            Resume::UnsealWithJournal
        );
        assert_eq!(
            resume(
                j,
                Some(VaultSide {
                    rekey_started: true,
                    verification_pending: true,
                    ..UNSEALED
                })
            ),
            Resume::Verify
        );
        assert_eq!(resume(j, Some(UNSEALED)), Resume::Probe);
        let wiped = VaultSide {
            initialized: false,
            sealed: true,
            ..UNSEALED
        };
        assert_eq!(resume(j, Some(wiped)), Resume::Foreign);
        assert_eq!(
            resume(disk(true, false, false), Some(wiped)),
            Resume::DropIntent
        );
        assert_eq!(
            resume(
                j,
                Some(VaultSide {
                    rekey_started: true,
                    ..UNSEALED
                })
            ),
            Resume::Refuse
        );
        // Verified: stored whatever Vault says, even unreachable.
        for v in [None, Some(UNSEALED)] {
            assert_eq!(resume(disk(false, true, true), v), Resume::Store);
            assert_eq!(resume(disk(true, true, true), v), Resume::Store);
        }
    }

    #[test]
    fn only_an_answer_about_the_keys_counts_as_refusing_them() {
        assert!(keys_refused(
            500,
            "failed to read root key: invalid key: failed to decrypt keys from storage: cipher: message authentication failed"
        ));
        assert!(keys_refused(
            400,
            "rekey verification failed; incorrect key shares supplied"
        ));
        assert!(keys_refused(400, "Unseal failed, invalid key"));
        assert!(!keys_refused(503, "Vault is sealed"));
        assert!(!keys_refused(500, "internal error"));
        assert!(!keys_refused(400, "incorrect nonce supplied"));
    }

    #[test]
    fn keys_beyond_the_new_share_count_are_stale() {
        let names: Vec<String> = [
            "vault-root",
            "vault-test",
            "vault-unseal-0",
            "vault-unseal-1",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain((2..5).map(|i| format!("vault-unseal-{i}")))
        .collect();
        assert_eq!(stale_names(&names, 3), ["vault-unseal-3", "vault-unseal-4"]);
        assert!(stale_names(&names, 5).is_empty());
        assert_eq!(stale_names(&names, 1).len(), 4);
    }
}
