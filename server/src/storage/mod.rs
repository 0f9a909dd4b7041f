//! Durable storage over redb: CRDT states, the WAL, and the applied version vector.
//!
//! # Write path
//! Every write goes through one applier thread ([`writer`]): it drains the queue of pending
//! operations, applies the group to the keys' states in memory ([`memtable`]), appends the
//! group's ops to the journal and answers each request only after one `fdatasync` covered them. Every second the fold thread ([`fold`]) writes what the
//! memtable gathered into redb in one durable commit (states, WAL rows, applied vector), after
//! which the journal segments it covers are recycled. A crash loses only unanswered writes,
//! wholly: start-up replays the journal over the last fold.
//!
//! # Read path
//! Reads look in the memtable, then in their own redb read transaction (an MVCC snapshot);
//! they never wait for the applier beyond a brief lock, nor for a fold.

pub mod backup;
mod clock;
mod fold;
mod intent;
mod journal;
mod memtable;
mod replica;
mod tables;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use meridian_crdt::{Dot, Kind, NodeId, Op, Stamp, State, VersionVector};
use meridian_replication::merkle::{self, MerkleTree};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use tokio::sync::{mpsc, oneshot, watch};

use clock::Clock;
pub use intent::Intent;
pub use journal::BareJournal;
use journal::Journal;
use memtable::Memtable;
use tables::{
    APPLIED, META, META_JOURNAL_ID, META_LAST_STAMP, META_NODE_ID, META_SCHEMA,
    META_TOMBSTONE_INDEX, PEER_APPLIED, SCHEMA_VERSION, STATES, TOMBSTONES, WAL,
};

use crate::metrics::Metrics;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("corrupt data for {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("data directory belongs to node {found}, not node {expected}")]
    WrongNode { expected: NodeId, found: u64 },
    #[error("data directory has schema version {0}, this build reads {SCHEMA_VERSION}")]
    Schema(u8),
    #[error(
        "the data file is a backup, not a node's data: seed a data directory with `meridian admin restore`"
    )]
    IsBackup,
    #[error(
        "the journal directory {dir} holds no journal of this database (no journal.id), and \
         the journal may hold acknowledged writes not yet in the database: if \
         storage.journal_dir was changed, stop the node, move the old journal directory's \
         files into {dir} and start again"
    )]
    JournalMissing { dir: String },
    #[error(
        "the journal in {dir} belongs to {owner}, not to this database: each node needs a \
         journal directory of its own"
    )]
    ForeignJournal { dir: String, owner: String },
    #[error("storage is shutting down")]
    ShuttingDown,
    /// A read's snapshot reflects writes whose journal sync has not returned: serving it could
    /// hand out (and let read repair spread) a write that a crash would still take back.
    #[error(
        "the state read here includes writes the journal has not made durable after {waited_ms} ms; nothing was answered, retry shortly"
    )]
    NotDurable { waited_ms: u64 },
    #[error("commit failed: {0}")]
    Failed(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                Self::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Why a single write was refused; nothing of it was applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("the counter would overflow 64 bits")]
    CounterOverflow,
    #[error("the set would hold {size} elements; the limit is {limit}")]
    TooManyElements { size: usize, limit: usize },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What a committed local write returns: the key's state right after it, and the op's identity.
#[derive(Clone, Debug)]
pub struct Committed {
    pub state: Arc<State>,
    pub dot: Dot,
    pub stamp: Stamp,
    /// The node's applied vector right after the commit that made this write durable.
    pub applied: VersionVector,
}

/// Tuning for [`Storage::open`].
#[derive(Clone, Debug)]
pub struct StorageOptions {
    pub node: NodeId,
    /// Where the journal lives; `None`: the `journal` directory inside the data directory.
    pub journal_dir: Option<PathBuf>,
    pub max_batch: usize,
    pub cache_bytes: usize,
    pub max_clock_skew: Duration,
    pub max_set_elements: usize,
}

