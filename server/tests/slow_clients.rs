//! Slow clients are cut off within the configured time while others are served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = "[timeouts]\nheader_read_ms = 600\nrequest_ms = 1000\n";

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// After a write was cut off: the node still serves, and the write was not applied.
async fn still_serving_without(node: &Node, path: &str) {
    healthy(node).await;
    let r = reqwest::get(node.url(path)).await.unwrap();
    assert_eq!(
        r.status(),
        reqwest::StatusCode::NOT_FOUND,
        "the cut-off write must not be applied"
    );
}

async fn healthy(node: &Node) {
    let r = reqwest::get(node.url("/healthz")).await.unwrap();
    assert!(r.status().is_success());
}

#[tokio::test]
async fn trickled_headers_are_cut_off() {
    let node = Node::start(CONFIG).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let trickle = async {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain(b"a".repeat(200).iter())
        {
            if stream.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Meanwhile normal requests keep being served.
    let ((), ()) = tokio::join!(trickle, async {
        for _ in 0..5 {
            healthy(&node).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let rest = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        rest.is_some(),
        "the server must close a connection whose head never completes"
    );
}

#[tokio::test]
async fn idle_connections_that_send_nothing_are_closed() {
    let node = Node::start(CONFIG).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let closed = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "a silent connection must not be held forever"
    );
}

#[tokio::test]
async fn an_endless_chunked_body_is_cut_off() {
    let node = Node::start(CONFIG).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(b"PUT /v1/registers/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n")
        .await
        .unwrap();
    let feeder = async {
        for _ in 0..100 {
            if stream.write_all(b"2\r\n1,\r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), feeder).await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("connection must be closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 503") || text.starts_with("HTTP/1.1 408") || text.is_empty(),
        "{text}"
    );
    still_serving_without(&node, "/v1/registers/slow").await;
}

/// A body that stops arriving part way (a client that declared 100 bytes and sent 8) is cut
/// off, by the body's stall timeout or the request timeout, whichever fires first; nothing of
/// it is applied, and the node goes on serving.
#[tokio::test]
async fn a_body_that_stalls_is_cut_off() {
    let node = Node::start(CONFIG).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(b"PUT /v1/registers/stalled HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n\"0123456")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the connection must be closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 408") || text.starts_with("HTTP/1.1 503"),
        "{text}"
    );
    assert!(
        text.contains("application/problem+json"),
        "a problem+json explains the cut: {text}"
    );
    still_serving_without(&node, "/v1/registers/stalled").await;
}

#[tokio::test]
async fn an_oversized_streamed_body_is_refused_without_reading_it_all() {
    let node = Node::start("[limits]\nmax_body_bytes = 1000\n").await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(b"PUT /v1/registers/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("400\r\n{}\r\n", " ".repeat(0x400));
    for _ in 0..4 {
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
}

/// A write that outlasts the request timeout after it was queued is answered 504, never 503:
/// it still commits, and a client that retried an increment on a 503 would count it twice.
/// One that times out before it is queued (503) is not applied. Large set updates here take
/// longer than 150 ms to apply in a test build.
#[tokio::test]
async fn a_write_that_times_out_after_it_was_queued_is_504_and_lands() {
    let node = Node::start("[timeouts]\nrequest_ms = 150\n").await;
    let client = reqwest::Client::new();
    let mut timed_out_queued = 0;
    for size in [20_000, 40_000, 60_000, 80_000] {
        let key = format!("big{size}");
        let elements: Vec<String> = (0..size).map(|i| format!("e{i}")).collect();
        let response = client
            .post(node.url(&format!("/v1/sets/{key}")))
            .json(&serde_json::json!({ "add": elements }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let problem: serde_json::Value = response.json().await.unwrap_or_default();
        let expected = match status {
            200 => Some(size),
            504 => {
                assert_eq!(problem["type"], "urn:meridian:problem:request-timeout");
                timed_out_queued += 1;
                Some(size)
            }
            503 => None,
            other => panic!("{size} elements: {other} {problem}"),
        };
        // The applier finishes what it was given; poll until it has. Absent for 2 s after a
        // 503 is absent for good: that write never reached the applier.
        let asked = Instant::now();
        let deadline = asked + Duration::from_secs(20);
        loop {
            let read = client
                .get(node.url(&format!("/v1/sets/{key}")))
                .send()
                .await
                .unwrap();
            let found = if read.status() == reqwest::StatusCode::OK {
                let body: serde_json::Value = read.json().await.unwrap();
                body["size"].as_u64().map(|n| n as usize)
            } else {
                None
            };
            match (expected, found) {
                (Some(want), Some(got)) if want == got => break,
                (None, Some(0) | None) if asked.elapsed() > Duration::from_secs(2) => break,
                _ if Instant::now() > deadline => {
                    panic!("{size} elements answered {status}: the set holds {found:?}");
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    assert!(
        timed_out_queued > 0,
        "no update outlasted the request timeout after it was queued"
    );
    healthy(&node).await;
}

/// Fills set `big` with 90 000 elements of 64 bytes: an answer of about 6 MB, more than
/// loopback's socket buffers hold, in requests under the 1 MiB body limit. Returns the size
/// of the whole answer.
async fn a_six_megabyte_set(node: &Node) -> usize {
    let client = reqwest::Client::new();
    for batch in 0..8 {
        let elements: Vec<String> = (0..11_250).map(|i| format!("{batch}-{i:0>58}")).collect();
        let response = client
            .post(node.url("/v1/sets/big"))
            .json(&serde_json::json!({ "add": elements }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
    }
    let whole = client
        .get(node.url("/v1/sets/big"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    assert!(whole > 5_000_000, "the answer is only {whole} bytes");
    whole
}

/// Opens a connection that asks for the big set and then takes almost nothing of it.
async fn a_reader_that_stalls(node: &Node) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(node.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/sets/big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    stream
}

/// Large answers on their way to slow readers share one budget: a reader that stops taking
/// its answer holds its share, so while it does, another large read is refused with a 503
/// (memory does not grow by one answer per slow reader) and small reads go on; when the
/// stalled reader goes, its share comes back.
#[tokio::test]
async fn large_answers_to_slow_readers_share_a_budget() {
    let node = Node::start(
        "[limits]\nanswer_buffer_bytes = 8388608\n[timeouts]\nwrite_stall_ms = 60000\n",
    )
    .await;
    a_six_megabyte_set(&node).await;
    let stalled = a_reader_that_stalls(&node).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = reqwest::Client::new();
    let refused = client.get(node.url("/v1/sets/big")).send().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "urn:meridian:problem:answers-backlogged");
    healthy(&node).await;
    let small = client
        .get(node.url("/v1/sets/missing"))
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), reqwest::StatusCode::OK);

    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = client.get(node.url("/v1/sets/big")).send().await.unwrap();
        if read.status() == reqwest::StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled reader's share never came back: {}",
            read.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that asks for a large answer and stops reading is cut off once it has taken no
/// bytes for `write_stall_ms`, before the whole answer is written; the node goes on serving.
#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_cut_off() {
    let node = Node::start("[timeouts]\nwrite_stall_ms = 500\n").await;
    let whole = a_six_megabyte_set(&node).await;
    let mut stream = a_reader_that_stalls(&node).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let taken = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("a connection whose client stopped reading must be closed");
    assert!(
        taken.len() < whole,
        "the whole answer ({} of {whole} bytes) was written to a client that did not read",
        taken.len()
    );
    healthy(&node).await;
}
