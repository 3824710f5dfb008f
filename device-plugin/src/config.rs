//! Configuration: a YAML file (camelCase keys) overlaid by command-line flags and their
//! `NITROKEY_DEVICE_PLUGIN_*` environment variables.
//!
//! Precedence, highest first: flag, flag's environment variable, file, built-in default. Each
//! setting is declared once, in [`Settings`] (file key, flag, variable, default), and layered
//! by [`nitrokey_common::layers`]. Everything is validated before the plugin touches USB or
//! the kubelet; a [`ConfigError`] names the offending field and where its value came from, and
//! makes the process exit with code 2.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser};
use nitrokey_common::layers::{Flags, Layered, Source};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::names::{DEFAULT_NFD_DIR, DEFAULT_SPEC_DIR, SOCKET_NAME};
use crate::text::shorten;

// Shared with unseal-init, so both programs' log lines look alike.
pub use nitrokey_common::logging::LogFormat;

/// Default kubelet root directory (DRA mode).
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
/// Default extended resource name.
pub const DEFAULT_RESOURCE_NAME: &str = "nitrokey.com/hsm";
/// Nitrokey's USB vendor ID.
pub const NITROKEY_VENDOR: u16 = 0x20a0;
/// The Nitrokey HSM's USB product ID.
pub const NITROKEY_HSM_PRODUCT: u16 = 0x4230;
/// Default number of kubelet units advertised per stick (as declared in [`Settings`], which
/// a test checks).
pub const DEFAULT_SHARES: u32 = 2;
/// Default port of the HTTP endpoint serving /metrics, /healthz and /readyz. Outside the
/// Prometheus exporters' range 9100-9999 (fully allocated; dcgm-exporter holds 9400), outside
/// the Kubernetes components' 10248-10259 and below the NodePort range.
pub const DEFAULT_METRICS_PORT: u16 = 10291;
/// Environment variable holding the node's IP (from the downward API, `status.hostIP`): the
/// default host of the HTTP endpoint.
pub const NODE_IP_ENV: &str = "NODE_IP";
/// Longest accepted grace period: a week covers any planned replug, and keeps every deadline
/// computed from it far inside the clock's range.
pub const MAX_GRACE_PERIOD: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest accepted `evictionRetryFor`.
pub const MAX_EVICTION_RETRY_FOR: Duration = Duration::from_secs(24 * 3600);
/// Shortest accepted rescan interval.
pub const MIN_RESCAN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest accepted rescan interval.
pub const MAX_RESCAN_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest duration the parser accepts at all (a year); fields have tighter bounds.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Most units one stick may be split into.
pub const MAX_SHARES: u32 = 1000;

/// Command-line flags. Every setting's flag has an environment variable,
/// `NITROKEY_DEVICE_PLUGIN_<FLAG>`; flags win over the configuration file.
#[derive(Debug, Default, Parser)]
#[command(
    name = "device-plugin",
    version,
    about = "Kubernetes device plugin advertising NitroKey HSM USB sticks to the kubelet",
    args_override_self = true
)]
pub struct Cli {
    /// YAML configuration file (camelCase keys, see README).
    #[arg(long, value_name = "FILE", env = "NITROKEY_DEVICE_PLUGIN_CONFIG")]
    pub config: Option<PathBuf>,

    /// The settings, which override the file's (declared in [`Settings`]).
    #[command(flatten)]
    pub settings: Flags<Settings>,

    /// This node's IP, the host of the HTTP endpoint when metricsAddress is :PORT (in a pod:
    /// the downward API's status.hostIP) [default: 127.0.0.1].
    #[arg(long, value_name = "IP", env = NODE_IP_ENV)]
    pub node_ip: Option<String>,

    /// This node's name (in a pod: the downward API's spec.nodeName), named in Events and
    /// labelled with nodeLabels: api.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
}

