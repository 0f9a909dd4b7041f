//! Anti-entropy: the Merkle sync dialogue, independent of the transport.
//!
//! # One round with one peer (push-pull)
//! 1. Compare the root's children, then descend only into differing nodes, one level per
//!    request ([`Message::TreeRequest`]), down to the leaf buckets.
//! 2. Exchange the (key, state hash) lists of differing buckets ([`Message::BucketRequest`]).
//! 3. Keys whose hashes differ, or that one side lacks: fetch the peer's states and merge them
//!    here ([`Message::StatesRequest`]); then push ours (read after that merge) for the peer to
//!    merge ([`Message::PushStates`]). Both sides end with the join.
//!
//! Traffic is proportional to the difference: one 16-hash reply per differing interior node,
//! one key list per differing bucket, and full states only of differing keys. Every list is
//! bounded (see the `MAX_AE_*` limits in [`crate::wire`]); a round repairs at most
//! `max_keys_per_round` keys and is paced by a keys/s and bytes/s budget; what is left waits
//! for the next round.
//!
//! [`run_round`] drives a round through an [`AeTransport`] (QUIC in `node`, a direct call in
//! tests); [`answer`] is the serving side.

use std::future::Future;
use std::time::{Duration, Instant};

use meridian_crdt::{State, codec};

use crate::merkle::{self, DEPTH, FANOUT, Hash};
use crate::store::{ReplicaStore, StoreError};
use crate::wire::{MAX_AE_BUCKETS, MAX_AE_ITEMS, MAX_AE_KEYS, MAX_AE_PREFIXES, Message};

/// Buckets asked per [`Message::BucketRequest`].
const BUCKETS_PER_REQUEST: usize = 256;

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
}

impl Default for AeLimits {
    fn default() -> Self {
        Self {
            max_keys_per_round: 100_000,
            batch_keys: 512,
            keys_per_sec: 100_000,
            bytes_per_sec: 64 * 1024 * 1024,
        }
    }
}

/// What a round did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
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
    /// False when the key budget ran out before every differing key was exchanged.
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

/// Runs one push-pull round with the peer behind `peer`.
pub async fn run_round<S: ReplicaStore, T: AeTransport>(
    store: &S,
    peer: &T,
    limits: &AeLimits,
) -> Result<RoundReport, AeError> {
    let started = Instant::now();
    let mut report = RoundReport {
        complete: true,
        ..RoundReport::default()
    };
    let call = async |request: Message, report: &mut RoundReport| {
        let (reply, sent, received) = peer.call(request).await?;
        report.bytes_sent += sent;
        report.bytes_received += received;
        match reply {
            Message::ReadFailed { reason } => Err(AeError::Failed(reason)),
            other => Ok(other),
        }
    };

    // 1. Descend the tree through differing nodes only.
    let mut differing: Vec<u32> = vec![0];
    for depth in 0..DEPTH {
        let mut next = Vec::new();
        for chunk in differing.chunks(MAX_AE_PREFIXES) {
            let ours = store.tree_children(depth, chunk)?;
            let request = Message::TreeRequest {
                depth,
                prefixes: chunk.to_vec(),
            };
            let Message::TreeReply { hashes } = call(request, &mut report).await? else {
                return Err(AeError::Protocol("expected TreeReply".into()));
            };
            if hashes.len() != chunk.len() * FANOUT || ours.len() != hashes.len() {
                return Err(AeError::Protocol(format!(
                    "{} hashes for {} nodes",
                    hashes.len(),
                    chunk.len()
                )));
            }
            for (i, &prefix) in chunk.iter().enumerate() {
                for c in 0..FANOUT {
                    let at = i * FANOUT + c;
                    if ours[at] != hashes[at] {
                        next.push((prefix << merkle::FANOUT_BITS) | c as u32);
                    }
                }
            }
        }
        differing = next;
        if differing.is_empty() {
            return Ok(report);
        }
    }
    report.buckets_differing = differing.len() as u64;

    // 2. Compare the differing buckets' items; 3. exchange the states of differing keys.
    let budget = limits.max_keys_per_round.max(1);
    let mut exchanged = 0usize;
    for chunk in differing.chunks(BUCKETS_PER_REQUEST) {
        let ours = store.bucket_items(chunk, MAX_AE_ITEMS)?;
        let request = Message::BucketRequest {
            buckets: chunk.to_vec(),
        };
        let Message::BucketReply { items: theirs } = call(request, &mut report).await? else {
            return Err(AeError::Protocol("expected BucketReply".into()));
        };
        let (fetch, push, compared) = diff(ours, theirs);
        report.keys_compared += compared;
        let mut fetch = fetch;
        let mut push = push;
        let room = budget.saturating_sub(exchanged);
        if fetch.len() + push.len() > room {
            report.complete = false;
            fetch.truncate(room);
            push.truncate(room - fetch.len());
        }
        exchanged += fetch.len() + push.len();
        let batch = limits.batch_keys.clamp(1, MAX_AE_KEYS);
        for keys in fetch.chunks(batch) {
            let request = Message::StatesRequest {
                keys: keys.to_vec(),
            };
            let Message::StatesReply { states } = call(request, &mut report).await? else {
                return Err(AeError::Protocol("expected StatesReply".into()));
            };
            let decoded = decode_states(states.into_iter().filter_map(|(k, s)| Some((k, s?))))?;
            report.keys_fetched += keys.len() as u64;
            report.keys_repaired_here += store.merge_states(decoded).await?;
            pace(started, &report, limits).await;
        }
        for keys in push.chunks(batch) {
            let states: Vec<(Vec<u8>, Vec<u8>)> = store
                .read_states(keys.to_vec())
                .await?
                .into_iter()
                .filter_map(|(k, s)| Some((k, s?)))
                .collect();
            report.keys_pushed += states.len() as u64;
            let Message::PushReply { merged } =
                call(Message::PushStates { states }, &mut report).await?
            else {
                return Err(AeError::Protocol("expected PushReply".into()));
            };
            report.keys_repaired_there += merged;
            pace(started, &report, limits).await;
        }
        if !report.complete {
            break;
        }
    }
    Ok(report)
}

