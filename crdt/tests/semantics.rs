//! What the types mean, not just that they converge: add-wins, observed-reset, last-writer-wins
//! with a deterministic tie-break, and exact counter sums, each checked against an independent
//! event-level model replayed from a random history's delivery log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{e, n, permutations};
use meridian_crdt::arbitrary::{
    self, CounterAction, GCounterAction, History, Played, RegisterAction, SetAction, Shape,
    Simulate, Step,
};
use meridian_crdt::{CanonicalJson, Crdt, Dot, GCounter, LwwRegister, OrSet, PnCounter, Stamp};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

/// Applies `deltas` to `replica` in the order `order`.
fn deliver<T: Crdt>(replica: &T, deltas: &[&T], order: &[usize]) -> T {
    let mut out = replica.clone();
    for &i in order {
        out.apply(deltas[i]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// OR-Set: add wins.

#[test]
fn concurrent_add_and_remove_of_one_element_keeps_it_in_every_delivery_order() {
    let milk = e(r#""milk""#);
    let mut origin = OrSet::default();
    origin.apply(&origin.add(n(1), [milk.clone()]));
    // Three replicas have seen the add. One removes milk while another concurrently re-adds it
    // and a third adds an unrelated element.
    let remove = origin.remove([&milk]);
    let add = origin.add(n(2), [milk.clone()]);
    let other = origin.add(n(3), [e("1")]);
    let deltas = [&remove, &add, &other];
    for order in permutations(3) {
        let state = deliver(&origin, &deltas, &order);
        assert!(
            state.contains(&milk),
            "order {order:?} lost the concurrent add"
        );
        assert_eq!(state.len(), 2);
    }
    // Even a replica that never saw the first add ends up with milk.
    for order in permutations(3) {
        let state = deliver(&OrSet::default(), &deltas, &order);
        assert!(
            state.contains(&milk),
            "order {order:?} lost the concurrent add"
        );
    }
}

#[test]
fn concurrent_adds_from_unrelated_replicas_survive_a_remove_that_saw_one() {
    let x = e(r#"{"a":1}"#);
    let (mut a, mut b) = (OrSet::default(), OrSet::default());
    let add_a = a.add(n(1), [x.clone()]);
    let add_b = b.add(n(2), [x.clone()]);
    a.apply(&add_a);
    b.apply(&add_b);
    let remove_a = a.remove([&x]);
    for order in permutations(3) {
        let state = deliver(&OrSet::default(), &[&add_a, &add_b, &remove_a], &order);
        assert!(
            state.contains(&x),
            "order {order:?}: b's unobserved add must win"
        );
    }
}

#[test]
fn a_remove_that_saw_every_add_removes_the_element_in_every_delivery_order() {
    let x = e("[1,2]");
    let mut a = OrSet::default();
    let add_1 = a.add(n(1), [x.clone()]);
    a.apply(&add_1);
    let add_2 = a.add(n(2), [x.clone(), e("3")]);
    a.apply(&add_2);
    let remove = a.remove([&x]);
    for order in permutations(3) {
        let state = deliver(&OrSet::default(), &[&add_1, &add_2, &remove], &order);
        assert!(
            !state.contains(&x),
            "order {order:?} resurrected an observed-removed element"
        );
        assert!(state.contains(&e("3")));
    }
}

#[test]
fn clear_removes_only_what_it_observed() {
    let mut a = OrSet::default();
    a.apply(&a.add(n(1), [e("1"), e("2")]));
    let b = a.clone();
    let clear = a.clear();
    let concurrent = b.add(n(2), [e("2"), e("9")]);
    for order in permutations(2) {
        let state = deliver(&a, &[&clear, &concurrent], &order);
        let elements: Vec<_> = state.elements().cloned().collect();
        assert_eq!(elements, vec![e("2"), e("9")], "order {order:?}");
    }
}

/// The add-wins model: an add event survives unless some later request, at a replica that
/// knew of it, touched the element (removed it, re-added it, or cleared the set). Knowledge
/// travels with deltas (the add itself and what the request touched) and with anti-entropy.
fn add_wins_model(played: &Played<OrSet>) -> BTreeSet<CanonicalJson> {
    type AddEvent = (usize, CanonicalJson);
    let mut known: Vec<BTreeSet<AddEvent>> = vec![BTreeSet::new(); played.replicas.len()];
    let mut carried: Vec<BTreeSet<AddEvent>> = vec![BTreeSet::new(); played.ops.len()];
    let mut covered: BTreeSet<AddEvent> = BTreeSet::new();
    let mut added: BTreeSet<AddEvent> = BTreeSet::new();
    for step in &played.log {
        match *step {
            Step::Made { replica, op } => {
                let (adds, touched): (Vec<&CanonicalJson>, Option<Vec<&CanonicalJson>>) =
                    match &played.ops[op].action {
                        SetAction::Add(adds) => {
                            (adds.iter().collect(), Some(adds.iter().collect()))
                        }
                        SetAction::Remove(removes) => (vec![], Some(removes.iter().collect())),
                        SetAction::Update { add, remove } => (
                            add.iter().collect(),
                            Some(add.iter().chain(remove).collect()),
                        ),
                        SetAction::Clear => (vec![], None),
                    };
                let coverage: BTreeSet<AddEvent> = known[replica]
                    .iter()
                    .filter(|(_, element)| touched.as_ref().is_none_or(|t| t.contains(&element)))
                    .cloned()
                    .collect();
                let own: BTreeSet<AddEvent> = adds.into_iter().map(|el| (op, el.clone())).collect();
                covered.extend(coverage.iter().cloned());
                added.extend(own.iter().cloned());
                carried[op] = own.union(&coverage).cloned().collect();
                known[replica].extend(carried[op].iter().cloned());
            }
            Step::Received { to, op } => known[to].extend(carried[op].iter().cloned()),
            Step::Synced { from, to } => {
                let theirs = known[from].clone();
                known[to].extend(theirs);
            }
        }
    }
    added
        .difference(&covered)
        .map(|(_, element)| element.clone())
        .collect()
}

fn check_add_wins(history: &History<SetAction>, picks: &[Index]) -> Result<(), TestCaseError> {
    let mut played = history.play::<OrSet>();
    played.flush(picks);
    let expected = add_wins_model(&played);
    for replica in &played.replicas {
        let elements: BTreeSet<CanonicalJson> = replica.elements().cloned().collect();
        prop_assert_eq!(&elements, &expected);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Counters: observed reset, exact sums.

#[test]
fn observed_reset_keeps_concurrent_increments_in_every_delivery_order() {
    let mut seen = PnCounter::default();
    seen.apply(&seen.increment(n(1), 10).unwrap());
    seen.apply(&seen.increment(n(2), -4).unwrap());
    // Concurrently with a reset of what `seen` observed (+10, -4): node 1 adds 5 more, node 3
    // subtracts 2, and another replica resets the same observation again.
    let reset = seen.reset();
    let more = seen.increment(n(1), 5).unwrap();
    let fresh = PnCounter::default().increment(n(3), -2).unwrap();
    let reset_again = seen.reset();
    for order in permutations(4) {
        for start in [&seen, &PnCounter::default()] {
            let state = deliver(start, &[&reset, &more, &fresh, &reset_again], &order);
            assert_eq!(state.value(), 3, "order {order:?}");
        }
    }

    let mut g = GCounter::default();
    g.apply(&g.increment(n(1), 10).unwrap());
    let reset = g.reset();
    let more = g.increment(n(1), 7).unwrap();
    let other = GCounter::default().increment(n(2), 1).unwrap();
    for order in permutations(3) {
        assert_eq!(
            deliver(&g, &[&reset, &more, &other], &order).value(),
            8,
            "order {order:?}"
        );
    }
}

/// A counter is "written since reset" exactly when some origin moved it past the reset
/// record: not when never written, not after a reset of all it held (whatever the order of
/// delivery), but again after a concurrent or later increment, even one that leaves it at 0.
#[test]
fn written_since_reset_follows_the_reset_record_not_the_value() {
    assert!(!PnCounter::default().written_since_reset());
    let mut seen = PnCounter::default();
    seen.apply(&seen.increment(n(1), 3).unwrap());
    seen.apply(&seen.increment(n(2), -3).unwrap());
    assert_eq!(seen.value(), 0);
    assert!(
        seen.written_since_reset(),
        "+3 -3 is a counter that was written"
    );
    let reset = seen.reset();
    let concurrent = seen.increment(n(3), 1).unwrap();
    for order in permutations(1) {
        assert!(!deliver(&seen, &[&reset], &order).written_since_reset());
    }
    for order in permutations(2) {
        assert!(deliver(&seen, &[&reset, &concurrent], &order).written_since_reset());
    }
    let mut cleared = deliver(&seen, &[&reset], &[0]);
    cleared.apply(&cleared.increment(n(1), -1).unwrap());
    assert!(cleared.written_since_reset());

    let mut g = GCounter::default();
    assert!(!g.written_since_reset());
    g.apply(&g.increment(n(1), 2).unwrap());
    assert!(g.written_since_reset());
    g.apply(&g.reset());
    assert!(!g.written_since_reset());
}

#[test]
fn a_reset_after_seeing_increments_zeroes_them_everywhere() {
    let mut a = GCounter::default();
    let incs = [a.increment(n(1), 3).unwrap()];
    a.apply(&incs[0]);
    let inc2 = a.increment(n(1), 4).unwrap();
    a.apply(&inc2);
    let reset = a.reset();
    for order in permutations(3) {
        assert_eq!(
            deliver(&GCounter::default(), &[&incs[0], &inc2, &reset], &order).value(),
            0
        );
    }
}

/// What each replica's counter must read, from the delivery log alone: an increment's delta
/// carries its origin's running totals, so whoever applies the `s`-th op of origin `o` knows
/// every increment of `o` up to `s`; a reset covers exactly what its replica knew. A replica
/// reads the sum of the increments it knows and no reset it knows covers.
struct CounterModel {
    known: Vec<BTreeMap<usize, u64>>,
    cover: Vec<BTreeMap<usize, u64>>,
    resets: BTreeMap<usize, BTreeMap<usize, u64>>,
}

fn raise(into: &mut BTreeMap<usize, u64>, from: &BTreeMap<usize, u64>) {
    for (&origin, &seq) in from {
        let entry = into.entry(origin).or_insert(0);
        *entry = (*entry).max(seq);
    }
}

impl CounterModel {
    fn new(replicas: usize) -> Self {
        Self {
            known: vec![BTreeMap::new(); replicas],
            cover: vec![BTreeMap::new(); replicas],
            resets: BTreeMap::new(),
        }
    }

    /// `amount(action)`: `Some(amount)` for an increment, `None` for a reset.
    fn step<T: Simulate>(
        &mut self,
        played: &Played<T>,
        step: Step,
        amount: impl Fn(&T::Action) -> Option<i128>,
    ) {
        let (to, op) = match step {
            Step::Made { replica, op } => {
                if amount(&played.ops[op].action).is_none() {
                    self.resets.insert(op, self.known[replica].clone());
                }
                (replica, op)
            }
            Step::Received { to, op } => (to, op),
            Step::Synced { from, to } => {
                let (known, cover) = (self.known[from].clone(), self.cover[from].clone());
                raise(&mut self.known[to], &known);
                raise(&mut self.cover[to], &cover);
                return;
            }
        };
        let generated = &played.ops[op];
        match amount(&generated.action) {
            Some(0) => {}
            Some(_) => raise(
                &mut self.known[to],
                &BTreeMap::from([(generated.replica, generated.dot.seq)]),
            ),
            None => raise(&mut self.cover[to], &self.resets[&op].clone()),
        }
    }

    fn value<T: Simulate>(
        &self,
        played: &Played<T>,
        replica: usize,
        amount: impl Fn(&T::Action) -> Option<i128>,
    ) -> i128 {
        played
            .ops
            .iter()
            .filter_map(|op| {
                let by = amount(&op.action)?;
                let known = self.known[replica].get(&op.replica).copied().unwrap_or(0);
                let covered = self.cover[replica].get(&op.replica).copied().unwrap_or(0);
                (covered < op.dot.seq && op.dot.seq <= known).then_some(by)
            })
            .sum()
    }
}

/// Replays the history step by step, checking every replica's value against the model after
/// every step, then delivers everything and checks the final sums.
fn check_counter<T: Simulate>(
    history: &History<T::Action>,
    picks: &[Index],
    amount: impl Fn(&T::Action) -> Option<i128> + Copy,
    read: impl Fn(&T) -> i128,
) -> Result<(), TestCaseError> {
    let mut played = history.play::<T>();
    played.flush(picks);
    // Rebuild the replicas from the log, so intermediate states can be compared too.
    let mut replicas = vec![T::default(); played.replicas.len()];
    let mut model = CounterModel::new(replicas.len());
    for &step in &played.log {
        let touched = match step {
            Step::Made { replica, op } => {
                replicas[replica].apply(&played.ops[op].delta);
                replica
            }
            Step::Received { to, op } => {
                replicas[to].apply(&played.ops[op].delta);
                to
            }
            Step::Synced { from, to } => {
                let theirs = replicas[from].clone();
                replicas[to].merge(&theirs);
                to
            }
        };
        model.step(&played, step, amount);
        prop_assert_eq!(
            read(&replicas[touched]),
            model.value(&played, touched, amount),
            "after {:?}",
            step
        );
    }
    prop_assert_eq!(&replicas, &played.replicas);
    // Everything delivered: every replica reads the increments no reset observed.
    let mut cover: BTreeMap<usize, u64> = BTreeMap::new();
    for covers in model.resets.values() {
        raise(&mut cover, covers);
    }
    let expected: i128 = played
        .ops
        .iter()
        .filter_map(|op| {
            let by = amount(&op.action)?;
            (op.dot.seq > cover.get(&op.replica).copied().unwrap_or(0)).then_some(by)
        })
        .sum();
    for replica in &played.replicas {
        prop_assert_eq!(read(replica), expected);
    }
    if model.resets.is_empty() {
        let total: i128 = played.ops.iter().filter_map(|op| amount(&op.action)).sum();
        prop_assert_eq!(expected, total, "without resets the value is the plain sum");
    }
    Ok(())
}

fn pn_amount(action: &CounterAction) -> Option<i128> {
    match *action {
        CounterAction::Increment(by) => Some(i128::from(by)),
        CounterAction::Reset => None,
    }
}

fn g_amount(action: &GCounterAction) -> Option<i128> {
    match *action {
        GCounterAction::Increment(by) => Some(i128::from(by)),
        GCounterAction::Reset => None,
    }
}

// ---------------------------------------------------------------------------------------------
// LWW-Register: one winner everywhere.

#[test]
fn equal_physical_time_is_broken_by_node_id_on_every_replica() {
    let time = 0x684C_0000_0000_0000;
    let r = LwwRegister::default();
    let writes: Vec<LwwRegister> = [(3, "\"c\""), (1, "\"a\""), (2, "\"b\"")]
        .into_iter()
        .map(|(node, value)| {
            r.write(
                Stamp::new(time, n(node)),
                Dot::new(n(node), 1),
                Some(e(value)),
            )
        })
        .collect();
    let deltas: Vec<&LwwRegister> = writes.iter().collect();
    for order in permutations(3) {
        let state = deliver(&r, &deltas, &order);
        assert_eq!(
            state.value(),
            Some(&e("\"c\"")),
            "order {order:?}: node 3 has the highest id"
        );
        assert_eq!(state.entry().unwrap().stamp.node, n(3));
    }
    // A later time beats a higher node id, and a tombstone at an equal time loses to a higher
    // node's value but beats a lower node's.
    let later = r.write(Stamp::new(time + 1, n(1)), Dot::new(n(1), 2), Some(e("0")));
    let tomb = r.write(Stamp::new(time, n(2)), Dot::new(n(2), 2), None);
    for order in permutations(4) {
        let state = deliver(&r, &[deltas[0], deltas[1], &later, &tomb], &order);
        assert_eq!(state.value(), Some(&e("0")), "order {order:?}");
    }
    for order in permutations(3) {
        let state = deliver(&r, &[deltas[0], deltas[1], &tomb], &order);
        assert_eq!(state.value(), Some(&e("\"c\"")), "order {order:?}");
    }
    for order in permutations(2) {
        let state = deliver(&r, &[deltas[1], &tomb], &order);
        assert_eq!(
            state.value(),
            None,
            "order {order:?}: node 2's delete beats node 1's write"
        );
        assert!(state.entry().is_some(), "the tombstone is kept");
    }
}

/// Every replica's register holds the highest-stamped write among those it has received, and
/// a replica's own write always wins there (its HLC has absorbed everything it saw).
fn check_lww(history: &History<RegisterAction>, picks: &[Index]) -> Result<(), TestCaseError> {
    let mut played = history.play::<LwwRegister>();
    played.flush(picks);
    let stamps: BTreeSet<Stamp> = played.ops.iter().map(|op| op.stamp).collect();
    prop_assert_eq!(
        stamps.len(),
        played.ops.len(),
        "the simulated HLCs reused a stamp"
    );
    let mut known: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); played.replicas.len()];
    let mut replicas = vec![LwwRegister::default(); played.replicas.len()];
    for &step in &played.log {
        let touched = match step {
            Step::Made { replica, op } => {
                replicas[replica].apply(&played.ops[op].delta);
                prop_assert_eq!(
                    replicas[replica].value(),
                    played.ops[op].action.value.as_ref()
                );
                known[replica].insert(op);
                replica
            }
            Step::Received { to, op } => {
                replicas[to].apply(&played.ops[op].delta);
                known[to].insert(op);
                to
            }
            Step::Synced { from, to } => {
                let (theirs, ops) = (replicas[from].clone(), known[from].clone());
                replicas[to].merge(&theirs);
                known[to].extend(ops);
                to
            }
        };
        let winner = known[touched]
            .iter()
            .map(|&op| &played.ops[op])
            .max_by_key(|op| op.stamp);
        let entry = replicas[touched]
            .entry()
            .map(|entry| (entry.stamp, entry.dot, entry.value.clone()));
        prop_assert_eq!(
            entry,
            winner.map(|op| (op.stamp, op.dot, op.action.value.clone()))
        );
    }
    let winner = played
        .ops
        .iter()
        .max_by_key(|op| op.stamp)
        .map(|op| op.action.value.as_ref());
    for replica in &played.replicas {
        prop_assert_eq!(replica.value(), winner.flatten());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn or_set_holds_exactly_the_adds_no_request_observed(
        history in arbitrary::history::<OrSet>(Shape { replicas: 2..=5, events: 0..=60, syncs: true }),
        picks in vec(any::<Index>(), 1..32),
    ) {
        check_add_wins(&history, &picks)?;
    }

    #[test]
    fn pn_counter_is_the_exact_sum_of_increments(
        history in arbitrary::history_with(Shape { replicas: 2..=5, events: 0..=60, syncs: true }, arbitrary::counter_action(false)),
        picks in vec(any::<Index>(), 1..32),
    ) {
        check_counter::<PnCounter>(&history, &picks, pn_amount, |c| i128::from(c.value()))?;
    }

    #[test]
    fn pn_counter_is_the_sum_of_increments_no_reset_observed(
        history in arbitrary::history_with(Shape { replicas: 2..=5, events: 0..=60, syncs: true }, arbitrary::counter_action(true)),
        picks in vec(any::<Index>(), 1..32),
    ) {
        check_counter::<PnCounter>(&history, &picks, pn_amount, |c| i128::from(c.value()))?;
    }

    #[test]
    fn g_counter_is_the_exact_sum_of_increments(
        history in arbitrary::history_with(Shape { replicas: 2..=5, events: 0..=60, syncs: true }, arbitrary::g_counter_action(false)),
        picks in vec(any::<Index>(), 1..32),
    ) {
        check_counter::<GCounter>(&history, &picks, g_amount, |c| i128::from(c.value()))?;
    }

    #[test]
    fn g_counter_is_the_sum_of_increments_no_reset_observed(
        history in arbitrary::history_with(Shape { replicas: 2..=5, events: 0..=60, syncs: true }, arbitrary::g_counter_action(true)),
        picks in vec(any::<Index>(), 1..32),
    ) {
        check_counter::<GCounter>(&history, &picks, g_amount, |c| i128::from(c.value()))?;
    }

    #[test]
    fn lww_register_picks_the_same_highest_stamped_write_everywhere(
        history in arbitrary::history::<LwwRegister>(Shape { replicas: 2..=5, events: 0..=60, syncs: true }),
        picks in vec(any::<Index>(), 1..32),
    ) {
        check_lww(&history, &picks)?;
    }
}