/// Every setting, declared once: the clap `id` is its key in the configuration file (the
/// serde name), next to its flag, environment variable and default, so an error can say
/// where a value came from. Every key is optional in the file; unknown keys are refused.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Extended resource name advertised to the kubelet.
    #[arg(id = "resourceName", long = "resource-name", value_name = "NAME",
          env = "NITROKEY_DEVICE_PLUGIN_RESOURCE_NAME", default_value = DEFAULT_RESOURCE_NAME)]
    pub resource_name: Option<String>,

    /// USB device to advertise, VENDOR:PRODUCT or VENDOR:PRODUCT:SERIAL in hex (repeatable;
    /// in the environment, comma-separated). Replaces the file's `devices`.
    #[arg(id = "devices", long = "device", value_name = "VENDOR:PRODUCT[:SERIAL]",
          env = "NITROKEY_DEVICE_PLUGIN_DEVICE", value_delimiter = ',',
          value_parser = DeviceMatcher::from_str, default_value = "20a0:4230")]
    pub devices: Option<Vec<DeviceMatcher>>,

    /// Units advertised per stick, 1 to 1000.
    #[arg(id = "sharesPerDevice", long = "shares-per-device", value_name = "N",
          env = "NITROKEY_DEVICE_PLUGIN_SHARES_PER_DEVICE",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SHARES)),
          default_value = "2")]
    pub shares_per_device: Option<u32>,

    /// How long an unplugged stick stays listed as Unhealthy before it is dropped, e.g. 5m.
    #[arg(id = "gracePeriod", long = "grace-period", value_name = "DURATION",
          env = "NITROKEY_DEVICE_PLUGIN_GRACE_PERIOD", value_parser = parse_grace_period,
          default_value = "5m")]
    #[serde(default, deserialize_with = "deserialize_grace_period")]
    pub grace_period: Option<Duration>,

    /// Directory holding kubelet.sock and the plugin's socket.
    #[arg(id = "pluginDir", long = "plugin-dir", value_name = "DIR",
          env = "NITROKEY_DEVICE_PLUGIN_PLUGIN_DIR",
          default_value = nitrokey_proto::DEVICE_PLUGIN_DIR)]
    pub plugin_dir: Option<PathBuf>,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz: IP:PORT, or :PORT
    /// for the node IP in $NODE_IP (127.0.0.1 without it).
    #[arg(
        id = "metricsAddress",
        long = "metrics-address",
        value_name = "HOST:PORT",
        env = "NITROKEY_DEVICE_PLUGIN_METRICS_ADDRESS",
        default_value = ":10291"
    )]
    pub metrics_address: Option<String>,

    /// What to do about running pods whose stick was unplugged and plugged back in: none,
    /// event (a Kubernetes Event on the pod) or evict (through the Eviction API).
    #[arg(
        id = "onReplug",
        long = "on-replug",
        value_name = "MODE",
        env = "NITROKEY_DEVICE_PLUGIN_ON_REPLUG",
        default_value = "event"
    )]
    pub on_replug: Option<OnReplug>,

    /// With --on-replug evict: how long a pod's eviction refused by a PodDisruptionBudget is
    /// tried again before the plugin gives up on it and says so in an Event (0: at the first
    /// refusal).
    #[arg(id = "evictionRetryFor", long = "eviction-retry-for", value_name = "DURATION",
          env = "NITROKEY_DEVICE_PLUGIN_EVICTION_RETRY_FOR",
          value_parser = parse_eviction_retry_for, default_value = "10m")]
    #[serde(default, deserialize_with = "deserialize_eviction_retry_for")]
    pub eviction_retry_for: Option<Duration>,

    /// The kubelet's pod-resources socket.
    #[arg(id = "podResourcesSocket", long = "pod-resources-socket", value_name = "PATH",
          env = "NITROKEY_DEVICE_PLUGIN_POD_RESOURCES_SOCKET",
          default_value = nitrokey_proto::POD_RESOURCES_SOCKET)]
    pub pod_resources_socket: Option<PathBuf>,

    /// How node labels nitrokey.com/hsm.present and .count are published: none, nfd (a Node
    /// Feature Discovery feature file) or api (patching the Node).
    #[arg(
        id = "nodeLabels",
        long = "node-labels",
        value_name = "MODE",
        env = "NITROKEY_DEVICE_PLUGIN_NODE_LABELS",
        default_value = "nfd"
    )]
    pub node_labels: Option<NodeLabels>,

    /// Node Feature Discovery's local feature directory.
    #[arg(id = "nfdFeaturesDir", long = "nfd-features-dir", value_name = "DIR",
          env = "NITROKEY_DEVICE_PLUGIN_NFD_FEATURES_DIR", default_value = DEFAULT_NFD_DIR)]
    pub nfd_features_dir: Option<PathBuf>,

    /// Also name each allocated stick as a CDI device (nitrokey.com/hsm=STICK) and keep the
    /// matching CDI spec in cdiSpecDir.
    #[arg(id = "cdi", long = "cdi", value_name = "BOOL", env = "NITROKEY_DEVICE_PLUGIN_CDI",
          num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub cdi: Option<bool>,

    /// Directory of CDI specs the container runtime reads.
    #[arg(id = "cdiSpecDir", long = "cdi-spec-dir", value_name = "DIR",
          env = "NITROKEY_DEVICE_PLUGIN_CDI_SPEC_DIR", default_value = DEFAULT_SPEC_DIR)]
    pub cdi_spec_dir: Option<PathBuf>,

    /// Log format.
    #[arg(
        id = "logFormat",
        long = "log-format",
        value_name = "FORMAT",
        env = "NITROKEY_DEVICE_PLUGIN_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: Option<LogFormat>,

    /// How USB changes are noticed: auto (hotplug events where they can arrive, else periodic
    /// rescan), hotplug, or rescan.
    #[arg(
        id = "discovery",
        long = "discovery",
        value_name = "MODE",
        env = "NITROKEY_DEVICE_PLUGIN_DISCOVERY",
        default_value = "auto"
    )]
    pub discovery: Option<DiscoveryMode>,

    /// Interval of the periodic rescan, when rescanning.
    #[arg(id = "rescanInterval", long = "rescan-interval", value_name = "DURATION",
          env = "NITROKEY_DEVICE_PLUGIN_RESCAN_INTERVAL", value_parser = parse_rescan_interval,
          default_value = "5s")]
    #[serde(default, deserialize_with = "deserialize_rescan_interval")]
    pub rescan_interval: Option<Duration>,

    /// How sticks are handed to pods: device-plugin (extended resource, Kubernetes 1.26+) or
    /// dra (Dynamic Resource Allocation driver hsm.nitrokey.com, Kubernetes 1.34+).
    #[arg(
        id = "mode",
        long = "mode",
        value_name = "MODE",
        env = "NITROKEY_DEVICE_PLUGIN_MODE",
        default_value = "device-plugin"
    )]
    pub mode: Option<Mode>,

    /// With --mode dra: the kubelet's root directory, holding plugins_registry/ and plugins/.
    #[arg(id = "kubeletDir", long = "kubelet-dir", value_name = "DIR",
          env = "NITROKEY_DEVICE_PLUGIN_KUBELET_DIR", default_value = DEFAULT_KUBELET_DIR)]
    pub kubelet_dir: Option<PathBuf>,
}

