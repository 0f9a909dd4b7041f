//! Online backup of a running node, and offline restore into a new node's data directory.
//!
//! A backup is a redb file with the schema of a data directory, minus what belongs to the node
//! that took it: the `states` and `applied` tables copied from ONE read transaction (so every
//! state reflects exactly the ops the applied vector names), and a `meta` table with the schema
//! version and the backup's provenance but no `node_id`.
//!
//! Left out on purpose:
//! - the WAL: every op in it is already folded into the states; it exists only to ship ops
//!   to peers, and a restored node's peers get those ops from their origins (or, for a node
//!   gone for good, from anti-entropy). It can also be large (a lagging peer holds it back).
//! - the peers' acknowledged vectors: they say what peers acknowledged to the source node
//!   and bound the source's WAL truncation; the restored node has an empty WAL and learns
//!   its own peers' vectors from their acks.
//! - the node id, the checkpoint segment and the last HLC reading: node-local bookkeeping.
//!   [`restore`] writes the new node's id; a backup file is refused as a data directory.

use std::path::{Path, PathBuf};

use meridian_crdt::{NodeId, Stamp, VersionVector};
use redb::{
    Database, Durability, ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata,
};

use super::tables::{APPLIED, META, META_NODE_ID, META_SCHEMA, SCHEMA_VERSION, STATES};
use super::{Storage, StorageError, corrupt};

/// `meta` key marking a backup file: the id of the node it was taken from (8 bytes, BE).
/// [`restore`] removes it; [`Storage::open`] refuses a file that still has it.
pub(crate) const META_BACKUP_OF: &str = "backup_of";
/// `meta` key: the HLC stamp of the moment the backup's snapshot was taken (postcard).
const META_BACKUP_AT: &str = "backup_taken_at";
/// `meta` key: the number of states the backup holds, checked by [`verify`].
const META_BACKUP_KEYS: &str = "backup_keys";

/// Rows per transaction while writing a backup: bounds the writer's memory; only the last
/// commit is durable, and the file counts as a backup only once that commit wrote the marker.
const ROWS_PER_COMMIT: usize = 10_000;

/// What a backup holds, as read back from the file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackupInfo {
    /// The node the backup was taken from.
    pub source: u64,
    /// When (the source's HLC) the snapshot was taken.
    pub taken_at: Stamp,
    /// The applied vector of the snapshot: the states reflect exactly these ops.
    pub applied: VersionVector,
    pub keys: u64,
    pub bytes: u64,
}

/// Why a backup or a restore did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{path} is not a Meridian backup: {detail}")]
    NotABackup { path: String, detail: String },
    #[error(
        "the backup holds {seq} op(s) of node {node} itself; a node restarted from an old copy \
         of its own data would reissue sequence numbers it already used (two different ops \
         under one dot, which peers would never repair). Restore into a NEW node id instead \
         (`meridian cluster add-node`), and remove node {node} from the cluster"
    )]
    OwnOps { node: NodeId, seq: u64 },
    #[error("{0} already holds a node's data; restore only into an empty data directory")]
    DataDirInUse(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl From<redb::Error> for BackupError {
    fn from(e: redb::Error) -> Self {
        Self::Storage(e.into())
    }
}

macro_rules! backup_from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for BackupError {
            fn from(e: $t) -> Self {
                Self::Storage(e.into())
            }
        }
    )*};
}
backup_from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// fsyncs the directory holding `path`, so a new or renamed entry survives a power cut.
fn sync_parent(path: &Path) -> Result<(), BackupError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent))
}

impl Storage {
    /// Writes a consistent snapshot of this node's data to a new file at `out` (which must
    /// not exist), fsyncs it and reads it back. Writes keep flowing meanwhile: the snapshot is
    /// the state as of a fold forced at the start, read from one redb read transaction.
    pub async fn backup(&self, out: &Path) -> Result<BackupInfo, BackupError> {
        // Recent writes live in the memtable; fold them so the snapshot is not a second old.
        self.fold_now().await?;
        let db = self.inner.db.clone();
        let source = self.inner.node;
        let taken_at = self.now();
        let out = out.to_path_buf();
        tokio::task::spawn_blocking(move || {
            write_backup(&db, source, taken_at, &out)?;
            verify(&out)
        })
        .await
        .map_err(|e| StorageError::Failed(format!("backup task: {e}")))?
    }
}

fn set_durability(txn: &mut redb::WriteTransaction, d: Durability) -> Result<(), BackupError> {
    txn.set_durability(d)
        .map_err(|e| BackupError::Storage(StorageError::Failed(e.to_string())))
}

