//! The kubelet device-plugin gRPC API, version v1beta1.
//!
//! # Layout
//!
//! `deviceplugin/v1beta1/api.proto` is the wire contract, field for field the published kubelet
//! API. `build.rs` turns it into Rust at build time; this crate only re-exports the result and
//! the constants both sides of the protocol agree on, so the device plugin and the kubelet
//! stand-in used by the tests share one definition.

/// Generated messages, clients (`*_client`) and servers (`*_server`) of package `v1beta1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}

/// API version string sent in `RegisterRequest.version`.
pub const VERSION: &str = "v1beta1";
/// Default directory holding the kubelet socket and the plugins' sockets.
pub const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// File name of the kubelet's registration socket inside the device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// Health string of a device the kubelet may allocate.
pub const HEALTHY: &str = "Healthy";
/// Health string of a device the kubelet must not allocate.
pub const UNHEALTHY: &str = "Unhealthy";
/// Longest device ID the kubelet accepts.
pub const MAX_DEVICE_ID_LEN: usize = 63;
