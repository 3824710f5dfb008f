//! Names this program shows to its peers. Imports nothing of the crate.

/// The User-Agent of every Kubernetes API and Vault request: `nitrokey-unseal-init/<version>`,
/// so that an API server's audit log and Vault's request log name who called.
pub const USER_AGENT: &str = concat!("nitrokey-unseal-init/", env!("CARGO_PKG_VERSION"));
