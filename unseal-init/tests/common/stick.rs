//! Set-up for running the program against a token other than plain SoftHSM2: the software TPM
//! ([`Tpm`]) and SoftHSM2 behind the OpenSC stand-in module ([`ShimToken`]), which reproduce
//! what a Nitrokey HSM does on OpenSC. Configuration, runner and Bank-Vaults-style values work
//! for any [`Token`].

use super::{HEADER_LEN, Run, wait};
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use nitrokey_e2e::token::{Scheme, Token};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

/// SoftHSM2 seen through `nitrokey-pkcs11-shim` with the given `NKSHIM_*` settings: the program
/// under test loads the shim, while [`Token::pkcs11_tool`] reads SoftHSM2 directly, so a test
/// sees exactly what landed on the token.
pub struct ShimToken {
    hsm: SoftHsm,
    shim: PathBuf,
    settings: Vec<(String, String)>,
}

impl ShimToken {
    /// A fresh SoftHSM2 token, set up like a freshly initialised stick, behind the shim with `settings` (`NKSHIM_*` pairs).
    pub fn new(settings: &[(&str, &str)]) -> Self {
        let shim = nitrokey_e2e::bins::pkcs11_shim().expect("PKCS#11 shim module");
        Self {
            hsm: SoftHsm::new().expect("softhsm token"),
            shim,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// The SoftHSM2 token underneath.
    pub fn softhsm(&self) -> &SoftHsm {
        &self.hsm
    }
}

impl Token for ShimToken {
    fn module(&self) -> &Path {
        &self.shim
    }
    fn slot_id(&self) -> u64 {
        self.hsm.slot_id()
    }
    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.hsm.env();
        env.push((
            "NKSHIM_MODULE".to_owned(),
            self.hsm.module().display().to_string(),
        ));
        env.extend(self.settings.iter().cloned());
        env
    }
    fn dir(&self) -> &Path {
        self.hsm.dir()
    }
    fn pkcs11_tool(&self) -> Command {
        self.hsm.pkcs11_tool()
    }
}

/// OpenSC's PKCS#11 call logger.
pub const PKCS11_SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so";

/// SoftHSM2 behind OpenSC's pkcs11-spy, which logs every PKCS#11 call to [`SpyToken::log`].
/// pkcs11-spy stays loaded after `dlclose` (it is marked `NODELETE`), as wrapper modules may:
/// a program that reloads it without `C_Finalize` gets `CKR_CRYPTOKI_ALREADY_INITIALIZED`.
pub struct SpyToken {
    hsm: SoftHsm,
    spy: PathBuf,
    log: PathBuf,
}

impl SpyToken {
    /// A fresh SoftHSM2 token behind pkcs11-spy; `None` when OpenSC's spy is not installed.
    pub fn new() -> Option<Self> {
        let spy = PathBuf::from(PKCS11_SPY);
        if !spy.exists() {
            return None;
        }
        let hsm = SoftHsm::new().expect("softhsm token");
        let log = hsm.dir().join("pkcs11-spy.log");
        Some(Self { hsm, spy, log })
    }

    /// Every PKCS#11 call logged so far, in order (`C_Initialize`, `C_Decrypt`, ...).
    pub fn calls(&self) -> Vec<String> {
        spy_calls(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The spy's whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The function names in a pkcs11-spy log: each call starts with a line `N: C_Name`.
pub fn spy_calls(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let (_, name) = l.split_once(": ")?;
            let name = name.split_whitespace().next()?;
            name.starts_with("C_").then(|| name.to_owned())
        })
        .collect()
}

impl Token for SpyToken {
    fn module(&self) -> &Path {
        &self.spy
    }
    fn slot_id(&self) -> u64 {
        self.hsm.slot_id()
    }
    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.hsm.env();
        env.push((
            "PKCS11SPY".to_owned(),
            self.hsm.module().display().to_string(),
        ));
        env.push((
            "PKCS11SPY_OUTPUT".to_owned(),
            self.log.display().to_string(),
        ));
        env
    }
    fn dir(&self) -> &Path {
        self.hsm.dir()
    }
    fn pkcs11_tool(&self) -> Command {
        self.hsm.pkcs11_tool()
    }
}

/// How the configuration selects the slot.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// `slotId` of the token.
    SlotId,
    /// `tokenLabel`.
    Label(&'a str),
    /// `tokenSerial`.
    Serial(&'a str),
}

/// The program under test: `NITROKEY_BIN_DIR` (e.g. a release build) or Cargo's build.
pub fn program() -> PathBuf {
    if std::env::var_os("NITROKEY_BIN_DIR").is_some() {
        nitrokey_e2e::bins::path("unseal-init").expect("unseal-init in NITROKEY_BIN_DIR")
    } else {
        PathBuf::from(env!("CARGO_BIN_EXE_unseal-init"))
    }
}

/// True when the program has the init write-ahead journal (`journalDir`); older builds
/// reject the unknown key.
pub fn has_journal() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new(program())
            .arg("--help")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--journal-dir"))
    })
}

