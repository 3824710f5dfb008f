//! The device inventory: which sticks the plugin knows, where they are, whether they are
//! plugged in, and the kubelet units derived from them.
//!
//! Pure state with no I/O and no clock of its own: USB discovery feeds it [`UsbEvent`]s, the
//! caller passes the current [`Instant`], and every mutation reports whether the list the
//! kubelet sees changed, so that the caller publishes a new `ListAndWatch` message only then.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nitrokey_proto::MAX_DEVICE_ID_LEN;

/// A matching USB device as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickInfo {
    /// USB vendor ID.
    pub vendor: u16,
    /// USB product ID.
    pub product: u16,
    /// USB serial number, when readable.
    pub serial: Option<String>,
    /// USB bus number.
    pub bus: u8,
    /// Device address on the bus (the `DDD` of `/dev/bus/usb/BBB/DDD`).
    pub address: u8,
    /// Kernel name of the port the stick is plugged into, e.g. `1-1.4` (bus 1, ports 1 then 4).
    pub port_path: String,
}

impl StickInfo {
    /// The stick's usbfs device node.
    pub fn dev_path(&self) -> String {
        format!("/dev/bus/usb/{:03}/{:03}", self.bus, self.address)
    }
}

/// A change seen on the USB side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbEvent {
    /// A matching stick appeared (hotplug arrival, or found at start-up).
    Arrived(StickInfo),
    /// The device at this bus and address went away.
    Left {
        /// USB bus number.
        bus: u8,
        /// Device address on the bus.
        address: u8,
    },
    /// A full rescan: exactly these matching sticks are plugged in now.
    Snapshot(Vec<StickInfo>),
}

/// Kubelet health of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// Plugged in: may be allocated.
    Healthy,
    /// Unplugged, within the grace period.
    Unhealthy,
}

impl Health {
    /// The kubelet API's health string.
    pub fn as_api_str(self) -> &'static str {
        match self {
            Health::Healthy => nitrokey_proto::HEALTHY,
            Health::Unhealthy => nitrokey_proto::UNHEALTHY,
        }
    }
}

/// One kubelet device: a share of a stick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Kubelet device ID, `<stick id>-<n>`.
    pub id: String,
    /// Its health.
    pub health: Health,
}

/// A stick the inventory knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stick {
    /// Stable ID, derived from the serial number (or, failing that, the port).
    pub id: String,
    /// What discovery last reported about it (the location is the last one seen).
    pub info: StickInfo,
    /// `None` while plugged in; when it was unplugged otherwise.
    pub unplugged_at: Option<Instant>,
}

impl Stick {
    /// Its units' health.
    pub fn health(&self) -> Health {
        if self.unplugged_at.is_none() {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }

    /// The serial number if known, else the stick ID.
    pub fn serial_or_id(&self) -> &str {
        self.info.serial.as_deref().unwrap_or(&self.id)
    }
}

/// An ID as it may appear in an error or a log line: IDs come from outside (the kubelet, or
/// anyone able to reach the socket), so at most a kubelet ID's length of it is echoed.
pub fn shown_id(id: &str) -> String {
    crate::text::shorten(id, MAX_DEVICE_ID_LEN)
}

/// Why a unit ID cannot be handed out (the ID is shortened with [`shown_id`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No such unit.
    #[error("unknown device ID {0:?}")]
    Unknown(String),
    /// The unit's stick is unplugged.
    #[error("device {0:?} is unhealthy: its stick is unplugged")]
    Unhealthy(String),
}

/// All known sticks and the rules that turn them into units.
#[derive(Debug, Clone)]
pub struct Inventory {
    shares: u32,
    grace: Duration,
    sticks: BTreeMap<String, Stick>,
}

impl Inventory {
    /// An empty inventory advertising `shares` units per stick and keeping unplugged sticks
    /// for `grace`.
    pub fn new(shares: u32, grace: Duration) -> Self {
        assert!(shares >= 1, "at least one share per stick");
        Self {
            shares,
            grace,
            sticks: BTreeMap::new(),
        }
    }

    /// Units per stick.
    pub fn shares(&self) -> u32 {
        self.shares
    }

    /// Known sticks, ordered by ID.
    pub fn sticks(&self) -> impl Iterator<Item = &Stick> {
        self.sticks.values()
    }

    /// The stick with this ID.
    pub fn stick(&self, id: &str) -> Option<&Stick> {
        self.sticks.get(id)
    }

    /// Applies a USB event; `true` when the unit list changed.
    pub fn apply(&mut self, event: UsbEvent, now: Instant) -> bool {
        match event {
            UsbEvent::Arrived(info) => self.arrived(info, now),
            UsbEvent::Left { bus, address } => self.left(bus, address, now),
            UsbEvent::Snapshot(infos) => self.snapshot(infos, now),
        }
    }

