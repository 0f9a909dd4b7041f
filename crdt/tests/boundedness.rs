//! The OR-Set keeps no tombstones: however many times an element is added and removed, the
//! encoded state stays within a small constant of the state after one add.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{e, n};
use meridian_crdt::codec::encode_state;
use meridian_crdt::{Crdt, OrSet, State};

const CYCLES: usize = 10_000;
const SLACK: usize = 32;

fn size(set: &OrSet) -> usize {
    encode_state(&State::Set(set.clone())).len()
}

/// The encoded size of a fresh set after one add of `x` by node 1.
fn one_add_size() -> usize {
    let set = OrSet::default();
    size(&set.add(n(1), [e(r#""x""#)]))
}

#[test]
fn ten_thousand_add_remove_cycles_on_one_replica_stay_bounded() {
    let x = e(r#""x""#);
    let bound = one_add_size() + SLACK;
    let mut set = OrSet::default();
    for cycle in 0..CYCLES {
        set.apply(&set.add(n(1), [x.clone()]));
        assert!(set.contains(&x));
        assert!(
            size(&set) <= bound,
            "cycle {cycle}: {} bytes after the add",
            size(&set)
        );
        set.apply(&set.remove([&x]));
        assert!(!set.contains(&x));
        assert!(
            size(&set) <= bound,
            "cycle {cycle}: {} bytes after the remove",
            size(&set)
        );
    }
    assert_eq!(set.context().cloud_len(), 0);
    assert_eq!(set.context().version_vector().get(n(1)), CYCLES as u64);
}

#[test]
fn cycles_through_update_and_clear_stay_bounded_too() {
    let (x, y) = (e(r#""x""#), e(r#"{"y":[1,2]}"#));
    let mut set = OrSet::default();
    set.apply(&set.add(n(1), [x.clone(), y.clone()]));
    let bound = size(&set) + SLACK;
    for cycle in 0..CYCLES {
        let delta = match cycle % 3 {
            0 => set.update(n(1), [x.clone()], [&y]),
            1 => set.update(n(1), [y.clone()], [&x]),
            _ => set.clear(),
        };
        set.apply(&delta);
        set.apply(&set.add(n(1), [x.clone(), y.clone()]));
        assert_eq!(set.len(), 2);
        assert!(size(&set) <= bound, "cycle {cycle}: {} bytes", size(&set));
    }
}

/// Three replicas each run add/remove cycles of the same element, concurrently: their deltas
/// reach the others late and out of order, and anti-entropy merges whole states now and then.
/// Whenever the network has drained, every replica is equal and within the bound.
#[test]
fn interleaved_cycles_on_three_replicas_stay_bounded() {
    let x = e(r#""x""#);
    let nodes = [n(1), n(2), n(3)];
    let bound = one_add_size() + SLACK;
    let mut replicas = vec![OrSet::default(); 3];
    let mut in_flight: Vec<(usize, OrSet)> = Vec::new();
    let broadcast = |in_flight: &mut Vec<(usize, OrSet)>, from: usize, delta: &OrSet| {
        in_flight.extend(
            (0..3)
                .filter(|&to| to != from)
                .map(|to| (to, delta.clone())),
        );
    };
    let mut checked = 0;
    for round in 0..CYCLES {
        let r = round % 3;
        let add = replicas[r].add(nodes[r], [x.clone()]);
        replicas[r].apply(&add);
        broadcast(&mut in_flight, r, &add);
        if round % 5 == 0 {
            // A partial, newest-first delivery: removes overtake the adds they observed.
            for (to, delta) in in_flight.drain(in_flight.len() / 2..).rev() {
                replicas[to].apply(&delta);
            }
        }
        let remove = replicas[r].remove([&x]);
        replicas[r].apply(&remove);
        broadcast(&mut in_flight, r, &remove);
        if round % 7 == 3 {
            let theirs = replicas[(r + 1) % 3].clone();
            replicas[r].merge(&theirs);
        }
        if round % 97 == 96 || round == CYCLES - 1 {
            for (to, delta) in in_flight.drain(..).rev() {
                replicas[to].apply(&delta);
            }
            for replica in &replicas {
                assert_eq!(replica, &replicas[0], "round {round}: replicas diverged");
                assert_eq!(replica.context().cloud_len(), 0);
                assert!(
                    size(replica) <= bound,
                    "round {round}: {} bytes",
                    size(replica)
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100);
    // Each replica's last remove saw its own last add, so at most the concurrent adds of the
    // others survive; either way the whole history costs one context entry per node.
    assert_eq!(replicas[0].context().version_vector().len(), 3);
}
