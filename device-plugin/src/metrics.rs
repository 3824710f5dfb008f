//! Prometheus metrics and the liveness/readiness flags, shared by every part of the plugin and
//! exposed by [`crate::http`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::inventory::{Health, Inventory};

/// Label set `health="healthy"|"unhealthy"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabel {
    /// Health of the sticks or units counted.
    pub health: HealthValue,
}

/// Label value for [`HealthLabel`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HealthValue {
    /// Plugged in.
    healthy,
    /// Unplugged, within the grace period.
    unhealthy,
}

impl From<Health> for HealthValue {
    fn from(h: Health) -> Self {
        match h {
            Health::Healthy => HealthValue::healthy,
            Health::Unhealthy => HealthValue::unhealthy,
        }
    }
}

/// Label set `result="..."`, the outcome of an operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Outcome.
    pub result: &'static str,
}

/// Label set `event="..."`, a kind of USB event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// Event kind: `arrived`, `left` or `rescan`.
    pub event: &'static str,
}

/// Label set `action="event"|"evict"|"get"|"list"|"connect"`,
/// `result="ok"|"error"|"refused"|"gave_up"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// What was done.
    pub action: &'static str,
    /// How it went.
    pub result: &'static str,
}

/// Every metric the plugin exports, plus the health flags behind `/healthz` and `/readyz`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sticks: Family<HealthLabel, Gauge>,
    units: Family<HealthLabel, Gauge>,
    /// Container allocations answered, by result (`ok`, `unknown`, `unhealthy`, `invalid`).
    pub allocations: Family<ResultLabel, Counter>,
    /// Preferred-allocation answers, by result (`ok`, `error`).
    pub preferred_allocations: Family<ResultLabel, Counter>,
    /// Register calls to the kubelet, by result (`ok`, `unreachable`, `rejected`).
    pub registrations: Family<ResultLabel, Counter>,
    /// Kubelet restarts noticed (a new kubelet.sock after a registration).
    pub kubelet_restarts: Counter,
    /// USB events received from discovery.
    pub usb_events: Family<EventLabel, Counter>,
    /// Open ListAndWatch streams.
    pub list_and_watch_streams: Gauge,
    /// Node label updates (API patch or NFD file), by result (`ok`, `error`).
    pub node_labels: Family<ResultLabel, Counter>,
    /// Sticks that came back at another USB address while known.
    pub replugs: Counter,
    /// What was done about pods holding a replugged stick, by action and result.
    pub replug_actions: Family<ActionLabel, Counter>,
    registered: Gauge,
    servers: AtomicUsize,
    registered_flag: AtomicBool,
    failure: std::sync::Mutex<Option<&'static str>>,
}

