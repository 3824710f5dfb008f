//! USB discovery with libusb (rusb): finds the sticks matching the configured vendor/product
//! (and serial) list and reports arrivals and departures as [`UsbEvent`]s.
//!
//! # Modes
//!
//! - **Hotplug** (preferred): one [`rusb::Context`] owned by this module, hotplug callbacks
//!   registered per vendor/product pair, and a thread that runs libusb's event loop. An add or
//!   remove reaches the inventory within milliseconds.
//! - **Rescan** (fallback): where udev events cannot reach the process (a container without
//!   `/run/udev` and with a private `/dev`), libusb's device list never changes after its
//!   start, so every rescan enumerates through a *fresh* context.
//!
//! # Identity
//!
//! A stick's serial number is read from sysfs (`/sys/bus/usb/devices/<port>/serial`), which
//! needs no access to the device itself; only if that fails is the serial string descriptor
//! read through libusb, which needs the device node. The port path (`1-1.4`) is the fallback
//! identity.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusb::{Context, Device, Hotplug, HotplugBuilder, UsbContext};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{DeviceMatcher, DiscoveryMode};
use crate::inventory::{StickInfo, UsbEvent};

/// Root of the USB devices in sysfs.
const SYSFS_USB_DEVICES: &str = "/sys/bus/usb/devices";

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// libusb itself failed to initialise.
    #[error(
        "libusb could not start ({0}): the device plugin needs the host's USB view; run it on \
         the node with /sys mounted (and /dev/bus/usb and /run/udev for device access and hotplug)"
    )]
    Init(rusb::Error),
    /// Hotplug was requested but libusb refused the callback.
    #[error("libusb hotplug registration failed: {0}")]
    Hotplug(rusb::Error),
    /// The discovery thread could not be started.
    #[error("cannot start the USB thread: {0}")]
    Thread(std::io::Error),
}

/// The mode discovery actually runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveMode {
    /// libusb hotplug callbacks.
    Hotplug,
    /// Periodic rescan at this interval.
    Rescan(Duration),
}

