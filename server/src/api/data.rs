//! The data API: registers, counters, G-counters and sets under `/v1`.
//!
//! utoipa's `IntoParams` expansion names parameter types by a path the lint calls redundant.
#![allow(unused_qualifications)]

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meridian_crdt::{CanonicalJson, Kind, OrSet, Stamp, State as CrdtState};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::answer::{self, JsonAnswer, WriteJson};
use super::consistency::Session;
use super::extract::{ConsistencyLevel, JsonBody, RequestedLevel, ReturnPreference, validate_key};
use super::problem::{ApiResult, Problem};
use crate::storage::{Committed, Intent};

/// Where a write landed: the origin node, its sequence there, and the HLC stamp.
#[derive(Debug, Serialize, ToSchema)]
pub struct WriteMeta {
    pub origin: u64,
    pub seq: u64,
    /// HLC time of the write (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String)]
    pub timestamp: Stamp,
}

/// The answer to a write sent with `Prefer: return=minimal`: where the write landed, and a
/// set's size, without the state.
#[derive(Debug, Serialize, ToSchema)]
pub struct WriteSummary {
    pub key: String,
    /// The set's size right after the write (sets only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    pub meta: WriteMeta,
}

/// A write's answer: the key's new state, or its summary when the client prefers that.
#[derive(Debug)]
pub enum WriteAnswer<V> {
    State(V),
    Summary(WriteSummary),
}

impl<V: WriteJson> IntoResponse for WriteAnswer<V> {
    fn into_response(self) -> Response {
        static PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");
        match self {
            Self::State(view) => JsonAnswer(view).into_response(),
            Self::Summary(summary) => {
                let mut response = JsonAnswer(summary).into_response();
                response.headers_mut().insert(
                    &PREFERENCE_APPLIED,
                    HeaderValue::from_static("return=minimal"),
                );
                response
            }
        }
    }
}

impl From<&Committed> for WriteMeta {
    fn from(c: &Committed) -> Self {
        Self {
            origin: c.dot.node.get(),
            seq: c.dot.seq,
            timestamp: c.stamp,
        }
    }
}

fn rfc3339<S: Serializer>(stamp: &Stamp, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&stamp.to_rfc3339())
}

// `serialize_with` hands over a reference to the field, whatever its type.
#[allow(clippy::ref_option)]
fn json_or_null<S: Serializer>(
    value: &Option<CanonicalJson>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(json) => json.to_raw().serialize(serializer),
        None => RawValue::NULL.serialize(serializer),
    }
}

