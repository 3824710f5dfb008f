//! Tools for injecting faults at exact moments of an init: a child process whose log is read
//! line by line (so a signal can be sent the instant a given line appears), a proxy tap that
//! records, holds or rewrites Vault's `sys/init` and `sys/unseal` replies, and an inspection
//! of what survived (Vault's state, every value on the token decrypted by `pkcs11-tool`, the
//! journal directory).

use super::proxy::{Seen, Tap};
use super::{HEADER_LEN, command, journal_dir};
use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::{Scheme, Token};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Number of unseal keys every scenario asks for (the default shares).
pub const SHARES: usize = 5;

/// Log message: `PUT sys/init` is about to be sent.
pub const INITIALIZING: &str = "initializing vault";
/// Log message: the `sys/init` reply arrived and was parsed.
pub const INIT_ANSWERED: &str = "sys/init answered; encrypting the keys on the host";
/// Log message: the journal file and its directory were fsync'd.
pub const JOURNAL_WRITTEN: &str = "init journal written";
/// Log message: one unseal key was written, read back and verified (field `key`).
pub const KEY_STORED: &str = "unseal key stored in key store";
/// Log message: the root token was written, read back and verified.
pub const ROOT_STORED: &str = "root token stored in key store";
/// Log message: every key verified and the journal deleted.
pub const JOURNAL_COMPLETE: &str = "init journal complete; removed";
/// Log message: a journal left by an earlier run was found at start.
pub const JOURNAL_RESUMED: &str = "resuming init journal";
/// Log message: the first `sys/unseal` is about to be sent.
pub const UNSEALING: &str = "vault is sealed, unsealing";
/// Log message: Vault reported unsealed.
pub const UNSEALED: &str = "successfully unsealed vault";
/// Log message: SIGTERM arrived.
pub const SIGTERM_RECEIVED: &str = "SIGTERM received";

/// Files in the journal directory (none when it does not exist).
pub fn journal_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(journal_dir(dir))
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

/// Names of the values an init stores: `vault-unseal-0..4`, then `vault-root`.
pub fn init_names() -> Vec<String> {
    let mut names: Vec<String> = (0..SHARES).map(|i| format!("vault-unseal-{i}")).collect();
    names.push("vault-root".into());
    names
}

/// True when `line` carries the log message `message`.
pub fn is_event(line: &str, message: &str) -> bool {
    line.contains(message)
}

/// True when `line` carries the field `name` with value `value` (quoted or not).
pub fn has_field(line: &str, name: &str, value: &str) -> bool {
    [format!("{name}={value}"), format!("{name}=\"{value}\"")]
        .iter()
        .any(|needle| {
            line.match_indices(needle.as_str()).any(|(at, _)| {
                let after = line[at + needle.len()..].chars().next();
                !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        })
}

/// Sends `signal` to `child`, the caller's own child that has not been reaped yet (so its
/// pid cannot belong to another process).
pub fn signal_child(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a child of this process that has not been waited for.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// Polls `check` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process and, once reaped, its exit status. Signals go through here: once the child
/// is reaped its pid may be reused by any process on the machine, so it is never signalled
/// again.
struct Proc {
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    fn signal(&mut self, signal: i32) {
        if self.exited().is_none() {
            signal_child(&self.child, signal);
        }
    }
}

/// Sends signals to a [`Watched`] process from any thread, only while it has not been reaped.
#[derive(Clone)]
pub struct Signaller(Arc<Mutex<Proc>>);

impl Signaller {
    /// Sends `signal` unless the process already ended.
    pub fn send(&self, signal: i32) {
        if let Ok(mut p) = self.0.lock() {
            p.signal(signal);
        }
    }
}

/// An action run by a [`Watched`] process's log reader the moment a matching line appears.
pub struct Trigger {
    /// Which line fires it.
    pub matches: Box<dyn Fn(&str) -> bool + Send>,
    /// What to do then (runs on the reader thread, before the next line is read); it can
    /// signal the process.
    pub action: Box<dyn FnOnce(&Signaller) + Send>,
}

/// The real `unseal-init` running as a child, its stdout and stderr read line by line.
pub struct Watched {
    proc: Signaller,
    pid: u32,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    fired: Arc<AtomicBool>,
    readers: Vec<JoinHandle<()>>,
}

fn read_lines(
    stream: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    mut trigger: Option<Trigger>,
    fired: Arc<AtomicBool>,
    proc: Signaller,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let at = Instant::now();
            let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
            if trigger.as_ref().is_some_and(|t| (t.matches)(&line))
                && let Some(t) = trigger.take()
            {
                (t.action)(&proc);
                fired.store(true, Ordering::SeqCst);
            }
            if let Ok(mut all) = lines.lock() {
                all.push((at, line));
            }
        }
    })
}

