//! Consistency levels under a partition: one region cut off from the other two.
//!
//! - In the minority, GLOBAL_QUORUM writes are refused with 503 before anything is applied,
//!   and nothing changes anywhere; in the majority they succeed.
//! - ALL fails on both sides; LOCAL_ONE succeeds on both sides.
//! - A session that wrote in the minority reads in the majority either its write or a clear
//!   503 `session-not-caught-up`, never a stale answer.
//! - After the heal everything converges, and the strong levels work again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::{ApiResponse, Client, Cluster, ClusterSpec, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(30);

/// Waits until `client`'s node sees exactly `expected` reachable peers.
async fn wait_reachable(client: &Client, expected: usize) {
    wait_until(
        Duration::from_secs(20),
        &format!("{} to see {expected} reachable peers", client.base_url()),
        || async {
            let info = client.cluster_info().await?;
            let reachable = info["peers"]
                .as_array()
                .map_or(0, |p| p.iter().filter(|p| p["reachable"] == true).count());
            Ok(reachable == expected)
        },
    )
    .await
    .unwrap();
}

/// This node's applied sequence of its own origin, from `/v1/cluster`.
async fn own_applied(client: &Client) -> u64 {
    let info = client.cluster_info().await.unwrap();
    let id = info["node"]["id"].as_u64().unwrap().to_string();
    info["applied"][&id].as_u64().unwrap_or(0)
}

async fn incr(client: &Client, key: &str, by: i64) -> ApiResponse {
    client
        .request(
            Method::POST,
            &["v1", "counters", key],
            Some(&json!({ "increment": by })),
        )
        .await
        .unwrap()
}

