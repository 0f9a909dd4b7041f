//! The tokio/quinn driver: sockets, timers and tasks around the sans-IO cores.
//!
//! # Tasks
//! - **accept**: takes incoming connections; each becomes a *publisher session* that checks the
//!   peer's `Hello` and then serves its subscription ([`crate::outbound::Outbound`]).
//! - **dial**, one per peer: keeps one outgoing connection to it (reconnecting with backoff);
//!   on it runs the *subscriber session*: subscribe ([`crate::plan`]), apply batches, ack.
//! - **monitor**: re-evaluates the failure detector and publishes `reachable` / `suspected`.
//! - **supervisor**: on shutdown closes the endpoint, waits for the other tasks, then for the
//!   endpoint to drain (each bounded by `shutdown_timeout`).
//!
//! # Streams of a connection from subscriber R to publisher S
//! - one bidirectional *control* stream, opened by R: `Hello` both ways, then R → S
//!   `Subscribe`, `Ack`, `Heartbeat`; S → R `Heartbeat`, `Truncated`. Its send side has a higher
//!   priority than batches, so heartbeats (and thus liveness and skew) are not queued behind
//!   megabytes of data.
//! - one unidirectional *batch* stream S → R carrying `Batch` frames.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meridian_crdt::{Kind, NodeId, Op, Stamp, State, VersionVector, codec};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::ae::{AeError, AeTransport, RoundReport, WalGaps};
use crate::config::{PeerConfig, ReplicationConfig};
use crate::gc::{Frontier, GcStats, StabilityTracker};
use crate::outbound::{Action, Limits, Outbound};
use crate::plan::{Backoff, Inbound, Liveness, SkewEstimator, plan_subscription};
use crate::store::{Applying, ReplicaStore, StateRead, StoreError};
use crate::wire::{self, Hello, Message, PROTOCOL_VERSION, WireError};
use crate::{ReplicationError, tls};

/// Connection close codes, so the other side's logs say why.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;
const CLOSE_REPLACED: u32 = 3;
const CLOSE_STORE: u32 = 4;

/// Ops per WAL read: bytes bound batches; this only bounds the allocation of one read.
const MAX_OPS_PER_READ: usize = 4096;
/// At most this many ops of queued batches from one peer go to the store as one apply.
const MAX_MERGED_OPS: usize = 8192;
/// Applies of one peer's batches queued in the store and not yet durable; further batches
/// wait (and are then merged) until the oldest completes.
const MAX_QUEUED_APPLIES: usize = 4;

/// Quorum-read requests one peer may have in flight on its connection to us.
const MAX_CONCURRENT_READS: usize = 64;

/// How long a read request stream may take to deliver its request.
const READ_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long answering a read waits for the snapshot's ops to become durable here.
const READ_DURABLE_WAIT: Duration = Duration::from_secs(1);

/// Why a quorum read from a peer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("node {0} is not a configured peer")]
    UnknownPeer(NodeId),
    #[error("no connection to node {0}")]
    NotConnected(NodeId),
    #[error("bad request: {0}")]
    Request(#[from] WireError),
    #[error("transport: {0}")]
    Transport(String),
    #[error("the peer could not answer: {0}")]
    Failed(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("bad state from the peer: {0}")]
    State(#[from] meridian_crdt::CrdtError),
}

/// How stale this node's copy of one peer's writes may be; see [`Replicator::lag`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLag {
    pub id: NodeId,
    pub region: String,
    pub lag_ms: u64,
}

/// Everything that ends a session. Sessions end on any error; the dialer then reconnects.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("bad op in batch: {0}")]
    Op(#[from] meridian_crdt::CrdtError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("stream ended")]
    Ended,
}

/// What a peer could not serve us: its WAL no longer has our cursor for `origin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub origin: NodeId,
    pub first_available: u64,
}

/// One peer as this node sees it, for `/v1/cluster` and metrics.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PeerStatus {
    pub id: NodeId,
    pub name: String,
    pub region: String,
    pub address: SocketAddr,
    /// Our outgoing connection (on which we pull its ops) is up.
    pub connected: bool,
    /// Its connection to us (on which it pulls ours) is up.
    pub inbound_connected: bool,
    /// The failure detector's verdict.
    pub reachable: bool,
    pub last_heard_ms_ago: Option<u64>,
    pub rtt_ms: Option<f64>,
    /// Its clock minus ours, RTT-corrected and smoothed; positive when it is ahead.
    pub skew_ms: Option<f64>,
    /// Its stamps our HLC refused as too far ahead.
    pub refused_stamps: u64,
    /// What we shipped to it (bytes: compressed frames).
    pub ops_sent: u64,
    pub batches_sent: u64,
    pub bytes_sent: u64,
    /// What we applied from it (its own ops and relayed ones).
    pub ops_received: u64,
    pub batches_received: u64,
    pub last_batch_ops: u64,
    /// Its applied vector, from its latest ack (or as persisted at start).
    pub their_applied: VersionVector,
    /// Ops of this node's own origin it has not acknowledged.
    pub lag_ops: u64,
    /// Age (HLC) of the oldest op of ours it has not acknowledged; 0 when caught up.
    pub lag_ms: u64,
    pub truncated: Option<Truncation>,
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct PeerState {
    /// Where we dial it: the configured address, or what its host name last resolved to.
    address: SocketAddr,
    liveness: Liveness,
    /// Any message on any connection with the peer, for display.
    last_heard: Option<Instant>,
    inbound_connected: bool,
    /// Cancels the current inbound session when the peer reconnects, so one remains.
    inbound_session: Option<CancellationToken>,
    /// Numbers inbound sessions, so an old one ending does not clear a newer one's state.
    inbound_generation: u64,
    rtt: Option<Duration>,
    skew: SkewEstimator,
    refused_stamps: u64,
    ops_sent: u64,
    batches_sent: u64,
    bytes_sent: u64,
    ops_received: u64,
    batches_received: u64,
    last_batch_ops: u64,
    their_applied: VersionVector,
    truncated: Option<Truncation>,
    last_error: Option<String>,
    /// Our current outgoing connection, on which quorum reads are sent.
    conn: Option<Connection>,
    /// The last time we held every op of the peer's own origin that it had reported holding.
    caught_up: Option<Instant>,
}

impl PeerState {
    /// Notes that we hold `ours` of the peer's own ops; caught up when that covers what it
    /// last acknowledged holding itself.
    fn check_caught_up(&mut self, peer: NodeId, ours: u64, now: Instant) {
        if ours >= self.their_applied.get(peer) {
            self.caught_up = Some(now);
        }
    }
}

#[derive(Debug)]
struct PeerSlot {
    config: PeerConfig,
    state: Mutex<PeerState>,
    /// Woken when the peer connects to us: it is up, so our dial to it stops waiting out its
    /// backoff, or an unanswered handshake (QUIC retransmits the Initial only after about a
    /// second), and starts again; see [`dial_loop`].
    redial: Notify,
    /// Woken after a fast-forward (see [`fast_forward`]): the subscription to this peer starts
    /// over from the raised applied vector.
    resubscribe: Notify,
}

impl PeerSlot {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The store as the status code needs it: object-safe, so [`Replicator`] is not generic.
trait StatusSource: Send + Sync {
    fn applied(&self) -> VersionVector;
    fn stamp_after(&self, origin: NodeId, after: u64) -> Option<Stamp>;
    fn now(&self) -> Stamp;
}

impl<S: ReplicaStore> StatusSource for S {
    fn applied(&self) -> VersionVector {
        ReplicaStore::applied(self)
    }
    fn stamp_after(&self, origin: NodeId, after: u64) -> Option<Stamp> {
        self.read_wal(origin, after, 1, 1)
            .ok()?
            .first()
            .map(|op| op.stamp)
    }
    fn now(&self) -> Stamp {
        ReplicaStore::now(self)
    }
}

struct Shared {
    config: ReplicationConfig,
    peers: BTreeMap<NodeId, PeerSlot>,
    reachable: watch::Sender<BTreeSet<NodeId>>,
    /// Peers unreachable for long enough that their ops are pulled from others.
    suspected: watch::Sender<BTreeSet<NodeId>>,
    acks: watch::Sender<BTreeMap<NodeId, VersionVector>>,
    refused_connections: AtomicU64,
    status: Arc<dyn StatusSource>,
    /// Used for every new outbound connection; swapped whole by [`Replicator::reload_tls`], so a
    /// dial uses either the old identity or the new one, never a mix.
    client_config: Mutex<quinn::ClientConfig>,
    started: Instant,
    /// Anti-entropy counters and each peer's last round.
    ae: Mutex<AeBook>,
    /// Every node's applied vector as reported, for the GC frontier.
    stability: Mutex<StabilityTracker>,
    /// What garbage collection has done.
    gc: Mutex<GcStatus>,
    /// Woken when a peer reports our cursor truncated: anti-entropy with it should not wait
    /// for the next scheduled pass.
    repair_truncated: Notify,
}

/// Garbage collection at causal stability, for `/v1/cluster` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcStatus {
    pub enabled: bool,
    /// The frontier of the last pass; `None` while some node has not reported.
    pub frontier: Option<VersionVector>,
    /// Nodes whose usable report the frontier is waiting for.
    pub waiting_for: Vec<NodeId>,
    /// Nodes silent for longer than the GC horizon: the frontier ignores them.
    pub excluded: Vec<NodeId>,
    /// Nodes that were excluded and have not finished an anti-entropy round with us since:
    /// their old writes may revive keys deleted meanwhile (see `meridian_replication::gc`).
    pub needs_resync: Vec<NodeId>,
    pub passes: u64,
    pub failed_passes: u64,
    pub last_pass_ms_ago: Option<u64>,
    /// The last pass that ran, and the sums since start-up.
    pub last: Option<GcStats>,
    pub totals: GcStats,
    pub last_error: Option<String>,
    last_pass: Option<Instant>,
}

