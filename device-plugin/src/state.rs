//! The live device state shared by USB discovery, the gRPC server and the metrics: the
//! [`Inventory`] behind a lock, and a watch channel carrying the current unit list to every
//! `ListAndWatch` stream.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::inventory::{Inventory, Unit, UsbEvent};
use crate::metrics::{EventLabel, Metrics};

/// Inventory plus the channel that publishes its unit list.
#[derive(Debug)]
pub struct PluginState {
    inventory: Mutex<Inventory>,
    units: watch::Sender<Arc<Vec<Unit>>>,
    metrics: Arc<Metrics>,
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
        }
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
        if inventory.apply(event, now) {
            self.publish(&inventory);
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

    /// Applies USB events as they come and expires unplugged sticks on time, until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<UsbEvent>,
        shutdown: CancellationToken,
    ) {
        let mut open = true;
        loop {
            let next_expiry = self.inventory().next_expiry();
            let expiry = async {
                match next_expiry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv(), if open => match event {
                    Some(event) => self.apply(event, Instant::now()),
                    None => open = false,
                },
                () = expiry => self.expire(Instant::now()),
                () = shutdown.cancelled() => return,
            }
        }
    }
}
