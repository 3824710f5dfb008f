//! The backup file of `hsm backup` / `hsm restore`, and what a restore does with each value.
//! Everything here is pure: the commands read and write the file, this module only encodes,
//! decodes and decides.
//!
//! # Format, version 1
//!
//! UTF-8 text, one record per line, each line ending in `\n`:
//!
//! ```text
//! nitrokey-unseal-init-backup 1
//! key SHA256:<64 lowercase hex digits>
//! value <name> <standard base64 of the stored bytes>
//! …                                   (one `value` line per stored name, sorted by name)
//! sha256 <64 lowercase hex digits>
//! ```
//!
//! - The first line names the format and its version; a reader refuses any other version.
//! - `key` is the fingerprint of the HSM key pair the values are encrypted with (SHA-256 of
//!   its DER SubjectPublicKeyInfo, as `hsm list` prints it and the Secret records it).
//! - Each `value` holds a name's stored bytes exactly as the store held them: this program's
//!   envelope (13-byte header and RSA ciphertext) or a Bank-Vaults value (bare ciphertext).
//!   Nothing in the file is in clear; only the stick's private key opens it.
//! - The last line is the SHA-256 of every byte before it, so a truncated or altered file is
//!   refused as a whole instead of restoring part of it.
//!
//! A reader takes at most [`MAX_FILE`] bytes, [`MAX_VALUES`] values of at most
//! [`MAX_VALUE`] bytes, and names of at most [`MAX_NAME`] characters of the set a Kubernetes
//! Secret allows in its keys.

use base64::Engine;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// First line's word.
pub const MAGIC: &str = "nitrokey-unseal-init-backup";
/// Current format version.
pub const VERSION: u32 = 1;
/// Largest backup file read.
pub const MAX_FILE: usize = 1 << 20;
/// Most values in one file.
pub const MAX_VALUES: usize = 1024;
/// Largest stored value (a header and an RSA-16384 ciphertext fit).
pub const MAX_VALUE: usize = 4096;
/// Longest name (a Kubernetes Secret data key's limit).
pub const MAX_NAME: usize = 253;

/// The content of a backup: the key pair's fingerprint and the stored bytes by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// `SHA256:` and 64 hex digits.
    pub key_id: String,
    /// Name and stored bytes, sorted by name, each name once.
    pub values: Vec<(String, Vec<u8>)>,
}

/// Why a backup could not be written or read. Never quotes the file's content.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackupError {
    /// The file is larger than any backup this program writes.
    #[error("the file has more than {MAX_FILE} bytes; it is not a backup written by unseal-init")]
    TooLarge,
    /// Not text.
    #[error("the file is not UTF-8 text; it is not a backup written by unseal-init")]
    NotText,
    /// The first line is wrong.
    #[error("line 1 is not `{MAGIC} {VERSION}`; it is not a backup written by unseal-init")]
    NotABackup,
    /// Another version of the format.
    #[error("the backup has format version {0}; this program reads version {VERSION}")]
    UnknownVersion(String),
    /// A line that is not what the format has there.
    #[error("line {line}: {what}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
    /// The checksum line is missing: the file was cut short.
    #[error("the file ends without its `sha256` line: it was cut short")]
    Truncated,
    /// The checksum does not match.
    #[error("the file's SHA-256 does not match its `sha256` line: it was altered or damaged")]
    Checksum,
    /// A name not allowed.
    #[error("`{0}` is not a valid name (1 to {MAX_NAME} of the characters a-z A-Z 0-9 - _ .)")]
    BadName(String),
    /// A name twice.
    #[error("`{0}` appears twice")]
    Duplicate(String),
    /// Too many values.
    #[error("more than {MAX_VALUES} values")]
    TooMany,
    /// A value empty or too long.
    #[error("`{name}` has {len} bytes; a stored value has 1 to {MAX_VALUE}")]
    BadValue {
        /// The name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The key fingerprint is not one.
    #[error("the key fingerprint is not `SHA256:` and 64 lowercase hex digits")]
    BadKeyId,
}

