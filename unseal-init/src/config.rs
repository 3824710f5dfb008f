//! Configuration: the YAML file in Bank-Vaults' shape, merged with flags and environment, and
//! validated into one [`Config`] the rest of the program reads.
//!
//! Every setting is declared once, in [`Settings`]: its file key (the clap id, which is also
//! the serde path), its flag, its `BANK_VAULTS_*` environment variable and its default. clap
//! reads flags and variables and says where each value came from ([`clap::parser::ValueSource`]);
//! the file is parsed by [`nitrokey_common::yaml`] (errors name field, line and column).
//!
//! Precedence: flags (and their environment variables) over the file over built-in defaults;
//! the Vault address and CA fall back to `VAULT_ADDR` / `VAULT_CACERT` after the file, and the
//! module path to the OpenSC module found on this machine. Every problem becomes a
//! [`ConfigError`] naming the field and where its value came from, which `main` turns into
//! exit 2.

use crate::secret::Secret;
use clap::{ArgMatches, Args, FromArgMatches};
use nitrokey_common::layers::Flags;
pub use nitrokey_common::layers::{Layered, Source};
use serde::Deserialize;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// A configuration problem; always names the offending field or file.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema (unknown field, wrong type...).
    #[error("invalid configuration file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// The YAML parser's message, which names the field and position.
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("invalid value for {field}{from}: {reason}")]
    Invalid {
        /// Field, in the file's dotted camelCase form.
        field: &'static str,
        /// Where the value came from (` (from flag --x)`), empty when that adds nothing.
        from: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        from: String::new(),
        reason: reason.into(),
    }
}

/// An error about a value, naming `field` and where the value came from.
fn refused<T>(value: &Layered<T>, field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        from: value.source.to_string(),
        reason: reason.into(),
    }
}

/// An optional setting's value, whichever layer set it.
fn opt<T: Clone + Send + Sync + 'static>(
    flags: &Flags<Settings>,
    field: &'static str,
    file: Option<T>,
) -> Option<T> {
    flags.pick(field, file, None).map(|l| l.value)
}

/// A setting that has a declared default, so always has a value.
fn get<T: Clone + Send + Sync + 'static>(
    flags: &Flags<Settings>,
    field: &'static str,
    file: Option<T>,
) -> Result<Layered<T>, ConfigError> {
    flags
        .pick(field, file, None)
        .ok_or_else(|| invalid(field, "has no value and no default"))
}

/// Every setting, declared once. The clap `id` of each is its key in the file (the serde path),
/// so that flags, variables and the file name a value the same way, an error can say where
/// it came from, and `--help` shows which key a flag overrides (`--hsm-slot-id <hsm.slotId>`). The file holds the same settings but `once`, `deadline` and `logFormat`.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Storage mode: `hsm` (objects on the token) or `hsm-k8s` (Kubernetes Secret).
    #[arg(
        id = "mode",
        help_heading = "Storage",
        long = "mode",
        env = "BANK_VAULTS_MODE",
        global = true,
        default_value = "hsm"
    )]
    pub mode: Option<String>,
    /// Vault connection.
    #[command(flatten)]
    #[serde(default)]
    pub vault: VaultSettings,
    /// PKCS#11 settings (Bank-Vaults' `unsealConfig.hsm`).
    #[command(flatten)]
    #[serde(default)]
    pub hsm: HsmSettings,
    /// Init options (Bank-Vaults' `unsealConfig.options`).
    #[command(flatten)]
    #[serde(default)]
    pub options: OptionsSettings,
    /// Secret location for `hsm-k8s`.
    #[command(flatten)]
    #[serde(default)]
    pub kubernetes: KubernetesSettings,
    /// How often Vault's seal status is checked in sidecar mode (e.g. `5s`, `1m`; a bare number
    /// is seconds).
    #[arg(id = "unsealPeriod", help_heading = "Running", long = "unseal-period",
          env = "BANK_VAULTS_UNSEAL_PERIOD", value_parser = parse_unseal_period, default_value = "5s")]
    #[serde(default, deserialize_with = "plain::unseal_period")]
    pub unseal_period: Option<Duration>,
    /// Address of the metrics and health HTTP server.
    #[arg(id = "metricsAddress", help_heading = "Running", long = "metrics-address",
          env = "UNSEAL_INIT_METRICS_ADDRESS", value_parser = parse_socket_addr,
          default_value = "0.0.0.0:9091")]
    #[serde(default, deserialize_with = "plain::socket_addr")]
    pub metrics_address: Option<SocketAddr>,
    /// Directory of the init write-ahead journal: a volume that outlives the container.
    #[arg(id = "journalDir", help_heading = "Running", long = "journal-dir",
          env = "UNSEAL_INIT_JOURNAL_DIR", default_value = DEFAULT_JOURNAL_DIR)]
    pub journal_dir: Option<PathBuf>,
    /// One pass (initialise if needed, unseal, exit) instead of watching. [default: false: run
    /// as a sidecar]
    #[arg(id = "once", help_heading = "Running", long = "once", value_name = "BOOL", env = "BANK_VAULTS_ONCE",
          num_args = 0..=1, default_missing_value = "true", default_value = "false",
          hide_default_value = true)]
    #[serde(skip)]
    pub once: Option<bool>,
    /// With --once: give up after this long (e.g. `10m`; a bare number is seconds) and exit 1.
    /// Never cuts a `sys/init` short or leaves keys unstored: it stops the run the way SIGTERM
    /// does.
    #[arg(id = "deadline", help_heading = "Running", long = "deadline", value_name = "DURATION",
          env = "UNSEAL_INIT_DEADLINE", value_parser = parse_duration, default_value = "5m")]
    #[serde(skip)]
    pub deadline: Option<Duration>,
    /// Log format: `text` or `json`.
    #[arg(
        id = "logFormat",
        help_heading = "Running",
        long = "log-format",
        value_name = "FORMAT",
        env = "UNSEAL_INIT_LOG_FORMAT",
        global = true,
        default_value = "text"
    )]
    #[serde(skip)]
    pub log_format: Option<String>,
}

/// The file's settings (the same declaration as the flags').
pub type FileConfig = Settings;

