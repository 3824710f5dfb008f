//! Vault's secrets on the store: encrypt on the host, write, read back, decrypt on the token,
//! compare, and only then drop older copies. Reads understand both this program's format and
//! Bank-Vaults' bare ciphertext.
//!
//! The key ring sees the store through [`Storage`] and the token's private key through
//! [`Decrypter`], so its rules are unit-tested with an in-memory store and a software key.

use crate::crypto::HostKey;
use crate::envelope::{self, Scheme};
use crate::hsm::HsmError;
use crate::hsm::PinFailure;
use crate::hsm_actor::HsmHandle;
use crate::keypair;
use crate::secret::Secret;
use crate::storage::{Storage, StorageError};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;
use zeroize::Zeroizing;

/// Name of the pre-flight test object.
pub const TEST_KEY: &str = "vault-test";
/// Name of the root token object.
pub const ROOT_KEY: &str = "vault-root";
/// Prefix of the unseal key objects.
pub const UNSEAL_PREFIX: &str = "vault-unseal-";

/// Name of unseal key `i`.
pub fn unseal_key_name(i: usize) -> String {
    format!("{UNSEAL_PREFIX}{i}")
}

/// The index of an unseal key name (`vault-unseal-3` → 3).
pub fn unseal_key_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(UNSEAL_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The unseal key names among `names`, in key order.
pub fn unseal_key_names(names: &[String]) -> Vec<String> {
    let mut keys: Vec<(usize, &String)> = names
        .iter()
        .filter_map(|n| unseal_key_index(n).map(|i| (i, n)))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().map(|(_, n)| n.clone()).collect()
}

/// Fewest hex characters accepted as an unseal key (16 bytes), well under what Vault and
/// OpenBao hand out: 32-byte keys (64 characters), Shamir shares one byte more.
const MIN_UNSEAL_HEX: usize = 32;
/// Shortest root token Vault or OpenBao hands out: `s.` and 24 characters; Vault 1.10+ tokens
/// (`hvs.…`) are longer.
const MIN_ROOT_TOKEN: usize = 26;

/// Checks that decrypted bytes look like a value Bank-Vaults stores under `name`; on a
/// mismatch, says what such a value looks like. Unseal keys are hex, `vault-test` holds its
/// own name, the root token is at least 26 printable characters, and anything else is
/// printable ASCII; none holds spaces.
pub fn plaintext_shape(name: &str, pt: &[u8]) -> Result<(), &'static str> {
    let graphic = |b: &u8| b.is_ascii_graphic();
    if unseal_key_index(name).is_some() {
        let hex = pt.len() >= MIN_UNSEAL_HEX && pt.iter().all(u8::is_ascii_hexdigit);
        return if hex {
            Ok(())
        } else {
            Err("an unseal key (at least 32 hex characters)")
        };
    }
    if name == TEST_KEY {
        return if pt == TEST_KEY.as_bytes() {
            Ok(())
        } else {
            Err("`vault-test`")
        };
    }
    if name == ROOT_KEY {
        return if pt.len() >= MIN_ROOT_TOKEN && pt.iter().all(graphic) {
            Ok(())
        } else {
            Err("a root token (at least 26 printable characters)")
        };
    }
    if !pt.is_empty() && pt.iter().all(graphic) {
        Ok(())
    } else {
        Err("printable text")
    }
}

