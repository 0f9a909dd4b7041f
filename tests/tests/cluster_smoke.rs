//! The first real multi-node test: a 3-region cluster behind fault relays converges
//! on a counter written at one node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::{Cluster, ClusterSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn cluster_smoke() {
    let cluster =
        Cluster::start(ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).relays(true))
            .await
            .unwrap();
    assert_eq!(cluster.len(), 3);

    cluster.node(0).client().incr("smoke", 5).await.unwrap();
    cluster.node(2).client().incr("smoke", -2).await.unwrap();

    let value = cluster
        .wait_converged(Duration::from_secs(20), |client| async move {
            client.counter("smoke").await
        })
        .await
        .unwrap();
    assert_eq!(value, 3);
    assert!(
        cluster.relay_stats().forwarded > 0,
        "peer traffic went through the relays"
    );

    cluster.shutdown().await.unwrap();
}
