//! Running a real multi-node `meridian` cluster on loopback.
//!
//! [`Cluster::start`] initialises a cluster in a temporary directory with
//! `meridian cluster init`, optionally puts a UDP fault [`Relay`] in front of every
//! directed peer link, starts every node with `meridian serve --config`, and waits
//! until each answers `GET /readyz`. Each node's stdout and stderr go to
//! `stdout.log` / `stderr.log` in its directory; their tails are printed when a node
//! fails to start and when a test panics with the cluster alive.
//!
//! Teardown: dropping a [`Cluster`] (or a [`Node`]) kills its processes with SIGKILL
//! and reaps them, also while unwinding from a failed assertion, then stops the
//! relays and removes the directory (kept when `MERIDIAN_TEST_KEEP` is set).
//!
//! Relays run on the Tokio runtime that called [`Cluster::start`]: use a
//! multi-threaded runtime (`#[tokio::test(flavor = "multi_thread")]`) so peer traffic
//! keeps flowing while the test itself blocks.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::client::{Client, Credentials, POLL_INTERVAL, wait_all_equal};
use crate::config::{self, NodeConfig};
use crate::ports::{MAX_NODES, pick_base_port, pick_node_ports};
use crate::relay::{Direction, DirectionStats, Fault, Relay, RelayControl};

/// Environment variable naming the `meridian` binary to run.
pub const BIN_ENV: &str = "MERIDIAN_BIN";
/// When set (to anything), a cluster's directory is kept after the test.
pub const KEEP_ENV: &str = "MERIDIAN_TEST_KEEP";
/// Log filter for the nodes (`MERIDIAN_LOG` of each node) when the spec sets none;
/// when unset, the test's own `MERIDIAN_LOG` is passed on, else `info`.
pub const LOG_ENV: &str = "MERIDIAN_LOG";

const BIN_NAME: &str = "meridian";
/// Lines of each log printed on failure.
const TAIL_LINES: usize = 40;
/// Attempts at starting a cluster when a port turns out to be taken.
const START_ATTEMPTS: usize = 3;

/// The `meridian` binary to run: `$MERIDIAN_BIN` when set, else `meridian` in the
/// Cargo profile directory that holds the running test executable
/// (`target/{profile}/meridian`).
pub fn meridian_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    locate_bin(std::env::var_os(BIN_ENV), &exe)
}

fn locate_bin(from_env: Option<OsString>, exe: &Path) -> Result<PathBuf> {
    if let Some(path) = from_env.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "{BIN_ENV}={} does not name a file",
            path.display()
        );
        return Ok(path);
    }
    let name = format!("{BIN_NAME}{}", std::env::consts::EXE_SUFFIX);
    // target/{profile}/deps/test-hash → target/{profile}; also accept an executable
    // living directly in the profile directory (e.g. target/{profile}/examples/..).
    let mut searched = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(candidate.display().to_string());
    }
    bail!(
        "the `{BIN_NAME}` binary was not found (looked for {}). Build it first with \
         `cargo build -p meridian-server` (same profile as the tests), or set {BIN_ENV} \
         to its path",
        searched.join(", ")
    )
}

/// A hook that edits one node's config table before the node first starts.
pub type ConfigHook = Arc<dyn Fn(&NodeConfig, &mut toml::Table) -> Result<()> + Send + Sync>;

/// What cluster to start. `ClusterSpec::default()` is 3 regions × 1 node, no relays.
#[derive(Clone)]
pub struct ClusterSpec {
    /// Region names, in order; nodes are numbered region by region.
    pub regions: Vec<String>,
    pub nodes_per_region: usize,
    /// Put a fault relay in front of every directed peer link.
    pub relays: bool,
    /// A TOML snippet merged into every node's config (tables merge recursively).
    pub extra_config: Option<String>,
    /// Edits each node's config after `extra_config` is merged.
    pub configure: Option<ConfigHook>,
    /// Extra environment variables for every node.
    pub env: Vec<(String, String)>,
    /// How long each node may take to answer `/readyz`.
    pub ready_timeout: Duration,
    /// How long a node may take to exit after SIGTERM before it is killed.
    pub stop_timeout: Duration,
    /// The binary; `None` means [`meridian_bin`].
    pub bin: Option<PathBuf>,
}

impl fmt::Debug for ClusterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSpec")
            .field("regions", &self.regions)
            .field("nodes_per_region", &self.nodes_per_region)
            .field("relays", &self.relays)
            .field("extra_config", &self.extra_config)
            .field("configure", &self.configure.as_ref().map(|_| "<hook>"))
            .field("env", &self.env)
            .field("ready_timeout", &self.ready_timeout)
            .field("stop_timeout", &self.stop_timeout)
            .field("bin", &self.bin)
            .finish()
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self::new(&["us-east", "eu-west", "ap-south"])
    }
}

