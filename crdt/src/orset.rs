//! The add-wins observed-remove set, without tombstones.
//!
//! This is the optimized OR-Set of Bieniusa et al. (Riak's ORSWOT) in its delta-state form
//! (Almeida, Shoker, Baquero): every add mints a fresh dot for the element, a remove forgets
//! the element's dots it has observed, and a causal context remembers every dot ever seen. A
//! dot that is in a context but in no entry was removed; one missing from both has not arrived
//! yet. So a removed element needs no tombstone, and metadata is the live elements' dots plus a
//! context that compacts to one version vector.
//!
//! Dots count adds per key (`(node, n)` is the n-th dot `node` minted in this set), not
//! per-node WAL positions: per-key counters keep the context contiguous, hence compact.
//!
//! The elements live in a persistent B-tree ([`imbl::OrdMap`]): a copy shares every tree node
//! with its original, and a change copies only the tree nodes on its path. A server keeps the
//! state its readers see while its next write changes a copy, so an add to a set of n
//! elements costs O(log n), not a copy of the set. Merging a delta touches only the elements it names,
//! unless it removes dots whose element it does not name (a remove), which takes one
//! read-only pass over the set.

use imbl::OrdMap;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::clock::{Dot, NodeId, VersionVector};
use crate::context::DotContext;
use crate::dots::Dots;
use crate::json::CanonicalJson;
use crate::traits::Crdt;

/// The most dots a merged context may hold for its removed dots to be listed one by one
/// rather than checked against every element: a delta's context holds the dots it mints and
/// those it observed of the elements it names.
const LISTED_DOTS: usize = 256;

/// An add-wins OR-Set of JSON elements, in canonical order.
///
/// ```
/// use meridian_crdt::{CanonicalJson, Crdt, NodeId, OrSet};
/// let (a, b) = (NodeId::new(1).unwrap(), NodeId::new(2).unwrap());
/// let milk = CanonicalJson::parse(r#""milk""#).unwrap();
/// let mut here = OrSet::default();
/// here.apply(&here.add(a, [milk.clone()]));
/// let mut there = here.clone();
/// // Concurrently: `here` removes milk, `there` adds it again. The add wins.
/// let remove = here.remove([&milk]);
/// let add = there.add(b, [milk.clone()]);
/// here.apply(&remove);
/// here.apply(&add);
/// there.apply(&add);
/// there.apply(&remove);
/// assert_eq!(here, there);
/// assert!(here.contains(&milk));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrSet {
    #[serde(deserialize_with = "entries_without_presizing")]
    entries: Entries,
    context: DotContext,
}

impl OrSet {
    /// The delta that adds `elements` on behalf of `node`.
    #[must_use]
    pub fn add(&self, node: NodeId, elements: impl IntoIterator<Item = CanonicalJson>) -> Self {
        self.update(node, elements, [])
    }

