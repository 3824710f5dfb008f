//! The kubelet's device-plugin gRPC API (v1beta1), pod-resources API (v1), plugin registration
//! API (v1) and DRA node service (v1, v1beta1).
//!
//! # Layout
//!
//! `deviceplugin/v1beta1/api.proto`, `podresources/v1/api.proto`, `pluginregistration/v1/api.proto`
//! and `dra/{v1,v1beta1}/api.proto` are the wire contracts,
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

/// Generated messages, client and server of the kubelet's plugin registration API (package
/// `pluginregistration`, version v1), through which a DRA driver announces itself.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pluginregistration_v1 {
    tonic::include_proto!("pluginregistration");
}

/// Generated messages, client and server of the kubelet's DRA node service, version v1.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod dra_v1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
}

/// Generated messages, client and server of the kubelet's DRA node service, version v1beta1
/// (what kubelets of 1.32 and 1.33 call).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod dra_v1beta1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
}

/// Plugin type a DRA driver announces in `PluginInfo.type`.
pub const DRA_PLUGIN_TYPE: &str = "DRAPlugin";
/// The `supported_versions` entry naming the v1 DRA node service.
pub const DRA_V1_SERVICE: &str = "v1.DRAPlugin";
/// The `supported_versions` entry naming the v1beta1 DRA node service.
pub const DRA_V1BETA1_SERVICE: &str = "v1beta1.DRAPlugin";
/// Default directory the kubelet's plugin watcher watches for registration sockets.
pub const PLUGINS_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";
/// Default directory under which plugins keep their own sockets.
pub const PLUGINS_DIR: &str = "/var/lib/kubelet/plugins";
