//! Real QUIC on loopback: in-process nodes, each a `Replicator` over a `MemStore`.
//!
//! No timing assertions: every wait polls for a correctness condition under a generous
//! deadline, so a slow machine makes a test slower, never red.

// Helpers outside `#[test]` functions set up fixtures; a failure there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_crdt::{Kind, NodeId, State};
use meridian_replication::{
    MemStore, PeerConfig, ReplicaStore, ReplicationConfig, ReplicationError, Replicator, Resolve,
    StoreError, TlsMaterial,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A cluster CA able to issue node certificates, as `meridian cluster init` will.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> Vec<u8> {
        self.issuer.pem().into_bytes()
    }

    /// A node certificate for `name` (plus localhost), trusting `trusted` as the cluster CA.
    fn node(&self, name: &str, trusted: &Self) -> TlsMaterial {
        let mut params = CertificateParams::new(vec![
            name.to_owned(),
            "localhost".into(),
            "127.0.0.1".into(),
        ])
        .unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TlsMaterial {
            ca_pem: trusted.pem(),
            cert_chain_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        }
    }
}

fn id(n: u64) -> NodeId {
    NodeId::new(n).unwrap()
}

fn name(n: u64) -> String {
    format!("node-{n}")
}

/// A free loopback UDP port, checked by binding it and released, so configs can name every
/// address up front. Drawn from below Linux's ephemeral range (32768–60999): a port that
/// `bind(0)` handed out and that was released goes back to the kernel's pool, and another
/// test's socket binding port 0 could take it before the node binds it.
fn free_addr() -> SocketAddr {
    const PORTS: std::ops::Range<u32> = 10_000..32_000;
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    // Tests run as parallel processes: start each one somewhere else in the range.
    let seed = std::process::id()
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..PORTS.len() as u32 {
        let offset = seed.wrapping_add(attempt.wrapping_mul(7_919)) % PORTS.len() as u32;
        let port = (PORTS.start + offset) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(socket) = UdpSocket::bind(("127.0.0.1", port)) {
            handed_out.insert(port);
            return socket.local_addr().unwrap();
        }
    }
    panic!("no free UDP port below the ephemeral range");
}

/// Configurations of nodes `1..=count`, each listing all the others, with test-speed knobs.
fn configs(ca: &Ca, count: u64) -> Vec<ReplicationConfig> {
    let addrs: Vec<SocketAddr> = (0..count).map(|_| free_addr()).collect();
    (1..=count)
        .map(|me| {
            let peers = (1..=count)
                .filter(|&p| p != me)
                .map(|p| PeerConfig {
                    id: id(p),
                    name: name(p),
                    region: format!("region-{p}"),
                    address: addrs[(p - 1) as usize],
                    host: None,
                })
                .collect();
            fast(ReplicationConfig::new(
                id(me),
                name(me),
                format!("region-{me}"),
                "test",
                addrs[(me - 1) as usize],
                peers,
                ca.node(&name(me), ca),
            ))
        })
        .collect()
}

fn fast(mut config: ReplicationConfig) -> ReplicationConfig {
    config.heartbeat_interval = Duration::from_millis(100);
    config.peer_timeout = Duration::from_millis(600);
    config.batch_max_delay = Duration::from_millis(1);
    config.batch_max_bytes = 8 * 1024;
    config.window_bytes = 64 * 1024;
    config.reconnect_base = Duration::from_millis(20);
    config.reconnect_max = Duration::from_millis(300);
    config.shutdown_timeout = Duration::from_millis(300);
    config
}

fn store(n: u64) -> Arc<MemStore> {
    Arc::new(MemStore::new(id(n), Duration::from_millis(500)))
}

fn start(config: &ReplicationConfig, store: &Arc<MemStore>) -> Replicator {
    Replicator::start(config.clone(), store.clone(), CancellationToken::new()).unwrap()
}

/// `count` nodes under one test CA, each started with a fresh store.
fn started(count: u64) -> (Vec<Arc<MemStore>>, Vec<Replicator>) {
    let ca = Ca::new("test CA");
    let configs = configs(&ca, count);
    let stores: Vec<Arc<MemStore>> = (1..=count).map(store).collect();
    let nodes = configs
        .iter()
        .zip(&stores)
        .map(|(c, s)| start(c, s))
        .collect();
    (stores, nodes)
}

