//! The RSA key pair on the token: finding it by label, generating it, reading its public half
//! for host-side encryption, decrypting on the device, and choosing the OAEP hash the token
//! accepts by a round trip.

use crate::crypto::HostKey;
use crate::envelope::Scheme;
use crate::hsm::{Hsm, HsmError, KeyRef, text_attr};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

/// Facts about the key pair, for logs and `hsm list`.
#[derive(Debug, Clone)]
pub struct KeyPairInfo {
    /// Label.
    pub label: String,
    /// CKA_ID in hex.
    pub id_hex: String,
    /// Modulus size in bits.
    pub bits: usize,
    /// SHA-256 of the public key's DER SubjectPublicKeyInfo ([`HostKey::fingerprint`]): the
    /// same on every stick holding this pair.
    pub fingerprint: String,
}

fn find_one(
    session: &Session,
    class: ObjectClass,
    key: &KeyRef,
) -> cryptoki::error::Result<Option<ObjectHandle>> {
    let mut template = vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Label(text_attr(key.label.as_bytes())),
    ];
    // Paired by CKA_ID when the public half told us one: two pairs may share a label.
    if let Some(id) = &key.id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = session.find_objects(&template)?;
    Ok(found.into_iter().next())
}

/// Returns the private key handle, looking it up once per session.
pub fn private_key(
    session: &Session,
    cache: &mut crate::hsm::HandleCache,
    key: &KeyRef,
) -> cryptoki::error::Result<ObjectHandle> {
    if let Some(h) = cache.private_key {
        return Ok(h);
    }
    match find_one(session, ObjectClass::PRIVATE_KEY, key)? {
        Some(h) => {
            cache.private_key = Some(h);
            Ok(h)
        }
        None => Err(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            cryptoki::context::Function::FindObjects,
        )),
    }
}

enum Presence {
    Both {
        modulus: Vec<u8>,
        exponent: Vec<u8>,
        id: Vec<u8>,
        private: ObjectHandle,
    },
    PrivateOnly,
    PublicOnly,
    None,
}

/// Finds both halves: the public key by label, then the private key by label and the public
/// key's `CKA_ID` (two pairs may share a label). The private key's handle is kept for the
/// session, so the first decryption needs no search of its own.
fn presence(session: &Session, label: &str) -> cryptoki::error::Result<Presence> {
    let by_label = KeyRef {
        label: label.to_owned(),
        id: None,
    };
    let Some(public) = find_one(session, ObjectClass::PUBLIC_KEY, &by_label)? else {
        return Ok(
            match find_one(session, ObjectClass::PRIVATE_KEY, &by_label)? {
                Some(_) => Presence::PrivateOnly,
                None => Presence::None,
            },
        );
    };
    let attrs = session.get_attributes(
        public,
        &[
            AttributeType::Modulus,
            AttributeType::PublicExponent,
            AttributeType::Id,
        ],
    )?;
    let (mut modulus, mut exponent, mut id) = (Vec::new(), Vec::new(), Vec::new());
    for a in attrs {
        match a {
            Attribute::Modulus(v) => modulus = v,
            Attribute::PublicExponent(v) => exponent = v,
            Attribute::Id(v) => id = v,
            _ => {}
        }
    }
    let paired = KeyRef {
        label: label.to_owned(),
        id: (!id.is_empty()).then(|| id.clone()),
    };
    Ok(
        match find_one(session, ObjectClass::PRIVATE_KEY, &paired)? {
            Some(private) => Presence::Both {
                modulus,
                exponent,
                id,
                private,
            },
            None => Presence::PublicOnly,
        },
    )
}