impl Watched {
    /// Spawns `cmd` (stdout and stderr piped, as `common::command` sets them); `trigger`
    /// watches stderr, where the program logs.
    pub fn spawn(mut cmd: Command, trigger: Option<Trigger>) -> Self {
        let mut child = cmd.spawn().expect("spawn unseal-init");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let fired = Arc::new(AtomicBool::new(false));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let pid = child.id();
        let proc = Signaller(Arc::new(Mutex::new(Proc {
            child,
            status: None,
        })));
        let readers = vec![
            read_lines(stdout, lines.clone(), None, fired.clone(), proc.clone()),
            read_lines(stderr, lines.clone(), trigger, fired.clone(), proc.clone()),
        ];
        Self {
            proc,
            pid,
            lines,
            fired,
            readers,
        }
    }

    /// `unseal-init --config CONFIG [--once]` for `hsm`, watched.
    pub fn start(hsm: &SoftHsm, config: &Path, once: bool, trigger: Option<Trigger>) -> Self {
        let mut cmd = command(hsm);
        cmd.arg("--config").arg(config);
        if once {
            cmd.arg("--once");
        }
        Self::spawn(cmd, trigger)
    }

    /// Process id (for reading `/proc`; signal with [`Watched::signal`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` unless the process already ended.
    pub fn signal(&self, signal: i32) {
        self.proc.send(signal);
    }

    /// A handle that signals this process from another thread.
    pub fn signaller(&self) -> Signaller {
        self.proc.clone()
    }

