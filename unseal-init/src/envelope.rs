//! The on-store format of an encrypted value.
//!
//! Values written by this program carry a small header so that a reader never guesses how a
//! value was encrypted: magic `NKV`, a format version, the padding scheme, and a write stamp
//! that orders duplicates left behind by an interrupted replace. Values written by Bank-Vaults
//! are bare RSA ciphertext (exactly one modulus long) and are recognised as legacy; their
//! scheme is unknown (OAEP-SHA1 since v1.33, PKCS#1 v1.5 before), so readers try both.
//! Everything here is pure.

use thiserror::Error;

/// First bytes of every value this program writes.
pub const MAGIC: &[u8; 3] = b"NKV";
/// Current format version.
pub const VERSION: u8 = 1;
/// Header length: magic, version, scheme, 8-byte stamp.
pub const HEADER_LEN: usize = 3 + 1 + 1 + 8;

/// RSA padding scheme a ciphertext was produced with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// RSA-OAEP, SHA-256 for label hash and MGF1, empty label.
    OaepSha256,
    /// RSA-OAEP, SHA-1 for label hash and MGF1, empty label (Bank-Vaults ≥ v1.33).
    OaepSha1,
    /// RSA PKCS#1 v1.5 (Bank-Vaults before v1.33; read only).
    Pkcs1v15,
}

impl Scheme {
    /// Byte stored in the header.
    pub fn id(self) -> u8 {
        match self {
            Scheme::OaepSha256 => 1,
            Scheme::OaepSha1 => 2,
            Scheme::Pkcs1v15 => 3,
        }
    }

    /// Scheme for a header byte.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Scheme::OaepSha256),
            2 => Some(Scheme::OaepSha1),
            3 => Some(Scheme::Pkcs1v15),
            _ => None,
        }
    }

    /// Human name used in logs and `hsm list`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::OaepSha256 => "RSA-OAEP-SHA256",
            Scheme::OaepSha1 => "RSA-OAEP-SHA1",
            Scheme::Pkcs1v15 => "RSA-PKCS1-v1.5",
        }
    }

    /// Schemes to try, in order, for a Bank-Vaults value without header.
    pub fn legacy_candidates() -> [Scheme; 2] {
        [Scheme::OaepSha1, Scheme::Pkcs1v15]
    }
}

/// A stored value taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Scheme from the header; `None` for a legacy (Bank-Vaults) value.
    pub scheme: Option<Scheme>,
    /// Write stamp (milliseconds since the epoch); 0 for legacy values.
    pub stamp: u64,
    /// The RSA ciphertext.
    pub ciphertext: Vec<u8>,
}

impl Envelope {
    /// True when the value predates this format.
    pub fn is_legacy(&self) -> bool {
        self.scheme.is_none()
    }
}

/// Why a stored value could not be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// Neither a headed value nor a bare ciphertext of the key's size.
    #[error(
        "stored value has {len} bytes: neither a {HEADER_LEN}-byte header plus a {modulus_len}-byte ciphertext nor a bare {modulus_len}-byte ciphertext"
    )]
    BadLength {
        /// Length seen.
        len: usize,
        /// Modulus length of the key in bytes.
        modulus_len: usize,
    },
    /// Header present but names a version this program does not know.
    #[error("stored value has format version {0}, this program reads version {VERSION}")]
    UnknownVersion(u8),
    /// Header present but names an unknown scheme.
    #[error("stored value names unknown encryption scheme {0}")]
    UnknownScheme(u8),
}

/// Serialises a ciphertext with its header.
pub fn encode(scheme: Scheme, stamp: u64, ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(scheme.id());
    out.extend_from_slice(&stamp.to_be_bytes());
    out.extend_from_slice(ciphertext);
    out
}

