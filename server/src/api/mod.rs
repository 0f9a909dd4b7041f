//! The HTTP API (axum): data routes under `/v1`, operations endpoints, and the middleware that
//! enforces limits and records metrics.

pub mod admin;
pub mod answer;
pub mod budget;
pub mod consistency;
pub mod data;
pub mod extract;
pub mod ops;
pub mod problem;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use utoipa::OpenApi;

use consistency::SessionCtx;
pub use extract::ConsistencyLevel;
use meridian_crdt::VersionVector;
use problem::Problem;

use crate::auth::{Auth, Denied};
use crate::cluster::ClusterView;
use crate::config::{Limits, Timeouts};
use crate::metrics::Metrics;
use crate::session::{SessionKeys, TokenError};
use crate::storage::Storage;

// Header names as `HeaderName`s: looking one up or inserting it by `&str` parses and
// lower-cases the name again on every request.

/// Request and response header carrying the session token.
pub static SESSION_HEADER: HeaderName = HeaderName::from_static("session-token");
/// Response header of reads: how stale this node's view of each peer region may be.
pub static LAG_HEADER: HeaderName = HeaderName::from_static("replication-lag");

/// Shared by every handler: one reference count per request rather than one per field.
#[derive(Clone, Debug)]
pub struct AppState(Arc<App>);

impl AppState {
    pub fn new(app: App) -> Self {
        Self(Arc::new(app))
    }
}

impl std::ops::Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

/// What the handlers share; see [`AppState`].
#[derive(Debug)]
pub struct App {
    pub storage: Storage,
    pub limits: Arc<Limits>,
    pub timeouts: Arc<Timeouts>,
    pub metrics: Arc<Metrics>,
    pub cluster: Arc<ClusterView>,
    /// False until start-up completes and again once shutdown begins: `/readyz` reports it.
    pub ready: Arc<AtomicBool>,
    /// Permits for requests in flight; when none is left, requests are refused with 503.
    pub in_flight: Arc<Semaphore>,
    /// KiB of large answers on their way to clients ([`budget`]).
    pub answer_budget: Arc<Semaphore>,
    /// Signs and checks session tokens.
    pub sessions: Arc<SessionKeys>,
    /// `[debug] allow_state_overwrite`: enables the state-corrupting test endpoint.
    pub debug_overwrite: bool,
    /// Bearer tokens and roles: checked first thing in [`guard`].
    pub auth: Arc<Auth>,
    /// The node's data directory: online backups are staged there (same file system, so
    /// no tmpfs fills up) before they are streamed.
    pub data_dir: Arc<std::path::PathBuf>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Meridian",
        description = "Multi-region active-active CRDT datastore"
    ),
    paths(
        data::get_register,
        data::put_register,
        data::delete_register,
        data::get_counter,
        data::incr_counter,
        data::reset_counter,
        data::get_gcounter,
        data::incr_gcounter,
        data::reset_gcounter,
        data::get_set,
        data::update_set,
        data::clear_set,
        data::set_contains,
        data::list_keys,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::cluster,
    ),
    components(schemas(Problem, data::WriteSummary))
)]
struct ApiDoc;

