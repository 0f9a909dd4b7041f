//! `meridian bench --converge`: what it reports about a real partition and its heal, and the
//! convergence-time benchmark built on it (ignored by default: it asserts nothing about time).
//!
//! The benchmark cuts one region off with the relays, loads both sides at a fixed rate for a
//! while, stops the load, heals, and takes the time from the heal to the moment every node
//! holds the same ops and the same Merkle root. `MERIDIAN_BENCH_DELAYS_MS` (default `0,50`)
//! picks the link delays, `MERIDIAN_BENCH_RUNS` (default 3) the runs per delay,
//! `MERIDIAN_BENCH_RATE` (default 2000 writes/s per side) and `MERIDIAN_BENCH_SECONDS`
//! (default 5) the load during the partition.
//!
//! ```sh
//! cargo build --release -p meridian-server
//! MERIDIAN_BIN=$PWD/target/release/meridian \
//!   cargo nextest run -p meridian-tests --run-ignored only --no-capture -E 'test(convergence_after_heal)'
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_tests::bench_env::{env_or, link_delays_ms};
use meridian_tests::{Cluster, ClusterSpec, Fault, meridian_bin, wait_until};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// `meridian bench --converge` over every node of `cluster`, started now.
fn watch(cluster: &Cluster, timeout_s: u64) -> tokio::process::Child {
    let urls: Vec<String> = cluster
        .nodes()
        .iter()
        .map(meridian_tests::Node::url)
        .collect();
    tokio::process::Command::new(meridian_bin().unwrap())
        .args(["bench", "--converge", "--json", "--url", &urls.join(",")])
        .args(["--converge-timeout", &timeout_s.to_string()])
        .args(cluster.node(0).credentials().cli_args())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "bench --converge failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converge_reports_what_each_node_lacked_and_when_all_agree() {
    let cluster = Cluster::start(ClusterSpec::new(&REGIONS).relays(true))
        .await
        .unwrap();
    let (east, west, south) = (cluster.node(0), cluster.node(1), cluster.node(2));
    cluster.isolate(south.index()).unwrap();
    for i in 0..50 {
        east.client()
            .put_register(&format!("r{i}"), &json!(i))
            .await
            .unwrap();
    }
    for _ in 0..30 {
        south.client().incr("c", 1).await.unwrap();
    }

    // While the partition lasts it cannot converge: one line says who lacks what.
    let output = watch(&cluster, 1).wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("did not converge within 1 s")
            && stderr.contains(&format!("{} 50 ops behind", south.name()))
            && stderr.contains(&format!("{} 30 ops behind", west.name())),
        "{stderr}"
    );

    // Started before the heal, it sees the whole gap, then the moment it closes.
    let watcher = watch(&cluster, 60);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let healed_at = unix_ms();
    cluster.heal().unwrap();
    let figures = report(&watcher.wait_with_output().await.unwrap());
    let behind = &figures["behind_at_start"];
    assert_eq!(behind[east.name()], 30, "{figures}");
    assert_eq!(behind[west.name()], 30, "{figures}");
    assert_eq!(behind[south.name()], 50, "{figures}");
    assert_eq!(figures["ops"], 80, "{figures}");
    assert!(figures["converged_at_unix_ms"].as_u64().unwrap() >= healed_at);
    assert!(figures["root"].as_str().is_some_and(|r| !r.is_empty()));

    // What it reported holds: every node reads every write.
    for node in cluster.nodes() {
        let client = node.client();
        assert_eq!(client.counter("c").await.unwrap(), 30, "{}", node.name());
        for i in 0..50 {
            assert_eq!(
                client.register_value(&format!("r{i}")).await.unwrap(),
                Some(json!(i)),
                "{}",
                node.name()
            );
        }
    }
    cluster.shutdown().await.unwrap();
}

