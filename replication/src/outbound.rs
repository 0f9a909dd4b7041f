//! Sans-IO publisher side: what to ship next to one subscriber.
//!
//! [`Outbound`] holds, for one subscriber, the cursor of every origin it subscribed to, the
//! ops read from the WAL but not yet sent (the open batch), and the batches sent but not yet
//! acknowledged (the window). The driver calls [`Outbound::poll`] whenever something changed —
//! the store's applied vector advanced, an ack arrived, the batch deadline passed — and sends
//! what it returns. Batches are pipelined: the next one goes out without waiting for the ack of
//! the previous one, as long as fewer than `window_bytes` are unacknowledged. The window is the
//! backpressure: a slow subscriber stops us reading the WAL for it, and nothing else.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use meridian_crdt::{NodeId, Op, VersionVector, codec};

use crate::store::StoreError;

/// Bounds of batching and pipelining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A batch is sent once its encoded ops reach this many bytes (before compression)...
    pub batch_max_bytes: usize,
    /// ...or once its first op has waited this long, whichever comes first.
    pub batch_max_delay: Duration,
    /// Most encoded op bytes sent and not yet acknowledged.
    pub window_bytes: usize,
}

/// What the driver must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Batch(Batch),
    /// The subscriber's cursor for `origin` is older than this node's WAL; that origin is no
    /// longer served on this subscription.
    Truncated {
        epoch: u64,
        origin: NodeId,
        first_available: u64,
    },
}

/// A batch ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub epoch: u64,
    /// Each op in `meridian_crdt::codec` form, per-origin in sequence order.
    pub ops: Vec<Vec<u8>>,
    /// Sum of `ops` lengths.
    pub bytes: usize,
}

#[derive(Clone, Debug)]
struct InFlight {
    bytes: usize,
    /// Highest sequence of each origin in the batch: it is acknowledged once the subscriber's
    /// applied vector covers all of these.
    ends: BTreeMap<NodeId, u64>,
}

/// The publisher's state for one subscriber.
#[derive(Clone, Debug)]
pub struct Outbound {
    limits: Limits,
    epoch: u64,
    /// Last sequence read from the WAL for each subscribed origin.
    cursors: BTreeMap<NodeId, u64>,
    open: Vec<Vec<u8>>,
    open_bytes: usize,
    open_ends: BTreeMap<NodeId, u64>,
    /// When the first op of the open batch was read: the batch leaves by this + max delay.
    open_since: Option<Instant>,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
}

