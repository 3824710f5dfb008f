//! What the sidecar does when the token refuses the user PIN.
//!
//! A SmartCard-HSM blocks the user PIN after a few wrong tries, and a restarted container
//! would present the same wrong PIN again. So a refused PIN never ends the sidecar: it stays
//! up (healthy, not ready) and logs in again only with a *different* value — one that appears
//! in the PIN file (a mounted Secret the kubelet updates in place). A PIN given directly
//! (flag, environment, config) cannot change, so then it waits until it is terminated.
//!
//! [`PinMemory`] holds the decisions (is this value worth a `C_Login`?) without I/O;
//! [`wait_for_new_pin`] polls the file. Values are compared in memory only, as [`Secret`]s:
//! neither the PIN nor anything derived from it is written anywhere.

use crate::hsm::HsmError;
use crate::keyring::KeyringError;
use crate::runner::PassError;
use crate::secret::Secret;
use crate::shutdown::Shutdown;
use crate::storage::StorageError;
use crate::telemetry::Telemetry;
use std::path::Path;
use std::time::Duration;

/// How often the PIN file is read while waiting for a corrected PIN. The kubelet itself
/// refreshes mounted Secrets only every minute or so, so a few seconds adds little.
pub const PIN_FILE_POLL: Duration = Duration::from_secs(2);

pub use crate::hsm::PinFailure;

/// The PIN problem behind `err`, if any, wherever in the chain the token's error sits.
pub fn pin_failure(err: &anyhow::Error) -> Option<PinFailure> {
    err.chain().find_map(|e| {
        if let Some(h) = e.downcast_ref::<HsmError>() {
            h.pin_failure()
        } else if let Some(k) = e.downcast_ref::<KeyringError>() {
            k.pin_failure()
        } else if let Some(p) = e.downcast_ref::<PassError>() {
            p.pin_failure()
        } else if let Some(s) = e.downcast_ref::<StorageError>() {
            s.hsm().and_then(HsmError::pin_failure)
        } else {
            None
        }
    })
}

/// What to do with a value read from the PIN file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A value not seen before and never rejected: log in with it.
    Try,
    /// The same value as last time: keep waiting, nothing to report.
    Unchanged,
    /// Changed, but to a value the token already rejected: keep waiting.
    KnownRejected,
    /// Empty: keep waiting (a Secret being rewritten, or cleared on purpose).
    Empty,
}

/// The PIN in use and every value the token rejected in this process's lifetime.
#[derive(Debug)]
pub struct PinMemory {
    in_use: Option<Secret>,
    last_seen: Option<Secret>,
    rejected: Vec<Secret>,
}

impl PinMemory {
    /// Starts with the configured PIN in use.
    pub fn new(pin: Option<Secret>) -> Self {
        Self {
            last_seen: pin.clone(),
            in_use: pin,
            rejected: Vec::new(),
        }
    }

    /// The PIN to log in with.
    pub fn in_use(&self) -> Option<&Secret> {
        self.in_use.as_ref()
    }

    /// Records that the PIN in use failed. Only a rejection by `C_Login` proves the value
    /// wrong; a blocked PIN says nothing about the value, but it is not tried again either
    /// until the file shows a different one.
    pub fn failed(&mut self, failure: PinFailure) {
        if failure == PinFailure::Rejected
            && let Some(pin) = self.in_use.take()
            && !self.rejected.contains(&pin)
        {
            self.rejected.push(pin);
        }
    }

    /// Judges a value just read from the PIN file; on [`Verdict::Try`] it becomes the PIN in
    /// use.
    pub fn consider(&mut self, read: Secret) -> Verdict {
        if read.is_empty() {
            return Verdict::Empty;
        }
        if self.last_seen.as_ref() == Some(&read) {
            return Verdict::Unchanged;
        }
        self.last_seen = Some(read.clone());
        if self.rejected.contains(&read) {
            return Verdict::KnownRejected;
        }
        self.in_use = Some(read);
        Verdict::Try
    }
}