    fn arrived(&mut self, info: StickInfo, now: Instant) -> bool {
        let mut id = stick_id(&info, self.shares);
        // Two plugged-in sticks must not share an ID (e.g. identical or missing serials):
        // the later one is named after its port instead.
        if let Some(other) = self.sticks.get(&id)
            && other.unplugged_at.is_none()
            && !same_location(&other.info, &info)
        {
            id = port_id(&info.port_path, self.shares);
        }
        // A device at the same bus address under another ID was evidently replaced.
        let stale: Vec<String> = self
            .sticks
            .values()
            .filter(|s| s.id != id && s.unplugged_at.is_none() && same_location(&s.info, &info))
            .map(|s| s.id.clone())
            .collect();
        let mut changed = false;
        for old in stale {
            changed |= self.mark_unplugged(&old, now);
        }
        match self.sticks.get_mut(&id) {
            Some(stick) if stick.unplugged_at.is_none() && stick.info == info => changed,
            Some(stick) => {
                stick.info = info;
                stick.unplugged_at = None;
                true
            }
            None => {
                self.sticks.insert(
                    id.clone(),
                    Stick {
                        id,
                        info,
                        unplugged_at: None,
                    },
                );
                true
            }
        }
    }

    fn left(&mut self, bus: u8, address: u8, now: Instant) -> bool {
        let ids: Vec<String> = self
            .sticks
            .values()
            .filter(|s| s.unplugged_at.is_none() && s.info.bus == bus && s.info.address == address)
            .map(|s| s.id.clone())
            .collect();
        let mut changed = false;
        for id in ids {
            changed |= self.mark_unplugged(&id, now);
        }
        changed
    }

    fn snapshot(&mut self, infos: Vec<StickInfo>, now: Instant) -> bool {
        let mut changed = false;
        let present: Vec<(u8, u8)> = infos.iter().map(|i| (i.bus, i.address)).collect();
        let gone: Vec<(u8, u8)> = self
            .sticks
            .values()
            .filter(|s| s.unplugged_at.is_none())
            .map(|s| (s.info.bus, s.info.address))
            .filter(|loc| !present.contains(loc))
            .collect();
        for (bus, address) in gone {
            changed |= self.left(bus, address, now);
        }
        for info in infos {
            changed |= self.arrived(info, now);
        }
        changed
    }

    fn mark_unplugged(&mut self, id: &str, now: Instant) -> bool {
        match self.sticks.get_mut(id) {
            Some(stick) if stick.unplugged_at.is_none() => {
                stick.unplugged_at = Some(now);
                if self.grace.is_zero() {
                    self.sticks.remove(id);
                }
                true
            }
            _ => false,
        }
    }

    /// Drops sticks unplugged for longer than the grace period; `true` when any was dropped.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.sticks.len();
        let grace = self.grace;
        self.sticks.retain(|_, s| {
            s.unplugged_at
                .is_none_or(|at| now.duration_since(at) < grace)
        });
        self.sticks.len() != before
    }

    /// When the next unplugged stick's grace period ends, if any is pending.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.sticks
            .values()
            .filter_map(|s| s.unplugged_at)
            .min()
            // A deadline past the clock's range never comes (configuration bounds the grace
            // period far below that; this keeps the inventory total on its own).
            .and_then(|at| at.checked_add(self.grace))
    }

    /// The units the kubelet is told about, ordered by stick ID then share number.
    pub fn units(&self) -> Vec<Unit> {
        self.sticks
            .values()
            .flat_map(|s| {
                (0..self.shares).map(move |n| Unit {
                    id: format!("{}-{n}", s.id),
                    health: s.health(),
                })
            })
            .collect()
    }

    /// The stick a unit ID belongs to, whatever its health.
    pub fn stick_of_unit(&self, unit: &str) -> Option<&Stick> {
        let (stick, n) = unit.rsplit_once('-')?;
        let n: u32 = n.parse().ok()?;
        if n >= self.shares || unit != format!("{stick}-{n}") {
            return None;
        }
        self.sticks.get(stick)
    }

    /// The sticks behind these unit IDs, in first-mention order without repeats; fails on the
    /// first unknown or unhealthy unit.
    pub fn resolve(&self, units: &[String]) -> Result<Vec<&Stick>, LookupError> {
        let mut sticks: Vec<&Stick> = Vec::new();
        for unit in units {
            let stick = self
                .stick_of_unit(unit)
                .ok_or_else(|| LookupError::Unknown(shown_id(unit)))?;
            if stick.health() != Health::Healthy {
                return Err(LookupError::Unhealthy(shown_id(unit)));
            }
            if !sticks.iter().any(|s| s.id == stick.id) {
                sticks.push(stick);
            }
        }
        Ok(sticks)
    }

    /// Counts of sticks by health.
    pub fn stick_counts(&self) -> (usize, usize) {
        let healthy = self
            .sticks
            .values()
            .filter(|s| s.unplugged_at.is_none())
            .count();
        (healthy, self.sticks.len() - healthy)
    }
}

