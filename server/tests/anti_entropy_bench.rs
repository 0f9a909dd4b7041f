//! Anti-entropy benchmark (ignored; run with
//! `cargo test --release -p meridian-server --test anti_entropy_bench -- --ignored --nocapture`):
//! two real storages with 1 000 000 keys of which 1 000 differ; one push-pull round through
//! the real sync dialogue (frames encoded as on the wire). Prints the time to converge, the
//! bytes exchanged against the full state's size, and the start-up tree rebuild time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_crdt::{CanonicalJson, Kind, LwwRegister, NodeId, Stamp, State, codec};
use meridian_replication::ae::{AeLimits, Direct, WalGaps, run_round};
use meridian_replication::merkle;
use meridian_server::metrics::Metrics;
use meridian_server::storage::{Storage, StorageOptions};

const KEYS: usize = 1_000_000;
const DIFFER: usize = 1_000;

fn open(dir: &std::path::Path, node: u64) -> Storage {
    Storage::open(
        dir,
        StorageOptions {
            node: NodeId::new(node).unwrap(),
            journal_dir: None,
            max_batch: 4096,
            cache_bytes: 256 << 20,
            max_clock_skew: Duration::from_secs(10),
            max_set_elements: 100_000,
        },
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

fn register(i: usize, version: u64) -> State {
    let origin = NodeId::new(7).unwrap();
    let value = CanonicalJson::parse(&format!("{{\"user\":{i},\"v\":{version}}}")).unwrap();
    let dot = meridian_crdt::Dot::new(origin, version);
    State::Register(LwwRegister::default().write(Stamp::new(version, origin), dot, Some(value)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: 1 M keys, run in release"]
async fn one_round_repairs_1000_of_1m_keys() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = (open(dirs[0].path(), 1), open(dirs[1].path(), 2));
    let started = Instant::now();
    let mut full_bytes = 0usize;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(4096) {
        let states: Vec<(Vec<u8>, State)> = chunk
            .iter()
            .map(|&i| {
                (
                    merkle::storage_key(Kind::Register, &format!("user:{i:07}")),
                    register(i, 1),
                )
            })
            .collect();
        full_bytes += states
            .iter()
            .map(|(k, s)| k.len() + codec::encode_state(s).len())
            .sum::<usize>();
        let (x, y) = tokio::join!(
            a.merge_full_states(states.clone()),
            b.merge_full_states(states)
        );
        x.unwrap();
        y.unwrap();
    }
    // 1 000 keys differ: half newer on a, half newer on b.
    let newer: Vec<(Vec<u8>, State)> = (0..DIFFER)
        .map(|j| {
            let i = j * (KEYS / DIFFER);
            (
                merkle::storage_key(Kind::Register, &format!("user:{i:07}")),
                register(i, 2),
            )
        })
        .collect();
    a.merge_full_states(newer[..DIFFER / 2].to_vec())
        .await
        .unwrap();
    b.merge_full_states(newer[DIFFER / 2..].to_vec())
        .await
        .unwrap();
    println!("loaded 2 x {KEYS} keys in {:?}", started.elapsed());
    // The tree follows the folds; fold what is still in the memtables.
    a.fold_now().await.unwrap();
    b.fold_now().await.unwrap();
    assert_ne!(
        a.with_tree(merkle::MerkleTree::root),
        b.with_tree(merkle::MerkleTree::root)
    );

    // Start-up rebuild of the tree from the states table.
    a.shutdown().await;
    drop(a);
    let reopened = Instant::now();
    let a = open(dirs[0].path(), 1);
    let rebuild = reopened.elapsed();
    assert_eq!(a.with_tree(merkle::MerkleTree::len), KEYS);

    let limits = AeLimits {
        max_keys_per_round: 1_000_000,
        batch_keys: 1024,
        keys_per_sec: 0,
        bytes_per_sec: 0,
        ..AeLimits::default()
    };
    let round_started = Instant::now();
    let report = run_round(&a, &Direct(&b), &limits, WalGaps::All)
        .await
        .unwrap();
    let converge = round_started.elapsed();
    assert!(report.complete);
    a.fold_now().await.unwrap();
    b.fold_now().await.unwrap();
    assert_eq!(
        a.with_tree(merkle::MerkleTree::root),
        b.with_tree(merkle::MerkleTree::root)
    );
    let bytes = report.bytes_sent + report.bytes_received;
    println!(
        "start-up tree rebuild of {KEYS} keys: {rebuild:?} (open included)\n\
         round: {converge:?}, {report:?}\n\
         bytes exchanged {bytes} = {:.3}% of the full state ({full_bytes} bytes)",
        bytes as f64 * 100.0 / full_bytes as f64
    );
    assert!(
        bytes * 100 < full_bytes as u64,
        "traffic must stay under 1% of the data"
    );
    a.shutdown().await;
    b.shutdown().await;
}
