//! The init write-ahead journal: the one durable copy of a freshly initialised Vault's keys
//! until every one of them is stored and verified.
//!
//! Vault hands out its unseal keys exactly once. The moment `sys/init` answers, every key is
//! encrypted on the host with the token's public key and written here — file fsync'd, renamed
//! into place, directory fsync'd — before anything else happens. It holds ciphertext only, the
//! same bytes the token or the Secret will hold, so it is no weaker than either. Every start
//! finishes a journal it finds; only when every entry is stored and verified is it removed.
//! The directory must be on a volume that outlives the container.

use base64::Engine;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// File name inside the journal directory.
pub const FILE_NAME: &str = "init-journal.json";
/// Format version written.
pub const VERSION: u32 = 1;

/// Journal I/O failures, naming the file.
#[derive(Debug, Error)]
pub enum JournalError {
    /// Reading, writing, syncing or removing failed.
    #[error("init journal {path}: {action} failed: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The file exists but cannot be understood. It is never deleted: it may hold the only
    /// copy of a Vault's keys.
    #[error(
        "init journal {path} cannot be read ({reason}); it is kept untouched — inspect it before deleting it"
    )]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One value to store: the name and the sealed bytes (header + RSA ciphertext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Object name (`vault-unseal-0`, `vault-root`).
    pub name: String,
    /// The stored format's bytes.
    pub sealed: Vec<u8>,
}

/// Everything `sys/init` produced, sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// Vault's address, for the log.
    pub vault: String,
    /// When `sys/init` answered (milliseconds since the epoch).
    pub created_ms: u64,
    /// The values, in storage order.
    pub entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Wire {
    version: u32,
    vault: String,
    created_ms: u64,
    entries: Vec<WireEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEntry {
    name: String,
    sealed: String,
}

impl Journal {
    /// Serialises to the file format (JSON, values in base64).
    pub fn to_bytes(&self) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let wire = Wire {
            version: VERSION,
            vault: self.vault.clone(),
            created_ms: self.created_ms,
            entries: self
                .entries
                .iter()
                .map(|e| WireEntry {
                    name: e.name.clone(),
                    sealed: b64.encode(&e.sealed),
                })
                .collect(),
        };
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_vec_pretty(&wire).unwrap_or_default()
    }

    /// Parses the file format.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if wire.version != VERSION {
            return Err(format!(
                "format version {} (this program reads {VERSION})",
                wire.version
            ));
        }
        let mut entries = Vec::with_capacity(wire.entries.len());
        for e in wire.entries {
            let sealed = b64
                .decode(e.sealed.as_bytes())
                .map_err(|err| format!("entry `{}`: {err}", e.name))?;
            entries.push(Entry {
                name: e.name,
                sealed,
            });
        }
        if entries.is_empty() {
            return Err("no entries".to_owned());
        }
        Ok(Self {
            vault: wire.vault,
            created_ms: wire.created_ms,
            entries,
        })
    }
}

/// What to do with one journal entry given what the store holds under its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryAction {
    /// The store holds exactly these bytes: verify only.
    AlreadyStored,
    /// Write the journal's value (nothing stored, or something older).
    Write,
    /// The store holds a value written after this journal: the journal is stale for this
    /// name, so the store's value wins.
    KeepNewer,
}

/// Decides what to do with an entry; `stored_stamp` is the write stamp of the store's value
/// (0 for Bank-Vaults' values, which carry none) and `entry_stamp` the entry's.
pub fn entry_action(stored: Option<&[u8]>, entry: &[u8]) -> EntryAction {
    match stored {
        Some(s) if s == entry => EntryAction::AlreadyStored,
        Some(s) if crate::envelope::stamp_of(s) > crate::envelope::stamp_of(entry) => {
            EntryAction::KeepNewer
        }
        _ => EntryAction::Write,
    }
}

/// True when the error says there is no journal there (the directory itself may be missing,
/// or not a directory).
fn absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// The journal file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

fn io<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing the directory"))
}

/// Checks that `dir` exists (creating it) and takes a durable write, before Vault is asked for
/// keys that would have nowhere to go.
pub fn check_writable(dir: &Path) -> Result<(), JournalError> {
    fs::create_dir_all(dir).map_err(io(dir, "creating the directory"))?;
    let probe = dir.join(".write-probe");
    let result = (|| {
        let mut f = File::create(&probe)?;
        f.write_all(b"probe")?;
        f.sync_all()
    })();
    let _ = fs::remove_file(&probe);
    result.map_err(io(dir, "writing a probe file"))
}

