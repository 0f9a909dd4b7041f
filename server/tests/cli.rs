//! The client commands (`get`, `put`, `del`, `incr`, `sadd`, `srem`, `smembers`, `ls`) against
//! a running `meridian serve`: readable and `--json` output, and every kind of failure as one
//! line on stderr with a non-zero exit that leaves the node's data as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Node, free_port};
use serde_json::{Value, json};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The client commands of one user: none of the caller's client settings leak in, and the
/// session file lives in a directory of its own ($XDG_STATE_HOME/meridian/session).
struct Cli {
    url: String,
    state: tempfile::TempDir,
}

impl Cli {
    fn new(node: &Node) -> Self {
        Self {
            url: node.url(""),
            state: tempfile::tempdir().unwrap(),
        }
    }

    fn session_file(&self) -> PathBuf {
        self.state.path().join("meridian").join("session")
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with_env(args, &[])
    }

    /// [`Self::run`] with variables set after the defaults, e.g. another `XDG_STATE_HOME`.
    fn run_with_env(&self, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Run {
        let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(args)
            .env("MERIDIAN_URL", &self.url)
            .env("XDG_STATE_HOME", self.state.path())
            .env_remove("MERIDIAN_CONSISTENCY")
            .env_remove("MERIDIAN_SESSION")
            .env_remove("MERIDIAN_TOKEN")
            .env_remove("MERIDIAN_TOKEN_FILE")
            .env_remove("MERIDIAN_CA")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }

    /// Runs a command that must succeed quietly and returns its standard output, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args);
        assert_eq!(run.code, 0, "meridian {args:?}: {}", run.stderr);
        assert_eq!(run.stderr, "", "meridian {args:?} wrote to stderr");
        run.stdout.trim_end().to_owned()
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let text = self.ok(&with_json);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("meridian {args:?} --json: {e}: {text}"))
    }

    /// Runs a command that must fail with `code` and one line on stderr; returns that line.
    fn refused(&self, args: &[&str], code: i32) -> String {
        let run = self.run(args);
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
}

