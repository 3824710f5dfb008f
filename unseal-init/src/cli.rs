//! Command line: flags and environment variables with Bank-Vaults' names, and the operator
//! subcommands. Flags (and their environment variables) override the configuration file.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Longest accepted duration anywhere in the configuration.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Shortest accepted `unsealPeriod`: a pass is an HTTP round trip to Vault, and anything
/// faster only burns CPU in both processes.
pub const MIN_UNSEAL_PERIOD: Duration = Duration::from_millis(100);

/// Parses a duration such as `500ms`, `5s`, `2m`, `1h30m` (humantime's grammar; a bare number
/// means seconds, as Bank-Vaults' flags take it). Zero and anything above [`MAX_DURATION`] are
/// refused, so no later arithmetic can overflow. Flags and the file share it, so a bad value
/// from an environment variable is reported under the variable's name (see
/// [`Cli::parse_env_aware`]).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("`{text}` is too long a duration"))?
    } else {
        humantime::parse_duration(t)
            .map_err(|e| format!("`{text}` is not a duration like 5s, 500ms or 1m ({e})"))?
    };
    if d.is_zero() {
        return Err(format!("`{text}` must be positive"));
    }
    if d > MAX_DURATION {
        return Err(format!(
            "`{text}` is longer than the maximum of {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}

/// [`parse_duration`], and at least [`MIN_UNSEAL_PERIOD`].
pub fn parse_unseal_period(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < MIN_UNSEAL_PERIOD {
        return Err(format!(
            "`{text}` is shorter than the minimum of {}",
            humantime::format_duration(MIN_UNSEAL_PERIOD)
        ));
    }
    Ok(d)
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not an address like 0.0.0.0:9091"))
}

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
    /// PKCS#11 module (shared library) path. Default: OpenSC's module, the first found of
    /// `/usr/lib/<multiarch>/opensc-pkcs11.so`, `/usr/lib/opensc-pkcs11.so`,
    /// `/usr/lib/pkcs11/opensc-pkcs11.so`.
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
    /// With --once: give up after this long (e.g. `10m`; a bare number is seconds) and exit 1.
    /// Never cuts a `sys/init` short or leaves keys unstored: it stops the run the way SIGTERM
    /// does. [default: 5m]
    #[arg(help_heading = "Running", long, env = "UNSEAL_INIT_DEADLINE", value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// How often Vault's seal status is checked in sidecar mode (e.g. `5s`, `1m`; a bare number is seconds). [default: 5s]
    #[arg(help_heading = "Running", long, env = "BANK_VAULTS_UNSEAL_PERIOD", value_parser = parse_unseal_period)]
    pub unseal_period: Option<Duration>,
    /// How long a one-shot run waits for the HSM token to appear (the sidecar waits for ever). [default: 2m]
    #[arg(
        help_heading = "HSM",
        long,
        env = "UNSEAL_INIT_TOKEN_WAIT_TIMEOUT",
        global = true,
        value_parser = parse_duration
    )]
    pub hsm_token_wait_timeout: Option<Duration>,
    /// Directory of the init write-ahead journal: a volume that outlives the container. [default: /var/lib/unseal-init]
    #[arg(help_heading = "Running", long, env = "UNSEAL_INIT_JOURNAL_DIR")]
    pub journal_dir: Option<PathBuf>,
    /// Address of the metrics and health HTTP server. [default: 0.0.0.0:9091]
    #[arg(help_heading = "Running", long, env = "UNSEAL_INIT_METRICS_ADDRESS", value_parser = parse_socket_addr)]
    pub metrics_address: Option<SocketAddr>,
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