/// True for a name a store can hold: 1 to [`MAX_NAME`] characters of `a-z A-Z 0-9 - _ .`
/// (what a Kubernetes Secret accepts as a data key, and a PKCS#11 label holds as it is).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_key_id(id: &str) -> bool {
    id.strip_prefix("SHA256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn check(backup: &Backup) -> Result<(), BackupError> {
    if !valid_key_id(&backup.key_id) {
        return Err(BackupError::BadKeyId);
    }
    if backup.values.len() > MAX_VALUES {
        return Err(BackupError::TooMany);
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in &backup.values {
        if !valid_name(name) {
            return Err(BackupError::BadName(name.clone()));
        }
        if !seen.insert(name.as_str()) {
            return Err(BackupError::Duplicate(name.clone()));
        }
        if value.is_empty() || value.len() > MAX_VALUE {
            return Err(BackupError::BadValue {
                name: name.clone(),
                len: value.len(),
            });
        }
    }
    Ok(())
}

/// The file's bytes for `backup` (values sorted by name).
pub fn encode(backup: &Backup) -> Result<Vec<u8>, BackupError> {
    check(backup)?;
    let mut values: Vec<&(String, Vec<u8>)> = backup.values.iter().collect();
    values.sort_by(|a, b| a.0.cmp(&b.0));
    let mut text = format!("{MAGIC} {VERSION}\nkey {}\n", backup.key_id);
    let b64 = base64::engine::general_purpose::STANDARD;
    for (name, value) in values {
        text.push_str(&format!("value {name} {}\n", b64.encode(value)));
    }
    let sum = hex::encode(Sha256::digest(text.as_bytes()));
    text.push_str(&format!("sha256 {sum}\n"));
    Ok(text.into_bytes())
}

/// Reads a backup file's bytes; the whole file must be well-formed.
pub fn decode(bytes: &[u8]) -> Result<Backup, BackupError> {
    if bytes.len() > MAX_FILE {
        return Err(BackupError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| BackupError::NotText)?;
    let bad = |line: usize, what: &str| BackupError::BadLine {
        line,
        what: what.to_owned(),
    };
    let mut lines = text.split_inclusive('\n').enumerate();
    let first = lines.next().map(|(_, l)| l).unwrap_or_default();
    // Where the current line starts: the checksum covers every byte before its own line.
    let mut offset = first.len();
    let mut words = first.trim_end_matches('\n').splitn(2, ' ');
    if words.next() != Some(MAGIC) {
        return Err(BackupError::NotABackup);
    }
    match words.next() {
        Some(v) if v == VERSION.to_string() => {}
        Some(v) if !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(BackupError::UnknownVersion(v.to_owned()));
        }
        _ => return Err(BackupError::NotABackup),
    }
    let mut key_id = None;
    let mut values = Vec::new();
    let mut sum = None;
    for (i, raw) in lines {
        let line = i + 1;
        let start = offset;
        offset += raw.len();
        if sum.is_some() {
            return Err(bad(line, "text after the `sha256` line"));
        }
        let Some(content) = raw.strip_suffix('\n') else {
            return Err(BackupError::Truncated);
        };
        let (word, rest) = content.split_once(' ').unwrap_or((content, ""));
        match word {
            "key" if key_id.is_none() && values.is_empty() => key_id = Some(rest.to_owned()),
            "key" => return Err(bad(line, "a second or misplaced `key` line")),
            "value" => {
                if key_id.is_none() {
                    return Err(bad(line, "a `value` line before the `key` line"));
                }
                let (name, encoded) = rest
                    .split_once(' ')
                    .ok_or_else(|| bad(line, "a `value` line without name and value"))?;
                if !valid_name(name) {
                    return Err(BackupError::BadName(name.chars().take(MAX_NAME).collect()));
                }
                if encoded.len() > MAX_VALUE.div_ceil(3) * 4 {
                    return Err(BackupError::BadValue {
                        name: name.to_owned(),
                        len: encoded.len() / 4 * 3,
                    });
                }
                let value = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| bad(line, "the value is not standard base64"))?;
                if values.len() == MAX_VALUES {
                    return Err(BackupError::TooMany);
                }
                values.push((name.to_owned(), value));
            }
            "sha256" => {
                let actual = hex::encode(Sha256::digest(&bytes[..start]));
                if rest != actual {
                    return Err(BackupError::Checksum);
                }
                sum = Some(());
            }
            _ => return Err(bad(line, "not a `key`, `value` or `sha256` line")),
        }
    }
    if sum.is_none() {
        return Err(BackupError::Truncated);
    }
    let backup = Backup {
        key_id: key_id.ok_or_else(|| bad(2, "no `key` line"))?,
        values,
    };
    check(&backup)?;
    Ok(backup)
}

