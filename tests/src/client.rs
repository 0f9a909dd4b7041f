//! A small async HTTP client for one node's API, and polling helpers.

use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

/// Request header that selects the consistency level.
pub const CONSISTENCY_HEADER: &str = "Consistency-Level";
/// Request and response header that carries the session token.
pub const SESSION_HEADER: &str = "Session-Token";

/// A response from a node: status, headers, and the body (JSON when it parses, else
/// a JSON string holding the text; `null` when empty).
#[derive(Clone, Debug)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl ApiResponse {
    /// The body when the status is 2xx; otherwise an error naming the request,
    /// the status and the body.
    pub fn ok(self, what: &str) -> Result<Value> {
        if self.status.is_success() {
            Ok(self.body)
        } else {
            bail!("{what}: HTTP {}: {}", self.status, self.body)
        }
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a client needs to reach a cluster's nodes: the CA that signed their HTTPS
/// certificates and a bearer token (those of `meridian cluster init`: `ca.pem` and
/// `tokens/admin.token` in the cluster directory).
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// `ca.pem`, when the nodes serve HTTPS.
    pub ca: Option<PathBuf>,
    /// The token file, when the nodes require one.
    pub token_file: Option<PathBuf>,
    pub token: Option<String>,
}

impl Credentials {
    /// The credentials of the cluster in `cluster_dir`: its CA when `https`, and its
    /// admin token when `cluster init` wrote tokens.
    pub fn discover(cluster_dir: &Path, https: bool) -> Result<Self> {
        let ca = https.then(|| cluster_dir.join("ca.pem"));
        let token_file = cluster_dir.join("tokens").join("admin.token");
        let (token_file, token) = if token_file.is_file() {
            let token = std::fs::read_to_string(&token_file)
                .with_context(|| format!("reading {}", token_file.display()))?
                .trim()
                .to_owned();
            (Some(token_file), Some(token))
        } else {
            (None, None)
        };
        Ok(Self {
            ca,
            token_file,
            token,
        })
    }

    /// A reqwest client builder trusting [`Self::ca`] only; loopback, no proxy. It sends
    /// no token by itself.
    pub fn http_builder(&self) -> Result<reqwest::ClientBuilder> {
        let mut builder = reqwest::Client::builder()
            // Loopback only: never go through a proxy from the environment.
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2));
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("parsing {}", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(builder)
    }

    /// A reqwest client that also sends the token on every request.
    pub fn http_client(&self) -> Result<reqwest::Client> {
        let mut builder = self.http_builder()?;
        if let Some(token) = &self.token {
            let mut headers = HeaderMap::new();
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}")
                    .parse()
                    .context("the token is not a valid header value")?,
            );
            builder = builder.default_headers(headers);
        }
        builder.build().context("building the HTTP client")
    }

    /// `--ca FILE --token-file FILE`, as the `meridian` client commands and `bench` take.
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(ca) = &self.ca {
            args.extend(["--ca".to_owned(), ca.display().to_string()]);
        }
        if let Some(file) = &self.token_file {
            args.extend(["--token-file".to_owned(), file.display().to_string()]);
        }
        args
    }
}

/// An HTTP client bound to one node. Cheap to clone; clones share the connection pool
/// (and the session token, when tracking is on).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    consistency: Option<String>,
    session: Option<Arc<Mutex<Option<String>>>>,
    /// Sent as `Authorization: Bearer ...`.
    bearer: Option<String>,
}

impl Client {
    /// A client for the node at `base_url` (e.g. `http://127.0.0.1:7000`), plain HTTP
    /// without a token.
    pub fn new(base_url: &str) -> Result<Self> {
        Self::connect(base_url, &Credentials::default())
    }

    /// A client for the node at `base_url` using `credentials` (CA and token).
    pub fn connect(base_url: &str, credentials: &Credentials) -> Result<Self> {
        let http = credentials
            .http_builder()?
            .build()
            .context("building the HTTP client")?;
        let base = Url::parse(base_url).with_context(|| format!("bad base URL {base_url:?}"))?;
        Ok(Self {
            http,
            base,
            consistency: None,
            session: None,
            bearer: credentials.token.clone(),
        })
    }