impl Outbound {
    /// Nothing is shipped until the subscriber subscribes.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            epoch: 0,
            cursors: BTreeMap::new(),
            open: Vec::new(),
            open_bytes: 0,
            open_ends: BTreeMap::new(),
            open_since: None,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
        }
    }

    /// Replaces the subscription: ship each origin's ops after the given sequence.
    ///
    /// The open batch and the window belong to the old subscription and are dropped; the
    /// subscriber ignores batches of older epochs.
    pub fn subscribe(&mut self, epoch: u64, after: BTreeMap<NodeId, u64>) {
        self.epoch = epoch;
        self.cursors = after;
        self.open.clear();
        self.open_bytes = 0;
        self.open_ends.clear();
        self.open_since = None;
        self.in_flight.clear();
        self.in_flight_bytes = 0;
    }

    /// The subscriber durably applied `applied`: batches it covers leave the window.
    pub fn on_ack(&mut self, applied: &VersionVector) {
        let mut freed = 0;
        self.in_flight.retain(|batch| {
            let done = batch
                .ends
                .iter()
                .all(|(&origin, &seq)| applied.get(origin) >= seq);
            if done {
                freed += batch.bytes;
            }
            !done
        });
        self.in_flight_bytes -= freed;
    }

    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When [`Self::poll`] must run again even if nothing else happens.
    pub fn deadline(&self) -> Option<Instant> {
        self.open_since
            .map(|since| since + self.limits.batch_max_delay)
    }

    fn window_open(&self) -> bool {
        self.in_flight_bytes + self.open_bytes < self.limits.window_bytes
    }

    /// Reads what `available` (this node's applied vector) allows from `wal` (a
    /// [`crate::ReplicaStore::read_wal`]) and returns what to send now.
    pub fn poll<F>(&mut self, now: Instant, available: &VersionVector, mut wal: F) -> Vec<Action>
    where
        F: FnMut(NodeId, u64, usize) -> Result<Vec<Op>, StoreError>,
    {
        let mut actions = Vec::new();
        let origins: Vec<NodeId> = self.cursors.keys().copied().collect();
        let mut dry = Vec::new();
        'fill: while self.window_open() {
            let mut progressed = false;
            for &origin in &origins {
                if !self.window_open() {
                    break 'fill;
                }
                let Some(&cursor) = self.cursors.get(&origin) else {
                    continue;
                };
                if cursor >= available.get(origin) || dry.contains(&origin) {
                    continue;
                }
                let room = self
                    .limits
                    .batch_max_bytes
                    .saturating_sub(self.open_bytes)
                    .max(1);
                match wal(origin, cursor, room) {
                    Ok(ops) => {
                        // Only a contiguous continuation of the cursor may ship.
                        let mut next = cursor;
                        let limit = available.get(origin);
                        for op in ops {
                            if op.dot.node != origin || op.dot.seq != next + 1 || op.dot.seq > limit
                            {
                                break;
                            }
                            next = op.dot.seq;
                            let bytes = codec::encode_op(&op);
                            self.open_bytes += bytes.len();
                            self.open.push(bytes);
                            self.open_since.get_or_insert(now);
                        }
                        if next == cursor {
                            // The WAL has nothing visible yet: try again on the next change.
                            dry.push(origin);
                            continue;
                        }
                        self.cursors.insert(origin, next);
                        self.open_ends.insert(origin, next);
                        progressed = true;
                    }
                    Err(StoreError::Truncated {
                        origin: o,
                        first_available,
                    }) => {
                        self.cursors.remove(&origin);
                        actions.push(Action::Truncated {
                            epoch: self.epoch,
                            origin: o,
                            first_available,
                        });
                    }
                    Err(_) => {
                        dry.push(origin);
                    }
                }
                if self.open_bytes >= self.limits.batch_max_bytes {
                    actions.push(Action::Batch(self.seal()));
                }
            }
            if !progressed {
                break;
            }
        }
        if self.deadline().is_some_and(|at| now >= at) {
            actions.push(Action::Batch(self.seal()));
        }
        actions
    }

    fn seal(&mut self) -> Batch {
        let ops = std::mem::take(&mut self.open);
        let bytes = std::mem::take(&mut self.open_bytes);
        let ends = std::mem::take(&mut self.open_ends);
        self.open_since = None;
        self.in_flight_bytes += bytes;
        self.in_flight.push_back(InFlight { bytes, ends });
        Batch {
            epoch: self.epoch,
            ops,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_crdt::{Dot, GCounter, Stamp, State};

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn op(origin: u64, seq: u64) -> Op {
        Op {
            dot: Dot::new(n(origin), seq),
            stamp: Stamp::new(seq, n(origin)),
            key: format!("k{seq}"),
            delta: State::GCounter(GCounter::default().increment(n(origin), 1).unwrap()),
        }
    }

    /// A WAL of `origin -> 1..=len` answering like `ReplicaStore::read_wal`.
    fn wal(
        log: &BTreeMap<u64, u64>,
        truncated_before: u64,
    ) -> impl FnMut(NodeId, u64, usize) -> Result<Vec<Op>, StoreError> + '_ {
        move |origin, after, max_bytes| {
            if after + 1 < truncated_before {
                return Err(StoreError::Truncated {
                    origin,
                    first_available: truncated_before,
                });
            }
            let len = log.get(&origin.get()).copied().unwrap_or(0);
            let mut out = Vec::new();
            let mut bytes = 0;
            for seq in after + 1..=len {
                if bytes >= max_bytes {
                    break;
                }
                let op = op(origin.get(), seq);
                bytes += codec::encode_op(&op).len();
                out.push(op);
            }
            Ok(out)
        }
    }

    fn size() -> usize {
        codec::encode_op(&op(1, 1)).len()
    }

    fn decoded(batch: &Batch) -> Vec<(u64, u64)> {
        batch
            .ops
            .iter()
            .map(|b| codec::decode_op(b).unwrap())
            .map(|op| (op.dot.node.get(), op.dot.seq))
            .collect()
    }

    fn batches(actions: Vec<Action>) -> Vec<Batch> {
        actions
            .into_iter()
            .map(|a| match a {
                Action::Batch(b) => b,
                Action::Truncated { .. } => panic!("unexpected truncation"),
            })
            .collect()
    }

    #[test]
    fn nothing_ships_before_a_subscription() {
        let log = BTreeMap::from([(1, 5)]);
        let avail: VersionVector = [(n(1), 5)].into_iter().collect();
        let mut out = Outbound::new(Limits {
            batch_max_bytes: 1 << 20,
            batch_max_delay: Duration::ZERO,
            window_bytes: 1 << 20,
        });
        assert!(out.poll(Instant::now(), &avail, wal(&log, 0)).is_empty());
    }

    #[test]
    fn batches_close_on_bytes_at_once_and_on_time_after_the_delay() {
        let log = BTreeMap::from([(1, 10)]);
        let avail: VersionVector = [(n(1), 10)].into_iter().collect();
        let delay = Duration::from_millis(5);
        let mut out = Outbound::new(Limits {
            batch_max_bytes: 4 * size(),
            batch_max_delay: delay,
            window_bytes: 1 << 20,
        });
        out.subscribe(1, BTreeMap::from([(n(1), 0)]));
        let t0 = Instant::now();
        let sent = batches(out.poll(t0, &avail, wal(&log, 0)));
        // Two full batches leave at once; the remaining two ops wait for the deadline.
        assert_eq!(sent.len(), 2);
        assert_eq!(
            decoded(&sent[0]),
            (1..=4).map(|s| (1, s)).collect::<Vec<_>>()
        );
        assert_eq!(
            decoded(&sent[1]),
            (5..=8).map(|s| (1, s)).collect::<Vec<_>>()
        );
        assert_eq!(out.deadline(), Some(t0 + delay));
        assert!(out.poll(t0 + delay / 2, &avail, wal(&log, 0)).is_empty());
        let sent = batches(out.poll(t0 + delay, &avail, wal(&log, 0)));
        assert_eq!(decoded(&sent[0]), vec![(1, 9), (1, 10)]);
        assert_eq!(out.deadline(), None);
        assert!(out.poll(t0 + delay * 3, &avail, wal(&log, 0)).is_empty());
    }

    #[test]
    fn the_window_stops_reading_until_acks_free_it() {
        let log = BTreeMap::from([(1, 100)]);
        let avail: VersionVector = [(n(1), 100)].into_iter().collect();
        let mut out = Outbound::new(Limits {
            batch_max_bytes: 2 * size(),
            batch_max_delay: Duration::ZERO,
            window_bytes: 6 * size(),
        });
        out.subscribe(1, BTreeMap::from([(n(1), 0)]));
        let now = Instant::now();
        let sent = batches(out.poll(now, &avail, wal(&log, 0)));
        assert_eq!(sent.len(), 3, "window of 3 batches");
        assert_eq!(out.in_flight_bytes(), 6 * size());
        assert!(out.poll(now, &avail, wal(&log, 0)).is_empty());
        // Acking the first batch frees exactly one batch worth of window.
        out.on_ack(&[(n(1), 2)].into_iter().collect());
        let sent = batches(out.poll(now, &avail, wal(&log, 0)));
        assert_eq!(sent.len(), 1);
        assert_eq!(decoded(&sent[0]), vec![(1, 7), (1, 8)]);
        // An ack covering everything frees everything, even if it skips batches.
        out.on_ack(&[(n(1), 8)].into_iter().collect());
        assert_eq!(out.in_flight_bytes(), 0);
        assert_eq!(batches(out.poll(now, &avail, wal(&log, 0))).len(), 3);
    }

    #[test]
    fn several_origins_share_batches_in_per_origin_order() {
        let log = BTreeMap::from([(1, 3), (2, 2)]);
        let avail: VersionVector = [(n(1), 3), (n(2), 2)].into_iter().collect();
        let mut out = Outbound::new(Limits {
            batch_max_bytes: 1 << 20,
            batch_max_delay: Duration::ZERO,
            window_bytes: 1 << 20,
        });
        out.subscribe(7, BTreeMap::from([(n(1), 1), (n(2), 0)]));
        let sent = batches(out.poll(Instant::now(), &avail, wal(&log, 0)));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].epoch, 7);
        assert_eq!(decoded(&sent[0]), vec![(1, 2), (1, 3), (2, 1), (2, 2)]);
    }

    #[test]
    fn only_what_is_applied_ships() {
        let log = BTreeMap::from([(1, 10)]);
        let mut out = Outbound::new(Limits {
            batch_max_bytes: 1 << 20,
            batch_max_delay: Duration::ZERO,
            window_bytes: 1 << 20,
        });
        out.subscribe(1, BTreeMap::from([(n(1), 0)]));
        let now = Instant::now();
        let avail: VersionVector = [(n(1), 3)].into_iter().collect();
        // The WAL holds more than is applied: only applied ops ship, the rest on the next change.
        let sent = batches(out.poll(now, &avail, wal(&log, 0)));
        assert_eq!(decoded(&sent[0]), vec![(1, 1), (1, 2), (1, 3)]);
        let avail: VersionVector = [(n(1), 10)].into_iter().collect();
        let sent = batches(out.poll(now, &avail, wal(&log, 0)));
        assert_eq!(
            decoded(&sent[0]),
            (4..=10).map(|s| (1, s)).collect::<Vec<_>>()
        );
        assert!(out.poll(now, &avail, wal(&log, 0)).is_empty());
    }

    #[test]
    fn truncated_origins_are_reported_and_dropped() {
        let log = BTreeMap::from([(1, 10), (2, 10)]);
        let avail: VersionVector = [(n(1), 10), (n(2), 10)].into_iter().collect();
        let mut out = Outbound::new(Limits {
            batch_max_bytes: 1 << 20,
            batch_max_delay: Duration::ZERO,
            window_bytes: 1 << 20,
        });
        out.subscribe(3, BTreeMap::from([(n(1), 0), (n(2), 6)]));
        let actions = out.poll(Instant::now(), &avail, wal(&log, 5));
        assert_eq!(
            actions[0],
            Action::Truncated {
                epoch: 3,
                origin: n(1),
                first_available: 5
            }
        );
        let Action::Batch(batch) = &actions[1] else {
            panic!("expected a batch")
        };
        assert_eq!(decoded(batch), vec![(2, 7), (2, 8), (2, 9), (2, 10)]);
        assert!(out.poll(Instant::now(), &avail, wal(&log, 5)).is_empty());
    }

    #[test]
    fn resubscribing_resets_cursor_and_window() {
        let log = BTreeMap::from([(1, 4)]);
        let avail: VersionVector = [(n(1), 4)].into_iter().collect();
        let mut out = Outbound::new(Limits {
            batch_max_bytes: 1 << 20,
            batch_max_delay: Duration::ZERO,
            window_bytes: 1 << 20,
        });
        out.subscribe(1, BTreeMap::from([(n(1), 0)]));
        let now = Instant::now();
        assert_eq!(batches(out.poll(now, &avail, wal(&log, 0))).len(), 1);
        out.subscribe(2, BTreeMap::from([(n(1), 2)]));
        assert_eq!(out.in_flight_bytes(), 0);
        let sent = batches(out.poll(now, &avail, wal(&log, 0)));
        assert_eq!(sent[0].epoch, 2);
        assert_eq!(decoded(&sent[0]), vec![(1, 3), (1, 4)]);
    }
}
