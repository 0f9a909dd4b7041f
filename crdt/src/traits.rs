//! The one interface every Meridian data type implements.

use std::fmt::Debug;

use crate::clock::VersionVector;

/// A state-based CRDT whose operations are *deltas*: small states of the same type.
///
/// A replica generates a delta from `&self` without changing anything (`increment`, `add`,
/// `write`, ...), stores and ships it, and only then applies it; remote replicas apply the same
/// delta. Because a delta is a state and applying is joining, every replica may apply deltas
/// in any order, any number of times, or merge whole states instead, and reach the same state.
///
/// # Laws
/// For all states `a`, `b`, `c` of one type, `merge` is
/// - **commutative**: `a ⊔ b = b ⊔ a`,
/// - **associative**: `(a ⊔ b) ⊔ c = a ⊔ (b ⊔ c)`,
/// - **idempotent**: `a ⊔ a = a`,
///
/// with `Default` as the identity. The property tests in `tests/laws.rs` check exactly these.
pub trait Crdt: Clone + Default + PartialEq + Debug {
    /// Joins `other` into `self`: the least upper bound of the two.
    fn merge(&mut self, other: &Self);

    /// Applies a delta generated here or by another replica. Idempotent and order-free.
    fn apply(&mut self, delta: &Self) {
        self.merge(delta);
    }

    /// Drops metadata that no replica can need any more, and returns true when nothing is left
    /// (the key may then be deleted from storage).
    ///
    /// `stable` must be a *causally stable* frontier: every replica has applied every event it
    /// covers, and every event it does not cover happened after all of them (was stamped by a
    /// clock that had already seen them). Only under that contract can a tombstone go without a
    /// concurrent, older write coming back to life.
    fn collect_garbage(&mut self, stable: &VersionVector) -> bool;

    /// True for the bottom state, which holds no information.
    fn is_bottom(&self) -> bool {
        *self == Self::default()
    }
}
