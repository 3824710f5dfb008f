//! The init write-ahead journal: the one durable copy of a freshly initialised Vault's keys
//! until every one of them is stored and verified.
//!
//! Vault hands out its unseal keys exactly once. The moment `sys/init` answers, every key is
//! encrypted on the host with the token's public key and written here — file fsync'd, renamed
//! into place, directory fsync'd — before anything else happens. It holds ciphertext only, the
//! same bytes the token or the Secret will hold, so it is no weaker than either. Every start
//! finishes a journal it finds; only when every entry is stored and verified is it removed.
//! The directory must be on a volume that outlives the container.
//!
//! A journal belongs to one Vault: it records that Vault's address, the seal configuration it
//! was initialised with, and what the store held under each name beforehand. A journal that
//! does not match the Vault a run talks to ([`belongs`]), or whose values would replace
//! anything but what they were meant to replace ([`entry_action`]), is refused and kept.
//!
//! While `sys/init` is in flight, and until its answer is in the journal, an in-flight marker
//! ([`IN_FLIGHT`]) sits next to it: Vault's container, which mounts the same volume, waits in
//! its `preStop` hook while the marker exists, so a pod deletion cannot stop Vault between
//! its handing out the keys and their reaching the disk.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// File name inside the journal directory.
pub const FILE_NAME: &str = "init-journal.json";
/// The in-flight marker's file name inside the journal directory (Vault's `preStop` hook
/// waits while it exists).
pub const IN_FLIGHT: &str = "init-in-flight";
/// Format version written.
pub const VERSION: u32 = 2;
/// The first format: no record of which Vault it belongs to; still read, so that keys
/// journalled by an older release are stored by this one.
pub const VERSION_V1: u32 = 1;

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
    /// Kept in the journal only, never stored: a key beyond the `secret_shares` asked for.
    pub journal_only: bool,
}

/// The Vault a journal belongs to, as `sys/init` left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `secret_shares` asked for.
    pub shares_asked: u32,
    /// Unseal keys the answer carried (equal to the above unless Vault misbehaved).
    pub keys_returned: u32,
    /// `secret_threshold` asked for.
    pub threshold: u32,
    /// SHA-256 (hex) of what the store held under a name when Vault was initialised: the
    /// value an entry of that name may replace. Names absent here held nothing.
    pub replaces: BTreeMap<String, String>,
}

/// Everything `sys/init` produced, sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// Vault's address.
    pub vault: String,
    /// When `sys/init` answered (milliseconds since the epoch).
    pub created_ms: u64,
    /// Which Vault, and what it may replace; `None` in a first-format journal.
    pub owner: Option<Owner>,
    /// The values, in storage order.
    pub entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Wire {
    version: u32,
    vault: String,
    created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<WireOwner>,
    entries: Vec<WireEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireOwner {
    shares_asked: u32,
    keys_returned: u32,
    threshold: u32,
    #[serde(default)]
    replaces: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireEntry {
    name: String,
    sealed: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    journal_only: bool,
}

/// SHA-256 of stored bytes, in hex: how a journal names the value an entry may replace.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Journal {
    /// Serialises to the file format (JSON, values in base64).
    pub fn to_bytes(&self) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let wire = Wire {
            version: if self.owner.is_some() {
                VERSION
            } else {
                VERSION_V1
            },
            vault: self.vault.clone(),
            created_ms: self.created_ms,
            owner: self.owner.as_ref().map(|o| WireOwner {
                shares_asked: o.shares_asked,
                keys_returned: o.keys_returned,
                threshold: o.threshold,
                replaces: o.replaces.clone(),
            }),
            entries: self
                .entries
                .iter()
                .map(|e| WireEntry {
                    name: e.name.clone(),
                    sealed: b64.encode(&e.sealed),
                    journal_only: e.journal_only,
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
        if wire.version != VERSION && wire.version != VERSION_V1 {
            return Err(format!(
                "format version {} (this program reads {VERSION_V1} and {VERSION})",
                wire.version
            ));
        }
        if wire.version == VERSION && wire.owner.is_none() {
            return Err(format!(
                "format version {VERSION} without the Vault it belongs to (`owner`)"
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
                journal_only: e.journal_only,
            });
        }
        if entries.is_empty() {
            return Err("no entries".to_owned());
        }
        Ok(Self {
            vault: wire.vault,
            created_ms: wire.created_ms,
            owner: wire.owner.map(|o| Owner {
                shares_asked: o.shares_asked,
                keys_returned: o.keys_returned,
                threshold: o.threshold,
                replaces: o.replaces,
            }),
            entries,
        })
    }

    /// The entries to store (those beyond `secret_shares` stay in the journal only).
    pub fn to_store(&self) -> impl Iterator<Item = (usize, &Entry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.journal_only)
    }

    /// Entries kept in the journal only.
    pub fn journal_only(&self) -> usize {
        self.entries.iter().filter(|e| e.journal_only).count()
    }
}

/// What a run sees of the Vault it talks to, for [`belongs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultSeen {
    /// Initialised.
    pub initialized: bool,
    /// Shares (`n` of seal-status).
    pub shares: u32,
    /// Threshold (`t`).
    pub threshold: u32,
}

/// Whether a journal may be finished into the Vault a run talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Belongs {
    /// The same address, initialised with the journal's seal configuration.
    Yes,
    /// Vault did not answer: nothing can be told yet (the journal waits; it is durable).
    WaitForVault,
    /// Another Vault: why.
    No(String),
}

