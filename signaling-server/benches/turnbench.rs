//! `turnbench`: relay cost of the embedded TURN server. Prints one JSON object.
//!
//! Runs the release `signaling-server` binary with `--turn-listen` as a child process (so
//! its CPU time is its own, read from /proc) and drives it from this process on loopback.
//! Each pair is a TURN client (raw STUN: Allocate + ChannelBind with credentials from
//! `/api/ice-servers`, then ChannelData, as browsers and webrtc-rs send media) and a plain
//! UDP peer that echoes. A round trip is two forwarded packets: client -> relay -> peer
//! and peer -> relay -> client.
//! 1. max: every pair keeps `--window` packets in flight for `--seconds` -> packets/s and
//!    server CPU microseconds per forwarded packet;
//! 2. fixed rate: `--rate` round trips/s in total, evenly spread -> CPU per packet at a
//!    call-like load, and round-trip latency through the relay (two relay hops).
//!
//! With `--coturn` the same load runs against coturn's `turnserver` (Debian package
//! `coturn`) configured alike, for comparison. With `--tcp` the clients talk TURN over
//! TCP (RFC 6062 framing) to `--turn-listen-tcp` (coturn: its TCP listener); the peers
//! stay UDP.
//!
//! `cargo bench -p signaling-server --bench turnbench -- --help` lists the knobs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter as _, METHOD_ALLOCATE, METHOD_CHANNEL_BIND,
    Message, MessageType, Method, Setter,
};
use stun::textattrs::{Nonce, Realm, Username};
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use turn::proto::PROTO_UDP;
use turn::proto::channum::ChannelNumber;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;

#[derive(Debug, Parser)]
#[command(
    name = "turnbench",
    about = "Embedded TURN relay benchmark (JSON on stdout)"
)]
struct Args {
    /// Client/peer pairs (allocations).
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Payload bytes per packet (1200 is a typical video packet).
    #[arg(long, default_value_t = 1200)]
    size: usize,
    /// Packets each pair keeps in flight in the max phase.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Round trips per second in total in the fixed-rate phase (two forwarded packets
    /// each); 2,000 is about three relayed 2.5 Mbit/s video calls' worth of packets.
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// Server binary; default: target/release/signaling-server (built if missing).
    #[arg(long)]
    server: Option<std::path::PathBuf>,
    /// Server runtime threads (its --threads; 0 = one per core).
    #[arg(long, default_value_t = 0)]
    server_threads: usize,
    /// Measure coturn's `turnserver` (same secret, realm, loopback peers allowed) instead.
    #[arg(long)]
    coturn: bool,
    /// Clients reach the server over TCP (`--turn-listen-tcp`; coturn's TCP listener).
    #[arg(long)]
    tcp: bool,
    /// Bench's own bench-harness flag (ignored).
    #[arg(long, hide = true)]
    bench: bool,
}

struct ServerProcess {
    child: Child,
    /// The signaling server's HTTP address; None for coturn.
    http: Option<SocketAddr>,
    turn: SocketAddr,
    /// Clients use TCP.
    tcp: bool,
}

