//! Replication between REAL `meridian` processes: concurrent writers on every region
//! converge to the CRDT semantics of the acknowledged ops; `kill -9` loses nothing
//! acknowledged and replication resumes from the persisted cursors; the ops of a node
//! that dies for good reach every survivor through the survivor that has them; and
//! `/v1/cluster` and `/metrics` expose the per-peer replication state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Load, converge_and_check, metric, peer_view, wait_no_lag};
use meridian_tests::{Client, Cluster, ClusterSpec, wait_until};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const REGIONS: &[&str] = &["us-east", "eu-west", "ap-south"];
/// Generous: convergence is asserted, never its speed.
const CONVERGE: Duration = Duration::from_secs(60);

/// A node's applied version vector (`/v1/cluster` → `applied`), origin id → sequence.
async fn applied(client: Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let info = client.cluster_info().await?;
    Ok(serde_json::from_value(info["applied"].clone())?)
}

/// Every node applies every key type once, then one node deletes each key (counter
/// and g-counter observed-resets, a set clear, register tombstones) once all nodes have
/// seen everything: the observed deletes remove it all, everywhere, so the concurrent
/// load that follows starts from a known zero state.
async fn write_then_delete_everything(cluster: &Cluster) {
    for node in cluster.nodes() {
        let c = node.client();
        let n = node.index();
        for key in common::COUNTERS {
            c.incr(key, 100 + n as i64).await.unwrap();
        }
        for key in common::GCOUNTERS {
            c.gincr(key, 50).await.unwrap();
        }
        for key in common::SETS {
            c.set_add(key, &[json!(format!("pre-{n}"))]).await.unwrap();
        }
        for key in common::REGISTERS {
            c.put_register(key, &json!({ "pre": n })).await.unwrap();
        }
    }
    let before = cluster
        .wait_converged(CONVERGE, common::snapshot)
        .await
        .unwrap();
    assert_eq!(before.counters["ctr-0"], 303, "{before:?}");
    assert_eq!(before.gcounters["gctr-1"], 150, "{before:?}");
    assert_eq!(before.sets["set-0"].len(), 3, "{before:?}");

    let deleter = cluster.node(1).client();
    for key in common::COUNTERS {
        assert_eq!(deleter.delete_counter(key).await.unwrap()["value"], 0);
    }
    for key in common::GCOUNTERS {
        assert_eq!(deleter.delete_gcounter(key).await.unwrap()["value"], 0);
    }
    for key in common::SETS {
        deleter.delete_set(key).await.unwrap();
    }
    for key in common::REGISTERS {
        deleter.delete_register(key).await.unwrap();
    }
    let after = cluster
        .wait_converged(CONVERGE, common::snapshot)
        .await
        .unwrap();
    assert!(after.counters.values().all(|v| *v == 0), "{after:?}");
    assert!(after.gcounters.values().all(|v| *v == 0), "{after:?}");
    assert!(
        after
            .sets
            .values()
            .all(std::collections::BTreeSet::is_empty),
        "{after:?}"
    );
    assert!(after.registers.values().all(Option::is_none), "{after:?}");
}

/// Keys incremented on every node while one node keeps resetting them (observed-reset).
const RESET_KEYS: [&str; 2] = ["ctr-reset", "gctr-reset"];

/// One acked increment of a reset key.
#[derive(Debug)]
struct Increment {
    key: &'static str,
    node: usize,
    by: u64,
    started: Instant,
    finished: Instant,
}

