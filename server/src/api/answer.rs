//! The JSON of the answers to reads and writes, written by hand.
//!
//! These answers are most of what a node sends, and serde_json spent about a tenth of a
//! request's instructions on them: escaping every field name byte by byte, checking the
//! stored value's JSON again to embed it as a `RawValue`, and formatting each stamp into a
//! `String` first. Here field names are literals, a stored value is copied as it is (it is
//! canonical JSON by construction), stamps are written straight into the buffer, and only
//! strings that need it go through serde_json's escaping. The views keep their `Serialize`
//! derive as the reference: the tests hold this writer to serde_json's output, byte for byte.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use meridian_crdt::{Stamp, needs_no_escaping};

/// A view that writes its own JSON.
pub trait WriteJson {
    fn write_json(&self, out: &mut Vec<u8>);
}

/// A `200 OK` whose body is `V` as JSON: what `axum::Json` answers, written by [`WriteJson`].
#[derive(Debug)]
pub struct JsonAnswer<V>(pub V);

/// Room for a typical answer (a register with a 100-byte value and its write's meta is about
/// 250 bytes), so the buffer is not grown while writing.
const TYPICAL_ANSWER_BYTES: usize = 320;

impl<V: WriteJson> IntoResponse for JsonAnswer<V> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(TYPICAL_ANSWER_BYTES);
        self.0.write_json(&mut body);
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

/// `text` as a JSON string: copied as it is when serde_json would not escape any of it.
pub fn string(out: &mut Vec<u8>, text: &str) {
    if needs_no_escaping(text.as_bytes()) {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

/// A stamp as the RFC 3339 string the API shows.
pub fn stamp(out: &mut Vec<u8>, stamp: Stamp) {
    out.push(b'"');
    out.extend_from_slice(&stamp.rfc3339_bytes());
    out.push(b'"');
}

/// An integer in decimal, without the formatting machinery `write!` goes through (a few
/// hundred instructions per number, and every answer has two or three).
pub fn integer(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}
