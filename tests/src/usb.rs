//! Emulated USB: a umockdev testbed in which libusb (inside a program started with
//! [`Testbed::command`]) enumerates emulated Nitrokey HSM sticks and receives hotplug events
//! when they are added or removed at run time.
//!
//! # How it works
//!
//! umockdev fakes `/sys` and `/dev` for processes running with its preload library
//! (`libumockdev-preload.so.0` in `LD_PRELOAD`) and `UMOCKDEV_DIR` pointing at the testbed.
//! Sending a uevent needs the testbed *owner* to run under that preload too, so the testbed is
//! owned by a small helper process (`tests/umockdev/testbed.py`, embedded in this crate, run by
//! `umockdev-wrapper` with Debian's `python3-gi` and `gir1.2-umockdev-1.0`), driven over a pipe.
//!
//! libusb starts its udev monitor in its first `libusb_init`, so start the program under test
//! after the [`Testbed`] exists, and give each scenario its own program process.
//!
//! ```no_run
//! use nitrokey_e2e::usb::{Testbed, UsbDeviceSpec};
//! let testbed = Testbed::new()?;
//! let stick = testbed.add(&UsbDeviceSpec::nitrokey_hsm("DENK01234567").at(1, 2))?;
//! let mut child = testbed.command("lsusb").spawn()?;   // sees 20a0:4230 on 001/002
//! testbed.remove(&stick)?;                              // hotplug "remove" reaches libusb
//! # child.wait()?; anyhow::Ok(())
//! ```

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context as _, bail, ensure};

/// The helper that owns the testbed (see the module docs).
const HELPER: &str = include_str!("../umockdev/testbed.py");

/// umockdev's preload library, as `umockdev-wrapper` names it.
pub const PRELOAD_LIBRARY: &str = "libumockdev-preload.so.0";

/// Nitrokey's USB vendor ID.
pub const NITROKEY_VENDOR: u16 = 0x20a0;
/// The Nitrokey HSM's USB product ID.
pub const NITROKEY_HSM_PRODUCT: u16 = 0x4230;

/// An emulated USB device to add: IDs, serial and where it is plugged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDeviceSpec {
    /// USB vendor ID.
    pub vendor: u16,
    /// USB product ID.
    pub product: u16,
    /// Serial number in sysfs (`None`: the device has no readable serial attribute).
    pub serial: Option<String>,
    /// Bus number (`BBB` in `/dev/bus/usb/BBB/DDD`).
    pub bus: u8,
    /// Device number on the bus (`DDD`).
    pub devnum: u8,
    /// Port on the bus's root hub; the kernel name becomes `<bus>-<port>`.
    pub port: u8,
}

impl UsbDeviceSpec {
    /// A Nitrokey HSM (20a0:4230) with this serial, on bus 1 as device 2, port 1; change the
    /// location with [`at`](Self::at) and [`port`](Self::port).
    pub fn nitrokey_hsm(serial: &str) -> Self {
        Self {
            vendor: NITROKEY_VENDOR,
            product: NITROKEY_HSM_PRODUCT,
            serial: Some(serial.to_owned()),
            bus: 1,
            devnum: 2,
            port: 1,
        }
    }

    /// Places the device at bus `bus`, device number `devnum`; the port follows the device
    /// number unless set with [`port`](Self::port) afterwards.
    pub fn at(mut self, bus: u8, devnum: u8) -> Self {
        self.bus = bus;
        self.devnum = devnum;
        self.port = devnum.saturating_sub(1).max(1);
        self
    }

    /// Plugs the device into root-hub port `port`.
    pub fn port(mut self, port: u8) -> Self {
        self.port = port;
        self
    }

    /// Drops the serial number attribute (to exercise fall-backs).
    pub fn without_serial(mut self) -> Self {
        self.serial = None;
        self
    }

    /// The device's kernel name, e.g. `1-1`.
    pub fn kernel_name(&self) -> String {
        format!("{}-{}", self.bus, self.port)
    }

    /// The sysfs path umockdev files the device under.
    pub fn syspath(&self) -> String {
        format!(
            "/sys/devices/pci0000:00/0000:00:14.0/usb{}/{}",
            self.bus,
            self.kernel_name()
        )
    }

    /// The usbfs node, `/dev/bus/usb/BBB/DDD`.
    pub fn dev_path(&self) -> String {
        format!("/dev/bus/usb/{:03}/{:03}", self.bus, self.devnum)
    }

