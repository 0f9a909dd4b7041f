//! Client commands: one HTTP request each, readable output, one-line errors.

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{ClientArgs, KeyType, json_arg};

pub fn block_on(future: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

/// Percent-encodes a key for one path segment (so `/`, `?`, `%` and spaces are safe).
pub(super) fn encode_segment(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    consistency: Option<String>,
    session: Option<PathBuf>,
    /// Whether the user named the session file: then failing to use it fails the command.
    /// The default file is a convenience, and a home directory that cannot hold it only
    /// costs the session.
    session_named: bool,
}

/// Where the session token lives unless `--session` names a file: per user, like a shell's
/// history, so consecutive commands share a session without anyone passing a flag.
fn default_session_path() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state")))?;
    Some(state.join("meridian").join("session"))
}

/// The session token stored in `path`; none when the file does not exist yet.
fn load_token(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            Ok((!token.is_empty()).then(|| token.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the session file {}", path.display()))
        }
    }
}

/// Replaces the token in `path` atomically (write a sibling file, then rename), creating its
/// directory. Readable by its owner only: the token is no credential, but it tells what a
/// client has seen.
fn store_token(path: &Path, token: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let temp = PathBuf::from(temp);
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        std::fs::rename(&temp, path)
    };
    write().with_context(|| format!("cannot write the session file {}", path.display()))
}

/// Whether an answer refuses the request's session token (the node ran nothing else).
fn refuses_token(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::BAD_REQUEST
        && body.get("type").and_then(Value::as_str)
            == Some("urn:meridian:problem:invalid-session-token")
}

impl Client {
    pub(super) fn new(args: &ClientArgs) -> Result<Self> {
        let http = args
            .auth
            .client_builder()?
            .timeout(Duration::from_millis(args.timeout_ms))
            .build()
            .context("cannot build the HTTP client")?;
        let base = args.region.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--region must be a URL such as http://127.0.0.1:7000, not {base:?}");
        }
        Ok(Self {
            http,
            base,
            consistency: args.consistency.clone(),
            session: if args.no_session {
                None
            } else {
                args.session.clone().or_else(default_session_path)
            },
            session_named: args.session.is_some(),
        })
    }

    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let token = match &self.session {
            Some(file) => self.tolerate(load_token(file))?.flatten(),
            None => None,
        };
        let (status, value) = self
            .exchange(method.clone(), path, body.as_ref(), token.as_deref())
            .await?;
        let (status, value) = match (&self.session, token) {
            // A token this cluster cannot check (another cluster's, or a standalone node's
            // from before it restarted with a new secret) promises nothing here. The node
            // refused the request before running it, so sending it again without one is safe.
            (Some(file), Some(_)) if refuses_token(status, &value) => {
                eprintln!(
                    "note: starting a new session: {} refused the token in {} ({})",
                    self.base,
                    file.display(),
                    value.get("detail").and_then(Value::as_str).unwrap_or("")
                );
                self.exchange(method, path, body.as_ref(), None).await?
            }
            _ => (status, value),
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(problem_error(status, &value))
    }

    /// A failure to use the session file: the command's error when the user named the file,
    /// otherwise a note, and the command goes on without a session.
    fn tolerate<T>(&self, result: Result<T>) -> Result<Option<T>> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(error) if self.session_named => Err(error),
            Err(error) => {
                eprintln!("note: no session kept: {error:#} (--no-session skips it)");
                Ok(None)
            }
        }
    }

    /// One request; keeps the answer's session token.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Value)> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(level) = &self.consistency {
            request = request.header("Consistency-Level", level);
        }
        if let Some(token) = token {
            request = request.header("Session-Token", token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| unanswered(&self.base, error))?;
        let status = response.status();
        if let (Some(file), Some(token)) = (&self.session, response.headers().get("session-token"))
        {
            if let Ok(token) = token.to_str() {
                self.tolerate(store_token(file, token))?;
            }
        }
        let text = response
            .text()
            .await
            .with_context(|| format!("reading the answer of {url}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }
}

/// A request that got no HTTP answer, with what to do about the mistakes a first session
/// makes: plain HTTP to a node serving HTTPS (what `meridian dev` starts), HTTPS to one that
/// serves plain HTTP, and HTTPS without the cluster's CA.
pub(super) fn unanswered(base: &str, error: reqwest::Error) -> anyhow::Error {
    let hint = mismatch_hint(base, &error);
    let error = anyhow::Error::new(error).context(format!("cannot reach {base}"));
    match hint {
        Some(hint) => anyhow!("{error:#}; {hint}"),
        None => error,
    }
}

fn mismatch_hint(base: &str, error: &reqwest::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            if let Some(rest) = base.strip_prefix("http://") {
                return Some(format!(
                    "the node did not answer in plain HTTP: if it serves HTTPS, use https://{rest}"
                ));
            }
        }
        let tls = current.downcast_ref::<rustls::Error>();
        match tls {
            Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                let rest = base.strip_prefix("https://").unwrap_or(base);
                return Some(format!(
                    "the node answered in plain HTTP: use http://{rest}"
                ));
            }
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                return Some(
                    "the node's certificate is not signed by a CA this command trusts: give --ca \
                     (or MERIDIAN_CA) the cluster's ca.pem"
                        .to_owned(),
                );
            }
            _ => {}
        }
        // An io::Error's `source` skips the error it wraps (rustls' goes in two deep).
        source = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