pub(crate) enum Command {
    Local {
        kind: Kind,
        key: String,
        intent: Intent,
        reply: oneshot::Sender<Result<Committed, WriteError>>,
    },
    Remote {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<VersionVector, replica::RemoteError>>,
    },
    /// Anti-entropy: join full states into storage keys, logging no op.
    Merge {
        states: Vec<(Vec<u8>, State)>,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
    /// Time for a checkpoint (sent by the checkpoint timer).
    Checkpoint,
    /// Fold now, waiting for a fold in progress; answers once the Merkle tree reflects it.
    Fold(oneshot::Sender<()>),
    /// Garbage collection: drop these keys' register tombstones if `stable` covers them.
    Purge {
        keys: Vec<Vec<u8>>,
        stable: VersionVector,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
    /// Raise the applied entry of `origin` to `to` without its ops, durably (see
    /// `ReplicaStore::fast_forward`); answers with the applied vector once a fold holds it.
    FastForward {
        origin: NodeId,
        to: u64,
        reply: oneshot::Sender<VersionVector>,
    },
    /// Commit what came before, then stop.
    Shutdown,
}

struct Inner {
    db: Arc<Database>,
    memtable: Arc<Memtable>,
    node: NodeId,
    clock: Arc<Clock>,
    commands: mpsc::Sender<Command>,
    applied: watch::Receiver<VersionVector>,
    peer_applied: Arc<Mutex<BTreeMap<NodeId, VersionVector>>>,
    /// WAL entries every peer has acknowledged; the next fold deletes them.
    truncated: Arc<Mutex<VersionVector>>,
    /// The last causally stable frontier garbage collection was given: a tombstone it covers
    /// that anti-entropy brings back is dropped rather than revived.
    stable: Arc<Mutex<VersionVector>>,
    refused_stamps: AtomicU64,
    /// Set when the journal could not be made durable: writes are refused from then on.
    failed: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The anti-entropy Merkle tree: written by the fold thread after each fold, read by the
    /// sync dialogue. Rebuilt from the states table at open.
    tree: Arc<RwLock<MerkleTree>>,
    metrics: Arc<Metrics>,
}

/// A handle to the node's storage; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

/// Where the journal of the data directory `data_dir` lives: `configured`, or its `journal`
/// subdirectory.
pub fn journal_dir(data_dir: &Path, configured: Option<&Path>) -> PathBuf {
    configured.map_or_else(|| data_dir.join("journal"), Path::to_path_buf)
}

fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt {
        what: what.into(),
        detail: detail.to_string(),
    }
}

impl Storage {
    /// Opens (or creates) the database in `dir` and starts the writer thread.
    pub fn open(
        dir: &Path,
        options: StorageOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StorageError> {
        let io = |source| StorageError::Io {
            path: dir.display().to_string(),
            source,
        };
        journal::create_dir_durably(dir).map_err(io)?;
        let path = dir.join("meridian.redb");
        let created = !path.exists();
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(&path)?;
        if created {
            // redb fsyncs the file but not the directory entry naming it: without this a power
            // cut right after creation can lose the file, and every commit acknowledged in it.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        let node = options.node;
        let (applied, peer_applied, last_stamp) = Self::bootstrap(&db, options.node)?;

        let clock = Arc::new(Clock::new(options.node, options.max_clock_skew));
        if let Some(stamp) = last_stamp {
            clock.observe_own(stamp);
        }

        let journal_dir = journal_dir(dir, options.journal_dir.as_deref());
        Self::claim_journal(&db, node, &journal_dir, &self::journal_dir(dir, None))?;
        let replay = Journal::replay(&journal_dir).map_err(io)?;
        if replay.torn_segments > 0 {
            // A torn write from a crash, or simply the old records of a recycled segment.
            tracing::info!(
                segments = replay.torn_segments,
                "journal replay stopped at an invalid record"
            );
        }
        let applied = Self::replay(&db, &clock, node, applied, replay.ops)?;
        let tree = Arc::new(RwLock::new(Self::build_tree(&db)?));
        let journal = Journal::start(&journal_dir).map_err(io)?;

        let db = Arc::new(db);
        let memtable = Arc::new(Memtable::new(applied.clone()));
        let failed = Arc::new(AtomicBool::new(false));
        let peer_applied = Arc::new(Mutex::new(peer_applied));
        let truncated = Arc::new(Mutex::new(VersionVector::new()));
        let stable = Arc::new(Mutex::new(VersionVector::new()));
        let (applied_tx, applied_rx) = watch::channel(applied.clone());
        let (commands, queue) = mpsc::channel(options.max_batch.max(1024) * 4);
        let (fold_tx, fold_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(f)
                .map_err(io)
        };
        let syncer = writer::Syncer::new(journal, applied_tx, metrics.clone(), failed.clone());
        let folder = fold::Folder {
            db: db.clone(),
            memtable: memtable.clone(),
            tree: tree.clone(),
            jobs: fold_rx,
            done: done_tx,
            journal_dir: journal_dir.clone(),
            metrics: metrics.clone(),
            failed: failed.clone(),
        };
        let folder = spawn("meridian-fold", Box::new(move || folder.run()))?;
        let applier = writer::Writer {
            db: db.clone(),
            memtable: memtable.clone(),
            options,
            clock: clock.clone(),
            applied,
            queue,
            metrics: metrics.clone(),
            syncer,
            failed: failed.clone(),
            folder: fold_tx,
            folds_done: done_rx,
            peer_applied: peer_applied.clone(),
            truncated: truncated.clone(),
            stable: stable.clone(),
        };
        let applier = spawn("meridian-writer", Box::new(move || applier.run()))?;
        let timer = commands.clone();
        // Asks for a checkpoint every interval; ends when the writer's queue closes.
        spawn(
            "meridian-checkpoint",
            Box::new(move || {
                while !timer.is_closed() {
                    std::thread::sleep(writer::CHECKPOINT_INTERVAL);
                    if let Err(mpsc::error::TrySendError::Closed(_)) =
                        timer.try_send(Command::Checkpoint)
                    {
                        break;
                    }
                }
            }),
        )?;
        let inner = Arc::new(Inner {
            db,
            memtable,
            node,
            clock,
            commands,
            applied: applied_rx,
            peer_applied,
            truncated,
            stable,
            refused_stamps: AtomicU64::new(0),
            failed,
            // The applier first: its final checkpoint feeds the fold thread, which ends when its
            // queue closes behind it.
            threads: Mutex::new(vec![applier, folder]),
            tree,
            metrics,
        });
        Ok(Self { inner })
    }

    /// Applies the journal's ops over the last fold, durably, before anything else runs.
    fn replay(
        db: &Database,
        clock: &Clock,
        node: NodeId,
        applied: VersionVector,
        ops: Vec<Op>,
    ) -> Result<VersionVector, StorageError> {
        if ops.is_empty() {
            return Ok(applied);
        }
        let count = ops.len();
        if let Some(stamp) = ops
            .iter()
            .filter(|op| op.dot.node == node)
            .map(|op| op.stamp)
            .max()
        {
            clock.observe_own(stamp);
        }
        let memtable = Memtable::new(applied.clone());
        // Replay is once, at start: the group grows as it goes rather than guess its keys.
        let mut group = writer::Group::new(&memtable, db, applied, 0);
        if let Some(gap) = group
            .apply_ops(ops, None)
            .map_err(|e| corrupt("journal replay", e))?
        {
            return Err(corrupt("journal", gap));
        }
        let (replayed, _) = group.publish();
        let peer_applied = BTreeMap::new();
        let Some(layer) = memtable.freeze() else {
            return Err(corrupt("journal replay", "memtable already frozen"));
        };
        fold::commit(
            db,
            &fold::FoldJob {
                layer,
                segment: 0,
                last_stamp: clock.read(),
                peer_applied,
                truncated: VersionVector::new(),
                notify: Vec::new(),
            },
        )?;
        tracing::info!(ops = count, "replayed the journal");
        Ok(replayed)
    }

    /// Builds the anti-entropy tree by scanning every state.
    fn build_tree(db: &Database) -> Result<MerkleTree, StorageError> {
        let started = std::time::Instant::now();
        let mut tree = MerkleTree::new();
        let read = db.begin_read()?;
        for entry in read.open_table(STATES)?.iter()? {
            let (key, value) = entry?;
            tree.insert(key.value(), merkle::state_hash(value.value()));
        }
        tracing::info!(
            keys = tree.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built the anti-entropy Merkle tree"
        );
        Ok(tree)
    }

    /// Folds everything applied so far into redb and the Merkle tree, which otherwise trail
    /// the memtable by up to a checkpoint interval. For operators and tests that compare trees.
    pub async fn fold_now(&self) -> Result<(), StorageError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Fold(reply)).await?;
        answer.await.map_err(|_| StorageError::ShuttingDown)
    }

