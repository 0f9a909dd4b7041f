//! The peer mesh admits only certificates from the cluster CA: nodes of a second cluster
//! (its own `meridian cluster init`, so its own CA) pointed at the first cluster's peer
//! addresses can neither connect nor inject ops, even when they claim a real peer's
//! node id, name and region.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use meridian_tests::{Cluster, ClusterSpec, Node, config, toml, wait_until};
use serde_json::json;

const REGIONS: &[&str] = &["us-east", "eu-west", "ap-south"];
const TIMEOUT: Duration = Duration::from_secs(60);
/// What a node logs when it refuses a replication connection.
const REFUSED: &str = "refused a replication connection";

/// How many replication connections `node` logged as refused (from `remote` only,
/// and for an invalid certificate only, when given).
fn refusals(node: &Node, remote: Option<SocketAddr>) -> usize {
    let remote = remote.map(|r| format!("remote={r}"));
    [node.stderr_path(), node.stdout_path()]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|text| {
            text.lines()
                .filter(|line| line.contains(REFUSED))
                .filter(|line| {
                    remote.as_ref().is_none_or(|r| {
                        line.contains(r.as_str()) && line.contains("invalid peer certificate")
                    })
                })
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_certificates_from_another_ca_are_refused() {
    let cluster = Cluster::start(ClusterSpec::new(REGIONS)).await.unwrap();
    let real: BTreeMap<u64, SocketAddr> = cluster
        .nodes()
        .iter()
        .map(|n| (n.id(), n.peer_addr()))
        .collect();
    for node in cluster.nodes() {
        assert_eq!(refusals(node, None), 0, "{}", node.log_tails(20));
    }

    // A second cluster: same regions, hence the same node ids, names, regions and
    // cluster name as the real one, but its own CA. Its nodes' peers are the REAL nodes.
    // The first two impersonate real nodes and trust the real CA (so they accept the
    // real nodes' certificates, and it is the real nodes that must refuse theirs); the
    // third comes with a new id and trusts only its own CA.
    let real_ca = cluster.dir().join("ca.pem");
    let rogue = Cluster::start(ClusterSpec::new(REGIONS).configure(move |node, table| {
        let peers: BTreeMap<u64, SocketAddr> = real
            .iter()
            .filter(|(id, _)| **id != node.id)
            .map(|(id, addr)| (*id, *addr))
            .collect();
        config::set_peer_addresses(table, &peers)?;
        if node.id == 3 {
            table["node"]["id"] = toml::Value::Integer(9);
            table["node"]["name"] = toml::Value::String("intruder-9".into());
        } else {
            let ca = real_ca.to_str().unwrap().to_owned();
            table["tls"]["ca"] = toml::Value::String(ca);
        }
        Ok(())
    }))
    .await
    .unwrap();
    assert_eq!(rogue.node(0).id(), 1, "impersonates us-east-1");
    assert_eq!(rogue.node(2).id(), 9);

    // The rogue nodes take writes locally...
    for node in rogue.nodes() {
        let c = node.client();
        c.put_register("rogue-reg", &json!({"from": node.name()}))
            .await
            .unwrap();
        c.incr("shared-ctr", 1000).await.unwrap();
        c.set_add("shared-set", &[json!("evil")]).await.unwrap();
    }
    // ...and dial the real nodes, which refuse them: each real node logs refusing each
    // impersonator's certificate (it dials from its QUIC endpoint, its peer address),
    // more than once since the rogues keep retrying.
    for node in cluster.nodes() {
        // An impersonator dials every real node but the one it pretends to be.
        for impostor in rogue.nodes()[..2].iter().filter(|r| r.id() != node.id()) {
            let from = impostor.peer_addr();
            wait_until(
                TIMEOUT,
                &format!(
                    "{} to refuse {}'s certificate",
                    node.name(),
                    impostor.name()
                ),
                || async move { Ok(refusals(node, Some(from)) >= 2) },
            )
            .await
            .unwrap();
        }
    }

    // The real cluster replicates its own writes as usual.
    for node in cluster.nodes() {
        let c = node.client();
        c.incr("shared-ctr", 1).await.unwrap();
        c.set_add("shared-set", &[json!(node.name())])
            .await
            .unwrap();
    }
    // Wait for the expected sum itself: "all nodes equal" can hold transiently at 2, each node
    // holding its own increment and a different peer's.
    for node in cluster.nodes() {
        let c = node.client();
        wait_until(TIMEOUT, "all three real increments", || {
            let c = c.clone();
            async move { Ok(c.counter("shared-ctr").await? >= 3) }
        })
        .await
        .unwrap();
        assert_eq!(
            c.counter("shared-ctr").await.unwrap(),
            3,
            "no rogue increment reached the real cluster"
        );
    }

    // For a while longer (the rogues keep retrying), nothing of theirs shows up, and the
    // real nodes see exactly their real peers, connected.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while tokio::time::Instant::now() < watch_until || rounds < 2 {
        rounds += 1;
        for node in cluster.nodes() {
            let c = node.client();
            assert_eq!(c.get_register("rogue-reg").await.unwrap(), None);
            assert_eq!(c.counter("shared-ctr").await.unwrap(), 3);
            let mut elements = c.set_elements("shared-set").await.unwrap();
            elements.sort_by_key(serde_json::Value::to_string);
            assert_eq!(
                elements,
                [json!("ap-south-1"), json!("eu-west-1"), json!("us-east-1")]
            );
            let info = c.cluster_info().await.unwrap();
            let origins: Vec<&String> = info["applied"].as_object().unwrap().keys().collect();
            assert!(
                origins
                    .iter()
                    .all(|o| ["1", "2", "3"].contains(&o.as_str())),
                "{info}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for node in cluster.nodes() {
        let info = node.client().cluster_info().await.unwrap();
        for peer in info["peers"].as_array().unwrap() {
            let real_peer = cluster
                .nodes()
                .iter()
                .find(|n| Some(n.id()) == peer["id"].as_u64())
                .unwrap_or_else(|| panic!("unknown peer {peer}"));
            assert_eq!(peer["name"], real_peer.name());
            assert_eq!(peer["connected"], true, "{peer}");
            assert_eq!(peer["reachable"], true, "{peer}");
        }
    }

    // The rogues never got a session with anyone, and received nothing.
    for node in rogue.nodes() {
        let c = node.client();
        let info = c.cluster_info().await.unwrap();
        for peer in info["peers"].as_array().unwrap() {
            assert_eq!(peer["connected"], false, "{}: {peer}", node.name());
            assert_eq!(peer["inbound_connected"], false, "{}: {peer}", node.name());
            assert_eq!(peer["ops_received"], 0, "{}: {peer}", node.name());
        }
        assert_eq!(c.counter("shared-ctr").await.unwrap(), 1000);
        assert_eq!(c.set_elements("shared-set").await.unwrap(), [json!("evil")]);
        eprintln!(
            "{}: last error {}",
            node.name(),
            info["peers"][0]["last_error"]
        );
    }
    drop(rogue);
    cluster.shutdown().await.unwrap();
}
