//! Where ciphertext lives: data objects on the token (mode `hsm`) or a Kubernetes Secret
//! (mode `hsm-k8s`). One interface for both, so the Vault flow does not care.

use crate::hsm::{Hsm, HsmError};
use crate::secret_store::{SecretStore, SecretStoreError};
use crate::token_store;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// A storage failure.
#[derive(Debug, Error)]
pub enum StorageError {
    /// Token failure.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// Kubernetes failure.
    #[error(transparent)]
    Kubernetes(Box<SecretStoreError>),
    /// The shared token handle was poisoned by a panic elsewhere.
    #[error("HSM session lock poisoned")]
    Poisoned,
}

impl From<SecretStoreError> for StorageError {
    fn from(e: SecretStoreError) -> Self {
        StorageError::Kubernetes(Box::new(e))
    }
}

/// The token, shared between storage and decryption.
pub type SharedHsm = Arc<Mutex<Hsm>>;

/// Locks the shared token.
pub fn lock(hsm: &SharedHsm) -> Result<std::sync::MutexGuard<'_, Hsm>, StorageError> {
    hsm.lock().map_err(|_| StorageError::Poisoned)
}

/// The configured storage backend.
#[derive(Clone)]
pub enum Storage {
    /// Data objects on the token.
    Hsm(SharedHsm),
    /// A Kubernetes Secret.
    Kubernetes(Box<SecretStore>),
}

impl Storage {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Storage::Hsm(_) => "HSM data objects",
            Storage::Kubernetes(_) => "Kubernetes Secret",
        }
    }

    /// The stored bytes under `name`.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        match self {
            Storage::Hsm(h) => Ok(token_store::get(&mut *lock(h)?, name)?),
            Storage::Kubernetes(s) => Ok(s.get(name).await?),
        }
    }

    /// Writes `value` under `name` without removing an older value yet.
    pub async fn put(&self, name: &str, value: &[u8]) -> Result<(), StorageError> {
        match self {
            Storage::Hsm(h) => Ok(token_store::put(&mut *lock(h)?, name, value)?),
            Storage::Kubernetes(s) => Ok(s.put(name, value).await?),
        }
    }

    /// Removes any value under `name` other than `keep` (left by a replace).
    pub async fn prune(&self, name: &str, keep: &[u8]) -> Result<(), StorageError> {
        match self {
            Storage::Hsm(h) => {
                let removed = token_store::prune(&mut *lock(h)?, name, keep)?;
                if removed > 0 {
                    tracing::info!(key = name, removed, "replaced older copy");
                }
                Ok(())
            }
            Storage::Kubernetes(_) => Ok(()),
        }
    }

    /// Whether anything is stored under `name`.
    pub async fn exists(&self, name: &str) -> Result<bool, StorageError> {
        Ok(self.get(name).await?.is_some())
    }

    /// Deletes everything under `name`; returns how many values went.
    pub async fn delete(&self, name: &str) -> Result<usize, StorageError> {
        match self {
            Storage::Hsm(h) => Ok(token_store::delete(&mut *lock(h)?, name)?),
            Storage::Kubernetes(s) => Ok(usize::from(s.delete(name).await?)),
        }
    }

    /// Every stored name (duplicates collapsed).
    pub async fn names(&self) -> Result<Vec<String>, StorageError> {
        let mut names = match self {
            Storage::Hsm(h) => token_store::list(&mut *lock(h)?)?
                .into_iter()
                .map(|(l, _)| l)
                .collect(),
            Storage::Kubernetes(s) => s.keys().await?,
        };
        names.sort();
        names.dedup();
        Ok(names)
    }
}
