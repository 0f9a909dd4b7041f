//! `meridian bench`: a closed-loop load generator with latency percentiles, and the bare
//! baseline server it is compared against.
//!
//! Each connection is one task that sends a request, waits for the answer, and sends the next
//! (HTTP/1.1 keep-alive, no pipelining), as wrk does. Run it on its own core
//! (`taskset -c 1 meridian bench ...`) with the server on the other, or the two compete and
//! the figure measures the scheduler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use meridian_server::storage::BareJournal;
use serde_json::json;
use tokio::net::TcpStream;

use super::peer::{self, Described, RedisPeer, Reply, Store};

/// A write and a read for each of the four types. Every read workload writes each key once
/// first, so reads find values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// PUT a register with a value of --value-size bytes.
    Put,
    /// GET a register.
    Get,
    /// POST an increment to a PN-counter.
    Incr,
    /// GET a PN-counter.
    CounterGet,
    /// POST an increment to a G-counter.
    Gincr,
    /// GET a G-counter.
    GcounterGet,
    /// POST an add of one element to one of 100 sets (which grow over the run, and every
    /// answer carries the whole set).
    Sadd,
    /// GET a set (of one element each).
    Smembers,
    /// 50 % GET register, 50 % PUT register.
    Mixed,
}

/// The CRDT a workload works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DataType {
    Register,
    Counter,
    GCounter,
    Set,
}

impl Workload {
    pub(super) fn data_type(self) -> DataType {
        match self {
            Self::Put | Self::Get | Self::Mixed => DataType::Register,
            Self::Incr | Self::CounterGet => DataType::Counter,
            Self::Gincr | Self::GcounterGet => DataType::GCounter,
            Self::Sadd | Self::Smembers => DataType::Set,
        }
    }

    /// Whether the keys must hold values before the run.
    fn reads(self) -> bool {
        matches!(
            self,
            Self::Get | Self::CounterGet | Self::GcounterGet | Self::Smembers | Self::Mixed
        )
    }

    /// The name `--workload` takes, as the report shows it.
    fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned())
    }

    /// The key request number `n` (a random draw) goes to, of `keys`. Set adds go to 100
    /// sets, which grow: the workload measures sets that get large.
    fn key_at(self, n: u64, keys: u64) -> u64 {
        let key = n % keys;
        if self == Self::Sadd { key % 100 } else { key }
    }

    /// Whether request number `n` (a random draw) reads.
    pub(super) fn reads_at(self, n: u64) -> bool {
        match self {
            Self::Mixed => n % 2 == 0,
            other => other.reads(),
        }
    }
}

impl DataType {
    fn path(self, key: u64) -> String {
        match self {
            Self::Register => format!("/v1/registers/k{key}"),
            Self::Counter => format!("/v1/counters/k{key}"),
            Self::GCounter => format!("/v1/gcounters/k{key}"),
            Self::Set => format!("/v1/sets/k{key}"),
        }
    }

