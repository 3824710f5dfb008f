//! Configuration: the YAML file in Bank-Vaults' shape, merged with flags and environment, and
//! validated into one [`Config`] the rest of the program reads.
//!
//! Precedence: flags (and their `BANK_VAULTS_*` environment variables) over the file over
//! built-in defaults; the Vault address and CA fall back to `VAULT_ADDR` / `VAULT_CACERT`.
//! Every problem becomes a [`ConfigError`] naming the field, which `main` turns into exit 2.

use crate::cli::Overrides;
pub use crate::cli::{MAX_DURATION, MIN_UNSEAL_PERIOD, parse_duration};
use crate::secret::Secret;
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
    #[serde(default, deserialize_with = "plain::bool")]
    pub daemon: Option<bool>,
    /// PKCS#11 module path.
    pub module_path: Option<PathBuf>,
    /// Slot id.
    #[serde(default, deserialize_with = "plain::u64")]
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
    #[serde(default, deserialize_with = "plain::bool")]
    pub generate_key: Option<bool>,
    /// How long a one-shot run waits for the token to appear, e.g. `2m`.
    pub token_wait_timeout: Option<String>,
}

/// `options:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptionsFile {
    /// Key shares.
    #[serde(default, deserialize_with = "plain::u8")]
    pub secret_shares: Option<u8>,
    /// Threshold.
    #[serde(default, deserialize_with = "plain::u8")]
    pub secret_threshold: Option<u8>,
    /// Store `vault-root`.
    #[serde(default, deserialize_with = "plain::bool")]
    pub store_root_token: Option<bool>,
    /// Pre-flight `vault-test` round trip.
    #[serde(default, deserialize_with = "plain::bool")]
    pub pre_flight_checks: Option<bool>,
    /// Initialise even if stale unseal keys exist.
    #[serde(default, deserialize_with = "plain::bool")]
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

/// Scalars a user writes unquoted: a quoted `"yes"` or `"0"` is a string, and taking it as a
/// boolean or a number would hide a mistake (or a template that quoted what it should not).
/// Errors never repeat the value.
mod plain {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

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
    let address = check_vault_address(&address).map_err(|r| invalid("vault.address", r))?;
    let vault = VaultConfig {
        address,
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
                check_vault_address(peer)
                    .map_err(|r| invalid("vault.raftPeers", format!("entry {i}: {r}")))
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
    if pin
        .as_ref()
        .is_some_and(|p| p.expose().len() > MAX_PIN_BYTES)
    {
        return Err(invalid(
            "hsm.pin",
            format!("longer than {MAX_PIN_BYTES} bytes, which is no PIN"),
        ));
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
    let token_wait_timeout = match (flags.hsm_token_wait_timeout, &file.hsm.token_wait_timeout) {
        (Some(d), _) => d,
        (None, Some(text)) => {
            parse_duration(text).map_err(|r| invalid("hsm.tokenWaitTimeout", r))?
        }
        (None, None) => Duration::from_secs(120),
    };
    let explicit_module = flags.hsm_module_path.clone().or(file.hsm.module_path);
    let module_searched = explicit_module.is_none();
    let module_path = explicit_module
        .or_else(|| env.opensc_module.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
    let hsm = HsmConfig {
        daemon,
        token_wait_timeout,
        module_path,
        module_searched,
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

    let unseal_period = match (flags.unseal_period, &file.unseal_period) {
        (Some(d), _) => d,
        (None, Some(text)) => {
            crate::cli::parse_unseal_period(text).map_err(|r| invalid("unsealPeriod", r))?
        }
        (None, None) => Duration::from_secs(5),
    };
    let once = flags.once.unwrap_or(false);
    // The sidecar never gives up: a deadline (say from a shared environment) means nothing there.
    let deadline = once.then(|| flags.deadline.unwrap_or(DEFAULT_ONCE_DEADLINE));
    let journal_dir = flags
        .journal_dir
        .clone()
        .or(file.journal_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL_DIR));
    if journal_dir.as_os_str().is_empty() {
        return Err(invalid("journalDir", "must not be empty"));
    }
    let metrics_address = match (flags.metrics_address, &file.metrics_address) {
        (Some(a), _) => a,
        (None, Some(text)) => text.parse().map_err(|_| {
            invalid(
                "metricsAddress",
                format!("`{text}` is not an address like 0.0.0.0:9091"),
            )
        })?,
        (None, None) => SocketAddr::from(([0, 0, 0, 0], 9091)),
    };

    Ok(Config {
        mode,
        vault,
        hsm,
        options,
        kubernetes,
        unseal_period,
        metrics_address,
        once,
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
        // Flags are checked by the same functions when clap parses them.
        assert!(crate::cli::parse_unseal_period("100000000000000000000h").is_err());
        assert!(crate::cli::parse_unseal_period("10ms").is_err());
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
        let flags = Overrides {
            hsm_pin: Some(Secret::new("9".repeat(MAX_PIN_BYTES + 1))),
            ..Default::default()
        };
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
        let once = Overrides {
            once: Some(true),
            ..Default::default()
        };
        let cfg = resolve_text("", &once).expect("valid");
        assert_eq!(cfg.deadline, Some(DEFAULT_ONCE_DEADLINE));
        let set = Overrides {
            once: Some(true),
            deadline: Some(Duration::from_secs(30)),
            ..Default::default()
        };
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
        let sidecar = Overrides {
            deadline: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        assert_eq!(resolve_text("", &sidecar).expect("valid").deadline, None);
    }
}
