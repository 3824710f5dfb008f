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
use crate::hsm::{Hsm, HsmError, text_attr};
use crate::hsm_actor::HsmHandle;
use crate::storage::{Storage, StorageError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use futures::FutureExt;
use futures::future::BoxFuture;

fn by_name(name: &str) -> [Attribute; 2] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Label(text_attr(name.as_bytes())),
    ]
}

fn find(session: &Session, name: &str) -> cryptoki::error::Result<Vec<(ObjectHandle, Vec<u8>)>> {
    let handles = session.find_objects(&by_name(name))?;
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        let value = session
            .get_attributes(h, &[AttributeType::Value])?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .unwrap_or_default();
        out.push((h, value));
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
    let found = hsm.run("read_object", |s, _, _| find(s, name))?;
    let values: Vec<Vec<u8>> = found.into_iter().map(|(_, v)| v).collect();
    Ok(newest(&values).map(|i| values[i].clone()))
}

/// Writes a new object under `name`; older objects stay until [`prune`]. The caller reads it
/// back to verify.
pub fn put(hsm: &mut Hsm, name: &str, value: &[u8]) -> Result<(), HsmError> {
    hsm.run("create_object", |s, _, _| {
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(true),
            Attribute::Label(text_attr(name.as_bytes())),
            Attribute::Application(text_attr(name.as_bytes())),
            Attribute::Value(value.to_vec()),
        ])
    })?;
    Ok(())
}

/// Removes every object under `name` except one holding `keep`.
pub fn prune(hsm: &mut Hsm, name: &str, keep: &[u8]) -> Result<usize, HsmError> {
    hsm.run("prune_objects", |s, _, _| {
        let found = find(s, name)?;
        let mut kept = false;
        let mut removed = 0;
        for (h, v) in found {
            if !kept && v == keep {
                kept = true;
                continue;
            }
            s.destroy_object(h)?;
            removed += 1;
        }
        Ok(removed)
    })
}

/// Deletes every object under `name`; returns how many.
pub fn delete(hsm: &mut Hsm, name: &str) -> Result<usize, HsmError> {
    hsm.run("destroy_object", |s, _, _| {
        let found = find(s, name)?;
        for (h, _) in &found {
            s.destroy_object(*h)?;
        }
        Ok(found.len())
    })
}

/// Labels of all data objects, duplicates included, without reading any value (a value read
/// is card I/O on a real stick).
pub fn labels(hsm: &mut Hsm) -> Result<Vec<String>, HsmError> {
    hsm.run("list_objects", |s, _, _| {
        let handles = s.find_objects(&[Attribute::Class(ObjectClass::DATA)])?;
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            for a in s.get_attributes(h, &[AttributeType::Label])? {
                if let Attribute::Label(l) = a {
                    out.push(String::from_utf8_lossy(&l).into_owned());
                }
            }
        }
        Ok(out)
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
}

/// All data objects as (label, value), in token order.
pub fn list(hsm: &mut Hsm) -> Result<Vec<(String, Vec<u8>)>, HsmError> {
    hsm.run("list_objects", |s, _, _| {
        let handles = s.find_objects(&[Attribute::Class(ObjectClass::DATA)])?;
        let mut out = Vec::new();
        for h in handles {
            let attrs = s.get_attributes(h, &[AttributeType::Label, AttributeType::Value])?;
            let (mut label, mut value) = (String::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                    Attribute::Value(v) => value = v,
                    _ => {}
                }
            }
            out.push((label, value));
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
