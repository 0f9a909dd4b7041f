//! Operating a running cluster with real processes:
//!
//! - a fourth region is added with `meridian cluster add-node`, the members learn it by a
//!   rolling restart, and the empty new node converges (WAL for new ops, anti-entropy for the
//!   ops the WALs already dropped); then a node is removed and the rest keep working;
//! - a backup of a live node taken while writes continue, restored into a new node (and
//!   refused for the node it came from), converges to exactly the cluster's state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meridian_tests::{Cluster, ClusterSpec, holdings, wait_until};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(60);

/// Anti-entropy often, so keys whose ops left every WAL converge quickly.
const SETTINGS: &str = r"
[anti_entropy]
enabled = true
interval_ms = 300
jitter_ms = 200
";

/// What every node must end up holding: the CRDT semantics of every acknowledged write.
#[derive(Debug, Default)]
struct Model {
    registers: BTreeMap<String, Option<Value>>,
    counter: i64,
    gcounter: u64,
    set: Vec<Value>,
}

/// On each of `nodes`: a register write, a written-then-deleted register, PN-counter
/// increments both ways, a G-counter increment, and a set add and remove.
async fn write_round(cluster: &Cluster, nodes: &[usize], tag: &str, model: &mut Model) {
    for &i in nodes {
        let client = cluster.node(i).client();
        let key = format!("{tag}-reg-{i}");
        let value = json!({ "tag": tag, "node": i });
        client.put_register(&key, &value).await.unwrap();
        model.registers.insert(key, Some(value));
        let gone = format!("{tag}-gone-{i}");
        client
            .put_register(&gone, &json!("soon gone"))
            .await
            .unwrap();
        client.delete_register(&gone).await.unwrap();
        model.registers.insert(gone, None);
        let up = 3 * (i as i64 + 1);
        client.incr("ctr", up).await.unwrap();
        client.incr("ctr", -1).await.unwrap();
        model.counter += up - 1;
        client.gincr("gctr", i as u64 + 1).await.unwrap();
        model.gcounter += i as u64 + 1;
        let keep = json!(format!("{tag}-{i}-keep"));
        let drop = json!(format!("{tag}-{i}-drop"));
        client
            .set_add("set", &[keep.clone(), drop.clone()])
            .await
            .unwrap();
        client.set_remove("set", &[drop]).await.unwrap();
        model.set.push(keep);
    }
}

/// Waits until every running node holds the same states, then checks them against the model
/// on every running node: every key, exact counter sums.
async fn converge_to(cluster: &Cluster, model: &Model) {
    if let Err(e) = cluster.wait_converged(CONVERGE, holdings).await {
        panic!("did not converge: {e:#}");
    }
    let mut expected_set = model.set.clone();
    expected_set.sort_by_key(Value::to_string);
    for node in cluster.nodes().iter().filter(|n| n.is_running()) {
        let client = node.client();
        for (key, value) in &model.registers {
            assert_eq!(
                &client.register_value(key).await.unwrap(),
                value,
                "{} register {key}",
                node.name()
            );
        }
        assert_eq!(
            client.counter("ctr").await.unwrap(),
            model.counter,
            "{}",
            node.name()
        );
        assert_eq!(
            client.gcounter("gctr").await.unwrap(),
            model.gcounter,
            "{}",
            node.name()
        );
        let mut set = client.set_elements("set").await.unwrap();
        set.sort_by_key(Value::to_string);
        assert_eq!(set, expected_set, "{}", node.name());
    }
}

/// Restarts each of `nodes` in turn, each ready before the next stops: a rolling restart.
async fn rolling_restart(cluster: &Cluster, nodes: &[usize]) {
    for &i in nodes {
        cluster.node(i).restart().await.unwrap();
    }
}

