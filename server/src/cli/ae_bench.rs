//! `meridian bench --anti-entropy`: what an anti-entropy round costs, against how many keys two
//! replicas differ in (DESIGN §5: anti-entropy bytes versus difference size).
//!
//! It takes two running nodes: the first in `--url` runs the rounds, with the second as the
//! peer. It writes `--keys` registers through the first and waits until the second holds the
//! same ops, so the Merkle trees are the size the figures are about. A round between the
//! replicas, now identical, is the first row. Then, for each size in `--differ`, it makes the
//! replicas differ in that many keys, half on each node. It has the first node run rounds
//! until one completes, and reports the bytes each way, the time, and what the rounds
//! compared and moved. Last, it checks that the two Merkle roots are then equal.
//!
//! Replication cannot make replicas differ on purpose: every write reaches the peer. So the
//! bench makes differences the way the anti-entropy tests do: `POST
//! /v1/admin/debug/merge-unlogged/sets/{key}` adds an element to a set on one node and logs no
//! op, as a restored backup or a corrupted key would leave it. That route exists only with
//! `[debug] allow_state_overwrite = true`, so this runs against a cluster set up for
//! benchmarks, also with `[anti_entropy] enabled = false` so a scheduled round does not repair
//! the difference first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use meridian_replication::RoundReport;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::ConnectArgs;
use super::client::{encode_segment, problem_error, unanswered};
use super::converge::Watcher;

/// Requests in flight while writing the keys and making the differences.
const IN_FLIGHT: usize = 32;
/// Rounds one measurement may take before it counts as not converging (a round stops at
/// `[anti_entropy] max_keys_per_round` and the next one goes on).
const MAX_ROUNDS: u32 = 1000;

/// What the bench needs to know.
pub(super) struct Plan {
    pub(super) urls: Vec<String>,
    pub(super) keys: usize,
    pub(super) value_size: usize,
    pub(super) differ: Vec<usize>,
    pub(super) timeout: Duration,
    pub(super) json: bool,
}

/// The rounds of one measurement, summed.
#[derive(Debug, Default)]
struct Measured {
    differing: usize,
    rounds: u32,
    elapsed: Duration,
    total: RoundReport,
}

impl Measured {
    fn bytes(&self) -> u64 {
        self.total.bytes_sent + self.total.bytes_received
    }

    fn to_json(&self) -> Value {
        json!({
            "differing_keys": self.differing,
            "rounds": self.rounds,
            "ms": self.elapsed.as_secs_f64() * 1000.0,
            "bytes": self.bytes(),
            "bytes_per_differing_key": per_key(self.bytes(), self.differing),
            "round": self.total,
        })
    }
}

fn per_key(bytes: u64, keys: usize) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)] // figures for people, far below 2^52
    (keys > 0).then(|| bytes as f64 / keys as f64)
}

fn add(total: &mut RoundReport, round: &RoundReport) {
    total.buckets_differing += round.buckets_differing;
    total.keys_compared += round.keys_compared;
    total.keys_fetched += round.keys_fetched;
    total.keys_repaired_here += round.keys_repaired_here;
    total.keys_pushed += round.keys_pushed;
    total.keys_repaired_there += round.keys_repaired_there;
    total.bytes_sent += round.bytes_sent;
    total.bytes_received += round.bytes_received;
    total.complete = round.complete;
}

/// A write the bench sends to one of the two nodes.
struct Request {
    on_first: bool,
    method: Method,
    path: String,
    body: Value,
}

/// One HTTP client for both nodes.
struct Nodes {
    http: reqwest::Client,
    first: String,
    second: String,
}

