//! Names the plugin shares with the world outside its process: files it serves or writes and
//! the environment it hands to containers. At the bottom of the crate: imports nothing of it,
//! so that configuration and every module using these names can depend on it without cycles.

/// File name of the plugin's socket inside the device-plugin directory.
pub const SOCKET_NAME: &str = "nitrokey-hsm.sock";
/// Environment variable `Allocate` sets in the container: the allocated sticks' serial
/// numbers, comma-separated.
pub const ENV_SERIALS: &str = "NITROKEY_HSM_SERIALS";
/// Environment variable `Allocate` sets in the container: the allocated sticks' device
/// nodes, comma-separated.
pub const ENV_DEVICES: &str = "NITROKEY_HSM_DEVICES";
/// Default directory of CDI specs that runtimes read.
pub const DEFAULT_SPEC_DIR: &str = "/var/run/cdi";
/// NFD's default local feature directory (as mounted into nfd-worker).
pub const DEFAULT_NFD_DIR: &str = "/etc/kubernetes/node-feature-discovery/features.d";
/// The User-Agent of every Kubernetes API request: `nitrokey-device-plugin/<version>`.
pub const USER_AGENT: &str = concat!("nitrokey-device-plugin/", env!("CARGO_PKG_VERSION"));
