//! The two PKCS#11 calls this program makes itself rather than through cryptoki: cryptoki's
//! `decrypt` and `get_attributes` each call the module twice (once for the length, once for
//! the data), and on a stick every call is card work — OpenSC may even run the card's RSA for
//! the length query. Here each is one call into a buffer sized from what is known beforehand
//! (a plaintext is never longer than its ciphertext; stored values and labels have upper
//! bounds), and a plaintext lands only in memory that is zeroed when dropped.
//!
//! The function pointers come from the module's own `C_GetFunctionList`, on a second handle of
//! the library cryptoki already loaded (the dynamic loader hands out the same mapping), so
//! they reach exactly the module state cryptoki initialised.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_ATTRIBUTE_TYPE, CK_C_Decrypt, CK_C_GetAttributeValue, CK_FUNCTION_LIST,
    CK_ULONG, CK_UNAVAILABLE_INFORMATION,
};
use std::path::Path;
use zeroize::Zeroizing;

/// `C_Decrypt` and `C_GetAttributeValue` of one loaded module.
pub struct RawCalls {
    decrypt: CK_C_Decrypt,
    get_attribute_value: CK_C_GetAttributeValue,
    // Dropped last: keeps the module mapped for as long as the pointers above are used.
    _library: cryptoki_sys::Pkcs11,
}

impl std::fmt::Debug for RawCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawCalls")
    }
}

impl RawCalls {
    /// Reads the function list of the module at `path` (already loaded by cryptoki).
    pub fn load(path: &Path) -> Result<Self, String> {
        // SAFETY: loading the same PKCS#11 library cryptoki loaded; its initialisers already
        // ran, so this only takes another reference to the mapping.
        let library = unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(|e| e.to_string())?;
        let get_list = library
            .C_GetFunctionList
            .as_ref()
            .map_err(|e| format!("C_GetFunctionList: {e}"))?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: C_GetFunctionList writes one pointer to the module's static function list.
        let rv = unsafe { get_list(&mut list) };
        if let Rv::Error(e) = Rv::from(rv) {
            return Err(format!("C_GetFunctionList: {e}"));
        }
        if list.is_null() {
            return Err("C_GetFunctionList returned no list".to_owned());
        }
        // SAFETY: non-null, and the list is static in the module for as long as it is mapped,
        // which `_library` guarantees; the two fields are copied out.
        let (decrypt, get_attribute_value) =
            unsafe { ((*list).C_Decrypt, (*list).C_GetAttributeValue) };
        Ok(Self {
            decrypt,
            get_attribute_value,
            _library: library,
        })
    }

    /// `C_Decrypt` of an operation already started with `C_DecryptInit`, in one call: the
    /// output buffer is as long as the ciphertext, which no RSA plaintext exceeds.
    pub fn decrypt(
        &self,
        session: &Session,
        ciphertext: &[u8],
    ) -> cryptoki::error::Result<Zeroizing<Vec<u8>>> {
        let f = self.decrypt.ok_or(CkError::NullFunctionPointer)?;
        let mut out = Zeroizing::new(vec![0u8; ciphertext.len().max(1)]);
        let mut len = out.len() as CK_ULONG;
        // SAFETY: the module reads `ciphertext.len()` bytes (it does not write the input,
        // PKCS#11 just lacks `const`) and writes at most `len` bytes into `out`, setting `len`.
        let rv = unsafe {
            f(
                session.handle(),
                ciphertext.as_ptr().cast_mut(),
                ciphertext.len() as CK_ULONG,
                out.as_mut_ptr(),
                &mut len,
            )
        };
        Rv::from(rv).into_result(Function::Decrypt)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > out.len() {
            return Err(CkError::Pkcs11(RvError::GeneralError, Function::Decrypt));
        }
        out.truncate(len);
        Ok(out)
    }

    /// One variable-length attribute of `object` in one call into a `limit`-byte buffer.
    /// `Ok(None)` when the value is longer than `limit` (the caller falls back to cryptoki's
    /// two-call read) or the object has no such attribute.
    pub fn attribute(
        &self,
        session: &Session,
        object: ObjectHandle,
        kind: CK_ATTRIBUTE_TYPE,
        limit: usize,
    ) -> cryptoki::error::Result<Option<Vec<u8>>> {
        let f = self
            .get_attribute_value
            .ok_or(CkError::NullFunctionPointer)?;
        let mut buf = vec![0u8; limit];
        let mut template = [CK_ATTRIBUTE {
            type_: kind,
            pValue: buf.as_mut_ptr().cast(),
            ulValueLen: limit as CK_ULONG,
        }];
        // SAFETY: one attribute whose buffer is `limit` bytes long; the module writes at most
        // that and sets ulValueLen.
        let rv = unsafe { f(session.handle(), object.handle(), template.as_mut_ptr(), 1) };
        match Rv::from(rv) {
            Rv::Ok => {}
            Rv::Error(RvError::BufferTooSmall | RvError::AttributeTypeInvalid) => return Ok(None),
            other => other.into_result(Function::GetAttributeValue).map(|_| ())?,
        }
        let len = template[0].ulValueLen;
        if len == CK_UNAVAILABLE_INFORMATION {
            return Ok(None);
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > limit {
            return Ok(None);
        }
        buf.truncate(len);
        Ok(Some(buf))
    }
}
