//! Node configuration: a TOML file, overridden by flags and environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meridian_crdt::NodeId;
use serde::{Deserialize, Serialize};

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// One node's configuration, as `meridian cluster init` writes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub http: HttpSection,
    #[serde(default)]
    pub peer: Option<PeerSection>,
    #[serde(default)]
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub session: Option<SessionSection>,
    /// Client authentication; required, so that serving without it is a written decision.
    #[serde(default)]
    pub auth: Option<AuthSection>,
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub replication: ReplicationSection,
    #[serde(default)]
    pub anti_entropy: AntiEntropySection,
    #[serde(default)]
    pub gc: GcSection,
    #[serde(default)]
    pub debug: DebugSection,
    /// The directory relative paths are resolved against: the config file's own.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub id: u64,
    pub name: String,
    pub region: String,
    #[serde(default = "default_cluster")]
    pub cluster: String,
    pub data_dir: PathBuf,
}

fn default_cluster() -> String {
    "meridian".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub listen: SocketAddr,
    /// Tokio worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Serve HTTPS with this certificate. Either this or `plaintext = true` must be given.
    #[serde(default)]
    pub tls: Option<HttpTlsSection>,
    /// Serve plain HTTP: only behind something else that terminates TLS, or on loopback.
    #[serde(default)]
    pub plaintext: bool,
}

/// The HTTP API's certificate (chain first) and key, PEM; reloaded on SIGHUP.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Bearer tokens and their roles. Tokens come from `tokens_file` (shared by every node, re-read
/// on SIGHUP) and/or `[[auth.tokens]]` here.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `false` serves every route to anyone who can reach the port.
    pub enabled: bool,
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
}

/// One accepted token: preferably its SHA-256 (hex), so the config holds no secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it; appears in logs instead of the token.
    pub name: String,
    pub role: crate::auth::Role,
    #[serde(default)]
    pub sha256: Option<String>,
    /// The token itself (discouraged: anyone reading the config can use it).
    #[serde(default)]
    pub token: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSection {
    pub secret_file: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub id: u64,
    pub name: String,
    pub region: String,
    /// `host:port` of the peer's QUIC endpoint; a host name is resolved when connecting, so
    /// the same file works under docker compose or Kubernetes DNS.
    pub address: String,
}

/// Input limits; each is enforced with a clear 4xx.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_body_bytes: usize,
    pub max_value_bytes: usize,
    pub max_set_elements: usize,
    /// Requests served at once; more are refused with 503 rather than queued without bound.
    pub max_concurrent_requests: usize,
    pub max_list_limit: usize,
    /// Bytes of answers over 1 MiB (a large set, read whole) that may be on their way to
    /// clients at once. A slow reader keeps its answer in memory until it has taken it, long
    /// after its request's concurrency slot is free: past this budget such reads are refused
    /// with 503 rather than let memory grow with every slow reader.
    pub answer_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_body_bytes: 1024 * 1024,
            max_value_bytes: 64 * 1024,
            max_set_elements: 100_000,
            max_concurrent_requests: 4096,
            max_list_limit: 1000,
            answer_buffer_bytes: 256 << 20,
        }
    }
}

/// Timeouts, in milliseconds in the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A request (body included) must complete within this.
    pub request_ms: u64,
    /// A client must send its complete request head within this (slowloris guard); it also
    /// closes keep-alive connections idle for that long.
    pub header_read_ms: u64,
    /// A connection whose client takes no response bytes for this long is closed.
    pub write_stall_ms: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request_ms: 10_000,
            header_read_ms: 10_000,
            write_stall_ms: 10_000,
            shutdown_ms: 10_000,
        }
    }
}