/// The file holds the same settings as the flags.
pub type FileConfig = Settings;

impl Cli {
    /// Parses `args` (the program name first). When an invalid value came from an environment
    /// variable rather than the command line, the error names the variable, which is what the
    /// user has to fix (clap alone names the flag).
    pub fn parse_from_env_aware<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::CommandFactory;
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let error = match Self::try_parse_from(&args) {
            Ok(cli) => return Ok(cli),
            Err(e) => e,
        };
        if !matches!(
            error.kind(),
            ErrorKind::InvalidValue | ErrorKind::ValueValidation
        ) {
            return Err(error);
        }
        let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
            return Err(error);
        };
        let flag = invalid.split_whitespace().next().unwrap_or_default();
        let command = Self::command();
        let Some(env) = command
            .get_arguments()
            .find(|a| a.get_long().is_some_and(|l| flag == format!("--{l}")))
            .and_then(|a| a.get_env())
        else {
            return Err(error);
        };
        let on_command_line = args.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        if on_command_line || std::env::var_os(env).is_none() {
            return Err(error);
        }
        let rendered = error.to_string();
        let first = rendered
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        Err(clap::Error::raw(
            error.kind(),
            format!(
                "environment variable {}: {}\n",
                env.to_string_lossy(),
                shorten(first, 300)
            ),
        ))
    }
}

/// How node labels are published (see [`crate::labels`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NodeLabels {
    /// No labels.
    None,
    /// A Node Feature Discovery local feature file.
    #[default]
    Nfd,
    /// Patch the Node object through the API server.
    Api,
}

/// What to do about pods holding a replugged stick (see [`crate::replug`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnReplug {
    /// Nothing.
    None,
    /// A Kubernetes Event on each affected pod.
    #[default]
    Event,
    /// Evict each affected pod (one per stick at a time, rate-limited).
    Evict,
}

/// How sticks are handed to pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A kubelet device plugin advertising an extended resource.
    #[default]
    DevicePlugin,
    /// A Dynamic Resource Allocation driver publishing ResourceSlices (see [`crate::dra`]).
    Dra,
}

/// How the plugin notices sticks being plugged in and out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// Hotplug events when udev events can reach the process, periodic rescan otherwise.
    #[default]
    Auto,
    /// Always libusb hotplug events.
    Hotplug,
    /// Always a periodic rescan every `rescanInterval`.
    Rescan,
}

/// Which USB devices are advertised: vendor and product ID, optionally one serial number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMatcher {
    /// USB vendor ID.
    #[serde(deserialize_with = "deserialize_usb_id")]
    pub vendor: u16,
    /// USB product ID.
    #[serde(deserialize_with = "deserialize_usb_id")]
    pub product: u16,
    /// Only the stick with this serial number, when set.
    #[serde(default)]
    pub serial: Option<String>,
}

impl DeviceMatcher {
    /// Whether a device with these IDs and serial is one to advertise.
    pub fn matches(&self, vendor: u16, product: u16, serial: Option<&str>) -> bool {
        self.vendor == vendor
            && self.product == product
            && self
                .serial
                .as_deref()
                .is_none_or(|want| serial == Some(want))
    }
}

impl Default for DeviceMatcher {
    fn default() -> Self {
        Self {
            vendor: NITROKEY_VENDOR,
            product: NITROKEY_HSM_PRODUCT,
            serial: None,
        }
    }
}

impl fmt::Display for DeviceMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.product)?;
        if let Some(serial) = &self.serial {
            write!(f, ":{serial}")?;
        }
        Ok(())
    }
}

impl FromStr for DeviceMatcher {
    type Err = String;

    /// Parses `VENDOR:PRODUCT[:SERIAL]`, IDs in hex with or without `0x`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let vendor = parts.next().unwrap_or_default();
        let product = parts
            .next()
            .ok_or_else(|| format!("`{s}` is not VENDOR:PRODUCT[:SERIAL]"))?;
        let serial = parts.next().map(str::to_owned);
        if serial.as_deref() == Some("") {
            return Err(format!("`{s}` has an empty serial"));
        }
        Ok(Self {
            vendor: parse_hex_id(vendor).map_err(|e| format!("vendor: {e}"))?,
            product: parse_hex_id(product).map_err(|e| format!("product: {e}"))?,
            serial,
        })
    }
}

/// Parses a 16-bit USB ID written in hex, `20a0` or `0x20a0`.
pub fn parse_hex_id(s: &str) -> Result<u16, String> {
    let s = s.trim();
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "`{s}` is not a 16-bit hex USB ID like 20a0 or 0x20a0"
        ));
    }
    u16::from_str_radix(digits, 16).map_err(|e| format!("`{s}`: {e}"))
}

