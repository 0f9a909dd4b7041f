//! The write pipeline: an applier thread and a syncer thread.
//!
//! The **applier** drains the queue of pending commands, applies the whole group to redb in one
//! *non-durable* write transaction (state + WAL table + applied vector), and hands the group's
//! ops, encoded, to the syncer. The **syncer** appends them to the [`Journal`] and calls
//! `fdatasync` once for every group that queued up meanwhile, then answers the requests and
//! publishes the new durable applied vector. The two overlap: while one group is being synced,
//! the next is being applied.
//!
//! Every second (or 64 MiB of journal) the applier checkpoints: it starts a new journal segment,
//! makes redb durable with one fsyncing commit, and deletes the segments that commit covers. On
//! start-up the journal is replayed over the last checkpoint (see `Storage::open`).
//!
//! Nothing is answered, shipped to peers or counted in the published applied vector before its
//! journal record is durable. Reads of redb may see a write a few hundred microseconds before
//! it is durable (as with Redis' `appendfsync always`); a crash in that window loses only that
//! unanswered write.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as sync_mpsc;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use meridian_crdt::{Dot, NodeId, Op, State, VersionVector, codec};
use meridian_replication::merkle::{self, MerkleTree};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use tokio::sync::{mpsc, oneshot, watch};

use super::journal::{self, Journal};
use super::replica::RemoteError;
use super::tables::{APPLIED, META, META_LAST_STAMP, PEER_APPLIED, STATES, WAL, state_key};
use super::{Command, Committed, StorageError, StorageOptions, WriteError, corrupt};
use crate::metrics::Metrics;

/// How often the checkpoint timer asks for a checkpoint.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// A reply to send once the group's fate is known.
pub(super) enum Pending {
    Local(
        oneshot::Sender<Result<Committed, WriteError>>,
        Result<Committed, WriteError>,
    ),
    Remote(
        oneshot::Sender<Result<VersionVector, RemoteError>>,
        Option<RemoteError>,
    ),
    Truncate(oneshot::Sender<Result<u64, StorageError>>, u64),
    /// Full states merged (anti-entropy), or keys garbage-collected: how many keys changed.
    Merge(oneshot::Sender<Result<u64, StorageError>>, u64),
}

impl Pending {
    fn fail(self, detail: &str) {
        let failed = || StorageError::Failed(detail.to_owned());
        match self {
            Self::Local(tx, _) => {
                let _ = tx.send(Err(WriteError::Storage(failed())));
            }
            Self::Remote(tx, _) => {
                let _ = tx.send(Err(RemoteError::Storage(failed())));
            }
            Self::Truncate(tx, _) | Self::Merge(tx, _) => {
                let _ = tx.send(Err(failed()));
            }
        }
    }

    fn succeed(self, applied: &VersionVector) {
        match self {
            Self::Local(tx, mut result) => {
                if let Ok(committed) = &mut result {
                    committed.applied = applied.clone();
                }
                let _ = tx.send(result);
            }
            Self::Remote(tx, None) => {
                let _ = tx.send(Ok(applied.clone()));
            }
            Self::Remote(tx, Some(error)) => {
                let _ = tx.send(Err(error));
            }
            Self::Truncate(tx, removed) | Self::Merge(tx, removed) => {
                let _ = tx.send(Ok(removed));
            }
        }
    }
}

/// Work for the syncer, in the order the applier produced it.
pub(super) enum SyncJob {
    /// A group applied to redb: its journal record (empty when it logged no op), its replies,
    /// and the applied vector once it is durable.
    Group {
        record: Vec<u8>,
        ops: usize,
        pending: Vec<Pending>,
        applied: VersionVector,
    },
    /// Sync, then continue in a new segment; answers the new segment's number.
    Rotate(sync_mpsc::Sender<std::io::Result<u64>>),
    /// A checkpoint covers every segment before this one.
    Prune(u64),
}

/// States touched by the group, written back once at the end: a hot key written by many
/// requests of one group is decoded and encoded once, not once per request.
pub(super) struct Batch<'t> {
    states: Table<'t, &'static [u8], &'static [u8]>,
    wal: Table<'t, (u64, u64), &'static [u8]>,
    dirty: HashMap<Vec<u8>, State>,
    /// Keys garbage collection left at bottom: deleted (and dropped from the Merkle tree)
    /// instead of written back, unless something else in the group revived them.
    collected: Vec<Vec<u8>>,
    pub(super) applied: VersionVector,
    /// Encoded ops, for the journal.
    records: Vec<Vec<u8>>,
}

