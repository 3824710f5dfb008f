//! A PKCS#11 module that stands in for OpenSC's `opensc-pkcs11.so` in front of a SmartCard-HSM
//! (the Nitrokey HSM 2's chip), for tests and benchmarks on machines without a card.
//!
//! It loads a real module (`NKSHIM_MODULE`, e.g. SoftHSM2), forwards every call to it, and adds
//! the behaviours observed with OpenSC 0.23 + pcscd 1.9.9 + a SmartCard-HSM, as recorded in the
//! project's field notes. SoftHSM2 shows none of them, so without this module no test could.
//! Each behaviour is switched by the environment of the process that loads the module:
//!
//! - `NKSHIM_CSTRING_ATTRS=1`: `CKA_LABEL` and `CKA_APPLICATION` in `C_CreateObject`,
//!   `C_SetAttributeValue` and `C_GenerateKeyPair` templates are read as C strings, from
//!   `pValue` up to the first NUL, ignoring `ulValueLen` (OpenSC copies them that way, so bytes
//!   after an unterminated buffer land on the card). With `NKSHIM_REPORT=FILE`, one line per
//!   such attribute is appended: `CKA_APPLICATION declared=10 cstring=10`.
//! - `NKSHIM_TOKEN_DELAY_MS=N`: for N ms after the process started no token is present (pcscd,
//!   started by the program, still finding the reader and powering the card): `C_GetSlotList(tokenPresent)` is empty,
//!   `C_GetSlotInfo` lacks `CKF_TOKEN_PRESENT`, token calls return `CKR_TOKEN_NOT_PRESENT`.
//! - `NKSHIM_CONTROL=FILE`: while FILE holds `removed`, the card is out: session calls return
//!   `CKR_DEVICE_REMOVED`, slot and token calls `CKR_TOKEN_NOT_PRESENT`, slot lists omit it.
//!   Sessions open at the removal (noticed on the first call while the file says so) are gone
//!   for good (`CKR_SESSION_HANDLE_INVALID` after the card is back), and so is the login.
//! - `NKSHIM_OPENSC_LABELS=1`: the token label reads `<label> (UserPIN)` and the library
//!   manufacturer `OpenSC Project`.
//! - `NKSHIM_STICKY_DECRYPT` (default on, `0` turns it off): a failed `C_Decrypt` leaves the
//!   decrypt operation active, so `C_DecryptInit` on that session returns
//!   `CKR_OPERATION_ACTIVE` until `C_DecryptFinal` is called with a buffer (a size query
//!   alone does not end it) or the session is closed.
//! - `NKSHIM_LATENCY=initialize=2000,decrypt=150,read=50`: milliseconds added to
//!   `C_Initialize`, `C_Decrypt` and `C_GetAttributeValue` (not to their length queries), like
//!   a stick on USB.
//!
//! Calls not listed forward unchanged. A problem in the shim itself (bad setting, module that
//! does not load) is printed to stderr and answered with `CKR_GENERAL_ERROR`; nothing panics
//! across the C boundary.

#![allow(non_snake_case)]

use cryptoki_sys::*;
use std::collections::HashSet;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How far past the declared length a C-string read may go: OpenSC has no bound, but an
/// unterminated buffer is followed by a NUL soon enough in practice, and a bound keeps the
/// shim from walking off a mapping.
const MAX_OVERREAD: usize = 256;

/// Settings read from the environment when the module is first asked for its function list.
#[derive(Debug, Default)]
struct Settings {
    module: PathBuf,
    cstring_attrs: bool,
    report: Option<PathBuf>,
    token_delay: Duration,
    control: Option<PathBuf>,
    opensc_labels: bool,
    sticky_decrypt: bool,
    latency_initialize: Duration,
    latency_decrypt: Duration,
    latency_read: Duration,
}

fn flag(name: &str, default: bool) -> Result<bool, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" | "" => Ok(false),
            other => Err(format!("{name}={other}: expected 1 or 0")),
        },
    }
}