    /// The delta that removes the observed instances of `elements`.
    #[must_use]
    pub fn remove<'a>(&self, elements: impl IntoIterator<Item = &'a CanonicalJson>) -> Self {
        let context = elements
            .into_iter()
            .filter_map(|element| self.entries.get(element))
            .flatten()
            .copied()
            .collect();
        Self {
            entries: OrdMap::new(),
            context,
        }
    }

    /// The delta of one request that removes some elements and adds others. An element in both
    /// lists ends up present: within a request, as across replicas, the add wins.
    #[must_use]
    pub fn update<'a>(
        &self,
        node: NodeId,
        add: impl IntoIterator<Item = CanonicalJson>,
        remove: impl IntoIterator<Item = &'a CanonicalJson>,
    ) -> Self {
        let mut delta = self.remove(remove);
        let mut next = self.context.next_dot(node);
        // The context takes the dots at the end, compacting once: one insert at a time
        // compacts a growing cloud each time, quadratic in the elements of one request.
        let mut dots = Vec::new();
        for element in add {
            if delta.entries.contains_key(&element) {
                continue;
            }
            dots.extend(self.entries.get(&element).into_iter().flatten().copied());
            dots.push(next);
            delta.entries.insert(element, Dots::one(next));
            next.seq += 1;
        }
        delta.context.extend(dots);
        delta
    }

    /// The delta that removes every observed element.
    #[must_use]
    pub fn clear(&self) -> Self {
        Self {
            entries: OrdMap::new(),
            context: self.entries.values().flatten().copied().collect(),
        }
    }

    pub fn contains(&self, element: &CanonicalJson) -> bool {
        self.entries.contains_key(element)
    }

    /// Elements in canonical (byte) order.
    pub fn elements(&self) -> impl ExactSizeIterator<Item = &CanonicalJson> {
        self.entries.keys()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn context(&self) -> &DotContext {
        &self.context
    }

    /// [`Crdt::merge`], listing the removed dots of a context that holds at most `limit`
    /// (exposed to tests, which hold the listing to the element-by-element check).
    #[cfg(feature = "arbitrary")]
    #[doc(hidden)]
    pub fn merge_with_listing_limit(&mut self, other: &Self, limit: usize) {
        self.merge_listing_up_to(other, limit);
    }

    fn merge_listing_up_to(&mut self, other: &Self, limit: usize) {
        self.forget_removed(other, limit);
        for (element, theirs) in &other.entries {
            let fresh: Vec<Dot> = theirs
                .iter()
                .copied()
                .filter(|&dot| !self.context.contains(dot))
                .collect();
            if !fresh.is_empty() {
                self.entries
                    .entry(element.clone())
                    .or_default()
                    .extend(fresh);
            }
        }
        self.context.merge(&other.context);
    }

    /// Drops the dots `other` removed: a dot survives if both sides hold it for the element, or
    /// one side holds it and the other never saw it; a dot one side saw but no longer holds
    /// for the element was removed there.
    fn forget_removed(&mut self, other: &Self, limit: usize) {
        // The dots of `other`'s context this side may hold, listed when there are few (a
        // delta's), else every dot of that context.
        let listed = other.context.dots_up_to(limit).map(|mut dots| {
            // Only a dot this side has seen can be one it holds.
            dots.retain(|&dot| self.context.contains(dot));
            dots.sort_unstable();
            dots
        });
        let seen = |dot: &Dot| match &listed {
            Some(dots) => dots.binary_search(dot).is_ok(),
            None => other.context.contains(*dot),
        };
        let forgotten = |element: &CanonicalJson, dots: &Dots| {
            let theirs = other.entries.get(element);
            let keeps = |dot: &Dot| !seen(dot) || theirs.is_some_and(|t| t.contains(dot));
            // Checked before anything is built: a pass over a large set allocates nothing
            // for the elements it keeps whole.
            if dots.iter().all(keeps) {
                return None;
            }
            let kept: Dots = dots.iter().copied().filter(keeps).collect();
            Some((element.clone(), kept))
        };
        // A delta that adds an element again forgets that element's earlier dots: the
        // elements it names are looked at first, and if they hold every listed dot, they are
        // all there is to look at. Otherwise (a remove names no element; a large context)
        // every element is.
        let named_suffice = listed.as_ref().is_some_and(|dots| {
            let found: usize = other
                .entries
                .keys()
                .filter_map(|element| self.entries.get(element))
                .map(|held| held.iter().filter(|dot| seen(dot)).count())
                .sum();
            found == dots.len()
        });
        let changed: Vec<(CanonicalJson, Dots)> = if named_suffice {
            other
                .entries
                .keys()
                .filter_map(|element| self.entries.get_key_value(element))
                .filter_map(|(element, dots)| forgotten(element, dots))
                .collect()
        } else {
            self.entries
                .iter()
                .filter_map(|(element, dots)| forgotten(element, dots))
                .collect()
        };
        for (element, kept) in changed {
            if kept.is_empty() {
                self.entries.remove(&element);
            } else {
                self.entries.insert(element, kept);
            }
        }
    }

    /// Refuses states in which an element holds a dot its context does not know, which no
    /// sequence of operations produces.
    pub(crate) fn validate(&self) -> Result<(), crate::CrdtError> {
        let consistent = self.entries.values().all(|dots| {
            !dots.is_empty() && dots.iter().all(|&d| d.seq > 0 && self.context.contains(d))
        });
        if !consistent {
            return Err(crate::CrdtError::Invalid("OR-Set dot outside its context"));
        }
        if !self.context.is_canonical() {
            return Err(crate::CrdtError::Invalid("OR-Set context not compacted"));
        }
        Ok(())
    }
}

