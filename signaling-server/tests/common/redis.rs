//! A real `redis-server` for the cluster tests: on a free loopback port, without
//! persistence, in a temporary directory, killed when dropped.
//!
//! Without the Debian package `redis-server` a test prints a skip line and passes,
//! unless `DUET_REQUIRE_REDIS_TEST` is set (as `make test` does): then it fails.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long `redis-server` may take to answer after starting.
const START_WITHIN: Duration = Duration::from_secs(10);

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A fresh server on a free port, or `None` (after the skip line) when
    /// `redis-server` is not installed.
    pub async fn start() -> Option<RedisServer> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_tcp_port();
        let mut server = RedisServer {
            child: None,
            port,
            dir,
        };
        if !server.spawn() {
            skipped();
            return None;
        }
        server.wait_ready().await;
        Some(server)
    }

    /// Starts it again on the same port (after [`RedisServer::kill`]).
    pub async fn restart(&mut self) {
        assert!(self.spawn(), "redis-server vanished");
        self.wait_ready().await;
    }

    fn spawn(&mut self) -> bool {
        let spawned = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => {
                self.child = Some(child);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => panic!("cannot run redis-server: {e}"),
        }
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + START_WITHIN;
        loop {
            if ping(self.port).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {} did not answer PING within {START_WITHIN:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers `PING` on `port`.
async fn ping(port: u16) -> bool {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if tcp.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
    )
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn skipped() {
    assert!(
        std::env::var("DUET_REQUIRE_REDIS_TEST").is_err(),
        "redis-server not found: install the Debian package `redis-server`"
    );
    eprintln!(
        "SKIPPED: redis-server not found; install the Debian package `redis-server` \
         (apt-get install redis-server) to run the cluster tests"
    );
}