/// Waits until every running node's `/v1/cluster` names exactly `names` (itself and its
/// peers) with every peer connected both ways.
async fn wait_membership(cluster: &Cluster, names: &[&str]) {
    let mut want: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    want.sort();
    for node in cluster.nodes().iter().filter(|n| n.is_running()) {
        let client = node.client();
        let want = want.clone();
        let what = format!("{} to list {want:?}, all connected", node.name());
        wait_until(CONVERGE, &what, || {
            let client = client.clone();
            let want = want.clone();
            async move {
                let info = client.cluster_info().await?;
                let peers = info["peers"].as_array().cloned().unwrap_or_default();
                let mut listed: Vec<String> = peers
                    .iter()
                    .map(|p| p["name"].as_str().unwrap_or("?").to_owned())
                    .chain(info["node"]["name"].as_str().map(str::to_owned))
                    .collect();
                listed.sort();
                let connected = peers.iter().all(|p| {
                    p["connected"].as_bool() == Some(true)
                        && p["inbound_connected"].as_bool() == Some(true)
                });
                Ok(listed == want && connected)
            }
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_region_joins_a_running_cluster_and_a_node_leaves_it() {
    let mut cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).extra_config(SETTINGS),
    )
    .await
    .unwrap();
    let mut model = Model::default();
    write_round(&cluster, &[0, 1, 2], "before", &mut model).await;
    converge_to(&cluster, &model).await;

    // The new region's node starts empty; the members refuse it until they know it.
    let new = cluster.add_node("sa-east").await.unwrap();
    assert_eq!(cluster.node(new).name(), "sa-east-1");
    assert_eq!(cluster.node(new).id(), 4);
    assert_eq!(cluster.node(new).config().peers.len(), 3);
    for i in 0..3 {
        assert!(
            cluster.node(i).config().peers.iter().any(|p| p.id == 4),
            "{} does not name the new node",
            cluster.node(i).name()
        );
    }
    cluster.node(new).start().await.unwrap();
    write_round(&cluster, &[0, 1], "joining", &mut model).await;
    rolling_restart(&cluster, &[0, 1, 2]).await;
    wait_membership(
        &cluster,
        &["us-east-1", "eu-west-1", "ap-south-1", "sa-east-1"],
    )
    .await;
    converge_to(&cluster, &model).await;

    // Writes on the new node reach everyone; writes elsewhere reach the new node.
    write_round(&cluster, &[new], "from-new", &mut model).await;
    write_round(&cluster, &[0, 2], "after", &mut model).await;
    converge_to(&cluster, &model).await;
    // A level counting every node includes the new one.
    cluster
        .node(1)
        .client()
        .with_consistency("ALL")
        .incr("ctr", 10)
        .await
        .unwrap();
    model.counter += 10;

    // ap-south-1 leaves for good: stopped, removed from every config, the rest restarted.
    cluster.node(2).stop().await.unwrap();
    cluster.remove_node(2).await.unwrap();
    for i in [0, 1, new] {
        assert!(cluster.node(i).config().peers.iter().all(|p| p.id != 3));
    }
    rolling_restart(&cluster, &[0, 1, new]).await;
    wait_membership(&cluster, &["us-east-1", "eu-west-1", "sa-east-1"]).await;
    // ALL now means the three members: it succeeds without the removed node.
    cluster
        .node(new)
        .client()
        .with_consistency("ALL")
        .incr("ctr", 5)
        .await
        .unwrap();
    model.counter += 5;
    write_round(&cluster, &[0, 1, new], "without", &mut model).await;
    converge_to(&cluster, &model).await;

    // The removed node's name and id are never handed out again.
    let again = cluster
        .run_cli(&[
            "cluster",
            "add-node",
            "--dir",
            &cluster.dir().display().to_string(),
            "--region",
            "ap-south",
            "--name",
            "ap-south-1",
        ])
        .await
        .unwrap_err();
    assert!(format!("{again:#}").contains("taken"), "{again:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_of_a_live_node_restores_into_a_new_node_that_catches_up() {
    let mut cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).extra_config(SETTINGS),
    )
    .await
    .unwrap();
    let mut model = Model::default();
    write_round(&cluster, &[0, 1, 2], "first", &mut model).await;

    // The new node's identity first: once the members know it, they keep their WAL for it,
    // so the restored node catches up from its backup through the WAL alone.
    let new = cluster.add_node("us-west").await.unwrap();
    rolling_restart(&cluster, &[0, 1, 2]).await;

    // Writes keep flowing on two nodes while node 2 is backed up.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [0, 1]
        .into_iter()
        .map(|i| {
            let client = cluster.node(i).client();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked = 0_i64;
                while !stop.load(Ordering::Relaxed) || acked < 50 {
                    client.incr("live", 1).await.unwrap();
                    client
                        .put_register(&format!("live-{i}"), &json!(acked))
                        .await
                        .unwrap();
                    acked += 1;
                }
                acked
            })
        })
        .collect();
    let backup = cluster.dir().join("eu-west-1.backup");
    let url = cluster.node(1).url();
    let printed = cluster
        .run_cli(&[
            "admin",
            "backup",
            "--url",
            &url,
            "--out",
            &backup.display().to_string(),
        ])
        .await
        .unwrap();
    assert!(printed.contains("backup written"), "{printed}");
    write_round(&cluster, &[0, 1, 2], "second", &mut model).await;
    stop.store(true, Ordering::Relaxed);
    let mut live = 0;
    for writer in writers {
        live += writer.await.unwrap();
    }

    // The backup holds eu-west-1's own ops: restoring it as eu-west-1 would reuse dots.
    let refused = cluster
        .run_cli(&[
            "admin",
            "restore",
            "--from",
            &backup.display().to_string(),
            "--config",
            &cluster.node(1).config_path().display().to_string(),
            "--data-dir",
            &cluster.dir().join("elsewhere").display().to_string(),
        ])
        .await
        .unwrap_err();
    assert!(format!("{refused:#}").contains("reissue"), "{refused:#}");

    let printed = cluster
        .run_cli(&[
            "admin",
            "restore",
            "--from",
            &backup.display().to_string(),
            "--config",
            &cluster.node(new).config_path().display().to_string(),
        ])
        .await
        .unwrap();
    assert!(printed.contains("restored"), "{printed}");
    cluster.node(new).start().await.unwrap();
    // It serves the backup's data at once, before catching up.
    assert_eq!(
        cluster
            .node(new)
            .client()
            .register_value("first-reg-0")
            .await
            .unwrap(),
        Some(json!({ "tag": "first", "node": 0 }))
    );

    wait_membership(
        &cluster,
        &["us-east-1", "eu-west-1", "ap-south-1", "us-west-1"],
    )
    .await;
    converge_to(&cluster, &model).await;
    for node in cluster.nodes() {
        assert_eq!(
            node.client().counter("live").await.unwrap(),
            live,
            "{}",
            node.name()
        );
    }
    // The restored node caught up through the WAL: no member had truncated what it needed.
    for i in 0..3 {
        let info = cluster.node(i).client().cluster_info().await.unwrap();
        let peer = info["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "us-west-1")
            .cloned()
            .unwrap();
        assert!(
            peer["truncated"].is_null(),
            "{}: {peer}",
            cluster.node(i).name()
        );
    }

    // Its own writes reach everyone.
    write_round(&cluster, &[new], "restored", &mut model).await;
    converge_to(&cluster, &model).await;
}
