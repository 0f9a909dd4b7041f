//! Meridian's conflict-free replicated data types.
//!
//! # How it fits
//! Every value Meridian stores is one of four CRDTs: [`LwwRegister`], [`PnCounter`],
//! [`GCounter`] and [`OrSet`]. They are *delta-state* CRDTs ([`Crdt`]): a write generates a
//! small delta from the current state without mutating it; the server appends the delta to its
//! WAL inside an [`Op`] stamped with an HLC [`Stamp`] and a [`Dot`], applies it, and replication
//! ships it to every other region, where applying it again, late, twice or out of order, lands
//! on the same state. Anti-entropy merges whole [`State`]s with the same join.
//!
//! This crate does no I/O and no async; [`codec`] gives the compact, versioned bytes that
//! storage and the wire use.
//!
//! # Semantics
//! - **LWW-Register**: highest `(HLC time, node)` wins; delete writes a tombstone a later write
//!   revives; stable tombstones are garbage-collected.
//! - **PN-Counter / G-Counter**: exact per-origin sums; delete is an *observed reset* that
//!   removes what the resetting replica had seen, while concurrent increments survive.
//! - **OR-Set**: add-wins; no per-element tombstones; metadata is the live elements' dots plus
//!   one compacted causal context.
//! - Elements and values are [`CanonicalJson`], so equal JSON is one element.

mod clock;
pub mod codec;
mod context;
mod counter;
mod dots;
mod json;
mod lww;
mod orset;
mod traits;
mod value;

#[cfg(feature = "arbitrary")]
pub mod arbitrary;

pub use clock::{Dot, NodeId, Stamp, VersionVector};
pub use context::DotContext;
pub use counter::{GCounter, PnCounter, Totals};
pub use json::{CanonicalJson, needs_no_escaping};
pub use lww::{LwwEntry, LwwRegister};
pub use orset::OrSet;
pub use traits::Crdt;
pub use value::{Kind, Op, State};

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrdtError {
    #[error("node id 0 is reserved")]
    ZeroNodeId,
    #[error("clock id is not a Meridian node id")]
    ForeignClockId,
    #[error("counter would overflow 64 bits")]
    CounterOverflow,
    #[error("states of different types cannot merge")]
    KindMismatch,
    #[error("unknown type")]
    UnknownKind,
    #[error("empty input")]
    Truncated,
    #[error("unsupported encoding version {0}")]
    UnsupportedVersion(u8),
    #[error("malformed encoding: {0}")]
    Decode(postcard::Error),
    #[error("{0} unexpected bytes after the value")]
    TrailingBytes(usize),
    #[error("invalid state: {0}")]
    Invalid(&'static str),
}