/// Writes `unseal-init.yaml` in `dir` for `token` and `vault`: `hsm_extra` lines go into the
/// `hsm:` section, `extra` lines at the top level.
pub fn write_token_config(
    dir: &Path,
    token: &dyn Token,
    vault: &str,
    select: Select,
    hsm_extra: &str,
    extra: &str,
) -> PathBuf {
    let selector = match select {
        Select::SlotId => format!("slotId: {}", token.slot_id()),
        Select::Label(l) => format!("tokenLabel: \"{l}\""),
        Select::Serial(s) => format!("tokenSerial: \"{s}\""),
    };
    let mut text = format!(
        "mode: hsm\nvault:\n  address: {vault}\nhsm:\n  modulePath: {}\n  {selector}\n  pin: {USER_PIN}\n  keyLabel: bank-vaults\n",
        token.module().display()
    );
    for line in hsm_extra.lines().filter(|l| !l.trim().is_empty()) {
        text.push_str(&format!("  {}\n", line.trim()));
    }
    if has_journal() {
        text.push_str(&format!("journalDir: {}\n", dir.join("journal").display()));
    }
    text.push_str(extra);
    let path = dir.join("unseal-init.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs the program with `args` to completion (killed after `timeout`).
pub fn run_args(token: &dyn Token, args: &[&str], timeout: Duration) -> Run {
    let mut cmd = super::command(token);
    cmd.args(args);
    wait(cmd.spawn().expect("spawn unseal-init"), timeout)
}

/// `--config FILE --once`, expected to succeed.
pub fn once_ok(token: &dyn Token, config: &Path) -> Run {
    let config = config.display().to_string();
    let r = run_args(
        token,
        &["--config", &config, "--once"],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, Some(0), "unseal-init --once failed:\n{}", r.text);
    r
}

/// A sidecar process, killed on drop so that a failing test leaves nothing running.
pub struct Sidecar {
    child: Option<Child>,
    /// Base URL of its health and metrics endpoints.
    pub endpoints: String,
}

impl Sidecar {
    /// Starts the sidecar (no `--once`) for `token` and `vault` with a 300 ms unseal period.
    pub fn start(token: &dyn Token, dir: &Path, vault: &str, hsm_extra: &str) -> Self {
        let port = nitrokey_e2e::openbao::free_port().expect("port");
        let config = write_token_config(
            dir,
            token,
            vault,
            Select::SlotId,
            hsm_extra,
            &format!("unsealPeriod: 300ms\nmetricsAddress: 127.0.0.1:{port}\n"),
        );
        let mut cmd = super::command(token);
        cmd.arg("--config").arg(&config);
        Self {
            child: Some(cmd.spawn().expect("spawn sidecar")),
            endpoints: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs `cmd` as the sidecar, its endpoints at `endpoints`.
    pub fn spawn(mut cmd: Command, endpoints: String) -> Self {
        Self {
            child: Some(cmd.spawn().expect("spawn sidecar")),
            endpoints,
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after 20 s) and returns what it logged.
    pub fn stop(mut self) -> Run {
        let child = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait(child, Duration::from_secs(20))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a Vault initialised through its API, outside the program, handed out.
pub struct InitedVault {
    /// Hex unseal keys.
    pub keys: Vec<String>,
    /// Root token.
    pub root: String,
}

/// Initialises `bao` (5 shares, threshold 3) through its API, as Bank-Vaults did, and stores
/// the keys and root token on `token` the way Bank-Vaults wrote them: bare ciphertext under
/// CKA_LABEL only. `vault-unseal-0` is written with `first` (PKCS#1 v1.5 for Bank-Vaults
/// before v1.33), everything else with OAEP-SHA1.
pub fn init_like_bank_vaults(bao: &OpenBao, token: &dyn Token, first: Scheme) -> InitedVault {
    let (keys, root) = bao.init(5, 3).expect("sys/init");
    for (i, key) in keys.iter().enumerate() {
        let scheme = if i == 0 { first } else { Scheme::OaepSha1 };
        let ct = token
            .encrypt_with_public_key(key.as_bytes(), scheme)
            .expect("encrypt");
        token
            .write_data(&format!("vault-unseal-{i}"), &ct)
            .expect("write unseal key");
    }
    let ct = token
        .encrypt_with_public_key(root.as_bytes(), Scheme::OaepSha1)
        .expect("encrypt root");
    token.write_data("vault-root", &ct).expect("write root");
    InitedVault { keys, root }
}

/// The scheme byte of this program's stored-value header.
pub fn header_scheme(raw: &[u8]) -> Scheme {
    assert!(raw.len() > HEADER_LEN, "value too short for a header");
    assert_eq!(&raw[..3], b"NKV", "value lacks the format header");
    match raw[4] {
        1 => Scheme::OaepSha256,
        2 => Scheme::OaepSha1,
        3 => Scheme::Pkcs1v15,
        other => panic!("unknown scheme byte {other}"),
    }
}

/// Reads `label` with pkcs11-tool, checks the header and decrypts it on the token with the
/// scheme the header names, independently of the program.
pub fn decrypt_stored_on(token: &dyn Token, label: &str) -> (Scheme, String) {
    let raw = token.read_data(label).expect("read object");
    let scheme = header_scheme(&raw);
    assert_eq!(raw.len(), HEADER_LEN + 256, "{label}: unexpected length");
    let plain = token
        .decrypt(&raw[HEADER_LEN..], scheme)
        .expect("pkcs11-tool decrypt");
    (scheme, String::from_utf8(plain).expect("utf-8"))
}

/// `(label, application)` of every data object, as `pkcs11-tool --list-objects` prints them.
pub fn label_application_pairs(token: &dyn Token) -> Vec<(String, String)> {
    let listing = token.data_listing().expect("list objects");
    let mut pairs = Vec::new();
    let mut label: Option<String> = None;
    let field = |line: &str, key: &str| {
        line.trim()
            .strip_prefix(key)
            .map(|v| v.trim().trim_matches('\'').to_owned())
    };
    for line in listing.lines() {
        if let Some(l) = field(line, "label:") {
            label = Some(l);
        } else if let Some(app) = field(line, "application:")
            && let Some(l) = label.take()
        {
            pairs.push((l, app));
        }
    }
    pairs
}
