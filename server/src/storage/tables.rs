//! The redb schema. One file holds every table, so one write transaction covers a key's new
//! state, the op in the WAL, and the applied vector: they are durable together or not at all.

use meridian_crdt::Kind;
use redb::TableDefinition;

/// `[kind tag][key bytes]` → encoded `State`. The tag prefix keeps each type's keys together,
/// so listing one type is one range scan.
pub(crate) const STATES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("states");

/// `(origin, sequence)` → encoded `Op`: every op this node applied, its own and relayed ones,
/// until every peer has acknowledged it.
pub(crate) const WAL: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("wal");

/// origin → highest contiguous sequence applied here.
pub(crate) const APPLIED: TableDefinition<u64, u64> = TableDefinition::new("applied");

/// peer → encoded version vector the peer acknowledged as durably applied.
pub(crate) const PEER_APPLIED: TableDefinition<u64, &[u8]> = TableDefinition::new("peer_applied");

/// State key → dot of the register tombstone it holds: what garbage collection looks at, so a
/// round costs the tombstones, not the whole keyspace.
pub(crate) const TOMBSTONES: TableDefinition<&[u8], (u64, u64)> =
    TableDefinition::new("tombstones");

/// Node identity and bookkeeping; see the `META_*` keys.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The node id this data directory belongs to; a node refuses another node's data.
pub(crate) const META_NODE_ID: &str = "node_id";
/// The storage schema version, checked at open.
pub(crate) const META_SCHEMA: &str = "schema_version";

/// An HLC reading taken at the last checkpoint, ahead of every stamp issued before it (later
/// ones are in the journal): a restart never reissues an older stamp, even if the wall clock
/// went backwards meanwhile.
pub(crate) const META_LAST_STAMP: &str = "last_stamp";

/// Present once [`TOMBSTONES`] indexes every tombstone in [`STATES`] (data directories from
/// before the index get it built at open).
pub(crate) const META_TOMBSTONE_INDEX: &str = "tombstone_index";

/// The random id of this database's journal, also written into the journal directory
/// (`journal.id`), so a node never starts on a journal that is not its own, or without it.
pub(crate) const META_JOURNAL_ID: &str = "journal_id";

/// The journal segment the last durable checkpoint started.
pub(crate) const META_CHECKPOINT: &str = "checkpoint_segment";

pub(crate) const SCHEMA_VERSION: u8 = 1;

/// The dot of the tombstone `state` is, if it is a register tombstone.
pub(crate) fn tombstone_dot(state: &meridian_crdt::State) -> Option<meridian_crdt::Dot> {
    match state {
        meridian_crdt::State::Register(r) => r.entry().filter(|e| e.value.is_none()).map(|e| e.dot),
        _ => None,
    }
}

pub(crate) fn state_key(kind: Kind, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + key.len());
    out.push(kind.tag());
    out.extend_from_slice(key.as_bytes());
    out
}

/// Splits a state key back into its kind and user key; `None` for bytes no writer produced.
pub(crate) fn split_state_key(bytes: &[u8]) -> Option<(Kind, &str)> {
    let (&tag, rest) = bytes.split_first()?;
    Some((Kind::from_tag(tag)?, std::str::from_utf8(rest).ok()?))
}
