//! Configuration: the YAML file in Bank-Vaults' shape, merged with flags and environment, and
//! validated into one [`Config`] the rest of the program reads.
//!
//! Precedence: flags (and their `BANK_VAULTS_*` environment variables) over the file over
//! built-in defaults; the Vault address and CA fall back to `VAULT_ADDR` / `VAULT_CACERT`.
//! Every problem becomes a [`ConfigError`] naming the field, which `main` turns into exit 2.

use crate::cli::Overrides;
use crate::secret::Secret;
use serde::Deserialize;
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
    #[error("invalid value for {field}: {reason}")]
    Invalid {
        /// Field, in the file's dotted camelCase form.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The file, as written by the user.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    /// `hsm` or `hsm-k8s`.
    pub mode: Option<String>,
    /// Vault connection.
    #[serde(default)]
    pub vault: VaultFile,
    /// PKCS#11 settings (Bank-Vaults' `unsealConfig.hsm`).
    #[serde(default)]
    pub hsm: HsmFile,
    /// Init options (Bank-Vaults' `unsealConfig.options`).
    #[serde(default)]
    pub options: OptionsFile,
    /// Secret location for `hsm-k8s`.
    #[serde(default)]
    pub kubernetes: KubernetesFile,
    /// Watch period, e.g. `5s`.
    pub unseal_period: Option<String>,
    /// Metrics/health listen address.
    pub metrics_address: Option<String>,
    /// Directory of the init write-ahead journal (a volume that outlives the container).
    pub journal_dir: Option<PathBuf>,
}

/// `vault:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultFile {
    /// Vault API address.
    pub address: Option<String>,
    /// PEM CA bundle path.
    pub ca_cert: Option<PathBuf>,
    /// Raft leader to join when not initialised.
    pub raft_leader_address: Option<String>,
    /// The other members of this Vault's raft cluster, asked before initialising.
    pub raft_peers: Option<Vec<String>>,
}

/// `hsm:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HsmFile {
    /// Start pcscd.
    pub daemon: Option<bool>,
    /// PKCS#11 module path.
    pub module_path: Option<PathBuf>,
    /// Slot id.
    pub slot_id: Option<u64>,
    /// Token label.
    pub token_label: Option<String>,
    /// Token serial.
    pub token_serial: Option<String>,
    /// User PIN (prefer `pinFile` or the environment).
    pub pin: Option<Secret>,
    /// File holding the PIN.
    pub pin_file: Option<PathBuf>,
    /// RSA key pair label.
    pub key_label: Option<String>,
    /// Generate the key pair when missing.
    pub generate_key: Option<bool>,
    /// No longer supported (pcscd ignores it); kept only to say so by name.
    pub daemon_socket: Option<PathBuf>,
    /// How long a one-shot run waits for the token to appear, e.g. `2m`.
    pub token_wait_timeout: Option<String>,
}

/// `options:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptionsFile {
    /// Key shares.
    pub secret_shares: Option<u8>,
    /// Threshold.
    pub secret_threshold: Option<u8>,
    /// Store `vault-root`.
    pub store_root_token: Option<bool>,
    /// Pre-flight `vault-test` round trip.
    pub pre_flight_checks: Option<bool>,
    /// Initialise even if stale unseal keys exist.
    pub overwrite_existing_keys: Option<bool>,
}

/// `kubernetes:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesFile {
    /// Namespace of the Secret (default: the pod's namespace).
    pub secret_namespace: Option<String>,
    /// Name of the Secret.
    pub secret_name: Option<String>,
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
    /// `--once` gives up after this long.
    pub deadline: Option<Duration>,
}

/// pcsc-lite's socket path (inside the container, so pod-local). Debian's pcscd always
/// listens here, whatever `PCSCLITE_CSOCK_NAME` says.
pub const DEFAULT_PCSCD_SOCKET: &str = "/run/pcscd/pcscd.comm";

/// Default init journal directory; the manifests mount a persistent volume here.
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/unseal-init";

/// Shortest accepted `unsealPeriod`: a pass is an HTTP round trip to Vault, and anything
/// faster only burns CPU in both processes.
pub const MIN_UNSEAL_PERIOD: Duration = Duration::from_millis(100);
/// Longest accepted duration anywhere in the configuration.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default PKCS#11 module (OpenSC, as in Bank-Vaults' NitroKey example).
pub const DEFAULT_MODULE: &str = "/usr/lib/opensc-pkcs11.so";

/// Reads and parses a configuration file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Parses configuration text; the error names the field and position.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    nitrokey_common::yaml::parse(text)
}

