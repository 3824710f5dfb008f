//! A string that must never be shown: the HSM PIN, Vault unseal keys and the root token.
//!
//! Wrapping them in one type makes leaks a type error instead of a review finding: it has no
//! `Display`, its `Debug` prints a fixed placeholder, and its memory is zeroed on drop.
//!
//! Clones share one buffer, zeroed when the last clone goes: the PIN travels through the
//! configuration, the PIN memory, the runner and the token session, and each clone would
//! otherwise be one more copy in memory for as long as it lives.

use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// A secret string, zeroed on drop and redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<Zeroizing<String>>);

impl Secret {
    /// Wraps `value`; the caller's copy moves in and is zeroed with this one.
    pub fn new(value: String) -> Self {
        Self(Arc::new(Zeroizing::new(value)))
    }

    /// The clear value, for the one call that needs it (login, unseal, encryption).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::from(s))
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_buffer() {
        let a = Secret::from("banzai");
        let b = a.clone();
        assert_eq!(a.expose().as_ptr(), b.expose().as_ptr());
        assert_eq!(a, Secret::from("banzai"));
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::from("banzai");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.expose(), "banzai");
    }
}