/// Reads the public key of the configured pair; errors if either half is missing. Remembers
/// the pair's `CKA_ID` so the private half is found by it.
pub fn public_key(hsm: &mut Hsm) -> Result<(HostKey, KeyPairInfo), HsmError> {
    let label = hsm.key().label.clone();
    match hsm.run("find_key", |s, _, k| presence(s, &k.label))? {
        Presence::Both {
            modulus: n,
            exponent: e,
            id,
            private,
        } => {
            hsm.set_key_id(id.clone());
            hsm.remember_private_key(private);
            let key = HostKey::from_components(&n, &e)
                .map_err(|e| HsmError::Other(format!("key pair `{label}`: {e}")))?;
            let fingerprint = key
                .fingerprint()
                .map_err(|e| HsmError::Other(format!("key pair `{label}`: {e}")))?
                .to_string();
            let info = KeyPairInfo {
                label,
                id_hex: hex::encode(id),
                bits: key.bits(),
                fingerprint,
            };
            Ok((key, info))
        }
        Presence::PrivateOnly => Err(HsmError::KeyIncomplete {
            label,
            present: "private",
            missing: "public",
        }),
        Presence::PublicOnly => Err(HsmError::KeyIncomplete {
            label,
            present: "public",
            missing: "private",
        }),
        Presence::None => Err(HsmError::KeyMissing(label)),
    }
}

/// The fingerprint of the public key labelled `label` on `slot`, read without logging in
/// (public keys are public objects), for listings of every slot: `None` when there is none.
pub fn public_fingerprint(
    ctx: &cryptoki::context::Pkcs11,
    slot: cryptoki::slot::Slot,
    label: &str,
) -> Option<String> {
    let session = ctx.open_ro_session(slot).ok()?;
    let by_label = KeyRef {
        label: label.to_owned(),
        id: None,
    };
    let public = find_one(&session, ObjectClass::PUBLIC_KEY, &by_label).ok()??;
    let attrs = session
        .get_attributes(
            public,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )
        .ok()?;
    let (mut n, mut e) = (Vec::new(), Vec::new());
    for a in attrs {
        match a {
            Attribute::Modulus(v) => n = v,
            Attribute::PublicExponent(v) => e = v,
            _ => {}
        }
    }
    let key = HostKey::from_components(&n, &e).ok()?;
    key.fingerprint().ok().map(|f| f.to_string())
}

/// Generates an RSA-2048 pair under the configured label: private key sensitive and
/// non-extractable, both halves stored on the token.
pub fn generate(hsm: &mut Hsm) -> Result<(), HsmError> {
    let mut id = [0u8; 20];
    rand::fill(&mut id);
    let label = hsm.key().label.clone();
    let private = generate_with(hsm, &label, &id)?;
    hsm.remember_private_key(private);
    Ok(())
}

/// Generates an RSA-2048 pair labelled `label` with `CKA_ID` `id` (private key sensitive
/// and non-extractable, both halves token objects); returns the private key's handle.
pub fn generate_with(hsm: &mut Hsm, label: &str, id: &[u8]) -> Result<ObjectHandle, HsmError> {
    hsm.run("generate_key_pair", |s, _, _| {
        let label = text_attr(label.as_bytes());
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Encrypt(true),
            Attribute::Verify(true),
            Attribute::Wrap(true),
            Attribute::ModulusBits(2048.into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Label(label.clone()),
            Attribute::Id(id.to_vec()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            Attribute::Sign(true),
            Attribute::Unwrap(true),
            Attribute::Label(label),
            Attribute::Id(id.to_vec()),
        ];
        let (_, private) = s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)?;
        Ok(private)
    })
}

/// The labels of the two halves of the pair whose `CKA_ID` is `id` (`None` for a half that
/// is not there), found by id alone: a rotation moves pairs between labels.
pub fn labels_by_id(
    hsm: &mut Hsm,
    id: &[u8],
) -> Result<(Option<String>, Option<String>), HsmError> {
    hsm.run("find_key_by_id", |s, _, _| {
        let mut out = [None, None];
        for (i, class) in [ObjectClass::PUBLIC_KEY, ObjectClass::PRIVATE_KEY]
            .into_iter()
            .enumerate()
        {
            let template = [
                Attribute::Class(class),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Id(id.to_vec()),
            ];
            if let Some(h) = s.find_objects(&template)?.into_iter().next() {
                let label = s
                    .get_attributes(h, &[AttributeType::Label])?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Label(v) => Some(v),
                        _ => None,
                    })
                    .unwrap_or_default();
                // OpenSC reads string attributes as C strings: stop at the first NUL.
                let end = label.iter().position(|b| *b == 0).unwrap_or(label.len());
                out[i] = Some(String::from_utf8_lossy(&label[..end]).into_owned());
            }
        }
        let [public, private] = out;
        Ok((public, private))
    })
}