/// What anti-entropy has done, for `/v1/cluster` and metrics.
#[derive(Debug, Default)]
struct AeBook {
    totals: AntiEntropyStatus,
    peers: BTreeMap<NodeId, PeerAeBook>,
}

#[derive(Debug, Default)]
struct PeerAeBook {
    rounds: u64,
    failed_rounds: u64,
    last_round: Option<Instant>,
    last_report: Option<RoundReport>,
    last_error: Option<String>,
}

/// Anti-entropy totals since start-up, and per peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AntiEntropyStatus {
    pub rounds: u64,
    pub failed_rounds: u64,
    pub keys_compared: u64,
    /// Keys whose state changed here or at the peer.
    pub keys_repaired: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub peers: Vec<PeerAntiEntropy>,
}

/// One peer's anti-entropy rounds.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerAntiEntropy {
    pub id: NodeId,
    pub name: String,
    pub rounds: u64,
    pub failed_rounds: u64,
    pub last_round_ms_ago: Option<u64>,
    pub last_report: Option<RoundReport>,
    pub last_error: Option<String>,
}

/// A round asked for by hand: the peer, and where to send the report.
type AeJob = (
    NodeId,
    tokio::sync::oneshot::Sender<Result<RoundReport, AeError>>,
);

/// Anti-entropy over our outgoing QUIC connection to a peer: one bidirectional stream per
/// request, served by the peer's `answer_read`.
struct QuicPeer(Connection);

impl AeTransport for QuicPeer {
    async fn call(&self, request: Message) -> Result<(Message, u64, u64), AeError> {
        let transport = |e: SessionError| AeError::Transport(e.to_string());
        let (mut send, mut recv) = self
            .0
            .open_bi()
            .await
            .map_err(|e| AeError::Transport(e.to_string()))?;
        let sent = write_message(&mut send, &request)
            .await
            .map_err(transport)?;
        let _ = send.finish();
        let (reply, received) = read_message_sized(&mut recv).await.map_err(transport)?;
        Ok((reply, sent as u64, received as u64))
    }
}

/// Runs one round with `peer` and books its outcome.
async fn ae_round<S: ReplicaStore>(
    shared: &Shared,
    store: &S,
    peer: NodeId,
) -> Result<RoundReport, AeError> {
    let slot = shared
        .slot(peer)
        .ok_or_else(|| AeError::UnknownPeer(peer.to_string()))?;
    // Only a round that starts after the peer reported the truncation may fast-forward past it.
    let (conn, truncation) = {
        let state = slot.lock();
        (state.conn.clone(), state.truncated)
    };
    // The fast-forward below then raises the applied vector past what the round merged
    // ahead of it for these origins.
    let wal_gaps = wal_gaps(shared);
    let result = match conn {
        Some(conn) => {
            let limits = &shared.config.anti_entropy.limits;
            let gaps = WalGaps::Only(&wal_gaps);
            crate::ae::run_round(store, &QuicPeer(conn), limits, gaps).await
        }
        None => Err(AeError::NotConnected(slot.config.name.clone())),
    };
    book_round(shared, peer, &result);
    if let (Ok(report), Some(truncation)) = (&result, truncation) {
        if report.complete {
            fast_forward(store, slot, truncation).await;
        }
    }
    result
}

/// Origins a peer reported truncated for us: the WAL cannot bring their ops any more, so
/// anti-entropy merges their states even ahead of our applied vector.
fn wal_gaps(shared: &Shared) -> BTreeSet<NodeId> {
    shared
        .peers
        .values()
        .filter_map(|slot| slot.lock().truncated.map(|t| t.origin))
        .collect()
}

/// Counts a round's outcome for `/v1/cluster` and metrics.
fn book_round(shared: &Shared, peer: NodeId, result: &Result<RoundReport, AeError>) {
    let mut book = shared.ae.lock().unwrap_or_else(PoisonError::into_inner);
    let entry = book.peers.entry(peer).or_default();
    entry.last_round = Some(Instant::now());
    match result {
        Ok(report) => {
            if report.complete {
                shared.stability().on_resynced(peer);
            }
            entry.rounds += 1;
            entry.last_report = Some(report.clone());
            entry.last_error = None;
            let totals = &mut book.totals;
            totals.rounds += 1;
            totals.keys_compared += report.keys_compared;
            totals.keys_repaired += report.keys_repaired_here + report.keys_repaired_there;
            totals.bytes_sent += report.bytes_sent;
            totals.bytes_received += report.bytes_received;
            if report.keys_repaired_here + report.keys_repaired_there > 0 {
                info!(peer = %peer, ?report, "anti-entropy repaired keys");
            } else if !report.complete {
                debug!(peer = %peer, ?report, "anti-entropy round left differences for the next one");
            }
        }
        Err(e) => {
            entry.failed_rounds += 1;
            entry.last_error = Some(e.to_string());
            book.totals.failed_rounds += 1;
            debug!(peer = %peer, error = %e, "anti-entropy round failed; retried next round");
        }
    }
}

/// Resumes the WAL path past ops a peer truncated before we had them, once a complete
/// anti-entropy round with that peer has given us their effects.
///
/// Why the round covers them: the peer truncates an op only after it is folded into its
/// states and Merkle tree (the server caps retention at its folded vector; acknowledged ops we
/// already hold). So from the moment it reported `Truncated`, its tree reflects every op of
/// the origin below `first_available`. A complete round that started after that report joined
/// into ours every state of the peer that differed, as the peer held it then or later, and
/// states only grow. The store then raises our applied entry for the origin to
/// `first_available - 1`, durably, after those merges, and the subscription starts over from
/// there. Without this, the origin's later ops would reach us only through anti-entropy.
async fn fast_forward<S: ReplicaStore>(store: &S, slot: &PeerSlot, truncation: Truncation) {
    let Truncation {
        origin,
        first_available,
    } = truncation;
    let peer = slot.config.id;
    let to = first_available.saturating_sub(1);
    match store.fast_forward(origin, to).await {
        Ok(applied) => {
            info!(peer = %peer, origin = %origin, to, applied = applied.get(origin),
                "anti-entropy covered the truncated ops; resuming the WAL path past them");
            {
                let mut state = slot.lock();
                if state.truncated == Some(truncation) {
                    state.truncated = None;
                }
            }
            slot.resubscribe.notify_one();
        }
        Err(e) => warn!(peer = %peer, origin = %origin, error = %e,
            "cannot fast-forward past truncated ops; anti-entropy keeps repairing"),
    }
}

/// One garbage-collection pass: the frontier, then storage drops what it covers.
async fn gc_pass<S: ReplicaStore>(shared: &Shared, store: &S) {
    let frontier = shared
        .stability()
        .frontier(&store.applied(), Instant::now());
    let result = match &frontier {
        Frontier::Stable(vector) => Some(store.collect_garbage(vector).await),
        Frontier::Waiting(_) => None,
    };
    let mut book = shared.gc.lock().unwrap_or_else(PoisonError::into_inner);
    book.last_pass = Some(Instant::now());
    match frontier {
        Frontier::Stable(vector) => {
            book.frontier = Some(vector);
            book.waiting_for.clear();
        }
        Frontier::Waiting(nodes) => {
            book.frontier = None;
            book.waiting_for = nodes.into_iter().collect();
        }
    }
    match result {
        Some(Ok(stats)) => {
            book.passes += 1;
            book.totals.add(&stats);
            book.last = Some(stats);
            book.last_error = None;
            if stats.keys_removed + stats.keys_compacted > 0 {
                info!(?stats, "garbage collection at the stable frontier");
            }
        }
        Some(Err(e)) => {
            book.failed_passes += 1;
            warn!(error = %e, "garbage collection failed; retried next pass");
            book.last_error = Some(e.to_string());
        }
        None => {}
    }
}

