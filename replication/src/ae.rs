//! Anti-entropy: the Merkle sync dialogue, independent of the transport.
//!
//! # One round with one peer (push-pull), dialogue version 2
//! 0. Compare the full 32-byte roots ([`AeRequest::Root`]): identical replicas stop after
//!    this one small exchange.
//! 1. Descend only into differing nodes, one level per request ([`AeRequest::Children`]),
//!    comparing the children as short *fingerprints*: 4-byte keyed hashes under a salt the
//!    requester draws afresh each round, down to the 2^16 leaf buckets.
//! 2. For each differing bucket, compare the fingerprints of its leaves
//!    (`leaf(key, state hash)`, [`AeRequest::Leaves`]) as multisets: a leaf of the peer's that
//!    we lack names a key that differs or that we lack; a leaf of ours that the peer lacks, a
//!    key it lacks or holds differently. No key names travel at this step.
//! 3. Fetch the peer's states of the leaves we lack, by fingerprint ([`AeRequest::Fetch`]), and
//!    merge them here.
//! 4. Push ours (read after that merge) for the keys the peer lacks or holds differently,
//!    except where our join equals what the peer sent (it already has it):
//!    [`Message::PushStates`]. Both sides end with the join.
//!
//! Traffic is proportional to the difference: per differing node one fingerprint per child,
//! per differing bucket one fingerprint per key, and full states only of differing keys, each
//! sent once in each direction at most (once when one side's state includes the other's).
//! A fingerprint collision can hide a difference for one round only: the salt changes and the
//! unequal roots keep later rounds looking. Every list is bounded (see the `MAX_AE_*` limits
//! in [`crate::wire`]) and every request validated before it is served; a round repairs at
//! most `max_keys_per_round` keys and is paced by a keys/s and bytes/s budget; what is left
//! waits for the next round.
//!
//! Nodes still serve the version-1 requests (full 32-byte hashes, whole bucket key lists), so
//! an older peer can sync with a newer one; a newer node syncing with an older one fails its
//! rounds until the older one is upgraded.
//!
//! # States never run ahead of the applied vector (dialogue version 3)
//! A node's session tokens are built from its applied vector, so a state it holds must not
//! reflect an op that vector does not name: a client reading it would carry a token that lets
//! it read an older state in another region. Local writes and the WAL keep that invariant, and
//! anti-entropy keeps it too. States travel with the sender's applied vector, read after them,
//! which names every op they hold; the receiver waits (at most [`AeLimits::wal_wait`] a round)
//! until its own applied vector covers it, which the WAL makes happen within milliseconds while
//! replication keeps up, and otherwise leaves them for a later round (`keys_deferred`). The
//! exceptions are origins whose ops this node cannot get by the WAL any more: those a peer
//! reported truncated ([`WalGaps`]), where the fast-forward that follows a complete round
//! raises the applied vector after the merge, and the node's own, which it lacks only when its
//! data directory was copied back by hand. A version-2 peer (an older node, during an
//! upgrade) gets the version-2 dialogue, without the bound.
//!
//! [`run_round`] drives a round through an [`AeTransport`] (QUIC in `node`, a direct call in
//! tests); [`answer`] is the serving side.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use meridian_crdt::{NodeId, State, VersionVector, codec};

use crate::merkle::{self, DEPTH, FANOUT, Hash};
use crate::store::{ReplicaStore, StoreError};
use crate::wire::{
    AE_DIALOGUE_MIN_VERSION, AE_DIALOGUE_VERSION, AeReply, AeRequest, MAX_AE_BUCKETS, MAX_AE_ITEMS,
    MAX_AE_KEYS, MAX_AE_PREFIXES, Message,
};

/// Buckets asked per [`AeRequest::Leaves`].
const BUCKETS_PER_REQUEST: usize = 256;

/// Bytes per fingerprint. With a fresh salt per round, 4 bytes make a collision that hides a
/// difference for one round about a 2^-32 event per differing node compared, and the root
/// (compared in full) keeps later rounds looking until they find it.
const FP_LEN: u8 = 4;

/// Knobs of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AeLimits {
    /// Keys fetched plus pushed in one round; the rest waits for the next.
    pub max_keys_per_round: usize,
    /// Keys per states request or push.
    pub batch_keys: usize,
    /// Pace: keys exchanged per second (0: unlimited).
    pub keys_per_sec: u64,
    /// Pace: bytes sent plus received per second (0: unlimited).
    pub bytes_per_sec: u64,
    /// How long a round waits, in all, for this node's WAL to apply every op a peer's states
    /// name before it defers merging them to a later round (see "States never run ahead").
    pub wal_wait: Duration,
}

impl Default for AeLimits {
    fn default() -> Self {
        Self {
            max_keys_per_round: 100_000,
            batch_keys: 512,
            keys_per_sec: 100_000,
            bytes_per_sec: 64 * 1024 * 1024,
            wal_wait: WAL_WAIT,
        }
    }
}

/// The default [`AeLimits::wal_wait`]. Replication that keeps up applies a peer's ops within
/// milliseconds; a node further behind than this is catching up after a partition, and the
/// WAL brings it those ops anyway.
pub const WAL_WAIT: Duration = Duration::from_secs(2);

/// How long a node answering a push waits for its WAL. It cannot share a budget across the
/// messages of one round as the requester does, and a pushed state it defers is not lost: its
/// own rounds fetch it later.
const PUSH_WAL_WAIT: Duration = Duration::from_millis(250);

/// What a round did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundReport {
    /// Leaf buckets whose hashes differed.
    pub buckets_differing: u64,
    /// Keys whose (key, hash) items were compared.
    pub keys_compared: u64,
    /// Keys whose states were fetched from the peer, and how many of them changed ours.
    pub keys_fetched: u64,
    pub keys_repaired_here: u64,
    /// Keys whose states were pushed to the peer, and how many of them changed its.
    pub keys_pushed: u64,
    pub keys_repaired_there: u64,
    /// Frame bytes sent and received during the round.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Keys asked for that the peer did not send: they changed there since its leaves reply
    /// listed them (a fold rewrote their leaves), or did not fit in one reply. The next round
    /// fetches them.
    #[serde(default)]
    pub keys_unanswered: u64,
    /// Keys of ours whose state is too large for any message, so they were not pushed (see
    /// [`MAX_STATE_BYTES`]); the peer leaves its own such states out of its replies the same
    /// way, and they count as unanswered.
    #[serde(default)]
    pub keys_too_large: u64,
    /// Keys fetched but not merged, and keys the peer did not merge from our push, because
    /// the receiving node had not yet applied every op the sender's vector names (see
    /// "States never run ahead"). A later round merges them.
    #[serde(default)]
    pub keys_deferred: u64,
    /// False when the key budget ran out before every differing key was exchanged, or some
    /// fetched keys went unanswered: only a complete round vouches that this node holds every
    /// state the peer had (which is what a fast-forward relies on).
    pub complete: bool,
}

