//! Garbage collection at causal stability, with real processes.
//!
//! - Register tombstones go once every node has applied them, on every node, and the keys stay
//!   deleted (and can be written again).
//! - By default a partitioned region holds collection back, so its writes that are older than
//!   a delete made elsewhere meanwhile still lose to the delete when the partition heals.
//! - With a GC horizon configured, a node silent for longer no longer holds collection back; it
//!   is listed as excluded, and when it returns it is flagged until an anti-entropy round with
//!   it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::{Client, Cluster, ClusterSpec, wait_until};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn gc_info(client: &Client) -> Value {
    client.cluster_info().await.unwrap()["gc"].clone()
}

async fn registers(client: Client) -> anyhow::Result<Value> {
    let page = client
        .request(reqwest::Method::GET, &["v1", "registers"], None)
        .await?
        .ok("registers")?;
    Ok(page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_tombstones_are_collected_on_every_node_and_keys_stay_deleted() {
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"])
            .extra_config("[gc]\ninterval_ms = 200\n"),
    )
    .await
    .unwrap();
    let clients = cluster.clients();
    for i in 0..20 {
        let client = &clients[i % 3];
        client
            .put_register(&format!("k{i}"), &json!({ "v": i }))
            .await
            .unwrap();
    }
    for i in 0..20 {
        clients[(i + 1) % 3]
            .delete_register(&format!("k{i}"))
            .await
            .unwrap();
    }
    clients[0].put_register("live", &json!(1)).await.unwrap();
    for client in &clients {
        wait_until(WAIT, "every tombstone collected", || async {
            let gc = gc_info(client).await;
            Ok(gc["keys_removed"].as_u64().unwrap_or(0) >= 20)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tails(30)));
        let gc = gc_info(client).await;
        assert!(gc["frontier"].is_object(), "{gc}");
        assert_eq!(gc["excluded"], json!([]));
    }
    let listing = cluster.wait_converged(WAIT, registers).await.unwrap();
    assert_eq!(listing["keys"], json!(["live"]), "{listing}");
    for client in &clients {
        assert_eq!(client.register_value("k3").await.unwrap(), None);
        assert_eq!(client.register_value("live").await.unwrap(), Some(json!(1)));
    }
    // A collected key is an ordinary absent key: writing it again works everywhere.
    clients[2]
        .put_register("k3", &json!("again"))
        .await
        .unwrap();
    for client in &clients {
        wait_until(WAIT, "the rewrite replicated", || async {
            Ok(client.register_value("k3").await? == Some(json!("again")))
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_silent_beyond_the_horizon_is_excluded_then_flagged_until_resynced() {
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).extra_config(
            "[gc]\ninterval_ms = 200\nhorizon_secs = 2\n\
             [anti_entropy]\nenabled = true\ninterval_ms = 300\njitter_ms = 100\n",
        ),
    )
    .await
    .unwrap();
    let clients = cluster.clients();
    let down = cluster.node(2).name().to_owned();
    cluster.node(2).stop().await.unwrap();
    clients[0].put_register("gone", &json!(1)).await.unwrap();
    clients[0].delete_register("gone").await.unwrap();
    // The tombstone goes although node 2 never saw it: it is beyond the horizon.
    wait_until(
        WAIT,
        "the down node excluded and the tombstone collected",
        || async {
            let gc = gc_info(&clients[0]).await;
            Ok(gc["excluded"] == json!([down.clone()])
                && gc["needs_resync"] == json!([down.clone()])
                && gc["keys_removed"].as_u64().unwrap_or(0) >= 1)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tails(30)));
    let metrics = clients[0].metrics().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meridian_gc_peer_excluded{")
                && l.contains(&down)
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // It comes back: counted again, and flagged until an anti-entropy round with it completes.
    cluster.node(2).start().await.unwrap();
    wait_until(WAIT, "the returning node resynced", || async {
        let gc = gc_info(&clients[0]).await;
        Ok(gc["excluded"] == json!([]) && gc["needs_resync"] == json!([]))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tails(30)));
    let listing = cluster.wait_converged(WAIT, registers).await.unwrap();
    assert_eq!(listing["keys"], json!([]), "{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_holds_collection_back_so_its_older_writes_never_undo_a_delete() {
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"])
            .relays(true)
            .extra_config("[gc]\ninterval_ms = 200\n"),
    )
    .await
    .unwrap();
    let clients = cluster.clients();
    // Collection is running everywhere, each node with a report from every other (reports
    // ride on the acks of replicated writes)...
    for (i, client) in clients.iter().enumerate() {
        client
            .put_register(&format!("warm-{i}"), &json!(i))
            .await
            .unwrap();
    }
    for client in &clients {
        wait_until(WAIT, "a stable frontier", || async {
            Ok(gc_info(client).await["frontier"].is_object())
        })
        .await
        .unwrap();
    }
    // ...when ap-south is cut off.
    cluster.isolate(2).unwrap();
    // The cut-off region writes the key; a region of the majority deletes it afterwards, so
    // the delete is stamped later and must win wherever both meet.
    clients[2]
        .put_register("k", &json!("written in the cut-off region"))
        .await
        .unwrap();
    assert_eq!(clients[0].register_value("k").await.unwrap(), None);
    clients[0].delete_register("k").await.unwrap();
    // Passes keep running in the majority on ap-south's last report, and the tombstone stays:
    // ap-south has not applied it, and nothing lets the frontier pass a member that is only
    // silent.
    let passes_before = gc_info(&clients[0]).await["passes"].as_u64().unwrap();
    wait_until(
        WAIT,
        "ten more collection passes in the majority",
        || async {
            Ok(gc_info(&clients[0]).await["passes"].as_u64().unwrap_or(0) >= passes_before + 10)
        },
    )
    .await
    .unwrap();
    for client in &clients[..2] {
        let gc = gc_info(client).await;
        assert_eq!(
            gc["keys_removed"], 0,
            "a tombstone went while a member was cut off: {gc}"
        );
        assert_eq!(gc["excluded"], json!([]), "{gc}");
    }
    // The heal brings the cut-off region's write to the majority and the delete to it: the
    // delete wins everywhere, and only then does the tombstone go.
    cluster.heal().unwrap();
    for client in &clients {
        wait_until(WAIT, "the tombstone collected after the heal", || async {
            Ok(gc_info(client).await["keys_removed"].as_u64().unwrap_or(0) >= 1)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tails(30)));
    }
    let listing = cluster.wait_converged(WAIT, registers).await.unwrap();
    assert_eq!(
        listing["keys"],
        json!(["warm-0", "warm-1", "warm-2"]),
        "{listing}"
    );
    for client in &clients {
        assert_eq!(client.register_value("k").await.unwrap(), None);
    }
}