/// Parses a stored value for a key whose modulus is `modulus_len` bytes.
///
/// Length decides between formats, so a legacy ciphertext that happens to start with the magic
/// is never misread: legacy values are exactly one modulus long, headed ones longer.
pub fn decode(bytes: &[u8], modulus_len: usize) -> Result<Envelope, FormatError> {
    if bytes.len() == HEADER_LEN + modulus_len && bytes.starts_with(MAGIC) {
        let version = bytes[3];
        if version != VERSION {
            return Err(FormatError::UnknownVersion(version));
        }
        let scheme = Scheme::from_id(bytes[4]).ok_or(FormatError::UnknownScheme(bytes[4]))?;
        let mut stamp = [0u8; 8];
        stamp.copy_from_slice(&bytes[5..HEADER_LEN]);
        return Ok(Envelope {
            scheme: Some(scheme),
            stamp: u64::from_be_bytes(stamp),
            ciphertext: bytes[HEADER_LEN..].to_vec(),
        });
    }
    if bytes.len() == modulus_len {
        return Ok(Envelope {
            scheme: None,
            stamp: 0,
            ciphertext: bytes.to_vec(),
        });
    }
    Err(FormatError::BadLength {
        len: bytes.len(),
        modulus_len,
    })
}

/// Parses only the header part, for listings that do not know the key size.
pub fn describe(bytes: &[u8]) -> String {
    if bytes.len() > HEADER_LEN && bytes.starts_with(MAGIC) && bytes[3] == VERSION {
        match Scheme::from_id(bytes[4]) {
            Some(s) => format!("v{VERSION} {}", s.name()),
            None => format!("v{VERSION} unknown scheme {}", bytes[4]),
        }
    } else {
        "legacy (Bank-Vaults, no header)".to_owned()
    }
}

/// The write stamp of a stored value; 0 for legacy or unreadable values.
pub fn stamp_of(bytes: &[u8]) -> u64 {
    if bytes.len() > HEADER_LEN && bytes.starts_with(MAGIC) && bytes[3] == VERSION {
        let mut stamp = [0u8; 8];
        stamp.copy_from_slice(&bytes[5..HEADER_LEN]);
        u64::from_be_bytes(stamp)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_scheme_stamp_and_ciphertext() {
        let ct = vec![7u8; 256];
        for scheme in [Scheme::OaepSha256, Scheme::OaepSha1, Scheme::Pkcs1v15] {
            let bytes = encode(scheme, 1234, &ct);
            assert_eq!(bytes.len(), HEADER_LEN + 256);
            let env = decode(&bytes, 256).expect("decodes");
            assert_eq!(env.scheme, Some(scheme));
            assert_eq!(env.stamp, 1234);
            assert_eq!(env.ciphertext, ct);
        }
    }

    #[test]
    fn bare_ciphertext_is_legacy_even_when_it_starts_with_the_magic() {
        let mut ct = vec![0u8; 256];
        ct[..5].copy_from_slice(&[b'N', b'K', b'V', 1, 2]);
        let env = decode(&ct, 256).expect("decodes");
        assert!(env.is_legacy());
        assert_eq!(env.ciphertext, ct);
        assert_eq!(env.stamp, 0);
    }

    #[test]
    fn wrong_lengths_and_unknown_headers_are_errors() {
        assert_eq!(
            decode(&[1, 2, 3], 256),
            Err(FormatError::BadLength {
                len: 3,
                modulus_len: 256
            })
        );
        let mut bytes = encode(Scheme::OaepSha1, 1, &[0u8; 256]);
        bytes[3] = 9;
        assert_eq!(decode(&bytes, 256), Err(FormatError::UnknownVersion(9)));
        let mut bytes = encode(Scheme::OaepSha1, 1, &[0u8; 256]);
        bytes[4] = 42;
        assert_eq!(decode(&bytes, 256), Err(FormatError::UnknownScheme(42)));
    }

    #[test]
    fn legacy_candidates_try_oaep_sha1_before_pkcs1() {
        assert_eq!(
            Scheme::legacy_candidates(),
            [Scheme::OaepSha1, Scheme::Pkcs1v15]
        );
    }

    #[test]
    fn describe_names_the_format() {
        assert_eq!(
            describe(&encode(Scheme::OaepSha256, 0, &[1; 256])),
            "v1 RSA-OAEP-SHA256"
        );
        assert!(describe(&[1; 256]).starts_with("legacy"));
    }
}
