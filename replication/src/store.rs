//! What replication needs from a node's storage, and nothing more.
//!
//! The server implements [`ReplicaStore`] over redb; [`crate::mem::MemStore`] implements it in
//! memory for tests and simulation. Keeping the protocol behind this trait is what lets the
//! same replication code run over real disks, an in-memory store, or a simulated cluster.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_crdt::{Kind, NodeId, Op, Stamp, State, VersionVector};

use crate::gc::GcStats;
use crate::merkle::Hash;
use tokio::sync::watch;

/// Storage failures as replication sees them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The WAL no longer holds the requested ops: they were truncated. The peer must be
    /// repaired by anti-entropy, then resume from `first_available - 1`.
    #[error("ops of node {origin} before sequence {first_available} were truncated")]
    Truncated {
        origin: NodeId,
        first_available: u64,
    },
    /// An op arrived whose predecessors of the same origin have not been applied.
    #[error("gap in ops of node {origin}: expected sequence {expected}, got {got}")]
    Gap {
        origin: NodeId,
        expected: u64,
        got: u64,
    },
    /// The op is malformed for this store (wrong type for its key, too large, ...).
    #[error("rejected op {origin}:{seq}: {reason}")]
    Rejected {
        origin: NodeId,
        seq: u64,
        reason: String,
    },
    /// The store is shutting down or failed; the caller should stop.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// Storage keys with their encoded states (`None`: absent), as anti-entropy exchanges them.
pub type EncodedStates = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The outcome of remote ops queued with [`ReplicaStore::queue_remote`]: the applied vector
/// once they are durable.
pub type Applying =
    std::pin::Pin<Box<dyn Future<Output = Result<VersionVector, StoreError>> + Send>>;

/// One key's state as a node holds it, for quorum reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRead {
    /// `None` when the key was never written here.
    pub state: Option<State>,
    /// The node's applied vector in the same snapshot as `state`: the state reflects every op
    /// this vector covers (and possibly ops applied but not yet durable beyond it).
    pub applied: VersionVector,
}