    /// USB device descriptor + one configuration with a class-0x0B (smart card) interface and
    /// two bulk endpoints, as hex: what the kernel exposes as the sysfs `descriptors` file.
    pub fn descriptors_hex(&self) -> String {
        let [vl, vh] = self.vendor.to_le_bytes();
        let [pl, ph] = self.product.to_le_bytes();
        let serial_index = if self.serial.is_some() { 3 } else { 0 };
        let device = [
            0x12,
            0x01,
            0x00,
            0x02, // length, DEVICE, bcdUSB 2.00
            0x00,
            0x00,
            0x00,
            0x40, // class/subclass/protocol per interface, EP0 64 bytes
            vl,
            vh,
            pl,
            ph, // idVendor, idProduct
            0x01,
            0x01,
            0x01,
            0x02, // bcdDevice 1.01, iManufacturer, iProduct
            serial_index,
            0x01, // iSerialNumber, one configuration
        ];
        let configuration = [
            0x09, 0x02, 0x20, 0x00, 0x01, 0x01, 0x00, 0x80,
            0x32, // 32 bytes, 1 interface, 100 mA
            0x09, 0x04, 0x00, 0x00, 0x02, 0x0B, 0x00, 0x00, 0x00, // interface 0: smart card
            0x07, 0x05, 0x81, 0x02, 0x40, 0x00, 0x00, // bulk IN 0x81
            0x07, 0x05, 0x02, 0x02, 0x40, 0x00, 0x00, // bulk OUT 0x02
        ];
        device
            .iter()
            .chain(&configuration)
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    /// The umockdev record (`umockdev-record` format) of the device.
    pub fn record(&self) -> String {
        let descriptors = self.descriptors_hex();
        let (bus, dev) = (self.bus, self.devnum);
        let mut r = format!(
            "P: {syspath}\n\
             N: bus/usb/{bus:03}/{dev:03}={descriptors}\n\
             E: DEVNAME=/dev/bus/usb/{bus:03}/{dev:03}\n\
             E: DEVTYPE=usb_device\n\
             E: SUBSYSTEM=usb\n\
             E: BUSNUM={bus:03}\n\
             E: DEVNUM={dev:03}\n\
             E: PRODUCT={vendor:x}/{product:x}/101\n\
             E: MAJOR=189\n\
             E: MINOR={minor}\n\
             A: idVendor={vendor:04x}\n\
             A: idProduct={product:04x}\n\
             A: busnum={bus}\n\
             A: devnum={dev}\n\
             A: devpath={port}\n\
             A: speed=12\n\
             A: bConfigurationValue=1\n\
             A: bNumConfigurations=1\n",
            syspath = self.syspath().trim_start_matches("/sys"),
            vendor = self.vendor,
            product = self.product,
            minor = (u32::from(bus) - 1) * 128 + u32::from(dev) - 1,
            port = self.port,
        );
        if let Some(serial) = &self.serial {
            r.push_str(&format!("A: serial={serial}\n"));
        }
        r.push_str(&format!("H: descriptors={descriptors}\n"));
        r
    }
}

/// A device added to a [`Testbed`]; pass it to [`Testbed::remove`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDevice {
    /// What was added.
    pub spec: UsbDeviceSpec,
}

impl UsbDevice {
    /// The usbfs node, `/dev/bus/usb/BBB/DDD`.
    pub fn dev_path(&self) -> String {
        self.spec.dev_path()
    }

    /// The serial number, if the device has one.
    pub fn serial(&self) -> Option<&str> {
        self.spec.serial.as_deref()
    }
}

struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A umockdev testbed with emulated USB devices; removed (with its directory) when dropped.
/// Stop the programs started under it first.
pub struct Testbed {
    root: PathBuf,
    helper: Mutex<Helper>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Testbed {
    /// Creates an empty testbed. Needs `umockdev-wrapper` and a Python 3 with the `gi`
    /// bindings and UMockdev typelib (`/usr/bin/python3` by default; override with
    /// `NITROKEY_E2E_PYTHON`).
    pub fn new() -> anyhow::Result<Self> {
        let python = std::env::var_os("NITROKEY_E2E_PYTHON").unwrap_or_else(|| {
            if Path::new("/usr/bin/python3").exists() {
                "/usr/bin/python3".into()
            } else {
                "python3".into()
            }
        });
        let mut child = Command::new("umockdev-wrapper")
            .arg(&python)
            .arg("-c")
            .arg(HELPER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start umockdev-wrapper (install Debian's umockdev, python3-gi and gir1.2-umockdev-1.0)")?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .context("reading the testbed helper's greeting")?;
        let Some(root) = line.trim_end().strip_prefix("ready ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the umockdev testbed helper did not start (said {line:?}); is {} able to import \
                 gi.repository.UMockdev?",
                python.to_string_lossy()
            );
        };
        Ok(Self {
            root: PathBuf::from(root),
            helper: Mutex::new(Helper {
                child,
                stdin,
                stdout,
            }),
        })
    }

    /// The testbed's root directory (what `UMOCKDEV_DIR` must name).
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    fn call(&self, request: &str) -> anyhow::Result<()> {
        let mut helper = self.helper.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(helper.stdin, "{request}").context("writing to the testbed helper")?;
        helper.stdin.flush()?;
        let mut line = String::new();
        helper
            .stdout
            .read_line(&mut line)
            .context("reading from the testbed helper")?;
        let line = line.trim_end();
        ensure!(
            line == "ok",
            "testbed helper: {}",
            if line.is_empty() { "exited" } else { line }
        );
        Ok(())
    }

    /// Adds (plugs in) a device and sends its `add` uevent.
    pub fn add(&self, spec: &UsbDeviceSpec) -> anyhow::Result<UsbDevice> {
        let request = format!(
            "{{\"op\":\"add\",\"record\":{},\"syspath\":{}}}",
            json_string(&spec.record()),
            json_string(&spec.syspath())
        );
        self.call(&request)
            .with_context(|| format!("adding {}", spec.dev_path()))?;
        Ok(UsbDevice { spec: spec.clone() })
    }

    /// Adds a Nitrokey HSM with `serial` at bus `bus`, device number `devnum`.
    pub fn add_nitrokey_hsm(&self, serial: &str, bus: u8, devnum: u8) -> anyhow::Result<UsbDevice> {
        self.add(&UsbDeviceSpec::nitrokey_hsm(serial).at(bus, devnum))
    }

    /// Sends the device's `remove` uevent and removes (unplugs) it.
    pub fn remove(&self, device: &UsbDevice) -> anyhow::Result<()> {
        let request = format!(
            "{{\"op\":\"remove\",\"syspath\":{}}}",
            json_string(&device.spec.syspath())
        );
        self.call(&request)
            .with_context(|| format!("removing {}", device.dev_path()))
    }

    /// Environment a process needs to see the testbed: `UMOCKDEV_DIR` and an `LD_PRELOAD` with
    /// umockdev's preload library in front of any inherited one.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        let mut preload = OsString::from(PRELOAD_LIBRARY);
        if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|p| !p.is_empty()) {
            preload.push(":");
            preload.push(existing);
        }
        vec![
            ("UMOCKDEV_DIR".into(), self.root.clone().into()),
            ("LD_PRELOAD".into(), preload),
        ]
    }

    /// Adds [`env`](Self::env) to a command.
    pub fn wrap<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        command.envs(self.env())
    }

    /// A command for `program` that runs inside the testbed.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        self.wrap(&mut command);
        command
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = self.call("{\"op\":\"quit\"}");
        let helper = self.helper.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = helper.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nitrokey_record_matches_a_real_stick() {
        let spec = UsbDeviceSpec::nitrokey_hsm("DENK01234567").at(1, 2);
        assert_eq!(
            spec.descriptors_hex(),
            "1201000200000040A020304201010102030109022000010100803209040000020B0000000705810240000007050202400000"
        );
        let record = spec.record();
        assert!(record.starts_with("P: /devices/pci0000:00/0000:00:14.0/usb1/1-1\n"));
        assert!(record.contains("N: bus/usb/001/002=12010002"));
        assert!(record.contains("A: idVendor=20a0\n"));
        assert!(record.contains("A: idProduct=4230\n"));
        assert!(record.contains("A: serial=DENK01234567\n"));
        assert_eq!(spec.dev_path(), "/dev/bus/usb/001/002");
        assert_eq!(
            spec.syspath(),
            "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-1"
        );
    }

    #[test]
    fn json_escaping() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }
}