/// The garbage collector: one pass every `gc.interval`.
async fn gc_loop<S: ReplicaStore>(
    shared: Arc<SharedHandle>,
    store: Arc<S>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.config.gc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => gc_pass(&shared, &*store).await,
        }
    }
}

/// The anti-entropy worker: every interval (plus jitter) one round with each peer, in a
/// shuffled order; rounds asked for by hand run in between. A failed round is simply retried
/// at the next pass.
async fn anti_entropy_loop<S: ReplicaStore>(
    shared: Arc<SharedHandle>,
    store: Arc<S>,
    mut jobs: mpsc::Receiver<AeJob>,
    cancel: CancellationToken,
) {
    let config = shared.config.anti_entropy.clone();
    let next_pass = || {
        let jitter = config.jitter.as_millis() as u64;
        let extra = if jitter == 0 { 0 } else { random() % jitter };
        tokio::time::Instant::now() + config.interval + Duration::from_millis(extra)
    };
    let mut due = next_pass();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            job = jobs.recv() => {
                let Some((peer, reply)) = job else { return };
                let _ = reply.send(ae_round(&shared, &*store, peer).await);
            }
            () = shared.repair_truncated.notified() => {
                let truncated: Vec<NodeId> = shared
                    .peers
                    .iter()
                    .filter(|(_, slot)| slot.lock().truncated.is_some())
                    .map(|(&id, _)| id)
                    .collect();
                if !rounds(&shared, &*store, truncated, &cancel).await {
                    return;
                }
            }
            () = sleep_until(due), if config.enabled => {
                let mut peers: Vec<NodeId> = shared.peers.keys().copied().collect();
                for i in (1..peers.len()).rev() {
                    let j = (random() % (i as u64 + 1)) as usize;
                    peers.swap(i, j);
                }
                if !rounds(&shared, &*store, peers, &cancel).await {
                    return;
                }
                due = next_pass();
            }
        }
    }
}

/// One round with each of `peers` in turn; false if cancelled on the way.
async fn rounds<S: ReplicaStore>(
    shared: &Shared,
    store: &S,
    peers: Vec<NodeId>,
    cancel: &CancellationToken,
) -> bool {
    for peer in peers {
        if cancel.is_cancelled() {
            return false;
        }
        let _ = ae_round(shared, store, peer).await;
    }
    true
}

impl Shared {
    fn slot(&self, id: NodeId) -> Option<&PeerSlot> {
        self.peers.get(&id)
    }

    fn limits(&self) -> Limits {
        Limits {
            batch_max_bytes: self.config.batch_max_bytes,
            batch_max_delay: self.config.batch_max_delay,
            window_bytes: self.config.window_bytes,
        }
    }

    /// Recomputes the failure detector's sets and publishes them when they change.
    fn refresh(&self, now: Instant) {
        let mut reachable = BTreeSet::new();
        let mut suspected = BTreeSet::new();
        for (&id, slot) in &self.peers {
            let state = slot.lock();
            if state.liveness.is_reachable(now) {
                reachable.insert(id);
            }
            if state.liveness.is_suspected(now) {
                suspected.insert(id);
            }
        }
        self.reachable
            .send_if_modified(|current| replace_if_changed(current, reachable));
        self.suspected
            .send_if_modified(|current| replace_if_changed(current, suspected));
    }

    /// Heard a message from `peer`; `outgoing` when on our connection to it (failure detector).
    fn heard(&self, peer: NodeId, outgoing: bool) {
        if let Some(slot) = self.slot(peer) {
            let now = Instant::now();
            self.stability().on_heard(peer, now);
            let ours = if outgoing {
                self.status.applied().get(peer)
            } else {
                0
            };
            let mut state = slot.lock();
            state.last_heard = Some(now);
            if outgoing {
                state.liveness.on_heard(now);
                // On our subscription the peer serves its ops in order: hearing from it while
                // holding all it reported holding means our copy is current as of now.
                state.check_caught_up(peer, ours, now);
            }
        }
    }

    /// Feeds a remote stamp to the HLC, counting refusals against `peer`.
    fn observe<S: ReplicaStore>(&self, store: &S, peer: NodeId, stamp: Stamp) {
        if !store.observe_stamp(stamp) {
            if let Some(slot) = self.slot(peer) {
                slot.lock().refused_stamps += 1;
            }
            debug!(peer = %peer, "refused a clock stamp beyond the maximum skew");
        }
    }

    fn on_heartbeat<S: ReplicaStore>(
        &self,
        store: &S,
        conn: &Connection,
        peer: NodeId,
        stamp: Stamp,
        wall_ms: u64,
        outgoing: bool,
    ) {
        self.heard(peer, outgoing);
        self.observe(store, peer, stamp);
        if let Some(slot) = self.slot(peer) {
            let rtt = conn.rtt();
            let mut state = slot.lock();
            state.rtt = Some(rtt);
            state.skew.sample(wall_ms, store.wall_clock_ms(), rtt);
        }
    }

    fn stability(&self) -> MutexGuard<'_, StabilityTracker> {
        self.stability
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set_error(&self, peer: NodeId, error: &SessionError) {
        if let Some(slot) = self.slot(peer) {
            slot.lock().last_error = Some(error.to_string());
        }
    }
}

fn replace_if_changed<T: PartialEq>(current: &mut T, next: T) -> bool {
    if *current == next {
        false
    } else {
        *current = next;
        true
    }
}

fn heartbeat_message<S: ReplicaStore>(store: &S) -> Message {
    Message::Heartbeat {
        stamp: store.now(),
        wall_ms: store.wall_clock_ms(),
    }
}

fn wall_clock_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh random number for jitter, from std's per-process random hasher keys.
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(wall_clock_millis());
    hasher.finish()
}

/// A running replication endpoint. Dropping it stops it (without waiting); prefer
/// [`Replicator::shutdown`], which waits for connections to close cleanly.
#[derive(Debug)]
pub struct Replicator {
    shared: Arc<SharedHandle>,
    local_addr: SocketAddr,
    /// Kept to swap its server config when the TLS identity is reloaded; released on shutdown,
    /// since a live handle keeps the UDP socket bound.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// The caller's token: cancelling it stops us.
    external: CancellationToken,
    /// Ours, a child of `external`, so that [`Self::shutdown`] and drop stop only us.
    cancel: CancellationToken,
    supervisor: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Rounds asked for by hand, run by the anti-entropy worker.
    ae_jobs: mpsc::Sender<AeJob>,
}

/// `Shared` without its non-Debug parts in the way of `#[derive(Debug)]`.
struct SharedHandle(Shared);