fn elements_json<S: Serializer>(set: &OrSet, serializer: S) -> Result<S::Ok, S::Error> {
    let mut seq = serializer.serialize_seq(Some(set.len()))?;
    for element in set.elements() {
        seq.serialize_element(&element.to_raw())?;
    }
    seq.end()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegisterView {
    pub key: String,
    /// The value; `null` only in the answer to a delete.
    #[serde(serialize_with = "json_or_null")]
    #[schema(value_type = Value)]
    pub value: Option<CanonicalJson>,
    /// HLC time of the winning write (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String)]
    pub timestamp: Stamp,
    /// Node id of the winning write's origin.
    pub origin: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<WriteMeta>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CounterView {
    pub key: String,
    pub value: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<WriteMeta>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GCounterView {
    pub key: String,
    pub value: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<WriteMeta>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SetView {
    pub key: String,
    /// Elements in canonical order (by their canonical JSON text).
    #[serde(serialize_with = "elements_json")]
    #[schema(value_type = Vec<Value>)]
    pub elements: OrSet,
    pub size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<WriteMeta>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContainsView {
    pub key: String,
    pub element: Value,
    pub contains: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<String>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

// The answers' JSON, field for field in the order of the derives above (see `answer`).

impl WriteJson for WriteMeta {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"origin\":");
        answer::integer(out, self.origin);
        out.extend_from_slice(b",\"seq\":");
        answer::integer(out, self.seq);
        out.extend_from_slice(b",\"timestamp\":");
        answer::stamp(out, self.timestamp);
        out.push(b'}');
    }
}

/// `{"key":"…"`: how every answer opens.
fn open_with_key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b"{\"key\":");
    answer::string(out, key);
}

/// `,"meta":{...}` when there is one; then the closing brace.
fn close_with_meta(out: &mut Vec<u8>, meta: Option<&WriteMeta>) {
    if let Some(meta) = meta {
        out.extend_from_slice(b",\"meta\":");
        meta.write_json(out);
    }
    out.push(b'}');
}

impl WriteJson for RegisterView {
    fn write_json(&self, out: &mut Vec<u8>) {
        open_with_key(out, &self.key);
        out.extend_from_slice(b",\"value\":");
        match &self.value {
            Some(json) => out.extend_from_slice(json.as_str().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"timestamp\":");
        answer::stamp(out, self.timestamp);
        out.extend_from_slice(b",\"origin\":");
        answer::integer(out, self.origin);
        close_with_meta(out, self.meta.as_ref());
    }
}

/// Both counters' answers: the key, the value, the meta.
fn counter_json(out: &mut Vec<u8>, key: &str, value: impl itoa::Integer, meta: Option<&WriteMeta>) {
    open_with_key(out, key);
    out.extend_from_slice(b",\"value\":");
    answer::integer(out, value);
    close_with_meta(out, meta);
}

impl WriteJson for CounterView {
    fn write_json(&self, out: &mut Vec<u8>) {
        counter_json(out, &self.key, self.value, self.meta.as_ref());
    }
}

impl WriteJson for GCounterView {
    fn write_json(&self, out: &mut Vec<u8>) {
        counter_json(out, &self.key, self.value, self.meta.as_ref());
    }
}

impl WriteJson for WriteSummary {
    fn write_json(&self, out: &mut Vec<u8>) {
        open_with_key(out, &self.key);
        if let Some(size) = self.size {
            out.extend_from_slice(b",\"size\":");
            answer::integer(out, size);
        }
        close_with_meta(out, Some(&self.meta));
    }
}

impl WriteJson for SetView {
    fn write_json(&self, out: &mut Vec<u8>) {
        open_with_key(out, &self.key);
        out.extend_from_slice(b",\"elements\":[");
        for (index, element) in self.elements.elements().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            out.extend_from_slice(element.as_str().as_bytes());
        }
        out.extend_from_slice(b"],\"size\":");
        answer::integer(out, self.size);
        close_with_meta(out, self.meta.as_ref());
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncrementBody {
    /// Added to the counter; negative subtracts (PN-Counter only).
    pub increment: i64,
}

/// An increment of a grow-only counter.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrowBody {
    /// Added to the counter: 0 to 2^64 − 1.
    // Read wider than u64 so that a negative increment gets its own problem type.
    #[schema(value_type = u64)]
    pub increment: i128,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetUpdateBody {
    #[serde(default)]
    pub add: Vec<Value>,
    #[serde(default)]
    pub remove: Vec<Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only keys starting with this.
    #[serde(default)]
    pub prefix: String,
    /// Page size (default 100, at most the configured maximum).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ContainsParams {
    /// The element as JSON text (`"milk"`, `1`, `{"a":1}`); text that is not JSON is taken
    /// as a string.
    pub element: String,
}

fn path_key(app: &AppState, key: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(key) = key.map_err(|e| Problem::bad_request("invalid-key", e.body_text()))?;
    validate_key(&key, app.limits.max_key_bytes)?;
    Ok(key)
}

fn canonical(app: &AppState, value: &Value, what: &str) -> ApiResult<CanonicalJson> {
    let json = CanonicalJson::new(value);
    if json.len() > app.limits.max_value_bytes {
        return Err(Problem::too_large(format!(
            "the {what} is {} bytes of JSON; the limit is {}",
            json.len(),
            app.limits.max_value_bytes
        )));
    }
    Ok(json)
}

fn register_view(
    key: String,
    state: &CrdtState,
    meta: Option<WriteMeta>,
) -> ApiResult<RegisterView> {
    let CrdtState::Register(register) = state else {
        return Err(Problem::internal("state of the wrong type"));
    };
    let entry = register
        .entry()
        .ok_or_else(|| Problem::not_found(format!("register {key:?} does not exist")))?;
    Ok(RegisterView {
        value: entry.value.clone(),
        timestamp: entry.stamp,
        origin: entry.stamp.node.get(),
        key,
        meta,
    })
}

fn set_view(key: String, state: &CrdtState, meta: Option<WriteMeta>) -> ApiResult<SetView> {
    let CrdtState::Set(set) = state else {
        return Err(Problem::internal("state of the wrong type"));
    };
    // Shares the set's tree: the answer is written from it, element by element.
    Ok(SetView {
        elements: set.clone(),
        size: set.len(),
        key,
        meta,
    })
}

fn counter_view(key: String, state: &CrdtState, meta: Option<WriteMeta>) -> ApiResult<CounterView> {
    let CrdtState::Counter(c) = state else {
        return Err(Problem::internal("state of the wrong type"));
    };
    Ok(CounterView {
        key,
        value: c.value(),
        meta,
    })
}

fn gcounter_view(
    key: String,
    state: &CrdtState,
    meta: Option<WriteMeta>,
) -> ApiResult<GCounterView> {
    let CrdtState::GCounter(c) = state else {
        return Err(Problem::internal("state of the wrong type"));
    };
    Ok(GCounterView {
        key,
        value: c.value(),
        meta,
    })
}

/// How a data request ended, for the per-level latency histogram.
fn outcome(problem: &Problem) -> &'static str {
    match problem.status {
        503 if problem.kind.ends_with("session-not-caught-up") => "session_behind",
        503 if problem.kind.ends_with(":unavailable") => "unavailable",
        504 => "timeout",
        _ => "error",
    }
}

fn record(
    app: &AppState,
    level: ConsistencyLevel,
    op: &'static str,
    result: Result<(), &Problem>,
    session: &Session,
) {
    let outcome = result.map_or_else(outcome, |()| "ok");
    app.metrics
        .record_consistency(level.as_str(), op, outcome, session.0.started.elapsed());
}

/// A write at the request's consistency level; see [`super::consistency`].
async fn write(
    app: &AppState,
    level: &RequestedLevel,
    session: &Session,
    kind: Kind,
    key: String,
    intent: Intent,
) -> ApiResult<Committed> {
    let level = level.get()?;
    let result: ApiResult<Committed> = async {
        let electorate = app.admit(level, &session.0).await?;
        let durable = app.storage.queue_write(kind, key, intent).await?;
        // Only now may a timeout say the write goes on: while the applier's queue was full,
        // the request could still time out before it held the write.
        session.0.queue_write();
        let committed = durable.await?;
        // Even if the level is not reached, the client wrote this: its token says so.
        session.0.saw(&committed.applied);
        app.wait_acks(level, &electorate, committed.dot.seq, session.0.started)
            .await?;
        Ok(committed)
    }
    .await;
    record(app, level, "write", result.as_ref().map(|_| ()), session);
    result
}

/// A read at the request's consistency level, never older than the session's token.
async fn read(
    app: &AppState,
    level: &RequestedLevel,
    session: &Session,
    kind: Kind,
    key: &str,
) -> ApiResult<CrdtState> {
    let level = level.get()?;
    let result: ApiResult<CrdtState> = async {
        let electorate = app.admit(level, &session.0).await?;
        let local = app.read_local(kind, key).await?;
        let (state, applied) = app
            .quorum_read(level, &electorate, kind, key, local, session.0.started)
            .await?;
        session.0.saw(&applied);
        Ok(state.unwrap_or_else(|| CrdtState::bottom(kind)))
    }
    .await;
    record(app, level, "read", result.as_ref().map(|_| ()), session);
    result
}

/// A write answered with `view` of the key's new state and the write's metadata, or with its
/// summary if the client prefers that.
async fn write_view<V>(
    app: &AppState,
    (level, session, prefer): (&RequestedLevel, &Session, ReturnPreference),
    (kind, key): (Kind, String),
    intent: Intent,
    view: fn(String, &CrdtState, Option<WriteMeta>) -> ApiResult<V>,
) -> ApiResult<WriteAnswer<V>> {
    let committed = write(app, level, session, kind, key.clone(), intent).await?;
    let meta = WriteMeta::from(&committed);
    Ok(match prefer {
        ReturnPreference::Representation => {
            WriteAnswer::State(view(key, &committed.state, Some(meta))?)
        }
        ReturnPreference::Minimal => WriteAnswer::Summary(WriteSummary {
            key,
            size: match &*committed.state {
                CrdtState::Set(set) => Some(set.len()),
                _ => None,
            },
            meta,
        }),
    })
}

/// A read answered with `view` of the key's state.
async fn read_view<V>(
    app: &AppState,
    level: &RequestedLevel,
    session: &Session,
    (kind, key): (Kind, String),
    view: fn(String, &CrdtState, Option<WriteMeta>) -> ApiResult<V>,
) -> ApiResult<JsonAnswer<V>> {
    let state = read(app, level, session, kind, &key).await?;
    Ok(JsonAnswer(view(key, &state, None)?))
}

// ---- registers ----

/// Read a register.
#[utoipa::path(get, path = "/v1/registers/{key}", tag = "registers",
    params(("key" = String, Path, description = "The key")),
    responses((status = 200, body = RegisterView), (status = 404, body = Problem)))]
pub async fn get_register(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<JsonAnswer<RegisterView>> {
    let key = path_key(&app, key)?;
    let state = read(&app, &level, &session, Kind::Register, &key).await?;
    if matches!(&state, CrdtState::Register(r) if r.entry().is_some() && r.value().is_none()) {
        return Err(Problem::not_found(format!("register {key:?} was deleted")));
    }
    Ok(JsonAnswer(register_view(key, &state, None)?))
}

/// Write a register (last writer wins by HLC time).
#[utoipa::path(put, path = "/v1/registers/{key}", tag = "registers",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    request_body(content = Value, description = "Any JSON value"),
    responses((status = 200, body = RegisterView), (status = 400, body = Problem), (status = 413, body = Problem)))]
