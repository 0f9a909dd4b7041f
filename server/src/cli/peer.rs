//! The peers `meridian bench --peer-url` loads beside the node, with the same workload from the
//! same load generator, so DESIGN §6's comparisons are measured side by side, not quoted:
//!
//! - **Redis** (`redis://host:port`), the durable-write peer when started with `--appendonly
//!   yes --appendfsync always`. A register is a string (`SET`, `GET`), a PN- or G-counter a
//!   string that `INCRBY` raises, a set a Redis set (`SADD`, `SMEMBERS`). Redis answers an add
//!   with a count where a node answers with the set (unless `--prefer-minimal`): compare `sadd`
//!   with that in mind.
//! - **etcd** (`etcd://host:port`, its v3 JSON gateway), a durable store behind consensus: a
//!   register is a key (`/v3/kv/put`, and a serializable `/v3/kv/range`, like a node's
//!   `LOCAL_ONE` read). etcd has no counters or sets.
//!
//! A read that finds nothing counts as an error, as a `404` does against a node, so a read
//! workload proves its preload.

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use redis::aio::MultiplexedConnection;
use redis::{Cmd, ErrorKind, Value};
use serde_json::json;

use super::bench::{DataType, Workload};

/// Which store a `--peer-url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Store {
    Redis,
    Etcd,
}

impl Store {
    /// The store a URL names, and the URL the bench connects to (`etcd://` is served over
    /// plain HTTP).
    pub(super) fn of(url: &str) -> Result<(Self, String)> {
        if url.starts_with("redis://") {
            Ok((Self::Redis, url.to_owned()))
        } else if let Some(rest) = url.strip_prefix("etcd://") {
            Ok((Self::Etcd, format!("http://{rest}")))
        } else {
            bail!("--peer-url speaks redis://host:port and etcd://host:port, not {url:?}")
        }
    }

    /// Refuses a workload the store has no counterpart for.
    pub(super) fn check(self, workload: Workload) -> Result<()> {
        if self == Self::Etcd && workload.data_type() != DataType::Register {
            bail!(
                "etcd has no counters or sets: with an etcd:// peer, --workload takes put, get or mixed"
            );
        }
        Ok(())
    }
}

/// What the report says of a peer: one line for the table, the same as JSON.
#[derive(Debug, Clone)]
pub(super) struct Described {
    pub(super) line: String,
    pub(super) json: serde_json::Value,
}

/// A Redis server to measure.
pub(super) struct RedisPeer {
    client: redis::Client,
    pub(super) url: String,
}

impl RedisPeer {
    pub(super) fn open(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("{url}: not a Redis URL"))?;
        Ok(Self {
            client,
            url: url.to_owned(),
        })
    }

    pub(super) async fn connect(&self) -> Result<MultiplexedConnection> {
        // The error already names its cause; chaining it as a source would print it twice.
        self.client
            .get_multiplexed_async_connection()
            .await
            .map_err(|error| anyhow!("cannot connect to {}: {error}", self.url))
    }

    /// How the server persists writes, as `CONFIG GET` reports it.
    pub(super) async fn describe(&self) -> Result<Described> {
        let mut connection = self.connect().await?;
        let mut settings = [("appendonly", None), ("appendfsync", None)];
        for (name, slot) in &mut settings {
            let answer: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(*name)
                .query_async(&mut connection)
                .await;
            // Managed services refuse CONFIG: the setting is then unknown.
            if let Ok(pair) = answer {
                *slot = pair.get(1).cloned();
            }
        }
        let [(_, appendonly), (_, appendfsync)] = settings;
        Ok(describe_redis(
            &self.url,
            appendonly.as_deref(),
            appendfsync.as_deref(),
        ))
    }
}

fn describe_redis(url: &str, appendonly: Option<&str>, appendfsync: Option<&str>) -> Described {
    let durable = appendonly == Some("yes") && appendfsync == Some("always");
    let line = format!(
        "peer {url}: Redis, appendonly {}, appendfsync {}{}",
        appendonly.unwrap_or("unknown"),
        appendfsync.unwrap_or("unknown"),
        if durable {
            " (each write fsync'd before its answer)"
        } else {
            " (writes are NOT durable when answered: start it with --appendonly yes --appendfsync always)"
        }
    );
    let json = json!({
        "url": url,
        "store": "redis",
        "appendonly": appendonly,
        "appendfsync": appendfsync,
    });
    Described { line, json }
}

/// The report's words for an etcd peer; `version` from its `/version`.
pub(super) fn describe_etcd(url: &str, version: Option<&str>) -> Described {
    let line = format!(
        "peer {url}: etcd {}, each put in its fsync'd raft log before its answer (unless started with --unsafe-no-fsync)",
        version.unwrap_or("(version unknown)")
    );
    let json = json!({ "url": url, "store": "etcd", "version": version });
    Described { line, json }
}

/// The Redis command of a request to key `key` (a read or a write); `n` is the request's
/// random draw, which a set add adds.
pub(super) fn redis_command(workload: Workload, n: u64, key: u64, read: bool, value: &str) -> Cmd {
    match (workload.data_type(), read) {
        (DataType::Set, true) => Cmd::smembers(set_key(key)),
        (DataType::Set, false) => Cmd::sadd(set_key(key), n),
        (DataType::Counter | DataType::GCounter, true) => Cmd::get(counter_key(key)),
        (DataType::Counter | DataType::GCounter, false) => Cmd::incr(counter_key(key), 1),
        (DataType::Register, true) => Cmd::get(register_key(key)),
        (DataType::Register, false) => Cmd::set(register_key(key), value),
    }
}