impl std::fmt::Debug for SharedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("node", &self.0.config.node)
            .field("peers", &self.0.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for SharedHandle {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Replicator {
    /// Binds the QUIC endpoint on `config.listen` and starts replicating with every peer.
    /// Returns once bound; connections come up in the background. Must be called inside a
    /// tokio runtime. Cancelling `shutdown` (or calling [`Self::shutdown`]) stops it.
    pub fn start<S: ReplicaStore>(
        config: ReplicationConfig,
        store: Arc<S>,
        shutdown: CancellationToken,
    ) -> Result<Self, ReplicationError> {
        config.validate()?;
        if store.node_id() != config.node {
            return Err(ReplicationError::Config(format!(
                "store belongs to node {}, config to node {}",
                store.node_id(),
                config.node
            )));
        }
        let server = tls::server_config(&config.tls, &config)?;
        let client_config = tls::client_config(&config.tls, &config)?;
        let bind_error = |source| ReplicationError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_error)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&config.tls)?,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| ReplicationError::Bind {
                addr: config.listen,
                source,
            })?;

        let now = Instant::now();
        let persisted = store.peer_applied();
        let peers = config
            .peers
            .iter()
            .map(|peer| {
                let state = PeerState {
                    address: peer.address,
                    liveness: Liveness::new(now, config.peer_timeout),
                    last_heard: None,
                    inbound_connected: false,
                    inbound_session: None,
                    inbound_generation: 0,
                    rtt: None,
                    skew: SkewEstimator::default(),
                    refused_stamps: 0,
                    ops_sent: 0,
                    batches_sent: 0,
                    bytes_sent: 0,
                    ops_received: 0,
                    batches_received: 0,
                    last_batch_ops: 0,
                    their_applied: persisted.get(&peer.id).cloned().unwrap_or_default(),
                    truncated: None,
                    last_error: None,
                    conn: None,
                    caught_up: None,
                };
                (
                    peer.id,
                    PeerSlot {
                        config: peer.clone(),
                        state: Mutex::new(state),
                        redial: Notify::new(),
                        resubscribe: Notify::new(),
                    },
                )
            })
            .collect();
        let acks = config
            .peers
            .iter()
            .map(|p| (p.id, persisted.get(&p.id).cloned().unwrap_or_default()))
            .collect();
        let status: Arc<dyn StatusSource> = store.clone();
        let shared = Arc::new(SharedHandle(Shared {
            peers,
            reachable: watch::Sender::new(BTreeSet::new()),
            suspected: watch::Sender::new(BTreeSet::new()),
            acks: watch::Sender::new(acks),
            refused_connections: AtomicU64::new(0),
            status,
            client_config: Mutex::new(client_config),
            stability: Mutex::new(StabilityTracker::new(
                config.peers.iter().map(|p| p.id),
                &persisted,
                config.gc.horizon,
                now,
            )),
            gc: Mutex::new(GcStatus {
                enabled: config.gc.enabled,
                ..GcStatus::default()
            }),
            config,
            started: now,
            ae: Mutex::new(AeBook::default()),
            repair_truncated: Notify::new(),
        }));

        let cancel = shutdown.child_token();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            shared.clone(),
            store.clone(),
            endpoint.clone(),
            tracker.clone(),
            cancel.clone(),
        ));
        for &peer in shared.peers.keys() {
            tracker.spawn(dial_loop(
                shared.clone(),
                store.clone(),
                endpoint.clone(),
                tracker.clone(),
                peer,
                cancel.clone(),
            ));
        }
        tracker.spawn(monitor(shared.clone(), cancel.clone()));
        let (ae_jobs, ae_queue) = mpsc::channel(16);
        tracker.spawn(anti_entropy_loop(
            shared.clone(),
            store.clone(),
            ae_queue,
            cancel.clone(),
        ));
        if shared.config.gc.enabled {
            tracker.spawn(gc_loop(shared.clone(), store.clone(), cancel.clone()));
        }
        drop(store);
        let supervisor = tokio::spawn(supervise(
            shared.clone(),
            endpoint.clone(),
            tracker,
            cancel.clone(),
        ));
        info!(node = %shared.config.node, addr = %local_addr, "replication endpoint listening");
        Ok(Self {
            shared,
            local_addr,
            endpoint: Mutex::new(Some(endpoint)),
            external: shutdown,
            cancel,
            supervisor: tokio::sync::Mutex::new(Some(supervisor)),
            ae_jobs,
        })
    }

    /// Runs an anti-entropy round with the peer named `name` (its certificate name, or its
    /// node id) now, and reports what it repaired.
    pub async fn sync_peer(&self, name: &str) -> Result<RoundReport, AeError> {
        let peer = self
            .shared
            .peers
            .values()
            .find(|slot| slot.config.name == name || slot.config.id.to_string() == name)
            .map(|slot| slot.config.id)
            .ok_or_else(|| AeError::UnknownPeer(name.to_owned()))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.ae_jobs
            .send((peer, reply))
            .await
            .map_err(|_| AeError::Transport("replication is shutting down".into()))?;
        answer
            .await
            .map_err(|_| AeError::Transport("replication is shutting down".into()))?
    }

    /// Anti-entropy totals and each peer's last round.
    pub fn anti_entropy(&self) -> AntiEntropyStatus {
        let now = Instant::now();
        let book = self
            .shared
            .ae
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut status = book.totals.clone();
        status.peers = self
            .shared
            .peers
            .values()
            .map(|slot| {
                let entry = book.peers.get(&slot.config.id);
                PeerAntiEntropy {
                    id: slot.config.id,
                    name: slot.config.name.clone(),
                    rounds: entry.map_or(0, |e| e.rounds),
                    failed_rounds: entry.map_or(0, |e| e.failed_rounds),
                    last_round_ms_ago: entry
                        .and_then(|e| e.last_round)
                        .map(|t| now.duration_since(t).as_millis() as u64),
                    last_report: entry.and_then(|e| e.last_report.clone()),
                    last_error: entry.and_then(|e| e.last_error.clone()),
                }
            })
            .collect();
        status
    }

    /// Replaces this node's TLS identity (CA bundle, certificate chain, key) without dropping
    /// a connection: connections accepted or dialled from now on use the new material, those
    /// already up keep the identity they were established with until they are replaced (a
    /// reconnect, or the peer restarting). On error nothing changes.
    pub fn reload_tls(&self, material: &crate::TlsMaterial) -> Result<(), ReplicationError> {
        let config = &self.shared.config;
        let server = tls::server_config(material, config)?;
        let client = tls::client_config(material, config)?;
        self.endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or_else(|| ReplicationError::Config("replication has stopped".into()))?
            .set_server_config(Some(server));
        *self
            .shared
            .client_config
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = client;
        info!("replication TLS identity reloaded");
        Ok(())
    }

    /// Garbage collection: the current frontier, excluded and resyncing nodes, what passes did.
    pub fn gc(&self) -> GcStatus {
        let now = Instant::now();
        let mut status = self
            .shared
            .gc
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let stability = self.shared.stability();
        status.excluded = stability.excluded(now).into_iter().collect();
        status.needs_resync = stability.needs_resync().into_iter().collect();
        status.last_pass_ms_ago = status
            .last_pass
            .map(|t| now.duration_since(t).as_millis() as u64);
        status
    }

    /// Runs a garbage-collection pass now (tests and the admin API).
    pub async fn collect_garbage_now<S: ReplicaStore>(&self, store: &S) -> GcStatus {
        gc_pass(&self.shared, store).await;
        self.gc()
    }

    /// The bound address (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every configured peer's status.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let now = Instant::now();
        let me = self.shared.config.node;
        let applied = self.shared.status.applied();
        let local_now = self.shared.status.now();
        let reachable = self.shared.reachable.borrow().clone();
        self.shared
            .peers
            .iter()
            .map(|(&id, slot)| {
                // Read the WAL without holding the peer's lock: sessions take it per message.
                let acked = slot.lock().their_applied.get(me);
                let lag_ops = applied.get(me).saturating_sub(acked);
                let lag_ms = if lag_ops == 0 {
                    0
                } else {
                    self.shared
                        .status
                        .stamp_after(me, acked)
                        .map_or(0, |oldest| {
                            local_now.unix_millis().saturating_sub(oldest.unix_millis())
                        })
                };
                let state = slot.lock();
                PeerStatus {
                    id,
                    name: slot.config.name.clone(),
                    region: slot.config.region.clone(),
                    address: state.address,
                    connected: state.liveness.is_connected(),
                    inbound_connected: state.inbound_connected,
                    reachable: reachable.contains(&id),
                    last_heard_ms_ago: state
                        .last_heard
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    rtt_ms: state.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    skew_ms: state.skew.skew_ms(),
                    refused_stamps: state.refused_stamps,
                    ops_sent: state.ops_sent,
                    batches_sent: state.batches_sent,
                    bytes_sent: state.bytes_sent,
                    ops_received: state.ops_received,
                    batches_received: state.batches_received,
                    last_batch_ops: state.last_batch_ops,
                    their_applied: state.their_applied.clone(),
                    lag_ops,
                    lag_ms,
                    truncated: state.truncated,
                    last_error: state.last_error.clone(),
                }
            })
            .collect()
    }

    /// How stale this node's copy of each peer's writes may be, in milliseconds: the time since
    /// this node last held every op of the peer's own origin that the peer had reported (in its
    /// acknowledgements) holding, checked whenever a message arrives from it on our subscription
    /// and whenever its acknowledgement arrives. Since start when that never happened. Cheap: no
    /// storage access besides the applied vector.
    pub fn lag(&self) -> Vec<PeerLag> {
        let now = Instant::now();
        self.shared
            .peers
            .iter()
            .map(|(&id, slot)| {
                let since = slot.lock().caught_up.unwrap_or(self.shared.started);
                PeerLag {
                    id,
                    region: slot.config.region.clone(),
                    lag_ms: now.saturating_duration_since(since).as_millis() as u64,
                }
            })
            .collect()
    }

    /// Reads one key's state from `peer` over our connection to it (a quorum read). The caller
    /// bounds the time it waits. The state is checked to be of `kind`.
    pub async fn read_state(
        &self,
        peer: NodeId,
        kind: Kind,
        key: &str,
    ) -> Result<StateRead, ReadError> {
        let slot = self.shared.slot(peer).ok_or(ReadError::UnknownPeer(peer))?;
        let request = wire::read_request(kind, key)?;
        let conn = slot
            .lock()
            .conn
            .clone()
            .ok_or(ReadError::NotConnected(peer))?;
        let transport = |e: SessionError| ReadError::Transport(e.to_string());
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| ReadError::Transport(e.to_string()))?;
        write_message(&mut send, &request)
            .await
            .map_err(transport)?;
        let _ = send.finish();
        match read_message(&mut recv).await.map_err(transport)? {
            Message::ReadReply { state, applied } => {
                let state = state.map(|bytes| codec::decode_state(&bytes)).transpose()?;
                if let Some(state) = &state {
                    if state.kind() != kind {
                        return Err(ReadError::Protocol(format!(
                            "asked for a {kind}, got a {}",
                            state.kind()
                        )));
                    }
                }
                Ok(StateRead { state, applied })
            }
            Message::ReadFailed { reason } => Err(ReadError::Failed(reason)),
            other => Err(ReadError::Protocol(format!(
                "unexpected {} answering a read",
                self::kind(&other)
            ))),
        }
    }

    /// Read repair: pushes one key's merged state to `peer`, which joins it into its own
    /// (the anti-entropy `PushStates` message). Returns whether the peer's state changed.
    pub async fn repair_state(
        &self,
        peer: NodeId,
        kind: Kind,
        key: &str,
        state: &State,
    ) -> Result<bool, ReadError> {
        let slot = self.shared.slot(peer).ok_or(ReadError::UnknownPeer(peer))?;
        let conn = slot
            .lock()
            .conn
            .clone()
            .ok_or(ReadError::NotConnected(peer))?;
        let request = Message::PushStates {
            states: vec![(
                crate::merkle::storage_key(kind, key),
                codec::encode_state(state),
            )],
        };
        match QuicPeer(conn).call(request).await {
            Ok((Message::PushReply { merged }, _, _)) => Ok(merged > 0),
            Ok((Message::ReadFailed { reason }, _, _)) => Err(ReadError::Failed(reason)),
            Ok((other, _, _)) => Err(ReadError::Protocol(format!(
                "unexpected {} answering a repair",
                self::kind(&other)
            ))),
            Err(error) => Err(ReadError::Transport(error.to_string())),
        }
    }

    /// Peers the failure detector currently considers reachable.
    pub fn reachable(&self) -> BTreeSet<NodeId> {
        self.shared.reachable.borrow().clone()
    }

    pub fn watch_reachable(&self) -> watch::Receiver<BTreeSet<NodeId>> {
        self.shared.reachable.subscribe()
    }

    /// Each peer's durably applied vector, as last acknowledged (for quorum writes and GC).
    pub fn watch_acks(&self) -> watch::Receiver<BTreeMap<NodeId, VersionVector>> {
        self.shared.acks.subscribe()
    }

    /// Connections refused after the TLS handshake failed or the peer's `Hello` did not
    /// check out (unknown node, wrong cluster, certificate of another node).
    pub fn refused_connections(&self) -> u64 {
        self.shared.refused_connections.load(Ordering::Relaxed)
    }

    /// Stops: closes every connection with a reason, waits (bounded by `shutdown_timeout`) for
    /// tasks to finish and for the endpoint to drain. Idempotent.
    ///
    /// The UDP socket is released once every connection has drained; when that takes longer
    /// than the deadline (a handshake in flight drains for seconds), binding the same address
    /// again in the same process fails with [`ReplicationError::Bind`] for a moment.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let supervisor = self.supervisor.lock().await.take();
        if let Some(handle) = supervisor {
            if let Err(e) = handle.await {
                warn!(error = %e, "replication supervisor failed");
            }
        }
    }

    /// Waits until the shutdown token passed to [`Self::start`] is cancelled, then until
    /// replication has stopped.
    pub async fn closed(&self) {
        self.external.cancelled().await;
        self.shutdown().await;
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn supervise(
    shared: Arc<SharedHandle>,
    endpoint: quinn::Endpoint,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    cancel.cancelled().await;
    // Sessions close their own connections as they see the cancellation; closing the endpoint
    // at once as well refuses handshakes that arrive meanwhile (no task accepts them any more)
    // and covers connections still handshaking.
    endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
    let deadline = shared.config.shutdown_timeout;
    tracker.close();
    if timeout(deadline, tracker.wait()).await.is_err() {
        warn!("replication tasks did not stop in time");
    }
    // Lets the close frames reach the peers, so they reconnect elsewhere at once instead of
    // waiting for an idle timeout. Connections that never finished their handshake drain
    // for three initial PTOs (seconds), hence the bound.
    if timeout(deadline, endpoint.wait_idle()).await.is_err() {
        debug!("replication endpoint did not drain in time");
    }
    info!(node = %shared.config.node, "replication stopped");
}

async fn monitor(shared: Arc<SharedHandle>, cancel: CancellationToken) {
    let period = (shared.config.heartbeat_interval / 4).max(Duration::from_millis(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => shared.refresh(Instant::now()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frames on streams

async fn read_message(recv: &mut RecvStream) -> Result<Message, SessionError> {
    read_message_sized(recv).await.map(|(message, _)| message)
}

/// [`read_message`], also returning the frame's size.
async fn read_message_sized(recv: &mut RecvStream) -> Result<(Message, usize), SessionError> {
    let mut header = [0; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(SessionError::Ended),
        Err(e) => return Err(read_error(e)),
    }
    let len = wire::payload_len(header)?;
    let mut payload = vec![0; len];
    recv.read_exact(&mut payload).await.map_err(read_error)?;
    Ok((wire::decode_payload(&payload)?, len + 4))
}

/// Surfaces why the connection went away (closed by the peer, timed out...), which quinn's
/// stream errors only summarise as "connection lost".
fn read_error(error: quinn::ReadExactError) -> SessionError {
    match error {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e)) => e.into(),
        other => other.into(),
    }
}

async fn write_message(send: &mut SendStream, message: &Message) -> Result<usize, SessionError> {
    let frame = wire::encode_frame(message)?;
    send.write_all(&frame).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(e) => SessionError::Connection(e),
        other => SessionError::Write(other),
    })?;
    Ok(frame.len())
}

/// Reads the control stream into a channel, so session loops can `select!` on it safely
/// (reading a frame is not cancel-safe; receiving from a channel is).
fn spawn_reader(
    tracker: &TaskTracker,
    mut recv: RecvStream,
) -> mpsc::Receiver<Result<Message, SessionError>> {
    let (tx, rx) = mpsc::channel(64);
    tracker.spawn(async move {
        loop {
            let next = read_message(&mut recv).await;
            let stop = next.is_err();
            if tx.send(next).await.is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// A decoded batch, ready to apply.
struct ReceivedBatch {
    epoch: u64,
    ops: Vec<Op>,
}

/// Accepts the publisher's batch stream and decodes batches (ops included) off the session
/// loop. The channel is small: while the session applies, QUIC flow control holds the sender.
fn spawn_batch_reader(
    tracker: &TaskTracker,
    conn: Connection,
) -> mpsc::Receiver<Result<ReceivedBatch, SessionError>> {
    let (tx, rx) = mpsc::channel(4);
    tracker.spawn(async move {
        let mut recv = match conn.accept_uni().await {
            Ok(recv) => recv,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        loop {
            let next = match read_message(&mut recv).await {
                Ok(Message::Batch { epoch, ops }) => ops
                    .iter()
                    .map(|bytes| codec::decode_op(bytes))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|ops| ReceivedBatch { epoch, ops })
                    .map_err(SessionError::from),
                Ok(other) => Err(SessionError::Protocol(format!(
                    "unexpected {} on the batch stream",
                    kind(&other)
                ))),
                Err(e) => Err(e),
            };
            let stop = next.is_err();
            if tx.send(next).await.is_err() || stop {
                return;
            }
        }
    });
    rx
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "Hello",
        Message::Subscribe { .. } => "Subscribe",
        Message::Batch { .. } => "Batch",
        Message::Ack { .. } => "Ack",
        Message::Heartbeat { .. } => "Heartbeat",
        Message::Truncated { .. } => "Truncated",
        Message::ReadRequest { .. } => "ReadRequest",
        Message::ReadReply { .. } => "ReadReply",
        Message::ReadFailed { .. } => "ReadFailed",
        Message::TreeRequest { .. } => "TreeRequest",
        Message::TreeReply { .. } => "TreeReply",
        Message::BucketRequest { .. } => "BucketRequest",
        Message::BucketReply { .. } => "BucketReply",
        Message::StatesRequest { .. } => "StatesRequest",
        Message::StatesReply { .. } => "StatesReply",
        Message::PushStates { .. } => "PushStates",
        Message::PushReply { .. } => "PushReply",
        Message::SyncRequest(_) => "SyncRequest",
        Message::SyncReply(_) => "SyncReply",
    }
}

fn close_code(error: &SessionError) -> u32 {
    match error {
        SessionError::Refused(_) => CLOSE_REFUSED,
        SessionError::Store(_) => CLOSE_STORE,
        _ => CLOSE_PROTOCOL,
    }
}

fn handshake_timeout(config: &ReplicationConfig) -> Duration {
    (config.peer_timeout * 2).max(Duration::from_secs(1))
}

// ---------------------------------------------------------------------------------------------
// Publisher side: incoming connections

async fn accept_loop<S: ReplicaStore>(
    shared: Arc<SharedHandle>,
    store: Arc<S>,
    endpoint: quinn::Endpoint,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            () = cancel.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        let (shared, store, tracker2, cancel) = (
            shared.clone(),
            store.clone(),
            tracker.clone(),
            cancel.clone(),
        );
        tracker.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match timeout(handshake_timeout(&shared.config), incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) if dialer_gave_up(&e) => {
                    // Not a refusal: the peer dropped its own attempt half-way, as a node does
                    // with an unanswered dial once it finds the peer listening.
                    debug!(%remote, error = %e, "a peer abandoned its replication handshake");
                    return;
                }
                Ok(Err(e)) => {
                    shared.refused_connections.fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, error = %e, "refused a replication connection: handshake failed");
                    return;
                }
                Err(_) => {
                    shared.refused_connections.fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, "refused a replication connection: handshake timed out");
                    return;
                }
            };
            serve(shared, store, conn, tracker2, cancel).await;
        });
    }
}

