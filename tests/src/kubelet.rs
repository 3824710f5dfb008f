//! A kubelet stand-in: the device manager side of the device-plugin API v1beta1.
//!
//! [`FakeKubelet`] behaves like the real kubelet's device manager where a plugin can tell:
//!
//! - On start it deletes every socket in the directory (not other files), then serves
//!   `Registration` on `<dir>/kubelet.sock`.
//! - `Register` checks the version and the resource name, then *while the call is still in
//!   flight* dials `<dir>/<endpoint>` (10 s, blocking) and calls `GetDevicePluginOptions`;
//!   only then it answers. After that it consumes `ListAndWatch` in the background, each
//!   message replacing the whole device list. A second registration of the same resource
//!   replaces the first connection.
//! - [`FakeKubelet::restart`] does what a kubelet restart does: the old process's connections
//!   go away, every socket in the directory is deleted and `kubelet.sock` is created anew.
//!
//! Tests and the demo call `Allocate` and `GetPreferredAllocation` through it, as the kubelet
//! would when a pod is admitted.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use nitrokey_e2e::kubelet::FakeKubelet;
//! let dir = tempfile::tempdir()?;
//! let kubelet = FakeKubelet::start(dir.path()).await?;
//! // ... start the device plugin with --plugin-dir dir ...
//! let registration = kubelet.wait_for_registration(Duration::from_secs(10)).await?;
//! let list = kubelet
//!     .wait_for_devices(|d| d.iter().filter(|d| d.health == "Healthy").count() == 2,
//!                       Duration::from_secs(10))
//!     .await?;
//! let response = kubelet.allocate(&[list.devices[0].id.as_str()]).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow};
use hyper_util::rt::TokioIo;
use nitrokey_proto::v1beta1::device_plugin_client::DevicePluginClient;
use nitrokey_proto::v1beta1::registration_server::{
    Registration as RegistrationApi, RegistrationServer,
};
use nitrokey_proto::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest, ContainerAllocateResponse,
    ContainerPreferredAllocationRequest, Device, DevicePluginOptions, Empty,
    PreferredAllocationRequest, RegisterRequest,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

/// How long the kubelet waits for a plugin's socket when dialling back during `Register`.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a gRPC channel over the unix socket at `path` (the URI authority is ignored).
pub async fn connect_unix(path: &Path, timeout: Duration) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    let shown = path.display().to_string();
    Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .with_context(|| format!("cannot connect to {shown}"))
}

/// One `Register` call the kubelet received.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The request as sent by the plugin.
    pub request: RegisterRequest,
    /// When the call arrived (monotonic clock).
    pub received_at: Instant,
    /// When the call arrived (wall clock).
    pub received_at_system: SystemTime,
    /// Whether it was accepted.
    pub accepted: bool,
    /// Why it was refused, if it was.
    pub error: Option<String>,
    /// What the plugin's `GetDevicePluginOptions` answered during the call.
    pub plugin_options: Option<DevicePluginOptions>,
}

/// The device list of one resource as last received over `ListAndWatch`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceList {
    /// Resource name.
    pub resource: String,
    /// The devices of the last message (each message replaces the whole list).
    pub devices: Vec<Device>,
    /// Number of `ListAndWatch` messages received for this resource so far.
    pub updates: u64,
    /// When the last message arrived.
    pub received_at: Option<Instant>,
    /// Whether the stream is still open (the kubelet treats a broken stream as all unhealthy).
    pub connected: bool,
}

impl DeviceList {
    /// IDs of the devices with health `Healthy`.
    pub fn healthy_ids(&self) -> Vec<String> {
        self.with_health(nitrokey_proto::HEALTHY)
    }

    /// IDs of the devices with health `Unhealthy`.
    pub fn unhealthy_ids(&self) -> Vec<String> {
        self.with_health(nitrokey_proto::UNHEALTHY)
    }

    fn with_health(&self, health: &str) -> Vec<String> {
        self.devices
            .iter()
            .filter(|d| d.health == health)
            .map(|d| d.id.clone())
            .collect()
    }

