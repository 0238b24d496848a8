//! TURN over TCP and TLS (`--turn-listen-tcp`, `--turn-listen-tls`): a front that bridges
//! each accepted stream to the UDP server on this host.
//!
//! `turn` 0.17's server handles UDP 5-tuples only. Each stream gets a UDP socket of its
//! own, connected to the UDP listener, so the crate sees one distinct client per stream
//! and everything it and the [`gate`](super::gate) do (credentials, quotas, the peer
//! filter, the lifetime ceiling) applies unchanged. Messages are framed as in
//! [`framing`](super::framing) (RFC 6062 / RFC 5766 §11.5); an allocation requested over a
//! stream is still a UDP relay (REQUESTED-TRANSPORT 17), as RFC 6062 has it.
//!
//! What a client is, seen from the crate: a loopback (or listener-IP) address. Two things
//! keyed by source address are therefore handled here or mapped back:
//! - the gate's limit on unauthenticated requests is per source IP; [`Origins`] maps each
//!   bridge socket to the stream's real client IP, which the gate uses instead;
//! - connections per IP and in total are limited here, before a UDP socket exists
//!   (`--turn-max-streams`, `--turn-max-streams-per-ip`).
//!
//! The XOR-MAPPED-ADDRESS the crate returns to a stream client names the bridge socket,
//! not the client's public address (a server-reflexive address learned over TCP is of no
//! use for UDP anyway).
//!
//! Bounds, so a half-open or slow client holds nothing for long:
//! - set-up: the TLS handshake and the first whole message within `setup_timeout`;
//! - idle: a whole message at least every `idle_timeout` (the allocation lifetime ceiling
//!   plus a minute: a client with an allocation refreshes it within its lifetime);
//! - a message over [`MAX_FRAME`] bytes (what the crate reads from one datagram) is
//!   skipped without being buffered (UDP would have cut it short), unless it is the
//!   first; bytes that are neither STUN nor ChannelData close the stream. So the read
//!   buffer never holds more than one message and one read;
//! - writing to a client that does not read: `write_timeout`, then closed. Datagrams from
//!   the server wait in the kernel's socket buffer meanwhile (and are dropped when it is
//!   full, as UDP would).
//!
//! When a stream ends, the allocation made over it ends too (RFC 6062 §4.1: the
//! allocation lives as long as its control connection): the front sends a Refresh with
//! LIFETIME 0 on the stream's socket, signed with the key of the stream's last
//! authenticated request (and its nonce). Should that nonce have gone stale, the
//! allocation ends with its lifetime (at most `--turn-allocation-lifetime`) instead, as for
//! a UDP client that goes away.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{CLASS_REQUEST, Getter as _, METHOD_REFRESH, Message, MessageType, Setter};
use stun::textattrs::TextAttribute;
use turn::proto::lifetime::Lifetime;

use super::auth::RestAuth;
use super::framing::{self, FrameError, Kind};
use crate::core::rate_limit::PerAddress;

/// The largest message a stream client may send: what the crate reads of one datagram.
pub const MAX_FRAME: usize = 1500;

/// Bridge sockets and the clients they carry, for the gate's per-source limits.
#[derive(Debug, Default)]
pub struct Origins(Mutex<HashMap<SocketAddr, IpAddr>>);

impl Origins {
    /// The real client IP behind bridge socket `src`, if it is one.
    pub fn client_of(&self, src: SocketAddr) -> Option<IpAddr> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&src)
            .copied()
    }

    fn register(self: &Arc<Self>, bridge: SocketAddr, client: IpAddr) -> Registered {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(bridge, client);
        Registered(Arc::clone(self), bridge)
    }
}

/// A bridge socket known to [`Origins`] while this lives.
struct Registered(Arc<Origins>, SocketAddr);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.1);
    }
}

/// Limits of the stream fronts.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Streams open at once over both fronts; 0 = no limit.
    pub max_streams: usize,
    /// Streams open at once from one IP address; 0 = no limit.
    pub max_streams_per_ip: usize,
    pub setup_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

/// Whether a front speaks plain TCP or TLS.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(Arc<crate::tls::ServerTls>),
}

impl Transport {
    fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
        }
    }
}