    /// The method and body of a write of this type; `element` is what a set write adds.
    fn write(self, element: u64, register_value: &str) -> (&'static str, String) {
        match self {
            Self::Register => ("PUT", register_value.to_owned()),
            Self::Counter | Self::GCounter => ("POST", r#"{"increment":1}"#.to_owned()),
            Self::Set => ("POST", format!(r#"{{"add":[{element}]}}"#)),
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The nodes to load (http://host:port, comma-separated); connections are spread over them.
    #[arg(
        long,
        env = "MERIDIAN_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7000"
    )]
    url: Vec<String>,
    /// Fixed request rate per URL (open loop: latency counts from each request's scheduled
    /// time, so a stall is not hidden). Without it, every connection sends back to back.
    #[arg(long)]
    rate: Option<f64>,
    /// Measure replication lag to this node, two ways. From the node's own histogram (its
    /// `/metrics`, which needs an admin or metrics token): each op from a peer, from the HLC
    /// stamp its origin gave it to its durable apply here. And end to end: a probe writes a
    /// register on the first --url every millisecond and polls it here; that figure is from
    /// sending a write to reading it back, so it also holds the write's and the read's own
    /// latency.
    #[arg(long)]
    lag_url: Option<String>,
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    workload: Workload,
    /// Concurrent connections, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    /// Seconds of measurement (after --warmup seconds).
    #[arg(long, short = 'd', default_value_t = 10)]
    duration: u64,
    /// A bare server to compare against (`meridian bench-baseline`): each round measures it
    /// and then --url with the same workload, and the end prints the ratio of the two
    /// throughputs, so a figure like the README's comes from one command.
    #[arg(long)]
    baseline_url: Option<String>,
    /// The durable ceiling (`meridian bench-baseline --durable DIR`): each round measures it
    /// after the bare baseline, and the end prints the node's throughput over it and its own
    /// over the bare baseline's, which is as far as any server that syncs each group of
    /// writes before answering can go on this machine.
    #[arg(long)]
    durable_baseline_url: Option<String>,
    /// Another store to load the same way, each round after the baseline and before the
    /// node: `redis://host:port` (for the durable-write comparison start Redis with
    /// `--appendonly yes --appendfsync always`) or `etcd://host:port` (its JSON gateway; put,
    /// get and mixed only). The report shows how the peer persists writes, and the end prints
    /// the node's throughput over the peer's.
    #[arg(long)]
    peer_url: Option<String>,
    /// Measurements to make (with --baseline-url or --peer-url: each round measures every
    /// server in turn); the end prints each figure's median and range. Noisy machines need
    /// several.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Distinct keys, picked uniformly at random.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Bytes of each register value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Consistency-Level header to send.
    #[arg(long)]
    consistency: Option<String>,
    /// Send writes with `Prefer: return=minimal`, so each answers with a summary rather than
    /// the key's new state (which for a large set is every element).
    #[arg(long)]
    prefer_minimal: bool,
    /// Load-generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Put no load: poll every --url until all nodes hold the same ops and the same Merkle
    /// root, and print how long that took and what each node lacked at the start. Start it
    /// when a partition heals (or just before), with the load stopped.
    #[arg(long)]
    converge: bool,
    /// Seconds --converge waits before it gives up (and --anti-entropy for each of its waits).
    #[arg(long, default_value_t = 120)]
    converge_timeout: u64,
    /// Put no load: measure what anti-entropy rounds cost against how many keys two replicas
    /// differ in. --url names two nodes: the first runs the rounds with the second. It writes
    /// --keys registers, then for each --differ size makes the replicas differ in that many
    /// keys and reports the rounds' bytes and time. The nodes need `[debug]
    /// allow_state_overwrite = true` (the differences are unlogged writes) and `[anti_entropy]
    /// enabled = false`: a cluster for benchmarks only.
    #[arg(long, conflicts_with = "converge")]
    anti_entropy: bool,
    /// Numbers of differing keys --anti-entropy measures, in turn.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    differ: Vec<usize>,
    #[command(flatten)]
    auth: super::ConnectArgs,
}

#[derive(Debug, Args)]
pub struct BaselineArgs {
    #[arg(long, default_value = "127.0.0.1:7999")]
    listen: SocketAddr,
    /// Worker threads (1 to compare against a node given one core).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Serve the durable ceiling instead: every PUT, POST and DELETE hands its body to one
    /// writer thread, which appends each group of them to a Meridian journal in DIR as one
    /// record, syncs once, and only then lets them answer: the node's group commit with none
    /// of its other work. GETs still answer at once.
    #[arg(long, value_name = "DIR")]
    durable: Option<std::path::PathBuf>,
}

struct Target {
    host: String,
    addr: SocketAddr,
    /// For https URLs: the connector and the name the certificate must carry.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    /// `Bearer <token>`, when a token was given.
    authorization: Option<hyper::header::HeaderValue>,
}

/// What every target shares: the TLS client config (from --ca) and the Authorization header.
struct Connect {
    tls: Option<Arc<rustls::ClientConfig>>,
    authorization: Option<hyper::header::HeaderValue>,
}

impl Connect {
    fn new(args: &super::ConnectArgs) -> Result<Self> {
        let tls = match &args.ca {
            None => None,
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read CA file {}", path.display()))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.with_context(|| format!("{}: bad CA PEM", path.display()))?;
                    roots
                        .add(cert)
                        .with_context(|| format!("{}: unusable CA certificate", path.display()))?;
                }
                let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
        };
        let authorization = match args.bearer()? {
            None => None,
            Some(token) => {
                let mut value = hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .context("the token holds characters a header cannot carry")?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Self { tls, authorization })
    }

    fn target(&self, url: &str) -> Result<Target> {
        let (rest, https) = if let Some(rest) = url.strip_prefix("https://") {
            (rest, true)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (rest, false)
        } else {
            bail!("bench speaks http:// and https:// URLs, not {url:?}");
        };
        let host = rest.trim_end_matches('/').to_owned();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&host)
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        let tls = if https {
            let config = self
                .tls
                .clone()
                .with_context(|| format!("{url}: give --ca (or MERIDIAN_CA) for https URLs"))?;
            let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            let name = name.trim_start_matches('[').trim_end_matches(']');
            let name = rustls_pki_types::ServerName::try_from(name.to_owned())
                .with_context(|| format!("{name:?} is not a valid TLS server name"))?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Target {
            host,
            addr,
            tls,
            authorization: self.authorization.clone(),
        })
    }
}

impl Target {
    /// A request to this target: its `Host`, and its `Authorization` when a token was given.
    fn request(&self, method: &str, uri: &str) -> http::request::Builder {
        let builder = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", &self.host);
        match &self.authorization {
            Some(value) => builder.header(hyper::header::AUTHORIZATION, value),
            None => builder,
        }
    }
}

struct Worker {
    latencies: Histogram<u64>,
    ok: u64,
    errors: u64,
}

/// One request: the read or write of `key`, with `n` the random draw it came from (a set
/// write adds it). A preload's writes go at the node's default consistency level, whatever
/// the run's, so a read run at a level a lone node refuses still finds its keys.
#[derive(Clone, Copy, Debug)]
struct Ask {
    n: u64,
    key: u64,
    read: bool,
    preload: bool,
}

fn request_for(
    args: &BenchArgs,
    target: &Target,
    Ask {
        n,
        key,
        read,
        preload,
    }: Ask,
    value: &str,
) -> Result<Request<Full<Bytes>>> {
    let data_type = args.workload.data_type();
    let mut builder;
    let body = if read {
        builder = target.request("GET", &data_type.path(key));
        String::new()
    } else {
        let (method, body) = data_type.write(n, value);
        builder = target
            .request(method, &data_type.path(key))
            .header("content-type", "application/json");
        if args.prefer_minimal {
            builder = builder.header("prefer", "return=minimal");
        }
        body
    };
    if let Some(level) = args.consistency.as_ref().filter(|_| !preload) {
        builder = builder.header("consistency-level", level);
    }
    Ok(builder.body(Full::new(Bytes::from(body)))?)
}

/// When an open-loop connection sends: at `first`, then every `interval`.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    first: Instant,
    interval: Duration,
}

impl Schedule {
    /// Lane `lane` of the `lanes` connections that share `rate` requests/s to one URL: each
    /// sends every `lanes / rate` seconds, the lanes' slots spread evenly over that interval.
    fn lane(start: Instant, rate: f64, lanes: usize, lane: usize) -> Self {
        let interval = Duration::from_secs_f64(lanes as f64 / rate);
        Self {
            first: start + interval.mul_f64(lane as f64 / lanes as f64),
            interval,
        }
    }
}

/// What a measurement loads: nodes (or the baseline), or a peer store.
#[derive(Clone)]
enum Endpoint {
    Http(Arc<Target>),
    Redis(Arc<RedisPeer>),
    Etcd(Arc<Target>),
}

type Http1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One connection of a measurement, with the register value its writes carry.
enum Connection {
    Http {
        sender: Http1,
        target: Arc<Target>,
        value: String,
    },
    Redis {
        connection: redis::aio::MultiplexedConnection,
        value: String,
    },
    Etcd {
        sender: Http1,
        target: Arc<Target>,
        value: String,
    },
}

impl Connection {
    async fn open(endpoint: &Endpoint, args: &BenchArgs) -> Result<Self> {
        Ok(match endpoint {
            Endpoint::Http(target) => Self::Http {
                sender: http1(target).await?,
                target: target.clone(),
                // A JSON string of --value-size bytes, quotes included.
                value: json!("x".repeat(args.value_size.saturating_sub(2))).to_string(),
            },
            Endpoint::Redis(peer) => Self::Redis {
                connection: peer.connect().await?,
                value: "x".repeat(args.value_size),
            },
            Endpoint::Etcd(target) => Self::Etcd {
                sender: http1(target).await?,
                target: target.clone(),
                value: peer::etcd_value(args.value_size),
            },
        })
    }

    /// Waits until the connection can take the next request.
    async fn ready(&mut self) -> Result<()> {
        if let Self::Http { sender, .. } | Self::Etcd { sender, .. } = self {
            sender.ready().await?;
        }
        Ok(())
    }

    /// Sends request number `n` (a random draw) and waits for its answer.
    async fn send(&mut self, args: &BenchArgs, n: u64) -> Result<Reply> {
        let ask = Ask {
            n,
            key: args.workload.key_at(n, args.keys as u64),
            read: args.workload.reads_at(n),
            preload: false,
        };
        self.exchange(args, ask).await
    }

    /// Sends `ask` and waits for its answer.
    async fn exchange(&mut self, args: &BenchArgs, ask: Ask) -> Result<Reply> {
        let Ask { n, key, read, .. } = ask;
        match self {
            Self::Http {
                sender,
                target,
                value,
            } => {
                let request = request_for(args, target, ask, value)?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                Ok(if status.is_success() {
                    Reply::Done
                } else {
                    Reply::Refused(status.to_string())
                })
            }
            Self::Redis { connection, value } => {
                let command = peer::redis_command(args.workload, n, key, read, value);
                peer::redis_send(connection, &command, read).await
            }
            Self::Etcd {
                sender,
                target,
                value,
            } => {
                let (path, body) = peer::etcd_request(key, read, value);
                let request = target
                    .request("POST", path)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                Ok(if !status.is_success() {
                    Reply::Refused(status.to_string())
                } else if read && !peer::etcd_found(&body) {
                    Reply::Refused("nothing there".to_owned())
                } else {
                    Reply::Done
                })
            }
        }
    }
}

async fn connection(
    args: Arc<BenchArgs>,
    endpoint: Endpoint,
    schedule: Option<Schedule>,
    measure_from: Instant,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Result<Worker> {
    let mut connection = Connection::open(&endpoint, &args).await?;
    let mut worker = Worker {
        latencies: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        ok: 0,
        errors: 0,
    };
    // xorshift: cheap, and each connection its own sequence.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next_slot = schedule.map_or_else(Instant::now, |s| s.first);
    while !stop.load(Ordering::Relaxed) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        connection.ready().await?;
        let sent = match schedule {
            Some(Schedule { interval, .. }) => {
                tokio::time::sleep_until(next_slot.into()).await;
                let scheduled = next_slot;
                next_slot += interval;
                scheduled
            }
            None => Instant::now(),
        };
        let succeeded = connection.send(&args, state).await? == Reply::Done;
        if sent >= measure_from {
            let micros = sent.elapsed().as_micros() as u64;
            worker.latencies.record(micros.max(1))?;
            if succeeded {
                worker.ok += 1;
            } else {
                worker.errors += 1;
            }
        }
    }
    Ok(worker)
}

/// Writes every key once so reads find values, over as many connections as the run uses.
async fn preload(args: &Arc<BenchArgs>, endpoint: &Endpoint) -> Result<()> {
    let lanes = args.connections.min(args.keys) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let (args, endpoint) = (args.clone(), endpoint.clone());
        tasks.spawn(async move {
            let mut connection = Connection::open(&endpoint, &args).await?;
            for key in (lane..args.keys as u64).step_by(lanes as usize) {
                connection.ready().await?;
                if let Reply::Refused(answer) = connection
                    .exchange(
                        &args,
                        Ask {
                            n: key,
                            key,
                            read: false,
                            preload: true,
                        },
                    )
                    .await?
                {
                    bail!("writing key {key} was refused: {answer}");
                }
            }
            Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.anti_entropy {
        return super::ae_bench::run(
            &super::ae_bench::Plan {
                urls: args.url,
                keys: args.keys,
                value_size: args.value_size,
                differ: args.differ,
                timeout: Duration::from_secs(args.converge_timeout),
                json: args.json,
            },
            &args.auth,
        );
    }
    if args.converge {
        return super::converge::run(
            &args.url,
            &args.auth,
            Duration::from_secs(args.converge_timeout),
            args.json,
        );
    }
    if args.connections == 0
        || args.keys == 0
        || args.duration == 0
        || args.rounds == 0
        || args.url.is_empty()
    {
        bail!("--connections, --keys, --duration, --rounds and --url must be given and positive");
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let connect = Connect::new(&args.auth)?;
    let targets = args
        .url
        .iter()
        .map(|u| connect.target(u).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let lag_target = args
        .lag_url
        .as_deref()
        .map(|u| connect.target(u).map(Arc::new))
        .transpose()?;
    let baseline = args
        .baseline_url
        .as_deref()
        .map(|u| connect.target(u).map(Arc::new))
        .transpose()?;
    let durable_baseline = args
        .durable_baseline_url
        .as_deref()
        .map(|u| connect.target(u).map(Arc::new))
        .transpose()?;
    let peer = match args.peer_url.as_deref() {
        None => None,
        Some(url) => {
            let (store, address) = Store::of(url)?;
            store.check(args.workload)?;
            let endpoint = match store {
                Store::Redis => Endpoint::Redis(Arc::new(RedisPeer::open(&address)?)),
                Store::Etcd => {
                    let mut target = connect.target(&address)?;
                    // The node's token is not etcd's to see.
                    target.authorization = None;
                    Endpoint::Etcd(Arc::new(target))
                }
            };
            Some((url.to_owned(), endpoint))
        }
    };
    let args = Arc::new(args);
    runtime.block_on(async move {
        let described = match &peer {
            Some((url, endpoint)) => Some(describe(url, endpoint).await?),
            None => None,
        };
        let nodes: Vec<Endpoint> = targets.iter().cloned().map(Endpoint::Http).collect();
        if args.workload.reads() {
            for node in &nodes {
                preload(&args, node).await.context("preloading keys")?;
            }
            if let Some((url, endpoint)) = &peer {
                preload(&args, endpoint)
                    .await
                    .with_context(|| format!("preloading keys on {url}"))?;
            }
        }
        let mut runs = Vec::new();
        for round in 1..=args.rounds {
            if let Some(baseline) = &baseline {
                let measured = measure(&args, &[Endpoint::Http(baseline.clone())], None)
                    .await
                    .with_context(|| format!("measuring the baseline {}", baseline.host))?;
                runs.push(Run::new(round, Side::Baseline, measured));
            }
            if let Some(durable) = &durable_baseline {
                let measured = measure(&args, &[Endpoint::Http(durable.clone())], None)
                    .await
                    .with_context(|| format!("measuring the durable baseline {}", durable.host))?;
                runs.push(Run::new(round, Side::Durable, measured));
            }
            if let Some((url, endpoint)) = &peer {
                let measured = measure(&args, std::slice::from_ref(endpoint), None)
                    .await
                    .with_context(|| format!("measuring the peer {url}"))?;
                runs.push(Run::new(round, Side::Peer, measured));
            }
            let measured = measure(&args, &nodes, lag_target.clone()).await?;
            runs.push(Run::new(round, Side::Node, measured));
        }
        report(&args, &runs, described.as_ref());
        Ok(())
    })
}

/// What the report says of the peer: how it persists writes.
async fn describe(url: &str, endpoint: &Endpoint) -> Result<Described> {
    match endpoint {
        Endpoint::Redis(peer) => peer.describe().await,
        Endpoint::Etcd(target) => {
            let mut sender = http1(target)
                .await
                .with_context(|| format!("the peer {url}"))?;
            let response = sender
                .send_request(target.request("GET", "/version").body(Full::default())?)
                .await
                .with_context(|| format!("{url}: no answer to GET /version"))?;
            let body = response.into_body().collect().await?.to_bytes();
            let version = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["etcdserver"].as_str().map(str::to_owned));
            Ok(peer::describe_etcd(url, version.as_deref()))
        }
        Endpoint::Http(_) => bail!("{url} is not a peer store"),
    }
}

/// What one measurement saw.
struct Measured {
    latencies: Histogram<u64>,
    ok: u64,
    errors: u64,
    seconds: f64,
    lag: Option<Histogram<u64>>,
    apply_lag: Option<ApplyLag>,
    receive_lag: Option<ApplyLag>,
}

impl Measured {
    fn throughput(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

/// One measurement of `args.duration` seconds (after the warm-up) against `targets`.
async fn measure(
    args: &Arc<BenchArgs>,
    targets: &[Endpoint],
    lag_target: Option<Arc<Target>>,
) -> Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let mut tasks = tokio::task::JoinSet::new();
    let per_url = args.connections.div_ceil(targets.len());
    for seed in 0..args.connections {
        let target = targets[seed % targets.len()].clone();
        // Each connection carries an equal share of its URL's rate, and its slots are offset
        // from its siblings' by an equal fraction of the interval: started in phase, the
        // connections would send in bursts of one request each, and the queueing of those
        // bursts, not the server, would set the latency.
        let schedule = args
            .rate
            .map(|rate| Schedule::lane(start, rate, per_url, seed / targets.len()));
        tasks.spawn(connection(
            args.clone(),
            target,
            schedule,
            measure_from,
            stop.clone(),
            seed as u64 + 1,
        ));
    }
    let probe = match (&lag_target, &targets[0]) {
        (Some(to), Endpoint::Http(from)) => Some(tokio::spawn(lag_probe(
            from.clone(),
            to.clone(),
            measure_from,
            stop.clone(),
        ))),
        _ => None,
    };
    tokio::time::sleep_until(measure_from.into()).await;
    let lag_before = match &lag_target {
        Some(to) => scrape_apply_lag(to).await,
        None => None,
    };
    tokio::time::sleep_until((measure_from + Duration::from_secs(args.duration)).into()).await;
    let (apply_lag, receive_lag) = match (&lag_target, lag_before) {
        (Some(to), Some(before)) => match scrape_apply_lag(to).await {
            Some(after) => (
                ApplyLag::between(&before.apply, &after.apply),
                before
                    .receive
                    .zip(after.receive)
                    .and_then(|(before, after)| ApplyLag::between(&before, &after)),
            ),
            None => (None, None),
        },
        _ => (None, None),
    };
    stop.store(true, Ordering::Relaxed);
    let seconds = measure_from.elapsed().as_secs_f64();
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    while let Some(result) = tasks.join_next().await {
        let worker = result??;
        latencies.add(&worker.latencies)?;
        ok += worker.ok;
        errors += worker.errors;
    }
    let lag = match probe {
        Some(probe) => Some(probe.await??),
        None => None,
    };
    Ok(Measured {
        latencies,
        ok,
        errors,
        seconds,
        lag,
        apply_lag,
        receive_lag,
    })
}

async fn http1(target: &Target) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("cannot connect to {}", target.host))?;
    stream.set_nodelay(true)?;
    if let Some((connector, name)) = &target.tls {
        let stream = connector
            .connect(name.clone(), stream)
            .await
            .with_context(|| format!("TLS handshake with {} failed", target.host))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        return Ok(sender);
    }
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The node's histogram of replication apply lag (see `Metrics::apply_lag_seconds`).
const APPLY_LAG_METRIC: &str = "meridian_replication_apply_lag_seconds";
/// The same up to the ops' arrival, before the local apply (`Metrics::receive_lag_seconds`).
const RECEIVE_LAG_METRIC: &str = "meridian_replication_receive_lag_seconds";

/// The lag node's lag histograms at one instant.
struct LagBuckets {
    apply: super::prom::Buckets,
    /// `None` from a node that predates the metric.
    receive: Option<super::prom::Buckets>,
}

/// The lag node's lag buckets now, or `None` (with a warning) if they cannot be read.
async fn scrape_apply_lag(target: &Target) -> Option<LagBuckets> {
    let scraped = async {
        let mut sender = http1(target).await?;
        let request = target
            .request("GET", "/metrics")
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("GET /metrics answered {status} (it needs an admin or metrics token)");
        }
        let text = String::from_utf8_lossy(&body);
        let apply = super::prom::buckets(&text, APPLY_LAG_METRIC)
            .with_context(|| format!("/metrics has no {APPLY_LAG_METRIC}"))?;
        Ok(LagBuckets {
            apply,
            receive: super::prom::buckets(&text, RECEIVE_LAG_METRIC),
        })
    };
    match scraped.await {
        Ok(buckets) => Some(buckets),
        Err(error) => {
            eprintln!(
                "warning: no replication apply lag from {}: {error:#}",
                target.host
            );
            None
        }
    }
}

/// Replication apply lag over the measured window, from two scrapes of the lag node.
struct ApplyLag {
    p50_ms: f64,
    p99_ms: f64,
    ops: u64,
}

impl ApplyLag {
    fn between(before: &super::prom::Buckets, after: &super::prom::Buckets) -> Option<Self> {
        let at = |q| super::prom::quantile_between(before, after, q);
        let ((p50, ops), (p99, _)) = (at(0.5)?, at(0.99)?);
        Some(Self {
            p50_ms: p50 * 1000.0,
            p99_ms: p99 * 1000.0,
            ops,
        })
    }
}

const PROBE_PATH: &str = "/v1/registers/meridian-bench-lag-probe";

/// Writes an increasing sequence number to the probe register at `from` every millisecond
/// and polls it at `to`; each number's lag is when `to` first shows it (or a later one) minus
/// when it was sent.
async fn lag_probe(
    from: Arc<Target>,
    to: Arc<Target>,
    measure_from: Instant,
    stop: Arc<AtomicBool>,
) -> Result<Histogram<u64>> {
    let sent_at = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::<(
        u64,
        Instant,
    )>::new()));
    let writer = {
        let (sent_at, stop, from) = (sent_at.clone(), stop.clone(), from.clone());
        tokio::spawn(async move {
            let mut sender = http1(&from).await?;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let request = from
                    .request("PUT", PROBE_PATH)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(n.to_string())))?;
                sender.ready().await?;
                if let Ok(mut q) = sent_at.lock() {
                    q.push_back((n, Instant::now()));
                }
                let response = sender.send_request(request).await?;
                response.into_body().collect().await?;
            }
            anyhow::Ok(())
        })
    };
    let mut lag = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut sender = http1(&to).await?;
    while !stop.load(Ordering::Relaxed) {
        let request = to
            .request("GET", PROBE_PATH)
            .body(Full::new(Bytes::new()))?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let ok = response.status().is_success();
        let body = response.into_body().collect().await?.to_bytes();
        let seen = if ok {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("value").and_then(serde_json::Value::as_u64))
        } else {
            None
        };
        let Some(seen) = seen else { continue };
        let now = Instant::now();
        if let Ok(mut q) = sent_at.lock() {
            while q.front().is_some_and(|(n, _)| *n <= seen) {
                if let Some((_, sent)) = q.pop_front() {
                    if sent >= measure_from {
                        lag.record((now - sent).as_micros().max(1) as u64)?;
                    }
                }
            }
        }
    }
    writer.await??;
    Ok(lag)
}