/// Increments of [`RESET_KEYS`] from every node, concurrent with repeated resets of
/// them at one node. The final value cannot be computed exactly, but it is bounded:
/// at least the increments sent after the last reset was answered (the reset cannot
/// have observed ops that did not exist yet), at most everything except the increments
/// the resetting node itself had answered before the last reset began (it had seen them).
#[derive(Debug)]
struct ResetLoad {
    reset_node: usize,
    stop: Arc<AtomicBool>,
    stop_resets: Arc<AtomicBool>,
    incrementers: Vec<JoinHandle<Vec<Increment>>>,
    resetter: JoinHandle<Vec<(&'static str, Instant, Instant)>>,
}

impl ResetLoad {
    fn start(cluster: &Cluster, reset_node: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let incrementers = cluster
            .nodes()
            .iter()
            .map(|node| {
                let (client, index, stop) = (node.client(), node.index(), stop.clone());
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    let mut i = 0_u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let key = RESET_KEYS[(i % 2) as usize];
                        let by = i % 5 + 1;
                        let started = Instant::now();
                        if key.starts_with('g') {
                            client.gincr(key, by).await.unwrap();
                        } else {
                            client.incr(key, by as i64).await.unwrap();
                        }
                        let finished = Instant::now();
                        done.push(Increment {
                            key,
                            node: index,
                            by,
                            started,
                            finished,
                        });
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    done
                })
            })
            .collect();
        let stop_resets = Arc::new(AtomicBool::new(false));
        let (client, stop2) = (cluster.node(reset_node).client(), stop_resets.clone());
        let resetter = tokio::spawn(async move {
            let mut done = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                for key in RESET_KEYS {
                    let started = Instant::now();
                    if key.starts_with('g') {
                        client.delete_gcounter(key).await.unwrap();
                    } else {
                        client.delete_counter(key).await.unwrap();
                    }
                    done.push((key, started, Instant::now()));
                }
            }
            done
        });
        Self {
            reset_node,
            stop,
            stop_resets,
            incrementers,
            resetter,
        }
    }

    /// Stops the resets first and lets increments run a little longer, so that some
    /// certainly follow the last reset (a non-trivial lower bound).
    async fn stop(self) -> ResetOutcome {
        self.stop_resets.store(true, Ordering::Relaxed);
        let resets = self.resetter.await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stop.store(true, Ordering::Relaxed);
        let mut increments = Vec::new();
        for task in self.incrementers {
            increments.extend(task.await.unwrap());
        }
        ResetOutcome {
            reset_node: self.reset_node,
            increments,
            resets,
        }
    }
}

#[derive(Debug)]
struct ResetOutcome {
    reset_node: usize,
    increments: Vec<Increment>,
    resets: Vec<(&'static str, Instant, Instant)>,
}

impl ResetOutcome {
    /// Every node reads the same value for each reset key, within the bounds.
    async fn check(&self, cluster: &Cluster) {
        for key in RESET_KEYS {
            let (_, reset_started, reset_finished) = *self
                .resets
                .iter()
                .rfind(|r| r.0 == key)
                .expect("the resetter reset every key");
            let of_key = || self.increments.iter().filter(|i| i.key == key);
            let lower: u64 = of_key()
                .filter(|i| i.started > reset_finished)
                .map(|i| i.by)
                .sum();
            let seen: u64 = of_key()
                .filter(|i| i.node == self.reset_node && i.finished < reset_started)
                .map(|i| i.by)
                .sum();
            let upper = of_key().map(|i| i.by).sum::<u64>() - seen;
            let value = cluster
                .wait_converged(CONVERGE, |c| async move {
                    if key.starts_with('g') {
                        c.gcounter(key).await
                    } else {
                        Ok(c.counter(key).await?.try_into()?)
                    }
                })
                .await
                .unwrap();
            assert!(
                (lower..=upper).contains(&value),
                "{key} after {} increments and {} resets: {value} not in {lower}..={upper}",
                of_key().count(),
                self.resets.len() / 2
            );
            eprintln!("{key}: {value} within {lower}..={upper}");
            // The last reset certainly removed something: the value is below the sum.
            assert!(
                seen > 0,
                "{key}: the reset node had answered increments before"
            );
        }
    }
}

/// Issue item 1: concurrent writers on all three regions, every type, deletes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_every_region_converge_to_crdt_semantics() {
    let cluster = Cluster::start(ClusterSpec::new(REGIONS)).await.unwrap();
    write_then_delete_everything(&cluster).await;

