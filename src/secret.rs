//! A string that must never reach a log line.

use serde::{Deserialize, Deserializer};
use std::fmt;

/// Holds a secret (WeChat app secret, signing key material).
/// `Debug` and `Display` print `[redacted]`; the value is reached only through
/// [`Secret::expose`], which makes every use of it easy to find. There is no
/// `Serialize`, so no answer, log or record can carry one by accident:
///
/// ```compile_fail
/// serde_json::to_string(&wxauth::secret::Secret::new("s")).unwrap();
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

// No `Serialize`: a secret leaves only through `expose()`, where it is visible.

/// A WeChat session key (the key to the user's encrypted wx data). Like [`Secret`]
/// it prints `[redacted]` and has no `Serialize`: it reaches the database only
/// through `users::encode`, which calls [`SessionKey::expose`], and never an answer
/// or a log line. `Deserialize` reads the stored string back.
///
/// ```compile_fail
/// serde_json::to_string(&wxauth::secret::SessionKey::new("k")).unwrap();
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SessionKey(Secret);

impl SessionKey {
    pub fn new(value: impl Into<String>) -> Self {
        SessionKey(Secret::new(value))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::{Secret, SessionKey};

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_session_key_prints_redacted_and_reads_back_from_a_string() {
        let key = SessionKey::new("tiihtNczf5v6AKRyjwEUhQ==");
        assert_eq!(
            format!("{key:?} {key} {:?}", Some(&key)),
            "[redacted] [redacted] Some([redacted])"
        );
        let read: SessionKey = serde_json::from_str("\"tiihtNczf5v6AKRyjwEUhQ==\"").unwrap();
        assert_eq!(read.expose(), "tiihtNczf5v6AKRyjwEUhQ==");
    }
}
