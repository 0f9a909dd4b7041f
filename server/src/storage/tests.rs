//! The memtable layered over redb: reads, listings and WAL reads see one consistent picture
//! whichever layer (active, frozen, redb) holds each key or op.

use std::sync::Arc;
use std::time::Duration;

use meridian_crdt::{CanonicalJson, Kind, NodeId, State, VersionVector};
use meridian_replication::store::StoreError;
use serde_json::json;

use super::{Intent, Storage, StorageError, StorageOptions};
use crate::metrics::Metrics;

fn open(dir: &std::path::Path) -> Storage {
    open_with(dir, 1, None).unwrap()
}

fn open_with(
    dir: &std::path::Path,
    node: u64,
    journal_dir: Option<&std::path::Path>,
) -> Result<Storage, StorageError> {
    Storage::open(
        dir,
        StorageOptions {
            node: NodeId::new(node).unwrap(),
            journal_dir: journal_dir.map(std::path::Path::to_path_buf),
            max_batch: 256,
            cache_bytes: 16 << 20,
            max_clock_skew: Duration::from_secs(1),
            max_set_elements: 1000,
        },
        Arc::new(Metrics::new()),
    )
}

async fn put(storage: &Storage, key: &str, value: serde_json::Value) {
    storage
        .write(
            Kind::Register,
            key.to_owned(),
            Intent::PutRegister(CanonicalJson::new(&value)),
        )
        .await
        .unwrap();
}

async fn delete(storage: &Storage, key: &str) {
    storage
        .write(Kind::Register, key.to_owned(), Intent::DeleteRegister)
        .await
        .unwrap();
}

/// Keys one garbage-collection round of up to 100 keys purges below `frontier`.
async fn purged_in_one_round(storage: &Storage, frontier: &VersionVector) -> u64 {
    storage
        .collect_garbage(frontier, 100, None)
        .await
        .unwrap()
        .purged
}

/// The value of register `key`, if it holds one.
fn register(storage: &Storage, key: &str) -> Option<serde_json::Value> {
    storage
        .get(Kind::Register, key)
        .unwrap()
        .and_then(|s| value(&s))
}

fn value(state: &State) -> Option<serde_json::Value> {
    match state {
        State::Register(r) => r.value().map(CanonicalJson::to_value),
        _ => None,
    }
}

#[tokio::test]
async fn listing_merges_memory_over_redb() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    for key in ["a", "b", "c", "d", "e"] {
        put(&storage, key, json!(format!("{key}-old"))).await;
    }
    storage.fold_now().await.unwrap();
    // Newer states of some keys, a deletion and a new key, all in memory only.
    put(&storage, "c", json!("c-new")).await;
    put(&storage, "f", json!("f-new")).await;
    delete(&storage, "b").await;

    let ((page, next), _) = storage.list(Kind::Register, "", None, 100).unwrap();
    assert_eq!(next, None);
    let seen: Vec<(String, serde_json::Value)> = page
        .iter()
        .map(|(k, s)| (k.clone(), value(s).unwrap()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a".to_owned(), json!("a-old")),
            ("c".to_owned(), json!("c-new")),
            ("d".to_owned(), json!("d-old")),
            ("e".to_owned(), json!("e-old")),
            ("f".to_owned(), json!("f-new")),
        ]
    );

    // Pages of two cross layers without skipping or repeating a key.
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = storage
            .list(Kind::Register, "", after.as_deref(), 2)
            .map(|(page, _)| page)
            .unwrap();
        keys.extend(page.into_iter().map(|(k, _)| k));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(keys, ["a", "c", "d", "e", "f"]);
    // Other kinds and prefixes stay out.
    assert!(
        storage
            .list(Kind::Set, "", None, 10)
            .unwrap()
            .0
            .0
            .is_empty()
    );
    storage.shutdown().await;
}

