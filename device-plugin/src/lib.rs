//! Kubernetes device plugin advertising NitroKey HSM USB sticks to the kubelet.
//!
//! # Layout
//!
//! One concern per module, pure logic apart from I/O, in layers without import cycles
//! (checked by the `import_graph` test of the `nitrokey-e2e` crate): configuration and names at
//! the bottom, importing nothing but each other; the pure decisions ([`inventory`],
//! [`allocation`], [`replug`]) above them and below every module doing I/O; [`daemon`] on top.
//!
//! - [`names`]: the socket, environment variable and default directory names the plugin shares
//!   with the outside; [`text`]: how untrusted text is echoed (cut short).
//! - [`config`]: YAML file, flags and environment, validated into a [`config::Config`]; the
//!   file is parsed by [`nitrokey_common::yaml`], as unseal-init's is.
//! - [`usb`]: discovery with libusb: hotplug callbacks (or a rescan fallback), stick identity.
//! - [`inventory`]: pure state: sticks → units `<id>-0..N-1`, health, grace period.
//! - [`allocation`]: pure choice of units for `GetPreferredAllocation`.
//! - [`state`]: the inventory shared with the gRPC server, publishing every change.
//! - [`server`]: the `DevicePlugin` gRPC service on the plugin's unix socket.
//! - [`kubelet`]: `Register`, and the directory watch that re-serves and re-registers when
//!   the kubelet restarts.
//! - [`replug`]: pure decisions about pods holding a stick that came back at another address;
//!   [`recovery`] carries them out (pod-resources API, Events, evictions).
//! - [`api_client`]: the Kubernetes API client of [`recovery`] and [`labels`] (User-Agent,
//!   bounded answers, and whether kube retries 429s or the caller does).
//! - [`cdi`]: the optional CDI spec matching what `Allocate` hands out.
//! - [`labels`]: node labels (`nitrokey.com/hsm.present`, `.count`) through the API or an NFD
//!   feature file.
//! - [`metrics`], [`http`], [`telemetry`]: Prometheus metrics, health endpoints, logging
//!   ([`nitrokey_common::logging`] plus the layer that names a too-old kubelet).
//! - [`dra`]: the Dynamic Resource Allocation mode (ResourceSlices, the kubelet's DRA node
//!   service, a CDI spec per prepared claim), on the same discovery and inventory.
//! - [`daemon`]: wires everything together; `main.rs` only parses flags and sets exit codes.

pub mod allocation;
pub mod api_client;
pub mod cdi;
pub mod config;
pub mod daemon;
pub mod dra;
pub mod http;
pub mod inventory;
pub mod kubelet;
pub mod labels;
pub mod metrics;
pub mod names;
pub mod recovery;
pub mod replug;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod text;
pub mod usb;