/// The running fronts of one TURN server.
#[derive(Debug)]
pub struct Fronts {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limits: StreamLimits,
    /// The UDP server's address as the bridge sockets reach it.
    target: SocketAddr,
    origins: Arc<Origins>,
    /// To sign the Refresh that ends a closed stream's allocation.
    auth: RestAuth,
    open: AtomicUsize,
    per_ip: Arc<PerAddress>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Fronts {
    /// Fronts for the UDP server at `udp` (a wildcard address is reached on loopback),
    /// whose credentials `auth` checks.
    pub fn new(
        udp: SocketAddr,
        limits: StreamLimits,
        origins: Arc<Origins>,
        auth: RestAuth,
    ) -> Fronts {
        let ip = match udp.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Fronts {
            shared: Arc::new(Shared {
                limits,
                target: SocketAddr::new(ip, udp.port()),
                origins,
                auth,
                open: AtomicUsize::new(0),
                per_ip: Arc::default(),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Starts accepting streams on `listener`.
    pub fn serve(&self, listener: TcpListener, transport: Transport) {
        let shared = Arc::clone(&self.shared);
        self.shared
            .tasks
            .spawn(accept_loop(listener, transport, shared));
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every stream, and waits (at most `within`) for their tasks.
    pub async fn stop(&self, within: Duration) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(within, self.shared.tasks.wait())
            .await
            .is_err()
        {
            warn!("TURN stream tasks still running after shutdown");
        }
    }
}

async fn accept_loop(listener: TcpListener, transport: Transport, shared: Arc<Shared>) {
    let kind = transport.name();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, transport = kind, "embedded TURN server listening");
    }
    loop {
        let (tcp, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "TURN stream accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let limits = shared.limits;
        let open = shared.open.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Slot(Arc::clone(&shared));
        let (present, from_ip) = shared.per_ip.enter(peer.ip());
        if (limits.max_streams != 0 && open > limits.max_streams)
            || (limits.max_streams_per_ip != 0 && from_ip > limits.max_streams_per_ip)
        {
            debug!(%peer, open, from_ip, transport = kind, "TURN stream limit reached; refused");
            continue; // dropping `tcp` closes it
        }
        let _ = tcp.set_nodelay(true);
        let transport = transport.clone();
        let task_shared = Arc::clone(&shared);
        shared.tasks.spawn(async move {
            let _slot = slot;
            let _present = present;
            let shutdown = task_shared.shutdown.clone();
            tokio::select! {
                result = bridge(tcp, peer, transport, &task_shared) => match result {
                    Ok(()) => debug!(%peer, transport = kind, "TURN stream closed"),
                    Err(e) => debug!(%peer, transport = kind, reason = %e, "TURN stream ended"),
                },
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// One open stream, counted while it lives.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no whole message within the set-up time")]
    SetupTimeout,
    #[error("idle for too long")]
    Idle,
    #[error("the client does not read")]
    WriteTimeout,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn bridge(
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    shared: &Shared,
) -> Result<(), StreamError> {
    let limits = shared.limits;
    let setup_deadline = Instant::now() + limits.setup_timeout;
    let stream: Box<dyn Io> = match transport {
        Transport::Tcp => Box::new(tcp),
        Transport::Tls(tls) => {
            let accept = tls.turn_acceptor().accept(tcp);
            match tokio::time::timeout_at(setup_deadline, accept).await {
                Ok(Ok(tls)) => Box::new(tls),
                Ok(Err(e)) => return Err(StreamError::Handshake(e)),
                Err(_) => return Err(StreamError::SetupTimeout),
            }
        }
    };
    // From the listener's own IP (loopback for a wildcard listener): local traffic only.
    let udp = UdpSocket::bind(SocketAddr::new(shared.target.ip(), 0)).await?;
    udp.connect(shared.target).await?;
    let _registered = shared.origins.register(udp.local_addr()?, peer.ip());
    let (reader, writer) = tokio::io::split(stream);
    let session = Mutex::new(Session::default());
    let result = tokio::select! {
        r = inbound(reader, &udp, setup_deadline, limits.idle_timeout, &session) => r,
        r = outbound(writer, &udp, limits.write_timeout, &session) => r,
    };
    let session = session.into_inner().unwrap_or_else(PoisonError::into_inner);
    if let Some(refresh) = session.closing_refresh(&shared.auth) {
        // The answer goes to a socket about to close; the allocation is gone either way.
        if let Err(e) = udp.send(&refresh).await {
            debug!(%peer, error = %e, "cannot end the allocation of a closed stream");
        }
    }
    result
}

/// What the front knows of a stream's TURN session: enough to end its allocation.
#[derive(Debug, Default)]
struct Session {
    /// USERNAME, REALM and NONCE of the client's last request with MESSAGE-INTEGRITY.
    credentials: Option<(String, String, String)>,
    /// An Allocate succeeded (and no zero Refresh was seen since).
    allocated: bool,
}

const ALLOCATE_SUCCESS: u16 = 0x0103;
const REFRESH_REQUEST: u16 = 0x0004;

impl Session {
    /// Notes the credentials of a client request.
    fn saw_request(&mut self, message: &[u8]) {
        let mut m = Message::new();
        m.raw = message.to_vec();
        if m.decode().is_err()
            || m.typ.class != CLASS_REQUEST
            || !m.contains(ATTR_MESSAGE_INTEGRITY)
        {
            return;
        }
        let text = |attr| TextAttribute::get_from_as(&m, attr).ok().map(|t| t.text);
        if let (Some(user), Some(realm), Some(nonce)) =
            (text(ATTR_USERNAME), text(ATTR_REALM), text(ATTR_NONCE))
        {
            self.credentials = Some((user, realm, nonce));
        }
        if u16::from_be_bytes([message[0], message[1]]) == REFRESH_REQUEST {
            let mut lifetime = Lifetime::default();
            if lifetime.get_from(&m).is_ok() && lifetime.0.is_zero() {
                self.allocated = false;
            }
        }
    }

    /// Notes an Allocate success from the server.
    fn saw_answer(&mut self, message: &[u8]) {
        if message.len() >= 2 && u16::from_be_bytes([message[0], message[1]]) == ALLOCATE_SUCCESS {
            self.allocated = true;
        }
    }

    /// A Refresh with LIFETIME 0 for the allocation, when there is one to end.
    fn closing_refresh(&self, auth: &RestAuth) -> Option<Vec<u8>> {
        let (user, realm, nonce) = self.credentials.as_ref().filter(|_| self.allocated)?;
        let key = auth.key(user, realm, std::time::SystemTime::now()).ok()?;
        let setters: [Box<dyn Setter>; 8] = [
            Box::new(stun::agent::TransactionId::new()),
            Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            Box::new(Lifetime(Duration::ZERO)),
            Box::new(TextAttribute::new(ATTR_USERNAME, user.clone())),
            Box::new(TextAttribute::new(ATTR_REALM, realm.clone())),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())),
            Box::new(MessageIntegrity(key)),
            Box::new(FINGERPRINT),
        ];
        let mut m = Message::new();
        m.build(&setters).ok()?;
        Some(m.raw)
    }
}

/// Client to server: whole messages from the stream, one datagram each.
async fn inbound(
    mut reader: impl AsyncRead + Unpin,
    udp: &UdpSocket,
    setup_deadline: Instant,
    idle: Duration,
    session: &Mutex<Session>,
) -> Result<(), StreamError> {
    let mut buf = BytesMut::with_capacity(2048);
    let mut deadline = setup_deadline;
    let mut set_up = false;
    // Bytes of an oversized message still to be thrown away.
    let mut skip = 0usize;
    loop {
        loop {
            if skip > 0 {
                let now = skip.min(buf.len());
                buf.advance(now);
                skip -= now;
                if skip > 0 {
                    break;
                }
            }
            match framing::next_frame(&buf, MAX_FRAME) {
                Ok(Some(frame)) => {
                    if frame.kind == Kind::Stun {
                        lock(session).saw_request(&buf[..frame.len]);
                    }
                    udp.send(&buf[..frame.len]).await?;
                    buf.advance(frame.consumed);
                    set_up = true;
                    deadline = Instant::now() + idle;
                }
                Ok(None) => break,
                // Once the client has spoken TURN; a first message like this is
                // something else (HTTP reads as ChannelData of an impossible length).
                Err(FrameError::TooLarge { len, consumed, .. }) if set_up => {
                    debug!(len, "TURN message over the size limit skipped");
                    skip = consumed;
                }
                Err(e) => return Err(e.into()),
            }
        }
        buf.reserve(2048);
        match tokio::time::timeout_at(deadline, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) if set_up => return Err(StreamError::Idle),
            Err(_) => return Err(StreamError::SetupTimeout),
        }
    }
}

/// Server to client: each datagram framed onto the stream.
async fn outbound(
    mut writer: impl AsyncWrite + Unpin,
    udp: &UdpSocket,
    write_timeout: Duration,
    session: &Mutex<Session>,
) -> Result<(), StreamError> {
    let mut datagram = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(2048);
    loop {
        let n = udp.recv(&mut datagram).await?;
        out.clear();
        match framing::encode(&datagram[..n], &mut out) {
            Ok(Kind::Stun) => lock(session).saw_answer(&datagram[..n]),
            Ok(Kind::ChannelData) => {}
            Err(_) => continue,
        }
        let write = async {
            writer.write_all(&out).await?;
            writer.flush().await
        };
        match tokio::time::timeout(write_timeout, write).await {
            Ok(r) => r?,
            Err(_) => return Err(StreamError::WriteTimeout),
        }
    }
}

fn lock(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(PoisonError::into_inner)
}