#[tokio::test]
async fn reads_see_the_newest_layer() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    put(&storage, "k", json!(1)).await;
    storage.fold_now().await.unwrap();
    let (state, applied) = storage.get_with_applied(Kind::Register, "k").unwrap();
    assert_eq!(value(&state.unwrap()), Some(json!(1)));
    assert_eq!(applied.get(storage.node_id()), 1);
    put(&storage, "k", json!(2)).await;
    let (state, applied) = storage.get_with_applied(Kind::Register, "k").unwrap();
    assert_eq!(value(&state.unwrap()), Some(json!(2)));
    assert_eq!(applied.get(storage.node_id()), 2);
    assert!(storage.get(Kind::Register, "absent").unwrap().is_none());
    storage.shutdown().await;
    drop(storage);

    // After a restart everything comes from redb (and the journal).
    let storage = open(dir.path());
    let state = storage.get(Kind::Register, "k").unwrap().unwrap();
    assert_eq!(value(&state), Some(json!(2)));
    storage.shutdown().await;
}

#[tokio::test]
async fn the_wal_reads_across_folded_and_recent_ops_and_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let node = storage.node_id();
    for i in 0..10 {
        put(&storage, &format!("k{i}"), json!(i)).await;
    }
    storage.fold_now().await.unwrap();
    for i in 10..20 {
        put(&storage, &format!("k{i}"), json!(i)).await;
    }
    let ops = storage.read_wal_ops(node, 0, 100, usize::MAX).unwrap();
    let seqs: Vec<u64> = ops.iter().map(|op| op.dot.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    // Limits hold across the layer boundary.
    let ops = storage.read_wal_ops(node, 7, 5, usize::MAX).unwrap();
    let seqs: Vec<u64> = ops.iter().map(|op| op.dot.seq).collect();
    assert_eq!(seqs, [8, 9, 10, 11, 12]);

    let mut below = VersionVector::new();
    below.set(node, 15);
    storage.truncate_wal(&below);
    storage.fold_now().await.unwrap();
    match storage.read_wal_ops(node, 0, 100, usize::MAX) {
        Err(StoreError::Truncated {
            first_available, ..
        }) => assert_eq!(first_available, 16),
        other => panic!("expected Truncated, got {other:?}"),
    }
    let seqs: Vec<u64> = storage
        .read_wal_ops(node, 15, 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|op| op.dot.seq)
        .collect();
    assert_eq!(seqs, [16, 17, 18, 19, 20]);
    assert_eq!(storage.wal_len().unwrap(), 5);
    storage.shutdown().await;
}

/// Writes `intent(i)` to registers `key-00000` … `key-09999`, many at a time.
async fn write_all(storage: &Storage, intent: impl Fn(usize) -> Intent) {
    for chunk in (0..10_000).collect::<Vec<_>>().chunks(500) {
        let mut writes = tokio::task::JoinSet::new();
        for &i in chunk {
            let storage = storage.clone();
            let intent = intent(i);
            writes.spawn(async move {
                storage
                    .write(Kind::Register, format!("key-{i:05}"), intent)
                    .await
            });
        }
        while let Some(done) = writes.join_next().await {
            done.unwrap().unwrap();
        }
    }
}

/// Everything this node has applied: stable, in a one-node world.
fn everything(storage: &Storage) -> VersionVector {
    storage.applied()
}

