//! The four types behind one enum, so storage and replication can treat every key alike.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CrdtError;
use crate::clock::{Dot, Stamp, VersionVector};
use crate::counter::{GCounter, PnCounter};
use crate::lww::LwwRegister;
use crate::orset::OrSet;
use crate::traits::Crdt;

/// Which CRDT a key holds. It is part of the key's address, so one key never holds two types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Register,
    Counter,
    GCounter,
    Set,
}

impl Kind {
    pub const ALL: [Self; 4] = [Self::Register, Self::Counter, Self::GCounter, Self::Set];

    /// The collection name in `/v1/{collection}/{key}`.
    pub const fn collection(self) -> &'static str {
        match self {
            Self::Register => "registers",
            Self::Counter => "counters",
            Self::GCounter => "gcounters",
            Self::Set => "sets",
        }
    }

    /// A one-byte tag, for storage keys that must sort by kind.
    pub const fn tag(self) -> u8 {
        match self {
            Self::Register => 1,
            Self::Counter => 2,
            Self::GCounter => 3,
            Self::Set => 4,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.tag() == tag)
    }
}

impl FromStr for Kind {
    type Err = CrdtError;
    fn from_str(collection: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.collection() == collection)
            .ok_or(CrdtError::UnknownKind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.collection())
    }
}

/// The state of one key, or a delta to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    Register(LwwRegister),
    Counter(PnCounter),
    GCounter(GCounter),
    Set(OrSet),
}

impl State {
    /// The empty state of `kind`.
    pub fn bottom(kind: Kind) -> Self {
        match kind {
            Kind::Register => Self::Register(LwwRegister::default()),
            Kind::Counter => Self::Counter(PnCounter::default()),
            Kind::GCounter => Self::GCounter(GCounter::default()),
            Kind::Set => Self::Set(OrSet::default()),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Register(_) => Kind::Register,
            Self::Counter(_) => Kind::Counter,
            Self::GCounter(_) => Kind::GCounter,
            Self::Set(_) => Kind::Set,
        }
    }

    /// Joins `other` into `self`; states of different kinds never merge.
    pub fn merge(&mut self, other: &Self) -> Result<(), CrdtError> {
        match (self, other) {
            (Self::Register(a), Self::Register(b)) => a.merge(b),
            (Self::Counter(a), Self::Counter(b)) => a.merge(b),
            (Self::GCounter(a), Self::GCounter(b)) => a.merge(b),
            (Self::Set(a), Self::Set(b)) => a.merge(b),
            _ => return Err(CrdtError::KindMismatch),
        }
        Ok(())
    }

    pub fn collect_garbage(&mut self, stable: &VersionVector) -> bool {
        match self {
            Self::Register(r) => r.collect_garbage(stable),
            Self::Counter(c) => c.collect_garbage(stable),
            Self::GCounter(c) => c.collect_garbage(stable),
            Self::Set(s) => s.collect_garbage(stable),
        }
    }

    pub fn is_bottom(&self) -> bool {
        match self {
            Self::Register(r) => r.is_bottom(),
            Self::Counter(c) => c.is_bottom(),
            Self::GCounter(c) => c.is_bottom(),
            Self::Set(s) => s.is_bottom(),
        }
    }

    /// Checks invariants no operation can break but corrupted or hostile bytes could.
    pub(crate) fn validate(&self) -> Result<(), CrdtError> {
        match self {
            Self::Counter(c) => c.validate(),
            Self::GCounter(c) => c.validate(),
            Self::Set(s) => s.validate(),
            Self::Register(_) => Ok(()),
        }
    }
}

/// One logged operation: the unit the WAL stores and replication ships.
///
/// `dot` is the op's place in its origin's log (origin, sequence from 1, contiguous), `stamp`
/// the origin's HLC reading when it made the op.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Op {
    pub dot: Dot,
    pub stamp: Stamp,
    pub key: String,
    pub delta: State,
}

impl Op {
    pub fn kind(&self) -> Kind {
        self.delta.kind()
    }
}
