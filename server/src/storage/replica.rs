//! The storage side of replication: [`ReplicaStore`] over redb.

use std::collections::BTreeMap;
use std::future::Future;

use meridian_crdt::{Kind, NodeId, Op, Stamp, State, VersionVector, codec};
use meridian_replication::gc::GcStats;
use meridian_replication::merkle::{self, Hash};
use meridian_replication::store::{Applying, ReplicaStore, StateRead, StoreError};
use tokio::sync::{oneshot, watch};

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
        self.queue_remote_ops(ops).await.await
    }

    /// Queues ops shipped by a peer behind everything queued before them; the returned future
    /// completes once they are durable. See [`ReplicaStore::queue_remote`].
    pub async fn queue_remote_ops(&self, ops: Vec<Op>) -> Applying {
        let now = uhlc::system_time_clock().as_u64();
        self.inner
            .metrics
            .record_receive_lag(ops.iter().map(|op| op.stamp.time), now);
        let (reply, answer) = oneshot::channel();
        if let Err(error) = self.send(Command::Remote { ops, reply }).await {
            return Box::pin(std::future::ready(Err(unavailable(error))));
        }
        Box::pin(async move {
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
        })
    }

    /// Reads WAL entries of `origin` after `after`; see [`ReplicaStore::read_wal`].
    pub fn read_wal_ops(
        &self,
        origin: NodeId,
        after: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<Op>, StoreError> {
        let start = after.saturating_add(1);
        // The WAL may hold ops applied but not yet durable in the journal; those must not
        // leave this node, or a crash could reissue their sequences with other contents.
        let durable = self.applied().get(origin);
        let view = self.inner.memtable.view(&self.inner.db);
        let entries = view
            .wal_range(origin, start, durable, max_ops)
            .map_err(unavailable)?;
        drop(view);
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        for (seq, encoded) in entries {
            if ops.is_empty() && seq != start {
                return Err(StoreError::Truncated {
                    origin,
                    first_available: seq,
                });
            }
            if seq != start + ops.len() as u64
                || ops.len() == max_ops
                || (!ops.is_empty() && bytes + encoded.len() > max_bytes)
            {
                break;
            }
            bytes += encoded.len();
            let op = codec::decode_op(&encoded)
                .map_err(|e| unavailable(format!("WAL entry {origin}:{seq}: {e}")))?;
            ops.push(op);
        }
        if ops.is_empty() && durable >= start {
            // Applied here but gone from the WAL: truncated past what the peer needs.
            return Err(StoreError::Truncated {
                origin,
                first_available: durable + 1,
            });
        }
        Ok(ops)
    }

    /// Remembers a peer's acknowledged vector; persisted with the next fold.
    pub fn set_peer_applied(&self, peer: NodeId, applied: &VersionVector) {
        if let Ok(mut peers) = self.inner.peer_applied.lock() {
            peers.insert(peer, applied.clone());
        }
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

    fn queue_remote(&self, ops: Vec<Op>) -> impl Future<Output = Applying> + Send {
        self.queue_remote_ops(ops)
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

    fn fast_forward(
        &self,
        origin: NodeId,
        to: u64,
    ) -> impl Future<Output = Result<VersionVector, StoreError>> + Send {
        let this = self.clone();
        async move {
            this.fast_forward_applied(origin, to)
                .await
                .map_err(unavailable)
        }
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

/// Tombstones handed to the applier per purge, so a pass never holds the write path for long.
const GC_BATCH: usize = 1024;

impl Storage {
    /// Garbage collection at a stable frontier (see `meridian_replication::gc`): purges, in
    /// batches through the applier, every folded register tombstone `frontier` covers.
    pub async fn collect_stable(&self, frontier: &VersionVector) -> Result<GcStats, StorageError> {
        let mut stats = GcStats::default();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let round = self
                .collect_garbage(frontier, GC_BATCH, after.as_deref())
                .await?;
            stats.keys_examined += round.examined;
            stats.keys_removed += round.purged;
            // A batch that did not fill up reached the end of the index.
            if round.examined < GC_BATCH as u64 || round.last.is_none() {
                return Ok(stats);
            }
            after = round.last;
        }
    }
}

/// How long serving states waits for the snapshot's ops to become durable here.
const DURABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Storage {
    /// See [`ReplicaStore::fast_forward`].
    pub async fn fast_forward_applied(
        &self,
        origin: NodeId,
        to: u64,
    ) -> Result<VersionVector, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::FastForward { origin, to, reply })
            .await?;
        answer.await.map_err(|_| StorageError::ShuttingDown)
    }

    /// Joins full states into storage keys through the group commit, logging no op (see
    /// ARCHITECTURE.md, "Anti-entropy path", for why that is correct). Returns how many keys
    /// changed.
    pub async fn merge_full_states(
        &self,
        states: Vec<(Vec<u8>, State)>,
    ) -> Result<u64, StorageError> {
        for (_, state) in &states {
            self.observe_state_stamp(state);
        }
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
            let view = self.inner.memtable.view(&self.inner.db);
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                let state = view.encoded_state(&key).map_err(unavailable)?;
                out.push((key, state));
            }
            (out, view.applied().clone())
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
