//! `meridian bench` against a real node and a real `meridian bench-baseline`: the comparison
//! the README's single-node table is made with, and a write and a read of each type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};

use common::{Node, free_port};
use meridian_server::storage::BareJournal;

/// A server process (the bare baseline, Redis, etcd), killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `meridian bench-baseline` process and its URL.
async fn baseline() -> (Process, String) {
    baseline_with(&[]).await
}

/// A `meridian bench-baseline` process given `extra` arguments, and its URL.
async fn baseline_with(extra: &[&str]) -> (Process, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench-baseline", "--listen", &addr])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let baseline = Process(child);
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

/// Each run of a report as (round, server measured), in the order they ran.
fn run_order(runs: &[serde_json::Value]) -> Vec<(u64, &str)> {
    runs.iter()
        .map(|r| (r["round"].as_u64().unwrap(), r["server"].as_str().unwrap()))
        .collect()
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
    let order = run_order(runs);
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

/// The durable ceiling runs between the bare baseline and the node in every round, answers
/// every write only once its body is in the journal, and the report's ratios are its runs'
/// own.
#[tokio::test]
async fn bench_measures_the_durable_ceiling_between_the_baseline_and_the_node() {
    let node = Node::start("").await;
    let (_baseline, baseline_url) = baseline().await;
    let journal = tempfile::tempdir().unwrap();
    let journal_dir = journal.path().to_str().unwrap();
    let (durable_baseline, durable_url) = baseline_with(&["--durable", journal_dir]).await;
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
        "--durable-baseline-url",
        &durable_url,
    ]);
    let runs = report["runs"].as_array().unwrap();
    let order = run_order(runs);
    assert_eq!(
        order,
        [
            (1, "baseline"),
            (1, "durable"),
            (1, "node"),
            (2, "baseline"),
            (2, "durable"),
            (2, "node")
        ]
    );
    let throughput = |run: &serde_json::Value| run["throughput"].as_f64().unwrap();
    let (mut over_durable, mut ceiling) = (Vec::new(), Vec::new());
    let mut acknowledged = 0;
    for round in runs.chunks(3) {
        let [baseline, durable, node] = round else {
            unreachable!()
        };
        assert_eq!(
            durable["errors"], 0,
            "the durable baseline answered every write"
        );
        acknowledged += durable["ok"].as_u64().unwrap();
        over_durable.push(throughput(node) / throughput(durable));
        ceiling.push(throughput(durable) / throughput(baseline));
    }
    for (field, ratios) in [
        ("durable_ratio", over_durable),
        ("durable_ceiling", ceiling),
    ] {
        let reported = report[field]["median"].as_f64().unwrap();
        let expected = f64::midpoint(ratios[0], ratios[1]);
        assert!(
            (reported - expected).abs() < 1e-12,
            "{field}: {reported} vs {expected}"
        );
    }
    // Every acknowledged write is in the journal: the bench's 100-byte register value, as sent.
    drop(durable_baseline);
    let payloads = BareJournal::payloads(journal.path()).unwrap();
    assert!(
        payloads.len() as u64 >= acknowledged && acknowledged > 0,
        "{} bodies in the journal, {acknowledged} writes acknowledged",
        payloads.len()
    );
    let sent = format!("\"{}\"", "x".repeat(98));
    assert!(payloads.iter().all(|p| p == sent.as_bytes()));
}

#[tokio::test]
async fn bench_refuses_zero_rounds_with_one_line() {
    fails_in_one_line(
        &["--rounds", "0", "--url", "http://127.0.0.1:9"],
        "--rounds",
    );
}