    /// All device IDs, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.devices.iter().map(|d| d.id.clone()).collect();
        ids.sort();
        ids
    }
}

/// A connected plugin (one per resource).
struct Plugin {
    client: DevicePluginClient<Channel>,
    stream_task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    registrations: Vec<Registration>,
    plugins: HashMap<String, Plugin>,
    lists: HashMap<String, DeviceList>,
    /// The most recently registered resource: the default for calls that name none.
    last_resource: Option<String>,
}

struct Shared {
    dir: PathBuf,
    reject: Mutex<Option<String>>,
    /// How many of the next `Register` calls fail with UNAVAILABLE (an overloaded kubelet).
    unavailable: Mutex<u32>,
    state: Mutex<State>,
    /// Bumped on every registration and every device-list change.
    changes: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl RegistrationApi for Service {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let received_at = Instant::now();
        let received_at_system = SystemTime::now();
        let request = request.into_inner();
        let outcome = self.accept(&request).await;
        let (accepted, error, plugin_options) = match &outcome {
            Ok(options) => (true, None, Some(*options)),
            Err(status) => (false, Some(status.message().to_owned()), None),
        };
        {
            let mut state = self.0.state();
            state.registrations.push(Registration {
                request,
                received_at,
                received_at_system,
                accepted,
                error,
                plugin_options,
            });
        }
        self.0.bump();
        outcome.map(|_| Response::new(Empty {}))
    }
}

impl Service {
    /// The kubelet's checks and dial-back; on success the plugin is connected and streaming.
    async fn accept(&self, request: &RegisterRequest) -> Result<DevicePluginOptions, Status> {
        {
            let mut unavailable = self.0.unavailable.lock().unwrap_or_else(|e| e.into_inner());
            if *unavailable > 0 {
                *unavailable -= 1;
                return Err(Status::unavailable("kubelet is busy"));
            }
        }
        if let Some(reason) = self
            .0
            .reject
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(Status::unknown(reason));
        }
        if request.version != nitrokey_proto::VERSION {
            return Err(Status::unknown(format!(
                "requested device plugin version {} is not supported; supported versions: [{}]",
                request.version,
                nitrokey_proto::VERSION
            )));
        }
        if !is_extended_resource_name(&request.resource_name) {
            return Err(Status::unknown(format!(
                "invalid name of device plugin socket: resource name {} is not an extended resource name",
                request.resource_name
            )));
        }
        let endpoint = self.0.dir.join(&request.endpoint);
        let channel = connect_unix(&endpoint, DIAL_TIMEOUT)
            .await
            .map_err(|e| Status::unknown(format!("failed to dial device plugin: {e:#}")))?;
        let mut client = DevicePluginClient::new(channel);
        let options = client
            .get_device_plugin_options(Empty {})
            .await
            .map_err(|e| Status::unknown(format!("failed to get device plugin options: {e}")))?
            .into_inner();

        let resource = request.resource_name.clone();
        let shared = self.0.clone();
        let mut stream_client = client.clone();
        let stream_resource = resource.clone();
        let stream_task = tokio::spawn(async move {
            let result = async {
                let mut stream = stream_client.list_and_watch(Empty {}).await?.into_inner();
                while let Some(message) = stream.message().await? {
                    {
                        let mut state = shared.state();
                        let list = state.lists.entry(stream_resource.clone()).or_default();
                        list.resource = stream_resource.clone();
                        list.devices = message.devices;
                        list.updates += 1;
                        list.received_at = Some(Instant::now());
                        list.connected = true;
                    }
                    shared.bump();
                }
                Ok::<(), Status>(())
            }
            .await;
            if let Err(e) = result {
                debug_log(&format!("ListAndWatch for {stream_resource} ended: {e}"));
            }
            if let Some(list) = shared.state().lists.get_mut(&stream_resource) {
                list.connected = false;
            }
            shared.bump();
        });
        let mut state = self.0.state();
        if let Some(old) = state.plugins.insert(
            resource.clone(),
            Plugin {
                client,
                stream_task,
            },
        ) {
            old.stream_task.abort();
        }
        state.last_resource = Some(resource);
        Ok(options)
    }
}

