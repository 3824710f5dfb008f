//! Rotating the token's RSA key pair (`unseal-init hsm rotate-key`): the decisions, pure and
//! tested without I/O. The I/O is in `runner/rotate.rs`.
//!
//! The configuration names the key pair by label (`keyLabel`), so the pair in use is whichever
//! carries that label. A rotation:
//!
//! 1. writes an intent file ([`INTENT`]) naming the old pair's and the new pair's `CKA_ID`;
//! 2. generates the new pair under the temporary label [`next_label`];
//! 3. decrypts every stored value with the old pair, seals it to the new one on the host,
//!    checks each new ciphertext decrypts on the token with the new pair, and writes them all
//!    to the write-ahead journal ([`crate::journal`], in the [`SUBDIR`] of the journal
//!    directory);
//! 4. relabels the old pair to [`retired_label`], then the new pair to `keyLabel` (the switch);
//! 5. (in a shared store, the Secret of mode hsm-k8s: records the new pair's fingerprint)
//!    replaces each stored value with the journal's, verified by decrypting it with the new
//!    pair, then removes the journal;
//! 6. deletes the retired pair when asked (`--delete-old`), and removes the intent.
//!
//! Every start looks at the intent, the journal and the two pairs' labels (found by
//! `CKA_ID`, so a half-done relabel is seen as such) and [`decide`]s the next step: before
//! the journal exists the rotation is abandoned (the new pair destroyed, the stored values
//! never touched); once it exists the rotation is carried forward. So the stored values are
//! at every moment readable by the pair labelled `keyLabel`, or, during step 5, by the retired
//! pair and (from the journal) by the new one that the next start finishes storing.

use serde::{Deserialize, Serialize};

/// Subdirectory of the journal directory holding a rotation's intent and journal.
pub const SUBDIR: &str = "rotate";
/// The intent file: written before the new pair is generated, removed last.
pub const INTENT: &str = "rotate-intent.json";

/// The temporary label of the new pair until the switch.
pub fn next_label(label: &str) -> String {
    format!("{label}-next")
}

/// The label the old pair is moved to at the switch: the configured label, `-retired-` and
/// the first 16 hex digits of the old pair's fingerprint, so several retired pairs differ.
pub fn retired_label(label: &str, fingerprint: &str) -> String {
    let hex = fingerprint.strip_prefix("SHA256:").unwrap_or(fingerprint);
    let short: String = hex.chars().take(16).collect();
    format!("{label}-retired-{short}")
}

/// What the intent file records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Intent {
    /// The configured label (`keyLabel`) at the time.
    pub label: String,
    /// `CKA_ID` of the old pair, hex.
    pub old_id: String,
    /// Fingerprint of the old pair.
    pub old_fingerprint: String,
    /// `CKA_ID` of the new pair, hex.
    pub new_id: String,
    /// Delete the old pair at the end instead of keeping it retired.
    pub delete_old: bool,
}

impl Intent {
    /// Parses the intent file; the error names what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let intent: Intent = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        for (what, v) in [("oldId", &intent.old_id), ("newId", &intent.new_id)] {
            if v.is_empty() || hex::decode(v).is_err() {
                return Err(format!("`{what}` is not a hex CKA_ID"));
            }
        }
        if intent.old_id == intent.new_id {
            return Err("`oldId` and `newId` are the same".to_owned());
        }
        if intent.label.is_empty() {
            return Err("`label` is empty".to_owned());
        }
        Ok(intent)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// Where one pair stands, from the labels of its two halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pair {
    /// Neither half is on the token.
    Absent,
    /// Both halves carry the configured label.
    Configured,
    /// Both halves carry the temporary label.
    Next,
    /// Both halves carry the retired label.
    Retired,
    /// Anything else: one half missing, halves labelled differently (a relabel cut short), or
    /// a label the rotation never gives.
    Between,
}

/// Classifies a pair from its halves' labels (`None`: that half is absent). Pure.
pub fn classify(
    public: Option<&str>,
    private: Option<&str>,
    configured: &str,
    next: &str,
    retired: &str,
) -> Pair {
    match (public, private) {
        (None, None) => Pair::Absent,
        (Some(a), Some(b)) if a == b => {
            if a == configured {
                Pair::Configured
            } else if a == next {
                Pair::Next
            } else if a == retired {
                Pair::Retired
            } else {
                Pair::Between
            }
        }
        _ => Pair::Between,
    }
}

