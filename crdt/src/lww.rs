//! The last-writer-wins register on hybrid logical time.

use serde::{Deserialize, Serialize};

use crate::clock::{Dot, Stamp, VersionVector};
use crate::json::CanonicalJson;
use crate::traits::Crdt;

/// One write to a register: a value, or a tombstone (`value: None`) for a delete.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LwwEntry {
    /// HLC stamp of the write: the order in which writes win.
    pub stamp: Stamp,
    /// The write's position in its origin's log, which tells when a tombstone is stable.
    pub dot: Dot,
    pub value: Option<CanonicalJson>,
}

impl LwwEntry {
    /// Total order: stamp (time, then node), then dot, then value bytes. The stamp alone decides
    /// between real writes; the rest only keeps `merge` a function of its inputs should two
    /// entries ever share a stamp.
    fn wins_over(&self, other: &Self) -> bool {
        (self.stamp, self.dot, &self.value) > (other.stamp, other.dot, &other.value)
    }
}

/// A register holding one JSON value, where the write with the highest HLC stamp wins.
///
/// Wall clocks are never compared: the stamp comes from the writer's hybrid logical clock,
/// which has already absorbed every stamp the writer received, so a write that *saw* another
/// one always wins over it, and concurrent writes are ordered by (time, node) on every replica
/// alike.
///
/// ```
/// use meridian_crdt::{CanonicalJson, Crdt, Dot, LwwRegister, NodeId, Stamp};
/// let (a, b) = (NodeId::new(1).unwrap(), NodeId::new(2).unwrap());
/// let mut r = LwwRegister::default();
/// let first = r.write(Stamp::new(100, a), Dot::new(a, 1), Some(CanonicalJson::parse("1").unwrap()));
/// let second = r.write(Stamp::new(100, b), Dot::new(b, 1), Some(CanonicalJson::parse("2").unwrap()));
/// r.apply(&second);
/// r.apply(&first);
/// // Equal physical time: the higher node id wins, on every replica.
/// assert_eq!(r.value().unwrap().as_str(), "2");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LwwRegister {
    entry: Option<LwwEntry>,
}

impl LwwRegister {
    /// The delta of a write; `None` writes a tombstone.
    #[must_use]
    pub fn write(&self, stamp: Stamp, dot: Dot, value: Option<CanonicalJson>) -> Self {
        Self {
            entry: Some(LwwEntry { stamp, dot, value }),
        }
    }

    /// The current value; `None` when never written or deleted.
    pub fn value(&self) -> Option<&CanonicalJson> {
        self.entry.as_ref().and_then(|entry| entry.value.as_ref())
    }

    /// The winning write, tombstone included.
    pub fn entry(&self) -> Option<&LwwEntry> {
        self.entry.as_ref()
    }
}

impl Crdt for LwwRegister {
    fn merge(&mut self, other: &Self) {
        if let Some(theirs) = &other.entry {
            if self
                .entry
                .as_ref()
                .is_none_or(|mine| theirs.wins_over(mine))
            {
                self.entry = Some(theirs.clone());
            }
        }
    }

    fn collect_garbage(&mut self, stable: &VersionVector) -> bool {
        if let Some(entry) = &self.entry {
            if entry.value.is_none() && stable.contains(entry.dot) {
                self.entry = None;
            }
        }
        self.entry.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NodeId;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[allow(clippy::unnecessary_wraps)] // shaped for `write`'s value argument
    fn v(text: &str) -> Option<CanonicalJson> {
        Some(CanonicalJson::parse(text).unwrap())
    }

    #[test]
    fn later_stamp_wins_regardless_of_arrival_order() {
        let r = LwwRegister::default();
        let old = r.write(Stamp::new(1, n(9)), Dot::new(n(9), 1), v("\"old\""));
        let new = r.write(Stamp::new(2, n(1)), Dot::new(n(1), 1), v("\"new\""));
        let mut x = LwwRegister::default();
        x.apply(&old);
        x.apply(&new);
        let mut y = LwwRegister::default();
        y.apply(&new);
        y.apply(&old);
        assert_eq!(x, y);
        assert_eq!(x.value(), v("\"new\"").as_ref());
    }

    #[test]
    fn delete_is_a_tombstone_a_later_write_revives() {
        let mut r = LwwRegister::default();
        r.apply(&r.write(Stamp::new(1, n(1)), Dot::new(n(1), 1), v("1")));
        r.apply(&r.write(Stamp::new(2, n(1)), Dot::new(n(1), 2), None));
        assert!(r.value().is_none());
        r.apply(&r.write(Stamp::new(3, n(2)), Dot::new(n(2), 1), v("3")));
        assert_eq!(r.value(), v("3").as_ref());
    }

    #[test]
    fn stable_tombstones_are_collected_and_values_never() {
        let mut r = LwwRegister::default();
        r.apply(&r.write(Stamp::new(2, n(1)), Dot::new(n(1), 5), None));
        let below: VersionVector = [(n(1), 4)].into_iter().collect();
        assert!(!r.collect_garbage(&below));
        let covering: VersionVector = [(n(1), 5)].into_iter().collect();
        assert!(r.collect_garbage(&covering));
        assert!(r.is_bottom());

        let mut live = LwwRegister::default();
        live.apply(&live.write(Stamp::new(2, n(1)), Dot::new(n(1), 5), v("1")));
        assert!(!live.collect_garbage(&covering));
    }
}
