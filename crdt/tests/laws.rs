//! The laws the `Crdt` trait documents, checked on states reachable by real operations.
//!
//! For every type (and for the `State` enum that wraps them): merge is commutative,
//! associative and idempotent with `Default` as identity, `apply` is `merge`, and applying the
//! deltas of a history in any order, any number of times, lands on the join of the replicas'
//! states, however those replicas got there (local applies, late deliveries, anti-entropy).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{join, join_all, shuffle};
use meridian_crdt::arbitrary::{self, History, Shape, Simulate};
use meridian_crdt::{Crdt, CrdtError, GCounter, Kind, LwwRegister, OrSet, PnCounter, State};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

fn check_laws<T: Crdt>(a: &T, b: &T, c: &T) -> Result<(), TestCaseError> {
    let bottom = T::default();
    prop_assert_eq!(join(a, b), join(b, a), "merge is not commutative");
    prop_assert_eq!(
        join(&join(a, b), c),
        join(a, &join(b, c)),
        "merge is not associative"
    );
    prop_assert_eq!(&join(a, a), a, "merge is not idempotent");
    prop_assert_eq!(&join(a, &bottom), a, "bottom is not a right identity");
    prop_assert_eq!(&join(&bottom, a), a, "bottom is not a left identity");
    prop_assert!(bottom.is_bottom());
    let ab = join(a, b);
    prop_assert_eq!(
        &join(&ab, a),
        &ab,
        "the join is not an upper bound of its inputs"
    );
    prop_assert_eq!(
        &join(&ab, b),
        &ab,
        "the join is not an upper bound of its inputs"
    );
    let mut applied = a.clone();
    applied.apply(b);
    prop_assert_eq!(&applied, &ab, "apply is not merge");
    Ok(())
}

/// Applies every delta of the history (plus duplicates) in a shuffled order to bottom, and
/// compares with the join of the replicas' states and with every replica that, after the
/// history, receives the whole shuffled stream too.
fn check_deltas<T: Simulate>(
    history: &History<T::Action>,
    extra: &[Index],
    picks: &[Index],
) -> Result<(), TestCaseError> {
    let played = history.play::<T>();
    let merged: T = join_all(&played.replicas);
    let count = played.ops.len();
    let mut order: Vec<usize> = (0..count).collect();
    if count > 0 {
        order.extend(extra.iter().map(|pick| pick.index(count)));
    }
    shuffle(&mut order, picks);
    let mut replayed = T::default();
    for &i in &order {
        replayed.apply(&played.ops[i].delta);
    }
    prop_assert_eq!(
        &replayed,
        &merged,
        "deltas in order {:?} differ from merged states",
        order
    );
    for replica in &played.replicas {
        let mut caught_up = replica.clone();
        for &i in &order {
            caught_up.apply(&played.ops[i].delta);
        }
        prop_assert_eq!(&caught_up, &merged);
    }
    Ok(())
}

fn state_join(a: &State, b: &State) -> State {
    let mut out = a.clone();
    out.merge(b).expect("same kind");
    out
}

fn check_state_laws(a: &State, b: &State, c: &State) -> Result<(), TestCaseError> {
    let bottom = State::bottom(a.kind());
    prop_assert_eq!(state_join(a, b), state_join(b, a));
    prop_assert_eq!(
        state_join(&state_join(a, b), c),
        state_join(a, &state_join(b, c))
    );
    prop_assert_eq!(&state_join(a, a), a);
    prop_assert_eq!(&state_join(a, &bottom), a);
    prop_assert_eq!(&state_join(&bottom, a), a);
    prop_assert!(bottom.is_bottom());
    Ok(())
}

