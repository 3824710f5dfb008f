//! PKCS#11 session management: loading the module, choosing the slot, logging in exactly once,
//! and re-opening the session with backoff when the token goes away.
//!
//! Every token call goes through [`Hsm::run`], which times it for the metrics and, when the
//! session or token was lost, re-opens and retries. A wrong PIN is never retried: a
//! SmartCard-HSM blocks the PIN after a few failures, so `C_Login` is called again only with
//! a PIN that already worked.

use crate::config::{HsmConfig, SlotSelector};
use crate::pin::PinFailure;
use crate::secret::Secret;
use crate::telemetry::{OpTimer, Telemetry};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

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
    /// No slot matched the selector.
    #[error("no HSM slot matches {wanted}; slots seen: {seen}")]
    NoSlot {
        /// What was asked for.
        wanted: String,
        /// Slots and token labels found.
        seen: String,
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
    /// The token stayed unreachable through every retry.
    #[error("HSM token unavailable after {attempts} attempts during {op}: {source}")]
    Unavailable {
        /// Operation name.
        op: &'static str,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        source: CkError,
    },
    /// The token returned something unusable.
    #[error("{0}")]
    Other(String),
}

impl HsmError {
    /// True when retrying cannot help (PIN problems): the PIN in use must not be tried again.
    pub fn is_fatal(&self) -> bool {
        self.pin_failure().is_some()
    }

    /// Which PIN problem this is, if any.
    pub fn pin_failure(&self) -> Option<PinFailure> {
        match self {
            HsmError::PinIncorrect => Some(PinFailure::Rejected),
            HsmError::PinLocked(_) => Some(PinFailure::Locked),
            HsmError::NoPin => Some(PinFailure::Missing),
            _ => None,
        }
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
        "the only slot with a token".to_owned()
    } else {
        parts.join(" and ")
    }
}

/// Chooses the slot: every given criterion must match; with none given, exactly one slot with
/// a token must exist.
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
    let no_criteria = sel == &SlotSelector::default();
    match matches.as_slice() {
        [one] => Ok(one.id),
        [first, ..] if !no_criteria => Ok(first.id),
        _ => Err(HsmError::NoSlot {
            wanted: describe_selector(sel),
            seen: if slots.is_empty() {
                "none".to_owned()
            } else {
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
            },
        }),
    }
}

/// Handles that stay valid only as long as the session does.
#[derive(Debug, Default)]
pub struct HandleCache {
    /// The private key of the configured pair.
    pub private_key: Option<ObjectHandle>,
}

/// An open, logged-in PKCS#11 session on the selected token.
pub struct Hsm {
    /// `None` only between a finalize and the next initialize.
    ctx: Option<Pkcs11>,
    module: PathBuf,
    selector: SlotSelector,
    slot: Slot,
    session: Option<Session>,
    pin: Option<Secret>,
    key_label: String,
    cache: HandleCache,
    telemetry: Arc<Telemetry>,
    retries: u32,
    backoff: Duration,
}

fn call<T>(op: &'static str, r: cryptoki::error::Result<T>) -> Result<T, HsmError> {
    r.map_err(|source| HsmError::Call { op, source })
}