/// The dialer closed the connection itself before the handshake completed: QUIC carries an
/// application's close during the handshake as `APPLICATION_ERROR` (RFC 9000, 10.2.3), while a
/// certificate it rejects shows as a crypto error.
fn dialer_gave_up(error: &quinn::ConnectionError) -> bool {
    matches!(error, quinn::ConnectionError::ConnectionClosed(close)
        if close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR)
}

/// Checks the subscriber's `Hello`: same protocol and cluster, a configured node, and a
/// certificate issued to that node's name.
fn check_hello(shared: &Shared, conn: &Connection, hello: &Hello) -> Result<NodeId, SessionError> {
    if hello.version != PROTOCOL_VERSION {
        return Err(SessionError::Refused(format!(
            "protocol version {}",
            hello.version
        )));
    }
    if hello.cluster != shared.config.cluster {
        return Err(SessionError::Refused(format!(
            "cluster {:?}",
            hello.cluster
        )));
    }
    let slot = shared
        .slot(hello.node)
        .ok_or_else(|| SessionError::Refused(format!("unknown node {}", hello.node)))?;
    if !tls::certificate_matches(conn, &slot.config.name) {
        return Err(SessionError::Refused(format!(
            "certificate is not valid for {:?}, the name of node {}",
            slot.config.name, hello.node
        )));
    }
    Ok(hello.node)
}