/// USB IDs in YAML: hex strings only (`"20a0"`, `"0x20a0"`). A bare YAML number is refused:
/// YAML reads `4230` as decimal 4230 (0x1086) and `0x4230` as 16944, so what the file means
/// would differ from what it shows.
fn deserialize_usb_id<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    struct UsbId;
    impl UsbId {
        fn bare<E: de::Error>(shown: impl fmt::Display) -> E {
            E::custom(format!(
                "{shown} is a bare YAML number, which YAML reads as decimal; write USB IDs as \
                 quoted hex strings like lsusb prints them, e.g. \"4230\" or \"0x4230\""
            ))
        }
    }
    impl Visitor<'_> for UsbId {
        type Value = u16;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a USB ID as a quoted hex string like \"20a0\" or \"0x20a0\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
            Err(Self::bare(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
            Err(Self::bare(v))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u16, E> {
            Err(Self::bare(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u16, E> {
            parse_hex_id(v).map_err(E::custom)
        }
    }
    d.deserialize_any(UsbId)
}

/// Parses a human duration in humantime's grammar, the same as unseal-init's: `0`, `90s`, `5m`,
/// `1h30m`, `250ms`, `2d`; a bare number is seconds. Anything longer than [`MAX_DURATION`] is
/// refused (no arithmetic on it can overflow).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let shown = shorten(text, 40);
    let too_long = || format!("`{shown}` is longer than the longest accepted duration, 366d");
    let d = if text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(text.parse().map_err(|_| too_long())?)
    } else {
        humantime::parse_duration(text).map_err(|e| match e {
            humantime::DurationError::NumberOverflow => too_long(),
            e => format!("`{shown}` is not a duration like 30s, 5m or 1h30m ({e})"),
        })?
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// Parses a duration and checks it lies in `min..=max` (`min_text`, `max_text` as a user writes
/// them). Bounds are checked here, where the text is at hand, so an error quotes what the user
/// wrote (`8d`), not the parsed value in seconds; the flag, its variable and the file key share
/// it.
fn parse_bounded(
    s: &str,
    (min, min_text): (Duration, &str),
    (max, max_text): (Duration, &str),
) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let shown = shorten(s.trim(), 40);
    if d < min {
        return Err(format!("`{shown}` is shorter than {min_text}"));
    }
    if d > max {
        return Err(format!("`{shown}` is longer than {max_text}"));
    }
    Ok(d)
}

/// Parses a grace period: at most [`MAX_GRACE_PERIOD`].
pub fn parse_grace_period(s: &str) -> Result<Duration, String> {
    parse_bounded(s, (Duration::ZERO, "0s"), (MAX_GRACE_PERIOD, "7d"))
}

/// Parses an eviction retry time: at most [`MAX_EVICTION_RETRY_FOR`].
pub fn parse_eviction_retry_for(s: &str) -> Result<Duration, String> {
    parse_bounded(s, (Duration::ZERO, "0s"), (MAX_EVICTION_RETRY_FOR, "24h"))
}

/// Parses a rescan interval: between [`MIN_RESCAN_INTERVAL`] and [`MAX_RESCAN_INTERVAL`].
pub fn parse_rescan_interval(s: &str) -> Result<Duration, String> {
    parse_bounded(
        s,
        (MIN_RESCAN_INTERVAL, "100ms"),
        (MAX_RESCAN_INTERVAL, "1h"),
    )
}

/// A file key holding a duration, parsed by `parse` (which bounds it for that key).
fn deserialize_duration_with<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<Duration, String>,
) -> Result<Option<Duration>, D::Error> {
    struct Human(fn(&str) -> Result<Duration, String>);
    impl Visitor<'_> for Human {
        type Value = Option<Duration>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration like \"30s\", \"5m\" or \"1h30m\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            (self.0)(&v.to_string()).map(Some).map_err(E::custom)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            (self.0)(v).map(Some).map_err(E::custom)
        }
    }
    d.deserialize_any(Human(parse))
}

fn deserialize_grace_period<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize_duration_with(d, parse_grace_period)
}

fn deserialize_eviction_retry_for<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_duration_with(d, parse_eviction_retry_for)
}

fn deserialize_rescan_interval<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_duration_with(d, parse_rescan_interval)
}

impl FileConfig {
    /// Parses the YAML text of a configuration file. An empty file is all defaults.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        nitrokey_common::yaml::parse(text).map_err(ConfigError::Yaml)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.to_path_buf(), e.to_string()))?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Yaml(msg) => ConfigError::File(path.to_path_buf(), msg),
            other => other,
        })
    }
}

/// The effective, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Extended resource name registered with the kubelet.
    pub resource_name: String,
    /// Devices to advertise.
    pub devices: Vec<DeviceMatcher>,
    /// Units per stick.
    pub shares_per_device: u32,
    /// How long an unplugged stick stays listed as Unhealthy.
    pub grace_period: Duration,
    /// Directory holding kubelet.sock and the plugin socket.
    pub plugin_dir: PathBuf,
    /// Address of the HTTP endpoint.
    pub metrics_address: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// How USB changes are noticed.
    pub discovery: DiscoveryMode,
    /// Interval of the periodic rescan.
    pub rescan_interval: Duration,
    /// What to do about pods holding a replugged stick.
    pub on_replug: OnReplug,
    /// How long a refused eviction is tried again before the plugin gives up on the pod.
    pub eviction_retry_for: Duration,
    /// The kubelet's pod-resources socket.
    pub pod_resources_socket: PathBuf,
    /// This node's name, if known.
    pub node_name: Option<String>,
    /// How node labels are published.
    pub node_labels: NodeLabels,
    /// NFD's local feature directory.
    pub nfd_features_dir: PathBuf,
    /// Whether `Allocate` names CDI devices and a CDI spec is kept.
    pub cdi: bool,
    /// Where the CDI spec goes.
    pub cdi_spec_dir: PathBuf,
    /// Device plugin or DRA driver.
    pub mode: Mode,
    /// The kubelet's root directory (DRA mode: registration and node-service sockets).
    pub kubelet_dir: PathBuf,
}

impl Config {
    /// Path of the plugin's own socket.
    pub fn socket_path(&self) -> PathBuf {
        self.plugin_dir.join(SOCKET_NAME)
    }

