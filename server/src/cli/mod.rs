//! Command-line interface.

mod admin;
mod bench;
mod client;
mod init;
mod membership;
mod serve;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "meridian",
    version,
    about = "Multi-region active-active CRDT datastore"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node.
    Serve(serve::ServeArgs),
    /// Cluster set-up.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a 3-region cluster on loopback in this terminal (development).
    Dev(init::DevArgs),
    /// Read a key (a register unless --type says otherwise).
    Get {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long = "type", short = 't', value_enum, default_value_t = KeyType::Registers)]
        kind: KeyType,
        key: String,
    },
    /// Write a register. VALUE is JSON; text that is not JSON is stored as a JSON string.
    Put {
        #[command(flatten)]
        client: ClientArgs,
        key: String,
        value: String,
    },
    /// Delete a key: a register tombstone, a counter reset, or a set clear.
    Del {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long = "type", short = 't', value_enum, default_value_t = KeyType::Registers)]
        kind: KeyType,
        key: String,
    },
    /// Add to a counter (negative subtracts; with --gcounter, a grow-only counter).
    Incr {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        gcounter: bool,
        key: String,
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Add elements to a set (each JSON, or taken as a string).
    Sadd {
        #[command(flatten)]
        client: ClientArgs,
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Remove elements from a set.
    Srem {
        #[command(flatten)]
        client: ClientArgs,
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Print a set's elements.
    Smembers {
        #[command(flatten)]
        client: ClientArgs,
        key: String,
    },
    /// List keys of one type.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(value_enum)]
        kind: KeyType,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Follow cursors to the last page.
        #[arg(long)]
        all: bool,
    },
    /// Operator commands: anti-entropy on demand, the Merkle tree, backup and restore.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Load generator: throughput and latency percentiles against a node.
    Bench(bench::BenchArgs),
    /// A bare HTTP handler doing no work, as the ceiling `bench` compares against.
    #[command(hide = true)]
    BenchBaseline(bench::BaselineArgs),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Write a config per node, a cluster CA, node certificates and the session secret.
    Init(init::InitArgs),
    /// Add a node (in a new or existing region): its certificate and config, and a peer entry
    /// in every existing config. Restart the existing nodes one at a time to let them know.
    AddNode(membership::AddNodeArgs),
    /// Take a node out of every other config (its own is renamed config.toml.removed). Stop
    /// it, then restart the others one at a time.
    RemoveNode(membership::RemoveNodeArgs),
}

/// Options shared by the client commands.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The node to talk to.
    #[arg(long, env = "MERIDIAN_URL", default_value = "http://127.0.0.1:7000")]
    region: String,
    /// Print the server's JSON answer instead of a readable line.
    #[arg(long)]
    json: bool,
    /// LOCAL_ONE, LOCAL_QUORUM, GLOBAL_QUORUM or ALL.
    #[arg(long, env = "MERIDIAN_CONSISTENCY")]
    consistency: Option<String>,
    /// Request timeout in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    timeout_ms: u64,
    /// A file keeping the session token between invocations: sent with each request and
    /// replaced by the token of each answer, so a write in one region is visible to a read in
    /// another (read-your-writes, monotonic reads).
    #[arg(long, env = "MERIDIAN_SESSION")]
    session: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyType {
    Registers,
    Counters,
    Gcounters,
    Sets,
}

impl KeyType {
    pub fn collection(self) -> &'static str {
        match self {
            Self::Registers => "registers",
            Self::Counters => "counters",
            Self::Gcounters => "gcounters",
            Self::Sets => "sets",
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Cluster(ClusterCommand::Init(args)) => init::init(&args).map(|_| ()),
        Command::Cluster(ClusterCommand::AddNode(args)) => {
            let path = membership::add_node(&args)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Cluster(ClusterCommand::RemoveNode(args)) => {
            for path in membership::remove_node(&args)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::Dev(args) => init::dev(args),
        Command::Admin(command) => client::block_on(admin::run(command)),
        Command::Bench(args) => bench::run(args),
        Command::BenchBaseline(args) => bench::baseline(&args),
        Command::Get { client, kind, key } => client::block_on(client::get(&client, kind, &key)),
        Command::Put { client, key, value } => client::block_on(client::put(&client, &key, &value)),
        Command::Del { client, kind, key } => client::block_on(client::del(&client, kind, &key)),
        Command::Incr {
            client,
            gcounter,
            key,
            by,
        } => client::block_on(client::incr(&client, gcounter, &key, by)),
        Command::Sadd {
            client,
            key,
            elements,
        } => client::block_on(client::set_update(&client, &key, &elements, true)),
        Command::Srem {
            client,
            key,
            elements,
        } => client::block_on(client::set_update(&client, &key, &elements, false)),
        Command::Smembers { client, key } => {
            client::block_on(client::get(&client, KeyType::Sets, &key))
        }
        Command::Ls {
            client,
            kind,
            prefix,
            limit,
            all,
        } => client::block_on(client::list(&client, kind, &prefix, limit, all)),
    }
}

/// Parses a command-line value as JSON, or takes it as a string when it is not JSON.
pub fn json_arg(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}
