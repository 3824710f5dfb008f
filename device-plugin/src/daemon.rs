//! Wires the parts together: metrics endpoint, USB discovery, inventory, gRPC server and
//! kubelet registration, and the signals that stop them.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inventory::{Inventory, UsbEvent};
use crate::kubelet::{Supervisor, SupervisorError};
use crate::metrics::Metrics;
use crate::recovery::Recovery;
use crate::state::{DiscoveryStopped, PluginState};
use crate::usb::{Discovery, DiscoveryError};
use crate::{cdi, http, labels, usb};

/// What stops the plugin with a failure.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// USB discovery could not start.
    #[error(transparent)]
    Usb(#[from] DiscoveryError),
    /// Serving or registration failed for good.
    #[error(transparent)]
    Kubelet(#[from] SupervisorError),
    /// The HTTP endpoint could not bind.
    #[error("cannot serve metrics on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
    /// The device-plugin directory could not be created.
    #[error("cannot create the device-plugin directory {0}: {1}")]
    PluginDir(std::path::PathBuf, std::io::Error),
    /// USB discovery ended while running.
    #[error(transparent)]
    DiscoveryStopped(#[from] DiscoveryStopped),
    /// A bug: a task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the device plugin until SIGTERM/SIGINT (`Ok`) or a fatal error.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        resource = %config.resource_name,
        devices = %config.devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        shares = config.shares_per_device,
        grace_period = ?config.grace_period,
        plugin_dir = %config.plugin_dir.display(),
        on_replug = ?config.on_replug,
        "starting NitroKey HSM device plugin"
    );
    for note in usb::blind_spots(|p| p.exists()) {
        tracing::warn!("{note}");
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone()).map_err(DaemonError::Signals)?;

    let metrics = Arc::new(Metrics::new(&config.resource_name));
    let bound = http::start(config.metrics_address, metrics.clone(), shutdown.clone())
        .await
        .map_err(|e| DaemonError::Metrics(config.metrics_address, e))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");

    std::fs::create_dir_all(&config.plugin_dir)
        .map_err(|e| DaemonError::PluginDir(config.plugin_dir.clone(), e))?;

    let (events_tx, events_rx) = mpsc::unbounded_channel::<UsbEvent>();
    let (matchers, mode, interval) = (
        config.devices.clone(),
        config.discovery,
        config.rescan_interval,
    );
    let (discovery, initial) =
        tokio::task::spawn_blocking(move || Discovery::start(matchers, mode, interval, events_tx))
            .await
            .map_err(|e| DaemonError::Internal(format!("USB discovery start-up: {e}")))??;
    tracing::debug!(mode = ?discovery.mode(), "USB discovery running");

    let mut inventory = Inventory::new(config.shares_per_device, config.grace_period);
    inventory.apply(UsbEvent::Snapshot(initial), std::time::Instant::now());
    for stick in inventory.sticks() {
        tracing::info!(id = %stick.id, serial = ?stick.info.serial, path = %stick.info.dev_path(),
            sysfs = %usb::sysfs_dir(&stick.info.port_path).display(), "found stick");
    }
    let (replugs_tx, replugs_rx) = mpsc::unbounded_channel();
    let mut state = PluginState::new(inventory, metrics.clone()).with_replugs(replugs_tx);
    if config.cdi {
        state = state.with_cdi(config.resource_name.clone());
    }
    let state = Arc::new(state);
    let cdi = config.cdi.then(|| {
        tokio::spawn(cdi::run(
            config.resource_name.clone(),
            config.cdi_spec_dir.clone(),
            state.clone(),
            shutdown.clone(),
        ))
    });
    let recovery = Recovery {
        mode: config.on_replug,
        eviction_retry_for: config.eviction_retry_for,
        resource: config.resource_name.clone(),
        pod_resources_socket: config.pod_resources_socket.clone(),
        node_name: config.node_name.clone(),
        metrics: metrics.clone(),
        state: state.clone(),
        source: None,
    };
    let recovery = tokio::spawn(recovery.run(replugs_rx, shutdown.clone()));
    let publisher = labels::Publisher {
        mode: config.node_labels,
        node_name: config.node_name.clone(),
        nfd_dir: config.nfd_features_dir.clone(),
        metrics: metrics.clone(),
    };
    let labels = tokio::spawn(labels::run(publisher, state.clone(), shutdown.clone()));
    let trim = tokio::spawn(crate::server::trim_task());
    let mut inventory_task = tokio::spawn(state.clone().run(events_rx, shutdown.clone()));

    let supervisor = Supervisor::new(config, state, metrics).run(shutdown.clone());
    tokio::pin!(supervisor);
    // Whichever ends first ends the other: a supervisor that stops (signal or failure) stops
    // the inventory, and an inventory that stops (discovery gone) stops serving.
    let result = tokio::select! {
        result = &mut supervisor => {
            shutdown.cancel();
            let _ = inventory_task.await;
            result.map_err(DaemonError::from)
        }
        ended = &mut inventory_task => {
            let error = match ended {
                Ok(Ok(())) => None,
                Ok(Err(stopped)) => Some(DaemonError::from(stopped)),
                Err(e) => Some(DaemonError::Internal(format!("inventory task: {e}"))),
            };
            if let Some(e) = &error {
                tracing::error!(error = %e, "stopping");
            }
            shutdown.cancel();
            let served = supervisor.await.map_err(DaemonError::from);
            match error {
                Some(e) => Err(e),
                None => served,
            }
        }
    };
    trim.abort();
    let _ = recovery.await;
    let _ = labels.await;
    if let Some(cdi) = cdi {
        let _ = cdi.await;
    }
    tokio::task::spawn_blocking(move || drop(discovery))
        .await
        .ok();
    result
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