    /// Path of the kubelet's registration socket.
    pub fn kubelet_socket_path(&self) -> PathBuf {
        self.plugin_dir.join(nitrokey_proto::KUBELET_SOCKET)
    }

    /// Builds the effective configuration from the flags (and the file they name).
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::merge(file, cli)
    }

    /// Overlays the flags (and their variables) on the file, over the defaults, and validates
    /// the result; a refused value is reported with where it came from.
    pub fn merge(file: FileConfig, cli: &Cli) -> Result<Self, ConfigError> {
        let mut l = Layers {
            flags: &cli.settings,
            sources: Vec::new(),
        };
        let node_ip = match &cli.node_ip {
            None => None,
            Some(ip) => Some(ip.trim().parse::<IpAddr>().map_err(|_| {
                ConfigError::Invalid(
                    NODE_IP_ENV,
                    format!("`{}` is not an IP address", shorten(ip, 64)),
                )
            })?),
        };
        let metrics_address: String = l.take("metricsAddress", file.metrics_address)?;
        let metrics_address = resolve_metrics_address(&metrics_address, node_ip)
            .map_err(|e| l.refused("metricsAddress", e))?;
        let config = Self {
            resource_name: l.take("resourceName", file.resource_name)?,
            devices: l.take_many("devices", file.devices)?,
            shares_per_device: l.take("sharesPerDevice", file.shares_per_device)?,
            grace_period: l.take("gracePeriod", file.grace_period)?,
            plugin_dir: l.take("pluginDir", file.plugin_dir)?,
            metrics_address,
            log_format: l.take("logFormat", file.log_format)?,
            discovery: l.take("discovery", file.discovery)?,
            rescan_interval: l.take("rescanInterval", file.rescan_interval)?,
            on_replug: l.take("onReplug", file.on_replug)?,
            eviction_retry_for: l.take("evictionRetryFor", file.eviction_retry_for)?,
            pod_resources_socket: l.take("podResourcesSocket", file.pod_resources_socket)?,
            node_name: cli.node_name.clone().filter(|n| !n.is_empty()),
            node_labels: l.take("nodeLabels", file.node_labels)?,
            nfd_features_dir: l.take("nfdFeaturesDir", file.nfd_features_dir)?,
            cdi: l.take("cdi", file.cdi)?,
            cdi_spec_dir: l.take("cdiSpecDir", file.cdi_spec_dir)?,
            mode: l.take("mode", file.mode)?,
            kubelet_dir: l.take("kubeletDir", file.kubelet_dir)?,
        };
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(field, reason) => l.refused(field, reason),
            other => other,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_resource_name(&self.resource_name)
            .map_err(|e| ConfigError::Invalid("resourceName", e))?;
        if self.devices.is_empty() {
            return Err(ConfigError::Invalid(
                "devices",
                "at least one device is needed".into(),
            ));
        }
        if let Some(m) = self
            .devices
            .iter()
            .find(|m| m.serial.as_deref() == Some(""))
        {
            return Err(ConfigError::Invalid(
                "devices",
                format!("{m}: serial must not be empty"),
            ));
        }
        if !(1..=MAX_SHARES).contains(&self.shares_per_device) {
            return Err(ConfigError::Invalid(
                "sharesPerDevice",
                format!(
                    "{} is not between 1 and {MAX_SHARES}",
                    self.shares_per_device
                ),
            ));
        }
        if self.plugin_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "pluginDir",
                "must not be empty".into(),
            ));
        }
        if self.rescan_interval < MIN_RESCAN_INTERVAL || self.rescan_interval > MAX_RESCAN_INTERVAL
        {
            return Err(ConfigError::Invalid(
                "rescanInterval",
                format!(
                    "{} is not between 100ms and 1h",
                    shown(self.rescan_interval)
                ),
            ));
        }
        if self.node_labels == NodeLabels::Api && self.node_name.is_none() {
            return Err(ConfigError::Invalid(
                "nodeLabels",
                "api needs the node's name in NODE_NAME (downward API spec.nodeName)".into(),
            ));
        }
        if self.mode == Mode::Dra && self.node_name.is_none() {
            return Err(ConfigError::Invalid(
                "mode",
                "dra needs the node's name in NODE_NAME (downward API spec.nodeName): it names \
                 the node's ResourceSlice and pool"
                    .into(),
            ));
        }
        if self.eviction_retry_for > MAX_EVICTION_RETRY_FOR {
            return Err(ConfigError::Invalid(
                "evictionRetryFor",
                format!("{} is longer than 24h", shown(self.eviction_retry_for)),
            ));
        }
        if self.grace_period > MAX_GRACE_PERIOD {
            return Err(ConfigError::Invalid(
                "gracePeriod",
                format!("{} is longer than 7d", shown(self.grace_period)),
            ));
        }
        Ok(())
    }
}

/// The settings being layered, and where each value came from (for the error about it).
struct Layers<'a> {
    flags: &'a Flags<Settings>,
    sources: Vec<(&'static str, Source)>,
}