/// Starts again on the address a stopped replicator used. A connection still draining (on a
/// loaded machine, past the shutdown deadline) keeps the socket a moment longer; a new process
/// would not have to wait, an in-process restart does.
async fn restart(config: &ReplicationConfig, store: &Arc<MemStore>) -> Replicator {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match Replicator::start(config.clone(), store.clone(), CancellationToken::new()) {
            Ok(replicator) => return replicator,
            Err(ReplicationError::Bind { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot restart: {e}"),
        }
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counter(store: &MemStore, key: &str) -> i64 {
    match store.get(Kind::Counter, key) {
        Some(State::Counter(c)) => c.value(),
        None => 0,
        Some(other) => panic!("not a counter: {other:?}"),
    }
}

fn converged(stores: &[&Arc<MemStore>]) -> bool {
    let first = stores[0];
    stores
        .iter()
        .all(|s| s.applied() == first.applied() && s.states() == first.states())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_concurrent_writes_converge() {
    init_tracing();
    let (stores, nodes) = started(3);

    let writers: Vec<_> = stores
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                for round in 0..300_i64 {
                    s.increment("shared", i as i64 + 1).unwrap();
                    s.increment(&format!("own-{i}-{}", round % 7), 1).unwrap();
                    if round % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }

    let refs: Vec<&Arc<MemStore>> = stores.iter().collect();
    wait_until("all three stores are identical", || converged(&refs)).await;
    for s in &stores {
        assert_eq!(counter(s, "shared"), 300 * (1 + 2 + 3));
        for n in 1..=3 {
            assert_eq!(s.applied().get(id(n)), 600);
        }
    }
    // Every peer eventually acknowledges everything, so nothing lags.
    wait_until("acks cover every origin", || {
        nodes
            .iter()
            .all(|node| node.peers().iter().all(|p| p.lag_ops == 0 && p.lag_ms == 0))
    })
    .await;
    let acks = nodes[0].watch_acks().borrow().clone();
    assert_eq!(acks.len(), 2);
    assert!(acks.values().all(|vv| vv.get(id(1)) == 600));
    wait_until("everyone reachable", || {
        nodes.iter().all(|n| n.reachable().len() == 2)
    })
    .await;
    let status = nodes[0].peers();
    assert!(
        status
            .iter()
            .all(|p| p.connected && p.inbound_connected && p.reachable)
    );
    // Who shipped what depends on start-up timing (a peer slow to connect gets relayed), but
    // node 1 applied the 1200 ops of the others from somebody.
    assert!(status.iter().map(|p| p.ops_received).sum::<u64>() >= 1200);
    assert!(
        status
            .iter()
            .all(|p| p.rtt_ms.is_some() && p.skew_ms.is_some())
    );
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_without_gap_or_duplicate() {
    init_tracing();
    let ca = Ca::new("test CA");
    let configs = configs(&ca, 3);
    let stores: Vec<Arc<MemStore>> = (1..=3).map(store).collect();
    let mut nodes: Vec<Replicator> = configs
        .iter()
        .zip(&stores)
        .map(|(c, s)| start(c, s))
        .collect();

    for _ in 0..100 {
        stores[0].increment("k", 1).unwrap();
        stores[1].increment("k", 10).unwrap();
    }
    let refs: Vec<&Arc<MemStore>> = stores.iter().collect();
    wait_until("first round converged", || converged(&refs)).await;

    // Node 3 stops; everybody keeps writing, node 3 included (locally).
    nodes[2].shutdown().await;
    for _ in 0..150 {
        stores[0].increment("k", 1).unwrap();
        stores[1].increment("k", 10).unwrap();
        stores[2].increment("k", 100).unwrap();
    }
    // While it is down its peers keep going between themselves.
    wait_until("nodes 1 and 2 converged", || converged(&refs[..2])).await;

    // Same store, same address: it resumes from its applied vector.
    nodes[2] = restart(&configs[2], &stores[2]).await;
    wait_until("all converged after the restart", || converged(&refs)).await;
    for s in &stores {
        assert_eq!(counter(s, "k"), 250 + 250 * 10 + 150 * 100);
    }
    // Its cursors were persisted through acks.
    wait_until("acks persisted", || {
        stores[0]
            .peer_applied()
            .get(&id(3))
            .is_some_and(|vv| vv == &stores[0].applied())
    })
    .await;
    for node in &nodes {
        node.shutdown().await;
    }
}

/// Host names and where they point now: a DNS whose answers the test changes.
#[derive(Debug, Default)]
struct Names(Mutex<BTreeMap<String, SocketAddr>>);

impl Names {
    fn point(&self, host: &str, address: SocketAddr) {
        self.0.lock().unwrap().insert(host.to_owned(), address);
    }
}

impl Resolve for Names {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<SocketAddr>> + Send + 'a>> {
        let answer = self.0.lock().unwrap().get(host).copied();
        Box::pin(async move {
            answer.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, host))
        })
    }
}

/// A peer configured by name comes back at a new address, as a recreated container does
/// with a new IP: the node looks the name up again before reconnecting, and pulls from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_back_at_a_new_address_is_found_again_by_its_name() {
    init_tracing();
    let ca = Ca::new("test CA");
    let mut configs = configs(&ca, 2);
    let names = Arc::new(Names::default());
    let host = "node-2.internal:7100";
    names.point(host, configs[1].listen);
    configs[0].peers[0].host = Some(host.to_owned());
    configs[0].resolver = names.clone();
    let stores = [store(1), store(2)];
    let mut nodes = [
        start(&configs[0], &stores[0]),
        start(&configs[1], &stores[1]),
    ];
    stores[1].increment("k", 1).unwrap();
    wait_until("node 1 pulled node 2's first op", || {
        counter(&stores[0], "k") == 1
    })
    .await;

    // Node 2 moves: same identity and data, a new address, and its name follows it.
    nodes[1].shutdown().await;
    let old = configs[1].listen;
    configs[1].listen = free_addr();
    assert_ne!(configs[1].listen, old);
    names.point(host, configs[1].listen);
    nodes[1] = start(&configs[1], &stores[1]);
    stores[1].increment("k", 10).unwrap();
    wait_until("node 1 pulled from node 2's new address", || {
        counter(&stores[0], "k") == 11
    })
    .await;
    assert_eq!(nodes[0].peers()[0].address, configs[1].listen);
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_connects_is_dialled_back_at_once_not_after_the_backoff() {
    init_tracing();
    let ca = Ca::new("test CA");
    let mut configs = configs(&ca, 2);
    // Node 1 backs off far longer than this test waits: only the peer's own connection can
    // make it dial again in time.
    configs[0].reconnect_base = Duration::from_secs(3600);
    configs[0].reconnect_max = Duration::from_secs(3600);
    let stores = [store(1), store(2)];
    let first = start(&configs[0], &stores[0]);
    wait_until("node 1 failed to reach node 2 and backs off", || {
        first.peers()[0].last_error.is_some()
    })
    .await;

    let second = start(&configs[1], &stores[1]);
    stores[1].increment("k", 7).unwrap();
    wait_until("node 1 pulled node 2's op", || {
        counter(&stores[0], "k") == 7
    })
    .await;
    assert!(first.peers()[0].connected);
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_of_a_dead_node_reach_survivors_through_a_relay() {
    init_tracing();
    let ca = Ca::new("test CA");
    let configs = configs(&ca, 3);
    let stores: Vec<Arc<MemStore>> = (1..=3).map(store).collect();

    // Only nodes 1 and 3 run; node 3 writes and dies for good once node 1 has its ops.
    let first = start(&configs[0], &stores[0]);
    let third = start(&configs[2], &stores[2]);
    for i in 0..200 {
        stores[2].increment("from-3", i).unwrap();
    }
    wait_until("node 1 has node 3's ops", || {
        stores[0].applied().get(id(3)) == 200
    })
    .await;
    third.shutdown().await;
    drop(third);

    // Node 2 never met node 3: it must get node 3's ops from node 1.
    let second = start(&configs[1], &stores[1]);
    stores[1].increment("from-2", 5).unwrap();
    wait_until("node 2 has node 3's ops", || {
        stores[1].applied().get(id(3)) == 200
    })
    .await;
    wait_until("nodes 1 and 2 converged", || {
        converged(&[&stores[0], &stores[1]])
    })
    .await;
    assert_eq!(counter(&stores[1], "from-3"), (0..200).sum::<i64>());
    assert!(!second.reachable().contains(&id(3)));
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_cannot_connect_or_inject() {
    init_tracing();
    let ca = Ca::new("test CA");
    let rogue_ca = Ca::new("rogue CA");
    let configs = configs(&ca, 2);
    let victim_store = store(1);
    let victim = start(&configs[0], &victim_store);

    // The rogue trusts the real CA (so it could verify the victim), claims to be node 2 with
    // node 2's name, but its certificate comes from another CA.
    let mut rogue_config = configs[1].clone();
    rogue_config.listen = free_addr();
    rogue_config.tls = rogue_ca.node(&name(2), &ca);
    let rogue_store = store(2);
    for _ in 0..10 {
        rogue_store.increment("evil", 1).unwrap();
    }
    let rogue = start(&rogue_config, &rogue_store);
    // And one that does not even trust the real CA.
    let mut stranger_config = configs[1].clone();
    stranger_config.listen = free_addr();
    stranger_config.tls = rogue_ca.node(&name(2), &rogue_ca);
    let stranger = start(&stranger_config, &rogue_store);

    wait_until("the victim refused connections", || {
        victim.refused_connections() >= 2
    })
    .await;
    // Let any (wrongly) accepted session run a few heartbeats before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(victim_store.applied().is_empty());
    assert!(victim_store.states().is_empty());
    assert!(victim.reachable().is_empty());
    assert!(!victim.peers()[0].inbound_connected);
    assert!(rogue.peers().iter().all(|p| !p.connected));
    assert!(stranger.peers().iter().all(|p| !p.connected));
    for node in [&victim, &rogue, &stranger] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_cannot_claim_another_node_id() {
    init_tracing();
    let ca = Ca::new("test CA");
    let configs = configs(&ca, 3);
    let victim_store = store(1);
    let victim = start(&configs[0], &victim_store);

    // Node 3's genuine certificate, used to claim node 2's id and name.
    let mut impostor_config = configs[1].clone();
    impostor_config.listen = free_addr();
    impostor_config.tls = configs[2].tls.clone();
    let impostor_store = store(2);
    for _ in 0..10 {
        impostor_store.increment("evil", 1).unwrap();
    }
    let impostor = start(&impostor_config, &impostor_store);

    wait_until("the victim refused the impostor", || {
        victim.refused_connections() >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(victim_store.applied().is_empty());
    assert!(victim_store.states().is_empty());
    assert!(!victim.peers().iter().any(|p| p.inbound_connected));
    assert!(impostor.peers().iter().all(|p| !p.connected));
    victim.shutdown().await;
    impostor.shutdown().await;
}

/// A peer whose cursor fell behind our truncated WAL: anti-entropy gives it the truncated ops'
/// effects, it fast-forwards its applied vector past them, and the WAL path resumes: later ops
/// arrive as ops (anti-entropy merges states and never moves an applied vector).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_wal_is_repaired_and_the_wal_path_resumes_past_it() {
    init_tracing();
    let ca = Ca::new("test CA");
    let configs = configs(&ca, 2);
    let stores: Vec<Arc<MemStore>> = (1..=2).map(store).collect();
    for _ in 0..10 {
        stores[0].increment("k", 1).unwrap();
    }
    stores[0].increment("other", 7).unwrap();
    stores[0].truncate_wal(id(1), 6);
    let nodes: Vec<Replicator> = configs
        .iter()
        .zip(&stores)
        .map(|(c, s)| start(c, s))
        .collect();

    wait_until("node 2 catches up with node 1 past the truncation", || {
        stores[1].applied().get(id(1)) == 11
    })
    .await;
    assert_eq!(
        counter(&stores[1], "k"),
        10,
        "ops 1-5 came as state, 6-10 as ops"
    );
    assert_eq!(counter(&stores[1], "other"), 7);
    assert_eq!(nodes[1].peers()[0].truncated, None, "the report is cleared");
    // Node 2 never held ops 1-5: its WAL says so to whoever asks, rather than skip them.
    assert!(matches!(
        stores[1].read_wal(id(1), 0, 100, usize::MAX),
        Err(StoreError::Truncated {
            first_available: 6,
            ..
        })
    ));

    // New writes travel the WAL path again.
    for _ in 0..5 {
        stores[0].increment("k", 1).unwrap();
    }
    wait_until("node 2 applies node 1's new ops", || {
        stores[1].applied().get(id(1)) == 16
    })
    .await;
    assert_eq!(counter(&stores[1], "k"), 15);
    assert!(converged(&[&stores[0], &stores[1]]));
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_flow_through_the_window() {
    init_tracing();
    let (stores, nodes) = started(2);
    // Far more data than the 64 KiB test window, in keys of its own each.
    for i in 0..5000 {
        stores[0].increment(&format!("key-{i}"), i).unwrap();
    }
    wait_until("converged", || converged(&[&stores[0], &stores[1]])).await;
    let status = &nodes[0].peers()[0];
    assert!(status.batches_sent > 1);
    assert_eq!(status.ops_sent, 5000);
    let acks: BTreeMap<NodeId, _> = nodes[0].watch_acks().borrow().clone();
    assert_eq!(acks[&id(2)].get(id(1)), 5000);
    for node in &nodes {
        node.shutdown().await;
    }
}

/// While the subscriber's store is slow to make a batch durable, the next batches are handed
/// to it without waiting (up to a bound), and those that arrive beyond that bound are handed
/// over together, in order, as one call (one journal sync in the real store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_arriving_during_a_slow_apply_are_queued_and_merged() {
    init_tracing();
    let (stores, nodes) = started(2);
    stores[0].increment("first", 1).unwrap();
    wait_until("converged", || converged(&[&stores[0], &stores[1]])).await;
    let calls_before = stores[1].apply_calls();

    // The subscriber's disk stalls on the next batch; twenty more, each its own batch (the
    // batch window is 1 ms), queue up behind it.
    stores[1].set_applies_open(false);
    stores[0].increment("slow", 1).unwrap();
    wait_until("the next apply started", || {
        stores[1].apply_calls() > calls_before
    })
    .await;
    for i in 0..20 {
        stores[0].increment(&format!("queued-{i}"), i).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until(
        "later batches handed over before the first is durable",
        || stores[1].apply_calls() >= calls_before + 2,
    )
    .await;
    stores[1].set_applies_open(true);
    wait_until("converged", || converged(&[&stores[0], &stores[1]])).await;

    let batches = nodes[1].peers()[0].batches_received;
    let calls = stores[1].apply_calls();
    assert_eq!(nodes[1].peers()[0].ops_received, 22);
    // Writes 10 ms apart go in batches of their own, unless this machine stalls the sender.
    assert!(
        batches >= 5,
        "the writes went in separate batches: {batches}"
    );
    assert!(
        calls < batches,
        "{calls} applies for {batches} batches: waiting batches were applied one by one"
    );
    for node in &nodes {
        node.shutdown().await;
    }
}

/// Anti-entropy never leaves a state holding ops its node has not applied: session tokens are
/// built from the applied vector. While the subscriber's WAL is held back, rounds in both
/// directions (over real QUIC) defer what they would merge, and say so; once its applies
/// resume, the WAL brings the ops and everything converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_waits_for_the_wal_instead_of_running_ahead_of_it() {
    init_tracing();
    let (stores, nodes) = started(2);
    stores[0].increment("seed", 1).unwrap();
    wait_until("converged", || converged(&[&stores[0], &stores[1]])).await;

    stores[1].hold_applies(true);
    for i in 0..10 {
        stores[0].increment(&format!("k{i}"), 1).unwrap();
    }
    wait_until("the ops handed over and held", || {
        stores[1].apply_calls() > 1
    })
    .await;
    let fetched = nodes[1].sync_peer(&name(1)).await.unwrap();
    assert_eq!(fetched.keys_repaired_here, 0, "{fetched:?}");
    assert_eq!(fetched.keys_deferred, 10, "{fetched:?}");
    assert!(!fetched.complete, "{fetched:?}");
    let pushed = nodes[0].sync_peer(&name(2)).await.unwrap();
    assert_eq!(pushed.keys_repaired_there, 0, "{pushed:?}");
    assert_eq!(pushed.keys_deferred, 10, "{pushed:?}");
    for i in 0..10 {
        assert_eq!(counter(&stores[1], &format!("k{i}")), 0, "k{i} ran ahead");
    }

    stores[1].hold_applies(false);
    wait_until("converged", || converged(&[&stores[0], &stores[1]])).await;
    let after = nodes[1].sync_peer(&name(1)).await.unwrap();
    assert!(after.complete && after.keys_deferred == 0, "{after:?}");
    for node in &nodes {
        node.shutdown().await;
    }
}

/// A physical clock ten seconds fast.
fn fast_clock() -> uhlc::NTP64 {
    uhlc::system_time_clock() + uhlc::NTP64::from(Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_from_a_fast_clock_are_refused_and_its_skew_measured() {
    init_tracing();
    let ca = Ca::new("test CA");
    let configs = configs(&ca, 2);
    let honest = store(1);
    let fast = Arc::new(MemStore::with_clock(
        id(2),
        Duration::from_millis(500),
        fast_clock,
    ));
    let nodes = [start(&configs[0], &honest), start(&configs[1], &fast)];
    fast.increment("k", 3).unwrap();

    // Its ops still replicate (the data is fine; only its clock is not trusted)...
    wait_until("the fast node's op arrived", || counter(&honest, "k") == 3).await;
    // ...its stamps are refused as clock input, and its skew shows.
    wait_until("refusals counted and skew measured", || {
        let peer = &nodes[0].peers()[0];
        peer.refused_stamps > 0 && peer.skew_ms.is_some_and(|ms| ms > 5_000.0)
    })
    .await;
    // The fast node sees the honest one ten seconds behind.
    wait_until("skew seen from the other side", || {
        nodes[1].peers()[0].skew_ms.is_some_and(|ms| ms < -5_000.0)
    })
    .await;
    for node in &nodes {
        node.shutdown().await;
    }
}