fn write_backup(
    db: &Database,
    source: NodeId,
    taken_at: Stamp,
    out: &Path,
) -> Result<(), BackupError> {
    if out.exists() {
        return Err(BackupError::Io {
            path: out.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    let snapshot = db.begin_read()?;
    let backup = Database::create(out)?;
    let states = snapshot.open_table(STATES)?;
    let mut rows = states.iter()?;
    let mut keys = 0u64;
    loop {
        let mut txn = backup.begin_write()?;
        set_durability(&mut txn, Durability::None)?;
        let mut more = false;
        {
            let mut table = txn.open_table(STATES)?;
            for entry in rows.by_ref() {
                let (key, value) = entry?;
                table.insert(key.value(), value.value())?;
                keys += 1;
                if keys % ROWS_PER_COMMIT as u64 == 0 {
                    more = true;
                    break;
                }
            }
        }
        txn.commit()?;
        if !more {
            break;
        }
    }
    let mut txn = backup.begin_write()?;
    set_durability(&mut txn, Durability::Immediate)?;
    {
        let mut applied = txn.open_table(APPLIED)?;
        for entry in snapshot.open_table(APPLIED)?.iter()? {
            let (origin, seq) = entry?;
            applied.insert(origin.value(), seq.value())?;
        }
        let mut meta = txn.open_table(META)?;
        meta.insert(META_SCHEMA, [SCHEMA_VERSION].as_slice())?;
        let stamp = postcard::to_allocvec(&taken_at).map_err(|e| corrupt("backup stamp", e))?;
        meta.insert(META_BACKUP_AT, stamp.as_slice())?;
        meta.insert(META_BACKUP_KEYS, keys.to_be_bytes().as_slice())?;
        // Last: the marker makes the file a backup.
        meta.insert(META_BACKUP_OF, source.get().to_be_bytes().as_slice())?;
    }
    txn.commit()?;
    drop(backup);
    std::fs::File::open(out)
        .and_then(|f| f.sync_all())
        .map_err(io(out))?;
    sync_parent(out)?;
    Ok(())
}

fn u64_of(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes)
}

/// Opens a backup file read-only and checks it: the schema version, the backup marker, the
/// number of states, and that every applied entry names a real node.
pub fn verify(path: &Path) -> Result<BackupInfo, BackupError> {
    let not_backup = |detail: &str| BackupError::NotABackup {
        path: path.display().to_string(),
        detail: detail.to_owned(),
    };
    let bytes = std::fs::metadata(path).map_err(io(path))?.len();
    let db = ReadOnlyDatabase::open(path).map_err(|e| not_backup(&e.to_string()))?;
    let read = db.begin_read()?;
    let meta = read
        .open_table(META)
        .map_err(|_| not_backup("no meta table"))?;
    let schema = meta
        .get(META_SCHEMA)?
        .and_then(|v| v.value().first().copied());
    if schema != Some(SCHEMA_VERSION) {
        return Err(not_backup(&format!(
            "schema version {}, this build reads {SCHEMA_VERSION}",
            schema.unwrap_or(0)
        )));
    }
    if meta.get(META_NODE_ID)?.is_some() {
        return Err(not_backup("it is a node's data file, not a backup"));
    }
    let source = meta
        .get(META_BACKUP_OF)?
        .and_then(|v| u64_of(v.value()))
        .ok_or_else(|| not_backup("no backup marker (incomplete or not a backup)"))?;
    let taken_at: Stamp = meta
        .get(META_BACKUP_AT)?
        .map(|v| postcard::from_bytes(v.value()))
        .transpose()
        .map_err(|e| not_backup(&format!("backup stamp: {e}")))?
        .ok_or_else(|| not_backup("no backup stamp"))?;
    let expected = meta
        .get(META_BACKUP_KEYS)?
        .and_then(|v| u64_of(v.value()))
        .ok_or_else(|| not_backup("no key count"))?;
    let keys = read
        .open_table(STATES)
        .map_err(|_| not_backup("no states table"))?
        .len()?;
    if keys != expected {
        return Err(not_backup(&format!(
            "holds {keys} states, its marker says {expected}"
        )));
    }
    let mut applied = VersionVector::new();
    for entry in read
        .open_table(APPLIED)
        .map_err(|_| not_backup("no applied table"))?
        .iter()?
    {
        let (origin, seq) = entry?;
        let origin = NodeId::new(origin.value()).ok_or_else(|| not_backup("applied origin 0"))?;
        applied.set(origin, seq.value());
    }
    Ok(BackupInfo {
        source,
        taken_at,
        applied,
        keys,
        bytes,
    })
}

/// Seeds `data_dir` (empty or absent) with `backup` for node `node`, which must not have ops
/// in the backup. The node then catches up from its peers: the WAL from its applied vector,
/// anti-entropy for whatever the WALs no longer hold.
pub fn restore(
    backup: &Path,
    data_dir: &Path,
    journal: &Path,
    node: NodeId,
) -> Result<BackupInfo, BackupError> {
    let info = verify(backup)?;
    let own = info.applied.get(node);
    if own > 0 {
        return Err(BackupError::OwnOps { node, seq: own });
    }
    let target = data_dir.join("meridian.redb");
    if target.exists() {
        return Err(BackupError::DataDirInUse(data_dir.display().to_string()));
    }
    if std::fs::read_dir(journal).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::DataDirInUse(journal.display().to_string()));
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let partial: PathBuf = data_dir.join("meridian.redb.restoring");
    std::fs::copy(backup, &partial).map_err(io(&partial))?;
    {
        let db = Database::open(&partial)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(META_NODE_ID, node.get().to_be_bytes().as_slice())?;
            meta.remove(META_BACKUP_OF)?;
            meta.remove(META_BACKUP_KEYS)?;
        }
        txn.commit()?;
    }
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(io(&partial))?;
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    sync_parent(&target)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use meridian_crdt::{CanonicalJson, Kind};
    use serde_json::json;

    use super::*;
    use crate::metrics::Metrics;
    use crate::storage::{Intent, StorageOptions};

    fn open(dir: &Path, node: u64) -> Result<Storage, StorageError> {
        Storage::open(
            dir,
            StorageOptions {
                node: NodeId::new(node).unwrap(),
                journal_dir: None,
                max_batch: 256,
                cache_bytes: 16 << 20,
                max_clock_skew: Duration::from_secs(1),
                max_set_elements: 1000,
            },
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test]
    async fn a_backup_restores_into_a_new_node_and_not_into_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let source = open(&dir.path().join("a"), 1).unwrap();
        for i in 0..25 {
            source
                .write(
                    Kind::Register,
                    format!("k{i}"),
                    Intent::PutRegister(CanonicalJson::new(&json!(i))),
                )
                .await
                .unwrap();
        }
        let file = dir.path().join("backup.redb");
        let info = source.backup(&file).await.unwrap();
        assert_eq!(info.keys, 25);
        assert_eq!(info.source, 1);
        assert_eq!(info.applied.get(NodeId::new(1).unwrap()), 25);
        // A second backup never overwrites a file.
        assert!(source.backup(&file).await.is_err());
        source.shutdown().await;

        // A backup file is not a data directory.
        let raw = dir.path().join("raw");
        std::fs::create_dir_all(&raw).unwrap();
        std::fs::copy(&file, raw.join("meridian.redb")).unwrap();
        let err = open(&raw, 2).unwrap_err();
        assert!(err.to_string().contains("restore"), "{err}");

        let b = dir.path().join("b");
        let err = restore(&file, &b, &b.join("journal"), NodeId::new(1).unwrap()).unwrap_err();
        assert!(matches!(err, BackupError::OwnOps { seq: 25, .. }), "{err}");
        assert!(err.to_string().contains("reissue"), "{err}");

        let target = dir.path().join("c");
        let journal = target.join("journal");
        restore(&file, &target, &journal, NodeId::new(3).unwrap()).unwrap();
        let err = restore(&file, &target, &journal, NodeId::new(3).unwrap()).unwrap_err();
        assert!(matches!(err, BackupError::DataDirInUse(_)), "{err}");
        let restored = open(&target, 3).unwrap();
        assert_eq!(restored.applied().get(NodeId::new(1).unwrap()), 25);
        let state = restored.get(Kind::Register, "k7").unwrap().unwrap();
        let meridian_crdt::State::Register(register) = state else {
            panic!("not a register");
        };
        assert_eq!(
            register.value().map(CanonicalJson::to_value),
            Some(json!(7))
        );
        restored.shutdown().await;
        drop(restored);
        // The restored directory belongs to node 3 now.
        assert!(matches!(
            open(&target, 4).unwrap_err(),
            StorageError::WrongNode { .. }
        ));
    }

    #[test]
    fn garbage_is_not_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("junk");
        std::fs::write(&file, b"not a database").unwrap();
        assert!(matches!(
            verify(&file).unwrap_err(),
            BackupError::NotABackup { .. }
        ));
        assert!(matches!(
            verify(&dir.path().join("missing")).unwrap_err(),
            BackupError::Io { .. }
        ));
    }
}
