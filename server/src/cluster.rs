//! This node's view of the cluster: identity, peers, replication state, for `/v1/cluster` and
//! the replication gauges in `/metrics`.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use std::sync::{Arc, Mutex, PoisonError};

use meridian_crdt::NodeId;
use meridian_replication::{PeerStatus, Replicator};

use crate::api::ConsistencyLevel;

use crate::config::{Config, PeerEntry};
use crate::metrics::{AeLabels, Metrics, OriginLabels, PeerLabels};
use crate::storage::Storage;
use crate::tls::CertInfo;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeInfo {
    pub id: u64,
    pub name: String,
    pub region: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterStatus {
    pub cluster: String,
    pub node: NodeInfo,
    /// Highest contiguous sequence applied here, per origin node id.
    pub applied: BTreeMap<String, u64>,
    pub wal_ops: u64,
    pub refused_clock_stamps: u64,
    pub peers: Vec<PeerView>,
    pub anti_entropy: AntiEntropyView,
    pub security: SecurityView,
    pub gc: GcView,
}

/// Authentication and the certificates in use, so an operator can see that a reload took.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct SecurityView {
    pub auth_enabled: bool,
    /// The HTTP API's certificate; absent when it serves plaintext.
    pub http_certificate: Option<CertInfo>,
    /// This node's certificate on the peer mesh.
    pub peer_certificate: Option<CertInfo>,
    /// Successful reloads (SIGHUP) since start-up.
    pub reloads: u64,
    pub last_reload_error: Option<String>,
}

/// Garbage collection at causal stability.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct GcView {
    pub enabled: bool,
    /// Every node has applied everything this vector covers: tombstones below it may go.
    /// Absent while some node has not yet sent a usable report (`waiting_for`).
    pub frontier: Option<BTreeMap<String, u64>>,
    pub waiting_for: Vec<String>,
    /// Peers silent for longer than the GC horizon, if one is set: the frontier ignores them.
    pub excluded: Vec<String>,
    /// Peers that were excluded and have not completed an anti-entropy round with this node
    /// since; until then their old writes may revive keys deleted meanwhile.
    pub needs_resync: Vec<String>,
    pub passes: u64,
    pub failed_passes: u64,
    pub last_pass_ms_ago: Option<u64>,
    pub keys_removed: u64,
    pub keys_compacted: u64,
    pub last_error: Option<String>,
}

/// Anti-entropy: this node's Merkle tree and the rounds since start-up.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct AntiEntropyView {
    /// Hex of the Merkle root: equal on replicas holding equal states.
    pub merkle_root: String,
    pub keys: u64,
    pub rounds: u64,
    pub failed_rounds: u64,
    pub keys_compared: u64,
    pub keys_repaired: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub peers: Vec<PeerAntiEntropyView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PeerAntiEntropyView {
    pub name: String,
    pub rounds: u64,
    pub failed_rounds: u64,
    pub last_round_ms_ago: Option<u64>,
    /// What the last successful round did.
    #[schema(value_type = Option<Object>)]
    pub last_round: Option<meridian_replication::RoundReport>,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PeerView {
    pub id: u64,
    pub name: String,
    pub region: String,
    pub address: String,
    /// Our connection to it (on which we pull its ops) is up.
    pub connected: bool,
    /// Its connection to us (on which it pulls ours) is up.
    pub inbound_connected: bool,
    /// The failure detector's verdict.
    pub reachable: bool,
    pub last_heard_ms_ago: Option<u64>,
    pub rtt_ms: Option<f64>,
    /// Its clock minus ours, RTT-corrected; positive when it is ahead.
    pub clock_skew_ms: Option<f64>,
    pub refused_clock_stamps: u64,
    /// This node's ops it has not acknowledged.
    pub lag_ops: u64,
    /// Now minus the HLC time of the oldest op of ours it has not acknowledged.
    pub lag_ms: u64,
    /// Its applied vector, from its latest acknowledgement.
    pub applied: BTreeMap<String, u64>,
    pub ops_sent: u64,
    pub batches_sent: u64,
    pub bytes_sent: u64,
    pub ops_received: u64,
    pub last_batch_ops: u64,
    /// Set when it asked for ops this node's WAL no longer holds.
    pub truncated: Option<String>,
    pub last_error: Option<String>,
}

/// The nodes a consistency level involves; see [`ClusterView::electorate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Electorate {
    /// Nodes needed, this node included.
    pub required: usize,
    /// Peers that count towards `required`.
    pub peers: Vec<NodeId>,
}

