//! `meridian cluster init` and `meridian dev`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use meridian_server::config::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Comma-separated region names, e.g. us-east,eu-west,ap-south.
    #[arg(long, value_delimiter = ',', required = true)]
    pub regions: Vec<String>,
    #[arg(long, default_value_t = 1)]
    pub nodes_per_region: usize,
    /// Where to write the cluster's files.
    #[arg(long)]
    pub dir: PathBuf,
    /// Node i listens for HTTP on base+i and for peers on base+100+i.
    #[arg(long, default_value_t = 7000)]
    pub base_port: u16,
    #[arg(long, default_value = "meridian")]
    pub cluster: String,
    /// Address nodes bind to.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// How peers address each other: `ip` (the bind address, one host) or `name` (each node's
    /// name as its host name, as under docker compose).
    #[arg(long, default_value = "ip", value_parser = ["ip", "name"])]
    pub peer_hosts: String,
    /// Replace an existing cluster directory.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    #[arg(long, default_value = ".meridian/dev")]
    dir: PathBuf,
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-east,eu-west,ap-south"
    )]
    regions: Vec<String>,
}

pub(super) struct NodePlan {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) region: String,
    pub(super) http: SocketAddr,
    pub(super) peer: SocketAddr,
    /// `host:port` other nodes dial to reach this one.
    pub(super) peer_host: String,
}

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub(super) fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub(super) fn write_public(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// Issues `name`'s certificate, signed by the cluster CA, into `node_dir` (`node.pem`,
/// `node.key`). It names the node (peers check the name against the Hello's node id),
/// `localhost` and 127.0.0.1, and `bind` when that is a routable address.
pub(super) fn issue_node_cert(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    bind: IpAddr,
    node_dir: &Path,
) -> Result<()> {
    let key = KeyPair::generate().context("generating a node key")?;
    let mut params = CertificateParams::new(vec![name.to_owned(), "localhost".to_owned()])
        .context("node certificate parameters")?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    if !bind.is_unspecified() && !bind.is_loopback() {
        params.subject_alt_names.push(SanType::IpAddress(bind));
    }
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_owned());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params
        .signed_by(&key, issuer)
        .context("signing a node certificate")?;
    write_public(&node_dir.join("node.pem"), &cert.pem())?;
    write_secret(&node_dir.join("node.key"), &key.serialize_pem())?;

    Ok(())
}

/// The config file text of `plan`, with `peers` as its `[[peers]]`.
pub(super) fn node_config(plan: &NodePlan, cluster: &str, peers: &[&NodePlan]) -> String {
    let mut toml = format!(
        "# Written by `meridian cluster init`. Relative paths are relative to this file.\n\
         [node]\nid = {}\nname = \"{}\"\nregion = \"{}\"\ncluster = \"{}\"\ndata_dir = \"data\"\n\n\
         [http]\nlisten = \"{}\"\n\n[peer]\nlisten = \"{}\"\n\n\
         [tls]\nca = \"../ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n\n\
         [session]\nsecret_file = \"../session.secret\"\n",
        plan.id, plan.name, plan.region, cluster, plan.http, plan.peer
    );
    for other in peers {
        let _ = write!(
            toml,
            "\n[[peers]]\nid = {}\nname = \"{}\"\nregion = \"{}\"\naddress = \"{}\"\n",
            other.id, other.name, other.region, other.peer_host
        );
    }
    toml
}

