//! Prometheus metrics: HTTP requests by route and status, group commits, storage.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

// Per-request label sets hold `&'static str`s: looking a series up then allocates nothing, which
// on the request path is measurable (several label strings per request, every request).

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabels {
    /// LOCAL_ONE, LOCAL_QUORUM, GLOBAL_QUORUM or ALL.
    pub level: &'static str,
    /// `read` or `write`.
    pub op: &'static str,
    /// `ok`, `unavailable` (503 before acting), `timeout` (504), `session_behind`, `error`.
    pub outcome: &'static str,
}

/// The route patterns seen so far, each leaked once: the router has a fixed, small set of them
/// (plus `unmatched`), so this is bounded.
static ROUTES: RwLock<std::collections::BTreeSet<&'static str>> =
    RwLock::new(std::collections::BTreeSet::new());

/// A `'static` copy of a route pattern.
pub fn intern_route(route: &str) -> &'static str {
    if let Some(known) = ROUTES
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(route)
    {
        return known;
    }
    let mut routes = ROUTES.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = routes.get(route) {
        return known;
    }
    let leaked: &'static str = Box::leak(route.to_owned().into_boxed_str());
    routes.insert(leaked);
    leaked
}

/// The label of an HTTP method: the standard ones by name, anything else as `other`, so a
/// client cannot mint series.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub target: String,
    pub changed: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
    pub region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    pub origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AeLabels {
    pub what: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A `'static` label by identity (address and length). Equal texts at two addresses are two
/// keys for one series, which is harmless: the family still merges them.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct LabelId(usize, usize);

impl LabelId {
    fn of(label: &'static str) -> Self {
        Self(label.as_ptr().addr(), label.len())
    }
}

/// Series handles of the per-request families by label identity. Looking a series up in a
/// family hashes its label strings with SipHash under the family's lock; on the request path
/// that cost more than the rest of the bookkeeping, so each series is found there once and
/// then by three words here. The key sets are bounded: the router's routes, the method labels,
/// the status codes this server answers, and the fixed level/op/outcome labels.
#[derive(Debug)]
struct SeriesCache<K, S>(RwLock<HashMap<K, S, BuildHasherDefault<rustc_hash::FxHasher>>>);

impl<K, S> Default for SeriesCache<K, S> {
    fn default() -> Self {
        Self(RwLock::new(HashMap::default()))
    }
}

impl<K: std::hash::Hash + Eq, S: Clone> SeriesCache<K, S> {
    fn with(&self, key: K, create: impl FnOnce() -> S, record: impl FnOnce(&S)) {
        if let Some(series) = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            record(series);
            return;
        }
        let series = create();
        record(&series);
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, series);
    }
}

