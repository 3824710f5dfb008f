//! Command line: flags and environment variables with Bank-Vaults' names, and the operator
//! subcommands. Flags (and their environment variables) override the configuration file.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

// The settings' flags are declared with the file keys they override, in the configuration.
pub use crate::config::{
    MAX_DURATION, MIN_UNSEAL_PERIOD, Overrides, parse_duration, parse_unseal_period,
};

/// Initialises and unseals Vault with unseal keys protected by a NitroKey HSM over PKCS#11.
#[derive(Debug, Parser)]
#[command(name = "unseal-init", version, about)]
pub struct Cli {
    /// YAML configuration file.
    #[arg(long, env = "UNSEAL_INIT_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// Settings that override the configuration file (declared in [`crate::config::Settings`]).
    #[command(flatten)]
    pub overrides: Overrides,

    /// Operator subcommand; without one the program initialises and unseals Vault.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and manage the HSM (replaces the manual pkcs11-tool steps).
    Hsm {
        /// What to do.
        #[command(subcommand)]
        command: HsmCommand,
    },
    /// Rotate Vault's unseal keys (`sys/rekey`) with the keys in the store, and store the new
    /// ones; an earlier rekey left unfinished is finished instead.
    Rekey {
        /// New number of key shares. [default: Vault's current]
        #[arg(long = "secret-shares")]
        secret_shares: Option<u8>,
        /// New number of shares needed to unseal. [default: Vault's current]
        #[arg(long = "secret-threshold")]
        secret_threshold: Option<u8>,
    },
}

/// `hsm` subcommands.
#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Library, slots, tokens and mechanisms.
    Info,
    /// Generate the RSA-2048 key pair `keyLabel` on the token if it does not exist.
    Keygen,
    /// The key pair and the stored objects.
    List,
    /// Delete stored objects with a label (explicit confirmation required).
    Delete {
        /// Label of the data objects to delete (e.g. `vault-test`).
        #[arg(long)]
        label: String,
        /// Confirm the deletion; without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
    /// Re-write values stored by Bank-Vaults (no header) in the current format.
    Migrate,
    /// Break-glass: decrypt one stored value (e.g. `vault-root`) and write it to stdout only.
    /// A newline follows only on a terminal, so piped output is the exact value.
    Reveal {
        /// Name of the stored value: `vault-root`, `vault-unseal-N`, `vault-test`.
        name: String,
        /// Print even when stdout is a terminal (the value then stays on screen and in the
        /// terminal's scrollback).
        #[arg(long)]
        yes: bool,
    },
    /// Read a value from stdin (a trailing newline dropped) and store it under NAME,
    /// encrypted as the program stores values, e.g. a new root token from `operator
    /// generate-root`.
    Store {
        /// Name to store it under, e.g. `vault-root`.
        name: String,
        /// Replace a different value already stored under NAME.
        #[arg(long)]
        force: bool,
    },
    /// Write every stored value, as the ciphertext it is stored as, to FILE (mode 0600).
    Backup {
        /// The backup file to write; `-` for stdout.
        file: PathBuf,
        /// Replace FILE when it exists.
        #[arg(long)]
        force: bool,
    },
    /// Put the values of a backup FILE into the store (the token, or the Secret in mode
    /// hsm-k8s), each verified to decrypt with this token's key pair.
    Restore {
        /// The backup file to read; `-` for stdin.
        file: PathBuf,
        /// Replace values stored under the same names that differ from the backup's.
        #[arg(long)]
        force: bool,
    },
    /// Generate a new key pair on the token, re-encrypt every stored value to it, verify, and
    /// switch `keyLabel` to it; the old pair is kept under `<keyLabel>-retired-<fingerprint>`
    /// An interrupted rotation is finished by the next start.
    RotateKey {
        /// Delete the old key pair at the end instead of keeping it retired.
        #[arg(long)]
        delete_old: bool,
        /// Mode hsm-k8s: confirm that this stick is the only one holding the key pair (other
        /// sticks would keep only the old pair and could no longer read the Secret).
        #[arg(long)]
        yes_single_stick: bool,
    },
}

impl Cli {
    /// Parses the process's arguments. An invalid value that came from an environment variable
    /// is reported under the variable's name, which is what has to be fixed (clap names the
    /// flag, which the user may never have typed).
    pub fn parse_env_aware() -> Self {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        match Self::try_parse_from(&args) {
            Ok(cli) => cli,
            Err(e) => match env_source(&e, &args) {
                Some(var) => {
                    let first = e.to_string();
                    let first = first.lines().next().unwrap_or_default();
                    let reason = first.trim_start_matches("error: ");
                    clap::Error::raw(e.kind(), format!("environment variable {var}: {reason}\n"))
                        .exit()
                }
                None => e.exit(),
            },
        }
    }
}

/// The environment variable an invalid value came from, when it did not come from `args`.
fn env_source(e: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let ContextValue::String(arg) = e.get(ContextKind::InvalidArg)? else {
        return None;
    };
    let flag = arg.split_whitespace().next()?;
    let typed = args.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&format!("{flag}="))
    });
    if typed {
        return None;
    }
    let cmd = Cli::command();
    let mut all = cmd.get_arguments().collect::<Vec<_>>();
    for sub in cmd.get_subcommands() {
        all.extend(sub.get_arguments());
    }
    let var = all
        .into_iter()
        .find(|a| a.get_long().is_some_and(|l| format!("--{l}") == flag))?
        .get_env()?;
    std::env::var_os(var).map(|_| var.to_string_lossy().into_owned())
}