fn millis(name: &str, text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{name}: `{text}` is not a number of milliseconds"))
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let module = std::env::var_os("NKSHIM_MODULE")
            .filter(|m| !m.is_empty())
            .map(PathBuf::from)
            .ok_or("NKSHIM_MODULE is not set (path of the PKCS#11 module to forward to)")?;
        let mut s = Settings {
            module,
            cstring_attrs: flag("NKSHIM_CSTRING_ATTRS", false)?,
            report: std::env::var_os("NKSHIM_REPORT").map(PathBuf::from),
            control: std::env::var_os("NKSHIM_CONTROL").map(PathBuf::from),
            opensc_labels: flag("NKSHIM_OPENSC_LABELS", false)?,
            sticky_decrypt: flag("NKSHIM_STICKY_DECRYPT", true)?,
            ..Settings::default()
        };
        if let Ok(v) = std::env::var("NKSHIM_TOKEN_DELAY_MS") {
            s.token_delay = millis("NKSHIM_TOKEN_DELAY_MS", &v)?;
        }
        if let Ok(v) = std::env::var("NKSHIM_LATENCY") {
            for part in v.split(',').filter(|p| !p.trim().is_empty()) {
                let (kind, ms) = part
                    .split_once('=')
                    .ok_or_else(|| format!("NKSHIM_LATENCY: `{part}` is not KIND=MS"))?;
                let d = millis("NKSHIM_LATENCY", ms)?;
                match kind.trim() {
                    "initialize" => s.latency_initialize = d,
                    "decrypt" => s.latency_decrypt = d,
                    "read" => s.latency_read = d,
                    other => {
                        return Err(format!(
                            "NKSHIM_LATENCY: unknown call kind `{other}` (initialize, decrypt, read)"
                        ));
                    }
                }
            }
        }
        Ok(s)
    }
}

/// The loaded real module and the shim's own state.
struct Shim {
    /// Keeps the real module mapped for as long as `real` is used.
    _library: libloading::Library,
    real: CK_FUNCTION_LIST,
    exported: CK_FUNCTION_LIST,
    settings: Settings,
    initialized_at: Mutex<Option<Instant>>,
    /// Sessions whose last `C_Decrypt` failed and whose operation is therefore still active.
    stuck_decrypt: Mutex<HashSet<CK_SESSION_HANDLE>>,
    /// True once a call has seen the card removed, until a call sees it back.
    removal_seen: AtomicBool,
}

static SHIM: OnceLock<Result<Shim, String>> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pad<const N: usize>(text: &str) -> [CK_UTF8CHAR; N] {
    let mut out = [b' '; N];
    for (o, b) in out.iter_mut().zip(text.bytes()) {
        *o = b;
    }
    out
}

