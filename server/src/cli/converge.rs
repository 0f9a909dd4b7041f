//! `meridian bench --converge`: how long the nodes take to agree once a partition heals.
//!
//! It puts no load on the nodes. It polls every node's applied version vector
//! (`/v1/cluster`) until all are equal, which means every node holds the same ops, and then
//! checks that every node's Merkle root (`/v1/admin/tree`) is the same, which means the same
//! states (anti-entropy repairs what ops alone do not). Start it before healing, or right
//! after, with the load stopped: writes that keep coming move the vectors on, and equality
//! would be a matter of luck.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::json;

use super::ConnectArgs;

/// Time between two polls of every node: fine enough for figures in the tens of
/// milliseconds, light enough not to slow the replication it watches.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Time between two reads of the Merkle roots while the ops agree and the roots do not (only
/// anti-entropy can close that gap, on its own schedule): each read makes every node fold.
const ROOT_INTERVAL: Duration = Duration::from_millis(500);

/// The part of `/v1/cluster` this needs.
#[derive(Debug, Deserialize)]
struct ClusterView {
    node: NodeName,
    applied: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct NodeName {
    name: String,
}

#[derive(Debug, Deserialize)]
struct TreeView {
    root: String,
}

/// One poll of one node: its name and applied vector, or why it could not be read.
type Poll = std::result::Result<(String, Vector), String>;

/// An applied vector without its zero entries: a node that never heard of an origin and one
/// that holds none of its ops agree.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Vector(BTreeMap<String, u64>);

impl Vector {
    fn new(applied: BTreeMap<String, u64>) -> Self {
        Self(applied.into_iter().filter(|(_, seq)| *seq > 0).collect())
    }

    /// Each origin's highest sequence over `vectors`.
    fn join<'a>(vectors: impl IntoIterator<Item = &'a Self>) -> Self {
        let mut joined = BTreeMap::new();
        for vector in vectors {
            for (origin, &seq) in &vector.0 {
                let entry = joined.entry(origin.clone()).or_insert(0);
                *entry = seq.max(*entry);
            }
        }
        Self(joined)
    }

    /// The ops `self` lacks of those `all` holds.
    fn behind(&self, all: &Self) -> u64 {
        all.0
            .iter()
            .map(|(origin, &seq)| seq.saturating_sub(self.0.get(origin).copied().unwrap_or(0)))
            .sum()
    }

    fn ops(&self) -> u64 {
        self.0.values().sum()
    }
}

pub(super) struct Watcher {
    http: reqwest::Client,
    urls: Vec<String>,
}

impl Watcher {
    /// Watches `urls` with the credentials of `auth`.
    pub(super) fn new(urls: &[String], auth: &ConnectArgs) -> Result<Self> {
        Ok(Self {
            http: auth
                .client_builder()?
                .timeout(Duration::from_secs(5))
                .build()
                .context("cannot build the HTTP client")?,
            urls: urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
        })
    }

