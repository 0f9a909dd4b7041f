//! Errors as RFC 9457 problem details, mapped to HTTP in this one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::consistency::ConsistencyError;
use crate::session::TokenError;
use crate::storage::{StorageError, WriteError};

/// Every error the API answers, as `application/problem+json`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A stable URI naming the kind of problem: `urn:meridian:problem:<slug>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Seconds after which retrying may succeed (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// For a 503/504 of a consistency level: which level, and how many nodes.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub coordination: Option<Box<Coordination>>,
}

/// How far a request at a consistency level got (extension members of a problem).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Coordination {
    /// The consistency level of the request.
    pub level: String,
    /// Nodes the level needs, this one included.
    pub required: usize,
    /// Nodes the failure detector considered reachable, this one included (503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachable: Option<usize>,
    /// Nodes known to hold the write durably (504 of a write), or that answered (a read),
    /// this one included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<usize>,
}

impl Problem {
    fn coordinated(
        self,
        level: super::ConsistencyLevel,
        required: usize,
        reachable: Option<usize>,
        acknowledged: Option<usize>,
    ) -> Self {
        Self {
            coordination: Some(Box::new(Coordination {
                level: level.to_string(),
                required,
                reachable,
                acknowledged,
            })),
            ..self
        }
    }
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:meridian:problem:{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            retry_after: None,
            coordination: None,
        }
    }

    pub fn bad_request(slug: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", detail)
    }

    pub fn unavailable(slug: &str, detail: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, slug, detail)
        }
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StorageError> for Problem {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::ShuttingDown => {
                Self::unavailable("shutting-down", "the node is shutting down", 1)
            }
            StorageError::NotDurable { .. } => {
                tracing::warn!(error = %error, "a read timed out waiting for the journal");
                Self::unavailable("not-durable", error.to_string(), 1)
            }
            other => {
                tracing::error!(error = %other, "storage error");
                Self::internal(format!("storage error: {other}"))
            }
        }
    }
}

impl From<WriteError> for Problem {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::CounterOverflow => {
                Self::new(StatusCode::CONFLICT, "counter-overflow", error.to_string())
            }
            WriteError::TooManyElements { .. } => Self::too_large(error.to_string()),
            WriteError::Storage(e) => e.into(),
        }
    }
}

impl From<TokenError> for Problem {
    fn from(error: TokenError) -> Self {
        Self::bad_request("invalid-session-token", error.to_string())
    }
}

impl From<ConsistencyError> for Problem {
    fn from(error: ConsistencyError) -> Self {
        let detail = error.to_string();
        match error {
            ConsistencyError::Unavailable {
                level,
                required,
                reachable,
            } => Self::unavailable("unavailable", detail, 1).coordinated(
                level,
                required,
                Some(reachable),
                None,
            ),
            ConsistencyError::WriteTimeout {
                level,
                required,
                acknowledged,
                ..
            } => Self::new(StatusCode::GATEWAY_TIMEOUT, "write-timeout", detail).coordinated(
                level,
                required,
                None,
                Some(acknowledged),
            ),
            ConsistencyError::ReadTimeout {
                level,
                required,
                answered,
                ..
            } => Self::new(StatusCode::GATEWAY_TIMEOUT, "read-timeout", detail).coordinated(
                level,
                required,
                None,
                Some(answered),
            ),
            ConsistencyError::ReadFailed {
                level,
                required,
                answered,
            } => Self::unavailable("unavailable", detail, 1).coordinated(
                level,
                required,
                None,
                Some(answered),
            ),
            ConsistencyError::SessionBehind { .. } => {
                Self::unavailable("session-not-caught-up", detail, 1)
            }
            ConsistencyError::Merge(_) => {
                tracing::error!(error = %detail, "merging states of a quorum read");
                Self::internal(detail)
            }
        }
    }
}

/// What handlers return.
pub type ApiResult<T> = Result<T, Problem>;
