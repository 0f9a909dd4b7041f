//! Differential tests against an independent implementation: rust-crdt (`crdts` 7.3), whose
//! G-Counter, PN-Counter and ORSWOT are the oracle. Both sides run the same random requests on
//! the same replicas with the same random whole-state merges, and must read the same value or
//! element set on every replica after every step. Internal metadata is not compared: the two
//! libraries track causality differently (per-key dots and a compacted context here, per-actor
//! clocks and deferred removes there).
//!
//! Our counters' observed reset has no equivalent in `crdts`, so only increments are compared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use crdts::{CmRDT, CvRDT, Orswot};
use meridian_crdt::arbitrary::replica_node;
use meridian_crdt::{CanonicalJson, Crdt, GCounter, NodeId, OrSet, PnCounter};
use proptest::collection::vec;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    /// Counters: `replica` adds `by` (negative subtracts; G-Counters use the magnitude).
    Count { replica: usize, by: i64 },
    /// Sets: `replica` adds `elements`.
    Add { replica: usize, elements: Vec<u8> },
    /// Sets: `replica` removes the observed `elements`.
    Remove { replica: usize, elements: Vec<u8> },
    /// `to` merges `from`'s whole state.
    Merge { from: usize, to: usize },
}

fn counter_steps() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (2usize..=5).prop_flat_map(|n| {
        let step = prop_oneof![
            3 => (0..n, -1000i64..=1000).prop_map(|(replica, by)| Step::Count { replica, by }),
            2 => (0..n, 0..n).prop_map(|(from, to)| Step::Merge { from, to }),
        ];
        (Just(n), vec(step, 0..80))
    })
}

fn set_steps() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (2usize..=5).prop_flat_map(|n| {
        let element = 0u8..6;
        let step = prop_oneof![
            3 => (0..n, vec(element.clone(), 1..=3))
                .prop_map(|(replica, elements)| Step::Add { replica, elements }),
            3 => (0..n, vec(element, 1..=2))
                .prop_map(|(replica, elements)| Step::Remove { replica, elements }),
            3 => (0..n, 0..n).prop_map(|(from, to)| Step::Merge { from, to }),
        ];
        (Just(n), vec(step, 0..80))
    })
}

fn element(byte: u8) -> CanonicalJson {
    CanonicalJson::from(serde_json::Value::from(byte))
}

fn nodes(n: usize) -> Vec<NodeId> {
    (0..n).map(replica_node).collect()
}

fn merge_ours<T: Crdt>(replicas: &mut [T], from: usize, to: usize) {
    let theirs = replicas[from].clone();
    replicas[to].merge(&theirs);
}

fn merge_oracle<T: CvRDT + Clone>(replicas: &mut [T], from: usize, to: usize) {
    let theirs = replicas[from].clone();
    replicas[to].merge(theirs);
}

fn check_pn_counter(n: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let nodes = nodes(n);
    let mut ours = vec![PnCounter::default(); n];
    let mut oracle = vec![crdts::PNCounter::<NodeId>::new(); n];
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Count { replica, by } => {
                let delta = ours[replica].increment(nodes[replica], by).unwrap();
                ours[replica].apply(&delta);
                let o = &mut oracle[replica];
                let op = if by >= 0 {
                    o.inc_many(nodes[replica], by.unsigned_abs())
                } else {
                    o.dec_many(nodes[replica], by.unsigned_abs())
                };
                o.apply(op);
            }
            Step::Merge { from, to } => {
                merge_ours(&mut ours, from, to);
                merge_oracle(&mut oracle, from, to);
            }
            Step::Add { .. } | Step::Remove { .. } => unreachable!(),
        }
        for (r, (mine, theirs)) in ours.iter().zip(&oracle).enumerate() {
            prop_assert_eq!(
                mine.value().to_string(),
                theirs.read().to_string(),
                "replica {} after step {}",
                r,
                i
            );
        }
    }
    Ok(())
}