    let load = Load::on_all_nodes(&cluster, 2, Duration::ZERO);
    let resets = ResetLoad::start(&cluster, 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ledger = load.stop().await;
    let resets = resets.stop().await;
    assert_eq!(ledger.ambiguous + ledger.refused, 0, "{}", ledger.summary());
    assert!(ledger.acked > 100, "too little load: {}", ledger.summary());

    let snapshot = converge_and_check(&cluster, CONVERGE, &ledger)
        .await
        .unwrap();
    resets.check(&cluster).await;
    // Concurrency really happened: every key got writes from every region.
    for writes in ledger.registers.values() {
        let origins: std::collections::BTreeSet<u64> = writes.iter().map(|w| w.origin).collect();
        assert_eq!(origins.len(), 3, "register writes from every origin");
    }
    assert!(
        ledger.sets_removed.values().any(|r| !r.is_empty()),
        "the load removed set elements"
    );
    eprintln!("converged: {}", ledger.summary());

    // The model is not vacuous: one increment, one set element or the LWW winner off,
    // and the check fails.
    let mut wrong = ledger.clone();
    *wrong.counters.get_mut("ctr-0").unwrap() += 1;
    assert!(common::check(&snapshot, &wrong).is_err());
    let mut wrong = ledger.clone();
    let present = wrong.sets_present.get_mut("set-0").unwrap();
    let element = present.iter().next().unwrap().clone();
    present.remove(&element);
    assert!(common::check(&snapshot, &wrong).is_err());
    if let Some(winner) = &snapshot.registers["reg-0"] {
        let mut wrong = ledger.clone();
        wrong
            .registers
            .get_mut("reg-0")
            .unwrap()
            .retain(|w| w.timestamp != winner.timestamp);
        assert!(common::check(&snapshot, &wrong).is_err());
    }

    // Same applied version vector everywhere once converged.
    cluster.wait_converged(CONVERGE, applied).await.unwrap();
    cluster.shutdown().await.unwrap();
}

/// Issue item 3: `kill -9` of a node under load, then restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acked_and_resumes_from_cursors() {
    let cluster = Cluster::start(ClusterSpec::new(REGIONS)).await.unwrap();
    let victim = cluster.node(2);
    let load = Load::on_all_nodes(&cluster, 1, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await;

    victim.kill().unwrap();
    // The survivors keep taking writes while the victim is down.
    let survivors = [cluster.node(0).client(), cluster.node(1).client()];
    let down_at = max_applied(&survivors).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_restart = max_applied(&survivors).await;
    for origin in ["1", "2"] {
        assert!(
            before_restart[origin] > down_at[origin],
            "survivors kept writing while the victim was down: {down_at:?} → {before_restart:?}"
        );
    }

    victim.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = load.stop().await;
    assert!(
        ledger.refused > 0,
        "the victim's writer saw it down: {}",
        ledger.summary()
    );

    // Everything acknowledged anywhere (the victim's own acked writes included) is
    // everywhere, with exact sums (bounded only by the ambiguous in-flight requests
    // of the victim's writer at the moment of the kill).
    converge_and_check(&cluster, CONVERGE, &ledger)
        .await
        .unwrap();
    let vector = cluster.wait_converged(CONVERGE, applied).await.unwrap();
    wait_no_lag(&cluster, CONVERGE).await.unwrap();

    // The restarted node received the ops written while it was down (it converged), and
    // only from its persisted cursors: in its new life it received fewer ops than the
    // survivors' origins hold in all, i.e. not everything again from sequence 1.
    let info = victim.client().cluster_info().await.unwrap();
    let received: u64 = info["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ops_received"].as_u64().unwrap())
        .sum();
    let others_total = vector["1"] + vector["2"];
    let before_kill = down_at["1"] + down_at["2"];
    assert!(
        received < others_total,
        "the restarted node re-received everything ({received} ops; the survivors' origins \
         hold {others_total}, {before_kill} of them written before the kill): it did not \
         resume from its cursors"
    );
    eprintln!(
        "kill -9: {}; victim received {received} of {others_total} ops after restart",
        ledger.summary()
    );
    cluster.shutdown().await.unwrap();
}

