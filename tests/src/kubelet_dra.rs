//! A stand-in for the kubelet's side of Dynamic Resource Allocation: its plugin watcher, which
//! registers drivers through their registration sockets, and its DRA manager, which calls the
//! driver's node service to prepare and unprepare claims. Built from the kubelet's published
//! protos (`nitrokey_proto::pluginregistration_v1`, `dra_v1`, `dra_v1beta1`).
//!
//! Where each behaviour comes from in the kubelet (kubernetes/kubernetes, `pkg/kubelet`):
//! - `pluginmanager/pluginwatcher/plugin_watcher.go`: the registry directory is watched for
//!   sockets, and at start the sockets already there are found too; names starting with `.`
//!   are ignored; a removed socket unregisters its plugin. (The real watcher uses inotify; this
//!   one lists the directory every 20 ms, which only changes how soon a socket is noticed.)
//! - `pluginmanager/operationexecutor/operation_generator.go`: registering dials the socket,
//!   asks `GetInfo`, picks the handler by `PluginInfo.type` (here only `DRAPlugin`), lets it
//!   validate and register, and reports the outcome with `NotifyRegistrationStatus`
//!   (`plugin_registered: false` with the reason when validation fails).
//! - `cm/dra/plugin/registration.go`: the DRA handler wants a non-empty driver name and picks
//!   the first node service it knows (`v1.DRAPlugin`, then `v1beta1.DRAPlugin`; a 1.32/1.33
//!   kubelet knows only the latter) among `supported_versions`, refusing a plugin listing none;
//!   it talks to the node service on `PluginInfo.endpoint`.
//! - `cm/dra/manager.go`: claims are prepared and unprepared in batches per driver, named by
//!   namespace, UID and name; an answer missing a claim of the request, or with an `error`, is
//!   a failure the kubelet retries later.
//! - `cm/dra/plugin/dra_plugin_manager.go` (`wipeResourceSlices`): a starting kubelet deletes
//!   every ResourceSlice of its node, since no driver has registered yet; with
//!   [`FakeDraKubelet::wiping`] the stand-in does so through the API stand-in at each
//!   restart. (The delayed wipe of one driver's slices after it stays unregistered is not
//!   modelled.)
//! - A kubelet restart (`restart`) forgets every registration and registers the sockets it
//!   finds again: the kubelet does not delete registration sockets (the plugin watcher's
//!   README has the plugin delete its own stale socket when it starts); [`FakeDraKubelet::
//!   remove_socket`] shows what happens when someone else does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nitrokey_proto::pluginregistration_v1::registration_client::RegistrationClient;
use nitrokey_proto::pluginregistration_v1::{InfoRequest, PluginInfo, RegistrationStatus};
use nitrokey_proto::{dra_v1, dra_v1beta1};
use tokio::task::JoinHandle;

use crate::kubelet::connect_unix;

/// How long the kubelet waits when dialling a plugin.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the registry directory is listed.
const POLL: Duration = Duration::from_millis(20);

/// A node service version the kubelet can talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeService {
    /// `v1.DRAPlugin` (Kubernetes ≥ 1.34).
    V1,
    /// `v1beta1.DRAPlugin` (Kubernetes 1.32, 1.33).
    V1beta1,
}

impl NodeService {
    fn name(self) -> &'static str {
        match self {
            NodeService::V1 => nitrokey_proto::DRA_V1_SERVICE,
            NodeService::V1beta1 => nitrokey_proto::DRA_V1BETA1_SERVICE,
        }
    }
}

/// A registered driver.
#[derive(Debug, Clone)]
pub struct Registered {
    /// Its registration socket.
    pub socket: PathBuf,
    /// The socket's inode: a new socket at the same path is another registration.
    pub inode: u64,
    /// What it answered to `GetInfo`.
    pub info: PluginInfo,
    /// The node service chosen.
    pub service: NodeService,
    /// When the handshake finished.
    pub at: Instant,
}

