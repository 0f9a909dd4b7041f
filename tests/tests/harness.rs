//! The harness itself, exercised against `fake-meridian` (a stand-in for the real
//! binary built from this crate): process lifecycle, readiness, config rewriting,
//! relays on every peer link, partitions, and teardown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use meridian_tests::{Client, Cluster, ClusterSpec, Fault, Node, NodeConfig, wait_until};
use serde_json::Value;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-meridian");

fn spec() -> ClusterSpec {
    ClusterSpec::new(&["us-east", "eu-west", "ap-south"])
        .bin(FAKE)
        .ready_timeout(Duration::from_secs(10))
}

/// How many pongs node `client` has received from node id `from`.
async fn pongs(client: &Client, from: u64) -> anyhow::Result<u64> {
    let info = client.cluster_info().await?;
    Ok(info["pongs"][from.to_string()].as_u64().unwrap_or(0))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_nodes_and_routes_peer_traffic_through_relays() {
    let cluster = Cluster::start(
        spec()
            .relays(true)
            .extra_config("[limits]\nmax_key_bytes = 64\n"),
    )
    .await
    .unwrap();
    assert_eq!(cluster.len(), 3);
    let names: Vec<&str> = cluster.nodes().iter().map(Node::name).collect();
    assert_eq!(names, ["us-east-1", "eu-west-1", "ap-south-1"]);
    assert_eq!(cluster.node(1).id(), 2);
    assert_eq!(cluster.region_indices("ap-south"), [2]);
    assert_eq!(cluster.node(0).http_addr().port(), cluster.base_port());

    // Configs point every peer at its relay, and carry the extra snippet.
    for node in cluster.nodes() {
        let text = std::fs::read_to_string(node.config_path()).unwrap();
        assert!(text.contains("max_key_bytes = 64"), "{text}");
        let config = NodeConfig::parse(&text).unwrap();
        assert_eq!(config.peers.len(), 2);
        for peer in &config.peers {
            let to = cluster.nodes().iter().find(|n| n.id() == peer.id).unwrap();
            let relay = cluster.relay(node.index(), to.index()).unwrap();
            assert_eq!(peer.address, relay.local_addr());
            assert_eq!(relay.upstream(), to.peer_addr());
        }
    }

    // Pings and pongs flow on every link.
    for node in cluster.nodes() {
        let client = node.client();
        for other in cluster.nodes().iter().filter(|o| o.id() != node.id()) {
            let from = other.id();
            wait_until(Duration::from_secs(5), "pongs on every link", || {
                let client = client.clone();
                async move { Ok(pongs(&client, from).await? > 0) }
            })
            .await
            .unwrap();
        }
    }
    assert!(cluster.relay_stats().forwarded > 0);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_heal_cut_and_restore_links() {
    let cluster = Cluster::start(spec().relays(true)).await.unwrap();
    let c1 = cluster.node(1).client();
    wait_until(
        Duration::from_secs(5),
        "pongs from node 1 at node 2",
        || {
            let c1 = c1.clone();
            async move { Ok(pongs(&c1, 1).await? > 0) }
        },
    )
    .await
    .unwrap();

    cluster.isolate(0).unwrap();
    assert!(cluster.link(0, 1).unwrap().fault().partitioned);
    assert!(cluster.link(2, 0).unwrap().fault().partitioned);
    assert!(!cluster.link(1, 2).unwrap().fault().partitioned);
    // Give datagrams in flight time to land, then nothing more arrives from node 0.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = pongs(&c1, 1).await.unwrap();
    let peer_before = pongs(&c1, 3).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pongs(&c1, 1).await.unwrap(), before);
    assert!(
        pongs(&c1, 3).await.unwrap() > peer_before,
        "1 ↔ 2 still flows"
    );
    assert!(cluster.link(0, 1).unwrap().stats().dropped > 0);

    cluster.heal().unwrap();
    wait_until(Duration::from_secs(5), "node 0 reachable again", || {
        let c1 = c1.clone();
        async move { Ok(pongs(&c1, 1).await? > before) }
    })
    .await
    .unwrap();

    cluster
        .set_all_links(&Fault::delayed(Duration::from_millis(5)))
        .unwrap();
    assert_eq!(
        cluster.link(2, 1).unwrap().fault().delay,
        Duration::from_millis(5)
    );
    cluster.clear_faults().unwrap();
    assert_eq!(cluster.link(2, 1).unwrap().fault(), Fault::none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_pause_restart_stop_and_wipe() {
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west"])
            .bin(FAKE)
            .ready_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let node = cluster.node(1);
    let client = node.client();
    let starts = |v: Value| v["starts"].as_u64().unwrap();
    assert_eq!(starts(client.cluster_info().await.unwrap()), 1);
    assert!(
        cluster.link(0, 1).is_err(),
        "no relays without relays(true)"
    );

    // SIGKILL.
    let pid = node.pid().unwrap();
    node.kill().unwrap();
    assert!(!node.is_running());
    assert!(!pid_alive(pid));
    assert!(client.healthz().await.is_err());

    // Start again with the same data.
    node.start().await.unwrap();
    assert_eq!(starts(client.cluster_info().await.unwrap()), 2);

    // SIGSTOP / SIGCONT.
    node.pause().unwrap();
    assert!(node.is_running(), "a paused node is alive");
    let frozen = tokio::time::timeout(Duration::from_millis(300), client.healthz()).await;
    assert!(frozen.is_err(), "a paused node does not answer");
    node.resume().unwrap();
    assert!(client.healthz().await.unwrap());

    // Graceful restart (SIGTERM, then start).
    node.restart().await.unwrap();
    assert_eq!(starts(client.cluster_info().await.unwrap()), 3);

    // SIGTERM while paused still stops it.
    node.pause().unwrap();
    let status = node.stop().await.unwrap();
    assert!(status.success(), "{status}");
    assert!(
        node.stop().await.is_err(),
        "stopping a stopped node is an error"
    );
    node.kill().unwrap();

    // Wiping the data resets it.
    node.wipe_data().unwrap();
    node.start().await.unwrap();
    assert_eq!(starts(client.cluster_info().await.unwrap()), 1);
    assert!(node.wipe_data().is_err(), "cannot wipe a running node");
    assert!(node.log_tails(10).contains("SIGTERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cluster_kills_every_node() {
    let cluster = Cluster::start(spec().nodes_per_region(2)).await.unwrap();
    assert_eq!(cluster.len(), 6);
    assert_eq!(cluster.node(1).name(), "us-east-2");
    assert_eq!(cluster.region_indices("eu-west"), [2, 3]);
    let dir = cluster.dir().to_path_buf();
    let pids: Vec<u32> = cluster.nodes().iter().map(|n| n.pid().unwrap()).collect();
    assert!(pids.iter().all(|&p| pid_alive(p)));
    drop(cluster);
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} survived the drop");
    }
    assert!(!dir.exists(), "the cluster directory is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_start_fails_with_its_logs() {
    // Occupy node 0's HTTP port through the hook: point it at a bound port.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let err = Cluster::start(spec().configure(move |node, table| {
        if node.id == 1 {
            table["http"]["listen"] = toml::Value::String(busy_addr.clone());
        }
        Ok(())
    }))
    .await
    .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("us-east-1"), "{text}");
    assert!(
        text.contains("binding 127.0.0.1"),
        "the log tail is in the error: {text}"
    );
}