/// Sorted (key, hash) lists of both sides → keys to fetch (theirs differ or only they have
/// them), keys to push (only we have them, or they differ), and how many keys were compared.
fn diff(
    mut ours: Vec<(Vec<u8>, Hash)>,
    mut theirs: Vec<(Vec<u8>, Hash)>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, u64) {
    ours.sort_unstable();
    theirs.sort_unstable();
    ours.dedup_by(|a, b| a.0 == b.0);
    theirs.dedup_by(|a, b| a.0 == b.0);
    let (mut fetch, mut push) = (Vec::new(), Vec::new());
    let mut compared = 0;
    let (mut a, mut b) = (ours.into_iter().peekable(), theirs.into_iter().peekable());
    loop {
        compared += 1;
        match (a.peek(), b.peek()) {
            (None, None) => {
                compared -= 1;
                break;
            }
            (Some(_), None) => push.extend(a.next().map(|(k, _)| k)),
            (None, Some(_)) => fetch.extend(b.next().map(|(k, _)| k)),
            (Some((ka, ha)), Some((kb, hb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => push.extend(a.next().map(|(k, _)| k)),
                std::cmp::Ordering::Greater => fetch.extend(b.next().map(|(k, _)| k)),
                std::cmp::Ordering::Equal => {
                    if ha != hb {
                        fetch.push(ka.clone());
                        push.push(ka.clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    (fetch, push, compared)
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
pub async fn answer<S: ReplicaStore>(store: &S, request: Message) -> Option<Message> {
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

/// A peer reached by calling [`answer`] on its store directly: for tests and benchmarks.
#[derive(Debug)]
pub struct Direct<'a, S>(pub &'a S);

impl<S: ReplicaStore> AeTransport for Direct<'_, S> {
    async fn call(&self, request: Message) -> Result<(Message, u64, u64), AeError> {
        let sent = crate::wire::encode_frame(&request)
            .map_err(|e| AeError::Protocol(e.to_string()))?
            .len() as u64;
        let reply = answer(self.0, request)
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
    use meridian_crdt::{Kind, NodeId, OrSet};

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
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
        let same = run_round(&a, &Direct(&b), &limits).await.unwrap();
        assert_eq!(same.keys_compared, 0);
        // Diverge: a few keys only on each side (unlogged), and one changed on both.
        for i in 0..5 {
            a.increment(&format!("only-a{i}"), 1).unwrap();
            b.increment(&format!("only-b{i}"), 2).unwrap();
        }
        let element = meridian_crdt::CanonicalJson::parse("\"x\"").unwrap();
        let extra = State::Set(OrSet::default().add(n(9), [element]));
        b.merge_unlogged(Kind::Set, "s", &extra).unwrap();
        let report = run_round(&a, &Direct(&b), &limits).await.unwrap();
        assert!(report.complete);
        assert_eq!(report.keys_repaired_here, 6);
        assert_eq!(report.keys_repaired_there, 5);
        assert_eq!(a.states(), b.states());
        assert_eq!(a.merkle_root(), b.merkle_root());
        assert!(report.keys_compared < 200, "{report:?}");
        let again = run_round(&a, &Direct(&b), &limits).await.unwrap();
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
        let first = run_round(&b, &Direct(&a), &limits).await.unwrap();
        assert!(!first.complete);
        assert!(first.keys_fetched <= 20);
        for _ in 0..3 {
            run_round(&b, &Direct(&a), &limits).await.unwrap();
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
                answer(&a, request).await,
                Some(Message::ReadFailed { .. })
            ));
        }
        assert!(answer(&a, Message::PushReply { merged: 0 }).await.is_none());
    }
}
