//! Session guarantees and quorum reads across regions, with 50 ms of delay on every peer link.
//!
//! - Read-your-writes: 1 000 iterations of "write at one region, at once read with the session
//!   token at another": the write is visible, or the answer is a clear 503
//!   `session-not-caught-up` (counted); never a stale value.
//! - Monotonic reads: a client hopping between regions with its token never sees a counter go
//!   down or a set lose an element, while writers keep changing both everywhere.
//! - A GLOBAL_QUORUM read right after a GLOBAL_QUORUM write made in another region sees it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meridian_tests::{ApiResponse, Cluster, ClusterSpec, Fault, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const DELAY: Duration = Duration::from_millis(50);

async fn delayed_cluster() -> Cluster {
    let cluster =
        Cluster::start(ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).relays(true))
            .await
            .unwrap();
    cluster.set_all_links(&Fault::delayed(DELAY)).unwrap();
    for client in cluster.clients() {
        wait_until(Duration::from_secs(20), "every peer reachable", || async {
            let info = client.cluster_info().await?;
            Ok(info["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["reachable"] == true)))
        })
        .await
        .unwrap();
    }
    cluster
}

/// Whether a non-2xx answer is the one clear refusal a session read may give.
fn is_session_refusal(response: &ApiResponse) -> bool {
    response.status == StatusCode::SERVICE_UNAVAILABLE
        && response.body["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("session-not-caught-up"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_across_regions_under_delay() {
    const WORKERS: u64 = 25;
    const ITERATIONS: u64 = 40; // 25 × 40 = 1 000
    let cluster = delayed_cluster().await;
    let urls: Vec<String> = cluster
        .nodes()
        .iter()
        .map(meridian_tests::Node::url)
        .collect();
    let seen = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let urls = urls.clone();
        let (seen, refused) = (seen.clone(), refused.clone());
        let base = cluster.node(0).client();
        workers.spawn(async move {
            let session = base.with_session();
            let key = format!("ryw-{worker}");
            for i in 1..=ITERATIONS {
                let writer = ((worker + i) % 3) as usize;
                let reader = (writer + 1 + (i % 2) as usize) % 3;
                let at_writer = session.for_node(&urls[writer]).unwrap();
                let response = at_writer
                    .request(Method::PUT, &["v1", "registers", &key], Some(&json!(i)))
                    .await
                    .unwrap();
                if is_session_refusal(&response) {
                    // The writer had not caught up with this session's earlier writes: a
                    // clear refusal, nothing written. Write again at the same node later.
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
                let at_reader = session.for_node(&urls[reader]).unwrap();
                let response = at_reader
                    .request(Method::GET, &["v1", "registers", &key], None)
                    .await
                    .unwrap();
                if is_session_refusal(&response) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                assert_eq!(
                    response.status,
                    StatusCode::OK,
                    "worker {worker} iteration {i}: read at node {reader} after writing at \
                     node {writer}: {:?}",
                    response.body
                );
                assert_eq!(
                    response.body["value"],
                    json!(i),
                    "worker {worker} iteration {i}: stale read at node {reader} after writing \
                     at node {writer}"
                );
                seen.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.unwrap();
    }
    let (seen, refused) = (
        seen.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    println!("read-your-writes: {seen} writes read back, {refused} clear refusals");
    assert_eq!(seen + refused, WORKERS * ITERATIONS);
    assert!(seen > 0, "no iteration read its write back");
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monotonic_reads_while_hopping_between_regions() {
    let cluster = delayed_cluster().await;
    let clients = cluster.clients();
    let stop = Arc::new(AtomicBool::new(false));
    // Writers: every node keeps incrementing the counter and adding new elements.
    let mut writers = tokio::task::JoinSet::new();
    for (n, client) in clients.iter().cloned().enumerate() {
        let stop = stop.clone();
        writers.spawn(async move {
            let mut i = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                client.incr("mono", 1).await.unwrap();
                client
                    .set_add("mono-set", &[json!(format!("n{n}-{i}"))])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    let urls: Vec<String> = cluster
        .nodes()
        .iter()
        .map(meridian_tests::Node::url)
        .collect();
    let session = cluster.node(0).client().with_session();
    let mut last_counter = 0_i64;
    let mut last_set: BTreeSet<String> = BTreeSet::new();
    let (mut reads, mut refusals) = (0, 0);
    for hop in 0..150_usize {
        let at = session.for_node(&urls[hop % 3]).unwrap();
        let (counter, set) = if hop % 2 == 0 {
            (
                at.request(Method::GET, &["v1", "counters", "mono"], None)
                    .await
                    .unwrap(),
                None,
            )
        } else {
            (
                at.request(Method::GET, &["v1", "counters", "mono"], None)
                    .await
                    .unwrap(),
                Some(
                    at.request(Method::GET, &["v1", "sets", "mono-set"], None)
                        .await
                        .unwrap(),
                ),
            )
        };
        for response in std::iter::once(&counter).chain(set.as_ref()) {
            if is_session_refusal(response) {
                refusals += 1;
                continue;
            }
            assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
            reads += 1;
            if let Some(value) = response.body["value"].as_i64() {
                assert!(
                    value >= last_counter,
                    "hop {hop} at node {}: counter went from {last_counter} down to {value}",
                    hop % 3
                );
                last_counter = value;
            }
            if let Some(elements) = response.body["elements"].as_array() {
                let now: BTreeSet<String> = elements
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect();
                let lost: Vec<_> = last_set.difference(&now).collect();
                assert!(
                    lost.is_empty(),
                    "hop {hop} at node {}: the set lost {lost:?}",
                    hop % 3
                );
                last_set = now;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(result) = writers.join_next().await {
        result.unwrap();
    }
    println!(
        "monotonic reads: {reads} reads, {refusals} clear refusals, counter reached \
         {last_counter}, set {} elements",
        last_set.len()
    );
    assert!(reads > 0);
    assert!(last_counter > 0, "the reader saw the writers' progress");
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_quorum_read_sees_a_global_quorum_write_from_another_region() {
    let cluster = delayed_cluster().await;
    let clients = cluster.clients();
    for i in 1..=12_u64 {
        let writer = (i % 3) as usize;
        let reader = ((i + 1) % 3) as usize;
        clients[writer]
            .with_consistency("GLOBAL_QUORUM")
            .put_register("gq-register", &json!(i))
            .await
            .unwrap();
        clients[writer]
            .with_consistency("GLOBAL_QUORUM")
            .set_add("gq-set", &[json!(i)])
            .await
            .unwrap();
        // No session: only the quorum intersection makes the write visible.
        let quorum = clients[reader].with_consistency("GLOBAL_QUORUM");
        let value = quorum.register_value("gq-register").await.unwrap();
        assert_eq!(
            value,
            Some(json!(i)),
            "GLOBAL_QUORUM read at node {reader} after a GLOBAL_QUORUM write at node {writer}"
        );
        let elements = quorum.set_elements("gq-set").await.unwrap();
        assert!(
            elements.contains(&json!(i)),
            "set read at node {reader} lacks {i}: {elements:?}"
        );
        let lag = quorum
            .request(Method::GET, &["v1", "registers", "gq-register"], None)
            .await
            .unwrap();
        let header = lag.header("replication-lag").unwrap_or_default().to_owned();
        for region in ["us-east", "eu-west", "ap-south"] {
            if region != cluster.node(reader).region() {
                assert!(
                    header.contains(&format!("{region}=")),
                    "Replication-Lag {header:?} lacks {region}"
                );
            }
        }
    }
    // The per-level histograms saw these requests.
    let metrics = clients[0].metrics().await.unwrap();
    assert!(
        metrics.contains("meridian_consistency_request_duration_seconds")
            && metrics.contains("GLOBAL_QUORUM"),
        "per-level latency histograms are exported"
    );
    cluster.shutdown().await.unwrap();
}
