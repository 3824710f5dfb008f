//! Ciphertext stored in a Kubernetes Secret (mode `hsm-k8s`), one data key per name.
//!
//! The Secret only ever holds ciphertext in this program's format; the HSM stays the only
//! place that can decrypt it. A write replaces one data key atomically (a merge patch), so a
//! name never has two values and never disappears during a replace.

use base64::Engine;
use k8s_openapi::api::core::v1::Secret as K8sSecret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use thiserror::Error;

use crate::storage::{Storage, StorageError};
use futures::FutureExt;
use futures::future::BoxFuture;

/// The Secret's annotation recording which key pair its values are encrypted with: beside the
/// data rather than in it, so the data keys stay exactly Bank-Vaults' names.
pub const KEY_ID_ANNOTATION: &str = "nitrokey.com/hsm-key-fingerprint";

/// Kubernetes API failures, with the Secret and the API server named.
#[derive(Debug, Error)]
#[error("Kubernetes Secret {namespace}/{name}: {action} failed (API server {server}): {source}")]
pub struct SecretStoreError {
    /// The API server's URL: a connection error alone does not say what it tried to reach.
    pub server: String,
    /// Namespace.
    pub namespace: String,
    /// Secret name.
    pub name: String,
    /// What was being done.
    pub action: &'static str,
    /// kube's error.
    pub source: kube::Error,
}

impl From<SecretStoreError> for StorageError {
    fn from(e: SecretStoreError) -> Self {
        StorageError::Kubernetes(Box::new(e))
    }
}

/// One Secret holding the stored values.
#[derive(Clone)]
pub struct SecretStore {
    api: Api<K8sSecret>,
    server: String,
    namespace: String,
    name: String,
}

