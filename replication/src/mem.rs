//! [`MemStore`]: the whole [`ReplicaStore`] contract in memory, for tests and simulation.
//!
//! It is a model of what the server's redb store must do, not a toy: per-origin contiguous
//! apply with gaps refused, a WAL of every origin keyed by (origin, sequence), WAL truncation
//! answered with [`StoreError::Truncated`], persisted-looking peer vectors, and an HLC that
//! refuses stamps beyond a maximum skew. Restarting a replicator over the same `MemStore` is
//! what a node restart over the same disk looks like.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use meridian_crdt::{CrdtError, Dot, Kind, NodeId, Op, Stamp, State, VersionVector, codec};
use tokio::sync::watch;

use crate::gc::GcStats;
use crate::merkle::{self, Hash, MerkleTree};
use crate::store::{Applying, ReplicaStore, StateRead, StoreError};

#[derive(Debug, Default)]
struct Inner {
    states: BTreeMap<(Kind, String), State>,
    wal: BTreeMap<(NodeId, u64), Op>,
    applied: VersionVector,
    peers: BTreeMap<NodeId, VersionVector>,
    /// First sequence of each origin still in the WAL, once truncated.
    wal_start: BTreeMap<NodeId, u64>,
    tree: MerkleTree,
}

impl Inner {
    /// Joins one op into the state and the WAL. The caller checked it is the next of its origin.
    fn commit(&mut self, op: Op) -> Result<(), CrdtError> {
        let slot = self
            .states
            .entry((op.kind(), op.key.clone()))
            .or_insert_with(|| State::bottom(op.kind()));
        slot.merge(&op.delta)?;
        let hash = merkle::state_hash(&codec::encode_state(slot));
        self.tree
            .insert(&merkle::storage_key(op.kind(), &op.key), hash);
        self.applied.raise(op.dot.node, op.dot.seq);
        self.wal.insert((op.dot.node, op.dot.seq), op);
        Ok(())
    }
}

/// An in-memory replica: CRDT states, the WAL, the applied vector, peers' vectors and an HLC.
pub struct MemStore {
    node: NodeId,
    /// The physical clock under the HLC, also the wall clock for skew measurements.
    clock: fn() -> uhlc::NTP64,
    hlc: uhlc::HLC,
    inner: Mutex<Inner>,
    applied_tx: watch::Sender<VersionVector>,
    /// Calls of `apply_remote` and `queue_remote`, counted as they start.
    apply_calls: AtomicU64,
    /// While false, `apply_remote` waits before applying and `queue_remote` reports its
    /// outcome only later: a slow disk, for tests.
    applies_open: watch::Sender<bool>,
    /// While `Some`, ops `queue_remote` is handed wait there unapplied, in order, as they do
    /// on a node whose replication lags; [`MemStore::hold_applies`] lets them through. The
    /// watch counts releases and carries the applied vector after each.
    held: Mutex<Option<Vec<Vec<Op>>>>,
    released: watch::Sender<(u64, VersionVector)>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // uhlc's HLC is not Debug; the node id says which clock it is.
        f.debug_struct("MemStore")
            .field("node", &self.node)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl MemStore {
    /// An empty replica of `node` whose clock refuses remote stamps more than `max_skew` ahead.
    pub fn new(node: NodeId, max_skew: Duration) -> Self {
        Self::with_clock(node, max_skew, uhlc::system_time_clock)
    }

    /// Like [`Self::new`], with the physical clock read through `clock` (simulated time, or a
    /// skewed clock in tests).
    pub fn with_clock(node: NodeId, max_skew: Duration, clock: fn() -> uhlc::NTP64) -> Self {
        let hlc = uhlc::HLCBuilder::new()
            .with_id(node.to_uhlc())
            .with_max_delta(max_skew)
            .with_clock(clock)
            .build();
        Self {
            node,
            clock,
            hlc,
            inner: Mutex::new(Inner::default()),
            applied_tx: watch::Sender::new(VersionVector::new()),
            apply_calls: AtomicU64::new(0),
            applies_open: watch::Sender::new(true),
            held: Mutex::new(None),
            released: watch::Sender::new((0, VersionVector::new())),
        }
    }

    /// How many times peers' ops were handed to this store.
    pub fn apply_calls(&self) -> u64 {
        self.apply_calls.load(Ordering::SeqCst)
    }

    /// Holds applies of peers' ops back (`false`) until called again with `true`.
    pub fn set_applies_open(&self, open: bool) {
        self.applies_open.send_replace(open);
    }

    /// Keeps peers' ops handed over from now on unapplied (`true`), as on a node whose
    /// replication lags, or applies every op held so far, in order, and lets later ones
    /// through (`false`).
    pub fn hold_applies(&self, hold: bool) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if hold {
            held.get_or_insert_with(Vec::new);
            return;
        }
        for ops in held.take().unwrap_or_default() {
            // What a held op would have failed with, it fails with silently here: tests
            // compare the states that result.
            let _ = self.apply_now(ops);
        }
        let applied = self.applied();
        self.released.send_modify(|(releases, vector)| {
            *releases += 1;
            *vector = applied;
        });
    }

