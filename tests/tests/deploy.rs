//! The deploy files, exercised without Docker or Kubernetes (deploy/validate.sh does the schema
//! checks; these check what no schema can):
//!
//! - the `init` command line and every node's command line of `deploy/docker-compose.yml` run
//!   as plain processes, each with its own data directory, and the regions converge;
//! - the Kubernetes manifests carry exactly the configs `cluster init` writes, and every path,
//!   port, probe and peer name in them fits those configs;
//! - every metric the Grafana dashboard queries is exported by a running node;
//! - the Dockerfile keeps the rules listed in deploy/README.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meridian_tests::config::{NodeConfig, PeerConfig};
use meridian_tests::{Client, Cluster, ClusterSpec, Node, NodeLaunch, meridian_bin, ports};
use reqwest::Method;
use serde_json::{Value as Json, json};
use serde_norway::Value as Yaml;

const CONVERGE: Duration = Duration::from_secs(30);

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A YAML file with `<<` merge keys applied (compose uses them).
fn read_yaml(path: &Path) -> Yaml {
    let mut value: Yaml = serde_norway::from_str(&read(path))
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    value.apply_merge().unwrap();
    value
}

/// Every document of a multi-document YAML file.
fn read_yaml_docs(path: &Path) -> Vec<Yaml> {
    use serde::Deserialize as _;
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_of(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn strings(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::Sequence(items) => items.iter().map(str_of).collect(),
        Yaml::Null => Vec::new(),
        other => panic!("expected a list (exec form), found {other:?}"),
    }
}

/// The value after `flag` in an argument list.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

// ---------------------------------------------------------------------------------------------
// docker compose

/// One compose service, as far as running it as a process needs.
#[derive(Debug)]
struct Service {
    name: String,
    entrypoint: Option<Vec<String>>,
    command: Vec<String>,
    environment: Vec<(String, String)>,
    /// (named volume, mount point in the container).
    volumes: Vec<(String, String)>,
    networks: BTreeSet<String>,
    hostname: Option<String>,
    /// `healthcheck.test`, exec form.
    healthcheck: Vec<String>,
}

struct Compose {
    services: BTreeMap<String, Service>,
}

impl Compose {
    fn load() -> Self {
        let doc = read_yaml(&deploy_dir().join("docker-compose.yml"));
        let mut services = BTreeMap::new();
        for (name, spec) in doc["services"].as_mapping().expect("services") {
            let name = str_of(name);
            let environment = match &spec["environment"] {
                Yaml::Mapping(map) => map.iter().map(|(k, v)| (str_of(k), str_of(v))).collect(),
                Yaml::Sequence(items) => items
                    .iter()
                    .map(|item| {
                        let item = str_of(item);
                        let (k, v) = item.split_once('=').expect("environment: K=V");
                        (k.to_owned(), v.to_owned())
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let volumes = strings(&spec["volumes"])
                .iter()
                .map(|v| {
                    let mut parts = v.split(':');
                    let source = parts.next().unwrap().to_owned();
                    let target = parts.next().expect("volume target").to_owned();
                    assert!(
                        !source.starts_with(['.', '/', '~']),
                        "{name}: bind mount {v}: the test maps named volumes only"
                    );
                    (source, target)
                })
                .collect();
            let networks = match &spec["networks"] {
                Yaml::Sequence(_) => strings(&spec["networks"]).into_iter().collect(),
                Yaml::Mapping(map) => map.keys().map(str_of).collect(),
                _ => BTreeSet::new(),
            };
            let service = Service {
                name: name.clone(),
                entrypoint: (!spec["entrypoint"].is_null()).then(|| strings(&spec["entrypoint"])),
                command: strings(&spec["command"]),
                environment,
                volumes,
                networks,
                hostname: spec["hostname"].as_str().map(str::to_owned),
                healthcheck: strings(&spec["healthcheck"]["test"]),
            };
            services.insert(name, service);
        }
        Self { services }
    }

    fn service(&self, name: &str) -> &Service {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
    }

    /// The services that run a node (`meridian serve`), in file order of their names' sort.
    fn nodes(&self) -> Vec<&Service> {
        self.services
            .values()
            .filter(|s| s.command.first().map(String::as_str) == Some("serve"))
            .collect()
    }
}

impl Service {
    /// Maps a path inside the container to the host directory standing in for its volume
    /// (`root/volumes/<name>`); other arguments are returned as they are.
    fn on_host(&self, root: &Path, arg: &str) -> String {
        let mount = self
            .volumes
            .iter()
            .filter(|(_, target)| arg == target || arg.starts_with(&format!("{target}/")))
            .max_by_key(|(_, target)| target.len());
        match mount {
            Some((volume, target)) => {
                let host = root.join("volumes").join(volume);
                std::fs::create_dir_all(&host).unwrap();
                format!("{}{}", host.display(), &arg[target.len()..])
            }
            None => arg.to_owned(),
        }
    }

    fn args_on_host(&self, root: &Path) -> Vec<String> {
        self.command.iter().map(|a| self.on_host(root, a)).collect()
    }

    fn env(&self, name: &str) -> Option<&str> {
        self.environment
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Runs the compose `init` service's command line; returns the cluster directory on the host.
fn run_compose_init(compose: &Compose, root: &Path) -> PathBuf {
    let init = compose.service("init");
    // Compose runs the image's ENTRYPOINT (`meridian`, checked in the Dockerfile test) with
    // the service's command.
    assert!(
        init.entrypoint.is_none(),
        "init overrides the entrypoint; this test runs `meridian <command>`"
    );
    let args = init.args_on_host(root);
    assert_eq!(&args[..2], ["cluster", "init"], "init runs `cluster init`");
    let dir = PathBuf::from(flag_value(&args, "--dir").expect("init passes --dir"));
    for _ in 0..2 {
        // Twice: a second `docker compose up` runs init again and must keep the cluster.
        let ca_before = std::fs::read(dir.join("ca.pem")).ok();
        let output = Command::new(meridian_bin().unwrap())
            .args(&args)
            .envs(init.environment.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "meridian {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if let Some(before) = ca_before {
            assert_eq!(
                before,
                std::fs::read(dir.join("ca.pem")).unwrap(),
                "a second init replaced the CA"
            );
        }
    }
    dir
}

/// The parts of a generated config the deploy files must agree with.
#[derive(Debug)]
struct Generated {
    table: toml::Table,
    id: u64,
    name: String,
    region: String,
    peer_listen: SocketAddr,
    /// (peer name, address as written: `host:port`).
    peers: Vec<(String, String)>,
}

fn load_generated(path: &Path) -> Generated {
    let table: toml::Table = read(path).parse().unwrap();
    let node = &table["node"];
    let peers = table
        .get("peers")
        .and_then(toml::Value::as_array)
        .map(|peers| {
            peers
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_owned(),
                        p["address"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Generated {
        id: node["id"].as_integer().unwrap() as u64,
        name: node["name"].as_str().unwrap().to_owned(),
        region: node["region"].as_str().unwrap().to_owned(),
        peer_listen: table["peer"]["listen"].as_str().unwrap().parse().unwrap(),
        peers,
        table,
    }
}

fn split_host_port(address: &str) -> (&str, u16) {
    let (host, port) = address.rsplit_once(':').expect("host:port");
    (host, port.parse().expect("port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_configs_run_as_processes_and_converge() {
    let compose = Compose::load();
    let root = tempfile::Builder::new()
        .prefix("meridian-compose-")
        .tempdir()
        .unwrap();
    run_compose_init(&compose, root.path());

    let services = compose.nodes();
    let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["ap-south-1", "eu-west-1", "us-east-1"]),
        "one node service per region"
    );
    let generated: Vec<Generated> = services
        .iter()
        .map(|s| {
            let config = flag_value(&s.command, "--config").expect("serve --config");
            load_generated(Path::new(&s.on_host(root.path(), config)))
        })
        .collect();

    // `cluster init`'s defaults are what compose runs: HTTPS and bearer tokens on every node,
    // with every file the config names inside the node's read-only cluster volume.
    for (service, config) in services.iter().zip(&generated) {
        let table = &config.table;
        assert!(
            table["http"].get("tls").is_some(),
            "{}: HTTP without TLS",
            service.name
        );
        assert_eq!(
            table["auth"]["enabled"].as_bool(),
            Some(true),
            "{}",
            service.name
        );
        let config_path = PathBuf::from(flag_value(&service.command, "--config").unwrap());
        for file in [
            &table["http"]["tls"]["cert"],
            &table["http"]["tls"]["key"],
            &table["auth"]["tokens_file"],
        ] {
            let path = normalize(&config_path.parent().unwrap().join(file.as_str().unwrap()));
            let host = service.on_host(root.path(), path.to_str().unwrap());
            assert!(
                Path::new(&host).is_file(),
                "{}: {} is not in its volumes",
                service.name,
                path.display()
            );
        }
        // The port speaks only TLS and /healthz needs no token: the check is an HTTPS GET
        // with no Authorization header.
        let check = service.healthcheck.join(" ");
        assert!(
            check.contains("https://") && check.contains("/healthz"),
            "{}: healthcheck {check:?} is not an HTTPS GET of /healthz",
            service.name
        );
        assert!(
            !check.contains("Authorization"),
            "{}: {check}",
            service.name
        );
    }

    // What the container network must provide, checked before the test replaces it: every
    // peer address names a service this one shares a network with (compose DNS), at the port
    // that service's own config listens on.
    for (service, config) in services.iter().zip(&generated) {
        assert_eq!(
            config.name, service.name,
            "the service is named after its node"
        );
        assert_eq!(service.hostname.as_deref(), Some(config.name.as_str()));
        for (peer, address) in &config.peers {
            let (host, port) = split_host_port(address);
            let target = compose.service(host);
            assert!(
                !service.networks.is_disjoint(&target.networks),
                "{} cannot reach {host}: no shared network",
                service.name
            );
            let target_config = &generated[services.iter().position(|s| s.name == host).unwrap()];
            assert_eq!(&target_config.name, peer);
            assert_eq!(target_config.peer_listen.port(), port, "{address}");
        }
    }

    // Each container has its own IP address; on one host, each process gets its own ports.
    let base = ports::pick_base_port(services.len()).unwrap();
    let http = |i: usize| SocketAddr::from(([127, 0, 0, 1], base + i as u16));
    let peer =
        |i: usize| SocketAddr::from(([127, 0, 0, 1], base + ports::PEER_PORT_OFFSET + i as u16));
    let bin = meridian_bin().unwrap();
    let mut nodes = Vec::new();
    for (i, (service, config)) in services.iter().zip(&generated).enumerate() {
        let mut args = service.args_on_host(root.path());
        let listen = args
            .iter()
            .position(|a| a == "--http-listen")
            .expect("compose sets each node's HTTP address with --http-listen");
        args[listen + 1] = http(i).to_string();
        args.extend(["--peer-listen".to_owned(), peer(i).to_string()]);
        let mut peers = Vec::new();
        for (name, _) in &config.peers {
            let j = services.iter().position(|s| &s.name == name).unwrap();
            args.extend(["--peer-address".to_owned(), format!("{name}={}", peer(j))]);
            peers.push(PeerConfig {
                id: generated[j].id,
                name: name.clone(),
                region: generated[j].region.clone(),
                address: peer(j),
            });
        }
        let data_dir = PathBuf::from(flag_value(&args, "--data-dir").expect("--data-dir"));
        let config_path = PathBuf::from(flag_value(&args, "--config").unwrap());
        let dir = root.path().join("logs").join(&service.name);
        std::fs::create_dir_all(&dir).unwrap();
        let node = Node::launch(NodeLaunch {
            index: i,
            config: NodeConfig {
                id: config.id,
                name: config.name.clone(),
                region: config.region.clone(),
                data_dir: data_dir.clone(),
                http: http(i),
                peer: peer(i),
                peers,
                https: config.table["http"].get("tls").is_some(),
            },
            dir,
            config_path,
            data_dir,
            args: args.into_iter().map(Into::into).collect(),
            env: service.environment.clone(),
            bin: bin.clone(),
        })
        .unwrap();
        nodes.push(node);
    }
    for node in &nodes {
        node.spawn().unwrap();
    }
    for node in &nodes {
        node.wait_ready(Duration::from_secs(30)).await.unwrap();
    }
    let tails = || nodes.iter().map(|n| n.log_tails(30)).collect::<String>();

    // The `client` service reaches a node with the CA and token it takes from the cluster
    // volume; without the token it is refused.
    let client = compose.service("client");
    let url = client.env("MERIDIAN_URL").expect("client: MERIDIAN_URL");
    let (host, port) = split_host_port(url.strip_prefix("https://").expect("an https URL"));
    let target = compose.service(host);
    assert!(
        !client.networks.is_disjoint(&target.networks),
        "the client cannot reach {host}"
    );
    let i = services.iter().position(|s| s.name == host).unwrap();
    let http_listen = flag_value(&target.command, "--http-listen").unwrap();
    assert_eq!(split_host_port(http_listen).1, port, "{url}");
    let mut env: BTreeMap<String, String> = client
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), client.on_host(root.path(), v)))
        .collect();
    env.insert("MERIDIAN_URL".to_owned(), format!("https://{}", http(i)));
    for name in ["MERIDIAN_CA", "MERIDIAN_TOKEN_FILE"] {
        let file = env.get(name).unwrap_or_else(|| panic!("client: no {name}"));
        assert!(
            Path::new(file).is_file(),
            "client: {name} {file} not in its volume"
        );
    }
    let run_client = |env: &BTreeMap<String, String>| {
        Command::new(&bin)
            .args(client.args_on_host(root.path()))
            .env_clear()
            .envs(env)
            .output()
            .unwrap()
    };
    let output = run_client(&env);
    assert!(
        output.status.success(),
        "the client service failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        tails()
    );
    env.remove("MERIDIAN_TOKEN_FILE");
    let output = run_client(&env);
    assert!(
        !output.status.success(),
        "a node answered the client without a token"
    );

    // A write in every region.
    for (i, node) in nodes.iter().enumerate() {
        let client = node.client();
        client.incr("compose-hits", i as i64 + 1).await.unwrap();
        client
            .set_add("compose-regions", &[json!(node.region())])
            .await
            .unwrap();
        client
            .put_register(&format!("from-{}", node.region()), &json!(node.name()))
            .await
            .unwrap();
    }
    let clients: Vec<Client> = nodes.iter().map(Node::client).collect();
    let expected_sum: i64 = (1..=nodes.len() as i64).sum();
    let sum = meridian_tests::wait_all_equal(CONVERGE, "the counter", &clients, |c| async move {
        let value = c.counter("compose-hits").await?;
        anyhow::ensure!(value == expected_sum, "counter at {value}");
        Ok(value)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", tails()));
    assert_eq!(sum, expected_sum);
    let mut regions: Vec<Json> = nodes.iter().map(|n| json!(n.region())).collect();
    regions.sort_by_key(ToString::to_string);
    let want = regions.clone();
    meridian_tests::wait_all_equal(CONVERGE, "the set", &clients, |c| {
        let want = want.clone();
        async move {
            let mut elements = c.set_elements("compose-regions").await?;
            elements.sort_by_key(ToString::to_string);
            anyhow::ensure!(elements == want, "set is {elements:?}");
            Ok(elements)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", tails()));
    for node in &nodes {
        for other in &nodes {
            let value = other
                .client()
                .register_value(&format!("from-{}", node.region()))
                .await
                .unwrap();
            assert_eq!(
                value,
                Some(json!(node.name())),
                "{} on {}",
                node.name(),
                other.name()
            );
        }
    }

    // The peers each node reports are the compose services, by name, connected.
    for node in &nodes {
        let info = node.client().cluster_info().await.unwrap();
        let mut peers: Vec<String> = info["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        peers.sort();
        let mut want: Vec<String> = names
            .iter()
            .filter(|n| **n != node.name())
            .map(|n| (*n).to_owned())
            .collect();
        want.sort();
        assert_eq!(peers, want);
    }

    // `docker compose stop` sends SIGTERM: every node drains and exits cleanly.
    for node in &nodes {
        let status = node.stop().await.unwrap();
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            node.name(),
            tails()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

struct Manifests {
    by_kind: BTreeMap<(String, String), Yaml>,
}

impl Manifests {
    fn load() -> (Self, Vec<String>) {
        let dir = deploy_dir().join("k8s");
        let mut by_kind = BTreeMap::new();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.extension().is_none_or(|e| e != "yaml") || name == "kustomization.yaml" {
                continue;
            }
            files.push(name);
            for doc in read_yaml_docs(&path) {
                let key = (str_of(&doc["kind"]), str_of(&doc["metadata"]["name"]));
                assert!(
                    by_kind.insert(key.clone(), doc).is_none(),
                    "{key:?} defined twice"
                );
            }
        }
        files.sort();
        (Self { by_kind }, files)
    }

    fn get(&self, kind: &str, name: &str) -> &Yaml {
        self.by_kind
            .get(&(kind.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no {kind} {name:?} in deploy/k8s"))
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Yaml> + 'a {
        self.by_kind
            .iter()
            .filter(move |((k, _), _)| k == kind)
            .map(|(_, doc)| doc)
    }
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let Some(selector) = selector.as_mapping() else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The files a projected volume provides, by path under its mount: (kind, object, key, optional).
fn projected_files(volume: &Yaml) -> BTreeMap<String, (String, String, String, bool)> {
    let mut files = BTreeMap::new();
    for source in volume["projected"]["sources"]
        .as_sequence()
        .expect("a projected volume")
    {
        for kind in ["configMap", "secret"] {
            let spec = &source[kind];
            if spec.is_null() {
                continue;
            }
            let optional = spec["optional"].as_bool().unwrap_or(false);
            for item in spec["items"].as_sequence().expect("explicit items") {
                files.insert(
                    str_of(&item["path"]),
                    (
                        kind.to_owned(),
                        str_of(&spec["name"]),
                        str_of(&item["key"]),
                        optional,
                    ),
                );
            }
        }
    }
    files
}

#[test]
fn kubernetes_manifests_fit_the_configs_cluster_init_writes() {
    let (manifests, files) = Manifests::load();
    let kustomization = read_yaml(&deploy_dir().join("k8s/kustomization.yaml"));
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    assert_eq!(
        listed,
        files.iter().cloned().collect(),
        "kustomization.yaml lists every manifest"
    );

    // The configs: exactly what compose's init command writes.
    let compose = Compose::load();
    let root = tempfile::tempdir().unwrap();
    let cluster_dir = run_compose_init(&compose, root.path());
    let init_args = &compose.service("init").command;
    let regions: Vec<&str> = flag_value(init_args, "--regions")
        .unwrap()
        .split(',')
        .collect();

    let pod_labels = |region: &str| {
        manifests.get("StatefulSet", &format!("meridian-{region}"))["spec"]["template"]["metadata"]
            ["labels"]
            .clone()
    };
    for region in &regions {
        let node = format!("{region}-1");
        let generated = load_generated(&cluster_dir.join(&node).join("config.toml"));
        let config_map = manifests.get("ConfigMap", &format!("meridian-{node}"));
        let shipped: toml::Table = str_of(&config_map["data"]["config.toml"]).parse().unwrap();
        assert_eq!(
            shipped, generated.table,
            "the ConfigMap of {node} is not what `cluster init` writes"
        );

        let set = manifests.get("StatefulSet", &format!("meridian-{region}"));
        let spec = &set["spec"];
        let labels = pod_labels(region);
        assert_eq!(
            spec["replicas"].as_u64(),
            Some(1),
            "{region}: one node per config"
        );
        assert!(selects(&spec["selector"]["matchLabels"], &labels));
        let governing = manifests.get("Service", &str_of(&spec["serviceName"]));
        assert_eq!(str_of(&governing["spec"]["clusterIP"]), "None", "headless");
        assert!(selects(&governing["spec"]["selector"], &labels));

        let pod = &spec["template"]["spec"];
        let containers = pod["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1);
        let container = &containers[0];
        let args = strings(&container["args"]);
        assert_eq!(args[0], "serve");

        // Every path the config names resolves to a file of the projected volume.
        let config_path = PathBuf::from(flag_value(&args, "--config").unwrap());
        let mounts = container["volumeMounts"].as_sequence().unwrap();
        let mount_of = |path: &Path| {
            mounts
                .iter()
                .filter(|m| path.starts_with(str_of(&m["mountPath"])))
                .max_by_key(|m| str_of(&m["mountPath"]).len())
                .unwrap_or_else(|| panic!("{region}: nothing mounted at {}", path.display()))
        };
        let volume_named = |name: &str| {
            pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| str_of(&v["name"]) == name)
                .unwrap_or_else(|| panic!("{region}: no volume {name}"))
                .clone()
        };
        let etc = mount_of(&config_path);
        assert_eq!(etc["readOnly"].as_bool(), Some(true));
        let etc_path = PathBuf::from(str_of(&etc["mountPath"]));
        let provided = projected_files(&volume_named(&str_of(&etc["name"])));
        let in_volume = |path: &Path| {
            let relative = normalize(path).strip_prefix(&etc_path).unwrap().to_owned();
            provided
                .get(relative.to_str().unwrap())
                .unwrap_or_else(|| panic!("{region}: {} is not projected", path.display()))
                .clone()
        };
        assert_eq!(
            in_volume(&config_path),
            (
                "configMap".to_owned(),
                format!("meridian-{node}"),
                "config.toml".to_owned(),
                false
            )
        );
        let config_dir = config_path.parent().unwrap();
        let table = &generated.table;
        assert!(
            table["http"].get("tls").is_some(),
            "{region}: the config serves HTTP without TLS"
        );
        assert_eq!(
            table["auth"]["enabled"].as_bool(),
            Some(true),
            "{region}: auth is off"
        );
        for file in [
            &table["tls"]["ca"],
            &table["tls"]["cert"],
            &table["tls"]["key"],
            &table["session"]["secret_file"],
            &table["http"]["tls"]["cert"],
            &table["http"]["tls"]["key"],
            &table["auth"]["tokens_file"],
        ] {
            let (kind, _, _, optional) = in_volume(&config_dir.join(file.as_str().unwrap()));
            assert_eq!(kind, "secret", "{region}: {file} comes from a Secret");
            assert!(!optional, "{region}: {file} is required");
        }
        // The mesh and the HTTP API have their own key pairs, each from the secret of this
        // node; nodes get the tokens' digests, never the tokens, nor the CA key.
        let secret_of = |file: &toml::Value| {
            let (_, name, key, _) = in_volume(&config_dir.join(file.as_str().unwrap()));
            (name, key)
        };
        let mesh = secret_of(&table["tls"]["key"]).0;
        let http_key = secret_of(&table["http"]["tls"]["key"]).0;
        assert_ne!(mesh, http_key, "{region}: one secret for both key pairs");
        for name in [&mesh, &http_key] {
            assert!(name.contains(&node), "{region}: {name} is not {node}'s own");
        }
        assert_eq!(
            secret_of(&table["http"]["tls"]["cert"]).0,
            http_key,
            "{region}: the HTTP certificate and key come from different secrets"
        );
        for (path, (_, name, key, _)) in &provided {
            assert!(
                !path.contains("tokens/")
                    && !Path::new(path.as_str())
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("token"))
                    && path != "ca.key",
                "{region}: {path} ({name}/{key}) does not belong on a node"
            );
        }

        // Data on the claim of a volumeClaimTemplate.
        let data = PathBuf::from(flag_value(&args, "--data-dir").unwrap());
        let claims: Vec<String> = spec["volumeClaimTemplates"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| str_of(&c["metadata"]["name"]))
            .collect();
        assert!(
            claims.contains(&str_of(&mount_of(&data)["name"])),
            "{region}: the data directory is on a PVC"
        );

        // Ports and probes.
        let http_port = flag_value(&args, "--http-listen")
            .unwrap()
            .parse::<SocketAddr>()
            .unwrap()
            .port();
        let port_named = |name: &str| {
            container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| str_of(&p["name"]) == name)
                .unwrap_or_else(|| panic!("{region}: no container port {name}"))
                .clone()
        };
        assert_eq!(
            port_named("http")["containerPort"].as_u64(),
            Some(u64::from(http_port))
        );
        let peer_port = port_named("peer");
        assert_eq!(
            peer_port["containerPort"].as_u64(),
            Some(u64::from(generated.peer_listen.port()))
        );
        assert_eq!(str_of(&peer_port["protocol"]), "UDP");
        for (probe, path) in [
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
            ("startupProbe", "/healthz"),
        ] {
            let get = &container[probe]["httpGet"];
            assert_eq!(str_of(&get["path"]), path, "{region} {probe}");
            // The port speaks only TLS; the probed routes are open, so no header carries a
            // token.
            assert_eq!(str_of(&get["scheme"]), "HTTPS", "{region} {probe}");
            assert!(get["httpHeaders"].is_null(), "{region} {probe}");
            assert!(
                str_of(&get["port"]) == "http"
                    || get["port"].as_u64() == Some(u64::from(http_port)),
                "{region} {probe} probes the HTTP port"
            );
        }

        // Non-root, read-only, no privilege escalation, bounded.
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
        let pod_security = &pod["securityContext"];
        assert!(
            security["runAsNonRoot"].as_bool() == Some(true)
                || pod_security["runAsNonRoot"].as_bool() == Some(true)
        );
        assert!(
            pod_security["runAsUser"]
                .as_u64()
                .is_some_and(|uid| uid != 0)
        );
        let resources = &container["resources"];
        for key in ["cpu", "memory"] {
            assert!(
                !resources["requests"][key].is_null(),
                "{region}: requests.{key}"
            );
        }
        assert!(
            !resources["limits"]["memory"].is_null(),
            "{region}: limits.memory"
        );

        // The peer Service other nodes dial, named as the configs name this node.
        let peer_service = manifests.get("Service", &node);
        assert!(selects(&peer_service["spec"]["selector"], &labels));
        assert_eq!(
            peer_service["spec"]["publishNotReadyAddresses"].as_bool(),
            Some(true)
        );
        // Every peer address of this node is a Service with that UDP port.
        for (peer, address) in &generated.peers {
            let (host, port) = split_host_port(address);
            assert_eq!(host, peer);
            let service = manifests.get("Service", host);
            assert!(
                service["spec"]["ports"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|p| {
                        p["port"].as_u64() == Some(u64::from(port))
                            && str_of(&p["protocol"]) == "UDP"
                    }),
                "Service {host} does not expose UDP {port}"
            );
        }

        // The HTTP Service and the disruption budget cover this region's pod.
        assert!(selects(
            &manifests.get("Service", &format!("meridian-{region}"))["spec"]["selector"],
            &labels
        ));
        assert!(selects(
            &manifests.get("PodDisruptionBudget", &format!("meridian-{region}"))["spec"]["selector"]
                ["matchLabels"],
            &labels
        ));
    }

    // The QUIC ports are open to Meridian pods only.
    let policies: Vec<&Yaml> = manifests.of_kind("NetworkPolicy").collect();
    assert_eq!(policies.len(), 1);
    let policy = &policies[0]["spec"];
    for region in &regions {
        assert!(selects(
            &policy["podSelector"]["matchLabels"],
            &pod_labels(region)
        ));
        let node = format!("{region}-1");
        let peer_port = load_generated(&cluster_dir.join(&node).join("config.toml"))
            .peer_listen
            .port();
        let rules = policy["ingress"].as_sequence().unwrap();
        let covering: Vec<&Yaml> = rules
            .iter()
            .filter(|rule| {
                rule["ports"].as_sequence().is_some_and(|ports| {
                    ports.iter().any(|p| {
                        let from = p["port"].as_u64().unwrap_or(0);
                        let to = p["endPort"].as_u64().unwrap_or(from);
                        str_of(&p["protocol"]) == "UDP"
                            && (from..=to).contains(&u64::from(peer_port))
                    })
                }) || rule["ports"].is_null()
            })
            .collect();
        assert!(
            !covering.is_empty(),
            "UDP {peer_port} is not allowed at all"
        );
        for rule in covering {
            let from = rule["from"]
                .as_sequence()
                .expect("UDP only from listed peers");
            assert!(from.iter().all(|peer| {
                let labels = pod_labels(region);
                selects(&peer["podSelector"]["matchLabels"], &labels)
                    && peer["namespaceSelector"].is_null()
                    && peer["ipBlock"].is_null()
            }));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana

/// Grafana's variables, replaced by something PromQL parses.
fn substitute_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
}

/// Every query of the dashboard (panel targets, nested rows, templating queries).
fn dashboard_queries(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Json::String(expr)) => out.push(expr.clone()),
                    ("query" | "definition", Json::String(q)) if q.starts_with("label_values(") => {
                        out.push(q.clone());
                    }
                    _ => dashboard_queries(value, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// A selector a query uses: the metric and the labels it matches or groups on.
#[derive(Debug, Default)]
struct Uses {
    metrics: BTreeSet<String>,
    /// metric → label names used in matchers.
    matchers: BTreeMap<String, BTreeSet<String>>,
    /// (labels grouped by, metrics under the aggregation).
    groupings: Vec<(BTreeSet<String>, BTreeSet<String>)>,
}

struct Collect<'a>(&'a mut Uses);

impl promql_parser::util::ExprVisitor for Collect<'_> {
    type Error = String;

    fn pre_visit(&mut self, expr: &promql_parser::parser::Expr) -> Result<bool, String> {
        use promql_parser::parser::{Expr, LabelModifier};
        let selector = match expr {
            Expr::VectorSelector(vs) => Some(vs),
            Expr::MatrixSelector(ms) => Some(&ms.vs),
            Expr::Aggregate(aggregate) => {
                if let Some(LabelModifier::Include(labels)) = &aggregate.modifier {
                    let mut inner = Uses::default();
                    promql_parser::util::walk_expr(&mut Collect(&mut inner), &aggregate.expr)?;
                    self.0
                        .groupings
                        .push((labels.labels.iter().cloned().collect(), inner.metrics));
                }
                None
            }
            _ => None,
        };
        if let Some(vs) = selector {
            let name = vs.name.clone().ok_or("a selector without a metric name")?;
            self.0.metrics.insert(name.clone());
            self.0
                .matchers
                .entry(name)
                .or_default()
                .extend(vs.matchers.matchers.iter().map(|m| m.name.clone()));
        }
        Ok(true)
    }
}

/// Sample names of a Prometheus/OpenMetrics text, each with the label names seen on it.
/// (prometheus-client omits families without samples, so the test makes traffic of every kind.)
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut metrics: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = metrics.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            // name="value",... with escapes inside the quoted values.
            let mut rest = &line[end + 1..];
            while let Some(eq) = rest.find('=') {
                labels.insert(rest[..eq].trim_start_matches(',').to_owned());
                let mut chars = rest[eq + 1..].char_indices().skip(1);
                let mut close = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            close = Some(eq + 1 + i);
                            break;
                        }
                        _ => {}
                    }
                }
                let close = close.expect("a closed label value");
                rest = &rest[close + 1..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
    }
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_only_metrics_a_node_exports() {
    let dashboard: Json =
        serde_json::from_str(&read(&deploy_dir().join("grafana/meridian.json"))).unwrap();
    assert!(dashboard["uid"].is_string() && dashboard["panels"].is_array());
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 20, "found only {} queries", queries.len());
    let mut uses = Uses::default();
    for query in &queries {
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            let (metric, label) = args.split_once(',').expect("label_values(metric, label)");
            uses.metrics.insert(metric.trim().to_owned());
            uses.matchers
                .entry(metric.trim().to_owned())
                .or_default()
                .insert(label.trim().to_owned());
            continue;
        }
        let expr = promql_parser::parser::parse(&substitute_grafana_variables(query))
            .unwrap_or_else(|e| panic!("the dashboard's query {query:?} is not PromQL: {e}"));
        promql_parser::util::walk_expr(&mut Collect(&mut uses), &expr).unwrap();
    }

    // Two regions, with traffic of every kind the dashboard shows: writes and reads at two
    // levels, an error, replication both ways, a read repair, an anti-entropy round.
    let cluster = Cluster::start(
        ClusterSpec::new(&["us-east", "eu-west"])
            .extra_config("[debug]\nallow_state_overwrite = true"),
    )
    .await
    .unwrap();
    let client = cluster.node(0).client();
    meridian_tests::wait_until(CONVERGE, "eu-west-1 reachable from us-east-1", || {
        let client = client.clone();
        async move {
            let info = client.cluster_info().await?;
            Ok(info["peers"][0]["reachable"] == true)
        }
    })
    .await
    .unwrap();
    client.incr("dashboard", 1).await.unwrap();
    client.put_register("dashboard", &json!("x")).await.unwrap();
    let quorum = client.with_consistency("GLOBAL_QUORUM");
    quorum.incr("dashboard", 1).await.unwrap();
    quorum.counter("dashboard").await.unwrap();
    let bad = client
        .request(
            Method::POST,
            &["v1", "gcounters", "dashboard"],
            Some(&json!({"increment": -1})),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    cluster.node(1).client().incr("dashboard", 1).await.unwrap();
    cluster
        .wait_converged(CONVERGE, |c| async move {
            let value = c.counter("dashboard").await?;
            anyhow::ensure!(value == 3, "counter at {value}");
            Ok(value)
        })
        .await
        .unwrap();
    // A read repair: an element planted on eu-west-1 without an op reaches us-east-1 only
    // through the ALL read's merge, which us-east-1 then writes back to itself.
    cluster
        .node(1)
        .client()
        .request(
            Method::POST,
            &[
                "v1",
                "admin",
                "debug",
                "merge-unlogged",
                "sets",
                "dashboard",
            ],
            Some(&json!({ "element": "planted" })),
        )
        .await
        .unwrap()
        .ok("plant an element")
        .unwrap();
    client
        .with_consistency("ALL")
        .set_elements("dashboard")
        .await
        .unwrap();
    let scraper = client.clone();
    meridian_tests::wait_until(CONVERGE, "a read repair counted", move || {
        let scraper = scraper.clone();
        async move {
            Ok(scraper
                .metrics()
                .await?
                .contains("meridian_read_repairs_total{"))
        }
    })
    .await
    .unwrap();
    let mut url = client.url(&["v1", "admin", "anti-entropy"]).unwrap();
    url.set_query(Some("peer=eu-west-1"));
    client
        .send(Method::POST, url, None)
        .await
        .unwrap()
        .ok("anti-entropy round")
        .unwrap();

    let text = client.metrics().await.unwrap();
    let exported = exported(&text);
    // Target labels Prometheus adds, and the one deploy/prometheus/prometheus.yml adds.
    let target_labels = ["instance", "job", "node_region"];
    let mut problems = Vec::new();
    for metric in &uses.metrics {
        let Some(labels) = exported.get(metric) else {
            problems.push(format!("{metric} is not exported"));
            continue;
        };
        for label in &uses.matchers[metric] {
            if !labels.contains(label) && !target_labels.contains(&label.as_str()) {
                problems.push(format!(
                    "{metric} has no label {label:?} (it has {labels:?})"
                ));
            }
        }
    }
    for (grouping, metrics) in &uses.groupings {
        for label in grouping {
            let found = target_labels.contains(&label.as_str())
                || metrics
                    .iter()
                    .any(|m| exported.get(m).is_some_and(|l| l.contains(label)));
            if !found {
                problems.push(format!("grouping by {label:?}: no label of {metrics:?}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the dashboard does not match /metrics:\n  {}\n\n/metrics:\n{text}",
        problems.join("\n  ")
    );
    cluster.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// Instructions of a Dockerfile: (KEYWORD, arguments), continuation lines joined.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((keyword.to_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_keeps_the_rules() {
    let text = read(&deploy_dir().join("Dockerfile"));
    let instructions = dockerfile_instructions(&text);
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for (keyword, args) in instructions {
        if keyword == "FROM" {
            // Pinned base images: an explicit tag (not `latest`) or a digest.
            let image = args.split_whitespace().next().unwrap();
            let pinned = image.contains('@')
                || image
                    .rsplit_once(':')
                    .is_some_and(|(_, tag)| tag != "latest" && !tag.contains('/'));
            assert!(pinned, "FROM {image}: pin a tag or digest");
            stages.push(Vec::new());
        }
        let stage = stages.last_mut().expect("FROM comes first");
        assert!(
            !(keyword == "ADD" && args.contains("://")),
            "ADD {args}: fetch with a verified download in RUN, or COPY"
        );
        if keyword == "RUN" && args.contains("apt-get install") {
            assert!(args.contains("--no-install-recommends"), "RUN {args}");
            assert!(
                args.contains("apt-get update"),
                "update in the same layer: {args}"
            );
            assert!(
                args.contains("rm -rf /var/lib/apt/lists/*"),
                "clean apt lists: {args}"
            );
        }
        if keyword == "CMD" || keyword == "ENTRYPOINT" {
            let exec: Vec<String> = serde_json::from_str(&args)
                .unwrap_or_else(|_| panic!("{keyword} {args}: use the exec (JSON) form"));
            assert!(!exec.is_empty());
        }
        if keyword == "HEALTHCHECK" {
            let command = args.split_once("CMD ").expect("HEALTHCHECK ... CMD").1;
            let exec: Result<Vec<String>, _> = serde_json::from_str(command);
            assert!(exec.is_ok(), "HEALTHCHECK CMD {command}: use the exec form");
        }
        stage.push((keyword, args));
    }

    // The image `docker build` produces is the last stage: non-root, health-checked, and its
    // entrypoint is the binary compose and Kubernetes pass `serve ...` / `cluster init ...` to.
    let runtime = stages.last().unwrap();
    let last = |keyword: &str| {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map_or_else(
                || panic!("the final stage has no {keyword}"),
                |(_, a)| a.clone(),
            )
    };
    let user = last("USER");
    let name = user.split(':').next().unwrap();
    assert!(
        name != "root" && name != "0",
        "USER {user}: run as non-root"
    );
    assert!(last("HEALTHCHECK").contains("/healthz"));
    assert_eq!(last("ENTRYPOINT"), r#"["/usr/local/bin/meridian"]"#);

    let ignore = read(&deploy_dir().join("../.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "/target"),
        ".dockerignore keeps target/ out"
    );
}

// ---------------------------------------------------------------------------------------------
// The overrides deploy files rely on

/// `serve` overrides for what a container network decides: wrong ones are one-line errors.
#[test]
fn address_overrides_refuse_what_the_config_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let bin = meridian_bin().unwrap();
    let init = Command::new(&bin)
        .args([
            "cluster",
            "init",
            "--regions",
            "a,b",
            "--base-port",
            "20000",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success());
    let config = dir.path().join("a-1/config.toml");
    let cases: [(&[&str], &str); 3] = [
        (
            &["--peer-address", "nobody=127.0.0.1:1"],
            "the config has no peer named \"nobody\"",
        ),
        (&["--peer-address", "b-1"], "expected NAME=HOST:PORT"),
        (&["--peer-listen", "localhost"], "invalid value"),
    ];
    for (args, message) in cases {
        let output = Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let standalone = Command::new(&bin)
        .args(["serve", "--peer-listen", "127.0.0.1:1", "--data-dir"])
        .arg(dir.path().join("standalone"))
        .output()
        .unwrap();
    assert!(!standalone.status.success());
    assert!(String::from_utf8_lossy(&standalone.stderr).contains("no [peer] section"));
}
