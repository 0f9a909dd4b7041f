//! The dots one OR-Set element holds: almost always one, so kept inline.
//!
//! A `BTreeSet<Dot>` allocated a B-tree leaf (about 200 bytes) for every element, most of
//! a small element's memory, and one more allocation for every element a copied tree node
//! clones. An element holds more than one dot only after concurrent adds of it, until a
//! later add or remove replaces them.

use std::fmt;

use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use crate::clock::Dot;

/// A set of dots, sorted and without repeats; encoded as `BTreeSet<Dot>` was, a sequence in
/// order, so the bytes are the same.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Dots(SmallVec<[Dot; 1]>);

impl Dots {
    pub(crate) fn one(dot: Dot) -> Self {
        Self(SmallVec::from_buf([dot]))
    }

    pub(crate) fn contains(&self, dot: &Dot) -> bool {
        self.0.binary_search(dot).is_ok()
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Dot> {
        self.0.iter()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn normalize(&mut self) {
        self.0.sort_unstable();
        self.0.dedup();
    }
}

impl Extend<Dot> for Dots {
    fn extend<I: IntoIterator<Item = Dot>>(&mut self, dots: I) {
        self.0.extend(dots);
        self.normalize();
    }
}

impl FromIterator<Dot> for Dots {
    fn from_iter<I: IntoIterator<Item = Dot>>(dots: I) -> Self {
        let mut out = Self(dots.into_iter().collect());
        out.normalize();
        out
    }
}

impl<'a> IntoIterator for &'a Dots {
    type Item = &'a Dot;
    type IntoIter = std::slice::Iter<'a, Dot>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for Dots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl Serialize for Dots {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for dot in &self.0 {
            seq.serialize_element(dot)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Dots {
    /// As `BTreeSet` decodes: any order, repeats dropped. No room is reserved from the length
    /// prefix, which comes from a disk or a peer.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DotsVisitor;

        impl<'de> Visitor<'de> for DotsVisitor {
            type Value = Dots;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a set of dots")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Dots, A::Error> {
                let mut dots = SmallVec::new();
                while let Some(dot) = access.next_element()? {
                    dots.push(dot);
                }
                let mut dots = Dots(dots);
                dots.normalize();
                Ok(dots)
            }
        }

        deserializer.deserialize_seq(DotsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::clock::NodeId;

    fn dot() -> impl Strategy<Value = Dot> {
        (1_u64..4, 0_u64..6).prop_map(|(node, seq)| Dot::new(NodeId::new(node).unwrap(), seq))
    }

    proptest! {
        /// The same set, the same bytes, and the same decoding of any sequence as a
        /// `BTreeSet<Dot>`, which elements held before.
        #[test]
        fn dots_behave_and_encode_as_a_btree_set(
            dots in proptest::collection::vec(dot(), 0..6),
            more in proptest::collection::vec(dot(), 0..3),
            probe in dot(),
        ) {
            let reference: BTreeSet<Dot> = dots.iter().copied().collect();
            let mut ours: Dots = dots.iter().copied().collect();
            prop_assert_eq!(ours.iter().copied().collect::<Vec<_>>(), reference.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(ours.contains(&probe), reference.contains(&probe));
            prop_assert_eq!(postcard::to_allocvec(&ours).unwrap(), postcard::to_allocvec(&reference).unwrap());
            let raw = postcard::to_allocvec(&dots).unwrap();
            let decoded: Dots = postcard::from_bytes(&raw).unwrap();
            let decoded_reference: BTreeSet<Dot> = postcard::from_bytes(&raw).unwrap();
            prop_assert_eq!(decoded.iter().copied().collect::<Vec<_>>(), decoded_reference.into_iter().collect::<Vec<_>>());
            let mut reference = reference;
            reference.extend(more.iter().copied());
            ours.extend(more.iter().copied());
            prop_assert_eq!(ours.iter().copied().collect::<Vec<_>>(), reference.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_huge_claimed_length_is_an_error_not_an_allocation() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
        assert!(postcard::from_bytes::<Dots>(&bytes).is_err());
    }
}