fn check_g_counter(n: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let nodes = nodes(n);
    let mut ours = vec![GCounter::default(); n];
    let mut oracle = vec![crdts::GCounter::<NodeId>::new(); n];
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Count { replica, by } => {
                let by = by.unsigned_abs();
                let delta = ours[replica].increment(nodes[replica], by).unwrap();
                ours[replica].apply(&delta);
                let op = oracle[replica].inc_many(nodes[replica], by);
                oracle[replica].apply(op);
            }
            Step::Merge { from, to } => {
                merge_ours(&mut ours, from, to);
                merge_oracle(&mut oracle, from, to);
            }
            Step::Add { .. } | Step::Remove { .. } => unreachable!(),
        }
        for (r, (mine, theirs)) in ours.iter().zip(&oracle).enumerate() {
            prop_assert_eq!(
                mine.value().to_string(),
                theirs.read().to_string(),
                "replica {} after step {}",
                r,
                i
            );
        }
    }
    Ok(())
}

/// Returns the elements replica 0 ends with.
fn check_or_set(n: usize, steps: &[Step]) -> Result<BTreeSet<u8>, TestCaseError> {
    let nodes = nodes(n);
    let mut ours = vec![OrSet::default(); n];
    let mut oracle = vec![Orswot::<u8, NodeId>::new(); n];
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Add { replica, elements } => {
                let r = *replica;
                let delta = ours[r].add(nodes[r], elements.iter().copied().map(element));
                ours[r].apply(&delta);
                let ctx = oracle[r].read_ctx().derive_add_ctx(nodes[r]);
                let op = oracle[r].add_all(elements.iter().copied(), ctx);
                oracle[r].apply(op);
            }
            Step::Remove { replica, elements } => {
                let r = *replica;
                let removed: Vec<CanonicalJson> = elements.iter().copied().map(element).collect();
                let delta = ours[r].remove(&removed);
                ours[r].apply(&delta);
                // One element: the element's own clock; several: the whole set's read clock.
                let op = if let [only] = elements[..] {
                    let ctx = oracle[r].contains(&only).derive_rm_ctx();
                    oracle[r].rm(only, ctx)
                } else {
                    let ctx = oracle[r].read().derive_rm_ctx();
                    oracle[r].rm_all(elements.iter().copied(), ctx)
                };
                oracle[r].apply(op);
            }
            Step::Merge { from, to } => {
                merge_ours(&mut ours, *from, *to);
                merge_oracle(&mut oracle, *from, *to);
            }
            Step::Count { .. } => unreachable!(),
        }
        for (r, (mine, theirs)) in ours.iter().zip(&oracle).enumerate() {
            let mine: BTreeSet<u8> = mine
                .elements()
                .map(|el| u8::try_from(el.to_value().as_u64().unwrap()).unwrap())
                .collect();
            let theirs: BTreeSet<u8> = theirs.read().val.into_iter().collect();
            prop_assert_eq!(mine, theirs, "replica {} after step {}", r, i);
        }
    }
    Ok(oracle[0].read().val.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pn_counter_reads_like_rust_crdt((n, steps) in counter_steps()) {
        check_pn_counter(n, &steps)?;
    }

    #[test]
    fn g_counter_reads_like_rust_crdt((n, steps) in counter_steps()) {
        check_g_counter(n, &steps)?;
    }

    #[test]
    fn or_set_holds_the_same_elements_as_rust_crdt_orswot((n, steps) in set_steps()) {
        check_or_set(n, &steps)?;
    }
}

/// The classic ORSWOT scenario, spelled out: a remove concurrent with a re-add loses.
#[test]
fn concurrent_add_and_remove_agree_with_rust_crdt() {
    let steps = [
        Step::Add {
            replica: 0,
            elements: vec![1],
        },
        Step::Merge { from: 0, to: 1 },
        Step::Remove {
            replica: 0,
            elements: vec![1],
        },
        Step::Add {
            replica: 1,
            elements: vec![1, 2],
        },
        Step::Merge { from: 1, to: 0 },
        Step::Merge { from: 0, to: 1 },
    ];
    assert_eq!(check_or_set(2, &steps).unwrap(), BTreeSet::from([1, 2]));
}