/// The OpenAPI document, generated from the handlers' annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The complete application, limits and metrics included.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/registers/{key}",
            get(data::get_register)
                .put(data::put_register)
                .delete(data::delete_register),
        )
        .route(
            "/v1/counters/{key}",
            get(data::get_counter)
                .post(data::incr_counter)
                .delete(data::reset_counter),
        )
        .route(
            "/v1/gcounters/{key}",
            get(data::get_gcounter)
                .post(data::incr_gcounter)
                .delete(data::reset_gcounter),
        )
        .route(
            "/v1/sets/{key}",
            get(data::get_set)
                .post(data::update_set)
                .delete(data::clear_set),
        )
        .route("/v1/sets/{key}/contains", get(data::set_contains))
        .route("/v1/{type}", get(data::list_keys))
        .route("/v1/cluster", get(ops::cluster))
        .route("/v1/admin/anti-entropy", post(admin::anti_entropy))
        .route("/v1/admin/tree", get(admin::tree))
        .route(BACKUP_ROUTE, post(admin::backup))
        .route(
            "/v1/admin/debug/merge-unlogged/sets/{key}",
            post(admin::merge_unlogged),
        );
    Router::new()
        .merge(v1)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn not_found(request: Request) -> Problem {
    Problem::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// The session token a request carries: an empty vector when it carries none.
fn request_token(app: &AppState, request: &Request) -> Result<VersionVector, TokenError> {
    match request.headers().get(&SESSION_HEADER) {
        None => Ok(VersionVector::new()),
        Some(value) => {
            if value.len() > crate::session::MAX_TOKEN_LEN {
                return Err(TokenError::TooLong(value.len()));
            }
            let text = value.to_str().map_err(|_| TokenError::NotBase64)?;
            app.sessions.decode(text)
        }
    }
}

/// Authentication, sessions, concurrency limit, request timeout and metrics, around every
/// request. Authentication comes first: a refused request touches nothing else.
///
/// Every response carries a `Session-Token` with the request's token joined with what the
/// request saw or wrote, except the 400 answering a token that does not check out (this node
/// cannot vouch for it). Reads (`GET /v1/...`) also carry `Replication-Lag`.
async fn guard(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| crate::metrics::intern_route(p.as_str()));
    let method = crate::metrics::method_label(request.method());
    let is_read = request.method() == Method::GET && route.starts_with("/v1/");
    if let Err(denied) = app
        .auth
        .check(request.method(), request.uri().path(), request.headers())
    {
        let response = refuse(&denied);
        app.metrics
            .record_request(route, method, response.status().as_u16(), started.elapsed());
        return response;
    }
    let (mut response, session) = match request_token(&app, &request) {
        Err(error) => (Problem::from(error).into_response(), None),
        Ok(token) => {
            let session = Arc::new(SessionCtx::new(
                token,
                tokio::time::Instant::from_std(started),
            ));
            request.extensions_mut().insert(session.clone());
            (
                limited(&app, route, request, next, &session).await,
                Some(session),
            )
        }
    };
    if route != BACKUP_ROUTE {
        response = budget::hold_answer_budget(&app, response).await;
    }
    let headers = response.headers_mut();
    if let Some(session) = session {
        if let Ok(value) = HeaderValue::from_str(&app.sessions.encode(&session.response_vector())) {
            headers.insert(SESSION_HEADER.clone(), value);
        }
    }
    if is_read {
        if let Ok(value) = HeaderValue::from_str(&app.cluster.replication_lag_header()) {
            headers.insert(LAG_HEADER.clone(), value);
        }
    }
    app.metrics
        .record_request(route, method, response.status().as_u16(), started.elapsed());
    response
}

/// 401 with a `WWW-Authenticate` challenge for a missing or unknown token, 403 for a token
/// whose role does not cover the route.
fn refuse(denied: &Denied) -> Response {
    let (status, slug, challenge) = match denied {
        Denied::Missing => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Bearer realm=\"meridian\"",
        ),
        Denied::Invalid => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Bearer realm=\"meridian\", error=\"invalid_token\"",
        ),
        Denied::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden", ""),
    };
    let mut response = Problem::new(status, slug, denied.to_string()).into_response();
    if !challenge.is_empty() {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    response
}

/// The backup route: exempt from the request timeout, since copying a large data set takes
/// as long as it takes (and the copy goes on, unobserved, if the client stops waiting).
const BACKUP_ROUTE: &str = "/v1/admin/backup";

/// The concurrency limit and the request timeout.
async fn limited(
    app: &AppState,
    route: &str,
    request: Request,
    next: Next,
    session: &SessionCtx,
) -> Response {
    match app.in_flight.clone().try_acquire_owned() {
        Ok(_permit) if route == BACKUP_ROUTE => next.run(request).await,
        Err(_) => Problem::unavailable(
            "overloaded",
            "too many requests in flight; retry shortly",
            1,
        )
        .into_response(),
        Ok(_permit) => {
            match tokio::time::timeout(app.timeouts.request(), next.run(request)).await {
                Ok(response) => response,
                // A write already queued still commits: the client only stops waiting. A 503
                // would say it was refused, and a client that retried an increment on it
                // would count it twice.
                Err(_) if session.write_queued() => Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "request-timeout",
                    format!(
                        "the write did not complete within {} ms; it was queued and is applied \
                         unless the node fails first, and then replicates: read the key \
                         before retrying a write that is not idempotent (an increment)",
                        app.timeouts.request_ms
                    ),
                )
                .into_response(),
                Err(_) => Problem::unavailable(
                    "request-timeout",
                    format!(
                        "the request did not complete within {} ms",
                        app.timeouts.request_ms
                    ),
                    1,
                )
                .into_response(),
            }
        }
    }
}
