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
    /// Storage mode: `hsm` (objects on the token) or `hsm-k8s` (Kubernetes Secret). [default: hsm]
    #[arg(
        help_heading = "Storage",
        long,
        env = "BANK_VAULTS_MODE",
        global = true
    )]
    pub mode: Option<String>,
    /// Vault address (default: the file's `vault.address`, then $VAULT_ADDR). [default: $VAULT_ADDR, then http://127.0.0.1:8200]
    #[arg(help_heading = "Vault", long)]
    pub vault_addr: Option<String>,
    /// PEM CA certificate for Vault's TLS (default: the file's `vault.caCert`, then $VAULT_CACERT). [default: $VAULT_CACERT, else the built-in web roots]
    #[arg(help_heading = "Vault", long)]
    pub vault_cacert: Option<PathBuf>,
    /// Raft leader this Vault joins when it is not initialised.
    #[arg(help_heading = "Vault", long, env = "BANK_VAULTS_RAFT_LEADER_ADDRESS")]
    pub raft_leader_address: Option<String>,
    /// Start and supervise pcscd (needed by OpenSC for USB tokens). [default: false]
    #[arg(help_heading = "HSM", long, env = "BANK_VAULTS_HSM_DAEMON", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub hsm_daemon: Option<bool>,
    /// PKCS#11 module (shared library) path. [default: /usr/lib/opensc-pkcs11.so]
    #[arg(
        help_heading = "HSM",
        long,
        env = "BANK_VAULTS_HSM_MODULE_PATH",
        global = true
    )]
    pub hsm_module_path: Option<PathBuf>,
    /// Slot id to use (preferred with OpenSC).
    #[arg(
        help_heading = "HSM",
        long,
        env = "BANK_VAULTS_HSM_SLOT_ID",
        global = true
    )]
    pub hsm_slot_id: Option<u64>,
    /// Token label to select the slot by (padding and OpenSC decorations tolerated).
    #[arg(
        help_heading = "HSM",
        long,
        env = "BANK_VAULTS_HSM_TOKEN_LABEL",
        global = true
    )]
    pub hsm_token_label: Option<String>,
    /// Token serial number to select the slot by.
    #[arg(
        help_heading = "HSM",
        long,
        env = "BANK_VAULTS_HSM_TOKEN_SERIAL",
        global = true
    )]
    pub hsm_token_serial: Option<String>,
    /// User PIN. Prefer a PIN file: a flag is visible to every process on the node in
    /// /proc/PID/cmdline, an environment variable to this container's processes.
    #[arg(
        help_heading = "HSM",
        long,
        env = "BANK_VAULTS_HSM_PIN",
        global = true,
        hide_env_values = true
    )]
    pub hsm_pin: Option<crate::secret::Secret>,
    /// File holding the user PIN (e.g. a mounted Secret).
    #[arg(
        help_heading = "HSM",
        long,
        env = "BANK_VAULTS_HSM_PIN_FILE",
        global = true
    )]
    pub hsm_pin_file: Option<PathBuf>,
    /// Label of the RSA key pair. [default: bank-vaults]
    #[arg(
        help_heading = "HSM",
        long,
        env = "BANK_VAULTS_HSM_KEY_LABEL",
        global = true
    )]
    pub hsm_key_label: Option<String>,
    /// Generate the RSA key pair on the token when it is missing. [default: false]
    #[arg(help_heading = "HSM", long, env = "BANK_VAULTS_HSM_GENERATE_KEY", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub hsm_generate_key: Option<bool>,
    /// Number of unseal key shares Vault is initialised with. [default: 5]
    #[arg(help_heading = "Init options", long, env = "BANK_VAULTS_SECRET_SHARES")]
    pub secret_shares: Option<u8>,
    /// Number of shares needed to unseal. [default: 3]
    #[arg(
        help_heading = "Init options",
        long,
        env = "BANK_VAULTS_SECRET_THRESHOLD"
    )]
    pub secret_threshold: Option<u8>,
    /// Store the root token (`vault-root`). [default: true]
    #[arg(help_heading = "Init options", long, env = "BANK_VAULTS_STORE_ROOT_TOKEN", num_args = 0..=1, default_missing_value = "true")]
    pub store_root_token: Option<bool>,
    /// Write, read back and decrypt `vault-test` before touching Vault. [default: true]
    #[arg(help_heading = "Init options", long, env = "BANK_VAULTS_PRE_FLIGHT_CHECKS", num_args = 0..=1, default_missing_value = "true")]
    pub pre_flight_checks: Option<bool>,
    /// Initialise Vault even though unseal keys from an earlier Vault are in the store
    /// (they are replaced). [default: false]
    #[arg(help_heading = "Init options", long, env = "BANK_VAULTS_OVERWRITE_EXISTING_KEYS", num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_existing_keys: Option<bool>,
    /// Namespace of the Kubernetes Secret (mode hsm-k8s). [default: the pod's namespace]
    #[arg(
        help_heading = "Storage",
        long,
        env = "BANK_VAULTS_K8S_SECRET_NAMESPACE",
        global = true
    )]
    pub k8s_secret_namespace: Option<String>,
    /// Name of the Kubernetes Secret (mode hsm-k8s).
    #[arg(
        help_heading = "Storage",
        long,
        env = "BANK_VAULTS_K8S_SECRET_NAME",
        global = true
    )]
    pub k8s_secret_name: Option<String>,
    /// One pass (initialise if needed, unseal, exit) instead of watching. [default: false: run as a sidecar]
    #[arg(help_heading = "Running", long, env = "BANK_VAULTS_ONCE", num_args = 0..=1, default_missing_value = "true")]
    pub once: Option<bool>,
    /// With --once: give up after this long (e.g. `10m`) and exit 1. Never cuts a `sys/init`
    /// short or leaves keys unstored: it stops the run the way SIGTERM does. [default: none]
    #[arg(help_heading = "Running", long, env = "UNSEAL_INIT_DEADLINE")]
    pub deadline: Option<String>,
    /// How often Vault's seal status is checked in sidecar mode (e.g. `5s`, `1m`). [default: 5s]
    #[arg(help_heading = "Running", long, env = "BANK_VAULTS_UNSEAL_PERIOD")]
    pub unseal_period: Option<String>,
    /// How long a one-shot run waits for the HSM token to appear (the sidecar waits for ever). [default: 2m]
    #[arg(
        help_heading = "HSM",
        long,
        env = "UNSEAL_INIT_TOKEN_WAIT_TIMEOUT",
        global = true
    )]
    pub hsm_token_wait_timeout: Option<String>,
    /// Directory of the init write-ahead journal: a volume that outlives the container. [default: /var/lib/unseal-init]
    #[arg(help_heading = "Running", long, env = "UNSEAL_INIT_JOURNAL_DIR")]
    pub journal_dir: Option<PathBuf>,
    /// Address of the metrics and health HTTP server. [default: 0.0.0.0:9091]
    #[arg(help_heading = "Running", long, env = "UNSEAL_INIT_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(
        help_heading = "Running",
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
