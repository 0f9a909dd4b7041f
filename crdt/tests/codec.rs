//! The binary codec: every value round-trips; nothing else decodes into a value that breaks
//! the invariants the rest of the system relies on; malformed input is an error, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{e, n};
use meridian_crdt::arbitrary;
use meridian_crdt::codec::{FORMAT_VERSION, decode_op, decode_state, encode_op, encode_state};
use meridian_crdt::{
    CanonicalJson, Crdt, CrdtError, Dot, GCounter, LwwRegister, Op, OrSet, PnCounter, Stamp, State,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

fn state_join(a: &State, b: &State) -> State {
    let mut out = a.clone();
    out.merge(b).unwrap();
    out
}

/// What any successfully decoded state must satisfy, however hostile its bytes: it re-encodes
/// to something that decodes back to it, and it behaves as a lattice element (idempotent, with
/// bottom as identity on both sides), so replicas that store it cannot drift apart.
fn check_decoded(state: &State) -> Result<(), TestCaseError> {
    prop_assert_eq!(decode_state(&encode_state(state)), Ok(state.clone()));
    let bottom = State::bottom(state.kind());
    prop_assert_eq!(
        &state_join(state, state),
        state,
        "decoded state is not idempotent"
    );
    prop_assert_eq!(
        &state_join(&bottom, state),
        state,
        "bottom ⊔ decoded ≠ decoded"
    );
    prop_assert_eq!(
        &state_join(state, &bottom),
        state,
        "decoded ⊔ bottom ≠ decoded"
    );
    prop_assert_eq!(state.is_bottom(), *state == bottom);
    Ok(())
}

fn check_decoded_op(op: &Op) -> Result<(), TestCaseError> {
    prop_assert_eq!(decode_op(&encode_op(op)), Ok(op.clone()));
    check_decoded(&op.delta)
}

#[derive(Clone, Debug)]
enum Mutation {
    Set(Index, u8),
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), prop_oneof![Just(0u8), Just(1), Just(0x7f), Just(0x80), Just(0xff), any::<u8>()])
            .prop_map(|(at, byte)| Mutation::Set(at, byte)),
        2 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, 1 << bit)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        1 => any::<Index>().prop_map(Mutation::Delete),
    ]
}

