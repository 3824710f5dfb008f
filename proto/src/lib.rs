//! The kubelet's device-plugin gRPC API (v1beta1) and pod-resources API (v1).
//!
//! # Layout
//!
//! `deviceplugin/v1beta1/api.proto` and `podresources/v1/api.proto` are the wire contracts,
//! field for field the published kubelet APIs. `build.rs` turns them into Rust at build time;
//! this crate only re-exports the result and the constants both sides of the protocol agree
//! on, so the device plugin and the kubelet stand-in used by the tests share one definition.

/// Generated messages, clients (`*_client`) and servers (`*_server`) of package `v1beta1`.
/// (The upstream comments write paths as `<dir>/kubelet.sock`, which rustdoc takes for HTML.)
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::invalid_html_tags
)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}

/// Generated messages, client and server of the pod-resources API, package `v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::invalid_html_tags
)]
pub mod podresources_v1 {
    tonic::include_proto!("v1");
}

/// Where the kubelet serves the pod-resources API.
pub const POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

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
