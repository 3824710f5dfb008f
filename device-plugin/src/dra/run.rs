//! The DRA mode's daemon: the device plugin's discovery, inventory and health endpoints, with
//! the ResourceSlice publisher, the node service and the kubelet registration in place of the
//! device-plugin gRPC server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use super::names::{CHECKPOINT_FILE, DRA_SOCKET, DRIVER_NAME, REGISTRATION_SOCKET};
use super::node::{ApiClaims, NodeService, StoreError};
use super::registrar::SocketError;
use super::registration::Registration;
use crate::config::Config;
use crate::inventory::{Inventory, UsbEvent};
use crate::metrics::Metrics;
use crate::recovery::Recovery;
use crate::replug::Replug;
use crate::state::{DiscoveryStopped, PluginState};
use crate::usb::{Discovery, DiscoveryError};

/// What stops the driver with a failure.
#[derive(Debug, thiserror::Error)]
pub enum DraError {
    /// USB discovery could not start.
    #[error(transparent)]
    Usb(#[from] DiscoveryError),
    /// USB discovery ended while running.
    #[error(transparent)]
    DiscoveryStopped(#[from] DiscoveryStopped),
    /// The checkpoint or the CDI directory is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A socket or directory could not be set up.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// No Kubernetes API client.
    #[error("cannot reach the Kubernetes API: {0}")]
    Api(kube::Error),
    /// The registration socket cannot be served.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// A gRPC server failed.
    #[error("serving {0}: {1}")]
    Serve(PathBuf, tonic::transport::Error),
    /// The HTTP endpoint could not bind.
    #[error("cannot serve metrics on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
    /// A bug: a task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The node service's socket: `<kubelet dir>/plugins/hsm.nitrokey.com/dra.sock`.
pub fn dra_socket(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir
        .join("plugins")
        .join(DRIVER_NAME)
        .join(DRA_SOCKET)
}

/// The registration socket: `<kubelet dir>/plugins_registry/hsm.nitrokey.com-reg.sock`.
pub fn registration_socket(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir
        .join("plugins_registry")
        .join(REGISTRATION_SOCKET)
}

/// Runs the DRA driver until SIGTERM/SIGINT (`Ok`) or a fatal error.
pub async fn run(config: Config) -> Result<(), DraError> {
    // Validation makes DRA mode need the node's name.
    let node = config.node_name.clone().unwrap_or_default();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), driver = DRIVER_NAME, node = %node,
        kubelet_dir = %config.kubelet_dir.display(), cdi_spec_dir = %config.cdi_spec_dir.display(),
        "starting NitroKey HSM DRA driver");
    for note in crate::usb::blind_spots(|p| p.exists()) {
        tracing::warn!("{note}");
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())
        .map_err(|e| DraError::Io(PathBuf::from("signal handlers"), e))?;

    let metrics = Arc::new(Metrics::new(&config.resource_name));
    let bound = crate::http::start(config.metrics_address, metrics.clone(), shutdown.clone())
        .await
        .map_err(|e| DraError::Metrics(config.metrics_address, e))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");

    let (events_tx, events_rx) = mpsc::unbounded_channel::<UsbEvent>();
    let (matchers, mode, interval) = (
        config.devices.clone(),
        config.discovery,
        config.rescan_interval,
    );
    let (discovery, initial) =
        tokio::task::spawn_blocking(move || Discovery::start(matchers, mode, interval, events_tx))
            .await
            .map_err(|e| DraError::Internal(format!("USB discovery start-up: {e}")))??;
    let mut inventory = Inventory::new(1, config.grace_period);
    inventory.apply(UsbEvent::Snapshot(initial), std::time::Instant::now());
    let state = Arc::new(PluginState::new(inventory, metrics.clone()));

    let client = crate::api_client::connect(crate::api_client::Retries::Client)
        .await
        .map_err(DraError::Api)?;
    let dra_path = dra_socket(&config.kubelet_dir);
    let reg_path = registration_socket(&config.kubelet_dir);
    let own_dir = dra_path.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&own_dir).map_err(|e| DraError::Io(own_dir.clone(), e))?;
    let service = NodeService::new(
        node.clone(),
        state.clone(),
        Box::new(ApiClaims(client.clone())),
        config.cdi_spec_dir.clone(),
        own_dir.join(CHECKPOINT_FILE),
    )?;

