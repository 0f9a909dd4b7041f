//! Replication under network faults injected by the UDP relays between REAL `meridian`
//! processes: a region partitioned away under load, then healed; and every link lossy,
//! delayed, jittered and duplicating under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Load, converge_and_check, metric, peer_view, wait_no_lag};
use meridian_tests::{Client, Cluster, ClusterSpec, Fault, wait_until};
use serde_json::Value;

const REGIONS: &[&str] = &["us-east", "eu-west", "ap-south"];
/// Generous: convergence is asserted, never its speed.
const CONVERGE: Duration = Duration::from_secs(60);
/// How long the region stays cut off.
const PARTITION: Duration = Duration::from_secs(30);

/// `(lag_ops, lag_ms)` that `client`'s node reports for peer `peer_id`.
async fn lag(client: &Client, peer_id: u64) -> (u64, u64) {
    let view: Value = peer_view(client, peer_id).await.unwrap();
    (
        view["lag_ops"].as_u64().unwrap(),
        view["lag_ms"].as_u64().unwrap(),
    )
}

/// Issue item 2: one region partitioned away for 30 s under load, then healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_partitioned_away_under_load_converges_after_heal() {
    let cluster = Cluster::start(ClusterSpec::new(REGIONS).relays(true))
        .await
        .unwrap();
    let (majority, isolated) = (cluster.node(0), cluster.node(2));
    let observer = majority.client();
    let labels = [("peer", isolated.name()), ("region", isolated.region())];

    // Modest load on every node, the isolated one included (it keeps taking writes).
    let load = Load::on_all_nodes(&cluster, 1, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.isolate(isolated.index()).unwrap();
    let cut_at = tokio::time::Instant::now();

    // The majority notices, and its lag towards the isolated peer builds up.
    wait_until(CONVERGE, "the majority to see the peer unreachable", || {
        let observer = observer.clone();
        let id = isolated.id();
        async move { Ok(peer_view(&observer, id).await?["reachable"] == false) }
    })
    .await
    .unwrap();
    wait_until(CONVERGE, "lag towards the isolated peer", || {
        let observer = observer.clone();
        let id = isolated.id();
        async move {
            let view = peer_view(&observer, id).await?;
            Ok(view["lag_ops"].as_u64() > Some(0) && view["lag_ms"].as_u64() > Some(0))
        }
    })
    .await
    .unwrap();
    let early = lag(&observer, isolated.id()).await;

    tokio::time::sleep(PARTITION.saturating_sub(cut_at.elapsed())).await;
    let late = lag(&observer, isolated.id()).await;
    assert!(
        late.0 > early.0 && late.1 > early.1,
        "lag (ops, ms) rises during the partition: {early:?} → {late:?}"
    );
    let text = observer.metrics().await.unwrap();
    let metric_ops = metric(&text, "meridian_replication_lag_ops", &labels).unwrap();
    let metric_ms = metric(&text, "meridian_replication_lag_milliseconds", &labels).unwrap();
    assert!(
        metric_ops >= late.0 as f64 && metric_ms >= late.1 as f64,
        "/metrics shows the lag too: ops {metric_ops}, ms {metric_ms}, /v1/cluster {late:?}"
    );
    // The isolated node sees the mirror image: the majority has not acked its ops.
    let (isolated_lag_ops, _) = lag(&isolated.client(), majority.id()).await;
    assert!(
        isolated_lag_ops > 0,
        "the isolated node's own ops are unacked"
    );
    // No traffic crossed the partition... (datagrams were dropped at the relays).
    assert!(cluster.link(isolated.index(), 0).unwrap().stats().dropped > 0);

    cluster.heal().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = load.stop().await;
    assert_eq!(ledger.ambiguous + ledger.refused, 0, "{}", ledger.summary());

    converge_and_check(&cluster, CONVERGE, &ledger)
        .await
        .unwrap();
    wait_no_lag(&cluster, CONVERGE).await.unwrap();
    let text = observer.metrics().await.unwrap();
    assert_eq!(
        metric(&text, "meridian_replication_lag_ops", &labels),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "meridian_replication_lag_milliseconds", &labels),
        Some(0.0)
    );
    assert_eq!(
        peer_view(&observer, isolated.id()).await.unwrap()["reachable"],
        true
    );
    eprintln!(
        "partition: lag {early:?} → {late:?} (ops, ms) during the cut; {}",
        ledger.summary()
    );
    cluster.shutdown().await.unwrap();
}

/// Issue item 6: 5 % loss and 40 ms ± 10 ms delay (plus 2 % duplicated datagrams) on
/// every link, writers on every node: still converges, with no duplicate effects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_delayed_links_converge_without_duplicate_effects() {
    let cluster = Cluster::start(ClusterSpec::new(REGIONS).relays(true))
        .await
        .unwrap();
    cluster
        .set_all_links(
            &Fault::delayed(Duration::from_millis(40))
                .with_jitter(Duration::from_millis(10))
                .with_loss(0.05)
                .with_duplicate(0.02),
        )
        .unwrap();

    let load = Load::on_all_nodes(&cluster, 1, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ledger = load.stop().await;
    assert_eq!(ledger.ambiguous + ledger.refused, 0, "{}", ledger.summary());

    // Exact sums and exact sets: a lost or replayed batch would show.
    converge_and_check(&cluster, CONVERGE, &ledger)
        .await
        .unwrap();
    wait_no_lag(&cluster, CONVERGE).await.unwrap();
    let stats = cluster.relay_stats();
    assert!(
        stats.dropped > 0 && stats.duplicated > 0,
        "the faults were applied: {stats:?}"
    );
    eprintln!("lossy links: {}; relays {stats:?}", ledger.summary());
    cluster.shutdown().await.unwrap();
}
