//! The DRA node service the kubelet calls on `plugins/hsm.nitrokey.com/dra.sock`:
//! `NodePrepareResources` before a pod's containers start, `NodeUnprepareResources` once the
//! pod is gone, in the `v1` and `v1beta1` versions of the kubelet's API (the same messages).
//!
//! Preparing reads the allocated ResourceClaim from the API server (the kubelet passes only
//! its namespace, name and UID), writes the claim's CDI spec, and records the claim in the
//! checkpoint; a claim already recorded gets the recorded answer again without an API read,
//! so a repeated call is idempotent. Unpreparing removes the record, then the spec; a claim
//! not recorded is reported done, as the kubelet repeats unprepares it is unsure about.
//! Records and specs are written atomically (temporary file and rename), and a spec written
//! without its record (a crash in between) is removed at the next start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::{Api, Client};
use nitrokey_proto::{dra_v1 as v1, dra_v1beta1 as v1beta1};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::prepare::{self, Checkpoint, PreparedClaim};
use super::slice::device_names;
use crate::inventory::Stick;
use crate::state::PluginState;

/// Longest checkpoint file read (it lists prepared claims; far below this in practice).
const MAX_CHECKPOINT_LEN: u64 = 16 << 20;

/// Why the checkpoint or a spec cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The checkpoint is unreadable.
    #[error("{0}: {1}")]
    Checkpoint(PathBuf, prepare::CheckpointError),
    /// The checkpoint is too large to be this driver's.
    #[error("{0}: larger than {MAX_CHECKPOINT_LEN} bytes")]
    TooLarge(PathBuf),
}

/// Where the driver reads allocated claims.
pub trait ClaimSource: Send + Sync + 'static {
    /// The claim `namespace/name`.
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> futures::future::BoxFuture<'_, Result<ResourceClaim, String>>;
}

/// Claims read through the Kubernetes API.
pub struct ApiClaims(pub Client);

impl ClaimSource for ApiClaims {
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> futures::future::BoxFuture<'_, Result<ResourceClaim, String>> {
        let api: Api<ResourceClaim> = Api::namespaced(self.0.clone(), namespace);
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        Box::pin(async move {
            tokio::time::timeout(crate::api_client::ANSWER_TIMEOUT, api.get(&name))
                .await
                .map_err(|_| "the API server did not answer in time".to_owned())?
                .map_err(|e| {
                    crate::text::shorten(
                        &format!("cannot read ResourceClaim {namespace}/{name}: {e}"),
                        500,
                    )
                })
        })
    }
}

/// The node service.
#[derive(Clone)]
pub struct NodeService {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    state: Arc<PluginState>,
    claims: Box<dyn ClaimSource>,
    cdi_dir: PathBuf,
    checkpoint_path: PathBuf,
    /// The checkpoint as on disk; held across a whole prepare or unprepare so that calls for
    /// the same claim do not interleave.
    checkpoint: Mutex<Checkpoint>,
}

fn write_atomically(path: &Path, text: &str) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| StoreError::Io(path.to_path_buf(), e))
}

fn remove(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StoreError::Io(path.to_path_buf(), e))
        }
        _ => Ok(()),
    }
}

/// Reads the checkpoint (none yet: empty).
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, StoreError> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoint::default()),
        Err(e) => return Err(StoreError::Io(path.to_path_buf(), e)),
    };
    let mut text = String::new();
    file.take(MAX_CHECKPOINT_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| StoreError::Io(path.to_path_buf(), e))?;
    if text.len() as u64 > MAX_CHECKPOINT_LEN {
        return Err(StoreError::TooLarge(path.to_path_buf()));
    }
    Checkpoint::parse(&text).map_err(|e| StoreError::Checkpoint(path.to_path_buf(), e))
}

fn invalid_uid(uid: &str) -> String {
    format!(
        "claim UID {:?} is not a Kubernetes UID",
        crate::text::shorten(uid, 64)
    )
}

/// One claim as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    /// Namespace.
    pub namespace: String,
    /// UID.
    pub uid: String,
    /// Name.
    pub name: String,
}

