//! Merkle anti-entropy with real processes: divergence the WAL path cannot repair is repaired.
//!
//! - (a) a node whose cursors are older than every peer's WAL (truncated past retention);
//! - (b) a node restored from an old copy of its data directory;
//! - (c) a key corrupted on one node (a valid state no op produced);
//! - (d) the bytes a round exchanges scale with the difference, not the data, and
//!   `meridian bench --anti-entropy` measures that between two running nodes.
//!
//! Every case ends with every node holding identical states: the same Merkle root (equal
//! roots mean equal canonical encodings of every state) and the same listings and values.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::{Client, Cluster, ClusterSpec, holdings, meridian_bin, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(60);

const SCHEDULED: &str = r"
[replication]
wal_retention_ops = 10
[anti_entropy]
enabled = true
interval_ms = 300
jitter_ms = 200
";

const MANUAL: &str = r"
[anti_entropy]
enabled = false
[debug]
allow_state_overwrite = true
";

async fn converge(cluster: &Cluster) -> Value {
    match cluster.wait_converged(CONVERGE, holdings).await {
        Ok(value) => value,
        Err(e) => panic!("did not converge: {e}\n{}", cluster.log_tails(30)),
    }
}

async fn sync(client: &Client, peer: &str) -> Value {
    // Rounds run on our outgoing connection: wait for it.
    wait_until(Duration::from_secs(20), "connected to the peer", || async {
        let info = client.cluster_info().await?;
        Ok(info["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["name"] == peer && p["connected"] == true)
        }))
    })
    .await
    .unwrap();
    let url = client
        .url(&["v1", "admin", "anti-entropy"])
        .map(|mut u| {
            u.set_query(Some(&format!("peer={peer}")));
            u
        })
        .unwrap();
    client
        .send(Method::POST, url, None)
        .await
        .unwrap()
        .ok("anti-entropy")
        .unwrap()["round"]
        .clone()
}

async fn total_repaired(cluster: &Cluster) -> u64 {
    let mut total = 0;
    for node in cluster.nodes().iter().filter(|n| n.is_running()) {
        let info = node.client().cluster_info().await.unwrap();
        total += info["anti_entropy"]["keys_repaired"].as_u64().unwrap_or(0);
    }
    total
}

