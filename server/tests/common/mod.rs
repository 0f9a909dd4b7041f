//! Runs a real `meridian serve` process on loopback for a test, and kills it on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Node {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) addr: SocketAddr,
    pub(crate) config: PathBuf,
    child: Option<Child>,
}

/// A free loopback TCP port, checked by binding it and released. Drawn from below Linux's
/// ephemeral range (32768–60999): a port that `bind(0)` handed out and that was released goes
/// back to the kernel's pool, where another test's client socket could take it before the
/// node binds it.
pub(crate) fn free_port() -> u16 {
    use rand::Rng as _;
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let port = rng.random_range(10_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port below the ephemeral range");
}

impl Node {
    /// Starts a standalone node; `extra` is appended to its config file (TOML sections).
    pub(crate) async fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nid = 1\nname = \"test-1\"\nregion = \"test\"\ndata_dir = \"data\"\n\n[http]\nlisten = \"{addr}\"\nworkers = 2\nplaintext = true\n\n[auth]\nenabled = false\n\n{extra}"
            ),
        )
        .unwrap();
        let mut node = Self {
            dir,
            addr,
            config,
            child: None,
        };
        node.spawn().await;
        node
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(crate) async fn spawn(&mut self) {
        self.spawn_child();
        self.wait_ready().await;
    }

    fn spawn_child(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("node.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("MERIDIAN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Starts the node and expects it to refuse to start: returns its log once it exited
    /// with a failure.
    pub(crate) async fn spawn_refused(&mut self) -> String {
        self.spawn_child();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success(), "meridian exited cleanly: {}", self.log());
                return self.log();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("meridian did not refuse to start: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(self.url("/readyz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "meridian exited with {status} during start-up: {}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node not ready in time: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited successfully.
    pub(crate) fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