impl Layers<'_> {
    /// The setting `id`: flag or variable, else the file's `file`, else the declared default.
    fn take<T: Clone + Send + Sync + 'static>(
        &mut self,
        id: &'static str,
        file: Option<T>,
    ) -> Result<T, ConfigError> {
        let layered = self.flags.pick(id, file, None);
        self.keep(id, layered)
    }

    /// [`Self::take`] for a setting of several values.
    fn take_many<T: Clone + Send + Sync + 'static>(
        &mut self,
        id: &'static str,
        file: Option<Vec<T>>,
    ) -> Result<Vec<T>, ConfigError> {
        let layered = self.flags.pick_many(id, file);
        self.keep(id, layered)
    }

    fn keep<T>(&mut self, id: &'static str, layered: Option<Layered<T>>) -> Result<T, ConfigError> {
        let layered = layered
            .ok_or_else(|| ConfigError::Invalid(id, "has no value and no default".into()))?;
        self.sources.push((id, layered.source));
        Ok(layered.value)
    }

    /// An error about the setting `field`, naming where its value came from.
    fn refused(&self, field: &'static str, reason: String) -> ConfigError {
        match self.sources.iter().find(|(id, _)| *id == field) {
            Some((_, source)) => ConfigError::Refused {
                field,
                from: source.to_string(),
                reason,
            },
            None => ConfigError::Invalid(field, reason),
        }
    }
}

