//! A value that must never reach a log, a metric or `check-config` output.
//!
//! Passwords, SASL payloads and tokens live in [`Secret`]; its `Debug` and `Display` always
//! redact, and it serializes as a fixed placeholder so that printing the effective
//! configuration cannot leak one either. Reading the value takes an explicit
//! [`Secret::expose`] call, which is easy to audit with grep.

use std::fmt;

/// The text that stands for a secret wherever one would be printed.
pub const REDACTED: &str = "<redacted>";

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself: only for the code that must send it (upstream login).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> serde::Serialize for Secret<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_display_and_serialize_never_show_the_value() {
        let secret = Secret::new(String::from("hunter2"));
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(format!("{secret}"), REDACTED);
        let as_toml = toml::to_string(&std::collections::BTreeMap::from([("p", secret.clone())])).unwrap();
        assert!(!as_toml.contains("hunter2"), "{as_toml}");
        assert_eq!(secret.expose(), "hunter2");
    }
}
