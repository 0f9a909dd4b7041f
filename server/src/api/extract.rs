//! Request parsing: keys, JSON bodies and headers, each failing with its own problem.

use std::fmt;
use std::str::FromStr;

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderName, StatusCode, header, request};
use serde::de::DeserializeOwned;

use super::AppState;
use super::problem::Problem;

/// A key from the path, checked against the limits.
pub fn validate_key(key: &str, max_bytes: usize) -> Result<(), Problem> {
    if key.is_empty() {
        return Err(Problem::bad_request(
            "invalid-key",
            "the key must not be empty",
        ));
    }
    if key.len() > max_bytes {
        return Err(Problem::bad_request(
            "invalid-key",
            format!("the key is {} bytes; the limit is {max_bytes}", key.len()),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(Problem::bad_request(
            "invalid-key",
            "the key must not contain control characters",
        ));
    }
    Ok(())
}

/// A JSON request body, read within the body-size limit and parsed into `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        check_content_type(request.headers())?;
        let limit = state.limits.max_body_bytes;
        let bytes = read_body(request.into_body(), limit).await?;
        if bytes.is_empty() {
            return Err(Problem::bad_request(
                "invalid-json",
                "the request body is empty; JSON expected",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| Problem::bad_request("invalid-json", format!("invalid JSON body: {e}")))
    }
}

/// Reads at most `limit` bytes; a larger body (declared or streamed) is refused as soon as it
/// crosses the limit, and a body that stalls is cut by the body timeout.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, Problem> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let inner = error.into_inner();
        if caused_by::<http_body_util::LengthLimitError>(&*inner) {
            Problem::too_large(format!("the request body exceeds {limit} bytes"))
        } else if caused_by::<crate::http::BodyStalled>(&*inner) {
            Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "the request body was not received in time",
            )
        } else {
            Problem::bad_request(
                "invalid-body",
                format!("could not read the request body: {inner}"),
            )
        }
    })
}

/// Whether `error`, or any error it wraps, is an `E`: a body's own error reaches the handler
/// wrapped by each layer it passed (axum's `Body`, the length limit).
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(<dyn std::error::Error>::is::<E>)
}

/// Accepts JSON media types, or none at all (as `curl -d` users often send); refuses others.
fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let media = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    // Compared without lowering a copy first: this runs on every write.
    let media_bytes = media.as_bytes();
    let ends_with_json = media_bytes.len() >= b"+json".len()
        && media_bytes[media_bytes.len() - b"+json".len()..].eq_ignore_ascii_case(b"+json");
    let starts_with_application = media_bytes.len() >= b"application/".len()
        && media_bytes[..b"application/".len()].eq_ignore_ascii_case(b"application/");
    if media.eq_ignore_ascii_case("application/json") || (starts_with_application && ends_with_json)
    {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!(
                "content type {:?} is not JSON; send application/json",
                media.to_ascii_lowercase()
            ),
        ))
    }
}

/// How many nodes must take part in a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsistencyLevel {
    #[default]
    LocalOne,
    LocalQuorum,
    GlobalQuorum,
    All,
}

impl ConsistencyLevel {
    pub const NAMES: [&'static str; 4] = ["LOCAL_ONE", "LOCAL_QUORUM", "GLOBAL_QUORUM", "ALL"];

    /// From `Consistency-Level`, or `X-Consistency-Level`; absent means LOCAL_ONE.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, Problem> {
        static LEVEL: HeaderName = HeaderName::from_static("consistency-level");
        static LEVEL_ALIAS: HeaderName = HeaderName::from_static("x-consistency-level");
        let value = headers.get(&LEVEL).or_else(|| headers.get(&LEVEL_ALIAS));
        let Some(value) = value else {
            return Ok(Self::default());
        };
        value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                Problem::bad_request(
                    "invalid-consistency-level",
                    format!(
                        "Consistency-Level {:?} is not one of {}",
                        String::from_utf8_lossy(value.as_bytes()),
                        Self::NAMES.join(", ")
                    ),
                )
            })
    }
}

/// What a write answers with, from the request's `Prefer` header (RFC 7240): the new state,
/// or with `return=minimal` a summary of it, which a client adding to a large set wants
/// rather than every element back on every add.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReturnPreference {
    #[default]
    Representation,
    Minimal,
}