/// Diagnostics go to stderr only when `NITROKEY_E2E_DEBUG` is set.
fn debug_log(message: &str) {
    if std::env::var_os("NITROKEY_E2E_DEBUG").is_some() {
        eprintln!("[fake kubelet] {message}");
    }
}

/// The kubelet's check of an extended resource name: `<domain>/<name>`, outside the
/// `kubernetes.io` namespace and not prefixed `requests.`.
pub fn is_extended_resource_name(name: &str) -> bool {
    match name.split_once('/') {
        Some((domain, short)) => {
            !domain.is_empty()
                && !short.is_empty()
                && !short.contains('/')
                && domain != "kubernetes.io"
                && !domain.ends_with(".kubernetes.io")
                && !name.starts_with("requests.")
        }
        None => false,
    }
}

/// The registration server of one kubelet "process".
struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The kubelet stand-in; see the module docs. Stops serving when dropped.
pub struct FakeKubelet {
    shared: Arc<Shared>,
    server: Option<Server>,
    started_at: Instant,
}

impl std::fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// Starts a kubelet on `dir` (created if missing): deletes every socket in it, then serves
    /// `Registration` on `dir/kubelet.sock`. Must be called inside a Tokio runtime.
    pub async fn start(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            dir,
            reject: Mutex::new(None),
            unavailable: Mutex::new(0),
            state: Mutex::new(State::default()),
            changes,
        });
        let mut kubelet = Self {
            shared,
            server: None,
            started_at: Instant::now(),
        };
        kubelet.start_process()?;
        Ok(kubelet)
    }

    /// Makes every later `Register` fail with this message, as a kubelet refusing the plugin
    /// would (`None` accepts again).
    pub fn reject_registrations(&self, reason: Option<&str>) {
        *self.shared.reject.lock().unwrap_or_else(|e| e.into_inner()) = reason.map(str::to_owned);
    }

    /// Makes the next `n` `Register` calls fail with UNAVAILABLE after the connection was
    /// accepted, as a kubelet that is up but cannot serve the call would.
    pub fn fail_next_registrations(&self, n: u32) {
        *self
            .shared
            .unavailable
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = n;
    }

    /// The device-plugin directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Path of `kubelet.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.shared.dir.join(nitrokey_proto::KUBELET_SOCKET)
    }

    /// When the current kubelet "process" created `kubelet.sock`.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Whether the kubelet is serving (between [`stop`](Self::stop) and the next start it is not).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    fn start_process(&mut self) -> anyhow::Result<Instant> {
        let removed = remove_sockets(&self.shared.dir)?;
        debug_log(&format!("removed sockets {removed:?}"));
        let listener = UnixListener::bind(self.socket_path())
            .with_context(|| format!("binding {}", self.socket_path().display()))?;
        self.started_at = Instant::now();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let service = RegistrationServer::new(Service(self.shared.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.server = Some(Server {
            stop: Some(stop_tx),
            task,
        });
        Ok(self.started_at)
    }

    /// Stops the kubelet "process": the registration server and every plugin connection go
    /// away; the socket files stay, as after a crash.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            if let Some(stop) = server.stop.take() {
                let _ = stop.send(());
            }
            server.task.abort();
            let _ = server.task.await;
        }
        let plugins: Vec<Plugin> = self
            .shared
            .state()
            .plugins
            .drain()
            .map(|(_, p)| p)
            .collect();
        for plugin in plugins {
            plugin.stream_task.abort();
            let _ = plugin.stream_task.await;
        }
        // An aborted stream task cannot record its own end.
        for list in self.shared.state().lists.values_mut() {
            list.connected = false;
        }
        self.shared.bump();
    }

    /// Restarts like a real kubelet: stop, delete every socket in the directory, create
    /// `kubelet.sock` anew. Returns when the new socket was created (for latency figures).
    pub async fn restart(&mut self) -> anyhow::Result<Instant> {
        self.stop().await;
        self.start_process()
    }

    /// Every `Register` call received so far, accepted or not, oldest first.
    pub fn registrations(&self) -> Vec<Registration> {
        self.shared.state().registrations.clone()
    }

    /// Number of accepted registrations.
    pub fn registration_count(&self) -> usize {
        self.shared
            .state()
            .registrations
            .iter()
            .filter(|r| r.accepted)
            .count()
    }

    /// Waits until at least `n` registrations were accepted; returns the latest accepted one.
    pub async fn wait_for_registrations(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Registration> {
        let result = self
            .wait_until(timeout, |state| {
                let accepted: Vec<&Registration> =
                    state.registrations.iter().filter(|r| r.accepted).collect();
                (accepted.len() >= n)
                    .then(|| accepted.last().map(|r| (*r).clone()))
                    .flatten()
            })
            .await;
        result.map_err(|_| {
            anyhow!(
                "timed out after {timeout:?} waiting for {n} registration(s); got {} (attempts: {:?})",
                self.registration_count(),
                self.registrations().iter().map(|r| r.error.clone()).collect::<Vec<_>>()
            )
        })
    }

    /// Waits for an accepted registration that arrived at or after `since` (e.g. the instant
    /// of a restart) and returns the first such one.
    pub async fn wait_for_registration_since(
        &self,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Registration> {
        self.wait_until(timeout, |state| {
            state
                .registrations
                .iter()
                .find(|r| r.accepted && r.received_at >= since)
                .cloned()
        })
        .await
        .map_err(|_| {
            anyhow!(
                "timed out after {timeout:?} waiting for a registration; attempts: {:?}",
                self.registrations()
                    .iter()
                    .rev()
                    .take(3)
                    .map(|r| r.error.clone())
                    .collect::<Vec<_>>()
            )
        })
    }

    /// Waits for the first accepted registration.
    pub async fn wait_for_registration(&self, timeout: Duration) -> anyhow::Result<Registration> {
        self.wait_for_registrations(1, timeout).await
    }

    /// Waits until any `Register` call (accepted or not) beyond the first `seen` arrives.
    pub async fn wait_for_attempt(
        &self,
        seen: usize,
        timeout: Duration,
    ) -> anyhow::Result<Registration> {
        self.wait_until(timeout, |state| state.registrations.get(seen).cloned())
            .await
            .map_err(|_| anyhow!("timed out after {timeout:?} waiting for a Register call"))
    }

    /// The latest device list of the most recently registered resource.
    pub fn device_list(&self) -> Option<DeviceList> {
        let state = self.shared.state();
        let resource = state.last_resource.as_ref()?;
        state.lists.get(resource).cloned()
    }

    /// The latest device list of `resource`.
    pub fn device_list_of(&self, resource: &str) -> Option<DeviceList> {
        self.shared.state().lists.get(resource).cloned()
    }

    /// The latest devices of the most recently registered resource (empty if none yet).
    pub fn devices(&self) -> Vec<Device> {
        self.device_list().map(|l| l.devices).unwrap_or_default()
    }

    /// Waits until the device list of the most recently registered resource satisfies
    /// `predicate`, and returns that list.
    pub async fn wait_for_devices<F>(
        &self,
        predicate: F,
        timeout: Duration,
    ) -> anyhow::Result<DeviceList>
    where
        F: Fn(&[Device]) -> bool,
    {
        self.wait_for_list(|list| list.connected && predicate(&list.devices), timeout)
            .await
    }

    /// Waits until exactly `n` listed units are `Unhealthy` (an unplugged stick's units within
    /// their grace period), and returns that list.
    pub async fn wait_for_unhealthy(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<DeviceList> {
        self.wait_for_devices(
            |d| d.iter().filter(|d| d.health == "Unhealthy").count() == n,
            timeout,
        )
        .await
    }

    /// Waits until the device list (with its metadata) satisfies `predicate`.
    pub async fn wait_for_list<F>(
        &self,
        predicate: F,
        timeout: Duration,
    ) -> anyhow::Result<DeviceList>
    where
        F: Fn(&DeviceList) -> bool,
    {
        self.wait_until(timeout, |state| {
            let resource = state.last_resource.as_ref()?;
            state.lists.get(resource).filter(|l| predicate(l)).cloned()
        })
        .await
        .map_err(|_| {
            anyhow!(
                "timed out after {timeout:?} waiting for the device list; last seen: {:?}",
                self.device_list()
            )
        })
    }

    async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> Result<T, tokio::time::error::Elapsed> {
        let mut changes = self.shared.changes.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(value) = check(&self.shared.state()) {
                    return value;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
    }

    fn client(&self) -> Result<DevicePluginClient<Channel>, Status> {
        let state = self.shared.state();
        let resource = state
            .last_resource
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("no device plugin registered"))?;
        state
            .plugins
            .get(resource)
            .map(|p| p.client.clone())
            .ok_or_else(|| Status::failed_precondition("device plugin not connected"))
    }

    /// Calls `Allocate` for one container with these device IDs.
    pub async fn allocate(&self, ids: &[&str]) -> Result<ContainerAllocateResponse, Status> {
        let request = AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            }],
        };
        let mut response = self.allocate_request(request).await?;
        response
            .container_responses
            .pop()
            .ok_or_else(|| Status::internal("Allocate answered no container response"))
    }

    /// Calls `Allocate` with a full request (several containers).
    pub async fn allocate_request(
        &self,
        request: AllocateRequest,
    ) -> Result<AllocateResponse, Status> {
        Ok(self.client()?.allocate(request).await?.into_inner())
    }

    /// Calls `GetPreferredAllocation` for one container; returns the preferred device IDs.
    pub async fn preferred_allocation(
        &self,
        available: &[&str],
        must_include: &[&str],
        size: i32,
    ) -> Result<Vec<String>, Status> {
        let request = PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: available.iter().map(|s| (*s).to_owned()).collect(),
                must_include_device_i_ds: must_include.iter().map(|s| (*s).to_owned()).collect(),
                allocation_size: size,
            }],
        };
        let mut response = self
            .client()?
            .get_preferred_allocation(request)
            .await?
            .into_inner();
        response
            .container_responses
            .pop()
            .map(|c| c.device_i_ds)
            .ok_or_else(|| {
                Status::internal("GetPreferredAllocation answered no container response")
            })
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            if let Some(stop) = server.stop.take() {
                let _ = stop.send(());
            }
            server.task.abort();
        }
        for (_, plugin) in self.shared.state().plugins.drain() {
            plugin.stream_task.abort();
        }
    }
}

