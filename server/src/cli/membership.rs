//! `meridian cluster add-node` and `remove-node`: membership changes in a cluster directory
//! written by `meridian cluster init`.
//!
//! Both edit files only; running nodes learn the change when they restart (one at a time: a
//! rolling restart, see README "Operations"). Existing configs are edited
//! as text (a `[[peers]]` block appended or cut out) so operators' comments and layout survive;
//! every edited file is checked to load before any file is replaced.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use meridian_server::config::Config;
use rcgen::{Issuer, KeyPair};

use super::init::{NodePlan, issue_node_cert, node_config, valid_name, write_public};

/// A removed node's config is renamed to this, so its id and name are never reused.
const REMOVED_CONFIG: &str = "config.toml.removed";

#[derive(Debug, Args)]
pub struct AddNodeArgs {
    /// The cluster directory (`ca.pem`, `ca.key`, one directory per node).
    #[arg(long)]
    pub dir: PathBuf,
    /// The new node's region (new or existing).
    #[arg(long)]
    pub region: String,
    /// The node's name; default `{region}-{k}` with the first unused k.
    #[arg(long)]
    pub name: Option<String>,
    /// The host other nodes dial to reach the new node; default: the node's name when the
    /// cluster addresses nodes by name (docker compose), else the peer listen address.
    #[arg(long)]
    pub host: Option<String>,
    /// HTTP listen address; default: the existing nodes' address, next free port.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Peer (QUIC) listen address; default: the existing nodes' address, next free port.
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct RemoveNodeArgs {
    /// The cluster directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The node to remove.
    #[arg(long)]
    pub name: String,
}

/// One node's config in the cluster directory.
struct Member {
    path: PathBuf,
    text: String,
    config: Config,
}

/// The members (`*/config.toml`) and the removed nodes (`*/config.toml.removed`) of `dir`.
fn scan(dir: &Path) -> Result<(Vec<Member>, Vec<Config>)> {
    ensure!(
        dir.join("ca.pem").is_file(),
        "{} is not a cluster directory (no ca.pem; see `meridian cluster init`)",
        dir.display()
    );
    let mut members = Vec::new();
    let mut removed = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let node_dir = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        let path = node_dir.join("config.toml");
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let config =
                Config::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
            members.push(Member { path, text, config });
        }
        let gone = node_dir.join(REMOVED_CONFIG);
        if gone.is_file() {
            removed.push(
                Config::load(&gone).with_context(|| format!("cannot load {}", gone.display()))?,
            );
        }
    }
    ensure!(
        !members.is_empty(),
        "{} holds no node config",
        dir.display()
    );
    members.sort_by_key(|m| m.config.node.id);
    Ok((members, removed))
}

/// Parses config text as a node config (for checking an edit before writing it).
fn check(text: &str, path: &Path) -> Result<Config> {
    let mut config: Config = toml::from_str(text)
        .with_context(|| format!("the edited {} would not parse", path.display()))?;
    config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    config
        .validate()
        .with_context(|| format!("the edited {} would not be valid", path.display()))?;
    Ok(config)
}

