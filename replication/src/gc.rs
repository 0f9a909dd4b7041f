//! Garbage collection at causal stability: the frontier below which metadata may go.
//!
//! # What is learned, and from whom
//! Every subscriber acks its *durable applied vector* to every publisher (it subscribes to all
//! of them), so in a full mesh each node hears every other node's applied vector directly.
//! [`StabilityTracker`] keeps, per peer, the latest such report that is *usable* (below), and
//! when the peer was last heard from at all.
//!
//! # The frontier, and why purging at it is sound
//! Write `V_N` for the usable report of node `N` (for this node, its own applied vector) and
//! `F = min_N V_N` (pointwise) over every node not excluded by the horizon. A report `V_N` is
//! *usable* at this node `A` once `A.applied[N] ≥ V_N[N]`: `A` holds every op `N` itself had
//! issued when it sent the report. [`StabilityTracker::frontier`] returns `F` only when every
//! included node has a usable report.
//!
//! Claim: if a tombstone (or any metadata) has a dot `d ≤ F`, then no op that could order
//! before it can still arrive at `A` without `A` already holding it; so dropping it at `A`
//! changes no merge outcome. Take a write `W` of origin `N` to the same key:
//! - `W.seq ≤ V_N[N]`: then `A.applied[N] ≥ W.seq`, and ops of an origin apply contiguously,
//!   so `A` has already joined `W` into the key. The register kept the winner of `W` and the
//!   tombstone; a replay of `W` is skipped (`seq ≤ applied`) and cannot come back.
//! - `W.seq > V_N[N]`: `N` issued `W` after reporting `V_N ≥ F ∋ d`. On the server, sequences
//!   and durability follow the applier's single order, so `N` had applied `d`'s op before it
//!   stamped `W`, and its HLC had observed the tombstone's stamp (applying a batch feeds its
//!   stamps to the clock): `W`'s stamp is later, `W` wins over the tombstone anyway, and it wins
//!   over the nothing left by GC just the same.
//!
//! Every node running the same rule purges only what it no longer needs, so a delete
//! concurrent with a write resolves to the same LWW winner with or without GC (property-tested
//! in `mem.rs`). Two caveats, both documented in ARCHITECTURE.md: a remote stamp refused as
//! clock input (beyond `max_clock_skew`) breaks the "later stamp" step for the ops its
//! receiver issues before its clock catches up — LWW already orders those writes by stamp
//! rather than causality; and an excluded node (below) is outside the argument altogether.
//!
//! A report arriving while `A` still lacks some of `N`'s ops is kept *pending* (the oldest
//! unusable one, plus the latest) and promoted when `A` catches up, so a node that keeps
//! writing still lets the frontier advance, a report or two behind.
//!
//! # Down nodes, and the optional GC horizon
//! By default a silent node holds the frontier back for as long as it is a member: a region
//! cut off for a day may still hold writes that are older than a delete made elsewhere
//! meanwhile, and only the tombstone makes the delete win when they arrive. A node that is
//! gone for good is taken out of the membership (`meridian cluster remove-node`), and the
//! frontier moves on without it.
//!
//! With a `horizon` configured, a node not heard from (no message of any kind) for longer is
//! *excluded*: the frontier ignores it, so metadata stops growing while it is gone. The
//! price: others purge tombstones it never saw, and when it returns its writes that are
//! older than those deletes find no tombstone and bring the keys back; anti-entropy then
//! spreads them. Nothing after the fact can tell such a write from a newer one, so a node
//! excluded this way must be re-seeded rather than let back (README, "Garbage collection").
//! It is flagged [`StabilityTracker::needs_resync`] from the moment it is excluded until a
//! complete anti-entropy round with it has finished; `/v1/cluster` and the metrics list both
//! sets so an operator can see it. Once heard again it counts in the frontier again (which
//! only makes GC more conservative).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_crdt::{NodeId, VersionVector};

/// What one garbage-collection pass did to storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcStats {
    /// Keys looked at.
    pub keys_examined: u64,
    /// Keys whose state changed (metadata dropped) but still hold information.
    pub keys_compacted: u64,
    /// Keys whose state became nothing (e.g. a stable register tombstone) and were deleted.
    pub keys_removed: u64,
}

impl GcStats {
    /// Adds another pass's counts.
    pub fn add(&mut self, other: &Self) {
        self.keys_examined += other.keys_examined;
        self.keys_compacted += other.keys_compacted;
        self.keys_removed += other.keys_removed;
    }
}

/// The outcome of [`StabilityTracker::frontier`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frontier {
    /// Every included node has applied everything this vector covers, and this node holds
    /// every op each of them had issued when it reported: metadata with a dot it covers may go.
    Stable(VersionVector),
    /// No frontier yet: these nodes have not sent a usable report.
    Waiting(BTreeSet<NodeId>),
}