impl ReturnPreference {
    /// The first `return` preference of any `Prefer` header (RFC 7240 §2: a repeated
    /// preference counts only the first time); preferences a node does not know, and values it
    /// cannot read, are ignored, as the RFC asks.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        static PREFER: HeaderName = HeaderName::from_static("prefer");
        headers
            .get_all(&PREFER)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .find_map(|preference| {
                // `return=minimal; param=...`: the parameters do not matter here.
                let token = preference.split(';').next()?;
                let (name, value) = token.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("return")
                    .then(|| value.trim().trim_matches('"'))
            })
            .map_or(Self::Representation, |value| {
                if value.eq_ignore_ascii_case("minimal") {
                    Self::Minimal
                } else {
                    Self::Representation
                }
            })
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ReturnPreference {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self::from_headers(&parts.headers))
    }
}

/// The request's consistency level, or the problem with its header: extracted without cloning
/// the request's headers (axum's `HeaderMap` extractor copies them all), and left for the
/// handler to refuse so the refusal is counted like any other outcome.
#[derive(Debug)]
pub struct RequestedLevel(Result<ConsistencyLevel, Problem>);

impl RequestedLevel {
    pub fn get(&self) -> Result<ConsistencyLevel, Problem> {
        self.0.clone()
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestedLevel {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(ConsistencyLevel::from_headers(&parts.headers)))
    }
}

impl FromStr for ConsistencyLevel {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_uppercase().as_str() {
            "LOCAL_ONE" => Ok(Self::LocalOne),
            "LOCAL_QUORUM" => Ok(Self::LocalQuorum),
            "GLOBAL_QUORUM" => Ok(Self::GlobalQuorum),
            "ALL" => Ok(Self::All),
            _ => Err(()),
        }
    }
}

impl ConsistencyLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LocalOne => "LOCAL_ONE",
            Self::LocalQuorum => "LOCAL_QUORUM",
            Self::GlobalQuorum => "GLOBAL_QUORUM",
            Self::All => "ALL",
        }
    }
}

impl fmt::Display for ConsistencyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_content_type(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    fn prefer(values: &[&'static str]) -> ReturnPreference {
        let mut headers = HeaderMap::new();
        for &value in values {
            headers.append("prefer", HeaderValue::from_static(value));
        }
        ReturnPreference::from_headers(&headers)
    }

    #[test]
    fn return_minimal_is_found_among_other_preferences_and_the_first_return_counts() {
        use ReturnPreference::{Minimal, Representation};
        assert_eq!(prefer(&[]), Representation);
        assert_eq!(prefer(&["return=minimal"]), Minimal);
        assert_eq!(prefer(&["RETURN = \"Minimal\" ; foo=bar"]), Minimal);
        assert_eq!(prefer(&["respond-async, wait=10, return=minimal"]), Minimal);
        assert_eq!(prefer(&["handling=lenient", "return=minimal"]), Minimal);
        assert_eq!(prefer(&["return=representation"]), Representation);
        assert_eq!(
            prefer(&["return=representation, return=minimal"]),
            Representation
        );
        assert_eq!(
            prefer(&["return=minimal", "return=representation"]),
            Minimal
        );
        // Unknown values and malformed preferences are ignored, not refused.
        assert_eq!(prefer(&["return=brief"]), Representation);
        assert_eq!(prefer(&["return", "minimal", ";;,="]), Representation);
        assert_eq!(prefer(&["returns=minimal"]), Representation);
    }

    #[test]
    fn json_media_types_pass_in_any_case_and_others_are_refused() {
        for accepted in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "  application/json  ",
            "application/merge-patch+json",
            "APPLICATION/VND.API+JSON",
        ] {
            assert!(
                check_content_type(&with_content_type(accepted)).is_ok(),
                "{accepted}"
            );
        }
        assert!(check_content_type(&HeaderMap::new()).is_ok());
        for refused in [
            "text/plain",
            "application/xml",
            "text/x+json",
            "application/jsonp",
            "application/+jso",
            "json",
            "",
        ] {
            let problem = check_content_type(&with_content_type(refused)).unwrap_err();
            assert_eq!(problem.status, 415, "{refused}");
        }
    }
}
