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
    #[arg(long, conflicts_with = "keep_existing")]
    pub force: bool,
    /// Extra host names or IP addresses for the HTTP certificates (how clients reach nodes,
    /// e.g. a load balancer's name); repeatable.
    #[arg(long = "http-host")]
    pub http_hosts: Vec<String>,
    /// Serve the HTTP API unencrypted (only behind a TLS-terminating proxy, or on loopback).
    #[arg(long)]
    pub http_plaintext: bool,
    /// Serve the HTTP API without authentication (trusted networks only).
    #[arg(long)]
    pub no_auth: bool,
    /// When DIR already holds a cluster, keep it and succeed (a re-run init container or
    /// compose service must not fail, nor mint a second CA).
    #[arg(long)]
    pub keep_existing: bool,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The cluster directory `cluster init` wrote (its ca.pem and ca.key sign the new
    /// certificates).
    #[arg(long)]
    pub dir: PathBuf,
    /// Extra host names or IP addresses for the HTTP certificates; repeatable.
    #[arg(long = "http-host")]
    pub http_hosts: Vec<String>,
    /// Start a CA rotation: make a new CA, trust it alongside the old one (ca.pem holds
    /// both, new first) and sign the new certificates with it.
    #[arg(long, conflicts_with = "retire_old_cas")]
    pub new_ca: bool,
    /// Finish a CA rotation once every node runs on certificates of the new CA: keep only
    /// the first CA in ca.pem (reissues nothing).
    #[arg(long)]
    pub retire_old_cas: bool,
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

/// Writes `contents` next to `path` and renames it into place, so a node reloading on SIGHUP
/// never reads a half-written file.
fn replace_file(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    if secret {
        write_secret(&tmp, contents)?;
    } else {
        write_public(&tmp, contents)?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// A new self-signed cluster CA: (parameters, key, certificate PEM). Its name carries a random
/// suffix so that the CAs of successive rotations are told apart.
fn new_ca(cluster: &str) -> Result<(CertificateParams, KeyPair, String)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{cluster} cluster CA {}", random_hex(4)),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).context("self-signing the CA")?;
    Ok((params, key, cert.pem()))
}

/// Which certificate to issue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CertUse {
    /// The mesh identity: TLS server and client at once.
    Peer,
    /// The HTTP API: server only, so it cannot be used to join the mesh as a client.
    Http,
}

/// Issues a certificate for node `name`, valid for it, `localhost`, 127.0.0.1 and `extra`
/// (host names or IP addresses). Returns (certificate PEM, key PEM).
fn issue(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    extra: &[String],
    usage: CertUse,
) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating a node key")?;
    let mut params = CertificateParams::new(vec![name.to_owned(), "localhost".to_owned()])
        .context("node certificate parameters")?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    for host in extra {
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.clone()
                    .try_into()
                    .with_context(|| format!("{host:?} is not a valid host name"))?,
            ),
        };
        if !params.subject_alt_names.contains(&san) {
            params.subject_alt_names.push(san);
        }
    }
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_owned());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match usage {
        CertUse::Peer => vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
        CertUse::Http => vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
    };
    let cert = params
        .signed_by(&key, issuer)
        .context("signing a node certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a node's mesh certificate (`node.pem`, `node.key`) and its HTTP API certificate
/// (`http.pem`, `http.key`) into `node_dir`, both signed by the cluster CA and naming the
/// node, `localhost`, 127.0.0.1 and `bind` when that is a routable address.
pub(super) fn issue_node_cert(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    bind: IpAddr,
    node_dir: &Path,
) -> Result<()> {
    let hosts = hosts_of(&[bind], &[]);
    let (cert, key) = issue(issuer, name, &hosts, CertUse::Peer)?;
    write_public(&node_dir.join("node.pem"), &cert)?;
    write_secret(&node_dir.join("node.key"), &key)?;
    let (cert, key) = issue(issuer, name, &hosts, CertUse::Http)?;
    write_public(&node_dir.join("http.pem"), &cert)?;
    write_secret(&node_dir.join("http.key"), &key)?;
    Ok(())
}

/// The config of a node added to an existing cluster, HTTPS on, with `peers` as its
/// `[[peers]]`; cluster-wide sections (`[auth]`, limits, ...) are copied from a member's
/// config by the caller.
pub(super) fn node_config(plan: &NodePlan, cluster: &str, peers: &[&NodePlan]) -> String {
    let mut toml = format!(
        "# Written by `meridian cluster init`. Relative paths are relative to this file.\n\
         [node]\nid = {}\nname = \"{}\"\nregion = \"{}\"\ncluster = \"{}\"\ndata_dir = \"data\"\n\n\
         [http]\nlisten = \"{}\"\n\n[http.tls]\ncert = \"http.pem\"\nkey = \"http.key\"\n\n\
         [peer]\nlisten = \"{}\"\n\n\
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

/// The addresses a node's certificates should name besides its name and loopback.
fn hosts_of(addrs: &[IpAddr], extra: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = addrs
        .iter()
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
        .map(ToString::to_string)
        .collect();
    hosts.extend(extra.iter().cloned());
    hosts
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).fold(String::new(), |mut s, _| {
        let _ = write!(s, "{:02x}", rand::random::<u8>());
        s
    })
}

/// The roles `cluster init` issues a token for, one file each under `tokens/`.
pub const TOKEN_ROLES: [&str; 4] = ["admin", "write", "read", "metrics"];

/// Writes `tokens/<role>.token` (the secrets, mode 0600) and `tokens.toml` (their SHA-256
/// digests, which is all the nodes need).
fn write_tokens(dir: &Path) -> Result<()> {
    let tokens_dir = dir.join("tokens");
    std::fs::create_dir_all(&tokens_dir)
        .with_context(|| format!("cannot create {}", tokens_dir.display()))?;
    let mut file = String::from(
        "# Written by `meridian cluster init`: the SHA-256 of each accepted bearer token.\n\
         # Add or remove entries and send SIGHUP to every node; roles: read, write, admin, metrics.\n",
    );
    for role in TOKEN_ROLES {
        let token = format!("mdn_{}", random_hex(32));
        write_secret(&tokens_dir.join(format!("{role}.token")), &token)?;
        let _ = write!(
            file,
            "\n[[tokens]]\nname = \"{role}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            meridian_server::auth::digest_hex(&token)
        );
    }
    write_public(&dir.join("tokens.toml"), &file)
}

/// Reissues every node's mesh and HTTP certificate from the cluster CA in `args.dir`, in
/// place. Nodes pick them up on SIGHUP; connections already up are not interrupted.
pub fn rotate(args: &RotateArgs) -> Result<Vec<String>> {
    let ca_path = args.dir.join("ca.pem");
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read {}", ca_path.display()))?;
    if args.retire_old_cas {
        let first = ca_pem
            .find("-----END CERTIFICATE-----")
            .map(|end| &ca_pem[..end + "-----END CERTIFICATE-----".len()])
            .context("ca.pem holds no certificate")?;
        replace_file(&ca_path, &format!("{}\n", first.trim_start()), false)?;
        return Ok(vec!["ca.pem (old CAs removed)".to_owned()]);
    }
    let issuer = if args.new_ca {
        let (params, key, pem) = new_ca("meridian")?;
        // The new CA first: it is the one that signs from now on.
        replace_file(&ca_path, &format!("{pem}{ca_pem}"), false)?;
        replace_file(&args.dir.join("ca.key"), &key.serialize_pem(), true)?;
        Issuer::new(params, key)
    } else {
        let ca_key_pem = std::fs::read_to_string(args.dir.join("ca.key"))
            .with_context(|| format!("cannot read {}", args.dir.join("ca.key").display()))?;
        let ca_key =
            KeyPair::from_pem(&ca_key_pem).context("ca.key is not a usable private key")?;
        // With several CAs in ca.pem (mid CA rotation), the first one signs.
        Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .context("ca.pem is not a usable CA certificate")?
    };
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&args.dir)
        .with_context(|| format!("cannot read {}", args.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("config.toml")))
        .filter(|p| p.exists())
        .collect();
    configs.sort();
    ensure!(
        !configs.is_empty(),
        "no node directory (with a config.toml) in {}",
        args.dir.display()
    );
    let mut rotated = Vec::new();
    for path in configs {
        let config =
            Config::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
        let mut addrs = vec![config.http.listen.ip()];
        if let Some(peer) = &config.peer {
            addrs.push(peer.listen.ip());
        }
        let hosts = hosts_of(&addrs, &args.http_hosts);
        if let Some(tls) = &config.tls {
            let (cert, key) = issue(
                &issuer,
                &config.node.name,
                &hosts_of(&addrs, &[]),
                CertUse::Peer,
            )?;
            // The key first: until the certificate is replaced too, a reload fails the
            // key-match check and keeps the old pair rather than mixing them.
            replace_file(&config.resolve(&tls.key), &key, true)?;
            replace_file(&config.resolve(&tls.cert), &cert, false)?;
        }
        if let Some(http) = &config.http.tls {
            let (cert, key) = issue(&issuer, &config.node.name, &hosts, CertUse::Http)?;
            replace_file(&config.resolve(&http.key), &key, true)?;
            replace_file(&config.resolve(&http.cert), &cert, false)?;
        }
        rotated.push(config.node.name.clone());
    }
    Ok(rotated)
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
    if args.dir.join("ca.pem").exists() && args.keep_existing {
        eprintln!("{} already holds a cluster; keeping it", args.dir.display());
        return existing_configs(&args.dir);
    }
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
    let (ca_params, ca_key, ca_pem) = new_ca(&args.cluster)?;
    write_public(&args.dir.join("ca.pem"), &ca_pem)?;
    write_secret(&args.dir.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let secret: [u8; 32] = rand::random();
    let secret_hex: String = secret.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    write_secret(&args.dir.join("session.secret"), &secret_hex)?;
    if !args.no_auth {
        write_tokens(&args.dir)?;
    }

    let mut configs = Vec::new();
    for plan in &plans {
        let node_dir = args.dir.join(&plan.name);
        std::fs::create_dir_all(node_dir.join("data"))
            .with_context(|| format!("cannot create {}", node_dir.display()))?;
        let hosts = hosts_of(&[args.bind], &[]);
        let (cert, key) = issue(&issuer, &plan.name, &hosts, CertUse::Peer)?;
        write_public(&node_dir.join("node.pem"), &cert)?;
        write_secret(&node_dir.join("node.key"), &key)?;
        let http_section = if args.http_plaintext {
            "plaintext = true\n".to_owned()
        } else {
            let (cert, key) = issue(
                &issuer,
                &plan.name,
                &hosts_of(&[args.bind], &args.http_hosts),
                CertUse::Http,
            )?;
            write_public(&node_dir.join("http.pem"), &cert)?;
            write_secret(&node_dir.join("http.key"), &key)?;
            "\n[http.tls]\ncert = \"http.pem\"\nkey = \"http.key\"\n".to_owned()
        };
        let auth_section = if args.no_auth {
            "[auth]\nenabled = false\n"
        } else {
            "[auth]\nenabled = true\ntokens_file = \"../tokens.toml\"\n"
        };

        let mut toml = format!(
            "# Written by `meridian cluster init`. Relative paths are relative to this file.\n\
             [node]\nid = {}\nname = \"{}\"\nregion = \"{}\"\ncluster = \"{}\"\ndata_dir = \"data\"\n\n\
             [http]\nlisten = \"{}\"\n{http_section}\n{auth_section}\n[peer]\nlisten = \"{}\"\n\n\
             [tls]\nca = \"../ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n\n\
             [session]\nsecret_file = \"../session.secret\"\n",
            plan.id, plan.name, plan.region, args.cluster, plan.http, plan.peer
        );
        for other in plans.iter().filter(|p| p.id != plan.id) {
            let _ = write!(
                toml,
                "\n[[peers]]\nid = {}\nname = \"{}\"\nregion = \"{}\"\naddress = \"{}\"\n",
                other.id, other.name, other.region, other.peer_host
            );
        }
        let path = node_dir.join("config.toml");
        write_public(&path, &toml)?;
        Config::load(&path)
            .with_context(|| format!("the generated {} does not load", path.display()))?;
        configs.push(path);
    }
    Ok(configs)
}

/// The node configs of a cluster directory written earlier.
fn existing_configs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("config.toml")))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    Ok(found)
}