/// Replaces a file atomically: a sibling file, fsync'd, then renamed over it.
fn replace(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let temp = path.with_extension("toml.tmp");
    let mut file =
        std::fs::File::create(&temp).with_context(|| format!("cannot write {}", temp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// The `[[peers]]` block naming `plan`.
fn peer_block(plan: &NodePlan) -> String {
    format!(
        "\n# Added by `meridian cluster add-node`.\n[[peers]]\nid = {}\nname = \"{}\"\nregion = \"{}\"\naddress = \"{}\"\n",
        plan.id, plan.name, plan.region, plan.peer_host
    )
}

/// `address` as the other members dial `member` (from their `[[peers]]`), else its listen.
fn dialed_address(member: &Member, members: &[Member]) -> String {
    members
        .iter()
        .flat_map(|m| &m.config.peers)
        .find(|p| p.id == member.config.node.id)
        .map_or_else(
            || {
                let listen = member
                    .config
                    .peer
                    .as_ref()
                    .map_or(member.config.http.listen, |p| p.listen);
                let ip = if listen.ip().is_unspecified() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    listen.ip()
                };
                SocketAddr::new(ip, listen.port()).to_string()
            },
            |p| p.address.clone(),
        )
}

/// Sections of an existing config the new node takes as they are: cluster-wide settings.
fn shared_sections(template: &str) -> Result<String> {
    let mut table: toml::Table = template.parse().context("parsing an existing config")?;
    for own in ["node", "http", "peer", "tls", "session", "peers"] {
        table.remove(own);
    }
    if table.is_empty() {
        return Ok(String::new());
    }
    let text = toml::to_string(&table).context("copying settings from an existing config")?;
    Ok(format!(
        "\n# Settings copied from an existing node's config by `meridian cluster add-node`.\n{text}"
    ))
}

/// Issues a certificate for a new node, writes its config with every member as a peer, and
/// adds it as a peer to every member's config. Returns the new config's path.
pub fn add_node(args: &AddNodeArgs) -> Result<PathBuf> {
    ensure!(
        valid_name(&args.region),
        "region {:?}: use lowercase letters, digits and '-'",
        args.region
    );
    let (members, removed) = scan(&args.dir)?;
    let everyone = || members.iter().map(|m| &m.config).chain(removed.iter());
    let taken: BTreeSet<&str> = everyone().map(|c| c.node.name.as_str()).collect();
    let name = match &args.name {
        Some(name) => name.clone(),
        None => (1..=taken.len() + 1)
            .map(|k| format!("{}-{k}", args.region))
            .find(|n| !taken.contains(n.as_str()))
            .context("no free name")?,
    };
    ensure!(
        valid_name(&name),
        "name {name:?}: use lowercase letters, digits and '-' (at most 40)"
    );
    // A removed node's certificate stays valid under the CA: a new node with its name could
    // be impersonated by it.
    ensure!(
        !taken.contains(name.as_str()),
        "the name {name} is taken (by a member or a removed node)"
    );
    let node_dir = args.dir.join(&name);
    ensure!(
        !node_dir.exists(),
        "{} already exists; pick another --name",
        node_dir.display()
    );
    // Ids are never reused: peers hold the ops of every id that ever wrote, and a new node
    // under an old id would reissue its sequence numbers.
    let id = everyone()
        .flat_map(|c| std::iter::once(c.node.id).chain(c.peers.iter().map(|p| p.id)))
        .max()
        .unwrap_or(0)
        + 1;
    let cluster = members[0].config.node.cluster.clone();
    ensure!(
        members.iter().all(|m| m.config.node.cluster == cluster),
        "the configs in {} name different clusters",
        args.dir.display()
    );

    let first = &members[0].config;
    let http = args.http_listen.unwrap_or_else(|| {
        let port = members.iter().map(|m| m.config.http.listen.port()).max();
        SocketAddr::new(
            first.http.listen.ip(),
            port.unwrap_or(7000).saturating_add(1),
        )
    });
    let peer = args.peer_listen.unwrap_or_else(|| {
        let listens: Vec<SocketAddr> = members
            .iter()
            .filter_map(|m| m.config.peer.as_ref().map(|p| p.listen))
            .collect();
        let port = listens.iter().map(SocketAddr::port).max();
        let ip = listens
            .first()
            .map_or(first.http.listen.ip(), SocketAddr::ip);
        SocketAddr::new(ip, port.unwrap_or(7100).saturating_add(1))
    });
    let by_name = members
        .iter()
        .any(|m| dialed_address(m, &members).starts_with(&format!("{}:", m.config.node.name)));
    let host = match &args.host {
        Some(host) => host.clone(),
        None if by_name => name.clone(),
        None if peer.ip().is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
        None => peer.ip().to_string(),
    };
    let peer_host = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => SocketAddr::new(IpAddr::V6(ip), peer.port()).to_string(),
        _ => format!("{host}:{}", peer.port()),
    };
    let plan = NodePlan {
        id,
        name: name.clone(),
        region: args.region.clone(),
        http,
        peer,
        peer_host,
    };
    let existing: Vec<NodePlan> = members
        .iter()
        .map(|m| NodePlan {
            id: m.config.node.id,
            name: m.config.node.name.clone(),
            region: m.config.node.region.clone(),
            http: m.config.http.listen,
            peer: m
                .config
                .peer
                .as_ref()
                .map_or(m.config.http.listen, |p| p.listen),
            peer_host: dialed_address(m, &members),
        })
        .collect();

    // Every edit is computed and checked before the first file changes.
    let mut edits = Vec::new();
    for member in &members {
        let mut text = member.text.clone();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&peer_block(&plan));
        let checked = check(&text, &member.path)?;
        ensure!(
            checked.peers.iter().any(|p| p.id == id),
            "appending a [[peers]] entry to {} did not add the peer (are its peers an inline \
             array?); add it by hand",
            member.path.display()
        );
        edits.push((member.path.clone(), text));
    }
    let peers: Vec<&NodePlan> = existing.iter().collect();
    let mut config = node_config(&plan, &cluster, &peers).replacen(
        "meridian cluster init",
        "meridian cluster add-node",
        1,
    );
    config.push_str(&shared_sections(&members[0].text)?);
    let config_path = node_dir.join("config.toml");
    check(&config, &config_path)?;

    let ca_pem = std::fs::read_to_string(args.dir.join("ca.pem")).context("cannot read ca.pem")?;
    let ca_key = std::fs::read_to_string(args.dir.join("ca.key"))
        .context("cannot read ca.key (the CA key is needed to issue the node's certificate)")?;
    let ca_key = KeyPair::from_pem(&ca_key).context("ca.key is not a PEM private key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("ca.pem is not a CA certificate")?;
    std::fs::create_dir_all(node_dir.join("data"))
        .with_context(|| format!("cannot create {}", node_dir.display()))?;
    let san_ip = host.parse::<IpAddr>().unwrap_or(peer.ip());
    issue_node_cert(&issuer, &name, san_ip, &node_dir)?;
    write_public(&config_path, &config)?;
    for (path, text) in edits {
        replace(&path, &text)?;
    }
    Ok(config_path)
}

/// Removes `[[peers]]` blocks whose `id` is `id` from config text. A block runs from its
/// header to the next table header; comment lines right above the header go with it.
fn cut_peer(text: &str, id: u64) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_header = |l: &str| l.trim_start().starts_with('[');
    let mut keep = vec![true; lines.len()];
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "[[peers]]" {
            let end = (i + 1..lines.len())
                .find(|&j| is_header(lines[j]))
                .unwrap_or(lines.len());
            let names_id = lines[i + 1..end].iter().any(|l| {
                let mut parts = l.splitn(2, '=');
                parts.next().map(str::trim) == Some("id")
                    && parts
                        .next()
                        .map(|v| v.split('#').next().unwrap_or("").trim())
                        == Some(id.to_string().as_str())
            });
            if names_id {
                let mut start = i;
                while start > 0 && lines[start - 1].trim_start().starts_with('#') {
                    start -= 1;
                }
                // The block's own trailing blank lines belong to the next block's spacing.
                for flag in &mut keep[start..end] {
                    *flag = false;
                }
            }
            i = end;
        } else {
            i += 1;
        }
    }
    let mut out = String::with_capacity(text.len());
    for (line, _) in lines.iter().zip(&keep).filter(|(_, k)| **k) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// Takes a node out of every other member's `[[peers]]` and renames its own config to
