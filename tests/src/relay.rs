//! A userspace UDP fault relay: the stand-in for netem between QUIC endpoints.
//!
//! A [`Relay`] listens on one address and forwards every datagram it receives to an
//! upstream address, from one upstream socket per client address so that replies
//! route back to the right client. Faults are set per [`Direction`] and can be
//! changed while traffic flows, through a cheap cloneable [`RelayControl`]:
//! fixed delay, uniform jitter, loss, duplication and full partition.
//!
//! Delayed datagrams wait in a per-direction delay queue (a binary heap ordered by
//! due time, then arrival), so a delayed datagram never blocks others and datagrams
//! are reordered only as much as the jitter implies. Queues are bounded: datagrams
//! over the cap are dropped and counted as `overflowed`.
//!
//! The relay's tasks run on the Tokio runtime that started it, and stop when the
//! [`Relay`] is dropped or [`Relay::shutdown`] is called.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;
use rand::Rng as _;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest UDP payload the relay can carry.
const MAX_DATAGRAM: usize = 65_535;

/// Which way a datagram travels through a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client (whoever sends to the relay's listen address) to the upstream.
    Forward,
    /// From the upstream back to the client.
    Reverse,
}

impl Direction {
    /// Both directions, `Forward` first.
    pub const BOTH: [Self; 2] = [Self::Forward, Self::Reverse];

    const fn index(self) -> usize {
        match self {
            Self::Forward => 0,
            Self::Reverse => 1,
        }
    }
}

/// The faults applied to one direction of a relay. `Fault::default()` is a clean link.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    /// Fixed one-way delay added to every datagram.
    pub delay: Duration,
    /// Uniform jitter: each datagram's delay is `delay ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss: f64,
    /// Probability in `[0, 1]` that a datagram is sent twice.
    pub duplicate: f64,
    /// Drop everything, including datagrams already waiting in the delay queue.
    pub partitioned: bool,
}

impl Fault {
    /// A clean link: no delay, no loss, no duplication, connected.
    pub fn none() -> Self {
        Self::default()
    }

    /// A link that drops everything.
    pub fn partition() -> Self {
        Self {
            partitioned: true,
            ..Self::default()
        }
    }

    /// A link with a fixed one-way delay.
    pub fn delayed(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// A link that drops each datagram with probability `p`.
    pub fn lossy(p: f64) -> Self {
        Self {
            loss: p,
            ..Self::default()
        }
    }

    /// Sets the fixed delay.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sets the uniform jitter.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the loss probability.
    #[must_use]
    pub fn with_loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// Sets the duplication probability.
    #[must_use]
    pub fn with_duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// Sets whether the link is partitioned.
    #[must_use]
    pub fn with_partitioned(mut self, partitioned: bool) -> Self {
        self.partitioned = partitioned;
        self
    }

    /// The delay for one datagram: `delay` plus a uniform draw from `[-jitter, +jitter]`.
    fn sample_delay(&self, rng: &mut impl rand::Rng) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        let jitter = i128::try_from(self.jitter.as_nanos()).unwrap_or(i128::MAX / 4);
        let base = i128::try_from(self.delay.as_nanos()).unwrap_or(i128::MAX / 4);
        let total = base + rng.random_range(-jitter..=jitter);
        Duration::from_nanos(u64::try_from(total.max(0)).unwrap_or(u64::MAX))
    }
}

/// Tunables of a relay that do not change while it runs.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Datagrams that may wait in one direction's delay queue; more are dropped
    /// and counted as `overflowed`.
    pub queue_capacity: usize,
    /// Distinct client addresses served; datagrams from further clients are dropped
    /// and counted as `overflowed`.
    pub max_clients: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 8192,
            max_clients: 256,
        }
    }
}

/// A snapshot of one direction's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams that arrived to be relayed in this direction.
    pub received: u64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: u64,
    /// Datagrams dropped by a fault (loss or partition) or by a failed send.
    pub dropped: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Datagrams dropped because a queue (or the client table) was full.
    pub overflowed: u64,
}

impl std::ops::Add for DirectionStats {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            received: self.received + other.received,
            forwarded: self.forwarded + other.forwarded,
            dropped: self.dropped + other.dropped,
            duplicated: self.duplicated + other.duplicated,
            overflowed: self.overflowed + other.overflowed,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    overflowed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            received: self.received.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How late delayed datagrams left, in microseconds past their due time: the relay shares
/// the machine with the nodes, so under load its timer fires late and the link delay a
/// datagram sees is the configured delay plus this.
#[derive(Debug)]
struct Lateness(Mutex<Histogram<u64>>);

impl Default for Lateness {
    fn default() -> Self {
        Self(Mutex::new(lateness_histogram()))
    }
}

/// An empty lateness histogram: 1 us to 60 s at 3 significant digits (recording saturates
/// above that).
pub(crate) fn lateness_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant, valid histogram bounds"))
}