/// Writes the cluster and returns the config file of every node.
pub fn init(args: &InitArgs) -> Result<Vec<PathBuf>> {
    ensure!(!args.regions.is_empty(), "give at least one region");
    ensure!(
        args.nodes_per_region >= 1 && args.nodes_per_region <= 50,
        "--nodes-per-region must be 1..=50"
    );
    for region in &args.regions {
        ensure!(
            valid_name(region),
            "region {region:?}: use lowercase letters, digits and '-'"
        );
    }
    let unique: std::collections::BTreeSet<_> = args.regions.iter().collect();
    ensure!(
        unique.len() == args.regions.len(),
        "regions must be distinct"
    );
    let total = args.regions.len() * args.nodes_per_region;
    ensure!(total <= 100, "at most 100 nodes");
    ensure!(
        u32::from(args.base_port) + 100 + total as u32 <= 65_535 && args.base_port >= 1024,
        "--base-port leaves no room for {total} nodes (ports base..base+{total} and base+100..)"
    );
    if args.dir.join("ca.pem").exists() && !args.force {
        bail!(
            "{} already holds a cluster; pass --force to replace it",
            args.dir.display()
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;

    let mut plans = Vec::new();
    for region in &args.regions {
        for k in 1..=args.nodes_per_region {
            let i = plans.len() as u16;
            let name = format!("{region}-{k}");
            let peer = SocketAddr::new(args.bind, args.base_port + 100 + i);
            let peer_host = if args.peer_hosts == "name" {
                format!("{name}:{}", peer.port())
            } else {
                let ip = if args.bind.is_unspecified() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    args.bind
                };
                SocketAddr::new(ip, peer.port()).to_string()
            };
            plans.push(NodePlan {
                id: u64::from(i) + 1,
                name,
                region: region.clone(),
                http: SocketAddr::new(args.bind, args.base_port + i),
                peer,
                peer_host,
            });
        }
    }

    // The cluster CA signs every node certificate; peers accept only certificates it signed.
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{} cluster CA", args.cluster));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    write_public(&args.dir.join("ca.pem"), &ca_cert.pem())?;
    write_secret(&args.dir.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let secret: [u8; 32] = rand::random();
    let secret_hex: String = secret.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    write_secret(&args.dir.join("session.secret"), &secret_hex)?;

    let mut configs = Vec::new();
    for plan in &plans {
        let node_dir = args.dir.join(&plan.name);
        std::fs::create_dir_all(node_dir.join("data"))
            .with_context(|| format!("cannot create {}", node_dir.display()))?;
        issue_node_cert(&issuer, &plan.name, args.bind, &node_dir)?;

        let others: Vec<&NodePlan> = plans.iter().filter(|p| p.id != plan.id).collect();
        let toml = node_config(plan, &args.cluster, &others);
        let path = node_dir.join("config.toml");
        write_public(&path, &toml)?;
        Config::load(&path)
            .with_context(|| format!("the generated {} does not load", path.display()))?;
        configs.push(path);
    }
    Ok(configs)
}

/// Initialises a loopback cluster once, then runs all its nodes in this process.
pub fn dev(args: DevArgs) -> Result<()> {
    super::serve::init_logging(super::serve::LogFormat::Text);
    let configs = if args.dir.join("ca.pem").exists() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&args.dir)
            .with_context(|| format!("cannot read {}", args.dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path().join("config.toml")))
            .filter(|p| p.exists())
            .collect();
        found.sort();
        found
    } else {
        init(&InitArgs {
            regions: args.regions.clone(),
            nodes_per_region: 1,
            dir: args.dir.clone(),
            base_port: args.base_port,
            cluster: "meridian-dev".into(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            peer_hosts: "ip".into(),
            force: false,
        })?
    };
    let configs = configs
        .iter()
        .map(|p| Config::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let mut nodes = tokio::task::JoinSet::new();
        for config in configs {
            let name = config.node.name.clone();
            let region = config.node.region.clone();
            let token = shutdown.clone();
            nodes.spawn(async move {
                meridian_server::node::run(config, token, move |addr| {
                    println!("{region:>10}  {name:<12} http://{addr}");
                })
                .await
            });
        }
        println!(
            "Meridian dev cluster in {} — Ctrl-C to stop",
            args.dir.display()
        );
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(result) = nodes.join_next() => {
                shutdown.cancel();
                result.context("a node task failed")?.context("a node stopped")?;
            }
        }
        shutdown.cancel();
        while let Some(result) = nodes.join_next().await {
            result
                .context("a node task failed")?
                .context("a node failed")?;
        }
        Ok(())
    })
}
