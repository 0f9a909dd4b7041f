//! Sans-IO decisions of the subscriber side: who is alive, what to pull from whom, when to
//! retry, how far a peer's clock is. Nothing here owns a socket, a timer or a clock: callers
//! pass `now`, so the deterministic simulation can drive exactly this code.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_crdt::{NodeId, VersionVector};

use crate::wire::Message;

/// The failure detector's view of one peer.
///
/// A peer is *reachable* while our outgoing connection to it is established and it was heard
/// (any message, heartbeats included) within `timeout`. It is *suspected* once it has been
/// unreachable for a further `timeout`: only then do we pull its ops from other nodes, so that a
/// quick reconnect or the start-up race does not make every node relay every origin.
#[derive(Clone, Debug)]
pub struct Liveness {
    timeout: Duration,
    connected: bool,
    last_heard: Option<Instant>,
    /// When the peer last became unreachable through a disconnect (or when we started).
    down_since: Instant,
}

impl Liveness {
    /// A peer we have not connected to yet: unreachable since `now`.
    pub fn new(now: Instant, timeout: Duration) -> Self {
        Self {
            timeout,
            connected: false,
            last_heard: None,
            down_since: now,
        }
    }

    /// The connection finished its handshake; that counts as hearing from the peer.
    pub fn on_connected(&mut self, now: Instant) {
        self.connected = true;
        self.last_heard = Some(now);
    }

    pub fn on_heard(&mut self, now: Instant) {
        if self.connected {
            self.last_heard = Some(now);
        }
    }

    pub fn on_disconnected(&mut self, now: Instant) {
        if self.connected {
            self.connected = false;
            // If it had already gone silent, it has been down since the timeout expired.
            self.down_since = self.down_at().map_or(now, |at| at.min(now));
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// When a connected peer stops counting as reachable unless heard again.
    fn down_at(&self) -> Option<Instant> {
        self.last_heard.map(|t| t + self.timeout)
    }

    pub fn is_reachable(&self, now: Instant) -> bool {
        self.connected && self.down_at().is_some_and(|at| now <= at)
    }

    /// Unreachable for longer than `timeout` already.
    pub fn is_suspected(&self, now: Instant) -> bool {
        if self.is_reachable(now) {
            return false;
        }
        let since = if self.connected {
            self.down_at().unwrap_or(self.down_since)
        } else {
            self.down_since
        };
        now.saturating_duration_since(since) >= self.timeout
    }
}

/// The origins subscriber `me` pulls from `source`.
///
/// Always `source`'s own ops; plus the ops of every other node that is suspected, so that ops
/// of a node that died for good reach every survivor as soon as any survivor has them. While
/// an origin is suspected it is pulled from every reachable source: duplicates are skipped by
/// idempotent apply, and they only cost traffic while a node is down.
pub fn plan_subscription(
    me: NodeId,
    source: NodeId,
    nodes: impl IntoIterator<Item = NodeId>,
    suspected: &BTreeSet<NodeId>,
) -> BTreeSet<NodeId> {
    let mut origins: BTreeSet<NodeId> = nodes
        .into_iter()
        .filter(|&o| o != me && o != source && suspected.contains(&o))
        .collect();
    origins.insert(source);
    origins
}

/// The subscriber's state on one outgoing connection: which subscription is current.
#[derive(Clone, Debug, Default)]
pub struct Inbound {
    epoch: u64,
    origins: Option<BTreeSet<NodeId>>,
}

impl Inbound {
    pub fn new() -> Self {
        Self::default()
    }

    /// A `Subscribe` when `wanted` differs from the current subscription (or there is none).
    pub fn update(&mut self, wanted: BTreeSet<NodeId>, applied: &VersionVector) -> Option<Message> {
        if self.origins.as_ref() == Some(&wanted) {
            return None;
        }
        self.origins = Some(wanted);
        Some(self.subscribe(applied))
    }

    /// Starts the current subscription over from `applied`, e.g. after a gap.
    pub fn restart(&mut self, applied: &VersionVector) -> Option<Message> {
        self.origins.is_some().then(|| self.subscribe(applied))
    }

    fn subscribe(&mut self, applied: &VersionVector) -> Message {
        self.epoch += 1;
        let after: BTreeMap<NodeId, u64> = self
            .origins
            .iter()
            .flatten()
            .map(|&origin| (origin, applied.get(origin)))
            .collect();
        Message::Subscribe {
            epoch: self.epoch,
            after,
        }
    }

    /// Batches of older subscriptions are dropped: their cursors may be stale.
    /// The current subscription's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn is_current(&self, epoch: u64) -> bool {
        epoch == self.epoch && self.origins.is_some()
    }

    pub fn origins(&self) -> Option<&BTreeSet<NodeId>> {
        self.origins.as_ref()
    }
}

/// Capped exponential backoff with jitter, for reconnects.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: `base * 2^attempt` capped at `max`, then scaled into `[½, 1]` of itself
    /// by `random`, so that nodes restarting together do not retry in lockstep.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let factor = 1_u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let full = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = full / 2;
        let spread = half.as_micros().max(1) as u64;
        half + Duration::from_micros(random % spread)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Estimates a peer's clock offset from the HLC stamps it sends.
///
/// A stamp taken at remote time `r` arrives about `rtt / 2` later; if the clocks agreed, our
/// wall clock would then read `r + rtt / 2`. The difference is the skew: positive when the peer
/// is ahead. Smoothed (EWMA) because one sample also carries queueing delay.
#[derive(Clone, Debug, Default)]
pub struct SkewEstimator {
    skew_ms: Option<f64>,
}

impl SkewEstimator {
    const WEIGHT: f64 = 0.2;