async fn serve<S: ReplicaStore>(
    shared: Arc<SharedHandle>,
    store: Arc<S>,
    conn: Connection,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let remote = conn.remote_address();
    let greeting = timeout(handshake_timeout(&shared.config), async {
        let (send, mut recv) = conn.accept_bi().await?;
        match read_message(&mut recv).await? {
            Message::Hello(hello) => Ok((send, recv, hello)),
            other => Err(SessionError::Protocol(format!(
                "expected Hello, got {}",
                kind(&other)
            ))),
        }
    })
    .await
    .unwrap_or(Err(SessionError::Timeout("waiting for Hello")));
    let (send, recv, peer) = match greeting
        .and_then(|(send, recv, hello)| Ok((send, recv, check_hello(&shared, &conn, &hello)?)))
    {
        Ok(ok) => ok,
        Err(e) => {
            shared.refused_connections.fetch_add(1, Ordering::Relaxed);
            warn!(%remote, error = %e, "refused a replication connection");
            conn.close(VarInt::from_u32(close_code(&e)), e.to_string().as_bytes());
            return;
        }
    };
    let Some(slot) = shared.slot(peer) else {
        return;
    };
    let session = cancel.child_token();
    let generation = {
        let mut state = slot.lock();
        if let Some(previous) = state.inbound_session.replace(session.clone()) {
            previous.cancel();
        }
        state.inbound_connected = true;
        state.inbound_generation += 1;
        // What `redial_grace` measures an unanswered dial of ours against.
        state.rtt = Some(conn.rtt());
        state.inbound_generation
    };
    debug!(peer = %peer, %remote, "peer connected to pull our WAL");
    slot.redial.notify_waiters();
    tracker.spawn(serve_reads(
        shared.clone(),
        store.clone(),
        conn.clone(),
        tracker.clone(),
        session.clone(),
    ));
    let result = publish(
        &shared, &*store, &conn, &tracker, peer, send, recv, &session,
    )
    .await;
    {
        let mut state = slot.lock();
        // Only the latest session owns the flag.
        if state.inbound_generation == generation {
            state.inbound_connected = false;
            state.inbound_session = None;
        }
    }
    match result {
        Ok(()) => {
            let (code, reason): (u32, &[u8]) = if cancel.is_cancelled() {
                (CLOSE_SHUTDOWN, b"shutdown")
            } else {
                (CLOSE_REPLACED, b"replaced by a newer connection")
            };
            conn.close(VarInt::from_u32(code), reason);
        }
        Err(e) => {
            debug!(peer = %peer, error = %e, "publisher session ended");
            conn.close(VarInt::from_u32(close_code(&e)), e.to_string().as_bytes());
        }
    }
}

/// Answers the quorum-read streams a peer opens on its connection to us, at most
/// [`MAX_CONCURRENT_READS`] at once, until the connection ends or the session is cancelled.
async fn serve_reads<S: ReplicaStore>(
    shared: Arc<SharedHandle>,
    store: Arc<S>,
    conn: Connection,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS));
    loop {
        let (send, recv) = tokio::select! {
            () = cancel.cancelled() => return,
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(_) => return,
            },
        };
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (shared, store) = (shared.clone(), store.clone());
        tracker.spawn(async move {
            let _permit = permit;
            if let Err(e) = answer_read(&shared, &*store, send, recv).await {
                debug!(error = %e, "quorum read request failed");
            }
        });
    }
}

/// Answers one read stream: one `ReadRequest` in, one `ReadReply` or `ReadFailed` out.
async fn answer_read<S: ReplicaStore>(
    shared: &Shared,
    store: &S,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), SessionError> {
    let request = timeout(READ_REQUEST_TIMEOUT, read_message(&mut recv))
        .await
        .map_err(|_| SessionError::Timeout("waiting for a read request"))??;
    let reply = match request {
        Message::ReadRequest { key, .. } if key.len() > wire::MAX_READ_KEY => Message::ReadFailed {
            reason: format!("key of {} bytes is too long", key.len()),
        },
        Message::ReadRequest { kind, key } => match store.read_state(kind, &key) {
            Ok(read) => {
                // Answer only with what is durable here: wait (briefly) for the journal to
                // cover the snapshot, which a group commit does within milliseconds.
                let covered =
                    crate::store::applied_within(store, &read.applied, READ_DURABLE_WAIT).await;
                if covered {
                    Message::ReadReply {
                        state: read.state.as_ref().map(codec::encode_state),
                        applied: read.applied,
                    }
                } else {
                    Message::ReadFailed {
                        reason: "the state did not become durable in time".into(),
                    }
                }
            }
            Err(e) => Message::ReadFailed {
                reason: e.to_string(),
            },
        },
        other => {
            let name = kind(&other);
            match crate::ae::answer(store, other, WalGaps::Only(&wal_gaps(shared))).await {
                Some(reply) => reply,
                None => {
                    return Err(SessionError::Protocol(format!(
                        "unexpected {name} on a read stream"
                    )));
                }
            }
        }
    };
    let frame = match wire::encode_frame(&reply) {
        Ok(frame) => frame,
        Err(e) => wire::encode_frame(&Message::ReadFailed {
            reason: format!("the state cannot be sent: {e}"),
        })?,
    };
    send.write_all(&frame).await?;
    let _ = send.finish();
    Ok(())
}

