//! Helpers for the integration tests: a real server on loopback and real WebSocket
//! clients (tokio-tungstenite, an independent implementation), plus a raw-socket client
//! for the framing cases a well-behaved library refuses to produce.
#![allow(dead_code, clippy::unwrap_used)]

pub mod proc;
pub mod redis;

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use signaling_server::{Config, Server};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a message that should come.
pub const WAIT: Duration = Duration::from_secs(3);

/// A server on an ephemeral loopback port with fast timers for tests.
pub async fn start_server(tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::ephemeral();
    config.sweep_interval = Duration::from_millis(20);
    tweak(&mut config);
    Server::start(config).await.unwrap()
}

pub async fn server() -> Server {
    start_server(|_| {}).await
}

/// Where a suite runs: one server, or two instances sharing a `redis-server`
/// (cluster mode, `--redis`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    One,
    TwoWithRedis,
}

/// Where test clients connect: each call names the server for the next client.
pub trait Target {
    fn next_server(&self) -> &Server;
}

impl Target for Server {
    fn next_server(&self) -> &Server {
        self
    }
}

/// The servers of a [`Topology`]; clients connect to them in turn, so that the two
/// members of a room sit on different instances of a cluster.
pub struct Servers {
    pub all: Vec<Server>,
    turn: std::sync::atomic::AtomicUsize,
    _redis: Option<redis::RedisServer>,
}

impl Target for Servers {
    fn next_server(&self) -> &Server {
        let i = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.all[i % self.all.len()]
    }
}

impl Servers {
    /// Starts `topology` with `tweak` applied to every server's configuration; `None`
    /// (after a skip line) for a cluster when `redis-server` is not installed.
    pub async fn start(topology: Topology, tweak: impl Fn(&mut Config)) -> Option<Servers> {
        let redis = match topology {
            Topology::One => None,
            Topology::TwoWithRedis => Some(redis::RedisServer::start().await?),
        };
        let all = instances(redis.as_ref(), &tweak).await;
        Some(Servers {
            all,
            turn: Default::default(),
            _redis: redis,
        })
    }

    /// Whether this is a cluster (instances sharing Redis).
    pub fn clustered(&self) -> bool {
        self._redis.is_some()
    }

    /// Stops every instance, then starts as many again (on the same Redis, for a
    /// cluster) with `tweak`: what a restart of the whole service does.
    pub async fn restart(&mut self, tweak: impl Fn(&mut Config)) {
        for s in self.all.drain(..) {
            s.stop().await;
        }
        self.all = instances(self._redis.as_ref(), &tweak).await;
    }

    /// A client on the next server.
    pub async fn client(&self) -> Client {
        Client::connect(self.next_server()).await
    }

    /// Members of `room` if it exists (through the HTTP API on a cluster, where an
    /// empty room does not exist).
    pub async fn members(&self, room: &str) -> Option<usize> {
        if self.all.len() == 1 {
            return self.all[0].room_members(room);
        }
        let path = format!("/api/rooms/{}", room.replace(' ', "%20"));
        let (status, body) = http(&self.all[0], "GET", &path).await;
        match status {
            200 => serde_json::from_str::<Value>(&body).unwrap()["members"]
                .as_u64()
                .map(|n| n as usize),
            404 => None,
            _ => panic!("GET {path}: {status} {body}"),
        }
    }

    pub async fn stop(self) {
        for s in self.all {
            s.stop().await;
        }
    }
}

/// One server, or (with `redis`) two instances of a cluster, ready.
async fn instances(
    redis: Option<&redis::RedisServer>,
    tweak: &impl Fn(&mut Config),
) -> Vec<Server> {
    let Some(redis) = redis else {
        return vec![start_server(tweak).await];
    };
    let mut all = Vec::new();
    for _ in 0..2 {
        let server = start_server(|c| {
            tweak(c);
            c.redis = Some(signaling_server::config::Secret(redis.url()));
        })
        .await;
        wait_health(&server, 200).await;
        all.push(server);
    }
    all
}

/// How long a cluster instance may take to become ready (Redis answering, subscribed).
pub const READY_WITHIN: Duration = Duration::from_secs(10);

/// Waits until `/healthz` answers `status`.
pub async fn wait_health(s: &Server, status: u16) {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        let (got, body) = http(s, "GET", "/healthz").await;
        if got == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz still {got} ({body}) after {READY_WITHIN:?}; waiting for {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs each named `async fn NAME(topology: Topology)` as two tests, `NAME::one_instance`
/// and `NAME::two_instances` (members on different instances sharing Redis).
#[macro_export]
macro_rules! on_both_topologies {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn one_instance() {
                super::$name(super::common::Topology::One).await;
            }

            #[tokio::test]
            async fn two_instances() {
                super::$name(super::common::Topology::TwoWithRedis).await;
            }
        }
    )*};
}

/// What ended a connection, as seen by the client.
#[derive(Debug, PartialEq)]
pub enum Closed {
    Code(u16),
    NoCloseFrame,
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
}

impl Client {
    pub async fn connect(server: &Server) -> Client {
        Client::connect_url(&server.ws_url()).await
    }