/// A node killed with `kill -9` and started again answers its peers' packets for the old
/// connections with a QUIC stateless reset they accept (its reset key derives from its private
/// key, so it survives the restart): they redial at once instead of waiting out the idle
/// timeout, here a minute long so that only a reset can end the old connections in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resets_its_old_connections_and_peers_redial_at_once() {
    let spec = ClusterSpec::new(REGIONS).extra_config("[replication]\npeer_timeout_ms = 60000\n");
    let cluster = Cluster::start(spec).await.unwrap();
    let (observer, victim) = (cluster.node(0), cluster.node(2));
    victim.client().incr("before", 1).await.unwrap();
    cluster
        .wait_converged(CONVERGE, |c| async move { c.counter("before").await })
        .await
        .unwrap();

    victim.kill().unwrap();
    victim.start().await.unwrap();
    let lost = format!("lost replication connection peer={}", victim.id());
    let log = observer.stderr_path();
    wait_until(
        Duration::from_secs(30),
        "the observer's old connection is reset",
        || {
            let (log, lost) = (log.clone(), lost.clone());
            async move {
                let text = std::fs::read_to_string(&log)?;
                Ok(text
                    .lines()
                    .any(|l| l.contains(&lost) && l.contains("reset")))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", observer.log_tails(30)));

    // And it pulls from the new incarnation.
    victim.client().incr("after", 1).await.unwrap();
    let after = cluster
        .wait_converged(CONVERGE, |c| async move { c.counter("after").await })
        .await
        .unwrap();
    assert_eq!(after, 1);
    cluster.shutdown().await.unwrap();
}

/// The element-wise maximum of the clients' applied vectors.
async fn max_applied(clients: &[Client]) -> BTreeMap<String, u64> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        for (origin, seq) in applied(c.clone()).await.unwrap() {
            let e = merged.entry(origin).or_default();
            *e = (*e).max(seq);
        }
    }
    merged
}

/// Issue item 4: C ships its ops only to A (C–B is cut both ways), then dies for good;
/// B still gets them, relayed by A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_of_a_node_that_died_for_good_are_relayed_by_a_survivor() {
    let cluster = Cluster::start(ClusterSpec::new(REGIONS).relays(true))
        .await
        .unwrap();
    let (a, b, c) = (0, 1, 2);
    cluster.partition(&[c], &[b]).unwrap();

    let writer = cluster.node(c).client();
    let mut sum = 0;
    let mut elements = Vec::new();
    for i in 1..=20_i64 {
        writer.incr("from-c", i).await.unwrap();
        sum += i;
        let element = json!(format!("c-{i}"));
        writer
            .set_add("from-c", std::slice::from_ref(&element))
            .await
            .unwrap();
        elements.push(element);
    }
    let last = writer
        .put_register("from-c", &json!({"last": "c"}))
        .await
        .unwrap();
    elements.sort_by_key(Value::to_string);

    // Wait until A has all of C's ops, then C dies for good.
    let c_ops = applied(writer.clone()).await.unwrap()["3"];
    assert_eq!(c_ops, 41, "C's own ops: 20 increments, 20 adds, 1 put");
    let reader = cluster.node(a).client();
    wait_until(CONVERGE, "A to hold all of C's ops", || {
        let reader = reader.clone();
        async move { Ok(applied(reader).await?.get("3") == Some(&c_ops)) }
    })
    .await
    .unwrap();
    assert_eq!(reader.counter("from-c").await.unwrap(), sum);
    cluster.node(c).kill().unwrap();
    cluster.heal().unwrap();

    // B converges with A on C's ops, although it never heard from C.
    let b_client = cluster.node(b).client();
    wait_until(CONVERGE, "B to receive C's ops from A", || {
        let b_client = b_client.clone();
        async move { Ok(applied(b_client).await?.get("3") == Some(&c_ops)) }
    })
    .await
    .unwrap();
    assert_eq!(b_client.counter("from-c").await.unwrap(), sum);
    let mut got = b_client.set_elements("from-c").await.unwrap();
    got.sort_by_key(Value::to_string);
    assert_eq!(got, elements);
    let register = b_client.get_register("from-c").await.unwrap().unwrap();
    assert_eq!(register["value"], json!({"last": "c"}));
    assert_eq!(register["timestamp"], last["meta"]["timestamp"]);
    assert_eq!(register["origin"], 3);

    // They came through A: B's ops received from A (which wrote nothing) are C's.
    let via_a = peer_view(&b_client, cluster.node(a).id()).await.unwrap();
    assert!(
        via_a["ops_received"].as_u64().unwrap() >= c_ops,
        "B got C's {c_ops} ops from A: {via_a}"
    );
    let from_c = peer_view(&b_client, cluster.node(c).id()).await.unwrap();
    assert_eq!(
        from_c["ops_received"], 0,
        "nothing came from C directly: {from_c}"
    );
    cluster
        .wait_converged(CONVERGE, |c| async move { c.counter("from-c").await })
        .await
        .unwrap();
    cluster.shutdown().await.unwrap();
}

