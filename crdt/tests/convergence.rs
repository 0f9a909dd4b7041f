//! Strong eventual consistency: 3 to 5 replicas serve random requests, generating each delta
//! from their own current state; the network delivers deltas to every other replica in a
//! random interleaving, duplicating some; once everything has arrived, all replicas are equal,
//! equal to the join of all deltas, and deaf to any further duplicate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use meridian_crdt::arbitrary::{self, History, Shape, Simulate, Step};
use meridian_crdt::codec::{decode_op, decode_state, encode_op, encode_state};
use meridian_crdt::{GCounter, LwwRegister, OrSet, PnCounter, State};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

fn shape(syncs: bool) -> Shape {
    Shape {
        replicas: 3..=5,
        events: 0..=80,
        syncs,
    }
}

fn check_convergence<T: Simulate>(
    history: &History<T::Action>,
    picks: &[Index],
) -> Result<(), TestCaseError> {
    let mut played = history.play::<T>();
    played.flush(picks);
    prop_assert!(played.in_flight.is_empty());
    let all = played.joined();
    for (i, replica) in played.replicas.iter().enumerate() {
        prop_assert_eq!(replica, &all, "replica {} did not converge", i);
    }
    for replica in &played.replicas {
        let mut again = replica.clone();
        for generated in played.ops.iter().rev() {
            again.apply(&generated.delta);
        }
        prop_assert_eq!(
            &again,
            &all,
            "a duplicate delivery changed a converged replica"
        );
    }
    Ok(())
}

/// Replays what happened in `history` on `State` replicas, shipping every op and every
/// anti-entropy state through the binary codec as the server does, and compares each step
/// with the typed replicas.
fn check_through_codec<T: Simulate>(
    history: &History<T::Action>,
    picks: &[Index],
) -> Result<(), TestCaseError> {
    let mut played = history.play::<T>();
    played.flush(picks);
    let kind = T::default().into_state().kind();
    let mut replicas = vec![State::bottom(kind); played.replicas.len()];
    for step in &played.log {
        match *step {
            Step::Made { replica, op } => {
                let op = played.ops[op].to_op("key");
                replicas[replica].merge(&op.delta).unwrap();
            }
            Step::Received { to, op } => {
                let shipped = decode_op(&encode_op(&played.ops[op].to_op("key"))).unwrap();
                replicas[to].merge(&shipped.delta).unwrap();
            }
            Step::Synced { from, to } => {
                let shipped = decode_state(&encode_state(&replicas[from])).unwrap();
                replicas[to].merge(&shipped).unwrap();
            }
        }
    }
    let typed: Vec<State> = played
        .replicas
        .into_iter()
        .map(Simulate::into_state)
        .collect();
    prop_assert_eq!(replicas, typed);
    Ok(())
}

macro_rules! convergence {
    ($name:ident, $ty:ty) => {
        mod $name {
            use super::*;

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(128))]

                #[test]
                fn replicas_converge_under_random_delta_delivery(
                    history in arbitrary::history::<$ty>(shape(false)),
                    picks in vec(any::<Index>(), 1..64),
                ) {
                    check_convergence::<$ty>(&history, &picks)?;
                }

                #[test]
                fn replicas_converge_with_anti_entropy_too(
                    history in arbitrary::history::<$ty>(shape(true)),
                    picks in vec(any::<Index>(), 1..64),
                ) {
                    check_convergence::<$ty>(&history, &picks)?;
                }

                #[test]
                fn shipping_through_the_codec_changes_nothing(
                    history in arbitrary::history::<$ty>(shape(true)),
                    picks in vec(any::<Index>(), 1..64),
                ) {
                    check_through_codec::<$ty>(&history, &picks)?;
                }
            }
        }
    };
}

convergence!(lww_register, LwwRegister);
convergence!(pn_counter, PnCounter);
convergence!(g_counter, GCounter);
convergence!(or_set, OrSet);