impl Shim {
    fn load() -> Result<Shim, String> {
        let settings = Settings::from_env()?;
        // SAFETY: loading a PKCS#11 module runs its initialisers; that is what it is for.
        let library = unsafe { libloading::Library::new(&settings.module) }
            .map_err(|e| format!("cannot load {}: {e}", settings.module.display()))?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: the symbol has the signature PKCS#11 defines; the list it returns is owned by
        // the module and stays valid while the library is loaded.
        let real = unsafe {
            let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
                library
                    .get(b"C_GetFunctionList\0")
                    .map_err(|e| format!("{}: {e}", settings.module.display()))?;
            let rv = get(&mut list);
            if rv != CKR_OK || list.is_null() {
                return Err(format!(
                    "{}: C_GetFunctionList returned {rv:#x}",
                    settings.module.display()
                ));
            }
            *list
        };
        let mut exported = real;
        exported.C_GetFunctionList = Some(C_GetFunctionList);
        exported.C_Initialize = Some(wrap::C_Initialize);
        exported.C_Finalize = Some(wrap::C_Finalize);
        exported.C_GetInfo = Some(wrap::C_GetInfo);
        exported.C_GetSlotList = Some(wrap::C_GetSlotList);
        exported.C_GetSlotInfo = Some(wrap::C_GetSlotInfo);
        exported.C_GetTokenInfo = Some(wrap::C_GetTokenInfo);
        exported.C_GetMechanismList = Some(wrap::C_GetMechanismList);
        exported.C_GetMechanismInfo = Some(wrap::C_GetMechanismInfo);
        exported.C_InitToken = Some(wrap::C_InitToken);
        exported.C_OpenSession = Some(wrap::C_OpenSession);
        exported.C_CloseSession = Some(wrap::C_CloseSession);
        exported.C_CloseAllSessions = Some(wrap::C_CloseAllSessions);
        exported.C_GetSessionInfo = Some(wrap::C_GetSessionInfo);
        exported.C_InitPIN = Some(wrap::C_InitPIN);
        exported.C_Login = Some(wrap::C_Login);
        exported.C_Logout = Some(wrap::C_Logout);
        exported.C_CreateObject = Some(wrap::C_CreateObject);
        exported.C_DestroyObject = Some(wrap::C_DestroyObject);
        exported.C_GetAttributeValue = Some(wrap::C_GetAttributeValue);
        exported.C_SetAttributeValue = Some(wrap::C_SetAttributeValue);
        exported.C_FindObjectsInit = Some(wrap::C_FindObjectsInit);
        exported.C_FindObjects = Some(wrap::C_FindObjects);
        exported.C_FindObjectsFinal = Some(wrap::C_FindObjectsFinal);
        exported.C_EncryptInit = Some(wrap::C_EncryptInit);
        exported.C_Encrypt = Some(wrap::C_Encrypt);
        exported.C_DecryptInit = Some(wrap::C_DecryptInit);
        exported.C_Decrypt = Some(wrap::C_Decrypt);
        exported.C_DecryptFinal = Some(wrap::C_DecryptFinal);
        exported.C_SignInit = Some(wrap::C_SignInit);
        exported.C_Sign = Some(wrap::C_Sign);
        exported.C_GenerateKeyPair = Some(wrap::C_GenerateKeyPair);
        exported.C_GenerateRandom = Some(wrap::C_GenerateRandom);
        Ok(Shim {
            _library: library,
            real,
            exported,
            settings,
            initialized_at: Mutex::new(None),
            stuck_decrypt: Mutex::new(HashSet::new()),
            removal_seen: AtomicBool::new(false),
        })
    }

    /// True while the control file says the card is out. The first call that sees it closes
    /// every session of the real module, which also logs out, as pulling a card does.
    fn removed(&self) -> bool {
        let Some(control) = &self.settings.control else {
            return false;
        };
        let removed = std::fs::read_to_string(control).is_ok_and(|t| t.trim() == "removed");
        if !removed {
            self.removal_seen.store(false, Ordering::SeqCst);
        } else if !self.removal_seen.swap(true, Ordering::SeqCst) {
            self.close_everything();
        }
        removed
    }

    fn close_everything(&self) {
        lock(&self.stuck_decrypt).clear();
        let (Some(list), Some(close_all)) = (self.real.C_GetSlotList, self.real.C_CloseAllSessions)
        else {
            return;
        };
        let mut count: CK_ULONG = 0;
        // SAFETY: size query, then a buffer of the size the module asked for.
        unsafe {
            if list(CK_FALSE, std::ptr::null_mut(), &mut count) != CKR_OK {
                return;
            }
            let mut slots = vec![0 as CK_SLOT_ID; count as usize];
            if list(CK_FALSE, slots.as_mut_ptr(), &mut count) != CKR_OK {
                return;
            }
            for slot in slots.iter().take(count as usize) {
                close_all(*slot);
            }
        }
    }