/// Decides whether `j` belongs to the Vault at `address` that reports `seen` (`None`: it did
/// not answer). Pure.
pub fn belongs(j: &Journal, address: &str, seen: Option<VaultSeen>) -> Belongs {
    if j.vault.trim_end_matches('/') != address.trim_end_matches('/') {
        return Belongs::No(format!(
            "it was written for the Vault at {}, and this run talks to {address}",
            j.vault
        ));
    }
    let Some(seen) = seen else {
        return Belongs::WaitForVault;
    };
    if !seen.initialized {
        return Belongs::No(format!(
            "the Vault at {address} reports it is not initialised, but the journal's Vault was initialised (its storage was replaced or wiped, or this is another Vault)"
        ));
    }
    let Some(o) = &j.owner else {
        return Belongs::Yes;
    };
    let shares_ok =
        seen.shares == 0 || seen.shares == o.shares_asked || seen.shares == o.keys_returned;
    let threshold_ok = seen.threshold == 0 || seen.threshold == o.threshold;
    if !(shares_ok && threshold_ok) {
        return Belongs::No(format!(
            "the Vault at {address} reports {} key shares with threshold {}, but the journal's Vault was initialised with {} shares and threshold {}",
            seen.shares, seen.threshold, o.shares_asked, o.threshold
        ));
    }
    Belongs::Yes
}

/// What to do with one journal entry given what the store holds under its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryAction {
    /// The store holds exactly these bytes: verify only.
    AlreadyStored,
    /// Write the journal's value (nothing stored, or what the init was meant to replace).
    Write,
    /// A first-format journal, and the store holds a value written after it: the store's
    /// value wins.
    KeepNewer,
    /// The store holds a different value than the one the init found there: someone wrote
    /// it since. Never overwritten; the journal is kept and the run refuses.
    Conflict,
}

/// Decides what to do with the entry `name` (bytes `entry`) of `j`, given the store's bytes.
/// Pure.
pub fn entry_action(j: &Journal, name: &str, stored: Option<&[u8]>, entry: &[u8]) -> EntryAction {
    let Some(s) = stored else {
        return EntryAction::Write;
    };
    if s == entry {
        return EntryAction::AlreadyStored;
    }
    match &j.owner {
        Some(o) if o.replaces.get(name).is_some_and(|d| *d == digest(s)) => EntryAction::Write,
        Some(_) => EntryAction::Conflict,
        None if crate::envelope::stamp_of(s) > crate::envelope::stamp_of(entry) => {
            EntryAction::KeepNewer
        }
        None => EntryAction::Write,
    }
}

/// The in-flight marker in `dir`.
pub fn in_flight_path(dir: &Path) -> PathBuf {
    dir.join(IN_FLIGHT)
}

/// The in-flight marker: exists from before `sys/init` is sent until its answer is durable
/// (journal fsync'd), and is removed when dropped.
#[derive(Debug)]
pub struct InFlight {
    path: PathBuf,
}

impl InFlight {
    /// Creates the marker (holding this process's id, for whoever inspects it) and syncs the
    /// directory, so that a Vault container on another mount of the volume sees it.
    pub fn hold(dir: &Path) -> Result<Self, JournalError> {
        let path = in_flight_path(dir);
        searchable_by_vault(dir);
        let mut f = File::create(&path).map_err(io(&path, "creating the in-flight marker"))?;
        f.write_all(format!("{}\n", std::process::id()).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io(&path, "writing the in-flight marker"))?;
        sync_dir(dir)?;
        Ok(Self { path })
    }
}

/// Vault's container runs as another user and only tests whether the marker exists, which
/// needs search (not read) permission on the directory: add it if missing. The directory
/// holds ciphertext only, and search permission lists nothing.
fn searchable_by_vault(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::metadata(dir) else {
        return;
    };
    let mode = meta.permissions().mode();
    if mode & 0o011 != 0o011 {
        let wanted = fs::Permissions::from_mode((mode | 0o011) & 0o7777);
        if let Err(e) = fs::set_permissions(dir, wanted) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot let other users search the journal directory; a Vault container running as another user may not see the in-flight marker");
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path)
            && !absent(&e)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the in-flight marker; Vault's preStop hook waits for it until the grace period ends");
        }
    }
}

