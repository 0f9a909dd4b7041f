//! The single writer: group commit of local writes, remote ops and WAL truncation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use meridian_crdt::{Dot, NodeId, Op, Stamp, State, VersionVector, codec};
use redb::{Database, ReadableTable, ReadableTableMetadata, Table};
use tokio::sync::{mpsc, oneshot, watch};

use super::replica::RemoteError;
use super::tables::{APPLIED, META, META_LAST_STAMP, PEER_APPLIED, STATES, WAL, state_key};
use super::{Command, Committed, StorageError, StorageOptions, WriteError, corrupt};
use crate::metrics::Metrics;

/// A reply to send once the batch's fate is known.
enum Pending {
    Local(oneshot::Sender<Result<Committed, WriteError>>, Result<Committed, WriteError>),
    Remote(oneshot::Sender<Result<VersionVector, RemoteError>>, Option<RemoteError>),
    Truncate(oneshot::Sender<Result<u64, StorageError>>, u64),
}

pub(super) struct Writer {
    db: Arc<Database>,
    options: StorageOptions,
    hlc: Arc<uhlc::HLC>,
    /// The applied vector as of the last commit; the writer is its only author.
    applied: VersionVector,
    applied_tx: watch::Sender<VersionVector>,
    queue: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
}

/// States touched by the batch, written back once at the end: a hot key written by many
/// requests of one group is decoded and encoded once, not once per request.
struct Batch<'t> {
    states: Table<'t, &'static [u8], &'static [u8]>,
    wal: Table<'t, (u64, u64), &'static [u8]>,
    dirty: HashMap<Vec<u8>, State>,
    applied: VersionVector,
    last_stamp: Option<Stamp>,
}

impl Batch<'_> {
    fn state(&mut self, kind: meridian_crdt::Kind, key: &str) -> Result<&mut State, StorageError> {
        let storage_key = state_key(kind, key);
        if !self.dirty.contains_key(&storage_key) {
            let state = match self.states.get(storage_key.as_slice())? {
                Some(bytes) => codec::decode_state(bytes.value())
                    .map_err(|e| corrupt(format!("{kind}/{key}"), e))?,
                None => State::bottom(kind),
            };
            self.dirty.insert(storage_key.clone(), state);
        }
        self.dirty
            .get_mut(&storage_key)
            .ok_or_else(|| corrupt("batch cache", "entry vanished"))
    }

    fn append(&mut self, op: &Op) -> Result<(), StorageError> {
        self.wal.insert((op.dot.node.get(), op.dot.seq), codec::encode_op(op).as_slice())?;
        self.applied.raise(op.dot.node, op.dot.seq);
        Ok(())
    }
}

impl Writer {
    pub(super) fn new(
        db: Arc<Database>,
        options: StorageOptions,
        hlc: Arc<uhlc::HLC>,
        applied: VersionVector,
        applied_tx: watch::Sender<VersionVector>,
        queue: mpsc::Receiver<Command>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { db, options, hlc, applied, applied_tx, queue, metrics }
    }

