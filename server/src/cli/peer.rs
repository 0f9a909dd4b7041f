//! Redis as a peer for `meridian bench --peer-url redis://…`: the same workload from the same
//! load generator, so the durable-write figure DESIGN §6 names (Redis with `appendfsync
//! always`, same concurrency, no pipelining) is measured side by side, not quoted.
//!
//! Each workload maps onto the nearest Redis command: a register is a string (`SET`, `GET`),
//! a PN- or G-counter a string that `INCR` raises, a set a Redis set (`SADD`, `SMEMBERS`). A
//! read that finds nothing counts as an error, as a `404` does against a node, so a read
//! workload proves its preload. Redis answers an add with a count where a node answers with
//! the set (unless `--prefer-minimal`): compare `sadd` with that in mind.

use anyhow::{Context, Result, anyhow, bail};
use redis::aio::MultiplexedConnection;
use redis::{Cmd, ErrorKind, Value};

use super::bench::Workload;

/// A Redis server to measure: where it is, and whether it makes writes durable.
pub(super) struct RedisPeer {
    client: redis::Client,
    pub(super) url: String,
}

/// How the peer persists writes, as `CONFIG GET` reports it (`None` where the server refuses
/// `CONFIG`, as managed services do).
#[derive(Debug, Clone, Default)]
pub(super) struct Persistence {
    pub(super) appendonly: Option<String>,
    pub(super) appendfsync: Option<String>,
}

impl Persistence {
    /// One line for the report: how the peer persists, and whether an answered write is
    /// durable there.
    pub(super) fn describe(&self) -> String {
        let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".to_owned());
        let durable = self.appendonly.as_deref() == Some("yes")
            && self.appendfsync.as_deref() == Some("always");
        format!(
            "appendonly {}, appendfsync {}{}",
            shown(&self.appendonly),
            shown(&self.appendfsync),
            if durable {
                " (each write fsync'd before its answer)"
            } else {
                " (writes are NOT durable when answered: start it with --appendonly yes --appendfsync always)"
            }
        )
    }
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

    pub(super) async fn persistence(&self) -> Result<Persistence> {
        let mut connection = self.connect().await?;
        let mut persistence = Persistence::default();
        for (name, slot) in [
            ("appendonly", &mut persistence.appendonly),
            ("appendfsync", &mut persistence.appendfsync),
        ] {
            let answer: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut connection)
                .await;
            if let Ok(pair) = answer {
                *slot = pair.get(1).cloned();
            }
        }
        Ok(persistence)
    }

    /// Writes every key once so reads find values, over as many connections as the run uses.
    pub(super) async fn preload(
        &self,
        workload: Workload,
        keys: u64,
        lanes: u64,
        value: &str,
    ) -> Result<()> {
        let lanes = lanes.clamp(1, keys.max(1));
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..lanes {
            let mut connection = self.connect().await?;
            let value = value.to_owned();
            tasks.spawn(async move {
                for key in (lane..keys).step_by(lanes as usize) {
                    let command = write(workload, key, key, &value);
                    if !send(&mut connection, &command, false).await? {
                        bail!("preloading key {key} failed");
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
}

/// The command request number `n` (a random draw) of `workload` sends to key `key`.
pub(super) fn command(workload: Workload, n: u64, key: u64, value: &str) -> (Cmd, bool) {
    if workload.reads_at(n) {
        let read = match workload {
            Workload::Smembers | Workload::Sadd => Cmd::smembers(set_key(key)),
            Workload::CounterGet | Workload::GcounterGet | Workload::Incr | Workload::Gincr => {
                Cmd::get(counter_key(key))
            }
            Workload::Put | Workload::Get | Workload::Mixed => Cmd::get(register_key(key)),
        };
        (read, true)
    } else {
        (write(workload, n, key, value), false)
    }
}

fn write(workload: Workload, n: u64, key: u64, value: &str) -> Cmd {
    match workload {
        // Set adds go to 100 sets, which grow, as against a node.
        Workload::Sadd | Workload::Smembers => Cmd::sadd(set_key(key % 100), n),
        Workload::Incr | Workload::Gincr | Workload::CounterGet | Workload::GcounterGet => {
            Cmd::incr(counter_key(key), 1)
        }
        Workload::Put | Workload::Get | Workload::Mixed => Cmd::set(register_key(key), value),
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

/// Sends one command: `Ok(true)` for an answer, `Ok(false)` for an error reply or, for a
/// read, an empty one. Anything else (a lost connection, an answer that does not parse) is an
/// error: the run cannot go on without the connection.
pub(super) async fn send(
    connection: &mut MultiplexedConnection,
    command: &Cmd,
    read: bool,
) -> Result<bool> {
    match command.query_async::<Value>(connection).await {
        Ok(Value::ServerError(_)) => Ok(false),
        Ok(Value::Nil) => Ok(!read),
        Ok(Value::Array(items) | Value::Set(items)) if read && items.is_empty() => Ok(false),
        Ok(_) => Ok(true),
        Err(error) if matches!(error.kind(), ErrorKind::Server(_)) => Ok(false),
        Err(error) => Err(error).context("the Redis connection failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_whether_the_peer_makes_writes_durable_before_answering() {
        let persistence = |appendonly: Option<&str>, appendfsync: Option<&str>| Persistence {
            appendonly: appendonly.map(str::to_owned),
            appendfsync: appendfsync.map(str::to_owned),
        };
        let durable = persistence(Some("yes"), Some("always")).describe();
        assert!(durable.contains("fsync'd before its answer"), "{durable}");
        for lax in [
            persistence(Some("yes"), Some("everysec")),
            persistence(Some("no"), Some("always")),
            persistence(None, None),
        ] {
            let line = lax.describe();
            assert!(line.contains("NOT durable"), "{line}");
        }
        assert!(
            persistence(None, None)
                .describe()
                .starts_with("appendonly unknown")
        );
    }

    #[test]
    fn each_workload_sends_its_types_command_to_its_own_keys() {
        let shown = |workload, n, key| {
            let (command, read) = command(workload, n, key, "v");
            let args: Vec<String> = command
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => "?".to_owned(),
                })
                .collect();
            (args.join(" "), read)
        };
        assert_eq!(shown(Workload::Put, 7, 3), ("SET k3 v".to_owned(), false));
        assert_eq!(shown(Workload::Get, 7, 3), ("GET k3".to_owned(), true));
        assert_eq!(
            shown(Workload::Incr, 7, 3),
            ("INCRBY c3 1".to_owned(), false)
        );
        assert_eq!(
            shown(Workload::GcounterGet, 7, 3),
            ("GET c3".to_owned(), true)
        );
        assert_eq!(
            shown(Workload::Sadd, 7, 203),
            ("SADD s3 7".to_owned(), false)
        );
        assert_eq!(
            shown(Workload::Smembers, 7, 3),
            ("SMEMBERS s3".to_owned(), true)
        );
        // Mixed reads on even draws and writes on odd ones, as against a node.
        assert_eq!(shown(Workload::Mixed, 2, 3), ("GET k3".to_owned(), true));
        assert_eq!(shown(Workload::Mixed, 3, 3), ("SET k3 v".to_owned(), false));
    }
}
