//! Client authentication: bearer tokens with roles, checked once per request in the API's
//! `guard` middleware before any handler runs.
//!
//! Only SHA-256 digests of tokens are kept in memory (and, preferably, in the config): a
//! presented token is hashed and compared against every stored digest in constant time, so
//! neither the comparison's timing nor a memory dump of the node gives a usable token. Tokens
//! never appear in logs; the entry's `name` does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use axum::http::{HeaderMap, Method, header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthSection, Config, TokenEntry};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `GET` on data routes.
    Read,
    /// `read`, plus writes (`PUT`, `POST`, `DELETE`) on data routes.
    Write,
    /// Everything: data, `/v1/admin/*`, `/v1/cluster`, `/metrics`.
    Admin,
    /// `/metrics` only: for a Prometheus scraper.
    Metrics,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
            Self::Metrics => "metrics",
        }
    }

    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Open => true,
            Access::Read => matches!(self, Self::Read | Self::Write | Self::Admin),
            Access::Write => matches!(self, Self::Write | Self::Admin),
            Access::Admin => self == Self::Admin,
            Access::Metrics => matches!(self, Self::Admin | Self::Metrics),
        }
    }
}

/// What a request needs, decided from its method and path alone (before routing, so an
/// unknown path answers 401 rather than telling strangers which routes exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Liveness, readiness and the OpenAPI document: no token needed.
    Open,
    Read,
    Write,
    Admin,
    Metrics,
}

impl Access {
    pub fn of(method: &Method, path: &str) -> Self {
        match path {
            // The API's description holds no data; clients and tooling fetch it unauthenticated.
            "/healthz" | "/readyz" | "/openapi.json" => Self::Open,
            "/metrics" => Self::Metrics,
            "/v1/cluster" => Self::Admin,
            _ if path == "/v1/admin" || path.starts_with("/v1/admin/") => Self::Admin,
            _ if path.starts_with("/v1/")
                && !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) =>
            {
                Self::Write
            }
            _ => Self::Read,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
            Self::Metrics => "metrics",
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this route needs a bearer token (Authorization: Bearer <token>)")]
    Missing,
    #[error("the bearer token is not valid")]
    Invalid,
    #[error("the token's role {role} may not do this ({needed} access needed)")]
    Forbidden {
        role: &'static str,
        needed: &'static str,
    },
}

/// Why the token configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid tokens file {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("invalid [auth]: {0}")]
    Invalid(String),
}

/// The tokens file: `[[tokens]]` entries, the same shape as `[[auth.tokens]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

/// Checks one entry's shape: a name, and exactly one of `sha256` (64 hex digits) or `token`.
pub fn check_entry(entry: &TokenEntry) -> Result<(), String> {
    if entry.name.trim().is_empty() {
        return Err("a token entry has an empty name".into());
    }
    match (&entry.sha256, &entry.token) {
        (Some(hex), None) if decode_digest(hex).is_some() => Ok(()),
        (Some(_), None) => Err(format!(
            "token {:?}: sha256 must be 64 hex digits",
            entry.name
        )),
        (None, Some(token)) if !token.is_empty() => Ok(()),
        _ => Err(format!(
            "token {:?}: give exactly one of sha256 or token",
            entry.name
        )),
    }
}

fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of a token, as `sha256 = ...` in a tokens file.
pub fn digest_hex(token: &str) -> String {
    use std::fmt::Write as _;
    Sha256::digest(token.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[derive(Debug)]
struct Known {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The accepted tokens, swapped whole on reload.
#[derive(Debug, Default)]
struct TokenSet(Vec<Known>);

impl TokenSet {
    fn build(entries: &[TokenEntry]) -> Result<Self, String> {
        let mut known = Vec::with_capacity(entries.len());
        for entry in entries {
            check_entry(entry)?;
            let digest = match (&entry.sha256, &entry.token) {
                (Some(hex), _) => decode_digest(hex)
                    .ok_or_else(|| format!("token {:?}: bad sha256", entry.name))?,
                (None, Some(token)) => Sha256::digest(token.as_bytes()).into(),
                (None, None) => return Err(format!("token {:?}: no secret", entry.name)),
            };
            known.push(Known {
                name: entry.name.clone(),
                role: entry.role,
                digest,
            });
        }
        Ok(Self(known))
    }

    /// Compares against every entry without stopping early, so the time taken does not depend
    /// on which entry (if any) matched.
    fn find(&self, token: &str) -> Option<&Known> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for known in &self.0 {
            if bool::from(known.digest.ct_eq(&digest)) && found.is_none() {
                found = Some(known);
            }
        }
        found
    }
}

/// The node's authenticator.
#[derive(Debug)]
pub struct Auth {
    enabled: bool,
    inline: Vec<TokenEntry>,
    file: Option<PathBuf>,
    tokens: RwLock<Arc<TokenSet>>,
}

impl Auth {
    /// Loads `[auth]`; an absent section is an error (see [`Config::validate`]).
    pub fn load(config: &Config) -> Result<Self, AuthError> {
        let section: &AuthSection = config
            .auth
            .as_ref()
            .ok_or_else(|| AuthError::Invalid("missing [auth] section".into()))?;
        let auth = Self {
            enabled: section.enabled,
            inline: section.tokens.clone(),
            file: section.tokens_file.as_ref().map(|p| config.resolve(p)),
            tokens: RwLock::new(Arc::default()),
        };
        if auth.enabled {
            let count = auth.reload()?;
            if count == 0 {
                return Err(AuthError::Invalid(
                    "enabled = true but no token is configured".into(),
                ));
            }
        }
        Ok(auth)
    }

    /// No authentication at all.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            inline: Vec::new(),
            file: None,
            tokens: RwLock::new(Arc::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Re-reads the tokens file (if any); returns the number of tokens now accepted. On error
    /// the previous tokens stay in force.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let mut entries = self.inline.clone();
        if let Some(path) = &self.file {
            entries.extend(read_tokens_file(path)?);
        }
        let set = TokenSet::build(&entries).map_err(AuthError::Invalid)?;
        let count = set.0.len();
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(count)
    }

    /// Decides a request: `Ok(Some(name))` names the token that authorised it, `Ok(None)`
    /// means no token was needed (open route, or authentication disabled).
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Option<String>, Denied> {
        let access = Access::of(method, path);
        if !self.enabled || access == Access::Open {
            return Ok(None);
        }
        let token = bearer(headers).ok_or(Denied::Missing)?;
        let tokens = self
            .tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let known = tokens.find(token).ok_or(Denied::Invalid)?;
        if known.role.allows(access) {
            Ok(Some(known.name.clone()))
        } else {
            Err(Denied::Forbidden {
                role: known.role.as_str(),
                needed: access.as_str(),
            })
        }
    }
}

fn read_tokens_file(path: &Path) -> Result<Vec<TokenEntry>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: TokensFile = toml::from_str(&text).map_err(|e| AuthError::Parse {
        path: path.to_owned(),
        // The message of a TOML error quotes the offending line, which may hold a token.
        detail: e
            .message()
            .lines()
            .next()
            .unwrap_or("syntax error")
            .to_owned(),
    })?;
    Ok(file.tokens)
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, role: Role, token: &str) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            role,
            sha256: Some(digest_hex(token)),
            token: None,
        }
    }

    fn auth(entries: Vec<TokenEntry>) -> Auth {
        let auth = Auth {
            enabled: true,
            inline: entries,
            file: None,
            tokens: RwLock::new(Arc::default()),
        };
        auth.reload().unwrap();
        auth
    }

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn routes_are_classified_by_method_and_path() {
        assert_eq!(Access::of(&Method::GET, "/healthz"), Access::Open);
        assert_eq!(Access::of(&Method::GET, "/openapi.json"), Access::Open);
        assert_eq!(Access::of(&Method::GET, "/metrics"), Access::Metrics);
        assert_eq!(Access::of(&Method::GET, "/v1/cluster"), Access::Admin);
        assert_eq!(Access::of(&Method::GET, "/v1/admin/tree"), Access::Admin);
        assert_eq!(Access::of(&Method::GET, "/v1/registers/a"), Access::Read);
        assert_eq!(Access::of(&Method::PUT, "/v1/registers/a"), Access::Write);
        assert_eq!(Access::of(&Method::DELETE, "/v1/sets/a"), Access::Write);
        assert_eq!(Access::of(&Method::GET, "/nowhere"), Access::Read);
        // A prefix is not a path segment.
        assert_eq!(Access::of(&Method::GET, "/v1/administer"), Access::Read);
    }

    #[test]
    fn roles_and_tokens_decide() {
        let a = auth(vec![
            entry("r", Role::Read, "read-token"),
            entry("w", Role::Write, "write-token"),
            entry("m", Role::Metrics, "metrics-token"),
            TokenEntry {
                name: "root".into(),
                role: Role::Admin,
                sha256: None,
                token: Some("admin-token".into()),
            },
        ]);
        let check = |m: Method, p: &str, t: Option<&str>| a.check(&m, p, &headers(t));
        assert_eq!(check(Method::GET, "/healthz", None), Ok(None));
        assert_eq!(
            check(Method::GET, "/v1/registers/k", None),
            Err(Denied::Missing)
        );
        assert_eq!(
            check(Method::GET, "/v1/registers/k", Some("nope")),
            Err(Denied::Invalid)
        );
        assert_eq!(
            check(Method::GET, "/v1/registers/k", Some("read-token")),
            Ok(Some("r".into()))
        );
        assert!(matches!(
            check(Method::PUT, "/v1/registers/k", Some("read-token")),
            Err(Denied::Forbidden { .. })
        ));
        assert!(check(Method::PUT, "/v1/registers/k", Some("write-token")).is_ok());
        assert!(check(Method::GET, "/v1/cluster", Some("write-token")).is_err());
        assert!(check(Method::GET, "/v1/cluster", Some("admin-token")).is_ok());
        assert!(check(Method::GET, "/metrics", Some("metrics-token")).is_ok());
        assert!(check(Method::GET, "/v1/registers/k", Some("metrics-token")).is_err());
        let mut lower = HeaderMap::new();
        lower.insert(header::AUTHORIZATION, "bearer admin-token".parse().unwrap());
        assert!(a.check(&Method::GET, "/metrics", &lower).is_ok());
    }

    #[test]
    fn bad_entries_are_refused() {
        let mut bad = entry("x", Role::Read, "t");
        bad.sha256 = Some("abc".into());
        assert!(check_entry(&bad).is_err());
        bad.sha256 = None;
        assert!(check_entry(&bad).is_err());
    }
}