    /// True once the trigger's action ran.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.tail(usize::MAX)
    }

    /// The last `n` lines logged.
    pub fn tail(&self, n: usize) -> String {
        self.lines
            .lock()
            .map(|l| {
                l[l.len().saturating_sub(n)..]
                    .iter()
                    .map(|(_, line)| line.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// True when some line logged so far satisfies `check`.
    pub fn logged(&self, check: impl Fn(&str) -> bool) -> bool {
        !self.seen_at(check).is_empty()
    }

    /// When each line satisfying `check` was read, oldest first.
    pub fn seen_at(&self, check: impl Fn(&str) -> bool) -> Vec<Instant> {
        self.lines
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|(_, line)| check(line))
                    .map(|(at, _)| *at)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The exit status once the process ended (reaping it).
    pub fn exited(&self) -> Option<ExitStatus> {
        self.proc.0.lock().ok().and_then(|mut p| p.exited())
    }

    /// Waits up to `timeout` for the process to end; its exit status, or `None` if it still
    /// runs. The log is complete once this returns `Some`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if !poll(timeout, || self.exited().is_some()) {
            return None;
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.exited()
    }

    /// Kills the process (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(10));
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which reply a [`FaultTap`] holds back from unseal-init until released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The reply to `PUT sys/init`.
    InitReply,
    /// The reply to the first `PUT sys/unseal` that carries a key (not the progress reset).
    FirstUnsealWithKey,
}

#[derive(Default)]
struct TapState {
    init_replies: Vec<String>,
    holding: bool,
    held: bool,
    released: bool,
    /// The held reply is never delivered: its connection closes instead.
    dropped: bool,
}

/// Turns a `sys/init` reply body into the one delivered.
type Rewrite = Box<dyn Fn(&str) -> String + Send + Sync>;

/// A proxy tap that records every `sys/init` reply, can hold one reply until released (or for
/// a fixed time), and can rewrite the `sys/init` reply.
pub struct FaultTap {
    hold: Option<Hold>,
    hold_for: Option<Duration>,
    rewrite_init: Option<Rewrite>,
    state: Mutex<TapState>,
    changed: Condvar,
}

/// The longest a reply is held when nobody releases it, so that no test can hang on it.
const HOLD_CAP: Duration = Duration::from_secs(180);

impl FaultTap {
    /// A tap that only records.
    pub fn recording() -> Self {
        Self {
            hold: None,
            hold_for: None,
            rewrite_init: None,
            state: Mutex::new(TapState::default()),
            changed: Condvar::new(),
        }
    }

    /// A tap that holds `hold` until [`FaultTap::release`].
    pub fn holding(hold: Hold) -> Self {
        Self {
            hold: Some(hold),
            ..Self::recording()
        }
    }

    /// A tap that holds the `sys/init` reply for `duration`, then delivers it.
    pub fn delaying_init(duration: Duration) -> Self {
        Self {
            hold: Some(Hold::InitReply),
            hold_for: Some(duration),
            ..Self::recording()
        }
    }

    /// A tap that delivers `rewrite(reply)` instead of the `sys/init` reply (the original is
    /// still recorded).
    pub fn rewriting_init(rewrite: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        Self {
            rewrite_init: Some(Box::new(rewrite)),
            ..Self::recording()
        }
    }

    /// Waits until the held reply arrived from Vault and is being held back.
    pub fn wait_holding(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("tap state");
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| !s.holding)
            .expect("tap state");
        state.holding
    }

    /// True once a reply was held (and possibly released since).
    pub fn held(&self) -> bool {
        self.state.lock().map(|s| s.held).unwrap_or(false)
    }

    /// Delivers the held reply (and any later one that would have been held).
    pub fn release(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.released = true;
        }
        self.changed.notify_all();
    }

    /// Closes the held reply's connection unanswered, unless it was released already: what a
    /// Vault told to stop does with a request in flight (OpenBao drops it and finishes the
    /// work). Later replies pass.
    pub fn drop_held(&self) {
        if self.hold.is_none() {
            return;
        }
        if let Ok(mut s) = self.state.lock()
            && !s.released
        {
            s.released = true;
            s.dropped = true;
        }
        self.changed.notify_all();
    }

    /// True once a held reply was dropped.
    pub fn dropped(&self) -> bool {
        self.state.lock().map(|s| s.dropped).unwrap_or(false)
    }

    /// Every `sys/init` reply Vault sent, as Vault sent it, oldest first.
    pub fn init_replies(&self) -> Vec<InitReply> {
        self.state
            .lock()
            .map(|s| {
                s.init_replies
                    .iter()
                    .filter_map(|b| InitReply::parse(b))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn should_hold(&self, seen: &Seen) -> bool {
        match self.hold {
            Some(Hold::InitReply) => seen.is("PUT", "/v1/sys/init"),
            Some(Hold::FirstUnsealWithKey) => {
                seen.is("PUT", "/v1/sys/unseal")
                    && serde_json::from_str::<serde_json::Value>(&seen.body)
                        .ok()
                        .is_some_and(|v| v["key"].is_string())
            }
            None => false,
        }
    }

    /// Holds the reply until released; false when it was dropped instead.
    fn hold_reply(&self) -> bool {
        let mut state = self.state.lock().expect("tap state");
        if state.held {
            return true;
        }
        state.held = true;
        state.holding = true;
        self.changed.notify_all();
        let limit = self.hold_for.unwrap_or(HOLD_CAP);
        let started = Instant::now();
        while !state.released && started.elapsed() < limit {
            let left = limit.saturating_sub(started.elapsed());
            state = self.changed.wait_timeout(state, left).expect("tap state").0;
        }
        state.holding = false;
        !state.dropped
    }
}

impl Tap for FaultTap {
    fn response(&self, seen: &Seen, body: String) -> Option<String> {
        let is_init = seen.is("PUT", "/v1/sys/init");
        if is_init && let Ok(mut s) = self.state.lock() {
            s.init_replies.push(body.clone());
        }
        if self.should_hold(seen) && !self.hold_reply() {
            return None;
        }
        match &self.rewrite_init {
            Some(rewrite) if is_init => Some(rewrite(&body)),
            _ => Some(body),
        }
    }
}

/// What `sys/init` handed out: hex unseal keys and the root token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReply {
    /// `keys`, in order.
    pub keys: Vec<String>,
    /// `root_token`.
    pub root_token: String,
    /// Every secret string in the reply (hex and base64 keys, root token).
    pub secrets: Vec<String>,
}

impl InitReply {
    /// Parses a `sys/init` reply body; `None` for an error reply.
    pub fn parse(body: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let keys = v["keys"]
            .as_array()?
            .iter()
            .map(|k| k.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()?;
        let root_token = v["root_token"].as_str()?.to_owned();
        let mut secrets = keys.clone();
        secrets.extend(
            v["keys_base64"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str().map(str::to_owned)),
        );
        secrets.push(root_token.clone());
        Some(Self {
            keys,
            root_token,
            secrets,
        })
    }

    /// Name → value as unseal-init stores them.
    pub fn named(&self) -> BTreeMap<String, String> {
        let mut named: BTreeMap<String, String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("vault-unseal-{i}"), k.clone()))
            .collect();
        named.insert("vault-root".into(), self.root_token.clone());
        named
    }
}

/// Decrypts a value in the stored format (`NKV` header, then RSA-OAEP ciphertext) with
/// `pkcs11-tool`, independently of the program under test.
pub fn decrypt_sealed(hsm: &SoftHsm, sealed: &[u8]) -> Result<String, String> {
    if sealed.len() != HEADER_LEN + 256 || &sealed[..3] != b"NKV" {
        return Err(format!("unexpected format ({} bytes)", sealed.len()));
    }
    let plain = hsm
        .decrypt(&sealed[HEADER_LEN..], Scheme::OaepSha1)
        .map_err(|e| format!("decrypt: {e:#}"))?;
    String::from_utf8(plain).map_err(|_| "not UTF-8".to_owned())
}

/// Reads the value stored as `label` and decrypts it with `pkcs11-tool`.
pub fn read_stored(hsm: &SoftHsm, label: &str) -> Result<String, String> {
    let raw = hsm.read_data(label).map_err(|e| format!("read: {e:#}"))?;
    decrypt_sealed(hsm, &raw)
}

/// The journal's entries decrypted with `pkcs11-tool`: name → value. The journal is JSON
/// with an `entries` list of `{name, sealed}`, `sealed` being the stored format in base64.
pub fn journal_entries(hsm: &SoftHsm, dir: &Path) -> Result<BTreeMap<String, String>, String> {
    use base64::Engine;
    let mut out = BTreeMap::new();
    for file in journal_files(dir) {
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not JSON: {e}", file.display()))?;
        let entries = v["entries"]
            .as_array()
            .ok_or_else(|| format!("{}: no `entries` list", file.display()))?;
        for e in entries {
            let (Some(name), Some(sealed)) = (e["name"].as_str(), e["sealed"].as_str()) else {
                return Err(format!("{}: entry without name or sealed", file.display()));
            };
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(sealed)
                .map_err(|err| format!("{}: entry {name}: {err}", file.display()))?;
            out.insert(name.to_owned(), decrypt_sealed(hsm, &sealed)?);
        }
    }
    Ok(out)
}

/// Journal files that contain one of `reply`'s secrets in clear (there must be none).
pub fn journal_leaks(dir: &Path, reply: &InitReply) -> Vec<PathBuf> {
    journal_files(dir)
        .into_iter()
        .filter(|file| {
            let text =
                String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default()).into_owned();
            reply.secrets.iter().any(|s| text.contains(s.as_str()))
        })
        .collect()
}

