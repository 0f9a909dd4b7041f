//! Bad input of every kind gets its status and a problem+json, and loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Node;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    headers: Vec<(&'static str, &'static str)>,
    status: StatusCode,
}

fn case(name: &'static str, method: Method, path: &str, body: &[u8], status: StatusCode) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        content_type: Some("application/json"),
        body: body.to_vec(),
        headers: Vec::new(),
        status,
    }
}

#[tokio::test]
async fn every_bad_request_gets_a_problem_and_changes_nothing() {
    let node = Node::start(
        "[limits]\nmax_value_bytes = 1024\nmax_body_bytes = 65536\nmax_set_elements = 100\n",
    )
    .await;
    let c = Client::new();
    // State that must survive the whole matrix untouched.
    c.put(node.url("/v1/registers/keep"))
        .json(&json!("safe"))
        .send()
        .await
        .unwrap();
    c.post(node.url("/v1/counters/keep"))
        .json(&json!({"increment": 5}))
        .send()
        .await
        .unwrap();
    c.post(node.url("/v1/sets/keep"))
        .json(&json!({"add": [1, 2]}))
        .send()
        .await
        .unwrap();

    let long_key = "k".repeat(1025);
    let big_value = serde_json::to_vec(&json!("x".repeat(2000))).unwrap();
    let huge_body = vec![b' '; 70_000];
    let many = serde_json::to_vec(&json!({"add": (0..101).collect::<Vec<_>>()})).unwrap();
    let mut cases = vec![
        case(
            "malformed JSON",
            Method::PUT,
            "/v1/registers/keep",
            b"{\"a\":",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "empty body",
            Method::PUT,
            "/v1/registers/keep",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "increment as string",
            Method::POST,
            "/v1/counters/keep",
            br#"{"increment":"5"}"#,
            StatusCode::BAD_REQUEST,
        ),
        case(
            "increment as float",
            Method::POST,
            "/v1/counters/keep",
            br#"{"increment":1.5}"#,
            StatusCode::BAD_REQUEST,
        ),
        case(
            "increment overflowing i64",
            Method::POST,
            "/v1/counters/keep",
            br#"{"increment":9223372036854775808}"#,
            StatusCode::BAD_REQUEST,
        ),
        case(
            "increment missing",
            Method::POST,
            "/v1/counters/keep",
            b"{}",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "unknown field",
            Method::POST,
            "/v1/counters/keep",
            br#"{"increment":1,"by":2}"#,
            StatusCode::BAD_REQUEST,
        ),
        case(
            "set body not an object",
            Method::POST,
            "/v1/sets/keep",
            b"[1,2]",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "set add not a list",
            Method::POST,
            "/v1/sets/keep",
            br#"{"add":1}"#,
            StatusCode::BAD_REQUEST,
        ),
        case(
            "set update empty",
            Method::POST,
            "/v1/sets/keep",
            b"{}",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "too many elements",
            Method::POST,
            "/v1/sets/keep",
            &many,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        case(
            "value too large",
            Method::PUT,
            "/v1/registers/keep",
            &big_value,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        case(
            "body too large",
            Method::PUT,
            "/v1/registers/keep",
            &huge_body,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        case(
            "key too long",
            Method::PUT,
            &format!("/v1/registers/{long_key}"),
            b"1",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "key with control char",
            Method::PUT,
            "/v1/registers/a%00b",
            b"1",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "key with newline",
            Method::GET,
            "/v1/registers/a%0Ab",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "key not UTF-8",
            Method::GET,
            "/v1/registers/%FF%FE",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "unknown type",
            Method::GET,
            "/v1/widgets/x",
            b"",
            StatusCode::NOT_FOUND,
        ),
        case(
            "unknown type listing",
            Method::GET,
            "/v1/widgets",
            b"",
            StatusCode::NOT_FOUND,
        ),
        case(
            "unknown path",
            Method::GET,
            "/nope",
            b"",
            StatusCode::NOT_FOUND,
        ),
        case(
            "wrong method on register",
            Method::POST,
            "/v1/registers/keep",
            b"1",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        case(
            "wrong method on counter",
            Method::PUT,
            "/v1/counters/keep",
            b"1",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        case(
            "wrong method on healthz",
            Method::DELETE,
            "/healthz",
            b"",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        case(
            "bad list limit",
            Method::GET,
            "/v1/registers?limit=0",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "list limit too big",
            Method::GET,
            "/v1/registers?limit=100000",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "list limit not a number",
            Method::GET,
            "/v1/registers?limit=ten",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "forged cursor",
            Method::GET,
            "/v1/registers?cursor=%%%",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "contains without element",
            Method::GET,
            "/v1/sets/keep/contains",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        case(
            "anti-entropy round without a peer",
            Method::POST,
            "/v1/admin/anti-entropy",
            b"",
            StatusCode::BAD_REQUEST,
        ),
        // Refused for what it is before its body is read: debug is off on this node.
        case(
            "debug endpoint with debug off and a body it would refuse",
            Method::POST,
            "/v1/admin/debug/merge-unlogged/sets/keep",
            br#"{"x":1}"#,
            StatusCode::FORBIDDEN,
        ),
    ];
    let mut xml = case(
        "XML content type",
        Method::PUT,
        "/v1/registers/keep",
        b"<a/>",
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    );
    xml.content_type = Some("application/xml");
    cases.push(xml);
    let mut level = case(
        "bad consistency level",
        Method::GET,
        "/v1/registers/keep",
        b"",
        StatusCode::BAD_REQUEST,
    );
    level.headers.push(("Consistency-Level", "EVENTUAL"));
    cases.push(level);
    let mut x_level = case(
        "bad X-consistency level",
        Method::PUT,
        "/v1/registers/keep",
        b"1",
        StatusCode::BAD_REQUEST,
    );
    x_level.headers.push(("X-Consistency-Level", ""));
    cases.push(x_level);

    for case in cases {
        let mut request = c
            .request(case.method.clone(), node.url(&case.path))
            .body(case.body.clone());
        if let Some(ct) = case.content_type {
            request = request.header("content-type", ct);
        }
        for (name, value) in &case.headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(response.status(), case.status, "{}", case.name);
        let content_type = response
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_type, "application/problem+json", "{}", case.name);
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], case.status.as_u16(), "{}", case.name);
        assert!(
            problem["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:meridian:problem:"),
            "{}",
            case.name
        );
        assert!(
            !problem["detail"].as_str().unwrap().is_empty(),
            "{}",
            case.name
        );
    }

    let register: Value = c
        .get(node.url("/v1/registers/keep"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(register["value"], "safe");
    let counter: Value = c
        .get(node.url("/v1/counters/keep"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counter["value"], 5);
    let set: Value = c
        .get(node.url("/v1/sets/keep"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(set["elements"], json!([1, 2]));
    let health = c.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn counter_overflow_is_a_conflict_not_a_wrap() {
    let node = Node::start("").await;
    let c = Client::new();
    let max = json!({"increment": i64::MAX});
    for _ in 0..2 {
        let r = c
            .post(node.url("/v1/gcounters/big"))
            .json(&max)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = c
        .post(node.url("/v1/gcounters/big"))
        .json(&max)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = c
        .get(node.url("/v1/gcounters/big"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["value"].as_u64().unwrap(), u64::MAX - 1);
}