/// Static identity plus whatever live components report.
#[derive(Debug)]
pub struct ClusterView {
    cluster: String,
    node: NodeInfo,
    peers: Vec<PeerEntry>,
    replicator: Option<Arc<Replicator>>,
    security: Mutex<SecurityView>,
}

impl ClusterView {
    pub fn new(config: &Config, replicator: Option<Arc<Replicator>>) -> Self {
        Self {
            cluster: config.node.cluster.clone(),
            node: NodeInfo {
                id: config.node.id,
                name: config.node.name.clone(),
                region: config.node.region.clone(),
            },
            peers: config.peers.clone(),
            replicator,
            security: Mutex::new(SecurityView::default()),
        }
    }

    /// Updates what `/v1/cluster` reports under `security`.
    pub fn update_security(&self, change: impl FnOnce(&mut SecurityView)) {
        change(&mut self.security.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn replicator(&self) -> Option<&Replicator> {
        self.replicator.as_deref()
    }

    /// The replicator, shared (for tasks that outlive a borrow).
    pub fn replicator_arc(&self) -> Option<Arc<Replicator>> {
        self.replicator.clone()
    }

    /// Who takes part at `level`: how many nodes (this one included) must hold a write or
    /// answer a read, and the peers that count towards it. LOCAL_QUORUM counts the nodes of
    /// this node's region, GLOBAL_QUORUM and ALL every node.
    pub fn electorate(&self, level: ConsistencyLevel) -> Electorate {
        let peers: Vec<NodeId> = match level {
            ConsistencyLevel::LocalOne => Vec::new(),
            ConsistencyLevel::LocalQuorum => self
                .peers
                .iter()
                .filter(|p| p.region == self.node.region)
                .filter_map(|p| NodeId::new(p.id))
                .collect(),
            ConsistencyLevel::GlobalQuorum | ConsistencyLevel::All => self
                .peers
                .iter()
                .filter_map(|p| NodeId::new(p.id))
                .collect(),
        };
        let nodes = 1 + peers.len();
        let required = match level {
            ConsistencyLevel::LocalOne => 1,
            ConsistencyLevel::LocalQuorum | ConsistencyLevel::GlobalQuorum => nodes / 2 + 1,
            ConsistencyLevel::All => nodes,
        };
        Electorate { required, peers }
    }

    /// The `Replication-Lag` header value: for each region with peers, the largest
    /// [`Replicator::lag`] among its nodes, as `region=ms` pairs joined by `, `, in region order.
    /// Empty on a node without peers.
    pub fn replication_lag_header(&self) -> String {
        let Some(replicator) = &self.replicator else {
            return String::new();
        };
        let mut by_region: BTreeMap<String, u64> = BTreeMap::new();
        for lag in replicator.lag() {
            let entry = by_region.entry(lag.region).or_default();
            *entry = (*entry).max(lag.lag_ms);
        }
        by_region
            .iter()
            .map(|(region, ms)| format!("{region}={ms}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn status(&self, storage: &Storage) -> ClusterStatus {
        ClusterStatus {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            applied: storage
                .applied()
                .iter()
                .map(|(o, s)| (o.to_string(), s))
                .collect(),
            wal_ops: storage.wal_len().unwrap_or(0),
            refused_clock_stamps: storage.refused_stamps(),
            peers: self.peer_views(),
            anti_entropy: self.anti_entropy(storage),
            security: self
                .security
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            gc: self.gc(),
        }
    }

    /// The garbage collector's frontier and the peers it excludes.
    pub fn gc(&self) -> GcView {
        let Some(replicator) = &self.replicator else {
            return GcView::default();
        };
        let status = replicator.gc();
        let name = |id: NodeId| {
            self.peers
                .iter()
                .find(|p| p.id == id.get())
                .map_or_else(|| id.to_string(), |p| p.name.clone())
        };
        let names = |ids: Vec<NodeId>| ids.into_iter().map(name).collect();
        GcView {
            enabled: status.enabled,
            frontier: status
                .frontier
                .map(|v| v.iter().map(|(o, s)| (o.to_string(), s)).collect()),
            waiting_for: names(status.waiting_for),
            excluded: names(status.excluded),
            needs_resync: names(status.needs_resync),
            passes: status.passes,
            failed_passes: status.failed_passes,
            last_pass_ms_ago: status.last_pass_ms_ago,
            keys_removed: status.totals.keys_removed,
            keys_compacted: status.totals.keys_compacted,
            last_error: status.last_error,
        }
    }

    /// The Merkle tree's summary and the anti-entropy counters.
    pub fn anti_entropy(&self, storage: &Storage) -> AntiEntropyView {
        let (root, keys) = storage.with_tree(|t| (t.root(), t.len() as u64));
        let mut view = AntiEntropyView {
            merkle_root: meridian_replication::merkle::hex(&root),
            keys,
            ..AntiEntropyView::default()
        };
        if let Some(replicator) = &self.replicator {
            let status = replicator.anti_entropy();
            view.rounds = status.rounds;
            view.failed_rounds = status.failed_rounds;
            view.keys_compared = status.keys_compared;
            view.keys_repaired = status.keys_repaired;
            view.bytes_sent = status.bytes_sent;
            view.bytes_received = status.bytes_received;
            view.peers = status
                .peers
                .into_iter()
                .map(|p| PeerAntiEntropyView {
                    name: p.name,
                    rounds: p.rounds,
                    failed_rounds: p.failed_rounds,
                    last_round_ms_ago: p.last_round_ms_ago,
                    last_round: p.last_report,
                    last_error: p.last_error,
                })
                .collect();
        }
        view
    }

    fn peer_views(&self) -> Vec<PeerView> {
        let live: BTreeMap<u64, PeerStatus> = self
            .replicator
            .as_ref()
            .map(|r| r.peers().into_iter().map(|p| (p.id.get(), p)).collect())
            .unwrap_or_default();
        self.peers
            .iter()
            .map(|p| {
                let status = live.get(&p.id);
                PeerView {
                    id: p.id,
                    name: p.name.clone(),
                    region: p.region.clone(),
                    address: p.address.clone(),
                    connected: status.is_some_and(|s| s.connected),
                    inbound_connected: status.is_some_and(|s| s.inbound_connected),
                    reachable: status.is_some_and(|s| s.reachable),
                    last_heard_ms_ago: status.and_then(|s| s.last_heard_ms_ago),
                    rtt_ms: status.and_then(|s| s.rtt_ms),
                    clock_skew_ms: status.and_then(|s| s.skew_ms),
                    refused_clock_stamps: status.map_or(0, |s| s.refused_stamps),
                    lag_ops: status.map_or(0, |s| s.lag_ops),
                    lag_ms: status.map_or(0, |s| s.lag_ms),
                    applied: status
                        .map(|s| {
                            s.their_applied
                                .iter()
                                .map(|(o, q)| (o.to_string(), q))
                                .collect()
                        })
                        .unwrap_or_default(),
                    ops_sent: status.map_or(0, |s| s.ops_sent),
                    batches_sent: status.map_or(0, |s| s.batches_sent),
                    bytes_sent: status.map_or(0, |s| s.bytes_sent),
                    ops_received: status.map_or(0, |s| s.ops_received),
                    last_batch_ops: status.map_or(0, |s| s.last_batch_ops),
                    truncated: status.and_then(|s| s.truncated).map(|t| {
                        format!(
                            "ops of node {} before {} were truncated",
                            t.origin, t.first_available
                        )
                    }),
                    last_error: status.and_then(|s| s.last_error.clone()),
                }
            })
            .collect()
    }

    /// Copies live state into the gauges just before a scrape.
    pub fn refresh_metrics(&self, storage: &Storage, metrics: &Metrics) {
        for (origin, seq) in storage.applied().iter() {
            metrics
                .applied_seq
                .get_or_create(&OriginLabels {
                    origin: origin.to_string(),
                })
                .set(i64::try_from(seq).unwrap_or(i64::MAX));
        }
        metrics
            .wal_ops
            .set(i64::try_from(storage.wal_len().unwrap_or(0)).unwrap_or(i64::MAX));
        metrics
            .refused_stamps
            .set(i64::try_from(storage.refused_stamps()).unwrap_or(i64::MAX));
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let ae = self.anti_entropy(storage);
        metrics.merkle_keys.set(gauge(ae.keys));
        for (what, value) in [
            ("rounds", ae.rounds),
            ("failed_rounds", ae.failed_rounds),
            ("keys_compared", ae.keys_compared),
            ("keys_repaired", ae.keys_repaired),
            ("bytes_sent", ae.bytes_sent),
            ("bytes_received", ae.bytes_received),
        ] {
            metrics
                .ae_totals
                .get_or_create(&AeLabels { what })
                .set(gauge(value));
        }
        let regions: BTreeMap<&str, &str> = self
            .peers
            .iter()
            .map(|p| (p.name.as_str(), p.region.as_str()))
            .collect();
        for peer in &ae.peers {
            let labels = PeerLabels {
                peer: peer.name.clone(),
                region: regions
                    .get(peer.name.as_str())
                    .copied()
                    .unwrap_or("")
                    .to_owned(),
            };
            metrics
                .ae_peer_rounds
                .get_or_create(&labels)
                .set(gauge(peer.rounds));
            metrics
                .ae_peer_last_round_ms
                .get_or_create(&labels)
                .set(peer.last_round_ms_ago.map_or(-1, gauge));
        }
        let gc = self.gc();
        for (what, value) in [
            ("passes", gc.passes),
            ("failed_passes", gc.failed_passes),
            ("keys_removed", gc.keys_removed),
            ("keys_compacted", gc.keys_compacted),
        ] {
            metrics
                .gc_totals
                .get_or_create(&AeLabels { what })
                .set(gauge(value));
        }
        for peer in &self.peers {
            let labels = PeerLabels {
                peer: peer.name.clone(),
                region: peer.region.clone(),
            };
            metrics
                .gc_peer_excluded
                .get_or_create(&labels)
                .set(i64::from(gc.excluded.contains(&peer.name)));
            metrics
                .gc_peer_needs_resync
                .get_or_create(&labels)
                .set(i64::from(gc.needs_resync.contains(&peer.name)));
        }
        for peer in self.peer_views() {
            let labels = PeerLabels {
                peer: peer.name.clone(),
                region: peer.region.clone(),
            };
            metrics
                .peer_connected
                .get_or_create(&labels)
                .set(i64::from(peer.connected));
            metrics
                .peer_reachable
                .get_or_create(&labels)
                .set(i64::from(peer.reachable));
            metrics
                .peer_lag_ops
                .get_or_create(&labels)
                .set(gauge(peer.lag_ops));
            metrics
                .peer_lag_ms
                .get_or_create(&labels)
                .set(gauge(peer.lag_ms));
            metrics
                .peer_skew_ms
                .get_or_create(&labels)
                .set(peer.clock_skew_ms.map_or(0, |s| s.round() as i64));
            metrics
                .peer_rtt_ms
                .get_or_create(&labels)
                .set(peer.rtt_ms.map_or(0, |s| s.round() as i64));
            metrics
                .peer_ops_sent
                .get_or_create(&labels)
                .set(gauge(peer.ops_sent));
            metrics
                .peer_bytes_sent
                .get_or_create(&labels)
                .set(gauge(peer.bytes_sent));
            metrics
                .peer_batches_sent
                .get_or_create(&labels)
                .set(gauge(peer.batches_sent));
            metrics
                .peer_ops_received
                .get_or_create(&labels)
                .set(gauge(peer.ops_received));
        }
    }
}
