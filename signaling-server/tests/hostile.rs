//! Black-box probes of a server under hostile or careless clients, over real sockets on
//! loopback: slow bodies, slowloris headers, idle kept-alive connections, clients that
//! never read, shutdown with such connections open (the library and the real binary),
//! and the API's open doors (listing without a key, creating in bulk).
//!
//! Deadlines are shortened through `Config` so the tests are quick; every wait has a
//! generous upper bound and none relies on a sleep for synchronization.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, HttpResponse, request, start_server};
use signaling_server::Server;
use signaling_server::config::Secret;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";
/// The shortened deadline under test.
const DEADLINE: Duration = Duration::from_millis(1500);
/// Slack on top of a deadline before a test calls it missed (loaded CI machines).
const MARGIN: Duration = Duration::from_secs(5);
/// A close earlier than this is not the deadline at work (half, for scheduling delays
/// between the server arming a timer and the test reading the clock).
const NOT_BEFORE: Duration = Duration::from_millis(750);
/// How quickly a normal client must be served while hostile ones hold connections.
const SERVED_WITHIN: Duration = Duration::from_secs(1);

/// Asserts that a normal client is served promptly.
async fn assert_serves_normal_clients(s: &Server) {
    let r = tokio::time::timeout(SERVED_WITHIN, request(s, "GET", "/healthz", &[], b""))
        .await
        .expect("a normal client was not served within 1 s");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
}

/// Reads until the server closes the connection (EOF or reset); returns what came.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server did not close the connection in time");
    got
}

/// POST headers announcing a 16,000-byte body, then waits for `100 Continue`, which hyper
/// sends only once the handler reads the body: from then on the request is stalled inside
/// the server, not in some queue.
async fn stalled_post(s: &Server) -> TcpStream {
    let mut tcp = TcpStream::connect(s.local_addr()).await.unwrap();
    let head = format!(
        "POST /api/rooms HTTP/1.1\r\nHost: {}\r\nContent-Length: 16000\r\n\
         Expect: 100-continue\r\n\r\n",
        s.local_addr()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(MARGIN, async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 256];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before 100 Continue");
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no 100 Continue");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 100"), "{text}");
    tcp
}