impl Timeouts {
    pub fn request(&self) -> Duration {
        Duration::from_millis(self.request_ms)
    }
    pub fn header_read(&self) -> Duration {
        Duration::from_millis(self.header_read_ms)
    }
    pub fn write_stall(&self) -> Duration {
        Duration::from_millis(self.write_stall_ms)
    }
    pub fn shutdown(&self) -> Duration {
        Duration::from_millis(self.shutdown_ms)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Where the journal (the log every write is made durable in) lives, if not in the data
    /// directory: a device of its own keeps its syncs from queueing behind the checkpoints'
    /// bulk writes. Relative paths are relative to the config file.
    pub journal_dir: Option<PathBuf>,
    /// Most operations folded into one durable commit.
    pub max_batch: usize,
    /// redb page cache, in MiB.
    pub cache_mib: usize,
    /// Maximum accepted clock skew of remote HLC stamps, in milliseconds.
    pub max_clock_skew_ms: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            journal_dir: None,
            max_batch: 4096,
            cache_mib: 256,
            max_clock_skew_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    pub batch_max_bytes: usize,
    pub batch_max_delay_ms: u64,
    pub heartbeat_ms: u64,
    pub peer_timeout_ms: u64,
    /// Ops kept in the WAL for peers that have not acknowledged them; beyond this a lagging
    /// peer is repaired by anti-entropy instead.
    pub wal_retention_ops: u64,
    /// Redial delay after a lost connection, doubling per failure up to the maximum.
    pub reconnect_base_ms: u64,
    pub reconnect_max_ms: u64,
    /// The round trip QUIC assumes until it has measured one; raise it for links much slower
    /// than 100 ms, where a lower value costs a spurious resend per dial.
    pub initial_rtt_ms: u64,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        Self {
            batch_max_bytes: 64 * 1024,
            batch_max_delay_ms: 2,
            heartbeat_ms: 250,
            peer_timeout_ms: 1_500,
            wal_retention_ops: 10_000_000,
            reconnect_base_ms: 100,
            reconnect_max_ms: 1_000,
            initial_rtt_ms: 100,
        }
    }
}

/// The anti-entropy worker: schedule and budget.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntiEntropySection {
    /// Run rounds on a schedule (a round can always be triggered with `meridian admin sync`).
    pub enabled: bool,
    /// Pause between two passes over every peer...
    pub interval_ms: u64,
    /// ...plus a random delay up to this.
    pub jitter_ms: u64,
    /// Keys exchanged (fetched plus pushed) per round with one peer; the rest waits.
    pub max_keys_per_round: usize,
    /// Keys per states request or push.
    pub batch_keys: usize,
    /// Pacing: keys per second, and bytes (sent plus received) per second; 0 is unlimited.
    pub keys_per_sec: u64,
    pub bytes_per_sec: u64,
}

impl Default for AntiEntropySection {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 30_000,
            jitter_ms: 5_000,
            max_keys_per_round: 100_000,
            batch_keys: 512,
            keys_per_sec: 100_000,
            bytes_per_sec: 64 * 1024 * 1024,
        }
    }
}

/// Garbage collection of tombstones at causal stability.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcSection {
    pub enabled: bool,
    /// Time between passes.
    pub interval_ms: u64,
    /// If set, a node silent for longer no longer holds garbage collection back, and must be
    /// re-seeded rather than let back (see README, "Garbage collection"). Unset by default:
    /// a silent node holds collection back until it returns or is removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub horizon_secs: Option<u64>,
}

impl Default for GcSection {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 60_000,
            horizon_secs: None,
        }
    }
}

