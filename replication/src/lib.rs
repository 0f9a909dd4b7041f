//! Meridian's node-to-node protocol: WAL shipping over a QUIC full mesh with mutual TLS.
//!
//! # How it fits
//! The server owns storage and implements [`ReplicaStore`]; it builds a [`ReplicationConfig`]
//! and calls [`Replicator::start`]. From then on every node pulls every other node's ops and
//! applies them through the trait; the server reads [`Replicator::peers`] for `/v1/cluster`,
//! [`Replicator::watch_reachable`] to refuse quorum requests early, and
//! [`Replicator::watch_acks`] to wait for quorum acknowledgements.
//!
//! # Pull-based, per-origin subscriptions
//! Every node's WAL holds the ops of *every* origin it applied (its own and relayed ones),
//! keyed by (origin, sequence). Node R dials each peer S and, on that connection, subscribes
//! to a set of origins, each "after sequence n" where n is R's applied vector entry:
//! - R always subscribes to S's own ops from S;
//! - R subscribes to a third origin O from S only while O is *suspected* by R's failure
//!   detector (unreachable for longer than the peer timeout). So the ops of a node that died
//!   for good reach every survivor as soon as any survivor has them, and while everyone is up
//!   no op travels twice.
//!
//! S streams `Batch`es as its applied vector advances, pipelined within a byte window; R
//! applies them (idempotently, in per-origin order) and acks its applied vector, which S
//! persists as R's cursor. R's applied vector *is* the resume point: after a restart or a
//! partition R subscribes from it again, so nothing is skipped and replays have no effect.
//! Pulling (rather than S pushing from its own cursor for R) means the subscriber is the single
//! source of truth for where to resume, and a relay needs no extra coordination.
//!
//! # Layout
//! - [`wire`]: frames and messages (length-prefixed, lz4, postcard; never panics on input).
//! - [`plan`] and [`outbound`]: the sans-IO decisions — failure detector, subscription
//!   planner, reconnect backoff, skew estimate; batching, window and ack handling.
//! - `node`: the tokio/quinn driver running them; [`Replicator`] is its handle.
//! - [`merkle`] and [`ae`]: the anti-entropy Merkle tree and the sync dialogue (sans-IO
//!   round logic over an [`ae::AeTransport`]); `node` runs it on a schedule over QUIC.
//! - [`gc`]: the stable frontier for garbage collection ([`gc::StabilityTracker`], sans-IO)
//!   and the down-node horizon; `node` hands the frontier to [`ReplicaStore::collect_garbage`]
//!   on a schedule.
//! - [`mem`]: [`MemStore`], the in-memory [`ReplicaStore`] used by tests and simulation.

pub mod ae;
mod config;
pub mod gc;
pub mod mem;
pub mod merkle;
mod node;
pub mod outbound;
pub mod plan;
pub mod store;
mod tls;
pub mod wire;

use std::net::SocketAddr;

pub use ae::{AeError, AeLimits, RoundReport};
pub use config::{
    AntiEntropyConfig, Dns, GcConfig, PeerConfig, ReplicationConfig, Resolve, TlsMaterial,
};
pub use gc::{Frontier, GcStats, StabilityTracker};
pub use mem::MemStore;
pub use node::{
    AntiEntropyStatus, GcStatus, PeerAntiEntropy, PeerLag, PeerStatus, ReadError, Replicator,
    Truncation,
};
pub use store::{ReplicaStore, StateRead, StoreError};

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    #[error("invalid replication config: {0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot bind the replication endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}
