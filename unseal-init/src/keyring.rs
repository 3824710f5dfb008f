//! Vault's secrets on the store: encrypt on the host, write, read back, decrypt on the token,
//! compare, and only then drop older copies. Reads understand both this program's format and
//! Bank-Vaults' bare ciphertext.

use crate::crypto::HostKey;
use crate::envelope::{self, Scheme};
use crate::hsm::HsmError;
use crate::keypair;
use crate::secret::Secret;
use crate::storage::{SharedHsm, Storage, StorageError, lock};
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;
use zeroize::Zeroizing;

/// Name of the pre-flight test object.
pub const TEST_KEY: &str = "vault-test";
/// Name of the root token object.
pub const ROOT_KEY: &str = "vault-root";

/// Name of unseal key `i`.
pub fn unseal_key_name(i: usize) -> String {
    format!("vault-unseal-{i}")
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
    /// Host-side encryption failed.
    #[error("`{name}`: {reason}")]
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
    /// The value is not text.
    #[error("`{name}` does not decrypt to text")]
    NotText {
        /// Key name.
        name: String,
    },
}

impl KeyringError {
    /// True when the process must stop rather than retry.
    pub fn is_fatal(&self) -> bool {
        match self {
            KeyringError::Hsm(e) => e.is_fatal(),
            KeyringError::Storage(StorageError::Hsm(e)) => e.is_fatal(),
            _ => false,
        }
    }
}

/// Encrypts with the token's public key, stores, and decrypts with the token.
#[derive(Clone)]
pub struct Keyring {
    hsm: SharedHsm,
    key: HostKey,
    scheme: Scheme,
    storage: Storage,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Keyring {
    /// Builds a keyring; `scheme` is the one [`keypair::probe_scheme`] chose.
    pub fn new(hsm: SharedHsm, key: HostKey, scheme: Scheme, storage: Storage) -> Self {
        Self {
            hsm,
            key,
            scheme,
            storage,
        }
    }

    /// Makes the next token operation re-open the session (see [`crate::hsm::Hsm::reset_session`]).
    pub fn reopen_token(&self) {
        if let Ok(mut hsm) = self.hsm.lock() {
            hsm.reset_session();
        }
    }

    /// Scheme used for new values.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The storage backend.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    fn decrypt_envelope(
        &self,
        name: &str,
        env: &envelope::Envelope,
    ) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let candidates: Vec<Scheme> = match env.scheme {
            Some(s) => vec![s],
            None => Scheme::legacy_candidates().to_vec(),
        };
        let mut reasons = Vec::new();
        for scheme in candidates {
            let result = keypair::decrypt(&mut *lock(&self.hsm)?, scheme, &env.ciphertext);
            match result {
                Ok(pt) => return Ok(pt),
                Err(e) if e.is_fatal() || matches!(e, HsmError::Unavailable { .. }) => {
                    return Err(e.into());
                }
                Err(e) => reasons.push(format!("{}: {e}", scheme.name())),
            }
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

    /// Decrypts the value under `name`, if any.
    pub async fn load(&self, name: &str) -> Result<Option<Secret>, KeyringError> {
        let Some(bytes) = self.storage.get(name).await? else {
            return Ok(None);
        };
        let env = self.decode(name, &bytes)?;
        let pt = self.decrypt_envelope(name, &env)?;
        let text = std::str::from_utf8(&pt).map_err(|_| KeyringError::NotText {
            name: name.to_owned(),
        })?;
        Ok(Some(Secret::from(text)))
    }

    /// Whether a value exists under `name` (no decryption).
    pub async fn exists(&self, name: &str) -> Result<bool, KeyringError> {
        Ok(self.storage.exists(name).await?)
    }

    /// Encrypts and stores `value` under `name`, replacing any older value only after the new
    /// one reads back and decrypts to `value`.
    pub async fn store(&self, name: &str, value: &Secret) -> Result<(), KeyringError> {
        let ct = self
            .key
            .encrypt(self.scheme, value.expose().as_bytes())
            .map_err(|e| KeyringError::Encrypt {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        let bytes = envelope::encode(self.scheme, now_ms(), &ct);
        self.storage.put(name, &bytes).await?;
        let back = self.storage.get(name).await?;
        if back.as_deref() != Some(&bytes[..]) {
            return Err(KeyringError::Verify {
                name: name.to_owned(),
            });
        }
        let env = self.decode(name, &bytes)?;
        let pt = self.decrypt_envelope(name, &env)?;
        if pt[..] != *value.expose().as_bytes() {
            return Err(KeyringError::Verify {
                name: name.to_owned(),
            });
        }
        self.storage.prune(name, &bytes).await?;
        Ok(())
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
        let Some(value) = self.load(name).await? else {
            return Ok(false);
        };
        self.store(name, &value).await?;
        Ok(true)
    }

    /// Pre-flight check: write, read back and decrypt `vault-test`.
    pub async fn preflight(&self) -> Result<(), KeyringError> {
        let value = Secret::from(TEST_KEY);
        self.store(TEST_KEY, &value).await?;
        match self.load(TEST_KEY).await? {
            Some(v) if v == value => Ok(()),
            _ => Err(KeyringError::Verify {
                name: TEST_KEY.to_owned(),
            }),
        }
    }

    /// How many consecutive unseal keys (`vault-unseal-0`, `-1`, ...) are stored.
    pub async fn unseal_key_count(&self) -> Result<usize, KeyringError> {
        let names = self.storage.names().await?;
        let mut n = 0;
        while names.contains(&unseal_key_name(n)) {
            n += 1;
        }
        Ok(n)
    }
}