    /// True while pcscd would still be finding the reader. Its progress does not restart when a
    /// program finalises or unloads and reloads the module, so the delay runs from the process
    /// start (where the program starts pcscd), and only without `/proc` from this instance's
    /// first `C_Initialize`.
    fn delayed(&self) -> bool {
        let delay = self.settings.token_delay;
        if delay.is_zero() {
            return false;
        }
        match process_age() {
            Some(age) => age < delay,
            None => lock(&self.initialized_at).is_some_and(|t| t.elapsed() < delay),
        }
    }

    fn token_absent(&self) -> bool {
        // Both are evaluated so that a removal is noticed (and sessions closed) on any call.
        let removed = self.removed();
        removed || self.delayed()
    }

    /// The answer to a call on an open session while the card is out.
    fn session_gate(&self) -> Option<CK_RV> {
        self.removed().then_some(CKR_DEVICE_REMOVED)
    }

    /// The answer to a slot or token call while no card is present.
    fn token_gate(&self) -> Option<CK_RV> {
        self.token_absent().then_some(CKR_TOKEN_NOT_PRESENT)
    }

    /// A copy of `template` with `CKA_LABEL` and `CKA_APPLICATION` re-read the way OpenSC
    /// reads them (up to the first NUL). The second vector owns the copied values.
    ///
    /// # Safety
    /// `template` must point to `count` attributes, as the caller of the PKCS#11 function
    /// promised.
    unsafe fn as_c_strings(
        &self,
        template: *mut CK_ATTRIBUTE,
        count: CK_ULONG,
    ) -> Option<(Vec<CK_ATTRIBUTE>, Vec<Vec<u8>>)> {
        if !self.settings.cstring_attrs || template.is_null() {
            return None;
        }
        // SAFETY: guaranteed by the caller.
        let attrs = unsafe { std::slice::from_raw_parts(template, count as usize) };
        let mut copy = attrs.to_vec();
        let mut owned = Vec::new();
        let mut report = String::new();
        for attr in &mut copy {
            let name = match attr.type_ {
                CKA_LABEL => "CKA_LABEL",
                CKA_APPLICATION => "CKA_APPLICATION",
                _ => continue,
            };
            if attr.pValue.is_null() {
                continue;
            }
            let declared = attr.ulValueLen as usize;
            let start = attr.pValue as *const u8;
            // Deliberately reads past `ulValueLen`, as OpenSC does: that is the behaviour a
            // caller must be safe against.
            // SAFETY: not guaranteed by the caller; bounded by MAX_OVERREAD (see there).
            let value: Vec<u8> = (0..declared + MAX_OVERREAD)
                .map(|i| unsafe { std::ptr::read_volatile(start.add(i)) })
                .take_while(|b| *b != 0)
                .collect();
            report.push_str(&format!(
                "{name} declared={declared} cstring={}\n",
                value.len()
            ));
            let mut value = value;
            attr.ulValueLen = value.len() as CK_ULONG;
            attr.pValue = value.as_mut_ptr().cast();
            owned.push(value);
        }
        if let Some(path) = &self.settings.report
            && !report.is_empty()
        {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(report.as_bytes()));
            if let Err(e) = written {
                eprintln!(
                    "nitrokey-pkcs11-shim: cannot append to {}: {e}",
                    path.display()
                );
            }
        }
        Some((copy, owned))
    }
}

/// How long this process has been running, from `/proc` (clock-tick resolution).
fn process_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses; the fields after its last `)` do not.
    // Field 22 (start time in clock ticks since boot) is the 20th after the name.
    let fields = &stat[stat.rfind(')')? + 1..];
    let start_ticks: f64 = fields.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_second <= 0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        (uptime - start_ticks / ticks_per_second as f64).max(0.0),
    ))
}

