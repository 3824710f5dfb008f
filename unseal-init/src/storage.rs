//! Where ciphertext lives: data objects on the token (mode `hsm`, [`crate::token_store`]) or a
//! Kubernetes Secret (mode `hsm-k8s`, [`crate::secret_store`]). One trait for both, so the
//! key ring and the Vault flow do not care, and can be tested against [`memory::MemoryStore`].

use crate::hsm::HsmError;
use futures::future::BoxFuture;
use thiserror::Error;

/// A storage failure.
#[derive(Debug, Error)]
pub enum StorageError {
    /// Token failure.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// Kubernetes failure. Boxed as any error so that this trait, below every backend,
    /// imports none of them (the Secret backend converts its own error into this).
    #[error(transparent)]
    Kubernetes(Box<dyn std::error::Error + Send + Sync>),
}

impl StorageError {
    /// The token error behind this one, if any.
    pub fn hsm(&self) -> Option<&HsmError> {
        match self {
            StorageError::Hsm(h) => Some(h),
            StorageError::Kubernetes(_) => None,
        }
    }
}

/// A named store of ciphertext values.
pub trait Storage: Send + Sync {
    /// Short name for logs.
    fn kind(&self) -> &'static str;

    /// The stored bytes under `name` (the newest, if an interrupted replace left two).
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>>;

    /// Writes `value` under `name` without removing an older value yet.
    fn put<'a>(&'a self, name: &'a str, value: &'a [u8])
    -> BoxFuture<'a, Result<(), StorageError>>;

    /// Removes any value under `name` other than `keep` (left by a replace); returns how many.
    fn prune<'a>(
        &'a self,
        name: &'a str,
        keep: &'a [u8],
    ) -> BoxFuture<'a, Result<usize, StorageError>>;

    /// Deletes everything under `name`; returns how many values went.
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<usize, StorageError>>;

    /// Every stored name, sorted, duplicates collapsed. Reads no values.
    fn names(&self) -> BoxFuture<'_, Result<Vec<String>, StorageError>>;

    /// The fingerprint of the key pair the stored values are encrypted with, as recorded
    /// beside them (not among the names: Bank-Vaults reads its values by name, and a store
    /// keeps exactly the names it always had). `None` when nothing is recorded, and always
    /// for a store that cannot be shared between key pairs.
    fn key_id(&self) -> BoxFuture<'_, Result<Option<String>, StorageError>>;

    /// Records the key pair's fingerprint beside the values.
    fn set_key_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;

    /// False for a store only one key pair can ever use (the data objects on the token that
    /// holds the key): nothing to record, nothing to check.
    fn shared(&self) -> bool {
        true
    }

    /// `Some(what)` (e.g. `Secret vault/vault-unseal-keys`) when the store itself is gone, not
    /// merely empty: a deleted Secret reads as no values at all, and only this tells the two
    /// apart. Asked only when the store lacks keys, so it costs an idle pass nothing.
    fn absent(&self) -> BoxFuture<'_, Result<Option<String>, StorageError>> {
        Box::pin(async { Ok(None) })
    }
}

/// An in-memory store for unit tests of the key ring and the Vault flow.
pub mod memory {
    use super::{Storage, StorageError};
    use crate::hsm::HsmError;
    use futures::FutureExt;
    use futures::future::BoxFuture;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Values by name, with every operation counted.
    #[derive(Default)]
    pub struct MemoryStore {
        values: Mutex<BTreeMap<String, Vec<Vec<u8>>>>,
        ops: Mutex<BTreeMap<&'static str, usize>>,
        /// Puts still to succeed, then puts to fail: a store that goes away mid-way.
        put_faults: Mutex<(usize, usize)>,
        key_id: Mutex<Option<String>>,
    }

    impl MemoryStore {
        /// An empty store.
        pub fn new() -> Self {
            Self::default()
        }