impl<'t> Batch<'t> {
    pub(super) fn open(
        txn: &'t WriteTransaction,
        applied: VersionVector,
    ) -> Result<Self, StorageError> {
        Ok(Self {
            states: txn.open_table(STATES)?,
            wal: txn.open_table(WAL)?,
            dirty: HashMap::new(),
            collected: Vec::new(),
            applied,
            records: Vec::new(),
        })
    }

    fn state(&mut self, kind: meridian_crdt::Kind, key: &str) -> Result<&mut State, StorageError> {
        self.state_at(state_key(kind, key), kind, key)
    }

    fn state_at(
        &mut self,
        storage_key: Vec<u8>,
        kind: meridian_crdt::Kind,
        key: &str,
    ) -> Result<&mut State, StorageError> {
        match self.dirty.entry(storage_key) {
            Entry::Occupied(entry) => Ok(entry.into_mut()),
            Entry::Vacant(entry) => {
                let state = match self.states.get(entry.key().as_slice())? {
                    Some(bytes) => codec::decode_state(bytes.value())
                        .map_err(|e| corrupt(format!("{kind}/{key}"), e))?,
                    None => State::bottom(kind),
                };
                Ok(entry.insert(state))
            }
        }
    }

    fn append(&mut self, op: &Op) -> Result<(), StorageError> {
        let bytes = codec::encode_op(op);
        self.wal
            .insert((op.dot.node.get(), op.dot.seq), bytes.as_slice())?;
        self.records.push(bytes);
        self.applied.raise(op.dot.node, op.dot.seq);
        Ok(())
    }

    /// Applies logged ops (from a peer, or from the journal on replay) in order, skipping
    /// what is already applied. Returns the first gap, after which that origin is skipped.
    pub(super) fn apply_ops(&mut self, ops: Vec<Op>) -> Result<Option<RemoteError>, StorageError> {
        let mut stopped: Vec<NodeId> = Vec::new();
        let mut error = None;
        for op in ops {
            let origin = op.dot.node;
            if stopped.contains(&origin) {
                continue;
            }
            let have = self.applied.get(origin);
            if op.dot.seq <= have {
                continue;
            }
            if op.dot.seq != have + 1 {
                stopped.push(origin);
                error.get_or_insert(RemoteError::Gap {
                    origin,
                    expected: have + 1,
                    got: op.dot.seq,
                });
                continue;
            }
            let kind = op.kind();
            let state = self.state(kind, &op.key)?;
            state
                .merge(&op.delta)
                .map_err(|e| corrupt(format!("{kind}/{}", op.key), e))?;
            self.append(&op)?;
        }
        Ok(error)
    }

