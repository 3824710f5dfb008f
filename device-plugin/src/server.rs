//! The `DevicePlugin` gRPC service the kubelet calls, served on a unix socket.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use nitrokey_proto::v1beta1::device_plugin_server::{DevicePlugin, DevicePluginServer};
use nitrokey_proto::v1beta1::{
    AllocateRequest, AllocateResponse, CdiDevice, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, DeviceSpec, Empty,
    ListAndWatchResponse, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse,
};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::allocation;
use crate::inventory::{LookupError, Unit, shown_id};
use crate::metrics::Metrics;
use crate::names::{ENV_DEVICES, ENV_SERIALS};
use crate::state::PluginState;

/// The options this plugin announces at registration and in `GetDevicePluginOptions`.
pub fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// The `DevicePlugin` service.
#[derive(Debug, Clone)]
pub struct PluginService {
    state: Arc<PluginState>,
    metrics: Arc<Metrics>,
    /// Ends this server generation's `ListAndWatch` streams.
    stop: CancellationToken,
}

impl PluginService {
    /// A service answering from `state`; its streams end when `stop` is cancelled.
    pub fn new(state: Arc<PluginState>, metrics: Arc<Metrics>, stop: CancellationToken) -> Self {
        Self {
            state,
            metrics,
            stop,
        }
    }
}

fn to_response(units: &[Unit]) -> ListAndWatchResponse {
    ListAndWatchResponse {
        devices: units
            .iter()
            .map(|u| Device {
                id: u.id.clone(),
                health: u.health.as_api_str().to_owned(),
                topology: None,
            })
            .collect(),
    }
}

type ListAndWatchStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

/// Decrements the open-stream gauge when a `ListAndWatch` stream is dropped.
struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.list_and_watch_streams.dec();
        tracing::info!("ListAndWatch stream closed");
        release_memory_soon();
    }
}

/// Asks for freed heap memory to be handed back to the system shortly (see [`trim_task`]).
fn release_memory_soon() {
    TRIM.notify_one();
}

