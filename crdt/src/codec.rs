//! The compact, versioned binary form of states and ops.
//!
//! Every encoding is one format-version byte followed by postcard (varint integers, no field
//! names). A reader refuses versions it does not know instead of guessing, so a node running
//! an older binary fails loudly on newer data; future versions keep a decoder for each older
//! one. Golden vectors in `tests/golden.rs` freeze version 1.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::CrdtError;
use crate::value::{Op, State};

/// The encoding this build writes.
pub const FORMAT_VERSION: u8 = 1;

/// Room for a typical op or state (a key, a stamp and a 100-byte value) in one allocation:
/// growing from empty cost a handful of reallocations per op on the write path.
const TYPICAL_ENCODED_LEN: usize = 192;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(TYPICAL_ENCODED_LEN);
    out.push(FORMAT_VERSION);
    // Serialising these types into a Vec cannot fail: no maps with non-string-able keys, no
    // custom errors. Should that ever change, the version byte alone fails to decode loudly.
    postcard::to_extend(value, out).unwrap_or_else(|_| vec![FORMAT_VERSION])
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CrdtError> {
    let (&version, body) = bytes.split_first().ok_or(CrdtError::Truncated)?;
    if version != FORMAT_VERSION {
        return Err(CrdtError::UnsupportedVersion(version));
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(CrdtError::Decode)?;
    if !rest.is_empty() {
        return Err(CrdtError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

pub fn encode_state(state: &State) -> Vec<u8> {
    encode(state)
}

pub fn decode_state(bytes: &[u8]) -> Result<State, CrdtError> {
    let state: State = decode(bytes)?;
    state.validate()?;
    Ok(state)
}

pub fn encode_op(op: &Op) -> Vec<u8> {
    encode(op)
}

pub fn decode_op(bytes: &[u8]) -> Result<Op, CrdtError> {
    let op: Op = decode(bytes)?;
    op.delta.validate()?;
    Ok(op)
}