impl Lateness {
    fn record(&self, late: Duration) {
        let micros = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(micros);
    }

    fn snapshot(&self) -> Histogram<u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn reset(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset();
    }
}

#[derive(Debug, Default)]
struct Shared {
    faults: [RwLock<Fault>; 2],
    counters: [Counters; 2],
    lateness: [Lateness; 2],
}

impl Shared {
    fn fault(&self, direction: Direction) -> Fault {
        self.faults[direction.index()]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn is_partitioned(&self, direction: Direction) -> bool {
        self.faults[direction.index()]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .partitioned
    }

    fn counters(&self, direction: Direction) -> &Counters {
        &self.counters[direction.index()]
    }
}

/// A cheap, cloneable handle that changes a running relay's faults and reads its counters.
#[derive(Clone)]
pub struct RelayControl {
    shared: Arc<Shared>,
}

impl fmt::Debug for RelayControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayControl")
            .field("forward", &self.fault(Direction::Forward))
            .field("reverse", &self.fault(Direction::Reverse))
            .finish()
    }
}

impl RelayControl {
    /// Replaces the faults of one direction; takes effect for the next datagram
    /// (and, for a partition, for datagrams already queued).
    pub fn set_fault(&self, direction: Direction, fault: Fault) {
        *self.shared.faults[direction.index()]
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fault;
    }