/// `vault:` section.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultSettings {
    /// Vault address. [default: the file's `vault.address`, then $VAULT_ADDR, then
    /// http://127.0.0.1:8200]
    #[arg(
        id = "vault.address",
        help_heading = "Vault",
        long = "vault-addr",
        default_value = "http://127.0.0.1:8200",
        hide_default_value = true
    )]
    pub address: Option<String>,
    /// PEM CA certificate for Vault's TLS. [default: the file's `vault.caCert`, then
    /// $VAULT_CACERT, else the built-in web roots]
    #[arg(id = "vault.caCert", help_heading = "Vault", long = "vault-cacert")]
    pub ca_cert: Option<PathBuf>,
    /// Raft leader this Vault joins when it is not initialised.
    #[arg(
        id = "vault.raftLeaderAddress",
        help_heading = "Vault",
        long = "raft-leader-address",
        env = "BANK_VAULTS_RAFT_LEADER_ADDRESS"
    )]
    pub raft_leader_address: Option<String>,
    /// The other members of this Vault's raft cluster, asked before initialising (file only).
    #[arg(skip)]
    pub raft_peers: Option<Vec<String>>,
}

/// `hsm:` section.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HsmSettings {
    /// Start and supervise pcscd (needed by OpenSC for USB tokens).
    #[arg(id = "hsm.daemon", help_heading = "HSM", long = "hsm-daemon",
          env = "BANK_VAULTS_HSM_DAEMON", global = true, num_args = 0..=1,
          default_missing_value = "true", default_value = "false")]
    #[serde(default, deserialize_with = "plain::bool")]
    pub daemon: Option<bool>,
    /// PKCS#11 module (shared library) path. Default: OpenSC's module, the first found of
    /// `/usr/lib/<multiarch>/opensc-pkcs11.so`, `/usr/lib/opensc-pkcs11.so`,
    /// `/usr/lib/pkcs11/opensc-pkcs11.so`.
    #[arg(id = "hsm.modulePath", help_heading = "HSM", long = "hsm-module-path",
          env = "BANK_VAULTS_HSM_MODULE_PATH", global = true, default_value = DEFAULT_MODULE,
          hide_default_value = true)]
    pub module_path: Option<PathBuf>,
    /// Slot id to use (preferred with OpenSC).
    #[arg(
        id = "hsm.slotId",
        help_heading = "HSM",
        long = "hsm-slot-id",
        env = "BANK_VAULTS_HSM_SLOT_ID",
        global = true
    )]
    #[serde(default, deserialize_with = "plain::u64")]
    pub slot_id: Option<u64>,
    /// Token label to select the slot by (padding and OpenSC decorations tolerated).
    #[arg(
        id = "hsm.tokenLabel",
        help_heading = "HSM",
        long = "hsm-token-label",
        env = "BANK_VAULTS_HSM_TOKEN_LABEL",
        global = true
    )]
    pub token_label: Option<String>,
    /// Token serial number to select the slot by.
    #[arg(
        id = "hsm.tokenSerial",
        help_heading = "HSM",
        long = "hsm-token-serial",
        env = "BANK_VAULTS_HSM_TOKEN_SERIAL",
        global = true
    )]
    pub token_serial: Option<String>,
    /// User PIN. Prefer a PIN file: a flag is visible to every process on the node in
    /// /proc/PID/cmdline, an environment variable to this container's processes.
    #[arg(
        id = "hsm.pin",
        help_heading = "HSM",
        long = "hsm-pin",
        env = "BANK_VAULTS_HSM_PIN",
        global = true,
        hide_env_values = true
    )]
    pub pin: Option<Secret>,
    /// File holding the user PIN (e.g. a mounted Secret).
    #[arg(
        id = "hsm.pinFile",
        help_heading = "HSM",
        long = "hsm-pin-file",
        env = "BANK_VAULTS_HSM_PIN_FILE",
        global = true
    )]
    pub pin_file: Option<PathBuf>,
    /// Label of the RSA key pair.
    #[arg(
        id = "hsm.keyLabel",
        help_heading = "HSM",
        long = "hsm-key-label",
        env = "BANK_VAULTS_HSM_KEY_LABEL",
        global = true,
        default_value = "bank-vaults"
    )]
    pub key_label: Option<String>,
    /// Generate the RSA key pair on the token when it is missing.
    #[arg(id = "hsm.generateKey", help_heading = "HSM", long = "hsm-generate-key",
          env = "BANK_VAULTS_HSM_GENERATE_KEY", global = true, num_args = 0..=1,
          default_missing_value = "true", default_value = "false")]
    #[serde(default, deserialize_with = "plain::bool")]
    pub generate_key: Option<bool>,
    /// How long a one-shot run waits for the HSM token to appear (the sidecar waits for ever).
    #[arg(id = "hsm.tokenWaitTimeout", help_heading = "HSM", long = "hsm-token-wait-timeout",
          env = "UNSEAL_INIT_TOKEN_WAIT_TIMEOUT", global = true, value_parser = parse_duration,
          default_value = "2m")]
    #[serde(default, deserialize_with = "plain::duration")]
    pub token_wait_timeout: Option<Duration>,
}

/// `options:` section.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptionsSettings {
    /// Number of unseal key shares Vault is initialised with.
    #[arg(
        id = "options.secretShares",
        help_heading = "Init options",
        long = "secret-shares",
        env = "BANK_VAULTS_SECRET_SHARES",
        default_value = "5"
    )]
    #[serde(default, deserialize_with = "plain::u8")]
    pub secret_shares: Option<u8>,
    /// Number of shares needed to unseal.
    #[arg(
        id = "options.secretThreshold",
        help_heading = "Init options",
        long = "secret-threshold",
        env = "BANK_VAULTS_SECRET_THRESHOLD",
        default_value = "3"
    )]
    #[serde(default, deserialize_with = "plain::u8")]
    pub secret_threshold: Option<u8>,
    /// Store the root token (`vault-root`).
    #[arg(id = "options.storeRootToken", help_heading = "Init options",
          long = "store-root-token", env = "BANK_VAULTS_STORE_ROOT_TOKEN", num_args = 0..=1,
          default_missing_value = "true", default_value = "true")]
    #[serde(default, deserialize_with = "plain::bool")]
    pub store_root_token: Option<bool>,
    /// Write, read back and decrypt `vault-test` before touching Vault.
    #[arg(id = "options.preFlightChecks", help_heading = "Init options",
          long = "pre-flight-checks", env = "BANK_VAULTS_PRE_FLIGHT_CHECKS", num_args = 0..=1,
          default_missing_value = "true", default_value = "true")]
    #[serde(default, deserialize_with = "plain::bool")]
    pub pre_flight_checks: Option<bool>,
    /// Initialise Vault even though unseal keys from an earlier Vault are in the store (they
    /// are replaced).
    #[arg(id = "options.overwriteExistingKeys", help_heading = "Init options",
          long = "overwrite-existing-keys", env = "BANK_VAULTS_OVERWRITE_EXISTING_KEYS",
          num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    #[serde(default, deserialize_with = "plain::bool")]
    pub overwrite_existing_keys: Option<bool>,
}

