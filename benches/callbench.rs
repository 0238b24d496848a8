//! `callbench`: a loopback call between two separate `duet call --headless` processes
//! (release build), both directions flowing, with the clean and the noisy test pattern,
//! and the clean one relay-only through the signaling server's embedded TURN server
//! (`relay`: compare with `clean` for what the relay costs), and the clean one with the
//! audio processing stage on (`processing`: echo cancellation, noise suppression and
//! automatic gain, as for a real microphone; compare with `clean` for what it costs).
//! Prints JSON: set-up time, glass-to-glass latency, encode/decode time per frame, CPU
//! and memory per client, frame rate, frozen and lost frames, and for `relay` the CPU the
//! server process (signaling + TURN) used.
//!
//! `cargo bench -p duet --bench callbench -- [--width 1280 --height 720 --seconds 20]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1280)]
    width: usize,
    #[arg(long, default_value_t = 720)]
    height: usize,
    #[arg(long, default_value_t = 30.0)]
    fps: f64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 2500)]
    bitrate_kbps: u32,
    /// Only this variant: clean, processing, relay or noisy.
    #[arg(long)]
    only: Option<String>,
    #[arg(long, hide = true)]
    bench: bool,
}

fn duet_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "-p", "duet", "--bin", "duet"])
        .current_dir(&root)
        .status()
        .expect("cargo build");
    assert!(status.success());
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release/duet")
}

fn main() {
    let args = Args::parse();
    let binary = duet_binary();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(signaling_server::Server::start({
            let mut config = signaling_server::Config::ephemeral();
            config.turn_server.listen = Some("127.0.0.1:0".parse().unwrap());
            // Loopback peers are refused by default (SSRF guard); this is a benchmark.
            config.turn_server.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
            config
        }))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("duet-callbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut results = serde_json::Map::new();
    for variant in ["clean", "processing", "relay", "noisy"] {
        if args.only.as_deref().is_some_and(|o| o != variant) {
            continue;
        }
        let room = format!("bench-{variant}");
        let spawn = |who: &str| {
            let mut cmd = Command::new(&binary);
            cmd.args([
                "call",
                "--headless",
                "--server",
                &server.ws_url(),
                "--room",
                &room,
            ])
            .args([
                "--width",
                &args.width.to_string(),
                "--height",
                &args.height.to_string(),
            ])
            .args(["--fps", &args.fps.to_string()])
            .args(["--bitrate-kbps", &args.bitrate_kbps.to_string()])
            .args(["--duration", &format!("{}s", args.seconds), "--wait", "30s"])
            .arg("--report")
            .arg(dir.join(format!("{variant}-{who}.json")))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            // DUET_BENCH_LOG=FILTER: each client's log in target/release/callbench-VARIANT-WHO.log.
            if let Ok(filter) = std::env::var("DUET_BENCH_LOG") {
                let log = std::fs::File::create(
                    binary.with_file_name(format!("callbench-{variant}-{who}.log")),
                )
                .unwrap();
                cmd.env("RUST_LOG", filter).stderr(log);
            }
            match variant {
                "noisy" => cmd.args(["--video", "noisy-pattern", "--expect-noisy"]),
                "relay" => cmd.args(["--expect-pattern", "--relay-only"]),
                // The clean call with the audio processing stage on (echo cancellation,
                // noise suppression, automatic gain), as for a real microphone: what
                // it costs a whole call.
                "processing" => cmd.args(["--expect-pattern", "--audio-processing", "on"]),
                _ => cmd.arg("--expect-pattern"),
            };
            cmd.spawn().expect("start duet")
        };
        let cpu_before = duet::process::cpu_seconds();
        let started = std::time::Instant::now();
        let mut a = spawn("a");
        std::thread::sleep(Duration::from_millis(500));
        let mut b = spawn("b");
        a.wait().unwrap();
        b.wait().unwrap();
        let server_cpu_percent = match (cpu_before, duet::process::cpu_seconds()) {
            (Some(x), Some(y)) => {
                Some(((y - x) / started.elapsed().as_secs_f64() * 1000.0).round() / 10.0)
            }
            _ => None,
        };
        let mut clients = Vec::new();
        for who in ["a", "b"] {
            let text = std::fs::read_to_string(dir.join(format!("{variant}-{who}.json"))).unwrap();
            let r: serde_json::Value = serde_json::from_str(&text).unwrap();
            clients.push(serde_json::json!({
                "setup_to_first_frame_ms": r["setup_to_first_frame_ms"],
                "time_to_connected_ms": r["time_to_connected_ms"],
                "latency_ms_p50": r["latency_ms_p50"],
                "latency_ms_p95": r["latency_ms_p95"],
                "encode_ms_p50": r["encode_ms_p50"],
                "decode_ms_p50": r["decode_ms_p50"],
                "cpu_percent_of_one_core": r["process_cpu_percent"],
                "peak_rss_mib": r["process_peak_rss_mib"],
                "fps_received": r["fps_received"],
                "frames_sent": r["frames_sent"],
                "frames_decoded": r["frames_decoded"],
                "frozen_frames": r["frozen_frames"],
                "lost_frames": r["lost_frames"],
                "frames_skipped_by_encoder": r["frames_skipped_by_encoder"],
                "psnr_db_mean": r["psnr_db_mean"],
                "bitrate_received_kbps": r["bitrate_received_kbps"],
                "path": r["candidate_type"],
                "audio_processing_ms_per_frame_p50": r["audio_processing"]["ms_per_frame_p50"],
            }));
        }
        results.insert(
            variant.to_owned(),
            serde_json::json!({
                "clients": clients,
                "server_process_cpu_percent_of_one_core": server_cpu_percent,
            }),
        );
    }
    runtime.block_on(server.stop());
    let _ = std::fs::remove_dir_all(&dir);
    let report = serde_json::json!({
        "benchmark": "callbench",
        "resolution": format!("{}x{}", args.width, args.height),
        "fps": args.fps,
        "seconds": args.seconds,
        "bitrate_kbps": args.bitrate_kbps,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "clients": results,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
