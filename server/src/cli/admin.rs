//! `meridian admin`: operator commands over the admin HTTP endpoints.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Subcommand;
use meridian_server::config::Config;
use meridian_server::storage::{
    self,
    backup::{self, BackupInfo},
};
use reqwest::Method;
use serde_json::Value;

use super::ClientArgs;
use super::client::{Client, encode_segment};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Run an anti-entropy round with a peer now and print what it repaired.
    Sync {
        #[command(flatten)]
        client: ClientArgs,
        /// The peer's node name (as in the config's [[peers]]) or id.
        #[arg(long)]
        peer: String,
    },
    /// Print the node's Merkle tree summary: root hash, buckets, keys.
    Tree {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download a consistent snapshot of a running node's data into FILE, and verify it.
    Backup {
        /// The node to back up (its HTTP URL).
        #[arg(long, env = "MERIDIAN_URL")]
        url: String,
        /// Where to write the backup; must not exist.
        #[arg(long)]
        out: PathBuf,
        /// How long the node may take to write and send the backup, in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        /// An `admin` token and the cluster CA.
        #[command(flatten)]
        auth: super::ConnectArgs,
    },
    /// Seed a NEW node's empty data directory from a backup (offline: the node is not
    /// running). The node id must not have ops in the backup.
    Restore {
        /// The backup file (`meridian admin backup`).
        #[arg(long)]
        from: PathBuf,
        /// The new node's config (`meridian cluster add-node` writes one).
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn describe(info: &BackupInfo) -> String {
    let applied: Vec<String> = info
        .applied
        .iter()
        .map(|(origin, seq)| format!("{origin}:{seq}"))
        .collect();
    format!(
        "{} keys, {} bytes, taken from node {}; applied {{{}}}",
        info.keys,
        info.bytes,
        info.source,
        applied.join(", ")
    )
}

/// Downloads a backup into a sibling of `out`, fsyncs and verifies it, then renames it.
async fn download_backup(
    url: &str,
    out: &Path,
    timeout_secs: u64,
    auth: &super::ConnectArgs,
) -> Result<BackupInfo> {
    use tokio::io::AsyncWriteExt as _;
    ensure!(!out.exists(), "{} already exists", out.display());
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let http = auth
        .client_builder()?
        .timeout(std::time::Duration::from_secs(timeout_secs))
        .build()
        .context("cannot build the HTTP client")?;
    let endpoint = format!("{}/v1/admin/backup", url.trim_end_matches('/'));
    let mut response = http
        .post(&endpoint)
        .send()
        .await
        .map_err(|error| super::client::unanswered(url.trim_end_matches('/'), error))?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let detail = body["detail"].as_str().unwrap_or("no detail");
        bail!("{endpoint} answered {status}: {detail}");
    }
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let written = async {
        while let Some(chunk) = response.chunk().await.context("the download broke off")? {
            file.write_all(&chunk).await.context("writing the backup")?;
        }
        file.sync_all().await.context("syncing the backup")?;
        let info = backup::verify(&partial)?;
        tokio::fs::rename(&partial, out)
            .await
            .with_context(|| format!("cannot rename to {}", out.display()))?;
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty());
        std::fs::File::open(dir.unwrap_or_else(|| Path::new(".")))
            .and_then(|d| d.sync_all())
            .context("syncing the backup's directory")?;
        anyhow::Ok(info)
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    written
}

pub async fn run(command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Backup {
            url,
            out,
            timeout_secs,
            auth,
        } => {
            let info = download_backup(&url, &out, timeout_secs, &auth).await?;
            println!("backup written to {}: {}", out.display(), describe(&info));
        }
        AdminCommand::Restore {
            from,
            config,
            data_dir,
        } => {
            let config = Config::load(&config)
                .with_context(|| format!("cannot load {}", config.display()))?;
            let dir = data_dir.unwrap_or_else(|| config.data_dir());
            let journal = storage::journal_dir(&dir, config.journal_dir().as_deref());
            let info = backup::restore(&from, &dir, &journal, config.node_id()?)?;
            println!(
                "restored {} into {} for node {} ({}): {}; start the node to catch up from its peers",
                from.display(),
                dir.display(),
                config.node.id,
                config.node.name,
                describe(&info)
            );
        }
        AdminCommand::Sync { client: args, peer } => {
            let client = Client::new(&args)?;
            let path = format!("/v1/admin/anti-entropy?peer={}", encode_segment(&peer));
            let answer = client.call(Method::POST, &path, None).await?;
            if args.json {
                println!("{answer}");
            } else {
                let round = &answer["round"];
                let n = |k: &str| round.get(k).and_then(Value::as_u64).unwrap_or(0);
                let too_large = match n("keys_too_large") {
                    0 => String::new(),
                    keys => format!(
                        "; {keys} of this node's states are too large for anti-entropy and were \
                         not sent (the node's log names them)"
                    ),
                };
                let deferred = match n("keys_deferred") {
                    0 => String::new(),
                    keys => format!(
                        "; {keys} keys left for a later round: one side has not yet applied \
                         every op the other's states hold, and its replication will bring them"
                    ),
                };
                println!(
                    "synced with {peer}: {} differing buckets, {} keys compared, \
                     {} repaired here, {} repaired there, {} bytes sent, {} received{}{too_large}{deferred}",
                    n("buckets_differing"),
                    n("keys_compared"),
                    n("keys_repaired_here"),
                    n("keys_repaired_there"),
                    n("bytes_sent"),
                    n("bytes_received"),
                    match round.get("complete").and_then(Value::as_bool) {
                        Some(false) if n("keys_unanswered") > 0 => {
                            " (some keys were not fetched: they changed on the peer meanwhile, \
                             did not fit in one reply, or are too large for anti-entropy there; \
                             run again, and see the peer's log)"
                        }
                        Some(false) => " (key budget reached: run again)",
                        _ => "",
                    }
                );
            }
        }
        AdminCommand::Tree { client: args } => {
            let client = Client::new(&args)?;
            let answer = client.call(Method::GET, "/v1/admin/tree", None).await?;
            if args.json {
                println!("{answer}");
            } else {
                println!(
                    "root {}\nbuckets {} ({} non-empty)\nkeys {}",
                    answer["root"].as_str().unwrap_or("?"),
                    answer["buckets"],
                    answer["nonempty_buckets"],
                    answer["keys"]
                );
            }
        }
    }
    Ok(())
}