    /// Reads the Merkle tree (for the sync dialogue and the admin endpoint). It reflects
    /// states as of the last fold (at most a checkpoint interval ago); see [`Self::fold_now`].
    pub fn with_tree<R>(&self, f: impl FnOnce(&MerkleTree) -> R) -> R {
        let tree = self
            .inner
            .tree
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&tree)
    }

    /// Checks that `dir` holds this database's journal, or takes it if neither has an owner
    /// yet (a new node, or one from before journals named their owner). A node must never
    /// replay another database's journal, nor start without its own: the journal holds
    /// acknowledged writes the last fold has not yet put into redb.
    /// `default` is where the journal lives unless configured elsewhere: a database from
    /// before journals named their owner, moved to a `journal_dir` while its journal still
    /// sits there, is refused too.
    fn claim_journal(
        db: &Database,
        node: NodeId,
        dir: &Path,
        default: &Path,
    ) -> Result<(), StorageError> {
        let io = |source| StorageError::Io {
            path: dir.display().to_string(),
            source,
        };
        let recorded = {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            meta.get(META_JOURNAL_ID)?
                .map(|v| {
                    <[u8; 16]>::try_from(v.value())
                        .map(u128::from_be_bytes)
                        .map_err(|_| corrupt("meta journal_id", "not 16 bytes"))
                })
                .transpose()?
        };
        let found = journal::owner(dir).map_err(io)?;
        let missing = || StorageError::JournalMissing {
            dir: dir.display().to_string(),
        };
        let foreign = |owner: journal::Owner| StorageError::ForeignJournal {
            dir: dir.display().to_string(),
            owner: format!("node {} (journal id {:032x})", owner.node, owner.id),
        };
        let id = match (recorded, found) {
            (Some(recorded), Some(found)) if found.id == recorded && found.node == node.get() => {
                return Ok(());
            }
            (Some(_), None) => return Err(missing()),
            // A crash came between naming the directory and recording its id here.
            (None, Some(found)) if found.node == node.get() => found.id,
            (_, Some(found)) => return Err(foreign(found)),
            (None, None) if dir != default && journal::has_segments(default).map_err(io)? => {
                return Err(missing());
            }
            (None, None) => {
                let id = rand::random::<u128>();
                journal::set_owner(
                    dir,
                    journal::Owner {
                        node: node.get(),
                        id,
                    },
                )
                .map_err(io)?;
                id
            }
        };
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(META_JOURNAL_ID, id.to_be_bytes().as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Creates the tables on first open, checks identity and schema, loads the vectors.
    #[allow(clippy::type_complexity)]
    fn bootstrap(
        db: &Database,
        node: NodeId,
    ) -> Result<
        (
            VersionVector,
            BTreeMap<NodeId, VersionVector>,
            Option<Stamp>,
        ),
        StorageError,
    > {
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_NODE_ID)?.map(|v| v.value().to_vec());
            match found {
                None if meta.get(backup::META_BACKUP_OF)?.is_some() => {
                    return Err(StorageError::IsBackup);
                }
                None => {
                    meta.insert(META_NODE_ID, node.get().to_be_bytes().as_slice())?;
                    meta.insert(META_SCHEMA, [SCHEMA_VERSION].as_slice())?;
                    meta.insert(META_TOMBSTONE_INDEX, [1u8].as_slice())?;
                }
                Some(bytes) => {
                    let id = <[u8; 8]>::try_from(bytes.as_slice())
                        .map(u64::from_be_bytes)
                        .map_err(|_| corrupt("meta node_id", "not 8 bytes"))?;
                    if id != node.get() {
                        return Err(StorageError::WrongNode {
                            expected: node,
                            found: id,
                        });
                    }
                    let schema = meta
                        .get(META_SCHEMA)?
                        .and_then(|v| v.value().first().copied());
                    if schema != Some(SCHEMA_VERSION) {
                        return Err(StorageError::Schema(schema.unwrap_or(0)));
                    }
                }
            }
            txn.open_table(STATES)?;
            txn.open_table(WAL)?;
            txn.open_table(APPLIED)?;
            txn.open_table(PEER_APPLIED)?;
            txn.open_table(TOMBSTONES)?;
            let indexed = meta.get(META_TOMBSTONE_INDEX)?.is_some();
            drop(meta);
            if !indexed {
                Self::index_tombstones(&txn)?;
            }
        }
        txn.commit()?;

        let read = db.begin_read()?;
        let mut applied = VersionVector::new();
        for entry in read.open_table(APPLIED)?.iter()? {
            let (origin, seq) = entry?;
            let origin =
                NodeId::new(origin.value()).ok_or_else(|| corrupt("applied", "origin 0"))?;
            applied.set(origin, seq.value());
        }
        let mut peers = BTreeMap::new();
        for entry in read.open_table(PEER_APPLIED)?.iter()? {
            let (peer, bytes) = entry?;
            let peer =
                NodeId::new(peer.value()).ok_or_else(|| corrupt("peer_applied", "peer 0"))?;
            let vv = postcard::from_bytes(bytes.value()).map_err(|e| corrupt("peer_applied", e))?;
            peers.insert(peer, vv);
        }
        let last_stamp = match read.open_table(META)?.get(META_LAST_STAMP)? {
            Some(bytes) => {
                Some(postcard::from_bytes(bytes.value()).map_err(|e| corrupt("last_stamp", e))?)
            }
            None => None,
        };
        Ok((applied, peers, last_stamp))
    }