    pub fn sample(&mut self, remote_unix_ms: u64, local_unix_ms: u64, rtt: Duration) -> f64 {
        let sample = remote_unix_ms as f64 + rtt.as_secs_f64() * 500.0 - local_unix_ms as f64;
        let next = match self.skew_ms {
            Some(prev) => prev + Self::WEIGHT * (sample - prev),
            None => sample,
        };
        self.skew_ms = Some(next);
        next
    }

    pub fn skew_ms(&self) -> Option<f64> {
        self.skew_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn liveness_follows_connection_and_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, T);
        assert!(!l.is_reachable(t0));
        assert!(!l.is_suspected(t0), "start-up grace");
        assert!(l.is_suspected(t0 + T));

        l.on_connected(t0 + T);
        assert!(l.is_reachable(t0 + T) && !l.is_suspected(t0 + T));
        l.on_heard(t0 + 2 * T);
        assert!(l.is_reachable(t0 + 3 * T));
        // Silent for longer than the timeout: unreachable, then suspected one timeout later.
        let silent = t0 + 3 * T + Duration::from_millis(1);
        assert!(!l.is_reachable(silent) && !l.is_suspected(silent));
        assert!(l.is_suspected(t0 + 4 * T));
        // Disconnecting after going silent keeps the earlier down time.
        l.on_disconnected(t0 + 10 * T);
        assert!(l.is_suspected(t0 + 10 * T));
        // Hearing while disconnected changes nothing.
        l.on_heard(t0 + 11 * T);
        assert!(!l.is_reachable(t0 + 11 * T));
    }

    #[test]
    fn liveness_disconnect_starts_the_grace_period() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, T);
        l.on_connected(t0);
        l.on_disconnected(t0 + T / 2);
        assert!(!l.is_reachable(t0 + T / 2));
        assert!(!l.is_suspected(t0 + T));
        assert!(l.is_suspected(t0 + T / 2 + T));
    }

    #[test]
    fn planner_pulls_own_ops_and_relays_only_suspected_origins() {
        let nodes = [n(1), n(2), n(3), n(4)];
        let none = BTreeSet::new();
        assert_eq!(plan_subscription(n(1), n(2), nodes, &none), [n(2)].into());
        let suspected: BTreeSet<_> = [n(1), n(3)].into();
        // Never our own ops, never the source twice.
        assert_eq!(
            plan_subscription(n(1), n(2), nodes, &suspected),
            [n(2), n(3)].into()
        );
        // A suspected source is still asked for its own ops (we are connected to it after all).
        let suspected: BTreeSet<_> = [n(2), n(4)].into();
        assert_eq!(
            plan_subscription(n(1), n(2), nodes, &suspected),
            [n(2), n(4)].into()
        );
    }

    #[test]
    fn inbound_subscribes_from_applied_and_only_on_change() {
        let mut inb = Inbound::new();
        let applied: VersionVector = [(n(2), 7)].into_iter().collect();
        let Some(Message::Subscribe { epoch, after }) = inb.update([n(2), n(3)].into(), &applied)
        else {
            panic!("expected a subscription");
        };
        assert_eq!(epoch, 1);
        assert_eq!(after, [(n(2), 7), (n(3), 0)].into());
        assert!(inb.is_current(1));
        assert_eq!(inb.update([n(2), n(3)].into(), &applied), None);
        let Some(Message::Subscribe { epoch, .. }) = inb.restart(&applied) else {
            panic!("expected a resubscription");
        };
        assert_eq!(epoch, 2);
        assert!(!inb.is_current(1) && inb.is_current(2));
        assert!(Inbound::new().restart(&applied).is_none());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d0 = b.next_delay(0);
        assert_eq!(d0, Duration::from_millis(50));
        let d1 = b.next_delay(u64::MAX);
        assert!(d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(200));
        for _ in 0..40 {
            assert!(b.next_delay(12345) <= Duration::from_secs(2));
        }
        b.reset();
        assert!(b.next_delay(7) <= Duration::from_millis(100));
    }

    #[test]
    fn skew_corrects_for_half_the_rtt() {
        let mut s = SkewEstimator::default();
        // Remote stamp 1000, received at local 1010 with a 20 ms RTT: clocks agree.
        assert!(s.sample(1000, 1010, Duration::from_millis(20)).abs() < 1e-9);
        let mut s = SkewEstimator::default();
        assert!((s.sample(1500, 1010, Duration::from_millis(20)) - 500.0).abs() < 1e-9);
    }
}