pub async fn put_register(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
    JsonBody(value): JsonBody<Value>,
) -> ApiResult<WriteAnswer<RegisterView>> {
    let key = path_key(&app, key)?;
    let value = canonical(&app, &value, "value")?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::Register, key),
        Intent::PutRegister(value),
        register_view,
    )
    .await
}

/// Delete a register: an LWW tombstone that a later write revives.
#[utoipa::path(delete, path = "/v1/registers/{key}", tag = "registers",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    responses((status = 200, body = RegisterView)))]
pub async fn delete_register(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<WriteAnswer<RegisterView>> {
    let key = path_key(&app, key)?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::Register, key),
        Intent::DeleteRegister,
        register_view,
    )
    .await
}

// ---- PN-counters ----

/// Read a counter (0 if never written).
#[utoipa::path(get, path = "/v1/counters/{key}", tag = "counters",
    params(("key" = String, Path, description = "The key")),
    responses((status = 200, body = CounterView)))]
pub async fn get_counter(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<JsonAnswer<CounterView>> {
    let key = path_key(&app, key)?;
    read_view(&app, &level, &session, (Kind::Counter, key), counter_view).await
}

/// Add to a counter; negative increments subtract.
#[utoipa::path(post, path = "/v1/counters/{key}", tag = "counters",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    request_body = IncrementBody,
    responses((status = 200, body = CounterView), (status = 400, body = Problem)))]
