//! Command line: flags and environment variables with Bank-Vaults' names, and the operator
//! subcommands. Flags (and their environment variables) override the configuration file.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Initialises and unseals Vault with unseal keys protected by a NitroKey HSM over PKCS#11.
#[derive(Debug, Parser)]
#[command(name = "unseal-init", version, about)]
pub struct Cli {
    /// YAML configuration file.
    #[arg(long, env = "UNSEAL_INIT_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// Settings that override the configuration file.
    #[command(flatten)]
    pub overrides: Overrides,

    /// Operator subcommand; without one the program initialises and unseals Vault.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags shared by the sidecar and the subcommands.
#[derive(Debug, Default, Args)]
pub struct Overrides {
    /// Storage mode: `hsm` (objects on the token) or `hsm-k8s` (Kubernetes Secret).
    #[arg(long, env = "BANK_VAULTS_MODE", global = true)]
    pub mode: Option<String>,
    /// Vault address (default: the file's `vault.address`, then $VAULT_ADDR).
    #[arg(long, global = true)]
    pub vault_addr: Option<String>,
    /// PEM CA certificate for Vault's TLS (default: the file's `vault.caCert`, then $VAULT_CACERT).
    #[arg(long, global = true)]
    pub vault_cacert: Option<PathBuf>,
    /// Raft leader this Vault joins when it is not initialised.
    #[arg(long, env = "BANK_VAULTS_RAFT_LEADER_ADDRESS", global = true)]
    pub raft_leader_address: Option<String>,
    /// Start and supervise pcscd (needed by OpenSC for USB tokens).
    #[arg(long, env = "BANK_VAULTS_HSM_DAEMON", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub hsm_daemon: Option<bool>,
    /// PKCS#11 module (shared library) path.
    #[arg(long, env = "BANK_VAULTS_HSM_MODULE_PATH", global = true)]
    pub hsm_module_path: Option<PathBuf>,
    /// Slot id to use (preferred with OpenSC).
    #[arg(long, env = "BANK_VAULTS_HSM_SLOT_ID", global = true)]
    pub hsm_slot_id: Option<u64>,
    /// Token label to select the slot by (padding and OpenSC decorations tolerated).
    #[arg(long, env = "BANK_VAULTS_HSM_TOKEN_LABEL", global = true)]
    pub hsm_token_label: Option<String>,
    /// Token serial number to select the slot by.
    #[arg(long, env = "BANK_VAULTS_HSM_TOKEN_SERIAL", global = true)]
    pub hsm_token_serial: Option<String>,
    /// User PIN (prefer the environment variable or a PIN file).
    #[arg(
        long,
        env = "BANK_VAULTS_HSM_PIN",
        global = true,
        hide_env_values = true
    )]
    pub hsm_pin: Option<String>,
    /// File holding the user PIN (e.g. a mounted Secret).
    #[arg(long, env = "BANK_VAULTS_HSM_PIN_FILE", global = true)]
    pub hsm_pin_file: Option<PathBuf>,
    /// Label of the RSA key pair.
    #[arg(long, env = "BANK_VAULTS_HSM_KEY_LABEL", global = true)]
    pub hsm_key_label: Option<String>,
    /// Generate the RSA key pair on the token when it is missing.
    #[arg(long, env = "BANK_VAULTS_HSM_GENERATE_KEY", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub hsm_generate_key: Option<bool>,
    /// Number of unseal key shares Vault is initialised with.
    #[arg(long, env = "BANK_VAULTS_SECRET_SHARES", global = true)]
    pub secret_shares: Option<u8>,
    /// Number of shares needed to unseal.
    #[arg(long, env = "BANK_VAULTS_SECRET_THRESHOLD", global = true)]
    pub secret_threshold: Option<u8>,
    /// Store the root token (`vault-root`).
    #[arg(long, env = "BANK_VAULTS_STORE_ROOT_TOKEN", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub store_root_token: Option<bool>,
    /// Write, read back and decrypt `vault-test` before touching Vault.
    #[arg(long, env = "BANK_VAULTS_PRE_FLIGHT_CHECKS", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub pre_flight_checks: Option<bool>,
    /// Initialise Vault even though unseal keys from an earlier Vault are in the store
    /// (they are replaced).
    #[arg(long, env = "BANK_VAULTS_OVERWRITE_EXISTING_KEYS", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_existing_keys: Option<bool>,
    /// Namespace of the Kubernetes Secret (mode hsm-k8s).
    #[arg(long, env = "BANK_VAULTS_K8S_SECRET_NAMESPACE", global = true)]
    pub k8s_secret_namespace: Option<String>,
    /// Name of the Kubernetes Secret (mode hsm-k8s).
    #[arg(long, env = "BANK_VAULTS_K8S_SECRET_NAME", global = true)]
    pub k8s_secret_name: Option<String>,
    /// One pass (initialise if needed, unseal, exit) instead of watching.
    #[arg(long, env = "BANK_VAULTS_ONCE", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub once: Option<bool>,
    /// How often Vault's seal status is checked in sidecar mode (e.g. `5s`, `1m`).
    #[arg(long, env = "BANK_VAULTS_UNSEAL_PERIOD", global = true)]
    pub unseal_period: Option<String>,
    /// Address of the metrics and health HTTP server.
    #[arg(long, env = "UNSEAL_INIT_METRICS_ADDRESS", global = true)]
    pub metrics_address: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(
        long,
        env = "UNSEAL_INIT_LOG_FORMAT",
        global = true,
        default_value = "text"
    )]
    pub log_format: String,
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
}