/// The delta law through the `State` enum: ops' deltas, wrapped, in any order.
fn check_state_deltas<T: Simulate>(
    history: &History<T::Action>,
    picks: &[Index],
) -> Result<(), TestCaseError> {
    let played = history.play::<T>();
    let merged = join_all::<T>(&played.replicas).into_state();
    let mut deltas: Vec<State> = played.ops.iter().map(|g| g.to_op("k").delta).collect();
    let duplicates = deltas.clone();
    deltas.extend(duplicates);
    shuffle(&mut deltas, picks);
    let mut replayed = State::bottom(merged.kind());
    for delta in &deltas {
        replayed.merge(delta).expect("same kind");
    }
    prop_assert_eq!(replayed, merged);
    Ok(())
}

macro_rules! laws {
    ($name:ident, $ty:ty) => {
        mod $name {
            use super::*;

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(192))]

                #[test]
                fn merge_is_a_join(states in arbitrary::states_of::<$ty>(3)) {
                    check_laws(&states[0], &states[1], &states[2])?;
                }

                #[test]
                fn deltas_in_any_order_with_duplicates_equal_merged_states(
                    history in arbitrary::history::<$ty>(Shape::default()),
                    extra in vec(any::<Index>(), 0..12),
                    picks in vec(any::<Index>(), 1..64),
                ) {
                    check_deltas::<$ty>(&history, &extra, &picks)?;
                }

                #[test]
                fn the_state_enum_obeys_the_same_laws(states in arbitrary::states_of::<$ty>(3)) {
                    let [a, b, c] = <[$ty; 3]>::try_from(states).unwrap().map(Simulate::into_state);
                    check_state_laws(&a, &b, &c)?;
                }

                #[test]
                fn the_state_enum_applies_deltas_in_any_order(
                    history in arbitrary::history::<$ty>(Shape::default()),
                    picks in vec(any::<Index>(), 1..64),
                ) {
                    check_state_deltas::<$ty>(&history, &picks)?;
                }
            }
        }
    };
}

laws!(lww_register, LwwRegister);
laws!(pn_counter, PnCounter);
laws!(g_counter, GCounter);
laws!(or_set, OrSet);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn states_of_any_kind_form_a_join_semilattice(states in arbitrary::states_of_one_kind(3)) {
        check_state_laws(&states[0], &states[1], &states[2])?;
    }

    #[test]
    fn states_of_different_kinds_never_merge(a in arbitrary::state(), b in arbitrary::state()) {
        let mut merged = a.clone();
        let result = merged.merge(&b);
        if a.kind() == b.kind() {
            prop_assert_eq!(result, Ok(()));
        } else {
            prop_assert_eq!(result, Err(CrdtError::KindMismatch));
            prop_assert_eq!(merged, a, "a refused merge must leave the state alone");
        }
    }
}

#[test]
fn bottom_of_every_kind_is_bottom_and_of_that_kind() {
    for kind in Kind::ALL {
        let bottom = State::bottom(kind);
        assert_eq!(bottom.kind(), kind);
        assert!(bottom.is_bottom());
        assert_eq!(Kind::from_tag(kind.tag()), Some(kind));
        assert_eq!(kind.collection().parse::<Kind>(), Ok(kind));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// An OR-Set merge finds removed dots by listing a small context's dots, and checks every
    /// element against a large one: both ways, and the default, reach the same state. For
    /// states of one history, and of two unrelated ones, whose dots may collide (one dot, two
    /// elements: no node mints that, but merges must still agree on it).
    #[test]
    fn or_set_merge_lists_removed_dots_as_the_element_check_finds_them(
        related in arbitrary::states_of::<OrSet>(2),
        unrelated in (arbitrary::or_set(), arbitrary::or_set()),
    ) {
        for (a, b) in [(&related[0], &related[1]), (&unrelated.0, &unrelated.1)] {
            let mut checked = a.clone();
            checked.merge_with_listing_limit(b, 0);
            let mut listed = a.clone();
            listed.merge_with_listing_limit(b, usize::MAX);
            prop_assert_eq!(&listed, &checked);
            let mut default = a.clone();
            default.merge(b);
            prop_assert_eq!(&default, &checked);
        }
    }
}
