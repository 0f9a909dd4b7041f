//! The node's hybrid logical clock: uhlc, held above every stamp the node itself issued.
//!
//! uhlc refuses as input any time further ahead of the wall clock than the skew bound, and
//! that is right for peers' stamps. It is wrong for the node's own stamps read back at start:
//! if the host clock stepped back past the bound while the node was down (an NTP correction
//! at boot, a restored VM snapshot, the data moved to another host), uhlc would restart
//! below them, and the node's next writes would lose, by last-writer-wins, to its own older
//! ones. So the node's own past is a floor that every reading stays above.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meridian_crdt::{NodeId, Stamp};

pub(crate) struct Clock {
    hlc: uhlc::HLC,
    node: NodeId,
    /// The latest time this clock issued or must stay above, as an NTP64 value.
    floor: AtomicU64,
}

impl Clock {
    pub(crate) fn new(node: NodeId, max_skew: Duration) -> Self {
        Self {
            hlc: uhlc::HLCBuilder::new()
                .with_id(node.to_uhlc())
                .with_max_delta(max_skew)
                .build(),
            node,
            floor: AtomicU64::new(0),
        }
    }

    /// A fresh stamp: after every stamp read before, every peer stamp observed and every
    /// stamp of this node's own past.
    pub(crate) fn read(&self) -> Stamp {
        let now = self.hlc.new_timestamp().get_time().as_u64();
        let mut floor = self.floor.load(Ordering::Acquire);
        loop {
            let next = now.max(floor.saturating_add(1));
            match self
                .floor
                .compare_exchange_weak(floor, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Stamp::new(next, self.node),
                Err(current) => floor = current,
            }
        }
    }

    /// Feeds a peer's stamp to the clock: false when it is beyond the skew bound, and then the
    /// clock ignores it.
    pub(crate) fn observe(&self, stamp: Stamp) -> bool {
        self.hlc.update_with_timestamp(&stamp.to_uhlc()).is_ok()
    }

    /// Holds the clock above a stamp this node issued before it restarted, however far ahead
    /// of the wall clock that stamp is.
    pub(crate) fn observe_own(&self, stamp: Stamp) {
        self.floor.fetch_max(stamp.time, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeId {
        NodeId::new(7).unwrap()
    }

    /// A stamp `ahead` of the wall clock, as the node's own last stamp is after the host
    /// clock stepped back by that much.
    fn ahead_of_now(ahead: Duration) -> Stamp {
        let now = uhlc::system_time_clock();
        Stamp::new((now + uhlc::NTP64::from(ahead)).as_u64(), node())
    }

    #[test]
    fn the_clock_stays_above_its_own_past_beyond_the_skew_bound() {
        let clock = Clock::new(node(), Duration::from_secs(10));
        let past = ahead_of_now(Duration::from_secs(60));
        // uhlc alone refuses it: that is what the floor is for.
        assert!(!clock.observe(past));
        clock.observe_own(past);
        let first = clock.read();
        let second = clock.read();
        assert!(first > past, "{first:?} is not after {past:?}");
        assert!(second > first);
    }

    #[test]
    fn readings_increase_and_follow_observed_peer_stamps() {
        let clock = Clock::new(node(), Duration::from_secs(10));
        let mut last = clock.read();
        for _ in 0..1000 {
            let next = clock.read();
            assert!(next > last);
            last = next;
        }
        let peer = Stamp::new(
            ahead_of_now(Duration::from_secs(5)).time,
            NodeId::new(8).unwrap(),
        );
        assert!(clock.observe(peer));
        assert!(clock.read().time > peer.time);
        let too_far = ahead_of_now(Duration::from_secs(60));
        assert!(!clock.observe(too_far));
        assert!(clock.read() < too_far, "a refused stamp moved the clock");
    }
}