/// Loads and initialises a PKCS#11 module.
pub fn load_module(path: &std::path::Path) -> Result<Pkcs11, HsmError> {
    let module_err = |reason: String| HsmError::Module {
        path: path.to_owned(),
        reason,
    };
    if !path.exists() {
        return Err(module_err("file does not exist".to_owned()));
    }
    let ctx = Pkcs11::new(path).map_err(|e| module_err(e.to_string()))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| module_err(e.to_string()))?;
    Ok(ctx)
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
    /// Loads the module, logs what it finds like Bank-Vaults does, and selects the slot.
    /// Does not log in; call [`Hsm::login`].
    pub fn open(cfg: &HsmConfig, telemetry: Arc<Telemetry>) -> Result<Self, HsmError> {
        let ctx = load_module(&cfg.module_path)?;
        if let Ok(info) = ctx.get_library_info() {
            tracing::info!(
                cryptoki_version = %info.cryptoki_version(),
                manufacturer = info.manufacturer_id(),
                library = info.library_description(),
                library_version = %info.library_version(),
                "HSM library information"
            );
        }
        let slot = Self::find_slot(&ctx, &cfg.selector)?;
        let hsm = Self {
            ctx: Some(ctx),
            module: cfg.module_path.clone(),
            selector: cfg.selector.clone(),
            slot,
            session: None,
            pin: cfg.pin.clone(),
            key_label: cfg.key_label.clone(),
            cache: HandleCache::default(),
            telemetry,
            retries: 6,
            backoff: Duration::from_millis(250),
        };
        hsm.log_slot();
        Ok(hsm)
    }

    fn find_slot(ctx: &Pkcs11, selector: &SlotSelector) -> Result<Slot, HsmError> {
        let views = slot_views(ctx)?;
        let plain: Vec<SlotView> = views.iter().map(|(_, v)| v.clone()).collect();
        tracing::info!(
            slots = ?plain.iter().map(|v| v.id).collect::<Vec<_>>(),
            "HSM searching for slot"
        );
        let id = select_slot(&plain, selector)?;
        views
            .into_iter()
            .find(|(_, v)| v.id == id)
            .map(|(s, _)| s)
            .ok_or_else(|| HsmError::Other(format!("slot {id} vanished")))
    }

    fn log_slot(&self) {
        let Ok(ctx) = self.ctx() else {
            return;
        };
        if let Ok(t) = ctx.get_token_info(self.slot) {
            tracing::info!(
                slot = self.slot.id(),
                label = t.label().trim(),
                manufacturer = t.manufacturer_id(),
                model = t.model(),
                serial = t.serial_number(),
                "HSM token information"
            );
        }
        if let Ok(s) = ctx.get_slot_info(self.slot) {
            tracing::info!(
                slot = self.slot.id(),
                description = s.slot_description().trim(),
                manufacturer = s.manufacturer_id(),
                "HSM slot information"
            );
        }
    }

    /// The selected slot id.
    pub fn slot_id(&self) -> u64 {
        self.slot.id()
    }

    /// The configured key pair label.
    pub fn key_label(&self) -> &str {
        &self.key_label
    }

    /// The PKCS#11 context.
    pub fn ctx(&self) -> Result<&Pkcs11, HsmError> {
        self.ctx
            .as_ref()
            .ok_or_else(|| HsmError::Other("PKCS#11 module is not initialised".to_owned()))
    }

    /// Sets how often and how patiently a lost token is re-opened.
    pub fn set_retry(&mut self, retries: u32, backoff: Duration) {
        self.retries = retries.max(1);
        self.backoff = backoff;
    }

    /// Opens a read-write session and logs in as user. `C_Login` is called at most once per
    /// call; a rejected PIN is a fatal error and is forgotten, so this `Hsm` never presents it
    /// again (a later call fails with [`HsmError::NoPin`] instead).
    pub fn login(&mut self) -> Result<(), HsmError> {
        let pin = self.pin.clone().ok_or(HsmError::NoPin)?;
        let info = call("C_GetTokenInfo", self.ctx()?.get_token_info(self.slot))?;
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
            call("C_OpenSession", self.ctx()?.open_rw_session(self.slot))?
        };
        tracing::info!(slot = self.slot.id(), "HSM login attempt");
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
            Err(source) => {
                return Err(HsmError::Call {
                    op: "C_Login",
                    source,
                });
            }
        }
        self.session = Some(session);
        self.cache = HandleCache::default();
        Ok(())
    }

    /// Drops the session so that the next operation re-selects the slot and logs in again
    /// (with the PIN that already worked). Used when the token answered but looked wrong,
    /// e.g. after it was unplugged and some modules keep serving a stale, empty view.
    pub fn reset_session(&mut self) {
        self.session = None;
        self.cache = HandleCache::default();
    }

    /// Opens a session without logging in (listing public objects and mechanisms).
    pub fn open_public_session(&mut self) -> Result<(), HsmError> {
        let session = call("C_OpenSession", self.ctx()?.open_ro_session(self.slot))?;
        self.session = Some(session);
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), HsmError> {
        self.session = None;
        self.cache = HandleCache::default();
        // A re-plugged token may come back on another slot id, so select again.
        let found = match self.ctx() {
            Ok(ctx) => Self::find_slot(ctx, &self.selector),
            Err(e) => Err(e),
        };
        let slot = match found {
            Ok(slot) => slot,
            Err(_) => {
                // Some modules (SoftHSM2 among them) only see a re-inserted token after a full
                // C_Finalize / C_Initialize; a second C_Initialize without the finalize fails.
                if let Some(old) = self.ctx.take() {
                    let _ = old.finalize();
                }
                let ctx = load_module(&self.module)?;
                let slot = Self::find_slot(&ctx, &self.selector);
                self.ctx = Some(ctx);
                slot?
            }
        };
        self.slot = slot;
        self.login()
    }

    /// Runs `f` on the session as operation `op`: timed, and retried with backoff after
    /// re-opening the session when the session or token was lost. Other errors return at once.
    pub fn run<T>(
        &mut self,
        op: &'static str,
        mut f: impl FnMut(&Session, &mut HandleCache, &str) -> cryptoki::error::Result<T>,
    ) -> Result<T, HsmError> {
        let mut delay = self.backoff;
        let mut attempt = 1;
        loop {
            let result = match self.session.as_ref() {
                Some(session) => {
                    let _t = OpTimer::start(&self.telemetry, op);
                    f(session, &mut self.cache, &self.key_label)
                }
                None => Err(CkError::Pkcs11(
                    RvError::SessionHandleInvalid,
                    cryptoki::context::Function::OpenSession,
                )),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if is_session_lost(&e) => {
                    if attempt >= self.retries {
                        return Err(HsmError::Unavailable {
                            op,
                            attempts: attempt,
                            source: e,
                        });
                    }
                    tracing::warn!(op, attempt, error = %e, retry_in = ?delay, "HSM session lost, re-opening");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                    match self.reconnect() {
                        Ok(()) => {}
                        Err(e) if e.is_fatal() => return Err(e),
                        Err(e) => tracing::warn!(error = %e, "HSM re-open failed"),
                    }
                }
                Err(source) => return Err(HsmError::Call { op, source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Without criteria, two tokens are ambiguous.
        assert!(select_slot(&views(), &SlotSelector::default()).is_err());
        assert_eq!(
            select_slot(&views()[1..], &SlotSelector::default()).expect("single"),
            1_234_567_890
        );
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
    }
}
