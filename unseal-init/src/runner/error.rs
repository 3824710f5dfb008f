//! Why a pass did not end with Vault unsealed ([`PassError`]), with the messages that tell an
//! operator what to do, and which failures are worth waiting out.

use super::init::UNSEAL_KEY_MAX_LEN;
use crate::hsm::{HsmError, PinFailure};
use crate::journal::JournalError;
use crate::keyring::KeyringError;
use crate::vault::VaultError;
use std::path::PathBuf;
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
