//! `sigbench`: load benchmark for the signaling server. Prints one JSON object.
//!
//! Runs the release `signaling-server` binary as a child process (so its RSS and CPU
//! are its own, read from /proc) and drives it from this process with real WebSocket
//! clients on loopback:
//! 1. memory: N idle connections, joined two by two into rooms -> RSS per connection;
//! 2. throughput: P pairs relay ~200-byte `candidate` messages as fast as the server
//!    takes them -> messages/s and server CPU microseconds per relayed message;
//! 3. latency: P pairs at a fixed total rate -> relay latency p50/p99;
//! 4. cluster (`--cluster`, instead of 1-3): a `redis-server` and two instances with
//!    `--redis`, each pair's members on different instances: memory, throughput and
//!    latency as in 1-3, with the CPU of both instances and of Redis per relayed message, next to the
//!    same phases on one instance in the same run;
//! 5. churn (`--churn-minutes M`, a soak): W workers, each in a loop connecting a pair
//!    into a fresh room, relaying an offer-sized message, then leaving (half politely,
//!    half by dropping the TCP connection) -> server RSS and open fds every 30 s, and
//!    the RSS slope (a leak shows as steady growth). `--only-churn` skips 1-3.
//!
//! `cargo bench -p signaling-server --bench sigbench -- --help` lists the knobs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/common/proc.rs"]
mod proc;

use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Debug, Parser)]
#[command(
    name = "sigbench",
    about = "Signaling server load benchmark (JSON on stdout)"
)]
struct Args {
    /// Idle connections to hold for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Pairs relaying in the throughput and latency phases.
    #[arg(long, default_value_t = 200)]
    pairs: usize,
    /// Seconds of the maximum-throughput phase.
    #[arg(long, default_value_t = 5.0)]
    throughput_seconds: f64,
    /// Total relayed messages per second in the latency phase.
    #[arg(long, default_value_t = 8_000.0)]
    rate: f64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10.0)]
    latency_seconds: f64,
    /// Server binary; default: target/release/signaling-server (built if missing).
    #[arg(long)]
    server: Option<std::path::PathBuf>,
    /// Server runtime threads (its --threads; 0 = one per core).
    #[arg(long, default_value_t = 0)]
    server_threads: usize,
    /// Load generator runtime threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
    /// Minutes of connection churn (0: none).
    #[arg(long, default_value_t = 0.0)]
    churn_minutes: f64,
    /// Concurrent churn workers (each a pair of connections at a time).
    #[arg(long, default_value_t = 8)]
    churn_workers: usize,
    /// Run only the churn phase.
    #[arg(long)]
    only_churn: bool,
    /// Run the cluster comparison (needs `redis-server` on PATH) instead of 1-3.
    #[arg(long)]
    cluster: bool,
    /// Bench's own bench-harness flag (ignored).
    #[arg(long, hide = true)]
    bench: bool,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct ServerProcess {
    child: Child,
    url: String,
}

impl ServerProcess {
    fn start(binary: &std::path::Path, threads: usize, extra: &[&str]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--rate-per-second",
                "0",
                "--max-connections",
                "100000",
                // Every benchmark client is 127.0.0.1.
                "--max-connections-per-ip",
                "100000",
                "--max-tcp-connections-per-ip",
                "100000",
                "--rooms-per-minute-per-address",
                "100000000",
                "--log",
                "warn",
                "--threads",
                &threads.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start signaling-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        ServerProcess {
            child,
            url: format!("ws://127.0.0.1:{port}/ws"),
        }
    }

    /// Resident set size in bytes.
    fn rss(&self) -> u64 {
        proc::rss_bytes(&self.child.id().to_string())
    }

    /// Open file descriptors (sockets, the database, ...).
    fn fds(&self) -> usize {
        proc::open_fds(&self.child.id().to_string())
    }

    /// User + system CPU time in microseconds.
    fn cpu_us(&self) -> f64 {
        cpu_us_of(self.child.id())
    }
}