    /// Joins full states into their keys (anti-entropy), logging no op; returns how many
    /// keys changed. Each state's kind matches its key's (checked by the caller).
    pub(super) fn merge_states(
        &mut self,
        states: Vec<(Vec<u8>, State)>,
    ) -> Result<u64, StorageError> {
        let mut changed = 0;
        for (storage_key, incoming) in states {
            let Some((kind, key)) = super::tables::split_state_key(&storage_key) else {
                continue;
            };
            if incoming.kind() != kind {
                continue;
            }
            let key = key.to_owned();
            let state = self.state_at(storage_key, kind, &key)?;
            let before = state.clone();
            state
                .merge(&incoming)
                .map_err(|e| corrupt(format!("{kind}/{key}"), e))?;
            if *state != before {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Garbage collection at a stable frontier: drops the metadata of `keys` that `frontier`
    /// covers, re-reading each state in this transaction (a write since the caller's scan is
    /// taken into account). Returns how many keys changed. Logs no op, like a merge: a crash
    /// before the next checkpoint loses the collection, and the next pass redoes it.
    pub(super) fn collect_garbage(
        &mut self,
        keys: Vec<Vec<u8>>,
        frontier: &VersionVector,
    ) -> Result<u64, StorageError> {
        let mut changed = 0;
        for storage_key in keys {
            let Some((kind, key)) = super::tables::split_state_key(&storage_key) else {
                continue;
            };
            let key = key.to_owned();
            let state = self.state_at(storage_key.clone(), kind, &key)?;
            let before = state.clone();
            let bottom = state.collect_garbage(frontier);
            if *state != before {
                changed += 1;
            }
            if bottom {
                self.collected.push(storage_key);
            }
        }
        Ok(changed)
    }

    /// Writes the touched states and the applied vector into `txn`'s tables. Also returns the
    /// Merkle updates (bucket, storage key, state hash) to apply once the commit succeeded.
    pub(super) fn finish(
        self,
        txn: &WriteTransaction,
        before: &VersionVector,
    ) -> Result<Finished, StorageError> {
        let Self {
            mut states,
            wal,
            dirty,
            collected,
            applied,
            records,
        } = self;
        let mut leaves = Vec::with_capacity(dirty.len());
        for (key, state) in dirty {
            if state.is_bottom() && collected.contains(&key) {
                states.remove(key.as_slice())?;
                leaves.push((merkle::bucket_of(&key), key, None));
                continue;
            }
            let encoded = codec::encode_state(&state);
            states.insert(key.as_slice(), encoded.as_slice())?;
            leaves.push((
                merkle::bucket_of(&key),
                key,
                Some(merkle::state_hash(&encoded)),
            ));
        }
        drop((states, wal));
        let mut applied_table = txn.open_table(APPLIED)?;
        for (origin, seq) in applied.iter() {
            if before.get(origin) != seq {
                applied_table.insert(origin.get(), seq)?;
            }
        }
        Ok((applied, records, leaves))
    }
}

/// What [`Batch::finish`] hands back: the applied vector, the encoded ops for the journal, and
/// the Merkle updates to apply after the commit.
pub(super) type Finished = (VersionVector, Vec<Vec<u8>>, Vec<LeafUpdate>);

/// One key's new state hash for the Merkle tree: (bucket, storage key, hash); `None` when
/// garbage collection deleted the key.
pub(super) type LeafUpdate = (u32, Vec<u8>, Option<merkle::Hash>);

/// Applies a committed group's Merkle updates: memory only, the lock held for no I/O.
pub(super) fn apply_leaves(tree: &RwLock<MerkleTree>, leaves: Vec<LeafUpdate>) {
    if leaves.is_empty() {
        return;
    }
    let mut tree = tree.write().unwrap_or_else(PoisonError::into_inner);
    for (bucket, key, hash) in leaves {
        match hash {
            Some(hash) => tree.insert_in(bucket, &key, hash),
            None => tree.remove(&key),
        };
    }
}

pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    pub(super) options: StorageOptions,
    pub(super) hlc: Arc<uhlc::HLC>,
    /// The applied vector as of the last redb commit (durable or not); the applier assigns
    /// sequences from it and is its only author.
    pub(super) applied: VersionVector,
    pub(super) queue: mpsc::Receiver<Command>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) syncer: sync_mpsc::Sender<SyncJob>,
    pub(super) failed: Arc<AtomicBool>,
    /// The anti-entropy tree, updated after each commit from the group's new state hashes.
    pub(super) tree: Arc<RwLock<MerkleTree>>,
}

impl Writer {
    pub(super) fn run(mut self) {
        let mut journal_bytes = 0u64;
        while let Some(first) = self.queue.blocking_recv() {
            let mut commands = vec![first];
            while commands.len() < self.options.max_batch {
                match self.queue.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            let stop = commands.iter().position(|c| matches!(c, Command::Shutdown));
            if let Some(at) = stop {
                // Commands behind the shutdown marker are dropped: their callers see
                // ShuttingDown when their reply channel closes.
                commands.truncate(at);
            }
            let before = commands.len();
            commands.retain(|c| !matches!(c, Command::Checkpoint));
            let checkpoint_due = commands.len() < before;
            if !commands.is_empty() {
                journal_bytes += self.commit(commands);
            }
            if stop.is_some() {
                break;
            }
            if checkpoint_due || journal_bytes >= CHECKPOINT_BYTES {
                self.checkpoint();
                journal_bytes = 0;
            }
        }
        self.checkpoint();
        tracing::debug!("applier stopped");
    }

    /// Applies one group; returns the journal bytes it produced.
    fn commit(&mut self, commands: Vec<Command>) -> u64 {
        let size = commands.len();
        let mut pending = Vec::with_capacity(size);
        if self.failed.load(Ordering::Acquire) {
            drop(commands);
            return 0;
        }
        match self.execute(commands, &mut pending) {
            Ok((applied, records)) => {
                self.applied = applied.clone();
                let ops = records.len();
                let record = if records.is_empty() {
                    Vec::new()
                } else {
                    journal::encode_record(&records)
                };
                let bytes = record.len() as u64;
                let job = SyncJob::Group {
                    record,
                    ops,
                    pending,
                    applied,
                };
                if let Err(sync_mpsc::SendError(SyncJob::Group { pending, .. })) =
                    self.syncer.send(job)
                {
                    for p in pending {
                        p.fail("the journal is gone");
                    }
                }
                bytes
            }
            Err(error) => {
                tracing::error!(%error, group = size, "applying a group failed; none of it was applied");
                self.metrics.record_commit_failure();
                let detail = error.to_string();
                for p in pending {
                    p.fail(&detail);
                }
                0
            }
        }
    }

    fn execute(
        &mut self,
        commands: Vec<Command>,
        pending: &mut Vec<Pending>,
    ) -> Result<(VersionVector, Vec<Vec<u8>>), StorageError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)
            .map_err(|e| corrupt("durability", e))?;
        let mut batch = Batch::open(&txn, self.applied.clone())?;
        for command in commands {
            match command {
                Command::Local {
                    kind,
                    key,
                    intent,
                    reply,
                } => {
                    let result = match self.local(&mut batch, kind, key, &intent) {
                        Err(WriteError::Storage(e)) => return Err(e),
                        other => other,
                    };
                    pending.push(Pending::Local(reply, result));
                }
                Command::Remote { ops, reply } => {
                    let error = batch.apply_ops(ops)?;
                    pending.push(Pending::Remote(reply, error));
                }
                Command::Truncate { below, reply } => {
                    let removed = truncate(&mut batch.wal, &below)?;
                    pending.push(Pending::Truncate(reply, removed));
                }
                Command::PeerApplied { peer, applied } => {
                    let bytes =
                        postcard::to_allocvec(&applied).map_err(|e| corrupt("peer vector", e))?;
                    txn.open_table(PEER_APPLIED)?
                        .insert(peer.get(), bytes.as_slice())?;
                }
                Command::Merge { states, reply } => {
                    let changed = batch.merge_states(states)?;
                    pending.push(Pending::Merge(reply, changed));
                }
                Command::Collect {
                    keys,
                    frontier,
                    reply,
                } => {
                    let changed = batch.collect_garbage(keys, &frontier)?;
                    pending.push(Pending::Merge(reply, changed));
                }
                Command::Shutdown | Command::Checkpoint => {}
            }
        }
        let (applied, records, leaves) = batch.finish(&txn, &self.applied)?;
        txn.commit()?;
        apply_leaves(&self.tree, leaves);
        Ok((applied, records))
    }

