//! JSON in one canonical spelling, so equal documents are equal bytes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A JSON document in canonical form: object keys sorted, no insignificant whitespace.
///
/// Set elements and register values are compared, ordered and hashed by these bytes, so
/// `{"a":1,"b":2}` and `{"b":2,"a":1}` are one element. Numbers keep serde_json's spelling
/// (`1` and `1.0` stay distinct), which is what JSON round-trips through most clients.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CanonicalJson(String);

impl CanonicalJson {
    pub fn new(value: &Value) -> Self {
        // Most values are strings with nothing to escape: quoted as they are, without
        // serde_json's byte-by-byte escape lookup (about a thousand instructions for a
        // 100-byte value, on every write).
        if let Value::String(text) = value {
            if needs_no_escaping(text.as_bytes()) {
                let mut quoted = String::with_capacity(text.len() + 2);
                quoted.push('"');
                quoted.push_str(text);
                quoted.push('"');
                return Self(quoted);
            }
        }
        // serde_json's `Map` is a `BTreeMap` (the `preserve_order` feature is off in this
        // workspace), so serialising it emits keys in sorted order. `to_string` writes into a
        // buffer sized for a small document at once, where `Display` grows one from empty
        // through the formatter; the text is the same. A `Value` always serialises.
        Self(serde_json::to_string(value).unwrap_or_else(|_| String::from("null")))
    }

    /// Parses any JSON text and canonicalises it.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        let value: Value = serde_json::from_str(text)?;
        Ok(Self::new(&value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn to_value(&self) -> Value {
        // The invariant is that `self.0` is valid JSON; fall back to a string rather than
        // panic should that ever be broken.
        serde_json::from_str(&self.0).unwrap_or_else(|_| Value::String(self.0.clone()))
    }

    /// The text as a JSON value to embed in a response, without parsing it into a [`Value`]
    /// and printing it again.
    pub fn to_raw(&self) -> Box<serde_json::value::RawValue> {
        serde_json::value::RawValue::from_string(self.0.clone()).unwrap_or_else(|_| {
            // As in `to_value`: a string rather than a panic should the invariant break.
            serde_json::value::to_raw_value(&self.0)
                .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
        })
    }

    /// Bytes of the canonical text: the measure for per-value size limits.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for CanonicalJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for CanonicalJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Value> for CanonicalJson {
    fn from(value: Value) -> Self {
        Self::new(&value)
    }
}

impl Serialize for CanonicalJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CanonicalJson {
    /// Bytes from a disk or a peer are checked, not trusted: text that is not JSON, or not in
    /// canonical form, is an error rather than a second spelling of an existing element.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if is_plain_canonical_string(&text) {
            return Ok(Self(text));
        }
        let canonical = Self::parse(&text).map_err(serde::de::Error::custom)?;
        if canonical.0 != text {
            return Err(serde::de::Error::custom("JSON is not in canonical form"));
        }
        Ok(canonical)
    }
}

/// Whether serde_json would print `text` as a JSON string unchanged between its quotes: it
/// escapes only `"`, `\` and the control characters below U+0020.
pub fn needs_no_escaping(text: &[u8]) -> bool {
    // Eight bytes at a time: every value, key and element goes through here, several times
    // per request. `has_byte_below(word, n)` is the classic test for "some byte of `word` is
    // below `n`" (exact as a yes or no for n ≤ 128); a byte equal to `c` is a byte of
    // `word ^ c…c` below 1.
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    let has_byte_below =
        |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS != 0;
    let mut words = text.chunks_exact(8);
    for chunk in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let word = u64::from_le_bytes(bytes);
        if has_byte_below(word, 0x20)
            || has_byte_below(word ^ (ONES * u64::from(b'"')), 1)
            || has_byte_below(word ^ (ONES * u64::from(b'\\')), 1)
        {
            return false;
        }
    }
    words.remainder().iter().all(|&b| is_plain_byte(b))
}

/// A byte serde_json copies into a JSON string as it is.
fn is_plain_byte(b: u8) -> bool {
    b != b'"' && b != b'\\' && b >= 0x20
}

/// Whether `text` is a JSON string with nothing to escape: then it is its own canonical form,
/// and checking it needs no parse. Most register values and set elements are such strings,
/// and every state read from disk and every op from a peer is checked.
fn is_plain_canonical_string(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 2
        && bytes[0] == b'"'
        && bytes[bytes.len() - 1] == b'"'
        && needs_no_escaping(&bytes[1..bytes.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = CanonicalJson::parse(r#"{ "b": [1, {"y":2,"x":1}], "a": null }"#).unwrap();
        let b = CanonicalJson::new(&json!({"a": null, "b": [1, {"x": 1, "y": 2}]}));
        assert_eq!(a, b);
        assert_eq!(a.as_str(), r#"{"a":null,"b":[1,{"x":1,"y":2}]}"#);
    }

    #[test]
    fn non_canonical_bytes_are_refused_on_decode() {
        let bytes = postcard::to_allocvec(&r#"{"b":1,"a":2}"#).unwrap();
        assert!(postcard::from_bytes::<CanonicalJson>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"not json").unwrap();
        assert!(postcard::from_bytes::<CanonicalJson>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&r#"{"a":2,"b":1}"#).unwrap();
        assert!(postcard::from_bytes::<CanonicalJson>(&bytes).is_ok());
    }

    proptest::proptest! {
        /// The word-at-a-time test answers as the byte-at-a-time one would.
        #[test]
        fn escaping_is_detected_in_any_byte_of_a_word(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), clean in proptest::collection::vec(0x20u8..=0xff, 0..40)) {
            let by_byte = |text: &[u8]| text.iter().all(|&b| is_plain_byte(b));
            proptest::prop_assert_eq!(needs_no_escaping(&bytes), by_byte(&bytes));
            proptest::prop_assert_eq!(needs_no_escaping(&clean), by_byte(&clean));
        }

        /// A string's canonical text is serde_json's, with or without the shortcut.
        #[test]
        fn a_string_is_canonically_what_serde_json_prints(text in "\\PC{0,40}|[ -~\\\\\"\n\t\u{7f}\u{1f}é€😀]{0,40}") {
            let canonical = CanonicalJson::new(&Value::String(text.clone()));
            proptest::prop_assert_eq!(canonical.as_str(), serde_json::to_string(&text).unwrap());
        }

        /// The shortcut for plain strings accepts exactly what the full check accepts.
        #[test]
        fn plain_string_shortcut_agrees_with_the_full_check(text in "\\PC{0,12}|\"[ -~\\\\\"\n\u{7f}é]{0,12}\"") {
            let full = CanonicalJson::parse(&text).is_ok_and(|c| c.0 == text);
            if is_plain_canonical_string(&text) {
                proptest::prop_assert!(full, "shortcut accepted {text:?}");
            }
            let bytes = postcard::to_allocvec(&text).unwrap();
            proptest::prop_assert_eq!(postcard::from_bytes::<CanonicalJson>(&bytes).is_ok(), full);
        }
    }
}
