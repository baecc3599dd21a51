//! A wrapper for tokens and passwords: it serializes (the envelope must carry tokens to
//! the worker) but never prints. Use `expose()` only where the value leaves the process
//! on purpose (an HTTP call to Bitrix24, a database write).

use serde::{Deserialize, Serialize};
use std::fmt;
use subtle::ConstantTimeEq;

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison, so response timing does not reveal how much of a
    /// forged `application_token` was right.
    pub fn ct_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("s6p6eclrvim6da22ft9ch94ekreb52lv");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            "\"s6p6eclrvim6da22ft9ch94ekreb52lv\""
        );
    }

    #[test]
    fn ct_eq_compares_whole_values() {
        let s = Secret::new("abc");
        assert!(s.ct_eq("abc"));
        assert!(!s.ct_eq("abd"));
        assert!(!s.ct_eq("ab"));
        assert!(!s.ct_eq("abcd"));
    }
}