/// Runs `f` on the loaded shim; any failure (not loaded, a panic) becomes `CKR_GENERAL_ERROR`.
fn guarded(f: impl FnOnce(&'static Shim) -> CK_RV) -> CK_RV {
    let Some(Ok(shim)) = SHIM.get() else {
        return CKR_GENERAL_ERROR;
    };
    std::panic::catch_unwind(AssertUnwindSafe(|| f(shim))).unwrap_or(CKR_GENERAL_ERROR)
}

/// The module's entry point: loads the real module named by `NKSHIM_MODULE` on first use and
/// hands out the forwarding function list.
///
/// # Safety
/// `list` must be a valid pointer to write the function list pointer to (PKCS#11 contract).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let loaded = std::panic::catch_unwind(|| {
        SHIM.get_or_init(|| Shim::load().inspect_err(|e| eprintln!("nitrokey-pkcs11-shim: {e}")))
            .as_ref()
            .ok()
            .map(|s| &s.exported as *const CK_FUNCTION_LIST)
    });
    match loaded {
        Ok(Some(exported)) => {
            // SAFETY: checked non-null above; the list lives in a static for the process.
            unsafe { *list = exported.cast_mut() };
            CKR_OK
        }
        _ => CKR_GENERAL_ERROR,
    }
}

/// The functions put into the exported list in place of the real module's.
mod wrap {
    use super::*;