/// `kubernetes:` section.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSettings {
    /// Namespace of the Kubernetes Secret (mode hsm-k8s). [default: the pod's namespace]
    #[arg(
        id = "kubernetes.secretNamespace",
        help_heading = "Storage",
        long = "k8s-secret-namespace",
        env = "BANK_VAULTS_K8S_SECRET_NAMESPACE",
        global = true
    )]
    pub secret_namespace: Option<String>,
    /// Name of the Kubernetes Secret (mode hsm-k8s).
    #[arg(
        id = "kubernetes.secretName",
        help_heading = "Storage",
        long = "k8s-secret-name",
        env = "BANK_VAULTS_K8S_SECRET_NAME",
        global = true
    )]
    pub secret_name: Option<String>,
}

/// The flags and their environment variables as clap parsed them, each value with its
/// source. [`Overrides::default`] is no flags and no environment (tests stay pure).
#[derive(Debug, Clone)]
pub struct Overrides {
    flags: Flags<Settings>,
    /// Log format (`text` or `json`), read before the configuration is.
    pub log_format: String,
}

impl Overrides {
    /// The settings' flags in `args` alone, without the environment: for tests and tools that
    /// build a configuration from arguments they hold.
    pub fn from_flags<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(Self::new(Flags::from_flags(args)?))
    }

    fn new(flags: Flags<Settings>) -> Self {
        let log_format = flags
            .pick("logFormat", None, None)
            .map_or_else(|| "text".to_owned(), |l| l.value);
        Self { flags, log_format }
    }
}

impl Default for Overrides {
    fn default() -> Self {
        Self::new(Flags::default())
    }
}

impl FromArgMatches for Overrides {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Flags::from_arg_matches(matches).map(Self::new)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for Overrides {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Settings::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Settings::augment_args_for_update(cmd)
    }
}

/// Where ciphertext is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Data objects on the token.
    Hsm,
    /// A Kubernetes Secret.
    HsmK8s,
}

/// Validated Vault settings.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// API address.
    pub address: String,
    /// CA bundle.
    pub ca_cert: Option<PathBuf>,
    /// Raft leader address.
    pub raft_leader_address: Option<String>,
    /// API addresses of the other raft members: when one answers initialised, this Vault lost
    /// its data and joins them instead of initialising a cluster of its own.
    pub raft_peers: Vec<String>,
}

/// How the slot is chosen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotSelector {
    /// By id.
    pub slot_id: Option<u64>,
    /// By token label.
    pub token_label: Option<String>,
    /// By token serial.
    pub token_serial: Option<String>,
}

/// Validated HSM settings.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// Start pcscd.
    pub daemon: bool,
    /// How long `--once` waits for the token to appear (the sidecar waits for ever).
    pub token_wait_timeout: Duration,
    /// PKCS#11 module.
    pub module_path: PathBuf,
    /// True when `modulePath` was not set and [`module_candidates`] were searched (a start
    /// that finds none says where it looked).
    pub module_searched: bool,
    /// Slot selection.
    pub selector: SlotSelector,
    /// User PIN (absent only for commands that do not log in).
    pub pin: Option<Secret>,
    /// The file `pin` was read from, when it was: the sidecar watches it for a corrected PIN
    /// after a rejection instead of retrying the rejected one.
    pub pin_file: Option<PathBuf>,
    /// RSA key pair label.
    pub key_label: String,
    /// Generate the key pair when missing.
    pub generate_key: bool,
}

/// Validated init options.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Key shares.
    pub secret_shares: u8,
    /// Threshold.
    pub secret_threshold: u8,
    /// Store the root token.
    pub store_root_token: bool,
    /// Pre-flight checks.
    pub pre_flight_checks: bool,
    /// Initialise despite stale keys.
    pub overwrite_existing_keys: bool,
}

/// Kubernetes Secret location.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// Namespace; `None` means the client's default (the pod's namespace).
    pub namespace: Option<String>,
    /// Secret name.
    pub name: String,
}

/// The program's whole configuration after merging and validation.
#[derive(Debug, Clone)]
pub struct Config {
    /// Storage mode.
    pub mode: Mode,
    /// Vault.
    pub vault: VaultConfig,
    /// HSM.
    pub hsm: HsmConfig,
    /// Init options.
    pub options: Options,
    /// Secret location (mode `hsm-k8s`).
    pub kubernetes: Option<KubernetesConfig>,
    /// Watch period.
    pub unseal_period: Duration,
    /// Metrics/health address.
    pub metrics_address: SocketAddr,
    /// One pass only.
    pub once: bool,
    /// Directory of the init write-ahead journal.
    pub journal_dir: PathBuf,
    /// `--once` gives up after this long ([`DEFAULT_ONCE_DEADLINE`] unless set); `None` in
    /// sidecar mode, which never gives up.
    pub deadline: Option<Duration>,
}

/// pcsc-lite's socket path (inside the container, so pod-local). Debian's pcscd always
/// listens here, whatever `PCSCLITE_CSOCK_NAME` says.
pub const DEFAULT_PCSCD_SOCKET: &str = "/run/pcscd/pcscd.comm";

/// Default init journal directory; the manifests mount a persistent volume here.
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/unseal-init";

/// How long `--once` runs at most unless `--deadline` says otherwise: long enough for a Vault
/// pod to start and its storage to come up, short enough that a Job or script waiting on an
/// address that will never answer learns so.
pub const DEFAULT_ONCE_DEADLINE: Duration = Duration::from_secs(5 * 60);

/// Default PKCS#11 module (OpenSC, as in Bank-Vaults' NitroKey example); the image also has it
/// here. Outside the image it is looked for in [`module_candidates`].
pub const DEFAULT_MODULE: &str = "/usr/lib/opensc-pkcs11.so";

/// OpenSC's module file name.
const OPENSC_MODULE: &str = "opensc-pkcs11.so";

/// Longest PIN file read. A SmartCard-HSM's user PIN is 6 to 15 characters and PKCS#11 tokens
/// rarely allow more than 64; anything bigger is the wrong file, and reading it whole would
/// let a mistake allocate without bound and hand the token a megabyte "PIN".
pub const MAX_PIN_BYTES: usize = 256;

/// The multiarch directory Debian puts libraries in for `arch` (Rust's `std::env::consts::ARCH`).
fn multiarch(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "x86" => "i386-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        _ => return None,
    })
}

