//! `meridian serve`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use meridian_server::config::Config;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The node's TOML configuration.
    #[arg(long, env = "MERIDIAN_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides [http] listen.
    #[arg(long, env = "MERIDIAN_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Overrides [node] data_dir; without --config, runs a standalone node on this directory.
    #[arg(long, env = "MERIDIAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides [storage] journal_dir: the journal on a device of its own. Moving an existing
    /// node's journal means moving its files too; the node refuses to start without them.
    #[arg(long, env = "MERIDIAN_JOURNAL_DIR")]
    journal_dir: Option<PathBuf>,
    /// Overrides [peer] listen (the QUIC endpoint).
    #[arg(long, env = "MERIDIAN_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// Overrides the address of the peer NAME: `NAME=HOST:PORT`, repeatable (comma-separated in
    /// the environment). For when the network, not the config, decides where a peer is: the
    /// same generated config runs under container DNS, Kubernetes, or on one host.
    #[arg(
        long = "peer-address",
        env = "MERIDIAN_PEER_ADDRESSES",
        value_name = "NAME=HOST:PORT",
        value_delimiter = ',',
        value_parser = parse_peer_address
    )]
    peer_addresses: Vec<(String, String)>,
    /// Overrides [http] workers (0: one per core).
    #[arg(long, env = "MERIDIAN_WORKERS")]
    workers: Option<usize>,
    #[arg(long, value_enum, env = "MERIDIAN_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: in a file, `docker logs` or a log shipper the
    // escape codes are noise around every field.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn parse_peer_address(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, address)) if !name.is_empty() && address.contains(':') => {
            Ok((name.to_owned(), address.to_owned()))
        }
        _ => Err(format!("{text:?}: expected NAME=HOST:PORT")),
    }
}

pub fn load(args: &ServeArgs) -> Result<Config> {
    let mut config = match (&args.config, &args.data_dir) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(dir)) => Config::standalone(dir.clone(), "127.0.0.1:7000".parse()?),
        (None, None) => bail!("give --config FILE (or --data-dir DIR for a standalone node)"),
    };
    if let Some(listen) = args.http_listen {
        config.http.listen = listen;
    }
    if let (Some(_), Some(dir)) = (&args.config, &args.data_dir) {
        config.node.data_dir.clone_from(dir);
    }
    if let Some(dir) = &args.journal_dir {
        config.storage.journal_dir = Some(dir.clone());
    }
    if let Some(workers) = args.workers {
        config.http.workers = workers;
    }
    if let Some(listen) = args.peer_listen {
        match config.peer.as_mut() {
            Some(peer) => peer.listen = listen,
            None => bail!("--peer-listen: the config has no [peer] section"),
        }
    }
    for (name, address) in &args.peer_addresses {
        let Some(peer) = config.peers.iter_mut().find(|p| &p.name == name) else {
            bail!("--peer-address {name}={address}: the config has no peer named {name:?}");
        };
        peer.address.clone_from(address);
    }
    config.validate()?;
    Ok(config)
}

pub fn run(args: &ServeArgs) -> Result<()> {
    init_logging(args.log_format);
    let config = load(args)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.http.workers > 0 {
        runtime.worker_threads(config.http.workers);
    }
    let runtime = runtime
        .enable_all()
        .thread_name("meridian")
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        meridian_server::node::run(config, shutdown, |_| {})
            .await
            .context("node failed")
    })
}

/// SIGTERM or Ctrl-C: stop accepting, drain, commit, exit.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; Ctrl-C still stops the node");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
    }
    shutdown.cancel();
}
