//! A stand-in for the kubelet's pod-resources API (`v1.PodResourcesLister`), served over gRPC
//! on a unix socket like the kubelet's `/var/lib/kubelet/pod-resources/kubelet.sock`. Tests
//! set which pods hold which devices; the device plugin asks it who holds a replugged stick.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use nitrokey_proto::podresources_v1::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use nitrokey_proto::podresources_v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Service(Arc<Mutex<Vec<PodResources>>>);

impl Service {
    fn pods(&self) -> Vec<PodResources> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[tonic::async_trait]
impl PodResourcesLister for Service {
    async fn list(
        &self,
        _request: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: self.pods(),
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _request: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(AllocatableResourcesResponse::default()))
    }

    async fn get(
        &self,
        request: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        let request = request.into_inner();
        self.pods()
            .into_iter()
            .find(|p| p.name == request.pod_name && p.namespace == request.pod_namespace)
            .map(|p| {
                Response::new(GetPodResourcesResponse {
                    pod_resources: Some(p),
                })
            })
            .ok_or_else(|| Status::not_found("pod not found"))
    }
}

/// The pod-resources stand-in; stops serving when dropped.
pub struct FakePodResources {
    path: PathBuf,
    service: Service,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FakePodResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakePodResources")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FakePodResources {
    /// Serves on the unix socket `path` (inside a Tokio runtime).
    pub fn start(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref().to_owned();
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        let service = Service::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = PodResourcesListerServer::new(service.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            path,
            service,
            stop: Some(stop),
            task,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the pods listed.
    pub fn set_pods(&self, pods: Vec<PodResources>) {
        *self.service.0.lock().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    /// A pod with one container holding these device IDs of `resource`.
    pub fn pod(namespace: &str, name: &str, resource: &str, ids: &[&str]) -> PodResources {
        PodResources {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            containers: vec![ContainerResources {
                name: "main".to_owned(),
                devices: vec![ContainerDevices {
                    resource_name: resource.to_owned(),
                    device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                    topology: None,
                }],
                ..ContainerResources::default()
            }],
        }
    }
}

impl Drop for FakePodResources {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