/// What survived a scenario.
#[derive(Debug)]
pub struct Evidence {
    /// Vault reports initialised.
    pub initialized: bool,
    /// Vault reports sealed.
    pub sealed: bool,
    /// Every init value present on the token: name → decrypted value (or why not).
    pub stored: BTreeMap<String, Result<String, String>>,
    /// Files left in the journal directory.
    pub journal: Vec<PathBuf>,
}

impl Evidence {
    /// Collects Vault's state, the token's init values and the journal directory.
    pub fn collect(bao: &OpenBao, hsm: &SoftHsm, dir: &Path) -> Result<Self, String> {
        let status = bao
            .seal_status()
            .map_err(|e| format!("seal-status: {e:#}"))?;
        let labels = hsm
            .data_labels()
            .map_err(|e| format!("listing the token: {e:#}"))?;
        let stored = init_names()
            .into_iter()
            .filter(|n| labels.contains(n))
            .map(|n| {
                let value = read_stored(hsm, &n);
                (n, value)
            })
            .collect();
        Ok(Self {
            initialized: status.initialized,
            sealed: status.sealed,
            stored,
            journal: journal_files(dir),
        })
    }

    /// How many of the init values are stored and decrypt to what `expected` says.
    pub fn matching(&self, expected: &InitReply) -> usize {
        expected
            .named()
            .iter()
            .filter(|(n, v)| self.stored.get(*n).is_some_and(|s| s.as_ref() == Ok(*v)))
            .count()
    }