/// What the stand-in saw, in order.
#[derive(Debug, Clone)]
pub enum DraEvent {
    /// A driver was registered.
    Registered(Registered),
    /// A driver was refused, with the reason sent to it.
    Refused(PathBuf, String),
    /// A registration socket went away.
    Unregistered(PathBuf),
    /// The kubelet restarted.
    Restarted,
}

#[derive(Default)]
struct Shared {
    events: Mutex<Vec<DraEvent>>,
    registered: Mutex<BTreeMap<PathBuf, Registered>>,
    /// Sockets refused, by inode: not asked again until replaced.
    refused: Mutex<Vec<(PathBuf, u64)>>,
}

/// The running stand-in; stops when dropped.
pub struct FakeDraKubelet {
    registry: PathBuf,
    services: Vec<NodeService>,
    shared: Arc<Shared>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    wipe: Option<(Arc<crate::kube_api_dra::DraObjects>, String)>,
}

impl std::fmt::Debug for FakeDraKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDraKubelet")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeDraKubelet {
    fn drop(&mut self) {
        if let Some(w) = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.abort();
        }
    }
}

impl FakeDraKubelet {
    /// A kubelet of Kubernetes ≥ 1.34 whose root directory is `kubelet_dir`.
    pub fn start(kubelet_dir: &Path) -> anyhow::Result<Self> {
        Self::start_knowing(kubelet_dir, &[NodeService::V1, NodeService::V1beta1])
    }

    /// A kubelet knowing only these node services, in order of preference.
    pub fn start_knowing(kubelet_dir: &Path, services: &[NodeService]) -> anyhow::Result<Self> {
        let registry = kubelet_dir.join("plugins_registry");
        std::fs::create_dir_all(&registry).context("creating plugins_registry")?;
        std::fs::create_dir_all(kubelet_dir.join("plugins")).context("creating plugins")?;
        let kubelet = Self {
            registry,
            services: services.to_vec(),
            shared: Arc::new(Shared::default()),
            watcher: Mutex::new(None),
            wipe: None,
        };
        kubelet.spawn_watcher();
        Ok(kubelet)
    }