/// User + system CPU time of process `pid` in microseconds.
fn cpu_us_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = 100.0; // USER_HZ on Linux
    ticks / hz * 1e6
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(url: &str) -> Ws {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .expect("connect");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    ws
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("open").expect("ok") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

async fn join(ws: &mut Ws, room: &str) {
    ws.send(Message::text(
        json!({"type":"join","room":room}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        let m = next_json(ws).await;
        match m["type"].as_str() {
            Some("joined") => return,
            Some("peer_joined") => continue,
            _ => panic!("join failed: {m}"),
        }
    }
}

/// Two connected clients in one room, after the `peer_joined` notice.
async fn pair(url: &str, room: &str) -> (Ws, Ws) {
    pair_across(url, url, room).await
}

/// Two connected clients in one room, the first through `url_a`, the second through
/// `url_b`, after the `peer_joined` notice.
async fn pair_across(url_a: &str, url_b: &str, room: &str) -> (Ws, Ws) {
    let mut a = connect(url_a).await;
    let mut b = connect(url_b).await;
    join(&mut a, room).await;
    join(&mut b, room).await;
    let pj = next_json(&mut a).await;
    assert_eq!(pj["type"], "peer_joined");
    (a, b)
}

/// A ~200-byte candidate message carrying a send timestamp (microseconds since `epoch`).
fn candidate(epoch: Instant, seq: u64) -> String {
    let t = epoch.elapsed().as_micros();
    json!({"type":"candidate","candidate":{
        "candidate": format!("candidate:{seq} 1 udp 2122260223 192.0.2.{} {} typ host generation 0 ufrag Wq2x network-id 1 t={t}", seq % 250, 40_000 + seq % 20_000),
        "sdp_mid":"0","sdp_mline_index":0}})
    .to_string()
}

fn sent_at(m: &Value) -> Option<u128> {
    m["candidate"]["candidate"]
        .as_str()?
        .rsplit_once("t=")?
        .1
        .parse()
        .ok()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Memory phase: `n` connections, joined two by two.
async fn memory(server: &ServerProcess, n: usize) -> Value {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = server.rss();
    let mut held = Vec::with_capacity(n);
    for i in 0..n / 2 {
        let (a, b) = pair(&server.url, &format!("mem-{i}")).await;
        held.push(a);
        held.push(b);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = server.rss();
    let held_count = held.len();
    drop(held);
    let per = (loaded.saturating_sub(base)) as f64 / held_count as f64;
    json!({
        "connections_held": held_count,
        "server_rss_before_bytes": base,
        "server_rss_with_connections_bytes": loaded,
        "server_rss_per_connection_bytes": per.round(),
    })
}

/// Memory phase across a cluster: `n` connections, two by two into rooms, each pair's
/// members on the two instances (so each holds `n / 2`); RSS growth of both instances
/// and of Redis per connection.
async fn memory_across(
    one: &ServerProcess,
    two: &ServerProcess,
    redis_pid: u32,
    n: usize,
) -> Value {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss = || {
        (
            one.rss() + two.rss(),
            proc::rss_bytes(&redis_pid.to_string()),
        )
    };
    let (base, redis_base) = rss();
    let mut held = Vec::with_capacity(n);
    for i in 0..n / 2 {
        let (a, b) = pair_across(&one.url, &two.url, &format!("mem-{i}")).await;
        held.push(a);
        held.push(b);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (loaded, redis_loaded) = rss();
    let held_count = held.len();
    drop(held);
    let per =
        |before: u64, after: u64| (after.saturating_sub(before) as f64 / held_count as f64).round();
    json!({
        "connections_held": held_count,
        "per_instance": held_count / 2,
        "servers_rss_before_bytes": base,
        "servers_rss_with_connections_bytes": loaded,
        "server_rss_per_connection_bytes": per(base, loaded),
        "redis_rss_per_connection_bytes": per(redis_base, redis_loaded),
    })
}

/// One direction of a pair: sends `count` messages (or until `stop`) keeping at most
/// `window` in flight; the receiver returns the permits.
async fn relay_phase(
    server: &ServerProcess,
    pairs: usize,
    seconds: f64,
    per_pair_direction_rate: Option<f64>,
) -> Value {
    relay_across(&[server], None, pairs, seconds, per_pair_direction_rate).await
}

/// [`relay_phase`] with each pair's first member on `servers[0]` and second on the last
/// of `servers`; CPU is the sum over `servers`, and Redis's (pid `redis`) apart.
async fn relay_across(
    servers: &[&ServerProcess],
    redis: Option<u32>,
    pairs: usize,
    seconds: f64,
    per_pair_direction_rate: Option<f64>,
) -> Value {
    let epoch = Instant::now();
    let (first, last) = (servers[0], servers[servers.len() - 1]);
    let mut conns = Vec::new();
    for i in 0..pairs {
        conns.push(
            pair_across(
                &first.url,
                &last.url,
                &format!("relay-{i}-{}", epoch.elapsed().as_nanos()),
            )
            .await,
        );
    }
    let relayed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let servers_cpu = || servers.iter().map(|s| s.cpu_us()).sum::<f64>();
    let redis_cpu = || redis.map_or(0.0, cpu_us_of);
    let cpu_before = servers_cpu();
    let redis_before = redis_cpu();
    let started = Instant::now();
    let stop_at = started + Duration::from_secs_f64(seconds);
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    let senders_total = pairs * 2;
    for (pair_index, (a, b)) in conns.into_iter().enumerate() {
        let (a_tx, a_rx) = a.split();
        let (b_tx, b_rx) = b.split();
        for (direction, (mut tx, mut rx)) in [(a_tx, b_rx), (b_tx, a_rx)].into_iter().enumerate() {
            // Spread the senders' phases over one period, so a fixed rate is an even
            // stream rather than every sender firing in the same millisecond.
            let phase = (pair_index * 2 + direction) as f64 / senders_total as f64;
            let window = Arc::new(Semaphore::new(64));
            let w = window.clone();
            let relayed = relayed.clone();
            let latencies = latencies.clone();
            receivers.push(tokio::spawn(async move {
                let mut local = Vec::new();
                while let Some(Ok(msg)) = rx.next().await {
                    if let Message::Text(t) = msg {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if v["type"] == "candidate" {
                            if let Some(t0) = sent_at(&v) {
                                local.push((epoch.elapsed().as_micros() - t0) as u64);
                            }
                            relayed.fetch_add(1, Ordering::Relaxed);
                            w.add_permits(1);
                        } else if v["type"] == "offer" {
                            break; // end marker
                        }
                    }
                }
                latencies.lock().unwrap().extend(local);
            }));
            senders.push(tokio::spawn(async move {
                let mut seq = 0u64;
                let period = per_pair_direction_rate.map(|r| Duration::from_secs_f64(1.0 / r));
                let mut next = started + period.unwrap_or_default().mul_f64(phase);
                while Instant::now() < stop_at {
                    if let Some(period) = period {
                        tokio::time::sleep_until(next.into()).await;
                        next += period;
                    }
                    window.acquire().await.unwrap().forget();
                    tx.send(Message::text(candidate(epoch, seq))).await.unwrap();
                    seq += 1;
                }
                let _ = window.acquire_many(64).await; // all delivered
                let end = json!({"type":"offer","sdp":"end"}).to_string();
                tx.send(Message::text(end)).await.unwrap();
                tx
            }));
        }
    }
    // The write halves stay open until every receiver has seen its end marker.
    let mut open = Vec::new();
    for t in senders {
        open.push(t.await.unwrap());
    }
    for t in receivers {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = servers_cpu() - cpu_before;
    let redis_used = redis_cpu() - redis_before;
    let n = relayed.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort_unstable();
    let redis = redis.map(|_| {
        json!({
            "redis_cpu_us_per_message": ((redis_used / n.max(1) as f64) * 100.0).round() / 100.0,
            "redis_cpu_cores": ((redis_used / 1e6 / elapsed) * 100.0).round() / 100.0,
        })
    });
    json!({
        "instances": servers.len(),
        "redis": redis,
        "pairs": pairs,
        "seconds": (elapsed * 100.0).round() / 100.0,
        "messages_relayed": n,
        "messages_per_s": (n as f64 / elapsed).round(),
        "server_cpu_us_per_message": ((cpu / n.max(1) as f64) * 100.0).round() / 100.0,
        "server_cpu_cores": ((cpu / 1e6 / elapsed) * 100.0).round() / 100.0,
        "latency_us": {"p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99),
                        "max": lat.last().copied().unwrap_or(0)},
    })
}

const CHURN_FLAGS: &[&str] = &["--room-ttl", "5s", "--resume-grace", "2s"];

/// Churn phase: see the module docs.
async fn churn(server: &ServerProcess, minutes: f64, workers: usize) -> Value {
    let cycles = Arc::new(AtomicU64::new(0));
    let stalls = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let offer = "v=0 ".repeat(1500); // ~6 kB, an SDP offer's size
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (url, cycles, stop, offer) = (
            server.url.clone(),
            cycles.clone(),
            stop.clone(),
            offer.clone(),
        );
        let stalls = stalls.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let room = format!("churn-{w}-{i}");
                let cycle = async {
                    let (mut a, mut b) = pair(&url, &room).await;
                    a.send(Message::text(
                        json!({"type":"offer","sdp":offer}).to_string(),
                    ))
                    .await
                    .unwrap();
                    let m = next_json(&mut b).await;
                    assert_eq!(m["type"], "offer");
                    if i.is_multiple_of(2) {
                        a.send(Message::text(json!({"type":"leave"}).to_string()))
                            .await
                            .unwrap();
                        a.close(None).await.ok();
                        b.close(None).await.ok();
                    }
                    // Odd rounds: both connections just dropped (TCP closed, no handshake).
                };
                // A cycle that hangs (a connection the listen queue dropped, say) is
                // counted and abandoned, not waited for.
                if tokio::time::timeout(Duration::from_secs(10), cycle)
                    .await
                    .is_err()
                {
                    stalls.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                cycles.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    let total = Duration::from_secs_f64(minutes * 60.0);
    let mut samples = Vec::new();
    loop {
        samples.push(json!({
            "t_s": started.elapsed().as_secs(),
            "cycles": cycles.load(Ordering::Relaxed),
            "stalled_cycles": stalls.load(Ordering::Relaxed),
            "server_rss_bytes": server.rss(),
            "server_fds": server.fds(),
        }));
        if started.elapsed() >= total {
            break;
        }
        tokio::time::sleep(Duration::from_secs(30).min(total.saturating_sub(started.elapsed())))
            .await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.ok();
    }
    // Everything closed: what is left is what the server keeps.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // RSS growth per minute after the first minute (warm-up: buffers, the allocator).
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s["t_s"].as_u64().unwrap_or(0) >= 60)
        .map(|s| {
            (
                s["t_s"].as_f64().unwrap_or(0.0) / 60.0,
                s["server_rss_bytes"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    json!({
        "minutes": minutes,
        "workers": workers,
        "cycles": cycles.load(Ordering::Relaxed),
        "stalled_cycles": stalls.load(Ordering::Relaxed),
        "samples": samples,
        "rss_slope_bytes_per_minute": proc::slope(&points).round(),
        "server_rss_after_bytes": server.rss(),
        "server_fds_after": server.fds(),
    })
}

fn server_binary(args: &Args) -> std::path::PathBuf {
    if let Some(p) = &args.server {
        return p.clone();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "signaling-server",
            "--bin",
            "signaling-server",
        ])
        .current_dir(&root)
        .status()
        .expect("cargo build");
    assert!(status.success());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release/signaling-server")
}

fn main() {
    let args = Args::parse();
    let binary = server_binary(&args);
    let runtime = match args.client_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        0 => tokio::runtime::Runtime::new().unwrap(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()
            .unwrap(),
    };
    let report = runtime.block_on(async {
        if args.only_churn {
            // Empty rooms kept 5 s instead of 10 min, and the seats of dropped members 2 s
            // instead of 30 s: otherwise the churn's hundred thousand fresh rooms a minute
            // fill --max-rooms and measure retention, not leaks.
            let server = ServerProcess::start(&binary, args.server_threads, CHURN_FLAGS);
            return json!({
                "benchmark": "sigbench",
                "churn": churn(&server, args.churn_minutes, args.churn_workers).await,
            });
        }
        if args.cluster {
            return cluster(&binary, &args).await;
        }
        let server = ServerProcess::start(&binary, args.server_threads, &[]);
        let memory = memory(&server, args.connections).await;
        drop(server);
        let server = ServerProcess::start(&binary, args.server_threads, &[]);
        let throughput = relay_phase(&server, args.pairs, args.throughput_seconds, None).await;
        let per_direction = args.rate / (args.pairs as f64 * 2.0);
        let fixed = relay_phase(
            &server,
            args.pairs,
            args.latency_seconds,
            Some(per_direction),
        )
        .await;
        json!({
            "benchmark": "sigbench",
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "server_threads": args.server_threads,
            "client_threads": args.client_threads,
            "memory": memory,
            "max_throughput": throughput,
            "fixed_rate": {"target_messages_per_s": args.rate, "result": fixed},
            "churn": if args.churn_minutes > 0.0 {
                drop(server);
                let server = ServerProcess::start(&binary, args.server_threads, CHURN_FLAGS);
                churn(&server, args.churn_minutes, args.churn_workers).await
            } else {
                Value::Null
            },
        })
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

/// A `redis-server` for the cluster phase: free loopback port, no persistence.
struct RedisProcess {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl RedisProcess {
    fn start() -> RedisProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisProcess {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
            _dir: dir,
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the instance at `ws_url` answers `/healthz` with 200 (cluster: subscribed).
fn wait_ready(ws_url: &str) {
    use std::io::{Read as _, Write as _};
    let addr = ws_url.trim_start_matches("ws://").trim_end_matches("/ws");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut answer = String::new();
        if let Ok(mut tcp) = std::net::TcpStream::connect(addr) {
            let _ = write!(
                tcp,
                "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            let _ = tcp.read_to_string(&mut answer);
        }
        if answer.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(Instant::now() < deadline, "{ws_url} not ready: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cluster phase (see the module docs).
async fn cluster(binary: &std::path::Path, args: &Args) -> Value {
    let per_direction = args.rate / (args.pairs as f64 * 2.0);
    let single = {
        let server = ServerProcess::start(binary, args.server_threads, &[]);
        let memory = memory(&server, args.connections).await;
        drop(server);
        let server = ServerProcess::start(binary, args.server_threads, &[]);
        let throughput = relay_phase(&server, args.pairs, args.throughput_seconds, None).await;
        let fixed = relay_phase(
            &server,
            args.pairs,
            args.latency_seconds,
            Some(per_direction),
        )
        .await;
        json!({"memory": memory, "max_throughput": throughput, "fixed_rate": fixed})
    };
    let redis = RedisProcess::start();
    let flags = ["--redis", redis.url.as_str()];
    let one = ServerProcess::start(binary, args.server_threads, &flags);
    let two = ServerProcess::start(binary, args.server_threads, &flags);
    wait_ready(&one.url);
    wait_ready(&two.url);
    let memory = memory_across(&one, &two, redis.child.id(), args.connections).await;
    // Fresh instances (and an empty Redis) for the relay phases.
    drop((one, two, redis));
    let redis = RedisProcess::start();
    let flags = ["--redis", redis.url.as_str()];
    let one = ServerProcess::start(binary, args.server_threads, &flags);
    let two = ServerProcess::start(binary, args.server_threads, &flags);
    wait_ready(&one.url);
    wait_ready(&two.url);
    let servers = [&one, &two];
    let redis_pid = Some(redis.child.id());
    let throughput = relay_across(
        &servers,
        redis_pid,
        args.pairs,
        args.throughput_seconds,
        None,
    )
    .await;
    let fixed = relay_across(
        &servers,
        redis_pid,
        args.pairs,
        args.latency_seconds,
        Some(per_direction),
    )
    .await;
    json!({
        "benchmark": "sigbench --cluster",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "server_threads": args.server_threads,
        "client_threads": args.client_threads,
        "target_messages_per_s": args.rate,
        "single_instance": single,
        "two_instances_redis": {"memory": memory, "max_throughput": throughput, "fixed_rate": fixed},
    })
}
