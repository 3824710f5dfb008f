//! The live device state shared by USB discovery, the gRPC server and the metrics: the
//! [`Inventory`] behind a lock, and a watch channel carrying the current unit list to every
//! `ListAndWatch` stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::inventory::{Inventory, Unit, UsbEvent};
use crate::metrics::{EventLabel, Metrics};
use crate::replug::Replug;

/// USB discovery ended while the plugin was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("USB discovery stopped: plugged and unplugged sticks would no longer be noticed")]
pub struct DiscoveryStopped;

/// Inventory plus the channel that publishes its unit list.
#[derive(Debug)]
pub struct PluginState {
    inventory: Mutex<Inventory>,
    units: watch::Sender<Arc<Vec<Unit>>>,
    metrics: Arc<Metrics>,
    /// Where sticks that came back at another address are reported.
    replugs: Option<mpsc::UnboundedSender<Replug>>,
    /// When each stick was last handed out by `Allocate`.
    allocated: Mutex<HashMap<String, Instant>>,
    /// The CDI kind (the resource name) when `Allocate` names CDI devices.
    cdi_kind: Option<String>,
}

impl PluginState {
    /// Wraps an inventory (possibly already holding the sticks found at start-up).
    pub fn new(inventory: Inventory, metrics: Arc<Metrics>) -> Self {
        metrics.observe_inventory(&inventory);
        let (units, _) = watch::channel(Arc::new(inventory.units()));
        Self {
            inventory: Mutex::new(inventory),
            units,
            metrics,
            replugs: None,
            allocated: Mutex::new(HashMap::new()),
            cdi_kind: None,
        }
    }

    /// Makes `Allocate` name each stick as CDI device `<kind>=<stick>` too.
    pub fn with_cdi(mut self, kind: String) -> Self {
        self.cdi_kind = Some(kind);
        self
    }

    /// The CDI kind, when `Allocate` names CDI devices.
    pub fn cdi_kind(&self) -> Option<&str> {
        self.cdi_kind.as_deref()
    }

    /// Reports every stick that comes back at another USB address to `replugs`.
    pub fn with_replugs(mut self, replugs: mpsc::UnboundedSender<Replug>) -> Self {
        self.replugs = Some(replugs);
        self
    }

    /// Notes that these sticks were just handed out by `Allocate`.
    pub fn note_allocated<'a>(&self, sticks: impl IntoIterator<Item = &'a str>, now: Instant) {
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        for stick in sticks {
            allocated.insert(stick.to_owned(), now);
        }
    }

    /// Whether `stick` was handed out by `Allocate` after `since`.
    pub fn allocated_since(&self, stick: &str, since: Instant) -> bool {
        self.allocated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(stick)
            .is_some_and(|at| *at > since)
    }

    /// Locks the inventory for reading (allocation decisions).
    pub fn inventory(&self) -> MutexGuard<'_, Inventory> {
        // A panic while holding the lock cannot leave the inventory half-updated in a way that
        // matters more than stopping would, so keep serving with it.
        self.inventory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current unit list and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<Unit>>> {
        self.units.subscribe()
    }

    /// The current unit list.
    pub fn units(&self) -> Arc<Vec<Unit>> {
        self.units.borrow().clone()
    }

    /// Applies a USB event and publishes the new list if it changed.
    pub fn apply(&self, event: UsbEvent, now: Instant) {
        let kind = match &event {
            UsbEvent::Arrived(_) => "arrived",
            UsbEvent::Left { .. } => "left",
            UsbEvent::Snapshot(_) => "rescan",
        };
        self.metrics
            .usb_events
            .get_or_create(&EventLabel { event: kind })
            .inc();
        let mut inventory = self.inventory();
        let before: HashMap<String, String> = inventory
            .sticks()
            .map(|s| (s.id.clone(), s.info.dev_path()))
            .collect();
        if inventory.apply(event, now) {
            self.publish(&inventory);
            let Some(replugs) = &self.replugs else {
                return;
            };
            for stick in inventory.sticks().filter(|s| s.unplugged_at.is_none()) {
                let new_path = stick.info.dev_path();
                if let Some(old_path) = before.get(&stick.id).filter(|old| **old != new_path) {
                    self.metrics.replugs.inc();
                    let _ = replugs.send(Replug {
                        stick: stick.id.clone(),
                        serial: stick.serial_or_id().to_owned(),
                        old_path: old_path.clone(),
                        new_path,
                    });
                }
            }
        }
    }

    /// Drops sticks whose grace period ended and publishes the new list if it changed.
    pub fn expire(&self, now: Instant) {
        let mut inventory = self.inventory();
        if inventory.expire(now) {
            self.publish(&inventory);
        }
    }

    fn publish(&self, inventory: &Inventory) {
        self.metrics.observe_inventory(inventory);
        let units = inventory.units();
        let summary: Vec<String> = inventory
            .sticks()
            .map(|s| format!("{}={:?}@{}", s.id, s.health(), s.info.dev_path()))
            .collect();
        tracing::info!(units = units.len(), sticks = ?summary, "device list changed");
        self.units.send_replace(Arc::new(units));
    }

    /// Applies USB events as they come and expires unplugged sticks on time, until `shutdown`
    /// (`Ok`). If discovery stops sending (its thread ended), the inventory would go stale
    /// while looking healthy, so that ends this with an error and marks `/healthz` failing.
    pub async fn run(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<UsbEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), DiscoveryStopped> {
        loop {
            let next_expiry = self.inventory().next_expiry();
            let expiry = async {
                match next_expiry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                event = events.recv() => match event {
                    Some(event) => self.apply(event, Instant::now()),
                    None => {
                        self.metrics.set_failed("USB discovery stopped");
                        return Err(DiscoveryStopped);
                    }
                },
                () = expiry => self.expire(Instant::now()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn discovery_ending_is_an_error_and_fails_health() {
        let metrics = Arc::new(Metrics::new("nitrokey.com/hsm"));
        metrics.server_started();
        let state = Arc::new(PluginState::new(
            Inventory::new(2, Duration::from_secs(1)),
            metrics.clone(),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(state.run(rx, CancellationToken::new()));
        assert!(metrics.serving());
        drop(tx);
        let result = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run ends when discovery stops")
            .expect("no panic");
        assert_eq!(result, Err(DiscoveryStopped));
        assert!(!metrics.healthy());
        assert_eq!(metrics.failure(), Some("USB discovery stopped"));
    }

    #[tokio::test]
    async fn shutdown_is_not_an_error() {
        let metrics = Arc::new(Metrics::new("nitrokey.com/hsm"));
        let state = Arc::new(PluginState::new(
            Inventory::new(2, Duration::from_secs(1)),
            metrics.clone(),
        ));
        let (_tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(state.run(rx, shutdown).await, Ok(()));
        assert!(metrics.failure().is_none());
    }
}
