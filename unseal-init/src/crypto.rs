//! Host-side RSA encryption with the token's extracted public key.
//!
//! A NitroKey HSM only performs private-key operations, so encryption happens here with the
//! `rsa` crate; decryption stays on the device (see `hsm`).

use crate::envelope::Scheme;
use rsa::{BoxedUint, Pkcs1v15Encrypt, PublicKey};
use thiserror::Error;

/// Host-side encryption failures.
#[derive(Debug, Error)]
pub enum CryptoError {
    /// Modulus/exponent read from the token do not form a usable RSA key.
    #[error("the token's public key is not a usable RSA key: {0}")]
    BadKey(String),
    /// Encryption itself failed (e.g. plaintext too long for the key).
    #[error("RSA encryption with {scheme} failed: {reason}")]
    Encrypt {
        /// Scheme used.
        scheme: &'static str,
        /// Library's reason.
        reason: String,
    },
}

/// The token's RSA public key, ready to encrypt.
#[derive(Clone)]
pub struct HostKey {
    key: PublicKey,
    modulus_len: usize,
}

impl HostKey {
    /// Builds the key from big-endian modulus and exponent as PKCS#11 returns them.
    pub fn from_components(modulus: &[u8], exponent: &[u8]) -> Result<Self, CryptoError> {
        let modulus = strip_leading_zeros(modulus);
        let exponent = strip_leading_zeros(exponent);
        if modulus.is_empty() || exponent.is_empty() {
            return Err(CryptoError::BadKey("empty modulus or exponent".into()));
        }
        let n = BoxedUint::from_be_slice_vartime(modulus);
        let e = BoxedUint::from_be_slice_vartime(exponent);
        let key = PublicKey::new(n, e).map_err(|e| CryptoError::BadKey(e.to_string()))?;
        Ok(Self {
            key,
            modulus_len: modulus.len(),
        })
    }

    /// Modulus length in bytes (= ciphertext length).
    pub fn modulus_len(&self) -> usize {
        self.modulus_len
    }

    /// Modulus length in bits.
    pub fn bits(&self) -> usize {
        self.modulus_len * 8
    }

    /// The longest plaintext one ciphertext of `scheme` holds (RFC 8017: OAEP takes two hash
    /// lengths and two bytes, PKCS#1 v1.5 eleven bytes).
    pub fn capacity(&self, scheme: Scheme) -> usize {
        let overhead = match scheme {
            Scheme::OaepSha256 => 2 * 32 + 2,
            Scheme::OaepSha1 => 2 * 20 + 2,
            Scheme::Pkcs1v15 => 11,
        };
        self.modulus_len.saturating_sub(overhead)
    }

    /// The key pair's identity: SHA-256 of the public key's DER SubjectPublicKeyInfo, in
    /// lower-case hex. The same as `sha256sum` of the DER that `pkcs11-tool --read-object
    /// --type pubkey` exports (or `openssl pkey -pubin -outform DER` writes), so an operator
    /// can compare sticks with standard tools; the same on every stick holding this pair.
    pub fn fingerprint(&self) -> Result<Fingerprint, CryptoError> {
        use rsa::pkcs8::EncodePublicKey;
        use sha2::Digest;
        let der = self
            .key
            .to_public_key_der()
            .map_err(|e| CryptoError::BadKey(e.to_string()))?;
        Ok(Fingerprint(sha2::Sha256::digest(der.as_bytes()).into()))
    }

    /// Encrypts `plaintext` with `scheme`.
    pub fn encrypt(&self, scheme: Scheme, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let result = match scheme {
            Scheme::OaepSha256 => self.key.oaep_encrypt::<sha2::Sha256>(plaintext),
            Scheme::OaepSha1 => self.key.oaep_encrypt::<sha1::Sha1>(plaintext),
            Scheme::Pkcs1v15 => self
                .key
                .encrypt(&mut rand::rng(), Pkcs1v15Encrypt, plaintext),
        };
        result.map_err(|e| CryptoError::Encrypt {
            scheme: scheme.name(),
            reason: e.to_string(),
        })
    }
}

/// SHA-256 of a public key's DER SubjectPublicKeyInfo (see [`HostKey::fingerprint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SHA256:{}", hex::encode(self.0))
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::PrivateKey;
    use rsa::traits::PublicKeyParts;

    fn pair() -> (PrivateKey, HostKey) {
        let private = PrivateKey::new(&mut rand::rng(), 1024).expect("keygen");
        let public = private.to_public_key();
        let n = public.n().to_be_bytes();
        let e = public.e().to_be_bytes();
        let host = HostKey::from_components(&n, &e).expect("host key");
        (private, host)
    }

    #[test]
    fn every_scheme_decrypts_with_the_matching_private_key() {
        let (private, host) = pair();
        assert_eq!(host.modulus_len(), 128);
        let msg = b"vault-unseal-key";
        let ct = host.encrypt(Scheme::OaepSha256, msg).expect("enc");
        assert_eq!(ct.len(), 128);
        assert_eq!(private.oaep_decrypt::<sha2::Sha256>(&ct).expect("dec"), msg);
        let ct = host.encrypt(Scheme::OaepSha1, msg).expect("enc");
        assert_eq!(private.oaep_decrypt::<sha1::Sha1>(&ct).expect("dec"), msg);
        assert!(private.oaep_decrypt::<sha2::Sha256>(&ct).is_err());
        let ct = host.encrypt(Scheme::Pkcs1v15, msg).expect("enc");
        assert_eq!(private.pkcs1v15_decrypt(&ct).expect("dec"), msg);
    }

    #[test]
    fn leading_zero_bytes_from_the_token_are_ignored() {
        let (private, _) = pair();
        let public = private.to_public_key();
        let mut n = vec![0u8, 0u8];
        n.extend_from_slice(&public.n().to_be_bytes());
        let host = HostKey::from_components(&n, &[0, 1, 0, 1]).expect("host key");
        assert_eq!(host.modulus_len(), 128);
        assert_eq!(host.bits(), 1024);
        assert!(HostKey::from_components(&[0, 0], &[1, 0, 1]).is_err());
    }

    #[test]
    fn the_fingerprint_is_sha256_of_the_der_public_key() {
        use rsa::pkcs8::EncodePublicKey;
        use sha2::Digest;
        let (private, host) = pair();
        let der = private.to_public_key().to_public_key_der().expect("der");
        let want: [u8; 32] = sha2::Sha256::digest(der.as_bytes()).into();
        assert_eq!(host.fingerprint().expect("fp").0, want);
        let text = host.fingerprint().expect("fp").to_string();
        assert!(
            text.starts_with("SHA256:") && text.len() == 7 + 64,
            "{text}"
        );
        let (_, other) = pair();
        assert_ne!(
            other.fingerprint().expect("fp"),
            host.fingerprint().expect("fp")
        );
    }

    #[test]
    fn too_long_plaintext_is_an_error_not_a_panic() {
        let (_, host) = pair();
        let err = host.encrypt(Scheme::OaepSha256, &[0u8; 200]).unwrap_err();
        assert!(err.to_string().contains("RSA-OAEP-SHA256"));
    }
}
