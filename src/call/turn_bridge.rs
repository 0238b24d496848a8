//! TURN over TCP and TLS for webrtc-rs, which speaks TURN over UDP only (it skips
//! `turn:...?transport=tcp` and `turns:` URLs; upstream webrtc-rs#539): a local bridge.
//!
//! For each such URL, [`bridge_ice_servers`] binds a UDP socket on 127.0.0.1 and hands
//! webrtc-rs `turn:127.0.0.1:PORT?transport=udp` instead, with the same username and
//! credential. Every local socket webrtc-rs talks to the bridge from gets a TCP (or TLS,
//! rustls with the process's [trust](crate::tls::default_trust)) connection of its own to
//! the real server, so the server sees one client per allocation, as over UDP. Each
//! datagram goes onto the stream as one framed message
//! ([`signaling_server::turn_server::framing`]: STUN by its length, ChannelData by its
//! length field, padded to 4 bytes) and each message from the stream comes back as one
//! datagram. Nothing in the messages is changed: MESSAGE-INTEGRITY covers them end to
//! end.
//!
//! A [`TurnBridge`] lives as long as the call's peer connection and ends its task (and
//! with it every stream) when dropped. It also notes the relayed addresses the server
//! grants (XOR-RELAYED-ADDRESS of Allocate answers), so the call's path can say
//! `relay (tcp)` or `relay (tls)` when its local end is one of them, and so such a relay
//! candidate is signaled with a lower priority than a UDP relay's ([`deprioritize`]):
//! to webrtc-rs all relays look alike, but a relay reached over TCP adds head-of-line
//! blocking and should win only when nothing over UDP works (browsers rank them the same
//! way: UDP, then TCP, then TLS).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use rtc::ice::url::{ProtoType, SchemeType, Url};
use signaling_server::turn_server::framing;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::signaling::protocol::IceServer;

/// How the bridge reaches the TURN server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTransport {
    Tcp,
    Tls,
}

impl StreamTransport {
    /// `tcp` or `tls`, as the call's path names it.
    pub fn name(self) -> &'static str {
        match self {
            StreamTransport::Tcp => "tcp",
            StreamTransport::Tls => "tls",
        }
    }
}

/// A TURN server reached over a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamServer {
    pub host: String,
    pub port: u16,
    pub transport: StreamTransport,
}

impl StreamServer {
    /// The server of a `turn:...?transport=tcp` or `turns:` URL (None for anything else,
    /// `turns:...?transport=udp`, DTLS, included).
    pub fn from_url(url: &str) -> Option<StreamServer> {
        let parsed = Url::parse_url(url).ok()?;
        let transport = match (parsed.scheme, parsed.proto) {
            (SchemeType::Turn, ProtoType::Tcp) => StreamTransport::Tcp,
            (SchemeType::Turns, ProtoType::Tcp) => StreamTransport::Tls,
            _ => return None,
        };
        Some(StreamServer {
            host: parsed.host,
            port: parsed.port,
            transport,
        })
    }
}

