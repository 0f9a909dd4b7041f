//! What a node needs to know to replicate: itself, its peers, its TLS identity, and the knobs.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use meridian_crdt::NodeId;
use rustls_pki_types::ServerName;

use crate::ReplicationError;
use crate::ae::AeLimits;

/// One other node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: NodeId,
    /// The DNS name its certificate carries (e.g. `us-east-1`); TLS checks it both ways.
    pub name: String,
    pub region: String,
    /// Where its replication endpoint listens.
    pub address: SocketAddr,
    /// The `host:port` that `address` was looked up from, when the peer is configured by
    /// name: it is looked up again (through [`ReplicationConfig::resolver`]) before every
    /// reconnection attempt, so a peer that comes back at a new IP address (a recreated
    /// container) is found. `None` for a literal address, which is dialled as is.
    pub host: Option<String>,
}

/// Looks a peer's `host:port` up. The default, [`Dns`], asks the system resolver; a test or
/// a simulation supplies its own names.
pub trait Resolve: fmt::Debug + Send + Sync {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<SocketAddr>> + Send + 'a>>;
}

/// The system resolver (`getaddrinfo`, through tokio): the first address it answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dns;

impl Resolve for Dns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<SocketAddr>> + Send + 'a>> {
        Box::pin(async move {
            tokio::net::lookup_host(host).await?.next().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host} has no address"),
                )
            })
        })
    }
}

/// The PEM bytes of this node's TLS identity. The server reads the files; this crate never
/// touches the filesystem.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The cluster CA: peers' certificates must chain to it.
    pub ca_pem: Vec<u8>,
    /// This node's certificate (first) and any intermediates.
    pub cert_chain_pem: Vec<u8>,
    /// This node's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field(
                "cert_chain_pem",
                &format_args!("{} bytes", self.cert_chain_pem.len()),
            )
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Everything [`crate::Replicator::start`] needs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReplicationConfig {
    pub node: NodeId,
    /// This node's certificate name; peers check it against their configuration.
    pub node_name: String,
    pub region: String,
    /// Nodes of different clusters refuse each other.
    pub cluster: String,
    /// The UDP address the QUIC endpoint binds (server and client at once).
    pub listen: SocketAddr,
    pub peers: Vec<PeerConfig>,
    /// Looks up peers configured by name ([`PeerConfig::host`]) before each reconnection.
    pub resolver: Arc<dyn Resolve>,
    pub tls: TlsMaterial,
    /// A batch closes at this many encoded op bytes (before compression).
    pub batch_max_bytes: usize,
    /// ...or this long after its first op was read, so a lone write ships at once-ish.
    pub batch_max_delay: Duration,
    /// Unacknowledged bytes per subscriber before the publisher stops reading its WAL for it.
    pub window_bytes: usize,
    /// How often each side of a connection sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// A peer not heard for this long is unreachable; after twice this, its ops are relayed.
    pub peer_timeout: Duration,
    /// First reconnect delay; doubles per failure up to `reconnect_max`.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// The round-trip time QUIC assumes before it has measured one: an unanswered dial is
    /// resent after about three times this.
    pub initial_rtt: Duration,
    /// How long `shutdown` waits for tasks and for the endpoint to drain.
    pub shutdown_timeout: Duration,
    /// The anti-entropy worker's schedule and budget.
    pub anti_entropy: AntiEntropyConfig,
    /// Garbage collection at causal stability.
    pub gc: GcConfig,
}

/// When garbage collection runs, and how long it waits for a silent node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcConfig {
    /// Whether passes run at all.
    pub enabled: bool,
    /// Time between passes.
    pub interval: Duration,
    /// If set, a node not heard from for this long no longer holds the frontier back: metadata
    /// stops growing while it is gone, at the price of deletes it may undo when it returns
    /// (see [`crate::gc`]). Unset (the default), only every node's report, or the node's
    /// removal from the membership, lets the frontier pass it.
    pub horizon: Option<Duration>,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(60),
            horizon: None,
        }
    }
}