fn register_key(key: u64) -> String {
    format!("k{key}")
}

fn counter_key(key: u64) -> String {
    format!("c{key}")
}

fn set_key(key: u64) -> String {
    format!("s{key}")
}

/// How a request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    Done,
    /// An error answer, or a read that found nothing: what the server said.
    Refused(String),
}

/// Sends one command. An error reply, or an empty answer to a read, is [`Reply::Refused`].
/// Anything else (a lost connection, an answer that does not parse) is an error: the run
/// cannot go on without the connection.
pub(super) async fn redis_send(
    connection: &mut MultiplexedConnection,
    command: &Cmd,
    read: bool,
) -> Result<Reply> {
    let nothing = || Reply::Refused("nothing there".to_owned());
    match command.query_async::<Value>(connection).await {
        Ok(Value::ServerError(error)) => Ok(Reply::Refused(format!("{error:?}"))),
        Ok(Value::Nil) if read => Ok(nothing()),
        Ok(Value::Array(items) | Value::Set(items)) if read && items.is_empty() => Ok(nothing()),
        Ok(_) => Ok(Reply::Done),
        Err(error) if matches!(error.kind(), ErrorKind::Server(_)) => {
            Ok(Reply::Refused(error.to_string()))
        }
        Err(error) => Err(error).context("the Redis connection failed"),
    }
}

/// The path and JSON body of a request to etcd's gateway for register `key`. `value` is the
/// value already in base64, as the gateway takes bytes. Reads are serializable (the member's
/// own state, no consensus round), the counterpart of a node's default `LOCAL_ONE` read.
pub(super) fn etcd_request(key: u64, read: bool, value: &str) -> (&'static str, String) {
    let key = BASE64.encode(register_key(key));
    if read {
        (
            "/v3/kv/range",
            format!(r#"{{"key":"{key}","serializable":true}}"#),
        )
    } else {
        (
            "/v3/kv/put",
            format!(r#"{{"key":"{key}","value":"{value}"}}"#),
        )
    }
}

/// Whether etcd's answer to a range found a key: it leaves `kvs` out when none matched.
pub(super) fn etcd_found(body: &[u8]) -> bool {
    body.windows(5).any(|w| w == b"\"kvs\"")
}

/// A value of `size` bytes, as etcd's gateway takes it.
pub(super) fn etcd_value(size: usize) -> String {
    BASE64.encode("x".repeat(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_whether_redis_makes_writes_durable_before_answering() {
        let line = |appendonly: Option<&str>, appendfsync: Option<&str>| {
            describe_redis("redis://h:1", appendonly, appendfsync).line
        };
        let durable = line(Some("yes"), Some("always"));
        assert!(durable.contains("fsync'd before its answer"), "{durable}");
        for lax in [
            line(Some("yes"), Some("everysec")),
            line(Some("no"), Some("always")),
            line(None, None),
        ] {
            assert!(lax.contains("NOT durable"), "{lax}");
        }
        assert!(line(None, None).contains("appendonly unknown"));
    }

    #[test]
    fn each_workload_sends_its_types_redis_command_to_its_own_keys() {
        let shown = |workload, n, key, read| {
            let args: Vec<String> = redis_command(workload, n, key, read, "v")
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => "?".to_owned(),
                })
                .collect();
            args.join(" ")
        };
        assert_eq!(shown(Workload::Put, 7, 3, false), "SET k3 v");
        assert_eq!(shown(Workload::Get, 7, 3, true), "GET k3");
        assert_eq!(shown(Workload::Incr, 7, 3, false), "INCRBY c3 1");
        assert_eq!(shown(Workload::GcounterGet, 7, 3, true), "GET c3");
        assert_eq!(shown(Workload::Sadd, 7, 3, false), "SADD s3 7");
        assert_eq!(shown(Workload::Smembers, 7, 203, true), "SMEMBERS s203");
        // The preload of a set read fills every key's set, not only the first hundred.
        assert_eq!(shown(Workload::Smembers, 203, 203, false), "SADD s203 203");
    }

    #[test]
    fn etcd_takes_registers_and_refuses_counters_and_sets_in_one_line() {
        assert_eq!(
            Store::of("etcd://127.0.0.1:2379").unwrap(),
            (Store::Etcd, "http://127.0.0.1:2379".to_owned())
        );
        assert_eq!(Store::of("redis://h:1").unwrap().0, Store::Redis);
        assert!(Store::of("http://h:1").is_err());
        for workload in [Workload::Put, Workload::Get, Workload::Mixed] {
            Store::Etcd.check(workload).unwrap();
        }
        for workload in [Workload::Incr, Workload::Sadd, Workload::GcounterGet] {
            let refused = Store::Etcd.check(workload).unwrap_err().to_string();
            assert!(refused.contains("put, get or mixed"), "{refused}");
            Store::Redis.check(workload).unwrap();
        }
        let (path, body) = etcd_request(3, false, &etcd_value(2));
        assert_eq!(
            (path, body.as_str()),
            ("/v3/kv/put", r#"{"key":"azM=","value":"eHg="}"#)
        );
        assert_eq!(
            etcd_request(3, true, ""),
            (
                "/v3/kv/range",
                r#"{"key":"azM=","serializable":true}"#.to_owned()
            )
        );
        assert!(etcd_found(
            br#"{"header":{},"kvs":[{"key":"azM="}],"count":"1"}"#
        ));
        assert!(!etcd_found(br#"{"header":{"revision":"2"}}"#));
    }
}
