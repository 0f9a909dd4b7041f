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

    /// RFC 3339 rendering with nanoseconds, as the HTTP API shows timestamps: the same text
    /// as uhlc's `to_string_rfc3339_lossy`, without its trip through `SystemTime` and a
    /// formatter (every write answer carries two of these; they were a tenth of its JSON).
    pub fn to_rfc3339(self) -> String {
        let text = self.rfc3339_bytes();
        // Only ASCII digits and separators were written, so this never takes the fallback.
        String::from_utf8(text.to_vec()).unwrap_or_default()
    }

    /// [`Self::to_rfc3339`]'s text as ASCII bytes, for writers that copy it straight into a
    /// buffer.
    pub fn rfc3339_bytes(self) -> [u8; 30] {
        let since_epoch = uhlc::NTP64(self.time).to_duration();
        let secs = since_epoch.as_secs();
        // NTP64 seconds are 32 bits: years 1970 to 2106, always four digits.
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let of_day = secs % 86_400;
        let mut text = *b"0000-00-00T00:00:00.000000000Z";
        put_digits(&mut text[0..4], year.unsigned_abs());
        put_digits(&mut text[5..7], month.into());
        put_digits(&mut text[8..10], day.into());
        put_digits(&mut text[11..13], of_day / 3600);
        put_digits(&mut text[14..16], of_day / 60 % 60);
        put_digits(&mut text[17..19], of_day % 60);
        put_digits(&mut text[20..29], since_epoch.subsec_nanos().into());
        text
    }
}

/// Writes `value` in decimal into `out`, zero-padded on the left (`format!`'s `{:02}` costs
/// about as much as the rest of a read's answer).
fn put_digits(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
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

    proptest::proptest! {
        /// The fast rendering is exactly uhlc's (humantime's), for any clock reading:
        /// every day of every year NTP64 can hold, and every fraction.
        #[test]
        fn rfc3339_matches_uhlc(time in proptest::num::u64::ANY) {
            let stamp = Stamp::new(time, n(1));
            proptest::prop_assert_eq!(
                stamp.to_rfc3339(),
                uhlc::NTP64(time).to_string_rfc3339_lossy()
            );
        }
    }

    #[test]
    fn rfc3339_at_known_instants() {
        let at = |secs: u64, frac: u64| Stamp::new(secs << 32 | frac, n(1)).to_rfc3339();
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
        assert_eq!(at(1_795_655_696, 1 << 31), "2026-11-26T01:14:56.500000000Z");
        // The largest fraction rounds up into the next second, as uhlc's does.
        assert_eq!(
            at(59, u64::from(u32::MAX)),
            "1970-01-01T00:01:00.000000000Z"
        );
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