#[tokio::test]
async fn garbage_collection_drops_stable_tombstones_and_they_stay_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    put(&storage, "gone", json!("v")).await;
    put(&storage, "kept", json!("v")).await;
    delete(&storage, "gone").await;
    let tombstone = storage.get(Kind::Register, "gone").unwrap().unwrap();
    // Not folded yet: the round leaves it for later.
    assert_eq!(
        purged_in_one_round(&storage, &everything(&storage)).await,
        0
    );
    storage.fold_now().await.unwrap();
    assert_eq!(storage.stats().unwrap().tombstones, 1);
    let root_before = storage.with_tree(meridian_replication::merkle::MerkleTree::root);

    // A frontier that does not cover the delete keeps it.
    let mut behind = everything(&storage);
    behind.set(storage.node_id(), 2);
    assert_eq!(purged_in_one_round(&storage, &behind).await, 0);

    assert_eq!(
        purged_in_one_round(&storage, &everything(&storage)).await,
        1
    );
    assert!(storage.get(Kind::Register, "gone").unwrap().is_none());
    storage.fold_now().await.unwrap();
    let stats = storage.stats().unwrap();
    assert_eq!((stats.states, stats.tombstones), (1, 0));
    assert_ne!(
        storage.with_tree(meridian_replication::merkle::MerkleTree::root),
        root_before
    );
    assert_eq!(
        storage.with_tree(meridian_replication::merkle::MerkleTree::len),
        1
    );

    // A peer that has not collected it yet sends the tombstone back: it is not revived.
    let key = super::tables::state_key(Kind::Register, "gone");
    assert_eq!(
        storage
            .merge_full_states(vec![(key, tombstone)])
            .await
            .unwrap(),
        0
    );
    assert!(storage.get(Kind::Register, "gone").unwrap().is_none());
    // A later write brings the key back as usual.
    put(&storage, "gone", json!("again")).await;
    let state = storage.get(Kind::Register, "gone").unwrap().unwrap();
    assert_eq!(value(&state), Some(json!("again")));
    storage.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_deleted_registers_shrink_the_stored_state() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let payload = CanonicalJson::new(&json!("x".repeat(100)));
    write_all(&storage, |_| Intent::PutRegister(payload.clone())).await;
    storage.fold_now().await.unwrap();
    let written = storage.stats().unwrap();
    write_all(&storage, |_| Intent::DeleteRegister).await;
    storage.fold_now().await.unwrap();
    let deleted = storage.stats().unwrap();
    assert_eq!(deleted.tombstones, 10_000);
    let mut purged = 0;
    let mut after: Option<Vec<u8>> = None;
    while purged < 10_000 {
        let round = storage
            .collect_garbage(&everything(&storage), 4096, after.as_deref())
            .await
            .unwrap();
        assert!(round.purged > 0, "a round made no progress at {purged}");
        purged += round.purged;
        after = round.last;
    }
    storage.fold_now().await.unwrap();
    let collected = storage.stats().unwrap();
    eprintln!(
        "stored state bytes: written {written:?}, deleted {deleted:?}, collected {collected:?}"
    );
    assert_eq!((collected.states, collected.tombstones), (0, 0));
    assert!(
        collected.state_bytes < written.state_bytes / 100,
        "{written:?} → {deleted:?} → {collected:?}"
    );
    storage.shutdown().await;
}

/// A key's state stays in memory for one fold after the fold that committed it: reads and
/// writes find it there, then in redb, and each sees the newest state.
#[tokio::test]
async fn states_pass_from_the_last_folded_layer_to_redb() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    put(&storage, "k", json!(1)).await;
    storage.fold_now().await.unwrap();
    assert_eq!(
        register(&storage, "k"),
        Some(json!(1)),
        "from the last folded layer"
    );
    put(&storage, "k", json!(2)).await;
    assert_eq!(
        register(&storage, "k"),
        Some(json!(2)),
        "the active layer shadows it"
    );
    storage.fold_now().await.unwrap();
    assert_eq!(register(&storage, "k"), Some(json!(2)));
    delete(&storage, "k").await;
    storage.fold_now().await.unwrap();
    assert_eq!(
        register(&storage, "k"),
        None,
        "a deleted register, from the last folded layer"
    );
    storage.fold_now().await.unwrap();
    assert_eq!(register(&storage, "k"), None, "and from redb");
    put(&storage, "k", json!(3)).await;
    storage.fold_now().await.unwrap();
    storage.fold_now().await.unwrap();
    assert_eq!(register(&storage, "k"), Some(json!(3)), "from redb");
    put(&storage, "k", json!(4)).await;
    assert_eq!(register(&storage, "k"), Some(json!(4)));
    storage.shutdown().await;
    drop(storage);
    let storage = open(dir.path());
    assert_eq!(register(&storage, "k"), Some(json!(4)), "after a restart");
    storage.shutdown().await;
}