/// A node's durable state as replication uses it.
///
/// Every node's WAL keeps the ops of *every* origin it has applied (its own and relayed ones),
/// keyed by (origin, sequence), until every peer has acknowledged them. That is what lets any
/// survivor hand a dead node's ops to the others.
pub trait ReplicaStore: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> NodeId;

    /// For each origin, the highest sequence such that all of its ops up to it are durably
    /// applied here (this node's own writes included).
    fn applied(&self) -> VersionVector;

    /// Follows [`Self::applied`]: changes after every commit, local or remote.
    fn watch_applied(&self) -> watch::Receiver<VersionVector>;

    /// Up to `max_ops` ops (and roughly at most `max_bytes` encoded) of `origin` with sequence
    /// greater than `after`, in sequence order. Returns an empty vector when there are none yet,
    /// and [`StoreError::Truncated`] when `after + 1` is no longer in the WAL. A store may drop
    /// an op from its WAL only once the Merkle tree it serves reflects the op: the peer told
    /// it is truncated repairs by anti-entropy and then skips it ([`Self::fast_forward`]).
    ///
    /// Must return at least one op when `after + 1` exists, even if that op alone exceeds
    /// `max_bytes`: otherwise an oversized op would stall its origin forever.
    fn read_wal(
        &self,
        origin: NodeId,
        after: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<Op>, StoreError>;

    /// Durably applies remote ops, each origin's in sequence order. Ops already applied are
    /// skipped (idempotence); an op whose predecessor is missing stops that origin with
    /// [`StoreError::Gap`] after the ops before it were applied. Returns the applied vector
    /// after the commit.
    fn apply_remote(
        &self,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<VersionVector, StoreError>> + Send;

    /// As [`ReplicaStore::apply_remote`] in two steps, so a subscriber need not wait for one
    /// batch to be durable before it hands over the next: the returned future completes once
    /// the ops are queued behind every earlier call, and what it yields completes with their
    /// outcome. A store whose applies cannot be queued does the whole apply in the first step
    /// (this default).
    // The two steps are the point: the first future queues, the one it yields completes.
    #[allow(clippy::async_yields_async)]
    fn queue_remote(&self, ops: Vec<Op>) -> impl Future<Output = Applying> + Send {
        async move {
            let outcome = self.apply_remote(ops).await;
            Box::pin(std::future::ready(outcome)) as Applying
        }
    }

    /// Persists what `peer` has durably applied, learned from its acks. WAL truncation and
    /// garbage collection take the minimum over all peers.
    fn record_peer_applied(&self, peer: NodeId, applied: &VersionVector) -> Result<(), StoreError>;

    /// The last persisted vector of every peer, as loaded at start-up and since recorded.
    fn peer_applied(&self) -> BTreeMap<NodeId, VersionVector>;

    /// Feeds a remote HLC stamp into the local clock. Returns false, and leaves the clock
    /// alone, when the stamp is further ahead of local time than the configured maximum skew.
    fn observe_stamp(&self, stamp: Stamp) -> bool;

    /// A fresh reading of the local HLC.
    fn now(&self) -> Stamp;

    /// One key's state and the applied vector of the same snapshot, answering a peer's quorum
    /// read. Must not block for long: it runs on the replication endpoint's tasks.
    fn read_state(&self, kind: Kind, key: &str) -> Result<StateRead, StoreError>;

    /// Anti-entropy: the [`crate::merkle::FANOUT`] children hashes of each Merkle node
    /// `(depth, prefix)`, concatenated in order (see [`crate::merkle::MerkleTree::children`]).
    fn tree_children(&self, depth: u8, prefixes: &[u32]) -> Result<Vec<Hash>, StoreError>;

    /// Anti-entropy: every (storage key, state hash) of the listed buckets, in bucket then key
    /// order. Fails with [`StoreError::Rejected`] rather than return more than `max_items`.
    fn bucket_items(
        &self,
        buckets: &[u32],
        max_items: usize,
    ) -> Result<Vec<(Vec<u8>, Hash)>, StoreError>;

    /// Anti-entropy: the encoded states of storage keys (`None`: absent), in order. Returns
    /// only durable states: it waits until the applied vector of the snapshot it read is
    /// durable, so no op that a crash could lose (and its dot be reissued) leaves the node.
    fn read_states(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<EncodedStates, StoreError>> + Send;

    /// Anti-entropy: joins full states into storage keys (each state's kind matches its key's,
    /// checked by the caller) through the node's write pipeline, updating the Merkle tree and
    /// logging no op. Returns how many keys changed.
    fn merge_states(
        &self,
        states: Vec<(Vec<u8>, State)>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// After anti-entropy repaired what the WAL path can no longer deliver: records that this
    /// node's state covers every op of `origin` up to `to`, raising the applied vector to
    /// match, so that the WAL path resumes after `to`. The caller guarantees the coverage (see
    /// `node::fast_forward`); the store makes the raise durable, after every state merged
    /// before the call, and reports it in [`Self::applied`] only once it is. Ops of `origin`
    /// up to `to` that this node never received are then missing from its WAL, and
    /// [`Self::read_wal`] answers [`StoreError::Truncated`] for them. Returns the applied vector
    /// after the raise (unchanged if it already covered `to`).
    fn fast_forward(
        &self,
        origin: NodeId,
        to: u64,
    ) -> impl Future<Output = Result<VersionVector, StoreError>> + Send;

    /// Garbage collection at causal stability: drops the metadata that `frontier` (a
    /// [`crate::gc::Frontier::Stable`] vector) makes unnecessary, through
    /// [`meridian_crdt::Crdt::collect_garbage`] on each state — today, register tombstones
    /// whose dot it covers. A state that becomes nothing is deleted and leaves the Merkle tree;
    /// one that only shrinks is rewritten and rehashed. Logs no op and moves no applied vector.
    ///
    /// The replicator calls it every `gc.interval`; it may take a while on a large store, and
    /// must not hold the write path for long at a time (work in small batches). Calling it
    /// with a vector that is not a stable frontier can resurrect deleted values.
    fn collect_garbage(
        &self,
        frontier: &VersionVector,
    ) -> impl Future<Output = Result<GcStats, StoreError>> + Send;

    /// This node's physical clock in Unix milliseconds, used only to measure peers' clock skew
    /// (an HLC that observed a fast peer runs with it, so HLC readings would hide the skew).
    /// The default reads the system clock; a simulation overrides it with its virtual clock.
    fn wall_clock_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// Whether `store`'s applied vector covers `target` within `wait`: at once if it already does,
/// else as soon as a commit makes it so.
pub(crate) async fn applied_within<S: ReplicaStore + ?Sized>(
    store: &S,
    target: &VersionVector,
    wait: Duration,
) -> bool {
    let mut applied = store.watch_applied();
    matches!(
        tokio::time::timeout(wait, applied.wait_for(|v| v.dominates(target))).await,
        Ok(Ok(_))
    )
}
