//! `meridian admin`: operator commands over the admin HTTP endpoints.

use anyhow::Result;
use clap::Subcommand;
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
}

pub async fn run(command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Sync { client: args, peer } => {
            let client = Client::new(&args)?;
            let path = format!("/v1/admin/anti-entropy?peer={}", encode_segment(&peer));
            let answer = client.call(Method::POST, &path, None).await?;
            if args.json {
                println!("{answer}");
            } else {
                let round = &answer["round"];
                let n = |k: &str| round.get(k).and_then(Value::as_u64).unwrap_or(0);
                println!(
                    "synced with {peer}: {} differing buckets, {} keys compared, \
                     {} repaired here, {} repaired there, {} bytes sent, {} received{}",
                    n("buckets_differing"),
                    n("keys_compared"),
                    n("keys_repaired_here"),
                    n("keys_repaired_there"),
                    n("bytes_sent"),
                    n("bytes_received"),
                    if round.get("complete").and_then(Value::as_bool) == Some(false) {
                        " (key budget reached: run again)"
                    } else {
                        ""
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