/// What a start finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The intent file.
    pub intent: bool,
    /// The journal of re-encrypted values.
    pub journal: bool,
    /// The old pair (meaningful with an intent).
    pub old: Pair,
    /// The new pair (meaningful with an intent).
    pub new: Pair,
}

/// The next step of a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No rotation on disk.
    Nothing,
    /// Before the journal: destroy whatever of the new pair exists, remove the intent (and a
    /// journal, when the new pair it was sealed to is gone). The old pair stays in use and the
    /// stored values were never touched.
    Abandon,
    /// Journalled: relabel the old pair to its retired label.
    RetireOld,
    /// The old pair is retired: relabel the new pair to the configured label.
    PromoteNew,
    /// Switched: store the journal's values, each verified with the new pair; then remove
    /// the journal.
    Store,
    /// Stored: delete the old pair if asked, then remove the intent.
    Finish,
    /// A state no step of this program leaves: nothing is touched; the reason says what.
    Refuse(&'static str),
}

/// Decides the next step from what a start finds. Pure.
pub fn decide(seen: Seen) -> Step {
    use Pair::*;
    if !seen.intent {
        return if seen.journal {
            Step::Refuse(
                "a rotation journal lies without its intent file, so which key pairs it concerns is unknown",
            )
        } else {
            Step::Nothing
        };
    }
    match (seen.journal, seen.old, seen.new) {
        (_, Configured, Configured) => {
            Step::Refuse("both the old and the new key pair carry the configured label")
        }
        // Nothing was switched yet: without a journal the new pair is dropped; with one,
        // the switch goes ahead (the journal's values were verified with the new pair).
        (false, Configured, _) => Step::Abandon,
        (true, Configured | Between, Next) => Step::RetireOld,
        (true, Configured, Absent) => Step::Abandon,
        (true, Retired | Absent, Next | Between) => Step::PromoteNew,
        (true, _, Configured) => Step::Store,
        (false, Retired | Absent, Configured) => Step::Finish,
        (false, _, Configured) => Step::Refuse(
            "the old key pair's halves are labelled neither as configured nor as retired",
        ),
        (true, Retired | Absent | Between, Absent) => Step::Refuse(
            "the new key pair is gone while the old one is no longer configured; relabel the retired pair back to the configured label (its values are the stored ones) and remove the rotation files",
        ),
        (_, _, _) => {
            Step::Refuse("the key pairs' labels match no step of a rotation (changed by hand?)")
        }
    }
}

/// What to do with one journal entry at the [`Step::Store`] step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryStep {
    /// Store the journal's value (the store holds it already, or what it held when the journal
    /// was written, or nothing then and now).
    Store,
    /// The value changed since the journal was written (a rekey, `hsm store`): the journal's
    /// copy is stale and must not overwrite it; what is stored now is re-encrypted instead.
    Changed,
    /// The value was deleted since the journal was written: nothing is stored.
    Deleted,
}