/// `/v1/cluster` and `/metrics` expose per-peer state: connected and reachable after
/// start, ops shipped after writes, no lag once quiescent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_endpoint_and_metrics_expose_per_peer_state() {
    let cluster = Cluster::start(ClusterSpec::new(REGIONS)).await.unwrap();
    for node in cluster.nodes() {
        let client = node.client();
        wait_until(
            CONVERGE,
            &format!("{} connected to every peer", node.name()),
            || {
                let client = client.clone();
                async move {
                    let info = client.cluster_info().await?;
                    let peers = info["peers"].as_array().cloned().unwrap_or_default();
                    Ok(peers.len() == 2
                        && peers.iter().all(|p| {
                            p["connected"] == true
                                && p["inbound_connected"] == true
                                && p["reachable"] == true
                        }))
                }
            },
        )
        .await
        .unwrap();
        let info = client.cluster_info().await.unwrap();
        assert_eq!(info["node"]["id"], node.id());
        assert_eq!(info["node"]["region"], node.region());
        let text = client.metrics().await.unwrap();
        for other in cluster.nodes().iter().filter(|o| o.id() != node.id()) {
            let labels = [("peer", other.name()), ("region", other.region())];
            assert_eq!(
                metric(&text, "meridian_peer_connected", &labels),
                Some(1.0),
                "{text}"
            );
            assert_eq!(
                metric(&text, "meridian_peer_reachable", &labels),
                Some(1.0),
                "{text}"
            );
        }
    }

    // Node 0 writes 25 ops, node 1 writes 10; node 2 writes nothing.
    let writes = [(0, 25_u64), (1, 10)];
    for (index, count) in writes {
        let client = cluster.node(index).client();
        for _ in 0..count {
            client.incr("observed", 1).await.unwrap();
        }
    }
    let value = cluster
        .wait_converged(CONVERGE, |c| async move { c.counter("observed").await })
        .await
        .unwrap();
    assert_eq!(value, 35);
    wait_no_lag(&cluster, CONVERGE).await.unwrap();

    for (index, count) in writes.into_iter().chain([(2, 0)]) {
        let node = cluster.node(index);
        let client = node.client();
        let info = client.cluster_info().await.unwrap();
        let text = client.metrics().await.unwrap();
        // Every op from the others was applied here once, and each one's lag observed once:
        // under a minute (a unit slip would put it years off), counted in the last bucket too.
        let received = (35 - count) as f64;
        let apply_lag = "meridian_replication_apply_lag_seconds";
        let count_of = |suffix: &str, labels: &[(&str, &str)]| {
            metric(&text, &format!("{apply_lag}_{suffix}"), labels)
        };
        assert_eq!(count_of("count", &[]), Some(received), "{text}");
        assert_eq!(count_of("bucket", &[("le", "65.536")]), Some(received));
        assert_eq!(count_of("bucket", &[("le", "+Inf")]), Some(received));
        let total = count_of("sum", &[]).unwrap();
        assert!(
            total > 0.0 || received == 0.0,
            "ops took time to arrive: {total}"
        );
        // Their arrival is counted too, before the apply: every op at least once (a batch
        // resent after a reconnection arrives twice), each under a minute.
        let receive_lag = "meridian_replication_receive_lag_seconds";
        let arrived = metric(&text, &format!("{receive_lag}_count"), &[]).unwrap();
        assert!(arrived >= received, "{arrived} arrivals of {received} ops");
        let within_a_minute = [("le", "65.536")];
        let bucket = format!("{receive_lag}_bucket");
        assert_eq!(metric(&text, &bucket, &within_a_minute), Some(arrived));
        if (arrived - received).abs() < 0.5 {
            let arrival_time = metric(&text, &format!("{receive_lag}_sum"), &[]).unwrap();
            assert!(
                arrival_time <= total,
                "arrived ({arrival_time}) after applied ({total})"
            );
        }
        for peer in info["peers"].as_array().unwrap() {
            let name = peer["name"].as_str().unwrap();
            let region = peer["region"].as_str().unwrap();
            let labels = [("peer", name), ("region", region)];
            // Each peer pulls this node's own ops from it exactly once (nobody relays
            // while everyone is up).
            assert_eq!(peer["ops_sent"], count, "{} → {name}: {peer}", node.name());
            assert_eq!(peer["lag_ops"], 0, "{peer}");
            assert_eq!(peer["lag_ms"], 0, "{peer}");
            assert_eq!(
                peer["applied"][node.id().to_string()].as_u64().unwrap_or(0),
                count,
                "the peer acknowledged all of {}'s ops: {peer}",
                node.name()
            );
            let sent = metric(&text, "meridian_replication_ops_sent", &labels);
            assert_eq!(sent, Some(count as f64), "{text}");
            for lag in [
                "meridian_replication_lag_ops",
                "meridian_replication_lag_milliseconds",
            ] {
                assert_eq!(metric(&text, lag, &labels), Some(0.0), "{lag}: {text}");
            }
        }
    }
    cluster.shutdown().await.unwrap();
}

