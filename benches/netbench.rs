//! `netbench`: Duet <-> Duet calls over impaired links, one fresh call per row, in network
//! namespaces (two clients behind two cone NATs, the server on the "public" segment; see
//! tests/common/netns.rs). Each client's uplink is impaired the ways this kernel allows:
//! `tbf` rate limits, iptables `statistic` random loss, one-way delay through a userspace
//! NFQUEUE delayer, a DROP rule for an outage, a new address for one client (`move`: a
//! laptop changing networks), TCP resets for the signaling WebSocket (`signaling`).
//! Prints one JSON object: per row and per client, frames decoded of those sent,
//! glass-to-glass latency, bitrate sent, keyframes and what asked for them, NACKs,
//! freezes (WebRTC definition), and each client's per-second timeline (not for `clean`).
//!
//! Needs root, `ip`, `iptables` and `tc`. Not part of CI (minutes, and root).
//! `cargo bench -p duet --bench netbench -- [--only ROW] [--seconds 20]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/netns.rs"]
mod netns;

use std::time::{Duration, Instant};

use clap::Parser;
use netns::{Topology, able, call_with};
use serde_json::{Value, json};

/// How long the step row's link stays narrowed, and how long its call goes on after.
const STEP_LASTS: u64 = 15;
const AFTER_STEP: u64 = 20;

#[derive(Debug, Parser)]
struct Args {
    /// Only this row: clean, lossy, home, bad, step, flap, move, signaling.
    #[arg(long)]
    only: Option<String>,
    /// Length of each call (the step row takes `--step-at` + 35 s whatever this says:
    /// [`STEP_LASTS`] narrowed, then [`AFTER_STEP`] to climb back).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// When the step row's link narrows (it widens again [`STEP_LASTS`] later). Later than the
    /// default 10 s, the senders have climbed further above the new rate.
    #[arg(long, default_value_t = 10)]
    step_at: u64,
    #[arg(long, hide = true)]
    bench: bool,
}

fn u(r: &Value, key: &str) -> u64 {
    r[key].as_u64().unwrap_or(0)
}

/// The numbers of one client in one row.
fn summary(me: &Value, other: &Value) -> Value {
    json!({
        "frames_decoded": u(me, "frames_decoded"),
        "frames_sent_by_other": u(other, "frames_sent"),
        "fps_received": me["fps_received"],
        "latency_ms_p50": me["latency_ms_p50"],
        "latency_ms_p95": me["latency_ms_p95"],
        "bitrate_sent_kbps": me["bitrate_sent_kbps"],
        "target_bitrate_kbps_at_end": me["target_bitrate_kbps"],
        "estimate_bitrate_kbps_at_end": me["estimate_bitrate_kbps"],
        "keyframes_sent": u(me, "keyframes_sent"),
        "keyframe_requests_received": u(me, "keyframe_requests_received"),
        "keyframe_requests_sent": u(me, "keyframe_requests_sent"),
        "nacks_sent": u(me, "nacks_sent"),
        "frames_repaired": u(me, "frames_repaired"),
        "frames_given_up": u(me, "frames_broken"),
        "retransmissions_received": u(me, "retransmissions_received"),
        "fec_packets_sent": u(me, "fec_packets_sent"),
        "fec_recovered": u(me, "fec_recovered"),
        "freeze_count": u(me, "freeze_count"),
        "freeze_total_ms": me["freeze_total_ms"],
        "freeze_longest_ms": me["freeze_longest_ms"],
        "audio_frames_concealed": u(me, "audio_frames_concealed"),
        "audio_jitter_target_ms": u(me, "audio_jitter_target_ms"),
        "audio_late_packets": u(me, "audio_late_packets"),
        "audio_stretched_frames": u(me, "audio_stretched_frames"),
        "audio_skipped_packets": u(me, "audio_skipped_packets"),
        "rtt_ms": me["rtt_ms"],
        "rate_requests_sent": u(me, "rate_requests_sent"),
        "ice_restarts": u(me, "ice_restarts"),
        "signaling_resumes": u(me, "signaling_resumes"),
        "end": me["end_reason"],
    })
}

fn main() {
    let args = Args::parse();
    assert!(able(), "netbench needs root, ip and iptables");
    let rows = [
        "clean",
        "lossy",
        "home",
        "bad",
        "step",
        "flap",
        "move",
        "signaling",
    ];
    let mut out = serde_json::Map::new();
    let pid = std::process::id() % 10_000;
    for row in rows {
        if args.only.as_deref().is_some_and(|o| o != row) {
            continue;
        }
        let t = Topology::build(&format!("{pid}{}", &row[..2]), false);
        let mut t = t;
        t.client_args = ["--width", "640", "--height", "480", "--fps", "30"]
            .map(String::from)
            .to_vec();
        let secs = if row == "step" {
            args.step_at + STEP_LASTS + AFTER_STEP
        } else {
            args.seconds
        };
        let duration = format!("{secs}s");
        for side in ["a", "b"] {
            match row {
                // Delays are one way, on both uplinks: 40 + 40 ms is an 80 ms RTT.
                "lossy" => {
                    t.add_uplink_loss(side, 0.02);
                    t.add_uplink_delay(side, 40);
                }
                "home" => {
                    t.set_uplink_rate(side, 1000);
                    t.add_uplink_loss(side, 0.02);
                    t.add_uplink_delay(side, 40);
                }
                "bad" => {
                    t.add_uplink_loss(side, 0.05);
                    t.add_uplink_delay(side, 50);
                }
                "step" => t.set_uplink_rate(side, 3000),
                _ => {}
            }
        }
        let started = Instant::now();
        let (ra, rb) = call_with(&t, &format!("netbench-{row}"), &duration, |t, _| {
            let at = Instant::now();
            match row {
                "step" => {
                    std::thread::sleep(Duration::from_secs(args.step_at));
                    t.set_uplink_rate("a", 500);
                    t.set_uplink_rate("b", 500);
                    std::thread::sleep(
                        Duration::from_secs(args.step_at + STEP_LASTS).saturating_sub(at.elapsed()),
                    );
                    t.set_uplink_rate("a", 3000);
                    t.set_uplink_rate("b", 3000);
                }
                "move" => {
                    std::thread::sleep(Duration::from_secs(8));
                    t.move_client("a");
                }
                "signaling" => {
                    std::thread::sleep(Duration::from_secs(8));
                    t.set_signaling_cut("a", true);
                    std::thread::sleep(Duration::from_secs(2));
                    t.set_signaling_cut("a", false);
                }
                "flap" => {
                    std::thread::sleep(Duration::from_secs(8));
                    t.set_outage("a", true);
                    t.set_outage("b", true);
                    std::thread::sleep(Duration::from_secs(5));
                    t.set_outage("a", false);
                    t.set_outage("b", false);
                }
                _ => {}
            }
        });
        let mut r = json!({
            "a": summary(&ra, &rb),
            "b": summary(&rb, &ra),
            "wall_s": started.elapsed().as_secs(),
        });
        if row != "clean" {
            r["timeline_a"] = ra["timeline"].clone();
            r["timeline_b"] = rb["timeline"].clone();
        }
        eprintln!("{row}: {}", serde_json::to_string(&r["a"]).unwrap());
        out.insert(row.to_owned(), r);
        drop(t);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(out)).unwrap()
    );
}