/// What the store holds under a name, compared with the backup's value for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Nothing.
    Absent,
    /// The very same bytes.
    Same,
    /// Other bytes that decrypt to the same value (written again since the backup).
    SameValue,
    /// A value that decrypts to something else.
    Different,
    /// A value this key pair cannot open.
    Unreadable,
}

/// What a restore does with one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write the backup's bytes (replacing what is there only after they verify).
    Write,
    /// Leave the store as it is: it already holds this value.
    Keep,
}

/// Decides every name's action before anything is written (for a restore, and for `hsm
/// store`'s one name): without `force`, a name that holds a different or unreadable value
/// stops the whole write, and the names in the way are returned.
pub fn plan_restore(
    found: &[(String, Existing)],
    force: bool,
) -> Result<Vec<(String, Action)>, Vec<String>> {
    let conflicts: Vec<String> = found
        .iter()
        .filter(|(_, e)| matches!(e, Existing::Different | Existing::Unreadable))
        .map(|(n, _)| n.clone())
        .collect();
    if !force && !conflicts.is_empty() {
        return Err(conflicts);
    }
    Ok(found
        .iter()
        .map(|(n, e)| {
            let action = match e {
                Existing::Same | Existing::SameValue => Action::Keep,
                Existing::Absent | Existing::Different | Existing::Unreadable => Action::Write,
            };
            (n.clone(), action)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Backup {
        Backup {
            key_id: format!("SHA256:{}", "ab".repeat(32)),
            values: vec![
                ("vault-unseal-1".into(), vec![1u8; 269]),
                ("vault-root".into(), vec![2u8; 256]),
                ("vault-unseal-0".into(), vec![3u8; 269]),
            ],
        }
    }

    #[test]
    fn round_trip_sorts_by_name_and_keeps_every_byte() {
        let bytes = encode(&sample()).expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("text");
        assert!(text.starts_with("nitrokey-unseal-init-backup 1\nkey SHA256:abab"));
        let back = decode(&bytes).expect("decode");
        let mut want = sample();
        want.values.sort();
        assert_eq!(back, want);
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count(), 6);
    }

    #[test]
    fn an_empty_store_is_a_valid_backup() {
        let empty = Backup {
            key_id: sample().key_id,
            values: vec![],
        };
        assert_eq!(decode(&encode(&empty).expect("encode")), Ok(empty));
    }

    #[test]
    fn a_file_cut_short_anywhere_is_refused() {
        let bytes = encode(&sample()).expect("encode");
        for cut in 0..bytes.len() {
            let err = decode(&bytes[..cut]).expect_err("a prefix is not a backup");
            assert!(
                matches!(
                    err,
                    BackupError::Truncated | BackupError::NotABackup | BackupError::Checksum
                ) || matches!(err, BackupError::BadLine { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn an_altered_byte_is_refused() {
        let bytes = encode(&sample()).expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("text");
        // A character inside the first value's base64.
        let at = text.find("value ").expect("value line") + 30;
        let mut altered = bytes.clone();
        altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
        assert_eq!(decode(&altered), Err(BackupError::Checksum));
        // An appended line after the checksum.
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"value x AAAA\n");
        assert!(matches!(
            decode(&longer),
            Err(BackupError::BadLine { line: 7, .. })
        ));
    }

    #[test]
    fn other_files_and_versions_are_named_as_such() {
        assert_eq!(decode(b"hello\n"), Err(BackupError::NotABackup));
        assert_eq!(decode(&[0xff, 0xfe]), Err(BackupError::NotText));
        assert_eq!(
            decode(b"nitrokey-unseal-init-backup 2\n"),
            Err(BackupError::UnknownVersion("2".into()))
        );
        assert_eq!(
            decode(&vec![b'a'; MAX_FILE + 1]),
            Err(BackupError::TooLarge)
        );
    }

    /// A file whose checksum is right but whose content is not allowed is still refused:
    /// the checksum proves integrity, not that this program wrote it.
    #[test]
    fn bad_names_values_and_keys_are_refused_even_with_a_right_checksum() {
        let with_sum = |body: &str| {
            let sum = hex::encode(Sha256::digest(body.as_bytes()));
            format!("{body}sha256 {sum}\n").into_bytes()
        };
        let key = format!("SHA256:{}", "cd".repeat(32));
        let head = format!("{MAGIC} 1\nkey {key}\n");
        assert_eq!(
            decode(&with_sum(&format!("{head}value a/b AAAA\n"))),
            Err(BackupError::BadName("a/b".into()))
        );
        assert_eq!(
            decode(&with_sum(&format!("{head}value a AAAA\nvalue a AAAA\n"))),
            Err(BackupError::Duplicate("a".into()))
        );
        assert!(matches!(
            decode(&with_sum(&format!("{head}value a !!!!\n"))),
            Err(BackupError::BadLine { line: 3, .. })
        ));
        assert!(matches!(
            decode(&with_sum(&format!("{head}value a \n"))),
            Err(BackupError::BadValue { len: 0, .. })
        ));
        let huge = "A".repeat((MAX_VALUE + 3) / 3 * 4 + 4);
        assert!(matches!(
            decode(&with_sum(&format!("{head}value a {huge}\n"))),
            Err(BackupError::BadValue { .. })
        ));
        assert_eq!(
            decode(&with_sum(&format!("{MAGIC} 1\nkey SHA256:xyz\n"))),
            Err(BackupError::BadKeyId)
        );
        assert!(matches!(
            decode(&with_sum(&format!("{MAGIC} 1\nvalue a AAAA\n"))),
            Err(BackupError::BadLine { line: 2, .. })
        ));
        let many: String = (0..=MAX_VALUES)
            .map(|i| format!("value v{i} AAAA\n"))
            .collect();
        assert_eq!(
            decode(&with_sum(&format!("{head}{many}"))),
            Err(BackupError::TooMany)
        );
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let mut b = sample();
        b.values.push(("vault-root".into(), vec![1]));
        assert_eq!(encode(&b), Err(BackupError::Duplicate("vault-root".into())));
        let mut b = sample();
        b.key_id = "SHA256:AB".into();
        assert_eq!(encode(&b), Err(BackupError::BadKeyId));
    }

    #[test]
    fn names_are_what_a_secret_key_and_a_label_can_hold() {
        for ok in ["vault-root", "vault-unseal-0", "a.b_c", "X"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "é", &"a".repeat(254)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_restore_overwrites_only_with_force_and_keeps_what_is_already_there() {
        let found = vec![
            ("a".to_owned(), Existing::Absent),
            ("b".to_owned(), Existing::Same),
            ("c".to_owned(), Existing::SameValue),
            ("d".to_owned(), Existing::Different),
            ("e".to_owned(), Existing::Unreadable),
        ];
        assert_eq!(
            plan_restore(&found, false),
            Err(vec!["d".to_owned(), "e".to_owned()])
        );
        let plan = plan_restore(&found, true).expect("forced");
        let actions: Vec<Action> = plan.into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            actions,
            [
                Action::Write,
                Action::Keep,
                Action::Keep,
                Action::Write,
                Action::Write
            ]
        );
        let calm = &found[..3];
        assert!(plan_restore(calm, false).is_ok());
    }
}
