//! Client authentication, HTTPS, and certificate rotation, against real nodes configured
//! the way `meridian cluster init` configures them (tokens and TLS on).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meridian_tests::{Client, Cluster, ClusterSpec, Credentials, meridian_bin, toml, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(60);

/// (class, method, path segments, body, roles allowed)
type Route<'a> = (&'a str, Method, &'a [&'a str], Option<Value>, &'a [&'a str]);

fn token(cluster: &Cluster, role: &str) -> String {
    std::fs::read_to_string(cluster.dir().join("tokens").join(format!("{role}.token")))
        .unwrap()
        .trim()
        .to_owned()
}

/// Asserts a refusal: the status, problem+json, and for 401 a Bearer challenge.
fn assert_refused(what: &str, response: &meridian_tests::ApiResponse, status: StatusCode) {
    assert_eq!(response.status, status, "{what}: {}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{what}"
    );
    assert_eq!(response.body["status"], status.as_u16(), "{what}");
    if status == StatusCode::UNAUTHORIZED {
        let challenge = response.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_class_refuses_missing_wrong_and_insufficient_tokens() {
    let cluster = Cluster::start(ClusterSpec::new(&["us-east", "eu-west"]))
        .await
        .unwrap();
    let node = cluster.node(0);
    let base = node.client().with_token(None);
    let roles = ["read", "write", "admin", "metrics"];
    let tokens: Vec<(&str, String)> = roles.iter().map(|r| (*r, token(&cluster, r))).collect();
    // (class, method, path, body, roles allowed)
    let routes: &[Route] = &[
        (
            "data read",
            Method::GET,
            &["v1", "registers", "k"],
            None,
            &["read", "write", "admin"],
        ),
        (
            "data list",
            Method::GET,
            &["v1", "counters"],
            None,
            &["read", "write", "admin"],
        ),
        (
            "data write",
            Method::PUT,
            &["v1", "registers", "k"],
            Some(json!("v")),
            &["write", "admin"],
        ),
        (
            "data incr",
            Method::POST,
            &["v1", "counters", "c"],
            Some(json!({"increment": 1})),
            &["write", "admin"],
        ),
        (
            "data delete",
            Method::DELETE,
            &["v1", "sets", "s"],
            None,
            &["write", "admin"],
        ),
        (
            "admin",
            Method::GET,
            &["v1", "admin", "tree"],
            None,
            &["admin"],
        ),
        ("cluster", Method::GET, &["v1", "cluster"], None, &["admin"]),
        (
            "metrics",
            Method::GET,
            &["metrics"],
            None,
            &["admin", "metrics"],
        ),
    ];
    for (class, method, path, body, allowed) in routes {
        let what = format!("{class} ({method} /{})", path.join("/"));
        let response = base
            .request(method.clone(), path, body.as_ref())
            .await
            .unwrap();
        assert_refused(
            &format!("{what} without a token"),
            &response,
            StatusCode::UNAUTHORIZED,
        );
        let wrong = base.with_token(Some("mdn_not-a-real-token"));
        let response = wrong
            .request(method.clone(), path, body.as_ref())
            .await
            .unwrap();
        assert_refused(
            &format!("{what} with a wrong token"),
            &response,
            StatusCode::UNAUTHORIZED,
        );
        for (role, secret) in &tokens {
            let client = base.with_token(Some(secret));
            let response = client
                .request(method.clone(), path, body.as_ref())
                .await
                .unwrap();
            if allowed.contains(role) {
                assert!(
                    response.status.is_success() || response.status == StatusCode::NOT_FOUND,
                    "{what} as {role}: {} {}",
                    response.status,
                    response.body
                );
            } else {
                assert_refused(
                    &format!("{what} as {role}"),
                    &response,
                    StatusCode::FORBIDDEN,
                );
            }
        }
    }
    // Health, readiness and the API description are open.
    for path in [&["healthz"][..], &["readyz"], &["openapi.json"]] {
        let response = base.request(Method::GET, path, None).await.unwrap();
        assert_eq!(response.status, StatusCode::OK, "/{}", path.join("/"));
    }
    // A refused write wrote nothing: only the allowed ones (write, admin) counted.
    let admin = base.with_token(Some(&token(&cluster, "admin")));
    assert_eq!(admin.counter("c").await.unwrap(), 2);

    // The CLI takes the token from a file and the CA for https; without a token it fails
    // with a one-line error and a non-zero exit.
    let creds = node.credentials();
    let token_file = |role: &str| cluster.dir().join("tokens").join(format!("{role}.token"));
    let cli = |role: Option<&str>, args: &[&str]| {
        let mut command = std::process::Command::new(meridian_bin().unwrap());
        command
            .args(args)
            .args(["--region", &node.url()])
            .arg("--ca")
            .arg(creds.ca.as_ref().unwrap())
            .env_remove("MERIDIAN_TOKEN")
            .env_remove("MERIDIAN_TOKEN_FILE")
            // The session file of this test's CLI, not the user's running the tests.
            .env("XDG_STATE_HOME", cluster.dir());
        if let Some(role) = role {
            command.arg("--token-file").arg(token_file(role));
        }
        command.output().unwrap()
    };
    let put = cli(Some("write"), &["put", "cli-key", "\"from-cli\""]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = cli(Some("read"), &["get", "cli-key"]);
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    assert!(String::from_utf8_lossy(&get.stdout).contains("from-cli"));
    let denied = cli(Some("read"), &["put", "cli-key", "x"]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("403") || stderr.contains("forbidden"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let anonymous = cli(None, &["get", "cli-key"]);
    assert!(!anonymous.status.success());

    // Revoking a token: remove it from tokens.toml and SIGHUP; it is refused from then on,
    // the others keep working.
    let tokens_path = cluster.dir().join("tokens.toml");
    let text = std::fs::read_to_string(&tokens_path).unwrap();
    let mut file: toml::Table = text.parse().unwrap();
    let kept: Vec<toml::Value> = file["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str() != Some("read"))
        .cloned()
        .collect();
    file.insert("tokens".into(), toml::Value::Array(kept));
    std::fs::write(&tokens_path, toml::to_string(&file).unwrap()).unwrap();
    node.reload().unwrap();
    let reader = base.with_token(Some(&token(&cluster, "read")));
    wait_until(TIMEOUT, "the revoked read token to be refused", || {
        let reader = reader.clone();
        async move {
            let r = reader
                .request(Method::GET, &["v1", "registers", "k"], None)
                .await?;
            Ok(r.status == StatusCode::UNAUTHORIZED)
        }
    })
    .await
    .unwrap();
    assert_eq!(admin.counter("c").await.unwrap(), 2);
    cluster.shutdown().await.unwrap();
}

/// Sends a plaintext HTTP request on a raw TCP connection and returns what came back.
async fn plaintext_exchange(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server closes the connection after the failed handshake: read to EOF (or reset).
    let _ = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_works_plaintext_is_refused_and_bad_tls_config_fails_fast() {
    let cluster = Cluster::start(ClusterSpec::new(&["solo"])).await.unwrap();
    let node = cluster.node(0);
    assert!(node.url().starts_with("https://"), "{}", node.url());
    // The harness's client trusts the cluster CA and speaks TLS.
    node.client().put_register("k", &json!("v")).await.unwrap();

    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let answer = plaintext_exchange(node.http_addr()).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let plain = Client::connect(
        &format!("http://{}", node.http_addr()),
        &Credentials::default(),
    )
    .unwrap();
    assert!(plain.healthz().await.is_err());
    // A client that does not trust the cluster CA refuses the node's certificate.
    let untrusting = reqwest::Client::builder().no_proxy().build().unwrap();
    let error = untrusting
        .get(format!("{}/healthz", node.url()))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    // The CLI says what to do about both mistakes, in its one line.
    let addr = node.http_addr();
    let error = cli_error(node.dir(), &format!("http://{addr}"), None);
    assert!(
        error.ends_with(&format!("if it serves HTTPS, use https://{addr}")),
        "{error}"
    );
    let error = cli_error(node.dir(), &node.url(), None);
    assert!(
        error.ends_with("give --ca (or MERIDIAN_CA) the cluster's ca.pem"),
        "{error}"
    );
    // The node keeps serving TLS clients after all that.
    assert_eq!(
        node.client().get_register("k").await.unwrap().unwrap()["value"],
        "v"
    );

    // Bad TLS and auth configuration: a one-line error and a non-zero exit at start-up.
    node.stop().await.unwrap();
    let original = std::fs::read_to_string(node.config_path()).unwrap();
    let serve = |config: &Path| {
        std::process::Command::new(meridian_bin().unwrap())
            .args(["serve", "--config"])
            .arg(config)
            .env("MERIDIAN_LOG", "error")
            .output()
            .unwrap()
    };
    std::fs::write(node.dir().join("garbage.pem"), "not a certificate\n").unwrap();
    let cases = [
        (
            original.replace("cert = \"http.pem\"", "cert = \"missing.pem\""),
            "missing.pem",
        ),
        (
            original.replace("cert = \"http.pem\"", "cert = \"garbage.pem\""),
            "garbage.pem",
        ),
        (
            original.replace("key = \"http.key\"", "key = \"node.key\""),
            "do not form a usable identity",
        ),
        (
            original.replace(
                "tokens_file = \"../tokens.toml\"",
                "tokens_file = \"../nope.toml\"",
            ),
            "nope.toml",
        ),
        (
            original.replace(
                "[auth]\nenabled = true\ntokens_file = \"../tokens.toml\"\n",
                "",
            ),
            "no [auth] section",
        ),
        (
            original.replace("[http.tls]\ncert = \"http.pem\"\nkey = \"http.key\"\n", ""),
            "plaintext = true",
        ),
    ];
    for (text, expected) in &cases {
        assert_ne!(text, &original, "the case for {expected:?} changed nothing");
        std::fs::write(node.config_path(), text).unwrap();
        let output = serve(node.config_path());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{expected}: started anyway");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
    }

    // Plaintext and no authentication when the config says so explicitly.
    let open = original
        .replace("[http.tls]\ncert = \"http.pem\"\nkey = \"http.key\"\n", "")
        .replace("\n[http]\n", "\n[http]\nplaintext = true\n")
        .replace(
            "[auth]\nenabled = true\ntokens_file = \"../tokens.toml\"\n",
            "[auth]\nenabled = false\n",
        );
    std::fs::write(node.config_path(), &open).unwrap();
    let child = std::process::Command::new(meridian_bin().unwrap())
        .args(["serve", "--config"])
        .arg(node.config_path())
        .env("MERIDIAN_LOG", "error")
        .spawn()
        .unwrap();
    let killer = KillOnDrop(child);
    let plain = plain.with_token(None);
    wait_until(TIMEOUT, "the plaintext node to serve", || {
        let plain = plain.clone();
        async move { Ok(plain.readyz().await.unwrap_or(false)) }
    })
    .await
    .unwrap();
    assert_eq!(
        plain.get_register("k").await.unwrap().unwrap()["value"],
        "v"
    );
    let error = cli_error(
        node.dir(),
        &format!("https://{addr}"),
        Some(&cluster.dir().join("ca.pem")),
    );
    assert!(
        error.ends_with(&format!(
            "the node answered in plain HTTP: use http://{addr}"
        )),
        "{error}"
    );
    drop(killer);
}

/// `meridian get k` against `url`, which must fail with exit code 1 and one line on stderr;
/// returns that line.
fn cli_error(state: &Path, url: &str, ca: Option<&Path>) -> String {
    let mut command = std::process::Command::new(meridian_bin().unwrap());
    command
        .args(["get", "k", "--region", url])
        .env("XDG_STATE_HOME", state)
        .env_remove("MERIDIAN_CA")
        .env_remove("MERIDIAN_TOKEN")
        .env_remove("MERIDIAN_TOKEN_FILE");
    if let Some(ca) = ca {
        command.env("MERIDIAN_CA", ca);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: cannot reach "), "{stderr}");
    lines[0].to_owned()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The certificate fingerprints a node reports: (http, peer).
async fn fingerprints(client: &Client) -> (String, String, u64) {
    let info = client.cluster_info().await.unwrap();
    let security = &info["security"];
    (
        security["http_certificate"]["fingerprint_sha256"]
            .as_str()
            .unwrap()
            .to_owned(),
        security["peer_certificate"]["fingerprint_sha256"]
            .as_str()
            .unwrap()
            .to_owned(),
        security["reloads"].as_u64().unwrap(),
    )
}

/// SHA-256 of the certificate a fresh TLS connection to `url` is served.
async fn served_fingerprint(url: &str, creds: &Credentials) -> String {
    use sha2::Digest;
    let http = creds
        .http_builder()
        .unwrap()
        .tls_info(true)
        .build()
        .unwrap();
    let response = http.get(format!("{url}/healthz")).send().await.unwrap();
    let info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .unwrap();
    let der = info.peer_certificate().unwrap();
    sha2::Sha256::digest(der)
        .iter()
        .fold(String::new(), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A full CA rotation under continuous writes: a new CA is trusted alongside the old one,
/// every certificate is reissued from it and loaded on SIGHUP, then the old CA is retired
/// (SIGHUP again). A node killed and restarted afterwards trusts only the new CA, so it can
/// rejoin only if every other node really serves and presents its new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_writes_without_errors() {
    let cluster = Cluster::start(ClusterSpec::new(&["us-east", "eu-west", "ap-south"]))
        .await
        .unwrap();
    let mut before = Vec::new();
    for node in cluster.nodes() {
        before.push(fingerprints(&node.client()).await);
    }

    // Step 1: the new CA, trusted alongside the old; new certificates on disk.
    let rotate = |extra: &[&str]| {
        let output = std::process::Command::new(meridian_bin().unwrap())
            .args(["cluster", "rotate-certs", "--dir"])
            .arg(cluster.dir())
            .args(extra)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    rotate(&["--new-ca"]);
    // Clients from here on trust both CAs (ca.pem is now the bundle).
    let creds = cluster.node(0).credentials().clone();
    let clients: Vec<Client> = cluster
        .nodes()
        .iter()
        .map(|n| Client::connect(&n.url(), &creds).unwrap())
        .collect();

    // Writers on the first two nodes, running through the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for client in &clients[..2] {
        let client = client.clone();
        let (stop, acked) = (stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.incr("rotation", 1).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => errors.push(format!("{error:#}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            errors
        }));
    }
    let wait_writes = |n: u64| {
        let acked = acked.clone();
        async move {
            let target = acked.load(Ordering::Relaxed) + n;
            wait_until(TIMEOUT, "more acknowledged writes", || {
                let acked = acked.clone();
                async move { Ok(acked.load(Ordering::Relaxed) >= target) }
            })
            .await
            .unwrap();
        }
    };
    wait_writes(20).await;

    // SIGHUP: every node loads its new certificates; /v1/cluster shows them.
    for node in cluster.nodes() {
        node.reload().unwrap();
    }
    for (i, client) in clients.iter().enumerate() {
        wait_until(TIMEOUT, "the reload to show in /v1/cluster", || {
            let client = client.clone();
            async move { Ok(fingerprints(&client).await.2 >= 1) }
        })
        .await
        .unwrap();
        let after = fingerprints(client).await;
        assert_ne!(
            after.0, before[i].0,
            "HTTP certificate of node {i} unchanged"
        );
        assert_ne!(
            after.1, before[i].1,
            "peer certificate of node {i} unchanged"
        );
        // A new connection is served the new certificate.
        assert_eq!(
            served_fingerprint(&cluster.node(i).url(), &creds).await,
            after.0
        );
    }
    wait_writes(20).await;

    // Step 2: retire the old CA everywhere.
    rotate(&["--retire-old-cas"]);
    let ca_text = std::fs::read_to_string(cluster.dir().join("ca.pem")).unwrap();
    assert_eq!(ca_text.matches("BEGIN CERTIFICATE").count(), 1);
    for node in cluster.nodes() {
        node.reload().unwrap();
    }
    for client in &clients {
        wait_until(TIMEOUT, "the second reload", || {
            let client = client.clone();
            async move { Ok(fingerprints(&client).await.2 >= 2) }
        })
        .await
        .unwrap();
    }
    wait_writes(20).await;

    // Force new mesh connections: kill the third node and restart it. It trusts only the
    // new CA, and the others only the new CA: it catches up only over new-certificate
    // connections in both directions.
    let third = cluster.node(2);
    third.kill().unwrap();
    wait_writes(20).await;
    third.start().await.unwrap();
    wait_writes(20).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let errors = writer.await.unwrap();
        assert!(
            errors.is_empty(),
            "writes failed during rotation: {errors:?}"
        );
    }
    let total = acked.load(Ordering::Relaxed);
    for client in &clients {
        wait_until(TIMEOUT, "every acknowledged increment everywhere", || {
            let client = client.clone();
            async move { Ok(client.counter("rotation").await? == total as i64) }
        })
        .await
        .unwrap();
    }
    // Every mesh link comes (back) up on the new certificates.
    for client in &clients {
        wait_until(TIMEOUT, "every peer connected", || {
            let client = client.clone();
            async move {
                let info = client.cluster_info().await?;
                Ok(info["peers"]
                    .as_array()
                    .is_some_and(|peers| peers.iter().all(|p| p["connected"] == true)))
            }
        })
        .await
        .unwrap();
        let info = client.cluster_info().await.unwrap();
        assert_eq!(info["security"]["last_reload_error"], Value::Null);
    }
    cluster.shutdown().await.unwrap();
}