/// Why a stream to the TURN server ended.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {host}: {detail}")]
    Connect { host: String, detail: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the server sent something that is not TURN: {0}")]
    Frame(#[from] framing::FrameError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// How long connecting (and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Local sockets (webrtc-rs's, one per network interface) bridged at once; the least
/// recently used stream is closed for a new one beyond this.
const MAX_SOURCES: usize = 8;
/// Datagrams waiting for one stream (while it connects, or when it is slow); more are
/// dropped, as a full UDP path would.
const QUEUE: usize = 256;
/// The largest message accepted from the server.
const MAX_FROM_SERVER: usize = 8192;

/// One bridged TURN server; its task (and all its streams) ends when this is dropped.
#[derive(Debug)]
pub struct TurnBridge {
    server: StreamServer,
    local: SocketAddr,
    relays: Arc<Mutex<HashSet<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for TurnBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TurnBridge {
    /// Binds the local socket and starts bridging it to `server`.
    pub async fn start(server: StreamServer) -> std::io::Result<TurnBridge> {
        let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let local = socket.local_addr()?;
        let relays = Arc::new(Mutex::new(HashSet::new()));
        let task = tokio::spawn(run(socket, server.clone(), Arc::clone(&relays)));
        tracing::info!(
            %local,
            server = %format!("{}:{}", server.host, server.port),
            transport = server.transport.name(),
            "TURN bridge started"
        );
        Ok(TurnBridge {
            server,
            local,
            relays,
            task,
        })
    }

    /// The URL webrtc-rs is given instead of the server's.
    pub fn local_url(&self) -> String {
        format!("turn:{}?transport=udp", self.local)
    }

    /// The server it bridges to.
    pub fn server(&self) -> &StreamServer {
        &self.server
    }

    /// Whether `addr` is a relayed address the server granted through this bridge.
    pub fn relays(&self, addr: SocketAddr) -> bool {
        self.relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&addr)
    }
}

/// The relayed addresses granted through a set of bridges, with their transports; cheap
/// to clone (for the peer connection's event handler).
#[derive(Debug, Clone, Default)]
pub struct BridgedRelays(Vec<(StreamTransport, Arc<Mutex<HashSet<SocketAddr>>>)>);

impl BridgedRelays {
    pub fn of(bridges: &[TurnBridge]) -> BridgedRelays {
        BridgedRelays(
            bridges
                .iter()
                .map(|b| (b.server.transport, Arc::clone(&b.relays)))
                .collect(),
        )
    }

    /// The transport of the bridge that granted relayed address `addr`, if one did.
    pub fn transport_of(&self, addr: SocketAddr) -> Option<StreamTransport> {
        self.0.iter().find_map(|(transport, relays)| {
            relays
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&addr)
                .then_some(*transport)
        })
    }
}

/// `candidate` (an SDP candidate attribute) with a lower priority when it is a relay
/// candidate granted through a bridge: one step of local preference below a UDP relay
/// for TCP, two for TLS (RFC 8445 §5.1.2.1: `2^8 * local preference`). Anything else
/// comes back unchanged.
pub fn deprioritize(candidate: &str, relays: &BridgedRelays) -> String {
    let fields: Vec<&str> = candidate.split_whitespace().collect();
    let relay = fields
        .iter()
        .position(|f| *f == "typ")
        .and_then(|i| fields.get(i + 1))
        .is_some_and(|t| *t == "relay");
    let addr = fields
        .get(4)
        .zip(fields.get(5))
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)));
    let (Some(addr), Some(priority), true) = (
        addr,
        fields.get(3).and_then(|p| p.parse::<u32>().ok()),
        relay,
    ) else {
        return candidate.to_owned();
    };
    let steps = match relays.transport_of(addr) {
        Some(StreamTransport::Tcp) => 1,
        Some(StreamTransport::Tls) => 2,
        None => return candidate.to_owned(),
    };
    let lowered = priority.saturating_sub(steps * 256 * 256).to_string();
    let mut out: Vec<&str> = fields.clone();
    out[3] = &lowered;
    out.join(" ")
}

/// The list to give webrtc-rs: every `turn:...?transport=tcp` and `turns:` URL replaced by
/// a bridge's local URL (duplicates share one bridge); everything else as it is. A
/// bridge that cannot start (no loopback socket) leaves its URL out, logged.
pub async fn bridge_ice_servers(list: &[IceServer]) -> (Vec<IceServer>, Vec<TurnBridge>) {
    let mut bridges: Vec<TurnBridge> = Vec::new();
    let mut out = Vec::with_capacity(list.len());
    for server in list {
        let mut urls = Vec::with_capacity(server.urls.len());
        for url in &server.urls {
            let Some(stream) = StreamServer::from_url(url) else {
                urls.push(url.clone());
                continue;
            };
            if let Some(b) = bridges.iter().find(|b| b.server == stream) {
                urls.push(b.local_url());
                continue;
            }
            match TurnBridge::start(stream).await {
                Ok(b) => {
                    urls.push(b.local_url());
                    bridges.push(b);
                }
                Err(e) => tracing::warn!(%url, error = %e, "cannot start a TURN bridge"),
            }
        }
        if !urls.is_empty() {
            out.push(IceServer {
                urls,
                username: server.username.clone(),
                credential: server.credential.clone(),
            });
        }
    }
    (out, bridges)
}