/// Serves one subscriber until the connection fails or we stop.
#[allow(clippy::too_many_arguments)]
async fn publish<S: ReplicaStore>(
    shared: &Shared,
    store: &S,
    conn: &Connection,
    tracker: &TaskTracker,
    peer: NodeId,
    mut control: SendStream,
    recv: RecvStream,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster: shared.config.cluster.clone(),
        node: shared.config.node,
    };
    write_message(&mut control, &Message::Hello(hello)).await?;
    // Heartbeats and truncation notices must overtake queued batches.
    let _ = control.set_priority(1);
    let mut batches = conn.open_uni().await?;
    let mut from_peer = spawn_reader(tracker, recv);
    let mut applied = store.watch_applied();
    let mut outbound = Outbound::new(shared.limits());
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slot = shared.slot(peer).ok_or(SessionError::Ended)?;
    // Acks update the in-memory view (quorum waiters) at once, but are persisted at most once
    // per heartbeat: the persisted cursor only bounds WAL truncation, where stale is safe, and
    // the subscriber's own applied vector is what resumes replication.
    let mut unpersisted: Option<VersionVector> = None;
    let result = async {
        loop {
            let available = applied.borrow_and_update().clone();
            let actions = outbound.poll(Instant::now(), &available, |origin, after, max_bytes| {
                store.read_wal(origin, after, MAX_OPS_PER_READ, max_bytes)
            });
            for action in actions {
                match action {
                    Action::Batch(batch) => {
                        let count = batch.ops.len() as u64;
                        let message = Message::Batch {
                            epoch: batch.epoch,
                            ops: batch.ops,
                        };
                        let bytes = write_message(&mut batches, &message).await? as u64;
                        let mut state = slot.lock();
                        state.ops_sent += count;
                        state.batches_sent += 1;
                        state.bytes_sent += bytes;
                    }
                    Action::Truncated {
                        epoch,
                        origin,
                        first_available,
                    } => {
                        warn!(peer = %peer, origin = %origin, first_available,
                            "peer's cursor is older than our WAL; anti-entropy must repair it");
                        let message = Message::Truncated {
                            epoch,
                            origin,
                            first_available,
                        };
                        write_message(&mut control, &message).await?;
                    }
                }
            }
            let deadline = outbound.deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                changed = applied.changed() => {
                    if changed.is_err() {
                        return Err(SessionError::Store(StoreError::Unavailable(
                            "applied vector no longer published".into(),
                        )));
                    }
                }
                () = async { if let Some(at) = deadline { sleep_until(at).await } },
                    if deadline.is_some() => {}
                _ = heartbeat.tick() => {
                    write_message(&mut control, &heartbeat_message(store)).await?;
                    if let Some(applied) = unpersisted.take() {
                        store.record_peer_applied(peer, &applied)?;
                    }
                }
                message = from_peer.recv() => {
                    let message = message.ok_or(SessionError::Ended)??;
                    match message {
                        Message::Subscribe { epoch, after } => {
                            debug!(peer = %peer, epoch, ?after, "subscription");
                            outbound.subscribe(epoch, after);
                            shared.heard(peer, false);
                        }
                        Message::Ack { applied } => {
                            shared.heard(peer, false);
                            outbound.on_ack(&applied);
                            if record_ack(shared, peer, &applied) {
                                unpersisted = Some(applied);
                            }
                        }
                        Message::Heartbeat { stamp, wall_ms } => {
                            shared.on_heartbeat(store, conn, peer, stamp, wall_ms, false);
                        }
                        other => {
                            return Err(SessionError::Protocol(format!(
                                "unexpected {} from a subscriber",
                                kind(&other)
                            )));
                        }
                    }
                }
            }
        }
    }
    .await;
    if let Some(applied) = unpersisted {
        store.record_peer_applied(peer, &applied)?;
    }
    result
}

/// Records `peer`'s acknowledged vector in memory; true when it changed.
fn record_ack(shared: &Shared, peer: NodeId, applied: &VersionVector) -> bool {
    let Some(slot) = shared.slot(peer) else {
        return false;
    };
    let ours = shared.status.applied().get(peer);
    {
        let mut state = slot.lock();
        if state.their_applied == *applied {
            state.check_caught_up(peer, ours, Instant::now());
            return false;
        }
        state.their_applied.clone_from(applied);
        state.check_caught_up(peer, ours, Instant::now());
    }
    shared.stability().on_report(peer, applied, Instant::now());
    shared.acks.send_if_modified(|acks| {
        let entry = acks.entry(peer).or_default();
        replace_if_changed(entry, applied.clone())
    });
    true
}

// ---------------------------------------------------------------------------------------------
// Subscriber side: one outgoing connection per peer

async fn dial_loop<S: ReplicaStore>(
    shared: Arc<SharedHandle>,
    store: Arc<S>,
    endpoint: quinn::Endpoint,
    tracker: TaskTracker,
    peer: NodeId,
    cancel: CancellationToken,
) {
    let Some(slot) = shared.slot(peer) else {
        return;
    };
    let mut backoff = Backoff::new(shared.config.reconnect_base, shared.config.reconnect_max);
    let mut first_attempt = true;
    while !cancel.is_cancelled() {
        if !first_attempt {
            follow_host(&shared, slot, &cancel).await;
        }
        first_attempt = false;
        // Listening from the start of the attempt, so a connection from the peer at any point
        // of it (or of the backoff after it) is noticed.
        let redial = slot.redial.notified();
        tokio::pin!(redial);
        redial.as_mut().enable();
        let mut nudged = false;
        let progress = Progress::default();
        let attempt = subscribe(
            &shared, &*store, &endpoint, &tracker, slot, &cancel, &progress,
        );
        tokio::pin!(attempt);
        // Set when the peer connected to us while this attempt had no answer yet.
        let mut give_up_at: Option<tokio::time::Instant> = None;
        let result = loop {
            tokio::select! {
                result = &mut attempt => break result,
                () = &mut redial, if !nudged => {
                    nudged = true;
                    if !progress.answered.load(Ordering::Acquire) {
                        give_up_at = Some(tokio::time::Instant::now() + redial_grace(slot));
                    }
                }
                () = sleep_until_opt(give_up_at), if give_up_at.is_some() => {
                    // The peer listens, yet a few round trips later this attempt still has no
                    // answer: its Initial went out before the peer listened and QUIC would
                    // retransmit it only about a second after sending. A handshake that did
                    // get an answer, or a session, is never dropped (half a handshake looks
                    // like a refused connection to the peer).
                    give_up_at = None;
                    if !progress.answered.load(Ordering::Acquire) {
                        debug!(peer = %peer, "peer is up but our dial is unanswered: dialling again");
                        break Ok(());
                    }
                }
            }
        };
        let established = progress.established.load(Ordering::Acquire);
        slot.lock().liveness.on_disconnected(Instant::now());
        shared.refresh(Instant::now());
        if let Err(e) = &result {
            if established {
                info!(peer = %peer, error = %e, "lost replication connection");
            } else {
                debug!(peer = %peer, error = %e, "cannot connect to peer");
            }
            shared.set_error(peer, e);
        }
        if established {
            backoff.reset();
        }
        if nudged && !established {
            continue;
        }
        let delay = backoff.next_delay(random());
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep(delay) => {}
            () = &mut redial, if !nudged => {
                debug!(peer = %peer, "peer connected to us: dialling it now, not after the backoff");
            }
        }
    }
}

/// How long an unanswered dial may go on once the peer is known to listen: a few of its
/// round trips (as its own connection to us measured), at least 100 ms.
fn redial_grace(slot: &PeerSlot) -> Duration {
    let rtt = slot.lock().rtt.unwrap_or_default();
    (rtt * 3).max(Duration::from_millis(100))
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How far one dial attempt got, for [`dial_loop`] to read while [`subscribe`] runs.
#[derive(Default)]
struct Progress {
    /// The peer answered the handshake.
    answered: AtomicBool,
    /// The subscription is up (greetings exchanged).
    established: AtomicBool,
}

/// Before a reconnection, looks the peer's host name (if it has one) up again and dials the
/// answer from now on: a peer recreated at a new IP address keeps its name. A lookup that
/// fails or hangs keeps the last address.
async fn follow_host(shared: &Shared, slot: &PeerSlot, cancel: &CancellationToken) {
    let Some(host) = &slot.config.host else {
        return;
    };
    let lookup = timeout(
        handshake_timeout(&shared.config),
        shared.config.resolver.resolve(host),
    );
    let resolved = tokio::select! {
        () = cancel.cancelled() => return,
        resolved = lookup => resolved,
    };
    match resolved {
        Ok(Ok(address)) => {
            let previous = std::mem::replace(&mut slot.lock().address, address);
            if previous != address {
                info!(peer = %slot.config.id, %host, from = %previous, to = %address, "peer address changed");
            }
        }
        Ok(Err(error)) => debug!(peer = %slot.config.id, %host, %error, "cannot resolve peer"),
        Err(_) => debug!(peer = %slot.config.id, %host, "resolving the peer timed out"),
    }
}

async fn subscribe<S: ReplicaStore>(
    shared: &Shared,
    store: &S,
    endpoint: &quinn::Endpoint,
    tracker: &TaskTracker,
    slot: &PeerSlot,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<(), SessionError> {
    let peer = slot.config.id;
    let limit = handshake_timeout(&shared.config);
    let client_config = shared
        .client_config
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let address = slot.lock().address;
    let mut connecting = endpoint.connect_with(client_config, address, &slot.config.name)?;
    let handshake = async {
        // Available once the peer's first flight arrived: from then on it is answering.
        connecting.handshake_data().await?;
        progress.answered.store(true, Ordering::Release);
        connecting.await
    };
    let conn = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        conn = timeout(limit, handshake) => conn.map_err(|_| SessionError::Timeout("connecting"))??,
    };
    let result = async {
        let (mut control, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            cluster: shared.config.cluster.clone(),
            node: shared.config.node,
        };
        write_message(&mut control, &Message::Hello(hello)).await?;
        let reply = timeout(limit, read_message(&mut recv))
            .await
            .map_err(|_| SessionError::Timeout("waiting for Hello"))??;
        match reply {
            Message::Hello(h)
                if h.version == PROTOCOL_VERSION
                    && h.cluster == shared.config.cluster
                    && h.node == peer => {}
            other => {
                return Err(SessionError::Refused(format!(
                    "unexpected greeting {other:?}"
                )));
            }
        }
        progress.established.store(true, Ordering::Release);
        {
            let mut state = slot.lock();
            state.liveness.on_connected(Instant::now());
            state.last_error = None;
            state.conn = Some(conn.clone());
        }
        shared.refresh(Instant::now());
        info!(peer = %peer, "replicating from peer");
        pull(shared, store, &conn, tracker, peer, control, recv, cancel).await
    }
    .await;
    {
        let mut state = slot.lock();
        if state
            .conn
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            state.conn = None;
        }
    }
    match &result {
        Ok(()) => conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown"),
        Err(e) => conn.close(VarInt::from_u32(close_code(e)), e.to_string().as_bytes()),
    }
    result
}