    /// Waits until every node holds the same ops. Unlike [`watch`] it does not wait for equal
    /// Merkle roots.
    pub(super) async fn same_ops(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let round = self.poll_all().await;
            let read: Vec<&Vector> = round
                .iter()
                .filter_map(|p| p.as_ref().ok())
                .map(|(_, v)| v)
                .collect();
            if read.len() == round.len() {
                let all = Vector::join(read.iter().copied());
                if read.iter().all(|vector| **vector == all) {
                    return Ok(());
                }
            }
            if started.elapsed() >= timeout {
                bail!(
                    "the nodes did not reach the same ops within {} s: {}",
                    timeout.as_secs(),
                    describe(&round, &self.urls)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Every node's Merkle root, in the order of --url.
    pub(super) async fn roots(&self) -> Result<Vec<String>> {
        let mut roots = Vec::with_capacity(self.urls.len());
        for url in &self.urls {
            roots.push(self.root(url).await?);
        }
        Ok(roots)
    }

    async fn poll(&self, url: &str) -> Poll {
        let view: ClusterView = self
            .get(url, "/v1/cluster")
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok((view.node.name, Vector::new(view.applied)))
    }

    async fn root(&self, url: &str) -> Result<String> {
        let tree: TreeView = self.get(url, "/v1/admin/tree").await?;
        Ok(tree.root)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str, path: &str) -> Result<T> {
        let response = self
            .http
            .get(format!("{url}{path}"))
            .send()
            .await
            .map_err(|error| super::client::unanswered(url, error))?;
        let status = response.status();
        if !status.is_success() {
            bail!("{url}{path} answered {status}");
        }
        response
            .json()
            .await
            .with_context(|| format!("reading {url}{path}"))
    }

    async fn poll_all(&self) -> Vec<Poll> {
        let mut polls = Vec::with_capacity(self.urls.len());
        for url in &self.urls {
            polls.push(self.poll(url).await);
        }
        polls
    }
}

/// What one watch found.
struct Converged {
    elapsed: Duration,
    polls: u64,
    behind_at_start: Vec<(String, u64)>,
    ops: u64,
    root: String,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What keeps the nodes apart, for the error when they do not converge in time.
fn describe(polls: &[Poll], urls: &[String]) -> String {
    let vectors: Vec<&Vector> = polls
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .map(|(_, v)| v)
        .collect();
    let all = Vector::join(vectors.iter().copied());
    polls
        .iter()
        .zip(urls)
        .map(|(poll, url)| match poll {
            Ok((name, vector)) => format!("{name} {} ops behind", vector.behind(&all)),
            Err(error) => format!("{url} unreadable ({error})"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn watch(watcher: &Watcher, timeout: Duration) -> Result<Converged> {
    let started = Instant::now();
    let mut polls = 0u64;
    let mut behind_at_start = None;
    let mut roots_apart = None;
    let mut next_root_check = started;
    loop {
        let round = watcher.poll_all().await;
        polls += 1;
        let read: Vec<&(String, Vector)> = round.iter().filter_map(|p| p.as_ref().ok()).collect();
        if read.len() == round.len() {
            let all = Vector::join(read.iter().map(|(_, v)| v));
            behind_at_start.get_or_insert_with(|| {
                read.iter()
                    .map(|(name, vector)| (name.clone(), vector.behind(&all)))
                    .collect::<Vec<_>>()
            });
            let same_ops = read.iter().all(|(_, vector)| *vector == all);
            if !same_ops {
                roots_apart = None;
            } else if Instant::now() >= next_root_check {
                next_root_check = Instant::now() + ROOT_INTERVAL;
                let mut roots = watcher.roots().await?;
                if roots.windows(2).all(|pair| pair[0] == pair[1]) {
                    return Ok(Converged {
                        elapsed: started.elapsed(),
                        polls,
                        behind_at_start: behind_at_start.unwrap_or_default(),
                        ops: all.ops(),
                        root: roots.swap_remove(0),
                    });
                }
                roots_apart = Some(roots);
            }
        }
        if started.elapsed() >= timeout {
            let roots = roots_apart
                .map(|roots| format!("; same ops but Merkle roots {}", roots.join(" / ")))
                .unwrap_or_default();
            bail!(
                "the nodes did not converge within {} s: {}{roots}",
                timeout.as_secs(),
                describe(&round, &watcher.urls)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub fn run(urls: &[String], auth: &ConnectArgs, timeout: Duration, json: bool) -> Result<()> {
    if urls.len() < 2 {
        bail!("--converge compares nodes: give at least two in --url");
    }
    let watcher = Watcher::new(urls, auth)?;
    let started_at = SystemTime::now();
    super::client::block_on(async {
        let converged = watch(&watcher, timeout).await?;
        print(&converged, started_at, json);
        Ok(())
    })
}

fn print(converged: &Converged, started_at: SystemTime, json: bool) {
    let converged_at = started_at + converged.elapsed;
    let elapsed_ms = converged.elapsed.as_secs_f64() * 1000.0;
    if json {
        let behind: serde_json::Map<String, serde_json::Value> = converged
            .behind_at_start
            .iter()
            .map(|(name, ops)| (name.clone(), json!(ops)))
            .collect();
        println!(
            "{}",
            json!({
                "converged_ms": elapsed_ms,
                "started_at_unix_ms": unix_ms(started_at),
                "converged_at_unix_ms": unix_ms(converged_at),
                "polls": converged.polls,
                "behind_at_start": behind,
                "ops": converged.ops,
                "root": converged.root,
            })
        );
    } else {
        let behind = converged
            .behind_at_start
            .iter()
            .map(|(name, ops)| format!("{name} {ops}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "converged in {elapsed_ms:.1} ms ({} polls): {} ops on every node, Merkle root {}",
            converged.polls, converged.ops, converged.root
        );
        println!("ops each node lacked at the first poll: {behind}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(entries: &[(&str, u64)]) -> Vector {
        Vector::new(entries.iter().map(|(o, s)| ((*o).to_owned(), *s)).collect())
    }

    #[test]
    fn an_origin_nobody_applied_from_equals_an_absent_one() {
        assert_eq!(vector(&[("1", 5), ("2", 0)]), vector(&[("1", 5)]));
        assert_ne!(vector(&[("1", 5), ("2", 1)]), vector(&[("1", 5)]));
    }

    #[test]
    fn behind_counts_the_ops_missing_from_every_origin() {
        let a = vector(&[("1", 10), ("2", 3)]);
        let b = vector(&[("1", 4), ("3", 7)]);
        let all = Vector::join([&a, &b]);
        assert_eq!(all, vector(&[("1", 10), ("2", 3), ("3", 7)]));
        assert_eq!(a.behind(&all), 7);
        assert_eq!(b.behind(&all), 6 + 3);
        assert_eq!(all.behind(&all), 0);
        assert_eq!(all.ops(), 20);
    }

    #[test]
    fn the_timeout_error_names_each_node_and_what_it_lacks() {
        let polls: Vec<Poll> = vec![
            Ok(("us-east-1".into(), vector(&[("1", 10)]))),
            Ok(("eu-west-1".into(), vector(&[("1", 4)]))),
            Err("cannot reach http://c".into()),
        ];
        let urls = ["http://a".into(), "http://b".into(), "http://c".into()];
        assert_eq!(
            describe(&polls, &urls),
            "us-east-1 0 ops behind, eu-west-1 6 ops behind, http://c unreadable (cannot reach http://c)"
        );
    }
}