impl ClusterSpec {
    /// One node per region in `regions`, no relays.
    pub fn new(regions: &[&str]) -> Self {
        Self {
            regions: regions.iter().map(|r| (*r).to_owned()).collect(),
            nodes_per_region: 1,
            relays: false,
            extra_config: None,
            configure: None,
            env: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(15),
            bin: None,
        }
    }

    #[must_use]
    pub fn nodes_per_region(mut self, n: usize) -> Self {
        self.nodes_per_region = n;
        self
    }

    #[must_use]
    pub fn relays(mut self, on: bool) -> Self {
        self.relays = on;
        self
    }

    /// Merges `snippet` into every node's config (appends to earlier snippets).
    #[must_use]
    pub fn extra_config(mut self, snippet: &str) -> Self {
        let merged = match self.extra_config.take() {
            Some(earlier) => format!("{earlier}\n{snippet}"),
            None => snippet.to_owned(),
        };
        self.extra_config = Some(merged);
        self
    }

    #[must_use]
    pub fn configure(
        mut self,
        hook: impl Fn(&NodeConfig, &mut toml::Table) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Arc::new(hook));
        self
    }

    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    #[must_use]
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    #[must_use]
    pub fn bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.bin = Some(path.into());
        self
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.regions.len() * self.nodes_per_region
    }
}

/// What [`Node::launch`] runs.
#[derive(Clone, Debug)]
pub struct NodeLaunch {
    /// Position among the nodes the caller manages.
    pub index: usize,
    /// The node's effective settings, as the process will run them (flags and environment
    /// applied): the harness's client talks to `config.http`.
    pub config: NodeConfig,
    /// Working directory; `stdout.log` and `stderr.log` go here.
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    /// Arguments after the binary.
    pub args: Vec<OsString>,
    /// Environment variables on top of the harness's (log filter, no colours).
    pub env: Vec<(String, String)>,
    /// The `meridian` binary ([`meridian_bin`]).
    pub bin: PathBuf,
}