/// Which server a measurement was of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Baseline,
    /// The bare handler behind a group-committed journal (`bench-baseline --durable`).
    Durable,
    Peer,
    Node,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Durable => "durable",
            Self::Peer => "peer",
            Self::Node => "node",
        }
    }
}

struct Run {
    round: usize,
    side: Side,
    measured: Measured,
}

impl Run {
    fn new(round: usize, side: Side, measured: Measured) -> Self {
        Self {
            round,
            side,
            measured,
        }
    }
}

/// A figure over several rounds: a noisy machine needs the median and the range, not one run.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            f64::midpoint(sorted[middle - 1], sorted[middle])
        };
        Some(Self { median, min, max })
    }

    fn json(self) -> serde_json::Value {
        json!({ "median": self.median, "min": self.min, "max": self.max })
    }
}

/// Throughput of one side's runs, in round order.
fn throughputs(runs: &[Run], side: Side) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.side == side)
        .map(|r| r.measured.throughput())
        .collect()
}

/// One side's throughput over another's (the node's over the baseline's, say), round by
/// round.
fn ratios(runs: &[Run], of: Side, over: Side) -> Vec<f64> {
    throughputs(runs, of)
        .iter()
        .zip(throughputs(runs, over))
        .map(|(side, other)| side / other)
        .collect()
}

