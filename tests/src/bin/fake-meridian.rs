//! A stand-in for the `meridian` binary that implements just enough of its contract
//! for the harness's own tests: `cluster init` writes the directory layout and
//! configs, and `serve` answers `/healthz`, `/readyz` and `/v1/cluster` over HTTP,
//! exits cleanly on SIGTERM, and pings every peer over UDP (answering pings with
//! pongs) so tests can see relays and partitions at work. `/v1/cluster` returns
//! `{"id", "name", "starts", "pings": {peer id: n}, "pongs": {peer id: n}}`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["cluster", "init", rest @ ..] => init(rest),
        ["serve", "--config", path] => serve(Path::new(path)).await,
        _ => bail!("usage: fake-meridian cluster init ... | serve --config FILE"),
    }
}

fn flag<'a>(args: &[&'a str], name: &str) -> Result<&'a str> {
    args.iter()
        .position(|a| *a == name)
        .and_then(|i| args.get(i + 1).copied())
        .with_context(|| format!("missing {name}"))
}

fn init(args: &[&str]) -> Result<()> {
    let regions: Vec<&str> = flag(args, "--regions")?.split(',').collect();
    let per_region: usize = flag(args, "--nodes-per-region").unwrap_or("1").parse()?;
    let dir = PathBuf::from(flag(args, "--dir")?);
    let base: u16 = flag(args, "--base-port")?.parse()?;
    for file in ["ca.pem", "ca.key", "session.secret"] {
        std::fs::write(dir.join(file), "fake\n")?;
    }
    let mut nodes = Vec::new();
    for region in &regions {
        for k in 1..=per_region {
            let i = nodes.len() as u16;
            nodes.push((u64::from(i) + 1, format!("{region}-{k}"), *region, base + i));
        }
    }
    for (id, name, region, http) in &nodes {
        let node_dir = dir.join(name);
        std::fs::create_dir_all(node_dir.join("data"))?;
        std::fs::write(node_dir.join("node.pem"), "fake\n")?;
        std::fs::write(node_dir.join("node.key"), "fake\n")?;
        let mut text = format!(
            "[node]\nid = {id}\nname = \"{name}\"\nregion = \"{region}\"\ncluster = \"meridian\"\n\
             data_dir = \"data\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n[peer]\n\
             listen = \"127.0.0.1:{}\"\n\n[tls]\nca = \"../ca.pem\"\ncert = \"node.pem\"\n\
             key = \"node.key\"\n\n[session]\nsecret_file = \"../session.secret\"\n",
            http + 100
        );
        for (pid, pname, pregion, phttp) in nodes.iter().filter(|n| n.0 != *id) {
            let _ = write!(
                text,
                "\n[[peers]]\nid = {pid}\nname = \"{pname}\"\nregion = \"{pregion}\"\n\
                 address = \"127.0.0.1:{}\"\n",
                phttp + 100
            );
        }
        std::fs::write(node_dir.join("config.toml"), text)?;
    }
    Ok(())
}

#[derive(Default)]
struct Counts {
    pings: BTreeMap<u64, u64>,
    pongs: BTreeMap<u64, u64>,
}

async fn serve(config_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config_path)?;
    let config: toml::Table = text.parse()?;
    let get = |section: &str, key: &str| -> Result<String> {
        config
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("missing {section}.{key}"))
    };
    let id = config
        .get("node")
        .and_then(|n| n.get("id"))
        .and_then(toml::Value::as_integer)
        .context("missing node.id")?;
    let name = get("node", "name")?;
    let base_dir = config_path.parent().context("config has no parent")?;
    let data_dir = base_dir.join(get("node", "data_dir")?);
    let marker = data_dir.join("starts");
    let starts = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    std::fs::write(&marker, starts.to_string())?;
    let peers: Vec<SocketAddr> = config
        .get("peers")
        .and_then(toml::Value::as_array)
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| p.get("address")?.as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();

    let http: SocketAddr = get("http", "listen")?.parse()?;
    let peer: SocketAddr = get("peer", "listen")?.parse()?;
    let listener = TcpListener::bind(http)
        .await
        .with_context(|| format!("binding {http}"))?;
    let udp = Arc::new(
        UdpSocket::bind(peer)
            .await
            .with_context(|| format!("binding {peer}"))?,
    );
    eprintln!("fake-meridian {name} (id {id}) serving on {http}, peer {peer}");
    let counts = Arc::new(Mutex::new(Counts::default()));

    let sender = Arc::clone(&udp);
    tokio::spawn(async move {
        loop {
            for address in &peers {
                let _ = sender
                    .send_to(format!("ping {id}").as_bytes(), address)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let receiver = Arc::clone(&udp);
    let peer_counts = Arc::clone(&counts);
    tokio::spawn(async move {
        let mut buf = [0_u8; 1500];
        loop {
            let Ok((len, from)) = receiver.recv_from(&mut buf).await else {
                continue;
            };
            let message = String::from_utf8_lossy(&buf[..len]).into_owned();
            let Some((kind, sender_id)) = message.split_once(' ') else {
                continue;
            };
            let Ok(sender_id) = sender_id.parse::<u64>() else {
                continue;
            };
            {
                let mut counts = peer_counts.lock().unwrap_or_else(PoisonError::into_inner);
                let map = if kind == "ping" {
                    &mut counts.pings
                } else {
                    &mut counts.pongs
                };
                *map.entry(sender_id).or_default() += 1;
            }
            if kind == "ping" {
                let _ = receiver
                    .send_to(format!("pong {id}").as_bytes(), from)
                    .await;
            }
        }
    });

    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                eprintln!("fake-meridian {name}: SIGTERM, exiting");
                return Ok(());
            }
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let body = {
                    let counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                    json!({
                        "id": id, "name": name, "starts": starts,
                        "pings": counts.pings, "pongs": counts.pongs,
                    })
                    .to_string()
                };
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0_u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&request);
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let (status, body) = match path.as_str() {
                        "/healthz" | "/readyz" => ("200 OK", "{}".to_owned()),
                        "/v1/cluster" => ("200 OK", body),
                        _ => ("404 Not Found", "{}".to_owned()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        }
    }
}