/// Reads share one redb snapshot between folds; after a fold moves a newer state out of
/// memory, a read must not be served from the snapshot taken before that fold.
#[tokio::test]
async fn reads_never_use_a_snapshot_older_than_the_last_fold() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    for round in 0..5 {
        put(&storage, "k", json!(round)).await;
        storage.fold_now().await.unwrap();
        // The last folded layer still holds the state; the next fold, of a layer without
        // it, leaves it to redb alone.
        put(&storage, "other", json!(round)).await;
        storage.fold_now().await.unwrap();
        // Now only redb holds the state; this read opens (or reuses) the shared snapshot.
        assert_eq!(register(&storage, "k"), Some(json!(round)), "round {round}");
        put(&storage, "other", json!(round)).await;
        assert_eq!(
            register(&storage, "k"),
            Some(json!(round)),
            "round {round}, reused"
        );
    }
}

/// The journal's files: name → inode.
fn journal_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir.join("journal"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log"))
        })
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            (name, entry.metadata().unwrap().ino())
        })
        .collect()
}

/// A fold leaves the segment it covered waiting as the spare by the time it returns, so the
/// next checkpoint renames that file into the new segment instead of zero-filling 16 MB in
/// the applier while writes wait.
#[tokio::test]
async fn each_fold_leaves_a_spare_that_the_next_rotation_recycles() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    put(&storage, "k", json!(1)).await;
    storage.fold_now().await.unwrap();
    let after_first = journal_files(dir.path());
    assert_eq!(
        after_first.keys().collect::<Vec<_>>(),
        ["journal-00000000000000000002.log", "journal-spare.log"]
    );
    put(&storage, "k", json!(2)).await;
    storage.fold_now().await.unwrap();
    let after_second = journal_files(dir.path());
    assert_eq!(
        after_second.keys().collect::<Vec<_>>(),
        ["journal-00000000000000000003.log", "journal-spare.log"]
    );
    assert_eq!(
        after_second["journal-00000000000000000003.log"], after_first["journal-spare.log"],
        "segment 3 is the recycled spare, not a fresh file"
    );
    assert_eq!(
        after_second["journal-spare.log"],
        after_first["journal-00000000000000000002.log"]
    );
    storage.shutdown().await;
    drop(storage);
    let reopened = open(dir.path());
    assert_eq!(
        value(&reopened.get(Kind::Register, "k").unwrap().unwrap()),
        Some(json!(2))
    );
}

/// A journal kept outside the data directory is this database's own: another node's database
/// may not take it, and this one will not start without it.
#[tokio::test]
async fn a_journal_elsewhere_belongs_to_one_database_and_must_be_there() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let journal = dir.path().join("log-device");
    let storage = open_with(&data, 1, Some(&journal)).unwrap();
    put(&storage, "k", json!("kept")).await;
    storage.shutdown().await;
    drop(storage);
    assert!(
        !data.join("journal").exists(),
        "nothing journals in the data directory"
    );
    assert!(journal.join("journal.id").exists());

    // Another database (another node's) pointed at this journal is refused.
    let other = open_with(&dir.path().join("other"), 2, Some(&journal)).unwrap_err();
    assert!(
        matches!(other, StorageError::ForeignJournal { .. }),
        "{other}"
    );
    // This database without its journal (storage.journal_dir changed, files not moved).
    let empty = dir.path().join("new-device");
    let missing = open_with(&data, 1, Some(&empty)).unwrap_err();
    assert!(
        matches!(missing, StorageError::JournalMissing { .. }),
        "{missing}"
    );
    assert!(
        missing.to_string().contains("move the old journal"),
        "{missing}"
    );
    // Moved with its files, it is found again.
    std::fs::remove_dir_all(&empty).ok();
    std::fs::rename(&journal, &empty).unwrap();
    let reopened = open_with(&data, 1, Some(&empty)).unwrap();
    assert_eq!(
        value(&reopened.get(Kind::Register, "k").unwrap().unwrap()),
        Some(json!("kept"))
    );
    reopened.shutdown().await;
}

