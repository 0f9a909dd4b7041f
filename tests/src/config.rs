//! Reading and rewriting the node configs that `meridian cluster init` writes.
//!
//! The harness only needs a few fields (identity, listen addresses, peers) and must
//! keep every other section as it is, so configs are edited as generic TOML tables
//! with the `toml` crate rather than through a typed copy of the server's schema.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use toml::{Table, Value};

/// The fields of a node config the harness uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: u64,
    pub name: String,
    pub region: String,
    /// `node.data_dir` as written (relative to the config's directory when relative).
    pub data_dir: PathBuf,
    /// `http.listen`.
    pub http: SocketAddr,
    /// `peer.listen`.
    pub peer: SocketAddr,
    pub peers: Vec<PeerConfig>,
    /// The HTTP API serves TLS (`[http.tls]` is present).
    pub https: bool,
}

/// One `[[peers]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct PeerConfig {
    pub id: u64,
    pub name: String,
    pub region: String,
    pub address: SocketAddr,
}

#[derive(Deserialize)]
struct RawConfig {
    node: RawNode,
    http: RawHttp,
    peer: RawListen,
    #[serde(default)]
    peers: Vec<PeerConfig>,
}

#[derive(Deserialize)]
struct RawNode {
    id: u64,
    name: String,
    region: String,
    data_dir: PathBuf,
}

#[derive(Deserialize)]
struct RawListen {
    listen: SocketAddr,
}

#[derive(Deserialize)]
struct RawHttp {
    listen: SocketAddr,
    #[serde(default)]
    tls: Option<Value>,
}

impl NodeConfig {
    /// Parses the fields the harness uses out of a config file's text; other
    /// sections and fields are ignored.
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawConfig = toml::from_str(text).context("parsing a node config")?;
        Ok(Self {
            id: raw.node.id,
            name: raw.node.name,
            region: raw.node.region,
            data_dir: raw.node.data_dir,
            http: raw.http.listen,
            peer: raw.peer.listen,
            peers: raw.peers,
            https: raw.http.tls.is_some(),
        })
    }
}

/// Parses config text into a table.
pub fn parse_table(text: &str) -> Result<Table> {
    text.parse::<Table>().context("parsing TOML")
}

/// Serializes a table back to config text.
pub fn to_text(table: &Table) -> Result<String> {
    toml::to_string(table).context("serializing TOML")
}

/// Points the `[[peers]]` entries whose `id` is a key of `addresses` at the given
/// address (e.g. a relay in front of that peer). Every id must be present.
pub fn set_peer_addresses(table: &mut Table, addresses: &BTreeMap<u64, SocketAddr>) -> Result<()> {
    let peers = match table.get_mut("peers") {
        Some(Value::Array(peers)) => peers,
        Some(other) => bail!("`peers` is a {}, not an array of tables", other.type_str()),
        None if addresses.is_empty() => return Ok(()),
        None => bail!("the config has no [[peers]]"),
    };
    let mut done = BTreeSet::new();
    for peer in peers.iter_mut() {
        let Value::Table(peer) = peer else {
            bail!("a `peers` entry is not a table");
        };
        let id = peer
            .get("id")
            .and_then(Value::as_integer)
            .context("a [[peers]] entry has no integer `id`")?;
        let id = u64::try_from(id).with_context(|| format!("peer id {id} is negative"))?;
        if let Some(address) = addresses.get(&id) {
            peer.insert("address".into(), Value::String(address.to_string()));
            done.insert(id);
        }
    }
    if let Some(missing) = addresses.keys().find(|id| !done.contains(*id)) {
        bail!("the config has no [[peers]] entry with id {missing}");
    }
    Ok(())
}