    pub(super) fn run(mut self) {
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
                // Everything after the shutdown marker is dropped: its callers see
                // ShuttingDown when their reply channel closes.
                commands.truncate(at);
            }
            if !commands.is_empty() {
                self.commit(commands);
            }
            if stop.is_some() {
                break;
            }
        }
        tracing::debug!("writer stopped");
    }

    fn commit(&mut self, commands: Vec<Command>) {
        let size = commands.len();
        let started = Instant::now();
        let mut pending = Vec::with_capacity(size);
        let result = self.execute(commands, &mut pending);
        let elapsed = started.elapsed();
        match result {
            Ok(applied) => {
                self.metrics.record_commit(size, elapsed);
                self.applied = applied.clone();
                self.applied_tx.send_replace(applied.clone());
                for reply in pending {
                    match reply {
                        Pending::Local(tx, mut result) => {
                            if let Ok(committed) = &mut result {
                                committed.applied = applied.clone();
                            }
                            let _ = tx.send(result);
                        }
                        Pending::Remote(tx, None) => {
                            let _ = tx.send(Ok(applied.clone()));
                        }
                        Pending::Remote(tx, Some(error)) => {
                            let _ = tx.send(Err(error));
                        }
                        Pending::Truncate(tx, removed) => {
                            let _ = tx.send(Ok(removed));
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, batch = size, "commit failed; the batch was not applied");
                self.metrics.record_commit_failure();
                let detail = error.to_string();
                for reply in pending {
                    let failed = || StorageError::Failed(detail.clone());
                    match reply {
                        Pending::Local(tx, _) => {
                            let _ = tx.send(Err(WriteError::Storage(failed())));
                        }
                        Pending::Remote(tx, _) => {
                            let _ = tx.send(Err(RemoteError::Storage(failed())));
                        }
                        Pending::Truncate(tx, _) => {
                            let _ = tx.send(Err(failed()));
                        }
                    }
                }
            }
        }
    }

    /// Runs the whole group in one write transaction; replies are collected in `pending` and
    /// sent by the caller once the commit's outcome is known.
    fn execute(
        &mut self,
        commands: Vec<Command>,
        pending: &mut Vec<Pending>,
    ) -> Result<VersionVector, StorageError> {
        let txn = self.db.begin_write()?;
        let applied = {
            let mut batch = Batch {
                states: txn.open_table(STATES)?,
                wal: txn.open_table(WAL)?,
                dirty: HashMap::new(),
                applied: self.applied.clone(),
                last_stamp: None,
            };
            for command in commands {
                match command {
                    Command::Local { kind, key, intent, reply } => {
                        let result = self.local(&mut batch, kind, key, &intent);
                        let result = match result {
                            Err(WriteError::Storage(e)) => return Err(e),
                            other => other,
                        };
                        pending.push(Pending::Local(reply, result));
                    }
                    Command::Remote { ops, reply } => {
                        let error = self.remote(&mut batch, ops)?;
                        pending.push(Pending::Remote(reply, error));
                    }
                    Command::Truncate { below, reply } => {
                        let removed = truncate(&mut batch.wal, &below)?;
                        pending.push(Pending::Truncate(reply, removed));
                    }
                    Command::PeerApplied { peer, applied } => {
                        let bytes = postcard::to_allocvec(&applied).map_err(|e| corrupt("peer vector", e))?;
                        txn.open_table(PEER_APPLIED)?.insert(peer.get(), bytes.as_slice())?;
                    }
                    Command::Shutdown => {}
                }
            }
            for (key, state) in &batch.dirty {
                batch.states.insert(key.as_slice(), codec::encode_state(state).as_slice())?;
            }
            let mut applied_table = txn.open_table(APPLIED)?;
            for (origin, seq) in batch.applied.iter() {
                if self.applied.get(origin) != seq {
                    applied_table.insert(origin.get(), seq)?;
                }
            }
            if let Some(stamp) = batch.last_stamp {
                let bytes = postcard::to_allocvec(&stamp).map_err(|e| corrupt("last_stamp", e))?;
                txn.open_table(META)?.insert(META_LAST_STAMP, bytes.as_slice())?;
            }
            batch.applied
        };
        txn.commit()?;
        Ok(applied)
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
        let ts = self.hlc.new_timestamp();
        let stamp = Stamp::from_uhlc(&ts).unwrap_or(Stamp::new(ts.get_time().as_u64(), node));
        let max = self.options.max_set_elements;
        let state = batch.state(kind, &key)?;
        let delta = intent.delta(state, node, dot, stamp, max)?;
        state.merge(&delta).map_err(|e| corrupt(format!("{kind}/{key}"), e))?;
        let state = state.clone();
        batch.append(&Op { dot, stamp, key, delta })?;
        batch.last_stamp = Some(stamp);
        Ok(Committed { state, dot, stamp, applied: VersionVector::new() })
    }

    /// Applies remote ops in order; returns the first gap, if any, as the reply's error.
    fn remote(&self, batch: &mut Batch<'_>, ops: Vec<Op>) -> Result<Option<RemoteError>, StorageError> {
        let mut stopped: Vec<NodeId> = Vec::new();
        let mut error = None;
        for op in ops {
            let origin = op.dot.node;
            if stopped.contains(&origin) {
                continue;
            }
            let have = batch.applied.get(origin);
            if op.dot.seq <= have {
                continue;
            }
            if op.dot.seq != have + 1 {
                stopped.push(origin);
                error.get_or_insert(RemoteError::Gap { origin, expected: have + 1, got: op.dot.seq });
                continue;
            }
            let kind = op.kind();
            let state = batch.state(kind, &op.key)?;
            if let Err(e) = state.merge(&op.delta) {
                return Err(corrupt(format!("{kind}/{}", op.key), e));
            }
            batch.append(&op)?;
        }
        Ok(error)
    }
}

fn truncate(wal: &mut Table<'_, (u64, u64), &'static [u8]>, below: &VersionVector) -> Result<u64, StorageError> {
    let before = wal.len()?;
    for (origin, seq) in below.iter() {
        wal.retain_in((origin.get(), 0)..=(origin.get(), seq), |_, _| false)?;
    }
    Ok(before - wal.len()?)
}
