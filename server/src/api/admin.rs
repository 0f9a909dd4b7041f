//! Operator endpoints: anti-entropy on demand, the Merkle tree's summary, online backups, and (behind
//! `[debug] allow_state_overwrite`) a way to corrupt a key for anti-entropy tests.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meridian_crdt::{CanonicalJson, Kind, NodeId, OrSet, State as CrdtState};
use meridian_replication::merkle;
use serde::Deserialize;

use super::AppState;
use super::extract::JsonBody;
use super::problem::Problem;

#[derive(Debug, Deserialize)]
pub struct SyncQuery {
    /// The peer's node name (or id).
    pub peer: String,
}

/// Runs one anti-entropy round with a peer now and answers what it repaired.
pub async fn anti_entropy(
    State(app): State<AppState>,
    query: Result<Query<SyncQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return Problem::bad_request("invalid-query", rejection.body_text()).into_response();
        }
    };
    let Some(replicator) = app.cluster.replicator_arc() else {
        return Problem::bad_request("no-peers", "this node has no peers").into_response();
    };
    // The tree trails recent writes by up to a checkpoint; an operator asking now means now.
    if let Err(error) = app.storage.fold_now().await {
        return Problem::from(error).into_response();
    }
    match replicator.sync_peer(&query.peer).await {
        Ok(report) => {
            Json(serde_json::json!({ "peer": query.peer, "round": report })).into_response()
        }
        Err(meridian_replication::AeError::UnknownPeer(name)) => {
            Problem::not_found(format!("no peer named {name:?}")).into_response()
        }
        Err(error) => {
            Problem::unavailable("anti-entropy-failed", error.to_string(), 1).into_response()
        }
    }
}

/// The Merkle tree: root hash, keys, non-empty buckets.
pub async fn tree(State(app): State<AppState>) -> Response {
    if let Err(error) = app.storage.fold_now().await {
        return Problem::from(error).into_response();
    }
    let (root, keys, nonempty) = app
        .storage
        .with_tree(|t| (t.root(), t.len(), t.nonempty_buckets()));
    Json(serde_json::json!({
        "root": merkle::hex(&root),
        "keys": keys,
        "buckets": merkle::BUCKETS,
        "nonempty_buckets": nonempty,
    }))
    .into_response()
}

/// Response header of `POST /v1/admin/backup`: the backup's summary as JSON.
pub const BACKUP_INFO_HEADER: &str = "meridian-backup";

/// Streams a consistent snapshot of this node's data (a redb file; see
/// [`crate::storage::backup`]). The file is staged in the data directory and unlinked as soon
/// as it is open, so nothing is left behind once the download ends, however it ends.
pub async fn backup(State(app): State<AppState>) -> Response {
    let path = app
        .data_dir
        .join(format!(".backup-{:016x}.redb", rand::random::<u64>()));
    // The copy runs in its own task: if the client goes away mid-copy, the task still
    // finishes and removes the staged file.
    let (done, result) = tokio::sync::oneshot::channel();
    let storage = app.storage.clone();
    let staged = path.clone();
    tokio::spawn(async move {
        let outcome = storage.backup(&staged).await;
        if outcome.is_err() || done.is_closed() {
            let _ = tokio::fs::remove_file(&staged).await;
        }
        let _ = done.send(outcome);
    });
    let info = match result.await {
        Ok(Ok(info)) => info,
        Ok(Err(error)) => {
            tracing::error!(%error, "backup failed");
            return Problem::internal(format!("backup failed: {error}")).into_response();
        }
        Err(_) => return Problem::internal("the backup task ended early").into_response(),
    };
    let file = tokio::fs::File::open(&path).await;
    let _ = tokio::fs::remove_file(&path).await;
    let file = match file {
        Ok(file) => file,
        Err(error) => {
            return Problem::internal(format!("reading the staged backup: {error}"))
                .into_response();
        }
    };
    tracing::info!(keys = info.keys, bytes = info.bytes, "streaming a backup");
    let summary = serde_json::to_string(&info).unwrap_or_default();
    let mut response =
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, info.bytes.into());
    if let Ok(value) = HeaderValue::from_str(&summary) {
        headers.insert(BACKUP_INFO_HEADER, value);
    }
    response
}

#[derive(Debug, Deserialize)]
pub struct PhantomElement {
    pub element: serde_json::Value,
}

/// The node id a fabricated element claims: no real node has it.
const PHANTOM_NODE: u64 = u64::MAX >> 1;

/// Test only: adds `element` to set `key` on this node alone, as if by an op of a node that
/// does not exist, logging nothing: a valid but divergent state only anti-entropy can spread.
pub async fn merge_unlogged(
    State(app): State<AppState>,
    key: Result<Path<String>, PathRejection>,
    body: Result<JsonBody<PhantomElement>, Problem>,
) -> Response {
    // Refused before anything of the request is looked at.
    if !app.debug_overwrite {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "debug-disabled",
            "set [debug] allow_state_overwrite = true to use this endpoint",
        )
        .into_response();
    }
    let (key, body) = match (key, body) {
        (Ok(Path(key)), Ok(JsonBody(body))) => (key, body),
        (Err(rejection), _) => {
            return Problem::bad_request("invalid-path", rejection.body_text()).into_response();
        }
        (_, Err(problem)) => return problem.into_response(),
    };
    let Some(phantom) = NodeId::new(PHANTOM_NODE) else {
        return Problem::internal("phantom node id").into_response();
    };
    let current = match app.storage.get(Kind::Set, &key) {
        Ok(Some(CrdtState::Set(set))) => set,
        Ok(_) => OrSet::default(),
        Err(error) => return Problem::internal(error.to_string()).into_response(),
    };
    let delta = current.add(phantom, [CanonicalJson::new(&body.element)]);
    let states = vec![(merkle::storage_key(Kind::Set, &key), CrdtState::Set(delta))];
    let merged = match app.storage.merge_full_states(states).await {
        Ok(changed) => changed,
        Err(error) => return Problem::internal(error.to_string()).into_response(),
    };
    // Into the Merkle tree at once, so a test's next anti-entropy round sees the divergence.
    if let Err(error) = app.storage.fold_now().await {
        return Problem::from(error).into_response();
    }
    Json(serde_json::json!({ "changed": merged })).into_response()
}
