//! `soak`: many calls, one after another, in one process: what a long-running Duet (the
//! window app, through a day of calls) keeps of each. Two headless sessions call each
//! other through an in-process signaling server, with real peer connections on
//! loopback, real H.264 and Opus, for a few seconds, then hang up; after every 10 calls
//! the process's RSS, open file descriptors, threads and tokio tasks are sampled.
//! Prints JSON: the samples and the growth per call after the first 10 (a leak, such as
//! webrtc-rs's `close()` one, upstream #906, would show as steady growth).
//!
//! `cargo bench -p duet --bench soak -- [--calls 100] [--seconds 2]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

#[path = "../signaling-server/tests/common/proc.rs"]
mod proc;

use clap::Parser;
use duet::call::{self, CallState, SessionConfig};
use serde_json::{Value, json};
use signaling_server::{Config, Server};

#[derive(Debug, Parser)]
struct Args {
    /// Calls to make, one after another.
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Seconds of media in each call.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    #[arg(long, hide = true)]
    bench: bool,
}

async fn one_call(server: &Server, room: &str, media: Duration) -> (u64, u64) {
    let a = call::start(SessionConfig::synthetic(&server.ws_url(), room));
    a.wait_for(Duration::from_secs(10), |st| {
        matches!(st, CallState::WaitingForPeer { .. })
    })
    .await;
    let b = call::start(SessionConfig::synthetic(&server.ws_url(), room));
    for side in [&a, &b] {
        side.wait_for(Duration::from_secs(15), |st| {
            matches!(st, CallState::InCall { .. })
        })
        .await;
    }
    tokio::time::sleep(media).await;
    a.hang_up();
    b.hang_up();
    let (ra, rb) = (a.finished().await, b.finished().await);
    (ra.frames_decoded, rb.frames_decoded)
}

fn sample(calls: usize, started: Instant) -> Value {
    json!({
        "calls": calls,
        "t_s": started.elapsed().as_secs(),
        "rss_bytes": proc::rss_bytes("self"),
        "fds": proc::open_fds("self"),
        "threads": proc::threads("self"),
        "tokio_tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
    })
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async {
        let server = Server::start(Config::ephemeral()).await.unwrap();
        let started = Instant::now();
        let media = Duration::from_secs_f64(args.seconds);
        let mut samples = vec![sample(0, started)];
        let mut silent = 0;
        for i in 0..args.calls {
            let (a, b) = one_call(&server, &format!("soak-{i}"), media).await;
            if a == 0 || b == 0 {
                silent += 1;
                eprintln!("call {i}: frames decoded {a} / {b}");
            }
            if (i + 1) % 10 == 0 {
                // Resources are released asynchronously after a hang-up.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let s = sample(i + 1, started);
                eprintln!("{s}");
                samples.push(s);
            }
        }
        server.stop().await;
        let after_warmup: Vec<&Value> = samples
            .iter()
            .filter(|s| s["calls"].as_u64().unwrap_or(0) >= 10)
            .collect();
        let per_call = |key: &str| {
            let points: Vec<(f64, f64)> = after_warmup
                .iter()
                .map(|s| (s["calls"].as_f64().unwrap(), s[key].as_f64().unwrap()))
                .collect();
            (proc::slope(&points) * 100.0).round() / 100.0
        };
        json!({
            "benchmark": "soak",
            "calls": args.calls,
            "seconds_per_call": args.seconds,
            "calls_without_video": silent,
            "wall_s": started.elapsed().as_secs(),
            "samples": samples,
            "growth_per_call_after_10": {
                "rss_bytes": per_call("rss_bytes"),
                "fds": per_call("fds"),
                "threads": per_call("threads"),
                "tokio_tasks": per_call("tokio_tasks"),
            },
        })
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