const SECRET: &str = "bench-secret";

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ServerProcess {
    fn start(binary: &std::path::Path, threads: usize, tcp: bool) -> ServerProcess {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let turn: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = Command::new(binary);
        if tcp {
            // The same port number over TCP (free for TCP too, almost always).
            command.args(["--turn-listen-tcp", &turn.to_string()]);
        }
        let child = command
            .args(["--listen", &http.to_string()])
            .args(["--turn-listen", &turn.to_string(), "--turn-secret", SECRET])
            .args(["--turn-allow-peer", "127.0.0.0/8"])
            .args(["--turn-user-quota", "0", "--turn-total-quota", "0"])
            .args(["--log", "warn", "--threads", &threads.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start signaling-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(http).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        ServerProcess {
            child,
            http: Some(http),
            turn,
            tcp,
        }
    }

    fn start_coturn(threads: usize, tcp: bool) -> ServerProcess {
        let turn: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = Command::new("turnserver");
        command
            .args([
                "-n",
                "--listening-ip",
                "127.0.0.1",
                "--relay-ip",
                "127.0.0.1",
            ])
            .args(["--listening-port", &turn.port().to_string()])
            .args([
                "--use-auth-secret",
                "--static-auth-secret",
                SECRET,
                "--realm",
                "duet",
            ])
            .args(["--allow-loopback-peers", "--allowed-peer-ip", "127.0.0.1"])
            .args(["--no-tls", "--no-dtls", "--no-cli", "--no-stdout-log"])
            .args(if tcp { &[][..] } else { &["--no-tcp"][..] })
            .args(["--log-file", "/dev/null", "--simple-log"])
            .args(["--min-port", "49152", "--max-port", "65535"]);
        if threads > 0 {
            command.args(["--relay-threads", &threads.to_string()]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start turnserver (Debian package coturn)");
        std::thread::sleep(Duration::from_millis(500));
        ServerProcess {
            child,
            http: None,
            turn,
            tcp,
        }
    }

    /// User + system CPU time in microseconds.
    fn cpu_us(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0 * 1e6 // USER_HZ is 100 on Linux
    }

    /// (TURN server address, username, password) from `/api/ice-servers` (minted here
    /// the same way for coturn).
    fn turn_credentials(&self) -> (SocketAddr, String, String) {
        use std::io::{Read as _, Write as _};
        let Some(http) = self.http else {
            let user = signaling_server::turn::username(
                "bench",
                std::time::SystemTime::now(),
                Duration::from_secs(3600),
            );
            let pass = signaling_server::turn::credential(SECRET.as_bytes(), &user);
            return (self.turn, user, pass);
        };
        let mut tcp = std::net::TcpStream::connect(http).unwrap();
        write!(
            tcp,
            "GET /api/ice-servers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).unwrap();
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        let v: Value = serde_json::from_str(body).unwrap();
        let turn = &v["ice_servers"][1];
        let url = turn["urls"][usize::from(self.tcp)].as_str().unwrap();
        let addr = url
            .strip_prefix("turn:")
            .and_then(|u| u.split('?').next())
            .unwrap();
        (
            addr.parse().unwrap(),
            turn["username"].as_str().unwrap().into(),
            turn["credential"].as_str().unwrap().into(),
        )
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TURN client's connection: a connected UDP socket, or a TCP stream with RFC 6062
/// framing (its reads cancel-safe: a partial message stays in the buffer).
enum Conn {
    Udp(UdpSocket),
    Tcp {
        reader: tokio::sync::Mutex<(tokio::net::tcp::OwnedReadHalf, bytes::BytesMut)>,
        writer: tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    },
}

impl Conn {
    async fn send(&self, message: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        match self {
            Conn::Udp(socket) => socket.send(message).await.map(|_| ()),
            Conn::Tcp { writer, .. } => {
                let mut framed = Vec::with_capacity(message.len() + 3);
                signaling_server::turn_server::framing::encode(message, &mut framed)
                    .expect("a TURN message");
                writer.lock().await.write_all(&framed).await
            }
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        use bytes::Buf as _;
        use signaling_server::turn_server::framing::next_frame;
        use tokio::io::AsyncReadExt as _;
        match self {
            Conn::Udp(socket) => socket.recv(buf).await,
            Conn::Tcp { reader, .. } => {
                let mut guard = reader.lock().await;
                let (stream, pending) = &mut *guard;
                loop {
                    if let Some(f) = next_frame(pending, 65_536).expect("TURN framing") {
                        buf[..f.len].copy_from_slice(&pending[..f.len]);
                        pending.advance(f.consumed);
                        return Ok(f.len);
                    }
                    pending.reserve(4096);
                    if stream.read_buf(pending).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
    }
}

/// A TURN client with one allocation and channel 0x4000 bound to its peer.
struct Pair {
    client: Conn,
    peer: UdpSocket,
}

async fn request(socket: &Conn, setters: &[Box<dyn Setter>]) -> Message {
    let mut m = Message::new();
    m.build(setters).unwrap();
    socket.send(&m.raw).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf))
        .await
        .expect("TURN response")
        .unwrap();
    let mut r = Message::new();
    r.raw = buf[..n].to_vec();
    r.decode().unwrap();
    r
}

struct PeerAttr(SocketAddr);

impl Setter for PeerAttr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        XorMappedAddress {
            ip: self.0.ip(),
            port: self.0.port(),
        }
        .add_to_as(m, ATTR_XOR_PEER_ADDRESS)
    }
}

impl Pair {
    async fn open(server: SocketAddr, user: &str, pass: &str, tcp: bool) -> Pair {
        let client = if tcp {
            let stream = tokio::net::TcpStream::connect(server).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (reader, writer) = stream.into_split();
            Conn::Tcp {
                reader: tokio::sync::Mutex::new((reader, bytes::BytesMut::new())),
                writer: tokio::sync::Mutex::new(writer),
            }
        } else {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            socket.connect(server).await.unwrap();
            Conn::Udp(socket)
        };
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let transport = || -> Box<dyn Setter> {
            Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            })
        };
        let challenge = request(
            &client,
            &[
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
                transport(),
            ],
        )
        .await;
        let realm = Realm::get_from_as(&challenge, ATTR_REALM).unwrap();
        let nonce = Nonce::get_from_as(&challenge, ATTR_NONCE).unwrap();
        let key =
            MessageIntegrity::new_long_term_integrity(user.into(), realm.text.clone(), pass.into());
        let authed = |method: Method, attr: Box<dyn Setter>| -> Vec<Box<dyn Setter>> {
            let mut v: Vec<Box<dyn Setter>> = vec![
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(method, CLASS_REQUEST)),
            ];
            v.push(attr);
            v.push(Box::new(Username::new(ATTR_USERNAME, user.into())));
            v.push(Box::new(realm.clone()));
            v.push(Box::new(nonce.clone()));
            v.push(Box::new(key.clone()));
            v.push(Box::new(FINGERPRINT));
            v
        };
        let allocated = request(&client, &authed(METHOD_ALLOCATE, transport())).await;
        assert_eq!(allocated.typ.class, CLASS_SUCCESS_RESPONSE, "{allocated}");
        let mut relayed = RelayedAddress::default();
        relayed.get_from(&allocated).unwrap();
        let peer_addr = peer.local_addr().unwrap();
        let mut bind = authed(METHOD_CHANNEL_BIND, Box::new(ChannelNumber(0x4000)));
        bind.insert(3, Box::new(PeerAttr(peer_addr)));
        let bound = request(&client, &bind).await;
        assert_eq!(bound.typ.class, CLASS_SUCCESS_RESPONSE, "{bound}");
        Pair { client, peer }
    }
}

/// ChannelData on channel 0x4000 carrying `size` bytes with a send timestamp first.
fn channel_data(size: usize, start: Instant) -> Vec<u8> {
    let mut p = vec![0u8; 4 + size];
    p[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
    p[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    let t = start.elapsed().as_nanos() as u64;
    p[4..12].copy_from_slice(&t.to_be_bytes());
    p
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// One phase; `rate` is round trips/s per pair (None: keep `window` in flight).
async fn phase(
    server: &ServerProcess,
    pairs: &[Arc<Pair>],
    args: &Args,
    rate: Option<f64>,
) -> Value {
    let counters = Arc::new(Counters::default());
    let running = Arc::new(AtomicBool::new(true));
    let start = Instant::now();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let cpu_before = server.cpu_us();
    let mut tasks = Vec::new();
    let count = pairs.len();
    for (i, pair) in pairs.iter().enumerate() {
        // The peer echoes whatever the relay brings back to the relay.
        let p = Arc::clone(pair);
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = p.peer.recv_from(&mut buf).await {
                let _ = p.peer.send_to(&buf[..n], from).await;
            }
        }));
        // The client sends and counts what comes back.
        let (p, c, run, lat) = (
            Arc::clone(pair),
            Arc::clone(&counters),
            Arc::clone(&running),
            Arc::clone(&latencies),
        );
        let (size, window) = (args.size, args.window);
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            match rate {
                None => {
                    for _ in 0..window {
                        p.client.send(&channel_data(size, start)).await.unwrap();
                        c.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    loop {
                        let got = tokio::time::timeout(
                            Duration::from_millis(200),
                            p.client.recv(&mut buf),
                        )
                        .await;
                        if let Ok(Ok(_)) = got {
                            c.received.fetch_add(1, Ordering::Relaxed);
                        }
                        if !run.load(Ordering::Relaxed) {
                            break;
                        }
                        // One out per one back (or per timeout, to refill after a loss).
                        p.client.send(&channel_data(size, start)).await.unwrap();
                        c.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(per_pair) => {
                    let period = Duration::from_secs_f64(1.0 / per_pair);
                    // Senders' phases spread evenly over the period (no bursts).
                    let offset = period.mul_f64(i as f64 / count as f64);
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    let mut mine = Vec::new();
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {
                                if !run.load(Ordering::Relaxed) { break; }
                                p.client.send(&channel_data(size, start)).await.unwrap();
                                c.sent.fetch_add(1, Ordering::Relaxed);
                            }
                            got = p.client.recv(&mut buf) => {
                                let n = got.unwrap();
                                if n >= 12 {
                                    let sent = u64::from_be_bytes(buf[4..12].try_into().unwrap());
                                    mine.push(start.elapsed().as_nanos() as u64 - sent);
                                }
                                c.received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    lat.lock().unwrap().extend(mine);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    running.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = server.cpu_us() - cpu_before;
    tokio::time::sleep(Duration::from_millis(300)).await; // stragglers
    for t in &tasks {
        t.abort();
    }
    let sent = counters.sent.load(Ordering::Relaxed);
    let received = counters.received.load(Ordering::Relaxed);
    // Each received echo passed the relay twice; a lost one at least once.
    let forwarded = received * 2;
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * q) as usize).min(lat.len() - 1);
        (lat[i] as f64 / 1e3).round() / 1e3
    };
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    json!({
        "round_trips_sent": sent,
        "round_trips_received": received,
        "lost_percent": round2(100.0 * (sent.saturating_sub(received)) as f64 / sent.max(1) as f64),
        "forwarded_packets_per_s": (forwarded as f64 / elapsed).round(),
        "forwarded_mbit_per_s": round2(forwarded as f64 * args.size as f64 * 8.0 / elapsed / 1e6),
        "server_cpu_us_per_forwarded_packet": round2(cpu / forwarded.max(1) as f64),
        "server_cpu_cores": round2(cpu / 1e6 / elapsed),
        // Measured in the fixed-rate phase only (max-phase latency is queueing).
        "round_trip_ms_p50": if lat.is_empty() { Value::Null } else { json!(pct(0.5)) },
        "round_trip_ms_p99": if lat.is_empty() { Value::Null } else { json!(pct(0.99)) },
    })
}

fn server_binary(args: &Args) -> std::path::PathBuf {
    if let Some(p) = &args.server {
        return p.clone();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "-p", "signaling-server"])
        .args(["--bin", "signaling-server"])
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
    let binary = (!args.coturn).then(|| server_binary(&args));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime.block_on(async {
        let server = match &binary {
            Some(binary) => ServerProcess::start(binary, args.server_threads, args.tcp),
            None => ServerProcess::start_coturn(args.server_threads, args.tcp),
        };
        let (addr, user, pass) = server.turn_credentials();
        // Fresh allocations per phase, so no straggler of one phase counts in the next.
        let mut pairs = Vec::new();
        for _ in 0..args.pairs {
            pairs.push(Arc::new(Pair::open(addr, &user, &pass, args.tcp).await));
        }
        let max = phase(&server, &pairs, &args, None).await;
        let mut pairs = Vec::new();
        for _ in 0..args.pairs {
            pairs.push(Arc::new(Pair::open(addr, &user, &pass, args.tcp).await));
        }
        let fixed = phase(&server, &pairs, &args, Some(args.rate / args.pairs as f64)).await;
        json!({
            "benchmark": "turnbench",
            "server": if args.coturn { "coturn turnserver" } else { "signaling-server --turn-listen" },
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "server_threads": args.server_threads,
            "client_transport": if args.tcp { "tcp" } else { "udp" },
            "pairs": args.pairs,
            "payload_bytes": args.size,
            "max": max,
            "fixed_rate": {"target_round_trips_per_s": args.rate, "result": fixed},
        })
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
