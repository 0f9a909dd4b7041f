//! Counters with an *observed-reset* delete: the PN-Counter and the G-Counter.
//!
//! Each origin owns one monotone pair of totals (increments, decrements), so a counter is a
//! map of per-origin maxima, as in the classic G-Counter. A reset records the totals the
//! resetting replica has observed (its *reset record*); the value is the sum, per origin, of
//! what lies above that record. Records merge by pointwise maximum, so concurrent resets
//! compose, and increments the resetter had not seen stay counted: a reset removes exactly what
//! it observed.
//!
//! The record holds one pair per origin that ever wrote, so it is bounded by the cluster size;
//! folding it into the totals would need every replica to do so at the same point, which a
//! join cannot express, so it stays.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::CrdtError;
use crate::clock::{NodeId, VersionVector};
use crate::traits::Crdt;

/// Monotone totals of one origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Totals {
    pub inc: u64,
    pub dec: u64,
}

impl Totals {
    fn join(self, other: Self) -> Self {
        Self {
            inc: self.inc.max(other.inc),
            dec: self.dec.max(other.dec),
        }
    }

    fn is_zero(self) -> bool {
        self.inc == 0 && self.dec == 0
    }
}

fn join_into(into: &mut BTreeMap<NodeId, Totals>, from: &BTreeMap<NodeId, Totals>) {
    for (&node, &totals) in from {
        if !totals.is_zero() {
            let entry = into.entry(node).or_default();
            *entry = entry.join(totals);
        }
    }
}

/// A counter that goes up and down, with observed-reset.
///
/// ```
/// use meridian_crdt::{Crdt, NodeId, PnCounter};
/// let (a, b) = (NodeId::new(1).unwrap(), NodeId::new(2).unwrap());
/// let mut here = PnCounter::default();
/// let mut there = PnCounter::default();
/// here.apply(&here.increment(a, 10).unwrap());
/// there.merge(&here);
/// // `here` resets what it has seen while `there` concurrently subtracts 3.
/// let reset = here.reset();
/// let minus = there.increment(b, -3).unwrap();
/// here.apply(&reset);
/// here.apply(&minus);
/// there.apply(&minus);
/// there.apply(&reset);
/// assert_eq!(here, there);
/// assert_eq!(here.value(), -3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PnCounter {
    totals: BTreeMap<NodeId, Totals>,
    reset: BTreeMap<NodeId, Totals>,
}

impl PnCounter {
    /// The delta that adds `by` (negative subtracts) on behalf of `node`.
    pub fn increment(&self, node: NodeId, by: i64) -> Result<Self, CrdtError> {
        let mut totals = self.totals.get(&node).copied().unwrap_or_default();
        let step = by.unsigned_abs();
        let slot = if by >= 0 {
            &mut totals.inc
        } else {
            &mut totals.dec
        };
        *slot = slot.checked_add(step).ok_or(CrdtError::CounterOverflow)?;
        let mut delta = Self::default();
        if step > 0 {
            delta.totals.insert(node, totals);
        }
        Ok(delta)
    }

    /// The delta that resets everything this replica has observed.
    #[must_use]
    pub fn reset(&self) -> Self {
        Self {
            totals: BTreeMap::new(),
            reset: self.totals.clone(),
        }
    }

    /// The sum of every origin's contribution above the reset record, saturated to `i64`.
    pub fn value(&self) -> i64 {
        let sum: i128 = self
            .totals
            .iter()
            .map(|(node, totals)| {
                let base = self.reset.get(node).copied().unwrap_or_default();
                i128::from(totals.inc.saturating_sub(base.inc))
                    - i128::from(totals.dec.saturating_sub(base.dec))
            })
            .sum();
        i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX })
    }

    /// Whether any origin added or subtracted since the reset record: false for a counter
    /// never written or reset with nothing since, whatever its value would be.
    pub fn written_since_reset(&self) -> bool {
        self.totals.iter().any(|(node, totals)| {
            let base = self.reset.get(node).copied().unwrap_or_default();
            totals.inc > base.inc || totals.dec > base.dec
        })
    }

    /// Refuses zero entries, which no operation stores (`merge` skips them, so a decoded one
    /// would make `bottom ⊔ s ≠ s` and equal counters compare unequal).
    pub(crate) fn validate(&self) -> Result<(), CrdtError> {
        if self
            .totals
            .values()
            .chain(self.reset.values())
            .any(|t| t.is_zero())
        {
            return Err(CrdtError::Invalid("counter with a zero entry"));
        }
        Ok(())
    }

    /// Per-origin totals, for inspection and tests.
    pub fn totals(&self) -> impl Iterator<Item = (NodeId, Totals)> + '_ {
        self.totals.iter().map(|(&node, &totals)| (node, totals))
    }
}