/// Why a round failed; the worker retries next round.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AeError {
    #[error("transport: {0}")]
    Transport(String),
    #[error("the peer could not answer: {0}")]
    Failed(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("not connected to {0}")]
    NotConnected(String),
    #[error("unknown peer {0}")]
    UnknownPeer(String),
}

/// One request, one reply, with the frame bytes each way.
pub trait AeTransport: Send + Sync {
    fn call(
        &self,
        request: Message,
    ) -> impl Future<Output = Result<(Message, u64, u64), AeError>> + Send;
}

/// The origins whose ops a node can no longer get by the WAL, so that anti-entropy merges
/// their states even ahead of its applied vector (see "States never run ahead").
#[derive(Clone, Copy, Debug)]
pub enum WalGaps<'a> {
    /// These origins: a peer reported our cursor for them truncated.
    Only(&'a BTreeSet<NodeId>),
    /// Every origin: nothing but anti-entropy runs between the two stores (tests, benchmarks,
    /// [`Direct`]).
    All,
}

impl WalGaps<'_> {
    fn contains(self, origin: NodeId) -> bool {
        match self {
            Self::Only(origins) => origins.contains(&origin),
            Self::All => true,
        }
    }
}

/// Runs one push-pull round with the peer behind `peer`, merging fetched states ahead of this
/// node's applied vector only for the origins in `wal_gaps`.
pub async fn run_round<S: ReplicaStore, T: AeTransport>(
    store: &S,
    peer: &T,
    limits: &AeLimits,
    wal_gaps: WalGaps<'_>,
) -> Result<RoundReport, AeError> {
    let started = Instant::now();
    let mut report = RoundReport {
        complete: true,
        ..RoundReport::default()
    };
    let call = async |request: AeRequest, report: &mut RoundReport| {
        let (reply, sent, received) = peer.call(Message::SyncRequest(request)).await?;
        report.bytes_sent += sent;
        report.bytes_received += received;
        match reply {
            Message::SyncReply(reply) => Ok(reply),
            Message::ReadFailed { reason } => Err(AeError::Failed(reason)),
            other => Err(AeError::Protocol(format!("unexpected reply {other:?}"))),
        }
    };
    let salt = fresh_salt();
    let fp = usize::from(FP_LEN);

    // 0. Equal roots: identical replicas, one small exchange. A peer that does not speak
    //    this version yet (an older node) is asked again in the oldest one it may speak.
    let mut version = AE_DIALOGUE_VERSION;
    let root = loop {
        match call(AeRequest::Root { version }, &mut report).await {
            Err(AeError::Failed(reason))
                if reason.contains("is not supported") && version > AE_DIALOGUE_MIN_VERSION =>
            {
                version = AE_DIALOGUE_MIN_VERSION;
            }
            other => break other?,
        }
    };
    let AeReply::Root { hash } = root else {
        return Err(AeError::Protocol("expected a root".into()));
    };
    if hash == root_of(store)? {
        return Ok(report);
    }
    let bounded = version >= 3;
    let mut wal_deadline: Option<Instant> = None;

    // 1. Descend the tree through differing nodes only, comparing salted fingerprints.
    let mut differing: Vec<u32> = vec![0];
    for depth in 0..DEPTH {
        let mut next = Vec::new();
        for chunk in differing.chunks(MAX_AE_PREFIXES) {
            let mut ours = Vec::with_capacity(chunk.len() * FANOUT * fp);
            for hash in store.tree_children(depth, chunk)? {
                merkle::fingerprint_into(salt, &hash, fp, &mut ours);
            }
            let request = AeRequest::Children {
                salt,
                fp_len: FP_LEN,
                depth,
                prefixes: chunk.to_vec(),
            };
            let AeReply::Children {
                fingerprints: theirs,
            } = call(request, &mut report).await?
            else {
                return Err(AeError::Protocol("expected children".into()));
            };
            if theirs.len() != ours.len() {
                return Err(AeError::Protocol(format!(
                    "{} fingerprint bytes for {} nodes",
                    theirs.len(),
                    chunk.len()
                )));
            }
            for (i, (a, b)) in ours.chunks(fp).zip(theirs.chunks(fp)).enumerate() {
                if a != b {
                    let (node, child) = (i / FANOUT, i % FANOUT);
                    next.push((chunk[node] << merkle::FANOUT_BITS) | child as u32);
                }
            }
        }
        differing = next;
        if differing.is_empty() {
            // The roots differ but every fingerprint collided under this salt: the next
            // round's salt finds the difference.
            report.complete = false;
            return Ok(report);
        }
    }
    report.buckets_differing = differing.len() as u64;

    // 2. Compare the differing buckets' leaf fingerprints; 3. fetch the peer's states of the
    //    leaves we lack, merge them; 4. push ours where the peer's differs from the join.
    let budget = limits.max_keys_per_round.max(1);
    let batch = limits.batch_keys.clamp(1, MAX_AE_KEYS);
    let mut exchanged = 0usize;
    for chunk in differing.chunks(BUCKETS_PER_REQUEST) {
        let ours = leaf_fingerprints(store.bucket_items(chunk, MAX_AE_ITEMS)?, salt, fp);
        let request = AeRequest::Leaves {
            salt,
            fp_len: FP_LEN,
            buckets: chunk.to_vec(),
        };
        let AeReply::Leaves { buckets: theirs } = call(request, &mut report).await? else {
            return Err(AeError::Protocol("expected leaves".into()));
        };
        if theirs.len() != chunk.len() || theirs.iter().any(|l| l.len() % fp != 0) {
            return Err(AeError::Protocol("malformed leaves reply".into()));
        }
        let mut wanted: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut push: Vec<Vec<u8>> = Vec::new();
        for (&bucket, their_leaves) in chunk.iter().zip(&theirs) {
            let mine = ours.get(&bucket).map_or(&[][..], Vec::as_slice);
            let (missing_here, missing_there, compared) = diff_leaves(mine, their_leaves, fp);
            report.keys_compared += compared;
            wanted.extend(missing_here.into_iter().map(|f| (bucket, f)));
            push.extend(missing_there);
        }
        let room = budget.saturating_sub(exchanged);
        let budget_spent = wanted.len() + push.len() > room;
        if budget_spent {
            report.complete = false;
            wanted.truncate(room);
            push.truncate(room - wanted.len());
        }
        exchanged += wanted.len() + push.len();

        // What the peer holds of each fetched key: a join equal to it need not go back.
        let mut theirs_by_key: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for items in wanted.chunks(batch) {
            let wanted = group_by_bucket(items);
            let (states, bound) = if bounded {
                let request = AeRequest::FetchBounded {
                    salt,
                    fp_len: FP_LEN,
                    wanted,
                };
                let AeReply::BoundedStates { states, applied } = call(request, &mut report).await?
                else {
                    return Err(AeError::Protocol("expected bounded states".into()));
                };
                (states, Some(applied))
            } else {
                let request = AeRequest::Fetch {
                    salt,
                    fp_len: FP_LEN,
                    wanted,
                };
                let AeReply::States { states } = call(request, &mut report).await? else {
                    return Err(AeError::Protocol("expected states".into()));
                };
                (states, None)
            };
            if let Some((key, _)) = states
                .iter()
                .find(|(k, _)| !chunk.contains(&merkle::bucket_of(k)))
            {
                return Err(AeError::Protocol(format!(
                    "a state for {key:?}, outside the buckets asked for"
                )));
            }
            let decoded = decode_states(states.iter().cloned())?;
            let unanswered = items.len().saturating_sub(decoded.len()) as u64;
            if unanswered > 0 {
                report.keys_unanswered += unanswered;
                report.complete = false;
            }
            report.keys_fetched += decoded.len() as u64;
            let deadline = *wal_deadline.get_or_insert_with(|| Instant::now() + limits.wal_wait);
            let applied_here = match &bound {
                Some(bound) => applied_covers(store, bound, wal_gaps, deadline).await,
                None => true,
            };
            if applied_here {
                report.keys_repaired_here += store.merge_states(decoded).await?;
                theirs_by_key.extend(states);
            } else {
                report.keys_deferred += decoded.len() as u64;
                report.complete = false;
            }
            pace(started, &report, limits).await;
        }
        let mut push_keys: BTreeSet<Vec<u8>> = push.into_iter().collect();
        push_keys.extend(theirs_by_key.keys().cloned());
        let push_keys: Vec<Vec<u8>> = push_keys.into_iter().collect();
        for keys in push_keys.chunks(batch) {
            let mut states: Vec<(Vec<u8>, Vec<u8>)> = store
                .read_states(keys.to_vec())
                .await?
                .into_iter()
                .filter_map(|(k, s)| Some((k, s?)))
                .filter(|(k, s)| theirs_by_key.get(k) != Some(s))
                .collect();
            report.keys_too_large += drop_oversized(&mut states, "push");
            if states.is_empty() {
                continue;
            }
            // Read after the states: it names every op they hold.
            let applied = store.applied();
            for part in split_by_bytes(states, STATES_MESSAGE_BYTES) {
                report.keys_pushed += part.len() as u64;
                if bounded {
                    let request = AeRequest::PushBounded {
                        states: part,
                        applied: applied.clone(),
                    };
                    let AeReply::Pushed { merged, deferred } = call(request, &mut report).await?
                    else {
                        return Err(AeError::Protocol("expected Pushed".into()));
                    };
                    report.keys_repaired_there += merged;
                    report.keys_deferred += deferred;
                } else {
                    let Message::PushReply { merged } = peer_push(peer, part, &mut report).await?
                    else {
                        return Err(AeError::Protocol("expected PushReply".into()));
                    };
                    report.keys_repaired_there += merged;
                }
                pace(started, &report, limits).await;
            }
        }
        if budget_spent {
            break;
        }
    }
    Ok(report)
}

