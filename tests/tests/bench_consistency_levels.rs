//! Throughput and latency per consistency level, with the relay emulating three regions:
//! one-way delays of 15, 35 and 55 ms (round trips of 30, 70 and 110 ms) between
//! us-east–eu-west, us-east–ap-south and eu-west–ap-south. A benchmark: it asserts nothing
//! about time and is ignored by default.
//!
//! ```sh
//! cargo build --release -p meridian-server
//! MERIDIAN_BIN=$PWD/target/release/meridian \
//!   cargo nextest run -p meridian-tests --run-ignored only --no-capture -E 'test(per_consistency_level)'
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meridian_tests::bench_env::env_or;
use meridian_tests::{Cluster, ClusterSpec, Fault, meridian_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --run-ignored only (see the module docs)"]
async fn per_consistency_level() {
    let seconds: u64 = env_or("MERIDIAN_BENCH_SECONDS", 5);
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west", "ap-south"])
            .relays(true)
            .extra_config("[timeouts]\nrequest_ms = 10000\n"),
    )
    .await
    .unwrap();
    for (a, b, one_way_ms) in [(0, 1, 15), (0, 2, 35), (1, 2, 55)] {
        let fault = Fault::delayed(Duration::from_millis(one_way_ms));
        cluster.link(a, b).unwrap().set(&fault);
        cluster.link(b, a).unwrap().set(&fault);
    }
    let url = cluster.node(0).url();
    for workload in ["put", "get"] {
        for level in ["LOCAL_ONE", "LOCAL_QUORUM", "GLOBAL_QUORUM", "ALL"] {
            let output = tokio::process::Command::new(meridian_bin().unwrap())
                .args([
                    "bench",
                    "--workload",
                    workload,
                    "-c",
                    "32",
                    "--warmup",
                    "1",
                    "-d",
                    &seconds.to_string(),
                ])
                .args([
                    "--keys",
                    "1000",
                    "--json",
                    "--url",
                    &url,
                    "--consistency",
                    level,
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
                "{level:<13} {}",
                String::from_utf8_lossy(&output.stdout).trim()
            );
        }
    }
    cluster.shutdown().await.unwrap();
}