/// The local socket's loop: datagrams from each local source onto that source's stream.
async fn run(
    socket: Arc<UdpSocket>,
    server: StreamServer,
    relays: Arc<Mutex<HashSet<SocketAddr>>>,
) {
    let mut streams: HashMap<SocketAddr, (mpsc::Sender<Vec<u8>>, u64)> = HashMap::new();
    let mut tasks: JoinSet<SocketAddr> = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    let mut tick = 0u64;
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, src) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors of earlier sends show up here; the socket lives on.
                        tracing::debug!(error = %e, "TURN bridge socket");
                        continue;
                    }
                };
                let mut framed = Vec::with_capacity(n + 3);
                if framing::encode(&buf[..n], &mut framed).is_err() {
                    tracing::debug!(%src, "datagram to the TURN bridge is not TURN; dropped");
                    continue;
                }
                tick += 1;
                if !streams.contains_key(&src) {
                    if streams.len() >= MAX_SOURCES
                        && let Some(oldest) = streams.iter().min_by_key(|(_, (_, t))| *t).map(|(a, _)| *a)
                    {
                        streams.remove(&oldest); // its task ends with its queue
                    }
                    let (tx, rx) = mpsc::channel(QUEUE);
                    let (socket, server, relays) = (Arc::clone(&socket), server.clone(), Arc::clone(&relays));
                    tasks.spawn(async move {
                        if let Err(e) = stream(src, rx, &socket, &server, &relays).await {
                            tracing::warn!(%src, transport = server.transport.name(), error = %e, "TURN bridge stream ended");
                        }
                        src
                    });
                    streams.insert(src, (tx, tick));
                }
                if let Some((tx, last)) = streams.get_mut(&src) {
                    *last = tick;
                    if tx.try_send(framed).is_err() {
                        tracing::debug!(%src, "TURN bridge queue full; datagram dropped");
                    }
                }
            }
            Some(done) = tasks.join_next() => {
                if let Ok(src) = done
                    && streams.get(&src).is_some_and(|(tx, _)| tx.is_closed())
                {
                    streams.remove(&src);
                }
            }
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens the stream to the server for one local source.
async fn connect(server: &StreamServer) -> Result<Box<dyn Io>, BridgeError> {
    let target = format!("{}:{}", server.host, server.port);
    let open = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((server.host.as_str(), server.port))
            .await
            .map_err(|_| BridgeError::Resolve(target.clone()))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(t) => {
                    tcp = Some(t);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| BridgeError::Connect {
            host: target.clone(),
            detail: last.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
        })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match server.transport {
            StreamTransport::Tcp => Box::new(tcp),
            StreamTransport::Tls => {
                let config = crate::tls::default_trust()
                    .client_config()
                    .map_err(|e| BridgeError::Tls(e.to_string()))?;
                let name = rustls::pki_types::ServerName::try_from(server.host.clone())
                    .map_err(|e| BridgeError::Tls(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        BridgeError::Tls(
                            crate::tls::explain(&e, &server.host).unwrap_or_else(|| e.to_string()),
                        )
                    })?;
                Box::new(tls)
            }
        };
        Ok(io)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| BridgeError::Connect {
            host: target.clone(),
            detail: "timed out".into(),
        })?
}

/// One local source's stream: its queued datagrams out, the server's messages back.
async fn stream(
    src: SocketAddr,
    mut queue: mpsc::Receiver<Vec<u8>>,
    socket: &UdpSocket,
    server: &StreamServer,
    relays: &Mutex<HashSet<SocketAddr>>,
) -> Result<(), BridgeError> {
    let io = connect(server).await?;
    tracing::debug!(%src, transport = server.transport.name(), "TURN bridge stream open");
    let (mut reader, mut writer) = tokio::io::split(io);
    let outbound = async {
        while let Some(framed) = queue.recv().await {
            writer.write_all(&framed).await?;
            writer.flush().await?;
        }
        Ok::<(), BridgeError>(())
    };
    let inbound = async {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            while let Some(frame) = framing::next_frame(&buf, MAX_FROM_SERVER)? {
                let message = &buf[..frame.len];
                if frame.kind == framing::Kind::Stun
                    && let Some(relayed) = allocated_relay(message)
                {
                    relays
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(relayed);
                }
                socket.send_to(message, src).await?;
                buf.advance(frame.consumed);
            }
            buf.reserve(4096);
            if reader.read_buf(&mut buf).await? == 0 {
                return Ok::<(), BridgeError>(());
            }
        }
    };
    tokio::select! {
        r = outbound => r,
        r = inbound => r,
    }
}