/// Keyring failures; never include a secret value.
#[derive(Debug, Error)]
pub enum KeyringError {
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Token failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The stored value is not in a known format.
    #[error("`{name}`: {source}")]
    Format {
        /// Key name.
        name: String,
        /// Why.
        source: envelope::FormatError,
    },
    /// Host-side encryption failed (e.g. a value longer than RSA-OAEP can hold).
    #[error("`{name}` cannot be encrypted: {reason}")]
    Encrypt {
        /// Key name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Write verification failed.
    #[error("`{name}` was stored but does not read back and decrypt to the written value")]
    Verify {
        /// Key name.
        name: String,
    },
    /// The token could not decrypt the value with any applicable scheme.
    #[error(
        "`{name}` cannot be decrypted by the HSM key ({reason}); was it written with another key?"
    )]
    Decrypt {
        /// Key name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The store records another key pair than this token's.
    #[error(
        "the stored values are encrypted with HSM key pair {stored} (as recorded with them), but this token's key pair is {ours}; refusing to use this token with them and writing nothing (use a token holding the same key pair, e.g. one restored from the DKEK backup, or another store)"
    )]
    OtherKey {
        /// Fingerprint the store records.
        stored: String,
        /// Fingerprint of this token's key pair.
        ours: String,
    },
    /// The store holds values from before fingerprints were recorded that this key cannot
    /// open, so they may belong to another key pair.
    #[error(
        "the store holds values but records no key fingerprint, and `{name}` cannot be read with this token's key pair {ours} ({reason}); it may have been written with another key pair, so nothing is written with this one (use the token that wrote them, or delete the unreadable value with `unseal-init hsm delete` if it is merely corrupted)"
    )]
    UnprovenKey {
        /// The value tried.
        name: String,
        /// Fingerprint of this token's key pair.
        ours: String,
        /// Why it could not be read.
        reason: String,
    },
    /// The fingerprint record is not one.
    #[error(
        "the key fingerprint recorded with the stored values is not one (`SHA256:` and 64 hex digits)"
    )]
    BadKeyId,
    /// The value decrypts, but not to what a value of its name looks like.
    #[error("`{name}` does not decrypt to {expected}")]
    NotText {
        /// Key name.
        name: String,
        /// What a value of that name looks like.
        expected: &'static str,
    },
}

impl KeyringError {
    /// The token error behind this one, if any.
    pub fn hsm(&self) -> Option<&HsmError> {
        match self {
            KeyringError::Hsm(h) => Some(h),
            KeyringError::Storage(s) => s.hsm(),
            _ => None,
        }
    }

    /// The PIN problem behind this error, if any (the only errors no retry can fix).
    pub fn pin_failure(&self) -> Option<PinFailure> {
        self.hsm().and_then(HsmError::pin_failure)
    }

    /// True when the value itself is the problem (unreadable, foreign, corrupted), so other
    /// values may still be fine.
    pub fn is_about_the_value(&self) -> bool {
        matches!(
            self,
            KeyringError::Format { .. }
                | KeyringError::Decrypt { .. }
                | KeyringError::NotText { .. }
        )
    }
}

/// Decrypts with the token's private key.
pub trait Decrypter: Send + Sync {
    /// Decrypts `ciphertext` produced with `scheme`.
    fn decrypt<'a>(
        &'a self,
        scheme: Scheme,
        ciphertext: &'a [u8],
    ) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, HsmError>>;
}

impl Decrypter for HsmHandle {
    fn decrypt<'a>(
        &'a self,
        scheme: Scheme,
        ciphertext: &'a [u8],
    ) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, HsmError>> {
        let ct = ciphertext.to_vec();
        async move {
            self.call("decrypt", move |h| keypair::decrypt(h, scheme, &ct))
                .await
        }
        .boxed()
    }
}

/// Encrypts with the token's public key, stores, and decrypts with the token.
#[derive(Clone)]
pub struct Keyring {
    decrypter: Arc<dyn Decrypter>,
    key: HostKey,
    scheme: Scheme,
    storage: Arc<dyn Storage>,
    /// Set once the store is known to belong to this key pair ([`Keyring::check_identity`]).
    identity_checked: Arc<std::sync::atomic::AtomicBool>,
}

/// What the fingerprint record says, compared with this key pair's: `Ok(true)` when it
/// matches, `Ok(false)` when there is no record.
pub fn identity_matches(record: Option<&str>, ours: &str) -> Result<bool, KeyringError> {
    let Some(text) = record.map(str::trim) else {
        return Ok(false);
    };
    let well_formed = text.strip_prefix("SHA256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !well_formed {
        return Err(KeyringError::BadKeyId);
    }
    if text == ours {
        Ok(true)
    } else {
        Err(KeyringError::OtherKey {
            stored: text.to_owned(),
            ours: ours.to_owned(),
        })
    }
}