/// A duration as a user would write it (`8d`, `1h 30m`), for the checks on values that did not
/// come through the parsers above (a [`Config`] built in code).
fn shown(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The HTTP endpoint's address: `IP:PORT`, or `:PORT` on `node_ip` (127.0.0.1 without one,
/// so that nothing listens on every interface of a host-network pod by default).
pub fn resolve_metrics_address(text: &str, node_ip: Option<IpAddr>) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{}` is not :PORT with a port number", shorten(text, 64)))?;
        let host = node_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        return Ok(SocketAddr::new(host, port));
    }
    text.parse().map_err(|_| {
        format!(
            "`{}` is not IP:PORT with a numeric IP (e.g. 10.0.0.5:{DEFAULT_METRICS_PORT}) or \
             :PORT (on $NODE_IP)",
            shorten(text, 64)
        )
    })
}

/// Checks that `name` is an extended resource name the kubelet accepts: `<domain>/<name>`,
/// outside the `kubernetes.io` namespaces, at most 63 characters after the slash.
pub fn validate_resource_name(name: &str) -> Result<(), String> {
    let (domain, short) = name.split_once('/').ok_or_else(|| {
        format!("`{name}` is not of the form <domain>/<name>, e.g. nitrokey.com/hsm")
    })?;
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() > 253 || !domain.split('.').all(dns_label) {
        return Err(format!("`{domain}` is not a lower-case DNS domain"));
    }
    if domain == "kubernetes.io"
        || domain.ends_with(".kubernetes.io")
        || domain == "k8s.io"
        || domain.ends_with(".k8s.io")
    {
        return Err(format!(
            "`{domain}` is reserved for Kubernetes' own resources"
        ));
    }
    let short_ok = !short.is_empty()
        && short.len() <= 63
        && short
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && short.as_bytes()[0].is_ascii_alphanumeric()
        && short.as_bytes()[short.len() - 1].is_ascii_alphanumeric();
    if !short_ok {
        return Err(format!(
            "`{short}` must be 1-63 characters of [A-Za-z0-9-_.], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, String),
    /// The file is not valid YAML of the expected shape (the message names the field).
    #[error("invalid config file {0}: {1}")]
    File(PathBuf, String),
    /// YAML text that is not of the expected shape.
    #[error("invalid config: {0}")]
    Yaml(String),
    /// A field has an invalid value.
    #[error("invalid config: {0}: {1}")]
    Invalid(&'static str, String),
    /// A setting's value is refused; names where the value came from.
    #[error("invalid config: {field}{from}: {reason}")]
    Refused {
        /// The setting's file key.
        field: &'static str,
        /// ` (from flag --x)`, ` (from environment variable X)`, ...
        from: String,
        /// What is wrong.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["device-plugin"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("flags parse")
    }

    fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Config::merge(FileConfig::from_yaml(text)?, &Cli::default())
    }

    #[test]
    fn defaults() {
        let c = from_yaml("").unwrap();
        assert_eq!(c.resource_name, "nitrokey.com/hsm");
        assert_eq!(
            c.devices,
            vec![DeviceMatcher {
                vendor: 0x20a0,
                product: 0x4230,
                serial: None
            }]
        );
        assert_eq!(c.shares_per_device, 2);
        assert_eq!(c.shares_per_device, DEFAULT_SHARES);
        assert_eq!(c.grace_period, Duration::from_secs(300));
        assert_eq!(c.rescan_interval, Duration::from_secs(5));
        assert_eq!(c.eviction_retry_for, Duration::from_secs(600));
        assert_eq!(c.metrics_address.port(), DEFAULT_METRICS_PORT);
        assert_eq!(
            c.plugin_dir,
            PathBuf::from("/var/lib/kubelet/device-plugins")
        );
        assert_eq!(c.metrics_address, "127.0.0.1:10291".parse().unwrap());
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.discovery, DiscoveryMode::Auto);
        assert_eq!(
            c.socket_path(),
            PathBuf::from("/var/lib/kubelet/device-plugins/nitrokey-hsm.sock")
        );
    }

    #[test]
    fn full_file() {
        let c = from_yaml(
            "resourceName: example.com/stick\n\
             devices:\n  - {vendor: \"0x20a0\", product: \"4230\"}\n  - {vendor: \"0x1050\", product: \"0407\", serial: ABC}\n\
             sharesPerDevice: 3\ngracePeriod: 1h30m\npluginDir: /tmp/dp\n\
             metricsAddress: 127.0.0.1:9999\nlogFormat: json\ndiscovery: rescan\nrescanInterval: 2s\n",
        )
        .unwrap();
        assert_eq!(c.resource_name, "example.com/stick");
        assert_eq!(
            c.devices[0],
            DeviceMatcher {
                vendor: 0x20a0,
                product: 0x4230,
                serial: None
            }
        );
        assert_eq!(
            c.devices[1],
            DeviceMatcher {
                vendor: 0x1050,
                product: 0x0407,
                serial: Some("ABC".into())
            }
        );
        assert_eq!(c.shares_per_device, 3);
        assert_eq!(c.grace_period, Duration::from_secs(5400));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.discovery, DiscoveryMode::Rescan);
        assert_eq!(c.rescan_interval, Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_field() {
        for (yaml, field) in [
            ("resourceNam: x/y\n", "resourceNam"),
            ("sharesPerDevice: many\n", "sharesPerDevice"),
            ("sharesPerDevice: 0\n", "sharesPerDevice"),
            ("gracePeriod: soon\n", "gracePeriod"),
            ("devices:\n  - {vendor: zz, product: \"4230\"}\n", "vendor"),
            ("devices:\n  - {vendor: \"0x20a0\"}\n", "product"),
            (
                "devices:\n  - {vendor: \"20a0\", product: 4230}\n",
                "product",
            ),
            (
                "devices:\n  - {vendor: 0x20a0, product: \"4230\"}\n",
                "vendor",
            ),
            ("gracePeriod: 8d\n", "gracePeriod"),
            ("gracePeriod: 18446744073709551615\n", "gracePeriod"),
            ("rescanInterval: 2h\n", "rescanInterval"),
            (
                "devices:\n  - {vendor: \"0x20a0\", product: \"0x4230\", colour: red}\n",
                "colour",
            ),
            ("devices: []\n", "devices"),
            ("resourceName: hsm\n", "resourceName"),
            ("resourceName: kubernetes.io/hsm\n", "resourceName"),
            ("metricsAddress: localhost\n", "metricsAddress"),
            ("logFormat: xml\n", "logFormat"),
        ] {
            let err = from_yaml(yaml).expect_err(yaml).to_string();
            assert!(
                err.contains(field),
                "{yaml:?} gave {err:?}, which does not name {field}"
            );
        }
    }

    /// A refused value names its source: the flag, or the file (the variable is tested with
    /// the program, which reads the environment).
    #[test]
    fn a_refused_value_names_its_source() {
        for (file, args, expected) in [
            (
                "resourceName: a.com/b\n",
                &["--resource-name", "hsm"][..],
                "resourceName (from flag --resource-name): `hsm` is not",
            ),
            (
                "resourceName: hsm\n",
                &[][..],
                "resourceName (from the configuration file): `hsm` is not",
            ),
            (
                "",
                &["--metrics-address", "localhost"][..],
                "metricsAddress (from flag --metrics-address)",
            ),
            (
                "nodeLabels: api\n",
                &[][..],
                "nodeLabels (from the configuration file): api needs",
            ),
        ] {
            let flags = Flags::from_flags(args).expect("flags parse");
            let cli = Cli {
                settings: flags,
                ..Cli::default()
            };
            let err = Config::merge(FileConfig::from_yaml(file).expect("parses"), &cli)
                .expect_err(expected)
                .to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
    }

    /// Every setting's clap id is its key in the file.
    #[test]
    fn every_flag_is_named_by_its_file_key() {
        // A key the file knows fails on its value (a mapping), an unknown one on its name.
        let in_file = |id: &str| {
            let err = FileConfig::from_yaml(&format!("{id}: {{}}\n"))
                .expect_err(id)
                .to_string();
            !err.contains("unknown field")
        };
        assert!(!in_file("resourcename"));
        let command = Settings::augment_args(clap::Command::new("device-plugin"));
        let mut checked = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            assert!(in_file(id), "{id} is not a key of the file");
            checked += 1;
        }
        assert!(checked > 15, "{checked}");
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig::from_yaml("resourceName: a.com/b\nsharesPerDevice: 4\n").unwrap();
        let c = Config::merge(
            file,
            &cli(&[
                "--shares-per-device",
                "1",
                "--device",
                "20a0:4230:DENK1",
                "--device",
                "0x1:2",
                "--grace-period",
                "10s",
                "--plugin-dir",
                "/x",
                "--log-format",
                "json",
            ]),
        )
        .unwrap();
        assert_eq!(c.resource_name, "a.com/b");
        assert_eq!(c.shares_per_device, 1);
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[0].serial.as_deref(), Some("DENK1"));
        assert_eq!(
            c.devices[1],
            DeviceMatcher {
                vendor: 1,
                product: 2,
                serial: None
            }
        );
        assert_eq!(c.grace_period, Duration::from_secs(10));
        assert_eq!(c.plugin_dir, PathBuf::from("/x"));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn device_flag_syntax() {
        assert!("20a0".parse::<DeviceMatcher>().is_err());
        assert!("20a0:".parse::<DeviceMatcher>().is_err());
        assert!("20a0:4230:".parse::<DeviceMatcher>().is_err());
        assert!("12345:1".parse::<DeviceMatcher>().is_err());
        assert_eq!(
            "0X20A0:4230".parse::<DeviceMatcher>().unwrap(),
            DeviceMatcher::default()
        );
        assert!(Cli::try_parse_from(["device-plugin", "--device", "nope"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("1s 500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "m", "5x", "-5s", "five"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn huge_durations_are_refused_not_overflowed() {
        assert_eq!(parse_duration("366d").unwrap(), MAX_DURATION);
        for huge in [
            "18446744073709551615",
            "99999999999999999999999",
            "3000000000000000h",
            "10000000000000000000s10000000000000000000s",
            "366d1s",
            "9999999999999999999999999999999999999999.5d",
        ] {
            let err = parse_duration(huge).expect_err(huge);
            assert!(err.contains("longest accepted"), "{huge}: {err}");
            assert!(err.len() < 200, "{huge}: message echoes too much: {err}");
        }
        let flag = Cli::try_parse_from(["device-plugin", "--grace-period", "3000000000000000h"]);
        assert!(flag.is_err());
        let c = Config::merge(
            FileConfig::default(),
            &cli(&["--grace-period", "7d", "--rescan-interval", "1h"]),
        )
        .unwrap();
        assert_eq!(c.grace_period, MAX_GRACE_PERIOD);
        let err = Cli::try_parse_from(["device-plugin", "--grace-period", "8d"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--grace-period"), "{err}");
    }

    #[test]
    fn out_of_range_durations_are_quoted_as_written() {
        for (parse, text, expected) in [
            (
                parse_grace_period as fn(&str) -> _,
                "8d",
                "`8d` is longer than 7d",
            ),
            (parse_grace_period, " 169h ", "`169h` is longer than 7d"),
            (
                parse_eviction_retry_for,
                "1d1s",
                "`1d1s` is longer than 24h",
            ),
            (
                parse_rescan_interval,
                "99ms",
                "`99ms` is shorter than 100ms",
            ),
            (parse_rescan_interval, "61m", "`61m` is longer than 1h"),
        ] {
            assert_eq!(parse(text).expect_err(text), expected);
        }
        assert_eq!(parse_grace_period("7d").unwrap(), MAX_GRACE_PERIOD);
        assert_eq!(parse_rescan_interval("100ms").unwrap(), MIN_RESCAN_INTERVAL);
        let err = from_yaml("gracePeriod: 8d\n").unwrap_err().to_string();
        assert!(
            err.contains("gracePeriod") && err.contains("`8d` is longer than 7d"),
            "{err}"
        );
        let err = from_yaml("gracePeriod: 691200\n").unwrap_err().to_string();
        assert!(err.contains("`691200` is longer than 7d"), "{err}");
        // A configuration built in code is still checked, and shown in the same units.
        let mut c = from_yaml("").unwrap();
        c.grace_period = Duration::from_secs(8 * 24 * 3600);
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("gracePeriod: 8days is longer than 7d"),
            "{err}"
        );
    }

    #[test]
    fn bare_yaml_numbers_are_not_usb_ids() {
        for yaml in [
            "devices:\n  - {vendor: \"20a0\", product: 4230}\n",
            "devices:\n  - {vendor: \"20a0\", product: 0x4230}\n",
            "devices:\n  - {vendor: \"20a0\", product: -1}\n",
        ] {
            let err = from_yaml(yaml).expect_err(yaml).to_string();
            assert!(err.contains("product"), "{err}");
            assert!(err.contains("quoted hex"), "{err}");
        }
        let c = from_yaml("devices:\n  - {vendor: \"20a0\", product: \"4230\"}\n").unwrap();
        assert_eq!(c.devices, vec![DeviceMatcher::default()]);
    }

    #[test]
    fn metrics_address_defaults_to_the_node_ip() {
        assert_eq!(
            resolve_metrics_address(":10291", None).unwrap(),
            "127.0.0.1:10291".parse().unwrap()
        );
        assert_eq!(
            resolve_metrics_address(":80", Some("10.1.2.3".parse().unwrap())).unwrap(),
            "10.1.2.3:80".parse().unwrap()
        );
        assert_eq!(
            resolve_metrics_address(":80", Some("fd00::1".parse().unwrap())).unwrap(),
            "[fd00::1]:80".parse().unwrap()
        );
        assert_eq!(
            resolve_metrics_address("0.0.0.0:9", Some("10.1.2.3".parse().unwrap())).unwrap(),
            "0.0.0.0:9".parse().unwrap()
        );
        assert!(resolve_metrics_address(":http", None).is_err());
        assert!(resolve_metrics_address(":70000", None).is_err());
        let c = Config::merge(FileConfig::default(), &cli(&["--node-ip", "192.0.2.7"])).unwrap();
        assert_eq!(c.metrics_address, "192.0.2.7:10291".parse().unwrap());
        let err = Config::merge(FileConfig::default(), &cli(&["--node-ip", "node-1"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("NODE_IP"), "{err}");
    }

    #[test]
    fn matcher_serial() {
        let any = DeviceMatcher::default();
        let one = DeviceMatcher {
            serial: Some("A".into()),
            ..DeviceMatcher::default()
        };
        assert!(any.matches(0x20a0, 0x4230, None));
        assert!(one.matches(0x20a0, 0x4230, Some("A")));
        assert!(!one.matches(0x20a0, 0x4230, Some("B")));
        assert!(!one.matches(0x20a0, 0x4230, None));
        assert!(!any.matches(0x20a0, 0x4231, None));
    }

    #[test]
    fn resource_names() {
        assert!(validate_resource_name("nitrokey.com/hsm").is_ok());
        assert!(validate_resource_name("example.com/hsm_1.a").is_ok());
        for bad in [
            "hsm",
            "/hsm",
            "Nitrokey.com/hsm",
            "nitrokey.com/",
            "x.kubernetes.io/hsm",
            "nitrokey.com/-hsm",
            "nitrokey.com/a/b",
        ] {
            assert!(validate_resource_name(bad).is_err(), "{bad}");
        }
    }
}
