//! Ciphertext stored as data objects on the token.
//!
//! Objects are CKO_DATA with CKA_TOKEN and CKA_PRIVATE set, CKA_LABEL = CKA_APPLICATION = the
//! name, CKA_VALUE = the stored bytes. A replace writes the new object first and removes the
//! old ones only after the caller verified the new one ([`prune`]), so a crash leaves at most
//! a duplicate, never nothing; readers pick the newest duplicate by the format's write stamp.

use crate::envelope;
use crate::hsm::{Hsm, HsmError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

fn find(session: &Session, name: &str) -> cryptoki::error::Result<Vec<(ObjectHandle, Vec<u8>)>> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Label(name.as_bytes().to_vec()),
    ])?;
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

/// Number of objects stored under `name`.
pub fn count(hsm: &mut Hsm, name: &str) -> Result<usize, HsmError> {
    hsm.run("find_objects", |s, _, _| {
        Ok(s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(name.as_bytes().to_vec()),
        ])?
        .len())
    })
}

/// Writes a new object under `name` and reads it back; older objects stay until [`prune`].
pub fn put(hsm: &mut Hsm, name: &str, value: &[u8]) -> Result<(), HsmError> {
    hsm.run("create_object", |s, _, _| {
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(true),
            Attribute::Label(name.as_bytes().to_vec()),
            Attribute::Application(name.as_bytes().to_vec()),
            Attribute::Value(value.to_vec()),
        ])
    })?;
    let found = hsm.run("read_object", |s, _, _| find(s, name))?;
    if found.iter().any(|(_, v)| v == value) {
        Ok(())
    } else {
        Err(HsmError::Other(format!(
            "object `{name}` was written but reading it back did not return the written value"
        )))
    }
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