/// Removes a marker left by a process that was killed while holding it: no `sys/init` of
/// this process is in flight at start.
pub fn clear_stale_in_flight(dir: &Path) -> Result<bool, JournalError> {
    let path = in_flight_path(dir);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if absent(&e) => Ok(false),
        Err(e) => Err(io(&path, "removing a stale in-flight marker")(e)),
    }
}

/// Where a finished journal with journal-only entries is kept.
pub fn kept_path(dir: &Path, created_ms: u64) -> PathBuf {
    dir.join(format!("init-journal.{created_ms}.unstored-keys.json"))
}

/// Keeps a finished journal that holds entries never stored (keys beyond those asked for)
/// under [`kept_path`], where no start resumes it; returns that path.
pub fn retire(dir: &Path, j: &Journal) -> Result<PathBuf, JournalError> {
    let target = kept_path(dir, j.created_ms);
    fs::rename(path(dir), &target).map_err(io(&target, "keeping the finished journal"))?;
    sync_dir(dir)?;
    Ok(target)
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

/// Writes the journal durably (see [`write_file`]). A crash leaves either no journal or a
/// whole one.
pub fn write(dir: &Path, journal: &Journal) -> Result<PathBuf, JournalError> {
    write_file(dir, FILE_NAME, &journal.to_bytes())
}

/// Writes `dir/name` durably: a temporary file, fsync, rename over `name`, fsync of the
/// directory, so a crash leaves the old file or the whole new one. For the journal and the
/// files that travel with it (a rekey's or a key rotation's intent and markers).
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, JournalError> {
    fs::create_dir_all(dir).map_err(io(dir, "creating the directory"))?;
    let target = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp, "creating"))?;
        f.write_all(bytes).map_err(io(&tmp, "writing"))?;
        f.sync_all().map_err(io(&tmp, "syncing"))?;
    }
    fs::rename(&tmp, &target).map_err(io(&target, "renaming into place"))?;
    sync_dir(dir)?;
    Ok(target)
}