impl NodeService {
    /// The service for `node`, its checkpoint at `checkpoint_path` (read now; specs it does
    /// not list are removed from `cdi_dir`).
    pub fn new(
        node: String,
        state: Arc<PluginState>,
        claims: Box<dyn ClaimSource>,
        cdi_dir: PathBuf,
        checkpoint_path: PathBuf,
    ) -> Result<Self, StoreError> {
        let checkpoint = load_checkpoint(&checkpoint_path)?;
        std::fs::create_dir_all(&cdi_dir).map_err(|e| StoreError::Io(cdi_dir.clone(), e))?;
        let files: Vec<String> = std::fs::read_dir(&cdi_dir)
            .map_err(|e| StoreError::Io(cdi_dir.clone(), e))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        for orphan in prepare::orphan_specs(files.iter().map(String::as_str), &checkpoint) {
            tracing::info!(file = %orphan, "removing a CDI spec of no prepared claim");
            remove(&cdi_dir.join(orphan))?;
        }
        tracing::info!(
            claims = checkpoint.claims.len(),
            "prepared claims from the checkpoint"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                node,
                state,
                claims,
                cdi_dir,
                checkpoint_path,
                checkpoint: Mutex::new(checkpoint),
            }),
        })
    }

    fn plugged(&self) -> BTreeMap<String, Stick> {
        let inventory = self.inner.state.inventory();
        let sticks: Vec<&Stick> = inventory
            .sticks()
            .filter(|s| s.unplugged_at.is_none())
            .collect();
        let names = device_names(sticks.iter().map(|s| s.id.as_str()));
        sticks
            .into_iter()
            .filter_map(|s| Some((names.get(&s.id)?.clone(), s.clone())))
            .collect()
    }

    /// Prepares one claim: its devices for the kubelet, or why not.
    pub async fn prepare(&self, claim: &ClaimRef) -> Result<Vec<prepare::KubeletDevice>, String> {
        if !prepare::valid_uid(&claim.uid) {
            return Err(invalid_uid(&claim.uid));
        }
        if !prepare::valid_claim_name(&claim.namespace, &claim.name) {
            return Err(format!(
                "claim {:?}/{:?} is not a Kubernetes object name",
                crate::text::shorten(&claim.namespace, 64),
                crate::text::shorten(&claim.name, 253)
            ));
        }
        let mut checkpoint = self.inner.checkpoint.lock().await;
        let spec_path = self.inner.cdi_dir.join(prepare::cdi_file_name(&claim.uid));
        if let Some(prepared) = checkpoint.claims.get(&claim.uid) {
            // Asked again: the same answer; the spec is rewritten should it have gone.
            if !spec_path.exists() {
                write_atomically(&spec_path, &prepare::cdi_spec(&claim.uid, prepared))
                    .map_err(|e| e.to_string())?;
            }
            return Ok(prepare::kubelet_devices(&claim.uid, prepared));
        }
        let object = self.inner.claims.get(&claim.namespace, &claim.name).await?;
        let prepared: PreparedClaim =
            prepare::plan(&claim.uid, &object, &self.inner.node, &self.plugged())
                .map_err(|e| e.to_string())?;
        write_atomically(&spec_path, &prepare::cdi_spec(&claim.uid, &prepared))
            .map_err(|e| e.to_string())?;
        checkpoint
            .claims
            .insert(claim.uid.clone(), prepared.clone());
        if let Err(e) = write_atomically(&self.inner.checkpoint_path, &checkpoint.to_text()) {
            checkpoint.claims.remove(&claim.uid);
            let _ = remove(&spec_path);
            return Err(e.to_string());
        }
        // A replacement pod got the sticks: an eviction for a replug is done.
        self.inner.state.note_allocated(
            prepared.devices.iter().map(|d| d.stick.as_str()),
            std::time::Instant::now(),
        );
        tracing::info!(namespace = %claim.namespace, claim = %claim.name, uid = %claim.uid,
            sticks = %prepared.devices.iter().map(|d| d.stick.as_str()).collect::<Vec<_>>().join(","),
            "claim prepared");
        Ok(prepare::kubelet_devices(&claim.uid, &prepared))
    }

    /// The prepared claims by UID, as checkpointed.
    pub async fn prepared(&self) -> BTreeMap<String, PreparedClaim> {
        self.inner.checkpoint.lock().await.claims.clone()
    }

    /// Rewrites the specs (and records) of prepared claims whose sticks came back at another
    /// device node; returns the claims moved (UID, before, after).
    pub async fn follow_replugs(&self) -> Vec<(String, PreparedClaim, PreparedClaim)> {
        let mut checkpoint = self.inner.checkpoint.lock().await;
        let plugged: BTreeMap<String, Stick> = self
            .plugged()
            .into_values()
            .map(|s| (s.id.clone(), s))
            .collect();
        let moved = prepare::moved(&checkpoint, &plugged);
        let mut done = Vec::new();
        for (uid, claim) in moved {
            let spec_path = self.inner.cdi_dir.join(prepare::cdi_file_name(&uid));
            if let Err(e) = write_atomically(&spec_path, &prepare::cdi_spec(&uid, &claim)) {
                tracing::warn!(uid = %uid, error = %e, "cannot rewrite the CDI spec of a replugged stick");
                continue;
            }
            let before = checkpoint.claims.insert(uid.clone(), claim.clone());
            tracing::info!(namespace = %claim.namespace, claim = %claim.name, uid = %uid,
                devices = %claim.devices.iter().map(|d| d.dev_path.as_str()).collect::<Vec<_>>().join(","),
                "replugged stick: the claim's CDI spec names its new device node");
            if let Some(before) = before {
                done.push((uid, before, claim));
            }
        }
        if !done.is_empty()
            && let Err(e) = write_atomically(&self.inner.checkpoint_path, &checkpoint.to_text())
        {
            tracing::warn!(error = %e, "cannot write the checkpoint");
        }
        done
    }

    /// Unprepares one claim (done already, or never prepared here: success).
    pub async fn unprepare(&self, claim: &ClaimRef) -> Result<(), String> {
        if !prepare::valid_uid(&claim.uid) {
            return Err(invalid_uid(&claim.uid));
        }
        let mut checkpoint = self.inner.checkpoint.lock().await;
        if let Some(prepared) = checkpoint.claims.remove(&claim.uid)
            && let Err(e) = write_atomically(&self.inner.checkpoint_path, &checkpoint.to_text())
        {
            checkpoint.claims.insert(claim.uid.clone(), prepared);
            return Err(e.to_string());
        }
        remove(&self.inner.cdi_dir.join(prepare::cdi_file_name(&claim.uid)))
            .map_err(|e| e.to_string())?;
        tracing::info!(namespace = %claim.namespace, claim = %claim.name, uid = %claim.uid,
            "claim unprepared");
        Ok(())
    }
}