/// `config.toml.removed` (its id and name are then never handed out again).
pub fn remove_node(args: &RemoveNodeArgs) -> Result<Vec<PathBuf>> {
    let (members, _) = scan(&args.dir)?;
    let Some(gone) = members.iter().find(|m| m.config.node.name == args.name) else {
        bail!(
            "no member named {:?} in {} (members: {})",
            args.name,
            args.dir.display(),
            members
                .iter()
                .map(|m| m.config.node.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    ensure!(members.len() > 1, "{} is the last member", args.name);
    let id = gone.config.node.id;
    let mut edits = Vec::new();
    for member in members.iter().filter(|m| m.config.node.id != id) {
        let text = cut_peer(&member.text, id);
        let checked = check(&text, &member.path)?;
        ensure!(
            checked.peers.iter().all(|p| p.id != id),
            "could not remove the [[peers]] entry with id {id} from {}; remove it by hand",
            member.path.display()
        );
        ensure!(
            checked.peers.len() + 1 == member.config.peers.len()
                || !member.config.peers.iter().any(|p| p.id == id),
            "removing peer {id} from {} would remove other peers too; edit it by hand",
            member.path.display()
        );
        edits.push((member.path.clone(), text));
    }
    let mut changed = Vec::new();
    for (path, text) in edits {
        replace(&path, &text)?;
        changed.push(path);
    }
    let retired = gone.path.with_file_name(REMOVED_CONFIG);
    std::fs::rename(&gone.path, &retired)
        .with_context(|| format!("cannot rename {}", gone.path.display()))?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_a_peer_keeps_the_others_and_everything_else() {
        let text = "[node]\nid = 1\n\n[[peers]]\nid = 2\nname = \"b\"\n\n# Added by x.\n[[peers]]\nid = 3 # c\nname = \"c\"\n\n[[peers]]\nid = 33\nname = \"cc\"\n";
        let out = cut_peer(text, 3);
        assert_eq!(
            out,
            "[node]\nid = 1\n\n[[peers]]\nid = 2\nname = \"b\"\n\n[[peers]]\nid = 33\nname = \"cc\"\n"
        );
        assert_eq!(cut_peer(text, 9), text);
    }
}