    /// Every init value stored and equal to `expected`, no journal left; else what is wrong.
    pub fn complete(&self, expected: &InitReply) -> Result<(), String> {
        let mut wrong = Vec::new();
        for (name, value) in expected.named() {
            match self.stored.get(&name) {
                None => wrong.push(format!("{name} missing")),
                Some(Err(e)) => wrong.push(format!("{name} unreadable: {e}")),
                Some(Ok(v)) if *v != value => {
                    wrong.push(format!("{name} differs from what sys/init returned"))
                }
                Some(Ok(_)) => {}
            }
        }
        if !self.journal.is_empty() {
            wrong.push(format!("journal left behind: {:?}", self.journal));
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    }
}

/// Keeps `tap`'s held reply from outliving a scenario, however it ends.
pub struct ReleaseOnDrop(pub Arc<FaultTap>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The shipped deployment's settings that decide whether a probe or a stop can cut an init
/// short, read from the manifests in `deploy/base/vault` (so the matrix follows them).
#[derive(Debug, Clone)]
pub struct Shipped {
    /// unseal-init's liveness probe: `periodSeconds`.
    pub liveness_period: Duration,
    /// `failureThreshold`.
    pub liveness_failures: u32,
    /// `timeoutSeconds`.
    pub liveness_timeout: Duration,
    /// The pod's `terminationGracePeriodSeconds`.
    pub grace: Duration,
    /// The Vault container's `preStop` exec command.
    pre_stop: Vec<String>,
    /// Where Vault's container sees unseal-init's journal directory (its mount of the volume
    /// unseal-init keeps the journal on, plus unseal-init's subPath).
    vault_sees_journal_at: String,
    /// unseal-init's `unsealPeriod` in the shipped config.
    pub unseal_period: String,
}

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/vault")
}

fn yaml(file: &str) -> serde_json::Value {
    let path = manifest_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    nitrokey_common::yaml::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A probe or grace setting in seconds, with the API's default when unset.
fn seconds(v: &serde_json::Value, default: u64) -> Duration {
    Duration::from_secs(v.as_u64().unwrap_or(default))
}

impl Shipped {
    /// Reads `statefulset.yaml` and `unseal-init.yaml`; panics naming what is missing.
    pub fn read() -> Self {
        let sts = yaml("statefulset.yaml");
        let spec = &sts["spec"]["template"]["spec"];
        let containers = spec["containers"].as_array().expect("containers");
        let named = |name: &str| {
            containers
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no container {name} in statefulset.yaml"))
        };
        let (vault, sidecar) = (named("vault"), named("unseal-init"));
        let probe = &sidecar["livenessProbe"];
        assert!(probe.is_object(), "unseal-init has no livenessProbe");
        let pre_stop: Vec<String> = vault["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .expect("the Vault container's preStop exec command")
            .iter()
            .map(|a| a.as_str().expect("string argument").to_owned())
            .collect();
        // Which volume holds the journal, and where Vault's container mounts it.
        let journal_mount = sidecar["volumeMounts"]
            .as_array()
            .expect("unseal-init volumeMounts")
            .iter()
            .find(|m| m["mountPath"] == "/var/lib/unseal-init")
            .expect("unseal-init mounts its journal directory");
        let volume = journal_mount["name"].as_str().expect("volume name");
        let vault_mount = vault["volumeMounts"]
            .as_array()
            .expect("Vault volumeMounts")
            .iter()
            .find(|m| m["name"] == volume && m["subPath"].is_null())
            .unwrap_or_else(|| panic!("Vault's container does not mount volume {volume}"));
        let mut vault_sees_journal_at = vault_mount["mountPath"]
            .as_str()
            .expect("mountPath")
            .trim_end_matches('/')
            .to_owned();
        if let Some(sub) = journal_mount["subPath"].as_str() {
            vault_sees_journal_at = format!("{vault_sees_journal_at}/{sub}");
        }
        let config = yaml("unseal-init.yaml");
        Self {
            liveness_period: seconds(&probe["periodSeconds"], 10),
            liveness_failures: probe["failureThreshold"].as_u64().unwrap_or(3) as u32,
            liveness_timeout: seconds(&probe["timeoutSeconds"], 1),
            grace: seconds(&spec["terminationGracePeriodSeconds"], 30),
            pre_stop,
            vault_sees_journal_at,
            unseal_period: config["unsealPeriod"]
                .as_str()
                .expect("unsealPeriod in unseal-init.yaml")
                .to_owned(),
        }
    }

    /// The preStop command as it runs against a journal directory at `journal` on this host
    /// (the manifest's path for Vault's view of it replaced).
    pub fn pre_stop_for(&self, journal: &Path) -> Vec<String> {
        let host = journal.display().to_string();
        assert!(
            self.pre_stop
                .iter()
                .any(|a| a.contains(&self.vault_sees_journal_at)),
            "the preStop hook {:?} does not look at {}",
            self.pre_stop,
            self.vault_sees_journal_at
        );
        self.pre_stop
            .iter()
            .map(|a| a.replace(&self.vault_sees_journal_at, &host))
            .collect()
    }
}

/// What a pod deletion did, as the kubelet stand-in saw it.
#[derive(Debug, Default)]
pub struct Deletion {
    /// When the deletion began (both containers told to stop).
    pub began: Option<Instant>,
    /// When Vault's preStop hook returned (or was abandoned at the end of the grace period).
    pub vault_stopped: Option<Instant>,
    /// The hook ran out the grace period.
    pub hook_timed_out: bool,
}

/// Deletes the "pod" of unseal-init `sidecar` and OpenBao `vault_pid` as the kubelet does
/// (pkg/kubelet/kuberuntime `killContainer`, run for every container at once): unseal-init,
/// which has no hook, gets SIGTERM at once; Vault's `preStop` hook runs first, and Vault gets
/// SIGTERM when it returns or the grace period ends, whichever is first. A stopping Vault
/// closes the request it was answering (`tap.drop_held`). SIGKILL at the end of the grace
/// period is the caller's (it reaps both). Runs on a thread of its own; returns at once.
pub fn delete_pod(
    sidecar: &Signaller,
    vault_pid: u32,
    tap: Arc<FaultTap>,
    hook: Vec<String>,
    grace: Duration,
    record: Arc<Mutex<Deletion>>,
) -> JoinHandle<()> {
    let began = Instant::now();
    if let Ok(mut r) = record.lock() {
        r.began = Some(began);
    }
    sidecar.send(libc::SIGTERM);
    std::thread::spawn(move || {
        let mut timed_out = false;
        match Command::new(&hook[0]).args(&hook[1..]).spawn() {
            Ok(mut child) => {
                while child.try_wait().ok().flatten().is_none() {
                    if began.elapsed() >= grace {
                        let _ = child.kill();
                        timed_out = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.wait();
            }
            Err(e) => eprintln!("preStop hook {hook:?} did not start: {e}"),
        }
        if let Ok(mut r) = record.lock() {
            r.vault_stopped = Some(Instant::now());
            r.hook_timed_out = timed_out;
        }
        tap.drop_held();
        // SAFETY: kill(2) on the test's own OpenBao child, which is reaped only later by the
        // cell's thread, so the pid is still the server's.
        unsafe { libc::kill(vault_pid as i32, libc::SIGTERM) };
    })
}

/// One HTTP GET of `path` on `base` (`http://127.0.0.1:PORT`) as the kubelet's HTTP prober
/// makes it: a fresh connection, `timeout` for the whole exchange; success is a status from
/// 200 to 399.
pub fn probe(base: &str, path: &str, timeout: Duration) -> bool {
    use std::io::Write;
    let addr = base.trim_start_matches("http://");
    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&sock, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).is_err() {
        return false;
    }
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}

/// The kubelet's liveness prober for one container (pkg/kubelet/prober): a probe every
/// `period`; `failures` failed probes in a row restart the container, which means SIGTERM,
/// then SIGKILL once the grace period is over.
pub struct LivenessProber {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Every probe: when, and whether it succeeded.
    pub probes: Arc<Mutex<Vec<(Instant, bool)>>>,
    /// Set when the failures reached the threshold and the container was restarted.
    pub restarted: Arc<AtomicBool>,
}

impl LivenessProber {
    /// Probes `base` + `/healthz` of `target` with the given settings.
    pub fn start(target: Signaller, base: String, shipped: &Shipped) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let restarted = Arc::new(AtomicBool::new(false));
        let (period, timeout, threshold, grace) = (
            shipped.liveness_period,
            shipped.liveness_timeout,
            shipped.liveness_failures,
            shipped.grace,
        );
        let (stop_in, probes_in, restarted_in) = (stop.clone(), probes.clone(), restarted.clone());
        let thread = std::thread::spawn(move || {
            let mut failed_in_a_row = 0;
            let mut next = Instant::now() + period;
            while !stop_in.load(Ordering::SeqCst) {
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                next += period;
                let ok = probe(&base, "/healthz", timeout);
                if let Ok(mut p) = probes_in.lock() {
                    p.push((Instant::now(), ok));
                }
                failed_in_a_row = if ok { 0 } else { failed_in_a_row + 1 };
                if failed_in_a_row >= threshold {
                    restarted_in.store(true, Ordering::SeqCst);
                    target.send(libc::SIGTERM);
                    let deadline = Instant::now() + grace;
                    while Instant::now() < deadline && !stop_in.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    target.send(libc::SIGKILL);
                    return;
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
            probes,
            restarted,
        }
    }

    /// The probes that failed.
    pub fn failures(&self) -> usize {
        self.probes
            .lock()
            .map(|p| p.iter().filter(|(_, ok)| !ok).count())
            .unwrap_or(0)
    }

    /// Probes made.
    pub fn count(&self) -> usize {
        self.probes.lock().map(|p| p.len()).unwrap_or(0)
    }
}

impl Drop for LivenessProber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