/// Eight buckets per doubling from 1 ms to about 1 s (each 9 % wider than the last), then one
/// per doubling to about a minute: fine enough that `histogram_quantile` places a p99 within a
/// few milliseconds of the truth at WAN link delays, where a lag target is judged.
fn apply_lag_buckets() -> impl Iterator<Item = f64> {
    let fine = (0..=80).map(|step| 0.001 * 2f64.powf(f64::from(step) / 8.0));
    let coarse = (1..=6).map(|doubling| 1.024 * 2f64.powi(doubling));
    fine.chain(coarse)
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// Every metric the node exports. Counters are updated on the hot path (atomics); gauges that
/// describe other components are refreshed when `/metrics` is scraped.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_latency: HistogramFamily<RouteLabels>,
    pub consistency_latency: HistogramFamily<LevelLabels>,
    request_series: SeriesCache<(LabelId, LabelId, u16), (Counter, Histogram)>,
    consistency_series: SeriesCache<(LabelId, LabelId, LabelId), Histogram>,
    pub commit_batch_ops: Histogram,
    pub commit_seconds: Histogram,
    pub commit_failures: Counter,
    pub read_repairs: Family<RepairLabels, Counter>,
    pub checkpoint_seconds: Histogram,
    /// Writes held back while a fold caught up (see `storage::writer::MAX_UNFOLDED_OPS`).
    pub write_stall_seconds: Histogram,
    /// Ops from peers: from the HLC stamp their origin gave them to their durable apply here.
    pub apply_lag_seconds: Histogram,
    /// Ops from peers: from the HLC stamp their origin gave them to their arrival here, before
    /// they queue for the apply. Apply lag minus this is the time spent on this node.
    pub receive_lag_seconds: Histogram,
    pub applied_seq: Family<OriginLabels, Gauge>,
    pub wal_ops: Gauge,
    pub peer_connected: Family<PeerLabels, Gauge>,
    pub peer_reachable: Family<PeerLabels, Gauge>,
    pub peer_lag_ops: Family<PeerLabels, Gauge>,
    pub peer_lag_ms: Family<PeerLabels, Gauge>,
    pub peer_skew_ms: Family<PeerLabels, Gauge>,
    pub peer_rtt_ms: Family<PeerLabels, Gauge>,
    pub peer_ops_sent: Family<PeerLabels, Gauge>,
    pub peer_bytes_sent: Family<PeerLabels, Gauge>,
    pub peer_batches_sent: Family<PeerLabels, Gauge>,
    pub peer_ops_received: Family<PeerLabels, Gauge>,
    pub refused_stamps: Gauge,
    /// Anti-entropy totals: rounds, keys compared, keys repaired, bytes sent/received.
    pub ae_totals: Family<AeLabels, Gauge>,
    /// Anti-entropy rounds per peer, and milliseconds since the last.
    pub ae_peer_rounds: Family<PeerLabels, Gauge>,
    pub ae_peer_last_round_ms: Family<PeerLabels, Gauge>,
    /// Keys in the Merkle tree.
    pub merkle_keys: Gauge,
    /// Garbage collection totals: passes, failed passes, keys removed, keys compacted.
    pub gc_totals: Family<AeLabels, Gauge>,
    /// 1 when the peer is beyond the GC horizon (ignored by the frontier), else 0.
    pub gc_peer_excluded: Family<PeerLabels, Gauge>,
    /// 1 when the peer was excluded and has not completed an anti-entropy round since.
    pub gc_peer_needs_resync: Family<PeerLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meridian");
        let http_requests = Family::<RequestLabels, Counter>::default();
        let http_latency: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        let consistency_latency: HistogramFamily<LevelLabels> =
            Family::new_with_constructor(latency_histogram);
        let commit_batch_ops = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let commit_seconds = latency_histogram();
        let commit_failures = Counter::default();
        let checkpoint_seconds = latency_histogram();
        let write_stall_seconds = latency_histogram();
        let apply_lag_seconds = Histogram::new(apply_lag_buckets());
        let receive_lag_seconds = Histogram::new(apply_lag_buckets());
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            http_latency.clone(),
        );
        registry.register(
            "consistency_request_duration_seconds",
            "Data reads and writes by consistency level, operation and outcome (session waits \
             and quorum coordination included)",
            consistency_latency.clone(),
        );
        registry.register(
            "group_commit_ops",
            "Operations made durable by one journal fsync (group commit size)",
            commit_batch_ops.clone(),
        );
        registry.register(
            "storage_commit_duration_seconds",
            "Journal fsync time per group commit",
            commit_seconds.clone(),
        );
        registry.register(
            "storage_checkpoint_duration_seconds",
            "Durable redb checkpoint time",
            checkpoint_seconds.clone(),
        );
        registry.register(
            "storage_write_stall_seconds",
            "Time the applier held every write while the previous fold into redb caught up (new keys arriving faster than redb takes them)",
            write_stall_seconds.clone(),
        );
        registry.register(
            "replication_apply_lag_seconds",
            "Ops received from peers: time from the HLC stamp of their origin to their durable apply on this node",
            apply_lag_seconds.clone(),
        );
        registry.register(
            "replication_receive_lag_seconds",
            "Ops received from peers: time from the HLC stamp of their origin to their arrival on this node, before the local apply",
            receive_lag_seconds.clone(),
        );
        registry.register(
            "storage_commit_failures",
            "Write transactions that failed to commit",
            commit_failures.clone(),
        );
        let metrics = Self {
            registry: Mutex::new(registry),
            http_requests,
            http_latency,
            consistency_latency,
            request_series: SeriesCache::default(),
            consistency_series: SeriesCache::default(),
            commit_batch_ops,
            commit_seconds,
            commit_failures,
            read_repairs: Family::default(),
            checkpoint_seconds,
            write_stall_seconds,
            apply_lag_seconds,
            receive_lag_seconds,
            applied_seq: Family::default(),
            wal_ops: Gauge::default(),
            peer_connected: Family::default(),
            peer_reachable: Family::default(),
            peer_lag_ops: Family::default(),
            peer_lag_ms: Family::default(),
            peer_skew_ms: Family::default(),
            peer_rtt_ms: Family::default(),
            peer_ops_sent: Family::default(),
            peer_bytes_sent: Family::default(),
            peer_batches_sent: Family::default(),
            peer_ops_received: Family::default(),
            refused_stamps: Gauge::default(),
            ae_totals: Family::default(),
            ae_peer_rounds: Family::default(),
            ae_peer_last_round_ms: Family::default(),
            merkle_keys: Gauge::default(),
            gc_totals: Family::default(),
            gc_peer_excluded: Family::default(),
            gc_peer_needs_resync: Family::default(),
        };
        if let Ok(mut registry) = metrics.registry.lock() {
            registry.register(
                "applied_sequence",
                "Highest contiguous op sequence applied, per origin",
                metrics.applied_seq.clone(),
            );
            registry.register("wal_ops", "Ops held in the WAL", metrics.wal_ops.clone());
            registry.register(
                "read_repairs",
                "Read repairs sent after quorum reads, by target and whether they changed it",
                metrics.read_repairs.clone(),
            );
            registry.register(
                "peer_connected",
                "1 while a connection to the peer is up",
                metrics.peer_connected.clone(),
            );
            registry.register(
                "peer_reachable",
                "1 while the failure detector considers the peer reachable",
                metrics.peer_reachable.clone(),
            );
            registry.register(
                "replication_lag_ops",
                "This node's ops the peer has not acknowledged",
                metrics.peer_lag_ops.clone(),
            );
            registry.register(
                "replication_lag_milliseconds",
                "Now minus the HLC time of the oldest op the peer has not acknowledged",
                metrics.peer_lag_ms.clone(),
            );
            registry.register(
                "peer_clock_skew_milliseconds",
                "Peer HLC minus local clock, RTT-corrected",
                metrics.peer_skew_ms.clone(),
            );
            registry.register(
                "peer_rtt_milliseconds",
                "QUIC round-trip time to the peer",
                metrics.peer_rtt_ms.clone(),
            );
            registry.register(
                "replication_ops_sent",
                "Ops shipped to the peer",
                metrics.peer_ops_sent.clone(),
            );
            registry.register(
                "replication_bytes_sent",
                "Compressed batch bytes shipped to the peer",
                metrics.peer_bytes_sent.clone(),
            );
            registry.register(
                "replication_batches_sent",
                "Batches shipped to the peer",
                metrics.peer_batches_sent.clone(),
            );
            registry.register(
                "replication_ops_received",
                "Ops received from the peer",
                metrics.peer_ops_received.clone(),
            );
            registry.register(
                "anti_entropy",
                "Anti-entropy totals since start-up, by what (rounds, failed_rounds, \
                 keys_compared, keys_repaired, bytes_sent, bytes_received)",
                metrics.ae_totals.clone(),
            );
            registry.register(
                "anti_entropy_peer_rounds",
                "Successful anti-entropy rounds with the peer",
                metrics.ae_peer_rounds.clone(),
            );
            registry.register(
                "anti_entropy_peer_last_round_milliseconds",
                "Milliseconds since the last anti-entropy round with the peer (-1: never)",
                metrics.ae_peer_last_round_ms.clone(),
            );
            registry.register(
                "merkle_keys",
                "Keys in the anti-entropy Merkle tree",
                metrics.merkle_keys.clone(),
            );
            registry.register(
                "gc",
                "Garbage collection totals since start-up, by what (passes, failed_passes, \
                 keys_removed, keys_compacted)",
                metrics.gc_totals.clone(),
            );
            registry.register(
                "gc_peer_excluded",
                "1 when the peer has been silent beyond the GC horizon (gc.horizon_secs, unset by \
                 default) and no longer holds garbage collection back",
                metrics.gc_peer_excluded.clone(),
            );
            registry.register(
                "gc_peer_needs_resync",
                "1 when the peer was excluded by the GC horizon and has not completed an \
                 anti-entropy round since",
                metrics.gc_peer_needs_resync.clone(),
            );
            registry.register(
                "clock_refused_stamps",
                "Remote HLC stamps refused for exceeding the maximum skew",
                metrics.refused_stamps.clone(),
            );
        }
        metrics
    }

    /// Records, for each op a peer sent, the time from `stamps` (NTP64 HLC times of the ops'
    /// origins) to `now` (NTP64). An origin clock ahead of ours counts as no lag.
    pub fn record_apply_lag(&self, stamps: &[u64], now: u64) {
        observe_lags(&self.apply_lag_seconds, stamps.iter().copied(), now);
    }

    /// As [`Metrics::record_apply_lag`], for ops as they arrive from a peer.
    pub fn record_receive_lag(&self, stamps: impl Iterator<Item = u64>, now: u64) {
        observe_lags(&self.receive_lag_seconds, stamps, now);
    }

    pub fn record_commit(&self, ops: usize, elapsed: Duration) {
        self.commit_batch_ops.observe(ops as f64);
        self.commit_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn record_checkpoint(&self, elapsed: Duration) {
        self.checkpoint_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn record_write_stall(&self, elapsed: Duration) {
        self.write_stall_seconds.observe(elapsed.as_secs_f64());
    }

    /// One read repair: of this node or a peer, and whether it changed the target's state.
    pub fn record_read_repair(&self, target: &str, changed: bool) {
        self.read_repairs
            .get_or_create(&RepairLabels {
                target: target.to_owned(),
                changed: changed.to_string(),
            })
            .inc();
    }

    pub fn record_commit_failure(&self) {
        self.commit_failures.inc();
    }

    pub fn record_request(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.request_series.with(
            (LabelId::of(route), LabelId::of(method), status),
            || {
                let labels = RequestLabels {
                    route,
                    method,
                    status,
                };
                (
                    self.http_requests.get_or_create(&labels).clone(),
                    self.http_latency
                        .get_or_create(&RouteLabels { route, method })
                        .clone(),
                )
            },
            |(count, latency)| {
                count.inc();
                latency.observe(elapsed.as_secs_f64());
            },
        );
    }

    /// One data read or write at a consistency level, with how it ended.
    pub fn record_consistency(
        &self,
        level: &'static str,
        op: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        self.consistency_series.with(
            (LabelId::of(level), LabelId::of(op), LabelId::of(outcome)),
            || {
                self.consistency_latency
                    .get_or_create(&LevelLabels { level, op, outcome })
                    .clone()
            },
            |latency| latency.observe(elapsed.as_secs_f64()),
        );
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = encode(&mut out, &registry);
        }
        out
    }
}