const ALLOCATE_SUCCESS: u16 = 0x0103;
const XOR_RELAYED_ADDRESS: u16 = 0x0016;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The XOR-RELAYED-ADDRESS of an Allocate success response (RFC 8656 §18.5), if `message`
/// is one.
pub fn allocated_relay(message: &[u8]) -> Option<SocketAddr> {
    if message.len() < framing::STUN_HEADER
        || u16::from_be_bytes([message[0], message[1]]) != ALLOCATE_SUCCESS
    {
        return None;
    }
    let mut rest = &message[framing::STUN_HEADER..];
    while rest.len() >= 4 {
        let typ = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + len)?;
        if typ == XOR_RELAYED_ADDRESS {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE);
            mask[4..].copy_from_slice(message.get(8..20)?);
            let port = u16::from_be_bytes([value.get(2)? ^ mask[0], value.get(3)? ^ mask[1]]);
            let ip = match (value.get(1)?, value.len()) {
                (1, 8) => {
                    let mut ip = [0u8; 4];
                    for (i, b) in ip.iter_mut().enumerate() {
                        *b = value[4 + i] ^ mask[i];
                    }
                    IpAddr::V4(Ipv4Addr::from(ip))
                }
                (2, 20) => {
                    let mut ip = [0u8; 16];
                    for (i, b) in ip.iter_mut().enumerate() {
                        *b = value[4 + i] ^ mask[i];
                    }
                    IpAddr::V6(Ipv6Addr::from(ip))
                }
                _ => return None,
            };
            return Some(SocketAddr::new(ip, port));
        }
        rest = rest.get(4 + len.div_ceil(4) * 4..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tcp_and_tls_turn_urls_are_bridged() {
        let s = |url| StreamServer::from_url(url);
        assert_eq!(
            s("turn:198.51.100.1:3478?transport=tcp"),
            Some(StreamServer {
                host: "198.51.100.1".into(),
                port: 3478,
                transport: StreamTransport::Tcp
            })
        );
        assert_eq!(
            s("turns:turn.example.org?transport=tcp"),
            Some(StreamServer {
                host: "turn.example.org".into(),
                port: 5349,
                transport: StreamTransport::Tls
            })
        );
        assert_eq!(
            s("turns:[2001:db8::1]:443").map(|s| (s.host, s.port, s.transport)),
            Some(("2001:db8::1".into(), 443, StreamTransport::Tls))
        );
        for other in [
            "turn:198.51.100.1:3478?transport=udp",
            "turn:198.51.100.1",
            "turns:198.51.100.1?transport=udp",
            "stun:198.51.100.1",
            "nonsense",
        ] {
            assert_eq!(s(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn urls_are_replaced_by_one_bridge_per_server_and_credentials_kept() {
        let list = vec![
            IceServer {
                urls: vec!["stun:198.51.100.1:3478".into()],
                username: None,
                credential: None,
            },
            IceServer {
                urls: vec![
                    "turn:198.51.100.1:3478?transport=udp".into(),
                    "turn:198.51.100.1:3478?transport=tcp".into(),
                    "turns:198.51.100.1:5349?transport=tcp".into(),
                ],
                username: Some("1767225600:abc".into()),
                credential: Some("c".into()),
            },
            IceServer {
                urls: vec!["turn:198.51.100.1:3478?transport=tcp".into()],
                username: Some("other".into()),
                credential: Some("d".into()),
            },
        ];
        let (out, bridges) = bridge_ice_servers(&list).await;
        assert_eq!(bridges.len(), 2);
        assert_eq!(out[0], list[0]);
        assert_eq!(out[1].urls[0], "turn:198.51.100.1:3478?transport=udp");
        assert_eq!(out[1].urls[1], bridges[0].local_url());
        assert_eq!(out[1].urls[2], bridges[1].local_url());
        assert!(out[1].urls[1].starts_with("turn:127.0.0.1:"));
        assert_eq!(out[1].username, list[1].username);
        assert_eq!(out[1].credential, list[1].credential);
        assert_eq!(out[2].urls, vec![bridges[0].local_url()]);
        assert_eq!(out[2].username.as_deref(), Some("other"));
        assert_eq!(bridges[1].server().transport, StreamTransport::Tls);
    }

    #[test]
    fn bridged_relay_candidates_are_signaled_below_udp_relays() {
        let tcp = Arc::new(Mutex::new(HashSet::from(["203.0.113.9:50000"
            .parse::<SocketAddr>()
            .unwrap()])));
        let tls = Arc::new(Mutex::new(HashSet::from(["203.0.113.9:50001"
            .parse::<SocketAddr>()
            .unwrap()])));
        let relays = BridgedRelays(vec![
            (StreamTransport::Tcp, tcp),
            (StreamTransport::Tls, tls),
        ]);
        let line = |port: u16, typ: &str| {
            format!(
                "candidate:1 1 udp 16777215 203.0.113.9 {port} typ {typ} raddr 10.0.0.2 rport 5"
            )
        };
        let priority = |c: &str| -> u32 { c.split_whitespace().nth(3).unwrap().parse().unwrap() };
        let udp_relay = deprioritize(&line(50002, "relay"), &relays);
        let over_tcp = deprioritize(&line(50000, "relay"), &relays);
        let over_tls = deprioritize(&line(50001, "relay"), &relays);
        assert_eq!(udp_relay, line(50002, "relay"));
        assert!(priority(&over_tls) < priority(&over_tcp));
        assert!(priority(&over_tcp) < priority(&udp_relay));
        assert_eq!(
            over_tcp,
            line(50000, "relay").replace("16777215", &(16777215 - 65536).to_string())
        );
        // Not a relay, or unreadable: unchanged.
        assert_eq!(
            deprioritize(&line(50000, "host"), &relays),
            line(50000, "host")
        );
        assert_eq!(
            deprioritize("candidate:1 1 udp", &relays),
            "candidate:1 1 udp"
        );
    }

    #[test]
    fn the_relayed_address_is_read_from_an_allocate_answer() {
        // An Allocate success with XOR-MAPPED-ADDRESS (ignored) and XOR-RELAYED-ADDRESS.
        let tid = [7u8; 12];
        let xor = |addr: SocketAddr, typ: u16| {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE);
            mask[4..].copy_from_slice(&tid);
            let mut v = vec![0, if addr.is_ipv4() { 1 } else { 2 }];
            v.extend((addr.port() ^ 0x2112).to_be_bytes());
            let raw = match addr.ip() {
                IpAddr::V4(ip) => ip.octets().to_vec(),
                IpAddr::V6(ip) => ip.octets().to_vec(),
            };
            v.extend(raw.iter().enumerate().map(|(i, b)| b ^ mask[i]));
            let mut a = typ.to_be_bytes().to_vec();
            a.extend((v.len() as u16).to_be_bytes());
            a.extend(v);
            a
        };
        for relayed in ["203.0.113.9:50000", "[2001:db8::7]:61000"] {
            let relayed: SocketAddr = relayed.parse().unwrap();
            let mut body = xor("198.51.100.11:4000".parse().unwrap(), 0x0020);
            body.extend(xor(relayed, XOR_RELAYED_ADDRESS));
            let mut m = ALLOCATE_SUCCESS.to_be_bytes().to_vec();
            m.extend((body.len() as u16).to_be_bytes());
            m.extend(MAGIC_COOKIE);
            m.extend(tid);
            m.extend(&body);
            assert_eq!(allocated_relay(&m), Some(relayed));
            // Another message type, or a truncated one: nothing.
            let mut other = m.clone();
            other[1] = 0x13;
            assert_eq!(allocated_relay(&other), None);
            assert_eq!(allocated_relay(&m[..m.len() - 3]), None);
        }
        assert_eq!(allocated_relay(&[]), None);
    }
}