/// A node cut off while the others write past their WAL retention: when the cut heals, the
/// others report its cursor truncated, anti-entropy repairs it, and it fast-forwards. Its
/// applied vector then catches up with theirs, which anti-entropy alone never moves, and
/// later writes reach it as ops again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_wal_retention_is_repaired_and_rejoins_the_wal_stream() {
    let spec = ClusterSpec::new(REGIONS)
        .relays(true)
        .extra_config("[replication]\nwal_retention_ops = 50\n");
    let cluster = Cluster::start(spec).await.unwrap();
    let (a, c) = (0, 2);
    let writer = cluster.node(a).client();
    let lagging = cluster.node(c).client();
    let origin = cluster.node(a).id().to_string();
    cluster.partition(&[c], &[0, 1]).unwrap();
    for i in 0..300 {
        writer.incr(&format!("k{}", i % 30), 1).await.unwrap();
    }
    wait_until(CONVERGE, "A to truncate its WAL past C's cursor", || {
        let writer = writer.clone();
        async move {
            let wal = writer.cluster_info().await?["wal_ops"].as_u64();
            Ok(wal.is_some_and(|ops| ops <= 100))
        }
    })
    .await
    .unwrap();
    let before = applied(lagging.clone()).await.unwrap();
    assert_eq!(
        before.get(&origin).copied().unwrap_or(0),
        0,
        "C saw nothing"
    );

    cluster.heal().unwrap();
    let written = applied(writer.clone()).await.unwrap()[&origin];
    assert_eq!(written, 300);
    wait_until(
        CONVERGE,
        "C's applied vector to catch up with A's ops",
        || {
            let lagging = lagging.clone();
            let origin = origin.clone();
            async move { Ok(applied(lagging).await?.get(&origin) == Some(&written)) }
        },
    )
    .await
    .unwrap();
    for i in 0..30 {
        assert_eq!(lagging.counter(&format!("k{i}")).await.unwrap(), 10);
    }
    let from_a = peer_view(&lagging, cluster.node(a).id()).await.unwrap();
    assert_eq!(from_a["truncated"], Value::Null, "{from_a}");

    // The WAL path again: new ops arrive as ops, and the vector follows them.
    for _ in 0..10 {
        writer.incr("after", 1).await.unwrap();
    }
    wait_until(CONVERGE, "C to apply A's new ops", || {
        let lagging = lagging.clone();
        let origin = origin.clone();
        async move { Ok(applied(lagging).await?.get(&origin) == Some(&(written + 10))) }
    })
    .await
    .unwrap();
    assert_eq!(lagging.counter("after").await.unwrap(), 10);
    cluster.shutdown().await.unwrap();
}