/// Observes `now - stamp` in seconds for each NTP64 stamp; a stamp ahead of `now` as zero.
fn observe_lags(histogram: &Histogram, stamps: impl Iterator<Item = u64>, now: u64) {
    for stamp in stamps {
        let lag = now.saturating_sub(stamp);
        // NTP64: the upper 32 bits are seconds, the lower 32 the fraction of one.
        histogram.observe(lag as f64 / 4_294_967_296.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn cached_series_count_every_request_under_their_own_labels() {
        let metrics = Metrics::new();
        let route = intern_route("/v1/registers/{key}");
        for _ in 0..3 {
            metrics.record_request(route, "PUT", 200, Duration::from_millis(1));
        }
        metrics.record_request(route, "PUT", 400, Duration::from_millis(1));
        // The same label text at another address names the same series.
        let method = String::from("PUT").leak();
        metrics.record_request(route, method, 200, Duration::from_millis(1));
        metrics.record_consistency("LOCAL_ONE", "write", "ok", Duration::from_millis(2));
        metrics.record_consistency("LOCAL_ONE", "write", "ok", Duration::from_millis(2));

        let text = metrics.render();
        let ok = r#"meridian_http_requests_total{route="/v1/registers/{key}",method="PUT",status="200"}"#;
        let bad = r#"meridian_http_requests_total{route="/v1/registers/{key}",method="PUT",status="400"}"#;
        assert_eq!(line(&text, ok), Some(format!("{ok} 4").as_str()));
        assert_eq!(line(&text, bad), Some(format!("{bad} 1").as_str()));
        let latency = r#"meridian_http_request_duration_seconds_count{route="/v1/registers/{key}",method="PUT"}"#;
        assert_eq!(line(&text, latency), Some(format!("{latency} 5").as_str()));
        let level = r#"meridian_consistency_request_duration_seconds_count{level="LOCAL_ONE",op="write",outcome="ok"}"#;
        assert_eq!(line(&text, level), Some(format!("{level} 2").as_str()));
    }
}
