//! The PKCS#11 session itself: loading the module, choosing the slot, logging in exactly once,
//! and keeping the session usable the way a real stick needs it.
//!
//! Everything here is synchronous and slow on a real stick (OpenSC's `C_Initialize` takes
//! seconds, a decrypt about 150 ms), so an [`Hsm`] lives on its own thread and is reached only
//! through [`crate::hsm_actor::HsmHandle`]. Each call makes one attempt; waiting and backoff
//! happen in the handle, on the runtime's timers.
//!
//! Two behaviours of OpenSC 0.23 with a SmartCard-HSM (and of tpm2-pkcs11) shape [`Hsm::run`]:
//! a failed operation stays active in its session, so every later `C_DecryptInit` there returns
//! `CKR_OPERATION_ACTIVE`; and after the token restarts, calls keep failing until the module is
//! re-initialised. So any failed call replaces the session, and repeated failures re-initialise
//! the module. A wrong PIN is never retried: `C_Login` is called again only with a PIN that
//! already worked.

use crate::config::{HsmConfig, SlotSelector};
use crate::pkcs11_raw::RawCalls;
use crate::secret::Secret;
use crate::telemetry::{OpTimer, Telemetry};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use nitrokey_common::backoff::Backoff;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why no login is possible with the PIN in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinFailure {
    /// `C_Login` answered `CKR_PIN_INCORRECT`: this value is wrong for the token.
    Rejected,
    /// The PIN is blocked, or one more failure would block it; no login is attempted.
    Locked,
    /// No PIN is configured.
    Missing,
}

impl PinFailure {
    /// Short reason for `/readyz`; never contains the PIN.
    pub fn reason(self) -> &'static str {
        match self {
            PinFailure::Rejected => "HSM user PIN rejected",
            PinFailure::Locked => "HSM user PIN blocked or on its final try",
            PinFailure::Missing => "no HSM user PIN configured",
        }
    }
}

/// Failures talking to the token.
#[derive(Debug, Error)]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    Module {
        /// Module path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// No slot matched the selector (yet: a token can show up later).
    #[error("no HSM slot matches {wanted}; slots with a token: {seen}")]
    NoSlot {
        /// What was asked for.
        wanted: String,
        /// Slots and token labels found.
        seen: String,
    },
    /// No slot matched the selector within the time a one-shot run waits.
    #[error(
        "no HSM slot matches {wanted} after waiting {waited} (hsm.tokenWaitTimeout); slots with a token: {seen}"
    )]
    TokenTimeout {
        /// What was asked for.
        wanted: String,
        /// Slots and token labels found last.
        seen: String,
        /// How long it waited.
        waited: String,
    },
    /// Several slots matched the selector.
    #[error("{wanted}: {matches}; set hsm.slotId, hsm.tokenLabel or hsm.tokenSerial to choose one")]
    AmbiguousSlot {
        /// Which criterion matched several slots, or that none was given.
        wanted: String,
        /// The matching slots.
        matches: String,
    },
    /// No PIN configured for an operation that needs one.
    #[error(
        "no HSM user PIN configured (set hsm.pin, hsm.pinFile, --hsm-pin or BANK_VAULTS_HSM_PIN)"
    )]
    NoPin,
    /// The token rejected the PIN. Fatal: never retried.
    #[error(
        "the HSM rejected the user PIN (CKR_PIN_INCORRECT); not retrying, the token blocks the PIN after a few failures"
    )]
    PinIncorrect,
    /// The PIN is blocked, or the next failure would block it.
    #[error("the HSM user PIN is {0}; unblock it with the SO PIN (e.g. sc-hsm-tool --unlock-pin)")]
    PinLocked(&'static str),
    /// Key pair missing.
    #[error(
        "RSA key pair `{0}` not found on the token (enable hsm.generateKey or run `unseal-init hsm keygen`)"
    )]
    KeyMissing(String),
    /// Only one half of the key pair exists.
    #[error("RSA key pair `{label}` is incomplete: {present} key found but no {missing} key")]
    KeyIncomplete {
        /// Label.
        label: String,
        /// Half that exists.
        present: &'static str,
        /// Half that is missing.
        missing: &'static str,
    },
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {op} failed: {source}")]
    Call {
        /// Operation name.
        op: &'static str,
        /// cryptoki's error (return value and function).
        source: CkError,
    },
    /// The session, login or token was lost; worth retrying after a pause.
    #[error("HSM token unavailable during {op}: {source}{}", lost_hint(op, source))]
    Lost {
        /// Operation name.
        op: &'static str,
        /// cryptoki's error.
        source: CkError,
    },
    /// The token stayed unreachable through every retry.
    #[error("HSM token unavailable after {attempts} attempts during {op}: {last}")]
    Unavailable {
        /// Operation name.
        op: &'static str,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        last: String,
    },
    /// The HSM thread is gone (it only stops when the program does).
    #[error("the HSM thread has stopped")]
    ThreadGone,
    /// The token returned something unusable.
    #[error("{0}")]
    Other(String),
}