/// Deletes every unix socket in `dir` (as a starting kubelet does), leaving other files.
/// Returns the names removed.
pub fn remove_sockets(dir: &Path) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::FileTypeExt;
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_socket() {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_resource_names() {
        assert!(is_extended_resource_name("nitrokey.com/hsm"));
        assert!(!is_extended_resource_name("hsm"));
        assert!(!is_extended_resource_name("kubernetes.io/hsm"));
        assert!(!is_extended_resource_name("x.kubernetes.io/hsm"));
        assert!(!is_extended_resource_name("requests.nitrokey.com/hsm"));
    }

    #[tokio::test]
    async fn restart_removes_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kubelet_internal_checkpoint"), "{}").unwrap();
        let _other = std::os::unix::net::UnixListener::bind(dir.path().join("other.sock")).unwrap();
        let mut kubelet = FakeKubelet::start(dir.path()).await.unwrap();
        assert!(!dir.path().join("other.sock").exists());
        assert!(kubelet.socket_path().exists());
        let before = kubelet.started_at();
        let created = kubelet.restart().await.unwrap();
        assert!(created >= before);
        assert!(kubelet.socket_path().exists());
        assert!(dir.path().join("kubelet_internal_checkpoint").exists());
        assert_eq!(kubelet.registration_count(), 0);
    }
}
