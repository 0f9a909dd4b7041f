//! Helpers shared by the integration tests.
#![allow(dead_code)]

use meridian_crdt::{CanonicalJson, Crdt, NodeId};
use proptest::sample::Index;

/// The join of two states.
pub(crate) fn join<T: Crdt>(a: &T, b: &T) -> T {
    let mut out = a.clone();
    out.merge(b);
    out
}

/// The join of many states.
pub(crate) fn join_all<'a, T: Crdt + 'a>(states: impl IntoIterator<Item = &'a T>) -> T {
    states
        .into_iter()
        .fold(T::default(), |acc, state| join(&acc, state))
}

/// Fisher-Yates driven by proptest-chosen indices (cycled), so the order shrinks with the case.
pub(crate) fn shuffle<T>(items: &mut [T], picks: &[Index]) {
    if picks.is_empty() {
        items.reverse();
        return;
    }
    for i in (1..items.len()).rev() {
        let j = picks[i % picks.len()].index(i + 1);
        items.swap(i, j);
    }
}

pub(crate) fn n(id: u64) -> NodeId {
    NodeId::new(id).unwrap()
}

pub(crate) fn e(text: &str) -> CanonicalJson {
    CanonicalJson::parse(text).unwrap()
}

/// Every permutation of `0..len` (Heap's algorithm), for exhaustive delivery orders.
pub(crate) fn permutations(len: usize) -> Vec<Vec<usize>> {
    fn heap(k: usize, items: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if k <= 1 {
            out.push(items.clone());
            return;
        }
        for i in 0..k {
            heap(k - 1, items, out);
            let swap = if k % 2 == 0 { i } else { 0 };
            items.swap(swap, k - 1);
        }
    }
    let mut out = Vec::new();
    heap(len, &mut (0..len).collect(), &mut out);
    out
}