/// The most state bytes one message carries, half the frame limit: a batch of keys is bounded
/// by count, and large states (a big set, registers near the value limit) would otherwise
/// make a message the frame refuses, failing every round at the same keys.
const STATES_MESSAGE_BYTES: usize = crate::wire::MAX_FRAME / 2;

/// The largest key plus state that travels at all: one alone in a message, with room left for
/// the framing. A larger one (a set of many large elements) is left out of fetch replies and
/// pushes, logged and counted, rather than failing the round: that key cannot be repaired by
/// anti-entropy, but every other key still is.
pub const MAX_STATE_BYTES: usize = crate::wire::MAX_FRAME - (64 << 10);

/// Splits off the states too large to travel, logging each.
fn drop_oversized(states: &mut Vec<(Vec<u8>, Vec<u8>)>, doing: &str) -> u64 {
    let before = states.len();
    states.retain(|(key, state)| {
        let fits = key.len() + state.len() <= MAX_STATE_BYTES;
        if !fits {
            tracing::warn!(
                key = %String::from_utf8_lossy(key),
                bytes = state.len(),
                limit = MAX_STATE_BYTES,
                "anti-entropy cannot {doing} a state this large; its ops still replicate by the WAL"
            );
        }
        fits
    });
    (before - states.len()) as u64
}

/// Whether this node has applied every op `bound` names, outside `wal_gaps` and its own
/// origin, by `deadline`: waits for its WAL until then. No WAL brings a node its own ops; it
/// lacks some only when its data directory was copied back by hand (ARCHITECTURE, "Known
/// hazards"), and then anti-entropy is the only way back.
async fn applied_covers<S: ReplicaStore>(
    store: &S,
    bound: &VersionVector,
    wal_gaps: WalGaps<'_>,
    deadline: Instant,
) -> bool {
    let own = store.node_id();
    let needed: VersionVector = bound
        .iter()
        .filter(|&(origin, _)| origin != own && !wal_gaps.contains(origin))
        .collect();
    let wait = deadline.saturating_duration_since(Instant::now());
    crate::store::applied_within(store, &needed, wait).await
}