/// Sets the label of both halves of the pair `id` to `label` (each half that is there).
pub fn relabel_by_id(hsm: &mut Hsm, id: &[u8], label: &str) -> Result<(), HsmError> {
    hsm.run("relabel_key_pair", |s, cache, _| {
        for class in [ObjectClass::PUBLIC_KEY, ObjectClass::PRIVATE_KEY] {
            let template = [
                Attribute::Class(class),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Id(id.to_vec()),
            ];
            for h in s.find_objects(&template)? {
                s.update_attributes(h, &[Attribute::Label(text_attr(label.as_bytes()))])?;
            }
        }
        // The configured label may now name another pair.
        cache.private_key = None;
        Ok(())
    })
}

/// Destroys both halves of the pair `id` (each half that is there); how many objects went.
pub fn destroy_by_id(hsm: &mut Hsm, id: &[u8]) -> Result<usize, HsmError> {
    hsm.run("destroy_key_pair", |s, cache, _| {
        let mut removed = 0;
        for class in [ObjectClass::PUBLIC_KEY, ObjectClass::PRIVATE_KEY] {
            let template = [
                Attribute::Class(class),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Id(id.to_vec()),
            ];
            for h in s.find_objects(&template)? {
                s.destroy_object(h)?;
                removed += 1;
            }
        }
        cache.private_key = None;
        Ok(removed)
    })
}

/// The public key of the pair `id`, for host-side encryption.
pub fn public_key_by_id(hsm: &mut Hsm, id: &[u8]) -> Result<HostKey, HsmError> {
    let (n, e) = hsm.run("read_public_key", |s, _, _| {
        let template = [
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Id(id.to_vec()),
        ];
        let Some(h) = s.find_objects(&template)?.into_iter().next() else {
            return Ok((Vec::new(), Vec::new()));
        };
        let (mut n, mut e) = (Vec::new(), Vec::new());
        for a in s.get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent])? {
            match a {
                Attribute::Modulus(v) => n = v,
                Attribute::PublicExponent(v) => e = v,
                _ => {}
            }
        }
        Ok((n, e))
    })?;
    if n.is_empty() {
        return Err(HsmError::Other(format!(
            "no public key with CKA_ID {} on the token",
            hex::encode(id)
        )));
    }
    HostKey::from_components(&n, &e).map_err(|e| HsmError::Other(e.to_string()))
}

/// Decrypts `ciphertext` with the private key of the pair `id` (not the configured one).
pub fn decrypt_by_id(
    hsm: &mut Hsm,
    id: &[u8],
    scheme: Scheme,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    let mech = mechanism(scheme);
    hsm.run_raw("decrypt", |s, raw, _, _| {
        let template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Id(id.to_vec()),
        ];
        let Some(handle) = s.find_objects(&template)?.into_iter().next() else {
            return Err(CkError::Pkcs11(
                RvError::KeyHandleInvalid,
                cryptoki::context::Function::FindObjects,
            ));
        };
        s.decrypt_init(&mech, handle)?;
        raw.decrypt(s, ciphertext)
    })
}

