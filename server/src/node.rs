//! One running node: storage, HTTP, and (with peers) replication, under one shutdown token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::{self, App, AppState};
use crate::auth::Auth;
use crate::cluster::ClusterView;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::session::SessionKeys;
use crate::storage::{Storage, StorageError, StorageOptions};
use crate::tls::{CertInfo, HttpTls};

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
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("HTTP {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Runs the node until `shutdown` is cancelled, then drains HTTP, commits what is queued and
/// returns. `on_ready` receives the bound HTTP address once the node serves.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), NodeError> {
    let node = config.node_id()?;
    // Credentials first: a node with a bad token file or certificate must not open storage or
    // bind anything.
    let auth = Arc::new(Auth::load(&config)?);
    let http_tls = match &config.http.tls {
        Some(files) => Some(Arc::new(HttpTls::load(
            config.resolve(&files.cert),
            config.resolve(&files.key),
        )?)),
        None => None,
    };
    if !auth.enabled() {
        tracing::warn!(
            "[auth] enabled = false: every route is open to anyone who can reach the port"
        );
    }
    if http_tls.is_none() {
        tracing::warn!(
            "[http] plaintext = true: the API (and its bearer tokens) travel unencrypted"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let storage = Storage::open(
        &config.data_dir(),
        StorageOptions {
            node,
            journal_dir: config.journal_dir(),
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
    let state = AppState::new(App {
        sessions: Arc::new(sessions),
        storage: storage.clone(),
        limits: Arc::new(config.limits.clone()),
        timeouts: Arc::new(config.timeouts.clone()),
        metrics,
        cluster: Arc::new(ClusterView::new(&config, replicator.clone())),
        ready: ready.clone(),
        in_flight: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
        answer_budget: Arc::new(Semaphore::new(api::budget::answer_budget_units(
            config.limits.answer_buffer_bytes,
        ))),
        debug_overwrite: config.debug.allow_state_overwrite,
        auth: auth.clone(),
        data_dir: Arc::new(config.data_dir()),
    });
    let reloader = Arc::new(Reloader {
        config: config.clone(),
        auth,
        http_tls: http_tls.clone(),
        replicator: replicator.clone(),
        cluster: state.cluster.clone(),
    });
    reloader.record(None);
    tokio::spawn(reload_on_sighup(reloader, shutdown.child_token()));
    let app = api::router(state);
    tracing::info!(node = %node, name = %config.node.name, region = %config.node.region, http = %local, "node serving");
    ready.store(true, Ordering::Release);
    on_ready(local);

    let http_shutdown = shutdown.clone();
    crate::http::serve(listener, app, &config.timeouts, http_tls, http_shutdown).await;
    ready.store(false, Ordering::Release);
    if let Some(replicator) = &replicator {
        replicator.shutdown().await;
    }
    storage.shutdown().await;
    tracing::info!("node stopped");
    Ok(())
}

/// What SIGHUP re-reads: the tokens file, the HTTP certificate, the mesh identity.
#[derive(Debug)]
struct Reloader {
    config: Config,
    auth: Arc<Auth>,
    http_tls: Option<Arc<HttpTls>>,
    replicator: Option<Arc<meridian_replication::Replicator>>,
    cluster: Arc<ClusterView>,
}

impl Reloader {
    /// Reloads each part independently: a broken new certificate leaves that part on the old
    /// one and is reported, without stopping the others from reloading.
    fn reload(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.auth.enabled() {
            match self.auth.reload() {
                Ok(tokens) => tracing::info!(tokens, "tokens reloaded"),
                Err(error) => errors.push(error.to_string()),
            }
        }
        if let Some(tls) = &self.http_tls {
            match tls.reload() {
                Ok(info) => {
                    tracing::info!(fingerprint = %info.fingerprint_sha256, not_after = %info.not_after, "HTTP certificate reloaded");
                }
                Err(error) => errors.push(format!("HTTP {error}")),
            }
        }
        if let Some(replicator) = &self.replicator {
            let reloaded = crate::replication::tls_material(&self.config)
                .map_err(|e| e.to_string())
                .and_then(|m| replicator.reload_tls(&m).map_err(|e| e.to_string()));
            if let Err(error) = reloaded {
                errors.push(format!("peer {error}"));
            }
        }
        errors
    }

    /// Publishes the certificates now in use (and the outcome of a reload) in `/v1/cluster`.
    fn record(&self, outcome: Option<&[String]>) {
        let peer = self
            .replicator
            .as_ref()
            .and_then(|_| crate::replication::tls_material(&self.config).ok())
            .and_then(|m| leaf_info(&m.cert_chain_pem));
        let http = self.http_tls.as_ref().map(|t| t.info());
        self.cluster.update_security(|view| {
            view.auth_enabled = self.auth.enabled();
            view.http_certificate = http;
            match outcome {
                None => view.peer_certificate = peer,
                Some([]) => {
                    view.peer_certificate = peer;
                    view.reloads += 1;
                    view.last_reload_error = None;
                }
                Some(errors) => view.last_reload_error = Some(errors.join("; ")),
            }
        });
    }
}

fn leaf_info(chain_pem: &[u8]) -> Option<CertInfo> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(chain_pem).next()?.ok()?;
    Some(CertInfo::of(&leaf))
}

/// Reloads credentials on every SIGHUP until shutdown.
async fn reload_on_sighup(reloader: Arc<Reloader>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP: certificates and tokens reload only on restart");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            received = hangup.recv() => if received.is_none() { return },
        }
        tracing::info!("SIGHUP: reloading tokens and certificates");
        let errors = reloader.reload();
        for error in &errors {
            tracing::error!(%error, "reload failed; keeping the previous credentials");
        }
        reloader.record(Some(&errors));
    }
}
