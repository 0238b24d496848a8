//! Helpers the browser tests (Chromium: tests/browser.rs, Firefox: tests/firefox.rs) share:
//! where the scripts and artifacts live, whether they can run, running a scenario, the
//! native peer and what both kinds of call must show.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The fraction of the sender's frames the receiver must decode.
pub const MIN_DECODED: f64 = 0.9;

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

/// Whether tests that need what is `missing` can run: true when nothing is; otherwise a
/// skip line, or a panic when `DUET_REQUIRE_BROWSER_TEST` is set (`make test`).
pub fn nothing_missing(tests: &str, missing: &[&str]) -> bool {
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("DUET_REQUIRE_BROWSER_TEST").is_err(),
        "{tests} need: {}",
        missing.join(", ")
    );
    eprintln!("skipped: missing {}", missing.join(", "));
    false
}

/// Installs the pinned node packages of tests/browser (`npm ci`, never a browser
/// download) unless every one of `packages` is there.
pub fn install_node_packages(packages: &[&str]) {
    let modules = scripts().join("node_modules");
    if packages.iter().all(|p| modules.join(p).exists()) {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .env("PUPPETEER_SKIP_DOWNLOAD", "1")
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .current_dir(scripts())
        .status()
        .unwrap();
    assert!(status.success(), "npm ci in tests/browser failed");
}

/// Runs scenario `name` of the node `script` in tests/browser and returns its JSON
/// (asserting it succeeded).
pub fn scenario(script: &str, name: &str, args: Value) -> Value {
    let out = Command::new("node")
        .arg(scripts().join(script))
        .arg(name)
        .arg(args.to_string())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let result: Value = line
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{name}: no JSON result ({:?}); stdout: {stdout}",
                out.status
            )
        });
    println!("{name}: {result:#}");
    assert_eq!(result["ok"], true, "{name} failed: {}", result["error"]);
    result
}

/// Copies a child's stderr to ours (prefixed), sending each line to the receiver too.
pub fn forward_stderr(child: &mut Child, who: &'static str) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  {who}: {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a native client and returns its report (asserting it exited well).
pub fn wait_native(mut child: Child, report: &Path) -> Value {
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(report)
        .unwrap_or_else(|e| panic!("native client ({status:?}) left no report: {e}"));
    let report: Value = serde_json::from_str(&text).unwrap();
    println!("native report: {report:#}");
    assert!(status.success(), "native client: {status:?}");
    report
}

/// The native client's decoded frame rate over its best stretch of at least 8 s (its
/// timeline samples the running count about once a second; the frames before its first
/// keyframe are dropped by design).
pub fn native_best_fps(report: &Value) -> f64 {
    let samples: Vec<(f64, f64)> = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (num(&s["t_s"]), num(&s["frames_decoded"])))
        .collect();
    samples
        .iter()
        .enumerate()
        .filter_map(|(i, &(t0, d0))| {
            let &(t1, d1) = samples[i..].iter().find(|(t, _)| t - t0 >= 8.0)?;
            Some((d1 - d0) / (t1 - t0))
        })
        .fold(0.0, f64::max)
}

/// Frames decoded by one page over the window, against what the other page sent; and
/// audio heard.
pub fn assert_decoded(receiver: &Value, sender: &Value, who: &str) {
    let decoded = num(&receiver["frames_decoded"]);
    let sent = num(&sender["frames_sent"]);
    println!(
        "{who} decoded {decoded} of {sent} frames ({})",
        receiver["codec_in"]
    );
    assert!(
        sent > 5.0 * num(&sender["seconds"]),
        "{who}: only {sent} frames sent"
    );
    assert!(
        decoded >= MIN_DECODED * sent,
        "{who} decoded {decoded} of {sent} frames"
    );
    assert!(num(&receiver["audio_energy"]) > 0.0, "{who} heard nothing");
}
