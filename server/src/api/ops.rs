//! Operations endpoints: liveness, readiness, metrics, cluster state, OpenAPI.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::problem::Problem;
use crate::cluster::ClusterStatus;

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready: storage is open and the node is not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready"), (status = 503, body = Problem)))]
pub async fn readyz(State(app): State<AppState>) -> Response {
    if app.ready.load(Ordering::Acquire) && app.storage.is_healthy() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        Problem::unavailable(
            "not-ready",
            "the node is starting, shutting down, or its storage failed",
            1,
        )
        .into_response()
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    app.cluster.refresh_metrics(&app.storage, &app.metrics);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Nodes, regions, connection state, applied vectors, replication lag and clock skew.
#[utoipa::path(get, path = "/v1/cluster", tag = "operations", responses((status = 200, body = ClusterStatus)))]
pub async fn cluster(State(app): State<AppState>) -> Json<ClusterStatus> {
    Json(app.cluster.status(&app.storage))
}

pub async fn openapi_json() -> Response {
    Json(super::openapi()).into_response()
}