    /// A client of the server at `url` (`ws://HOST:PORT/ws`), e.g. one in another process.
    pub async fn connect_url(url: &str) -> Client {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let welcome = next_json(&mut ws).await.expect("welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        Client { ws, welcome }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s)).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next JSON message; panics after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        tokio::time::timeout(WAIT, next_json(&mut self.ws))
            .await
            .expect("timed out waiting for a message")
            .expect("connection closed")
    }

    /// The next JSON message; panics after `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Value {
        tokio::time::timeout(wait, next_json(&mut self.ws))
            .await
            .expect("timed out waiting for a message")
            .expect("connection closed")
    }

    /// The next message, which must have `type` `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let m = self.recv().await;
        assert_eq!(m["type"], kind, "expected {kind}, got {m}");
        m
    }

    pub async fn expect_error(&mut self, code: &str) -> Value {
        let m = self.expect("error").await;
        assert_eq!(m["code"], code, "{m}");
        assert!(m["message"].as_str().is_some_and(|s| !s.is_empty()), "{m}");
        m
    }

    /// Asserts that nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, next_json(&mut self.ws)).await {
            panic!("expected silence, got {m:?}");
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type":"join","room":room})).await;
        self.expect("joined").await
    }

    pub async fn join_named(&mut self, room: &str, name: &str) -> Value {
        self.send(json!({"type":"join","room":room,"name":name}))
            .await;
        self.expect("joined").await
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> Closed {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match next {
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                    return Closed::Code(code.into());
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                    return Closed::NoCloseFrame;
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Next text message as JSON, skipping control frames; `None` when the connection ends.
async fn next_json(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// A WebSocket client on a bare TCP socket, writing frames byte by byte as the test
/// says. It never answers pings by itself.
pub struct RawClient {
    pub tcp: TcpStream,
    buf: Vec<u8>,
}

/// A frame as the server sent it.
#[derive(Debug)]
pub struct ServerFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    pub fn json(&self) -> Value {
        assert_eq!(self.opcode, 1, "expected a text frame");
        serde_json::from_slice(&self.payload).unwrap()
    }

    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawClient {
    pub async fn connect(server: &Server) -> RawClient {
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.local_addr()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        let mut client = RawClient {
            tcp,
            buf: buf[end..].to_vec(),
        };
        let welcome = client.frame().await;
        assert_eq!(welcome.json()["type"], "welcome");
        client
    }

    /// Writes one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let header = frame_header(fin, opcode, payload.len() as u64);
        let mut bytes = header;
        bytes.extend(mask(payload, 0));
        self.tcp.write_all(&bytes).await.unwrap();
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_frame(true, 1, v.to_string().as_bytes()).await;
    }

    /// The next frame from the server; panics after [`WAIT`].
    pub async fn frame(&mut self) -> ServerFrame {
        tokio::time::timeout(WAIT, self.read_frame())
            .await
            .expect("timed out waiting for a frame")
            .expect("connection ended")
    }

    /// Next non-control frame as JSON.
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let f = self.frame().await;
            if f.opcode == 1 {
                return f.json();
            }
            assert!(f.opcode == 9 || f.opcode == 10, "unexpected frame {f:?}");
        }
    }

    async fn read_frame(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = self.tcp.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

pub const MASK: [u8; 4] = [0xa1, 0x5b, 0x03, 0x7e];

/// A masked client frame header for a payload of `len` bytes.
pub fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out
}

/// Masks `data` that starts at byte `offset` of a frame's payload.
pub fn mask(data: &[u8], offset: usize) -> Vec<u8> {
    data.iter()
        .enumerate()
        .map(|(i, b)| b ^ MASK[(i + offset) % 4])
        .collect()
}

fn parse_server_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, start) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < start + len {
        return None;
    }
    Some((
        ServerFrame {
            opcode: buf[0] & 0x0f,
            payload: buf[start..start + len].to_vec(),
        },
        start + len,
    ))
}

/// A raw HTTP/1.1 request; returns (status, body).
pub async fn http(server: &Server, method: &str, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.local_addr()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Two clients in `room`; returns (first, second, first's peer id, second's peer id).
/// On a cluster ([`Servers`]) the two connect to different instances.
pub async fn pair(target: &impl Target, room: &str) -> (Client, Client, String, String) {
    let mut a = Client::connect(target.next_server()).await;
    let mut b = Client::connect(target.next_server()).await;
    let ja = a.join(room).await;
    let jb = b.join(room).await;
    let pj = a.expect("peer_joined").await;
    let a_id = ja["peer_id"].as_str().unwrap().to_owned();
    let b_id = jb["peer_id"].as_str().unwrap().to_owned();
    assert_eq!(pj["peer_id"], b_id.as_str());
    (a, b, a_id, b_id)
}

/// An HTTP response as read off the socket.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a JSON API error with this status and code; returns its message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let v = self.json();
        assert_eq!(v["error"], code, "{self:?}");
        let message = v["message"].as_str().unwrap_or_default().to_owned();
        assert!(!message.is_empty(), "{self:?}");
        message
    }
}

/// One HTTP/1.1 request with extra `headers` and a `body` (sent with Content-Length).
pub async fn request(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        server.local_addr()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    // The server may answer (e.g. 413) and close before reading everything.
    let _ = tcp.write_all(&bytes).await;
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(WAIT, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => response.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("timed out reading the response to {method} {path}"),
        }
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}