/// One run's line (or JSON object); with more than one run, a summary of medians and ranges
/// and, against a baseline or a peer, of the ratio.
fn report(args: &BenchArgs, runs: &[Run], peer: Option<&Described>) {
    let summarised = runs.len() > 1;
    let node = Spread::of(&throughputs(runs, Side::Node));
    let baseline = Spread::of(&throughputs(runs, Side::Baseline));
    let durable = Spread::of(&throughputs(runs, Side::Durable));
    let peer_throughput = Spread::of(&throughputs(runs, Side::Peer));
    let ratio = Spread::of(&ratios(runs, Side::Node, Side::Baseline));
    let durable_ratio = Spread::of(&ratios(runs, Side::Node, Side::Durable));
    let durable_ceiling = Spread::of(&ratios(runs, Side::Durable, Side::Baseline));
    let peer_ratio = Spread::of(&ratios(runs, Side::Node, Side::Peer));
    if args.json {
        let objects: Vec<serde_json::Value> = runs.iter().map(|r| run_json(args, r)).collect();
        match objects.as_slice() {
            [only] => println!("{only}"),
            _ => println!(
                "{}",
                json!({
                    "runs": objects,
                    "rounds": args.rounds,
                    "throughput": node.map(Spread::json),
                    "baseline_throughput": baseline.map(Spread::json),
                    "ratio": ratio.map(Spread::json),
                    "durable_throughput": durable.map(Spread::json),
                    "durable_ratio": durable_ratio.map(Spread::json),
                    "durable_ceiling": durable_ceiling.map(Spread::json),
                    "peer": peer.map(|p| p.json.clone()),
                    "peer_throughput": peer_throughput.map(Spread::json),
                    "peer_ratio": peer_ratio.map(Spread::json),
                })
            ),
        }
        return;
    }
    if let Some(peer) = peer {
        println!("{}", peer.line);
    }
    for run in runs {
        if summarised {
            print!("round {} {:<8} ", run.round, run.side.label());
        }
        print_run(args, &run.measured);
    }
    if !summarised {
        return;
    }
    let rounds = args.rounds;
    for (side, spread) in [
        (Side::Node, node),
        (Side::Baseline, baseline),
        (Side::Durable, durable),
        (Side::Peer, peer_throughput),
    ] {
        if let Some(s) = spread {
            println!(
                "{:<8} over {rounds} rounds: median {:.0} req/s ({:.0}–{:.0})",
                side.label(),
                s.median,
                s.min,
                s.max
            );
        }
    }
    for (of, over, spread) in [
        (Side::Node, Side::Baseline, ratio),
        (Side::Node, Side::Durable, durable_ratio),
        (Side::Durable, Side::Baseline, durable_ceiling),
        (Side::Node, Side::Peer, peer_ratio),
    ] {
        if let Some(r) = spread {
            println!(
                "ratio {}/{}, round by round: median {:.2} ({:.2}–{:.2})",
                of.label(),
                over.label(),
                r.median,
                r.min,
                r.max
            );
        }
    }
}

