//! `browsernet`: Chromium in the same impaired network as `netbench` (tests/common/netns.rs:
//! two clients behind two cone NATs, the server with its STUN/TURN on the "public"
//! segment), to compare Duet with a browser's WebRTC over the same link. Rows:
//!
//! - `chromium-chromium`: the web client in Chromium on both sides (Chromium's own stack
//!   both ways: the bar to compare Duet <-> Duet with);
//! - `chromium-duet`: Chromium (web client, fake camera) on side a, the native
//!   `duet call --headless` on side b: does each decode the other, and does Chromium's
//!   sender follow Duet's feedback (TWCC, REMB)? Chromium's `targetBitrate` and the
//!   path's `availableOutgoingBitrate` over time say so.
//!
//! Both rows use the `home` impairments of netbench on each uplink: 1 Mbit/s (tbf), 2 %
//! random loss, 40 ms one-way delay; with `--step`, netbench's `step` link instead:
//! 3 Mbit/s, both uplinks down to 500 kbit/s for 15 s mid-call (give `--seconds 45`). Prints one JSON object per row: frames decoded by
//! each receiver of those its peer sent, Chromium's send bitrate and target per second.
//!
//! Needs root, `ip`, `iptables`, `tc`, node and /usr/bin/chromium (playwright-core in
//! tests/browser/node_modules: `npm ci` there). Not part of CI.
//! `cargo bench -p duet --bench browsernet -- [--only ROW] [--seconds 20]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clap::Parser;
use netns::{Topology, able, out_dir};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// Only this row: chromium-chromium, chromium-duet.
    #[arg(long)]
    only: Option<String>,
    /// Length of each call once connected.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Without the impairments (a clean link, to tell the network from the stacks).
    #[arg(long)]
    clean: bool,
    /// netbench's `step` link: 3 Mbit/s, 500 kbit/s from `--step-at` for 15 s.
    #[arg(long)]
    step: bool,
    /// Chromium's camera shows Duet's test pattern (a Y4M file made first) instead of its
    /// own fake picture, which needs a third of the bitrate: the same content both ways.
    #[arg(long)]
    pattern: bool,
    /// Seconds after the second peer starts (its page loads and connects first).
    #[arg(long, default_value_t = 15)]
    step_at: u64,
    #[arg(long, hide = true)]
    bench: bool,
}