/// One `meridian serve` process of a cluster. Methods take `&self`; the process
/// handle is behind a mutex that is never held across an await.
pub struct Node {
    index: usize,
    config: NodeConfig,
    dir: PathBuf,
    config_path: PathBuf,
    data_dir: PathBuf,
    bin: PathBuf,
    /// Arguments after the binary: `serve --config <config_path>` unless launched with its
    /// own command line ([`Node::launch`]).
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    ready_timeout: Duration,
    stop_timeout: Duration,
    client: Client,
    credentials: Credentials,
    child: Mutex<Option<Child>>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("index", &self.index)
            .field("id", &self.config.id)
            .field("name", &self.config.name)
            .field("region", &self.config.region)
            .field("http", &self.config.http)
            .field("peer", &self.config.peer)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl Node {
    fn new(index: usize, dir: PathBuf, spec: &ClusterSpec, bin: PathBuf) -> Result<Self> {
        let config_path = dir.join("config.toml");
        let text = fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config = NodeConfig::parse(&text)
            .with_context(|| format!("parsing {}", config_path.display()))?;
        let data_dir = dir.join(&config.data_dir);
        let args = vec![
            "serve".into(),
            "--config".into(),
            config_path.clone().into(),
        ];
        let mut node = Self::launch(NodeLaunch {
            index,
            config,
            dir,
            config_path,
            data_dir,
            args,
            env: spec.env.clone(),
            bin,
        })?;
        node.ready_timeout = spec.ready_timeout;
        node.stop_timeout = spec.stop_timeout;
        Ok(node)
    }

    /// A node run with its own command line rather than by [`Cluster::start`] (e.g. the
    /// command line of a deploy file). Not started yet: call [`Node::start`].
    pub fn launch(launch: NodeLaunch) -> Result<Self> {
        let NodeLaunch {
            index,
            config,
            dir,
            config_path,
            data_dir,
            args,
            env: extra_env,
            bin,
        } = launch;
        // The one place tests learn the cluster's CA and token: every client the harness
        // hands out carries them.
        // `cluster init` writes each node's config into its own folder of the cluster dir.
        let cluster_dir = config_path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&dir)
            .to_owned();
        let credentials = Credentials::discover(&cluster_dir, config.https)?;
        let scheme = if config.https { "https" } else { "http" };
        let client = Client::connect(&format!("{scheme}://{}", config.http), &credentials)?;
        let mut env = vec![(LOG_ENV.to_owned(), default_log_filter())];
        // Keep panic backtraces (RUST_BACKTRACE) but not anyhow error backtraces, which
        // would push the error itself out of the log tails printed on failure.
        if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
            env.push(("RUST_LIB_BACKTRACE".to_owned(), "0".to_owned()));
        }
        // Plain logs in the files (tracing-subscriber honours NO_COLOR).
        if std::env::var_os("NO_COLOR").is_none() {
            env.push(("NO_COLOR".to_owned(), "1".to_owned()));
        }
        env.extend(extra_env);
        Ok(Self {
            index,
            config,
            dir,
            config_path,
            data_dir,
            bin,
            args,
            env,
            ready_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(15),
            client,
            credentials,
            child: Mutex::new(None),
        })
    }

    /// Position in the cluster (0-based, region by region): what the link methods take.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node id from its config (1-based).
    pub fn id(&self) -> u64 {
        self.config.id
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn region(&self) -> &str {
        &self.config.region
    }

    /// The node's config as `cluster init` wrote it plus the spec's extra config and
    /// hook; peer addresses are the nodes' own, even when relays sit in front of them.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// `https://127.0.0.1:{port}` (`http://` when the node serves plaintext).
    pub fn url(&self) -> String {
        let scheme = if self.config.https { "https" } else { "http" };
        format!("{scheme}://{}", self.config.http)
    }

    /// The CA and token the harness's clients use for this node.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.config.http
    }

    /// The node's own peer (QUIC) listen address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.config.peer
    }

    /// A client for this node (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The node's directory (config, certificates, data, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.join("stdout.log")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    fn read_config_table(&self) -> Result<toml::Table> {
        let text = fs::read_to_string(&self.config_path)
            .with_context(|| format!("reading {}", self.config_path.display()))?;
        config::parse_table(&text)
            .with_context(|| format!("parsing {}", self.config_path.display()))
    }

    fn write_config_table(&self, table: &toml::Table) -> Result<()> {
        fs::write(&self.config_path, config::to_text(table)?)
            .with_context(|| format!("writing {}", self.config_path.display()))
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    /// Whether the process is alive (a paused process is alive). Reaps it if it exited.
    pub fn is_running(&self) -> bool {
        let mut child = self.child();
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                tracing::warn!(node = %self.config.name, %status, "node exited on its own");
                *child = None;
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    /// Spawns the process without waiting for readiness (start peers together, then wait).
    pub fn spawn(&self) -> Result<()> {
        let mut child = self.child();
        if let Some(running) = child.as_mut() {
            if running.try_wait().ok().flatten().is_none() {
                bail!("{} is already running", self.config.name);
            }
        }
        let open = |path: PathBuf| -> Result<File> {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        };
        let stdout = open(self.stdout_path())?;
        let mut stderr = open(self.stderr_path())?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        writeln!(
            stderr,
            "==== meridian-tests: starting {} (unix time {:.3}) ====",
            self.config.name,
            stamp.as_secs_f64()
        )
        .context("writing to the node's stderr log")?;
        let spawned = Command::new(&self.bin)
            .args(&self.args)
            .current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {} {:?}", self.bin.display(), self.args))?;
        tracing::debug!(node = %self.config.name, pid = spawned.id(), "node spawned");
        *child = Some(spawned);
        Ok(())
    }

    /// Waits until `GET /readyz` answers 2xx, failing early (with the log tails) if
    /// the process exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: String;
        // A fresh client: it re-reads the CA file, which a certificate rotation may have
        // replaced since this node's client was made.
        let client = Client::connect(&self.url(), &self.credentials)?;
        loop {
            if !self.is_running() {
                bail!(
                    "{} is not running (it exited or was never started)\n{}",
                    self.config.name,
                    self.log_tails(TAIL_LINES)
                );
            }
            match tokio::time::timeout(Duration::from_secs(1), client.readyz()).await {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => last = "GET /readyz answered non-2xx".into(),
                Ok(Err(error)) => last = format!("{error:#}"),
                Err(_) => last = "GET /readyz took over 1 s".into(),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} was not ready within {timeout:?} (last: {last})\n{}",
                    self.config.name,
                    self.log_tails(TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Starts a stopped node with its config and data, and waits until it is ready.
    pub async fn start(&self) -> Result<()> {
        self.spawn()?;
        self.wait_ready(self.ready_timeout).await
    }

    /// Stops the node gracefully if it runs, then starts it and waits until ready.
    pub async fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop().await?;
        }
        self.start().await
    }

    /// SIGHUP: the node reloads its tokens and certificates.
    pub fn reload(&self) -> Result<()> {
        self.signal(Signal::SIGHUP)
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let child = self.child();
        let child = child
            .as_ref()
            .with_context(|| format!("{} is not running", self.config.name))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {}", self.config.name))
    }

    /// SIGKILL, then reaps the process. Does nothing when the node is not running.
    pub fn kill(&self) -> Result<()> {
        let Some(mut child) = self.child().take() else {
            return Ok(());
        };
        // SIGKILL also ends a stopped (paused) process.
        if let Err(error) = child.kill() {
            // Already exited: reaping below is all that is left.
            tracing::debug!(%error, node = %self.config.name, "kill");
        }
        child
            .wait()
            .with_context(|| format!("reaping {}", self.config.name))?;
        Ok(())
    }

    /// SIGTERM (and SIGCONT, in case it is paused), then waits for the exit. After
    /// the spec's stop timeout the process is killed and an error returned.
    pub async fn stop(&self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        // A stopped process handles SIGTERM only once it runs again.
        self.signal(Signal::SIGCONT)?;
        let deadline = tokio::time::Instant::now() + self.stop_timeout;
        loop {
            {
                let mut child = self.child();
                let Some(running) = child.as_mut() else {
                    bail!("{} vanished while stopping", self.config.name);
                };
                if let Some(status) = running
                    .try_wait()
                    .with_context(|| format!("waiting for {}", self.config.name))?
                {
                    *child = None;
                    return Ok(status);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill()?;
                bail!(
                    "{} did not exit within {:?} of SIGTERM; killed it\n{}",
                    self.config.name,
                    self.stop_timeout,
                    self.log_tails(TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGSTOP: the process freezes (its sockets stay open, peers see silence).
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT: a paused process runs again.
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Deletes the node's data directory (and recreates it empty). The node must not
    /// be running.
    pub fn wipe_data(&self) -> Result<()> {
        ensure!(
            !self.is_running(),
            "{} is running: stop or kill it before wiping its data",
            self.config.name
        );
        if self.data_dir.exists() {
            fs::remove_dir_all(&self.data_dir)
                .with_context(|| format!("removing {}", self.data_dir.display()))?;
        }
        fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))
    }

    /// The last `lines` lines of the node's stderr and stdout logs, labelled.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (label, path) in [
            ("stderr", self.stderr_path()),
            ("stdout", self.stdout_path()),
        ] {
            let tail = tail_lines(&path, lines);
            if tail.trim().is_empty() {
                continue;
            }
            let _ = write!(
                out,
                "---- {} {label} ({}) ----\n{tail}\n",
                self.config.name,
                path.display()
            );
        }
        if out.is_empty() {
            out = format!("---- {}: no log output ----\n", self.config.name);
        }
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(error) = self.kill() {
            eprintln!("meridian-tests: {error:#}");
        }
    }
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
fn tail_lines(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

fn default_log_filter() -> String {
    std::env::var(LOG_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "info".into())
}

/// Fault control of one directed link `from → to`: the forward direction of the
/// relay in front of `to` in `from`'s config, and the reverse direction of the relay
/// in front of `from` in `to`'s config (both nodes dial each other, so datagrams from
/// `from` to `to` travel through both).
#[derive(Clone, Debug)]
pub struct LinkControl {
    from: usize,
    to: usize,
    /// relay(from → to), Forward.
    dialed: RelayControl,
    /// relay(to → from), Reverse.
    answered: RelayControl,
}

impl LinkControl {
    /// Node index the datagrams come from.
    pub fn from(&self) -> usize {
        self.from
    }

    /// Node index the datagrams go to.
    pub fn to(&self) -> usize {
        self.to
    }

    /// Replaces the faults of this direction.
    pub fn set(&self, fault: &Fault) {
        self.dialed.set_fault(Direction::Forward, fault.clone());
        self.answered.set_fault(Direction::Reverse, fault.clone());
    }

    /// Changes the faults of this direction in place.
    pub fn update(&self, change: impl Fn(&mut Fault)) {
        self.dialed.update(Direction::Forward, &change);
        self.answered.update(Direction::Reverse, &change);
    }

    /// The current faults of this direction.
    pub fn fault(&self) -> Fault {
        self.dialed.fault(Direction::Forward)
    }

    /// Drops everything on this direction (other faults are kept for after the heal).
    pub fn partition(&self) {
        self.update(|f| f.partitioned = true);
    }

    /// Undoes [`LinkControl::partition`] (other faults are kept).
    pub fn heal(&self) {
        self.update(|f| f.partitioned = false);
    }

    /// Counters of this direction, summed over both relays.
    pub fn stats(&self) -> DirectionStats {
        self.dialed.stats(Direction::Forward) + self.answered.stats(Direction::Reverse)
    }
}

/// A running cluster. Dropping it kills every node and stops every relay.
pub struct Cluster {
    nodes: Vec<Node>,
    /// `(a, b)` → the relay `a` dials to reach `b`.
    relays: BTreeMap<(usize, usize), Relay>,
    base_port: u16,
    dir: Option<TempDir>,
    path: PathBuf,
    /// What the cluster was started with: nodes added later run with the same settings.
    spec: ClusterSpec,
    bin: PathBuf,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.path)
            .field("base_port", &self.base_port)
            .field("nodes", &self.nodes)
            .field("relays", &self.relays.len())
            .field("spec", &self.spec)
            .field("bin", &self.bin)
            .finish()
    }
}

impl Cluster {
    /// Initialises and starts a cluster; returns once every node is ready.
    pub async fn start(spec: ClusterSpec) -> Result<Self> {
        let bin = match &spec.bin {
            Some(bin) => bin.clone(),
            None => meridian_bin()?,
        };
        let n = spec.node_count();
        ensure!(
            (1..=MAX_NODES).contains(&n),
            "a cluster needs between 1 and {MAX_NODES} nodes, not {n}"
        );
        ensure!(
            spec.regions
                .iter()
                .all(|r| !r.is_empty() && !r.contains(',')),
            "bad region names {:?}",
            spec.regions
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cluster = Self::init(&spec, &bin).await?;
            match cluster.start_all(&spec).await {
                Ok(()) => return Ok(cluster),
                Err(error) if attempt < START_ATTEMPTS && cluster.port_collision() => {
                    tracing::warn!(
                        base_port = cluster.base_port,
                        "a port was taken; retrying with another base port: {error:#}"
                    );
                }
                Err(error) => {
                    return Err(error.context(format!(
                        "starting a cluster in {} (base port {})",
                        cluster.path.display(),
                        cluster.base_port
                    )));
                }
            }
        }
    }

    /// Runs `meridian cluster init`, loads the nodes, starts relays and rewrites configs.
    async fn init(spec: &ClusterSpec, bin: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("meridian-test-")
            .tempdir()
            .context("creating the cluster directory")?;
        let path = dir.path().to_path_buf();
        let base_port = pick_base_port(spec.node_count())?;
        let output = tokio::process::Command::new(bin)
            .args(["cluster", "init", "--regions"])
            .arg(spec.regions.join(","))
            .arg("--nodes-per-region")
            .arg(spec.nodes_per_region.to_string())
            .arg("--dir")
            .arg(&path)
            .arg("--base-port")
            .arg(base_port.to_string())
            .env(LOG_ENV, default_log_filter())
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} cluster init", bin.display()))?;
        ensure!(
            output.status.success(),
            "`{} cluster init` failed ({}):\nstdout: {}\nstderr: {}",
            bin.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        let mut nodes = Vec::with_capacity(spec.node_count());
        for region in &spec.regions {
            for k in 1..=spec.nodes_per_region {
                let name = format!("{region}-{k}");
                let node_dir = path.join(&name);
                ensure!(
                    node_dir.is_dir(),
                    "cluster init wrote no directory {} (it wrote: {})",
                    node_dir.display(),
                    list_dir(&path)
                );
                let node = Node::new(nodes.len(), node_dir, spec, bin.to_path_buf())?;
                ensure!(
                    node.name() == name && node.region() == region,
                    "{} names node {:?} in region {:?}",
                    node.config_path.display(),
                    node.name(),
                    node.region()
                );
                nodes.push(node);
            }
        }

        let mut cluster = Self {
            nodes,
            relays: BTreeMap::new(),
            base_port,
            dir: Some(dir),
            path,
            spec: spec.clone(),
            bin: bin.to_path_buf(),
        };
        cluster.customize_configs(spec)?;
        // Re-read: the snippet or the hook may have changed addresses or the data dir.
        for node in &mut cluster.nodes {
            *node = Node::new(node.index, node.dir.clone(), spec, bin.to_path_buf())?;
        }
        if spec.relays {
            cluster.start_relays().await?;
            cluster.route_peers_through_relays()?;
        }
        Ok(cluster)
    }

    async fn start_relays(&mut self) -> Result<()> {
        let listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a == b {
                    continue;
                }
                let upstream = self.nodes[b].peer_addr();
                let relay = Relay::start(listen, upstream).await.with_context(|| {
                    format!(
                        "starting the relay {} → {}",
                        self.nodes[a].name(),
                        self.nodes[b].name()
                    )
                })?;
                self.relays.insert((a, b), relay);
            }
        }
        Ok(())
    }

    /// Applies the extra config and the hook to every node's config file.
    fn customize_configs(&self, spec: &ClusterSpec) -> Result<()> {
        if spec.extra_config.is_none() && spec.configure.is_none() {
            return Ok(());
        }
        let extra = spec
            .extra_config
            .as_deref()
            .map(config::parse_table)
            .transpose()
            .context("parsing ClusterSpec::extra_config")?;
        for node in &self.nodes {
            let mut table = node.read_config_table()?;
            if let Some(extra) = &extra {
                config::merge_tables(&mut table, extra.clone());
            }
            if let Some(hook) = &spec.configure {
                hook(&node.config, &mut table)
                    .with_context(|| format!("configure hook for {}", node.name()))?;
            }
            node.write_config_table(&table)?;
        }
        Ok(())
    }

    /// Points every node's `[[peers]]` addresses at the relays in front of them.
    fn route_peers_through_relays(&self) -> Result<()> {
        for node in &self.nodes {
            let addresses: BTreeMap<u64, SocketAddr> = self
                .relays
                .iter()
                .filter(|((a, _), _)| *a == node.index)
                .map(|((_, b), relay)| (self.nodes[*b].id(), relay.local_addr()))
                .collect();
            let mut table = node.read_config_table()?;
            config::set_peer_addresses(&mut table, &addresses)
                .with_context(|| format!("pointing {}'s peers at relays", node.name()))?;
            node.write_config_table(&table)?;
        }
        Ok(())
    }

    async fn start_all(&mut self, spec: &ClusterSpec) -> Result<()> {
        for node in &self.nodes {
            node.spawn()?;
        }
        // All nodes start in parallel; readiness may need peers, so wait afterwards.
        let waits = self
            .nodes
            .iter()
            .map(|node| node.wait_ready(spec.ready_timeout));
        let results = futures_join_all(waits).await;
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(Result::err)
            .map(|e| format!("{e:#}"))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(errors.join("\n")))
        }
    }

    /// Whether a node's log says an address was in use.
    fn port_collision(&self) -> bool {
        self.nodes.iter().any(|node| {
            let tail = tail_lines(&node.stderr_path(), 200).to_lowercase();
            tail.contains("address already in use") || tail.contains("addrinuse")
        })
    }

    /// Runs `meridian` with `args` in the cluster directory; returns its stdout, or fails with
    /// its output when it exits non-zero.
    pub async fn run_cli(&self, args: &[&str]) -> Result<String> {
        let mut command = tokio::process::Command::new(&self.bin);
        command
            .args(args)
            .current_dir(&self.path)
            .env(LOG_ENV, default_log_filter())
            // Their session file stays in the cluster directory, not the user's home.
            .env("XDG_STATE_HOME", &self.path)
            .stdin(Stdio::null());
        // Client commands talk to the nodes as the tests' clients do: the cluster's CA and
        // admin token.
        let ca = self.path.join("ca.pem");
        if ca.is_file() {
            command.env("MERIDIAN_CA", ca);
        }
        let token = self.path.join("tokens").join("admin.token");
        if token.is_file() {
            command.env("MERIDIAN_TOKEN_FILE", token);
        }
        let output = command
            .output()
            .await
            .with_context(|| format!("running meridian {}", args.join(" ")))?;
        ensure!(
            output.status.success(),
            "`meridian {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Adds a node in `region` with `meridian cluster add-node` (which also adds it to every
    /// member's config) on free ports, without starting it. Running members keep their old
    /// view until restarted; [`Node::config`] of every member is re-read. Not with relays.
    /// Returns the new node's index.
    pub async fn add_node(&mut self, region: &str) -> Result<usize> {
        ensure!(
            !self.has_relays(),
            "add_node does not put relays in front of the new node"
        );
        let (http, peer) = pick_node_ports()?;
        let dir = self.path.display().to_string();
        let http = format!("127.0.0.1:{http}");
        let peer = format!("127.0.0.1:{peer}");
        let stdout = self
            .run_cli(&[
                "cluster",
                "add-node",
                "--dir",
                &dir,
                "--region",
                region,
                "--http-listen",
                &http,
                "--peer-listen",
                &peer,
            ])
            .await?;
        let config_path = PathBuf::from(stdout.trim());
        let node_dir = config_path
            .parent()
            .with_context(|| format!("add-node printed {stdout:?}"))?
            .to_path_buf();
        let index = self.nodes.len();
        let node = Node::new(index, node_dir, &self.spec, self.bin.clone())?;
        self.nodes.push(node);
        self.reload_configs()?;
        Ok(index)
    }

    /// Removes a (stopped) node with `meridian cluster remove-node`: the others' configs no
    /// longer name it. The node stays in [`Cluster::nodes`] so indices keep their meaning.
    pub async fn remove_node(&mut self, index: usize) -> Result<()> {
        let node = &self.nodes[index];
        ensure!(
            !node.is_running(),
            "stop {} before removing it",
            node.name()
        );
        let dir = self.path.display().to_string();
        let name = node.name().to_owned();
        self.run_cli(&["cluster", "remove-node", "--dir", &dir, "--name", &name])
            .await?;
        self.reload_configs()
    }

    /// Re-reads every member's config file into [`Node::config`] (a removed node keeps its
    /// last one).
    fn reload_configs(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if node.config_path.is_file() {
                let text = fs::read_to_string(&node.config_path)
                    .with_context(|| format!("reading {}", node.config_path.display()))?;
                node.config = NodeConfig::parse(&text)
                    .with_context(|| format!("parsing {}", node.config_path.display()))?;
            }
        }
        Ok(())
    }

    /// The cluster's directory (`ca.pem`, `session.secret`, one directory per node).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The base port `cluster init` was given.
    pub fn base_port(&self) -> u16 {
        self.base_port
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node by index; panics when out of range.
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    pub fn node_named(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .with_context(|| format!("no node named {name:?}"))
    }

    /// Indices of the nodes of `region`.
    pub fn region_indices(&self, region: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.region() == region)
            .map(Node::index)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A client per node, in node order.
    pub fn clients(&self) -> Vec<Client> {
        self.nodes.iter().map(Node::client).collect()
    }

    pub fn has_relays(&self) -> bool {
        !self.relays.is_empty()
    }

    /// The relay node `from` dials to reach node `to`.
    pub fn relay(&self, from: usize, to: usize) -> Result<&Relay> {
        self.relays.get(&(from, to)).with_context(|| {
            if self.relays.is_empty() {
                "the cluster was started without relays (ClusterSpec::relays(true))".to_owned()
            } else {
                format!("no relay for link {from} → {to}")
            }
        })
    }

    /// How late the relays forwarded datagrams past their due time (microseconds), over
    /// every relay and direction since the start or the last [`Self::reset_relay_lateness`]:
    /// the link delay a datagram saw is its configured delay plus this.
    pub fn relay_lateness(&self) -> Result<Histogram<u64>> {
        let mut merged = crate::relay::lateness_histogram();
        for relay in self.relays.values() {
            for direction in Direction::BOTH {
                merged.add(relay.control().lateness(direction))?;
            }
        }
        Ok(merged)
    }

    /// Forgets the relays' lateness so far, to measure a window.
    pub fn reset_relay_lateness(&self) {
        for relay in self.relays.values() {
            relay.control().reset_lateness();
        }
    }

    /// Fault control of the directed link `from → to` (node indices).
    pub fn link(&self, from: usize, to: usize) -> Result<LinkControl> {
        Ok(LinkControl {
            from,
            to,
            dialed: self.relay(from, to)?.control(),
            answered: self.relay(to, from)?.control(),
        })
    }

    /// Every directed link.
    pub fn links(&self) -> Result<Vec<LinkControl>> {
        let n = self.nodes.len();
        ensure!(
            n < 2 || self.has_relays(),
            "the cluster was started without relays (ClusterSpec::relays(true))"
        );
        let mut links = Vec::with_capacity(n * n.saturating_sub(1));
        for a in 0..n {
            for b in (0..n).filter(|&b| b != a) {
                links.push(self.link(a, b)?);
            }
        }
        Ok(links)
    }

    /// Cuts every link between a node of `group_a` and a node of `group_b`, both
    /// ways. Links inside each group, and other faults, are untouched.
    pub fn partition(&self, group_a: &[usize], group_b: &[usize]) -> Result<()> {
        for &a in group_a {
            for &b in group_b {
                ensure!(a != b, "node {a} is in both groups");
                self.link(a, b)?.partition();
                self.link(b, a)?.partition();
            }
        }
        Ok(())
    }

    /// Cuts node `index` off from every other node.
    pub fn isolate(&self, index: usize) -> Result<()> {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|&i| i != index).collect();
        self.partition(&[index], &others)
    }

    /// Undoes every partition; delays, loss and duplication stay as they are (use
    /// [`Cluster::clear_faults`] to reset everything).
    pub fn heal(&self) -> Result<()> {
        for link in self.links()? {
            link.heal();
        }
        Ok(())
    }

    /// Sets the same faults on every directed link.
    pub fn set_all_links(&self, fault: &Fault) -> Result<()> {
        for link in self.links()? {
            link.set(fault);
        }
        Ok(())
    }

    /// Clean links everywhere.
    pub fn clear_faults(&self) -> Result<()> {
        self.set_all_links(&Fault::none())
    }

    /// Counters of all relays, summed per direction of travel (forward + reverse).
    pub fn relay_stats(&self) -> DirectionStats {
        self.relays
            .values()
            .map(|r| r.stats(Direction::Forward) + r.stats(Direction::Reverse))
            .fold(DirectionStats::default(), |a, b| a + b)
    }

    /// Polls `read` on every running node until all return the same value; returns it.
    pub async fn wait_converged<T, F, Fut>(&self, timeout: Duration, read: F) -> Result<T>
    where
        T: PartialEq + fmt::Debug,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let clients: Vec<Client> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(Node::client)
            .collect();
        wait_all_equal(timeout, "all running nodes", &clients, read).await
    }

    /// Waits until every running node answers `/readyz`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            node.wait_ready(timeout).await?;
        }
        Ok(())
    }

    /// The log tails of every node.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes.iter().map(|n| n.log_tails(lines)).collect()
    }

    /// Stops every running node gracefully (SIGTERM), then drops the cluster.
    pub async fn shutdown(self) -> Result<()> {
        let mut errors = Vec::new();
        for node in &self.nodes {
            if node.is_running() {
                if let Err(error) = node.stop().await {
                    errors.push(format!("{error:#}"));
                }
            }
        }
        ensure!(errors.is_empty(), "shutdown: {}", errors.join("\n"));
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "meridian-tests: test failed with a cluster in {}; node logs:\n{}",
                self.path.display(),
                self.log_tails(TAIL_LINES)
            );
        }
        // Kill before the directory goes away.
        for node in &self.nodes {
            if let Err(error) = node.kill() {
                eprintln!("meridian-tests: {error:#}");
            }
        }
        self.relays.clear();
        if std::env::var_os(KEEP_ENV).is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("meridian-tests: kept {}", dir.keep().display());
            }
        }
    }
}

