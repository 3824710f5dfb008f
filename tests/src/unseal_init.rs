//! The `unseal-init` sidecar as the demo and the end-to-end tests start it: against one token
//! (SoftHSM2 or the TPM) and one OpenBao, with the PIN in the environment, its own journal
//! directory and `/metrics` on a given port.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context;

use crate::bins;
use crate::softhsm::{KEY_LABEL, USER_PIN};
use crate::token::Token;

/// A `unseal-init` command bound to `token` and the Vault at `vault_address`; the caller adds
/// the mode (`--once`, `--unseal-period`) and where the output goes. Stdin is closed: the
/// sidecar never reads it.
pub fn command(
    token: &dyn Token,
    vault_address: &str,
    journal_dir: &Path,
    metrics_port: u16,
) -> anyhow::Result<std::process::Command> {
    let mut command =
        std::process::Command::new(bins::path("unseal-init").context("unseal-init built")?);
    command
        .envs(token.env())
        .env("BANK_VAULTS_HSM_PIN", USER_PIN)
        // The address comes from the flag alone, whatever the caller's shell exports.
        .env_remove("VAULT_ADDR")
        .env("NO_COLOR", "1")
        .arg("--vault-addr")
        .arg(vault_address)
        .arg("--hsm-module-path")
        .arg(token.module())
        .arg("--hsm-slot-id")
        .arg(token.slot_id().to_string())
        .arg("--hsm-key-label")
        .arg(KEY_LABEL)
        .arg("--journal-dir")
        .arg(journal_dir)
        .arg("--metrics-address")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .stdin(Stdio::null());
    Ok(command)
}