/// When and how hard anti-entropy works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AntiEntropyConfig {
    /// Whether rounds run on a schedule (a round can always be triggered by hand).
    pub enabled: bool,
    /// Time between the end of one pass over every peer and the start of the next...
    pub interval: Duration,
    /// ...plus a random delay up to this, so nodes do not all sync at once.
    pub jitter: Duration,
    pub limits: AeLimits,
}

impl Default for AntiEntropyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(30),
            jitter: Duration::from_secs(5),
            limits: AeLimits::default(),
        }
    }
}

impl ReplicationConfig {
    /// A configuration with the default knobs: 64 KiB / 2 ms batches, a 4 MiB window,
    /// 250 ms heartbeats, a 1 s peer timeout, reconnects from 100 ms up to 5 s.
    pub fn new(
        node: NodeId,
        node_name: impl Into<String>,
        region: impl Into<String>,
        cluster: impl Into<String>,
        listen: SocketAddr,
        peers: Vec<PeerConfig>,
        tls: TlsMaterial,
    ) -> Self {
        let heartbeat_interval = Duration::from_millis(250);
        Self {
            node,
            node_name: node_name.into(),
            region: region.into(),
            cluster: cluster.into(),
            listen,
            peers,
            resolver: Arc::new(Dns),
            tls,
            batch_max_bytes: 64 * 1024,
            batch_max_delay: Duration::from_millis(2),
            window_bytes: 4 * 1024 * 1024,
            heartbeat_interval,
            peer_timeout: heartbeat_interval * 3 + Duration::from_millis(250),
            reconnect_base: Duration::from_millis(100),
            // A healed partition waits out the current backoff. A dial a second at most,
            // during an outage, costs a few packets. With the 5-s cap of old, convergence after
            // a 20-s cut took 0.94 s; with this and the lower `initial_rtt` (see `tls`) it
            // takes 0.42 s (README, "Convergence after a partition heals").
            reconnect_max: Duration::from_secs(1),
            // quinn's default is 333 ms: a dial made during a partition would then resend its
            // Initial only after about 1 s, and a healed partition wait for it. A round trip
            // longer than this costs one spurious Initial.
            initial_rtt: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(3),
            anti_entropy: AntiEntropyConfig::default(),
            gc: GcConfig::default(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ReplicationError> {
        let bad = |reason: String| Err(ReplicationError::Config(reason));
        let mut ids = BTreeSet::from([self.node]);
        let mut names = BTreeSet::from([self.node_name.as_str()]);
        check_name(&self.node_name)?;
        for peer in &self.peers {
            check_name(&peer.name)?;
            if !ids.insert(peer.id) {
                return bad(format!("node id {} appears twice", peer.id));
            }
            if !names.insert(peer.name.as_str()) {
                return bad(format!("node name {:?} appears twice", peer.name));
            }
        }
        if self.batch_max_bytes == 0 || self.batch_max_bytes > crate::wire::MAX_FRAME / 4 {
            return bad(format!(
                "batch_max_bytes must be in 1..={}",
                crate::wire::MAX_FRAME / 4
            ));
        }
        if self.window_bytes < self.batch_max_bytes {
            return bad("window_bytes must be at least batch_max_bytes".into());
        }
        if self.heartbeat_interval.is_zero() || self.peer_timeout <= self.heartbeat_interval {
            return bad("peer_timeout must exceed a non-zero heartbeat_interval".into());
        }
        if self.gc.interval.is_zero() || self.gc.horizon.is_some_and(|h| h.is_zero()) {
            return bad("gc interval and horizon must be non-zero".into());
        }
        if self.reconnect_base.is_zero() || self.reconnect_max < self.reconnect_base {
            return bad("reconnect_max must be at least a non-zero reconnect_base".into());
        }
        if self.initial_rtt.is_zero() {
            return bad("initial_rtt must be non-zero".into());
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), ReplicationError> {
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Ok(()),
        _ => Err(ReplicationError::Config(format!(
            "node name {name:?} must be a DNS name: its certificate is checked against it"
        ))),
    }
}