impl HsmError {
    /// Which PIN problem this is, if any: the one question that decides whether the program
    /// may go on (a PIN problem is never retried).
    pub fn pin_failure(&self) -> Option<PinFailure> {
        match self {
            HsmError::PinIncorrect => Some(PinFailure::Rejected),
            HsmError::PinLocked(_) => Some(PinFailure::Locked),
            HsmError::NoPin => Some(PinFailure::Missing),
            _ => None,
        }
    }

    /// True when the token may simply be away (unplugged, restarting, not found yet).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HsmError::Lost { .. } | HsmError::Unavailable { .. } | HsmError::NoSlot { .. }
        )
    }
}

/// What a failed login that never judged the PIN usually means. tpm2-pkcs11 answers
/// `CKR_GENERAL_ERROR` both after its TPM restarted and, without a resource manager, while
/// another process's session holds the TPM's few object slots (the sidecar's does for as long
/// as it runs).
fn lost_hint(op: &str, source: &CkError) -> &'static str {
    match (op, source) {
        ("C_Login", CkError::Pkcs11(RvError::GeneralError, _)) => {
            " (the token failed before judging the PIN: it may be held by another process, as a TPM without a resource manager such as tpm2-abrmd is while the sidecar runs, or it restarted)"
        }
        _ => "",
    }
}