pub async fn incr_counter(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<IncrementBody>,
) -> ApiResult<WriteAnswer<CounterView>> {
    let key = path_key(&app, key)?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::Counter, key),
        Intent::Increment(body.increment),
        counter_view,
    )
    .await
}

/// Reset a counter: removes what this node has observed; concurrent increments elsewhere survive.
#[utoipa::path(delete, path = "/v1/counters/{key}", tag = "counters",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    responses((status = 200, body = CounterView)))]
pub async fn reset_counter(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<WriteAnswer<CounterView>> {
    let key = path_key(&app, key)?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::Counter, key),
        Intent::ResetCounter,
        counter_view,
    )
    .await
}

// ---- G-counters ----

/// Read a grow-only counter (0 if never written).
#[utoipa::path(get, path = "/v1/gcounters/{key}", tag = "gcounters",
    params(("key" = String, Path, description = "The key")),
    responses((status = 200, body = GCounterView)))]
pub async fn get_gcounter(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<JsonAnswer<GCounterView>> {
    let key = path_key(&app, key)?;
    read_view(&app, &level, &session, (Kind::GCounter, key), gcounter_view).await
}

/// Add a non-negative amount to a grow-only counter.
#[utoipa::path(post, path = "/v1/gcounters/{key}", tag = "gcounters",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    request_body = GrowBody,
    responses((status = 200, body = GCounterView), (status = 400, body = Problem)))]
pub async fn incr_gcounter(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<GrowBody>,
) -> ApiResult<WriteAnswer<GCounterView>> {
    let key = path_key(&app, key)?;
    let by = u64::try_from(body.increment).map_err(|_| {
        if body.increment < 0 {
            Problem::bad_request(
                "negative-increment",
                "a G-Counter only grows: the increment must be ≥ 0",
            )
        } else {
            Problem::bad_request(
                "invalid-json",
                format!("increment {} is above 2^64 − 1", body.increment),
            )
        }
    })?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::GCounter, key),
        Intent::IncrementG(by),
        gcounter_view,
    )
    .await
}

