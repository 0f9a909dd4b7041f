//! `meridian bench` against a real node and a real `meridian bench-baseline`: the comparison
//! the README's single-node table is made with, and a write and a read of each type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};

use common::{Node, free_port};

/// A `meridian bench-baseline` process, killed on drop.
struct Baseline(Child);

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn baseline() -> (Baseline, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench-baseline", "--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let baseline = Baseline(child);
    let url = format!("http://{addr}");
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client
            .get(format!("{url}/v1/registers/k"))
            .send()
            .await
            .is_ok()
        {
            return (baseline, url);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("bench-baseline did not come up on {addr}");
}

/// `meridian bench --json` with two connections for one second and `args`, which must
/// succeed; its report.
fn bench(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench", "--json", "-c", "2", "-d", "1", "--warmup", "0"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A GET of `path` on `node`, as JSON.
async fn get_json(node: &Node, path: &str) -> serde_json::Value {
    reqwest::get(node.url(path))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The keys of one type on `node` (the first hundred).
async fn keys(node: &Node, collection: &str) -> Vec<serde_json::Value> {
    let listed = get_json(node, &format!("/v1/{collection}?limit=100")).await;
    listed["keys"].as_array().unwrap().clone()
}

#[tokio::test]
async fn bench_compares_a_node_with_the_baseline_round_by_round() {
    let node = Node::start("").await;
    let (_baseline, baseline_url) = baseline().await;
    let node_url = node.url("");
    let report = bench(&[
        "--workload",
        "put",
        "--keys",
        "50",
        "--rounds",
        "2",
        "--url",
        &node_url,
        "--baseline-url",
        &baseline_url,
    ]);
    let runs = report["runs"].as_array().unwrap();
    let order: Vec<(u64, &str)> = runs
        .iter()
        .map(|r| (r["round"].as_u64().unwrap(), r["server"].as_str().unwrap()))
        .collect();
    assert_eq!(
        order,
        [(1, "baseline"), (1, "node"), (2, "baseline"), (2, "node")]
    );
    let mut ratios = Vec::new();
    for pair in runs.chunks(2) {
        let [baseline, node] = pair else {
            unreachable!()
        };
        assert_eq!(node["errors"], 0, "the node answered every write: {node}");
        assert!(node["ok"].as_u64().unwrap() > 0 && baseline["ok"].as_u64().unwrap() > 0);
        ratios
            .push(node["throughput"].as_f64().unwrap() / baseline["throughput"].as_f64().unwrap());
    }
    ratios.sort_by(f64::total_cmp);
    let ratio = &report["ratio"];
    let close = |field: &str, expected: f64| {
        let reported = ratio[field].as_f64().unwrap();
        assert!(
            (reported - expected).abs() < 1e-12,
            "{field}: {reported} vs {expected}"
        );
    };
    close("min", ratios[0]);
    close("max", ratios[1]);
    close("median", f64::midpoint(ratios[0], ratios[1]));
    // The writes went to the node, not only to the baseline.
    let keys = keys(&node, "registers").await;
    assert!(!keys.is_empty() && keys.len() <= 50, "{keys:?}");
}

#[tokio::test]
async fn bench_refuses_zero_rounds_with_one_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench", "--rounds", "0", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--rounds"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn bench_writes_and_reads_each_type() {
    let node = Node::start("").await;
    let node_url = node.url("");
    let mut acknowledged = std::collections::HashMap::new();
    for (read, write, collection) in [
        ("get", "put", "registers"),
        ("counter-get", "incr", "counters"),
        ("gcounter-get", "gincr", "gcounters"),
        ("smembers", "sadd", "sets"),
    ] {
        for workload in [read, write] {
            let report = bench(&["--workload", workload, "--keys", "20", "--url", &node_url]);
            assert_eq!(report["workload"], workload, "reported by its own name");
            assert_eq!(report["errors"], 0, "{workload}: {report}");
            assert!(report["ok"].as_u64().unwrap() > 0, "{workload}: {report}");
            acknowledged.insert(workload, report["ok"].as_u64().unwrap());
            // The read runs first, on keys only its own preload can have written.
            if workload == read {
                assert_eq!(
                    keys(&node, collection).await.len(),
                    20,
                    "{read} preloads every key as a {collection} entry"
                );
            }
        }
    }
    // Every acknowledged increment landed on the keys the read preloaded (one each).
    let mut total = 0;
    for key in 0..20 {
        let counter = get_json(&node, &format!("/v1/gcounters/k{key}")).await;
        total += counter["value"].as_u64().unwrap();
    }
    assert_eq!(total, 20 + acknowledged["gincr"]);
}

/// `--prefer-minimal` sends set adds with `Prefer: return=minimal`: each is answered with a
/// summary, and every acknowledged add is in its set once.
#[tokio::test]
async fn bench_adds_with_minimal_answers_land_every_element() {
    let node = Node::start("").await;
    let report = bench(&[
        "--workload",
        "sadd",
        "--prefer-minimal",
        "--keys",
        "20",
        "--url",
        &node.url(""),
    ]);
    assert_eq!(report["errors"], 0, "{report}");
    let acknowledged = report["ok"].as_u64().unwrap();
    assert!(acknowledged > 0, "{report}");
    let mut total = 0;
    for key in keys(&node, "sets").await {
        let set = get_json(&node, &format!("/v1/sets/{}", key.as_str().unwrap())).await;
        total += set["size"].as_u64().unwrap();
    }
    assert_eq!(total, acknowledged, "each add brings a new element");
}