/// A histogram of microseconds at quantile `q`, in milliseconds.
fn ms_at(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn run_json(args: &BenchArgs, run: &Run) -> serde_json::Value {
    let m = &run.measured;
    let (h, lag) = (&m.latencies, m.lag.as_ref());
    let ms = |q: f64| ms_at(h, q);
    let lag_ms = |q: f64| lag.map(|l| ms_at(l, q));
    let (apply_lag, receive_lag) = (m.apply_lag.as_ref(), m.receive_lag.as_ref());
    json!({
        "round": run.round,
        "server": run.side.label(),
        "workload": args.workload.name(),
        "connections": args.connections,
        "seconds": m.seconds,
        "ok": m.ok,
        "errors": m.errors,
        "throughput": m.throughput(),
        "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99),
        "max_ms": h.max() as f64 / 1000.0,
        "lag_p50_ms": lag_ms(0.5), "lag_p99_ms": lag_ms(0.99),
        "lag_max_ms": lag.map(|l| l.max() as f64 / 1000.0),
        "lag_samples": lag.map(Histogram::len),
        "apply_lag_p50_ms": apply_lag.map(|a| a.p50_ms),
        "apply_lag_p99_ms": apply_lag.map(|a| a.p99_ms),
        "apply_lag_ops": apply_lag.map(|a| a.ops),
        "receive_lag_p50_ms": receive_lag.map(|a| a.p50_ms),
        "receive_lag_p99_ms": receive_lag.map(|a| a.p99_ms),
    })
}

fn print_run(args: &BenchArgs, m: &Measured) {
    let h = &m.latencies;
    let ms = |q: f64| ms_at(h, q);
    println!(
        "{:<7} c={:<4} {:>10.0} req/s  p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms  ok {} errors {}",
        args.workload.name(),
        args.connections,
        m.throughput(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0,
        m.ok,
        m.errors
    );
    if let Some(a) = &m.apply_lag {
        println!(
            "replication lag, origin stamp to durable apply ({} ops)  p50 {:>7.3} ms  p99 {:>7.3} ms",
            a.ops, a.p50_ms, a.p99_ms
        );
    }
    if let Some(r) = &m.receive_lag {
        println!(
            "  of which origin stamp to arrival here ({} ops)  p50 {:>7.3} ms  p99 {:>7.3} ms",
            r.ops, r.p50_ms, r.p99_ms
        );
    }
    if let Some(l) = &m.lag {
        println!(
            "write to remote read, probe ({} samples)  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms",
            l.len(),
            ms_at(l, 0.5),
            ms_at(l, 0.99),
            l.max() as f64 / 1000.0
        );
    }
}

/// The bare answer, after the body is durable when serving the durable ceiling.
const BARE_ANSWER: &str = r#"{"key":"k","value":"x"}"#;

async fn answer() -> &'static str {
    BARE_ANSWER
}

/// Bodies waiting for the durable ceiling's writer, as many as a node's write queue holds.
const DURABLE_QUEUE: usize = 4096;

/// A request body and who waits for it to be durable.
type Durable = (Bytes, tokio::sync::oneshot::Sender<()>);

async fn durable_answer(
    State(queue): State<tokio::sync::mpsc::Sender<Durable>>,
    body: Bytes,
) -> Response {
    let (done, durable) = tokio::sync::oneshot::channel();
    if queue.send((body, done)).await.is_err() || durable.await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the journal failed").into_response();
    }
    BARE_ANSWER.into_response()
}