/// Reset a grow-only counter (observed-reset).
#[utoipa::path(delete, path = "/v1/gcounters/{key}", tag = "gcounters",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    responses((status = 200, body = GCounterView)))]
pub async fn reset_gcounter(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<WriteAnswer<GCounterView>> {
    let key = path_key(&app, key)?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::GCounter, key),
        Intent::ResetCounter,
        gcounter_view,
    )
    .await
}

// ---- sets ----

/// Read a set's elements, in canonical order.
#[utoipa::path(get, path = "/v1/sets/{key}", tag = "sets",
    params(("key" = String, Path, description = "The key")),
    responses((status = 200, body = SetView)))]
pub async fn get_set(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<JsonAnswer<SetView>> {
    let key = path_key(&app, key)?;
    read_view(&app, &level, &session, (Kind::Set, key), set_view).await
}

/// Add and remove elements; an element both added and removed ends up present (add wins).
#[utoipa::path(post, path = "/v1/sets/{key}", tag = "sets",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    request_body = SetUpdateBody,
    responses((status = 200, body = SetView), (status = 400, body = Problem), (status = 413, body = Problem)))]
pub async fn update_set(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<SetUpdateBody>,
) -> ApiResult<WriteAnswer<SetView>> {
    let key = path_key(&app, key)?;
    if body.add.is_empty() && body.remove.is_empty() {
        return Err(Problem::bad_request(
            "empty-update",
            "give elements to \"add\" and/or \"remove\"",
        ));
    }
    let max = app.limits.max_set_elements;
    if body.add.len() + body.remove.len() > max {
        return Err(Problem::too_large(format!(
            "more than {max} elements in one request"
        )));
    }
    let add = body
        .add
        .iter()
        .map(|v| canonical(&app, v, "element"))
        .collect::<ApiResult<Vec<_>>>()?;
    let remove = body
        .remove
        .iter()
        .map(|v| canonical(&app, v, "element"))
        .collect::<ApiResult<Vec<_>>>()?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::Set, key),
        Intent::UpdateSet { add, remove },
        set_view,
    )
    .await
}

/// Remove every element this node has observed.
#[utoipa::path(delete, path = "/v1/sets/{key}", tag = "sets",
    params(("key" = String, Path, description = "The key"), 
        ("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with a WriteSummary (the key, where the write landed, a set's size) instead of the new state")),
    responses((status = 200, body = SetView)))]
pub async fn clear_set(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    prefer: ReturnPreference,
    key: Result<Path<String>, PathRejection>,
) -> ApiResult<WriteAnswer<SetView>> {
    let key = path_key(&app, key)?;
    write_view(
        &app,
        (&level, &session, prefer),
        (Kind::Set, key),
        Intent::ClearSet,
        set_view,
    )
    .await
}

/// Whether the set holds an element.
#[utoipa::path(get, path = "/v1/sets/{key}/contains", tag = "sets",
    params(("key" = String, Path, description = "The key"), ContainsParams),
    responses((status = 200, body = ContainsView)))]
pub async fn set_contains(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    key: Result<Path<String>, PathRejection>,
    params: Result<Query<ContainsParams>, QueryRejection>,
) -> ApiResult<Json<ContainsView>> {
    let key = path_key(&app, key)?;
    let Query(params) = params.map_err(|e| Problem::bad_request("invalid-query", e.body_text()))?;
    let element: Value =
        serde_json::from_str(&params.element).unwrap_or(Value::String(params.element));
    let canonical = canonical(&app, &element, "element")?;
    let state = read(&app, &level, &session, Kind::Set, &key).await?;
    let contains = matches!(&state, CrdtState::Set(s) if s.contains(&canonical));
    Ok(Json(ContainsView {
        key,
        element,
        contains,
    }))
}

// ---- listing ----

/// List keys of one type, paginated, in key order.
#[utoipa::path(get, path = "/v1/{type}", tag = "keys",
    params(("type" = String, Path, description = "registers, counters, gcounters or sets"), ListParams),
    responses((status = 200, body = KeyList), (status = 404, body = Problem)))]