    fn spawn_watcher(&self) {
        let (registry, services, shared) = (
            self.registry.clone(),
            self.services.clone(),
            self.shared.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                watch_once(&registry, &services, &shared).await;
                tokio::time::sleep(POLL).await;
            }
        });
        *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Makes every later restart delete node `node`'s ResourceSlices from `objects` first.
    pub fn wiping(mut self, objects: Arc<crate::kube_api_dra::DraObjects>, node: &str) -> Self {
        self.wipe = Some((objects, node.to_owned()));
        self
    }

    /// Restarts: every registration is forgotten, and the sockets found are registered anew.
    pub fn restart(&self) {
        if let Some(w) = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.abort();
        }
        self.shared
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Some((objects, node)) = &self.wipe {
            objects.delete_node_slices(node);
        }
        self.shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(DraEvent::Restarted);
        self.spawn_watcher();
    }

    /// Deletes a driver's registration socket (an operator or a node clean-up doing so).
    pub fn remove_socket(&self, name: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.registry.join(name)).context("removing the socket")
    }

    /// Everything seen so far.
    pub fn events(&self) -> Vec<DraEvent> {
        self.shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The driver `name`, once registered (after the `n`-th event at the earliest).
    pub async fn wait_for_driver(
        &self,
        name: &str,
        after: usize,
        timeout: Duration,
    ) -> anyhow::Result<Registered> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self.events().into_iter().skip(after).find_map(|e| match e {
                DraEvent::Registered(r) if r.info.name == name => Some(r),
                _ => None,
            });
            if let Some(r) = found {
                return Ok(r);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "driver {name} not registered in {timeout:?}: {:?}",
                    self.events()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn driver(&self, name: &str) -> anyhow::Result<Registered> {
        self.shared
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|r| r.info.name == name)
            .cloned()
            .with_context(|| format!("driver {name} is not registered"))
    }

    /// `NodePrepareResources` for `claims` (namespace, UID, name) on driver `name`: each
    /// claim's devices, or its error. Fails as the kubelet does when a claim is left out.
    pub async fn prepare(
        &self,
        name: &str,
        claims: &[(&str, &str, &str)],
    ) -> anyhow::Result<BTreeMap<String, Result<Vec<dra_v1::Device>, String>>> {
        let driver = self.driver(name)?;
        let channel = connect_unix(Path::new(&driver.info.endpoint), DIAL_TIMEOUT).await?;
        let answers: BTreeMap<String, (Vec<dra_v1::Device>, String)> = match driver.service {
            NodeService::V1 => {
                let request = dra_v1::NodePrepareResourcesRequest {
                    claims: claims.iter().map(|c| v1_claim(*c)).collect(),
                };
                dra_v1::dra_plugin_client::DraPluginClient::new(channel)
                    .node_prepare_resources(request)
                    .await?
                    .into_inner()
                    .claims
                    .into_iter()
                    .map(|(uid, a)| (uid, (a.devices, a.error)))
                    .collect()
            }
            NodeService::V1beta1 => {
                let request = dra_v1beta1::NodePrepareResourcesRequest {
                    claims: claims
                        .iter()
                        .map(|(namespace, uid, name)| dra_v1beta1::Claim {
                            namespace: (*namespace).into(),
                            uid: (*uid).into(),
                            name: (*name).into(),
                        })
                        .collect(),
                };
                dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel)
                    .node_prepare_resources(request)
                    .await?
                    .into_inner()
                    .claims
                    .into_iter()
                    .map(|(uid, a)| {
                        let devices = a
                            .devices
                            .into_iter()
                            .map(|d| dra_v1::Device {
                                request_names: d.request_names,
                                pool_name: d.pool_name,
                                device_name: d.device_name,
                                cdi_device_ids: d.cdi_device_ids,
                                share_id: None,
                            })
                            .collect();
                        (uid, (devices, a.error))
                    })
                    .collect()
            }
        };
        let mut result = BTreeMap::new();
        for (_, uid, _) in claims {
            let Some((devices, error)) = answers.get(*uid) else {
                bail!("NodePrepareResources left out claim {uid}: {answers:?}");
            };
            let answer = if error.is_empty() {
                Ok(devices.clone())
            } else {
                Err(error.clone())
            };
            result.insert((*uid).to_owned(), answer);
        }
        Ok(result)
    }

    /// `NodeUnprepareResources` for `claims` on driver `name`: each claim's error, if any.
    pub async fn unprepare(
        &self,
        name: &str,
        claims: &[(&str, &str, &str)],
    ) -> anyhow::Result<BTreeMap<String, Result<(), String>>> {
        let driver = self.driver(name)?;
        let channel = connect_unix(Path::new(&driver.info.endpoint), DIAL_TIMEOUT).await?;
        let answers: BTreeMap<String, String> = match driver.service {
            NodeService::V1 => dra_v1::dra_plugin_client::DraPluginClient::new(channel)
                .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
                    claims: claims.iter().map(|c| v1_claim(*c)).collect(),
                })
                .await?
                .into_inner()
                .claims
                .into_iter()
                .map(|(uid, a)| (uid, a.error))
                .collect(),
            NodeService::V1beta1 => dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel)
                .node_unprepare_resources(dra_v1beta1::NodeUnprepareResourcesRequest {
                    claims: claims
                        .iter()
                        .map(|(namespace, uid, name)| dra_v1beta1::Claim {
                            namespace: (*namespace).into(),
                            uid: (*uid).into(),
                            name: (*name).into(),
                        })
                        .collect(),
                })
                .await?
                .into_inner()
                .claims
                .into_iter()
                .map(|(uid, a)| (uid, a.error))
                .collect(),
        };
        let mut result = BTreeMap::new();
        for (_, uid, _) in claims {
            let Some(error) = answers.get(*uid) else {
                bail!("NodeUnprepareResources left out claim {uid}: {answers:?}");
            };
            let answer = if error.is_empty() {
                Ok(())
            } else {
                Err(error.clone())
            };
            result.insert((*uid).to_owned(), answer);
        }
        Ok(result)
    }
}