fn list_dir(path: &Path) -> String {
    match fs::read_dir(path) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names.join(", ")
        }
        Err(error) => format!("(cannot list: {error})"),
    }
}

/// Awaits all futures concurrently (no `futures` dependency needed).
async fn futures_join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_from_env_must_exist() {
        let exe = Path::new("/nonexistent/target/debug/deps/t-123");
        let err = locate_bin(Some("/nonexistent/meridian".into()), exe).unwrap_err();
        assert!(err.to_string().contains(BIN_ENV), "{err:#}");
    }

    #[test]
    fn bin_is_found_in_the_profile_dir() {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("target/debug");
        fs::create_dir_all(profile.join("deps")).unwrap();
        let exe = profile.join("deps/cluster_smoke-abc");
        let err = locate_bin(None, &exe).unwrap_err();
        assert!(
            err.to_string().contains("cargo build -p meridian-server"),
            "{err:#}"
        );
        fs::write(profile.join(BIN_NAME), "").unwrap();
        assert_eq!(locate_bin(None, &exe).unwrap(), profile.join(BIN_NAME));
        // An empty MERIDIAN_BIN is ignored.
        assert_eq!(
            locate_bin(Some(OsString::new()), &exe).unwrap(),
            profile.join(BIN_NAME)
        );
    }

    #[test]
    fn tails_keep_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text = (0..100).fold(String::new(), |mut s, i| {
            let _ = writeln!(s, "line {i}");
            s
        });
        fs::write(&path, text).unwrap();
        assert_eq!(tail_lines(&path, 2), "line 98\nline 99");
        assert!(tail_lines(&dir.path().join("missing"), 2).contains("cannot read"));
    }

    #[tokio::test]
    async fn join_all_keeps_order() {
        let futures = (0..5_u64).map(|i| async move {
            tokio::time::sleep(Duration::from_millis(50 - i * 10)).await;
            i
        });
        assert_eq!(futures_join_all(futures).await, vec![0, 1, 2, 3, 4]);
    }
}