impl Crdt for PnCounter {
    fn merge(&mut self, other: &Self) {
        join_into(&mut self.totals, &other.totals);
        join_into(&mut self.reset, &other.reset);
    }

    fn collect_garbage(&mut self, _stable: &VersionVector) -> bool {
        // See the module docs: a reset record cannot be folded away by one replica alone.
        self.is_bottom()
    }
}

/// A counter that only grows (until reset), with observed-reset.
///
/// ```
/// use meridian_crdt::{Crdt, GCounter, NodeId};
/// let a = NodeId::new(1).unwrap();
/// let mut c = GCounter::default();
/// c.apply(&c.increment(a, 5).unwrap());
/// c.apply(&c.increment(a, 2).unwrap());
/// assert_eq!(c.value(), 7);
/// c.apply(&c.reset());
/// assert_eq!(c.value(), 0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GCounter(PnCounter);

impl GCounter {
    /// The delta that adds `by` on behalf of `node`.
    pub fn increment(&self, node: NodeId, by: u64) -> Result<Self, CrdtError> {
        let mut totals = self.0.totals.get(&node).copied().unwrap_or_default();
        totals.inc = totals
            .inc
            .checked_add(by)
            .ok_or(CrdtError::CounterOverflow)?;
        let mut delta = PnCounter::default();
        if by > 0 {
            delta.totals.insert(node, totals);
        }
        Ok(Self(delta))
    }

    #[must_use]
    pub fn reset(&self) -> Self {
        Self(self.0.reset())
    }

    pub fn value(&self) -> u64 {
        self.0
            .totals
            .iter()
            .map(|(node, totals)| {
                let base = self.0.reset.get(node).copied().unwrap_or_default();
                totals.inc.saturating_sub(base.inc)
            })
            .fold(0u64, u64::saturating_add)
    }

    pub fn totals(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.0.totals().map(|(node, totals)| (node, totals.inc))
    }

    /// See [`PnCounter::written_since_reset`].
    pub fn written_since_reset(&self) -> bool {
        self.0.written_since_reset()
    }

    /// Refuses states with decrements, which no G-Counter operation creates.
    pub(crate) fn validate(&self) -> Result<(), CrdtError> {
        self.0.validate()?;
        let has_dec = self
            .0
            .totals
            .values()
            .chain(self.0.reset.values())
            .any(|t| t.dec > 0);
        if has_dec {
            Err(CrdtError::Invalid("G-Counter with decrements"))
        } else {
            Ok(())
        }
    }
}

impl Crdt for GCounter {
    fn merge(&mut self, other: &Self) {
        self.0.merge(&other.0);
    }

    fn collect_garbage(&mut self, stable: &VersionVector) -> bool {
        self.0.collect_garbage(stable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn increments_from_many_origins_sum_exactly() {
        let mut c = PnCounter::default();
        for (node, by) in [(1, 5), (2, -7), (1, 3), (3, 100), (2, 2)] {
            c.apply(&c.increment(n(node), by).unwrap());
        }
        assert_eq!(c.value(), 103);
    }

    #[test]
    fn observed_reset_keeps_concurrent_increments() {
        let mut x = GCounter::default();
        x.apply(&x.increment(n(1), 10).unwrap());
        let mut y = x.clone();
        let reset = x.reset();
        let concurrent = y.increment(n(2), 4).unwrap();
        x.apply(&reset);
        x.apply(&concurrent);
        y.apply(&concurrent);
        y.apply(&reset);
        assert_eq!(x, y);
        assert_eq!(x.value(), 4);
    }

    #[test]
    fn concurrent_increment_by_an_observed_origin_survives_reset() {
        let mut x = PnCounter::default();
        x.apply(&x.increment(n(1), 10).unwrap());
        let mut origin = x.clone();
        let reset = x.reset();
        origin.apply(&origin.increment(n(1), 1).unwrap());
        x.apply(&reset);
        x.merge(&origin);
        assert_eq!(x.value(), 1);
    }

    #[test]
    fn reset_ahead_of_increments_never_goes_negative() {
        let mut a = PnCounter::default();
        a.apply(&a.increment(n(1), 10).unwrap());
        let mut lagging = PnCounter::default();
        lagging.apply(&a.reset());
        assert_eq!(lagging.value(), 0);
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let mut c = GCounter::default();
        c.apply(&c.increment(n(1), u64::MAX).unwrap());
        assert_eq!(c.increment(n(1), 1), Err(CrdtError::CounterOverflow));
    }

    #[test]
    fn zero_increment_is_an_empty_delta() {
        assert!(PnCounter::default().increment(n(1), 0).unwrap().is_bottom());
    }
}
