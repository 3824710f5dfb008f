//! An in-memory Vault, so the Vault flow in [`crate::runner`] is unit-tested without a server
//! process, with faults no real server produces on demand.

use crate::secret::Secret;
use crate::vault::{
    InitResult, RekeyStatus, RekeyUpdate, RekeyVerify, SealStatus, VaultApi, VaultError,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use rand::RngExt;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Address every `MemoryVault` reports, as a local server's would look.
pub const ADDRESS: &str = "http://127.0.0.1:8200";

/// An in-memory model of Vault/OpenBao's seal API. The behaviour follows Vault/OpenBao's
/// `sys/seal-status`, `sys/init` and `sys/unseal` as observed against OpenBao 2.x in the
/// integration tests (`unseal-init/tests/vault_flow.rs`), with one simplification: a key it
/// never issued is refused (HTTP 400, "invalid key") when submitted, where Vault only notices
/// once the threshold is reached.
pub struct MemoryVault {
    state: Mutex<State>,
    calls: Mutex<BTreeMap<&'static str, usize>>,
    /// Runs inside `sys/init`, before it answers: what a test checks while it is in flight.
    during_init: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

#[derive(Default)]
struct State {
    initialized: bool,
    sealed: bool,
    threshold: u32,
    /// Every key `sys/init` issued, whether or not the answer carried it.
    keys: Vec<String>,
    root_token: String,
    /// Distinct valid keys submitted since the last reset or unseal.
    progress: Vec<String>,
    unreachable: bool,
    /// How many keys `sys/init` answers with, when fewer than it issued.
    init_answers: Option<usize>,
    /// How many keys `sys/init` issues whatever was asked (a misbehaving Vault).
    init_issues: Option<usize>,
    /// `sys/init` initialises, then its connection breaks before the answer (as a Vault
    /// stopped mid-request does: OpenBao finishes initialising after dropping the request).
    init_dropped: bool,
    /// Another initialiser's `sys/init` arrives just before the next one.
    beaten: bool,
    /// The rekey in progress (lost when Vault seals, as a restart loses it).
    rekey: Option<Rekey>,
    /// How many keys the last `sys/rekey/update` answers with, when fewer than it issued.
    rekey_answers: Option<usize>,
    /// Rekey nonces handed out so far (each new one differs).
    nonces: u32,
}

/// A rekey in progress, verification required (the only kind this program starts).
struct Rekey {
    nonce: String,
    shares: u8,
    threshold: u8,
    /// Distinct current keys submitted.
    submitted: Vec<String>,
    /// The new keys once handed out, the verification nonce, distinct new keys submitted.
    issued: Option<(Vec<String>, String, Vec<String>)>,
}

impl State {
    fn status(&self) -> SealStatus {
        SealStatus {
            initialized: self.initialized,
            // Vault reports an uninitialised server as sealed.
            sealed: self.sealed || !self.initialized,
            threshold: self.threshold,
            shares: u32::try_from(self.keys.len()).unwrap_or(u32::MAX),
            progress: u32::try_from(self.progress.len()).unwrap_or(u32::MAX),
        }
    }
}

impl Default for MemoryVault {
    fn default() -> Self {
        Self::new()
    }
}

/// A 32-byte key in hex, as Vault's `keys` carry them.
fn random_key() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

/// A root token in the `s.` form OpenBao hands out.
fn random_token() -> String {
    let tail: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("s.{tail}")
}

fn status_error(endpoint: &'static str, message: &str) -> VaultError {
    VaultError::Status {
        endpoint,
        status: 400,
        message: message.to_owned(),
    }
}

impl MemoryVault {
    /// An uninitialised Vault, answering.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            calls: Mutex::new(BTreeMap::new()),
            during_init: Mutex::new(None),
        }
    }

    /// Makes `sys/init` issue `keys` keys whatever `secret_shares` asked for.
    pub fn issue_keys_on_init(&self, keys: usize) {
        self.with(|s| s.init_issues = Some(keys));
    }

    /// Makes another initialiser win the race: the next `sys/init` finds Vault initialised
    /// (with keys it answered to the other one) and is refused as Vault refuses it.
    pub fn beaten_to_init(&self) {
        self.with(|s| s.beaten = true);
    }

    /// Makes `sys/init` initialise and then lose its answer with a broken connection.
    pub fn drop_init_answer(&self) {
        self.with(|s| s.init_dropped = true);
    }

    /// Runs `f` while `sys/init` is in flight (before Vault initialises).
    pub fn during_init(&self, f: impl FnOnce() + Send + 'static) {
        if let Ok(mut d) = self.during_init.lock() {
            *d = Some(Box::new(f));
        }
    }

    /// Makes every call fail as a server that is down or not listening yet does.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.with(|s| s.unreachable = unreachable);
    }

    /// Makes `sys/init` answer with only the first `keys` of the keys it issues.
    pub fn answer_init_with(&self, keys: usize) {
        self.with(|s| s.init_answers = Some(keys));
    }

    /// Makes the last `sys/rekey/update` answer with only the first `keys` new keys.
    pub fn answer_rekey_with(&self, keys: usize) {
        self.with(|s| s.rekey_answers = Some(keys));
    }

    /// True while a rekey is in progress.
    pub fn rekey_started(&self) -> bool {
        self.with(|s| s.rekey.is_some())
    }

    /// Seals again, as a restarted server comes up.
    pub fn seal(&self) {
        self.with(|s| {
            s.sealed = true;
            s.rekey = None;
            s.progress.clear();
        });
    }

    /// How many times the [`VaultApi`] method `method` was called (`"init"`, `"unseal"`...).
    pub fn calls(&self, method: &'static str) -> usize {
        self.calls
            .lock()
            .map(|c| c.get(method).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Every unseal key `sys/init` issued, in order.
    pub fn issued_keys(&self) -> Vec<String> {
        self.with(|s| s.keys.clone())
    }

    /// The root token `sys/init` issued (empty before).
    pub fn root_token(&self) -> String {
        self.with(|s| s.root_token.clone())
    }

    /// True once initialised and unsealed.
    pub fn is_unsealed(&self) -> bool {
        self.with(|s| s.initialized && !s.sealed)
    }

    /// Runs `f` on the state; a poisoned lock means a test already panicked, so the panic
    /// there is the one worth reading.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut state)
    }

    /// Counts the call and, when unreachable, fails it as the HTTP client would.
    fn enter(&self, method: &'static str) -> Result<(), VaultError> {
        if let Ok(mut c) = self.calls.lock() {
            *c.entry(method).or_default() += 1;
        }
        if self.with(|s| s.unreachable) {
            return Err(VaultError::Unreachable {
                address: ADDRESS.to_owned(),
                reason: "error sending request: connection refused".to_owned(),
            });
        }
        Ok(())
    }

    fn do_init(&self, shares: u8, threshold: u8) -> Result<InitResult, VaultError> {
        self.enter("init")?;
        if let Some(f) = self.during_init.lock().ok().and_then(|mut d| d.take()) {
            f();
        }
        let result = self.with(|s| {
            if std::mem::take(&mut s.beaten) && !s.initialized {
                s.keys = (0..shares).map(|_| random_key()).collect();
                s.root_token = random_token();
                s.threshold = u32::from(threshold);
                s.initialized = true;
                s.sealed = true;
            }
            if s.initialized {
                return Err(status_error("sys/init", "Vault is already initialized"));
            }
            if shares == 0 || threshold == 0 || threshold > shares {
                return Err(status_error(
                    "sys/init",
                    "invalid seal configuration: threshold must be between 1 and shares",
                ));
            }
            let issued = s.init_issues.unwrap_or(usize::from(shares));
            let mut keys: Vec<String> = Vec::with_capacity(issued);
            while keys.len() < issued {
                let key = random_key();
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            s.keys = keys;
            s.root_token = random_token();
            s.threshold = u32::from(threshold);
            s.initialized = true;
            s.sealed = true;
            s.progress.clear();
            let answered = s.init_answers.unwrap_or(s.keys.len()).min(s.keys.len());
            Ok(InitResult {
                keys: s.keys[..answered]
                    .iter()
                    .map(|k| Secret::from(k.as_str()))
                    .collect(),
                root_token: Secret::from(s.root_token.as_str()),
            })
        })?;
        if self.with(|s| s.init_dropped) {
            return Err(VaultError::Interrupted {
                endpoint: "sys/init",
                address: ADDRESS.to_owned(),
                reason: "error sending request: connection closed before message completed"
                    .to_owned(),
            });
        }
        Ok(result)
    }

    fn do_unseal(&self, key: &Secret) -> Result<SealStatus, VaultError> {
        self.enter("unseal")?;
        self.with(|s| {
            if !s.initialized {
                return Err(status_error("sys/unseal", "Vault is not initialized"));
            }
            if !s.sealed {
                return Ok(s.status());
            }
            let key = key.expose();
            if !s.keys.iter().any(|k| k == key) {
                s.progress.clear();
                return Err(status_error("sys/unseal", "Unseal failed, invalid key"));
            }
            if !s.progress.iter().any(|k| k == key) {
                s.progress.push(key.to_owned());
            }
            if s.progress.len() >= s.threshold as usize {
                s.sealed = false;
                s.progress.clear();
            }
            Ok(s.status())
        })
    }
}

impl VaultApi for MemoryVault {
    fn address(&self) -> &str {
        ADDRESS
    }

    fn seal_status(&self) -> BoxFuture<'_, Result<SealStatus, VaultError>> {
        let result = self
            .enter("seal_status")
            .map(|()| self.with(|s| s.status()));
        async move { result }.boxed()
    }

    fn init(&self, shares: u8, threshold: u8) -> BoxFuture<'_, Result<InitResult, VaultError>> {
        let result = self.do_init(shares, threshold);
        async move { result }.boxed()
    }

    fn unseal_reset(&self) -> BoxFuture<'_, Result<SealStatus, VaultError>> {
        let result = self.enter("unseal_reset").map(|()| {
            self.with(|s| {
                s.progress.clear();
                s.status()
            })
        });
        async move { result }.boxed()
    }

    fn unseal<'a>(&'a self, key: &'a Secret) -> BoxFuture<'a, Result<SealStatus, VaultError>> {
        let result = self.do_unseal(key);
        async move { result }.boxed()
    }

    fn raft_join<'a>(
        &'a self,
        _leader: &'a str,
        _leader_ca: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, VaultError>> {
        let result = self.enter("raft_join").map(|()| false);
        async move { result }.boxed()
    }

    fn rekey_status(&self) -> BoxFuture<'_, Result<RekeyStatus, VaultError>> {
        let result = self.enter("rekey_status").map(|()| self.with(rekey_status));
        async move { result }.boxed()
    }

    fn rekey_init(
        &self,
        shares: u8,
        threshold: u8,
    ) -> BoxFuture<'_, Result<RekeyStatus, VaultError>> {
        let result = self.enter("rekey_init").and_then(|()| {
            self.with(|s| {
                if !s.initialized || s.sealed {
                    return Err(status_error("sys/rekey/init", "Vault is sealed"));
                }
                if s.rekey.is_some() {
                    return Err(status_error("sys/rekey/init", "rekey already in progress"));
                }
                if shares == 0 || threshold == 0 || threshold > shares {
                    return Err(status_error("sys/rekey/init", "invalid seal configuration"));
                }
                s.nonces += 1;
                s.rekey = Some(Rekey {
                    nonce: format!("nonce-{}", s.nonces),
                    shares,
                    threshold,
                    submitted: Vec::new(),
                    issued: None,
                });
                Ok(rekey_status(s))
            })
        });
        async move { result }.boxed()
    }

    fn rekey_cancel(&self) -> BoxFuture<'_, Result<(), VaultError>> {
        let result = self
            .enter("rekey_cancel")
            .map(|()| self.with(|s| s.rekey = None));
        async move { result }.boxed()
    }

    fn rekey_update<'a>(
        &'a self,
        key: &'a Secret,
        nonce: &'a str,
    ) -> BoxFuture<'a, Result<RekeyUpdate, VaultError>> {
        let result = self.enter("rekey_update").and_then(|()| {
            self.with(|s| {
                let answers = s.rekey_answers;
                let threshold = s.threshold as usize;
                let valid = s.keys.iter().any(|k| k == key.expose());
                let Some(r) = s.rekey.as_mut() else {
                    return Err(status_error("sys/rekey/update", "no rekey in progress"));
                };
                if r.nonce != nonce || r.issued.is_some() {
                    return Err(status_error("sys/rekey/update", "incorrect nonce supplied"));
                }
                if !valid {
                    s.rekey = None;
                    return Err(status_error(
                        "sys/rekey/update",
                        "failed to read root key: invalid key",
                    ));
                }
                if !r.submitted.iter().any(|k| k == key.expose()) {
                    r.submitted.push(key.expose().to_owned());
                }
                if r.submitted.len() < threshold {
                    return Ok(RekeyUpdate {
                        complete: false,
                        progress: u32::try_from(r.submitted.len()).unwrap_or(u32::MAX),
                        keys: Vec::new(),
                        verification_nonce: String::new(),
                    });
                }
                let keys: Vec<String> = (0..r.shares).map(|_| random_key()).collect();
                s.nonces += 1;
                let verification = format!("verify-{}", s.nonces);
                let answered = answers.unwrap_or(keys.len()).min(keys.len());
                let out = keys[..answered]
                    .iter()
                    .map(|k| Secret::from(k.as_str()))
                    .collect();
                r.issued = Some((keys, verification.clone(), Vec::new()));
                Ok(RekeyUpdate {
                    complete: true,
                    progress: 0,
                    keys: out,
                    verification_nonce: verification,
                })
            })
        });
        async move { result }.boxed()
    }

    fn rekey_verify_status(&self) -> BoxFuture<'_, Result<RekeyVerify, VaultError>> {
        let result = self.enter("rekey_verify_status").and_then(|()| {
            self.with(|s| {
                match s
                    .rekey
                    .as_ref()
                    .and_then(|r| r.issued.as_ref().map(|i| (r, i)))
                {
                    Some((r, (_, nonce, progress))) => Ok(RekeyVerify {
                        nonce: nonce.clone(),
                        progress: u32::try_from(progress.len()).unwrap_or(u32::MAX),
                        threshold: u32::from(r.threshold),
                        complete: false,
                    }),
                    None => Err(status_error(
                        "sys/rekey/verify",
                        "no rekey configuration found",
                    )),
                }
            })
        });
        async move { result }.boxed()
    }

    fn rekey_verify<'a>(
        &'a self,
        key: &'a Secret,
        nonce: &'a str,
    ) -> BoxFuture<'a, Result<RekeyVerify, VaultError>> {
        let result = self.enter("rekey_verify").and_then(|()| {
            self.with(|s| {
                let Some(r) = s.rekey.as_mut() else {
                    return Err(status_error(
                        "sys/rekey/verify",
                        "no rekey configuration found",
                    ));
                };
                let threshold = r.threshold;
                let Some((keys, vnonce, progress)) = r.issued.as_mut() else {
                    return Err(status_error(
                        "sys/rekey/verify",
                        "no verification in progress",
                    ));
                };
                if vnonce != nonce {
                    return Err(status_error("sys/rekey/verify", "incorrect nonce supplied"));
                }
                if !keys.iter().any(|k| k == key.expose()) {
                    progress.clear();
                    return Err(status_error(
                        "sys/rekey/verify",
                        "rekey verification failed; incorrect key shares supplied",
                    ));
                }
                if !progress.iter().any(|k| k == key.expose()) {
                    progress.push(key.expose().to_owned());
                }
                if progress.len() < usize::from(threshold) {
                    return Ok(RekeyVerify {
                        nonce: nonce.to_owned(),
                        progress: u32::try_from(progress.len()).unwrap_or(u32::MAX),
                        threshold: u32::from(threshold),
                        complete: false,
                    });
                }
                s.keys = std::mem::take(keys);
                s.threshold = u32::from(threshold);
                s.rekey = None;
                Ok(RekeyVerify {
                    nonce: nonce.to_owned(),
                    progress: 0,
                    threshold: u32::from(threshold),
                    complete: true,
                })
            })
        });
        async move { result }.boxed()
    }
}

/// `sys/rekey/init`'s answer for the state.
fn rekey_status(s: &mut State) -> RekeyStatus {
    match &s.rekey {
        Some(r) => RekeyStatus {
            started: true,
            nonce: r.nonce.clone(),
            threshold: u32::from(r.threshold),
            shares: u32::from(r.shares),
            progress: u32::try_from(r.submitted.len()).unwrap_or(u32::MAX),
            required: s.threshold,
            verification_nonce: r
                .issued
                .as_ref()
                .map(|(_, n, _)| n.clone())
                .unwrap_or_default(),
        },
        None => RekeyStatus {
            required: s.threshold,
            ..RekeyStatus::default()
        },
    }
}
