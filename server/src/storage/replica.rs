//! The storage side of replication: [`ReplicaStore`] over redb.

use std::collections::BTreeMap;
use std::future::Future;

use meridian_crdt::{Kind, NodeId, Op, Stamp, State, VersionVector, codec};
use meridian_replication::gc::GcStats;
use meridian_replication::merkle::{self, Hash};
use meridian_replication::store::{ReplicaStore, StateRead, StoreError};
use redb::{ReadableDatabase, ReadableTable};
use tokio::sync::{oneshot, watch};

use super::tables::{APPLIED, STATES, WAL};
use super::{Command, Storage, StorageError};

/// Why a batch of remote ops was not (wholly) applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    #[error("gap in ops of node {origin}: expected {expected}, got {got}")]
    Gap {
        origin: NodeId,
        expected: u64,
        got: u64,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

impl Storage {
    /// Applies ops shipped by a peer, durably, through the same group commit as local writes.
    pub async fn apply_remote_ops(&self, ops: Vec<Op>) -> Result<VersionVector, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Remote { ops, reply })
            .await
            .map_err(unavailable)?;
        match answer.await {
            Ok(Ok(applied)) => Ok(applied),
            Ok(Err(RemoteError::Gap {
                origin,
                expected,
                got,
            })) => Err(StoreError::Gap {
                origin,
                expected,
                got,
            }),
            Ok(Err(RemoteError::Storage(e))) => Err(unavailable(e)),
            Err(_) => Err(unavailable(StorageError::ShuttingDown)),
        }
    }

    /// Reads WAL entries of `origin` after `after`; see [`ReplicaStore::read_wal`].
    pub fn read_wal_ops(
        &self,
        origin: NodeId,
        after: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<Op>, StoreError> {
        let read = self.inner.db.begin_read().map_err(unavailable)?;
        let table = read.open_table(WAL).map_err(unavailable)?;
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        let start = after.saturating_add(1);
        // The WAL table may hold ops applied but not yet durable in the journal; those must
        // not leave this node, or a crash could reissue their sequences with other contents.
        let durable = self.applied().get(origin);
        for entry in table
            .range((origin.get(), start)..=(origin.get(), u64::MAX))
            .map_err(unavailable)?
        {
            let (key, value) = entry.map_err(unavailable)?;
            let (_, seq) = key.value();
            if seq > durable {
                break;
            }
            if ops.is_empty() && seq != start {
                return Err(StoreError::Truncated {
                    origin,
                    first_available: seq,
                });
            }
            if ops.len() == max_ops || (!ops.is_empty() && bytes + value.value().len() > max_bytes)
            {
                break;
            }
            bytes += value.value().len();
            let op = codec::decode_op(value.value())
                .map_err(|e| unavailable(format!("WAL entry {origin}:{seq}: {e}")))?;
            ops.push(op);
        }
        if ops.is_empty() && self.applied().get(origin) >= start {
            // Applied here but gone from the WAL: truncated past what the peer needs.
            return Err(StoreError::Truncated {
                origin,
                first_available: self.applied().get(origin) + 1,
            });
        }
        Ok(ops)
    }

    /// Remembers a peer's acknowledged vector; persisted with the next group commit.
    pub fn set_peer_applied(&self, peer: NodeId, applied: &VersionVector) {
        if let Ok(mut peers) = self.inner.peer_applied.lock() {
            peers.insert(peer, applied.clone());
        }
        // Best effort: a lost update only delays WAL truncation until the next ack.
        let _ = self.inner.commands.try_send(Command::PeerApplied {
            peer,
            applied: applied.clone(),
        });
    }

    pub fn peer_vectors(&self) -> BTreeMap<NodeId, VersionVector> {
        self.inner
            .peer_applied
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }
}

impl ReplicaStore for Storage {
    fn node_id(&self) -> NodeId {
        Self::node_id(self)
    }

    fn applied(&self) -> VersionVector {
        Self::applied(self)
    }

    fn watch_applied(&self) -> watch::Receiver<VersionVector> {
        Self::watch_applied(self)
    }

