//! The memtable layered over redb: reads, listings and WAL reads see one consistent picture
//! whichever layer (active, frozen, redb) holds each key or op.

use std::sync::Arc;
use std::time::Duration;

use meridian_crdt::{CanonicalJson, Kind, NodeId, State};
use meridian_replication::store::StoreError;
use serde_json::json;

use super::{Intent, Storage, StorageOptions};
use crate::metrics::Metrics;

fn open(dir: &std::path::Path) -> Storage {
    Storage::open(
        dir,
        StorageOptions {
            node: NodeId::new(1).unwrap(),
            max_batch: 256,
            cache_bytes: 16 << 20,
            max_clock_skew: Duration::from_secs(1),
            max_set_elements: 1000,
        },
        Arc::new(Metrics::new()),
    )
    .unwrap()
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
    storage
        .write(Kind::Register, "b".to_owned(), Intent::DeleteRegister)
        .await
        .unwrap();

    let (page, next) = storage.list(Kind::Register, "", None, 100).unwrap();
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
            .unwrap();
        keys.extend(page.into_iter().map(|(k, _)| k));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(keys, ["a", "c", "d", "e", "f"]);
    // Other kinds and prefixes stay out.
    assert!(storage.list(Kind::Set, "", None, 10).unwrap().0.is_empty());
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

    let mut below = meridian_crdt::VersionVector::new();
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