async fn wal_ops(client: &Client) -> u64 {
    client.cluster_info().await.unwrap()["wal_ops"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_every_wal_catches_up_by_anti_entropy_then_by_the_wal() {
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).extra_config(SCHEDULED),
    )
    .await
    .unwrap();
    let clients = cluster.clients();
    clients[0].incr("before", 1).await.unwrap();
    converge(&cluster).await;

    cluster.node(2).stop().await.unwrap();
    for i in 0..60 {
        clients[0].incr(&format!("a{i}"), 1).await.unwrap();
        clients[1]
            .set_add(&format!("b{}", i % 7), &[json!(i)])
            .await
            .unwrap();
    }
    // Retention 10: both WALs drop what the stopped node never acknowledged.
    for client in &clients[..2] {
        wait_until(Duration::from_secs(20), "WAL truncated", || async {
            Ok(wal_ops(client).await <= 40)
        })
        .await
        .unwrap();
    }
    cluster.node(2).start().await.unwrap();
    let all = converge(&cluster).await;
    assert_eq!(all["counters"]["keys"].as_array().map(Vec::len), Some(61));
    // The truncated ops came as states...
    assert!(total_repaired(&cluster).await > 0);
    // ...and then the node fast-forwarded: its applied vector, which merges never move,
    // reaches the others', and no peer's WAL is reported truncated any more.
    let applied = |client: Client| async move {
        let info = client.cluster_info().await?;
        anyhow::Ok(info["applied"].clone())
    };
    let expected = applied(clients[0].clone()).await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the node's applied vector to catch up",
        || {
            let (client, expected) = (clients[2].clone(), expected.clone());
            async move { Ok(applied(client).await? == expected) }
        },
    )
    .await
    .unwrap();
    let info = clients[2].cluster_info().await.unwrap();
    for peer in info["peers"].as_array().unwrap() {
        assert!(peer["truncated"].is_null(), "{peer}");
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_an_old_copy_converges() {
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).extra_config(SCHEDULED),
    )
    .await
    .unwrap();
    let clients = cluster.clients();
    for i in 0..10 {
        clients[i % 3].incr("shared", 1).await.unwrap();
    }
    converge(&cluster).await;
    let node = cluster.node(2);
    node.stop().await.unwrap();
    let backup = cluster.dir().join("backup");
    copy_dir(node.data_dir(), &backup);
    node.start().await.unwrap();
    for i in 0..30 {
        clients[i % 3].incr("shared", 1).await.unwrap();
        clients[i % 3]
            .put_register(&format!("r{i}"), &json!(i))
            .await
            .unwrap();
    }
    converge(&cluster).await;
    node.stop().await.unwrap();
    std::fs::remove_dir_all(node.data_dir()).unwrap();
    copy_dir(&backup, node.data_dir());
    node.start().await.unwrap();
    for i in 0..5 {
        clients[0].incr("after", 1).await.unwrap();
        clients[0]
            .put_register(&format!("late{i}"), &json!(i))
            .await
            .unwrap();
    }
    let all = converge(&cluster).await;
    assert_eq!(all["counters"]["keys"], json!(["after", "shared"]), "{all}");
    assert_eq!(clients[2].counter("shared").await.unwrap(), 40);
    assert_eq!(clients[2].counter("after").await.unwrap(), 5);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_key_is_repaired_by_a_triggered_round() {
    let cluster = Cluster::start(ClusterSpec::new(&["us-east", "eu-west"]).extra_config(MANUAL))
        .await
        .unwrap();
    let clients = cluster.clients();
    clients[0].set_add("cart", &[json!("apple")]).await.unwrap();
    converge(&cluster).await;
    // An element no op added, on node 1 only.
    clients[1]
        .request(
            Method::POST,
            &["v1", "admin", "debug", "merge-unlogged", "sets", "cart"],
            Some(&json!({ "element": "ghost" })),
        )
        .await
        .unwrap()
        .ok("corrupt")
        .unwrap();
    let a = holdings(clients[0].clone()).await.unwrap();
    let b = holdings(clients[1].clone()).await.unwrap();
    assert_ne!(a["root"], b["root"]);
    let round = sync(&clients[0], cluster.node(1).name()).await;
    assert_eq!(round["keys_repaired_here"], 1, "{round}");
    assert_eq!(round["complete"], true);
    converge(&cluster).await;
    let mut elements = clients[0].set_elements("cart").await.unwrap();
    elements.sort_by_key(ToString::to_string);
    assert_eq!(elements, vec![json!("apple"), json!("ghost")]);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_traffic_scales_with_the_difference() {
    let cluster = Cluster::start(ClusterSpec::new(&["us-east", "eu-west"]).extra_config(MANUAL))
        .await
        .unwrap();
    let clients = cluster.clients();
    for i in 0..300 {
        clients[0]
            .put_register(
                &format!("k{i:03}"),
                &json!({ "payload": "x".repeat(200), "i": i }),
            )
            .await
            .unwrap();
    }
    converge(&cluster).await;
    let peer = cluster.node(1).name().to_owned();
    let idle = sync(&clients[0], &peer).await;
    let bytes =
        |r: &Value| r["bytes_sent"].as_u64().unwrap() + r["bytes_received"].as_u64().unwrap();
    assert_eq!(idle["keys_compared"], 0, "{idle}");
    // In sync: one exchange of the root's children.
    assert!(bytes(&idle) < 1_500, "{idle}");

    for key in ["k007", "k123"] {
        clients[1]
            .request(
                Method::POST,
                &["v1", "admin", "debug", "merge-unlogged", "sets", key],
                Some(&json!({ "element": key })),
            )
            .await
            .unwrap()
            .ok("corrupt")
            .unwrap();
    }
    let round = sync(&clients[0], &peer).await;
    assert_eq!(round["keys_fetched"], 2, "{round}");
    assert_eq!(round["keys_repaired_here"], 2, "{round}");
    // Two differing keys: a path of 4 tree levels per key, two buckets, two states; the
    // 300 registers (≈ 70 KB of state) are never sent.
    assert!(bytes(&round) < 12_000, "{round}");
    converge(&cluster).await;
    let after = sync(&clients[0], &peer).await;
    assert_eq!(after["keys_compared"], 0, "{after}");
    cluster.shutdown().await.unwrap();
}

/// `meridian bench --anti-entropy` between the cluster's first two nodes.
async fn bench_anti_entropy(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    let urls = format!("{},{}", cluster.node(0).url(), cluster.node(1).url());
    tokio::process::Command::new(meridian_bin().unwrap())
        .args(["bench", "--anti-entropy", "--url", &urls])
        .args(args)
        .args(cluster.node(0).credentials().cli_args())
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_anti_entropy_measures_a_round_for_each_difference() {
    let cluster = Cluster::start(ClusterSpec::new(&["us-east", "eu-west"]).extra_config(MANUAL))
        .await
        .unwrap();
    let output = bench_anti_entropy(
        &cluster,
        &[
            "--keys",
            "300",
            "--value-size",
            "200",
            "--differ",
            "1,40",
            "--json",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["peer"], cluster.node(1).name(), "{report}");
    assert_eq!(report["tree_keys"], 300 + 1 + 40, "{report}");
    let rows = report["measurements"].as_array().unwrap();
    let differing: Vec<&Value> = rows.iter().map(|r| &r["differing_keys"]).collect();
    assert_eq!(differing, [0, 1, 40], "{report}");

    // Identical replicas: the roots agree and nothing else is exchanged.
    let idle = &rows[0]["round"];
    assert_eq!(idle["buckets_differing"], 0, "{report}");
    assert_eq!(idle["keys_compared"], 0, "{report}");
    assert!(rows[0]["bytes_per_differing_key"].is_null(), "{report}");
    // One key, made on the first node: pushed, not fetched.
    let one = &rows[1]["round"];
    assert_eq!(one["keys_repaired_there"], 1, "{report}");
    assert_eq!(one["keys_repaired_here"], 0, "{report}");
    // Forty, twenty on each node, each repaired on the other; the 300 registers of 200 bytes
    // (≈ 80 KB) are never sent.
    let forty = &rows[2]["round"];
    assert_eq!(forty["keys_repaired_here"], 20, "{report}");
    assert_eq!(forty["keys_repaired_there"], 20, "{report}");
    assert_eq!(forty["complete"], true, "{report}");
    let bytes = |row: &Value| row["bytes"].as_u64().unwrap();
    assert!(bytes(&rows[0]) < bytes(&rows[1]), "{report}");
    assert!(bytes(&rows[1]) < bytes(&rows[2]), "{report}");
    assert!(bytes(&rows[2]) < 40_000, "{report}");

    // What it reported happened: both nodes hold the same 41 sets.
    let clients = cluster.clients();
    let a = holdings(clients[0].clone()).await.unwrap();
    let b = holdings(clients[1].clone()).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a["sets"]["keys"].as_array().unwrap().len(), 41, "{a}");
    cluster.shutdown().await.unwrap();
}

/// Without the debug route the bench cannot make differences, and says what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_anti_entropy_names_the_settings_it_needs() {
    let cluster = Cluster::start(ClusterSpec::new(&["us-east", "eu-west"]))
        .await
        .unwrap();
    let output = bench_anti_entropy(&cluster, &["--keys", "1", "--differ", "2"]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("allow_state_overwrite = true")
            && stderr.contains("[anti_entropy] enabled = false"),
        "{stderr}"
    );
    // It stopped at the first unlogged write: the replicas still agree.
    let clients = cluster.clients();
    let a = holdings(clients[0].clone()).await.unwrap();
    let b = holdings(clients[1].clone()).await.unwrap();
    assert_eq!(a["root"], b["root"]);
    cluster.shutdown().await.unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