impl Metrics {
    /// Registers every metric under the `nitrokey_device_plugin_` prefix.
    pub fn new(resource_name: &str) -> Self {
        let mut registry = Registry::with_prefix("nitrokey_device_plugin");
        let m = Self {
            registry: Registry::default(),
            sticks: Family::default(),
            units: Family::default(),
            allocations: Family::default(),
            preferred_allocations: Family::default(),
            registrations: Family::default(),
            kubelet_restarts: Counter::default(),
            usb_events: Family::default(),
            list_and_watch_streams: Gauge::default(),
            replugs: Counter::default(),
            node_labels: Family::default(),
            replug_actions: Family::default(),
            registered: Gauge::default(),
            servers: AtomicUsize::new(0),
            registered_flag: AtomicBool::new(false),
            failure: std::sync::Mutex::new(None),
        };
        registry.register(
            "build",
            "Version and advertised resource of this device plugin",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("resource", resource_name.to_owned()),
            ]),
        );
        registry.register("sticks", "Known HSM sticks by health", m.sticks.clone());
        registry.register(
            "units",
            "Advertised kubelet units by health",
            m.units.clone(),
        );
        registry.register(
            "allocations",
            "Container allocations answered, by result",
            m.allocations.clone(),
        );
        registry.register(
            "preferred_allocations",
            "Preferred-allocation requests answered, by result",
            m.preferred_allocations.clone(),
        );
        registry.register(
            "registrations",
            "Register calls made to the kubelet, by result",
            m.registrations.clone(),
        );
        registry.register(
            "kubelet_restarts",
            "Kubelet restarts noticed (kubelet.sock re-created)",
            m.kubelet_restarts.clone(),
        );
        registry.register(
            "usb_events",
            "USB events seen, by kind",
            m.usb_events.clone(),
        );
        registry.register(
            "list_and_watch_streams",
            "Open ListAndWatch streams",
            m.list_and_watch_streams.clone(),
        );
        registry.register(
            "node_label_updates",
            "Node label updates (API or NFD feature file), by result",
            m.node_labels.clone(),
        );
        registry.register(
            "replugs",
            "Sticks that came back at another USB address",
            m.replugs.clone(),
        );
        registry.register(
            "replug_actions",
            "Events and evictions for pods holding a replugged stick, by result",
            m.replug_actions.clone(),
        );
        registry.register(
            "registered",
            "1 while registered with the kubelet, else 0",
            m.registered.clone(),
        );
        for h in [HealthValue::healthy, HealthValue::unhealthy] {
            m.sticks.get_or_create(&HealthLabel { health: h }).set(0);
            m.units.get_or_create(&HealthLabel { health: h }).set(0);
        }
        Self { registry, ..m }
    }

    /// Refreshes the stick and unit gauges from the inventory.
    pub fn observe_inventory(&self, inventory: &Inventory) {
        let (healthy, unhealthy) = inventory.stick_counts();
        let shares = i64::from(inventory.shares());
        for (h, n) in [
            (HealthValue::healthy, healthy),
            (HealthValue::unhealthy, unhealthy),
        ] {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.sticks.get_or_create(&HealthLabel { health: h }).set(n);
            self.units
                .get_or_create(&HealthLabel { health: h })
                .set(n * shares);
        }
    }

    /// Counts one outcome in a result-labelled counter family.
    pub fn count(family: &Family<ResultLabel, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabel { result }).inc();
    }

    /// Notes that a gRPC server generation started serving (`/healthz`).
    pub fn server_started(&self) {
        self.servers.fetch_add(1, Ordering::SeqCst);
    }

    /// Notes that a gRPC server generation stopped.
    pub fn server_stopped(&self) {
        self.servers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a gRPC server is serving.
    pub fn serving(&self) -> bool {
        self.servers.load(Ordering::SeqCst) > 0
    }

    /// Records a failure that makes the plugin unhealthy for good (`/healthz` answers 503 with
    /// it until the process ends).
    pub fn set_failed(&self, reason: &'static str) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// The failure recorded with [`set_failed`](Self::set_failed), if any.
    pub fn failure(&self) -> Option<&'static str> {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serving and no failure recorded: what `/healthz` reports.
    pub fn healthy(&self) -> bool {
        self.serving() && self.failure().is_none()
    }

    /// Marks whether the plugin is registered with the current kubelet (`/readyz`).
    pub fn set_registered(&self, registered: bool) {
        self.registered_flag.store(registered, Ordering::SeqCst);
        self.registered.set(i64::from(registered));
    }

    /// Whether the plugin is registered with the current kubelet.
    pub fn registered(&self) -> bool {
        self.registered_flag.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{StickInfo, UsbEvent};
    use std::time::{Duration, Instant};

    #[test]
    fn exposition() {
        let m = Metrics::new("nitrokey.com/hsm");
        let mut inv = Inventory::new(2, Duration::from_secs(60));
        inv.apply(
            UsbEvent::Arrived(StickInfo {
                vendor: 0x20a0,
                product: 0x4230,
                serial: Some("A".into()),
                bus: 1,
                address: 2,
                port_path: "1-1".into(),
            }),
            Instant::now(),
        );
        m.observe_inventory(&inv);
        Metrics::count(&m.allocations, "ok");
        m.kubelet_restarts.inc();
        m.set_registered(true);
        let text = m.encode();
        for line in [
            "nitrokey_device_plugin_sticks{health=\"healthy\"} 1",
            "nitrokey_device_plugin_sticks{health=\"unhealthy\"} 0",
            "nitrokey_device_plugin_units{health=\"healthy\"} 2",
            "nitrokey_device_plugin_allocations_total{result=\"ok\"} 1",
            "nitrokey_device_plugin_kubelet_restarts_total 1",
            "nitrokey_device_plugin_registered 1",
            "nitrokey_device_plugin_build_info{version=",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