/// Where OpenSC's module is looked for when `modulePath` is not set, in order: Debian's
/// multiarch directory for `arch`, x86-64's (the usual one), the image's path, and the
/// `pkcs11` directories some distributions use.
pub fn module_candidates(arch: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [multiarch(arch), Some("x86_64-linux-gnu")]
        .into_iter()
        .flatten()
    {
        let path = Path::new("/usr/lib").join(dir).join(OPENSC_MODULE);
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out.push(PathBuf::from(DEFAULT_MODULE));
    out.push(Path::new("/usr/lib/pkcs11").join(OPENSC_MODULE));
    if let Some(dir) = multiarch(arch) {
        out.push(
            Path::new("/usr/lib")
                .join(dir)
                .join("pkcs11")
                .join(OPENSC_MODULE),
        );
    }
    out
}

/// The first of `candidates` that `exists`; `None` lists where it looked.
pub fn pick_module(
    candidates: &[PathBuf],
    exists: impl Fn(&Path) -> bool,
) -> Result<PathBuf, String> {
    candidates
        .iter()
        .find(|p| exists(p))
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            format!(
                "not set, and OpenSC's module is in none of {}; install OpenSC (Debian: opensc-pkcs11) or set hsm.modulePath",
                looked.join(", ")
            )
        })
}

/// Checks a Vault address as the HTTP client will use it: `http` or `https`, a host, a valid
/// port. Returns it without a trailing `/`.
pub fn check_vault_address(address: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(address)
        .map_err(|e| format!("`{address}` is not a URL like https://vault:8200 ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{address}` must start with http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{address}` names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "`{address}` must not carry a query or fragment: API paths are appended to it"
        ));
    }
    Ok(address.trim_end_matches('/').to_owned())
}

/// Reads and parses a configuration file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    // The file may hold the PIN (`hsm.pin`): its text is zeroed once parsed.
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
        ConfigError::Read {
            path: path.to_owned(),
            source,
        }
    })?);
    parse_file(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Parses configuration text; the error names the field and position.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    nitrokey_common::yaml::parse(text).map_err(|e| {
        // Bank-Vaults had this key; say why it went rather than only that it is unknown.
        if e.contains("unknown field `daemonSocket`") {
            format!(
                "{e} (hsm.daemonSocket is not supported: pcscd always listens on {DEFAULT_PCSCD_SOCKET} inside the container; remove the key)"
            )
        } else {
            e
        }
    })
}

/// Longest accepted duration anywhere in the configuration.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Shortest accepted `unsealPeriod`: a pass is an HTTP round trip to Vault, and anything
/// faster only burns CPU in both processes.
pub const MIN_UNSEAL_PERIOD: Duration = Duration::from_millis(100);

/// Parses a duration such as `500ms`, `5s`, `2m`, `1h30m` (humantime's grammar; a bare number
/// means seconds, as Bank-Vaults' flags take it). Zero and anything above [`MAX_DURATION`] are
/// refused, so no later arithmetic can overflow. Flags, variables and the file share it.
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

/// Parses the metrics address, `IP:PORT`.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not an address like 0.0.0.0:9091"))
}

/// Scalars a user writes unquoted: a quoted `"yes"` or `"0"` is a string, and taking it as a
/// boolean or a number would hide a mistake (or a template that quoted what it should not).
/// Errors never repeat the value.
mod plain {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// What the YAML parser made of a scalar.
    enum Scalar {
        Null,
        Bool(bool),
        Int(i128),
        Text,
        Other,
    }

    struct Any;

    impl<'de> Visitor<'de> for Any {
        type Value = Scalar;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a scalar")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
            Ok(Scalar::Null)
        }
        fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
            Ok(Scalar::Null)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
            Ok(Scalar::Bool(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
            Ok(Scalar::Int(v.into()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
            Ok(Scalar::Int(v.into()))
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<Scalar, E> {
            Ok(i128::try_from(v).map_or(Scalar::Other, Scalar::Int))
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<Scalar, E> {
            Ok(Scalar::Int(v))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
            Ok(Scalar::Other)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Scalar, E> {
            Ok(Scalar::Text)
        }
    }

    fn refuse<E: de::Error>(expected: &str, found: &Scalar) -> E {
        E::custom(match found {
            Scalar::Text => {
                format!("expected {expected}, found a string (write it without quotes)")
            }
            _ => format!("expected {expected}"),
        })
    }

    /// `true` or `false` (YAML 1.1's `yes`/`no` too, as Bank-Vaults' parser reads them), never
    /// a quoted string.
    pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match d.deserialize_any(Any)? {
            Scalar::Null => Ok(None),
            Scalar::Bool(b) => Ok(Some(b)),
            other => Err(refuse("true or false", &other)),
        }
    }

    fn int<'de, D: Deserializer<'de>, T: TryFrom<i128>>(
        d: D,
        expected: &str,
    ) -> Result<Option<T>, D::Error> {
        match d.deserialize_any(Any)? {
            Scalar::Null => Ok(None),
            Scalar::Int(n) => T::try_from(n)
                .map(Some)
                .map_err(|_| refuse(expected, &Scalar::Other)),
            other => Err(refuse(expected, &other)),
        }
    }

    /// A whole number from 0 to 255, never a quoted string.
    pub fn u8<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
        int(d, "a whole number from 0 to 255")
    }

    /// A whole number from 0, never a quoted string.
    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        int(d, "a whole number from 0")
    }

    /// A scalar read as text by `parse` (a bare number as its digits), for the settings whose
    /// flags take the same text.
    fn text<'de, D: Deserializer<'de>, T>(
        d: D,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, D::Error> {
        struct Text<T>(fn(&str) -> Result<T, String>);
        impl<T> Visitor<'_> for Text<T> {
            type Value = Option<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                (self.0)(&v.to_string()).map(Some).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                (self.0)(v).map(Some).map_err(E::custom)
            }
        }
        d.deserialize_any(Text(parse))
    }

    /// A duration, as the flags take it.
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        text(d, super::parse_duration)
    }

    /// An unseal period, as `--unseal-period` takes it.
    pub fn unseal_period<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        text(d, super::parse_unseal_period)
    }

    /// The metrics address, as `--metrics-address` takes it.
    pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        text(d, super::parse_socket_addr)
    }
}