/// Equal applied vectors are not enough: a state no op explains (a fabricated element here,
/// standing for a restored backup or a bit flip) keeps the Merkle roots apart until
/// anti-entropy repairs it, and `--converge` waits for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converge_waits_for_equal_merkle_roots_not_only_equal_ops() {
    let spec = ClusterSpec::new(&REGIONS[..2])
        .extra_config("[anti_entropy]\nenabled = false\n[debug]\nallow_state_overwrite = true\n");
    let cluster = Cluster::start(spec).await.unwrap();
    let (east, west) = (cluster.node(0).client(), cluster.node(1).client());
    east.set_add("cart", &[json!("apple")]).await.unwrap();
    report(&watch(&cluster, 30).wait_with_output().await.unwrap());
    west.request(
        reqwest::Method::POST,
        &["v1", "admin", "debug", "merge-unlogged", "sets", "cart"],
        Some(&json!({ "element": "ghost" })),
    )
    .await
    .unwrap()
    .ok("fabricate an element")
    .unwrap();

    let output = watch(&cluster, 1).wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("0 ops behind") && stderr.contains("same ops but Merkle roots"),
        "{stderr}"
    );

    let watcher = watch(&cluster, 60);
    let peer = cluster.node(1).name().to_owned();
    wait_until(Duration::from_secs(20), "connected to the peer", || async {
        let info = east.cluster_info().await?;
        Ok(info["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["name"] == peer.as_str() && p["connected"] == true)
        }))
    })
    .await
    .unwrap();
    cluster
        .run_cli(&[
            "admin",
            "sync",
            "--peer",
            &peer,
            "--region",
            &cluster.node(0).url(),
        ])
        .await
        .unwrap();
    let figures = report(&watcher.wait_with_output().await.unwrap());
    assert_eq!(figures["ops"], 1, "the repair moved no op: {figures}");
    for client in [&east, &west] {
        let mut elements = client.set_elements("cart").await.unwrap();
        elements.sort_by_key(ToString::to_string);
        assert_eq!(elements, vec![json!("apple"), json!("ghost")]);
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --run-ignored only (see the module docs)"]
async fn convergence_after_heal() {
    let runs: usize = env_or("MERIDIAN_BENCH_RUNS", 3);
    let rate: f64 = env_or("MERIDIAN_BENCH_RATE", 2000.0);
    let seconds: u64 = env_or("MERIDIAN_BENCH_SECONDS", 5);
    let delays = link_delays_ms();
    for delay_ms in delays {
        let mut times = Vec::new();
        for _ in 0..runs {
            let cluster = Cluster::start(ClusterSpec::new(&REGIONS).relays(true))
                .await
                .unwrap();
            if delay_ms > 0 {
                cluster
                    .set_all_links(&Fault::delayed(Duration::from_millis(delay_ms)))
                    .unwrap();
            }
            let (east, south) = (cluster.node(0), cluster.node(2));
            cluster.isolate(south.index()).unwrap();
            let load = tokio::process::Command::new(meridian_bin().unwrap())
                .args(["bench", "--workload", "mixed", "-c", "16", "--warmup", "0"])
                .args(["-d", &seconds.to_string(), "--rate", &rate.to_string()])
                .args([
                    "--json",
                    "--url",
                    &format!("{},{}", east.url(), south.url()),
                ])
                .args(east.credentials().cli_args())
                .output()
                .await
                .unwrap();
            assert!(
                load.status.success(),
                "{}",
                String::from_utf8_lossy(&load.stderr)
            );
            let watcher = watch(&cluster, 120);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let healed_at = unix_ms();
            cluster.heal().unwrap();
            let figures = report(&watcher.wait_with_output().await.unwrap());
            let after_heal = figures["converged_at_unix_ms"].as_u64().unwrap() - healed_at;
            println!(
                "link delay {delay_ms} ms, {seconds} s apart at {rate} writes/s per side: \
                 converged {after_heal} ms after the heal; {figures}"
            );
            times.push(after_heal);
            cluster.shutdown().await.unwrap();
        }
        times.sort_unstable();
        let n = times.len();
        println!(
            "link delay {delay_ms} ms, {n} runs: heal to convergence median {} ms ({}-{})",
            times[n / 2],
            times[0],
            times[n - 1]
        );
    }
}
