//! Replication lag under a fixed write rate, on loopback and with the relay adding delay to
//! every link. A benchmark, not a test: it asserts nothing about time and is ignored by default.
//!
//! Besides the bench's figures it prints how late the relays forwarded datagrams past their
//! due time (`relay_late_*_ms`): the relays share the machine with the nodes and the load
//! generator, so the delay a link really added is the configured one plus that.
//! `MERIDIAN_BENCH_DELAYS_MS` (default `0,50`) picks the link delays to run.
//! `MERIDIAN_BENCH_RUNS` (default 1) repeats the whole set, each run on a fresh cluster, and
//! ends with the median and range of each delay's p99 over the runs: on a shared machine one
//! run's p99 moves by several milliseconds.
//!
//! ```sh
//! cargo build --release -p meridian-server
//! MERIDIAN_BIN=$PWD/target/release/meridian MERIDIAN_BENCH_RATE=5000 \
//!   cargo nextest run -p meridian-tests --run-ignored only --no-capture -E 'test(replication_lag)'
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::bench_env::{env_or, link_delays_ms};
use meridian_tests::{Cluster, ClusterSpec, Fault, meridian_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --run-ignored only (see the module docs)"]
async fn replication_lag() {
    let rate: f64 = env_or("MERIDIAN_BENCH_RATE", 5000.0);
    let seconds: u64 = env_or("MERIDIAN_BENCH_SECONDS", 10);
    let connections: usize = env_or("MERIDIAN_BENCH_CONNECTIONS", 96);
    let delays = link_delays_ms();
    let runs: usize = env_or("MERIDIAN_BENCH_RUNS", 1);
    let warmup = Duration::from_secs(2);
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); delays.len()];
    for (i, delay_ms) in std::iter::repeat_n(delays.iter().copied().enumerate(), runs).flatten() {
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
            .args(["bench", "--workload", "put", "-c", &connections.to_string()])
            .args([
                "--warmup",
                &warmup.as_secs().to_string(),
                "-d",
                &seconds.to_string(),
            ])
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
        if let Some(p99) = figures["apply_lag_p99_ms"].as_f64() {
            p99s[i].push(p99);
        }
        cluster.shutdown().await.unwrap();
    }
    if runs > 1 {
        for (delay_ms, mut values) in delays.into_iter().zip(p99s) {
            values.sort_by(f64::total_cmp);
            let Some((&min, &max)) = values.first().zip(values.last()) else {
                continue;
            };
            let n = values.len();
            let median = f64::midpoint(values[(n - 1) / 2], values[n / 2]);
            let bound = delay_ms as f64 + 20.0;
            let within = values.iter().filter(|&&v| v <= bound).count();
            println!(
                "link delay {delay_ms} ms, {rate} writes/s per region, {n} runs: apply lag p99 \
                 median {median:.1} ms ({min:.1}-{max:.1}), {within} of {n} at or under \
                 {bound:.0} ms (link delay + 20)"
            );
        }
    }
}