/// Environment the configuration may fall back to (passed in so tests stay pure).
#[derive(Debug, Default, Clone)]
pub struct Env {
    /// `VAULT_ADDR`.
    pub vault_addr: Option<String>,
    /// `VAULT_CACERT`.
    pub vault_cacert: Option<PathBuf>,
    /// OpenSC's module as found on this machine ([`module_candidates`]), for a configuration
    /// without `modulePath`.
    pub opensc_module: Option<PathBuf>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            vault_addr: get("VAULT_ADDR"),
            vault_cacert: get("VAULT_CACERT").map(PathBuf::from),
            opensc_module: pick_module(&module_candidates(std::env::consts::ARCH), Path::exists)
                .ok(),
        }
    }
}

/// Reads a PIN file (e.g. a mounted Secret), dropping trailing line breaks. Reads at most
/// [`MAX_PIN_BYTES`] (and one byte more, to notice a longer file): never a whole file of
/// unknown size.
pub fn read_pin_file(path: &Path) -> Result<Secret, ConfigError> {
    let cannot = |e: std::io::Error| {
        invalid(
            "hsm.pinFile",
            format!("cannot read {}: {e}", path.display()),
        )
    };
    // A FIFO or device would block the open or never end: only a regular file is a PIN
    // file (a mounted Secret's symlinks lead to one).
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(invalid(
            "hsm.pinFile",
            format!("{} is not a regular file", path.display()),
        ));
    }
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut raw = zeroize::Zeroizing::new(Vec::with_capacity(MAX_PIN_BYTES + 1));
    file.take(MAX_PIN_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(cannot)?;
    if raw.len() > MAX_PIN_BYTES {
        return Err(invalid(
            "hsm.pinFile",
            format!(
                "{} holds more than {MAX_PIN_BYTES} bytes, which is no PIN (is it the right file?)",
                path.display()
            ),
        ));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| {
        invalid(
            "hsm.pinFile",
            format!("{} is not UTF-8 text", path.display()),
        )
    })?;
    Ok(Secret::from(text.trim_end_matches(['\n', '\r'])))
}

/// Merges flags (and their variables), the file and the environment's fallbacks into a
/// validated [`Config`]; an invalid value is reported with where it came from.
pub fn resolve(file: FileConfig, flags: &Overrides, env: &Env) -> Result<Config, ConfigError> {
    let l = &flags.flags;
    let mode = get(l, "mode", file.mode)?;
    let mode = match mode.value.as_str() {
        "hsm" => Mode::Hsm,
        "hsm-k8s" => Mode::HsmK8s,
        other => {
            return Err(refused(
                &mode,
                "mode",
                format!("`{other}` is not supported (use `hsm` or `hsm-k8s`)"),
            ));
        }
    };

    let address = l
        .pick(
            "vault.address",
            file.vault.address,
            Layered::from_env("VAULT_ADDR", env.vault_addr.clone()),
        )
        .ok_or_else(|| invalid("vault.address", "has no value and no default"))?;
    let vault = VaultConfig {
        address: check_vault_address(&address.value)
            .map_err(|r| refused(&address, "vault.address", r))?,
        ca_cert: l
            .pick(
                "vault.caCert",
                file.vault.ca_cert,
                Layered::from_env("VAULT_CACERT", env.vault_cacert.clone()),
            )
            .map(|l| l.value),
        raft_leader_address: opt(l, "vault.raftLeaderAddress", file.vault.raft_leader_address)
            .filter(|s| !s.is_empty()),
        raft_peers: file
            .vault
            .raft_peers
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                check_vault_address(peer)
                    .map_err(|r| invalid("vault.raftPeers", format!("entry {i}: {r}")))
            })
            .collect::<Result<_, _>>()?,
    };

    // A PIN and a PIN file from the same layer: the PIN wins; otherwise the higher layer does.
    let pin = l.pick("hsm.pin", file.hsm.pin, None);
    let pin_file = l.pick("hsm.pinFile", file.hsm.pin_file, None);
    let rank = |s: &Source| usize::from(matches!(s, Source::File | Source::Default));
    let (pin, pin_file) = match (pin, pin_file) {
        (Some(pin), Some(file)) if rank(&file.source) < rank(&pin.source) => {
            (Some(read_pin_layer(&file)?), Some(file.value))
        }
        (Some(pin), _) => (Some(pin), None),
        (None, Some(file)) => (Some(read_pin_layer(&file)?), Some(file.value)),
        (None, None) => (None, None),
    };
    if let Some(pin) = &pin {
        if pin.value.is_empty() {
            return Err(refused(pin, "hsm.pin", "the PIN is empty"));
        }
        if pin.value.expose().len() > MAX_PIN_BYTES {
            return Err(refused(
                pin,
                "hsm.pin",
                format!("longer than {MAX_PIN_BYTES} bytes, which is no PIN"),
            ));
        }
    }
    let key_label = get(l, "hsm.keyLabel", file.hsm.key_label)?;
    if key_label.value.is_empty() {
        return Err(refused(&key_label, "hsm.keyLabel", "must not be empty"));
    }
    let module = l.pick(
        "hsm.modulePath",
        file.hsm.module_path,
        env.opensc_module.clone().map(|value| Layered {
            value,
            source: Source::Default,
        }),
    );
    let module_searched = !module.as_ref().is_some_and(|m| m.source.is_set());
    let hsm = HsmConfig {
        daemon: get(l, "hsm.daemon", file.hsm.daemon)?.value,
        token_wait_timeout: get(l, "hsm.tokenWaitTimeout", file.hsm.token_wait_timeout)?.value,
        module_path: module.map_or_else(|| PathBuf::from(DEFAULT_MODULE), |m| m.value),
        module_searched,
        selector: SlotSelector {
            slot_id: opt(l, "hsm.slotId", file.hsm.slot_id),
            token_label: opt(l, "hsm.tokenLabel", file.hsm.token_label).filter(|s| !s.is_empty()),
            token_serial: opt(l, "hsm.tokenSerial", file.hsm.token_serial)
                .filter(|s| !s.is_empty()),
        },
        pin: pin.map(|p| p.value),
        pin_file,
        key_label: key_label.value,
        generate_key: get(l, "hsm.generateKey", file.hsm.generate_key)?.value,
    };

    let shares = get(l, "options.secretShares", file.options.secret_shares)?;
    let threshold = get(l, "options.secretThreshold", file.options.secret_threshold)?;
    if shares.value == 0 {
        return Err(refused(
            &shares,
            "options.secretShares",
            "must be at least 1",
        ));
    }
    if threshold.value == 0 || threshold.value > shares.value {
        return Err(refused(
            &threshold,
            "options.secretThreshold",
            format!(
                "{} must be between 1 and secretShares ({})",
                threshold.value, shares.value
            ),
        ));
    }
    if shares.value > 1 && threshold.value == 1 {
        return Err(refused(
            &threshold,
            "options.secretThreshold",
            "must be greater than 1 when secretShares is greater than 1 (Vault refuses it)",
        ));
    }
    let options = Options {
        secret_shares: shares.value,
        secret_threshold: threshold.value,
        store_root_token: get(l, "options.storeRootToken", file.options.store_root_token)?.value,
        pre_flight_checks: get(l, "options.preFlightChecks", file.options.pre_flight_checks)?.value,
        overwrite_existing_keys: get(
            l,
            "options.overwriteExistingKeys",
            file.options.overwrite_existing_keys,
        )?
        .value,
    };

    let secret_name =
        opt(l, "kubernetes.secretName", file.kubernetes.secret_name).filter(|s| !s.is_empty());
    let kubernetes = match (mode, secret_name) {
        (Mode::HsmK8s, None) => {
            return Err(invalid(
                "kubernetes.secretName",
                "required when mode is hsm-k8s",
            ));
        }
        (_, Some(name)) => Some(KubernetesConfig {
            namespace: opt(
                l,
                "kubernetes.secretNamespace",
                file.kubernetes.secret_namespace,
            )
            .filter(|s| !s.is_empty()),
            name,
        }),
        (Mode::Hsm, None) => None,
    };

    let once = get(l, "once", file.once)?.value;
    // The sidecar never gives up: a deadline (say from a shared environment) means nothing there.
    let deadline = once
        .then(|| get(l, "deadline", file.deadline).map(|d| d.value))
        .transpose()?;
    let journal_dir = get(l, "journalDir", file.journal_dir)?;
    if journal_dir.value.as_os_str().is_empty() {
        return Err(refused(&journal_dir, "journalDir", "must not be empty"));
    }

    Ok(Config {
        mode,
        vault,
        hsm,
        options,
        kubernetes,
        unseal_period: get(l, "unsealPeriod", file.unseal_period)?.value,
        metrics_address: get(l, "metricsAddress", file.metrics_address)?.value,
        once,
        journal_dir: journal_dir.value,
        deadline,
    })
}