/// Test-only switches; never enable them in production.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugSection {
    /// Enables `POST /v1/admin/debug/merge-unlogged/...`, which joins a fabricated state into a
    /// key without logging an op: a stand-in for on-disk corruption in anti-entropy tests.
    pub allow_state_overwrite: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.validate()?;
        Ok(config)
    }

    /// Resolves a path from the file against the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    pub fn node_id(&self) -> Result<NodeId, ConfigError> {
        NodeId::new(self.node.id)
            .ok_or_else(|| ConfigError::Invalid("node.id must be a positive integer".into()))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.resolve(&self.node.data_dir)
    }

    /// `storage.journal_dir` resolved; `None` when the journal stays in the data directory.
    pub fn journal_dir(&self) -> Option<PathBuf> {
        self.storage.journal_dir.as_deref().map(|p| self.resolve(p))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        self.node_id()?;
        if self.node.name.trim().is_empty() || self.node.region.trim().is_empty() {
            return invalid("node.name and node.region must not be empty");
        }
        let mut ids = std::collections::BTreeSet::from([self.node.id]);
        for peer in &self.peers {
            if peer.id == 0 || !ids.insert(peer.id) {
                return invalid(&format!("peer id {} is zero or not unique", peer.id));
            }
        }
        if !self.peers.is_empty() && (self.peer.is_none() || self.tls.is_none()) {
            return invalid("a node with peers needs [peer] listen and [tls] files");
        }
        match (&self.http.tls, self.http.plaintext) {
            (Some(_), true) => {
                return invalid("[http] has both tls and plaintext = true; choose one");
            }
            (None, false) => {
                return invalid(
                    "[http] needs [http.tls] cert and key, or plaintext = true to serve \
                     unencrypted HTTP",
                );
            }
            _ => {}
        }
        match &self.auth {
            None => {
                return invalid(
                    "no [auth] section: give tokens (tokens_file or [[auth.tokens]]) with \
                     enabled = true, or enabled = false to serve without authentication",
                );
            }
            Some(auth) => {
                if auth.enabled && auth.tokens_file.is_none() && auth.tokens.is_empty() {
                    return invalid("[auth] enabled = true but no tokens_file or [[auth.tokens]]");
                }
                for entry in &auth.tokens {
                    crate::auth::check_entry(entry).map_err(ConfigError::Invalid)?;
                }
            }
        }
        let limits = &self.limits;
        if limits.max_key_bytes == 0
            || limits.max_body_bytes == 0
            || limits.max_value_bytes == 0
            || limits.max_concurrent_requests == 0
            || limits.max_list_limit == 0
            || limits.answer_buffer_bytes == 0
        {
            return invalid("limits must be positive");
        }
        if self.storage.max_batch == 0 {
            return invalid("storage.max_batch must be positive");
        }
        let replication = &self.replication;
        if replication.reconnect_base_ms == 0
            || replication.reconnect_max_ms < replication.reconnect_base_ms
        {
            return invalid(
                "[replication] reconnect_max_ms must be at least reconnect_base_ms, which must \
                 be positive",
            );
        }
        if replication.initial_rtt_ms == 0 {
            return invalid("[replication] initial_rtt_ms must be positive");
        }
        Ok(())
    }

    /// Nodes in this node's region, itself included: the electorate of LOCAL_QUORUM.
    pub fn region_size(&self) -> usize {
        1 + self
            .peers
            .iter()
            .filter(|p| p.region == self.node.region)
            .count()
    }

    /// A single-node configuration for `meridian serve --data-dir` without a file.
    pub fn standalone(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            node: NodeSection {
                id: 1,
                name: "local-1".into(),
                region: "local".into(),
                cluster: default_cluster(),
                data_dir,
            },
            // A development convenience on one machine: `serve` warns that it is open.
            http: HttpSection {
                listen,
                workers: 0,
                tls: None,
                plaintext: true,
            },
            peer: None,
            tls: None,
            session: None,
            auth: Some(AuthSection {
                enabled: false,
                tokens_file: None,
                tokens: Vec::new(),
            }),
            peers: Vec::new(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            storage: StorageSection::default(),
            replication: ReplicationSection::default(),
            anti_entropy: AntiEntropySection::default(),
            gc: GcSection::default(),
            debug: DebugSection::default(),
            base_dir: PathBuf::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[node]
id = 1
name = "us-east-1"
region = "us-east"
data_dir = "data"
[http]
listen = "127.0.0.1:7000"
plaintext = true
[auth]
enabled = false
[peer]
listen = "127.0.0.1:7100"
[tls]
ca = "../ca.pem"
cert = "node.pem"
key = "node.key"
[[peers]]
id = 2
name = "eu-west-1"
region = "eu-west"
address = "127.0.0.1:7101"
[limits]
max_key_bytes = 512
"#;

    #[test]
    fn parses_the_documented_shape_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.limits.max_key_bytes, 512);
        assert_eq!(config.limits.max_body_bytes, 1024 * 1024);
        assert_eq!(config.data_dir(), dir.path().join("data"));
        assert_eq!(config.region_size(), 1);
    }

    #[test]
    fn unknown_fields_and_duplicate_ids_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, SAMPLE.replace("max_key_bytes", "max_keys")).unwrap();
        assert!(matches!(
            Config::load(&path),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, SAMPLE.replace("id = 2", "id = 1")).unwrap();
        assert!(matches!(Config::load(&path), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn reconnect_and_initial_rtt_are_configurable_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let with = |replication: &str| format!("{SAMPLE}[replication]\n{replication}\n");
        std::fs::write(&path, SAMPLE).unwrap();
        let defaults = Config::load(&path).unwrap().replication;
        assert_eq!(
            (
                defaults.reconnect_base_ms,
                defaults.reconnect_max_ms,
                defaults.initial_rtt_ms
            ),
            (100, 1_000, 100)
        );
        std::fs::write(
            &path,
            with("reconnect_base_ms = 250\nreconnect_max_ms = 8000\ninitial_rtt_ms = 400"),
        )
        .unwrap();
        let tuned = Config::load(&path).unwrap().replication;
        assert_eq!(
            (
                tuned.reconnect_base_ms,
                tuned.reconnect_max_ms,
                tuned.initial_rtt_ms
            ),
            (250, 8_000, 400)
        );
        for bad in [
            "reconnect_base_ms = 0",
            "reconnect_base_ms = 2000",
            "initial_rtt_ms = 0",
        ] {
            std::fs::write(&path, with(bad)).unwrap();
            assert!(
                matches!(Config::load(&path), Err(ConfigError::Invalid(_))),
                "{bad} was accepted"
            );
        }
    }
}