    let mut inventory_task = tokio::spawn(state.clone().run(events_rx, shutdown.clone()));
    // onReplug acts on the pods the moved claims are reserved for, as the device plugin does
    // on those the pod-resources API names.
    let (replugs_tx, replugs_rx) = mpsc::unbounded_channel::<Replug>();
    let recovery = Recovery {
        mode: config.on_replug,
        eviction_retry_for: config.eviction_retry_for,
        resource: config.resource_name.clone(),
        pod_resources_socket: config.pod_resources_socket.clone(),
        node_name: Some(node.clone()),
        metrics: metrics.clone(),
        state: state.clone(),
        source: Some(Arc::new(super::replug::ClaimHolders {
            service: service.clone(),
            client: client.clone(),
        })),
    };
    let recovery = tokio::spawn(recovery.run(replugs_rx, shutdown.clone()));
    let replugs = tokio::spawn(follow_replugs(
        service.clone(),
        state.clone(),
        replugs_tx,
        shutdown.clone(),
    ));
    let registered = Arc::new(tokio::sync::Notify::new());
    let publisher = tokio::spawn(super::publish::run(
        client,
        node,
        state.clone(),
        registered.clone(),
        shutdown.clone(),
    ));

    // The node service listens before the registration socket appears, so that the kubelet
    // finds the endpoint it is told about.
    let node_listener = super::registrar::bind(&dra_path)?;
    let node_server = tonic::transport::Server::builder()
        .add_service(
            nitrokey_proto::dra_v1::dra_plugin_server::DraPluginServer::new(service.clone()),
        )
        .add_service(nitrokey_proto::dra_v1beta1::dra_plugin_server::DraPluginServer::new(service))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(node_listener),
            shutdown.clone().cancelled_owned(),
        );
    let registration = Registration {
        endpoint: dra_path.display().to_string(),
        metrics: metrics.clone(),
        registered,
    };
    let reg_server = super::registrar::serve(reg_path.clone(), registration, shutdown.clone());
    metrics.server_started();
    tracing::info!(registration = %reg_path.display(), endpoint = %dra_path.display(),
        "serving the DRA node service");

    let serving = async {
        let (node_result, reg_result) = tokio::join!(node_server, reg_server);
        node_result.map_err(|e| DraError::Serve(dra_path.clone(), e))?;
        reg_result.map_err(DraError::from)
    };
    tokio::pin!(serving);
    let result = tokio::select! {
        served = &mut serving => {
            shutdown.cancel();
            let _ = (&mut inventory_task).await;
            served
        }
        ended = &mut inventory_task => {
            shutdown.cancel();
            let _ = serving.await;
            match ended {
                Ok(Ok(())) => Ok(()),
                Ok(Err(stopped)) => Err(DraError::from(stopped)),
                Err(e) => Err(DraError::Internal(format!("inventory task: {e}"))),
            }
        }
    };
    metrics.server_stopped();
    metrics.set_registered(false);
    // Removing the registration socket unregisters the driver from the kubelet.
    for path in [&reg_path, &dra_path] {
        let _ = std::fs::remove_file(path);
    }
    let _ = publisher.await;
    let _ = replugs.await;
    let _ = recovery.await;
    tokio::task::spawn_blocking(move || drop(discovery))
        .await
        .ok();
    result
}

/// Keeps prepared claims' CDI specs on their sticks' current device nodes, and reports each
/// moved stick (once, however many claims hold it) to the replug recovery.
async fn follow_replugs(
    service: NodeService,
    state: Arc<PluginState>,
    replugs: mpsc::UnboundedSender<Replug>,
    shutdown: CancellationToken,
) {
    let mut units = state.subscribe();
    // At start too: a stick may have moved while the driver was down.
    loop {
        units.borrow_and_update();
        let moved = service.follow_replugs().await;
        let mut sticks = std::collections::BTreeSet::new();
        for (_, before, after) in &moved {
            for replug in super::replug::replugs(before, after) {
                if sticks.insert(replug.stick.clone()) {
                    let _ = replugs.send(replug);
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = units.changed() => if changed.is_err() { break },
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        shutdown.cancel();
    });
    Ok(())
}
