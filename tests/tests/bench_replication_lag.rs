//! Replication lag under a fixed write rate, on loopback and with the relay adding delay to
//! every link. A benchmark, not a test: it asserts nothing about time and is ignored by default.
//!
//! Besides the bench's figures it prints how late the relays forwarded datagrams past their
//! due time (`relay_late_*_ms`): the relays share the machine with the nodes and the load
//! generator, so the delay a link really added is the configured one plus that.
//! `MERIDIAN_BENCH_DELAYS_MS` (default `0,50`) picks the link delays to run.
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
    let delays: Vec<u64> = std::env::var("MERIDIAN_BENCH_DELAYS_MS")
        .unwrap_or_else(|_| "0,50".into())
        .split(',')
        .map(|d| {
            d.trim()
                .parse()
                .expect("MERIDIAN_BENCH_DELAYS_MS: milliseconds, comma-separated")
        })
        .collect();
    let warmup = Duration::from_secs(2);
    for delay_ms in delays {
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
        let bench = tokio::process::Command::new(meridian_bin().unwrap())
            .args(["bench", "--workload", "put", "-c", &connections])
            .args(["--warmup", &warmup.as_secs().to_string(), "-d", &seconds])
            .args(["--json", "--url", &urls.join(","), "--lag-url", &urls[1]])
            .args(["--rate", &rate.to_string()])
            .args(cluster.node(0).credentials().cli_args())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The relays' lateness over (about) the measured window: how much longer than the
        // configured delay the emulated links really took.
        tokio::time::sleep(warmup).await;
        cluster.reset_relay_lateness();
        let output = bench.wait_with_output().await.unwrap();
        let late = cluster.relay_lateness().unwrap();
        assert!(
            output.status.success(),
            "bench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut figures: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let ms = |micros: u64| micros as f64 / 1000.0;
        figures["relay_late_p50_ms"] = ms(late.value_at_quantile(0.5)).into();
        figures["relay_late_p99_ms"] = ms(late.value_at_quantile(0.99)).into();
        figures["relay_late_max_ms"] = ms(late.max()).into();
        println!("link delay {delay_ms} ms, {rate} writes/s per region: {figures}");
        cluster.shutdown().await.unwrap();
    }
}
