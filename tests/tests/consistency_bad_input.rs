//! Bad session tokens and bad consistency headers: a clear 400 with a problem+json body,
//! quickly, and the node keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meridian_tests::{Cluster, ClusterSpec};
use reqwest::StatusCode;
use serde_json::Value;

async fn send(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &[u8])],
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = http.get(url);
    for (name, value) in headers {
        request = request.header(
            *name,
            reqwest::header::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn assert_bad_request(
    what: &str,
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
    slug: &str,
) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{what}"
    );
    assert_eq!(body["status"], 400, "{what}: {body}");
    let kind = body["type"].as_str().unwrap_or_default();
    assert!(kind.ends_with(slug), "{what}: type {kind:?}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{what}: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_levels_are_refused_with_400() {
    let cluster = Cluster::start(ClusterSpec::new(&["us-east", "eu-west"]))
        .await
        .unwrap();
    // Another cluster: its own secret, so its tokens are foreign here.
    let foreign = Cluster::start(ClusterSpec::new(&["elsewhere"]))
        .await
        .unwrap();
    // The cluster's CA and token (the harness's credentials), on a bare client whose
    // headers this test controls.
    let http = cluster.node(0).credentials().http_client().unwrap();
    let url = format!("{}/v1/registers/k", cluster.node(0).url());
    let response = http
        .put(&url)
        .json(&serde_json::json!("v"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let good = response
        .headers()
        .get("session-token")
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_owned();

    // The genuine token works at both nodes of its cluster.
    for node in cluster.nodes() {
        let url = format!("{}/v1/registers/k", node.url());
        let (status, headers, body) =
            send(&http, &url, &[("Session-Token", good.as_bytes())]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(headers.get("session-token").is_some());
    }

    let foreign_token = foreign
        .node(0)
        .client()
        .request(reqwest::Method::GET, &["v1", "counters", "c"], None)
        .await
        .unwrap()
        .header("session-token")
        .unwrap()
        .to_owned();
    let mut flipped = good.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let truncated = good[..good.len() - 4].to_owned();
    let oversized = "A".repeat(8 * 1024);

    let bad_tokens: Vec<(&str, Vec<u8>)> = vec![
        ("forged tag", flipped),
        ("truncated", truncated.into_bytes()),
        ("foreign cluster", foreign_token.into_bytes()),
        ("oversized", oversized.into_bytes()),
        ("not base64", b"!!not a token!!".to_vec()),
        ("empty", Vec::new()),
        ("binary", vec![0xff, 0xfe, 0x80]),
    ];
    for node in cluster.nodes() {
        for (what, token) in &bad_tokens {
            for path in ["/v1/registers/k", "/v1/counters/c", "/v1/sets/s"] {
                let url = format!("{}{path}", node.url());
                let (status, headers, body) =
                    send(&http, &url, &[("Session-Token", token.as_slice())]).await;
                assert_bad_request(what, status, &headers, &body, "invalid-session-token");
            }
            // Writes too, and nothing is written.
            let url = format!("{}/v1/counters/bad-token-write", node.url());
            let response = http
                .post(&url)
                .header(
                    "Session-Token",
                    reqwest::header::HeaderValue::from_bytes(token).unwrap(),
                )
                .json(&serde_json::json!({"increment": 1}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        }
    }
    let value = cluster
        .node(0)
        .client()
        .counter("bad-token-write")
        .await
        .unwrap();
    assert_eq!(value, 0, "requests with bad tokens wrote nothing");

    let bad_levels: Vec<(&str, &str, &[u8])> = vec![
        ("unknown level", "Consistency-Level", b"QUORUM"),
        ("empty level", "Consistency-Level", b""),
        ("unknown X- level", "X-Consistency-Level", b"EACH_QUORUM"),
        ("binary level", "Consistency-Level", &[0xff, 0xfe]),
        ("long level", "Consistency-Level", &[b'A'; 4000]),
    ];
    for (what, header, value) in bad_levels {
        let (status, headers, body) = send(&http, &url, &[(header, value)]).await;
        assert_bad_request(what, status, &headers, &body, "invalid-consistency-level");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("LOCAL_ONE, LOCAL_QUORUM, GLOBAL_QUORUM, ALL"),
            "{what}: {body}"
        );
    }

    // Still serving, with the genuine token.
    let (status, _, body) = send(&http, &url, &[("Session-Token", good.as_bytes())]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["value"], "v");

    foreign.shutdown().await.unwrap();
    cluster.shutdown().await.unwrap();
}