/// Picks the scheme for values sealed to the pair `id`, as [`probe_scheme`] does for the
/// configured pair.
pub fn probe_scheme_by_id(hsm: &mut Hsm, id: &[u8], key: &HostKey) -> Result<Scheme, HsmError> {
    let mut probe = Zeroizing::new([0u8; 32]);
    rand::fill(&mut probe[..]);
    let mut reasons = Vec::new();
    for scheme in [Scheme::OaepSha256, Scheme::OaepSha1] {
        let ct = key
            .encrypt(scheme, &probe[..])
            .map_err(|e| HsmError::Other(e.to_string()))?;
        match decrypt_by_id(hsm, id, scheme, &ct) {
            Ok(pt) if pt[..] == probe[..] => return Ok(scheme),
            Ok(_) => reasons.push(format!("{}: wrong plaintext", scheme.name())),
            Err(e) if e.is_transient() || e.pin_failure().is_some() => return Err(e),
            Err(e) => reasons.push(format!("{}: {e}", scheme.name())),
        }
    }
    Err(HsmError::Other(format!(
        "the new key pair decrypts neither RSA-OAEP-SHA256 nor RSA-OAEP-SHA1 ({})",
        reasons.join("; ")
    )))
}

/// Finds the key pair, generating it first when it is absent and `generate` is set.
pub fn ensure(hsm: &mut Hsm, generate_missing: bool) -> Result<(HostKey, KeyPairInfo), HsmError> {
    match public_key(hsm) {
        Err(HsmError::KeyMissing(label)) if generate_missing => {
            tracing::info!(label, "generating RSA-2048 key pair on the HSM");
            generate(hsm)?;
            public_key(hsm)
        }
        other => other,
    }
}

fn mechanism(scheme: Scheme) -> Mechanism<'static> {
    match scheme {
        Scheme::OaepSha256 => Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
            MechanismType::SHA256,
            PkcsMgfType::MGF1_SHA256,
            PkcsOaepSource::empty(),
        )),
        Scheme::OaepSha1 => Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
            MechanismType::SHA1,
            PkcsMgfType::MGF1_SHA1,
            PkcsOaepSource::empty(),
        )),
        Scheme::Pkcs1v15 => Mechanism::RsaPkcs,
    }
}

/// Decrypts `ciphertext` with the private key on the token.
pub fn decrypt(
    hsm: &mut Hsm,
    scheme: Scheme,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    let mech = mechanism(scheme);
    // C_DecryptInit, then one C_Decrypt into a buffer as long as the ciphertext: cryptoki's
    // `decrypt` would ask for the length first, a second card operation on a stick, and
    // leave the plaintext in memory nobody zeroes.
    hsm.run_raw("decrypt", |s, raw, cache, key| {
        let handle = private_key(s, cache, key)?;
        s.decrypt_init(&mech, handle)?;
        raw.decrypt(s, ciphertext)
    })
}

/// Picks the scheme for new values: OAEP-SHA256 if the token decrypts it, else OAEP-SHA1,
/// proven by encrypting a random value on the host and decrypting it on the token.
pub fn probe_scheme(hsm: &mut Hsm, key: &HostKey) -> Result<Scheme, HsmError> {
    let mut probe = Zeroizing::new([0u8; 32]);
    rand::fill(&mut probe[..]);
    let mut reasons = Vec::new();
    for scheme in [Scheme::OaepSha256, Scheme::OaepSha1] {
        let ct = key
            .encrypt(scheme, &probe[..])
            .map_err(|e| HsmError::Other(e.to_string()))?;
        match decrypt(hsm, scheme, &ct) {
            Ok(pt) if pt[..] == probe[..] => {
                tracing::info!(
                    scheme = scheme.name(),
                    "HSM decryption scheme chosen by round trip"
                );
                return Ok(scheme);
            }
            Ok(_) => reasons.push(format!("{}: wrong plaintext", scheme.name())),
            Err(e) if e.is_transient() || e.pin_failure().is_some() => return Err(e),
            Err(e) => reasons.push(format!("{}: {e}", scheme.name())),
        }
    }
    Err(HsmError::Other(format!(
        "the token decrypts neither RSA-OAEP-SHA256 nor RSA-OAEP-SHA1 ({})",
        reasons.join("; ")
    )))
}