/// Mutates everything but the version byte, which has its own test.
fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for mutation in mutations {
        let len = bytes.len();
        if len < 2 {
            return;
        }
        match *mutation {
            Mutation::Set(at, byte) => bytes[1 + at.index(len - 1)] = byte,
            Mutation::Flip(at, mask) => bytes[1 + at.index(len - 1)] ^= mask,
            Mutation::Insert(at, byte) => bytes.insert(1 + at.index(len), byte),
            Mutation::Delete(at) => {
                bytes.remove(1 + at.index(len - 1));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_reachable_state_round_trips(state in arbitrary::state()) {
        let bytes = encode_state(&state);
        prop_assert_eq!(bytes[0], FORMAT_VERSION);
        prop_assert_eq!(decode_state(&bytes), Ok(state));
    }

    #[test]
    fn every_op_round_trips(op in arbitrary::op()) {
        let bytes = encode_op(&op);
        prop_assert_eq!(bytes[0], FORMAT_VERSION);
        prop_assert_eq!(decode_op(&bytes), Ok(op));
    }

    #[test]
    fn any_json_round_trips_in_every_position(value in arbitrary::json(), stamp in any::<u64>()) {
        prop_assert_eq!(CanonicalJson::parse(value.as_str()).unwrap(), value.clone(), "canonical form is not a fixed point");
        let node = n(9);
        let register = LwwRegister::default().write(Stamp::new(stamp, node), Dot::new(node, 1), Some(value.clone()));
        let set = OrSet::default().add(node, [value.clone()]);
        for state in [State::Register(register), State::Set(set)] {
            prop_assert_eq!(decode_state(&encode_state(&state)), Ok(state.clone()));
            let op = Op { dot: Dot::new(node, 1), stamp: Stamp::new(stamp, node), key: value.to_string(), delta: state };
            prop_assert_eq!(decode_op(&encode_op(&op)), Ok(op));
        }
    }

    #[test]
    fn floats_of_every_magnitude_round_trip(float in any::<f64>()) {
        if let Some(number) = serde_json::Number::from_f64(float) {
            let value = CanonicalJson::from(Value::Number(number));
            prop_assert_eq!(CanonicalJson::parse(value.as_str()).unwrap(), value.clone());
            let set = State::Set(OrSet::default().add(n(1), [value]));
            prop_assert_eq!(decode_state(&encode_state(&set)), Ok(set));
        }
    }

    #[test]
    fn every_truncation_of_a_valid_encoding_is_an_error(state in arbitrary::state(), op in arbitrary::op()) {
        let bytes = encode_state(&state);
        prop_assert_eq!(decode_state(&[]), Err(CrdtError::Truncated));
        for end in 0..bytes.len() {
            prop_assert!(decode_state(&bytes[..end]).is_err(), "prefix of {} bytes decoded", end);
        }
        let bytes = encode_op(&op);
        prop_assert_eq!(decode_op(&[]), Err(CrdtError::Truncated));
        for end in 0..bytes.len() {
            prop_assert!(decode_op(&bytes[..end]).is_err(), "prefix of {} bytes decoded", end);
        }
    }

    #[test]
    fn trailing_bytes_are_an_error(state in arbitrary::state(), op in arbitrary::op(), extra in vec(any::<u8>(), 1..8)) {
        let mut bytes = encode_state(&state);
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode_state(&bytes), Err(CrdtError::TrailingBytes(extra.len())));
        let mut bytes = encode_op(&op);
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode_op(&bytes), Err(CrdtError::TrailingBytes(extra.len())));
    }

    #[test]
    fn an_unknown_version_is_refused_before_anything_else(state in arbitrary::state(), op in arbitrary::op(), version in any::<u8>()) {
        prop_assume!(version != FORMAT_VERSION);
        let mut bytes = encode_state(&state);
        bytes[0] = version;
        prop_assert_eq!(decode_state(&bytes), Err(CrdtError::UnsupportedVersion(version)));
        let mut bytes = encode_op(&op);
        bytes[0] = version;
        prop_assert_eq!(decode_op(&bytes), Err(CrdtError::UnsupportedVersion(version)));
    }

    #[test]
    fn random_bytes_never_panic_and_never_decode_to_an_invalid_value(
        mut bytes in vec(any::<u8>(), 0..48),
        versioned in any::<bool>(),
    ) {
        if versioned && !bytes.is_empty() {
            bytes[0] = FORMAT_VERSION;
        }
        if let Ok(state) = decode_state(&bytes) {
            check_decoded(&state)?;
            prop_assert_eq!(encode_state(&state).len() <= bytes.len(), true);
        }
        if let Ok(op) = decode_op(&bytes) {
            check_decoded_op(&op)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn corrupted_encodings_never_panic_and_never_decode_to_an_invalid_value(
        state in arbitrary::state(),
        op in arbitrary::op(),
        mutations in vec(mutation(), 1..4),
    ) {
        let mut bytes = encode_state(&state);
        mutate(&mut bytes, &mutations);
        if let Ok(state) = decode_state(&bytes) {
            check_decoded(&state)?;
        }
        let mut bytes = encode_op(&op);
        mutate(&mut bytes, &mutations);
        if let Ok(op) = decode_op(&bytes) {
            check_decoded_op(&op)?;
        }
    }
}

/// The encoding of a one-element set `{element: {(1, 1)}}` with context `{1: 1}`, built byte
/// by byte so that the element text can be anything, canonical or not.
fn one_element_set(element: &str) -> Vec<u8> {
    assert!(element.len() < 128, "one-byte length prefix");
    let mut bytes = vec![FORMAT_VERSION, 3, 1, element.len() as u8];
    bytes.extend_from_slice(element.as_bytes());
    bytes.extend_from_slice(&[1, 1, 1, 1, 1, 1, 0]);
    bytes
}

#[test]
fn the_hand_built_set_encoding_matches_the_encoder() {
    let set = State::Set(OrSet::default().add(n(1), [e(r#"{"a":2,"b":1}"#)]));
    assert_eq!(one_element_set(r#"{"a":2,"b":1}"#), encode_state(&set));
    assert_eq!(decode_state(&one_element_set(r#"{"a":2,"b":1}"#)), Ok(set));
}

#[test]
fn non_canonical_json_inside_a_set_element_is_refused() {
    for text in [
        r#"{"b":1,"a":2}"#,
        r#"{"a":2, "b":1}"#,
        r#" {"a":2,"b":1}"#,
        r#"{"a":2,"a":2,"b":1}"#,
        "[1, 2]",
        "1e2",
        r#""\u0061""#,
        "not json",
        "",
        "[1,2",
    ] {
        let result = decode_state(&one_element_set(text));
        assert!(
            matches!(result, Err(CrdtError::Decode(_))),
            "{text:?} gave {result:?}"
        );
    }
    // The same element in canonical spelling is fine, and so is JSON text that happens to
    // contain spaces inside a string.
    for text in [r#"{"a":2,"b":1}"#, "[1,2]", "100", r#""a b""#, r#""a""#] {
        assert!(decode_state(&one_element_set(text)).is_ok(), "{text:?}");
    }
}

#[test]
fn non_canonical_json_inside_a_register_value_is_refused() {
    let node = n(1);
    let good = State::Register(LwwRegister::default().write(
        Stamp::new(5, node),
        Dot::new(node, 1),
        Some(e(r#"{"a":2,"b":1}"#)),
    ));
    let mut bytes = encode_state(&good);
    let at = bytes
        .windows(13)
        .position(|w| w == br#"{"a":2,"b":1}"#)
        .unwrap();
    bytes[at..at + 13].copy_from_slice(br#"{"b":1,"a":2}"#);
    assert!(matches!(decode_state(&bytes), Err(CrdtError::Decode(_))));
    let op = Op {
        dot: Dot::new(node, 1),
        stamp: Stamp::new(5, node),
        key: "k".into(),
        delta: good,
    };
    let mut bytes = encode_op(&op);
    let at = bytes
        .windows(13)
        .position(|w| w == br#"{"a":2,"b":1}"#)
        .unwrap();
    bytes[at..at + 13].copy_from_slice(br#"{"b":1,"a":2}"#);
    assert!(matches!(decode_op(&bytes), Err(CrdtError::Decode(_))));
}

/// A float canonical JSON used to get wrong: serde_json's default (not `float_roundtrip`)
/// parser read `1.0715660391465826e-75` one ULP low, so its canonical text re-parsed to yet
/// another float and the encoder's own output failed to decode.
#[test]
fn canonical_floats_are_a_fixed_point() {
    for text in [
        "1.0715660391465826e-75",
        "-1.81996730402717e-179",
        "2.2250738585072011e-308",
        "0.1",
    ] {
        let value = e(text);
        assert_eq!(e(value.as_str()), value, "{text}");
        let set = State::Set(OrSet::default().add(n(1), [value]));
        assert_eq!(decode_state(&encode_state(&set)), Ok(set), "{text}");
    }
}

#[test]
fn states_no_operation_creates_are_refused() {
    let invalid = |bytes: &[u8]| {
        let result = decode_state(bytes);
        assert!(
            matches!(result, Err(CrdtError::Invalid(_))),
            "{bytes:?} gave {result:?}"
        );
    };
    // A G-Counter with a decrement (node 1: inc 5, dec 1).
    invalid(&[FORMAT_VERSION, 2, 1, 1, 5, 1, 0]);
    // A set element with a dot its context does not hold: {1: {(1, 2)}}, context {1: 1}.
    invalid(&[FORMAT_VERSION, 3, 1, 1, b'1', 1, 1, 2, 1, 1, 1, 0]);
    // A set element without dots.
    invalid(&[FORMAT_VERSION, 3, 1, 1, b'1', 0, 1, 1, 1, 0]);
    // Non-canonical forms no operation stores, each of which made `bottom ⊔ s ≠ s` or
    // `s ⊔ s ≠ s` before decoding refused them:
    // a PN-Counter with a zero entry in its totals, or in its reset record;
    invalid(&[FORMAT_VERSION, 1, 1, 1, 0, 0, 0]);
    invalid(&[FORMAT_VERSION, 1, 0, 1, 1, 0, 0]);
    // a G-Counter with a zero entry;
    invalid(&[FORMAT_VERSION, 2, 1, 7, 0, 0, 0]);
    // a set context with a zero version-vector entry;
    invalid(&[FORMAT_VERSION, 3, 0, 1, 1, 0, 0]);
    // a context whose cloud holds a dot the vector covers, or the vector's next dot;
    invalid(&[FORMAT_VERSION, 3, 0, 1, 1, 2, 1, 1, 1]);
    invalid(&[FORMAT_VERSION, 3, 0, 0, 1, 1, 1]);
    // a cloud dot, or an element dot, with sequence 0.
    invalid(&[FORMAT_VERSION, 3, 0, 0, 1, 1, 0]);
    invalid(&[FORMAT_VERSION, 3, 1, 1, b'1', 1, 1, 0, 0, 0]);
    // A context with a real gap is canonical: the cloud holds what arrived out of order.
    let gap = decode_state(&[FORMAT_VERSION, 3, 0, 1, 1, 1, 1, 1, 3]).unwrap();
    let State::Set(gap) = gap else {
        panic!("not a set")
    };
    assert_eq!(gap.context().cloud_len(), 1);
    // ... and the same as the delta of an op.
    let op = Op {
        dot: Dot::new(n(1), 1),
        stamp: Stamp::new(1, n(1)),
        key: "k".into(),
        delta: State::GCounter(GCounter::default()),
    };
    let mut bytes = encode_op(&op);
    let tail = bytes.len() - 2;
    bytes.truncate(tail);
    bytes.extend_from_slice(&[1, 1, 5, 1, 0]);
    assert!(matches!(decode_op(&bytes), Err(CrdtError::Invalid(_))));
}

#[test]
fn bottom_states_encode_in_a_few_bytes() {
    for (state, len) in [
        (State::Register(LwwRegister::default()), 3),
        (State::Counter(PnCounter::default()), 4),
        (State::GCounter(GCounter::default()), 4),
        (State::Set(OrSet::default()), 5),
    ] {
        assert_eq!(encode_state(&state).len(), len, "{state:?}");
        assert!(decode_state(&encode_state(&state)).unwrap().is_bottom());
    }
    let counter = State::Counter(PnCounter::default());
    let merged = state_join(&counter, &counter);
    assert!(merged.is_bottom());
    assert!(Crdt::is_bottom(&OrSet::default()));
}

/// Sequences at the very top of `u64` come only from corrupted or hostile bytes, but states
/// that pass decoding must still merge without arithmetic overflow, in debug builds too.
#[test]
fn decoded_states_with_extreme_sequences_merge_without_overflow() {
    // Context {1: u64::MAX}, no entries.
    let mut top = vec![FORMAT_VERSION, 3, 0, 1, 1];
    top.extend_from_slice(&[
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0,
    ]);
    let top = decode_state(&top).unwrap();
    // Context with a cloud {(1, 3)}.
    let gap = decode_state(&[FORMAT_VERSION, 3, 0, 1, 1, 1, 1, 1, 3]).unwrap();
    let (ab, ba) = (state_join(&top, &gap), state_join(&gap, &top));
    assert_eq!(ab, ba);
    assert_eq!(ab, top, "the top of the vector covers the cloud dot");
    check_decoded(&ab).unwrap();
}

proptest! {
    /// The canonical text is serde_json's compact printing of the document, and canonicalising
    /// it again changes nothing.
    #[test]
    fn canonical_text_is_compact_printing_and_a_fixed_point(json in arbitrary::json()) {
        let value = json.to_value();
        prop_assert_eq!(json.as_str(), value.to_string());
        prop_assert_eq!(CanonicalJson::new(&value), json.clone());
        prop_assert_eq!(CanonicalJson::parse(json.as_str()).unwrap(), json);
    }
}

/// A set whose length prefix claims more elements than any memory holds: an error, found when
/// the bytes run out, not an allocation the size of the claim (which would abort the node).
#[test]
fn a_set_claiming_a_huge_length_is_refused_without_allocating_for_it() {
    for claimed in [u64::from(u32::MAX), 1 << 40, (1 << 62) - 1] {
        let mut bytes = vec![FORMAT_VERSION, 3];
        let mut rest = claimed;
        while rest >= 0x80 {
            bytes.push((rest as u8) | 0x80);
            rest >>= 7;
        }
        bytes.push(rest as u8);
        bytes.extend_from_slice(&one_element_set(r#""x""#)[3..]);
        assert!(decode_state(&bytes).is_err(), "{claimed}");
    }
}