/// Merges `overlay` into `base`: tables merge key by key, recursively; any other value
/// (arrays included) in `overlay` replaces the one in `base`.
pub fn merge_tables(base: &mut Table, overlay: Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(existing)), Value::Table(value)) => merge_tables(existing, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Text-to-text form of [`set_peer_addresses`].
pub fn rewrite_peer_addresses(
    config: &str,
    addresses: &BTreeMap<u64, SocketAddr>,
) -> Result<String> {
    let mut table = parse_table(config)?;
    set_peer_addresses(&mut table, addresses)?;
    to_text(&table)
}

/// Text-to-text form of [`merge_tables`]: merges a TOML snippet into a config.
pub fn merge_config(config: &str, extra: &str) -> Result<String> {
    let mut table = parse_table(config)?;
    let extra = parse_table(extra).context("parsing the extra config snippet")?;
    merge_tables(&mut table, extra);
    to_text(&table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[node]
id = 1
name = "us-east-1"
region = "us-east"
cluster = "meridian"
data_dir = "data"

[http]
listen = "127.0.0.1:7000"

[peer]
listen = "127.0.0.1:7100"

[tls]
ca = "../ca.pem"
cert = "node.pem"
key = "node.key"

[session]
secret_file = "../session.secret"

[limits]
max_body_bytes = 1048576

[[peers]]
id = 2
name = "eu-west-1"
region = "eu-west"
address = "127.0.0.1:7101"

[[peers]]
id = 3
name = "ap-south-1"
region = "ap-south"
address = "127.0.0.1:7102"
"#;

    #[test]
    fn parses_the_fields_the_harness_needs() {
        let config = NodeConfig::parse(SAMPLE).unwrap();
        assert_eq!(config.id, 1);
        assert_eq!(config.name, "us-east-1");
        assert_eq!(config.region, "us-east");
        assert_eq!(config.data_dir, PathBuf::from("data"));
        assert_eq!(config.http, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.peer, "127.0.0.1:7100".parse().unwrap());
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.peers[1].name, "ap-south-1");
        assert_eq!(config.peers[1].address, "127.0.0.1:7102".parse().unwrap());
    }

    #[test]
    fn rewrites_only_the_named_peer_addresses() {
        let relay: SocketAddr = "127.0.0.1:45678".parse().unwrap();
        let out = rewrite_peer_addresses(SAMPLE, &BTreeMap::from([(3, relay)])).unwrap();
        let config = NodeConfig::parse(&out).unwrap();
        assert_eq!(config.peers[0].address, "127.0.0.1:7101".parse().unwrap());
        assert_eq!(config.peers[1].address, relay);
        // Everything else survives the round trip.
        let before = parse_table(SAMPLE).unwrap();
        let mut after = parse_table(&out).unwrap();
        set_peer_addresses(
            &mut after,
            &BTreeMap::from([(3, "127.0.0.1:7102".parse().unwrap())]),
        )
        .unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn rewriting_an_unknown_peer_fails() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = rewrite_peer_addresses(SAMPLE, &BTreeMap::from([(9, addr)])).unwrap_err();
        assert!(err.to_string().contains("id 9"), "{err:#}");
        assert!(rewrite_peer_addresses("[node]\nid = 1\n", &BTreeMap::from([(2, addr)])).is_err());
        assert!(rewrite_peer_addresses("[node]\nid = 1\n", &BTreeMap::new()).is_ok());
    }

    #[test]
    fn merges_snippets_recursively() {
        let out = merge_config(
            SAMPLE,
            "[limits]\nmax_key_bytes = 64\n[replication]\nbatch_ms = 2\n[http]\nworkers = 1\n",
        )
        .unwrap();
        let table = parse_table(&out).unwrap();
        let limits = table["limits"].as_table().unwrap();
        assert_eq!(limits["max_key_bytes"].as_integer(), Some(64));
        assert_eq!(limits["max_body_bytes"].as_integer(), Some(1_048_576));
        assert_eq!(table["replication"]["batch_ms"].as_integer(), Some(2));
        assert_eq!(table["http"]["listen"].as_str(), Some("127.0.0.1:7000"));
        assert_eq!(table["http"]["workers"].as_integer(), Some(1));
        // Still a valid node config with its peers.
        assert_eq!(NodeConfig::parse(&out).unwrap().peers.len(), 2);
    }

    #[test]
    fn bad_snippets_are_reported() {
        let err = merge_config(SAMPLE, "[limits\n").unwrap_err();
        assert!(format!("{err:#}").contains("extra config"), "{err:#}");
    }
}