    fn local(
        &self,
        batch: &mut Batch<'_>,
        kind: meridian_crdt::Kind,
        key: String,
        intent: &super::Intent,
    ) -> Result<Committed, WriteError> {
        let node = self.options.node;
        let dot = Dot::new(node, batch.applied.get(node) + 1);
        let stamp = super::read_clock(&self.hlc, node);
        let max = self.options.max_set_elements;
        let state = batch.state(kind, &key)?;
        let delta = intent.delta(state, node, dot, stamp, max)?;
        state
            .merge(&delta)
            .map_err(|e| corrupt(format!("{kind}/{key}"), e))?;
        let state = state.clone();
        batch.append(&Op {
            dot,
            stamp,
            key,
            delta,
        })?;
        Ok(Committed {
            state,
            dot,
            stamp,
            applied: VersionVector::new(),
        })
    }

    /// Makes redb durable and drops the journal segments that this covers.
    fn checkpoint(&mut self) {
        let started = Instant::now();
        let (tx, rx) = sync_mpsc::channel();
        if self.syncer.send(SyncJob::Rotate(tx)).is_err() {
            return;
        }
        let segment = match rx.recv() {
            Ok(Ok(segment)) => segment,
            Ok(Err(error)) => {
                tracing::error!(%error, "journal rotation failed; checkpoint skipped");
                return;
            }
            Err(_) => return,
        };
        let durable = (|| -> Result<(), StorageError> {
            let txn = self.db.begin_write()?;
            // A durable commit makes every earlier non-durable one durable too; it must not be
            // empty, or redb may skip it.
            let mut meta = txn.open_table(META)?;
            meta.insert(
                super::tables::META_CHECKPOINT,
                segment.to_be_bytes().as_slice(),
            )?;
            // A fresh reading is ahead of every stamp issued before this checkpoint; stamps
            // issued after it are in the journal, whose replay feeds them to the clock too. So
            // a restart never reissues an older stamp, without a write per group.
            let now = super::read_clock(&self.hlc, self.options.node);
            let bytes = postcard::to_allocvec(&now).map_err(|e| corrupt("last_stamp", e))?;
            meta.insert(META_LAST_STAMP, bytes.as_slice())?;
            drop(meta);
            txn.commit()?;
            Ok(())
        })();
        match durable {
            Ok(()) => {
                let _ = self.syncer.send(SyncJob::Prune(segment));
                self.metrics.record_checkpoint(started.elapsed());
            }
            Err(error) => tracing::error!(%error, "checkpoint commit failed; the journal is kept"),
        }
    }
}

