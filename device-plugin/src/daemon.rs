//! Wires the parts together: metrics endpoint, USB discovery, inventory, gRPC server and
//! kubelet registration, and the signals that stop them.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inventory::{Inventory, UsbEvent};
use crate::kubelet::{Supervisor, SupervisorError};
use crate::metrics::Metrics;
use crate::state::PluginState;
use crate::usb::{Discovery, DiscoveryError};
use crate::{http, usb};

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
        "starting NitroKey HSM device plugin"
    );
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
    let state = Arc::new(PluginState::new(inventory, metrics.clone()));
    let inventory_task = tokio::spawn(state.clone().run(events_rx, shutdown.clone()));

    let result = Supervisor::new(config, state, metrics)
        .run(shutdown.clone())
        .await;
    shutdown.cancel();
    let _ = inventory_task.await;
    tokio::task::spawn_blocking(move || drop(discovery))
        .await
        .ok();
    result.map_err(DaemonError::from)
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