/// Cuts `states` into runs of at most `limit` bytes of keys and states (a state larger than
/// that travels alone), in order.
fn split_by_bytes(states: Vec<(Vec<u8>, Vec<u8>)>, limit: usize) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut parts: Vec<Vec<(Vec<u8>, Vec<u8>)>> = Vec::new();
    let mut bytes = 0;
    for (key, state) in states {
        // A few bytes of framing per entry besides the key and the state.
        let size = key.len() + state.len() + 16;
        match parts.last_mut() {
            Some(part) if bytes + size <= limit => part.push((key, state)),
            _ => {
                parts.push(vec![(key, state)]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    parts
}

/// Sends our states for the peer to merge (the version-1 message, which both dialogues share).
async fn peer_push<T: AeTransport>(
    peer: &T,
    states: Vec<(Vec<u8>, Vec<u8>)>,
    report: &mut RoundReport,
) -> Result<Message, AeError> {
    let (reply, sent, received) = peer.call(Message::PushStates { states }).await?;
    report.bytes_sent += sent;
    report.bytes_received += received;
    match reply {
        Message::ReadFailed { reason } => Err(AeError::Failed(reason)),
        other => Ok(other),
    }
}

/// A salt no earlier round used (with overwhelming probability).
fn fresh_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static ROUNDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(ROUNDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.finish()
}

/// The full root hash of `store`'s tree.
fn root_of<S: ReplicaStore>(store: &S) -> Result<Hash, StoreError> {
    Ok(merkle::combine(&store.tree_children(0, &[0])?))
}

/// A storage key and its leaf fingerprint.
type Leaf = (Vec<u8>, Vec<u8>);

/// Our (key, leaf fingerprint) items per bucket.
fn leaf_fingerprints(
    items: Vec<(Vec<u8>, Hash)>,
    salt: u64,
    fp: usize,
) -> BTreeMap<u32, Vec<Leaf>> {
    let mut out: BTreeMap<u32, Vec<Leaf>> = BTreeMap::new();
    for (key, state) in items {
        let mut f = Vec::with_capacity(fp);
        merkle::fingerprint_into(salt, &merkle::leaf(&key, &state), fp, &mut f);
        out.entry(merkle::bucket_of(&key))
            .or_default()
            .push((key, f));
    }
    out
}

/// One bucket's leaves on both sides → the peer's fingerprints we lack (their keys differ or
/// are missing here), our keys whose fingerprints the peer lacks, and how many leaves were
/// compared. Fingerprints are compared as multisets, so duplicates cannot hide a key.
fn diff_leaves(ours: &[Leaf], theirs: &[u8], fp: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, u64) {
    let mut unmatched: BTreeMap<&[u8], usize> = BTreeMap::new();
    for f in theirs.chunks(fp) {
        *unmatched.entry(f).or_default() += 1;
    }
    let mut missing_there = Vec::new();
    for (key, f) in ours {
        match unmatched.get_mut(f.as_slice()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => missing_there.push(key.clone()),
        }
    }
    let missing_here = unmatched
        .into_iter()
        .flat_map(|(f, n)| std::iter::repeat_n(f.to_vec(), n))
        .collect();
    let compared = ours.len().max(theirs.len() / fp) as u64;
    (missing_here, missing_there, compared)
}

/// (bucket, fingerprint) items → one concatenated fingerprint list per bucket.
fn group_by_bucket(items: &[(u32, Vec<u8>)]) -> Vec<(u32, Vec<u8>)> {
    let mut grouped: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for (bucket, f) in items {
        grouped.entry(*bucket).or_default().extend_from_slice(f);
    }
    grouped.into_iter().collect()
}

/// Decodes states from a peer, refusing undecodable ones and kind mismatches.
fn decode_states(
    states: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Result<Vec<(Vec<u8>, State)>, AeError> {
    let mut out = Vec::new();
    for (key, bytes) in states {
        let Some((kind, _)) = merkle::split_storage_key(&key) else {
            return Err(AeError::Protocol("unparseable storage key".into()));
        };
        let state = codec::decode_state(&bytes)
            .map_err(|e| AeError::Protocol(format!("bad state: {e}")))?;
        if state.kind() != kind {
            return Err(AeError::Protocol(format!(
                "a {} state for a {kind} key",
                state.kind()
            )));
        }
        out.push((key, state));
    }
    Ok(out)
}

/// Sleeps so that the round stays within its keys/s and bytes/s budget.
async fn pace(started: Instant, report: &RoundReport, limits: &AeLimits) {
    let keys = report.keys_fetched + report.keys_pushed;
    let bytes = report.bytes_sent + report.bytes_received;
    let mut due = Duration::ZERO;
    if limits.keys_per_sec > 0 {
        due = due.max(Duration::from_secs_f64(
            keys as f64 / limits.keys_per_sec as f64,
        ));
    }
    if limits.bytes_per_sec > 0 {
        due = due.max(Duration::from_secs_f64(
            bytes as f64 / limits.bytes_per_sec as f64,
        ));
    }
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::time::sleep(wait).await;
    }
}

/// Serves one anti-entropy request; `None` when `request` is not one.
pub async fn answer<S: ReplicaStore>(
    store: &S,
    request: Message,
    wal_gaps: WalGaps<'_>,
) -> Option<Message> {
    let failed = |reason: String| Message::ReadFailed { reason };
    let reply = match request {
        Message::TreeRequest { prefixes, .. } if prefixes.len() > MAX_AE_PREFIXES => {
            failed(format!("{} prefixes is too many", prefixes.len()))
        }
        Message::TreeRequest { depth, prefixes } => {
            if depth >= DEPTH || prefixes.iter().any(|&p| !merkle::valid_prefix(depth, p)) {
                failed("no such tree node".into())
            } else {
                match store.tree_children(depth, &prefixes) {
                    Ok(hashes) => Message::TreeReply { hashes },
                    Err(e) => failed(e.to_string()),
                }
            }
        }
        Message::BucketRequest { buckets } if buckets.len() > MAX_AE_BUCKETS => {
            failed(format!("{} buckets is too many", buckets.len()))
        }
        Message::BucketRequest { buckets } => match store.bucket_items(&buckets, MAX_AE_ITEMS) {
            Ok(items) => Message::BucketReply { items },
            Err(e) => failed(e.to_string()),
        },
        Message::StatesRequest { keys } if keys.len() > MAX_AE_KEYS => {
            failed(format!("{} keys is too many", keys.len()))
        }
        Message::StatesRequest { keys } => match store.read_states(keys).await {
            Ok(states) => Message::StatesReply { states },
            Err(e) => failed(e.to_string()),
        },
        Message::SyncRequest(request) => match answer_v2(store, request, wal_gaps).await {
            Ok(reply) => Message::SyncReply(reply),
            Err(reason) => failed(reason),
        },
        Message::PushStates { states } if states.len() > MAX_AE_KEYS => {
            failed(format!("{} states is too many", states.len()))
        }
        Message::PushStates { states } => match decode_states(states.into_iter()) {
            Ok(decoded) => match store.merge_states(decoded).await {
                Ok(merged) => Message::PushReply { merged },
                Err(e) => failed(e.to_string()),
            },
            Err(e) => failed(e.to_string()),
        },
        _ => return None,
    };
    Some(reply)
}

/// Serves one request of the dialogue (versions 2 and 3), validating everything the peer
/// chose.
async fn answer_v2<S: ReplicaStore>(
    store: &S,
    request: AeRequest,
    wal_gaps: WalGaps<'_>,
) -> Result<AeReply, String> {
    let fp_len = |len: u8| {
        let len = usize::from(len);
        if (1..=merkle::MAX_FINGERPRINT).contains(&len) {
            Ok(len)
        } else {
            Err(format!("fingerprint length {len} is not in 1..=32"))
        }
    };
    let valid_buckets = |buckets: &mut dyn Iterator<Item = u32>| {
        let mut n = 0;
        for b in buckets {
            n += 1;
            if !merkle::valid_prefix(DEPTH, b) {
                return Err(format!("no bucket {b}"));
            }
        }
        if n > MAX_AE_BUCKETS {
            return Err(format!("{n} buckets is too many"));
        }
        Ok(())
    };
    match request {
        AeRequest::Root { version }
            if !(AE_DIALOGUE_MIN_VERSION..=AE_DIALOGUE_VERSION).contains(&version) =>
        {
            Err(format!(
                "anti-entropy dialogue version {version} is not supported (this node speaks {AE_DIALOGUE_VERSION})"
            ))
        }
        AeRequest::Root { .. } => Ok(AeReply::Root {
            hash: root_of(store).map_err(|e| e.to_string())?,
        }),
        AeRequest::Children {
            salt,
            fp_len: len,
            depth,
            prefixes,
        } => {
            let fp = fp_len(len)?;
            if prefixes.len() > MAX_AE_PREFIXES {
                return Err(format!("{} prefixes is too many", prefixes.len()));
            }
            if depth >= DEPTH || prefixes.iter().any(|&p| !merkle::valid_prefix(depth, p)) {
                return Err("no such tree node".into());
            }
            let hashes = store
                .tree_children(depth, &prefixes)
                .map_err(|e| e.to_string())?;
            let mut fingerprints = Vec::with_capacity(hashes.len() * fp);
            for hash in &hashes {
                merkle::fingerprint_into(salt, hash, fp, &mut fingerprints);
            }
            Ok(AeReply::Children { fingerprints })
        }
        AeRequest::Leaves {
            salt,
            fp_len: len,
            buckets,
        } => {
            let fp = fp_len(len)?;
            valid_buckets(&mut buckets.iter().copied())?;
            let items = store
                .bucket_items(&buckets, MAX_AE_ITEMS)
                .map_err(|e| e.to_string())?;
            let mut by_bucket = leaf_fingerprints(items, salt, fp);
            let buckets = buckets
                .iter()
                .map(|b| {
                    by_bucket
                        .get_mut(b)
                        .map(|leaves| leaves.iter().flat_map(|(_, f)| f.clone()).collect())
                        .unwrap_or_default()
                })
                .collect();
            Ok(AeReply::Leaves { buckets })
        }
        AeRequest::Fetch {
            salt,
            fp_len: len,
            wanted,
        } => {
            let fp = fp_len(len)?;
            valid_buckets(&mut wanted.iter().map(|(b, _)| *b))?;
            let states = wanted_states(store, salt, fp, &wanted).await?;
            Ok(AeReply::States { states })
        }
        AeRequest::FetchBounded {
            salt,
            fp_len: len,
            wanted,
        } => {
            let fp = fp_len(len)?;
            valid_buckets(&mut wanted.iter().map(|(b, _)| *b))?;
            let states = wanted_states(store, salt, fp, &wanted).await?;
            // Read after the states: it names every op they hold.
            let applied = store.applied();
            Ok(AeReply::BoundedStates { states, applied })
        }
        AeRequest::PushBounded { states, .. } if states.len() > MAX_AE_KEYS => {
            Err(format!("{} states is too many", states.len()))
        }
        AeRequest::PushBounded { states, applied } => {
            let pushed = states.len() as u64;
            let decoded = decode_states(states.into_iter()).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + PUSH_WAL_WAIT;
            if applied_covers(store, &applied, wal_gaps, deadline).await {
                let merged = store
                    .merge_states(decoded)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(AeReply::Pushed {
                    merged,
                    deferred: 0,
                })
            } else {
                Ok(AeReply::Pushed {
                    merged: 0,
                    deferred: pushed,
                })
            }
        }
    }
}

/// The states of the keys whose leaf fingerprints `wanted` lists (validated by the caller),
/// as many as fit in one reply: what does not fit goes unanswered, the round that asked says
/// so, and the next one asks again for what is still missing.
async fn wanted_states<S: ReplicaStore>(
    store: &S,
    salt: u64,
    fp: usize,
    wanted: &[(u32, Vec<u8>)],
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
    let count: usize = wanted.iter().map(|(_, f)| f.len() / fp).sum();
    if count > MAX_AE_KEYS || wanted.iter().any(|(_, f)| f.len() % fp != 0) {
        return Err(format!("{count} fingerprints is too many or malformed"));
    }
    let mut wanted_set: BTreeSet<(u32, &[u8])> = BTreeSet::new();
    for (bucket, fps) in wanted {
        wanted_set.extend(fps.chunks(fp).map(|f| (*bucket, f)));
    }
    let buckets: Vec<u32> = wanted
        .iter()
        .map(|(b, _)| *b)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let items = store
        .bucket_items(&buckets, MAX_AE_ITEMS)
        .map_err(|e| e.to_string())?;
    let keys: Vec<Vec<u8>> = leaf_fingerprints(items, salt, fp)
        .into_iter()
        .flat_map(|(bucket, leaves)| {
            leaves
                .into_iter()
                .filter(|(_, f)| wanted_set.contains(&(bucket, f.as_slice())))
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        })
        .collect();
    let states = store.read_states(keys).await.map_err(|e| e.to_string())?;
    let mut held = states
        .into_iter()
        .filter_map(|(k, s)| Some((k, s?)))
        .collect();
    drop_oversized(&mut held, "send");
    Ok(split_by_bytes(held, STATES_MESSAGE_BYTES)
        .into_iter()
        .next()
        .unwrap_or_default())
}

/// A peer reached by calling [`answer`] on its store directly: for tests and benchmarks,
/// where anti-entropy is all that runs between the two stores ([`WalGaps::All`]).
#[derive(Debug)]
pub struct Direct<'a, S>(pub &'a S);

impl<S: ReplicaStore> AeTransport for Direct<'_, S> {
    async fn call(&self, request: Message) -> Result<(Message, u64, u64), AeError> {
        let sent = crate::wire::encode_frame(&request)
            .map_err(|e| AeError::Protocol(e.to_string()))?
            .len() as u64;
        let reply = answer(self.0, request, WalGaps::All)
            .await
            .ok_or_else(|| AeError::Protocol("not an anti-entropy request".into()))?;
        let received = crate::wire::encode_frame(&reply)
            .map_err(|e| AeError::Protocol(e.to_string()))?
            .len() as u64;
        Ok((reply, sent, received))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;
    use meridian_crdt::{CanonicalJson, Dot, Kind, LwwRegister, NodeId, OrSet, PnCounter, Stamp};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    /// A transport that counts the requests it carries.
    struct Counting<'a>(Direct<'a, MemStore>, AtomicU64);

    impl AeTransport for Counting<'_> {
        async fn call(&self, request: Message) -> Result<(Message, u64, u64), AeError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.call(request).await
        }
    }

    /// A peer that answers as a node with a WAL beside anti-entropy does: it merges pushed
    /// states only once its applied vector names their ops.
    struct WithWal<'a>(&'a MemStore);

    impl AeTransport for WithWal<'_> {
        async fn call(&self, request: Message) -> Result<(Message, u64, u64), AeError> {
            let reply = answer(self.0, request, WalGaps::Only(&BTreeSet::new()))
                .await
                .ok_or_else(|| AeError::Protocol("not an anti-entropy request".into()))?;
            Ok((reply, 0, 0))
        }
    }

    /// A node of the version-2 dialogue: it refuses version 3 as such a node does, word for
    /// word, and cannot decode the version-3 requests.
    struct VersionTwo<'a>(&'a MemStore);

    impl AeTransport for VersionTwo<'_> {
        async fn call(&self, request: Message) -> Result<(Message, u64, u64), AeError> {
            let refused = |reason: &str| {
                Ok((
                    Message::ReadFailed {
                        reason: reason.to_owned(),
                    },
                    0,
                    0,
                ))
            };
            match &request {
                Message::SyncRequest(AeRequest::Root { version }) if *version != 2 => {
                    refused(&format!(
                        "anti-entropy dialogue version {version} is not supported (this node speaks 2)"
                    ))
                }
                Message::SyncRequest(
                    AeRequest::FetchBounded { .. } | AeRequest::PushBounded { .. },
                ) => refused("malformed message"),
                _ => Direct(self.0).call(request).await,
            }
        }
    }

    /// Limits for rounds that should not pace themselves, waiting `wal_wait` for the WAL.
    fn unpaced(wal_wait: Duration) -> AeLimits {
        AeLimits {
            keys_per_sec: 0,
            bytes_per_sec: 0,
            wal_wait,
            ..AeLimits::default()
        }
    }

    /// Node 2 wrote five counters; node 1 has not applied those ops yet.
    fn lagging_pair() -> (MemStore, MemStore, Vec<meridian_crdt::Op>) {
        let a = MemStore::new(n(1), Duration::from_secs(10));
        let b = MemStore::new(n(2), Duration::from_secs(10));
        let ops = (0..5)
            .map(|i| b.increment(&format!("k{i}"), 1).unwrap())
            .collect();
        (a, b, ops)
    }

    /// States whose ops this node has not applied are not merged: a client reading them here
    /// would get a session token that does not name those ops. Once the WAL has brought the
    /// ops, the states merge.
    #[test]
    fn a_lagging_node_defers_states_its_applied_vector_does_not_name() {
        run(async {
            let (a, b, ops) = lagging_pair();
            let none = BTreeSet::new();
            let limits = unpaced(Duration::from_millis(50));
            let report = run_round(&a, &Direct(&b), &limits, WalGaps::Only(&none))
                .await
                .unwrap();
            assert_eq!(report.keys_deferred, 5, "{report:?}");
            assert_eq!(report.keys_repaired_here, 0, "{report:?}");
            assert!(!report.complete);
            assert!(a.states().is_empty(), "merged ahead of the applied vector");
            // The WAL brings three of the five ops: still behind, still deferred.
            a.apply_remote(ops[..3].to_vec()).await.unwrap();
            b.merge_unlogged(Kind::Set, "planted", &planted_set(n(2)))
                .unwrap();
            let report = run_round(&a, &Direct(&b), &limits, WalGaps::Only(&none))
                .await
                .unwrap();
            assert!(report.keys_deferred > 0, "{report:?}");
            assert!(!a.states().contains_key(&(Kind::Set, "planted".to_owned())));
            // All of them: now the state the WAL cannot bring (planted without an op) merges.
            a.apply_remote(ops[3..].to_vec()).await.unwrap();
            let report = run_round(&a, &Direct(&b), &limits, WalGaps::Only(&none))
                .await
                .unwrap();
            assert_eq!(report.keys_deferred, 0, "{report:?}");
            assert!(report.complete, "{report:?}");
            assert_eq!(a.states(), b.states());
        });
    }

    /// A set joined into a store without an op: what anti-entropy exists to repair.
    fn planted_set(origin: NodeId) -> State {
        let element = CanonicalJson::parse("\"planted\"").unwrap();
        State::Set(OrSet::default().add(origin, [element]))
    }

    /// While replication keeps up, the round waits the few milliseconds the WAL takes and
    /// merges in the same round.
    #[test]
    fn a_round_waits_for_the_wal_to_catch_up_and_then_merges() {
        run(async {
            let (a, b, ops) = lagging_pair();
            b.merge_unlogged(Kind::Set, "planted", &planted_set(n(2)))
                .unwrap();
            let none = BTreeSet::new();
            let limits = unpaced(Duration::from_secs(10));
            let wal = async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                a.apply_remote(ops).await.unwrap();
            };
            let peer = Direct(&b);
            let (report, ()) =
                tokio::join!(run_round(&a, &peer, &limits, WalGaps::Only(&none)), wal);
            let report = report.unwrap();
            assert_eq!(report.keys_deferred, 0, "{report:?}");
            assert!(report.complete, "{report:?}");
            assert_eq!(a.states(), b.states());
        });
    }

    /// An origin the WAL can no longer bring (a peer reported it truncated) is repaired by
    /// anti-entropy alone: its states merge at once.
    #[test]
    fn states_of_an_origin_the_wal_cannot_bring_merge_ahead() {
        run(async {
            let (a, b, _) = lagging_pair();
            let gaps = BTreeSet::from([n(2)]);
            let limits = unpaced(Duration::from_secs(10));
            let report = run_round(&a, &Direct(&b), &limits, WalGaps::Only(&gaps))
                .await
                .unwrap();
            assert_eq!(report.keys_deferred, 0, "{report:?}");
            assert_eq!(report.keys_repaired_here, 5, "{report:?}");
            assert_eq!(a.states(), b.states());
        });
    }

    /// The peer applies the same rule to what we push: it does not merge states whose ops it
    /// has not applied, and says how many it left.
    #[test]
    fn a_lagging_peer_defers_what_we_push() {
        run(async {
            let (a, b, _) = lagging_pair();
            let limits = unpaced(Duration::from_millis(50));
            let report = run_round(&b, &WithWal(&a), &limits, WalGaps::All)
                .await
                .unwrap();
            assert_eq!(report.keys_pushed, 5, "{report:?}");
            assert_eq!(report.keys_repaired_there, 0, "{report:?}");
            assert_eq!(report.keys_deferred, 5, "{report:?}");
            assert!(a.states().is_empty());
        });
    }

    /// A node that speaks only the version-2 dialogue (an older one, mid-upgrade) still syncs:
    /// the round falls back to version 2.
    #[test]
    fn a_version_two_peer_gets_the_version_two_dialogue() {
        run(async {
            let (a, b, _) = lagging_pair();
            let none = BTreeSet::new();
            let limits = unpaced(Duration::from_millis(50));
            let report = run_round(&a, &VersionTwo(&b), &limits, WalGaps::Only(&none))
                .await
                .unwrap();
            assert!(report.complete, "{report:?}");
            assert_eq!(report.keys_repaired_here, 5, "{report:?}");
            assert_eq!(a.states(), b.states());
        });
    }

    /// A transport that writes to the peer's keys between its leaves reply and the fetch that
    /// follows, as a fold on a node under writes does.
    struct WritesBeforeFetch<'a>(&'a MemStore, Vec<String>);

    impl AeTransport for WritesBeforeFetch<'_> {
        async fn call(&self, request: Message) -> Result<(Message, u64, u64), AeError> {
            if matches!(
                request,
                Message::SyncRequest(AeRequest::Fetch { .. } | AeRequest::FetchBounded { .. })
            ) {
                for key in &self.1 {
                    self.0.increment(key, 1).unwrap();
                }
            }
            Direct(self.0).call(request).await
        }
    }

    /// One key's divergent state, from a small generated description.
    fn state_of(kind: u8, origin: u64, value: u64) -> (Kind, State) {
        let node = n(origin);
        match kind % 3 {
            0 => {
                let json = CanonicalJson::parse(&value.to_string()).unwrap();
                let reg = LwwRegister::default().write(
                    Stamp::new(value, node),
                    Dot::new(node, value + 1),
                    (value % 5 != 0).then_some(json),
                );
                (Kind::Register, State::Register(reg))
            }
            1 => {
                let c = PnCounter::default()
                    .increment(node, value as i64 + 1)
                    .unwrap();
                (Kind::Counter, State::Counter(c))
            }
            _ => {
                let e = CanonicalJson::parse(&format!("\"e{value}\"")).unwrap();
                (Kind::Set, State::Set(OrSet::default().add(node, [e])))
            }
        }
    }

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Registers near the 64 KiB value limit: 400 of them are 24 MiB, more than a frame
    /// holds.
    fn large_registers(store: &MemStore, origin: NodeId, prefix: &str) {
        for i in 0..400_u64 {
            let value = format!("\"{i}{}\"", "x".repeat(60 << 10));
            let register = LwwRegister::default().write(
                Stamp::new(i + 1, origin),
                Dot::new(origin, i + 1),
                Some(CanonicalJson::parse(&value).unwrap()),
            );
            store
                .merge_unlogged(
                    Kind::Register,
                    &format!("{prefix}{i}"),
                    &State::Register(register),
                )
                .unwrap();
        }
    }

    #[test]
    fn states_larger_than_a_message_cross_in_several() {
        run(async {
            let a = MemStore::new(n(1), Duration::from_secs(10));
            let b = MemStore::new(n(2), Duration::from_secs(10));
            large_registers(&a, n(1), "a");
            large_registers(&b, n(2), "b");
            let limits = AeLimits {
                keys_per_sec: 0,
                bytes_per_sec: 0,
                ..AeLimits::default()
            };
            let first = run_round(&a, &Direct(&b), &limits, WalGaps::All)
                .await
                .unwrap();
            // Every push went, in several messages; the fetch reply held what fitted.
            assert_eq!(first.keys_repaired_there, 400, "{first:?}");
            assert!(!first.complete, "{first:?}");
            assert!(first.keys_unanswered > 0, "{first:?}");
            let mut rounds = 1;
            while !run_round(&a, &Direct(&b), &limits, WalGaps::All)
                .await
                .unwrap()
                .complete
            {
                rounds += 1;
                assert!(rounds < 10, "no round completed");
            }
            assert_eq!(a.states(), b.states());
            assert_eq!(a.merkle_root(), b.merkle_root());
        });
    }

    /// A set whose encoding is larger than a frame: 300 elements of 60 KiB, about 18 MiB.
    fn oversized_set(store: &MemStore, origin: NodeId, key: &str) {
        let elements = (0..300_u32)
            .map(|i| CanonicalJson::parse(&format!("\"{i}{}\"", "y".repeat(60 << 10))).unwrap());
        let set = OrSet::default().add(origin, elements);
        store
            .merge_unlogged(Kind::Set, key, &State::Set(set))
            .unwrap();
        let encoded = codec::encode_state(&store.states()[&(Kind::Set, key.to_owned())]);
        assert!(
            encoded.len() > crate::wire::MAX_FRAME,
            "{} bytes",
            encoded.len()
        );
    }

    /// A state no frame can carry is left out, both ways: every other key is still repaired,
    /// and the round says what it could not carry instead of failing at that key every time.
    #[test]
    fn a_state_larger_than_a_frame_is_skipped_and_the_rest_repaired() {
        run(async {
            let a = MemStore::new(n(1), Duration::from_secs(10));
            let b = MemStore::new(n(2), Duration::from_secs(10));
            oversized_set(&b, n(2), "big-there");
            oversized_set(&a, n(1), "big-here");
            for i in 0..10 {
                b.increment(&format!("there{i}"), 1).unwrap();
                a.increment(&format!("here{i}"), 1).unwrap();
            }
            let limits = AeLimits {
                keys_per_sec: 0,
                bytes_per_sec: 0,
                ..AeLimits::default()
            };
            for _ in 0..2 {
                let report = run_round(&a, &Direct(&b), &limits, WalGaps::All)
                    .await
                    .unwrap();
                assert!(!report.complete, "{report:?}");
                // Ours could not go; theirs did not come (the peer left it out).
                assert_eq!(report.keys_too_large, 1, "{report:?}");
                assert_eq!(report.keys_unanswered, 1, "{report:?}");
            }
            let without = |store: &MemStore, big: &str| {
                let mut states = store.states();
                states.retain(|(_, key), _| !key.starts_with("big"));
                assert!(store.states().contains_key(&(Kind::Set, big.to_owned())));
                states
            };
            assert_eq!(without(&a, "big-here"), without(&b, "big-there"));
            assert_eq!(without(&a, "big-here").len(), 20);
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random divergent pairs of stores: one round makes them identical (same states, same
        /// root), and a second round finds nothing, exchanging only the roots.
        #[test]
        fn one_round_makes_random_divergent_stores_identical(
            common in proptest::collection::vec((0_u8..3, 1_u64..4, 0_u64..50), 0..200),
            only_a in proptest::collection::vec((0_u16..300, 0_u8..3, 1_u64..4, 0_u64..50), 0..40),
            only_b in proptest::collection::vec((0_u16..300, 0_u8..3, 1_u64..4, 0_u64..50), 0..40),
        ) {
            run(async {
                let a = MemStore::new(n(1), Duration::from_secs(10));
                let b = MemStore::new(n(2), Duration::from_secs(10));
                for (i, &(kind, origin, value)) in common.iter().enumerate() {
                    let (kind, state) = state_of(kind, origin, value);
                    a.merge_unlogged(kind, &format!("k{i}"), &state).unwrap();
                    b.merge_unlogged(kind, &format!("k{i}"), &state).unwrap();
                }
                // Divergence: keys of the common range changed on one side (same kind), or
                // new keys; both sides may touch the same key.
                for (side, extra) in [(&a, &only_a), (&b, &only_b)] {
                    for &(key, kind, origin, value) in extra {
                        let (kind, state) = match common.get(usize::from(key)) {
                            Some(&(k, _, _)) => state_of(k, origin, value + 100),
                            None => state_of(kind, origin, value),
                        };
                        side.merge_unlogged(kind, &format!("k{key}"), &state).unwrap();
                    }
                }
                let limits = AeLimits { keys_per_sec: 0, bytes_per_sec: 0, ..AeLimits::default() };
                let report = run_round(&a, &Direct(&b), &limits, WalGaps::All).await.unwrap();
                prop_assert!(report.complete);
                prop_assert_eq!(a.states(), b.states());
                prop_assert_eq!(a.merkle_root(), b.merkle_root());
                let counting = Counting(Direct(&b), AtomicU64::new(0));
                let again = run_round(&a, &counting, &limits, WalGaps::All).await.unwrap();
                prop_assert_eq!(counting.1.load(Ordering::Relaxed), 1, "{:?}", again);
                prop_assert_eq!(again.keys_compared, 0);
                Ok(())
            })?;
        }

        /// Keys the peer rewrote between listing and fetching them are not fetched: the round
        /// says so and is not complete, and the next one repairs them.
        #[test]
        fn a_round_whose_fetches_go_unanswered_is_not_complete(changed in 1_usize..20) {
            run(async {
                let a = MemStore::new(n(1), Duration::from_secs(10));
                let b = MemStore::new(n(2), Duration::from_secs(10));
                let keys: Vec<String> = (0..changed).map(|i| format!("k{i}")).collect();
                for key in &keys {
                    b.increment(key, 1).unwrap();
                }
                let limits = AeLimits { keys_per_sec: 0, bytes_per_sec: 0, ..AeLimits::default() };
                let report = run_round(&a, &WritesBeforeFetch(&b, keys), &limits, WalGaps::All).await.unwrap();
                prop_assert!(!report.complete, "{report:?}");
                prop_assert_eq!(report.keys_unanswered, changed as u64);
                prop_assert_eq!(report.keys_fetched, 0);
                let again = run_round(&a, &Direct(&b), &limits, WalGaps::All).await.unwrap();
                prop_assert!(again.complete, "{again:?}");
                prop_assert_eq!(again.keys_unanswered, 0);
                prop_assert_eq!(a.states(), b.states());
                Ok(())
            })?;
        }

        /// Whatever version-2 request a peer sends, answering it never panics, and invalid
        /// ones are refused rather than served.
        #[test]
        fn arbitrary_requests_never_panic(
            salt in any::<u64>(),
            fp_len in any::<u8>(),
            depth in any::<u8>(),
            numbers in proptest::collection::vec(any::<u32>(), 0..20),
            blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20),
            version in any::<u8>(),
        ) {
            run(async {
                let a = MemStore::new(n(1), Duration::from_secs(10));
                for i in 0..50 {
                    a.increment(&format!("k{i}"), 1).unwrap();
                }
                let wanted = numbers.iter().copied().zip(blobs.iter().cloned()).collect();
                for request in [
                    AeRequest::Root { version },
                    AeRequest::Children { salt, fp_len, depth, prefixes: numbers.clone() },
                    AeRequest::Leaves { salt, fp_len, buckets: numbers.clone() },
                    AeRequest::Fetch { salt, fp_len, wanted },
                ] {
                    let reply = answer(&a, Message::SyncRequest(request.clone()), WalGaps::All).await;
                    prop_assert!(
                        matches!(reply, Some(Message::SyncReply(_) | Message::ReadFailed { .. })),
                        "{:?} → {:?}", request, reply
                    );
                    let bad_len = fp_len == 0 || usize::from(fp_len) > merkle::MAX_FINGERPRINT;
                    if bad_len && !matches!(request, AeRequest::Root { .. }) {
                        let refused = matches!(reply, Some(Message::ReadFailed { .. }));
                        prop_assert!(refused);
                    }
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn identical_stores_exchange_only_the_root() {
        let a = MemStore::new(n(1), Duration::from_secs(10));
        let b = MemStore::new(n(2), Duration::from_secs(10));
        for i in 0..500 {
            let op = a.increment(&format!("k{i}"), 1).unwrap();
            b.apply_remote(vec![op]).await.unwrap();
        }
        let counting = Counting(Direct(&b), AtomicU64::new(0));
        let report = run_round(&a, &counting, &AeLimits::default(), WalGaps::All)
            .await
            .unwrap();
        assert_eq!(counting.1.load(Ordering::Relaxed), 1);
        assert!(report.bytes_sent + report.bytes_received < 64, "{report:?}");
    }

    #[test]
    fn leaves_diff_as_multisets() {
        let ours = vec![
            (b"a".to_vec(), vec![1, 1]),
            (b"b".to_vec(), vec![2, 2]),
            (b"c".to_vec(), vec![2, 2]),
        ];
        // Theirs: one [2,2] (so one of our two is unmatched), one [9,9] we lack.
        let (here, there, compared) = diff_leaves(&ours, &[1, 1, 2, 2, 9, 9], 2);
        assert_eq!(here, vec![vec![9, 9]]);
        assert_eq!(there, vec![b"c".to_vec()]);
        assert_eq!(compared, 3);
    }

    #[tokio::test]
    async fn a_round_repairs_both_sides_and_scales_with_the_difference() {
        let a = MemStore::new(n(1), Duration::from_secs(10));
        let b = MemStore::new(n(2), Duration::from_secs(10));
        for i in 0..2000 {
            let op = a.increment(&format!("k{i}"), 1).unwrap();
            b.apply_remote(vec![op]).await.unwrap();
        }
        assert_eq!(a.merkle_root(), b.merkle_root());
        let limits = AeLimits::default();
        let same = run_round(&a, &Direct(&b), &limits, WalGaps::All)
            .await
            .unwrap();
        assert_eq!(same.keys_compared, 0);
        // Diverge: a few keys only on each side (unlogged), and one changed on both.
        for i in 0..5 {
            a.increment(&format!("only-a{i}"), 1).unwrap();
            b.increment(&format!("only-b{i}"), 2).unwrap();
        }
        let element = CanonicalJson::parse("\"x\"").unwrap();
        let extra = State::Set(OrSet::default().add(n(9), [element]));
        b.merge_unlogged(Kind::Set, "s", &extra).unwrap();
        let report = run_round(&a, &Direct(&b), &limits, WalGaps::All)
            .await
            .unwrap();
        assert!(report.complete);
        assert_eq!(report.keys_repaired_here, 6);
        assert_eq!(report.keys_repaired_there, 5);
        assert_eq!(a.states(), b.states());
        assert_eq!(a.merkle_root(), b.merkle_root());
        assert!(report.keys_compared < 200, "{report:?}");
        let again = run_round(&a, &Direct(&b), &limits, WalGaps::All)
            .await
            .unwrap();
        assert_eq!(again.keys_fetched + again.keys_pushed, 0);
    }

    #[tokio::test]
    async fn the_key_budget_bounds_a_round_and_the_next_finishes() {
        let a = MemStore::new(n(1), Duration::from_secs(10));
        let b = MemStore::new(n(2), Duration::from_secs(10));
        for i in 0..50 {
            a.increment(&format!("k{i}"), 1).unwrap();
        }
        let limits = AeLimits {
            max_keys_per_round: 20,
            batch_keys: 7,
            ..AeLimits::default()
        };
        let first = run_round(&b, &Direct(&a), &limits, WalGaps::All)
            .await
            .unwrap();
        assert!(!first.complete);
        assert!(first.keys_fetched <= 20);
        for _ in 0..3 {
            run_round(&b, &Direct(&a), &limits, WalGaps::All)
                .await
                .unwrap();
        }
        assert_eq!(a.states(), b.states());
    }

    #[tokio::test]
    async fn oversized_or_invalid_requests_are_refused() {
        let a = MemStore::new(n(1), Duration::from_secs(10));
        let bad = [
            Message::TreeRequest {
                depth: 0,
                prefixes: vec![0; MAX_AE_PREFIXES + 1],
            },
            Message::TreeRequest {
                depth: 1,
                prefixes: vec![16],
            },
            Message::TreeRequest {
                depth: DEPTH,
                prefixes: vec![0],
            },
            Message::BucketRequest {
                buckets: vec![0; MAX_AE_BUCKETS + 1],
            },
            Message::PushStates {
                states: vec![(vec![1, b'k'], vec![0xff])],
            },
        ];
        for request in bad {
            assert!(matches!(
                answer(&a, request, WalGaps::All).await,
                Some(Message::ReadFailed { .. })
            ));
        }
        assert!(
            answer(&a, Message::PushReply { merged: 0 }, WalGaps::All)
                .await
                .is_none()
        );
    }
}