/// Environment the configuration may fall back to (passed in so tests stay pure).
#[derive(Debug, Default, Clone)]
pub struct Env {
    /// `VAULT_ADDR`.
    pub vault_addr: Option<String>,
    /// `VAULT_CACERT`.
    pub vault_cacert: Option<PathBuf>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            vault_addr: get("VAULT_ADDR"),
            vault_cacert: get("VAULT_CACERT").map(PathBuf::from),
        }
    }
}

/// Parses a duration such as `500ms`, `5s`, `2m`, `1h30m` (humantime's grammar; a bare number
/// means seconds, as Bank-Vaults' flags take it). Zero and anything above [`MAX_DURATION`] are
/// refused, so no later arithmetic can overflow.
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

/// Reads a PIN file (e.g. a mounted Secret), dropping trailing line breaks.
pub fn read_pin_file(path: &Path) -> Result<Secret, ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            "hsm.pinFile",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let raw = Secret::new(raw);
    let trimmed = raw.expose().trim_end_matches(['\n', '\r']);
    Ok(Secret::from(trimmed))
}

/// Merges file, flags and environment into a validated [`Config`].
pub fn resolve(file: FileConfig, flags: &Overrides, env: &Env) -> Result<Config, ConfigError> {
    let mode = match flags
        .mode
        .as_deref()
        .or(file.mode.as_deref())
        .unwrap_or("hsm")
    {
        "hsm" => Mode::Hsm,
        "hsm-k8s" => Mode::HsmK8s,
        other => {
            return Err(invalid(
                "mode",
                format!("`{other}` is not supported (use `hsm` or `hsm-k8s`)"),
            ));
        }
    };

    let address = flags
        .vault_addr
        .clone()
        .or(file.vault.address)
        .or_else(|| env.vault_addr.clone())
        .unwrap_or_else(|| "http://127.0.0.1:8200".to_owned());
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return Err(invalid(
            "vault.address",
            format!("`{address}` must start with http:// or https://"),
        ));
    }
    let vault = VaultConfig {
        address: address.trim_end_matches('/').to_owned(),
        ca_cert: flags
            .vault_cacert
            .clone()
            .or(file.vault.ca_cert)
            .or_else(|| env.vault_cacert.clone()),
        raft_leader_address: flags
            .raft_leader_address
            .clone()
            .or(file.vault.raft_leader_address)
            .filter(|s| !s.is_empty()),
        raft_peers: file
            .vault
            .raft_peers
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                if peer.starts_with("http://") || peer.starts_with("https://") {
                    Ok(peer.trim_end_matches('/').to_owned())
                } else {
                    Err(invalid(
                        "vault.raftPeers",
                        format!("entry {i}: `{peer}` is not a URL like https://vault-1:8200"),
                    ))
                }
            })
            .collect::<Result<_, _>>()?,
    };

    let (pin, pin_file) = match (
        &flags.hsm_pin,
        &flags.hsm_pin_file,
        file.hsm.pin,
        &file.hsm.pin_file,
    ) {
        (Some(pin), _, _, _) => (Some(pin.clone()), None),
        (None, Some(path), _, _) => (Some(read_pin_file(path)?), Some(path.clone())),
        (None, None, Some(pin), _) => (Some(pin), None),
        (None, None, None, Some(path)) => (Some(read_pin_file(path)?), Some(path.clone())),
        (None, None, None, None) => (None, None),
    };
    if pin.as_ref().is_some_and(Secret::is_empty) {
        return Err(invalid("hsm.pin", "the PIN is empty"));
    }
    let key_label = flags
        .hsm_key_label
        .clone()
        .or(file.hsm.key_label)
        .unwrap_or_else(|| "bank-vaults".to_owned());
    if key_label.is_empty() {
        return Err(invalid("hsm.keyLabel", "must not be empty"));
    }
    let daemon = flags.hsm_daemon.or(file.hsm.daemon).unwrap_or(false);
    if file.hsm.daemon_socket.is_some() {
        return Err(invalid(
            "hsm.daemonSocket",
            format!(
                "is not supported: pcscd always listens on {DEFAULT_PCSCD_SOCKET} inside the container; remove the key"
            ),
        ));
    }
    let token_wait_timeout = match flags
        .hsm_token_wait_timeout
        .as_deref()
        .or(file.hsm.token_wait_timeout.as_deref())
    {
        Some(text) => parse_duration(text).map_err(|r| invalid("hsm.tokenWaitTimeout", r))?,
        None => Duration::from_secs(120),
    };
    let hsm = HsmConfig {
        daemon,
        token_wait_timeout,
        module_path: flags
            .hsm_module_path
            .clone()
            .or(file.hsm.module_path)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE)),
        selector: SlotSelector {
            slot_id: flags.hsm_slot_id.or(file.hsm.slot_id),
            token_label: flags
                .hsm_token_label
                .clone()
                .or(file.hsm.token_label)
                .filter(|s| !s.is_empty()),
            token_serial: flags
                .hsm_token_serial
                .clone()
                .or(file.hsm.token_serial)
                .filter(|s| !s.is_empty()),
        },
        pin,
        pin_file,
        key_label,
        generate_key: flags
            .hsm_generate_key
            .or(file.hsm.generate_key)
            .unwrap_or(false),
    };

    let options = Options {
        secret_shares: flags
            .secret_shares
            .or(file.options.secret_shares)
            .unwrap_or(5),
        secret_threshold: flags
            .secret_threshold
            .or(file.options.secret_threshold)
            .unwrap_or(3),
        store_root_token: flags
            .store_root_token
            .or(file.options.store_root_token)
            .unwrap_or(true),
        pre_flight_checks: flags
            .pre_flight_checks
            .or(file.options.pre_flight_checks)
            .unwrap_or(true),
        overwrite_existing_keys: flags
            .overwrite_existing_keys
            .or(file.options.overwrite_existing_keys)
            .unwrap_or(false),
    };
    if options.secret_shares == 0 {
        return Err(invalid("options.secretShares", "must be at least 1"));
    }
    if options.secret_threshold == 0 || options.secret_threshold > options.secret_shares {
        return Err(invalid(
            "options.secretThreshold",
            format!(
                "{} must be between 1 and secretShares ({})",
                options.secret_threshold, options.secret_shares
            ),
        ));
    }
    if options.secret_shares > 1 && options.secret_threshold == 1 {
        return Err(invalid(
            "options.secretThreshold",
            "must be greater than 1 when secretShares is greater than 1 (Vault refuses it)",
        ));
    }

    let secret_name = flags
        .k8s_secret_name
        .clone()
        .or(file.kubernetes.secret_name)
        .filter(|s| !s.is_empty());
    let kubernetes = match (mode, secret_name) {
        (Mode::HsmK8s, None) => {
            return Err(invalid(
                "kubernetes.secretName",
                "required when mode is hsm-k8s",
            ));
        }
        (_, Some(name)) => Some(KubernetesConfig {
            namespace: flags
                .k8s_secret_namespace
                .clone()
                .or(file.kubernetes.secret_namespace)
                .filter(|s| !s.is_empty()),
            name,
        }),
        (Mode::Hsm, None) => None,
    };

    let unseal_period = match flags
        .unseal_period
        .as_deref()
        .or(file.unseal_period.as_deref())
    {
        Some(text) => parse_duration(text).map_err(|r| invalid("unsealPeriod", r))?,
        None => Duration::from_secs(5),
    };
    if unseal_period < MIN_UNSEAL_PERIOD {
        return Err(invalid(
            "unsealPeriod",
            format!(
                "{} is shorter than the minimum of {}",
                humantime::format_duration(unseal_period),
                humantime::format_duration(MIN_UNSEAL_PERIOD)
            ),
        ));
    }
    let deadline = flags
        .deadline
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|r| invalid("deadline", r))?;
    let journal_dir = flags
        .journal_dir
        .clone()
        .or(file.journal_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL_DIR));
    if journal_dir.as_os_str().is_empty() {
        return Err(invalid("journalDir", "must not be empty"));
    }
    let metrics_text = flags
        .metrics_address
        .clone()
        .or(file.metrics_address)
        .unwrap_or_else(|| "0.0.0.0:9091".to_owned());
    let metrics_address = metrics_text.parse().map_err(|_| {
        invalid(
            "metricsAddress",
            format!("`{metrics_text}` is not an address like 0.0.0.0:9091"),
        )
    })?;

    Ok(Config {
        mode,
        vault,
        hsm,
        options,
        kubernetes,
        unseal_period,
        metrics_address,
        once: flags.once.unwrap_or(false),
        journal_dir,
        deadline,
    })
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
        let flags = Overrides {
            hsm_pin: Some(Secret::from("fromflag")),
            secret_shares: Some(3),
            secret_threshold: Some(2),
            vault_addr: Some("http://10.0.0.1:8200/".into()),
            ..Default::default()
        };
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
        let direct = Overrides {
            hsm_pin: Some(Secret::from("fromflag")),
            ..Default::default()
        };
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
        let flags = Overrides {
            unseal_period: Some("100000000000000000000h".into()),
            ..Default::default()
        };
        let err = resolve_text("", &flags).unwrap_err();
        assert!(err.to_string().contains("unsealPeriod"), "{err}");
    }

    #[test]
    fn the_removed_socket_option_is_named_and_journal_dir_has_a_default() {
        let err =
            resolve_text("hsm:\n  daemonSocket: /run/x.comm\n", &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("hsm.daemonSocket"), "{err}");
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
}