macro_rules! node_service {
    ($api:ident) => {
        // v1's Device has a field v1beta1's lacks (share_id), filled by the struct update.
        #[allow(clippy::needless_update)]
        #[tonic::async_trait]
        impl $api::dra_plugin_server::DraPlugin for NodeService {
            async fn node_prepare_resources(
                &self,
                request: Request<$api::NodePrepareResourcesRequest>,
            ) -> Result<Response<$api::NodePrepareResourcesResponse>, Status> {
                let mut claims = std::collections::HashMap::new();
                for c in request.into_inner().claims {
                    let claim = ClaimRef {
                        namespace: c.namespace,
                        uid: c.uid,
                        name: c.name,
                    };
                    let answer = match self.prepare(&claim).await {
                        Ok(devices) => $api::NodePrepareResourceResponse {
                            devices: devices
                                .into_iter()
                                .map(|d| $api::Device {
                                    request_names: d.request_names,
                                    pool_name: d.pool_name,
                                    device_name: d.device_name,
                                    cdi_device_ids: d.cdi_device_ids,
                                    ..Default::default()
                                })
                                .collect(),
                            error: String::new(),
                        },
                        Err(error) => {
                            tracing::warn!(namespace = %claim.namespace, claim = %claim.name,
                                %error, "cannot prepare claim");
                            $api::NodePrepareResourceResponse {
                                devices: Vec::new(),
                                error,
                            }
                        }
                    };
                    claims.insert(claim.uid, answer);
                }
                Ok(Response::new($api::NodePrepareResourcesResponse { claims }))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$api::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$api::NodeUnprepareResourcesResponse>, Status> {
                let mut claims = std::collections::HashMap::new();
                for c in request.into_inner().claims {
                    let claim = ClaimRef {
                        namespace: c.namespace,
                        uid: c.uid,
                        name: c.name,
                    };
                    let error = match self.unprepare(&claim).await {
                        Ok(()) => String::new(),
                        Err(error) => {
                            tracing::warn!(namespace = %claim.namespace, claim = %claim.name,
                                %error, "cannot unprepare claim");
                            error
                        }
                    };
                    claims.insert(claim.uid, $api::NodeUnprepareResourceResponse { error });
                }
                Ok(Response::new($api::NodeUnprepareResourcesResponse { claims }))
            }
        }
    };
}

node_service!(v1);
node_service!(v1beta1);