/// The node's group commit and nothing else: drain what is queued, append it as one record,
/// sync once, answer all of it. A failed sync stops the writer, and every request answers 503.
fn group_commit(mut journal: BareJournal, mut pending: tokio::sync::mpsc::Receiver<Durable>) {
    let mut group = Vec::new();
    while let Some(first) = pending.blocking_recv() {
        group.push(first);
        while let Ok(next) = pending.try_recv() {
            group.push(next);
        }
        let bodies: Vec<&[u8]> = group.iter().map(|(body, _)| body.as_ref()).collect();
        if let Err(error) = journal.append(&bodies).and_then(|()| journal.sync()) {
            eprintln!("bench-baseline: the journal failed: {error}");
            return;
        }
        for (_, done) in group.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The HTTP ceiling: the same serving stack (hyper, axum router) with handlers that do no work
/// (or, with `--durable`, only what durability costs).
pub fn baseline(args: &BaselineArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = match &args.durable {
            None => Router::new().route(
                "/v1/{collection}/{key}",
                get(answer).put(answer).post(answer).delete(answer),
            ),
            Some(dir) => {
                let journal = BareJournal::start(dir)
                    .with_context(|| format!("starting a journal in {}", dir.display()))?;
                let (queue, pending) = tokio::sync::mpsc::channel(DURABLE_QUEUE);
                std::thread::Builder::new()
                    .name("meridian-writer".into())
                    .spawn(move || group_commit(journal, pending))?;
                Router::new()
                    .route(
                        "/v1/{collection}/{key}",
                        get(answer)
                            .put(durable_answer)
                            .post(durable_answer)
                            .delete(durable_answer),
                    )
                    .with_state(queue)
            }
        };
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!("baseline listening on http://{}", listener.local_addr()?);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            token.cancel();
        });
        meridian_server::http::serve(
            listener,
            app,
            &meridian_server::config::Timeouts::default(),
            None,
            shutdown,
        )
        .await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(ok: u64, seconds: f64) -> Measured {
        Measured {
            latencies: Histogram::new(3).unwrap(),
            ok,
            errors: 0,
            seconds,
            lag: None,
            apply_lag: None,
            receive_lag: None,
        }
    }

    #[test]
    fn a_spread_is_the_median_and_range_of_its_figures() {
        assert_eq!(Spread::of(&[]), None);
        let odd = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Spread::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (3.0, 1.0, 10.0));
    }

    #[test]
    fn set_adds_go_to_a_hundred_sets_and_other_requests_to_every_key() {
        assert_eq!(Workload::Sadd.key_at(1203, 1000), 3);
        assert_eq!(Workload::Smembers.key_at(1203, 1000), 203);
        assert_eq!(Workload::Put.key_at(1203, 1000), 203);
    }

    #[test]
    fn ratios_pair_each_round_with_its_own_baseline() {
        let runs = vec![
            Run::new(1, Side::Baseline, measured(1000, 1.0)),
            Run::new(1, Side::Node, measured(400, 1.0)),
            Run::new(2, Side::Baseline, measured(500, 1.0)),
            Run::new(2, Side::Node, measured(500, 2.0)),
        ];
        assert_eq!(ratios(&runs, Side::Node, Side::Baseline), vec![0.4, 0.5]);
        assert_eq!(ratios(&runs, Side::Baseline, Side::Node), vec![2.5, 2.0]);
        assert_eq!(ratios(&runs, Side::Node, Side::Peer), Vec::<f64>::new());
        assert_eq!(throughputs(&runs, Side::Node), vec![400.0, 250.0]);
    }

    #[test]
    fn open_loop_lanes_share_the_rate_and_interleave_evenly() {
        let start = Instant::now();
        // 4 connections at 1 000 requests/s: each every 4 ms, one of them every 1 ms.
        let lanes: Vec<Schedule> = (0..4)
            .map(|l| Schedule::lane(start, 1000.0, 4, l))
            .collect();
        for (l, lane) in lanes.iter().enumerate() {
            assert_eq!(lane.interval, Duration::from_millis(4));
            assert_eq!(lane.first - start, Duration::from_millis(l as u64));
        }
    }
}
