//! This node's view of the cluster: identity, peers, replication state, for `/v1/cluster` and
//! the replication gauges in `/metrics`.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::config::{Config, PeerEntry};
use crate::metrics::{Metrics, OriginLabels};
use crate::storage::Storage;

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
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PeerView {
    pub id: u64,
    pub name: String,
    pub region: String,
    pub address: String,
    pub connected: bool,
    pub reachable: bool,
}

/// Static identity plus whatever live components report.
#[derive(Debug)]
pub struct ClusterView {
    cluster: String,
    node: NodeInfo,
    peers: Vec<PeerEntry>,
}

impl ClusterView {
    pub fn new(config: &Config) -> Self {
        Self {
            cluster: config.node.cluster.clone(),
            node: NodeInfo {
                id: config.node.id,
                name: config.node.name.clone(),
                region: config.node.region.clone(),
            },
            peers: config.peers.clone(),
        }
    }

    pub fn is_single_node(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn status(&self, storage: &Storage) -> ClusterStatus {
        ClusterStatus {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            applied: storage.applied().iter().map(|(o, s)| (o.to_string(), s)).collect(),
            wal_ops: storage.wal_len().unwrap_or(0),
            refused_clock_stamps: storage.refused_stamps(),
            peers: self
                .peers
                .iter()
                .map(|p| PeerView {
                    id: p.id,
                    name: p.name.clone(),
                    region: p.region.clone(),
                    address: p.address.to_string(),
                    connected: false,
                    reachable: false,
                })
                .collect(),
        }
    }

    /// Copies live state into the gauges just before a scrape.
    pub fn refresh_metrics(&self, storage: &Storage, metrics: &Metrics) {
        for (origin, seq) in storage.applied().iter() {
            metrics
                .applied_seq
                .get_or_create(&OriginLabels { origin: origin.to_string() })
                .set(i64::try_from(seq).unwrap_or(i64::MAX));
        }
        metrics.wal_ops.set(i64::try_from(storage.wal_len().unwrap_or(0)).unwrap_or(i64::MAX));
        metrics.refused_stamps.set(i64::try_from(storage.refused_stamps()).unwrap_or(i64::MAX));
    }
}
