//! The causal context of a dot store: which events a state has seen.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::clock::{Dot, NodeId, VersionVector};

/// A set of dots kept as a version vector plus the few dots that arrived out of order.
///
/// After every change the context is compacted: cloud dots that extend the vector contiguously
/// move into it, and dots the vector already covers are dropped. Compaction makes equal sets
/// encode identically, and under per-origin in-order delivery the cloud stays empty, so the
/// context costs one entry per origin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DotContext {
    vv: VersionVector,
    cloud: BTreeSet<Dot>,
}

impl DotContext {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn contains(&self, dot: Dot) -> bool {
        self.vv.contains(dot) || self.cloud.contains(&dot)
    }

    pub fn insert(&mut self, dot: Dot) {
        self.extend([dot]);
    }

    pub fn merge(&mut self, other: &Self) {
        self.vv.merge(&other.vv);
        self.extend(other.cloud.iter().copied());
    }

    /// The next dot `node` mints. Only the node itself mints its dots, and it has seen all of
    /// them, so its own entry is contiguous and never in the cloud.
    pub fn next_dot(&self, node: NodeId) -> Dot {
        self.vv.next_dot(node)
    }

    /// The contiguous part; equal to the whole context when the cloud is empty.
    pub fn version_vector(&self) -> &VersionVector {
        &self.vv
    }

    /// Every dot of the context, if it holds at most `limit`: a delta's context names a few
    /// dots, where a full state's covers every write its set has seen.
    pub fn dots_up_to(&self, limit: usize) -> Option<Vec<Dot>> {
        let count = self
            .vv
            .iter()
            .try_fold(self.cloud.len() as u64, |count, (_, seq)| {
                count.checked_add(seq)
            })?;
        if count > limit as u64 {
            return None;
        }
        let mut dots = Vec::with_capacity(count as usize);
        for (node, seq) in self.vv.iter() {
            dots.extend((1..=seq).map(|seq| Dot::new(node, seq)));
        }
        dots.extend(self.cloud.iter().copied());
        Some(dots)
    }

    pub fn cloud_len(&self) -> usize {
        self.cloud.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.cloud.is_empty()
    }

    /// True when compaction would change nothing, as after every operation; decoded bytes
    /// may say otherwise, and a non-canonical context breaks `merge`'s identity laws.
    pub(crate) fn is_canonical(&self) -> bool {
        self.vv.is_canonical()
            && self
                .cloud
                .iter()
                .all(|dot| dot.seq.saturating_sub(1) > self.vv.get(dot.node))
    }

    fn compact(&mut self) {
        // The cloud is sorted by (node, seq), so one pass folds every contiguous run.
        let cloud = std::mem::take(&mut self.cloud);
        for dot in cloud {
            let have = self.vv.get(dot.node);
            // Checked: a hostile vector may sit at u64::MAX, and nothing follows that.
            if have.checked_add(1) == Some(dot.seq) {
                self.vv.raise(dot.node, dot.seq);
            } else if dot.seq > have {
                self.cloud.insert(dot);
            }
        }
    }
}

impl Extend<Dot> for DotContext {
    /// Inserts every dot, then compacts once.
    fn extend<I: IntoIterator<Item = Dot>>(&mut self, dots: I) {
        let vv = &self.vv;
        self.cloud
            .extend(dots.into_iter().filter(|&dot| !vv.contains(dot)));
        self.compact();
    }
}

impl FromIterator<Dot> for DotContext {
    fn from_iter<I: IntoIterator<Item = Dot>>(iter: I) -> Self {
        let mut ctx = Self::default();
        ctx.extend(iter);
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(node: u64, seq: u64) -> Dot {
        Dot::new(NodeId::new(node).unwrap(), seq)
    }

    #[test]
    fn out_of_order_dots_compact_once_the_gap_fills() {
        let mut ctx: DotContext = [dot(1, 3), dot(1, 2)].into_iter().collect();
        assert_eq!(ctx.cloud_len(), 2);
        assert!(ctx.contains(dot(1, 3)) && !ctx.contains(dot(1, 1)));
        ctx.insert(dot(1, 1));
        assert_eq!(ctx.cloud_len(), 0);
        assert_eq!(ctx.version_vector().get(dot(1, 1).node), 3);
    }

    #[test]
    fn merge_is_set_union() {
        let a: DotContext = [dot(1, 1), dot(2, 5)].into_iter().collect();
        let b: DotContext = [dot(2, 1), dot(1, 2)].into_iter().collect();
        let mut ab = a.clone();
        ab.merge(&b);
        for d in [dot(1, 1), dot(1, 2), dot(2, 1), dot(2, 5)] {
            assert!(ab.contains(d));
        }
        assert!(!ab.contains(dot(2, 2)));
        let mut ba = b;
        ba.merge(&a);
        assert_eq!(ab, ba);
    }

    #[test]
    fn extending_is_inserting_each_dot() {
        let dots = [
            dot(1, 3),
            dot(2, 1),
            dot(1, 1),
            dot(1, 2),
            dot(3, 9),
            dot(2, 1),
        ];
        let mut extended: DotContext = [dot(1, 5)].into_iter().collect();
        let mut inserted = extended.clone();
        extended.extend(dots);
        for d in dots {
            inserted.insert(d);
        }
        assert_eq!(extended, inserted);
        assert!(extended.is_canonical());
        assert_eq!(extended.version_vector().get(NodeId::new(1).unwrap()), 3);
    }

    #[test]
    fn a_small_context_lists_its_dots_and_a_large_one_does_not() {
        let ctx: DotContext = [dot(1, 1), dot(1, 2), dot(2, 7)].into_iter().collect();
        let mut dots = ctx.dots_up_to(3).unwrap();
        dots.sort();
        assert_eq!(dots, vec![dot(1, 1), dot(1, 2), dot(2, 7)]);
        assert_eq!(ctx.dots_up_to(2), None);
        let mut huge = DotContext::new();
        huge.vv.raise(NodeId::new(1).unwrap(), u64::MAX);
        huge.vv.raise(NodeId::new(2).unwrap(), u64::MAX);
        assert_eq!(
            huge.dots_up_to(usize::MAX),
            None,
            "the count must not overflow"
        );
    }
}
