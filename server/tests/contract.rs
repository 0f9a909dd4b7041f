//! Every route of the HTTP API against a running `meridian serve`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Node;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

async fn call(
    client: &Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn registers_write_read_delete_and_revive() {
    let node = Node::start("").await;
    let c = Client::new();
    let (status, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/registers/greeting"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["status"], 404);

    let (status, body) = call(
        &c,
        reqwest::Method::PUT,
        node.url("/v1/registers/greeting"),
        Some(json!({"b": 2, "a": [1, "x"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["value"], json!({"a": [1, "x"], "b": 2}));
    assert_eq!(body["origin"], 1);
    assert_eq!(body["meta"]["seq"], 1);

    let (status, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/registers/greeting"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["key"], "greeting");
    assert_eq!(body["value"], json!({"a": [1, "x"], "b": 2}));
    assert!(body["timestamp"].as_str().unwrap().contains('T'));

    let (status, _) = call(
        &c,
        reqwest::Method::DELETE,
        node.url("/v1/registers/greeting"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/registers/greeting"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _) = call(
        &c,
        reqwest::Method::PUT,
        node.url("/v1/registers/greeting"),
        Some(json!(null)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/registers/greeting"),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a register holding JSON null exists"
    );
    assert_eq!(body["value"], Value::Null);
}

#[tokio::test]
async fn keys_with_reserved_characters_round_trip() {
    let node = Node::start("").await;
    let c = Client::new();
    let (status, _) = call(
        &c,
        reqwest::Method::PUT,
        node.url("/v1/registers/a%2Fb%20c%3F%C3%A9"),
        Some(json!(1)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/registers/a%2Fb%20c%3F%C3%A9"),
        None,
    )
    .await;
    assert_eq!(body["key"], "a/b c?é");
}

#[tokio::test]
async fn counters_sum_and_reset() {
    let node = Node::start("").await;
    let c = Client::new();
    let (_, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/counters/hits"),
        None,
    )
    .await;
    assert_eq!(body["value"], 0);
    for by in [5, -2, 10] {
        let (status, _) = call(
            &c,
            reqwest::Method::POST,
            node.url("/v1/counters/hits"),
            Some(json!({"increment": by})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/counters/hits"),
        None,
    )
    .await;
    assert_eq!(body, json!({"key": "hits", "value": 13}));
    let (_, body) = call(
        &c,
        reqwest::Method::DELETE,
        node.url("/v1/counters/hits"),
        None,
    )
    .await;
    assert_eq!(body["value"], 0);
    call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/counters/hits"),
        Some(json!({"increment": 4})),
    )
    .await;
    let (_, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/counters/hits"),
        None,
    )
    .await;
    assert_eq!(body["value"], 4);
}

#[tokio::test]
async fn gcounters_only_grow() {
    let node = Node::start("").await;
    let c = Client::new();
    let (status, body) = call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/gcounters/g"),
        Some(json!({"increment": 7})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["value"], 7);
    let (status, body) = call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/gcounters/g"),
        Some(json!({"increment": -1})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "urn:meridian:problem:negative-increment");
    let (_, body) = call(&c, reqwest::Method::GET, node.url("/v1/gcounters/g"), None).await;
    assert_eq!(body["value"], 7, "the refused decrement changed nothing");
    // The whole u64 range, past i64's: then the sum overflows and is refused, not wrapped.
    let big = json!(u64::MAX - 7);
    let (status, body) = call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/gcounters/g"),
        Some(json!({"increment": big})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["value"], json!(u64::MAX));
    for (increment, status, kind) in [
        (json!(1), StatusCode::CONFLICT, "counter-overflow"),
        (
            serde_json::from_str::<Value>("18446744073709551616").unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid-json",
        ),
    ] {
        let (got, body) = call(
            &c,
            reqwest::Method::POST,
            node.url("/v1/gcounters/g"),
            Some(json!({ "increment": increment })),
        )
        .await;
        assert_eq!(got, status, "{increment}: {body}");
        assert_eq!(body["type"], format!("urn:meridian:problem:{kind}"));
    }
    let (_, body) = call(&c, reqwest::Method::GET, node.url("/v1/gcounters/g"), None).await;
    assert_eq!(
        body["value"],
        json!(u64::MAX),
        "the refused increments changed nothing"
    );
    let (_, body) = call(
        &c,
        reqwest::Method::DELETE,
        node.url("/v1/gcounters/g"),
        None,
    )
    .await;
    assert_eq!(body["value"], 0);
}

#[tokio::test]
async fn sets_add_remove_contains_clear_in_canonical_order() {
    let node = Node::start("").await;
    let c = Client::new();
    let (status, body) = call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/sets/s"),
        Some(json!({"add": ["b", "a", {"y": 1, "x": 2}, 3]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["size"], 4);
    // Canonical order is by canonical JSON text: `"a"` < `"b"` < `3` < `{...}` bytewise.
    assert_eq!(body["elements"], json!(["a", "b", 3, {"x": 2, "y": 1}]));

    let (_, body) = call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/sets/s"),
        Some(json!({"add": [{"x": 2, "y": 1}], "remove": ["a", "missing"]})),
    )
    .await;
    assert_eq!(
        body["elements"],
        json!(["b", 3, {"x": 2, "y": 1}]),
        "same object in another key order is one element"
    );

    let (_, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/sets/s/contains?element=b"),
        None,
    )
    .await;
    assert_eq!(body["contains"], true);
    let (_, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/sets/s/contains?element=%22a%22"),
        None,
    )
    .await;
    assert_eq!(body["contains"], false);
    let (_, body) = call(
        &c,
        reqwest::Method::GET,
        node.url("/v1/sets/s/contains?element=3"),
        None,
    )
    .await;
    assert_eq!(body["contains"], true);

    let (_, body) = call(&c, reqwest::Method::DELETE, node.url("/v1/sets/s"), None).await;
    assert_eq!(body["size"], 0);
    let (_, body) = call(&c, reqwest::Method::GET, node.url("/v1/sets/s"), None).await;
    assert_eq!(body, json!({"key": "s", "elements": [], "size": 0}));
}

/// One request may add many elements to a set that already has many: it is answered in time,
/// with every element there (adding each compacted a growing context once, quadratic in the
/// request, and 20 000 ran past the request timeout).
#[tokio::test]
async fn a_request_adds_twenty_thousand_elements_to_a_set_of_twenty_thousand() {
    let node = Node::start("").await;
    let c = Client::new();
    for batch in 0..2 {
        let add: Vec<Value> = (0..20_000).map(|i| json!(batch * 20_000 + i)).collect();
        let response = c
            .post(node.url("/v1/sets/big"))
            .header("prefer", "return=minimal")
            .json(&json!({ "add": add }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "batch {batch}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["size"], (batch + 1) * 20_000, "batch {batch}");
    }
    let (_, set) = call(&c, reqwest::Method::GET, node.url("/v1/sets/big"), None).await;
    let elements = set["elements"].as_array().unwrap();
    assert_eq!(elements.len(), 40_000);
    let mut numbers: Vec<u64> = elements.iter().map(|e| e.as_u64().unwrap()).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (0..40_000).collect::<Vec<u64>>());
}

/// `Prefer: return=minimal` (RFC 7240) makes every write answer with where it landed, and a
/// set's size, instead of the new state; the write itself is the same.
#[tokio::test]
async fn writes_preferring_a_minimal_return_answer_with_a_summary() {
    let node = Node::start("").await;
    let c = Client::new();
    let writes = [
        (reqwest::Method::PUT, "/v1/registers/r", Some(json!("v"))),
        (
            reqwest::Method::POST,
            "/v1/counters/c",
            Some(json!({"increment": -4})),
        ),
        (
            reqwest::Method::POST,
            "/v1/gcounters/g",
            Some(json!({"increment": 4})),
        ),
        (
            reqwest::Method::POST,
            "/v1/sets/s",
            Some(json!({"add": [1, 2, 3]})),
        ),
        (reqwest::Method::DELETE, "/v1/registers/r", None),
        (reqwest::Method::DELETE, "/v1/counters/c", None),
        (reqwest::Method::DELETE, "/v1/gcounters/g", None),
        (reqwest::Method::DELETE, "/v1/sets/s", None),
    ];
    let mut seqs = Vec::new();
    for (method, path, body) in writes {
        let mut request = c
            .request(method.clone(), node.url(path))
            .header("prefer", "wait=5, return=minimal");
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{method} {path}");
        assert_eq!(
            response.headers()["preference-applied"],
            "return=minimal",
            "{method} {path}"
        );
        assert!(response.headers().contains_key("session-token"));
        let answer: Value = response.json().await.unwrap();
        let key = path.rsplit('/').next().unwrap();
        assert_eq!(answer["key"], key, "{method} {path}: {answer}");
        assert!(answer["meta"]["timestamp"].is_string(), "{answer}");
        let fields: Vec<&String> = answer.as_object().unwrap().keys().collect();
        let expected: &[&str] = if path.starts_with("/v1/sets/") {
            &["key", "meta", "size"]
        } else {
            &["key", "meta"]
        };
        assert_eq!(fields, expected, "{method} {path}: {answer}");
        seqs.push(answer["meta"]["seq"].as_u64().unwrap());
        if path.starts_with("/v1/sets/") {
            let size = if method == reqwest::Method::POST {
                3
            } else {
                0
            };
            assert_eq!(answer["size"], size, "{method} {path}");
        }
    }
    assert_eq!(
        seqs,
        (1..=8).collect::<Vec<u64>>(),
        "every write landed once"
    );

    // The writes are what they would have been without the preference.
    let (_, set) = call(&c, reqwest::Method::GET, node.url("/v1/sets/s"), None).await;
    assert_eq!(set["size"], 0);
    let response = c
        .post(node.url("/v1/counters/c"))
        .header("prefer", "return=representation")
        .json(&json!({"increment": 2}))
        .send()
        .await
        .unwrap();
    assert!(!response.headers().contains_key("preference-applied"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["value"], 2, "the reset removed the earlier -4");
    // Reads have no summary: the preference does not change them.
    let response = c
        .get(node.url("/v1/counters/c"))
        .header("prefer", "return=minimal")
        .send()
        .await
        .unwrap();
    assert!(!response.headers().contains_key("preference-applied"));
    assert_eq!(response.json::<Value>().await.unwrap()["value"], 2);
}

#[tokio::test]
async fn listing_paginates_by_prefix_and_hides_deleted_registers() {
    let node = Node::start("").await;
    let c = Client::new();
    for i in 0..25 {
        call(
            &c,
            reqwest::Method::PUT,
            node.url(&format!("/v1/registers/user:{i:02}")),
            Some(json!(i)),
        )
        .await;
    }
    call(
        &c,
        reqwest::Method::PUT,
        node.url("/v1/registers/other"),
        Some(json!(0)),
    )
    .await;
    call(
        &c,
        reqwest::Method::DELETE,
        node.url("/v1/registers/user:03"),
        None,
    )
    .await;
    call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/counters/user:99"),
        Some(json!({"increment": 1})),
    )
    .await;

    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = node.url("/v1/registers?prefix=user:&limit=10");
        if let Some(c) = &cursor {
            url = format!("{url}&cursor={c}");
        }
        let (status, body) = call(&c, reqwest::Method::GET, url, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        keys.extend(
            body["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned()),
        );
        match body.get("next_cursor").and_then(Value::as_str) {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25)
        .filter(|i| *i != 3)
        .map(|i| format!("user:{i:02}"))
        .collect();
    assert_eq!(keys, expected);

    let (_, body) = call(&c, reqwest::Method::GET, node.url("/v1/counters"), None).await;
    assert_eq!(body["keys"], json!(["user:99"]));
    let (status, body) = call(&c, reqwest::Method::GET, node.url("/v1/widgets"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["status"], 404);
}

/// A delete that leaves nothing to show takes the key out of listings, for every type, as
/// a deleted key is gone in Redis; a write after it brings the key back. `GET` still answers
/// a reset counter (0) and an empty set, as for keys never written.
#[tokio::test]
async fn listing_hides_reset_counters_and_empty_sets() {
    let node = Node::start("").await;
    let c = Client::new();
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let (c, url) = (c.clone(), node.url(path));
        async move {
            let (status, body) = call(&c, method, url, body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body
        }
    };
    let post = reqwest::Method::POST;
    let delete = reqwest::Method::DELETE;
    for key in ["kept", "reset", "zero"] {
        send(
            post.clone(),
            &format!("/v1/counters/{key}"),
            Some(json!({"increment": 2})),
        )
        .await;
        send(
            post.clone(),
            &format!("/v1/gcounters/{key}"),
            Some(json!({"increment": 2})),
        )
        .await;
        send(
            post.clone(),
            &format!("/v1/sets/{key}"),
            Some(json!({"add": [1, 2]})),
        )
        .await;
    }
    send(delete.clone(), "/v1/counters/reset", None).await;
    send(delete.clone(), "/v1/gcounters/reset", None).await;
    send(delete.clone(), "/v1/sets/reset", None).await;
    // Written back to 0, not reset: still a counter someone wrote.
    send(
        post.clone(),
        "/v1/counters/zero",
        Some(json!({"increment": -2})),
    )
    .await;
    // Every element removed one by one: as empty as a cleared set.
    send(
        post.clone(),
        "/v1/sets/zero",
        Some(json!({"remove": [1, 2]})),
    )
    .await;
    let listed = |collection: &'static str| {
        let send = &send;
        async move {
            send(reqwest::Method::GET, &format!("/v1/{collection}"), None).await["keys"].clone()
        }
    };
    assert_eq!(listed("counters").await, json!(["kept", "zero"]));
    assert_eq!(listed("gcounters").await, json!(["kept", "zero"]));
    assert_eq!(listed("sets").await, json!(["kept"]));
    let counter = send(reqwest::Method::GET, "/v1/counters/reset", None).await;
    assert_eq!(counter["value"], 0);
    let set = send(reqwest::Method::GET, "/v1/sets/reset", None).await;
    assert_eq!(set["size"], 0);
    // A write after the delete lists the key again.
    send(
        post.clone(),
        "/v1/counters/reset",
        Some(json!({"increment": 1})),
    )
    .await;
    send(post, "/v1/sets/reset", Some(json!({"add": [3]}))).await;
    assert_eq!(listed("counters").await, json!(["kept", "reset", "zero"]));
    assert_eq!(listed("sets").await, json!(["kept", "reset"]));
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let node = Node::start("").await;
    let c = Client::new();
    let (status, _) = call(&c, reqwest::Method::GET, node.url("/healthz"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&c, reqwest::Method::GET, node.url("/readyz"), None).await;
    assert_eq!(status, StatusCode::OK);
    call(
        &c,
        reqwest::Method::PUT,
        node.url("/v1/registers/m"),
        Some(json!(1)),
    )
    .await;

    let metrics = c
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("meridian_http_requests_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("route=\"/v1/registers/{key}\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_group_commit_ops_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_storage_commit_duration_seconds_count"),
        "{metrics}"
    );

    let (status, body) = call(&c, reqwest::Method::GET, node.url("/v1/cluster"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["node"]["name"], "test-1");
    assert_eq!(body["applied"]["1"], 1);

    let (status, spec) = call(&c, reqwest::Method::GET, node.url("/openapi.json"), None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/registers/{key}",
        "/v1/counters/{key}",
        "/v1/gcounters/{key}",
        "/v1/sets/{key}",
        "/v1/{type}",
    ] {
        assert!(spec["paths"].get(path).is_some(), "openapi lacks {path}");
    }
}

#[tokio::test]
async fn consistency_levels_are_parsed_and_served_on_a_single_node() {
    let node = Node::start("").await;
    let c = Client::new();
    for level in ["LOCAL_ONE", "local_quorum", "GLOBAL_QUORUM", "ALL"] {
        for header in ["Consistency-Level", "X-Consistency-Level"] {
            let response = c
                .put(node.url("/v1/registers/k"))
                .header(header, level)
                .json(&json!(1))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{header}: {level}");
        }
    }
    let response = c
        .get(node.url("/v1/registers/k"))
        .header("Consistency-Level", "QUORUM")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("LOCAL_ONE, LOCAL_QUORUM, GLOBAL_QUORUM, ALL")
    );
}

#[tokio::test]
async fn data_survives_a_graceful_restart() {
    let mut node = Node::start("").await;
    let c = Client::new();
    call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/counters/c"),
        Some(json!({"increment": 42})),
    )
    .await;
    assert!(node.terminate(), "SIGTERM exits cleanly: {}", node.log());
    node.spawn().await;
    let (_, body) = call(&c, reqwest::Method::GET, node.url("/v1/counters/c"), None).await;
    assert_eq!(body["value"], 42);
    let (_, body) = call(
        &c,
        reqwest::Method::POST,
        node.url("/v1/counters/c"),
        Some(json!({"increment": 1})),
    )
    .await;
    assert_eq!(body["meta"]["seq"], 2, "sequences continue after a restart");
}

#[tokio::test]
async fn a_data_directory_refuses_another_node_id() {
    let mut node = Node::start("").await;
    node.terminate();
    let text = std::fs::read_to_string(&node.config)
        .unwrap()
        .replace("id = 1", "id = 2");
    std::fs::write(&node.config, text).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["serve", "--config"])
        .arg(&node.config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("belongs to node 1"), "{stderr}");
}
