//! Values the file writes as text and tollgate uses as types (a rate, a
//! `host:port`): parsed once, when the file is read, and kept beside their
//! text, which is what `/config` shows.
//!
//! A text that does not parse is kept with its problem instead of failing
//! the read, so validation can report it with every other problem of the
//! file; a config that passed validation holds only parsed values.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A type the config writes as text.
pub trait FromText: Sized {
    /// The value of `text`, or what is wrong with it (quoting it).
    fn from_text(text: &str) -> Result<Self, String>;
}

/// A value as written and as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<T> {
    text: String,
    value: Result<T, String>,
}

// === impl Parsed ===

impl<T: FromText> Parsed<T> {
    /// Parses `text`.
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let value = T::from_text(&text);
        Parsed { text, value }
    }
}

impl<T> Parsed<T> {
    /// The text as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value, or the problem validation reports for it.
    pub fn value(&self) -> Result<&T, &str> {
        self.value.as_ref().map_err(String::as_str)
    }
}

impl<T: FromText> From<&str> for Parsed<T> {
    fn from(text: &str) -> Self {
        Parsed::new(text)
    }
}

impl<'de, T: FromText> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Parsed::new)
    }
}

impl<T> Serialize for Parsed<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.text.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostPort, Rate};

    #[test]
    fn a_value_keeps_its_text_and_its_parse() {
        let r: Parsed<Rate> = "6_000/min".into();
        assert_eq!(r.text(), "6_000/min");
        assert_eq!(r.value().map(|r| r.limit), Ok(6000));
        let bad: Parsed<Rate> = "10/fortnight".into();
        assert!(bad
            .value()
            .is_err_and(|e| e.contains("unknown period unit")));
        let a: Parsed<HostPort> = "[::1]:50051".into();
        assert_eq!(
            a.value().map(|a| (a.host.as_str(), a.port)),
            Ok(("::1", 50051))
        );
        assert_eq!(
            serde_yaml::to_string(&bad).ok().as_deref(),
            Some("10/fortnight\n")
        );
    }
}