#[derive(Clone, Debug)]
struct PeerReports {
    /// The latest report this node could use, and the oldest one not yet usable.
    usable: Option<VersionVector>,
    pending: Option<VersionVector>,
    /// The newest report, when newer than `pending`.
    latest: Option<VersionVector>,
    last_heard: Instant,
    needs_resync: bool,
}

/// Sans-IO bookkeeping of every node's applied vector, for the stable frontier. Time is passed
/// in, so tests drive it with made-up instants.
#[derive(Clone, Debug)]
pub struct StabilityTracker {
    horizon: Option<Duration>,
    peers: BTreeMap<NodeId, PeerReports>,
}

impl StabilityTracker {
    /// Tracks `peers`; `persisted` are their vectors as last recorded (e.g. before a restart),
    /// taken as pending reports, and every peer counts as heard at `now` (start-up), so a
    /// restart never excludes a node sooner than one horizon after it. Without a `horizon`
    /// no node is ever excluded.
    pub fn new(
        peers: impl IntoIterator<Item = NodeId>,
        persisted: &BTreeMap<NodeId, VersionVector>,
        horizon: Option<Duration>,
        now: Instant,
    ) -> Self {
        let peers = peers
            .into_iter()
            .map(|id| {
                let reports = PeerReports {
                    usable: None,
                    pending: persisted.get(&id).cloned(),
                    latest: None,
                    last_heard: now,
                    needs_resync: false,
                };
                (id, reports)
            })
            .collect();
        Self { horizon, peers }
    }

    /// `node` said something: it is alive.
    pub fn on_heard(&mut self, node: NodeId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&node) {
            p.last_heard = p.last_heard.max(now);
        }
    }

    /// `node` reported its applied vector (an ack).
    pub fn on_report(&mut self, node: NodeId, applied: &VersionVector, now: Instant) {
        self.on_heard(node, now);
        if let Some(p) = self.peers.get_mut(&node) {
            if p.pending.is_none() {
                p.pending = Some(applied.clone());
            } else {
                p.latest = Some(applied.clone());
            }
        }
    }

    /// A complete anti-entropy round with `node` finished: its state is reconciled with ours.
    pub fn on_resynced(&mut self, node: NodeId) {
        if let Some(p) = self.peers.get_mut(&node) {
            p.needs_resync = false;
        }
    }

    /// Nodes not heard from for longer than the horizon, which the frontier ignores.
    pub fn excluded(&self, now: Instant) -> BTreeSet<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| self.beyond_horizon(p, now))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Nodes that were excluded at some point and have not finished an anti-entropy round with
    /// this node since.
    pub fn needs_resync(&self) -> BTreeSet<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.needs_resync)
            .map(|(&id, _)| id)
            .collect()
    }

    fn beyond_horizon(&self, p: &PeerReports, now: Instant) -> bool {
        silent_beyond(self.horizon, p, now)
    }

    /// The stable frontier given this node's own applied vector `own` (see the module docs).
    pub fn frontier(&mut self, own: &VersionVector, now: Instant) -> Frontier {
        let horizon = self.horizon;
        let mut vector = own.clone();
        let mut waiting = BTreeSet::new();
        for (&id, p) in &mut self.peers {
            if silent_beyond(horizon, p, now) {
                p.needs_resync = true;
                continue;
            }
            let usable = |v: &VersionVector| own.get(id) >= v.get(id);
            if p.latest.as_ref().is_some_and(usable) {
                p.usable = p.latest.take();
                p.pending = None;
            } else if p.pending.as_ref().is_some_and(usable) {
                p.usable = p.pending.take();
                p.pending = p.latest.take();
            }
            match &p.usable {
                Some(v) => vector = vector.meet(v),
                None => {
                    waiting.insert(id);
                }
            }
        }
        if waiting.is_empty() {
            Frontier::Stable(vector)
        } else {
            Frontier::Waiting(waiting)
        }
    }
}