/// True for return values that mean the session, login or token was lost.
pub fn is_session_lost(err: &CkError) -> bool {
    matches!(
        err,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::DeviceError
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// What a slot looked like when the slots were listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    /// Slot id.
    pub id: u64,
    /// Token label as reported (padding removed).
    pub token_label: String,
    /// Token serial number.
    pub token_serial: String,
}

/// The token label without padding and without OpenSC's PIN decoration
/// (`bank-vaults (UserPIN)` → `bank-vaults`).
pub fn normalize_label(raw: &str) -> &str {
    let trimmed = raw.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    for suffix in ["(UserPIN)", "(SOPIN)", "(User PIN)", "(SO PIN)"] {
        if let Some(rest) = trimmed.strip_suffix(suffix) {
            return rest.trim_end();
        }
    }
    trimmed
}

fn describe_selector(sel: &SlotSelector) -> String {
    let mut parts = Vec::new();
    if let Some(id) = sel.slot_id {
        parts.push(format!("slotId {id}"));
    }
    if let Some(label) = &sel.token_label {
        parts.push(format!("tokenLabel `{label}`"));
    }
    if let Some(serial) = &sel.token_serial {
        parts.push(format!("tokenSerial `{serial}`"));
    }
    if parts.is_empty() {
        "any token (no slotId, tokenLabel or tokenSerial is set)".to_owned()
    } else {
        parts.join(" and ")
    }
}

fn describe_slots(slots: &[&SlotView]) -> String {
    if slots.is_empty() {
        return "none".to_owned();
    }
    slots
        .iter()
        .map(|s| {
            format!(
                "{} (token `{}`, serial `{}`)",
                s.id, s.token_label, s.token_serial
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Chooses the slot: every given criterion must match, and exactly one slot may match. Taking
/// the first of several would be a guess (a TPM token reports every serial as zeros).
pub fn select_slot(slots: &[SlotView], sel: &SlotSelector) -> Result<u64, HsmError> {
    let matches: Vec<&SlotView> = slots
        .iter()
        .filter(|s| sel.slot_id.is_none_or(|id| s.id == id))
        .filter(|s| {
            sel.token_label
                .as_deref()
                .is_none_or(|l| normalize_label(&s.token_label) == normalize_label(l))
        })
        .filter(|s| {
            sel.token_serial
                .as_deref()
                .is_none_or(|x| s.token_serial.trim() == x.trim())
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.id),
        [] => Err(HsmError::NoSlot {
            wanted: describe_selector(sel),
            seen: describe_slots(&slots.iter().collect::<Vec<_>>()),
        }),
        several => Err(HsmError::AmbiguousSlot {
            wanted: if *sel == SlotSelector::default() {
                "several HSM slots hold a token and no slotId, tokenLabel or tokenSerial is set"
                    .to_owned()
            } else {
                format!("several HSM slots match {}", describe_selector(sel))
            },
            matches: describe_slots(several),
        }),
    }
}

/// Copies a text attribute so that a NUL follows its last byte in memory, outside the declared
/// length. OpenSC 0.23 copies some string attributes (`CKA_APPLICATION`, labels) as C strings,
/// reading up to the first NUL whatever `ulValueLen` says; without the NUL it would store
/// whatever follows the buffer on the heap onto the token.
pub fn text_attr(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.extend_from_slice(bytes);
    v.push(0);
    // The NUL stays in the allocation's spare capacity; cryptoki passes the buffer's own
    // pointer and length to the module.
    v.pop();
    v
}

/// Handles that stay valid only as long as the session does.
#[derive(Debug, Default)]
pub struct HandleCache {
    /// The private key of the configured pair.
    pub private_key: Option<ObjectHandle>,
    /// Data object handles by label, from the last full listing and kept up to date by this
    /// program's own writes, so that reading, verifying and pruning a value need no search
    /// of their own. Refreshed by every listing; a handle that went invalid (another process
    /// deleted the object) drops it and the caller searches again.
    pub objects: Option<ObjectIndex>,
}

/// Data objects by label: each handle with its stored bytes once read (stored values are
/// ciphertext, never a secret in clear).
pub type ObjectIndex = std::collections::BTreeMap<String, Vec<(ObjectHandle, Option<Vec<u8>>)>>;

/// The key pair's identity: label, and `CKA_ID` once the public half was read, so that the
/// private half is paired by id and not by label alone.
#[derive(Debug, Clone, Default)]
pub struct KeyRef {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID` of the public key, when known and non-empty.
    pub id: Option<Vec<u8>>,
}

/// Consecutive failed re-opens after which the module itself is re-initialised: some modules
/// (tpm2-pkcs11 after its TPM restarted, SoftHSM2 after a token came back) recover only then.
const REINIT_AFTER: u32 = 2;
/// First pause between two re-initialisations while the token stays away; it doubles up to
/// [`REINIT_MAX_PAUSE`]. `C_Initialize` costs OpenSC seconds of reader and card work, and a
/// pulled stick may stay away for hours.
const REINIT_FIRST_PAUSE: Duration = Duration::from_secs(2);
/// Longest pause between two re-initialisations.
const REINIT_MAX_PAUSE: Duration = Duration::from_secs(60);

/// Whether a re-open may re-initialise the module now: only after `REINIT_AFTER` failed
/// re-opens, and no earlier than the pause the last re-initialisation set.
pub fn reinit_due(failed_reopens: u32, not_before: Option<Instant>, now: Instant) -> bool {
    failed_reopens >= REINIT_AFTER && not_before.is_none_or(|t| now >= t)
}

/// An initialised PKCS#11 module, finalised when dropped: cryptoki's `Pkcs11` never calls
/// `C_Finalize` by itself, and a module that stays loaded across `dlclose` (pkcs11-spy, any
/// wrapper) answers the next `C_Initialize` of a reload with `CKR_CRYPTOKI_ALREADY_INITIALIZED`
/// unless it was finalised; OpenSC would also keep its reader context for good.
pub struct Module {
    ctx: Pkcs11,
    raw: RawCalls,
}

impl Module {
    /// The calls made without cryptoki's length queries.
    pub fn raw(&self) -> &RawCalls {
        &self.raw
    }
}

impl std::ops::Deref for Module {
    type Target = Pkcs11;

    fn deref(&self) -> &Pkcs11 {
        &self.ctx
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // Every session must be closed by now (sessions hold a clone of the context, and
        // `Hsm` drops its session first).
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(error = %e, "C_Finalize failed");
        }
    }
}

/// An open PKCS#11 module and, once selected and logged in, a session on the chosen token.
pub struct Hsm {
    /// `None` only between a finalize and the next initialize.
    ctx: Option<Module>,
    module: PathBuf,
    selector: SlotSelector,
    slot: Option<Slot>,
    session: Option<Session>,
    pin: Option<Secret>,
    key: KeyRef,
    cache: HandleCache,
    telemetry: Arc<Telemetry>,
    failed_reopens: u32,
    general_errors: u32,
    /// Pauses between re-initialisations while the token stays away.
    reinit_pauses: Backoff,
    /// No re-initialisation before this.
    reinit_not_before: Option<Instant>,
}

fn call<T>(op: &'static str, r: cryptoki::error::Result<T>) -> Result<T, HsmError> {
    r.map_err(|source| classify(op, source))
}

fn classify(op: &'static str, source: CkError) -> HsmError {
    if is_session_lost(&source) {
        HsmError::Lost { op, source }
    } else {
        HsmError::Call { op, source }
    }
}

/// Loads and initialises a PKCS#11 module; dropping the result finalises it.
pub fn load_module(path: &std::path::Path) -> Result<Module, HsmError> {
    let module_err = |reason: String| HsmError::Module {
        path: path.to_owned(),
        reason,
    };
    if !path.exists() {
        return Err(module_err("file does not exist".to_owned()));
    }
    let ctx = Pkcs11::new(path).map_err(|e| module_err(e.to_string()))?;
    let raw = RawCalls::load(path).map_err(module_err)?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| module_err(e.to_string()))?;
    Ok(Module { ctx, raw })
}

/// Lists the slots that hold a token.
pub fn slot_views(ctx: &Pkcs11) -> Result<Vec<(Slot, SlotView)>, HsmError> {
    let slots = call("C_GetSlotList", ctx.get_slots_with_token())?;
    let mut out = Vec::with_capacity(slots.len());
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        out.push((
            slot,
            SlotView {
                id: slot.id(),
                token_label: info.label().trim().to_owned(),
                token_serial: info.serial_number().trim().to_owned(),
            },
        ));
    }
    Ok(out)
}

impl Hsm {
    /// Loads the module and logs what it is. Selects no slot yet: see [`Hsm::select`].
    pub fn load(cfg: &HsmConfig, telemetry: Arc<Telemetry>) -> Result<Self, HsmError> {
        let ctx = {
            let _t = OpTimer::start(&telemetry, "initialize");
            load_module(&cfg.module_path)?
        };
        if let Ok(info) = ctx.get_library_info() {
            tracing::info!(
                cryptoki_version = %info.cryptoki_version(),
                manufacturer = info.manufacturer_id().trim(),
                library = info.library_description().trim(),
                library_version = %info.library_version(),
                "HSM library information"
            );
        }
        Ok(Self {
            ctx: Some(ctx),
            module: cfg.module_path.clone(),
            selector: cfg.selector.clone(),
            slot: None,
            session: None,
            pin: cfg.pin.clone(),
            key: KeyRef {
                label: cfg.key_label.clone(),
                id: None,
            },
            cache: HandleCache::default(),
            telemetry,
            failed_reopens: 0,
            general_errors: 0,
            reinit_pauses: Backoff::new(REINIT_FIRST_PAUSE, REINIT_MAX_PAUSE),
            reinit_not_before: None,
        })
    }

    /// Looks for the configured token once. `Ok(false)` when it is not there (yet).
    pub fn select(&mut self) -> Result<bool, HsmError> {
        let views = slot_views(self.ctx()?)?;
        let plain: Vec<SlotView> = views.iter().map(|(_, v)| v.clone()).collect();
        match select_slot(&plain, &self.selector) {
            Ok(id) => {
                self.slot = views.into_iter().find(|(_, v)| v.id == id).map(|(s, _)| s);
                self.log_slot();
                Ok(self.slot.is_some())
            }
            Err(HsmError::NoSlot { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// What [`Hsm::select`] is looking for and which slots with a token it sees, for logs
    /// and errors while waiting.
    pub fn describe_search(&self) -> (String, String) {
        let seen = self
            .ctx()
            .and_then(slot_views)
            .map(|v| {
                let views: Vec<&SlotView> = v.iter().map(|(_, s)| s).collect();
                describe_slots(&views)
            })
            .unwrap_or_else(|e| e.to_string());
        (describe_selector(&self.selector), seen)
    }

    /// Finalizes and re-initialises the module: the only way some modules notice a token
    /// that came back or a TPM that restarted.
    pub fn reinitialize(&mut self) -> Result<(), HsmError> {
        self.session = None;
        self.cache = HandleCache::default();
        self.slot = None;
        // Dropping the module finalises it.
        self.ctx = None;
        let _t = OpTimer::start(&self.telemetry, "initialize");
        self.ctx = Some(load_module(&self.module)?);
        Ok(())
    }

    fn log_slot(&self) {
        let (Ok(ctx), Some(slot)) = (self.ctx(), self.slot) else {
            return;
        };
        if let Ok(t) = ctx.get_token_info(slot) {
            tracing::info!(
                slot = slot.id(),
                label = t.label().trim(),
                manufacturer = t.manufacturer_id().trim(),
                model = t
                    .model()
                    .trim_matches(|c: char| c == '\0' || c.is_whitespace()),
                serial = t.serial_number().trim(),
                "HSM token found"
            );
        }
    }

    /// The selected slot id, once selected.
    pub fn slot_id(&self) -> Option<u64> {
        self.slot.map(|s| s.id())
    }

    /// The key pair this program uses.
    pub fn key(&self) -> &KeyRef {
        &self.key
    }

    /// Records the key pair's `CKA_ID` (read from its public half).
    pub fn set_key_id(&mut self, id: Vec<u8>) {
        self.key.id = if id.is_empty() { None } else { Some(id) };
        self.cache.private_key = None;
    }

    /// Keeps the private key's handle, found with its `CKA_ID`, for this session.
    pub fn remember_private_key(&mut self, handle: ObjectHandle) {
        self.cache.private_key = Some(handle);
    }

    /// The PKCS#11 context.
    pub fn ctx(&self) -> Result<&Pkcs11, HsmError> {
        self.module().map(|m| &**m)
    }

    /// The loaded module, with the calls made without cryptoki.
    pub fn module(&self) -> Result<&Module, HsmError> {
        self.ctx
            .as_ref()
            .ok_or_else(|| HsmError::Other("PKCS#11 module is not initialised".to_owned()))
    }

    fn selected(&self) -> Result<Slot, HsmError> {
        self.slot.ok_or_else(|| HsmError::NoSlot {
            wanted: describe_selector(&self.selector),
            seen: "not searched yet".to_owned(),
        })
    }

    /// Opens a read-write session and logs in as user. `C_Login` is called at most once per
    /// call; a rejected PIN is a fatal error and is forgotten, so this `Hsm` never presents it
    /// again (a later call fails with [`HsmError::NoPin`] instead).
    pub fn login(&mut self) -> Result<(), HsmError> {
        let pin = self.pin.clone().ok_or(HsmError::NoPin)?;
        let slot = self.selected()?;
        // Nothing was presented yet, so any failure here is the token's, never the PIN's: a
        // busy or restarting token is worth another try.
        let info = self
            .ctx()?
            .get_token_info(slot)
            .map_err(|source| HsmError::Lost {
                op: "C_GetTokenInfo",
                source,
            })?;
        if info.user_pin_locked() {
            return Err(HsmError::PinLocked("locked"));
        }
        if info.user_pin_final_try() {
            return Err(HsmError::PinLocked(
                "one failure away from being locked; refusing to risk it",
            ));
        }
        let session = {
            let _t = OpTimer::start(&self.telemetry, "open_session");
            call("C_OpenSession", self.ctx()?.open_rw_session(slot))?
        };
        tracing::info!(slot = slot.id(), "HSM login attempt");
        self.telemetry.login_attempt();
        let auth = AuthPin::from(pin.expose().to_owned());
        let result = {
            let _t = OpTimer::start(&self.telemetry, "login");
            session.login(UserType::User, Some(&auth))
        };
        match result {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            // The refused value is dropped so that no later re-open can present it again.
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                self.pin = None;
                return Err(HsmError::PinIncorrect);
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                self.pin = None;
                return Err(HsmError::PinLocked("locked"));
            }
            // tpm2-pkcs11 answers a login after its TPM restarted with CKR_GENERAL_ERROR until
            // the module is re-initialised: a token problem, not a PIN problem.
            Err(source @ CkError::Pkcs11(RvError::GeneralError, _)) => {
                return Err(HsmError::Lost {
                    op: "C_Login",
                    source,
                });
            }
            Err(source) => return Err(classify("C_Login", source)),
        }
        self.session = Some(session);
        self.cache = HandleCache::default();
        self.failed_reopens = 0;
        self.general_errors = 0;
        self.reinit_pauses.reset();
        self.reinit_not_before = None;
        Ok(())
    }

    /// Drops the session so that the next operation re-selects the slot and logs in again
    /// (with the PIN that already worked).
    pub fn reset_session(&mut self) {
        self.session = None;
        self.cache = HandleCache::default();
    }

    /// Swaps the session for a fresh one, ending whatever operation a failed call left
    /// active in it. The new session is opened before the old one closes, so the login
    /// (shared by every session of this process) survives.
    fn replace_session(&mut self) {
        let (Ok(ctx), Some(slot)) = (self.ctx(), self.slot) else {
            self.reset_session();
            return;
        };
        match ctx.open_rw_session(slot) {
            Ok(fresh) => {
                self.session = Some(fresh);
                self.cache = HandleCache::default();
            }
            Err(_) => self.reset_session(),
        }
    }

    /// Re-selects the slot and logs in again after the session was lost; re-initialises the
    /// module first when plain re-opening keeps failing.
    fn reopen(&mut self) -> Result<(), HsmError> {
        self.session = None;
        self.cache = HandleCache::default();
        let now = Instant::now();
        if reinit_due(self.failed_reopens, self.reinit_not_before, now) {
            let pause = self.reinit_pauses.next();
            self.reinit_not_before = Some(now + pause);
            tracing::debug!(
                failures = self.failed_reopens,
                next_no_sooner_than = ?pause,
                "re-initialising the PKCS#11 module"
            );
            self.reinitialize()?;
        }
        // A re-plugged token may come back on another slot id, so select again.
        let found = self.select()?;
        if !found {
            return Err(HsmError::NoSlot {
                wanted: describe_selector(&self.selector),
                seen: "none matching".to_owned(),
            });
        }
        self.login()
    }

    /// Runs `f` on the session as operation `op`, timed, in one attempt. A lost session is
    /// re-opened first (logging in again with the PIN that worked). After any failure the
    /// session is replaced, so an operation the module left active cannot poison the next call.
    pub fn run<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&Session, &mut HandleCache, &KeyRef) -> cryptoki::error::Result<T>,
    ) -> Result<T, HsmError> {
        self.run_raw(op, |s, _, cache, key| f(s, cache, key))
    }

    /// [`Hsm::run`], with the calls made without cryptoki's length queries at hand.
    pub fn run_raw<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&Session, &RawCalls, &mut HandleCache, &KeyRef) -> cryptoki::error::Result<T>,
    ) -> Result<T, HsmError> {
        if self.session.is_none()
            && let Err(e) = self.reopen()
        {
            if e.pin_failure().is_none() {
                self.failed_reopens += 1;
            }
            return Err(e);
        }
        let (Some(session), Some(module)) = (self.session.as_ref(), self.ctx.as_ref()) else {
            return Err(HsmError::Other("no HSM session".to_owned()));
        };
        let result = {
            let _t = OpTimer::start(&self.telemetry, op);
            f(session, module.raw(), &mut self.cache, &self.key)
        };
        match result {
            Ok(v) => Ok(v),
            Err(source @ CkError::Pkcs11(RvError::GeneralError, _)) => {
                // One general error can be the value (a bad ciphertext); several since the last
                // login mean the module lost its device (SoftHSM2 whose token files went away,
                // tpm2-pkcs11 whose TPM restarted), and only a re-initialisation brings it back.
                self.general_errors += 1;
                if self.general_errors > REINIT_AFTER {
                    self.general_errors = 0;
                    self.reset_session();
                    self.failed_reopens = REINIT_AFTER;
                    return Err(HsmError::Lost { op, source });
                }
                self.replace_session();
                Err(HsmError::Call { op, source })
            }
            Err(source) if is_session_lost(&source) => {
                self.reset_session();
                self.failed_reopens += 1;
                Err(HsmError::Lost { op, source })
            }
            Err(source) => {
                self.replace_session();
                Err(HsmError::Call { op, source })
            }
        }
    }
}

impl Drop for Hsm {
    fn drop(&mut self) {
        // Sessions first (each closes with C_CloseSession), then the module's C_Finalize.
        self.session = None;
        self.ctx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_failing_before_the_pin_is_judged_says_what_it_may_mean() {
        let general = || CkError::Pkcs11(RvError::GeneralError, cryptoki::context::Function::Login);
        let text = HsmError::Lost {
            op: "C_Login",
            source: general(),
        }
        .to_string();
        assert!(
            text.contains("another process") && text.contains("restarted"),
            "{text}"
        );
        let other = HsmError::Lost {
            op: "C_Decrypt",
            source: general(),
        }
        .to_string();
        assert!(!other.contains("another process"), "{other}");
    }

    fn views() -> Vec<SlotView> {
        vec![
            SlotView {
                id: 0,
                token_label: "other".into(),
                token_serial: "111".into(),
            },
            SlotView {
                id: 1_234_567_890,
                token_label: "bank-vaults (UserPIN)".into(),
                token_serial: "DENK0200074".into(),
            },
        ]
    }

    #[test]
    fn the_module_is_reinitialised_only_after_failures_and_a_pause() {
        let t0 = Instant::now();
        assert!(!reinit_due(0, None, t0));
        assert!(!reinit_due(REINIT_AFTER - 1, None, t0));
        assert!(reinit_due(REINIT_AFTER, None, t0));
        let later = t0 + REINIT_FIRST_PAUSE;
        assert!(!reinit_due(REINIT_AFTER + 5, Some(later), t0));
        assert!(reinit_due(REINIT_AFTER + 5, Some(later), later));
    }

    #[test]
    fn label_decorations_and_padding_are_ignored() {
        assert_eq!(normalize_label("bank-vaults (UserPIN)"), "bank-vaults");
        assert_eq!(normalize_label("bank-vaults      \0\0"), "bank-vaults");
        assert_eq!(normalize_label("bank-vaults"), "bank-vaults");
    }

    #[test]
    fn slot_is_found_by_id_label_or_serial() {
        let by = |sel: SlotSelector| select_slot(&views(), &sel);
        assert_eq!(
            by(SlotSelector {
                slot_id: Some(0),
                ..Default::default()
            })
            .expect("id"),
            0
        );
        assert_eq!(
            by(SlotSelector {
                token_label: Some("bank-vaults".into()),
                ..Default::default()
            })
            .expect("label"),
            1_234_567_890
        );
        assert_eq!(
            by(SlotSelector {
                token_serial: Some("DENK0200074".into()),
                ..Default::default()
            })
            .expect("serial"),
            1_234_567_890
        );
    }

    #[test]
    fn no_match_lists_what_was_seen() {
        let err = select_slot(
            &views(),
            &SlotSelector {
                token_label: Some("nope".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tokenLabel `nope`"), "{msg}");
        assert!(
            msg.contains("bank-vaults (UserPIN)") && msg.contains("other"),
            "{msg}"
        );
        assert!(matches!(err, HsmError::NoSlot { .. }));
        assert_eq!(
            select_slot(&views()[1..], &SlotSelector::default()).expect("single"),
            1_234_567_890
        );
    }

    #[test]
    fn several_matches_are_an_error_naming_each_never_the_first() {
        // A TPM token reports every serial as zeros: a serial selector must not guess.
        let zeros = vec![
            SlotView {
                id: 1,
                token_label: "a".into(),
                token_serial: "0000000000000000".into(),
            },
            SlotView {
                id: 2,
                token_label: "b".into(),
                token_serial: "0000000000000000".into(),
            },
        ];
        let err = select_slot(
            &zeros,
            &SlotSelector {
                token_serial: Some("0000000000000000".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, HsmError::AmbiguousSlot { .. }), "{msg}");
        assert!(
            msg.contains("1 (token `a`") && msg.contains("2 (token `b`"),
            "{msg}"
        );
        assert!(
            msg.starts_with("several HSM slots match tokenSerial"),
            "{msg}"
        );
        // No criterion at all (SoftHSM's extra empty slot beside the token): said as it is.
        let msg = select_slot(&views(), &SlotSelector::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("several HSM slots hold a token and no slotId"),
            "{msg}"
        );
        assert!(!msg.contains("the only slot"), "{msg}");
    }

    #[test]
    fn text_attributes_carry_a_nul_outside_their_length() {
        let v = text_attr(b"vault-test");
        assert_eq!(v, b"vault-test");
        assert!(v.capacity() > v.len());
        // SAFETY: the byte at len() lies inside the allocation (capacity > len) and was
        // written by text_attr before the pop.
        let after = unsafe { *v.as_ptr().add(v.len()) };
        assert_eq!(after, 0);
    }

    #[test]
    fn lost_sessions_are_told_apart_from_real_failures() {
        use cryptoki::context::Function;
        assert!(is_session_lost(&CkError::Pkcs11(
            RvError::DeviceRemoved,
            Function::Decrypt
        )));
        assert!(!is_session_lost(&CkError::Pkcs11(
            RvError::PinIncorrect,
            Function::Login
        )));
        assert!(!is_session_lost(&CkError::Pkcs11(
            RvError::OperationActive,
            Function::DecryptInit
        )));
    }
}