/// Milliseconds since the epoch, as the ciphertext header and the journals record them.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Keyring {
    /// Builds a keyring; `scheme` is the one [`keypair::probe_scheme`] chose.
    pub fn new(
        decrypter: Arc<dyn Decrypter>,
        key: HostKey,
        scheme: Scheme,
        storage: Arc<dyn Storage>,
    ) -> Self {
        Self {
            decrypter,
            key,
            scheme,
            storage,
            identity_checked: Arc::default(),
        }
    }

    /// This key pair's fingerprint as recorded in the store.
    pub fn fingerprint(&self) -> Result<String, KeyringError> {
        self.key
            .fingerprint()
            .map(|f| f.to_string())
            .map_err(|e| KeyringError::Encrypt {
                name: "the key fingerprint".to_owned(),
                reason: e.to_string(),
            })
    }

    /// Makes sure the store belongs to this key pair before anything is written to it: the
    /// recorded fingerprint must be this pair's. Without a record (an empty store, or values
    /// written before records existed) one value must open with this key first, and then
    /// this pair's fingerprint is recorded. A store shared by several sticks (a Secret) is
    /// so never rewritten under another key pair. Checked once per keyring.
    pub async fn check_identity(&self) -> Result<(), KeyringError> {
        use std::sync::atomic::Ordering;
        if self.identity_checked.load(Ordering::SeqCst) || !self.storage.shared() {
            return Ok(());
        }
        let ours = self.fingerprint()?;
        let record = self.storage.key_id().await?;
        if !identity_matches(record.as_deref(), &ours)? {
            let names = self.storage.names().await?;
            let probe = if names.iter().any(|n| n == TEST_KEY) {
                Some(TEST_KEY.to_owned())
            } else {
                unseal_key_names(&names)
                    .into_iter()
                    .next()
                    .or_else(|| names.iter().find(|n| *n == ROOT_KEY).cloned())
            };
            if let Some(name) = probe {
                match self.load(&name).await {
                    Ok(_) => {}
                    Err(e) if e.is_about_the_value() => {
                        return Err(KeyringError::UnprovenKey {
                            name,
                            ours,
                            reason: e.to_string(),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
            self.storage.set_key_id(&ours).await?;
            // Several pods may record at once: whichever record stands is the one that counts.
            let stored = self.storage.key_id().await?;
            identity_matches(stored.as_deref(), &ours)?;
            tracing::info!(
                fingerprint = ours,
                "recorded the key pair's fingerprint with the stored values"
            );
        }
        self.identity_checked.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Scheme used for new values.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The longest value the key and scheme can encrypt, in bytes.
    pub fn capacity(&self) -> usize {
        self.key.capacity(self.scheme)
    }

    /// The key's size in bits.
    pub fn key_bits(&self) -> usize {
        self.key.bits()
    }

    /// The storage backend.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// Decrypts to text. Bare (Bank-Vaults) values must also have the shape of their name,
    /// because they may be PKCS#1 v1.5, whose decryption with implicit rejection (the `rsa`
    /// crate, OpenSSL 3.2+ and so SoftHSM2 built on it) answers a wrong padding with random
    /// bytes instead of an error: a foreign or corrupted bare value would otherwise "decrypt"
    /// to garbage. This program's own values are OAEP, which always rejects explicitly, so
    /// they are held to no shape: whatever Vault answered must stay readable.
    async fn decrypt_envelope(
        &self,
        name: &str,
        env: &envelope::Envelope,
    ) -> Result<Secret, KeyringError> {
        let candidates: Vec<Scheme> = match env.scheme {
            Some(s) => vec![s],
            None => Scheme::legacy_candidates().to_vec(),
        };
        let mut reasons = Vec::new();
        let mut misshapen = None;
        for scheme in candidates {
            match self.decrypter.decrypt(scheme, &env.ciphertext).await {
                Ok(pt) => {
                    let shape = match env.scheme {
                        Some(_) => Ok(()),
                        None => plaintext_shape(name, &pt),
                    };
                    match (shape, std::str::from_utf8(&pt)) {
                        (Ok(()), Ok(text)) => return Ok(Secret::from(text)),
                        (Err(expected), _) => misshapen = Some(expected),
                        (Ok(()), Err(_)) => misshapen = Some("text"),
                    }
                }
                Err(e) if e.pin_failure().is_some() || e.is_transient() => {
                    return Err(e.into());
                }
                Err(e) => reasons.push(format!("{}: {e}", scheme.name())),
            }
        }
        if let Some(expected) = misshapen {
            return Err(KeyringError::NotText {
                name: name.to_owned(),
                expected,
            });
        }
        Err(KeyringError::Decrypt {
            name: name.to_owned(),
            reason: reasons.join("; "),
        })
    }

    fn decode(&self, name: &str, bytes: &[u8]) -> Result<envelope::Envelope, KeyringError> {
        envelope::decode(bytes, self.key.modulus_len()).map_err(|source| KeyringError::Format {
            name: name.to_owned(),
            source,
        })
    }

    /// Decrypts stored bytes of `name` to text.
    pub async fn open(&self, name: &str, bytes: &[u8]) -> Result<Secret, KeyringError> {
        let env = self.decode(name, bytes)?;
        self.decrypt_envelope(name, &env).await
    }

    /// Decrypts the value under `name`, if any.
    pub async fn load(&self, name: &str) -> Result<Option<Secret>, KeyringError> {
        let Some(bytes) = self.storage.get(name).await? else {
            return Ok(None);
        };
        self.open(name, &bytes).await.map(Some)
    }

    /// Encrypts `value` on the host into the stored format. No token involved: this is what
    /// runs in the milliseconds after `sys/init` answers.
    pub fn seal(&self, name: &str, value: &Secret) -> Result<Vec<u8>, KeyringError> {
        let ct = self
            .key
            .encrypt(self.scheme, value.expose().as_bytes())
            .map_err(|e| KeyringError::Encrypt {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(envelope::encode(self.scheme, now_ms(), &ct))
    }

    /// Writes already-sealed `bytes` under `name`, then reads them back and decrypts them on
    /// the token (and compares with `expected` when the clear value is at hand); older copies
    /// are removed only after that.
    pub async fn store_sealed(
        &self,
        name: &str,
        bytes: &[u8],
        expected: Option<&Secret>,
    ) -> Result<(), KeyringError> {
        self.check_identity().await?;
        let verify_err = || KeyringError::Verify {
            name: name.to_owned(),
        };
        let mut bytes = bytes;
        let concurrent;
        if self.storage.get(name).await?.as_deref() != Some(bytes) {
            self.storage.put(name, bytes).await?;
            concurrent = self.storage.get(name).await?;
            if concurrent.as_deref() != Some(bytes) {
                // Another writer (a pod starting at the same moment) replaced it. That is
                // fine only if its value opens to the very same text; it is then the one kept.
                match (expected, concurrent.as_deref()) {
                    (Some(_), Some(theirs)) => {
                        tracing::info!(
                            key = name,
                            "another writer stored this value at the same time; verifying theirs"
                        );
                        bytes = theirs;
                    }
                    _ => return Err(verify_err()),
                }
            }
        }
        let opened = self.open(name, bytes).await?;
        if expected.is_some_and(|e| e != &opened) {
            return Err(verify_err());
        }
        let removed = self.storage.prune(name, bytes).await?;
        if removed > 0 {
            tracing::info!(key = name, removed, "replaced older copy");
        }
        Ok(())
    }

    /// Encrypts and stores `value` under `name`, replacing any older value only after the new
    /// one reads back and decrypts to `value`.
    pub async fn store(&self, name: &str, value: &Secret) -> Result<(), KeyringError> {
        let bytes = self.seal(name, value)?;
        self.store_sealed(name, &bytes, Some(value)).await
    }

    /// Re-writes a legacy value in the current format; false if it was current already or
    /// absent.
    pub async fn migrate(&self, name: &str) -> Result<bool, KeyringError> {
        let Some(bytes) = self.storage.get(name).await? else {
            return Ok(false);
        };
        if !self.decode(name, &bytes)?.is_legacy() {
            return Ok(false);
        }
        let value = self.open(name, &bytes).await?;
        self.store(name, &value).await?;
        Ok(true)
    }

    /// Pre-flight check: `vault-test` must decrypt to itself. It is written only when it is
    /// missing or unreadable, so a routine start costs the token no write.
    pub async fn preflight(&self) -> Result<PreflightOutcome, KeyringError> {
        self.check_identity().await?;
        let value = Secret::from(TEST_KEY);
        match self.load(TEST_KEY).await {
            Ok(Some(v)) if v == value => return Ok(PreflightOutcome::Read),
            Ok(_) => {}
            Err(e) if e.is_about_the_value() => {
                tracing::warn!(key = TEST_KEY, error = %e, "pre-flight value unreadable; writing it again");
            }
            Err(e) => return Err(e),
        }
        self.store(TEST_KEY, &value).await?;
        Ok(PreflightOutcome::Written)
    }

    /// The unseal key names present in the store, in key order. Reads no values.
    pub async fn unseal_keys(&self) -> Result<Vec<String>, KeyringError> {
        Ok(unseal_key_names(&self.storage.names().await?))
    }
}

/// What the pre-flight check had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreflightOutcome {
    /// `vault-test` was there and decrypted.
    Read,
    /// `vault-test` was (re)written, read back and decrypted.
    Written,
}

/// A software stand-in for the token's private key, for unit tests.
#[cfg(test)]
pub mod soft {
    use super::*;
    use rsa::PrivateKey;
    use rsa::traits::PublicKeyParts;

    /// Decrypts with an in-memory key, counting calls.
    pub struct SoftDecrypter {
        key: PrivateKey,
        /// Decrypt calls so far.
        pub calls: std::sync::atomic::AtomicUsize,
    }

    /// A fresh 1024-bit pair (small: tests only) as decrypter and host key.
    pub fn pair() -> (Arc<SoftDecrypter>, HostKey) {
        let key = PrivateKey::new(&mut rand::rng(), 1024).expect("keygen");
        let public = key.to_public_key();
        let host = HostKey::from_components(&public.n().to_be_bytes(), &public.e().to_be_bytes())
            .expect("host key");
        (
            Arc::new(SoftDecrypter {
                key,
                calls: Default::default(),
            }),
            host,
        )
    }

    impl Decrypter for SoftDecrypter {
        fn decrypt<'a>(
            &'a self,
            scheme: Scheme,
            ciphertext: &'a [u8],
        ) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, HsmError>> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let result = match scheme {
                Scheme::OaepSha256 => self.key.oaep_decrypt::<sha2::Sha256>(ciphertext),
                Scheme::OaepSha1 => self.key.oaep_decrypt::<sha1::Sha1>(ciphertext),
                Scheme::Pkcs1v15 => self.key.pkcs1v15_decrypt(ciphertext),
            };
            let out = result
                .map(Zeroizing::new)
                .map_err(|e| HsmError::Other(format!("decrypt failed: {e}")));
            async move { out }.boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStore;

    fn ring() -> (Keyring, Arc<MemoryStore>, Arc<soft::SoftDecrypter>) {
        let (dec, host) = soft::pair();
        let store = Arc::new(MemoryStore::new());
        let ring = Keyring::new(dec.clone(), host, Scheme::OaepSha256, store.clone());
        (ring, store, dec)
    }

    #[test]
    fn unseal_key_names_are_ordered_by_index_not_text() {
        let names: Vec<String> = [
            "vault-unseal-10",
            "vault-root",
            "vault-unseal-2",
            "vault-unseal-x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            unseal_key_names(&names),
            ["vault-unseal-2", "vault-unseal-10"]
        );
        assert_eq!(unseal_key_index("vault-unseal-"), None);
    }

    #[tokio::test]
    async fn stored_values_round_trip_and_replace_without_gap() {
        let (ring, store, _) = ring();
        ring.store("vault-unseal-0", &Secret::from("aa"))
            .await
            .expect("store");
        ring.store("vault-unseal-0", &Secret::from("bb"))
            .await
            .expect("replace");
        assert_eq!(store.raw("vault-unseal-0").len(), 1, "older copy pruned");
        let back = ring
            .load("vault-unseal-0")
            .await
            .expect("load")
            .expect("present");
        assert_eq!(back.expose(), "bb");
        assert_eq!(ring.load("vault-unseal-1").await.expect("load"), None);
    }

    #[tokio::test]
    async fn preflight_writes_only_when_missing_or_unreadable() {
        let (ring, store, _) = ring();
        assert_eq!(
            ring.preflight().await.expect("first"),
            PreflightOutcome::Written
        );
        let puts = store.count("put");
        assert_eq!(
            ring.preflight().await.expect("second"),
            PreflightOutcome::Read
        );
        assert_eq!(store.count("put"), puts, "a routine start writes nothing");
        store.delete_all_for_test(TEST_KEY);
        store.insert(TEST_KEY, vec![0u8; 7]);
        assert_eq!(
            ring.preflight().await.expect("repair"),
            PreflightOutcome::Written
        );
    }

    #[test]
    fn a_recorded_fingerprint_must_be_ours() {
        let ours = format!("SHA256:{}", "ab".repeat(32));
        let theirs = format!("SHA256:{}", "cd".repeat(32));
        assert!(!identity_matches(None, &ours).expect("no record"));
        assert!(identity_matches(Some(&ours), &ours).expect("same"));
        let err = identity_matches(Some(&theirs), &ours).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&ours) && msg.contains(&theirs), "{msg}");
        assert!(matches!(
            identity_matches(Some("SHA256:xyz"), &ours),
            Err(KeyringError::BadKeyId)
        ));
    }

    /// Two sticks with different key pairs on one shared store: the second is refused before
    /// it writes anything, naming both fingerprints; the first goes on as before.
    #[tokio::test]
    async fn a_token_with_another_key_pair_writes_nothing_to_a_shared_store() {
        let (ring, store, _) = ring();
        assert_eq!(
            ring.preflight().await.expect("first"),
            PreflightOutcome::Written
        );
        let ours = ring.fingerprint().expect("fingerprint");
        assert_eq!(store.key_id().await.expect("key id"), Some(ours.clone()));
        let (dec, host) = soft::pair();
        let other = Keyring::new(dec, host, Scheme::OaepSha256, store.clone());
        let theirs = other.fingerprint().expect("fingerprint");
        let (puts, ids) = (store.count("put"), store.count("set_key_id"));
        let err = other.preflight().await.expect_err("another key pair");
        let msg = err.to_string();
        assert!(msg.contains(&ours) && msg.contains(&theirs), "{msg}");
        let err = other
            .store(ROOT_KEY, &Secret::from("s.7xWq0v3UJcYk2Ph9Lr4aQ8Zm"))
            .await
            .expect_err("no write either");
        assert!(matches!(err, KeyringError::OtherKey { .. }), "{err}");
        assert_eq!((store.count("put"), store.count("set_key_id")), (puts, ids));
        assert_eq!(
            ring.preflight().await.expect("first again"),
            PreflightOutcome::Read
        );
    }

    /// Values from before fingerprints were recorded: a key pair that opens them records
    /// itself; one that does not is refused, naming the value, and writes nothing.
    #[tokio::test]
    async fn an_unrecorded_store_is_adopted_only_by_a_key_that_opens_it() {
        let (ring, store, _) = ring();
        store.insert(
            TEST_KEY,
            ring.seal(TEST_KEY, &Secret::from(TEST_KEY)).expect("seal"),
        );
        let (dec, host) = soft::pair();
        let other = Keyring::new(dec, host, Scheme::OaepSha256, store.clone());
        let err = other.preflight().await.expect_err("not its values");
        assert!(matches!(err, KeyringError::UnprovenKey { .. }), "{err}");
        assert!(err.to_string().contains(TEST_KEY), "{err}");
        assert_eq!((store.count("put"), store.count("set_key_id")), (0, 0));
        assert_eq!(
            ring.preflight().await.expect("adopted"),
            PreflightOutcome::Read
        );
        assert_eq!(
            store.key_id().await.expect("key id"),
            Some(ring.fingerprint().expect("fingerprint"))
        );
    }

    #[tokio::test]
    async fn a_value_too_long_for_rsa_fails_at_once_naming_it() {
        let (ring, store, _) = ring();
        let long = Secret::new("k".repeat(5000));
        let err = ring.store("vault-unseal-0", &long).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("vault-unseal-0") && msg.contains("cannot be encrypted"),
            "{msg}"
        );
        assert!(!msg.contains("kkkk"), "{msg}");
        assert_eq!(store.count("put"), 0);
    }

    /// Bare values may be PKCS#1 v1.5, and the software key (like OpenSSL 3.2+ under
    /// SoftHSM2) rejects a wrong padding implicitly, with random bytes: about one random
    /// value in thirty used to come back as text. None may load.
    #[tokio::test]
    async fn foreign_values_are_reported_as_about_the_value() {
        use rand::Rng;
        let (ring, store, _) = ring();
        let mut rng = rand::rng();
        for name in ["vault-unseal-0", ROOT_KEY, TEST_KEY] {
            for _ in 0..150 {
                let mut junk = vec![0u8; 128];
                rng.fill_bytes(&mut junk);
                // Below any 1024-bit modulus, so the key really decrypts it.
                junk[0] &= 0x7f;
                store.insert(name, junk);
                let err = ring.load(name).await.expect_err("junk must not load");
                assert!(err.is_about_the_value(), "{err}");
                assert!(err.to_string().contains(name), "{err}");
                store.delete_all_for_test(name);
            }
        }
    }

    #[test]
    fn bare_values_must_have_the_shape_of_their_name() {
        let key = "a1".repeat(33);
        assert_eq!(plaintext_shape("vault-unseal-4", key.as_bytes()), Ok(()));
        assert!(
            plaintext_shape("vault-unseal-4", b"a1b2").is_err(),
            "too short"
        );
        assert!(plaintext_shape("vault-unseal-4", "zz".repeat(33).as_bytes()).is_err());
        assert_eq!(
            plaintext_shape(ROOT_KEY, b"s.7xWq0v3UJcYk2Ph9Lr4aQ8Zm"),
            Ok(())
        );
        assert!(plaintext_shape(ROOT_KEY, b"s.7xWq").is_err(), "too short");
        assert!(plaintext_shape(ROOT_KEY, b"").is_err());
        assert!(plaintext_shape(ROOT_KEY, b"s.7xWq0v3UJcYk2Ph9Lr4aQ8\x00m").is_err());
        assert!(plaintext_shape(ROOT_KEY, "s.7xWq0v3UJcYk2Ph9Lr4aQ8é".as_bytes()).is_err());
        assert!(plaintext_shape(ROOT_KEY, b"s.7xWq0v3UJcYk2 h9Lr4aQ8Zm").is_err());
        assert!(plaintext_shape("other", b"x").is_ok());
        assert!(plaintext_shape("other", b"").is_err());
        assert_eq!(plaintext_shape(TEST_KEY, b"vault-test"), Ok(()));
        assert!(plaintext_shape(TEST_KEY, b"vault-tesT").is_err());
    }

    #[tokio::test]
    async fn own_values_are_held_to_no_shape() {
        let (ring, _, _) = ring();
        ring.store(
            "vault-unseal-0",
            &Secret::from("not hex, but what Vault said"),
        )
        .await
        .expect("store");
        let back = ring.load("vault-unseal-0").await.expect("load");
        assert_eq!(
            back.expect("present").expose(),
            "not hex, but what Vault said"
        );
    }

    impl MemoryStore {
        fn delete_all_for_test(&self, name: &str) {
            futures::executor::block_on(Storage::delete(self, name)).expect("delete");
        }
    }
}