/// Whether `p` has been silent for longer than `horizon`; never without one.
fn silent_beyond(horizon: Option<Duration>, p: &PeerReports, now: Instant) -> bool {
    horizon.is_some_and(|horizon| now.saturating_duration_since(p.last_heard) > horizon)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn vv(entries: &[(u64, u64)]) -> VersionVector {
        entries.iter().map(|&(node, seq)| (n(node), seq)).collect()
    }

    #[test]
    fn the_frontier_is_the_minimum_once_every_node_reported() {
        let t0 = Instant::now();
        let mut t = StabilityTracker::new(
            [n(2), n(3)],
            &BTreeMap::new(),
            Some(Duration::from_secs(60)),
            t0,
        );
        let own = vv(&[(1, 10), (2, 5), (3, 7)]);
        assert_eq!(t.frontier(&own, t0), Frontier::Waiting([n(2), n(3)].into()));
        t.on_report(n(2), &vv(&[(1, 8), (2, 5), (3, 7)]), t0);
        assert_eq!(t.frontier(&own, t0), Frontier::Waiting([n(3)].into()));
        t.on_report(n(3), &vv(&[(1, 10), (2, 4), (3, 6)]), t0);
        assert_eq!(
            t.frontier(&own, t0),
            Frontier::Stable(vv(&[(1, 8), (2, 4), (3, 6)]))
        );
    }

    #[test]
    fn a_report_is_used_only_once_we_hold_the_reporters_own_ops() {
        let t0 = Instant::now();
        let mut t =
            StabilityTracker::new([n(2)], &BTreeMap::new(), Some(Duration::from_secs(60)), t0);
        // Node 2 has issued 9 ops; we hold 5 of them.
        t.on_report(n(2), &vv(&[(1, 3), (2, 9)]), t0);
        assert_eq!(
            t.frontier(&vv(&[(1, 3), (2, 5)]), t0),
            Frontier::Waiting([n(2)].into())
        );
        // Node 2 keeps writing and reporting; we catch up with the first report only.
        t.on_report(n(2), &vv(&[(1, 3), (2, 20)]), t0);
        t.on_report(n(2), &vv(&[(1, 3), (2, 30)]), t0);
        assert_eq!(
            t.frontier(&vv(&[(1, 3), (2, 12)]), t0),
            Frontier::Stable(vv(&[(1, 3), (2, 9)]))
        );
        // The latest report becomes pending and is used once we hold its ops.
        assert_eq!(
            t.frontier(&vv(&[(1, 3), (2, 30)]), t0),
            Frontier::Stable(vv(&[(1, 3), (2, 30)]))
        );
    }

    #[test]
    fn a_silent_node_is_excluded_after_the_horizon_and_needs_a_resync() {
        let t0 = Instant::now();
        let horizon = Duration::from_secs(10);
        let mut t = StabilityTracker::new([n(2), n(3)], &BTreeMap::new(), Some(horizon), t0);
        let own = vv(&[(1, 10)]);
        t.on_report(n(2), &vv(&[(1, 10)]), t0);
        let later = t0 + Duration::from_secs(11);
        t.on_heard(n(2), later);
        assert_eq!(t.frontier(&own, t0), Frontier::Waiting([n(3)].into()));
        assert_eq!(t.frontier(&own, later), Frontier::Stable(vv(&[(1, 10)])));
        assert_eq!(t.excluded(later), [n(3)].into());
        assert_eq!(t.needs_resync(), [n(3)].into());
        // It comes back: counted again at once, still flagged until a full round.
        t.on_report(n(3), &vv(&[(1, 2)]), later);
        assert!(t.excluded(later).is_empty());
        assert_eq!(t.frontier(&own, later), Frontier::Stable(vv(&[(1, 2)])));
        assert_eq!(t.needs_resync(), [n(3)].into());
        t.on_resynced(n(3));
        assert!(t.needs_resync().is_empty());
    }

    #[test]
    fn without_a_horizon_a_silent_node_holds_the_frontier_back_for_good() {
        let t0 = Instant::now();
        let mut t = StabilityTracker::new([n(2), n(3)], &BTreeMap::new(), None, t0);
        let own = vv(&[(1, 10)]);
        t.on_report(n(2), &vv(&[(1, 10)]), t0);
        t.on_report(n(3), &vv(&[(1, 4)]), t0);
        assert_eq!(t.frontier(&own, t0), Frontier::Stable(vv(&[(1, 4)])));
        // A year later node 3 has said nothing since: its last report still bounds the
        // frontier, and it is neither excluded nor flagged.
        let later = t0 + Duration::from_secs(365 * 24 * 3600);
        t.on_report(n(2), &vv(&[(1, 10)]), later);
        assert_eq!(t.frontier(&own, later), Frontier::Stable(vv(&[(1, 4)])));
        assert!(t.excluded(later).is_empty());
        assert!(t.needs_resync().is_empty());
    }

    #[test]
    fn persisted_vectors_count_after_a_restart() {
        let t0 = Instant::now();
        let persisted = [(n(2), vv(&[(1, 4), (2, 2)]))].into();
        let mut t = StabilityTracker::new([n(2)], &persisted, Some(Duration::from_secs(60)), t0);
        assert_eq!(
            t.frontier(&vv(&[(1, 9), (2, 2)]), t0),
            Frontier::Stable(vv(&[(1, 4), (2, 2)]))
        );
    }
}
