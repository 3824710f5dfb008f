//! Ciphertext stored as data objects on the token.
//!
//! Objects are CKO_DATA with CKA_TOKEN and CKA_PRIVATE set, CKA_LABEL = CKA_APPLICATION = the
//! name, CKA_VALUE = the stored bytes. A replace writes the new object first and removes the
//! old ones only after the caller verified the new one ([`prune`]), so a crash leaves at most
//! a duplicate, never nothing; readers pick the newest duplicate by the format's write stamp.
//!
//! The functions taking `&mut Hsm` run on the HSM thread; [`TokenStore`] is the
//! [`Storage`] that sends them there. Every text attribute goes through
//! [`crate::hsm::text_attr`], because OpenSC reads some of them as C strings.

use crate::envelope;
use crate::hsm::{HandleCache, Hsm, HsmError, ObjectIndex, text_attr};
use crate::hsm_actor::HsmHandle;
use crate::pkcs11_raw::RawCalls;
use crate::storage::{Storage, StorageError};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{CK_ATTRIBUTE_TYPE, CKA_LABEL, CKA_VALUE};
use futures::FutureExt;
use futures::future::BoxFuture;

/// Longest stored value read in one call (a header and an RSA-8192 ciphertext fit); a longer
/// one is read with a length query first.
const VALUE_LIMIT: usize = 2048;
/// Longest label read in one call.
const LABEL_LIMIT: usize = 256;

fn by_name(name: &str) -> [Attribute; 2] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Label(text_attr(name.as_bytes())),
    ]
}

/// One attribute in one `C_GetAttributeValue` when it fits `limit` bytes, else cryptoki's
/// two-call read.
fn read_attr(
    session: &Session,
    raw: &RawCalls,
    handle: ObjectHandle,
    kind: CK_ATTRIBUTE_TYPE,
    limit: usize,
) -> cryptoki::error::Result<Vec<u8>> {
    if let Some(v) = raw.attribute(session, handle, kind, limit)? {
        return Ok(v);
    }
    let wanted = if kind == CKA_LABEL {
        AttributeType::Label
    } else {
        AttributeType::Value
    };
    Ok(session
        .get_attributes(handle, &[wanted])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::Value(v) | Attribute::Label(v) => Some(v),
            _ => None,
        })
        .unwrap_or_default())
}

/// Every data object's handle and label: one search, and one label read per object not seen
/// before. Refreshes the cache's index, keeping the values already read of objects still there.
fn index(
    session: &Session,
    raw: &RawCalls,
    cache: &mut HandleCache,
) -> cryptoki::error::Result<ObjectIndex> {
    let handles = session.find_objects(&[Attribute::Class(ObjectClass::DATA)])?;
    let old = cache.objects.take().unwrap_or_default();
    let known = |h: ObjectHandle| {
        old.iter().find_map(|(label, entries)| {
            entries
                .iter()
                .find(|(x, _)| *x == h)
                .map(|(_, v)| (label.clone(), v.clone()))
        })
    };
    let mut fresh = ObjectIndex::new();
    for h in handles {
        let (label, value) = match known(h) {
            Some(entry) => entry,
            None => {
                let label = read_attr(session, raw, h, CKA_LABEL, LABEL_LIMIT)?;
                (String::from_utf8_lossy(&label).into_owned(), None)
            }
        };
        fresh.entry(label).or_default().push((h, value));
    }
    cache.objects = Some(fresh.clone());
    Ok(fresh)
}

/// The objects under `name` with their values, reading only values not read before. Lists
/// the token first when the session has no index yet (every pass lists it anyway, so reads,
/// writes and prunes then need no search of their own); a handle gone invalid (another
/// process deleted the object) makes it list again, once.
fn find(
    session: &Session,
    raw: &RawCalls,
    cache: &mut HandleCache,
    name: &str,
) -> cryptoki::error::Result<Vec<(ObjectHandle, Vec<u8>)>> {
    find_in_index(session, raw, cache, name, false)
}