/// Pulls from one peer until the connection fails or we stop.
#[allow(clippy::too_many_arguments)]
async fn pull<S: ReplicaStore>(
    shared: &Shared,
    store: &S,
    conn: &Connection,
    tracker: &TaskTracker,
    peer: NodeId,
    mut control: SendStream,
    recv: RecvStream,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let slot = shared.slot(peer).ok_or(SessionError::Ended)?;
    let me = shared.config.node;
    let nodes: Vec<NodeId> = shared.peers.keys().copied().collect();
    let mut from_peer = spawn_reader(tracker, recv);
    let mut batches = spawn_batch_reader(tracker, conn.clone());
    let mut suspected = shared.suspected.subscribe();
    let mut inbound = Inbound::new();
    let mut last_ack = VersionVector::new();
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resubscribe = true;
    let mut applying: VecDeque<QueuedApply> = VecDeque::new();
    loop {
        if resubscribe {
            resubscribe = false;
            let wanted = plan_subscription(
                me,
                peer,
                nodes.iter().copied(),
                &suspected.borrow_and_update(),
            );
            if let Some(message) = inbound.update(wanted, &store.applied()) {
                debug!(peer = %peer, ?message, "subscribing");
                write_message(&mut control, &message).await?;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = suspected.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                resubscribe = true;
            }
            () = slot.resubscribe.notified() => {
                if let Some(message) = inbound.restart(&store.applied()) {
                    info!(peer = %peer, "resubscribing after a fast-forward");
                    write_message(&mut control, &message).await?;
                }
            }
            _ = heartbeat.tick() => {
                write_message(&mut control, &heartbeat_message(store)).await?;
                // Our vector also moves through local writes and other peers: keep the
                // publisher's view (WAL truncation, quorum) fresh without a batch to ack.
                let applied = store.applied();
                if applied != last_ack {
                    write_message(&mut control, &Message::Ack { applied: applied.clone() }).await?;
                    last_ack = applied;
                }
            }
            message = from_peer.recv() => {
                match message.ok_or(SessionError::Ended)?? {
                    Message::Heartbeat { stamp, wall_ms } => {
                        shared.on_heartbeat(store, conn, peer, stamp, wall_ms, true);
                    }
                    Message::Truncated { epoch, origin, first_available } => {
                        shared.heard(peer, true);
                        if inbound.is_current(epoch) {
                            warn!(peer = %peer, origin = %origin, first_available,
                                "peer's WAL no longer holds our cursor; needs anti-entropy");
                            slot.lock().truncated = Some(Truncation { origin, first_available });
                            shared.repair_truncated.notify_one();
                        }
                    }
                    other => {
                        return Err(SessionError::Protocol(format!(
                            "unexpected {} from a publisher",
                            kind(&other)
                        )));
                    }
                }
            }
            outcome = std::future::poll_fn(|cx| match applying.front_mut() {
                Some(queued) => queued.outcome.as_mut().poll(cx),
                None => std::task::Poll::Pending,
            }), if !applying.is_empty() => {
                let Some(queued) = applying.pop_front() else { continue };
                match outcome {
                    Ok(applied) => {
                        {
                            let mut state = slot.lock();
                            state.ops_received += queued.ops;
                            state.batches_received += queued.batches;
                            state.last_batch_ops = queued.last_batch_ops;
                            state.check_caught_up(peer, applied.get(peer), Instant::now());
                        }
                        // A heartbeat may have acked a later vector already: acks never go back.
                        let mut ack = last_ack.clone();
                        ack.merge(&applied);
                        if ack != last_ack {
                            write_message(&mut control, &Message::Ack { applied: ack.clone() })
                                .await?;
                            last_ack = ack;
                        }
                    }
                    // Applies queued behind a gap fail on it too; the first one restarts the
                    // subscription, the rest belong to the old one.
                    Err(StoreError::Gap { .. }) if !inbound.is_current(queued.epoch) => {}
                    Err(StoreError::Gap { origin, expected, got }) => {
                        warn!(peer = %peer, origin = %origin, expected, got,
                            "gap in a batch; resubscribing from our applied vector");
                        if let Some(message) = inbound.restart(&store.applied()) {
                            write_message(&mut control, &message).await?;
                        }
                    }
                    Err(e) => {
                        error!(peer = %peer, error = %e, "cannot apply a batch");
                        return Err(e.into());
                    }
                }
            }
            batch = batches.recv(), if applying.len() < MAX_QUEUED_APPLIES => {
                let batch = batch.ok_or(SessionError::Ended)??;
                shared.heard(peer, true);
                let Merged { ops, batches: merged, last_batch_ops, failed } =
                    merge_waiting(batch, &mut batches, &inbound)?;
                if !ops.is_empty() {
                    if let Some(latest) = ops.iter().map(|op| op.stamp).max() {
                        // The HLC keeps the maximum: observing the batch's latest stamp is
                        // equivalent to observing each, for one lock instead of many.
                        shared.observe(store, peer, latest);
                    }
                    // Queued behind the applies before it, without waiting for them to be
                    // durable: a batch that arrives during a slow sync joins the next group
                    // commit instead of waiting a sync for each batch ahead of it.
                    let count = ops.len() as u64;
                    let outcome = store.queue_remote(ops).await;
                    applying.push_back(QueuedApply {
                        epoch: inbound.epoch(),
                        outcome,
                        ops: count,
                        batches: merged,
                        last_batch_ops,
                    });
                }
                if let Some(error) = failed {
                    return Err(error);
                }
            }
        }
    }
}

/// A peer's batches taken for one apply: the first, then those already waiting behind it.
struct Merged {
    /// Ops of the batches of the current subscription, in order.
    ops: Vec<Op>,
    batches: u64,
    last_batch_ops: u64,
    /// The batch stream failed after these: apply them, then end the session.
    failed: Option<SessionError>,
}

/// Takes `first` and the batches waiting behind it (up to [`MAX_MERGED_OPS`]), so that the
/// batches that queued up while the store had no room for more go in together: one apply,
/// one journal sync, for all of them. Batches of an old subscription are dropped.
fn merge_waiting(
    first: ReceivedBatch,
    batches: &mut mpsc::Receiver<Result<ReceivedBatch, SessionError>>,
    inbound: &Inbound,
) -> Result<Merged, SessionError> {
    // A peer serves only the origins we asked it for; in particular it can never hand us ops
    // of our own origin, whose dots only we mint.
    let asked = inbound.origins();
    let mut merged = Merged {
        ops: Vec::new(),
        batches: 0,
        last_batch_ops: 0,
        failed: None,
    };
    let mut next = Some(first);
    while let Some(batch) = next.take() {
        if inbound.is_current(batch.epoch) {
            let unasked = |op: &&Op| !asked.is_some_and(|asked| asked.contains(&op.dot.node));
            if let Some(op) = batch.ops.iter().find(unasked) {
                return Err(SessionError::Protocol(format!(
                    "op {}:{} of an origin we did not subscribe to",
                    op.dot.node, op.dot.seq
                )));
            }
            merged.batches += 1;
            merged.last_batch_ops = batch.ops.len() as u64;
            merged.ops.extend(batch.ops);
        }
        if merged.ops.len() >= MAX_MERGED_OPS {
            break;
        }
        match batches.try_recv() {
            Ok(Ok(batch)) => next = Some(batch),
            // What came before the failure is applied first.
            Ok(Err(error)) => merged.failed = Some(error),
            Err(_) => {}
        }
    }
    Ok(merged)
}

/// Ops of a peer handed to the store and not yet durable, in the order they were queued.
struct QueuedApply {
    /// The subscription they were shipped under.
    epoch: u64,
    outcome: Applying,
    ops: u64,
    batches: u64,
    last_batch_ops: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_by_peer(code: quinn::TransportErrorCode) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    #[test]
    fn only_a_dialer_closing_its_own_handshake_is_not_a_refusal() {
        assert!(dialer_gave_up(&closed_by_peer(
            quinn::TransportErrorCode::APPLICATION_ERROR
        )));
        // TLS alert 42, bad_certificate: the dialer rejected us, or we it.
        assert!(!dialer_gave_up(&closed_by_peer(
            quinn::TransportErrorCode::crypto(42)
        )));
        assert!(!dialer_gave_up(&quinn::ConnectionError::TimedOut));
    }
}