/// Writes the journal durably: a temporary file, fsync, rename over the journal, fsync of the
/// directory. A crash leaves either no journal or a whole one.
pub fn write(dir: &Path, journal: &Journal) -> Result<PathBuf, JournalError> {
    fs::create_dir_all(dir).map_err(io(dir, "creating the directory"))?;
    let target = path(dir);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp, "creating"))?;
        f.write_all(&journal.to_bytes())
            .map_err(io(&tmp, "writing"))?;
        f.sync_all().map_err(io(&tmp, "syncing"))?;
    }
    fs::rename(&tmp, &target).map_err(io(&target, "renaming into place"))?;
    sync_dir(dir)?;
    Ok(target)
}

/// Reads the journal in `dir`, if there is one.
pub fn read(dir: &Path) -> Result<Option<Journal>, JournalError> {
    let target = path(dir);
    let bytes = match fs::read(&target) {
        Ok(b) => b,
        Err(e) if absent(&e) => return Ok(None),
        Err(e) => return Err(io(&target, "reading")(e)),
    };
    Journal::from_bytes(&bytes)
        .map(Some)
        .map_err(|reason| JournalError::Corrupt {
            path: target,
            reason,
        })
}

/// Removes the journal once every entry is stored and verified.
pub fn remove(dir: &Path) -> Result<(), JournalError> {
    let target = path(dir);
    match fs::remove_file(&target) {
        Ok(()) => sync_dir(dir),
        Err(e) if absent(&e) => Ok(()),
        Err(e) => Err(io(&target, "removing")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Scheme, encode};

    fn sample() -> Journal {
        Journal {
            vault: "http://127.0.0.1:8200".into(),
            created_ms: 42,
            entries: vec![
                Entry {
                    name: "vault-unseal-0".into(),
                    sealed: encode(Scheme::OaepSha256, 42, &[1u8; 256]),
                },
                Entry {
                    name: "vault-root".into(),
                    sealed: encode(Scheme::OaepSha256, 42, &[2u8; 256]),
                },
            ],
        }
    }

    #[test]
    fn written_journal_reads_back_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("journal");
        assert_eq!(read(&sub).expect("none yet"), None);
        check_writable(&sub).expect("writable");
        write(&sub, &sample()).expect("write");
        assert_eq!(read(&sub).expect("read"), Some(sample()));
        // No temporary or probe file is left next to it.
        let names: Vec<_> = fs::read_dir(&sub)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        remove(&sub).expect("remove");
        remove(&sub).expect("remove again");
        assert_eq!(read(&sub).expect("gone"), None);
    }

    #[test]
    fn a_damaged_journal_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(path(dir.path()), b"{\"version\":1,").expect("write");
        let err = read(dir.path()).unwrap_err();
        assert!(err.to_string().contains("kept untouched"), "{err}");
        assert!(path(dir.path()).exists());
    }

    #[test]
    fn the_file_holds_ciphertext_only() {
        let text = String::from_utf8(sample().to_bytes()).expect("utf-8");
        assert!(text.contains("vault-unseal-0") && text.contains("\"sealed\""));
        assert!(
            Journal::from_bytes(br#"{"version":9,"vault":"","createdMs":0,"entries":[]}"#).is_err()
        );
    }

    #[test]
    fn entries_are_written_unless_the_store_holds_them_or_something_newer() {
        let entry = encode(Scheme::OaepSha256, 100, &[1u8; 256]);
        assert_eq!(entry_action(None, &entry), EntryAction::Write);
        assert_eq!(
            entry_action(Some(&entry), &entry),
            EntryAction::AlreadyStored
        );
        let older = encode(Scheme::OaepSha256, 50, &[2u8; 256]);
        assert_eq!(entry_action(Some(&older), &entry), EntryAction::Write);
        let legacy = vec![3u8; 256];
        assert_eq!(entry_action(Some(&legacy), &entry), EntryAction::Write);
        let newer = encode(Scheme::OaepSha256, 150, &[4u8; 256]);
        assert_eq!(entry_action(Some(&newer), &entry), EntryAction::KeepNewer);
    }
}
