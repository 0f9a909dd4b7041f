//! The generators behind every property test must produce the hard cases, or those tests
//! would pass vacuously: this samples them and checks that they do, and that the simulated
//! cluster behaves like a real one (unique stamps, contiguous dots, HLC causality).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use meridian_crdt::arbitrary::{
    self, CounterAction, Event, History, SetAction, Shape, Step, replica_node,
};
use meridian_crdt::{Crdt, Kind, LwwRegister, OrSet, PnCounter};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

const SAMPLES: usize = 300;

fn sample<S: Strategy>(strategy: &S, count: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..count)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

fn busy() -> Shape {
    Shape {
        replicas: 3..=5,
        events: 20..=60,
        syncs: true,
    }
}

/// Counts how many of `histories` satisfy `test`, and asserts it is at least `at_least`.
fn at_least<A>(
    histories: &[History<A>],
    at_least: usize,
    what: &str,
    test: impl Fn(&History<A>) -> bool,
) {
    let count = histories.iter().filter(|h| test(h)).count();
    assert!(
        count >= at_least,
        "only {count} of {} histories had {what}",
        histories.len()
    );
}

#[test]
fn simulated_clusters_behave_like_real_ones() {
    for history in sample(&arbitrary::history::<LwwRegister>(busy()), SAMPLES) {
        let played = history.play::<LwwRegister>();
        // Per node: contiguous dots from 1, strictly increasing stamps.
        let mut last: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        for op in &played.ops {
            assert_eq!(op.dot.node, replica_node(op.replica));
            assert_eq!(op.stamp.node, replica_node(op.replica));
            let (seq, time) = last.get(&op.replica).copied().unwrap_or((0, 0));
            assert_eq!(op.dot.seq, seq + 1);
            assert!(op.stamp.time > time);
            last.insert(op.replica, (op.dot.seq, op.stamp.time));
        }
        // HLC causality: an op's stamp exceeds every stamp its replica had received.
        let mut seen = vec![0u64; history.replicas()];
        for step in &played.log {
            match *step {
                Step::Made { replica, op } => {
                    assert!(played.ops[op].stamp.time > seen[replica]);
                    seen[replica] = played.ops[op].stamp.time;
                }
                Step::Received { to, op } => seen[to] = seen[to].max(played.ops[op].stamp.time),
                Step::Synced { from, to } => seen[to] = seen[to].max(seen[from]),
            }
        }
    }
}

#[test]
fn histories_exercise_the_network() {
    let histories = sample(&arbitrary::history::<PnCounter>(busy()), SAMPLES);
    at_least(&histories, SAMPLES / 2, "a duplicated delivery", |h| {
        h.events.iter().any(|e| {
            matches!(
                e,
                Event::Deliver {
                    duplicate: true,
                    ..
                }
            )
        })
    });
    at_least(
        &histories,
        SAMPLES / 2,
        "deltas still in flight at the end",
        |h| !h.play::<PnCounter>().in_flight.is_empty(),
    );
    at_least(&histories, SAMPLES / 2, "anti-entropy", |h| {
        h.play::<PnCounter>()
            .log
            .iter()
            .any(|s| matches!(s, Step::Synced { .. }))
    });
    assert!(
        histories.iter().any(|h| h.replicas() == 3) && histories.iter().any(|h| h.replicas() == 5)
    );
}

#[test]
fn set_histories_reach_the_hard_cases() {
    let histories = sample(&arbitrary::history::<OrSet>(busy()), SAMPLES);
    at_least(&histories, SAMPLES / 10, "a context with a cloud", |h| {
        h.play::<OrSet>()
            .states
            .iter()
            .any(|s| s.context().cloud_len() > 0)
    });
    at_least(&histories, SAMPLES / 2, "a set of several elements", |h| {
        h.play::<OrSet>().states.iter().any(|s| s.len() >= 3)
    });
    at_least(
        &histories,
        SAMPLES / 2,
        "a remove that removed something",
        |h| {
            let played = h.play::<OrSet>();
            played
                .ops
                .iter()
                .any(|op| matches!(op.action, SetAction::Remove(_)) && !op.delta.is_bottom())
        },
    );
    // Add-wins at work: after everything arrived, an element survives that some remove saw.
    at_least(
        &histories,
        SAMPLES / 10,
        "an add that won over a concurrent remove",
        |h| {
            let mut played = h.play::<OrSet>();
            let removed: BTreeSet<_> = played
                .ops
                .iter()
                .filter(|op| !op.delta.is_bottom())
                .filter_map(|op| match &op.action {
                    SetAction::Remove(elements) => Some(elements.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            played.flush(&[]);
            played.replicas[0]
                .elements()
                .any(|element| removed.contains(element))
        },
    );
}

#[test]
fn register_histories_tie_on_physical_time() {
    let histories = sample(&arbitrary::history::<LwwRegister>(busy()), SAMPLES);
    at_least(
        &histories,
        SAMPLES / 4,
        "two writes at one time on two nodes",
        |h| {
            let played = h.play::<LwwRegister>();
            let mut times = BTreeMap::new();
            played.ops.iter().any(|op| {
                times
                    .insert(op.stamp.time, op.stamp.node)
                    .is_some_and(|n| n != op.stamp.node)
            })
        },
    );
    at_least(&histories, SAMPLES / 4, "a delete", |h| {
        h.events
            .iter()
            .any(|e| matches!(e, Event::Act { action, .. } if action.value.is_none()))
    });
}

#[test]
fn counter_histories_reset_and_keep_concurrent_increments() {
    let histories = sample(&arbitrary::history::<PnCounter>(busy()), SAMPLES);
    at_least(
        &histories,
        SAMPLES / 3,
        "a reset that removed something",
        |h| {
            let mut played = h.play::<PnCounter>();
            played.flush(&[]);
            let sum: i64 = played
                .ops
                .iter()
                .filter_map(|op| match op.action {
                    CounterAction::Increment(by) => Some(by),
                    CounterAction::Reset => None,
                })
                .sum();
            played.replicas[0].value() != sum
        },
    );
    at_least(
        &histories,
        SAMPLES / 10,
        "an increment that survived a later reset",
        |h| {
            let mut played = h.play::<PnCounter>();
            played.flush(&[]);
            let last_reset = played
                .ops
                .iter()
                .rposition(|op| op.action == CounterAction::Reset);
            last_reset.is_some_and(|i| played.ops[..i].iter().any(|op| op.delta.value() != 0))
                && played.replicas[0].value() != 0
        },
    );
}

#[test]
fn state_and_op_strategies_cover_every_kind() {
    let kinds: BTreeSet<Kind> = sample(&arbitrary::state(), 200)
        .iter()
        .map(meridian_crdt::State::kind)
        .collect();
    assert_eq!(kinds.len(), 4);
    let kinds: BTreeSet<Kind> = sample(&arbitrary::op(), 200)
        .iter()
        .map(meridian_crdt::Op::kind)
        .collect();
    assert_eq!(kinds.len(), 4);
    let same = sample(&arbitrary::states_of_one_kind(3), 100);
    assert!(
        same.iter()
            .all(|states| states.iter().all(|s| s.kind() == states[0].kind()))
    );
    let non_bottom = sample(&arbitrary::or_set(), 200)
        .iter()
        .filter(|s| !s.is_bottom())
        .count();
    assert!(non_bottom > 100, "{non_bottom}");
    let counters = sample(&arbitrary::pn_counter(), 200);
    assert!(counters.iter().filter(|c| c.value() != 0).count() > 50);
}
