//! `unseal-init`: initialises and unseals Vault with unseal keys and root token kept
//! encrypted by a NitroKey HSM's RSA key over PKCS#11.
//!
//! # Layout
//!
//! - [`cli`] and [`config`]: flags/env with Bank-Vaults' names and the YAML file, merged and
//!   validated into one [`config::Config`]; the file is parsed by [`nitrokey_common::yaml`],
//!   and `main.rs` sets up logging with [`nitrokey_common::logging`], as the device plugin
//!   does.
//! - [`pcscd`]: the supervised PC/SC daemon OpenSC needs for a USB stick (`hsm.daemon`).
//! - [`hsm`]: module loading, slot selection, the one-shot login and session recovery;
//!   [`pin`]: what a refused PIN leads to (remembered, never re-presented, a changed PIN
//!   file awaited);
//!   [`keypair`] finds or generates the RSA pair, decrypts on the device and probes the OAEP
//!   hash; [`crypto`] encrypts on the host with the extracted public key.
//! - [`envelope`]: the stored value format (versioned header, Bank-Vaults legacy detection).
//! - [`token_store`] (data objects on the token) and [`secret_store`] (a Kubernetes Secret),
//!   behind [`storage::Storage`]; [`keyring`] ties encryption, storage and verification.
//! - [`vault`]: the HTTP client; [`unseal`]: pure decisions (what to do next given Vault's
//!   status and the store); [`runner`]: the passes that act on those decisions (the init
//!   step, `sys/init` to the last stored key, in `runner/init.rs`);
//!   [`sidecar`]: the long-running mode around them, which outlives a refused PIN. Their
//!   retries (and [`hsm_actor`]'s, [`pcscd`]'s) wait with [`nitrokey_common::backoff`].
//! - [`rekey`]: rotating Vault's unseal keys (`unseal-init rekey`), the decisions; the I/O
//!   in `runner/rekey.rs`, with the same write-ahead journal as the init step.
//! - [`rotation`]: rotating the token's key pair (`hsm rotate-key`), the decisions; the I/O
//!   in `runner/rotate.rs`, settled at every start before the key pair is looked up.
//! - `memory_vault` (tests only): an in-memory Vault behind [`vault::VaultApi`].
//! - [`telemetry`]: Prometheus metrics, `/healthz`, `/readyz`; [`commands`]: `hsm ...`
//!   subcommands; [`secret`]: the zeroizing, redacted type every secret lives in.
//! - [`backup`]: the `hsm backup` file format and the restore's decisions (pure; the
//!   commands do the I/O).
//!
//! Data flows config → hsm/keypair → keyring(storage) → runner ⇄ vault, with telemetry
//! observing the HSM and Vault calls.

pub mod backup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod envelope;
pub mod hsm;
pub mod hsm_actor;
pub mod journal;
pub mod keypair;
pub mod keyring;
#[cfg(test)]
pub mod memory_vault;
pub mod names;
pub mod pcscd;
pub mod pin;
pub mod pkcs11_raw;
pub mod rekey;
pub mod rotation;
pub mod runner;
pub mod secret;
pub mod secret_store;
pub mod shutdown;
pub mod sidecar;
pub mod storage;
pub mod telemetry;
pub mod token_store;
pub mod unseal;
pub mod vault;

/// A destructive command was run without its confirmation flag (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfirmationRequired(pub String);

/// Process exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Runtime failure (Vault, token, storage).
    pub const FAILURE: i32 = 1;
    /// Invalid configuration or usage.
    pub const CONFIG: i32 = 2;
    /// The PIN was rejected or is blocked (`--once` and subcommands); never retried.
    pub const PIN: i32 = 3;
}