    /// The same client sending `token` (or no token at all) instead.
    #[must_use]
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            bearer: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The node's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// A client that sends `Consistency-Level: level` on every request.
    #[must_use]
    pub fn with_consistency(&self, level: &str) -> Self {
        Self {
            consistency: Some(level.to_owned()),
            ..self.clone()
        }
    }

    /// A client that keeps the `Session-Token` of each response and sends it with
    /// the next request (starting with none). Clones of the result share the token.
    #[must_use]
    pub fn with_session(&self) -> Self {
        Self {
            session: Some(Arc::new(Mutex::new(None))),
            ..self.clone()
        }
    }

    /// A client for another node that shares this one's session token (if tracked)
    /// and consistency level: to check read-your-writes across regions.
    pub fn for_node(&self, base_url: &str) -> Result<Self> {
        let base = Url::parse(base_url).with_context(|| format!("bad base URL {base_url:?}"))?;
        Ok(Self {
            base,
            ..self.clone()
        })
    }

    /// The session token last received, when tracking is on.
    pub fn session_token(&self) -> Option<String> {
        self.session
            .as_ref()
            .and_then(|s| s.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// Sets (or clears) the tracked session token; turns tracking on.
    pub fn set_session_token(&mut self, token: Option<String>) {
        let slot = self.session.get_or_insert_with(Default::default);
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = token;
    }

    /// `base` + `/`-separated `segments`, each percent-encoded as one path segment.
    pub fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow!("base URL {} cannot have a path", self.base))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// Sends one request; any status is returned (only transport errors fail).
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<ApiResponse> {
        let what = format!("{method} {url}");
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.bearer {
            request = request.bearer_auth(token);
        }
        if let Some(level) = &self.consistency {
            request = request.header(CONSISTENCY_HEADER, level);
        }
        if let Some(token) = self.session_token() {
            request = request.header(SESSION_HEADER, token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| what.clone())?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .with_context(|| format!("{what}: reading the body"))?;
        if let (Some(slot), Some(token)) = (&self.session, headers.get(SESSION_HEADER)) {
            if let Ok(token) = token.to_str() {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(token.to_owned());
            }
        }
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(ApiResponse {
            status,
            headers,
            body,
        })
    }

    /// Sends `method` to a `/`-free list of path segments (see [`Client::url`]).
    pub async fn request(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<ApiResponse> {
        let url = self.url(segments)?;
        self.send(method, url, body).await
    }

    async fn call(&self, method: Method, segments: &[&str], body: Option<&Value>) -> Result<Value> {
        let what = format!("{method} /{}", segments.join("/"));
        self.request(method, segments, body).await?.ok(&what)
    }

    /// Reads a typed key; `None` on 404.
    async fn read(&self, kind: &str, key: &str) -> Result<Option<Value>> {
        let response = self.request(Method::GET, &["v1", kind, key], None).await?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        response.ok(&format!("GET /v1/{kind}/{key}")).map(Some)
    }

    // ---- registers ----

    /// `PUT /v1/registers/{key}`.
    pub async fn put_register(&self, key: &str, value: &Value) -> Result<Value> {
        self.call(Method::PUT, &["v1", "registers", key], Some(value))
            .await
    }

    /// `GET /v1/registers/{key}`: the whole answer (`key`, `value`, `timestamp`,
    /// `origin`), or `None` when absent or deleted (404).
    pub async fn get_register(&self, key: &str) -> Result<Option<Value>> {
        self.read("registers", key).await
    }

    /// The register's value only, or `None` when absent.
    pub async fn register_value(&self, key: &str) -> Result<Option<Value>> {
        Ok(self
            .get_register(key)
            .await?
            .map(|mut body| body["value"].take()))
    }

    /// `DELETE /v1/registers/{key}`.
    pub async fn delete_register(&self, key: &str) -> Result<Value> {
        self.call(Method::DELETE, &["v1", "registers", key], None)
            .await
    }

    // ---- PN-counters ----

    /// `POST /v1/counters/{key}` `{"increment": by}`.
    pub async fn incr(&self, key: &str, by: i64) -> Result<Value> {
        let body = json!({ "increment": by });
        self.call(Method::POST, &["v1", "counters", key], Some(&body))
            .await
    }

    /// `GET /v1/counters/{key}`: the whole answer, or `None` on 404.
    pub async fn get_counter(&self, key: &str) -> Result<Option<Value>> {
        self.read("counters", key).await
    }

    /// The counter's value; an absent counter (404) reads as 0.
    pub async fn counter(&self, key: &str) -> Result<i64> {
        match self.get_counter(key).await? {
            None => Ok(0),
            Some(body) => body["value"]
                .as_i64()
                .with_context(|| format!("counter {key}: no integer `value` in {body}")),
        }
    }

    /// `DELETE /v1/counters/{key}`.
    pub async fn delete_counter(&self, key: &str) -> Result<Value> {
        self.call(Method::DELETE, &["v1", "counters", key], None)
            .await
    }

    // ---- G-counters ----

    /// `POST /v1/gcounters/{key}` `{"increment": by}`.
    pub async fn gincr(&self, key: &str, by: u64) -> Result<Value> {
        let body = json!({ "increment": by });
        self.call(Method::POST, &["v1", "gcounters", key], Some(&body))
            .await
    }

    /// `GET /v1/gcounters/{key}`: the whole answer, or `None` on 404.
    pub async fn get_gcounter(&self, key: &str) -> Result<Option<Value>> {
        self.read("gcounters", key).await
    }

    /// The G-counter's value; an absent counter (404) reads as 0.
    pub async fn gcounter(&self, key: &str) -> Result<u64> {
        match self.get_gcounter(key).await? {
            None => Ok(0),
            Some(body) => body["value"]
                .as_u64()
                .with_context(|| format!("gcounter {key}: no unsigned `value` in {body}")),
        }
    }

    /// `DELETE /v1/gcounters/{key}`.
    pub async fn delete_gcounter(&self, key: &str) -> Result<Value> {
        self.call(Method::DELETE, &["v1", "gcounters", key], None)
            .await
    }

    // ---- OR-sets ----

    /// `POST /v1/sets/{key}` `{"add": add, "remove": remove}`.
    pub async fn set_update(&self, key: &str, add: &[Value], remove: &[Value]) -> Result<Value> {
        let body = json!({ "add": add, "remove": remove });
        self.call(Method::POST, &["v1", "sets", key], Some(&body))
            .await
    }

    /// Adds elements to a set.
    pub async fn set_add(&self, key: &str, add: &[Value]) -> Result<Value> {
        self.set_update(key, add, &[]).await
    }

    /// Removes elements from a set.
    pub async fn set_remove(&self, key: &str, remove: &[Value]) -> Result<Value> {
        self.set_update(key, &[], remove).await
    }

    /// `GET /v1/sets/{key}`: the whole answer (`key`, `elements`, `size`), or `None` on 404.
    pub async fn get_set(&self, key: &str) -> Result<Option<Value>> {
        self.read("sets", key).await
    }

    /// The set's elements in the server's (canonical) order; an absent set (404) is empty.
    pub async fn set_elements(&self, key: &str) -> Result<Vec<Value>> {
        match self.get_set(key).await? {
            None => Ok(Vec::new()),
            Some(mut body) => match body["elements"].take() {
                Value::Array(elements) => Ok(elements),
                other => bail!("set {key}: `elements` is not an array: {other}"),
            },
        }
    }

    /// `DELETE /v1/sets/{key}`.
    pub async fn delete_set(&self, key: &str) -> Result<Value> {
        self.call(Method::DELETE, &["v1", "sets", key], None).await
    }

    // ---- operations ----

    /// `GET /v1/cluster`.
    pub async fn cluster_info(&self) -> Result<Value> {
        self.call(Method::GET, &["v1", "cluster"], None).await
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String> {
        match self.call(Method::GET, &["metrics"], None).await? {
            Value::String(text) => Ok(text),
            other => Ok(other.to_string()),
        }
    }

    /// Whether `GET /healthz` answers 2xx (a transport error is an error).
    pub async fn healthz(&self) -> Result<bool> {
        let response = self.request(Method::GET, &["healthz"], None).await?;
        Ok(response.status.is_success())
    }

    /// Whether `GET /readyz` answers 2xx (a transport error is an error).
    pub async fn readyz(&self) -> Result<bool> {
        let response = self.request(Method::GET, &["readyz"], None).await?;
        Ok(response.status.is_success())
    }
}

/// How often the wait helpers poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok(true)`; fails after
/// `timeout` with `what` and the last error (errors count as "not yet", since nodes
/// may be restarting).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    wait_for(timeout, what, move || {
        let fut = check();
        async move { Ok(fut.await?.then_some(())) }
    })
    .await
}

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok(Some(value))`, and
/// returns the value; fails after `timeout` with `what` and the last error.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error: Option<anyhow::Error>;
    let mut attempts = 0_u32;
    loop {
        attempts += 1;
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => last_error = None,
            Err(error) => last_error = Some(error),
        }
        if tokio::time::Instant::now() + POLL_INTERVAL > deadline {
            let error =
                anyhow!("timed out after {timeout:?} ({attempts} attempts) waiting for {what}");
            return Err(match last_error {
                Some(last) => error.context(format!("last error: {last:#}")),
                None => error,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `read` on every client until all return the same value, and returns it;
/// on timeout the error shows what each client last returned.
pub async fn wait_all_equal<T, F, Fut>(
    timeout: Duration,
    what: &str,
    clients: &[Client],
    read: F,
) -> Result<T>
where
    T: PartialEq + Debug,
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    if clients.is_empty() {
        bail!("wait_all_equal({what}): no clients");
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut results = Vec::with_capacity(clients.len());
        for client in clients {
            results.push(read(client.clone()).await);
        }
        let converged = results.iter().all(Result::is_ok)
            && results
                .windows(2)
                .all(|w| matches!((&w[0], &w[1]), (Ok(a), Ok(b)) if a == b));
        if converged {
            if let Some(Ok(value)) = results.into_iter().next() {
                return Ok(value);
            }
        } else if tokio::time::Instant::now() + POLL_INTERVAL > deadline {
            let seen: Vec<String> = clients
                .iter()
                .zip(&results)
                .map(|(client, result)| match result {
                    Ok(value) => format!("  {}: {value:?}", client.base_url()),
                    Err(error) => format!("  {}: error: {error:#}", client.base_url()),
                })
                .collect();
            bail!(
                "timed out after {timeout:?} waiting for {what} to converge; last reads:\n{}",
                seen.join("\n")
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Everything a node holds, as a client sees it (the first page of every type's listing),
/// plus its Merkle root: equal on converged nodes.
pub async fn holdings(client: Client) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for kind in ["registers", "counters", "gcounters", "sets"] {
        let page = client
            .request(Method::GET, &["v1", kind], None)
            .await?
            .ok(kind)?;
        out.insert(kind.to_owned(), page);
    }
    let tree = client
        .request(Method::GET, &["v1", "admin", "tree"], None)
        .await?
        .ok("tree")?;
    out.insert("root".into(), tree["root"].clone());
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_as_one_segment() {
        let client = Client::new("http://127.0.0.1:7000").unwrap();
        let url = client.url(&["v1", "registers", "a/b c?d#e%"]).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:7000/v1/registers/a%2Fb%20c%3Fd%23e%25"
        );
        let client = Client::new("http://127.0.0.1:7000/").unwrap();
        assert_eq!(
            client.url(&["readyz"]).unwrap().as_str(),
            "http://127.0.0.1:7000/readyz"
        );
    }

    #[tokio::test]
    async fn wait_for_returns_the_value_or_times_out_with_the_last_error() {
        let mut n = 0;
        let v = wait_for(Duration::from_secs(2), "n to reach 3", || {
            n += 1;
            let n = n;
            async move { Ok((n >= 3).then_some(n)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        let err = wait_until(Duration::from_millis(120), "never", || async {
            Err(anyhow!("node down"))
        })
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("never") && text.contains("node down"),
            "{text}"
        );
    }
}
