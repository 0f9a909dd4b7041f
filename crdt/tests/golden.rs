//! Golden vectors: the exact bytes of hand-built states and ops, frozen at format version 1.
//! An accidental change to the encoding (a reordered field, a renamed variant, a serde
//! attribute, a different integer encoding) fails here before it can reach a disk or a peer.
//! A deliberate change needs a new format version and a decoder for version 1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write;

use common::{e, n};
use meridian_crdt::codec::{FORMAT_VERSION, decode_op, decode_state, encode_op, encode_state};
use meridian_crdt::{Crdt, Dot, GCounter, Kind, LwwRegister, Op, OrSet, PnCounter, Stamp, State};

/// An HLC reading in mid-2025.
const TIME: u64 = 0x684C_0000_0000_0001;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        write!(out, "{b:02x}").unwrap();
        out
    })
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn register_value() -> State {
    let r = LwwRegister::default();
    State::Register(r.write(
        Stamp::new(TIME, n(2)),
        Dot::new(n(2), 7),
        Some(e(r#"{"b":[1,"x"],"a":null}"#)),
    ))
}

fn register_tombstone() -> State {
    let r = LwwRegister::default();
    State::Register(r.write(Stamp::new(300, n(300)), Dot::new(n(300), 128), None))
}

/// Node 1 adds 5, node 2 subtracts 3, node 1 resets what it saw, then adds 2: value 2.
fn pn_counter() -> State {
    let mut c = PnCounter::default();
    c.apply(&c.increment(n(1), 5).unwrap());
    c.apply(&c.increment(n(2), -3).unwrap());
    c.apply(&c.reset());
    c.apply(&c.increment(n(1), 2).unwrap());
    assert_eq!(c.value(), 2);
    State::Counter(c)
}

/// Node 1 adds 1, node 65537 adds 300: value 301.
fn g_counter() -> State {
    let mut c = GCounter::default();
    c.apply(&c.increment(n(1), 1).unwrap());
    c.apply(&c.increment(n(65_537), 300).unwrap());
    assert_eq!(c.value(), 301);
    State::GCounter(c)
}

/// Node 1 adds "milk" and {"b":1,"a":2}, removes "milk", node 2 adds 1.5.
fn or_set() -> State {
    let mut s = OrSet::default();
    s.apply(&s.add(n(1), [e(r#""milk""#), e(r#"{"b":1,"a":2}"#)]));
    s.apply(&s.remove([&e(r#""milk""#)]));
    s.apply(&s.add(n(2), [e("1.5")]));
    State::Set(s)
}

/// A replica that got node 1's third add before its first two: a context with a cloud.
fn or_set_out_of_order() -> State {
    let mut origin = OrSet::default();
    let mut deltas = Vec::new();
    for element in ["1", "2", "3"] {
        let delta = origin.add(n(1), [e(element)]);
        origin.apply(&delta);
        deltas.push(delta);
    }
    let mut late = OrSet::default();
    late.apply(&deltas[2]);
    assert_eq!(late.context().cloud_len(), 1);
    State::Set(late)
}

fn set_op() -> Op {
    let s = OrSet::default();
    Op {
        dot: Dot::new(n(1), 42),
        stamp: Stamp::new(TIME, n(1)),
        key: "cart:42".into(),
        delta: State::Set(s.update(n(1), [e(r#""tea""#)], [])),
    }
}

fn counter_op() -> Op {
    Op {
        dot: Dot::new(n(3), 1),
        stamp: Stamp::new(TIME + 1, n(3)),
        key: "visits".into(),
        delta: State::Counter(PnCounter::default().increment(n(3), -1).unwrap()),
    }
}

/// Frozen encodings, annotated: `01` is the format version; integers are LEB128 varints;
/// enums start with their variant index; maps, sets and strings with their length.
/// (name, how to build it, frozen hex with `_` between fields)
type Vector<T> = (&'static str, fn() -> T, &'static str);

const STATES: &[Vector<State>] = &[
    (
        "empty register",
        || State::bottom(Kind::Register),
        "01_00_00",
    ),
    (
        "empty counter",
        || State::bottom(Kind::Counter),
        "01_01_00_00",
    ),
    (
        "empty g-counter",
        || State::bottom(Kind::GCounter),
        "01_02_00_00",
    ),
    ("empty set", || State::bottom(Kind::Set), "01_03_00_00_00"),
    (
        // Register, Some, time (9-byte varint), node 2, dot (2, 7), Some, 22 bytes of JSON.
        "register with a value",
        register_value,
        "01_00_01_81808080808080a668_02_02_07_01_16_7b2261223a6e756c6c2c2262223a5b312c2278225d7d",
    ),
    (
        "register tombstone",
        register_tombstone,
        "01_00_01_ac02_ac02_ac02_8001_00",
    ),
    (
        // Totals {1: (7, 0), 2: (0, 3)}, reset record {1: (5, 0), 2: (0, 3)}.
        "pn-counter with a reset",
        pn_counter,
        "01_01_02_01_07_00_02_00_03_02_01_05_00_02_00_03",
    ),
    (
        "g-counter",
        g_counter,
        "01_02_02_01_01_00_818004_ac02_00_00",
    ),
    (
        // Entries {"1.5": {(2, 1)}, {"a":2,"b":1}: {(1, 2)}}, context {1: 2, 2: 1}, no cloud.
        "set after a remove",
        or_set,
        "01_03_02_03312e35_01_02_01_0d7b2261223a322c2262223a317d_01_01_02_02_01_02_02_01_00",
    ),
    // Entries {3: {(1, 3)}}, empty vector, cloud {(1, 3)}.
    (
        "set with a cloud",
        or_set_out_of_order,
        "01_03_01_0133_01_01_03_00_01_01_03",
    ),
];

const OPS: &[Vector<Op>] = &[
    (
        // Dot (1, 42), stamp (time, 1), key "cart:42", Set delta {"tea": {(1, 1)}} / {1: 1}.
        "set add op",
        set_op,
        "01_012a_81808080808080a668_01_07636172743a3432_03_01_05227465612201_01_01_01_01_01_00",
    ),
    (
        "counter decrement op",
        counter_op,
        "01_0301_82808080808080a668_03_06766973697473_01_01_03_00_01_00",
    ),
];

fn unhex_annotated(text: &str) -> Vec<u8> {
    unhex(&text.replace('_', ""))
}

#[test]
fn states_encode_to_the_frozen_bytes() {
    for (name, state, frozen) in STATES {
        assert_eq!(
            hex(&encode_state(&state())),
            frozen.replace('_', ""),
            "{name}"
        );
    }
}

#[test]
fn frozen_state_bytes_decode_to_the_same_states() {
    for (name, state, frozen) in STATES {
        let bytes = unhex_annotated(frozen);
        assert_eq!(bytes[0], FORMAT_VERSION, "{name}");
        assert_eq!(decode_state(&bytes), Ok(state()), "{name}");
    }
}

#[test]
fn ops_encode_to_the_frozen_bytes_and_back() {
    for (name, op, frozen) in OPS {
        assert_eq!(hex(&encode_op(&op())), frozen.replace('_', ""), "{name}");
        assert_eq!(decode_op(&unhex_annotated(frozen)), Ok(op()), "{name}");
    }
}

#[test]
fn frozen_bytes_still_mean_the_same_values() {
    let State::Counter(counter) = decode_state(&unhex_annotated(STATES[6].2)).unwrap() else {
        panic!("not a counter")
    };
    assert_eq!(counter.value(), 2);
    let State::GCounter(counter) = decode_state(&unhex_annotated(STATES[7].2)).unwrap() else {
        panic!("not a g-counter")
    };
    assert_eq!(counter.value(), 301);
    let State::Set(set) = decode_state(&unhex_annotated(STATES[8].2)).unwrap() else {
        panic!("not a set")
    };
    assert_eq!(
        set.elements().cloned().collect::<Vec<_>>(),
        [e("1.5"), e(r#"{"a":2,"b":1}"#)]
    );
    let State::Register(register) = decode_state(&unhex_annotated(STATES[4].2)).unwrap() else {
        panic!("not a register")
    };
    assert_eq!(register.value(), Some(&e(r#"{"a":null,"b":[1,"x"]}"#)));
    assert_eq!(register.entry().unwrap().stamp, Stamp::new(TIME, n(2)));
}

/// Kind tags order storage keys and collection names are URLs: both are part of the format.
#[test]
fn kind_tags_and_collection_names_are_frozen() {
    let frozen = [
        (Kind::Register, 1, "registers"),
        (Kind::Counter, 2, "counters"),
        (Kind::GCounter, 3, "gcounters"),
        (Kind::Set, 4, "sets"),
    ];
    assert_eq!(Kind::ALL.len(), frozen.len());
    for (kind, tag, collection) in frozen {
        assert_eq!((kind.tag(), kind.collection()), (tag, collection));
        assert_eq!(Kind::from_tag(tag), Some(kind));
    }
    assert_eq!(Kind::from_tag(0), None);
    assert_eq!(Kind::from_tag(5), None);
}