    fn read_wal(
        &self,
        origin: NodeId,
        after: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<Op>, StoreError> {
        self.read_wal_ops(origin, after, max_ops, max_bytes)
    }

    fn apply_remote(
        &self,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<VersionVector, StoreError>> + Send {
        let this = self.clone();
        async move { this.apply_remote_ops(ops).await }
    }

    fn record_peer_applied(&self, peer: NodeId, applied: &VersionVector) -> Result<(), StoreError> {
        self.set_peer_applied(peer, applied);
        Ok(())
    }

    fn peer_applied(&self) -> BTreeMap<NodeId, VersionVector> {
        self.peer_vectors()
    }

    fn observe_stamp(&self, stamp: Stamp) -> bool {
        Self::observe_stamp(self, stamp)
    }

    fn now(&self) -> Stamp {
        Self::now(self)
    }

    fn read_state(&self, kind: Kind, key: &str) -> Result<StateRead, StoreError> {
        let (state, applied) = self.get_with_applied(kind, key).map_err(unavailable)?;
        Ok(StateRead { state, applied })
    }

    fn tree_children(&self, depth: u8, prefixes: &[u32]) -> Result<Vec<Hash>, StoreError> {
        Ok(self.with_tree(|tree| merkle::children_of(tree, depth, prefixes)))
    }

    fn bucket_items(
        &self,
        buckets: &[u32],
        max_items: usize,
    ) -> Result<Vec<(Vec<u8>, Hash)>, StoreError> {
        self.with_tree(|tree| merkle::items_of(tree, buckets, max_items))
    }

    fn read_states(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<(Vec<u8>, Option<Vec<u8>>)>, StoreError>> + Send {
        let this = self.clone();
        async move { this.read_encoded_states(keys).await }
    }

    fn merge_states(
        &self,
        states: Vec<(Vec<u8>, State)>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let this = self.clone();
        async move { this.merge_full_states(states).await.map_err(unavailable) }
    }

    fn collect_garbage(
        &self,
        frontier: &VersionVector,
    ) -> impl Future<Output = Result<GcStats, StoreError>> + Send {
        let this = self.clone();
        let frontier = frontier.clone();
        async move { this.collect_stable(&frontier).await.map_err(unavailable) }
    }
}

/// Keys handed to the writer per garbage-collection command, so a pass never holds the write
/// path for long.
const GC_BATCH: usize = 1024;

impl Storage {
    /// Garbage collection at a stable frontier (see `meridian_replication::gc`): finds the
    /// register tombstones `frontier` covers in a read snapshot, then deletes them through the
    /// writer in batches, which re-checks each key in its own transaction. Only registers are
    /// scanned: the other types' `collect_garbage` keeps their metadata today (see the crdt
    /// crate), so scanning them would find nothing.
    ///
    /// A deliberately small implementation: one full scan of the registers per pass. A store
    /// with a tombstone index (or a to-do table fed by deletes) would avoid the scan.
    pub async fn collect_stable(&self, frontier: &VersionVector) -> Result<GcStats, StorageError> {
        let mut stats = GcStats::default();
        let mut candidates = Vec::new();
        {
            let read = self.inner.db.begin_read()?;
            let table = read.open_table(STATES)?;
            let tag = [Kind::Register.tag()];
            let end = [Kind::Register.tag() + 1];
            for entry in table.range(tag.as_slice()..end.as_slice())? {
                let (key, value) = entry?;
                stats.keys_examined += 1;
                let Ok(mut state) = codec::decode_state(value.value()) else {
                    continue; // reported by whoever reads it; not GC's to judge
                };
                let before = state.clone();
                if state.collect_garbage(frontier) || state != before {
                    candidates.push(key.value().to_vec());
                }
            }
        }
        for keys in candidates.chunks(GC_BATCH) {
            let (reply, answer) = oneshot::channel();
            self.send(Command::Collect {
                keys: keys.to_vec(),
                frontier: frontier.clone(),
                reply,
            })
            .await?;
            let changed = answer.await.map_err(|_| StorageError::ShuttingDown)??;
            stats.keys_removed += changed;
        }
        Ok(stats)
    }
}

/// How long serving states waits for the snapshot's ops to become durable here.
const DURABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Storage {
    /// Joins full states into storage keys through the group commit, logging no op (see
    /// ARCHITECTURE.md, "Anti-entropy path", for why that is correct). Returns how many keys
    /// changed.
    pub async fn merge_full_states(
        &self,
        states: Vec<(Vec<u8>, State)>,
    ) -> Result<u64, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Merge { states, reply }).await?;
        answer.await.map_err(|_| StorageError::ShuttingDown)?
    }

    /// The encoded states of storage keys from one snapshot, once every op that snapshot
    /// covers is durable: an op a crash could still lose (and whose dot would then be
    /// reissued with other contents) never leaves the node.
    pub async fn read_encoded_states(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<(Vec<u8>, Option<Vec<u8>>)>, StoreError> {
        let (states, snapshot) = {
            let read = self.inner.db.begin_read().map_err(unavailable)?;
            let table = read.open_table(STATES).map_err(unavailable)?;
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                let state = table
                    .get(key.as_slice())
                    .map_err(unavailable)?
                    .map(|v| v.value().to_vec());
                out.push((key, state));
            }
            let mut applied = VersionVector::new();
            for entry in read
                .open_table(APPLIED)
                .map_err(unavailable)?
                .iter()
                .map_err(unavailable)?
            {
                let (origin, seq) = entry.map_err(unavailable)?;
                if let Some(origin) = NodeId::new(origin.value()) {
                    applied.set(origin, seq.value());
                }
            }
            (out, applied)
        };
        let mut durable = self.watch_applied();
        let covered = tokio::time::timeout(
            DURABLE_WAIT,
            durable.wait_for(|applied| applied.dominates(&snapshot)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if covered {
            Ok(states)
        } else {
            Err(unavailable("the states did not become durable in time"))
        }
    }
}
