//! The write pipeline: an applier thread and a fold thread.
//!
//! The **applier** drains the queue of pending commands, applies the whole group in memory
//! (each key's state joined with its deltas, the ops encoded, the applied vector raised),
//! publishes the result to the [`Memtable`], appends the group's ops to the [`Journal`] and
//! calls `fdatasync` once for everything it drained, then answers the requests and publishes
//! the new durable applied vector. Requests that arrive during the fsync queue up and share
//! the next one: group commit without a hand-off between threads.
//!
//! Every second (or after [`FOLD_OPS`] ops) the applier checkpoints: it starts a new journal
//! segment and freezes the memtable; the **fold** thread ([`super::fold`]) writes the frozen
//! layer into redb in one durable commit — states, WAL rows, applied vector — and then the
//! journal segments that commit covers are recycled. On start-up the journal is replayed over
//! the last fold (see `Storage::open`). Random-key B-tree updates are what bound redb's
//! throughput, so folding a second of writes at once, each hot key once, is what lets the
//! node approach the HTTP ceiling.
//!
//! Nothing is answered, shipped to peers or counted in the published applied vector before its
//! journal record is durable. Reads may see a write a few hundred microseconds before it is
//! durable (as with Redis' `appendfsync always`), but a read's session token then names it, and
//! the read path waits for it to be durable before answering (see `api::consistency`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as sync_mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use meridian_crdt::{Dot, Kind, NodeId, Op, State, VersionVector, codec};
use redb::Database;
use tokio::sync::{mpsc, oneshot, watch};

use super::fold::FoldJob;
use super::journal::{self, Journal};
use super::memtable::{EncodedOp, Memtable, StatesTable};
use super::replica::RemoteError;
use super::tables::state_key;
use super::{Command, Committed, StorageError, StorageOptions, WriteError, corrupt};
use crate::metrics::Metrics;

/// How often the checkpoint timer asks for a checkpoint.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Fold early once the active layer holds this many ops, to bound memory and replay time.
pub(super) const FOLD_OPS: usize = 200_000;
/// Past this many ops, or [`MAX_UNFOLDED_BYTES`] of journal, since the last checkpoint, the
/// applier waits for the fold in progress before it takes more writes. New keys can arrive
/// faster than redb takes random inserts; without a bound each layer would outgrow the last,
/// and memory, the journal and the replay at start would grow until the node died. Like an
/// LSM tree's write stall, this holds writers at the rate the fold sustains instead.
pub(super) const MAX_UNFOLDED_OPS: usize = FOLD_OPS;
pub(super) const MAX_UNFOLDED_BYTES: usize = 256 << 20;

/// A reply to send once the group's fate is known.
pub(super) enum Pending {
    Local(
        oneshot::Sender<Result<Committed, WriteError>>,
        Result<Committed, WriteError>,
    ),
    /// With the origin HLC times of the ops it newly applied, for the apply-lag histogram.
    Remote(
        oneshot::Sender<Result<VersionVector, RemoteError>>,
        Option<RemoteError>,
        Vec<u64>,
    ),
    /// Full states merged (anti-entropy), or tombstones purged: how many keys changed.
    Merge(oneshot::Sender<Result<u64, StorageError>>, u64),
}

impl Pending {
    fn fail(self, detail: &str) {
        let failed = || StorageError::Failed(detail.to_owned());
        match self {
            Self::Local(tx, _) => {
                let _ = tx.send(Err(WriteError::Storage(failed())));
            }
            Self::Remote(tx, ..) => {
                let _ = tx.send(Err(RemoteError::Storage(failed())));
            }
            Self::Merge(tx, _) => {
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
            Self::Remote(tx, None, _) => {
                let _ = tx.send(Ok(applied.clone()));
            }
            Self::Remote(tx, Some(error), _) => {
                let _ = tx.send(Err(error));
            }
            Self::Merge(tx, changed) => {
                let _ = tx.send(Ok(changed));
            }
        }
    }
}

/// One group's working set: the states it touches, read once from the memtable or redb and
/// published once at the end, so a hot key written by many requests of one group is looked
/// up once.
pub(super) struct Group<'a> {
    memtable: &'a Memtable,
    db: &'a Database,
    /// The states table as of at least this many folds, taken on the first key that is in
    /// neither memtable layer and renewed if a fold completes meanwhile.
    snapshot: Option<(u64, Arc<StatesTable>)>,
    dirty: HashMap<Vec<u8>, Arc<State>>,
    pub(super) applied: VersionVector,
    ops: Vec<((u64, u64), EncodedOp)>,
}