/// `--converge` compares nodes: one URL is refused, and a node that cannot be read makes it
/// give up at its timeout with one line naming that node.
#[tokio::test]
async fn converge_refuses_one_node_and_names_the_node_it_cannot_read() {
    let node = Node::start("").await;
    fails_in_one_line(&["--converge", "--url", &node.url("")], "at least two");
    let away = format!("http://127.0.0.1:{}", free_port());
    fails_in_one_line(
        &[
            "--converge",
            "--url",
            &format!("{},{away}", node.url("")),
            "--converge-timeout",
            "1",
        ],
        &format!("did not converge within 1 s: test-1 0 ops behind, {away} unreadable"),
    );
}

/// `--anti-entropy` takes exactly two nodes of one cluster: each mistake is one line.
#[tokio::test]
async fn anti_entropy_refuses_other_than_two_nodes_of_one_cluster() {
    let node = Node::start("").await;
    let url = node.url("");
    for (urls, says) in [
        (url.clone(), "takes two nodes"),
        (format!("{url},{url},{url}"), "takes two nodes"),
        (format!("{url},{url}"), "has no peer named test-1"),
    ] {
        fails_in_one_line(&["--anti-entropy", "--keys", "3", "--url", &urls], says);
    }
}

/// `meridian bench ARGS` exits 1 with one line on stderr that says `says`.
fn fails_in_one_line(args: &[&str], says: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(says), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A preload write the node refuses ends the run with one line that says what the node
/// answered: here a value over the node's 64 KiB limit.
#[tokio::test]
async fn bench_says_what_the_node_answered_when_a_preload_write_is_refused() {
    let node = Node::start("").await;
    let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench", "--workload", "get", "--keys", "2", "-d", "1"])
        .args(["--value-size", "100000", "--url", &node.url("")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("preloading keys") && stderr.contains("413"),
        "{stderr}"
    );
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

/// A real `redis-server` that fsyncs every write before answering it (`appendfsync always`).
/// The process goes first, so it is killed before its directory is removed.
struct Redis {
    _process: Process,
    url: String,
    _dir: tempfile::TempDir,
}

/// Whether `program` is installed. Where it is not, the test that needs it is skipped, except
/// under `MERIDIAN_REQUIRE_PEERS` (CI installs both peers and sets it), where that fails.
fn installed(program: &str, package: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("MERIDIAN_REQUIRE_PEERS").is_none(),
            "MERIDIAN_REQUIRE_PEERS is set but {program} is not installed"
        );
        eprintln!("skipped: {program} is not installed (apt-get install {package})");
    }
    found
}

/// Starts a durable `redis-server`, or `None` where none is installed.
async fn durable_redis() -> Option<(Redis, redis::aio::MultiplexedConnection)> {
    if !installed("redis-server", "redis-server") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let redis = Redis {
        _process: Process(child),
        url: format!("redis://127.0.0.1:{port}"),
        _dir: dir,
    };
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    // Up to 20 s: a loaded CI machine starts processes slowly.
    for _ in 0..400 {
        if let Ok(connection) = client.get_multiplexed_async_connection().await {
            return Some((redis, connection));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("redis-server did not come up on port {port}");
}

/// `--peer-url` loads a real Redis with the same workload, each round before the node; the
/// report says how Redis persists, and the ratio is the node's throughput over Redis's.
#[tokio::test]
async fn bench_compares_a_node_with_a_durable_redis_round_by_round() {
    let Some((redis, mut connection)) = durable_redis().await else {
        return;
    };
    let node = Node::start("").await;
    let node_url = node.url("");
    // A read workload: a GET that finds nothing is an error, so no error means both preloads
    // wrote every key.
    let report = bench(&[
        "--workload",
        "get",
        "--keys",
        "30",
        "--rounds",
        "2",
        "--url",
        &node_url,
        "--peer-url",
        &redis.url,
    ]);
    let runs = report["runs"].as_array().unwrap();
    let order = run_order(runs);
    assert_eq!(order, [(1, "peer"), (1, "node"), (2, "peer"), (2, "node")]);
    let mut ratios = Vec::new();
    for pair in runs.chunks(2) {
        let [peer, node] = pair else { unreachable!() };
        for run in pair {
            assert_eq!(run["errors"], 0, "every GET found its key: {run}");
            assert!(run["ok"].as_u64().unwrap() > 0, "{run}");
        }
        ratios.push(node["throughput"].as_f64().unwrap() / peer["throughput"].as_f64().unwrap());
    }
    ratios.sort_by(f64::total_cmp);
    let reported = report["peer_ratio"]["median"].as_f64().unwrap();
    let expected = f64::midpoint(ratios[0], ratios[1]);
    assert!(
        (reported - expected).abs() < 1e-12,
        "{reported} vs {expected}"
    );
    assert_eq!(
        report["peer"],
        serde_json::json!({
            "url": redis.url, "store": "redis", "appendonly": "yes", "appendfsync": "always"
        })
    );
    let stored: u64 = redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(stored, 30, "the preload wrote each key once");

    // A write workload: every increment Redis acknowledged is in its counters.
    let report = bench(&[
        "--workload",
        "incr",
        "--keys",
        "10",
        "--url",
        &node_url,
        "--peer-url",
        &redis.url,
    ]);
    let peer = &report["runs"][0];
    assert_eq!(
        (&peer["server"], &peer["errors"]),
        (&"peer".into(), &0.into())
    );
    let mut total = 0;
    for key in 0..10 {
        let value: Option<u64> = redis::cmd("GET")
            .arg(format!("c{key}"))
            .query_async(&mut connection)
            .await
            .unwrap();
        total += value.unwrap_or(0);
    }
    assert_eq!(total, peer["ok"].as_u64().unwrap());
}

/// A real single-member `etcd`, killed before its directory is removed.
struct Etcd {
    _process: Process,
    client_url: String,
    _dir: tempfile::TempDir,
}

async fn etcd() -> Option<Etcd> {
    if !installed("etcd", "etcd-server") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let etcd = Etcd {
        _process: Process(child),
        client_url,
        _dir: dir,
    };
    // Up to 20 s: etcd elects itself leader first, and a loaded CI machine is slow.
    for _ in 0..400 {
        if let Ok(answer) = reqwest::get(format!("{}/version", etcd.client_url)).await {
            if answer.status().is_success() {
                return Some(etcd);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("etcd did not come up on {}", etcd.client_url);
}

/// `--peer-url etcd://…` loads a real etcd through its JSON gateway: reads find the keys its
/// preload put, the report names etcd's version, and workloads etcd has no counterpart for are
/// refused in one line.
#[tokio::test]
async fn bench_compares_a_node_with_etcd() {
    let Some(etcd) = etcd().await else {
        return;
    };
    let node = Node::start("").await;
    let node_url = node.url("");
    let peer_url = etcd.client_url.replace("http://", "etcd://");
    let report = bench(&[
        "--workload",
        "get",
        "--keys",
        "20",
        "--url",
        &node_url,
        "--peer-url",
        &peer_url,
    ]);
    let runs = report["runs"].as_array().unwrap();
    let servers: Vec<&str> = runs.iter().map(|r| r["server"].as_str().unwrap()).collect();
    assert_eq!(servers, ["peer", "node"]);
    for run in runs {
        assert_eq!(run["errors"], 0, "every read found its key: {run}");
        assert!(run["ok"].as_u64().unwrap() > 0, "{run}");
    }
    assert_eq!(report["peer"]["store"], "etcd");
    assert!(report["peer"]["version"].as_str().unwrap().starts_with('3'));
    // The preload put each of the 20 keys once: k0..k19, all between "k" and "l".
    let counted: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v3/kv/range", etcd.client_url))
        .body(r#"{"key":"aw==","range_end":"bA==","count_only":true}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counted["count"], "20", "{counted}");

    let refused = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench", "--workload", "incr", "--url", &node_url])
        .args(["--peer-url", &peer_url])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("put, get or mixed"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
