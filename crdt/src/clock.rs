//! Identity and time: node ids, hybrid-logical-clock stamps, dots and version vectors.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

/// A node's identity in the cluster. Never zero, so it maps onto a `uhlc::ID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct NodeId(NonZeroU64);

impl NodeId {
    /// Returns `None` for zero, which uhlc reserves.
    pub const fn new(id: u64) -> Option<Self> {
        match NonZeroU64::new(id) {
            Some(id) => Some(Self(id)),
            None => None,
        }
    }

    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The uhlc identity this node stamps its clock with.
    pub fn to_uhlc(self) -> uhlc::ID {
        uhlc::ID::from(self.0)
    }
}

impl TryFrom<u64> for NodeId {
    type Error = crate::CrdtError;
    fn try_from(id: u64) -> Result<Self, Self::Error> {
        Self::new(id).ok_or(crate::CrdtError::ZeroNodeId)
    }
}

impl From<NodeId> for u64 {
    fn from(id: NodeId) -> Self {
        id.get()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A hybrid logical clock reading: 64-bit NTP time (uhlc's `NTP64`) and the node that took it.
///
/// Ordered by time, then node: two stamps are equal only if one node produced both at the same
/// instant, which its HLC never does, so the order is total across the cluster. This is what
/// makes last-writer-wins deterministic without trusting wall clocks to be unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// NTP64: upper 32 bits seconds since the Unix epoch, lower 32 bits the fraction.
    pub time: u64,
    pub node: NodeId,
}

impl Stamp {
    pub const fn new(time: u64, node: NodeId) -> Self {
        Self { time, node }
    }

    /// Converts a uhlc timestamp; fails when its id is not a 64-bit node id.
    pub fn from_uhlc(ts: &uhlc::Timestamp) -> Result<Self, crate::CrdtError> {
        let id = u128::from_le_bytes(ts.get_id().to_le_bytes());
        let node = u64::try_from(id)
            .ok()
            .and_then(NodeId::new)
            .ok_or(crate::CrdtError::ForeignClockId)?;
        Ok(Self {
            time: ts.get_time().as_u64(),
            node,
        })
    }

    pub fn to_uhlc(self) -> uhlc::Timestamp {
        uhlc::Timestamp::new(uhlc::NTP64(self.time), self.node.to_uhlc())
    }

    /// Milliseconds since the Unix epoch, for humans and lag metrics.
    pub fn unix_millis(self) -> u64 {
        uhlc::NTP64(self.time).as_nanos() / 1_000_000
    }

    /// RFC 3339 rendering, as the HTTP API shows timestamps.
    pub fn to_rfc3339(self) -> String {
        uhlc::NTP64(self.time).to_string_rfc3339_lossy()
    }
}

/// One event of one origin: its `seq`-th operation. Sequences start at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub node: NodeId,
    pub seq: u64,
}

impl Dot {
    pub const fn new(node: NodeId, seq: u64) -> Self {
        Self { node, seq }
    }
}

/// For each origin, the highest sequence such that every event `1..=seq` of it is included.
///
/// Absent origins count as zero, so a vector never stores zeros: that keeps equality and the
/// encoding canonical.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<NodeId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, node: NodeId) -> u64 {
        self.0.get(&node).copied().unwrap_or(0)
    }

    pub fn contains(&self, dot: Dot) -> bool {
        dot.seq <= self.get(dot.node)
    }

    /// Raises `node`'s entry to at least `seq`.
    pub fn raise(&mut self, node: NodeId, seq: u64) {
        if seq == 0 {
            return;
        }
        let entry = self.0.entry(node).or_insert(0);
        *entry = (*entry).max(seq);
    }

    /// Sets `node`'s entry exactly, e.g. when a sequence is truncated back.
    pub fn set(&mut self, node: NodeId, seq: u64) {
        if seq == 0 {
            self.0.remove(&node);
        } else {
            self.0.insert(node, seq);
        }
    }

    /// The next dot `node` would mint against this vector.
    pub fn next_dot(&self, node: NodeId) -> Dot {
        Dot::new(node, self.get(node) + 1)
    }

    /// Pointwise maximum: the least upper bound of two vectors.
    pub fn merge(&mut self, other: &Self) {
        for (&node, &seq) in &other.0 {
            self.raise(node, seq);
        }
    }

    /// Pointwise minimum: what both vectors include.
    #[must_use]
    pub fn meet(&self, other: &Self) -> Self {
        Self(
            self.0
                .iter()
                .filter_map(|(&node, &seq)| {
                    let min = seq.min(other.get(node));
                    (min > 0).then_some((node, min))
                })
                .collect(),
        )
    }

    /// True when every event in `other` is also in `self`.
    pub fn dominates(&self, other: &Self) -> bool {
        other.0.iter().all(|(&node, &seq)| self.get(node) >= seq)
    }

    pub fn iter(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.0.iter().map(|(&node, &seq)| (node, seq))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// False when a zero entry was decoded: operations never store one.
    pub(crate) fn is_canonical(&self) -> bool {
        self.0.values().all(|&seq| seq > 0)
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> Self {
        let mut vv = Self::new();
        for (node, seq) in iter {
            vv.raise(node, seq);
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn stamps_order_by_time_then_node() {
        assert!(Stamp::new(1, n(9)) < Stamp::new(2, n(1)));
        assert!(Stamp::new(5, n(1)) < Stamp::new(5, n(2)));
    }

    #[test]
    fn stamp_round_trips_through_uhlc() {
        let hlc = uhlc::HLCBuilder::new().with_id(n(42).to_uhlc()).build();
        let ts = hlc.new_timestamp();
        let stamp = Stamp::from_uhlc(&ts).unwrap();
        assert_eq!(stamp.node, n(42));
        assert_eq!(stamp.to_uhlc(), ts);
    }

    #[test]
    fn zero_node_id_is_refused() {
        assert!(NodeId::new(0).is_none());
        assert!(postcard::from_bytes::<NodeId>(&[0]).is_err());
    }

    #[test]
    fn vectors_never_store_zero_entries() {
        let mut a = VersionVector::new();
        a.raise(n(1), 0);
        a.set(n(2), 3);
        a.set(n(2), 0);
        assert_eq!(a, VersionVector::new());
    }

    #[test]
    fn merge_meet_and_dominates() {
        let a: VersionVector = [(n(1), 3), (n(2), 1)].into_iter().collect();
        let b: VersionVector = [(n(1), 1), (n(3), 4)].into_iter().collect();
        let mut joined = a.clone();
        joined.merge(&b);
        assert_eq!(
            joined,
            [(n(1), 3), (n(2), 1), (n(3), 4)].into_iter().collect()
        );
        assert_eq!(a.meet(&b), [(n(1), 1)].into_iter().collect());
        assert!(joined.dominates(&a) && joined.dominates(&b));
        assert!(!a.dominates(&b));
    }
}
