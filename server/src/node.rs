//! One running node: storage, HTTP, and (with peers) replication, under one shutdown token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::cluster::ClusterView;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::session::SessionKeys;
use crate::storage::{Storage, StorageError, StorageOptions};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot resolve peer address {address}: {detail}")]
    Resolve { address: String, detail: String },
    #[error(transparent)]
    Replication(#[from] meridian_replication::ReplicationError),
    #[error(transparent)]
    Session(#[from] crate::session::SecretError),
}

/// Runs the node until `shutdown` is cancelled, then drains HTTP, commits what is queued and
/// returns. `on_ready` receives the bound HTTP address once the node serves.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), NodeError> {
    let node = config.node_id()?;
    let metrics = Arc::new(Metrics::new());
    let storage = Storage::open(
        &config.data_dir(),
        StorageOptions {
            node,
            max_batch: config.storage.max_batch,
            cache_bytes: config.storage.cache_mib * 1024 * 1024,
            max_clock_skew: Duration::from_millis(config.storage.max_clock_skew_ms),
            max_set_elements: config.limits.max_set_elements,
        },
        metrics.clone(),
    )?;
    let listener = TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| NodeError::Bind {
            addr: config.http.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: config.http.listen,
        source,
    })?;

    // A node without peers truncates too: everything is then acknowledged by every peer.
    let peers = config
        .peers
        .iter()
        .filter_map(|p| meridian_crdt::NodeId::new(p.id))
        .collect();
    tokio::spawn(crate::replication::truncate_wal(
        storage.clone(),
        peers,
        config.replication.wal_retention_ops,
        shutdown.child_token(),
    ));
    let replicator = if config.peers.is_empty() {
        None
    } else {
        let replicator =
            Arc::new(crate::replication::start(&config, &storage, shutdown.child_token()).await?);
        tracing::info!(peer_listen = %replicator.local_addr(), peers = config.peers.len(), "replication started");
        Some(replicator)
    };
    let sessions = if let Some(section) = &config.session {
        SessionKeys::load(&config.resolve(&section.secret_file), &config.node.cluster)?
    } else {
        if !config.peers.is_empty() {
            tracing::warn!(
                "no [session] secret_file: session tokens are signed with an ephemeral \
                 secret, so other nodes refuse them and they die with this process"
            );
        }
        SessionKeys::ephemeral(&config.node.cluster)
    };
    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        sessions: Arc::new(sessions),
        storage: storage.clone(),
        limits: Arc::new(config.limits.clone()),
        timeouts: Arc::new(config.timeouts.clone()),
        metrics,
        cluster: Arc::new(ClusterView::new(&config, replicator.clone())),
        ready: ready.clone(),
        in_flight: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
        debug_overwrite: config.debug.allow_state_overwrite,
        data_dir: Arc::new(config.data_dir()),
    };
    let app = api::router(state);
    tracing::info!(node = %node, name = %config.node.name, region = %config.node.region, http = %local, "node serving");
    ready.store(true, Ordering::Release);
    on_ready(local);

    let http_shutdown = shutdown.clone();
    crate::http::serve(listener, app, &config.timeouts, http_shutdown).await;
    ready.store(false, Ordering::Release);
    if let Some(replicator) = &replicator {
        replicator.shutdown().await;
    }
    storage.shutdown().await;
    tracing::info!("node stopped");
    Ok(())
}