/// The syncer thread: journal appends, one fsync per group of groups, then replies.
pub(super) struct Syncer {
    pub(super) journal: Journal,
    pub(super) jobs: sync_mpsc::Receiver<SyncJob>,
    pub(super) applied_tx: watch::Sender<VersionVector>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) failed: Arc<AtomicBool>,
    /// Groups appended but not yet synced, with the applied vector each makes durable.
    waiting: Vec<(Vec<Pending>, VersionVector)>,
    ops_waiting: usize,
}

impl Syncer {
    pub(super) fn new(
        journal: Journal,
        jobs: sync_mpsc::Receiver<SyncJob>,
        applied_tx: watch::Sender<VersionVector>,
        metrics: Arc<Metrics>,
        failed: Arc<AtomicBool>,
    ) -> Self {
        Self {
            journal,
            jobs,
            applied_tx,
            metrics,
            failed,
            waiting: Vec::new(),
            ops_waiting: 0,
        }
    }

    pub(super) fn run(mut self) {
        while let Ok(first) = self.jobs.recv() {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                self.handle(job);
                next = self.jobs.try_recv().ok();
            }
            // Everything that queued while the last fsync ran shares this one.
            self.flush();
        }
        tracing::debug!("syncer stopped");
    }

    fn handle(&mut self, job: SyncJob) {
        match job {
            SyncJob::Group {
                record,
                ops,
                pending,
                applied,
            } => {
                if !record.is_empty() {
                    if let Err(error) = self.journal.append(&record) {
                        tracing::error!(%error, "journal append failed; refusing further writes");
                        self.failed.store(true, Ordering::Release);
                    }
                }
                self.ops_waiting += ops;
                self.waiting.push((pending, applied));
            }
            SyncJob::Rotate(reply) => {
                self.flush();
                let _ = reply.send(self.journal.rotate());
            }
            SyncJob::Prune(segment) => {
                if let Err(error) = self.journal.prune_before(segment) {
                    tracing::warn!(%error, "cannot delete old journal segments");
                }
            }
        }
    }

    fn flush(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let started = Instant::now();
        let synced = if self.failed.load(Ordering::Acquire) {
            Err(std::io::Error::other("the journal failed earlier"))
        } else {
            self.journal.sync()
        };
        let ops = std::mem::take(&mut self.ops_waiting);
        match synced {
            Ok(()) => {
                self.metrics.record_commit(ops, started.elapsed());
                if let Some((_, applied)) = self.waiting.last() {
                    self.applied_tx.send_replace(applied.clone());
                }
                for (pending, applied) in self.waiting.drain(..) {
                    for reply in pending {
                        reply.succeed(&applied);
                    }
                }
            }
            Err(error) => {
                // After a failed fsync the kernel may have dropped the dirty pages: nothing
                // written since the last good sync can be trusted, so the node stops taking
                // writes rather than acknowledge what may be lost.
                tracing::error!(%error, "journal fsync failed; refusing further writes");
                self.failed.store(true, Ordering::Release);
                self.metrics.record_commit_failure();
                let detail = format!("journal fsync failed: {error}");
                for (pending, _) in self.waiting.drain(..) {
                    for reply in pending {
                        reply.fail(&detail);
                    }
                }
            }
        }
    }
}

fn truncate(
    wal: &mut Table<'_, (u64, u64), &'static [u8]>,
    below: &VersionVector,
) -> Result<u64, StorageError> {
    let before = wal.len()?;
    for (origin, seq) in below.iter() {
        wal.retain_in((origin.get(), 0)..=(origin.get(), seq), |_, _| false)?;
    }
    Ok(before - wal.len()?)
}