    fn sleep(d: Duration) {
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    macro_rules! forward {
        ($shim:expr, $name:ident ( $($arg:expr),* )) => {
            match $shim.real.$name {
                // SAFETY: the arguments are the caller's, passed on unchanged or replaced by
                // equivalents the shim owns for the duration of the call.
                Some(f) => unsafe { f($($arg),*) },
                None => CKR_FUNCTION_NOT_SUPPORTED,
            }
        };
    }

    /// Calls on a `$handle` (a session or a slot) that are forwarded once `$gate` lets them
    /// through: `session_gate` needs only the card present, `token_gate` a token in the slot.
    macro_rules! gated_calls {
        ($handle:ident: $hty:ty, $gate:ident; $($name:ident ( $($arg:ident : $ty:ty),* );)*) => {$(
            pub(super) unsafe extern "C" fn $name($handle: $hty $(, $arg: $ty)*) -> CK_RV {
                guarded(|shim| {
                    if let Some(rv) = shim.$gate() {
                        return rv;
                    }
                    forward!(shim, $name($handle $(, $arg)*))
                })
            }
        )*};
    }

    gated_calls! {
        session: CK_SESSION_HANDLE, session_gate;
        C_GetSessionInfo(info: *mut CK_SESSION_INFO);
        C_InitPIN(pin: *mut CK_UTF8CHAR, len: CK_ULONG);
        C_Login(user: CK_USER_TYPE, pin: *mut CK_UTF8CHAR, len: CK_ULONG);
        C_Logout();
        C_DestroyObject(object: CK_OBJECT_HANDLE);
        C_FindObjectsInit(template: *mut CK_ATTRIBUTE, count: CK_ULONG);
        C_FindObjects(objects: *mut CK_OBJECT_HANDLE, max: CK_ULONG, found: *mut CK_ULONG);
        C_FindObjectsFinal();
        C_EncryptInit(mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
        C_Encrypt(data: *mut CK_BYTE, len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
        C_SignInit(mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
        C_Sign(data: *mut CK_BYTE, len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
        C_GenerateRandom(out: *mut CK_BYTE, len: CK_ULONG);
    }

    gated_calls! {
        slot: CK_SLOT_ID, token_gate;
        C_GetMechanismList(list: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG);
        C_GetMechanismInfo(mechanism: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO);
        C_InitToken(pin: *mut CK_UTF8CHAR, len: CK_ULONG, label: *mut CK_UTF8CHAR);
        C_OpenSession(flags: CK_FLAGS, app: *mut std::ffi::c_void, notify: CK_NOTIFY, session: *mut CK_SESSION_HANDLE);
    }

    pub(super) unsafe extern "C" fn C_Initialize(args: *mut std::ffi::c_void) -> CK_RV {
        guarded(|shim| {
            sleep(shim.settings.latency_initialize);
            let rv = forward!(shim, C_Initialize(args));
            if rv == CKR_OK {
                lock(&shim.initialized_at).get_or_insert_with(Instant::now);
                shim.removal_seen.store(false, Ordering::SeqCst);
            }
            rv
        })
    }

    pub(super) unsafe extern "C" fn C_Finalize(reserved: *mut std::ffi::c_void) -> CK_RV {
        guarded(|shim| {
            lock(&shim.stuck_decrypt).clear();
            forward!(shim, C_Finalize(reserved))
        })
    }

    pub(super) unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
        guarded(|shim| {
            let rv = forward!(shim, C_GetInfo(info));
            if rv == CKR_OK && shim.settings.opensc_labels && !info.is_null() {
                // SAFETY: the real module just filled it.
                unsafe { (*info).manufacturerID = pad("OpenSC Project") };
            }
            rv
        })
    }

    pub(super) unsafe extern "C" fn C_GetSlotList(
        present: CK_BBOOL,
        list: *mut CK_SLOT_ID,
        count: *mut CK_ULONG,
    ) -> CK_RV {
        guarded(|shim| {
            if present != CK_FALSE && shim.token_absent() {
                if count.is_null() {
                    return CKR_ARGUMENTS_BAD;
                }
                // SAFETY: non-null, provided by the caller for the count.
                unsafe { *count = 0 };
                return CKR_OK;
            }
            forward!(shim, C_GetSlotList(present, list, count))
        })
    }

    pub(super) unsafe extern "C" fn C_GetSlotInfo(
        slot: CK_SLOT_ID,
        info: *mut CK_SLOT_INFO,
    ) -> CK_RV {
        guarded(|shim| {
            let rv = forward!(shim, C_GetSlotInfo(slot, info));
            if rv == CKR_OK && !info.is_null() && shim.token_absent() {
                // SAFETY: the real module just filled it.
                unsafe { (*info).flags &= !CKF_TOKEN_PRESENT };
            }
            rv
        })
    }

    pub(super) unsafe extern "C" fn C_GetTokenInfo(
        slot: CK_SLOT_ID,
        info: *mut CK_TOKEN_INFO,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.token_gate() {
                return rv;
            }
            let rv = forward!(shim, C_GetTokenInfo(slot, info));
            if rv == CKR_OK && shim.settings.opensc_labels && !info.is_null() {
                // SAFETY: the real module just filled it.
                let info = unsafe { &mut *info };
                let label = String::from_utf8_lossy(&info.label);
                let label = label.trim_end_matches([' ', '\0']);
                info.label = pad(&format!("{label} (UserPIN)"));
            }
            rv
        })
    }

    pub(super) unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
        guarded(|shim| {
            lock(&shim.stuck_decrypt).remove(&session);
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            forward!(shim, C_CloseSession(session))
        })
    }

    pub(super) unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
        guarded(|shim| {
            lock(&shim.stuck_decrypt).clear();
            if let Some(rv) = shim.token_gate() {
                return rv;
            }
            forward!(shim, C_CloseAllSessions(slot))
        })
    }