/// Waits until `file` holds a PIN worth trying and makes it the one in use; without a file
/// (PIN given directly), waits for ever. Keeps the liveness heartbeat going meanwhile, so the
/// container is not restarted (a restart would present the refused PIN again).
///
/// Returns false when a stop was requested meanwhile.
pub async fn wait_for_new_pin(
    memory: &mut PinMemory,
    file: Option<&Path>,
    telemetry: &Telemetry,
    shutdown: &Shutdown,
) -> bool {
    let mut last_note: Option<String> = None;
    loop {
        telemetry.heartbeat();
        if shutdown.sleep_or_stop(PIN_FILE_POLL).await.is_stop() {
            return false;
        }
        let Some(path) = file else {
            continue;
        };
        let note = match crate::config::read_pin_file(path) {
            Ok(read) => match memory.consider(read) {
                Verdict::Try => {
                    tracing::info!(file = %path.display(), "the PIN file changed; logging in with the new PIN");
                    return true;
                }
                Verdict::Unchanged => continue,
                Verdict::KnownRejected => {
                    "the PIN file now holds a PIN the token already rejected; not trying it"
                        .to_owned()
                }
                Verdict::Empty => "the PIN file is empty".to_owned(),
            },
            Err(e) => e.to_string(),
        };
        if last_note.as_deref() != Some(note.as_str()) {
            tracing::warn!(file = %path.display(), "{note}; still waiting for a different PIN");
            last_note = Some(note);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_value_is_never_offered_again() {
        let mut m = PinMemory::new(Some(Secret::from("typo")));
        m.failed(PinFailure::Rejected);
        assert!(m.in_use().is_none());
        // The file still holds the typo: nothing to do.
        assert_eq!(m.consider(Secret::from("typo")), Verdict::Unchanged);
        // Another wrong value is tried once, then the first one comes back.
        assert_eq!(m.consider(Secret::from("typo2")), Verdict::Try);
        m.failed(PinFailure::Rejected);
        assert_eq!(m.consider(Secret::from("typo")), Verdict::KnownRejected);
        assert_eq!(m.consider(Secret::from("typo")), Verdict::Unchanged);
        assert_eq!(m.consider(Secret::from("typo2")), Verdict::KnownRejected);
        assert_eq!(m.consider(Secret::from("")), Verdict::Empty);
        assert_eq!(m.consider(Secret::from("right")), Verdict::Try);
        assert_eq!(m.in_use().map(Secret::expose), Some("right"));
    }

    #[test]
    fn a_blocked_pin_waits_for_a_change_but_is_not_marked_wrong() {
        let mut m = PinMemory::new(Some(Secret::from("good")));
        m.failed(PinFailure::Locked);
        assert_eq!(m.consider(Secret::from("good")), Verdict::Unchanged);
        assert_eq!(m.consider(Secret::from("other")), Verdict::Try);
        m.failed(PinFailure::Locked);
        // Never refused by C_Login, so going back to it is a change worth a try (the login
        // itself checks the token's flags first).
        assert_eq!(m.consider(Secret::from("good")), Verdict::Try);
    }

    #[test]
    fn pin_problems_are_found_through_the_wrappers() {
        let wrapped = anyhow::Error::from(PassError::Keyring(KeyringError::Storage(
            StorageError::Hsm(HsmError::PinIncorrect),
        )));
        assert_eq!(pin_failure(&wrapped), Some(PinFailure::Rejected));
        let locked = anyhow::Error::from(HsmError::PinLocked("locked")).context("opening");
        assert_eq!(pin_failure(&locked), Some(PinFailure::Locked));
        let other = anyhow::Error::from(PassError::StaleKeys(2));
        assert_eq!(pin_failure(&other), None);
        let reason = PinFailure::Rejected.reason();
        assert!(reason.contains("rejected"), "{reason}");
    }
}