fn find_in_index(
    session: &Session,
    raw: &RawCalls,
    cache: &mut HandleCache,
    name: &str,
    relisted: bool,
) -> cryptoki::error::Result<Vec<(ObjectHandle, Vec<u8>)>> {
    let entries: Vec<(ObjectHandle, Option<Vec<u8>>)> = match &cache.objects {
        Some(index) => index.get(name).cloned().unwrap_or_default(),
        None => index(session, raw, cache)?
            .get(name)
            .cloned()
            .unwrap_or_default(),
    };
    let mut out = Vec::with_capacity(entries.len());
    for (h, known) in entries {
        let value = match known {
            Some(v) => v,
            None => match read_attr(session, raw, h, CKA_VALUE, VALUE_LIMIT) {
                Ok(v) => v,
                Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) if !relisted => {
                    cache.objects = None;
                    return find_in_index(session, raw, cache, name, true);
                }
                Err(e) => return Err(e),
            },
        };
        out.push((h, value));
    }
    if let Some(index) = cache.objects.as_mut() {
        index.insert(
            name.to_owned(),
            out.iter().map(|(h, v)| (*h, Some(v.clone()))).collect(),
        );
    }
    Ok(out)
}

/// Index of the value to trust among duplicates: the newest by write stamp.
pub fn newest(values: &[Vec<u8>]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .max_by_key(|(i, v)| (envelope::stamp_of(v), *i))
        .map(|(i, _)| i)
}

/// Reads the value stored under `name` (the newest if an interrupted replace left two).
pub fn get(hsm: &mut Hsm, name: &str) -> Result<Option<Vec<u8>>, HsmError> {
    let found = hsm.run_raw("read_object", |s, raw, cache, _| find(s, raw, cache, name))?;
    let values: Vec<Vec<u8>> = found.into_iter().map(|(_, v)| v).collect();
    Ok(newest(&values).map(|i| values[i].clone()))
}

/// Writes a new object under `name`; older objects stay until [`prune`]. The caller reads it
/// back to verify: the new handle enters the index with its value unread, so that read-back
/// is a real read of the token.
pub fn put(hsm: &mut Hsm, name: &str, value: &[u8]) -> Result<(), HsmError> {
    hsm.run("create_object", |s, cache, _| {
        let handle = s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(true),
            Attribute::Label(text_attr(name.as_bytes())),
            Attribute::Application(text_attr(name.as_bytes())),
            Attribute::Value(value.to_vec()),
        ])?;
        if let Some(index) = cache.objects.as_mut() {
            index
                .entry(name.to_owned())
                .or_default()
                .push((handle, None));
        }
        Ok(())
    })?;
    Ok(())
}

fn forget(cache: &mut HandleCache, name: &str, handle: ObjectHandle) {
    if let Some(entries) = cache.objects.as_mut().and_then(|i| i.get_mut(name)) {
        entries.retain(|(h, _)| *h != handle);
    }
}

/// Removes every object under `name` except one holding `keep`.
pub fn prune(hsm: &mut Hsm, name: &str, keep: &[u8]) -> Result<usize, HsmError> {
    hsm.run_raw("prune_objects", |s, raw, cache, _| {
        let found = find(s, raw, cache, name)?;
        let mut kept = false;
        let mut removed = 0;
        for (h, v) in found {
            if !kept && v == keep {
                kept = true;
                continue;
            }
            s.destroy_object(h)?;
            forget(cache, name, h);
            removed += 1;
        }
        Ok(removed)
    })
}

/// Deletes every object under `name`; returns how many. Searches the token afresh: an
/// operator deletes what is there now.
pub fn delete(hsm: &mut Hsm, name: &str) -> Result<usize, HsmError> {
    hsm.run("destroy_object", |s, cache, _| {
        let found = s.find_objects(&by_name(name))?;
        for h in &found {
            s.destroy_object(*h)?;
            forget(cache, name, *h);
        }
        Ok(found.len())
    })
}

