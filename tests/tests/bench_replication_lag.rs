//! Replication lag under a fixed write rate, on loopback and with the relay adding delay to
//! every link. A benchmark, not a test: it asserts nothing about time and is ignored by default.
//!
//! ```sh
//! cargo build --release -p meridian-server
//! MERIDIAN_BIN=$PWD/target/release/meridian MERIDIAN_BENCH_RATE=5000 \
//!   cargo nextest run -p meridian-tests --run-ignored only --no-capture -E 'test(replication_lag)'
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::{Cluster, ClusterSpec, Fault, meridian_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --run-ignored only (see the module docs)"]
async fn replication_lag() {
    let rate: f64 = std::env::var("MERIDIAN_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5000.0);
    let seconds = std::env::var("MERIDIAN_BENCH_SECONDS").unwrap_or_else(|_| "10".into());
    let connections = std::env::var("MERIDIAN_BENCH_CONNECTIONS").unwrap_or_else(|_| "96".into());
    for delay_ms in [0u64, 50] {
        let cluster =
            Cluster::start(ClusterSpec::new(&["us-east", "eu-west", "ap-south"]).relays(true))
                .await
                .unwrap();
        if delay_ms > 0 {
            cluster
                .set_all_links(&Fault::delayed(Duration::from_millis(delay_ms)))
                .unwrap();
        }
        let urls: Vec<String> = cluster
            .nodes()
            .iter()
            .map(meridian_tests::Node::url)
            .collect();
        let output = tokio::process::Command::new(meridian_bin().unwrap())
            .args([
                "bench",
                "--workload",
                "put",
                "-c",
                &connections,
                "--warmup",
                "2",
                "-d",
                &seconds,
                "--json",
            ])
            .args([
                "--url",
                &urls.join(","),
                "--lag-url",
                &urls[1],
                "--rate",
                &rate.to_string(),
            ])
            .args(cluster.node(0).credentials().cli_args())
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "bench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        println!(
            "link delay {delay_ms} ms, {rate} writes/s per region: {}",
            String::from_utf8_lossy(&output.stdout).trim()
        );
        cluster.shutdown().await.unwrap();
    }
}