impl<'a> Group<'a> {
    /// A group that will touch about `keys` keys (sized for them, so it does not rehash).
    pub(super) fn new(
        memtable: &'a Memtable,
        db: &'a Database,
        applied: VersionVector,
        keys: usize,
    ) -> Self {
        Self {
            memtable,
            db,
            snapshot: None,
            dirty: HashMap::with_capacity(keys),
            applied,
            ops: Vec::with_capacity(keys),
        }
    }

    fn state(&mut self, kind: Kind, key: &str) -> Result<&mut State, StorageError> {
        self.state_at(state_key(kind, key), kind)
    }

    fn state_at(&mut self, storage_key: Vec<u8>, kind: Kind) -> Result<&mut State, StorageError> {
        // Copies the state only if a reader still holds the published one.
        Ok(Arc::make_mut(self.shared_state_at(storage_key, kind)?))
    }

    /// The group's copy of a key's state, as shared with the memtable, readers and replies.
    fn shared_state_at(
        &mut self,
        storage_key: Vec<u8>,
        kind: Kind,
    ) -> Result<&mut Arc<State>, StorageError> {
        Ok(match self.dirty.entry(storage_key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let state = if let Some(state) = self.memtable.lookup(entry.key()) {
                    state
                } else {
                    // A fold may finish while the group runs and drop a layer this group
                    // has not looked in yet, so the snapshot must cover the folds counted
                    // *after* this lookup missed, not only those counted at the group's first
                    // miss (the count is raised before a layer is dropped).
                    let folds = self.memtable.folds();
                    let table = match &self.snapshot {
                        Some((covers, table)) if *covers >= folds => table.clone(),
                        _ => {
                            let table = self.memtable.states_table(self.db, folds)?;
                            self.snapshot = Some((folds, table.clone()));
                            table
                        }
                    };
                    match table.get(entry.key().as_slice())? {
                        Some(bytes) => Arc::new(
                            codec::decode_state(bytes.value())
                                .map_err(|e| corrupt(format!("{kind}/{:?}", entry.key()), e))?,
                        ),
                        None => Arc::new(State::bottom(kind)),
                    }
                };
                entry.insert(state)
            }
        })
    }

    fn append(&mut self, op: &Op) {
        let bytes: EncodedOp = codec::encode_op(op).into();
        self.ops.push(((op.dot.node.get(), op.dot.seq), bytes));
        self.applied.raise(op.dot.node, op.dot.seq);
    }

    /// Applies logged ops (from a peer, or from the journal on replay) in order, skipping
    /// what is already applied. Returns the first gap, after which that origin is skipped.
    /// The HLC time of each op it applies goes to `applied_stamps`, if given.
    pub(super) fn apply_ops(
        &mut self,
        ops: Vec<Op>,
        mut applied_stamps: Option<&mut Vec<u64>>,
    ) -> Result<Option<RemoteError>, StorageError> {
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
            self.append(&op);
            if let Some(stamps) = applied_stamps.as_deref_mut() {
                stamps.push(op.stamp.time);
            }
        }
        Ok(error)
    }

    /// Drops the register tombstones of `keys` that `stable` covers (garbage collection);
    /// returns how many. A key written since it was picked is no longer covered and stays.
    pub(super) fn purge(
        &mut self,
        keys: Vec<Vec<u8>>,
        stable: &VersionVector,
    ) -> Result<u64, StorageError> {
        let mut purged = 0;
        for key in keys {
            let state = self.state_at(key, Kind::Register)?;
            if super::tables::tombstone_dot(state).is_some_and(|dot| stable.contains(dot)) {
                *state = State::bottom(Kind::Register);
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Joins full states into their keys (anti-entropy), logging no op; returns how many
    /// keys changed. Each state's kind matches its key's (checked by the caller). A register
    /// tombstone that `stable` covers was garbage collected here or is about to be: it is not
    /// revived by a peer that has not collected it yet.
    pub(super) fn merge_states(
        &mut self,
        states: Vec<(Vec<u8>, State)>,
        stable: &VersionVector,
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
            let state = self.state_at(storage_key, kind)?;
            let before = state.clone();
            state
                .merge(&incoming)
                .map_err(|e| corrupt(format!("{kind}/{key}"), e))?;
            if super::tables::tombstone_dot(state).is_some_and(|dot| stable.contains(dot)) {
                *state = State::bottom(kind);
            }
            if *state != before {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Publishes the group to the memtable; returns the applied vector after it and the
    /// encoded ops, for the journal.
    pub(super) fn publish(self) -> (VersionVector, Vec<EncodedOp>) {
        let Self {
            memtable,
            dirty,
            applied,
            ops,
            ..
        } = self;
        let records = ops.iter().map(|(_, op)| op.clone()).collect();
        memtable.publish(dirty, ops, &applied);
        (applied, records)
    }
}

pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    pub(super) memtable: Arc<Memtable>,
    pub(super) options: StorageOptions,
    pub(super) clock: Arc<super::clock::Clock>,
    /// The applied vector as of the last published group; the applier assigns sequences from
    /// it and is its only author.
    pub(super) applied: VersionVector,
    pub(super) queue: mpsc::Receiver<Command>,
    pub(super) metrics: Arc<Metrics>,
    /// The journal: the applier appends each group and syncs once for all it drained, in the
    /// same thread, so a group costs no hand-off to another thread (on one core, the context
    /// switches of a separate syncer cost more than the overlap gained).
    pub(super) syncer: Syncer,
    pub(super) failed: Arc<AtomicBool>,
    pub(super) folder: sync_mpsc::Sender<FoldJob>,
    /// One message per finished fold, so a shutdown can wait for the one in progress.
    pub(super) folds_done: sync_mpsc::Receiver<()>,
    pub(super) peer_applied: Arc<Mutex<std::collections::BTreeMap<NodeId, VersionVector>>>,
    pub(super) truncated: Arc<Mutex<VersionVector>>,
    /// See `Inner::stable`.
    pub(super) stable: Arc<Mutex<VersionVector>>,
}

impl Writer {
    pub(super) fn run(mut self) {
        let (mut ops_since_fold, mut bytes_since_fold) = (0usize, 0usize);
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
            let mut checkpoint_due = false;
            let mut waiting = Vec::new();
            let mut fast_forwards = Vec::new();
            commands.retain_mut(|c| match c {
                Command::Checkpoint => {
                    checkpoint_due = true;
                    false
                }
                Command::Fold(_) => {
                    if let Command::Fold(reply) = std::mem::replace(c, Command::Checkpoint) {
                        waiting.push(reply);
                    }
                    false
                }
                Command::FastForward { .. } => {
                    if let Command::FastForward { origin, to, reply } =
                        std::mem::replace(c, Command::Checkpoint)
                    {
                        fast_forwards.push((origin, to, reply));
                    }
                    false
                }
                _ => true,
            });
            if !commands.is_empty() {
                let (ops, bytes) = self.commit(commands);
                ops_since_fold += ops;
                bytes_since_fold += bytes;
            }
            // Everything drained since the last fsync shares this one.
            self.syncer.flush();
            if stop.is_some() {
                break;
            }
            if !fast_forwards.is_empty() {
                self.fast_forward(fast_forwards);
                (ops_since_fold, bytes_since_fold) = (0, 0);
            }
            if !waiting.is_empty() {
                self.checkpoint(true, waiting);
                (ops_since_fold, bytes_since_fold) = (0, 0);
            } else if ops_since_fold >= MAX_UNFOLDED_OPS || bytes_since_fold >= MAX_UNFOLDED_BYTES {
                let started = Instant::now();
                let folding = self.memtable.frozen().is_some();
                if self.checkpoint(true, Vec::new()) {
                    (ops_since_fold, bytes_since_fold) = (0, 0);
                }
                if folding {
                    let stalled = started.elapsed();
                    self.metrics.record_write_stall(stalled);
                    tracing::warn!(
                        stalled_ms = stalled.as_millis() as u64,
                        "writes held until the previous fold finished: new keys arrive faster than redb takes them"
                    );
                }
            } else if (checkpoint_due || ops_since_fold >= FOLD_OPS)
                && self.checkpoint(false, Vec::new())
            {
                (ops_since_fold, bytes_since_fold) = (0, 0);
            }
        }
        self.checkpoint(true, Vec::new());
        // Closing the fold queue ends the fold thread once it has folded the last layer.
        tracing::debug!("applier stopped");
    }

    /// Applies one group; returns how many ops it logged, and their journal bytes.
    fn commit(&mut self, commands: Vec<Command>) -> (usize, usize) {
        let size = commands.len();
        let mut pending = Vec::with_capacity(size);
        if self.failed.load(Ordering::Acquire) {
            drop(commands);
            return (0, 0);
        }
        match self.execute(commands, &mut pending) {
            Ok((applied, records)) => {
                self.applied = applied.clone();
                let ops = records.len();
                let encoded = journal::encode_records(&records, journal::RECORD_PAYLOAD_TARGET);
                let bytes = encoded.iter().map(Vec::len).sum();
                self.syncer.append(&encoded, ops, pending, applied);
                (ops, bytes)
            }
            Err(error) => {
                tracing::error!(%error, group = size, "applying a group failed; none of it was applied");
                self.metrics.record_commit_failure();
                let detail = error.to_string();
                for p in pending {
                    p.fail(&detail);
                }
                (0, 0)
            }
        }
    }

    fn execute(
        &mut self,
        commands: Vec<Command>,
        pending: &mut Vec<Pending>,
    ) -> Result<(VersionVector, Vec<EncodedOp>), StorageError> {
        let mut group = Group::new(
            &self.memtable,
            &self.db,
            self.applied.clone(),
            commands.len(),
        );
        for command in commands {
            match command {
                Command::Local {
                    kind,
                    key,
                    intent,
                    reply,
                } => {
                    let result = match self.local(&mut group, kind, key, &intent) {
                        Err(WriteError::Storage(e)) => return Err(e),
                        other => other,
                    };
                    pending.push(Pending::Local(reply, result));
                }
                Command::Remote { ops, reply } => {
                    let mut stamps = Vec::with_capacity(ops.len());
                    let error = group.apply_ops(ops, Some(&mut stamps))?;
                    pending.push(Pending::Remote(reply, error, stamps));
                }
                Command::Merge { states, reply } => {
                    let stable = self
                        .stable
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    let changed = group.merge_states(states, &stable)?;
                    pending.push(Pending::Merge(reply, changed));
                }
                Command::Purge {
                    keys,
                    stable,
                    reply,
                } => {
                    let purged = group.purge(keys, &stable)?;
                    pending.push(Pending::Merge(reply, purged));
                }
                Command::Shutdown
                | Command::Checkpoint
                | Command::Fold(_)
                | Command::FastForward { .. } => {}
            }
        }
        Ok(group.publish())
    }

    fn local(
        &self,
        group: &mut Group<'_>,
        kind: Kind,
        key: String,
        intent: &super::Intent,
    ) -> Result<Committed, WriteError> {
        let node = self.options.node;
        let dot = Dot::new(node, group.applied.get(node) + 1);
        let stamp = self.clock.read();
        let max = self.options.max_set_elements;
        let shared = group.shared_state_at(state_key(kind, &key), kind)?;
        let state = Arc::make_mut(shared);
        let delta = intent.delta(state, node, dot, stamp, max)?;
        state
            .merge(&delta)
            .map_err(|e| corrupt(format!("{kind}/{key}"), e))?;
        // The answer shares the state rather than copying it. A later write to the key copies
        // it, as it would anyway while the memtable holds it: for a set, only the tree nodes
        // that write changes.
        let state = Arc::clone(shared);
        group.append(&Op {
            dot,
            stamp,
            key,
            delta,
        });
        Ok(Committed {
            state,
            dot,
            stamp,
            applied: VersionVector::new(),
        })
    }

    /// Raises applied entries without their ops (after anti-entropy gave this node their
    /// effects), and answers once a fold holds the raise. Everything queued before, the merges
    /// that justify it included, is in that fold too.
    ///
    /// The raise is in no journal record: until the fold commits it, a crash forgets it (and
    /// the merges), and the next anti-entropy round does both again. So it must reach no one
    /// before that fold: the applier waits for the fold here, publishing no group meanwhile,
    /// and only then publishes the raised vector. Anything else would let a peer, a session
    /// or garbage collection rely on ops a crash could still take back. Fast-forwards are rare
    /// (a peer's WAL moved on without this node), so holding writes for one fold is cheap.
    fn fast_forward(&mut self, raises: Vec<(NodeId, u64, oneshot::Sender<VersionVector>)>) {
        let before = self.applied.clone();
        for (origin, to, _) in &raises {
            self.applied.raise(*origin, *to);
        }
        if self.applied == before {
            for (_, _, reply) in raises {
                let _ = reply.send(self.applied.clone());
            }
            return;
        }
        self.memtable
            .publish(std::iter::empty(), std::iter::empty(), &self.applied);
        let (folded, done) = oneshot::channel();
        if !self.checkpoint(true, vec![folded]) || done.blocking_recv().is_err() {
            // Not durable: nothing is answered (the callers see the store unavailable) and the
            // raise stays unpublished. It is in the active layer, though, so the next fold
            // would persist it without a round having checked it: take it back there too.
            tracing::error!("a fast-forward could not be folded; it is dropped");
            self.applied = before;
            self.memtable
                .publish(std::iter::empty(), std::iter::empty(), &self.applied);
            return;
        }
        self.syncer.applied_tx.send_replace(self.applied.clone());
        for (origin, to, reply) in raises {
            tracing::info!(%origin, to, "applied vector fast-forwarded past truncated ops");
            let _ = reply.send(self.applied.clone());
        }
    }

    /// Starts a new journal segment and hands the memtable's active layer to the fold thread,
    /// with `notify` to answer once it is folded. Skipped (false) while the previous fold is
    /// still running, unless `wait`.
    fn checkpoint(&mut self, wait: bool, notify: Vec<oneshot::Sender<()>>) -> bool {
        // After a failed journal sync the active layer holds groups whose clients were told
        // the write failed: folding them would make durable, and replicate, writes the node
        // answered as failed. What the journal did get to disk a restart replays.
        if self.failed.load(Ordering::Acquire) {
            return false;
        }
        while self.folds_done.try_recv().is_ok() {}
        if self.memtable.frozen().is_some() {
            if !wait {
                return false;
            }
            while self.memtable.frozen().is_some() {
                if self.failed.load(Ordering::Acquire) || self.folds_done.recv().is_err() {
                    return false;
                }
            }
        }
        self.syncer.flush();
        let segment = match self.syncer.journal.rotate() {
            Ok(segment) => segment,
            Err(error) => {
                tracing::error!(%error, "journal rotation failed; checkpoint skipped");
                return false;
            }
        };
        // Everything in the active layer is in segments before `segment`, so the fold covers
        // them.
        let Some(layer) = self.memtable.freeze() else {
            return false;
        };
        let job = FoldJob {
            layer,
            segment,
            // A fresh reading is ahead of every stamp issued before the freeze; later ones are
            // in the journal, whose replay feeds them to the clock too.
            last_stamp: self.clock.read(),
            peer_applied: self
                .peer_applied
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            truncated: self
                .truncated
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            notify,
        };
        self.folder.send(job).is_ok()
    }
}

/// Journal appends, one fsync per group of groups, then replies.
pub(super) struct Syncer {
    pub(super) journal: Journal,
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
        applied_tx: watch::Sender<VersionVector>,
        metrics: Arc<Metrics>,
        failed: Arc<AtomicBool>,
    ) -> Self {
        Self {
            journal,
            applied_tx,
            metrics,
            failed,
            waiting: Vec::new(),
            ops_waiting: 0,
        }
    }

    /// Appends a group's journal records (none when it logged no op) and keeps its replies,
    /// with the applied vector they report, for the next [`Self::flush`].
    fn append(
        &mut self,
        records: &[Vec<u8>],
        ops: usize,
        pending: Vec<Pending>,
        applied: VersionVector,
    ) {
        for record in records {
            if let Err(error) = self.journal.append(record) {
                tracing::error!(%error, "journal append failed; refusing further writes");
                self.failed.store(true, Ordering::Release);
                break;
            }
        }
        self.ops_waiting += ops;
        self.waiting.push((pending, applied));
    }

    pub(super) fn flush(&mut self) {
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
                let now = uhlc::system_time_clock().as_u64();
                for (pending, applied) in self.waiting.drain(..) {
                    for reply in pending {
                        if let Pending::Remote(_, _, stamps) = &reply {
                            self.metrics.record_apply_lag(stamps, now);
                        }
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
                let detail = format!(
                    "journal fsync failed ({error}): whether this write survives is unknown until \
                     the node restarts and replays what reached its disk; the node takes no more \
                     writes, so restart it (after fixing the disk) and read the key before \
                     retrying a write that is not idempotent"
                );
                for (pending, _) in self.waiting.drain(..) {
                    for reply in pending {
                        reply.fail(&detail);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tables::STATES;
    use meridian_crdt::PnCounter;

    fn counter(value: i64) -> State {
        let node = NodeId::new(1).unwrap();
        State::Counter(PnCounter::default().increment(node, value).unwrap())
    }

    fn commit_state(db: &Database, key: &[u8], state: &State) {
        let txn = db.begin_write().unwrap();
        txn.open_table(STATES)
            .unwrap()
            .insert(key, codec::encode_state(state).as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    /// A group reads key `a` from redb, then a fold commits the frozen layer (holding `b`)
    /// and drops it, then the group reads `b`: it must see `b` as the fold committed it, not
    /// as the snapshot taken for `a` (which predates that commit) had it.
    #[test]
    fn a_fold_finishing_mid_group_does_not_hide_its_states() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db.redb")).unwrap();
        let (a, b) = (state_key(Kind::Counter, "a"), state_key(Kind::Counter, "b"));
        commit_state(&db, &a, &counter(1));
        let memtable = Memtable::new(VersionVector::new());
        memtable.publish(
            [(b.clone(), Arc::new(counter(7)))],
            [],
            &VersionVector::new(),
        );
        assert!(memtable.freeze().is_some());

        let mut group = Group::new(&memtable, &db, VersionVector::new(), 0);
        assert_eq!(group.state_at(a, Kind::Counter).unwrap(), &counter(1));
        // The fold of the frozen layer: commit, then drop the layer.
        commit_state(&db, &b, &counter(7));
        memtable.folded();
        assert_eq!(group.state_at(b, Kind::Counter).unwrap(), &counter(7));
    }
}