/// Running USB discovery; stops its thread when dropped.
pub struct Discovery {
    mode: ActiveMode,
    stop: Arc<AtomicBool>,
    context: Option<Context>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Starts discovery. Returns the sticks plugged in now (to seed the inventory before
    /// anything is served); later changes are sent to `events`.
    pub fn start(
        matchers: Vec<DeviceMatcher>,
        mode: DiscoveryMode,
        rescan_interval: Duration,
        events: UnboundedSender<UsbEvent>,
    ) -> Result<(Self, Vec<StickInfo>), DiscoveryError> {
        // Our own context, never rusb's global one (whose failure to start is a panic). It
        // also proves libusb can start at all, whatever the mode.
        let context = Context::new().map_err(DiscoveryError::Init)?;
        let use_hotplug = match mode {
            DiscoveryMode::Hotplug => true,
            DiscoveryMode::Rescan => false,
            DiscoveryMode::Auto => {
                // SAFETY: libusb is initialised (the context above); this only reads a flag.
                // (rusb::has_hotplug would initialise rusb's global context instead.)
                let capable = unsafe {
                    rusb::ffi::libusb_has_capability(rusb::constants::LIBUSB_CAP_HAS_HOTPLUG) != 0
                };
                let reachable = udev_events_reachable();
                if !capable {
                    tracing::warn!(interval = ?rescan_interval,
                        "this libusb has no hotplug support; falling back to a periodic rescan");
                } else if !reachable {
                    tracing::warn!(interval = ?rescan_interval,
                        "udev events cannot reach this process (no /run/udev/control and /dev is \
                         not devtmpfs: mount /run/udev and use the host network to get them); \
                         falling back to a periodic rescan");
                }
                capable && reachable
            }
        };
        let matchers = Arc::new(matchers);
        let stop = Arc::new(AtomicBool::new(false));
        if use_hotplug {
            Self::start_hotplug(context, matchers, stop, events)
        } else {
            drop(context);
            Self::start_rescan(matchers, rescan_interval, stop, events)
        }
    }

    /// The mode discovery runs in.
    pub fn mode(&self) -> ActiveMode {
        self.mode
    }

    fn start_hotplug(
        context: Context,
        matchers: Arc<Vec<DeviceMatcher>>,
        stop: Arc<AtomicBool>,
        events: UnboundedSender<UsbEvent>,
    ) -> Result<(Self, Vec<StickInfo>), DiscoveryError> {
        let (raw_tx, raw_rx) = std_mpsc::channel::<RawEvent>();
        let mut pairs: Vec<(u16, u16)> = matchers.iter().map(|m| (m.vendor, m.product)).collect();
        pairs.sort_unstable();
        pairs.dedup();
        let mut registrations = Vec::with_capacity(pairs.len());
        for (vendor, product) in pairs {
            // With `enumerate`, libusb calls back for the devices present now, during this call.
            let registration = HotplugBuilder::new()
                .vendor_id(vendor)
                .product_id(product)
                .enumerate(true)
                .register(
                    &context,
                    Box::new(Callback {
                        raw: raw_tx.clone(),
                    }),
                )
                .map_err(DiscoveryError::Hotplug)?;
            registrations.push(registration);
        }
        let initial: Vec<StickInfo> = raw_rx
            .try_iter()
            .filter_map(|raw| match raw {
                RawEvent::Arrived(device) => identify(&device, &matchers),
                RawEvent::Left { .. } => None,
            })
            .collect();
        tracing::info!(
            found = initial.len(),
            "watching USB with libusb hotplug events"
        );

        let thread_stop = stop.clone();
        let thread_context = context.clone();
        let thread = std::thread::Builder::new()
            .name("usb-hotplug".into())
            .spawn(move || {
                let _registrations = registrations;
                while !thread_stop.load(Ordering::SeqCst) {
                    if let Err(e) = thread_context.handle_events(None) {
                        tracing::warn!(error = %e, "libusb event handling failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    for raw in raw_rx.try_iter() {
                        let event = match raw {
                            RawEvent::Arrived(device) => match identify(&device, &matchers) {
                                Some(info) => {
                                    tracing::info!(serial = ?info.serial, path = %info.dev_path(),
                                        port = %info.port_path, "stick plugged in");
                                    UsbEvent::Arrived(info)
                                }
                                None => continue,
                            },
                            RawEvent::Left { bus, address } => {
                                tracing::info!(path = %format!("/dev/bus/usb/{bus:03}/{address:03}"),
                                    "stick unplugged");
                                UsbEvent::Left { bus, address }
                            }
                        };
                        if events.send(event).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(DiscoveryError::Thread)?;
        Ok((
            Self {
                mode: ActiveMode::Hotplug,
                stop,
                context: Some(context),
                thread: Some(thread),
            },
            initial,
        ))
    }

    fn start_rescan(
        matchers: Arc<Vec<DeviceMatcher>>,
        interval: Duration,
        stop: Arc<AtomicBool>,
        events: UnboundedSender<UsbEvent>,
    ) -> Result<(Self, Vec<StickInfo>), DiscoveryError> {
        let initial = scan(&matchers).map_err(DiscoveryError::Init)?;
        tracing::info!(
            found = initial.len(),
            ?interval,
            "watching USB by periodic rescan"
        );
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("usb-rescan".into())
            .spawn(move || {
                loop {
                    std::thread::park_timeout(interval);
                    if thread_stop.load(Ordering::SeqCst) {
                        return;
                    }
                    match scan(&matchers) {
                        Ok(sticks) => {
                            if events.send(UsbEvent::Snapshot(sticks)).is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "USB rescan failed"),
                    }
                }
            })
            .map_err(DiscoveryError::Thread)?;
        Ok((
            Self {
                mode: ActiveMode::Rescan(interval),
                stop,
                context: None,
                thread: Some(thread),
            },
            initial,
        ))
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(context) = &self.context {
            context.interrupt_handle_events();
        }
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// What a hotplug callback hands to the discovery thread. Identification happens outside
/// the callback, where libusb allows synchronous calls.
enum RawEvent {
    Arrived(Device<Context>),
    Left { bus: u8, address: u8 },
}

struct Callback {
    raw: std_mpsc::Sender<RawEvent>,
}

impl Hotplug<Context> for Callback {
    fn device_arrived(&mut self, device: Device<Context>) {
        let _ = self.raw.send(RawEvent::Arrived(device));
    }

    fn device_left(&mut self, device: Device<Context>) {
        let _ = self.raw.send(RawEvent::Left {
            bus: device.bus_number(),
            address: device.address(),
        });
    }
}

/// Enumerates the matching sticks through a fresh libusb context.
pub fn scan(matchers: &[DeviceMatcher]) -> Result<Vec<StickInfo>, rusb::Error> {
    let context = Context::new()?;
    let devices = context.devices()?;
    Ok(devices
        .iter()
        .filter_map(|d| identify(&d, matchers))
        .collect())
}

/// Describes a device if it matches one of the matchers.
fn identify<T: UsbContext>(device: &Device<T>, matchers: &[DeviceMatcher]) -> Option<StickInfo> {
    let descriptor = device.device_descriptor().ok()?;
    let (vendor, product) = (descriptor.vendor_id(), descriptor.product_id());
    if !matchers
        .iter()
        .any(|m| m.vendor == vendor && m.product == product)
    {
        return None;
    }
    let bus = device.bus_number();
    let address = device.address();
    let ports = device.port_numbers().unwrap_or_default();
    let port_path = port_path(bus, &ports);
    let sysfs = Path::new(SYSFS_USB_DEVICES).join(&port_path);
    if let Some(devnum) = read_attr(&sysfs, "devnum")
        && devnum.parse::<u8>().ok() != Some(address)
    {
        // The port already holds another device; its own arrival event will follow.
        tracing::debug!(port = %port_path, "device replaced before it was identified");
        return None;
    }
    let serial = read_attr(&sysfs, "serial").or_else(|| read_serial_descriptor(device));
    if serial.is_none() {
        tracing::warn!(port = %port_path, "stick has no readable serial number; naming it after its port");
    }
    if !matchers
        .iter()
        .any(|m| m.matches(vendor, product, serial.as_deref()))
    {
        tracing::debug!(?serial, "device does not match any configured serial");
        return None;
    }
    Some(StickInfo {
        vendor,
        product,
        serial,
        bus,
        address,
        port_path,
    })
}

/// Kernel name of a USB port: `<bus>-<port>.<port>...`, or `usb<bus>` for a root hub.
pub fn port_path(bus: u8, ports: &[u8]) -> String {
    if ports.is_empty() {
        return format!("usb{bus}");
    }
    let ports: Vec<String> = ports.iter().map(u8::to_string).collect();
    format!("{bus}-{}", ports.join("."))
}

fn read_attr(dir: &Path, name: &str) -> Option<String> {
    let value = std::fs::read_to_string(dir.join(name)).ok()?;
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// Reads the serial string descriptor through libusb (needs the device node to be openable).
fn read_serial_descriptor<T: UsbContext>(device: &Device<T>) -> Option<String> {
    let descriptor = device.device_descriptor().ok()?;
    descriptor.serial_number_string_index()?;
    let handle = device.open().ok()?;
    let serial = handle.read_serial_number_string_ascii(&descriptor).ok()?;
    let serial = serial.trim();
    (!serial.is_empty()).then(|| serial.to_owned())
}

/// Whether udev's events can reach this process: libudev only listens when udevd runs here
/// (`/run/udev/control`) or `/dev` is the kernel's devtmpfs (the host's view of devices).
pub fn udev_events_reachable() -> bool {
    Path::new("/run/udev/control").exists()
        || std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| dev_is_devtmpfs(&m))
            .unwrap_or(false)
}

/// Whether the last mount on `/dev` in a mountinfo text is devtmpfs.
fn dev_is_devtmpfs(mountinfo: &str) -> bool {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let fs_type = line.split(" - ").nth(1)?.split(' ').next()?;
            (mount_point == "/dev").then_some(fs_type)
        })
        .next_back()
        .is_some_and(|fs| fs == "devtmpfs")
}

/// What the plugin cannot see of the host's USB, each with what it does instead: one line
/// per missing path, for the start-up log. `exists` is `Path::exists` outside tests.
pub fn blind_spots(exists: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut notes = Vec::new();
    if !exists(Path::new("/sys/bus/usb")) {
        notes.push(
            "cannot see /sys/bus/usb: libusb has no USB devices to enumerate and serial numbers \
             cannot be read; 0 sticks are advertised until /sys is mounted from the host"
                .to_owned(),
        );
    }
    if !exists(Path::new("/run/udev")) {
        notes.push(
            "cannot see /run/udev: udev's device database and hotplug events are missing; \
             discovery falls back to a periodic rescan unless /dev is the host's devtmpfs"
                .to_owned(),
        );
    }
    if !exists(Path::new("/dev/bus/usb")) {
        notes.push(
            "cannot see /dev/bus/usb: no USB device node exists here (a node without USB, or the \
             directory is not mounted); sticks are still found through sysfs, but one without a \
             serial number in sysfs is named after its port"
                .to_owned(),
        );
    }
    notes
}

/// The sysfs directory of a port path (exposed for diagnostics).
pub fn sysfs_dir(port_path: &str) -> PathBuf {
    Path::new(SYSFS_USB_DEVICES).join(port_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_paths() {
        assert_eq!(port_path(1, &[]), "usb1");
        assert_eq!(port_path(1, &[1]), "1-1");
        assert_eq!(port_path(3, &[1, 4, 2]), "3-1.4.2");
        assert_eq!(sysfs_dir("1-1"), PathBuf::from("/sys/bus/usb/devices/1-1"));
    }

    #[test]
    fn blind_spots_name_each_missing_path_and_the_fallback() {
        assert!(blind_spots(|_| true).is_empty());
        let all = blind_spots(|_| false);
        assert_eq!(all.len(), 3);
        assert!(all[0].contains("/sys/bus/usb") && all[0].contains("0 sticks"));
        assert!(all[1].contains("/run/udev") && all[1].contains("rescan"));
        assert!(all[2].contains("/dev/bus/usb") && all[2].contains("named after its port"));
        let only_dev = blind_spots(|p| p != Path::new("/dev/bus/usb"));
        assert_eq!(only_dev.len(), 1);
        assert!(only_dev[0].contains("/dev/bus/usb"));
    }

    #[test]
    fn devtmpfs_detection() {
        let host = "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=1k\n\
                    25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw\n";
        assert!(dev_is_devtmpfs(host));
        let container = "600 500 0:60 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755\n";
        assert!(!dev_is_devtmpfs(container));
        let overmounted = format!("{host}700 27 0:70 / /dev rw - tmpfs tmpfs rw\n");
        assert!(!dev_is_devtmpfs(&overmounted));
        assert!(!dev_is_devtmpfs(""));
    }
}