/// Initialises a loopback cluster once, then runs all its nodes in this process.
pub fn dev(args: DevArgs) -> Result<()> {
    super::serve::init_logging(super::serve::LogFormat::Text);
    let configs = if args.dir.join("ca.pem").exists() {
        existing_configs(&args.dir)?
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
            http_hosts: Vec::new(),
            http_plaintext: false,
            no_auth: false,
            keep_existing: false,
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
        let tls = configs.iter().any(|c| c.http.tls.is_some());
        let auth = configs.iter().any(|c| c.auth.as_ref().is_some_and(|a| a.enabled));
        // Existing configs keep the ports they were made with, whatever --base-port says now.
        let first_http = configs.first().map(|config| config.http.listen);
        for config in configs {
            let name = config.node.name.clone();
            let region = config.node.region.clone();
            let token = shutdown.clone();
            let scheme = if config.http.tls.is_some() { "https" } else { "http" };
            nodes.spawn(async move {
                meridian_server::node::run(config, token, move |addr| {
                    println!("{region:>10}  {name:<12} {scheme}://{addr}");
                })
                .await
            });
        }
        println!(
            "Meridian dev cluster in {} — Ctrl-C to stop",
            args.dir.display()
        );
        if tls || auth {
            println!("To use it from another terminal:");
        }
        if tls {
            println!("  export MERIDIAN_CA={}", args.dir.join("ca.pem").display());
        }
        if auth {
            println!(
                "  export MERIDIAN_TOKEN_FILE={}   # or write.token, read.token; metrics.token for /metrics",
                args.dir.join("tokens").join("admin.token").display()
            );
        }
        if tls || auth {
            let scheme = if tls { "https" } else { "http" };
            if let Some(first) = &first_http {
                println!("  export MERIDIAN_URL={scheme}://{first}");
            }
            println!("  meridian put greeting hello");
        }
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