    pub(super) unsafe extern "C" fn C_GetAttributeValue(
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: *mut CK_ATTRIBUTE,
        count: CK_ULONG,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            // Only a call that fetches values talks to the card; a length query is answered
            // from what OpenSC already holds.
            // SAFETY: the caller's template, as PKCS#11 defines it.
            let fetches = !template.is_null()
                && unsafe { std::slice::from_raw_parts(template, count as usize) }
                    .iter()
                    .any(|a| !a.pValue.is_null());
            if fetches {
                sleep(shim.settings.latency_read);
            }
            forward!(shim, C_GetAttributeValue(session, object, template, count))
        })
    }

    pub(super) unsafe extern "C" fn C_CreateObject(
        session: CK_SESSION_HANDLE,
        template: *mut CK_ATTRIBUTE,
        count: CK_ULONG,
        object: *mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            // SAFETY: the caller's template, as PKCS#11 defines it.
            match unsafe { shim.as_c_strings(template, count) } {
                Some((mut copy, _owned)) => {
                    forward!(
                        shim,
                        C_CreateObject(session, copy.as_mut_ptr(), count, object)
                    )
                }
                None => forward!(shim, C_CreateObject(session, template, count, object)),
            }
        })
    }

    pub(super) unsafe extern "C" fn C_SetAttributeValue(
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: *mut CK_ATTRIBUTE,
        count: CK_ULONG,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            // SAFETY: the caller's template, as PKCS#11 defines it.
            match unsafe { shim.as_c_strings(template, count) } {
                Some((mut copy, _owned)) => {
                    forward!(
                        shim,
                        C_SetAttributeValue(session, object, copy.as_mut_ptr(), count)
                    )
                }
                None => forward!(shim, C_SetAttributeValue(session, object, template, count)),
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe extern "C" fn C_GenerateKeyPair(
        session: CK_SESSION_HANDLE,
        mechanism: *mut CK_MECHANISM,
        public: *mut CK_ATTRIBUTE,
        public_count: CK_ULONG,
        private: *mut CK_ATTRIBUTE,
        private_count: CK_ULONG,
        public_key: *mut CK_OBJECT_HANDLE,
        private_key: *mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            // SAFETY: the caller's templates, as PKCS#11 defines them.
            let mut pub_copy = unsafe { shim.as_c_strings(public, public_count) };
            let mut priv_copy = unsafe { shim.as_c_strings(private, private_count) };
            let public = pub_copy.as_mut().map_or(public, |(c, _)| c.as_mut_ptr());
            let private = priv_copy.as_mut().map_or(private, |(c, _)| c.as_mut_ptr());
            forward!(
                shim,
                C_GenerateKeyPair(
                    session,
                    mechanism,
                    public,
                    public_count,
                    private,
                    private_count,
                    public_key,
                    private_key
                )
            )
        })
    }

    pub(super) unsafe extern "C" fn C_DecryptInit(
        session: CK_SESSION_HANDLE,
        mechanism: *mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            if lock(&shim.stuck_decrypt).contains(&session) {
                return CKR_OPERATION_ACTIVE;
            }
            forward!(shim, C_DecryptInit(session, mechanism, key))
        })
    }

    pub(super) unsafe extern "C" fn C_Decrypt(
        session: CK_SESSION_HANDLE,
        data: *mut CK_BYTE,
        len: CK_ULONG,
        out: *mut CK_BYTE,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            // A length query (no output buffer) does not reach the card.
            if !out.is_null() {
                sleep(shim.settings.latency_decrypt);
            }
            let rv = forward!(shim, C_Decrypt(session, data, len, out, out_len));
            // The real module ended the operation; OpenSC would not have, so remember it.
            if shim.settings.sticky_decrypt && rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL {
                lock(&shim.stuck_decrypt).insert(session);
            }
            rv
        })
    }

    pub(super) unsafe extern "C" fn C_DecryptFinal(
        session: CK_SESSION_HANDLE,
        out: *mut CK_BYTE,
        out_len: *mut CK_ULONG,
    ) -> CK_RV {
        guarded(|shim| {
            if let Some(rv) = shim.session_gate() {
                return rv;
            }
            let mut stuck = lock(&shim.stuck_decrypt);
            if stuck.contains(&session) {
                // A size query (no buffer) leaves the operation as it is; a call with a buffer
                // ends it, as with the TPM2 module. Nothing is left to return either way.
                if !out.is_null() {
                    stuck.remove(&session);
                }
                if !out_len.is_null() {
                    // SAFETY: non-null, provided by the caller for the length.
                    unsafe { *out_len = 0 };
                }
                return CKR_OK;
            }
            drop(stuck);
            forward!(shim, C_DecryptFinal(session, out, out_len))
        })
    }
}
