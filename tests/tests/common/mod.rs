//! Shared workload for the replication tests: concurrent writers that record every
//! acknowledged op in a [`Ledger`], and the CRDT model that turns a ledger into the
//! state every node must converge to.
//!
//! An op whose request failed without reaching the node (connection refused) certainly
//! did not happen and is forgotten. Any other failure (a reset mid-request, a timeout,
//! a 5xx) leaves the outcome unknown: such ops are recorded as *ambiguous* and widen the
//! expected state into bounds instead of an exact value. Tests without faults on the
//! HTTP path assert that nothing was ambiguous, so their checks are exact.

// Each test binary uses a different subset of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use meridian_tests::{Client, Cluster, wait_until};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Registers every writer shares (concurrent LWW writes and tombstones).
pub(crate) const REGISTERS: &[&str] = &["reg-0", "reg-1", "reg-2", "reg-3"];
/// PN-counters every writer shares (positive and negative increments).
pub(crate) const COUNTERS: &[&str] = &["ctr-0", "ctr-1"];
/// G-counters every writer shares.
pub(crate) const GCOUNTERS: &[&str] = &["gctr-0", "gctr-1"];
/// OR-sets every writer shares, each writer with its own elements.
pub(crate) const SETS: &[&str] = &["set-0", "set-1"];

/// One acknowledged register write or delete, with the stamp its answer reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegisterWrite {
    /// RFC 3339 with nanoseconds, fixed width: compares as text.
    pub(crate) timestamp: String,
    pub(crate) origin: u64,
    /// `None` for a delete (tombstone).
    pub(crate) value: Option<Value>,
}

/// What one or more writers did, and what they cannot know.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) acked: u64,
    /// Ops that certainly did not happen (the connection was refused).
    pub(crate) refused: u64,
    /// Ops whose outcome is unknown.
    pub(crate) ambiguous: u64,
    pub(crate) registers: BTreeMap<String, Vec<RegisterWrite>>,
    /// Values (or `None` for deletes) of register ops with unknown outcome.
    pub(crate) registers_maybe: BTreeMap<String, Vec<Option<Value>>>,
    pub(crate) counters: BTreeMap<String, i64>,
    /// (sum of ambiguous negative increments, sum of ambiguous positive ones).
    pub(crate) counters_maybe: BTreeMap<String, (i64, i64)>,
    pub(crate) gcounters: BTreeMap<String, u64>,
    pub(crate) gcounters_maybe: BTreeMap<String, u64>,
    /// Elements whose add was acked and never (even ambiguously) removed.
    pub(crate) sets_present: BTreeMap<String, BTreeSet<String>>,
    /// Elements that may or may not be present (an ambiguous add or remove).
    pub(crate) sets_maybe: BTreeMap<String, BTreeSet<String>>,
    /// Elements added and then removed, both acked: certainly absent.
    pub(crate) sets_removed: BTreeMap<String, BTreeSet<String>>,
}

impl Ledger {
    pub(crate) fn merge(&mut self, other: Self) {
        self.acked += other.acked;
        self.refused += other.refused;
        self.ambiguous += other.ambiguous;
        for (k, v) in other.registers {
            self.registers.entry(k).or_default().extend(v);
        }
        for (k, v) in other.registers_maybe {
            self.registers_maybe.entry(k).or_default().extend(v);
        }
        for (k, v) in other.counters {
            *self.counters.entry(k).or_default() += v;
        }
        for (k, (lo, hi)) in other.counters_maybe {
            let e = self.counters_maybe.entry(k).or_default();
            e.0 += lo;
            e.1 += hi;
        }
        for (k, v) in other.gcounters {
            *self.gcounters.entry(k).or_default() += v;
        }
        for (k, v) in other.gcounters_maybe {
            *self.gcounters_maybe.entry(k).or_default() += v;
        }
        for (k, v) in other.sets_present {
            self.sets_present.entry(k).or_default().extend(v);
        }
        for (k, v) in other.sets_maybe {
            self.sets_maybe.entry(k).or_default().extend(v);
        }
        for (k, v) in other.sets_removed {
            self.sets_removed.entry(k).or_default().extend(v);
        }
    }