/// Labels of all data objects, duplicates included, without reading any value (a value read
/// is card I/O on a real stick).
pub fn labels(hsm: &mut Hsm) -> Result<Vec<String>, HsmError> {
    hsm.run_raw("list_objects", |s, raw, cache, _| {
        let index = index(s, raw, cache)?;
        Ok(index
            .into_iter()
            .flat_map(|(label, entries)| std::iter::repeat_n(label, entries.len()))
            .collect())
    })
}

/// The token's data objects as a [`Storage`], through the HSM thread.
#[derive(Clone)]
pub struct TokenStore {
    hsm: HsmHandle,
}

impl TokenStore {
    /// A store on the token behind `hsm`.
    pub fn new(hsm: HsmHandle) -> Self {
        Self { hsm }
    }
}

impl Storage for TokenStore {
    fn kind(&self) -> &'static str {
        "HSM data objects"
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>> {
        let name = name.to_owned();
        async move { Ok(self.hsm.call("read_object", move |h| get(h, &name)).await?) }.boxed()
    }

    fn put<'a>(
        &'a self,
        name: &'a str,
        value: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        let (name, value) = (name.to_owned(), value.to_vec());
        async move {
            // Not retried blindly: a write that failed half-way may have created the object,
            // and the caller verifies and prunes anyway.
            Ok(self
                .hsm
                .call("create_object", move |h| put(h, &name, &value))
                .await?)
        }
        .boxed()
    }

    fn prune<'a>(
        &'a self,
        name: &'a str,
        keep: &'a [u8],
    ) -> BoxFuture<'a, Result<usize, StorageError>> {
        let (name, keep) = (name.to_owned(), keep.to_vec());
        async move {
            let removed = self
                .hsm
                .call("prune_objects", move |h| prune(h, &name, &keep))
                .await?;
            Ok(removed)
        }
        .boxed()
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<usize, StorageError>> {
        let name = name.to_owned();
        async move {
            Ok(self
                .hsm
                .call("destroy_object", move |h| delete(h, &name))
                .await?)
        }
        .boxed()
    }

    fn names(&self) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        async move {
            let mut names = self.hsm.call("list_objects", labels).await?;
            names.sort();
            names.dedup();
            Ok(names)
        }
        .boxed()
    }

    fn key_id(&self) -> BoxFuture<'_, Result<Option<String>, StorageError>> {
        async { Ok(None) }.boxed()
    }

    fn set_key_id<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        async { Ok(()) }.boxed()
    }

    /// The objects sit on the token holding the key: another stick never sees them.
    fn shared(&self) -> bool {
        false
    }
}

/// All data objects as (label, value), in token order.
pub fn list(hsm: &mut Hsm) -> Result<Vec<(String, Vec<u8>)>, HsmError> {
    hsm.run_raw("list_objects", |s, raw, _, _| {
        let handles = s.find_objects(&[Attribute::Class(ObjectClass::DATA)])?;
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            let label = read_attr(s, raw, h, CKA_LABEL, LABEL_LIMIT)?;
            let value = read_attr(s, raw, h, CKA_VALUE, VALUE_LIMIT)?;
            out.push((String::from_utf8_lossy(&label).into_owned(), value));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Scheme, encode};

    #[test]
    fn newest_duplicate_wins_and_legacy_is_oldest() {
        let legacy = vec![1u8; 256];
        let old = encode(Scheme::OaepSha1, 10, &[2u8; 256]);
        let new = encode(Scheme::OaepSha1, 20, &[3u8; 256]);
        assert_eq!(newest(&[legacy.clone(), new.clone(), old.clone()]), Some(1));
        assert_eq!(newest(&[old, legacy]), Some(0));
        assert_eq!(newest(&[]), None);
    }
}