/// Reads the PIN file a layer named; a problem names that layer.
fn read_pin_layer(path: &Layered<PathBuf>) -> Result<Layered<Secret>, ConfigError> {
    match read_pin_file(&path.value) {
        Ok(value) => Ok(Layered {
            value,
            source: path.source.clone(),
        }),
        Err(ConfigError::Invalid { field, reason, .. }) => Err(ConfigError::Invalid {
            field,
            from: path.source.to_string(),
            reason,
        }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(text: &str, flags: &Overrides) -> Result<Config, ConfigError> {
        let file = parse_file(text).map_err(|message| ConfigError::Parse {
            path: "test.yaml".into(),
            message,
        })?;
        resolve(file, flags, &Env::default())
    }

    fn flags(args: &[&str]) -> Overrides {
        Overrides::from_flags(args).expect("flags parse")
    }

    #[test]
    fn bank_vaults_snippet_parses_with_defaults() {
        let cfg = resolve_text(
            "hsm:\n  daemon: true\n  modulePath: /usr/lib/opensc-pkcs11.so\n  slotId: 0\n  pin: banzai\n  keyLabel: bank-vaults\n",
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(cfg.mode, Mode::Hsm);
        assert!(cfg.hsm.daemon);
        assert_eq!(cfg.hsm.selector.slot_id, Some(0));
        assert_eq!(cfg.hsm.pin.as_ref().map(Secret::expose), Some("banzai"));
        assert_eq!(cfg.options.secret_shares, 5);
        assert_eq!(cfg.options.secret_threshold, 3);
        assert!(cfg.options.store_root_token && cfg.options.pre_flight_checks);
        assert_eq!(cfg.vault.address, "http://127.0.0.1:8200");
        assert_eq!(cfg.unseal_period, Duration::from_secs(5));
        assert_eq!(cfg.metrics_address.to_string(), "0.0.0.0:9091");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = resolve_text("hsm:\n  slotid: 0\n", &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("slotid"), "{msg}");
        let err = resolve_text("bogus: 1\n", &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("bogus"));
    }

    #[test]
    fn flags_override_the_file_and_env_fills_gaps() {
        let flags = flags(&[
            "--hsm-pin",
            "fromflag",
            "--secret-shares",
            "3",
            "--secret-threshold",
            "2",
            "--vault-addr",
            "http://10.0.0.1:8200/",
        ]);
        let cfg = resolve_text(
            "hsm:\n  pin: fromfile\noptions:\n  secretShares: 7\n",
            &flags,
        )
        .expect("valid");
        assert_eq!(cfg.hsm.pin.as_ref().map(Secret::expose), Some("fromflag"));
        assert_eq!(cfg.options.secret_shares, 3);
        assert_eq!(cfg.vault.address, "http://10.0.0.1:8200");

        let env = Env {
            vault_addr: Some("https://vault:8200".into()),
            ..Default::default()
        };
        let cfg = resolve(FileConfig::default(), &Overrides::default(), &env).expect("valid");
        assert_eq!(cfg.vault.address, "https://vault:8200");
        let file = parse_file("vault:\n  address: http://file:8200\n").expect("parses");
        let cfg = resolve(file, &Overrides::default(), &env).expect("valid");
        assert_eq!(cfg.vault.address, "http://file:8200");
    }

    /// A value the configuration refuses is reported with where it came from: the flag, the
    /// file, or (tested with the program, which reads the environment) the variable.
    #[test]
    fn a_bad_value_names_its_source() {
        for (args, text, expected) in [
            (
                &["--secret-shares", "0"][..],
                "options:\n  secretShares: 3\n",
                "options.secretShares (from flag --secret-shares): must be at least 1",
            ),
            (
                &[][..],
                "options:\n  secretShares: 0\n",
                "options.secretShares (from the configuration file): must be at least 1",
            ),
            (
                &["--mode", "cloud"][..],
                "mode: hsm\n",
                "mode (from flag --mode): `cloud` is not supported",
            ),
            (
                &["--vault-addr", "vault:8200"][..],
                "",
                "vault.address (from flag --vault-addr)",
            ),
            (
                &["--hsm-key-label", ""][..],
                "hsm:\n  keyLabel: k\n",
                "hsm.keyLabel (from flag --hsm-key-label): must not be empty",
            ),
            (
                &[][..],
                "hsm:\n  pinFile: /nonexistent/pin\n",
                "hsm.pinFile (from the configuration file)",
            ),
            (
                &["--hsm-pin-file", "/nonexistent/pin"][..],
                "",
                "hsm.pinFile (from flag --hsm-pin-file)",
            ),
        ] {
            let err = resolve_text(text, &flags(args)).expect_err(expected);
            assert!(err.to_string().contains(expected), "{args:?}: {err}");
        }
        // The fallback variable below the file is named too.
        let env = Env {
            vault_addr: Some("vault:8200".into()),
            ..Env::default()
        };
        let err = resolve(FileConfig::default(), &Overrides::default(), &env).expect_err("bad");
        assert!(
            err.to_string()
                .contains("vault.address (from environment variable VAULT_ADDR)"),
            "{err}"
        );
    }

    /// Every setting's clap id is its key in the file: a value is named the same way
    /// whichever layer it came from.
    #[test]
    fn every_flag_is_named_by_its_file_key() {
        let in_file = |id: &str| {
            let (section, key) = id.rsplit_once('.').unwrap_or(("", id));
            let text = if section.is_empty() {
                format!("{key}: {{}}\n")
            } else {
                format!("{section}:\n  {key}: {{}}\n")
            };
            // A key the file knows fails on its value (a mapping), an unknown one on its name.
            let err = parse_file(&text).expect_err(id);
            !err.contains("unknown field")
        };
        assert!(!in_file("hsm.slotID"));
        let command = Settings::augment_args(clap::Command::new("unseal-init"));
        let mut checked = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if ["once", "deadline", "logFormat"].contains(&id) {
                continue;
            }
            assert!(in_file(id), "{id} is not a key of the file");
            checked += 1;
        }
        assert!(checked > 20, "{checked}");
    }

    #[test]
    fn pin_file_is_read_and_trailing_newline_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        std::fs::write(&path, "banzai\n").expect("write");
        let cfg = resolve_text(
            &format!("hsm:\n  pinFile: {}\n", path.display()),
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(cfg.hsm.pin.as_ref().map(Secret::expose), Some("banzai"));
        // The file is remembered so the sidecar can wait for a corrected PIN in it.
        assert_eq!(cfg.hsm.pin_file.as_deref(), Some(path.as_path()));
        // A PIN given directly wins over the file, and there is then no file to watch.
        let direct = flags(&["--hsm-pin", "fromflag"]);
        let cfg = resolve_text(&format!("hsm:\n  pinFile: {}\n", path.display()), &direct)
            .expect("valid");
        assert_eq!(cfg.hsm.pin.as_ref().map(Secret::expose), Some("fromflag"));
        assert_eq!(cfg.hsm.pin_file, None);
        let err =
            resolve_text("hsm:\n  pinFile: /nonexistent/pin\n", &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("hsm.pinFile"));
    }

    /// A parse error names the field, line and column, and quotes nothing of the file: a
    /// neighbouring line may hold the PIN.
    #[test]
    fn parse_errors_name_the_field_and_never_quote_the_file() {
        for (text, field) in [
            ("hsm:\n  pin: s3cret-PIN-1\n  slotId: nope\n", "hsm.slotId"),
            (
                "hsm:\n  pin: s3cret-PIN-1\n  slotid: 1\n",
                "unknown field `slotid`",
            ),
            ("hsm:\n  pin: s3cret-PIN-1\n   oops: [\n", "line 3"),
        ] {
            let err = parse_file(text).expect_err(text);
            assert!(err.contains(field), "{err}");
            assert!(err.contains("line "), "{err}");
            assert!(!err.contains("s3cret-PIN-1"), "{err}");
        }
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            ("mode: cloud\n", "mode"),
            (
                "options:\n  secretShares: 3\n  secretThreshold: 4\n",
                "options.secretThreshold",
            ),
            ("options:\n  secretShares: 0\n", "options.secretShares"),
            ("unsealPeriod: soon\n", "unsealPeriod"),
            ("metricsAddress: nowhere\n", "metricsAddress"),
            ("mode: hsm-k8s\n", "kubernetes.secretName"),
            ("vault:\n  address: vault:8200\n", "vault.address"),
        ];
        for (text, field) in cases {
            let err = resolve_text(text, &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
        let err =
            resolve_text("options:\n  secretShares: many\n", &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("secretShares"), "{err}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn absurd_durations_are_errors_not_panics() {
        for text in [
            "100000000000000000000h",
            "18446744073709551616s",
            "18446744073709551615",
            "10000000000000000000s10000000000000000000s",
            "3000000000000000h",
            "",
        ] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        let err =
            resolve_text("unsealPeriod: 0.0000000001ms\n", &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("unsealPeriod"), "{err}");
        let err = resolve_text("unsealPeriod: 10ms\n", &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("minimum"), "{err}");
        // Flags are checked by the same functions when clap parses them.
        assert!(parse_unseal_period("100000000000000000000h").is_err());
        assert!(parse_unseal_period("10ms").is_err());
    }

    #[test]
    fn the_removed_socket_option_is_named_and_journal_dir_has_a_default() {
        let err =
            resolve_text("hsm:\n  daemonSocket: /run/x.comm\n", &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("hsm.daemonSocket is not supported"), "{msg}");
        // Another unknown key's error lists the accepted keys, and daemonSocket is not one.
        let err = resolve_text("hsm:\n  daemonsocket: x\n", &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("modulePath"), "{msg}");
        assert!(!msg.contains("daemonSocket"), "{msg}");
        let cfg = resolve_text("", &Overrides::default()).expect("defaults");
        assert_eq!(cfg.journal_dir, PathBuf::from(DEFAULT_JOURNAL_DIR));
        assert_eq!(cfg.hsm.token_wait_timeout, Duration::from_secs(120));
        let cfg = resolve_text(
            "journalDir: /data/j\nhsm:\n  tokenWaitTimeout: 10s\n",
            &Overrides::default(),
        )
        .expect("set");
        assert_eq!(cfg.journal_dir, PathBuf::from("/data/j"));
        assert_eq!(cfg.hsm.token_wait_timeout, Duration::from_secs(10));
    }

    #[test]
    fn k8s_mode_takes_bank_vaults_secret_settings() {
        let cfg = resolve_text(
            "mode: hsm-k8s\nkubernetes:\n  secretNamespace: vault\n  secretName: vault-unseal-keys\n",
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(cfg.mode, Mode::HsmK8s);
        let k = cfg.kubernetes.expect("k8s");
        assert_eq!(k.namespace.as_deref(), Some("vault"));
        assert_eq!(k.name, "vault-unseal-keys");
    }

    #[test]
    fn quoted_booleans_and_numbers_are_refused_by_field() {
        for (text, field) in [
            ("hsm:\n  daemon: \"yes\"\n", "hsm.daemon"),
            ("hsm:\n  slotId: \"0\"\n", "hsm.slotId"),
            ("hsm:\n  generateKey: 'true'\n", "hsm.generateKey"),
            ("options:\n  secretShares: \"5\"\n", "options.secretShares"),
            (
                "options:\n  storeRootToken: \"false\"\n",
                "options.storeRootToken",
            ),
        ] {
            let err = resolve_text(text, &Overrides::default()).expect_err(text);
            let msg = err.to_string();
            assert!(msg.contains(field), "{text}: {msg}");
            assert!(msg.contains("without quotes"), "{text}: {msg}");
        }
        for (text, field) in [
            ("hsm:\n  slotId: -1\n", "hsm.slotId"),
            ("options:\n  secretShares: 300\n", "options.secretShares"),
            ("hsm:\n  daemon: 1\n", "hsm.daemon"),
            ("hsm:\n  slotId: true\n", "hsm.slotId"),
            ("hsm:\n  slotId: 1.5\n", "hsm.slotId"),
        ] {
            let err = resolve_text(text, &Overrides::default()).expect_err(text);
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
        let cfg = resolve_text(
            "hsm:\n  daemon: yes\n  slotId: 0\n  generateKey:\noptions:\n  secretShares: 1\n  secretThreshold: 1\n",
            &Overrides::default(),
        )
        .expect("plain scalars");
        assert!(cfg.hsm.daemon);
        assert_eq!(cfg.hsm.selector.slot_id, Some(0));
        assert!(!cfg.hsm.generate_key);
        assert_eq!(cfg.options.secret_shares, 1);
    }

    #[test]
    fn vault_addresses_are_parsed_as_urls() {
        for bad in [
            "http://[::1",
            "http://127.0.0.1:99999",
            "http://",
            "vault:8200",
            "ftp://vault:8200",
            "http://vault:8200/?x=1",
        ] {
            let err = check_vault_address(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
            let text = format!("vault:\n  address: \"{bad}\"\n");
            let err = resolve_text(&text, &Overrides::default()).expect_err(bad);
            assert!(err.to_string().contains("vault.address"), "{err}");
        }
        for good in [
            "http://[::1]:8200/",
            "https://vault.vault.svc:8200",
            "http://10.0.0.1",
        ] {
            let addr = check_vault_address(good).expect(good);
            assert!(!addr.ends_with('/'), "{addr}");
        }
    }

    #[test]
    fn a_pin_file_is_read_only_up_to_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        std::fs::write(&path, vec![b'7'; MAX_PIN_BYTES]).expect("write");
        assert_eq!(
            read_pin_file(&path).expect("at the bound").expose().len(),
            MAX_PIN_BYTES
        );
        std::fs::write(&path, vec![b'7'; MAX_PIN_BYTES + 1]).expect("write");
        let msg = read_pin_file(&path)
            .expect_err("over the bound")
            .to_string();
        assert!(msg.contains("hsm.pinFile"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&MAX_PIN_BYTES.to_string()), "{msg}");
        assert!(!msg.contains("7777"), "{msg}");
        // A device that never ends is refused before it is read.
        let msg = read_pin_file(Path::new("/dev/zero"))
            .expect_err("endless")
            .to_string();
        assert!(msg.contains("not a regular file"), "{msg}");
        let flags = flags(&["--hsm-pin", &"9".repeat(MAX_PIN_BYTES + 1)]);
        let err = resolve_text("", &flags).expect_err("long PIN");
        assert!(err.to_string().contains("hsm.pin"), "{err}");
    }

    #[test]
    fn the_module_is_looked_for_in_the_usual_places() {
        let candidates = module_candidates("aarch64");
        assert_eq!(
            candidates[0],
            PathBuf::from("/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so")
        );
        assert!(candidates.contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")));
        assert!(candidates.contains(&PathBuf::from(DEFAULT_MODULE)));
        assert!(candidates.contains(&PathBuf::from("/usr/lib/pkcs11/opensc-pkcs11.so")));
        let x86 = module_candidates("x86_64");
        assert_eq!(
            x86[0],
            PathBuf::from("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")
        );
        assert_eq!(
            x86.iter()
                .filter(|p| p.starts_with("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"))
                .count(),
            1
        );
        // The first one present wins.
        let image = PathBuf::from(DEFAULT_MODULE);
        assert_eq!(
            pick_module(&x86, |p| p == image.as_path()),
            Ok(image.clone())
        );
        // None present: the error lists every place looked at.
        let err = pick_module(&x86, |_| false).expect_err("none");
        for p in &x86 {
            assert!(err.contains(&p.display().to_string()), "{err}");
        }
    }

    #[test]
    fn an_unset_module_path_takes_the_module_found() {
        let env = Env {
            opensc_module: Some(PathBuf::from("/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so")),
            ..Default::default()
        };
        let cfg = resolve(FileConfig::default(), &Overrides::default(), &env).expect("valid");
        assert_eq!(cfg.hsm.module_path, env.opensc_module.clone().expect("set"));
        assert!(cfg.hsm.module_searched);
        let file = parse_file("hsm:\n  modulePath: /opt/m.so\n").expect("parses");
        let cfg = resolve(file, &Overrides::default(), &env).expect("valid");
        assert_eq!(cfg.hsm.module_path, PathBuf::from("/opt/m.so"));
        assert!(!cfg.hsm.module_searched);
        let cfg = resolve(
            FileConfig::default(),
            &Overrides::default(),
            &Env::default(),
        )
        .expect("valid");
        assert_eq!(cfg.hsm.module_path, PathBuf::from(DEFAULT_MODULE));
    }

    #[test]
    fn once_has_a_default_deadline_and_the_sidecar_none() {
        let once = flags(&["--once"]);
        let cfg = resolve_text("", &once).expect("valid");
        assert_eq!(cfg.deadline, Some(DEFAULT_ONCE_DEADLINE));
        let set = flags(&["--once", "--deadline", "30s"]);
        assert_eq!(
            resolve_text("", &set).expect("valid").deadline,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            resolve_text("", &Overrides::default())
                .expect("valid")
                .deadline,
            None
        );
        let sidecar = flags(&["--deadline", "30s"]);
        assert_eq!(resolve_text("", &sidecar).expect("valid").deadline, None);
    }
}