static TRIM: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Hands freed heap memory back to the system a moment after connections or streams went
/// away. glibc's allocator keeps the buffers of closed HTTP/2 connections in its free lists
/// and per-thread arenas, so a burst of clients would otherwise raise the resident memory for
/// good; the pause lets a whole burst end first, so that one trim covers it.
pub async fn trim_task() {
    loop {
        TRIM.notified().await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { libc::malloc_trim(0) };
    }
}

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        tracing::debug!("GetDevicePluginOptions");
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = ListAndWatchStream;

    async fn list_and_watch(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        self.metrics.list_and_watch_streams.inc();
        let guard = StreamGuard(self.metrics.clone());
        tracing::info!(
            units = self.state.units().len(),
            "ListAndWatch stream opened"
        );
        // The watch stream yields the current list first, then every change; each message is
        // the complete list.
        let stream = WatchStream::new(self.state.subscribe())
            .map(move |units| {
                let _ = &guard;
                Ok(to_response(&units))
            })
            .take_until(self.stop.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let request = request.into_inner();
        let inventory = self.state.inventory();
        let stick_of = |unit: &str| {
            inventory
                .stick_of_unit(unit)
                .map_or_else(|| unit.to_owned(), |s| s.id.clone())
        };
        let mut responses = Vec::with_capacity(request.container_requests.len());
        for container in &request.container_requests {
            let size = usize::try_from(container.allocation_size).map_err(|_| {
                Metrics::count(&self.metrics.preferred_allocations, "error");
                Status::invalid_argument("allocation_size must not be negative")
            })?;
            match allocation::preferred(
                &container.available_device_i_ds,
                &container.must_include_device_i_ds,
                size,
                stick_of,
            ) {
                Ok(device_ids) => {
                    tracing::debug!(?device_ids, "preferred allocation");
                    responses.push(ContainerPreferredAllocationResponse {
                        device_i_ds: device_ids,
                    });
                }
                Err(e) => {
                    Metrics::count(&self.metrics.preferred_allocations, "error");
                    return Err(Status::invalid_argument(e.to_string()));
                }
            }
        }
        Metrics::count(&self.metrics.preferred_allocations, "ok");
        Ok(Response::new(PreferredAllocationResponse {
            container_responses: responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let request = request.into_inner();
        let inventory = self.state.inventory();
        let mut responses = Vec::with_capacity(request.container_requests.len());
        for container in &request.container_requests {
            if container.devices_ids.is_empty() {
                Metrics::count(&self.metrics.allocations, "invalid");
                return Err(Status::invalid_argument(
                    "no device IDs in the container request",
                ));
            }
            let sticks = inventory.resolve(&container.devices_ids).map_err(|e| {
                tracing::warn!(error = %e, ids = %summarize_ids(&container.devices_ids),
                    "allocation refused");
                match e {
                    LookupError::Unknown(_) => {
                        Metrics::count(&self.metrics.allocations, "unknown");
                        Status::not_found(e.to_string())
                    }
                    LookupError::Unhealthy(_) => {
                        Metrics::count(&self.metrics.allocations, "unhealthy");
                        Status::failed_precondition(e.to_string())
                    }
                }
            })?;
            self.state.note_allocated(
                sticks.iter().map(|s| s.id.as_str()),
                std::time::Instant::now(),
            );
            let paths: Vec<String> = sticks.iter().map(|s| s.info.dev_path()).collect();
            let serials: Vec<&str> = sticks.iter().map(|s| s.serial_or_id()).collect();
            let response = ContainerAllocateResponse {
                envs: [
                    (ENV_SERIALS.to_owned(), serials.join(",")),
                    (ENV_DEVICES.to_owned(), paths.join(",")),
                ]
                .into(),
                devices: paths
                    .iter()
                    .map(|p| DeviceSpec {
                        container_path: p.clone(),
                        host_path: p.clone(),
                        permissions: "rw".to_owned(),
                    })
                    .collect(),
                cdi_devices: self
                    .state
                    .cdi_kind()
                    .map(|kind| {
                        sticks
                            .iter()
                            .map(|s| CdiDevice {
                                name: crate::cdi::device_name(kind, &s.id),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Default::default()
            };
            tracing::info!(ids = %summarize_ids(&container.devices_ids), devices = ?paths,
                serials = ?serials, "allocated");
            Metrics::count(&self.metrics.allocations, "ok");
            responses.push(response);
        }
        Ok(Response::new(AllocateResponse {
            container_responses: responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _request: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

/// At most a few IDs, each shortened, and the count: untrusted ID lists in log lines.
pub fn summarize_ids(ids: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text: Vec<String> = ids
        .iter()
        .take(SHOWN)
        .map(|id| format!("{:?}", shown_id(id)))
        .collect();
    if ids.len() > SHOWN {
        text.push(format!("… ({} IDs)", ids.len()));
    }
    format!("[{}]", text.join(", "))
}

/// Identity of a file: device, inode and change time (inode numbers alone are reused). Change
/// times have the resolution of the kernel's timer tick (4–10 ms), so a file deleted and
/// created again within one tick on the recycled inode looks the same; a kubelet, a new
/// process each time, does not restart that fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileId {
    /// An identity made of its parts (for tests of decisions about files).
    pub const fn from_parts(dev: u64, ino: u64, ctime: i64, ctime_nsec: i64) -> Self {
        Self {
            dev,
            ino,
            ctime,
            ctime_nsec,
        }
    }

    /// The identity of the file at `path`, if it exists.
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }
}

/// Counts a server generation as serving for `/healthz` while it lives.
struct ServingGuard(Arc<Metrics>);

impl ServingGuard {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.server_started();
        Self(metrics)
    }
}

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.server_stopped();
    }
}

/// One generation of the gRPC server on the plugin socket.
#[derive(Debug)]
pub struct Serving {
    /// The socket path.
    pub path: PathBuf,
    /// Identity of the socket file this generation bound.
    pub id: Option<FileId>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Serving {
    /// Binds `path` (replacing a stale socket) and serves the plugin API on it.
    pub fn start(
        path: &Path,
        state: Arc<PluginState>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        let id = FileId::of(path);
        let stop = CancellationToken::new();
        let service = PluginService::new(state, metrics.clone(), stop.clone());
        let shutdown = stop.clone();
        let guard = ServingGuard::new(metrics);
        let task = tokio::spawn(async move {
            let _guard = guard;
            let result = tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled(),
                )
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        tracing::info!(socket = %path.display(), "serving the device plugin API");
        Ok(Self {
            path: path.to_owned(),
            id,
            stop,
            task,
        })
    }

    /// Whether the socket file is still the one this generation bound.
    pub fn socket_intact(&self) -> bool {
        self.id.is_some() && FileId::of(&self.path) == self.id
    }

    /// Whether the server task ended on its own.
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops serving (ending every stream) and removes the socket if it is still ours.
    pub async fn stop(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(3), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
        if self.id.is_some() && FileId::of(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_summaries_are_bounded() {
        assert_eq!(summarize_ids(&[]), "[]");
        assert_eq!(summarize_ids(&["A-0".into()]), "[\"A-0\"]");
        let many: Vec<String> = (0..10_000).map(|n| format!("x{n}")).collect();
        let text = summarize_ids(&many);
        assert!(text.ends_with("… (10000 IDs)]"), "{text}");
        assert!(text.len() < 100, "{text}");
        let huge = vec!["y".repeat(1 << 20); 3];
        assert!(summarize_ids(&huge).len() < 400);
    }
}