fn same_location(a: &StickInfo, b: &StickInfo) -> bool {
    a.bus == b.bus && a.address == b.address
}

/// The longest stick ID whose unit IDs `<id>-<shares-1>` still fit the kubelet's limit.
fn max_stick_id_len(shares: u32) -> usize {
    let suffix = 1 + (shares.max(1) - 1).to_string().len();
    MAX_DEVICE_ID_LEN - suffix
}

/// The stable ID of a stick: its serial number when it has one, else its port.
pub fn stick_id(info: &StickInfo, shares: u32) -> String {
    match info
        .serial
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(serial) => fit(&sanitize(serial), max_stick_id_len(shares)),
        None => port_id(&info.port_path, shares),
    }
}

/// The ID of a stick without a readable serial number: `usb-<port path>`.
pub fn port_id(port_path: &str, shares: u32) -> String {
    fit(
        &format!("usb-{}", sanitize(port_path)),
        max_stick_id_len(shares),
    )
}

/// Keeps the characters that are safe in device IDs, file names and env values.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Shortens `s` to `max` characters, keeping it unique with a hash of the whole.
fn fit(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let hash = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let tag = format!("~{:08x}", hash as u32);
    format!("{}{tag}", &s[..max - tag.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(serial: Option<&str>, bus: u8, address: u8, port: &str) -> StickInfo {
        StickInfo {
            vendor: 0x20a0,
            product: 0x4230,
            serial: serial.map(str::to_owned),
            bus,
            address,
            port_path: port.into(),
        }
    }

    fn ids(inv: &Inventory) -> Vec<(String, Health)> {
        inv.units().into_iter().map(|u| (u.id, u.health)).collect()
    }

    #[test]
    fn two_units_per_stick() {
        let mut inv = Inventory::new(2, Duration::from_secs(60));
        let now = Instant::now();
        assert!(inv.apply(UsbEvent::Arrived(info(Some("DENK1"), 1, 2, "1-1")), now));
        assert_eq!(
            ids(&inv),
            vec![
                ("DENK1-0".into(), Health::Healthy),
                ("DENK1-1".into(), Health::Healthy)
            ]
        );
        // The same report again changes nothing.
        assert!(!inv.apply(UsbEvent::Arrived(info(Some("DENK1"), 1, 2, "1-1")), now));
    }

    #[test]
    fn unplug_grace_and_replug() {
        let grace = Duration::from_secs(60);
        let mut inv = Inventory::new(2, grace);
        let t0 = Instant::now();
        inv.apply(UsbEvent::Arrived(info(Some("DENK1"), 1, 2, "1-1")), t0);
        inv.apply(UsbEvent::Arrived(info(Some("DENK2"), 1, 3, "1-2")), t0);
        assert!(inv.apply(UsbEvent::Left { bus: 1, address: 2 }, t0));
        assert!(
            !inv.apply(UsbEvent::Left { bus: 1, address: 2 }, t0),
            "already gone"
        );
        assert_eq!(inv.stick("DENK1").unwrap().health(), Health::Unhealthy);
        assert_eq!(
            inv.units()
                .iter()
                .filter(|u| u.health == Health::Unhealthy)
                .count(),
            2
        );
        assert_eq!(inv.next_expiry(), Some(t0 + grace));
        assert!(!inv.expire(t0 + grace / 2));

        // Replugged elsewhere: same ID, new path, healthy again.
        assert!(inv.apply(
            UsbEvent::Arrived(info(Some("DENK1"), 2, 7, "2-4")),
            t0 + grace / 2
        ));
        let stick = inv.stick("DENK1").unwrap();
        assert_eq!(stick.health(), Health::Healthy);
        assert_eq!(stick.info.dev_path(), "/dev/bus/usb/002/007");
        assert_eq!(inv.next_expiry(), None);

        // Unplugged for good: dropped after the grace period.
        let t1 = t0 + grace;
        inv.apply(UsbEvent::Left { bus: 2, address: 7 }, t1);
        assert!(!inv.expire(t1 + grace - Duration::from_millis(1)));
        assert!(inv.expire(t1 + grace));
        assert!(inv.stick("DENK1").is_none());
        assert_eq!(inv.units().len(), 2, "DENK2 stays");
    }

    #[test]
    fn zero_grace_drops_at_once() {
        let mut inv = Inventory::new(2, Duration::ZERO);
        let now = Instant::now();
        inv.apply(UsbEvent::Arrived(info(Some("A"), 1, 2, "1-1")), now);
        assert!(inv.apply(UsbEvent::Left { bus: 1, address: 2 }, now));
        assert!(inv.units().is_empty());
    }

    #[test]
    fn snapshot_reconciles() {
        let mut inv = Inventory::new(1, Duration::from_secs(60));
        let now = Instant::now();
        inv.apply(
            UsbEvent::Snapshot(vec![
                info(Some("A"), 1, 2, "1-1"),
                info(Some("B"), 1, 3, "1-2"),
            ]),
            now,
        );
        assert_eq!(inv.units().len(), 2);
        assert!(!inv.apply(
            UsbEvent::Snapshot(vec![
                info(Some("A"), 1, 2, "1-1"),
                info(Some("B"), 1, 3, "1-2")
            ]),
            now
        ));
        assert!(inv.apply(UsbEvent::Snapshot(vec![info(Some("B"), 1, 3, "1-2")]), now));
        assert_eq!(inv.stick("A").unwrap().health(), Health::Unhealthy);
        assert!(inv.apply(
            UsbEvent::Snapshot(vec![
                info(Some("A"), 1, 9, "1-1"),
                info(Some("B"), 1, 3, "1-2")
            ]),
            now
        ));
        assert_eq!(inv.stick("A").unwrap().health(), Health::Healthy);
        assert_eq!(inv.stick("A").unwrap().info.address, 9);
    }

    #[test]
    fn ids_without_serial_or_with_duplicates() {
        let mut inv = Inventory::new(2, Duration::from_secs(60));
        let now = Instant::now();
        inv.apply(UsbEvent::Arrived(info(None, 1, 2, "1-1.4")), now);
        assert!(inv.stick("usb-1-1.4").is_some());
        inv.apply(UsbEvent::Arrived(info(Some("SAME"), 1, 3, "1-2")), now);
        inv.apply(UsbEvent::Arrived(info(Some("SAME"), 1, 4, "1-3")), now);
        assert!(inv.stick("SAME").is_some());
        assert!(inv.stick("usb-1-3").is_some());
        assert_eq!(inv.units().len(), 6);
    }

    #[test]
    fn ids_fit_the_kubelet_limit() {
        let long = "X".repeat(100);
        for shares in [1, 2, 10, 11, 1000] {
            let id = stick_id(&info(Some(&long), 1, 2, "1-1"), shares);
            let unit = format!("{id}-{}", shares - 1);
            assert!(unit.len() <= MAX_DEVICE_ID_LEN, "{unit}");
        }
        let other = stick_id(&info(Some(&format!("{long}Y")), 1, 2, "1-1"), 2);
        assert_ne!(stick_id(&info(Some(&long), 1, 2, "1-1"), 2), other);
        assert_eq!(stick_id(&info(Some(" a/b c "), 1, 2, "1-1"), 2), "a_b_c");
    }

    #[test]
    fn resolve_units() {
        let mut inv = Inventory::new(2, Duration::from_secs(60));
        let now = Instant::now();
        inv.apply(UsbEvent::Arrived(info(Some("A-1"), 1, 2, "1-1")), now);
        inv.apply(UsbEvent::Arrived(info(Some("B"), 1, 3, "1-2")), now);
        let sticks = inv
            .resolve(&["A-1-1".into(), "A-1-0".into(), "B-0".into()])
            .unwrap();
        assert_eq!(
            sticks.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["A-1", "B"]
        );
        assert_eq!(
            inv.resolve(&["A-1-2".into()]),
            Err(LookupError::Unknown("A-1-2".into()))
        );
        assert_eq!(
            inv.resolve(&["A-1-01".into()]),
            Err(LookupError::Unknown("A-1-01".into()))
        );
        assert_eq!(
            inv.resolve(&["C-0".into()]),
            Err(LookupError::Unknown("C-0".into()))
        );
        let huge = "x".repeat(1 << 20);
        let err = inv.resolve(&[huge]).unwrap_err().to_string();
        assert!(
            err.len() < 200,
            "error echoes a 1 MiB ID: {} bytes",
            err.len()
        );
        assert!(err.contains("1048576 bytes"), "{err}");
        inv.apply(UsbEvent::Left { bus: 1, address: 3 }, now);
        assert_eq!(
            inv.resolve(&["B-1".into()]),
            Err(LookupError::Unhealthy("B-1".into()))
        );
        assert_eq!(inv.stick_counts(), (1, 1));
    }
}