impl Nodes {
    async fn call(
        &self,
        method: Method,
        url: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self.http.request(method, format!("{url}{path}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| unanswered(url, error))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading the answer of {url}{path}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        if status == StatusCode::FORBIDDEN
            && value.get("type").and_then(Value::as_str)
                == Some("urn:meridian:problem:debug-disabled")
        {
            bail!(
                "{url} does not allow unlogged writes, which --anti-entropy makes its differences \
                 with: start both nodes with [debug] allow_state_overwrite = true and \
                 [anti_entropy] enabled = false (a cluster for benchmarks only)"
            );
        }
        Err(problem_error(status, &value).context(format!("{url}{path}")))
    }

    /// The second node's name, which the first knows it by.
    async fn peer_name(&self) -> Result<String> {
        let cluster = self
            .call(Method::GET, &self.second, "/v1/cluster", None)
            .await?;
        cluster["node"]["name"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{}/v1/cluster names no node", self.second))
    }

    /// Waits until the first node's connection to `peer` is up: rounds run on it, and a node
    /// just started may not have dialled yet.
    async fn connected(&self, peer: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let cluster = self
                .call(Method::GET, &self.first, "/v1/cluster", None)
                .await?;
            let peers = cluster["peers"].as_array().map_or(&[][..], Vec::as_slice);
            let Some(entry) = peers.iter().find(|p| p["name"] == peer) else {
                bail!(
                    "{} has no peer named {peer}: give two nodes of one cluster",
                    self.first
                );
            };
            if entry["connected"] == true {
                return Ok(());
            }
            ensure!(
                started.elapsed() < timeout,
                "{} is not connected to {peer} after {} s",
                self.first,
                timeout.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends each request, `IN_FLIGHT` at a time.
    async fn send_all(self: &Arc<Self>, requests: Vec<Request>) -> Result<()> {
        let requests = Arc::new(requests);
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..IN_FLIGHT {
            let (nodes, requests) = (Arc::clone(self), Arc::clone(&requests));
            tasks.spawn(async move {
                for request in requests.iter().skip(lane).step_by(IN_FLIGHT) {
                    let url = if request.on_first {
                        &nodes.first
                    } else {
                        &nodes.second
                    };
                    nodes
                        .call(
                            request.method.clone(),
                            url,
                            &request.path,
                            Some(request.body.clone()),
                        )
                        .await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.context("a request task failed")??;
        }
        Ok(())
    }

    /// Rounds from the first node with `peer` until one completes.
    async fn sync(&self, peer: &str, differing: usize) -> Result<Measured> {
        let path = format!("/v1/admin/anti-entropy?peer={}", encode_segment(peer));
        let mut measured = Measured {
            differing,
            ..Measured::default()
        };
        // A round folds the first node's recent writes into its tree, not the peer's: the
        // peer's tree trails by up to a checkpoint, and the writes it has not folded yet would
        // count as differences. Reading the peer's tree folds it.
        self.call(Method::GET, &self.second, "/v1/admin/tree", None)
            .await?;
        let started = Instant::now();
        while !measured.total.complete {
            ensure!(
                measured.rounds < MAX_ROUNDS,
                "{MAX_ROUNDS} anti-entropy rounds did not complete"
            );
            let answer = self.call(Method::POST, &self.first, &path, None).await?;
            let round: RoundReport = serde_json::from_value(answer["round"].clone())
                .with_context(|| format!("{}{path} answered no round report", self.first))?;
            add(&mut measured.total, &round);
            measured.rounds += 1;
        }
        measured.elapsed = started.elapsed();
        Ok(measured)
    }
}

/// The registers that give the trees their size.
fn fill(keys: usize, value_size: usize) -> Vec<Request> {
    let body = json!({ "value": "x".repeat(value_size) });
    (0..keys)
        .map(|i| Request {
            on_first: true,
            method: Method::PUT,
            path: format!("/v1/registers/bench-ae-{i}"),
            body: body.clone(),
        })
        .collect()
}

/// `differing` sets of one unlogged element each, the even ones on the first node and the odd
/// ones on the second; `tag` keeps them apart from an earlier measurement's.
fn differences(differing: usize, tag: u32) -> Vec<Request> {
    (0..differing)
        .map(|i| Request {
            on_first: i % 2 == 0,
            method: Method::POST,
            path: format!(
                "/v1/admin/debug/merge-unlogged/sets/{}",
                encode_segment(&format!("bench-ae-{tag:08x}-{i}"))
            ),
            body: json!({ "element": "unlogged" }),
        })
        .collect()
}

pub(super) fn run(plan: &Plan, auth: &ConnectArgs) -> Result<()> {
    ensure!(
        plan.urls.len() == 2,
        "--anti-entropy takes two nodes in --url: the one that runs the rounds, then its peer"
    );
    let urls: Vec<String> = plan
        .urls
        .iter()
        .map(|u| u.trim_end_matches('/').to_owned())
        .collect();
    let watcher = Watcher::new(&urls, auth)?;
    let nodes = Arc::new(Nodes {
        http: auth
            .client_builder()?
            .timeout(plan.timeout)
            .build()
            .context("cannot build the HTTP client")?,
        first: urls[0].clone(),
        second: urls[1].clone(),
    });
    super::client::block_on(async {
        let peer = nodes.peer_name().await?;
        nodes.send_all(fill(plan.keys, plan.value_size)).await?;
        watcher.same_ops(plan.timeout).await?;
        nodes.connected(&peer, plan.timeout).await?;
        // A first pass repairs whatever an earlier run left; the replicas are then identical,
        // and a round between them is the first row.
        let mut measured = vec![nodes.sync(&peer, 0).await?];
        if measured[0].total.keys_repaired_here + measured[0].total.keys_repaired_there > 0 {
            measured[0] = nodes.sync(&peer, 0).await?;
        }
        for &differing in &plan.differ {
            nodes
                .send_all(differences(differing, rand::random()))
                .await?;
            let this = nodes.sync(&peer, differing).await?;
            let (here, there) = (differing / 2, differing - differing / 2);
            ensure!(
                this.total.keys_repaired_here == here as u64
                    && this.total.keys_repaired_there == there as u64,
                "the rounds repaired {} keys on {} and {} on {}, where the bench made {here} and \
                 {there}: something else wrote to the nodes or ran anti-entropy meanwhile \
                 (set [anti_entropy] enabled = false and stop other clients)",
                this.total.keys_repaired_here,
                nodes.first,
                this.total.keys_repaired_there,
                nodes.second,
            );
            let roots = watcher.roots().await?;
            ensure!(
                roots.windows(2).all(|pair| pair[0] == pair[1]),
                "after the rounds the Merkle roots still differ: {}",
                roots.join(" / ")
            );
            measured.push(this);
        }
        let tree = nodes
            .call(Method::GET, &nodes.first, "/v1/admin/tree", None)
            .await?;
        let tree_keys = tree["keys"].as_u64().unwrap_or(0);
        print(&peer, &nodes.first, tree_keys, &measured, plan.json);
        Ok(())
    })
}

fn print(peer: &str, first: &str, tree_keys: u64, measured: &[Measured], json: bool) {
    if json {
        let rows: Vec<Value> = measured.iter().map(Measured::to_json).collect();
        println!(
            "{}",
            json!({ "node": first, "peer": peer, "tree_keys": tree_keys, "measurements": rows })
        );
        return;
    }
    println!("anti-entropy from {first} with {peer}, {tree_keys} keys in the Merkle tree");
    println!(
        "{:>14} {:>6} {:>9} {:>11} {:>11} {:>13} {:>9} {:>9} {:>7} {:>7}",
        "differing keys",
        "rounds",
        "ms",
        "bytes sent",
        "received",
        "bytes per key",
        "buckets",
        "compared",
        "fetched",
        "pushed"
    );
    for row in measured {
        let per_key = per_key(row.bytes(), row.differing)
            .map_or_else(|| "-".to_owned(), |b| format!("{b:.0}"));
        println!(
            "{:>14} {:>6} {:>9.1} {:>11} {:>11} {:>13} {:>9} {:>9} {:>7} {:>7}",
            row.differing,
            row.rounds,
            row.elapsed.as_secs_f64() * 1000.0,
            row.total.bytes_sent,
            row.total.bytes_received,
            per_key,
            row.total.buckets_differing,
            row.total.keys_compared,
            row.total.keys_fetched,
            row.total.keys_pushed
        );
    }
}