const SERVER: &str = "http://198.51.100.1:8787";

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// node + chromium running the `netpeer` scenario of duet.mjs inside the namespace of
/// `side`; its stdout (the JSON line) and stderr go to files in `dir`.
fn browser(
    t: &Topology,
    side: &str,
    dir: &Path,
    room: &str,
    seconds: u64,
    hang_up: bool,
    camera: Option<&Path>,
) -> Child {
    let home = dir.join(format!("home-{side}"));
    std::fs::create_dir_all(&home).unwrap();
    // Chromium's singleton socket lives in TMPDIR, and a socket path has ~100 bytes.
    let tmp = short_tmp(t, side);
    std::fs::create_dir_all(&tmp).unwrap();
    // Not localhost and not https: without this the page gets no camera.
    let mut flags = vec![format!(
        "--unsafely-treat-insecure-origin-as-secure={SERVER}"
    )];
    if let Some(file) = camera {
        flags.push(format!(
            "--use-file-for-fake-video-capture={}",
            file.display()
        ));
    }
    let args = json!({
        "url": format!("{SERVER}/r/{room}"),
        "name": format!("Chromium {side}"),
        "seconds": seconds,
        "hang_up": hang_up,
        "chromium_flags": flags,
    });
    Command::new("ip")
        .args(["netns", "exec", &t.ns(side), "node"])
        .arg(scripts().join("duet.mjs"))
        .arg("netpeer")
        .arg(args.to_string())
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .stdout(std::fs::File::create(dir.join(format!("{side}.out"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{side}.log"))).unwrap())
        .spawn()
        .unwrap()
}

fn short_tmp(t: &Topology, side: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/{}", t.ns(side)))
}

/// The JSON line a browser printed.
fn browser_result(dir: &Path, side: &str) -> Value {
    let out = std::fs::read_to_string(dir.join(format!("{side}.out"))).unwrap_or_default();
    out.lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| json!({"ok": false, "error": format!("no JSON; see {}", dir.display())}))
}

fn n(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Chromium's side of a row: totals over the call and its sender over time.
fn chromium_summary(r: &Value) -> Value {
    if r["ok"] != true {
        return r.clone();
    }
    let totals = &r["totals"];
    let samples = r["samples"].as_array().cloned().unwrap_or_default();
    let col = |key: &str| -> Vec<Value> { samples.iter().map(|s| s[key].clone()).collect() };
    let secs = n(&r["seconds"]).max(1.0);
    let sent_kbps: Vec<f64> = samples.iter().map(|s| n(&s["video_kbps_sent"])).collect();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    // The first second whose target is under the 1 Mbit/s the link carries.
    let under_1m = samples
        .iter()
        .find(|s| s["target_kbps"].as_f64().is_some_and(|k| k < 1000.0))
        .map(|s| s["t"].clone());
    let half = sent_kbps.len() / 2;
    json!({
        "seconds": secs,
        "frames_decoded": totals["video_in"]["frames_decoded"],
        "frames_sent": totals["video_out"]["frames_sent"],
        "video_kbps_sent_mean": mean(&sent_kbps).round(),
        "video_kbps_sent_second_half": mean(&sent_kbps[half..]).round(),
        "first_second_target_under_1000_kbps": under_1m,
        "target_kbps": col("target_kbps"),
        "available_outgoing_kbps": col("available_outgoing_kbps"),
        "video_kbps_sent": col("video_kbps_sent"),
        "video_kbps_received": col("video_kbps_received"),
        "rtt_ms": col("rtt_ms"),
        "send_size": col("send_size"),
        "quality_limitation": col("quality_limitation"),
        "packets_lost_in": totals["video_in"]["packets_lost"],
        "nacks_sent": totals["video_in"]["nacks_sent"],
        "plis_sent": totals["video_in"]["plis_sent"],
        "nacks_received": totals["video_out"]["nacks_received"],
        "plis_received": totals["video_out"]["plis_received"],
        "key_frames_sent": totals["video_out"]["key_frames"],
        "freezes": totals["video_in"]["freezes"],
        "freezes_ms": totals["video_in"]["freezes_ms"],
        "codec_out": totals["video_out"]["codec"],
        "codec_in": totals["video_in"]["codec"],
        "path": totals["path"],
        "ended": r["ended"],
    })
}

/// Duet's side of the chromium-duet row (from its report).
fn duet_summary(me: &Value) -> Value {
    let keys = [
        "frames_decoded",
        "frames_sent",
        "fps_received",
        "latency_ms_p50",
        "bitrate_sent_kbps",
        "target_bitrate_kbps",
        "estimate_bitrate_kbps",
        "keyframes_sent",
        "keyframe_requests_received",
        "keyframe_requests_sent",
        "nacks_sent",
        "frames_repaired",
        "frames_broken",
        "freeze_count",
        "freeze_total_ms",
        "rtt_ms",
        "rate_requests_sent",
        "end_reason",
    ];
    let mut out = serde_json::Map::new();
    for k in keys {
        out.insert(k.to_owned(), me[k].clone());
    }
    Value::Object(out)
}

/// What the uplink's tbf of `side` sent and dropped over the call (tail drops there are
/// real congestion; the iptables loss is not counted in them).
fn tbf_stats(t: &Topology, side: &str) -> Value {
    let out = Command::new("ip")
        .args(["netns", "exec", &t.ns(&format!("r{side}"))])
        .args(["tc", "-s", "qdisc", "show", "dev", "wan"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // " Sent 123 bytes 45 pkt (dropped 6, overlimits 7 requeues 0)"
    let words: Vec<&str> = out
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .and_then(|w| w.parse::<u64>().ok())
    };
    let sent_pkts = words
        .iter()
        .position(|w| *w == "pkt")
        .and_then(|i| words.get(i.checked_sub(1)?))
        .and_then(|w| w.parse::<u64>().ok());
    json!({ "sent_packets": sent_pkts, "dropped": after("dropped"), "overlimits": after("overlimits") })
}

/// netbench's step, `at` seconds from now: both uplinks down to 500 kbit/s for 15 s.
fn step_link(t: &Topology, at: u64) {
    std::thread::sleep(Duration::from_secs(at));
    eprintln!("step: uplinks at 500 kbit/s");
    t.set_uplink_rate("a", 500);
    t.set_uplink_rate("b", 500);
    std::thread::sleep(Duration::from_secs(15));
    eprintln!("step: uplinks at 3 Mbit/s again");
    t.set_uplink_rate("a", 3000);
    t.set_uplink_rate("b", 3000);
}

/// Ten seconds of Duet's 640x480 test pattern as a Y4M file (Chromium loops it).
fn pattern_file() -> PathBuf {
    use duet::media::video::{TestPattern, VideoSource, Y4mWriter};
    let path = std::env::temp_dir().join("duet-browsernet-pattern-640x480.y4m");
    let mut pattern = TestPattern::new(640, 480, 30.0, false);
    let mut file = Y4mWriter::new(&path, 30);
    for _ in 0..300 {
        file.write(&pattern.next_frame().unwrap()).unwrap();
    }
    path
}

fn run_row(row: &str, args: &Args, tag: &str, camera: Option<&Path>) -> Value {
    let t = Topology::build(tag, false);
    if args.step {
        for side in ["a", "b"] {
            t.set_uplink_rate(side, 3000);
        }
    } else if !args.clean {
        for side in ["a", "b"] {
            t.set_uplink_rate(side, 1000);
            t.add_uplink_loss(side, 0.02);
            t.add_uplink_delay(side, 40);
        }
    }
    // Let the new interfaces settle (IPv6 DAD): Chromium aborts a page load on a
    // network change.
    std::thread::sleep(Duration::from_secs(2));
    let dir = out_dir(&format!("browsernet-{row}"));
    let mut server = t.start_server(&dir);
    let room = format!("bn{tag}");
    let started = Instant::now();
    let mut result = match row {
        "chromium-chromium" => {
            let mut a = browser(&t, "a", &dir, &room, args.seconds, true, camera);
            // b second: a is waiting in the room when b arrives.
            std::thread::sleep(Duration::from_secs(3));
            let mut b = browser(&t, "b", &dir, &room, args.seconds, false, camera);
            let (sa, sb) = std::thread::scope(|s| {
                if args.step {
                    s.spawn(|| step_link(&t, args.step_at));
                }
                (a.wait().unwrap(), b.wait().unwrap())
            });
            let (ra, rb) = (browser_result(&dir, "a"), browser_result(&dir, "b"));
            json!({
                "a": chromium_summary(&ra),
                "b": chromium_summary(&rb),
                "exit": [sa.code(), sb.code()],
            })
        }
        "chromium-duet" => {
            let mut a = browser(&t, "a", &dir, &room, args.seconds, false, camera);
            std::thread::sleep(Duration::from_secs(3));
            let report = dir.join("b.json");
            let duration = format!("{}s", args.seconds);
            let mut b = t.spawn(
                "b",
                &[
                    "call",
                    "--headless",
                    "--server",
                    "198.51.100.1:8787",
                    "--room",
                    &room,
                    "--name",
                    "duet",
                    "--width",
                    "640",
                    "--height",
                    "480",
                    "--fps",
                    "30",
                    "--duration",
                    &duration,
                    "--wait",
                    "90s",
                    "--report",
                    report.to_str().unwrap(),
                ],
                &dir.join("b-duet.log"),
            );
            let (sa, sb) = std::thread::scope(|s| {
                if args.step {
                    s.spawn(|| step_link(&t, args.step_at));
                }
                let sa = a.wait().unwrap();
                if !sa.success() {
                    let _ = b.kill(); // the browser failed: nobody to call
                }
                (sa, b.wait().unwrap())
            });
            let ra = browser_result(&dir, "a");
            let rb: Value = std::fs::read_to_string(&report)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_else(|| json!({"error": "no report"}));
            json!({
                "a_chromium": chromium_summary(&ra),
                "b_duet": duet_summary(&rb),
                "b_duet_timeline": rb["timeline"],
                "exit": [sa.code(), sb.code()],
            })
        }
        _ => panic!("unknown row {row}"),
    };
    let tbf = json!({ "a": tbf_stats(&t, "a"), "b": tbf_stats(&t, "b") });
    let _ = server.kill();
    let _ = server.wait();
    for side in ["a", "b"] {
        let _ = std::fs::remove_dir_all(short_tmp(&t, side));
    }
    result["wall_s"] = json!(started.elapsed().as_secs());
    result["logs"] = json!(dir.display().to_string());
    result["impaired"] = json!(!args.clean);
    result["step"] = json!(args.step);
    result["camera"] = json!(camera.map(|c| c.display().to_string()));
    result["uplink_tbf"] = tbf;
    drop(t);
    result
}

fn main() {
    let args = Args::parse();
    assert!(able(), "browsernet needs root, ip and iptables");
    assert!(
        scripts().join("node_modules/playwright-core").exists(),
        "run npm ci in tests/browser first"
    );
    let pid = std::process::id() % 10_000;
    let camera = args.pattern.then(pattern_file);
    for row in ["chromium-chromium", "chromium-duet"] {
        if args.only.as_deref().is_some_and(|o| o != row) {
            continue;
        }
        let tag = format!("{pid}{}", if row == "chromium-duet" { "cd" } else { "cc" });
        let r = run_row(row, &args, &tag, camera.as_deref());
        println!("{}", json!({ "row": row, "result": r }));
    }
}