fn v1_claim((namespace, uid, name): (&str, &str, &str)) -> dra_v1::Claim {
    dra_v1::Claim {
        namespace: namespace.into(),
        uid: uid.into(),
        name: name.into(),
    }
}

/// One pass of the plugin watcher: registers new sockets, unregisters vanished ones.
async fn watch_once(registry: &Path, services: &[NodeService], shared: &Shared) {
    let mut present = Vec::new();
    if let Ok(entries) = std::fs::read_dir(registry) {
        for entry in entries.flatten() {
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            let socket = entry.file_type().map(|t| {
                use std::os::unix::fs::FileTypeExt as _;
                t.is_socket()
            });
            if !hidden && socket.unwrap_or(false) {
                use std::os::unix::fs::MetadataExt as _;
                let inode = entry.metadata().map(|m| m.ino()).unwrap_or_default();
                present.push((entry.path(), inode));
            }
        }
    }
    let known: Vec<(PathBuf, u64)> = shared
        .registered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|r| (r.socket.clone(), r.inode))
        .collect();
    // A socket replaced since its registration counts as gone and new (the reconciler
    // compares the socket's timestamp with the registered one).
    for (gone, _) in known.iter().filter(|k| !present.contains(k)) {
        shared
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(gone);
        shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(DraEvent::Unregistered(gone.clone()));
    }
    let refused = shared
        .refused
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (socket, inode) in present
        .into_iter()
        .filter(|p| !known.contains(p) && !refused.contains(p))
    {
        // A socket whose handshake fails is tried again at the next pass, as the
        // reconciler retries a plugin it could not register.
        match register(&socket, inode, services).await {
            Ok(Ok(registered)) => {
                shared
                    .registered
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(socket.clone(), registered.clone());
                shared
                    .events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(DraEvent::Registered(registered));
            }
            Ok(Err(refusal)) => {
                shared
                    .refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((socket.clone(), inode));
                shared
                    .events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(DraEvent::Refused(socket.clone(), refusal));
            }
            Err(_) => {}
        }
    }
}

/// The handshake: `Ok(Err(reason))` when the kubelet refuses the plugin (and told it so).
async fn register(
    socket: &Path,
    inode: u64,
    services: &[NodeService],
) -> anyhow::Result<Result<Registered, String>> {
    let channel = connect_unix(socket, DIAL_TIMEOUT).await?;
    let mut client = RegistrationClient::new(channel);
    let info = client.get_info(InfoRequest {}).await?.into_inner();
    let verdict = if info.r#type != nitrokey_proto::DRA_PLUGIN_TYPE {
        Err(format!(
            "no handler registered for plugin type: {}",
            info.r#type
        ))
    } else if info.name.is_empty() {
        Err("empty plugin name".to_owned())
    } else if info.supported_versions.is_empty() {
        Err("empty list of supported gRPC services (aka version)".to_owned())
    } else {
        services
            .iter()
            .copied()
            .find(|s| info.supported_versions.iter().any(|v| v == s.name()))
            .ok_or_else(|| {
                format!(
                    "none of the supported gRPC services {:?} is known to the kubelet",
                    info.supported_versions
                )
            })
    };
    let status = match &verdict {
        Ok(_) => RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        },
        Err(e) => RegistrationStatus {
            plugin_registered: false,
            error: e.clone(),
        },
    };
    client.notify_registration_status(status).await?;
    Ok(verdict.map(|service| Registered {
        socket: socket.to_owned(),
        inode,
        info,
        service,
        at: Instant::now(),
    }))
}