/// A database from before journals named their owner takes its journal where it is; but one
/// pointed at a new `journal_dir` while its old journal still sits in the data directory is
/// refused, since that journal may hold acknowledged writes not yet folded.
#[tokio::test]
async fn an_older_database_is_refused_a_new_journal_dir_while_its_journal_is_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let storage = open_with(&data, 1, None).unwrap();
    put(&storage, "k", json!(1)).await;
    storage.shutdown().await;
    drop(storage);
    // What an older version leaves: no owner on either side.
    std::fs::remove_file(data.join("journal").join("journal.id")).unwrap();
    {
        let db = redb::Database::open(data.join("meridian.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(super::tables::META)
            .unwrap()
            .remove(super::tables::META_JOURNAL_ID)
            .unwrap();
        txn.commit().unwrap();
    }
    let elsewhere = dir.path().join("log-device");
    let refused = open_with(&data, 1, Some(&elsewhere)).unwrap_err();
    assert!(
        matches!(refused, StorageError::JournalMissing { .. }),
        "{refused}"
    );
    // Where it was, it is taken as this database's own.
    let reopened = open_with(&data, 1, None).unwrap();
    assert_eq!(
        value(&reopened.get(Kind::Register, "k").unwrap().unwrap()),
        Some(json!(1))
    );
    reopened.shutdown().await;
    drop(reopened);
    assert!(data.join("journal").join("journal.id").exists());
}

#[tokio::test]
async fn each_write_of_a_group_is_answered_with_the_state_right_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let mut writes = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let storage = storage.clone();
        writes.spawn(async move {
            storage
                .write(Kind::Counter, "hits".to_owned(), Intent::Increment(1))
                .await
        });
    }
    let mut values = Vec::new();
    let mut groups = std::collections::HashSet::new();
    while let Some(done) = writes.join_next().await {
        let committed = done.unwrap().unwrap();
        let State::Counter(counter) = &*committed.state else {
            panic!("a counter write answered {:?}", committed.state);
        };
        values.push(counter.value());
        groups.insert(committed.applied.get(NodeId::new(1).unwrap()));
    }
    // Writes shared groups (one applied vector per group): later writes of a group changed
    // the key while earlier answers of the same group still held its state.
    assert!(groups.len() < 500, "{} groups for 500 writes", groups.len());
    values.sort_unstable();
    assert_eq!(values, (1..=500).collect::<Vec<i64>>());
}

/// A fast-forward after anti-entropy: the applied vector moves past ops this node never
/// received, the WAL reports the gap as truncated rather than skip it, the next op of that
/// origin applies, and all of it is what a restart finds.
#[tokio::test]
async fn a_fast_forward_raises_applied_past_missing_ops_and_persists() {
    use meridian_replication::{MemStore, ReplicaStore, merkle};
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let peer = MemStore::new(NodeId::new(2).unwrap(), Duration::from_secs(1));
    let origin = peer.node_id();
    let ops: Vec<_> = (0..10).map(|_| peer.increment("c", 1).unwrap()).collect();
    storage.apply_remote_ops(ops[..3].to_vec()).await.unwrap();
    // Anti-entropy brings the peer's state after op 8 (ops 4-8 never arrive as ops).
    let at_eight = MemStore::new(NodeId::new(2).unwrap(), Duration::from_secs(1));
    at_eight.apply_remote(ops[..8].to_vec()).await.unwrap();
    let state = at_eight.get(Kind::Counter, "c").unwrap();
    storage
        .merge_full_states(vec![(merkle::storage_key(Kind::Counter, "c"), state)])
        .await
        .unwrap();
    assert_eq!(
        storage.applied().get(origin),
        3,
        "a merge moves no applied vector"
    );

    let applied = ReplicaStore::fast_forward(&storage, origin, 8)
        .await
        .unwrap();
    assert_eq!(applied.get(origin), 8);
    assert_eq!(storage.applied().get(origin), 8, "published once durable");
    // Ops 1-3 are in this node's WAL, 4-8 are not: a reader gets the first and is told the
    // rest were truncated, never ops 9 onwards as if they followed 3.
    let held: Vec<u64> = storage
        .read_wal_ops(origin, 0, 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|op| op.dot.seq)
        .collect();
    assert_eq!(held, [1, 2, 3]);
    match storage.read_wal_ops(origin, 3, 100, usize::MAX) {
        Err(StoreError::Truncated {
            first_available, ..
        }) => assert_eq!(first_available, 9),
        other => panic!("expected Truncated, got {other:?}"),
    }
    // Lowering is not a thing: an older fast-forward changes nothing.
    let applied = ReplicaStore::fast_forward(&storage, origin, 5)
        .await
        .unwrap();
    assert_eq!(applied.get(origin), 8);

    storage.apply_remote_ops(ops[8..].to_vec()).await.unwrap();
    assert_eq!(storage.applied().get(origin), 10);
    let counter = |storage: &Storage| match storage.get(Kind::Counter, "c").unwrap() {
        Some(State::Counter(c)) => c.value(),
        other => panic!("not a counter: {other:?}"),
    };
    assert_eq!(counter(&storage), 10);
    storage.shutdown().await;
    drop(storage);

    let storage = open(dir.path());
    assert_eq!(storage.applied().get(origin), 10);
    assert_eq!(counter(&storage), 10);
    storage.shutdown().await;
}