    async fn applies_opened(&self) {
        // The sender lives as long as the store, so the wait ends once applies are open.
        let _ = self.applies_open.subscribe().wait_for(|open| *open).await;
    }

    /// Applies remote ops; see [`ReplicaStore::apply_remote`].
    fn apply_now(&self, ops: Vec<Op>) -> Result<VersionVector, StoreError> {
        let mut inner = self.lock();
        let mut failure: Option<StoreError> = None;
        let mut stopped: Vec<NodeId> = Vec::new();
        let mut changed = false;
        for op in ops {
            let origin = op.dot.node;
            if stopped.contains(&origin) {
                continue;
            }
            let have = inner.applied.get(origin);
            if op.dot.seq <= have {
                continue; // already applied: idempotence
            }
            if op.dot.seq != have + 1 {
                stopped.push(origin);
                failure.get_or_insert(StoreError::Gap {
                    origin,
                    expected: have + 1,
                    got: op.dot.seq,
                });
                continue;
            }
            let seq = op.dot.seq;
            if let Err(e) = inner.commit(op) {
                stopped.push(origin);
                failure.get_or_insert(StoreError::Rejected {
                    origin,
                    seq,
                    reason: e.to_string(),
                });
                continue;
            }
            changed = true;
        }
        let applied = inner.applied.clone();
        drop(inner);
        if changed {
            self.applied_tx.send_replace(applied.clone());
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(applied),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (commit is the last step).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a local write: `delta` computes the op's delta from the key's current state (its
    /// kind's bottom when absent), the op's dot and its stamp; the op is then applied and
    /// logged like the server's write path does.
    pub fn write_local<F>(
        &self,
        key: impl Into<String>,
        kind: Kind,
        delta: F,
    ) -> Result<Op, CrdtError>
    where
        F: FnOnce(&State, Dot, Stamp) -> Result<State, CrdtError>,
    {
        let key = key.into();
        let mut inner = self.lock();
        let dot = inner.applied.next_dot(self.node);
        let stamp = self.now();
        let current = inner.states.get(&(kind, key.clone())).cloned();
        let current = current.unwrap_or_else(|| State::bottom(kind));
        let delta = delta(&current, dot, stamp)?;
        if delta.kind() != kind {
            return Err(CrdtError::KindMismatch);
        }
        let op = Op {
            dot,
            stamp,
            key,
            delta,
        };
        inner.commit(op.clone())?;
        let applied = inner.applied.clone();
        drop(inner);
        self.applied_tx.send_replace(applied);
        Ok(op)
    }

    /// Adds `by` to the PN-counter `key`: the write tests use most.
    pub fn increment(&self, key: &str, by: i64) -> Result<Op, CrdtError> {
        let node = self.node;
        self.write_local(key, Kind::Counter, |state, _, _| match state {
            State::Counter(c) => c.increment(node, by).map(State::Counter),
            _ => Err(CrdtError::KindMismatch),
        })
    }

    pub fn get(&self, kind: Kind, key: &str) -> Option<State> {
        self.lock().states.get(&(kind, key.to_owned())).cloned()
    }

    /// Every key's state, for comparing replicas.
    pub fn states(&self) -> BTreeMap<(Kind, String), State> {
        self.lock().states.clone()
    }

    /// Number of ops (of every origin) in the WAL.
    pub fn wal_len(&self) -> usize {
        self.lock().wal.len()
    }

    /// Drops `origin`'s ops before `first_kept` from the WAL, as retention would.
    pub fn truncate_wal(&self, origin: NodeId, first_kept: u64) {
        let mut inner = self.lock();
        let start = inner.wal_start.get(&origin).copied().unwrap_or(1);
        if first_kept <= start {
            return;
        }
        inner
            .wal
            .retain(|&(o, seq), _| o != origin || seq >= first_kept);
        inner.wal_start.insert(origin, first_kept);
    }
}

impl ReplicaStore for MemStore {
    fn node_id(&self) -> NodeId {
        self.node
    }

    fn read_state(&self, kind: Kind, key: &str) -> Result<StateRead, StoreError> {
        let inner = self.lock();
        Ok(StateRead {
            state: inner.states.get(&(kind, key.to_owned())).cloned(),
            applied: inner.applied.clone(),
        })
    }

    fn applied(&self) -> VersionVector {
        self.lock().applied.clone()
    }

    fn watch_applied(&self) -> watch::Receiver<VersionVector> {
        self.applied_tx.subscribe()
    }

    /// Returns at least one op when any is available, even if it alone exceeds `max_bytes`,
    /// so an oversized op can never stall its origin.
    fn read_wal(
        &self,
        origin: NodeId,
        after: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<Op>, StoreError> {
        let inner = self.lock();
        let start = inner.wal_start.get(&origin).copied().unwrap_or(1);
        if after.saturating_add(1) < start {
            return Err(StoreError::Truncated {
                origin,
                first_available: start,
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let from = (origin, after.saturating_add(1));
        for op in inner.wal.range(from..=(origin, u64::MAX)).map(|(_, op)| op) {
            if out.len() >= max_ops.max(1) || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
            bytes += codec::encode_op(op).len();
            out.push(op.clone());
        }
        Ok(out)
    }

    async fn fast_forward(&self, origin: NodeId, to: u64) -> Result<VersionVector, StoreError> {
        let mut inner = self.lock();
        if inner.applied.get(origin) < to {
            inner.applied.raise(origin, to);
            // Whatever this node holds of the skipped range is not contiguous any more: a
            // reader is told it was truncated, as the server's WAL tells it.
            inner.wal.retain(|&(o, seq), _| o != origin || seq > to);
            let start = inner.wal_start.entry(origin).or_insert(1);
            *start = (*start).max(to + 1);
            self.applied_tx.send_replace(inner.applied.clone());
        }
        Ok(inner.applied.clone())
    }

    async fn apply_remote(&self, ops: Vec<Op>) -> Result<VersionVector, StoreError> {
        self.apply_calls.fetch_add(1, Ordering::SeqCst);
        self.applies_opened().await;
        self.apply_now(ops)
    }

    /// Applies at once, in the order of the calls; the outcome is reported once applies are
    /// open, as a real store reports a queued apply once its sync is done.
    async fn queue_remote(&self, ops: Vec<Op>) -> Applying {
        self.apply_calls.fetch_add(1, Ordering::SeqCst);
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(queue) = held.as_mut() {
                queue.push(ops);
                let mut released = self.released.subscribe();
                let before = released.borrow().0;
                return Box::pin(async move {
                    match released.wait_for(|(releases, _)| *releases > before).await {
                        Ok(release) => Ok(release.1.clone()),
                        Err(_) => Err(StoreError::Unavailable("the store is gone".into())),
                    }
                });
            }
        }
        let outcome = self.apply_now(ops);
        let mut open = self.applies_open.subscribe();
        Box::pin(async move {
            // The sender lives as long as the store, so the wait ends once applies are open.
            let _ = open.wait_for(|open| *open).await;
            outcome
        })
    }

    fn record_peer_applied(&self, peer: NodeId, applied: &VersionVector) -> Result<(), StoreError> {
        self.lock().peers.insert(peer, applied.clone());
        Ok(())
    }

    fn peer_applied(&self) -> BTreeMap<NodeId, VersionVector> {
        self.lock().peers.clone()
    }

    fn observe_stamp(&self, stamp: Stamp) -> bool {
        self.hlc.update_with_timestamp(&stamp.to_uhlc()).is_ok()
    }

    fn now(&self) -> Stamp {
        // Our HLC carries our id, so the stamp is ours by construction.
        Stamp::new(self.hlc.new_timestamp().get_time().as_u64(), self.node)
    }

    fn wall_clock_ms(&self) -> u64 {
        (self.clock)().as_nanos() / 1_000_000
    }

    fn tree_children(&self, depth: u8, prefixes: &[u32]) -> Result<Vec<Hash>, StoreError> {
        Ok(merkle::children_of(&self.lock().tree, depth, prefixes))
    }

    fn bucket_items(
        &self,
        buckets: &[u32],
        max_items: usize,
    ) -> Result<Vec<(Vec<u8>, Hash)>, StoreError> {
        merkle::items_of(&self.lock().tree, buckets, max_items)
    }

    async fn read_states(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<(Vec<u8>, Option<Vec<u8>>)>, StoreError> {
        let inner = self.lock();
        Ok(keys
            .into_iter()
            .map(|key| {
                let state = merkle::split_storage_key(&key)
                    .and_then(|(kind, k)| inner.states.get(&(kind, k.to_owned())))
                    .map(codec::encode_state);
                (key, state)
            })
            .collect())
    }

    async fn merge_states(&self, states: Vec<(Vec<u8>, State)>) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let mut changed = 0;
        for (key, state) in states {
            let Some((kind, k)) = merkle::split_storage_key(&key) else {
                continue;
            };
            if state.kind() != kind {
                continue;
            }
            let slot = inner
                .states
                .entry((kind, k.to_owned()))
                .or_insert_with(|| State::bottom(kind));
            let before = slot.clone();
            slot.merge(&state)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            if *slot != before {
                changed += 1;
                let hash = merkle::state_hash(&codec::encode_state(slot));
                inner.tree.insert(&key, hash);
            }
        }
        Ok(changed)
    }

    async fn collect_garbage(&self, frontier: &VersionVector) -> Result<GcStats, StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut stats = GcStats::default();
        let mut removed = Vec::new();
        for ((kind, key), state) in &mut inner.states {
            stats.keys_examined += 1;
            let before = state.clone();
            let storage_key = merkle::storage_key(*kind, key);
            if state.collect_garbage(frontier) {
                stats.keys_removed += 1;
                inner.tree.remove(&storage_key);
                removed.push((*kind, key.clone()));
            } else if *state != before {
                stats.keys_compacted += 1;
                let hash = merkle::state_hash(&codec::encode_state(state));
                inner.tree.insert(&storage_key, hash);
            }
        }
        for key in removed {
            inner.states.remove(&key);
        }
        Ok(stats)
    }
}

impl MemStore {
    /// Joins `state` into `key` without logging an op: a replica restored from elsewhere, or a
    /// corrupted one, as anti-entropy tests need.
    pub fn merge_unlogged(&self, kind: Kind, key: &str, state: &State) -> Result<(), CrdtError> {
        let mut inner = self.lock();
        let slot = inner
            .states
            .entry((kind, key.to_owned()))
            .or_insert_with(|| State::bottom(kind));
        slot.merge(state)?;
        let hash = merkle::state_hash(&codec::encode_state(slot));
        inner.tree.insert(&merkle::storage_key(kind, key), hash);
        Ok(())
    }

    /// The Merkle root, for comparing replicas.
    pub fn merkle_root(&self) -> Hash {
        self.lock().tree.root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_crdt::PnCounter;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn counter(store: &MemStore, key: &str) -> i64 {
        match store.get(Kind::Counter, key) {
            Some(State::Counter(c)) => c.value(),
            _ => 0,
        }
    }

    #[tokio::test]
    async fn remote_ops_apply_in_order_idempotently_and_gaps_stop_an_origin() {
        let a = MemStore::new(n(1), Duration::from_secs(1));
        let b = MemStore::new(n(2), Duration::from_secs(1));
        let ops: Vec<Op> = (0..5).map(|_| a.increment("k", 2).unwrap()).collect();
        let applied = b.apply_remote(ops[..2].to_vec()).await.unwrap();
        assert_eq!(applied.get(n(1)), 2);
        // Replays are skipped; the rest applies.
        b.apply_remote(ops.clone()).await.unwrap();
        assert_eq!(counter(&b, "k"), 10);
        assert_eq!(b.states(), a.states());
        // A gap is refused after applying what precedes it.
        let c = MemStore::new(n(3), Duration::from_secs(1));
        let err = c
            .apply_remote(vec![ops[0].clone(), ops[2].clone()])
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Gap {
                expected: 2,
                got: 3,
                ..
            }
        ));
        assert_eq!(c.applied().get(n(1)), 1);
    }

    #[test]
    fn wal_reads_respect_bounds_and_truncation() {
        let a = MemStore::new(n(1), Duration::from_secs(1));
        for _ in 0..10 {
            a.increment("k", 1).unwrap();
        }
        assert_eq!(a.read_wal(n(1), 0, 3, usize::MAX).unwrap().len(), 3);
        assert_eq!(a.read_wal(n(1), 8, 100, usize::MAX).unwrap().len(), 2);
        assert_eq!(
            a.read_wal(n(1), 0, 100, 1).unwrap().len(),
            1,
            "at least one op"
        );
        assert!(a.read_wal(n(1), 10, 100, usize::MAX).unwrap().is_empty());
        a.truncate_wal(n(1), 6);
        assert!(matches!(
            a.read_wal(n(1), 3, 100, usize::MAX),
            Err(StoreError::Truncated {
                first_available: 6,
                ..
            })
        ));
        assert_eq!(a.read_wal(n(1), 5, 100, usize::MAX).unwrap()[0].dot.seq, 6);
    }

    #[test]
    fn stamps_beyond_the_max_skew_are_refused() {
        let a = MemStore::new(n(1), Duration::from_millis(500));
        let now = a.now();
        assert!(a.observe_stamp(Stamp::new(now.time + (1 << 28), n(2)))); // ~60 ms ahead
        assert!(!a.observe_stamp(Stamp::new(now.time + (10 << 32), n(2)))); // 10 s ahead
        assert!(a.now() > now);
    }

    mod gc {
        use super::*;
        use crate::gc::{Frontier, StabilityTracker};
        use meridian_crdt::CanonicalJson;
        use proptest::prelude::*;
        use std::time::Instant;

        const NODES: u64 = 3;
        const KEYS: u8 = 3;

        #[derive(Clone, Debug)]
        enum Step {
            /// Node writes key (a value, or a delete when `None`).
            Write(u64, u8, Option<u8>),
            /// `to` pulls up to `count` of `origin`'s ops from `origin`.
            Deliver { origin: u64, to: u64, count: usize },
            /// `from` acks its applied vector to `to`.
            Report { from: u64, to: u64 },
            /// `node` runs a garbage-collection pass at its frontier.
            Gc(u64),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (1..=NODES, 0..KEYS, proptest::option::of(0_u8..4))
                    .prop_map(|(node, key, v)| Step::Write(node, key, v)),
                (1..=NODES, 1..=NODES, 1_usize..4).prop_map(|(origin, to, count)| Step::Deliver {
                    origin,
                    to,
                    count
                }),
                (1..=NODES, 1..=NODES).prop_map(|(from, to)| Step::Report { from, to }),
                (1..=NODES).prop_map(Step::Gc),
            ]
        }

        struct Replica {
            store: MemStore,
            tracker: StabilityTracker,
        }

        fn write(store: &MemStore, key: u8, value: Option<u8>) -> Op {
            let value = value.map(|v| CanonicalJson::parse(&v.to_string()).unwrap());
            store
                .write_local(format!("k{key}"), Kind::Register, |state, dot, stamp| {
                    let State::Register(r) = state else {
                        return Err(CrdtError::KindMismatch);
                    };
                    Ok(State::Register(r.write(stamp, dot, value)))
                })
                .unwrap()
        }

        /// What the node pull path does: feed the ops' stamps to the clock, then apply.
        async fn deliver(replicas: &[Replica], origin: u64, to: u64, count: usize) {
            if origin == to {
                return;
            }
            let (src, dst) = (&replicas[origin as usize - 1], &replicas[to as usize - 1]);
            let after = dst.store.applied().get(n(origin));
            let ops = src
                .store
                .read_wal(n(origin), after, count, usize::MAX)
                .unwrap();
            for op in &ops {
                dst.store.observe_stamp(op.stamp);
            }
            dst.store.apply_remote(ops).await.unwrap();
        }

        fn report(replicas: &mut [Replica], from: u64, to: u64, now: Instant) {
            if from != to {
                let applied = replicas[from as usize - 1].store.applied();
                replicas[to as usize - 1]
                    .tracker
                    .on_report(n(from), &applied, now);
            }
        }

        async fn gc(replica: &mut Replica, now: Instant) {
            let own = replica.store.applied();
            if let Frontier::Stable(frontier) = replica.tracker.frontier(&own, now) {
                replica.store.collect_garbage(&frontier).await.unwrap();
            }
        }

        fn values(store: &MemStore) -> Vec<Option<CanonicalJson>> {
            (0..KEYS)
                .map(|k| match store.get(Kind::Register, &format!("k{k}")) {
                    Some(State::Register(r)) => r.value().cloned(),
                    _ => None,
                })
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Writes and deletes on three replicas, delivered in random per-origin order,
            /// with acks and GC passes at random points: every replica ends with the values a
            /// replica that never collects garbage has, and with identical states.
            #[test]
            fn gc_at_the_frontier_never_changes_the_lww_winner(
                steps in proptest::collection::vec(step(), 1..80),
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                rt.block_on(async {
                    let now = Instant::now();
                    let mut replicas: Vec<Replica> = (1..=NODES)
                        .map(|id| Replica {
                            store: MemStore::new(n(id), Duration::from_secs(10)),
                            tracker: StabilityTracker::new(
                                (1..=NODES).filter(|&p| p != id).map(n),
                                &BTreeMap::new(),
                                Some(Duration::from_secs(3600)),
                                now,
                            ),
                        })
                        .collect();
                    let reference = MemStore::new(n(9), Duration::from_secs(10));
                    let mut all_ops = Vec::new();
                    for step in steps {
                        match step {
                            Step::Write(node, key, value) => {
                                all_ops.push(write(&replicas[node as usize - 1].store, key, value));
                            }
                            Step::Deliver { origin, to, count } => {
                                deliver(&replicas, origin, to, count).await;
                            }
                            Step::Report { from, to } => report(&mut replicas, from, to, now),
                            Step::Gc(node) => gc(&mut replicas[node as usize - 1], now).await,
                        }
                    }
                    // Heal: everything reaches everyone, everyone reports, everyone collects.
                    for origin in 1..=NODES {
                        for to in 1..=NODES {
                            deliver(&replicas, origin, to, usize::MAX).await;
                        }
                    }
                    for _ in 0..2 {
                        for from in 1..=NODES {
                            for to in 1..=NODES {
                                report(&mut replicas, from, to, now);
                            }
                        }
                        for r in &mut replicas {
                            gc(r, now).await;
                        }
                    }
                    reference.apply_remote(all_ops).await.unwrap();
                    let expected = values(&reference);
                    for r in &replicas {
                        prop_assert_eq!(&values(&r.store), &expected);
                        prop_assert_eq!(r.store.states(), replicas[0].store.states());
                        prop_assert_eq!(r.store.merkle_root(), replicas[0].store.merkle_root());
                    }
                    Ok(())
                })?;
            }
        }

        #[tokio::test]
        async fn stable_tombstones_leave_the_store_and_the_tree() {
            let a = MemStore::new(n(1), Duration::from_secs(10));
            let before = a.merkle_root();
            write(&a, 0, Some(1));
            let delete = write(&a, 0, None);
            let mut frontier = VersionVector::new();
            frontier.raise(n(1), delete.dot.seq - 1);
            let kept = a.collect_garbage(&frontier).await.unwrap();
            assert_eq!(kept.keys_removed, 0);
            frontier.raise(n(1), delete.dot.seq);
            let stats = a.collect_garbage(&frontier).await.unwrap();
            assert_eq!((stats.keys_examined, stats.keys_removed), (1, 1));
            assert!(a.states().is_empty());
            assert_eq!(a.merkle_root(), before);
        }
    }

    #[test]
    fn local_writes_of_the_wrong_kind_are_refused() {
        let a = MemStore::new(n(1), Duration::from_secs(1));
        let err = a
            .write_local("k", Kind::Register, |_, _, _| {
                Ok(State::Counter(PnCounter::default()))
            })
            .unwrap_err();
        assert_eq!(err, CrdtError::KindMismatch);
        assert!(a.applied().is_empty());
    }
}