    /// Acked ops per type, for messages.
    pub(crate) fn summary(&self) -> String {
        let registers: usize = self.registers.values().map(Vec::len).sum();
        let elements: usize = self.sets_present.values().map(BTreeSet::len).sum();
        let removed: usize = self.sets_removed.values().map(BTreeSet::len).sum();
        format!(
            "{} acked, {} refused, {} ambiguous; {registers} register writes, counters {:?}, \
             gcounters {:?}, {elements} set elements present, {removed} removed",
            self.acked, self.refused, self.ambiguous, self.counters, self.gcounters
        )
    }
}

/// How a failed request ended.
enum Failure {
    /// Never reached the node: certainly not applied.
    Refused,
    /// Unknown outcome.
    Ambiguous,
}

fn classify(error: &anyhow::Error) -> Failure {
    let connect = error
        .chain()
        .filter_map(|e| e.downcast_ref::<reqwest::Error>())
        .any(reqwest::Error::is_connect);
    if connect {
        Failure::Refused
    } else {
        Failure::Ambiguous
    }
}

/// One write the writer loop issues.
enum Op {
    Put(&'static str, Value),
    DeleteRegister(&'static str),
    Incr(&'static str, i64),
    GIncr(&'static str, u64),
    Add(&'static str, String),
    Remove(&'static str, String),
}

/// A sequential writer against one node until `stop` is set.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) name: String,
    pub(crate) client: Client,
    /// Pause between requests (keeps the load modest).
    pub(crate) pause: Duration,
}

impl Writer {
    pub(crate) fn new(name: &str, client: Client) -> Self {
        Self {
            name: name.to_owned(),
            client,
            pause: Duration::ZERO,
        }
    }

    #[must_use]
    pub(crate) fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// The `i`-th op of this writer: every type, deletes included.
    fn op(&self, i: u64, acked_elements: &mut Vec<(&'static str, String)>) -> Op {
        let pick =
            |keys: &'static [&'static str], salt: u64| keys[((i / 7 + salt) as usize) % keys.len()];
        match i % 7 {
            0 | 5 => {
                // Every fourth register op is a tombstone.
                let key = pick(REGISTERS, i);
                if i % 4 == 3 {
                    Op::DeleteRegister(key)
                } else {
                    Op::Put(key, json!({ "writer": self.name, "i": i }))
                }
            }
            1 => Op::Incr(pick(COUNTERS, 0), (i % 11) as i64 - 3),
            2 => Op::GIncr(pick(GCOUNTERS, 1), i % 5 + 1),
            3 => Op::Add(pick(SETS, 0), format!("{}-{i}", self.name)),
            4 => {
                // Remove one of this writer's own acked adds (oldest first), so the
                // expected set is exactly added − removed.
                if i % 2 == 0 && !acked_elements.is_empty() {
                    let (key, element) = acked_elements.remove(0);
                    Op::Remove(key, element)
                } else {
                    Op::Add(pick(SETS, 1), format!("{}-{i}", self.name))
                }
            }
            _ => Op::Incr(pick(COUNTERS, 1), -((i % 3) as i64) + 2),
        }
    }

    /// Runs until `stop`; returns what happened.
    pub(crate) async fn run(self, stop: Arc<AtomicBool>) -> Ledger {
        let mut ledger = Ledger::default();
        let mut acked_elements: Vec<(&'static str, String)> = Vec::new();
        let mut i = 0_u64;
        while !stop.load(Ordering::Relaxed) {
            let op = self.op(i, &mut acked_elements);
            i += 1;
            let result = match &op {
                Op::Put(key, value) => self.client.put_register(key, value).await,
                Op::DeleteRegister(key) => self.client.delete_register(key).await,
                Op::Incr(key, by) => self.client.incr(key, *by).await,
                Op::GIncr(key, by) => self.client.gincr(key, *by).await,
                Op::Add(key, element) => self.client.set_add(key, &[json!(element)]).await,
                Op::Remove(key, element) => self.client.set_remove(key, &[json!(element)]).await,
            };
            match result {
                Ok(answer) => {
                    ledger.acked += 1;
                    record_acked(&mut ledger, op, &answer, &mut acked_elements);
                }
                Err(error) => {
                    match classify(&error) {
                        Failure::Refused => {
                            ledger.refused += 1;
                            // An element whose remove certainly failed is still present.
                            if let Op::Remove(key, element) = op {
                                acked_elements.insert(0, (key, element));
                            }
                        }
                        Failure::Ambiguous => {
                            ledger.ambiguous += 1;
                            record_ambiguous(&mut ledger, op);
                        }
                    }
                    // The node is down or busy: don't spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if !self.pause.is_zero() {
                tokio::time::sleep(self.pause).await;
            }
        }
        // Elements this writer still holds are present.
        ledger
    }
}

fn record_acked(
    ledger: &mut Ledger,
    op: Op,
    answer: &Value,
    acked_elements: &mut Vec<(&'static str, String)>,
) {
    match op {
        Op::Put(key, value) => push_register(ledger, key, answer, Some(value)),
        Op::DeleteRegister(key) => push_register(ledger, key, answer, None),
        Op::Incr(key, by) => *ledger.counters.entry(key.to_owned()).or_default() += by,
        Op::GIncr(key, by) => *ledger.gcounters.entry(key.to_owned()).or_default() += by,
        Op::Add(key, element) => {
            ledger
                .sets_present
                .entry(key.to_owned())
                .or_default()
                .insert(element.clone());
            acked_elements.push((key, element));
        }
        Op::Remove(key, element) => {
            if let Some(present) = ledger.sets_present.get_mut(key) {
                present.remove(&element);
            }
            ledger
                .sets_removed
                .entry(key.to_owned())
                .or_default()
                .insert(element);
        }
    }
}

fn push_register(ledger: &mut Ledger, key: &str, answer: &Value, value: Option<Value>) {
    // `meta` is this write's own stamp; the top-level fields are the winner's.
    let meta = &answer["meta"];
    let write = RegisterWrite {
        timestamp: meta["timestamp"].as_str().unwrap_or_default().to_owned(),
        origin: meta["origin"].as_u64().unwrap_or_default(),
        value,
    };
    assert!(
        !write.timestamp.is_empty() && write.origin > 0,
        "register write answer without meta: {answer}"
    );
    ledger
        .registers
        .entry(key.to_owned())
        .or_default()
        .push(write);
}

fn record_ambiguous(ledger: &mut Ledger, op: Op) {
    match op {
        Op::Put(key, value) => ledger
            .registers_maybe
            .entry(key.to_owned())
            .or_default()
            .push(Some(value)),
        Op::DeleteRegister(key) => ledger
            .registers_maybe
            .entry(key.to_owned())
            .or_default()
            .push(None),
        Op::Incr(key, by) => {
            let e = ledger.counters_maybe.entry(key.to_owned()).or_default();
            if by < 0 {
                e.0 += by;
            } else {
                e.1 += by;
            }
        }
        Op::GIncr(key, by) => *ledger.gcounters_maybe.entry(key.to_owned()).or_default() += by,
        Op::Add(key, element) => {
            ledger
                .sets_maybe
                .entry(key.to_owned())
                .or_default()
                .insert(element);
        }
        Op::Remove(key, element) => {
            // It was acked-added; now it may or may not be gone.
            if let Some(present) = ledger.sets_present.get_mut(key) {
                present.remove(&element);
            }
            ledger
                .sets_maybe
                .entry(key.to_owned())
                .or_default()
                .insert(element);
        }
    }
}

/// Writers running in the background.
#[derive(Debug)]
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Ledger>>,
}

impl Load {
    /// Starts `writers`.
    pub(crate) fn start(writers: Vec<Writer>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = writers
            .into_iter()
            .map(|w| tokio::spawn(w.run(stop.clone())))
            .collect();
        Self { stop, tasks }
    }

    /// `per_node` writers on every node of the cluster.
    pub(crate) fn on_all_nodes(cluster: &Cluster, per_node: usize, pause: Duration) -> Self {
        let writers = cluster
            .nodes()
            .iter()
            .flat_map(|node| {
                (0..per_node).map(move |k| {
                    Writer::new(&format!("n{}w{k}", node.index()), node.client()).pause(pause)
                })
            })
            .collect();
        Self::start(writers)
    }

    /// Stops the writers and merges their ledgers.
    pub(crate) async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        let mut ledger = Ledger::default();
        for task in self.tasks {
            ledger.merge(task.await.expect("a writer task panicked"));
        }
        ledger
    }
}

/// A register as read back: value and the winning write's stamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegisterState {
    pub(crate) value: Value,
    pub(crate) timestamp: String,
    pub(crate) origin: u64,
}

/// The state of every workload key on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) registers: BTreeMap<String, Option<RegisterState>>,
    pub(crate) counters: BTreeMap<String, i64>,
    pub(crate) gcounters: BTreeMap<String, u64>,
    pub(crate) sets: BTreeMap<String, BTreeSet<String>>,
}

/// Reads every workload key from one node.
pub(crate) async fn snapshot(client: Client) -> Result<Snapshot> {
    let mut s = Snapshot {
        registers: BTreeMap::new(),
        counters: BTreeMap::new(),
        gcounters: BTreeMap::new(),
        sets: BTreeMap::new(),
    };
    for key in REGISTERS {
        let state = client.get_register(key).await?.map(|body| RegisterState {
            value: body["value"].clone(),
            timestamp: body["timestamp"].as_str().unwrap_or_default().to_owned(),
            origin: body["origin"].as_u64().unwrap_or_default(),
        });
        s.registers.insert((*key).to_owned(), state);
    }
    for key in COUNTERS {
        s.counters
            .insert((*key).to_owned(), client.counter(key).await?);
    }
    for key in GCOUNTERS {
        s.gcounters
            .insert((*key).to_owned(), client.gcounter(key).await?);
    }
    for key in SETS {
        let elements = client
            .set_elements(key)
            .await?
            .into_iter()
            .map(|e| match e {
                Value::String(s) => Ok(s),
                other => bail!("set {key}: unexpected element {other}"),
            })
            .collect::<Result<BTreeSet<String>>>()?;
        s.sets.insert((*key).to_owned(), elements);
    }
    Ok(s)
}

/// Checks a converged snapshot against the CRDT semantics of the ledger's acked ops
/// (exact when nothing was ambiguous; bounds otherwise). Returns every violation.
pub(crate) fn check(snapshot: &Snapshot, ledger: &Ledger) -> Result<()> {
    let mut errors = String::new();
    for key in COUNTERS {
        let got = snapshot.counters[*key];
        let acked = ledger.counters.get(*key).copied().unwrap_or(0);
        let (lo, hi) = ledger.counters_maybe.get(*key).copied().unwrap_or((0, 0));
        if got < acked + lo || got > acked + hi {
            let _ = writeln!(
                errors,
                "counter {key}: {got}, acked sum {acked} (ambiguous range {lo}..={hi})"
            );
        }
    }
    for key in GCOUNTERS {
        let got = snapshot.gcounters[*key];
        let acked = ledger.gcounters.get(*key).copied().unwrap_or(0);
        let maybe = ledger.gcounters_maybe.get(*key).copied().unwrap_or(0);
        if got < acked || got > acked + maybe {
            let _ = writeln!(
                errors,
                "gcounter {key}: {got}, acked sum {acked} (+ up to {maybe} ambiguous)"
            );
        }
    }
    let empty = BTreeSet::new();
    for key in SETS {
        let got = &snapshot.sets[*key];
        let present = ledger.sets_present.get(*key).unwrap_or(&empty);
        let maybe = ledger.sets_maybe.get(*key).unwrap_or(&empty);
        let removed = ledger.sets_removed.get(*key).unwrap_or(&empty);
        let missing: Vec<&String> = present.difference(got).collect();
        let unexpected: Vec<&String> = got
            .iter()
            .filter(|e| !present.contains(*e) && !maybe.contains(*e))
            .collect();
        let resurrected: Vec<&String> = got
            .iter()
            .filter(|e| removed.contains(*e) && !maybe.contains(*e))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() || !resurrected.is_empty() {
            let _ = writeln!(
                errors,
                "set {key}: missing acked adds {missing:?}, elements never acked {unexpected:?}, \
                 removed elements present {resurrected:?}"
            );
        }
    }
    for key in REGISTERS {
        if let Err(e) = check_register(key, snapshot.registers[*key].as_ref(), ledger) {
            let _ = writeln!(errors, "{e:#}");
        }
    }
    ensure!(
        errors.is_empty(),
        "state differs from the CRDT model ({}):\n{errors}",
        ledger.summary()
    );
    Ok(())
}

/// LWW: the winner is the acked write with the greatest (timestamp, origin), unless an
/// ambiguous write won. Timestamps are printed to the nanosecond while HLC stamps are
/// finer, so writes whose printed times tie are all accepted.
fn check_register(key: &str, got: Option<&RegisterState>, ledger: &Ledger) -> Result<()> {
    let writes = ledger.registers.get(key).map_or(&[][..], Vec::as_slice);
    let maybe = ledger
        .registers_maybe
        .get(key)
        .map_or(&[][..], Vec::as_slice);
    let Some(max) = writes
        .iter()
        .max_by(|a, b| (a.timestamp.as_str(), a.origin).cmp(&(b.timestamp.as_str(), b.origin)))
    else {
        // Nothing acked: absent, or one of the ambiguous writes.
        let ok = match got {
            None => true,
            Some(g) => maybe.iter().any(|m| m.as_ref() == Some(&g.value)),
        };
        ensure!(ok, "register {key}: {got:?} but no write was acked");
        return Ok(());
    };
    let tied: Vec<&RegisterWrite> = writes
        .iter()
        .filter(|w| w.timestamp == max.timestamp)
        .collect();
    let acked_winner = match got {
        None => tied.iter().any(|w| w.value.is_none()),
        Some(g) => tied.iter().any(|w| {
            w.value.as_ref() == Some(&g.value) && w.timestamp == g.timestamp && w.origin == g.origin
        }),
    };
    let ambiguous_winner = match got {
        None => maybe.iter().any(Option::is_none),
        // An ambiguous write would have a stamp no older than the acked maximum.
        Some(g) => {
            g.timestamp >= max.timestamp && maybe.iter().any(|m| m.as_ref() == Some(&g.value))
        }
    };
    ensure!(
        acked_winner || ambiguous_winner,
        "register {key}: read {got:?}, but the LWW winner of the {} acked writes is {max:?}",
        writes.len()
    );
    Ok(())
}

/// Waits until every running node returns the same snapshot, then checks it.
pub(crate) async fn converge_and_check(
    cluster: &Cluster,
    timeout: Duration,
    ledger: &Ledger,
) -> Result<Snapshot> {
    let snapshot = cluster
        .wait_converged(timeout, snapshot)
        .await
        .context("waiting for every node to read the same state")?;
    check(&snapshot, ledger)?;
    Ok(snapshot)
}

/// One peer entry of `/v1/cluster` on `client`, by peer node id.
pub(crate) async fn peer_view(client: &Client, peer_id: u64) -> Result<Value> {
    let info = client.cluster_info().await?;
    info["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["id"].as_u64() == Some(peer_id)))
        .cloned()
        .with_context(|| format!("no peer {peer_id} in /v1/cluster: {info}"))
}

/// Waits until no running node reports replication lag towards any peer it can reach.
pub(crate) async fn wait_no_lag(cluster: &Cluster, timeout: Duration) -> Result<()> {
    for node in cluster.nodes().iter().filter(|n| n.is_running()) {
        let client = node.client();
        let running: BTreeSet<u64> = cluster
            .nodes()
            .iter()
            .filter(|n| n.is_running())
            .map(meridian_tests::Node::id)
            .collect();
        wait_until(
            timeout,
            &format!("no replication lag at {}", node.name()),
            || {
                let client = client.clone();
                let running = running.clone();
                async move {
                    let info = client.cluster_info().await?;
                    let peers = info["peers"].as_array().context("no peers array")?;
                    Ok(peers
                        .iter()
                        .filter(|p| p["id"].as_u64().is_some_and(|id| running.contains(&id)))
                        .all(|p| {
                            p["lag_ops"].as_u64() == Some(0) && p["lag_ms"].as_u64() == Some(0)
                        }))
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// A Prometheus sample `name{labels} value` from `/metrics` text, by name and labels.
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric_name != name {
                return None;
            }
            let rest = rest.strip_suffix('}')?;
            let matches = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            if matches { value.parse().ok() } else { None }
        })
}
