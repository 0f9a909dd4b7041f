//! Quorum reads write the merged state back to the replicas that answered with less.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::{Cluster, ClusterSpec, wait_until};
use reqwest::Method;
use serde_json::json;

/// No scheduled anti-entropy, so only read repair can move the planted element; the debug
/// endpoint plants a set element on one node without logging an op, so replication can't.
const CONFIG: &str = r"
[anti_entropy]
enabled = false
[debug]
allow_state_overwrite = true
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_read_repairs_every_replica_that_was_behind() {
    let cluster =
        Cluster::start(ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).extra_config(CONFIG))
            .await
            .unwrap();
    let clients = cluster.clients();
    clients[0].set_add("cart", &[json!("apple")]).await.unwrap();
    for client in &clients {
        let client = client.clone();
        wait_until(Duration::from_secs(20), "apple everywhere", move || {
            let client = client.clone();
            async move { Ok(client.set_elements("cart").await? == vec![json!("apple")]) }
        })
        .await
        .unwrap();
    }
    clients[1]
        .request(
            Method::POST,
            &["v1", "admin", "debug", "merge-unlogged", "sets", "cart"],
            Some(&json!({ "element": "ghost" })),
        )
        .await
        .unwrap()
        .ok("plant")
        .unwrap();
    assert_eq!(
        clients[0].set_elements("cart").await.unwrap(),
        vec![json!("apple")],
        "not replicated by itself"
    );

    let reader = clients[0].clone();
    wait_until(
        Duration::from_secs(20),
        "every peer reachable from node 0",
        move || {
            let reader = reader.clone();
            async move {
                let info = reader.cluster_info().await?;
                let peers = info["peers"].as_array().cloned().unwrap_or_default();
                Ok(peers.len() == 2 && peers.iter().all(|p| p["reachable"] == true))
            }
        },
    )
    .await
    .unwrap();
    // An ALL read at node 0 merges all three replicas, so it must see the planted element...
    let all = clients[0]
        .with_consistency("ALL")
        .set_elements("cart")
        .await
        .unwrap();
    assert_eq!(all, vec![json!("apple"), json!("ghost")]);
    // ...and write it back to node 0 and node 2, which answered without it.
    for i in [0, 2] {
        let client = clients[i].clone();
        wait_until(Duration::from_secs(20), "read repair", move || {
            let client = client.clone();
            async move { Ok(client.set_elements("cart").await? == vec![json!("apple"), json!("ghost")]) }
        })
        .await
        .unwrap_or_else(|e| panic!("node {i} was not repaired: {e:#}"));
    }
    let metrics = clients[0].metrics().await.unwrap();
    assert!(
        metrics.contains("meridian_read_repairs_total{"),
        "{metrics}"
    );
    cluster.shutdown().await.unwrap();
}