    /// Changes the faults of one direction in place.
    pub fn update(&self, direction: Direction, change: impl FnOnce(&mut Fault)) {
        change(
            &mut self.shared.faults[direction.index()]
                .write()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    /// Replaces the faults of both directions.
    pub fn set_both(&self, fault: &Fault) {
        for direction in Direction::BOTH {
            self.set_fault(direction, fault.clone());
        }
    }

    /// The current faults of one direction.
    pub fn fault(&self, direction: Direction) -> Fault {
        self.shared.fault(direction)
    }

    /// Partitions (true) or reconnects (false) both directions, keeping other faults.
    pub fn set_partitioned(&self, partitioned: bool) {
        for direction in Direction::BOTH {
            self.update(direction, |f| f.partitioned = partitioned);
        }
    }

    /// Clears every fault in both directions.
    pub fn heal(&self) {
        self.set_both(&Fault::none());
    }

    /// The counters of one direction.
    pub fn stats(&self, direction: Direction) -> DirectionStats {
        self.shared.counters(direction).snapshot()
    }

    /// How late this direction's datagrams left, in microseconds past their due time, since
    /// the start or the last [`Self::reset_lateness`].
    pub fn lateness(&self, direction: Direction) -> Histogram<u64> {
        self.shared.lateness[direction.index()].snapshot()
    }

    /// Forgets the lateness recorded so far (both directions), to measure a window.
    pub fn reset_lateness(&self) {
        for lateness in &self.shared.lateness {
            lateness.reset();
        }
    }
}

/// Where a queued datagram goes.
#[derive(Debug)]
enum Dest {
    /// Out of a client's connected upstream socket.
    Upstream(Arc<UdpSocket>),
    /// Out of the listen socket, to this client.
    Client(SocketAddr),
}

#[derive(Debug)]
struct Queued {
    due: Instant,
    seq: u64,
    data: Arc<[u8]>,
    dest: Dest,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// The ingress side of one direction: applies faults and hands datagrams to the
/// direction's delay queue.
#[derive(Clone, Debug)]
struct Lane {
    direction: Direction,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Queued>,
    seq: Arc<AtomicU64>,
}

impl Lane {
    fn submit(&self, data: &[u8], dest: impl Fn() -> Dest) {
        let counters = self.shared.counters(self.direction);
        bump(&counters.received);
        let fault = self.shared.fault(self.direction);
        // Decide everything with the thread-local RNG before touching the channel;
        // the RNG must not live across an await.
        let delays: Vec<Duration> = {
            let mut rng = rand::rng();
            if fault.partitioned || rng.random_bool(fault.loss.clamp(0.0, 1.0)) {
                bump(&counters.dropped);
                return;
            }
            let copies = if rng.random_bool(fault.duplicate.clamp(0.0, 1.0)) {
                bump(&counters.duplicated);
                2
            } else {
                1
            };
            (0..copies).map(|_| fault.sample_delay(&mut rng)).collect()
        };
        let now = Instant::now();
        let data: Arc<[u8]> = Arc::from(data);
        for delay in delays {
            let queued = Queued {
                due: now + delay,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                data: Arc::clone(&data),
                dest: dest(),
            };
            if self.tx.try_send(queued).is_err() {
                bump(&counters.overflowed);
            }
        }
    }
}

/// A running UDP fault relay. Dropping it stops its tasks and closes its sockets.
pub struct Relay {
    local_addr: SocketAddr,
    upstream: SocketAddr,
    control: RelayControl,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.upstream)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Starts a relay listening on `listen` (usually `127.0.0.1:0`) and forwarding to
    /// `upstream`, with default options. Must be called within a Tokio runtime.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        Self::start_with(listen, upstream, RelayOptions::default()).await
    }

    /// Starts a relay with explicit options.
    pub async fn start_with(
        listen: SocketAddr,
        upstream: SocketAddr,
        options: RelayOptions,
    ) -> Result<Self> {
        let socket = UdpSocket::bind(listen)
            .await
            .with_context(|| format!("relay: binding the listen socket {listen}"))?;
        let local_addr = socket
            .local_addr()
            .context("relay: listen socket address")?;
        let listener = Arc::new(socket);
        let shared = Arc::new(Shared::default());
        let capacity = options.queue_capacity.max(1);

        let mut tasks = Vec::with_capacity(3);
        let mut lanes = Vec::with_capacity(2);
        for direction in Direction::BOTH {
            let (tx, rx) = mpsc::channel(capacity);
            lanes.push(Lane {
                direction,
                shared: Arc::clone(&shared),
                tx,
                seq: Arc::new(AtomicU64::new(0)),
            });
            tasks.push(tokio::spawn(run_delay_queue(
                direction,
                Arc::clone(&shared),
                Arc::clone(&listener),
                rx,
                capacity,
            )));
        }
        let reverse = lanes.pop().context("relay: reverse lane")?;
        let forward = lanes.pop().context("relay: forward lane")?;
        tasks.push(tokio::spawn(run_listener(
            Arc::clone(&listener),
            upstream,
            forward,
            reverse,
            options.max_clients,
        )));
        tracing::debug!(%local_addr, %upstream, "relay started");
        Ok(Self {
            local_addr,
            upstream,
            control: RelayControl { shared },
            tasks,
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address datagrams are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// A cloneable handle to change faults and read counters.
    pub fn control(&self) -> RelayControl {
        self.control.clone()
    }

    /// Replaces the faults of one direction (see [`RelayControl::set_fault`]).
    pub fn set_fault(&self, direction: Direction, fault: Fault) {
        self.control.set_fault(direction, fault);
    }

    /// The counters of one direction.
    pub fn stats(&self, direction: Direction) -> DirectionStats {
        self.control.stats(direction)
    }

    /// Stops the relay and waits until its tasks (and so its sockets) are gone.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // A cancelled task reports a JoinError; that is the expected outcome.
            let _ = task.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Receives from clients; creates one upstream socket (and reader task) per client.
async fn run_listener(
    listener: Arc<UdpSocket>,
    upstream: SocketAddr,
    forward: Lane,
    reverse: Lane,
    max_clients: usize,
) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    // Dropping the set (when this task is aborted) aborts the per-client readers.
    let mut readers = JoinSet::new();
    let mut buf = vec![0_u8; MAX_DATAGRAM];
    loop {
        let (len, client) = match listener.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::trace!(%error, "relay: listen socket receive error");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let socket = if let Some(socket) = clients.get(&client) {
            Arc::clone(socket)
        } else {
            if clients.len() >= max_clients {
                bump(&forward.shared.counters(Direction::Forward).received);
                bump(&forward.shared.counters(Direction::Forward).overflowed);
                continue;
            }
            match connect_upstream(upstream).await {
                Ok(socket) => {
                    let socket = Arc::new(socket);
                    clients.insert(client, Arc::clone(&socket));
                    readers.spawn(run_upstream_reader(
                        Arc::clone(&socket),
                        client,
                        reverse.clone(),
                    ));
                    socket
                }
                Err(error) => {
                    tracing::warn!(%error, %client, "relay: cannot open an upstream socket");
                    bump(&forward.shared.counters(Direction::Forward).received);
                    bump(&forward.shared.counters(Direction::Forward).dropped);
                    continue;
                }
            }
        };
        forward.submit(&buf[..len], || Dest::Upstream(Arc::clone(&socket)));
        // Reap finished readers so the set does not grow (they only end on abort).
        while readers.try_join_next().is_some() {}
    }
}

async fn connect_upstream(upstream: SocketAddr) -> Result<UdpSocket> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    };
    let socket = UdpSocket::bind(bind)
        .await
        .context("binding an upstream socket")?;
    socket
        .connect(upstream)
        .await
        .with_context(|| format!("connecting an upstream socket to {upstream}"))?;
    Ok(socket)
}

/// Reads replies from the upstream for one client and hands them to the reverse lane.
async fn run_upstream_reader(socket: Arc<UdpSocket>, client: SocketAddr, reverse: Lane) {
    let mut buf = vec![0_u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(len) => reverse.submit(&buf[..len], || Dest::Client(client)),
            // A connected UDP socket reports ICMP "port unreachable" (the upstream is
            // down, e.g. a killed node) as an error on the next receive: keep going.
            Err(error) => {
                tracing::trace!(%error, %client, "relay: upstream socket receive error");
                tokio::task::yield_now().await;
            }
        }
    }
}

/// One direction's delay queue: holds datagrams until due, then sends them.
async fn run_delay_queue(
    direction: Direction,
    shared: Arc<Shared>,
    listener: Arc<UdpSocket>,
    mut rx: mpsc::Receiver<Queued>,
    capacity: usize,
) {
    let mut heap: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    let counters = shared.counters(direction);
    let lateness = &shared.lateness[direction.index()];
    loop {
        // Send everything due before waiting again, so a flood of arrivals cannot
        // starve delivery.
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(q)| q.due <= now) {
            let Some(Reverse(queued)) = heap.pop() else {
                break;
            };
            lateness.record(Instant::now().saturating_duration_since(queued.due));
            if shared.is_partitioned(direction) {
                bump(&counters.dropped);
                continue;
            }
            let sent = match &queued.dest {
                Dest::Upstream(socket) => socket.send(&queued.data).await,
                Dest::Client(client) => listener.send_to(&queued.data, *client).await,
            };
            match sent {
                Ok(_) => bump(&counters.forwarded),
                Err(error) => {
                    tracing::trace!(%error, ?direction, "relay: send failed");
                    bump(&counters.dropped);
                }
            }
        }
        let next_due = heap.peek().map(|Reverse(q)| q.due);
        tokio::select! {
            received = rx.recv() => match received {
                Some(queued) => {
                    if heap.len() >= capacity {
                        bump(&counters.overflowed);
                    } else {
                        heap.push(Reverse(queued));
                    }
                }
                None => return,
            },
            () = sleep_until_opt(next_due) => {}
        }
    }
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP echo server on loopback; returns its address and the task.
    async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0_u8; MAX_DATAGRAM];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let _ = socket.send_to(&buf[..len], from).await;
            }
        });
        (addr, task)
    }

    async fn setup() -> (Relay, UdpSocket, JoinHandle<()>) {
        let (echo, task) = echo_server().await;
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), echo)
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay.local_addr()).await.unwrap();
        (relay, client, task)
    }

    /// Receives one datagram within `timeout`, or `None`.
    async fn recv_within(socket: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0_u8; MAX_DATAGRAM];
        match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
            Ok(Ok(len)) => Some(buf[..len].to_vec()),
            _ => None,
        }
    }

    /// Counts datagrams until none arrives for `quiet`.
    async fn drain(socket: &UdpSocket, quiet: Duration) -> usize {
        let mut n = 0;
        while recv_within(socket, quiet).await.is_some() {
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn passes_traffic_both_ways() {
        let (relay, client, _echo) = setup().await;
        for i in 0..20_u32 {
            client.send(&i.to_be_bytes()).await.unwrap();
            let got = recv_within(&client, Duration::from_secs(1)).await.unwrap();
            assert_eq!(got, i.to_be_bytes());
        }
        let fwd = relay.stats(Direction::Forward);
        let rev = relay.stats(Direction::Reverse);
        assert_eq!((fwd.received, fwd.forwarded, fwd.dropped), (20, 20, 0));
        assert_eq!((rev.received, rev.forwarded, rev.dropped), (20, 20, 0));
    }

    #[tokio::test]
    async fn replies_route_to_each_client() {
        let (relay, a, _echo) = setup().await;
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        b.connect(relay.local_addr()).await.unwrap();
        a.send(b"from-a").await.unwrap();
        b.send(b"from-b").await.unwrap();
        let wait = Duration::from_secs(1);
        assert_eq!(recv_within(&a, wait).await.unwrap(), b"from-a");
        assert_eq!(recv_within(&b, wait).await.unwrap(), b"from-b");
    }

    #[tokio::test]
    async fn partition_drops_everything_then_heal_restores() {
        let (relay, client, _echo) = setup().await;
        let control = relay.control();
        control.set_partitioned(true);
        for _ in 0..50 {
            client.send(b"lost").await.unwrap();
        }
        assert_eq!(drain(&client, Duration::from_millis(200)).await, 0);
        assert_eq!(relay.stats(Direction::Forward).dropped, 50);
        assert_eq!(relay.stats(Direction::Forward).forwarded, 0);

        control.heal();
        client.send(b"back").await.unwrap();
        let got = recv_within(&client, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, b"back");
    }

    #[tokio::test]
    async fn reverse_partition_only_drops_replies() {
        let (relay, client, _echo) = setup().await;
        relay.set_fault(Direction::Reverse, Fault::partition());
        for _ in 0..10 {
            client.send(b"x").await.unwrap();
        }
        assert_eq!(drain(&client, Duration::from_millis(200)).await, 0);
        assert_eq!(relay.stats(Direction::Forward).forwarded, 10);
        assert_eq!(relay.stats(Direction::Reverse).dropped, 10);
    }

    #[tokio::test]
    async fn partition_drops_datagrams_already_delayed() {
        let (relay, client, _echo) = setup().await;
        relay.set_fault(
            Direction::Forward,
            Fault::delayed(Duration::from_millis(600)),
        );
        for _ in 0..5 {
            client.send(b"queued").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        relay.control().set_partitioned(true);
        assert_eq!(drain(&client, Duration::from_millis(800)).await, 0);
        assert_eq!(relay.stats(Direction::Forward).dropped, 5);
    }

    #[tokio::test]
    async fn loss_is_roughly_the_configured_probability() {
        let (relay, client, _echo) = setup().await;
        relay.set_fault(Direction::Forward, Fault::lossy(0.5));
        // Read back after every 100 sends so no socket buffer overflows: every loss
        // is then the relay's.
        let mut received = 0;
        for chunk in 0..10_u32 {
            for i in 0..100_u32 {
                client.send(&(chunk * 100 + i).to_be_bytes()).await.unwrap();
            }
            received += drain(&client, Duration::from_millis(30)).await;
        }
        received += drain(&client, Duration::from_millis(100)).await;
        let stats = relay.stats(Direction::Forward);
        assert_eq!(stats.received, 1000);
        assert_eq!(stats.dropped + stats.forwarded, 1000);
        // Binomial(1000, 0.5): sd ≈ 16, so ±150 is over 9 sd.
        assert!(
            (350..=650).contains(&received),
            "received {received} of 1000 at 50% loss"
        );
        assert_eq!(received as u64, stats.forwarded);
    }

    #[tokio::test]
    async fn delay_holds_datagrams_at_least_the_configured_time() {
        let (relay, client, _echo) = setup().await;
        let delay = Duration::from_millis(150);
        relay.set_fault(Direction::Forward, Fault::delayed(delay));
        let start = std::time::Instant::now();
        client.send(b"slow").await.unwrap();
        // Nothing may come back before the delay has passed.
        assert!(
            recv_within(&client, Duration::from_millis(100))
                .await
                .is_none()
        );
        let got = recv_within(&client, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, b"slow");
        assert!(
            start.elapsed() >= delay,
            "delivered after {:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn lateness_is_recorded_once_per_forwarded_datagram_and_resets() {
        let (relay, client, _echo) = setup().await;
        let delay = Duration::from_millis(20);
        relay.set_fault(Direction::Forward, Fault::delayed(delay));
        let start = std::time::Instant::now();
        for payload in [b"a", b"b", b"c"] {
            client.send(payload).await.unwrap();
        }
        for _ in 0..3 {
            recv_within(&client, Duration::from_secs(2)).await.unwrap();
        }
        let elapsed = start.elapsed();
        let forward = relay.control().lateness(Direction::Forward);
        assert_eq!(forward.len(), 3, "one sample per delayed datagram");
        // Lateness is time past the due time: it cannot exceed what passed after the delay.
        let bound = u64::try_from(elapsed.checked_sub(delay).unwrap().as_micros()).unwrap();
        assert!(forward.max() <= bound, "{} us > {bound} us", forward.max());
        // The echoes came back through the (undelayed) reverse queue.
        assert_eq!(relay.control().lateness(Direction::Reverse).len(), 3);
        relay.control().reset_lateness();
        assert!(relay.control().lateness(Direction::Forward).is_empty());
        assert!(relay.control().lateness(Direction::Reverse).is_empty());
    }

    #[tokio::test]
    async fn delayed_datagrams_do_not_block_the_other_direction_or_reorder() {
        let (relay, client, _echo) = setup().await;
        let delay = Duration::from_millis(100);
        relay.set_fault(Direction::Reverse, Fault::delayed(delay));
        let start = std::time::Instant::now();
        for i in 0..100_u32 {
            client.send(&i.to_be_bytes()).await.unwrap();
        }
        // The forward direction is clean: all 100 reach the echo server long before
        // the reverse delay expires; then they come back in order.
        let mut got = Vec::new();
        while let Some(d) = recv_within(&client, Duration::from_secs(1)).await {
            got.push(u32::from_be_bytes(d.try_into().unwrap()));
            if got.len() == 100 {
                break;
            }
        }
        assert!(start.elapsed() >= delay);
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(relay.stats(Direction::Forward).forwarded, 100);
    }

    #[tokio::test]
    async fn jitter_stays_within_bounds() {
        let (relay, client, _echo) = setup().await;
        relay.set_fault(
            Direction::Forward,
            Fault::delayed(Duration::from_millis(100)).with_jitter(Duration::from_millis(50)),
        );
        let start = std::time::Instant::now();
        for i in 0..50_u32 {
            client.send(&i.to_be_bytes()).await.unwrap();
        }
        // Minimum possible delay is 50 ms: nothing before that.
        assert!(
            recv_within(&client, Duration::from_millis(40))
                .await
                .is_none()
        );
        assert_eq!(drain(&client, Duration::from_millis(300)).await, 50);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn duplication_makes_extra_copies() {
        let (relay, client, _echo) = setup().await;
        relay.set_fault(Direction::Forward, Fault::none().with_duplicate(1.0));
        for _ in 0..10 {
            client.send(b"twice").await.unwrap();
        }
        assert_eq!(drain(&client, Duration::from_millis(200)).await, 20);
        let stats = relay.stats(Direction::Forward);
        assert_eq!(stats.duplicated, 10);
        assert_eq!(stats.forwarded, 20);
    }

    #[tokio::test]
    async fn over_capacity_datagrams_are_dropped_and_counted() {
        let (echo, _task) = echo_server().await;
        let relay = Relay::start_with(
            "127.0.0.1:0".parse().unwrap(),
            echo,
            RelayOptions {
                queue_capacity: 10,
                ..RelayOptions::default()
            },
        )
        .await
        .unwrap();
        relay.set_fault(
            Direction::Forward,
            Fault::delayed(Duration::from_millis(500)),
        );
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay.local_addr()).await.unwrap();
        for _ in 0..50 {
            client.send(b"x").await.unwrap();
        }
        let received = drain(&client, Duration::from_millis(700)).await;
        let stats = relay.stats(Direction::Forward);
        assert_eq!(stats.received, 50);
        assert!(stats.overflowed >= 30, "{stats:?}");
        assert_eq!(stats.forwarded + stats.overflowed, 50, "{stats:?}");
        assert_eq!(received as u64, stats.forwarded);
        assert!(received <= 20, "received {received}");
    }

    #[tokio::test]
    async fn shutdown_closes_the_listen_socket() {
        let (relay, _client, _echo) = setup().await;
        let addr = relay.local_addr();
        relay.shutdown().await;
        // The port is free again.
        UdpSocket::bind(addr).await.unwrap();
    }

    #[test]
    fn sampled_delay_respects_jitter_bounds() {
        let fault =
            Fault::delayed(Duration::from_millis(10)).with_jitter(Duration::from_millis(20));
        let mut rng = rand::rng();
        for _ in 0..10_000 {
            let d = fault.sample_delay(&mut rng);
            assert!(d <= Duration::from_millis(30));
        }
        let fault =
            Fault::delayed(Duration::from_millis(100)).with_jitter(Duration::from_millis(5));
        for _ in 0..10_000 {
            let d = fault.sample_delay(&mut rng);
            assert!(d >= Duration::from_millis(95) && d <= Duration::from_millis(105));
        }
    }
}