type Entries = OrdMap<CanonicalJson, Dots>;

/// Decodes the elements one insert at a time. `imbl`'s own `Deserialize` reserves room for as
/// many elements as the length prefix claims, and that prefix comes from a disk or a peer:
/// a corrupt one would ask for terabytes and abort the node rather than fail the decode.
fn entries_without_presizing<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Entries, D::Error> {
    struct EntriesVisitor;

    impl<'de> Visitor<'de> for EntriesVisitor {
        type Value = Entries;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a map of set elements to their dots")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Entries, A::Error> {
            let mut entries = Entries::new();
            while let Some((element, dots)) = access.next_entry()? {
                entries.insert(element, dots);
            }
            Ok(entries)
        }
    }

    deserializer.deserialize_map(EntriesVisitor)
}

impl Crdt for OrSet {
    fn merge(&mut self, other: &Self) {
        self.merge_listing_up_to(other, LISTED_DOTS);
    }

    fn collect_garbage(&mut self, _stable: &VersionVector) -> bool {
        // The context is already compacted to a version vector on every change; it must stay,
        // even for an empty set, or a late delta of a removed add would resurrect the element.
        self.is_bottom()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn e(text: &str) -> CanonicalJson {
        CanonicalJson::parse(text).unwrap()
    }

    #[test]
    fn add_then_remove_then_add_again() {
        let mut s = OrSet::default();
        s.apply(&s.add(n(1), [e("1"), e("2")]));
        s.apply(&s.remove([&e("1")]));
        assert_eq!(s.elements().cloned().collect::<Vec<_>>(), vec![e("2")]);
        s.apply(&s.add(n(1), [e("1")]));
        assert!(s.contains(&e("1")));
        assert_eq!(s.context().cloud_len(), 0);
    }

    #[test]
    fn remove_only_removes_what_was_observed() {
        let mut a = OrSet::default();
        let mut b = OrSet::default();
        a.apply(&a.add(n(1), [e(r#""x""#)]));
        b.apply(&b.add(n(2), [e(r#""x""#)]));
        let remove = a.remove([&e(r#""x""#)]);
        a.apply(&remove);
        b.apply(&remove);
        a.merge(&b);
        assert!(
            a.contains(&e(r#""x""#)),
            "b's unobserved add must survive a's remove"
        );
    }

    #[test]
    fn update_adds_win_over_removes_in_the_same_request() {
        let mut s = OrSet::default();
        s.apply(&s.add(n(1), [e("7")]));
        let delta = s.update(n(1), [e("7")], [&e("7")]);
        s.apply(&delta);
        assert!(s.contains(&e("7")));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn clear_removes_everything_observed() {
        let mut s = OrSet::default();
        s.apply(&s.add(n(1), [e("1"), e("2"), e("3")]));
        s.apply(&s.clear());
        assert!(s.is_empty());
        assert!(!s.is_bottom(), "the context remembers the removed dots");
    }

    #[test]
    fn a_delta_that_arrives_before_its_add_still_removes_it() {
        let mut origin = OrSet::default();
        let add = origin.add(n(1), [e("1")]);
        origin.apply(&add);
        let remove = origin.remove([&e("1")]);
        let mut late = OrSet::default();
        late.apply(&remove);
        late.apply(&add);
        assert!(!late.contains(&e("1")));
    }
}