    /// Builds the tombstone index of a data directory written before it existed.
    fn index_tombstones(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
        let states = txn.open_table(STATES)?;
        let mut tombstones = txn.open_table(TOMBSTONES)?;
        for entry in states.iter()? {
            let (key, value) = entry?;
            let Ok(state) = meridian_crdt::codec::decode_state(value.value()) else {
                return Err(corrupt("state", "undecodable while indexing tombstones"));
            };
            if let Some(dot) = tables::tombstone_dot(&state) {
                tombstones.insert(key.value(), (dot.node.get(), dot.seq))?;
            }
        }
        txn.open_table(META)?
            .insert(META_TOMBSTONE_INDEX, [1u8].as_slice())?;
        Ok(())
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    /// Garbage collection at causal stability: drops every register tombstone whose dot
    /// `stable` covers, at most `max_keys` per call, scanning the tombstone index from after
    /// `after` (a previous round's [`GcRound::last`]). `stable` must be causally stable (see
    /// `meridian_crdt::Crdt::collect_garbage`). Tombstones still in the memtable wait for the
    /// next pass.
    pub async fn collect_garbage(
        &self,
        stable: &VersionVector,
        max_keys: usize,
        after: Option<&[u8]>,
    ) -> Result<GcRound, StorageError> {
        self.inner
            .stable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .merge(stable);
        let (keys, last) = {
            let read = self.inner.db.begin_read()?;
            let table = read.open_table(TOMBSTONES)?;
            let mut keys = Vec::new();
            let mut last = None;
            let range = match after {
                Some(after) => table.range::<&[u8]>((
                    std::ops::Bound::Excluded(after),
                    std::ops::Bound::Unbounded,
                ))?,
                None => table.range::<&[u8]>(..)?,
            };
            for entry in range {
                let (key, dot) = entry?;
                last = Some(key.value().to_vec());
                let (origin, seq) = dot.value();
                let covered = NodeId::new(origin)
                    .is_some_and(|origin| stable.contains(Dot::new(origin, seq)));
                // A key in the memtable was written or purged since its last fold: the next
                // round, after the fold, sees its current state.
                if covered && !self.inner.memtable.written_since_fold(key.value()) {
                    keys.push(key.value().to_vec());
                    if keys.len() == max_keys {
                        break;
                    }
                }
            }
            (keys, last)
        };
        let examined = keys.len() as u64;
        if keys.is_empty() {
            return Ok(GcRound {
                last,
                ..GcRound::default()
            });
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Purge {
            keys,
            stable: stable.clone(),
            reply,
        })
        .await?;
        let purged = answer.await.map_err(|_| StorageError::ShuttingDown)??;
        Ok(GcRound {
            examined,
            purged,
            last,
        })
    }

    /// Sizes of what the node stores, for operators and the garbage collection benchmark.
    pub fn stats(&self) -> Result<StorageStats, StorageError> {
        let read = self.inner.db.begin_read()?;
        let states = read.open_table(STATES)?;
        let state_stats = states.stats()?;
        Ok(StorageStats {
            states: states.len()?,
            state_bytes: state_stats.stored_bytes(),
            tombstones: read.open_table(TOMBSTONES)?.len()?,
            wal_ops: read.open_table(WAL)?.len()? + self.inner.memtable.wal_len(),
        })
    }

    /// Queues a local write and waits until it is durable.
    pub async fn write(
        &self,
        kind: Kind,
        key: String,
        intent: Intent,
    ) -> Result<Committed, WriteError> {
        self.queue_write(kind, key, intent).await?.await
    }

    /// Queues a local write: once this returns, the applier has it and it commits even if
    /// nobody waits (the caller may tell a client so). The returned future completes when
    /// the write is durable.
    pub async fn queue_write(
        &self,
        kind: Kind,
        key: String,
        intent: Intent,
    ) -> Result<impl Future<Output = Result<Committed, WriteError>> + use<>, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Local {
            kind,
            key,
            intent,
            reply,
        })
        .await?;
        Ok(async move { answer.await.map_err(|_| StorageError::ShuttingDown)? })
    }

    async fn send(&self, command: Command) -> Result<(), StorageError> {
        self.inner
            .commands
            .send(command)
            .await
            .map_err(|_| StorageError::ShuttingDown)
    }

    /// The state of one key, from a fresh snapshot; `None` if the key was never written.
    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<State>, StorageError> {
        Ok(self.get_with_applied(kind, key)?.0)
    }

    /// The state of one key and the applied vector of the same snapshot: the state reflects
    /// every op that vector covers. The vector may run ahead of [`Self::applied`] by ops
    /// applied but not yet durable in the journal.
    pub fn get_with_applied(
        &self,
        kind: Kind,
        key: &str,
    ) -> Result<(Option<State>, VersionVector), StorageError> {
        let view = self.inner.memtable.view(&self.inner.db);
        let state = view.state(&tables::state_key(kind, key))?;
        Ok((state.map(Arc::unwrap_or_clone), view.applied().clone()))
    }

    /// Up to `limit` keys of `kind` that start with `prefix` and sort after `after`, with their
    /// states, in key order, and the applied vector of the same snapshot. Keys whose state
    /// holds nothing to show (see `is_visible`) are skipped but still count as scanned, so
    /// the scan is bounded by `limit * 4` entries.
    pub fn list(
        &self,
        kind: Kind,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Page, VersionVector), StorageError> {
        let view = self.inner.memtable.view(&self.inner.db);
        let page = view.list(kind, prefix, after, limit, is_visible)?;
        Ok((page, view.applied().clone()))
    }

    pub fn applied(&self) -> VersionVector {
        self.inner.applied.borrow().clone()
    }

    pub fn watch_applied(&self) -> watch::Receiver<VersionVector> {
        self.inner.applied.clone()
    }

    /// A fresh HLC reading.
    pub fn now(&self) -> Stamp {
        self.inner.clock.read()
    }

    /// Remote stamps refused as clock input because they were too far ahead.
    pub fn refused_stamps(&self) -> u64 {
        self.inner.refused_stamps.load(Ordering::Relaxed)
    }

    /// Feeds a remote stamp to the HLC; false (and counted) when beyond the skew bound.
    pub fn observe_stamp(&self, stamp: Stamp) -> bool {
        let ok = self.inner.clock.observe(stamp);
        if !ok {
            self.inner.refused_stamps.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Feeds a register's stamp to the clock, as replicated ops feed theirs: a state that
    /// arrives whole (anti-entropy, a quorum read, read repair) can carry a value a client
    /// reads and then overwrites here, and the overwrite must be stamped after it.
    pub fn observe_state_stamp(&self, state: &State) {
        if let State::Register(register) = state {
            if let Some(entry) = register.entry() {
                self.observe_stamp(entry.stamp);
            }
        }
    }

    /// Number of ops held in the WAL, in redb and in memory (an op being folded counts twice).
    pub fn wal_len(&self) -> Result<u64, StorageError> {
        let read = self.inner.db.begin_read()?;
        Ok(read.open_table(WAL)?.len()? + self.inner.memtable.wal_len())
    }

    /// The applied vector whose ops are all in redb and in the Merkle tree (the last fold's).
    pub fn folded_applied(&self) -> VersionVector {
        self.inner.memtable.folded_applied()
    }

    /// Drops WAL entries every peer has acknowledged (`below`, per origin): at once from
    /// memory, from redb at the next fold. Returns how many were dropped from memory.
    pub fn truncate_wal(&self, below: &VersionVector) -> u64 {
        self.inner
            .truncated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .merge(below);
        self.inner.memtable.truncate(below)
    }

    /// Stops the writer after it has committed everything queued before this call, and
    /// checkpoints. Writes queued later fail with [`StorageError::ShuttingDown`].
    pub async fn shutdown(&self) {
        let threads = self
            .inner
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        if threads.is_empty() {
            return;
        }
        let _ = self.inner.commands.send(Command::Shutdown).await;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }

    /// False once the journal failed to sync: the node then refuses writes.
    pub fn is_healthy(&self) -> bool {
        !self.inner.failed.load(Ordering::Acquire)
    }
}

/// One garbage collection round: tombstones the frontier covered, how many the applier purged
/// (fewer when a key was written meanwhile), and the last index key scanned (`None` once the
/// scan reached the end).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcRound {
    pub examined: u64,
    pub purged: u64,
    pub last: Option<Vec<u8>>,
}

/// What [`Storage::stats`] reports. Counts are of folded data (a second behind at most).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StorageStats {
    /// Keys in the states table.
    pub states: u64,
    /// Bytes of keys and states in the states table (redb's stored bytes).
    pub state_bytes: u64,
    /// Register tombstones awaiting garbage collection.
    pub tombstones: u64,
    /// Ops held for shipping to peers, in redb and in memory.
    pub wal_ops: u64,
}

/// One page of a listing: keys with their states, and the key to continue after.
pub type Page = (Vec<(String, State)>, Option<String>);

/// Whether listing shows the key: not when a delete left nothing to show, as a deleted key
/// is absent in Redis. Hidden: a deleted register, a counter reset with nothing added since,
/// a set with no elements (cleared, or every element removed). `GET` still answers these
/// counters (0) and sets (empty), as it does for keys never written.
fn is_visible(state: &State) -> bool {
    match state {
        State::Register(r) => r.value().is_some(),
        State::Counter(c) => c.written_since_reset(),
        State::GCounter(c) => c.written_since_reset(),
        State::Set(s) => !s.is_empty(),
    }
}
