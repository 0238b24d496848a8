//! Helpers the browser tests (Chromium: tests/browser.rs, Firefox: tests/firefox.rs) share:
//! where the scripts and artifacts live, whether a program runs, the native peer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

pub fn artifacts() -> PathBuf {
    let dir = std::env::var_os("DUET_BROWSER_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-test"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A native headless client; `args` after the common ones.
pub fn native(server: &signaling_server::Server, report: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["call", "--headless", "--server", &server.ws_url()])
        .args(["--audio", "sine:500", "--wait", "90s"])
        .arg("--report")
        .arg(report)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to 60 s) until `room` has `members` members.
pub async fn wait_members(server: &signaling_server::Server, room: &str, members: usize) {
    let end = Instant::now() + Duration::from_secs(60);
    while server.room_members(room) != Some(members) {
        assert!(Instant::now() < end, "{room} never had {members} members");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