        /// How many times `op` ran.
        pub fn count(&self, op: &'static str) -> usize {
            self.ops
                .lock()
                .map(|o| o.get(op).copied().unwrap_or(0))
                .unwrap_or(0)
        }

        /// Every value stored under `name`, oldest first.
        pub fn raw(&self, name: &str) -> Vec<Vec<u8>> {
            self.values
                .lock()
                .map(|v| v.get(name).cloned().unwrap_or_default())
                .unwrap_or_default()
        }

        /// Stores `value` directly (as another program would have).
        pub fn insert(&self, name: &str, value: Vec<u8>) {
            if let Ok(mut v) = self.values.lock() {
                v.entry(name.to_owned()).or_default().push(value);
            }
        }

        /// Lets the next `ok` puts succeed, then fails `fail` puts, as a stick pulled or an
        /// API server gone in the middle of storing would.
        pub fn fail_puts_after(&self, ok: usize, fail: usize) {
            if let Ok(mut f) = self.put_faults.lock() {
                *f = (ok, fail);
            }
        }

        /// Whether this put is one of the injected failures.
        fn put_fails(&self) -> bool {
            let Ok(mut f) = self.put_faults.lock() else {
                return false;
            };
            match *f {
                (_, 0) => false,
                (0, fail) => {
                    f.1 = fail - 1;
                    true
                }
                (ok, _) => {
                    f.0 = ok - 1;
                    false
                }
            }
        }

        fn note(&self, op: &'static str) {
            if let Ok(mut o) = self.ops.lock() {
                *o.entry(op).or_default() += 1;
            }
        }
    }

    impl Storage for MemoryStore {
        fn kind(&self) -> &'static str {
            "memory"
        }

        fn get<'a>(
            &'a self,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>> {
            self.note("get");
            let newest = self
                .values
                .lock()
                .ok()
                .and_then(|v| v.get(name).and_then(|all| all.last().cloned()));
            async move { Ok(newest) }.boxed()
        }

        fn put<'a>(
            &'a self,
            name: &'a str,
            value: &'a [u8],
        ) -> BoxFuture<'a, Result<(), StorageError>> {
            self.note("put");
            if self.put_fails() {
                let err = StorageError::Hsm(HsmError::Other(format!(
                    "injected failure writing `{name}`"
                )));
                return async move { Err(err) }.boxed();
            }
            self.insert(name, value.to_vec());
            async { Ok(()) }.boxed()
        }

        fn prune<'a>(
            &'a self,
            name: &'a str,
            keep: &'a [u8],
        ) -> BoxFuture<'a, Result<usize, StorageError>> {
            self.note("prune");
            let mut removed = 0;
            if let Ok(mut v) = self.values.lock()
                && let Some(all) = v.get_mut(name)
            {
                let before = all.len();
                all.retain(|x| x == keep);
                all.truncate(1);
                removed = before - all.len();
            }
            async move { Ok(removed) }.boxed()
        }

        fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<usize, StorageError>> {
            self.note("delete");
            let removed = self
                .values
                .lock()
                .ok()
                .and_then(|mut v| v.remove(name))
                .map(|all| all.len())
                .unwrap_or(0);
            async move { Ok(removed) }.boxed()
        }

        fn names(&self) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
            self.note("names");
            let names = self
                .values
                .lock()
                .map(|v| {
                    v.iter()
                        .filter(|(_, all)| !all.is_empty())
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            async move { Ok(names) }.boxed()
        }

        fn key_id(&self) -> BoxFuture<'_, Result<Option<String>, StorageError>> {
            self.note("key_id");
            let id = self.key_id.lock().ok().and_then(|k| k.clone());
            async move { Ok(id) }.boxed()
        }

        fn set_key_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
            self.note("set_key_id");
            if let Ok(mut k) = self.key_id.lock() {
                *k = Some(id.to_owned());
            }
            async { Ok(()) }.boxed()
        }
    }
}
