//! The fold: writes a frozen memtable layer into redb in one durable commit.
//!
//! One transaction holds the layer's states, its ops (as WAL rows, except those every peer
//! already acknowledged), the applied vector, the peers' acknowledged vectors, and the journal
//! segment from which replay must start. Once it commits, the Merkle tree learns the new state
//! hashes, the layer is dropped from memory, and the journal segments before that one are
//! recycled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as sync_mpsc;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use meridian_crdt::{Kind, NodeId, Stamp, VersionVector, codec};
use meridian_replication::merkle::{self, MerkleTree};
use redb::{Database, ReadableTableMetadata, Table};

use super::memtable::{Layer, Memtable};
use super::tables::{
    APPLIED, META, META_CHECKPOINT, META_LAST_STAMP, PEER_APPLIED, STATES, TOMBSTONES, WAL,
    tombstone_dot,
};
use super::{StorageError, corrupt};
use crate::metrics::Metrics;

/// A frozen layer and what else the fold commits with it.
pub(super) struct FoldJob {
    pub(super) layer: Arc<Layer>,
    /// The journal segment started right before the freeze: replay begins there once this
    /// fold is durable.
    pub(super) segment: u64,
    pub(super) last_stamp: Stamp,
    pub(super) peer_applied: BTreeMap<NodeId, VersionVector>,
    /// WAL entries at or below this (per origin) every peer has acknowledged.
    pub(super) truncated: VersionVector,
    /// Answered once the fold is in redb and in the Merkle tree.
    pub(super) notify: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// One key's new state hash for the Merkle tree: (bucket, storage key, hash), no hash when the
/// key was garbage collected.
type LeafUpdate = (u32, Vec<u8>, Option<merkle::Hash>);

/// Commits `job` durably; returns the Merkle updates to apply once it has.
pub(super) fn commit(db: &Database, job: &FoldJob) -> Result<Vec<LeafUpdate>, StorageError> {
    let txn = db.begin_write()?;
    let mut leaves = Vec::with_capacity(job.layer.states.len());
    {
        let mut states = txn.open_table(STATES)?;
        let mut tombstones = txn.open_table(TOMBSTONES)?;
        for (key, state) in &job.layer.states {
            let bucket = merkle::bucket_of(key);
            if state.is_bottom() {
                // Garbage collected (or never held anything): the key goes away entirely.
                states.remove(key.as_slice())?;
                tombstones.remove(key.as_slice())?;
                leaves.push((bucket, key.clone(), None));
                continue;
            }
            let encoded = codec::encode_state(state);
            states.insert(key.as_slice(), encoded.as_slice())?;
            match tombstone_dot(state) {
                Some(dot) => {
                    tombstones.insert(key.as_slice(), (dot.node.get(), dot.seq))?;
                }
                None if state.kind() == Kind::Register => {
                    tombstones.remove(key.as_slice())?;
                }
                None => {}
            }
            leaves.push((bucket, key.clone(), Some(merkle::state_hash(&encoded))));
        }
        let mut wal = txn.open_table(WAL)?;
        for (&(origin, seq), op) in &job.layer.wal {
            let acknowledged = NodeId::new(origin).is_some_and(|o| seq <= job.truncated.get(o));
            if !acknowledged {
                wal.insert((origin, seq), &**op)?;
            }
        }
        truncate(&mut wal, &job.truncated)?;
        let mut applied = txn.open_table(APPLIED)?;
        for (origin, seq) in job.layer.applied.iter() {
            applied.insert(origin.get(), seq)?;
        }
        let mut peers = txn.open_table(PEER_APPLIED)?;
        for (peer, vector) in &job.peer_applied {
            let bytes = postcard::to_allocvec(vector).map_err(|e| corrupt("peer vector", e))?;
            peers.insert(peer.get(), bytes.as_slice())?;
        }
        let mut meta = txn.open_table(META)?;
        meta.insert(META_CHECKPOINT, job.segment.to_be_bytes().as_slice())?;
        let stamp = postcard::to_allocvec(&job.last_stamp).map_err(|e| corrupt("last_stamp", e))?;
        meta.insert(META_LAST_STAMP, stamp.as_slice())?;
    }
    txn.commit()?;
    Ok(leaves)
}

/// Deletes WAL rows every peer has acknowledged.
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

/// Applies a fold's Merkle updates: memory only, the lock held for no I/O.
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

/// Attempts at one fold before the node gives up and refuses writes.
const FOLD_ATTEMPTS: u32 = 5;

/// The fold thread: folds each frozen layer, retrying a failed commit a few times. The layer
/// stays readable in memory and its ops stay in the journal meanwhile, so a node that gives up
/// (and refuses writes from then on) loses nothing: a restart replays the journal.
pub(super) struct Folder {
    pub(super) db: Arc<Database>,
    pub(super) memtable: Arc<Memtable>,
    pub(super) tree: Arc<RwLock<MerkleTree>>,
    pub(super) jobs: sync_mpsc::Receiver<FoldJob>,
    pub(super) done: sync_mpsc::Sender<()>,
    /// The journal's directory: a fold recycles the segments it covers.
    pub(super) journal_dir: std::path::PathBuf,
    pub(super) metrics: Arc<Metrics>,
    pub(super) failed: Arc<AtomicBool>,
}

impl Folder {
    pub(super) fn run(self) {
        yield_to_requests();
        while let Ok(job) = self.jobs.recv() {
            let started = Instant::now();
            let mut attempt = 0;
            let leaves = loop {
                attempt += 1;
                match commit(&self.db, &job) {
                    Ok(leaves) => break Some(leaves),
                    Err(error) if attempt < FOLD_ATTEMPTS => {
                        tracing::error!(%error, attempt, "folding the memtable into redb failed; retrying");
                        self.metrics.record_commit_failure();
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(error) => {
                        tracing::error!(%error, "folding the memtable into redb keeps failing; refusing further writes");
                        self.metrics.record_commit_failure();
                        self.failed.store(true, Ordering::Release);
                        break None;
                    }
                }
            };
            let Some(leaves) = leaves else {
                let _ = self.done.send(());
                continue;
            };
            apply_leaves(&self.tree, leaves);
            // Before the layer is released: the applier's next checkpoint waits for that, and
            // then finds the pruned segment waiting as the spare to rotate into. (Were the
            // prune to come later, a checkpoint in between would zero-fill 16 MB of a new
            // segment inside the applier, with every write waiting on it.)
            if let Err(error) = super::journal::prune_before(&self.journal_dir, job.segment) {
                tracing::warn!(%error, "cannot recycle old journal segments");
            }
            self.memtable.folded();
            self.metrics.record_checkpoint(started.elapsed());
            for reply in job.notify {
                let _ = reply.send(());
            }
            let _ = self.done.send(());
        }
        tracing::debug!("fold thread stopped");
    }
}

/// Lowers this thread's CPU priority (nice 9). A fold is a burst of tens of milliseconds of
/// B-tree work once a second; at normal priority it takes its core from the request and
/// applier threads for that long, which showed as the tail of write latency and replication
/// lag on a busy machine. Nothing waits on a fold (the journal already made its writes
/// durable), so it can run in what CPU time is left; it still gets a share, so it never starves.
fn yield_to_requests() {
    use thread_priority::{ThreadPriority, ThreadPriorityValue, set_current_thread_priority};
    let lowered = ThreadPriorityValue::try_from(25u8)
        .map_err(|e| format!("{e:?}"))
        .and_then(|value| {
            set_current_thread_priority(ThreadPriority::Crossplatform(value))
                .map_err(|e| format!("{e:?}"))
        });
    if let Err(error) = lowered {
        tracing::debug!(%error, "cannot lower the fold thread's priority");
    }
}