fn parse_response(bytes: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(bytes).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

#[tokio::test]
async fn a_body_that_never_comes_gets_408_and_others_are_served_meanwhile() {
    let s = start_server(|c| c.http_body_timeout = DEADLINE).await;
    // Headers only, and headers plus part of the body.
    let mut silent = stalled_post(&s).await;
    let started = Instant::now();
    let mut partial = stalled_post(&s).await;
    partial.write_all(&[b' '; 100]).await.unwrap();
    assert_serves_normal_clients(&s).await;

    for tcp in [&mut silent, &mut partial] {
        let got = read_until_closed(tcp, DEADLINE + MARGIN).await;
        let r = parse_response(&got);
        r.assert_error(408, "request_timeout");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= NOT_BEFORE,
        "answered before the deadline: {waited:?}"
    );
    assert_serves_normal_clients(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn slowloris_headers_are_cut_off_at_the_header_deadline() {
    let s = start_server(|c| c.http_header_timeout = DEADLINE).await;
    let started = Instant::now();
    // A partial request line, then nothing.
    let mut stalled = TcpStream::connect(s.local_addr()).await.unwrap();
    stalled.write_all(b"GET /healthz HT").await.unwrap();
    // Headers trickled a byte at a time: the deadline is for all of them, not per byte.
    let mut trickled = TcpStream::connect(s.local_addr()).await.unwrap();
    trickled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = trickled.into_split();
    let trickle = tokio::spawn(async move {
        loop {
            if writer.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A connection that sends nothing at all.
    let mut mute = TcpStream::connect(s.local_addr()).await.unwrap();
    assert_serves_normal_clients(&s).await;

    let got = read_until_closed(&mut stalled, DEADLINE + MARGIN).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    read_until_closed(&mut mute, DEADLINE + MARGIN).await;
    tokio::time::timeout(DEADLINE + MARGIN, async {
        let mut chunk = [0u8; 256];
        while let Ok(n) = reader.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("the trickling connection was not closed");
    let waited = started.elapsed();
    assert!(
        waited >= NOT_BEFORE,
        "closed before the deadline: {waited:?}"
    );
    tokio::time::timeout(MARGIN, trickle)
        .await
        .expect("the trickle kept writing")
        .unwrap();
    assert_serves_normal_clients(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let s = start_server(|c| c.http_header_timeout = DEADLINE).await;
    let mut tcp = TcpStream::connect(s.local_addr()).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"ok") {
        let mut chunk = [0u8; 256];
        let n = tokio::time::timeout(MARGIN, tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&chunk[..n]);
    }
    let answered = Instant::now();
    assert!(
        read_until_closed(&mut tcp, DEADLINE + MARGIN)
            .await
            .is_empty()
    );
    assert!(answered.elapsed() >= NOT_BEFORE);
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_dropped() {
    let s = start_server(|c| {
        c.http_idle_timeout = DEADLINE;
        c.api_rate_per_second = 0.0;
    })
    .await;
    // Small buffers, so the server's writes stall after a few answers.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(s.local_addr()).await.unwrap();
    let one = b"GET /api/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
    // Pipelined requests until writing fails: once the server stops reading (its answers
    // are stuck), our writes block; once it drops the connection, they fail.
    let started = Instant::now();
    tokio::time::timeout(DEADLINE + MARGIN + MARGIN, async {
        while tcp.write_all(&batch).await.is_ok() {}
    })
    .await
    .expect("the server kept a connection that does not read");
    assert!(started.elapsed() >= NOT_BEFORE);
    assert_serves_normal_clients(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_websocket_that_never_reads_is_dropped_once_its_queue_holds_a_megabyte() {
    // Long write and ping deadlines: only the queue's byte bound can drop it in time.
    let s = start_server(|c| {
        c.ping_timeout = Duration::from_secs(120);
        c.ping_interval = Duration::from_secs(60);
        c.resume_grace = Duration::ZERO;
    })
    .await;
    let mut a = Client::connect(&s).await;
    a.join("bytes").await;
    let mut b = common::RawClient::connect(&s).await;
    b.send_json(serde_json::json!({"type": "join", "room": "bytes"}))
        .await;
    a.expect("peer_joined").await;
    // b never reads again. 150 offers of 60 KB (9 MB: more than the sockets buffer,
    // and 150 messages, far under the 1024-message bound).
    let sdp = "v".repeat(60_000);
    let started = Instant::now();
    for _ in 0..150 {
        a.send(serde_json::json!({"type": "offer", "sdp": sdp}))
            .await;
    }
    let left = a.recv().await;
    assert_eq!(left["type"], "peer_left", "{left}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "dropped by the byte bound, not a deadline: {:?}",
        started.elapsed()
    );
    assert_serves_normal_clients(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn stop_finishes_within_5_s_whatever_clients_do() {
    // Default deadlines: only the shutdown itself may close these connections.
    let s = start_server(|_| {}).await;
    let mut post = stalled_post(&s).await;
    let mut headers = TcpStream::connect(s.local_addr()).await.unwrap();
    headers
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut mute = TcpStream::connect(s.local_addr()).await.unwrap();
    let mut ws = Client::connect(&s).await;
    ws.join("room").await;
    let raw = common::RawClient::connect(&s).await; // never reads again
    assert_serves_normal_clients(&s).await;

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.stop())
        .await
        .expect("stop() hung");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "stop() took {took:?}");
    for tcp in [&mut post, &mut headers, &mut mute] {
        read_until_closed(tcp, MARGIN).await;
    }
    assert_eq!(ws.closed().await, common::Closed::Code(1001));
    drop(raw);
}

/// The real binary, stopped with SIGTERM while a body is stalled and a WebSocket is open.
#[test]
fn the_binary_exits_within_5_s_of_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_signaling-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            ":memory:",
            "--log",
            "info",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    // Keeps reading stderr to the end, so the server never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = addr_tx.send(addr);
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            panic!("the server did not start: {}", reader.join().unwrap());
        }
    };
    let timeout = Some(Duration::from_secs(10));

    // A body that never comes, past the handler's start (100 Continue seen).
    let mut post = std::net::TcpStream::connect(&addr).unwrap();
    post.set_read_timeout(timeout).unwrap();
    write!(
        post,
        "POST /api/rooms HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 16000\r\n\
         Expect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let mut got = [0u8; 64];
    let n = post.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"HTTP/1.1 100"), "{:?}", &got[..n]);
    // Half a request line, and a WebSocket that never reads.
    let mut half = std::net::TcpStream::connect(&addr).unwrap();
    half.write_all(b"GET /hea").unwrap();
    let mut ws = std::net::TcpStream::connect(&addr).unwrap();
    ws.set_read_timeout(timeout).unwrap();
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let n = ws.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"HTTP/1.1 101"), "{:?}", &got[..n]);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let sent = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if sent.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running 10 s after SIGTERM");
        }
        // Polling for the exit, not synchronizing: the bound above is what is tested.
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = sent.elapsed();
    let log = reader.join().unwrap();
    assert!(took < Duration::from_secs(5), "exit took {took:?}\n{log}");
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(
        log.contains("no API key"),
        "start-up warning missing:\n{log}"
    );
    drop((post, half, ws));
}

#[tokio::test]
async fn listing_needs_a_key_and_creating_without_one_is_rate_limited() {
    let s = start_server(|c| {
        c.create_rate_burst = 2.0;
        c.create_rate_per_minute = 1.0;
    })
    .await;
    let m = request(&s, "GET", "/api/rooms?from=2000-01-01T00:00:00Z", &[], b"")
        .await
        .assert_error(403, "forbidden");
    assert!(m.contains("--api-key-file"), "{m}");
    // A key sent to a server that has none does not open listing either.
    let bearer = format!("Bearer {KEY}");
    let auth = [("Authorization", bearer.as_str())];
    request(&s, "GET", "/api/rooms", &auth, b"")
        .await
        .assert_error(403, "forbidden");
    for _ in 0..2 {
        let r = request(&s, "POST", "/api/rooms", &[], b"{}").await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    let r = request(&s, "POST", "/api/rooms", &[], b"{}").await;
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry), "one a minute: {retry}");
    // Bad requests are not rooms: they do not use up the creation limit (only the
    // general one), and reading rooms is unaffected.
    request(&s, "POST", "/api/rooms", &[], b"{")
        .await
        .assert_error(400, "bad_json");
    assert_eq!(
        request(&s, "GET", "/api/ice-servers", &[], b"")
            .await
            .status,
        200
    );
    s.stop().await;

    // With a key: listing works with it, and key holders are not held to the limit.
    let s = start_server(|c| {
        c.api_key = Some(Secret(KEY.into()));
        c.create_rate_burst = 1.0;
        c.create_rate_per_minute = 1.0;
    })
    .await;
    for _ in 0..5 {
        let r = request(&s, "POST", "/api/rooms", &auth, b"{}").await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    let list = request(&s, "GET", "/api/rooms", &auth, b"").await;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.json()["rooms"].as_array().unwrap().len(), 5);
    request(&s, "GET", "/api/rooms", &[], b"")
        .await
        .assert_error(401, "unauthorized");
    s.stop().await;
}