/// The host clock stepped back further than the skew bound while the node was down: its
/// next write must still be stamped after the ones it made before, or it would lose to them.
#[tokio::test]
async fn writes_after_a_restart_follow_the_nodes_own_stamps_when_the_clock_stepped_back() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    put(&storage, "k", json!("before")).await;
    storage.shutdown().await;
    drop(storage);
    // The last stamp a fold recorded, one minute ahead of the wall clock: what the node sees
    // at start when the clock was set back a minute (the skew bound here is one second).
    let ahead = uhlc::system_time_clock() + uhlc::NTP64::from(Duration::from_secs(60));
    let last = meridian_crdt::Stamp::new(ahead.as_u64(), NodeId::new(1).unwrap());
    {
        let db = redb::Database::create(dir.path().join("meridian.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(super::tables::META)
            .unwrap()
            .insert(
                super::tables::META_LAST_STAMP,
                postcard::to_allocvec(&last).unwrap().as_slice(),
            )
            .unwrap();
        txn.commit().unwrap();
    }
    let storage = open(dir.path());
    let committed = storage
        .write(
            Kind::Register,
            "k".to_owned(),
            Intent::PutRegister(CanonicalJson::new(&json!("after"))),
        )
        .await
        .unwrap();
    assert!(
        committed.stamp > last,
        "{:?} is not after {last:?}",
        committed.stamp
    );
    assert_eq!(register(&storage, "k"), Some(json!("after")));
    storage.shutdown().await;
}

/// After a journal sync fails, the write it carried is answered as failed, and nothing the
/// node does afterwards makes it durable: no checkpoint folds it into redb (here the one at
/// shutdown), so a restart finds only what the journal got to disk. Before, the next
/// checkpoint folded the failed group, and a write answered as failed came back applied.
#[tokio::test]
async fn a_write_whose_sync_failed_is_not_folded_into_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    put(&storage, "before", json!(1)).await;
    super::journal::injected::fail_next_sync(&dir.path().join("journal"));
    let failed = storage
        .write(
            Kind::Register,
            "lost".to_owned(),
            Intent::PutRegister(CanonicalJson::new(&json!(2))),
        )
        .await
        .unwrap_err();
    assert!(failed.to_string().contains("unknown"), "{failed}");
    assert!(!storage.is_healthy());
    assert!(
        storage
            .write(
                Kind::Register,
                "after".to_owned(),
                Intent::PutRegister(CanonicalJson::new(&json!(3))),
            )
            .await
            .is_err(),
        "a failed node took another write"
    );
    storage.shutdown().await;
    drop(storage);

    let storage = open(dir.path());
    let value = |key: &str| match storage.get(Kind::Register, key).unwrap() {
        Some(State::Register(r)) => r.value().map(|v| v.to_raw().get().to_owned()),
        _ => None,
    };
    assert_eq!(value("before").as_deref(), Some("1"));
    assert_eq!(value("lost"), None, "the failed write was made durable");
    assert_eq!(value("after"), None);
    storage.shutdown().await;
}
