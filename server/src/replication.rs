//! Starting replication for a node with peers, and the WAL truncation worker.

use std::sync::Arc;
use std::time::Duration;

use meridian_crdt::{NodeId, VersionVector};
use meridian_replication::{
    AeLimits, AntiEntropyConfig, GcConfig, PeerConfig, ReplicationConfig, Replicator, TlsMaterial,
};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::node::NodeError;
use crate::storage::Storage;

/// How long start-up keeps retrying to resolve peer host names: under docker compose a peer's
/// name resolves only once its container exists.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(60);

fn read(config: &Config, path: &std::path::Path) -> Result<Vec<u8>, NodeError> {
    let path = config.resolve(path);
    std::fs::read(&path).map_err(|source| NodeError::File {
        path: path.display().to_string(),
        source,
    })
}

async fn resolve(address: &str) -> Result<std::net::SocketAddr, NodeError> {
    let deadline = tokio::time::Instant::now() + RESOLVE_DEADLINE;
    loop {
        match tokio::net::lookup_host(address).await {
            Ok(mut addrs) => {
                if let Some(addr) = addrs.next() {
                    return Ok(addr);
                }
            }
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(NodeError::Resolve {
                    address: address.to_owned(),
                    detail: error.to_string(),
                });
            }
            Err(error) => {
                tracing::info!(%address, %error, "peer address does not resolve yet; retrying");
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NodeError::Resolve {
                address: address.to_owned(),
                detail: "no address".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The node's mesh identity, read from the `[tls]` files (at start-up and on each reload).
pub fn tls_material(config: &Config) -> Result<TlsMaterial, NodeError> {
    let tls = config.tls.as_ref().ok_or_else(|| {
        NodeError::Config(crate::config::ConfigError::Invalid(
            "a node with peers needs [tls]".into(),
        ))
    })?;
    Ok(TlsMaterial {
        ca_pem: read(config, &tls.ca)?,
        cert_chain_pem: read(config, &tls.cert)?,
        key_pem: read(config, &tls.key)?,
    })
}

/// Builds the replication config from the node's and starts the replicator.
pub async fn start(
    config: &Config,
    storage: &Storage,
    shutdown: CancellationToken,
) -> Result<Replicator, NodeError> {
    let (Some(peer), Some(_)) = (&config.peer, &config.tls) else {
        return Err(NodeError::Config(crate::config::ConfigError::Invalid(
            "a node with peers needs [peer] and [tls]".into(),
        )));
    };
    let material = tls_material(config)?;
    let mut peers = Vec::new();
    for entry in &config.peers {
        let id = NodeId::new(entry.id).ok_or_else(|| {
            NodeError::Config(crate::config::ConfigError::Invalid("peer id 0".into()))
        })?;
        peers.push(PeerConfig {
            id,
            name: entry.name.clone(),
            region: entry.region.clone(),
            address: resolve(&entry.address).await?,
            // A name is looked up again before each reconnection (a recreated container comes
            // back at a new IP address); a literal address is dialled as written.
            host: entry
                .address
                .parse::<std::net::SocketAddr>()
                .is_err()
                .then(|| entry.address.clone()),
        });
    }
    let mut replication = ReplicationConfig::new(
        config.node_id()?,
        config.node.name.clone(),
        config.node.region.clone(),
        config.node.cluster.clone(),
        peer.listen,
        peers,
        material,
    );
    let knobs = &config.replication;
    replication.batch_max_bytes = knobs.batch_max_bytes;
    replication.batch_max_delay = Duration::from_millis(knobs.batch_max_delay_ms);
    replication.heartbeat_interval = Duration::from_millis(knobs.heartbeat_ms);
    replication.peer_timeout = Duration::from_millis(knobs.peer_timeout_ms);
    replication.reconnect_base = Duration::from_millis(knobs.reconnect_base_ms);
    replication.reconnect_max = Duration::from_millis(knobs.reconnect_max_ms);
    replication.initial_rtt = Duration::from_millis(knobs.initial_rtt_ms);
    let ae = &config.anti_entropy;
    replication.anti_entropy = AntiEntropyConfig {
        enabled: ae.enabled,
        interval: Duration::from_millis(ae.interval_ms),
        jitter: Duration::from_millis(ae.jitter_ms),
        limits: AeLimits {
            max_keys_per_round: ae.max_keys_per_round,
            batch_keys: ae.batch_keys,
            keys_per_sec: ae.keys_per_sec,
            bytes_per_sec: ae.bytes_per_sec,
            ..AeLimits::default()
        },
    };
    replication.gc = GcConfig {
        enabled: config.gc.enabled,
        interval: Duration::from_millis(config.gc.interval_ms),
        horizon: config.gc.horizon_secs.map(Duration::from_secs),
    };
    Ok(Replicator::start(
        replication,
        Arc::new(storage.clone()),
        shutdown,
    )?)
}

/// The WAL prefix that may go: per origin, what every peer has acknowledged, or, past the
/// retention bound, everything but the newest `retention` ops (a peer that far behind is
/// repaired by anti-entropy instead).
///
/// Retention takes only ops already `folded` (in redb and the Merkle tree). A peer we tell
/// its cursor was truncated repairs itself by anti-entropy and then skips the truncated ops
/// (`meridian_replication::node::fast_forward`); that is sound only if our tree held every one
/// of them when we told it.
pub fn truncation_point(
    peers: &[NodeId],
    acked: &std::collections::BTreeMap<NodeId, VersionVector>,
    applied: &VersionVector,
    folded: &VersionVector,
    retention: u64,
) -> VersionVector {
    let mut everyone: Option<VersionVector> = None;
    for peer in peers {
        let theirs = acked.get(peer).cloned().unwrap_or_default();
        everyone = Some(match everyone {
            None => theirs,
            Some(so_far) => so_far.meet(&theirs),
        });
    }
    let mut below = everyone.unwrap_or_else(|| applied.clone()).meet(applied);
    for (origin, seq) in applied.iter() {
        below.raise(
            origin,
            seq.saturating_sub(retention).min(folded.get(origin)),
        );
    }
    below
}

/// Truncates the WAL every second to what every peer has acknowledged.
pub async fn truncate_wal(
    storage: Storage,
    peers: Vec<NodeId>,
    retention: u64,
    shutdown: CancellationToken,
) {
    let mut done = VersionVector::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let below = truncation_point(
            &peers,
            &storage.peer_vectors(),
            &storage.applied(),
            &storage.folded_applied(),
            retention,
        );
        if done.dominates(&below) {
            continue;
        }
        let removed = storage.truncate_wal(&below);
        tracing::debug!(removed, "WAL truncated");
        done = below;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn truncation_waits_for_the_slowest_peer_and_respects_retention() {
        let applied: VersionVector = [(n(1), 100), (n(2), 50)].into_iter().collect();
        let acked = [
            (n(2), [(n(1), 80), (n(2), 50)].into_iter().collect()),
            (n(3), [(n(1), 60), (n(2), 40)].into_iter().collect()),
        ]
        .into_iter()
        .collect();
        let below = truncation_point(&[n(2), n(3)], &acked, &applied, &applied, 1000);
        assert_eq!(below, [(n(1), 60), (n(2), 40)].into_iter().collect());
        let below = truncation_point(&[n(2), n(3)], &acked, &applied, &applied, 10);
        assert_eq!(below, [(n(1), 90), (n(2), 40)].into_iter().collect());
        // Retention never takes an op not folded yet; what everyone acknowledged still goes.
        let folded: VersionVector = [(n(1), 70)].into_iter().collect();
        let below = truncation_point(&[n(2), n(3)], &acked, &applied, &folded, 10);
        assert_eq!(below, [(n(1), 70), (n(2), 40)].into_iter().collect());
        let silent = truncation_point(&[n(2), n(4)], &acked, &applied, &applied, 1000);
        assert!(
            silent.is_empty(),
            "a peer that never acked holds everything back"
        );
    }
}