pub async fn list_keys(
    State(app): State<AppState>,
    level: RequestedLevel,
    session: Session,
    kind: Result<Path<String>, PathRejection>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Json<KeyList>> {
    let Path(kind) = kind.map_err(|e| Problem::bad_request("invalid-path", e.body_text()))?;
    let kind: Kind = kind.parse().map_err(|_| {
        Problem::not_found(format!(
            "unknown type {kind:?}; use registers, counters, gcounters or sets"
        ))
    })?;
    let Query(params) = params.map_err(|e| Problem::bad_request("invalid-query", e.body_text()))?;
    // Listing reads this node only, whatever the level; it still honours the session.
    level.get()?;
    app.wait_session(&session.0).await?;
    let max = app.limits.max_list_limit;
    let limit = params.limit.unwrap_or(100.min(max));
    if limit == 0 || limit > max {
        return Err(Problem::bad_request(
            "invalid-limit",
            format!("limit must be between 1 and {max}"),
        ));
    }
    let after = match &params.cursor {
        Some(cursor) => Some(
            URL_SAFE_NO_PAD
                .decode(cursor)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    Problem::bad_request("invalid-cursor", "the cursor is not one this API issued")
                })?,
        ),
        None => None,
    };
    let ((entries, next), applied) =
        app.storage
            .list(kind, &params.prefix, after.as_deref(), limit)?;
    // A key of a write whose journal sync has not returned is not listed before it is durable.
    app.wait_durable(&applied).await?;
    Ok(Json(KeyList {
        keys: entries.into_iter().map(|(k, _)| k).collect(),
        next_cursor: next.map(|k| URL_SAFE_NO_PAD.encode(k)),
    }))
}

#[cfg(test)]
mod tests {
    use meridian_crdt::{Crdt, NodeId, arbitrary};
    use proptest::prelude::*;

    use super::*;

    fn stamp() -> impl Strategy<Value = Stamp> {
        (
            any::<u64>(),
            any::<u64>().prop_filter_map("node ids are non-zero", NodeId::new),
        )
            .prop_map(|(time, node)| Stamp { time, node })
    }

    fn meta() -> impl Strategy<Value = Option<WriteMeta>> {
        proptest::option::of((any::<u64>(), any::<u64>(), stamp()).prop_map(
            |(origin, seq, timestamp)| WriteMeta {
                origin,
                seq,
                timestamp,
            },
        ))
    }

    /// Keys as clients name them, and any text at all (quotes, backslashes, control
    /// characters), which the hand-written writer must escape exactly as serde_json does.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![arbitrary::key(), any::<String>()]
    }

    fn written<V: WriteJson>(view: &V) -> String {
        let mut out = Vec::new();
        view.write_json(&mut out);
        String::from_utf8(out).unwrap_or_else(|e| panic!("not UTF-8: {e}"))
    }

    fn serialized<V: Serialize>(view: &V) -> String {
        serde_json::to_string(view).unwrap_or_else(|e| panic!("serde_json: {e}"))
    }

    proptest! {
        #[test]
        fn register_answers_are_what_serde_json_writes(
            key in key(),
            value in proptest::option::of(arbitrary::json()),
            timestamp in stamp(),
            origin in any::<u64>(),
            meta in meta(),
        ) {
            let view = RegisterView { key, value, timestamp, origin, meta };
            prop_assert_eq!(written(&view), serialized(&view));
        }

        #[test]
        fn counter_answers_are_what_serde_json_writes(
            key in key(),
            value in any::<i64>(),
            meta in meta(),
        ) {
            let view = CounterView { key, value, meta };
            prop_assert_eq!(written(&view), serialized(&view));
        }

        #[test]
        fn g_counter_answers_are_what_serde_json_writes(
            key in key(),
            value in any::<u64>(),
            meta in meta(),
        ) {
            let view = GCounterView { key, value, meta };
            prop_assert_eq!(written(&view), serialized(&view));
        }

        #[test]
        fn write_summaries_are_what_serde_json_writes(
            key in key(),
            size in proptest::option::of(any::<usize>()),
            meta in meta().prop_filter_map("a summary has meta", |meta| meta),
        ) {
            let summary = WriteSummary { key, size, meta };
            prop_assert_eq!(written(&summary), serialized(&summary));
        }

        #[test]
        fn set_answers_are_what_serde_json_writes(
            key in key(),
            elements in proptest::collection::vec(arbitrary::json(), 0..6),
            meta in meta(),
        ) {
            let mut set = OrSet::default();
            set.apply(&set.add(arbitrary::replica_node(0), elements));
            let view = SetView { key, size: set.len(), elements: set, meta };
            prop_assert_eq!(written(&view), serialized(&view));
        }
    }
}