impl SecretStore {
    /// Connects with the in-cluster (or kubeconfig) client, every request carrying this
    /// program's User-Agent; `namespace` defaults to the pod's.
    pub async fn connect(namespace: Option<&str>, name: &str) -> Result<Self, kube::Error> {
        let mut config = kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?;
        config.headers.push((
            reqwest::header::USER_AGENT,
            reqwest::header::HeaderValue::from_static(crate::names::USER_AGENT),
        ));
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config)?;
        let namespace = namespace
            .map(str::to_owned)
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Self {
            api: Api::namespaced(client, &namespace),
            server,
            namespace,
            name: name.to_owned(),
        })
    }

    fn err(&self, action: &'static str, source: kube::Error) -> SecretStoreError {
        SecretStoreError {
            server: self.server.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            action,
            source,
        }
    }

    /// The Secret, or `None` where it does not exist.
    async fn fetch(&self) -> Result<Option<K8sSecret>, SecretStoreError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err("read", e))
    }

    async fn data(&self) -> Result<BTreeMap<String, Vec<u8>>, SecretStoreError> {
        let secret = self.fetch().await?;
        Ok(secret
            .and_then(|s| s.data)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect())
    }

    /// The value under `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SecretStoreError> {
        Ok(self.data().await?.remove(key))
    }

    /// Every key present.
    pub async fn keys(&self) -> Result<Vec<String>, SecretStoreError> {
        Ok(self.data().await?.into_keys().collect())
    }

    /// Sets `key` to `value`, creating the Secret if needed. Several pods may start at once
    /// with no Secret yet: a create that finds it already created (409) means another pod
    /// won the race, so the patch is simply tried again.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), SecretStoreError> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        let patch = serde_json::json!({ "data": { key: encoded } });
        for _ in 0..3 {
            match self
                .try_patch_or_create(&patch, Some((key, value)), None)
                .await
            {
                Err(e) if matches!(&e.source, kube::Error::Api(s) if s.code == 409) => continue,
                other => return other,
            }
        }
        self.try_patch_or_create(&patch, Some((key, value)), None)
            .await
    }

    /// Applies `patch`; when the Secret does not exist yet, creates it holding `entry` and
    /// the `key_id` annotation instead.
    async fn try_patch_or_create(
        &self,
        patch: &serde_json::Value,
        entry: Option<(&str, &[u8])>,
        key_id: Option<&str>,
    ) -> Result<(), SecretStoreError> {
        match self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let mut data = BTreeMap::new();
                if let Some((key, value)) = entry {
                    data.insert(key.to_owned(), k8s_openapi::ByteString(value.to_vec()));
                }
                let annotations = key_id
                    .map(|id| BTreeMap::from([(KEY_ID_ANNOTATION.to_owned(), id.to_owned())]));
                let secret = K8sSecret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "unseal-init".to_owned(),
                        )])),
                        annotations,
                        ..Default::default()
                    },
                    data: Some(data),
                    type_: Some("Opaque".to_owned()),
                    ..Default::default()
                };
                self.api
                    .create(&PostParams::default(), &secret)
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err("create", e))
            }
            Err(e) => Err(self.err("patch", e)),
        }
    }

    /// The recorded key pair fingerprint, if any.
    pub async fn key_id(&self) -> Result<Option<String>, SecretStoreError> {
        let secret = self.fetch().await?;
        Ok(secret
            .and_then(|s| s.metadata.annotations)
            .and_then(|mut a| a.remove(KEY_ID_ANNOTATION)))
    }

    /// Records the key pair fingerprint as an annotation, creating the Secret if needed.
    pub async fn set_key_id(&self, id: &str) -> Result<(), SecretStoreError> {
        let patch = serde_json::json!({ "metadata": { "annotations": { KEY_ID_ANNOTATION: id } } });
        for _ in 0..3 {
            match self.try_patch_or_create(&patch, None, Some(id)).await {
                Err(e) if matches!(&e.source, kube::Error::Api(s) if s.code == 409) => continue,
                other => return other,
            }
        }
        self.try_patch_or_create(&patch, None, Some(id)).await
    }

    /// `Some("Secret <namespace>/<name>")` when the Secret does not exist (deleted, or never
    /// created), `None` when it does, however empty.
    pub async fn absent(&self) -> Result<Option<String>, SecretStoreError> {
        let secret = self.fetch().await?;
        Ok(secret
            .is_none()
            .then(|| format!("Secret {}/{}", self.namespace, self.name)))
    }

    /// Removes `key`; true if it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, SecretStoreError> {
        if self.get(key).await?.is_none() {
            return Ok(false);
        }
        let patch = serde_json::json!({ "data": { key: serde_json::Value::Null } });
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| self.err("patch", e))?;
        Ok(true)
    }
}

impl Storage for SecretStore {
    fn kind(&self) -> &'static str {
        "Kubernetes Secret"
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>> {
        async move { Ok(SecretStore::get(self, name).await?) }.boxed()
    }

    fn put<'a>(
        &'a self,
        name: &'a str,
        value: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        async move { Ok(SecretStore::put(self, name, value).await?) }.boxed()
    }

    fn prune<'a>(
        &'a self,
        _name: &'a str,
        _keep: &'a [u8],
    ) -> BoxFuture<'a, Result<usize, StorageError>> {
        // A data key holds one value: a merge patch replaces it atomically.
        async { Ok(0) }.boxed()
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<usize, StorageError>> {
        async move { Ok(usize::from(SecretStore::delete(self, name).await?)) }.boxed()
    }

    fn names(&self) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        async move { Ok(self.keys().await?) }.boxed()
    }

    fn key_id(&self) -> BoxFuture<'_, Result<Option<String>, StorageError>> {
        async move { Ok(SecretStore::key_id(self).await?) }.boxed()
    }

    fn set_key_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        async move { Ok(SecretStore::set_key_id(self, id).await?) }.boxed()
    }

    fn absent(&self) -> BoxFuture<'_, Result<Option<String>, StorageError>> {
        async move { Ok(SecretStore::absent(self).await?) }.boxed()
    }
}