/// Removes `dir/name` if present, and the temporary file of a [`write_file`] a crash cut
/// short (never renamed, so never in force), then syncs the directory so the removal
/// survives a crash.
pub fn remove_file(dir: &Path, name: &str) -> Result<(), JournalError> {
    let mut removed = false;
    for target in [dir.join(name), dir.join(format!("{name}.tmp"))] {
        match fs::remove_file(&target) {
            Ok(()) => removed = true,
            Err(e) if absent(&e) => {}
            Err(e) => return Err(io(&target, "removing")(e)),
        }
    }
    if removed { sync_dir(dir) } else { Ok(()) }
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
    remove_file(dir, FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Scheme, encode};

    const ADDRESS: &str = "http://127.0.0.1:8200";

    fn entry(name: &str, byte: u8) -> Entry {
        Entry {
            name: name.into(),
            sealed: encode(Scheme::OaepSha256, 42, &[byte; 256]),
            journal_only: false,
        }
    }

    fn sample() -> Journal {
        let mut replaces = BTreeMap::new();
        replaces.insert("vault-root".to_owned(), digest(b"an earlier root token"));
        Journal {
            vault: ADDRESS.into(),
            created_ms: 42,
            owner: Some(Owner {
                shares_asked: 1,
                keys_returned: 2,
                threshold: 1,
                replaces,
            }),
            entries: vec![
                entry("vault-unseal-0", 1),
                Entry {
                    journal_only: true,
                    ..entry("vault-unseal-1", 3)
                },
                entry("vault-root", 2),
            ],
        }
    }

    #[test]
    fn removal_takes_the_temporary_file_of_a_write_a_crash_cut_short() {
        let dir = tempfile::tempdir().expect("tempdir");
        // What a SIGKILL between creating the temporary file and the rename leaves.
        fs::write(dir.path().join(format!("{FILE_NAME}.tmp")), b"{\"vers").expect("tmp");
        assert_eq!(read(dir.path()).expect("no journal in force"), None);
        remove(dir.path()).expect("remove");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);
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
    fn a_first_format_journal_still_reads() {
        let v1 = br#"{"version":1,"vault":"http://127.0.0.1:8200","createdMs":7,"entries":[{"name":"vault-root","sealed":"AAEC"}]}"#;
        let j = Journal::from_bytes(v1).expect("version 1 reads");
        assert_eq!(j.owner, None);
        assert_eq!(j.entries[0].sealed, [0, 1, 2]);
        assert!(!j.entries[0].journal_only);
        assert_eq!(Journal::from_bytes(&j.to_bytes()).expect("round trip"), j);
        let v2_without_owner = br#"{"version":2,"vault":"x","createdMs":7,"entries":[{"name":"vault-root","sealed":"AAEC"}]}"#;
        assert!(Journal::from_bytes(v2_without_owner).is_err());
    }

    #[test]
    fn a_journal_belongs_only_to_the_initialised_vault_at_its_address() {
        let j = sample();
        let seen = |initialized, shares, threshold| {
            Some(VaultSeen {
                initialized,
                shares,
                threshold,
            })
        };
        assert_eq!(belongs(&j, ADDRESS, seen(true, 1, 1)), Belongs::Yes);
        assert_eq!(
            belongs(&j, "http://127.0.0.1:8200/", seen(true, 2, 1)),
            Belongs::Yes
        );
        assert_eq!(belongs(&j, ADDRESS, None), Belongs::WaitForVault);
        let other = belongs(&j, "https://10.0.0.9:8200", seen(true, 1, 1));
        assert!(
            matches!(&other, Belongs::No(why) if why.contains(ADDRESS) && why.contains("10.0.0.9")),
            "{other:?}"
        );
        assert!(
            matches!(belongs(&j, ADDRESS, seen(false, 0, 0)), Belongs::No(why) if why.contains("not initialised")),
        );
        assert!(
            matches!(belongs(&j, ADDRESS, seen(true, 5, 3)), Belongs::No(why) if why.contains("5 key shares with threshold 3")),
        );
        // A first-format journal knows only its address.
        let v1 = Journal {
            owner: None,
            ..sample()
        };
        assert_eq!(belongs(&v1, ADDRESS, seen(true, 5, 3)), Belongs::Yes);
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
    fn entries_replace_only_what_the_init_found_in_the_store() {
        let j = sample();
        let value = encode(Scheme::OaepSha256, 100, &[1u8; 256]);
        let act = |name, stored: Option<&[u8]>| entry_action(&j, name, stored, &value);
        assert_eq!(act("vault-root", None), EntryAction::Write);
        assert_eq!(act("vault-root", Some(&value)), EntryAction::AlreadyStored);
        assert_eq!(
            act("vault-root", Some(b"an earlier root token")),
            EntryAction::Write,
            "the value the init replaces"
        );
        // Anything else under the name was written by someone else since: never overwritten,
        // whatever its stamp.
        let older = encode(Scheme::OaepSha256, 50, &[2u8; 256]);
        assert_eq!(act("vault-root", Some(&older)), EntryAction::Conflict);
        assert_eq!(act("vault-unseal-0", Some(&older)), EntryAction::Conflict);
        assert_eq!(
            act("vault-unseal-0", Some(&[3u8; 256])),
            EntryAction::Conflict
        );
    }

    #[test]
    fn a_first_format_journal_keeps_its_stamp_rule() {
        let j = Journal {
            owner: None,
            ..sample()
        };
        let entry = encode(Scheme::OaepSha256, 100, &[1u8; 256]);
        let act = |stored: Option<&[u8]>| entry_action(&j, "vault-unseal-0", stored, &entry);
        assert_eq!(act(None), EntryAction::Write);
        assert_eq!(act(Some(&entry)), EntryAction::AlreadyStored);
        assert_eq!(
            act(Some(&encode(Scheme::OaepSha256, 50, &[2u8; 256]))),
            EntryAction::Write
        );
        assert_eq!(act(Some(&[3u8; 256])), EntryAction::Write);
        let newer = encode(Scheme::OaepSha256, 150, &[4u8; 256]);
        assert_eq!(act(Some(&newer)), EntryAction::KeepNewer);
    }

    #[test]
    fn the_in_flight_marker_lives_as_long_as_its_guard_and_a_stale_one_is_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = in_flight_path(dir.path());
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        let held = InFlight::hold(dir.path()).expect("hold");
        assert!(marker.exists());
        let mode = fs::metadata(dir.path()).expect("stat").permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o711,
            "others may test for the marker, not list"
        );
        drop(held);
        assert!(!marker.exists());
        std::mem::forget(InFlight::hold(dir.path()).expect("hold"));
        assert!(clear_stale_in_flight(dir.path()).expect("clear"));
        assert!(!marker.exists());
        assert!(!clear_stale_in_flight(dir.path()).expect("nothing to clear"));
    }

    #[test]
    fn a_journal_with_unstored_keys_is_kept_where_no_start_resumes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = sample();
        assert_eq!(j.journal_only(), 1);
        assert_eq!(
            j.to_store()
                .map(|(_, e)| e.name.as_str())
                .collect::<Vec<_>>(),
            ["vault-unseal-0", "vault-root"]
        );
        write(dir.path(), &j).expect("write");
        let kept = retire(dir.path(), &j).expect("retire");
        assert_eq!(read(dir.path()).expect("read"), None);
        let back = Journal::from_bytes(&fs::read(&kept).expect("kept")).expect("parse");
        assert_eq!(back, j);
    }
}
