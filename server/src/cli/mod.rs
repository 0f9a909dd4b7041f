//! Command-line interface.

mod admin;
mod ae_bench;
mod bench;
mod client;
mod converge;
mod init;
mod membership;
mod peer;
mod prom;
mod serve;

use anyhow::Result;
use clap::builder::NonEmptyStringValueParser;
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
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        key: String,
    },
    /// Write a register. VALUE is JSON; text that is not JSON is stored as a JSON string.
    Put {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        key: String,
        value: String,
    },
    /// Delete a key: a register tombstone, a counter reset, or a set clear.
    Del {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long = "type", short = 't', value_enum, default_value_t = KeyType::Registers)]
        kind: KeyType,
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        key: String,
    },
    /// Add to a counter (negative subtracts; with --gcounter, a grow-only counter).
    Incr {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        gcounter: bool,
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        key: String,
        #[arg(default_value_t = 1, allow_negative_numbers = true, value_parser = parse_step)]
        by: i128,
    },
    /// Add elements to a set (each JSON, or taken as a string).
    Sadd {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Remove elements from a set.
    Srem {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Print a set's elements.
    Smembers {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(value_parser = NonEmptyStringValueParser::new())]
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
    /// Write a config per node, a cluster CA, node and HTTP certificates, API tokens and the
    /// session secret.
    Init(init::InitArgs),
    /// Reissue every node's certificates from the cluster CA in place; then SIGHUP each node.
    RotateCerts(init::RotateArgs),
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
    /// The file keeping the session token between invocations: sent with each request and
    /// replaced by the token of each answer, so a write in one region is visible to a read in
    /// another (read-your-writes, monotonic reads). Default:
    /// $XDG_STATE_HOME/meridian/session, else ~/.local/state/meridian/session.
    #[arg(long, env = "MERIDIAN_SESSION")]
    session: Option<std::path::PathBuf>,
    /// Send no session token and keep none (over --session and MERIDIAN_SESSION).
    #[arg(long)]
    no_session: bool,
    #[command(flatten)]
    auth: ConnectArgs,
}

/// How to authenticate to a node and trust its certificate: shared by the client commands,
/// `admin` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Bearer token (prefer --token-file or the environment: arguments show up in `ps`).
    #[arg(
        long,
        env = "MERIDIAN_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file holding the bearer token, e.g. tokens/write.token of a cluster directory.
    #[arg(long, env = "MERIDIAN_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// A PEM CA certificate to trust for https URLs (the cluster's ca.pem).
    #[arg(long, env = "MERIDIAN_CA")]
    pub ca: Option<std::path::PathBuf>,
}

impl ConnectArgs {
    /// The token to send, if any.
    pub fn bearer(&self) -> Result<Option<String>> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_owned()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?;
        let token = text.trim();
        anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
        Ok(Some(token.to_owned()))
    }

    /// A reqwest client builder trusting `--ca` (in addition to nothing else: a cluster CA
    /// replaces the public roots, so a node cannot be impersonated by any public certificate),
    /// sending the token on every request.
    pub fn client_builder(&self) -> Result<reqwest::ClientBuilder> {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &self.ca {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read CA file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("{}: bad CA PEM: {e}", path.display()))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "{}: no certificate in it",
                path.display()
            );
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(token) = self.bearer()? {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| anyhow::anyhow!("the token holds characters a header cannot carry"))?;
            value.set_sensitive(true);
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, value);
            builder = builder.default_headers(headers);
        }
        Ok(builder)
    }
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
        Command::Cluster(ClusterCommand::RotateCerts(args)) => {
            let rotated = init::rotate(&args)?;
            println!(
                "rewrote {}; send SIGHUP to each node to load them",
                rotated.join(", ")
            );
            Ok(())
        }
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

/// A counter step: any PN-Counter step (i64) or G-Counter step (u64); the node refuses the
/// ones its counter type does not take.
fn parse_step(text: &str) -> Result<i128, String> {
    let step: i128 = text.parse().map_err(|e| format!("{e}"))?;
    if (i128::from(i64::MIN)..=i128::from(u64::MAX)).contains(&step) {
        Ok(step)
    } else {
        Err(format!("{step} is outside -2^63 ..= 2^64 - 1"))
    }
}

/// Parses a command-line value as JSON, or takes it as a string when it is not JSON.
pub fn json_arg(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}
