//! The client commands (`get`, `put`, `del`, `incr`, `sadd`, `srem`, `smembers`, `ls`) against
//! a running `meridian serve`: readable and `--json` output, and every kind of failure as one
//! line on stderr with a non-zero exit that leaves the node's data as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Node, free_port};
use serde_json::{Value, json};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `meridian ARGS` against `url`, with none of the caller's client settings leaking in.
fn meridian(url: &str, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .env("MERIDIAN_URL", url)
        .env_remove("MERIDIAN_CONSISTENCY")
        .env_remove("MERIDIAN_SESSION")
        .env_remove("MERIDIAN_TOKEN")
        .env_remove("MERIDIAN_TOKEN_FILE")
        .env_remove("MERIDIAN_CA")
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Runs a command that must succeed and returns its standard output, trimmed.
fn ok(url: &str, args: &[&str]) -> String {
    let run = meridian(url, args);
    assert_eq!(run.code, 0, "meridian {args:?}: {}", run.stderr);
    assert_eq!(run.stderr, "", "meridian {args:?} wrote to stderr");
    run.stdout.trim_end().to_owned()
}

fn ok_json(url: &str, args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let text = ok(url, &with_json);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("meridian {args:?} --json: {e}: {text}"))
}

/// Runs a command that must fail with `code` and one line on stderr; returns that line.
fn refused(url: &str, args: &[&str], code: i32) -> String {
    let run = meridian(url, args);
    assert_eq!(run.code, code, "meridian {args:?}: {}", run.stderr);
    assert_eq!(run.stdout, "", "meridian {args:?} printed an answer");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "meridian {args:?}: not one line: {}",
        run.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    lines[0].to_owned()
}

#[tokio::test]
async fn client_commands_write_read_list_and_delete_every_type() {
    let node = Node::start("").await;
    let url = &node.url("");

    let put = ok(url, &["put", "greeting", "hello"]);
    assert!(
        put.starts_with("OK 20"),
        "put answers with its timestamp: {put}"
    );
    assert_eq!(ok(url, &["get", "greeting"]), r#""hello""#);
    ok(url, &["put", "doc", r#"{"a":[1,2]}"#]);
    assert_eq!(
        ok_json(url, &["get", "doc"])["value"],
        json!({"a": [1, 2]}),
        "a JSON argument is stored as JSON"
    );

    assert_eq!(ok(url, &["incr", "visits", "5"]), "5");
    assert_eq!(ok(url, &["incr", "visits", "-2"]), "3");
    assert_eq!(ok(url, &["incr", "visits"]), "4", "the default step is 1");
    assert_eq!(ok(url, &["get", "-t", "counters", "visits"]), "4");
    assert_eq!(ok(url, &["incr", "--gcounter", "hits", "7"]), "7");
    assert_eq!(ok(url, &["get", "--type", "gcounters", "hits"]), "7");

    assert_eq!(ok(url, &["sadd", "tags", "a", "b", "c"]), "3 elements");
    assert_eq!(ok(url, &["srem", "tags", "b"]), "2 elements");
    ok(url, &["sadd", "tags", "42"]);
    assert_eq!(ok(url, &["smembers", "tags"]), "\"a\"\n\"c\"\n42");
    assert_eq!(
        ok_json(url, &["smembers", "tags"])["elements"],
        json!(["a", "c", 42])
    );

    assert_eq!(ok(url, &["ls", "registers"]), "doc\ngreeting");
    assert_eq!(
        ok(url, &["ls", "registers", "--limit", "1", "--all"]),
        "doc\ngreeting",
        "--all follows the cursor page by page"
    );
    assert_eq!(ok(url, &["ls", "registers", "--prefix", "gr"]), "greeting");
    assert_eq!(ok_json(url, &["ls", "sets"])["keys"], json!(["tags"]));

    assert_eq!(ok(url, &["del", "greeting"]), "deleted");
    let gone = refused(url, &["get", "greeting"], 1);
    assert!(gone.contains("deleted") && gone.contains("404"), "{gone}");
    assert_eq!(ok(url, &["del", "-t", "counters", "visits"]), "deleted");
    assert_eq!(ok(url, &["get", "-t", "counters", "visits"]), "0");
    assert_eq!(ok(url, &["del", "-t", "sets", "tags"]), "deleted");
    assert_eq!(ok_json(url, &["smembers", "tags"])["elements"], json!([]));
    assert_eq!(
        ok_json(url, &["smembers", "never-written"])["elements"],
        json!([]),
        "a set nobody wrote reads as empty, unlike a register"
    );
}

#[tokio::test]
async fn bad_arguments_and_server_errors_are_one_line_and_lose_nothing() {
    let node = Node::start("").await;
    let url = &node.url("");
    ok(url, &["incr", "kept", "3"]);
    ok(url, &["sadd", "kept-set", "x"]);
    ok(url, &["put", "kept-register", "v"]);

    // Refused by the argument parser (exit 2), before anything is sent.
    let long_key = "k".repeat(2_000);
    for (args, says) in [
        (&["get"][..], "<KEY>"),
        (&["get", ""], "a value is required for '<KEY>'"),
        (&["put", "kept-register"], "<VALUE>"),
        (&["incr", "kept", "three"], "three"),
        (&["get", "--url", "x", "kept"], "--url"),
        (&["get", "-t", "tables", "kept"], "tables"),
        (&["frobnicate"], "frobnicate"),
    ] {
        let line = refused(url, args, 2);
        assert!(line.contains(says), "meridian {args:?}: {line}");
    }

    // Refused by the node (exit 1): the line names the status and the problem type.
    for (args, says) in [
        (&["put", &long_key, "v"][..], "HTTP 400 invalid-key"),
        (
            &["get", "--consistency", "SOMETIMES", "kept-register"],
            "HTTP 400 invalid-consistency-level",
        ),
        (&["get", "missing"], "HTTP 404 not-found"),
    ] {
        let line = refused(url, args, 1);
        assert!(line.contains(says), "meridian {args:?}: {line}");
    }
    let closed = format!("http://127.0.0.1:{}", free_port());
    let line = refused(url, &["get", "--region", &closed, "kept"], 1);
    assert!(line.contains("cannot reach"), "{line}");

    assert_eq!(ok(url, &["get", "-t", "counters", "kept"]), "3");
    assert_eq!(ok(url, &["smembers", "kept-set"]), "\"x\"");
    assert_eq!(ok(url, &["get", "kept-register"]), "\"v\"");
}