pub(super) fn problem_error(status: StatusCode, body: &Value) -> anyhow::Error {
    let detail = body
        .get("detail")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_owned);
    let kind = body
        .get("type")
        .and_then(Value::as_str)
        .map(|t| t.rsplit(':').next().unwrap_or(t).to_owned())
        .unwrap_or_default();
    anyhow!(
        "{detail} (HTTP {}{}{kind})",
        status.as_u16(),
        if kind.is_empty() { "" } else { " " }
    )
}

fn show(args: &ClientArgs, answer: &Value, readable: impl FnOnce(&Value) -> String) {
    let text = if args.json {
        answer.to_string()
    } else {
        readable(answer)
    };
    println!("{text}");
}

fn path(kind: KeyType, key: &str) -> String {
    format!("/v1/{}/{}", kind.collection(), encode_segment(key))
}

fn elements_lines(answer: &Value) -> String {
    answer
        .get("elements")
        .and_then(Value::as_array)
        .map(|els| {
            els.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

pub async fn get(args: &ClientArgs, kind: KeyType, key: &str) -> Result<()> {
    let client = Client::new(args)?;
    let answer = client.call(Method::GET, &path(kind, key), None).await?;
    show(args, &answer, |a| match kind {
        KeyType::Sets => elements_lines(a),
        _ => a.get("value").map(Value::to_string).unwrap_or_default(),
    });
    Ok(())
}

pub async fn put(args: &ClientArgs, key: &str, value: &str) -> Result<()> {
    let client = Client::new(args)?;
    let answer = client
        .call(
            Method::PUT,
            &path(KeyType::Registers, key),
            Some(json_arg(value)),
        )
        .await?;
    show(args, &answer, |a| {
        format!(
            "OK {}",
            a.get("timestamp").and_then(Value::as_str).unwrap_or("")
        )
    });
    Ok(())
}

pub async fn del(args: &ClientArgs, kind: KeyType, key: &str) -> Result<()> {
    let client = Client::new(args)?;
    let answer = client.call(Method::DELETE, &path(kind, key), None).await?;
    show(args, &answer, |_| "deleted".to_owned());
    Ok(())
}

pub async fn incr(args: &ClientArgs, gcounter: bool, key: &str, by: i128) -> Result<()> {
    let client = Client::new(args)?;
    let kind = if gcounter {
        KeyType::Gcounters
    } else {
        KeyType::Counters
    };
    let answer = client
        .call(
            Method::POST,
            &path(kind, key),
            Some(json!({"increment": by})),
        )
        .await?;
    show(args, &answer, |a| {
        a.get("value").map(Value::to_string).unwrap_or_default()
    });
    Ok(())
}

pub async fn set_update(
    args: &ClientArgs,
    key: &str,
    elements: &[String],
    add: bool,
) -> Result<()> {
    let client = Client::new(args)?;
    let elements: Vec<Value> = elements.iter().map(|e| json_arg(e)).collect();
    let body = if add {
        json!({"add": elements})
    } else {
        json!({"remove": elements})
    };
    let answer = client
        .call(Method::POST, &path(KeyType::Sets, key), Some(body))
        .await?;
    show(args, &answer, |a| {
        match a.get("size").and_then(Value::as_u64) {
            Some(1) => "1 element".to_owned(),
            Some(size) => format!("{size} elements"),
            None => a.to_string(),
        }
    });
    Ok(())
}

pub async fn list(
    args: &ClientArgs,
    kind: KeyType,
    prefix: &str,
    limit: usize,
    all: bool,
) -> Result<()> {
    let client = Client::new(args)?;
    let mut cursor: Option<String> = None;
    loop {
        let mut query = format!("?limit={limit}&prefix={}", encode_segment(prefix));
        if let Some(c) = &cursor {
            let _ = write!(query, "&cursor={}", encode_segment(c));
        }
        let answer = client
            .call(
                Method::GET,
                &format!("/v1/{}{query}", kind.collection()),
                None,
            )
            .await?;
        show(args, &answer, |a| {
            a.get("keys")
                .and_then(Value::as_array)
                .map(|keys| {
                    keys.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default()
        });
        cursor = answer
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if !all || cursor.is_none() {
            return Ok(());
        }
    }
}