#[tokio::test]
async fn client_commands_write_read_list_and_delete_every_type() {
    let node = Node::start("").await;
    let cli = Cli::new(&node);

    let put = cli.ok(&["put", "greeting", "hello"]);
    assert!(
        put.starts_with("OK 20"),
        "put answers with its timestamp: {put}"
    );
    assert_eq!(cli.ok(&["get", "greeting"]), r#""hello""#);
    cli.ok(&["put", "doc", r#"{"a":[1,2]}"#]);
    assert_eq!(
        cli.ok_json(&["get", "doc"])["value"],
        json!({"a": [1, 2]}),
        "a JSON argument is stored as JSON"
    );

    assert_eq!(cli.ok(&["incr", "visits", "5"]), "5");
    assert_eq!(cli.ok(&["incr", "visits", "-2"]), "3");
    assert_eq!(cli.ok(&["incr", "visits"]), "4", "the default step is 1");
    assert_eq!(cli.ok(&["get", "-t", "counters", "visits"]), "4");
    assert_eq!(cli.ok(&["incr", "--gcounter", "hits", "7"]), "7");
    assert_eq!(
        cli.ok(&["incr", "--gcounter", "wide", "18446744073709551615"]),
        "18446744073709551615",
        "a G-Counter step takes the whole u64 range"
    );
    assert_eq!(cli.ok(&["get", "--type", "gcounters", "hits"]), "7");

    assert_eq!(cli.ok(&["sadd", "tags", "a", "b", "c"]), "3 elements");
    assert_eq!(cli.ok(&["srem", "tags", "b"]), "2 elements");
    assert_eq!(cli.ok(&["sadd", "tags", "42"]), "3 elements");
    assert_eq!(cli.ok(&["sadd", "single", "x"]), "1 element");
    assert_eq!(cli.ok(&["smembers", "tags"]), "\"a\"\n\"c\"\n42");
    assert_eq!(
        cli.ok_json(&["smembers", "tags"])["elements"],
        json!(["a", "c", 42])
    );

    assert_eq!(cli.ok(&["ls", "registers"]), "doc\ngreeting");
    assert_eq!(
        cli.ok(&["ls", "registers", "--limit", "1", "--all"]),
        "doc\ngreeting",
        "--all follows the cursor page by page"
    );
    assert_eq!(cli.ok(&["ls", "registers", "--prefix", "gr"]), "greeting");
    assert_eq!(
        cli.ok_json(&["ls", "sets"])["keys"],
        json!(["single", "tags"])
    );

    assert_eq!(cli.ok(&["del", "greeting"]), "deleted");
    let gone = cli.refused(&["get", "greeting"], 1);
    assert!(gone.contains("deleted") && gone.contains("404"), "{gone}");
    assert_eq!(cli.ok(&["del", "-t", "counters", "visits"]), "deleted");
    assert_eq!(cli.ok(&["get", "-t", "counters", "visits"]), "0");
    assert_eq!(cli.ok(&["del", "-t", "sets", "tags"]), "deleted");
    assert_eq!(cli.ok_json(&["smembers", "tags"])["elements"], json!([]));
    assert_eq!(
        cli.ok_json(&["smembers", "never-written"])["elements"],
        json!([]),
        "a set nobody wrote reads as empty, unlike a register"
    );
}

#[tokio::test]
async fn bad_arguments_and_server_errors_are_one_line_and_lose_nothing() {
    let node = Node::start("").await;
    let cli = Cli::new(&node);
    cli.ok(&["incr", "kept", "3"]);
    cli.ok(&["sadd", "kept-set", "x"]);
    cli.ok(&["put", "kept-register", "v"]);

    // Refused by the argument parser (exit 2), before anything is sent.
    let long_key = "k".repeat(2_000);
    for (args, says) in [
        (&["get"][..], "<KEY>"),
        (&["get", ""], "a value is required for '<KEY>'"),
        (&["put", "kept-register"], "<VALUE>"),
        (&["incr", "kept", "three"], "three"),
        (&["incr", "kept", "18446744073709551616"], "outside"),
        (&["get", "--url", "x", "kept"], "--url"),
        (&["get", "-t", "tables", "kept"], "tables"),
        (&["frobnicate"], "frobnicate"),
    ] {
        let line = cli.refused(args, 2);
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
        (
            &["incr", "kept", "9223372036854775808"],
            "HTTP 400 invalid-json",
        ),
        (
            &["incr", "--gcounter", "g", "-1"],
            "HTTP 400 negative-increment",
        ),
    ] {
        let line = cli.refused(args, 1);
        assert!(line.contains(says), "meridian {args:?}: {line}");
    }
    let closed = format!("http://127.0.0.1:{}", free_port());
    let line = cli.refused(&["get", "--region", &closed, "kept"], 1);
    assert!(line.contains("cannot reach"), "{line}");

    assert_eq!(cli.ok(&["get", "-t", "counters", "kept"]), "3");
    assert_eq!(cli.ok(&["smembers", "kept-set"]), "\"x\"");
    assert_eq!(cli.ok(&["get", "kept-register"]), "\"v\"");
}

#[tokio::test]
async fn the_session_token_is_kept_between_commands_and_a_refused_one_is_replaced() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut node = Node::start("").await;
    let cli = Cli::new(&node);
    let token = || std::fs::read_to_string(cli.session_file()).unwrap();

    cli.ok(&["put", "k", "v"]);
    let after_put = token();
    assert!(!after_put.trim().is_empty());
    let mode = std::fs::metadata(cli.session_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the session file is its owner's only");
    cli.ok(&["incr", "c"]);
    let after_incr = token();
    assert_ne!(
        after_incr, after_put,
        "each answer's token replaces the last"
    );

    cli.ok(&["incr", "c", "--no-session"]);
    assert_eq!(token(), after_incr, "--no-session keeps no token");
    let named_by_env = cli.state.path().join("env.tok");
    let run = cli.run_with_env(
        &["get", "k", "--no-session"],
        &[("MERIDIAN_SESSION", named_by_env.as_os_str())],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        !named_by_env.exists(),
        "--no-session wins over MERIDIAN_SESSION"
    );
    let elsewhere = cli.state.path().join("other.tok");
    cli.ok(&["get", "k", "--session", elsewhere.to_str().unwrap()]);
    assert_eq!(token(), after_incr, "--session names another file");
    assert!(
        !std::fs::read_to_string(&elsewhere)
            .unwrap()
            .trim()
            .is_empty()
    );

    // A standalone node draws a new session secret when it restarts: the stored token no
    // longer checks out there. The command still runs, once, and a new session starts.
    assert!(node.terminate(), "{}", node.log());
    node.spawn().await;
    let run = cli.run(&["incr", "c"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "3", "the increment ran exactly once");
    assert!(
        run.stderr.starts_with("note: starting a new session") && run.stderr.lines().count() == 1,
        "{}",
        run.stderr
    );
    assert_ne!(token(), after_incr);
    assert_eq!(
        cli.ok(&["get", "-t", "counters", "c"]),
        "3",
        "the new token is accepted"
    );

    // A session file that cannot be written: a named one fails the command in one line, the
    // default one only costs the session.
    let unwritable = "/dev/null/meridian/session";
    let line = cli.refused(&["get", "k", "--session", unwritable], 1);
    assert!(line.contains("the session file /dev/null/"), "{line}");
    let run = cli.run_with_env(&["get", "k"], &[("XDG_STATE_HOME", "/dev/null".as_ref())]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), r#""v""#);
    let stderr = run.stderr;
    assert!(stderr.starts_with("note: no session kept"), "{stderr}");
}
