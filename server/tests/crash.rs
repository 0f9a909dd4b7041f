//! `kill -9` under concurrent writes: every acknowledged write survives, an unanswered one is
//! either wholly there or not at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::Node;
use rand::Rng;
use reqwest::Client;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// What one client knows it wrote: acknowledged, and the one request in flight when the node
/// died (if any).
#[derive(Default, Debug)]
struct Ledger {
    acked_sum: i64,
    in_flight: Option<i64>,
    acked_elements: BTreeSet<u64>,
    in_flight_element: Option<u64>,
    last_acked_register: Option<u64>,
    in_flight_register: Option<u64>,
    /// Acknowledged writes of each kind, for the summary line: increments, set adds, puts.
    acknowledged: [u64; 3],
}

async fn counter_client(c: Client, url: String, ledger: Arc<Mutex<Ledger>>, seed: u64) {
    let mut n = seed;
    loop {
        n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let by = i64::try_from(n % 1000).unwrap() - 300;
        ledger.lock().await.in_flight = Some(by);
        match c.post(&url).json(&json!({"increment": by})).send().await {
            Ok(r) if r.status().is_success() => {
                let mut l = ledger.lock().await;
                l.acked_sum += by;
                l.in_flight = None;
                l.acknowledged[0] += 1;
            }
            _ => return,
        }
    }
}

async fn set_client(c: Client, url: String, ledger: Arc<Mutex<Ledger>>, base: u64) {
    for element in base.. {
        ledger.lock().await.in_flight_element = Some(element);
        match c.post(&url).json(&json!({"add": [element]})).send().await {
            Ok(r) if r.status().is_success() => {
                let mut l = ledger.lock().await;
                l.acked_elements.insert(element);
                l.in_flight_element = None;
                l.acknowledged[1] += 1;
            }
            _ => return,
        }
    }
}

async fn register_client(c: Client, url: String, ledger: Arc<Mutex<Ledger>>, base: u64) {
    for value in base.. {
        ledger.lock().await.in_flight_register = Some(value);
        match c.put(&url).json(&json!(value)).send().await {
            Ok(r) if r.status().is_success() => {
                let mut l = ledger.lock().await;
                l.last_acked_register = Some(value);
                l.in_flight_register = None;
                l.acknowledged[2] += 1;
            }
            _ => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let mut node = Node::start("").await;
    let clients = 3;
    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..clients).map(|_| Arc::default()).collect();
    let mut rng = rand::rng();
    // More rounds for the README's durability figure (`--no-capture` shows the summary).
    let rounds: u64 = std::env::var("MERIDIAN_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, ledger) in ledgers.iter().enumerate() {
            let c = Client::new();
            tasks.spawn(counter_client(
                c.clone(),
                node.url(&format!("/v1/counters/c{i}")),
                ledger.clone(),
                round * 7 + i as u64 + 1,
            ));
            tasks.spawn(set_client(
                c.clone(),
                node.url(&format!("/v1/sets/s{i}")),
                ledger.clone(),
                round * 1_000_000 + i as u64 * 100_000,
            ));
            tasks.spawn(register_client(
                c,
                node.url(&format!("/v1/registers/r{i}")),
                ledger.clone(),
                round * 1_000_000,
            ));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        node.kill();
        while tasks.join_next().await.is_some() {}
        node.spawn().await;

        let c = Client::new();
        for (i, ledger) in ledgers.iter().enumerate() {
            let mut l = ledger.lock().await;
            let counter: Value = c
                .get(node.url(&format!("/v1/counters/c{i}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let value = counter["value"].as_i64().unwrap();
            let with_in_flight = l.acked_sum + l.in_flight.unwrap_or(0);
            assert!(
                value == l.acked_sum || value == with_in_flight,
                "round {round} counter c{i}: {value}, acknowledged sum {}, in flight {:?}",
                l.acked_sum,
                l.in_flight
            );
            // An unanswered increment that landed is now part of the truth for later rounds.
            l.acked_sum = value;
            l.in_flight = None;

            let set: Value = c
                .get(node.url(&format!("/v1/sets/s{i}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let elements: BTreeSet<u64> = set["elements"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_u64().unwrap())
                .collect();
            let missing: Vec<_> = l.acked_elements.difference(&elements).collect();
            assert!(
                missing.is_empty(),
                "round {round} set s{i} lost acknowledged elements {missing:?}"
            );
            let extra: Vec<u64> = elements.difference(&l.acked_elements).copied().collect();
            assert!(
                extra.is_empty() || (extra.len() == 1 && Some(extra[0]) == l.in_flight_element),
                "round {round} set s{i} has elements never written: {extra:?}"
            );
            l.acked_elements = elements;
            l.in_flight_element = None;

            let register = c
                .get(node.url(&format!("/v1/registers/r{i}")))
                .send()
                .await
                .unwrap();
            if let Some(last) = l.last_acked_register {
                let body: Value = register.json().await.unwrap();
                let value = body["value"].as_u64().unwrap();
                assert!(
                    value == last || Some(value) == l.in_flight_register,
                    "round {round} register r{i}: {value}, last acknowledged {last}"
                );
            }
            l.last_acked_register = None;
            l.in_flight_register = None;
        }
    }
    let mut acknowledged = [0u64; 3];
    for l in &ledgers {
        for (total, n) in acknowledged.iter_mut().zip(l.lock().await.acknowledged) {
            *total += n;
        }
    }
    assert!(
        acknowledged.iter().all(|&n| n > 0),
        "the load must have written every kind: {acknowledged:?}"
    );
    eprintln!(
        "{rounds} kill -9 rounds, {} clients: {} acknowledged writes \
         ({} increments, {} set adds, {} register puts), 0 lost",
        clients * 3,
        acknowledged.iter().sum::<u64>(),
        acknowledged[0],
        acknowledged[1],
        acknowledged[2]
    );
}

/// The journal on a directory of its own (`storage.journal_dir`): writes acknowledged just
/// before a `kill -9`, still only in the journal, are all there after the restart. A node
/// whose journal went missing (the setting changed, the files not moved) refuses to start
/// rather than lose them, and starts again once the files are where it looks.
#[tokio::test]
async fn a_journal_elsewhere_keeps_acknowledged_writes_and_is_never_silently_lost() {
    let mut node = Node::start("[storage]\njournal_dir = \"log-device\"\n").await;
    let journal = node.dir.path().join("log-device");
    let c = Client::new();
    let url = node.url("/v1/counters/hits");
    for _ in 0..300 {
        let r = c
            .post(&url)
            .json(&json!({"increment": 1}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    node.kill();
    let names: BTreeSet<String> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains("journal.id"), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("journal-0")),
        "{names:?}"
    );
    assert!(!node.data_dir().join("journal").exists());

    let moved = node.dir.path().join("log-device-moved");
    std::fs::rename(&journal, &moved).unwrap();
    let log = node.spawn_refused().await;
    assert!(log.contains("holds no journal of this database"), "{log}");
    // A log written to a file is plain text: no terminal colour codes around its fields.
    assert!(!log.contains('\u{1b}'), "{log:?}");

    std::fs::rename(&moved, &journal).unwrap();
    node.spawn().await;
    let counter: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(counter["value"], 300, "{counter}");
}