fn assert_problem(response: &ApiResponse, status: StatusCode, slug: &str) {
    assert_eq!(response.status, status, "{:?}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{:?}",
        response.headers
    );
    let kind = response.body["type"].as_str().unwrap_or_default();
    assert!(kind.ends_with(slug), "type {kind:?}, expected {slug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_region_refuses_quorum_writes_and_converges_after_heal() {
    let cluster =
        Cluster::start(ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).relays(true))
            .await
            .unwrap();
    let clients = cluster.clients();
    for client in &clients {
        wait_reachable(client, 2).await;
    }
    let level = |i: usize, l: &str| clients[i].with_consistency(l);

    // Healthy: every level is served.
    for l in ["LOCAL_ONE", "LOCAL_QUORUM", "GLOBAL_QUORUM", "ALL"] {
        let response = incr(&level(0, l), "healthy", 1).await;
        assert_eq!(response.status, StatusCode::OK, "{l}: {:?}", response.body);
    }

    // Cut ap-south (node 2) off from the other two.
    cluster.partition(&[2], &[0, 1]).unwrap();
    wait_reachable(&clients[2], 0).await;
    wait_reachable(&clients[0], 1).await;
    wait_reachable(&clients[1], 1).await;

    // Minority: GLOBAL_QUORUM and ALL writes are refused at once, nothing applied.
    let minority_before = own_applied(&clients[2]).await;
    for l in ["GLOBAL_QUORUM", "ALL"] {
        let response = level(2, l)
            .put_register("minority-gq", &json!(l))
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{response:#}").contains("503"), "{l}: {response:#}");
        let response = incr(&level(2, l), "gq", 100).await;
        assert_problem(&response, StatusCode::SERVICE_UNAVAILABLE, ":unavailable");
        assert_eq!(response.body["level"], l);
        assert_eq!(response.body["reachable"], 1);
        let required = if l == "ALL" { 3 } else { 2 };
        assert_eq!(response.body["required"], required);
        assert!(response.header("retry-after").is_some());
        assert!(response.header("session-token").is_some());
    }
    assert_eq!(
        own_applied(&clients[2]).await,
        minority_before,
        "refused writes applied nothing in the minority"
    );
    assert_eq!(clients[2].get_register("minority-gq").await.unwrap(), None);

    // Majority: GLOBAL_QUORUM succeeds on both nodes; ALL fails.
    for i in [0, 1] {
        let response = incr(&level(i, "GLOBAL_QUORUM"), "gq", 1).await;
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
        let response = incr(&level(i, "ALL"), "all", 1).await;
        assert_problem(&response, StatusCode::SERVICE_UNAVAILABLE, ":unavailable");
        // A quorum read in the majority works too.
        let response = level(i, "GLOBAL_QUORUM")
            .request(Method::GET, &["v1", "counters", "gq"], None)
            .await
            .unwrap();
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    }
    let response = level(2, "GLOBAL_QUORUM")
        .request(Method::GET, &["v1", "counters", "gq"], None)
        .await
        .unwrap();
    assert_problem(&response, StatusCode::SERVICE_UNAVAILABLE, ":unavailable");

    // LOCAL_ONE succeeds on both sides.
    for i in [0, 2] {
        let response = incr(&level(i, "LOCAL_ONE"), "local", 1).await;
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    }

    // A session that wrote in the minority never reads stale in the majority.
    let session = clients[2].with_session();
    session
        .set_add("session-set", &[json!("written-in-minority")])
        .await
        .unwrap();
    let elsewhere = session.for_node(&cluster.node(0).url()).unwrap();
    let response = elsewhere
        .request(Method::GET, &["v1", "sets", "session-set"], None)
        .await
        .unwrap();
    assert_problem(
        &response,
        StatusCode::SERVICE_UNAVAILABLE,
        "session-not-caught-up",
    );
    assert!(response.header("retry-after").is_some());
    // Too few reachable is known at once: that 503 comes first, without waiting out the
    // session (which could not catch up anyway) and without applying anything.
    for l in ["ALL", "GLOBAL_QUORUM"] {
        let at_level = elsewhere.with_consistency(l);
        let response = incr(&at_level, "all", 1).await;
        if l == "ALL" {
            assert_problem(&response, StatusCode::SERVICE_UNAVAILABLE, ":unavailable");
            let read = at_level
                .request(Method::GET, &["v1", "sets", "session-set"], None)
                .await
                .unwrap();
            assert_problem(&read, StatusCode::SERVICE_UNAVAILABLE, ":unavailable");
        } else {
            // The majority can serve GLOBAL_QUORUM: only the session holds this one back.
            assert_problem(
                &response,
                StatusCode::SERVICE_UNAVAILABLE,
                "session-not-caught-up",
            );
        }
    }

    // Heal: everything converges, and nothing the minority refused appears anywhere.
    cluster.heal().unwrap();
    for client in &clients {
        wait_reachable(client, 2).await;
    }
    // Wait for the expected sums themselves: right after the heal every node can briefly read
    // the same wrong value (1 for `local`: each side holding only its own increment).
    for client in &clients {
        for (key, expected) in [("gq", 2), ("local", 2)] {
            let c = client.clone();
            wait_until(CONVERGE, key, move || {
                let c = c.clone();
                async move { Ok(c.counter(key).await? >= expected) }
            })
            .await
            .unwrap();
        }
    }
    let gq = cluster
        .wait_converged(CONVERGE, |c| async move { c.counter("gq").await })
        .await
        .unwrap();
    assert_eq!(gq, 2, "only the majority's GLOBAL_QUORUM increments exist");
    let local = cluster
        .wait_converged(CONVERGE, |c| async move { c.counter("local").await })
        .await
        .unwrap();
    assert_eq!(local, 2);
    let all = cluster
        .wait_converged(CONVERGE, |c| async move { c.counter("all").await })
        .await
        .unwrap();
    assert_eq!(all, 0, "refused ALL writes applied nothing");
    for client in &clients {
        assert_eq!(client.get_register("minority-gq").await.unwrap(), None);
    }
    // The session's write arrived; its token is now satisfied in the majority.
    let elements = elsewhere.set_elements("session-set").await.unwrap();
    assert_eq!(elements, vec![Value::from("written-in-minority")]);

    // The strong levels work again everywhere.
    for i in 0..3 {
        let response = incr(&level(i, "ALL"), "after-heal", 1).await;
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    }
    let value = level(2, "ALL").counter("after-heal").await.unwrap();
    assert_eq!(value, 3, "an ALL read after ALL writes sees all of them");

    cluster.shutdown().await.unwrap();
}