/// Decides for one entry from what the store holds now (`stored`), the digest
/// ([`crate::journal::digest`]) of what it held when the journal was written (`replaced`:
/// `None` if nothing), and the entry's bytes. Pure.
pub fn entry_step(stored: Option<&[u8]>, replaced: Option<&str>, entry: &[u8]) -> EntryStep {
    match (stored, replaced) {
        (Some(now), _) if now == entry => EntryStep::Store,
        (Some(now), Some(was)) if crate::journal::digest(now) == was => EntryStep::Store,
        (None, None) => EntryStep::Store,
        (None, Some(_)) => EntryStep::Deleted,
        (Some(_), _) => EntryStep::Changed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Pair::*;

    fn seen(intent: bool, journal: bool, old: Pair, new: Pair) -> Seen {
        Seen {
            intent,
            journal,
            old,
            new,
        }
    }

    #[test]
    fn labels_name_the_old_pair_by_fingerprint() {
        assert_eq!(next_label("bank-vaults"), "bank-vaults-next");
        let fp = format!("SHA256:{}", "ab".repeat(32));
        assert_eq!(
            retired_label("bank-vaults", &fp),
            "bank-vaults-retired-abababababababab"
        );
    }

    #[test]
    fn classify_reads_a_half_done_relabel_as_between() {
        let c = |a, b| classify(a, b, "k", "k-next", "k-retired-1");
        assert_eq!(c(None, None), Absent);
        assert_eq!(c(Some("k"), Some("k")), Configured);
        assert_eq!(c(Some("k-next"), Some("k-next")), Next);
        assert_eq!(c(Some("k-retired-1"), Some("k-retired-1")), Retired);
        assert_eq!(c(Some("k-retired-1"), Some("k")), Between);
        assert_eq!(c(Some("k-next"), None), Between);
        assert_eq!(c(Some("other"), Some("other")), Between);
    }

    #[test]
    fn every_crash_point_of_a_rotation_has_a_next_step_that_is_not_a_refusal() {
        // The states the steps pass through, in order, each as a crash would leave it.
        let path = [
            (seen(true, false, Configured, Absent), Step::Abandon),
            (seen(true, false, Configured, Between), Step::Abandon),
            (seen(true, false, Configured, Next), Step::Abandon),
            (seen(true, true, Configured, Next), Step::RetireOld),
            (seen(true, true, Between, Next), Step::RetireOld),
            (seen(true, true, Retired, Next), Step::PromoteNew),
            (seen(true, true, Retired, Between), Step::PromoteNew),
            (seen(true, true, Retired, Configured), Step::Store),
            (seen(true, false, Retired, Configured), Step::Finish),
            (seen(true, false, Absent, Configured), Step::Finish),
            (seen(false, false, Absent, Absent), Step::Nothing),
        ];
        for (s, want) in path {
            assert_eq!(decide(s), want, "{s:?}");
        }
    }

    #[test]
    fn before_the_journal_the_stored_values_stay_with_the_old_pair() {
        for new in [Absent, Next, Between] {
            assert_eq!(decide(seen(true, false, Configured, new)), Step::Abandon);
        }
        // A journal sealed to a new pair that is gone is useless: the old pair keeps going.
        assert_eq!(decide(seen(true, true, Configured, Absent)), Step::Abandon);
    }

    #[test]
    fn states_no_step_leaves_are_refused() {
        for s in [
            seen(false, true, Configured, Absent),
            seen(true, true, Configured, Configured),
            seen(true, true, Retired, Absent),
            seen(true, false, Between, Configured),
            seen(true, false, Retired, Next),
            seen(true, false, Absent, Absent),
        ] {
            assert!(matches!(decide(s), Step::Refuse(_)), "{s:?}");
        }
    }

    #[test]
    fn a_value_changed_since_the_journal_is_never_overwritten_by_it() {
        let (old, new, other) = (b"old".as_slice(), b"new".as_slice(), b"other".as_slice());
        let was = crate::journal::digest(old);
        assert_eq!(entry_step(Some(old), Some(&was), new), EntryStep::Store);
        assert_eq!(entry_step(Some(new), Some(&was), new), EntryStep::Store);
        assert_eq!(entry_step(None, None, new), EntryStep::Store);
        assert_eq!(entry_step(Some(other), Some(&was), new), EntryStep::Changed);
        assert_eq!(entry_step(Some(other), None, new), EntryStep::Changed);
        assert_eq!(entry_step(None, Some(&was), new), EntryStep::Deleted);
    }

    #[test]
    fn the_intent_round_trips_and_bad_ones_are_named() {
        let i = Intent {
            label: "bank-vaults".into(),
            old_id: "01".into(),
            old_fingerprint: "SHA256:00".into(),
            new_id: "aabb".into(),
            delete_old: false,
        };
        assert_eq!(Intent::from_bytes(&i.to_bytes()), Ok(i.clone()));
        let same = Intent {
            new_id: "01".into(),
            ..i.clone()
        };
        assert!(
            Intent::from_bytes(&same.to_bytes())
                .unwrap_err()
                .contains("same")
        );
        let bad = Intent {
            new_id: "zz".into(),
            ..i
        };
        assert!(
            Intent::from_bytes(&bad.to_bytes())
                .unwrap_err()
                .contains("newId")
        );
        assert!(Intent::from_bytes(b"{").is_err());
    }
}
