//! Relay sockets: the port range, the public relay address, quotas, and the peer filter on
//! every relayed datagram.
//!
//! `turn` 0.17 asks a [`RelayAddressGenerator`] for each allocation's socket and then only
//! calls `recv_from`/`send_to` on it. Handing it a [`RelayConn`] wrapper is the narrowest
//! place that sees every datagram the relay sends or receives, so the peer policy is
//! enforced here whatever the request handling above does (the [`gate`](super::gate) also
//! refuses permissions for denied peers with 403, so clients learn why). The wrapper also
//! holds the allocation's quota [`Lease`], which ends when the crate drops the socket.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};
use turn::relay::RelayAddressGenerator;
use webrtc_util::Conn;

use super::auth::user_of;
use super::peers::PeerPolicy;

/// An allocation refused for quota reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("allocation quota of this user reached")]
    User,
    #[error("total allocation quota reached")]
    Total,
}

/// Live allocations: counts per user and in total, and the relay addresses in use.
#[derive(Debug)]
pub struct Registry {
    user_quota: usize,
    total_quota: usize,
    state: Mutex<RegistryState>,
    /// Datagrams dropped because their peer is denied (both directions).
    pub(crate) denied_datagrams: AtomicU64,
}

#[derive(Debug, Default)]
struct RegistryState {
    per_user: HashMap<String, usize>,
    total: usize,
    relays: HashSet<SocketAddr>,
}

impl Registry {
    /// Quotas of 0 mean unlimited.
    pub fn new(user_quota: usize, total_quota: usize) -> Registry {
        Registry {
            user_quota,
            total_quota,
            state: Mutex::default(),
            denied_datagrams: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        // The state stays consistent even if a holder panicked: every update is one step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `user` may take one more allocation now.
    pub fn check(&self, user: &str) -> Result<(), QuotaError> {
        Self::check_locked(&self.lock(), user, self.user_quota, self.total_quota)
    }

    fn check_locked(
        state: &RegistryState,
        user: &str,
        user_quota: usize,
        total_quota: usize,
    ) -> Result<(), QuotaError> {
        if total_quota != 0 && state.total >= total_quota {
            return Err(QuotaError::Total);
        }
        let held = state.per_user.get(user).copied().unwrap_or(0);
        if user_quota != 0 && held >= user_quota {
            return Err(QuotaError::User);
        }
        Ok(())
    }

    /// Counts an allocation of `user` at `relay` until the lease is dropped.
    pub fn acquire(self: &Arc<Self>, user: &str, relay: SocketAddr) -> Result<Lease, QuotaError> {
        let mut state = self.lock();
        Self::check_locked(&state, user, self.user_quota, self.total_quota)?;
        *state.per_user.entry(user.to_owned()).or_insert(0) += 1;
        state.total += 1;
        state.relays.insert(relay);
        Ok(Lease {
            registry: Arc::clone(self),
            user: user.to_owned(),
            relay,
        })
    }

    /// Whether `addr` is the relay address of one of our live allocations (two clients of
    /// this server relaying to each other), which is never refused.
    pub fn is_own_relay(&self, addr: SocketAddr) -> bool {
        self.lock().relays.contains(&addr)
    }

    /// Live allocations.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

/// One counted allocation; dropping it gives the slot back.
#[derive(Debug)]
pub struct Lease {
    registry: Arc<Registry>,
    user: String,
    relay: SocketAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        if let Some(n) = state.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                state.per_user.remove(&self.user);
            }
        }
        state.total = state.total.saturating_sub(1);
        state.relays.remove(&self.relay);
    }
}

/// The username of the Allocate request being handled. The crate handles one datagram of
/// a listener at a time (its read loop awaits each request), so the gate sets this before
/// handing an Allocate over and the generator reads it while that request runs.
pub type PendingUser = Arc<Mutex<Option<String>>>;

/// Hands out relay sockets from a port range, announced at the public address.
#[derive(Debug)]
pub struct RelayGenerator {
    pub bind_ip: IpAddr,
    pub public_ip: IpAddr,
    pub min_port: u16,
    pub max_port: u16,
    pub policy: Arc<PeerPolicy>,
    pub registry: Arc<Registry>,
    pub pending: PendingUser,
}

fn other(msg: impl Into<String>) -> turn::Error {
    turn::Error::Other(msg.into())
}

#[async_trait]
impl RelayAddressGenerator for RelayGenerator {
    fn validate(&self) -> Result<(), turn::Error> {
        if self.min_port == 0 || self.max_port < self.min_port {
            return Err(turn::Error::ErrMaxPortLessThanMinPort);
        }
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        if use_ipv4 != self.bind_ip.is_ipv4() {
            return Err(other("the requested address family is not offered"));
        }
        let username = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| other("allocation without an authenticated Allocate request"))?;
        let socket = if requested_port != 0 {
            if !(self.min_port..=self.max_port).contains(&requested_port) {
                return Err(other("requested port outside the relay range"));
            }
            UdpSocket::bind((self.bind_ip, requested_port))
                .await
                .map_err(|e| other(format!("cannot bind relay port: {e}")))?
        } else {
            self.bind_in_range().await?
        };
        let port = socket
            .local_addr()
            .map_err(|e| other(format!("relay socket: {e}")))?
            .port();
        let relay_addr = SocketAddr::new(self.public_ip, port);
        let lease = self
            .registry
            .acquire(user_of(&username), relay_addr)
            .map_err(|e| other(e.to_string()))?;
        debug!(%relay_addr, user = user_of(&username), "TURN allocation");
        let conn = RelayConn {
            socket,
            policy: Arc::clone(&self.policy),
            registry: Arc::clone(&self.registry),
            closed: CancellationToken::new(),
            _lease: lease,
        };
        Ok((Arc::new(conn), relay_addr))
    }
}

impl RelayGenerator {
    /// Binds a free port of the range, starting at a random one and walking up (wrapping),
    /// so a nearly full range still finds its last free ports.
    async fn bind_in_range(&self) -> Result<UdpSocket, turn::Error> {
        let span = u32::from(self.max_port - self.min_port) + 1;
        let start = rand::random::<u32>() % span;
        // Bounded so that a full range costs little; 256 binds take about a millisecond.
        for i in 0..span.min(256) {
            let offset = (start + i) % span;
            let port = self.min_port + offset as u16;
            if let Ok(socket) = UdpSocket::bind((self.bind_ip, port)).await {
                return Ok(socket);
            }
        }
        Err(turn::Error::ErrMaxRetriesExceeded)
    }
}

/// An allocation's relay socket that never exchanges datagrams with denied peers.
struct RelayConn {
    socket: UdpSocket,
    policy: Arc<PeerPolicy>,
    registry: Arc<Registry>,
    closed: CancellationToken,
    _lease: Lease,
}

impl RelayConn {
    fn permitted(&self, peer: SocketAddr) -> bool {
        self.policy.permits(peer.ip()) || self.registry.is_own_relay(peer)
    }

    fn count_denied(&self, peer: SocketAddr, direction: &'static str) {
        self.registry
            .denied_datagrams
            .fetch_add(1, Ordering::Relaxed);
        trace!(%peer, direction, "datagram to/from a denied peer dropped");
    }
}

#[async_trait]
impl Conn for RelayConn {
    async fn connect(&self, _addr: SocketAddr) -> Result<(), webrtc_util::Error> {
        Err(webrtc_util::Error::Other(
            "relay sockets do not connect".into(),
        ))
    }

    async fn recv(&self, _buf: &mut [u8]) -> Result<usize, webrtc_util::Error> {
        Err(webrtc_util::Error::Other("use recv_from".into()))
    }

    async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), webrtc_util::Error> {
        loop {
            let (n, from) = tokio::select! {
                _ = self.closed.cancelled() => return Err(webrtc_util::Error::ErrClosedListener),
                r = self.socket.recv_from(buf) => r?,
            };
            if self.permitted(from) {
                return Ok((n, from));
            }
            self.count_denied(from, "in");
        }
    }

    async fn send(&self, _buf: &[u8]) -> Result<usize, webrtc_util::Error> {
        Err(webrtc_util::Error::Other("use send_to".into()))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> Result<usize, webrtc_util::Error> {
        if !self.permitted(target) {
            // Reported as sent: an error here would only make the crate log every datagram.
            self.count_denied(target, "out");
            return Ok(buf.len());
        }
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> Result<SocketAddr, webrtc_util::Error> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> Result<(), webrtc_util::Error> {
        // Ends the crate's reader task, which then drops this socket (and the lease).
        self.closed.cancel();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn quotas_count_per_user_and_in_total() {
        let reg = Arc::new(Registry::new(2, 3));
        let addr = |p| SocketAddr::from(([203, 0, 113, 1], p));
        let a1 = reg.acquire("a", addr(1)).unwrap();
        let _a2 = reg.acquire("a", addr(2)).unwrap();
        assert_eq!(reg.check("a"), Err(QuotaError::User));
        assert_eq!(reg.acquire("a", addr(3)).unwrap_err(), QuotaError::User);
        let _b1 = reg.acquire("b", addr(4)).unwrap();
        assert_eq!(reg.check("c"), Err(QuotaError::Total));
        assert!(reg.is_own_relay(addr(1)));
        drop(a1);
        assert!(!reg.is_own_relay(addr(1)));
        assert_eq!(reg.total(), 2);
        assert!(reg.check("a").is_ok());
        let unlimited = Arc::new(Registry::new(0, 0));
        let leases: Vec<_> = (0..100)
            .map(|p| unlimited.acquire("a", addr(p)).unwrap())
            .collect();
        assert_eq!(unlimited.total(), leases.len());
    }

    #[tokio::test]
    async fn relay_sockets_drop_datagrams_to_and_from_denied_peers() {
        let registry = Arc::new(Registry::new(0, 0));
        let generator = RelayGenerator {
            bind_ip: "127.0.0.1".parse().unwrap(),
            public_ip: "127.0.0.1".parse().unwrap(),
            min_port: 40000,
            max_port: 60000,
            policy: Arc::new(PeerPolicy::new(&[], &[])),
            registry: Arc::clone(&registry),
            pending: Arc::new(Mutex::new(None)),
        };
        // No authenticated Allocate being handled: no socket.
        assert!(generator.allocate_conn(true, 0).await.is_err());
        *generator.pending.lock().unwrap() = Some("1:user".into());
        let (conn, relay_addr) = generator.allocate_conn(true, 0).await.unwrap();
        assert!((40000..=60000).contains(&relay_addr.port()));
        assert_eq!(registry.total(), 1);
        let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let victim_addr = victim.local_addr().unwrap();
        // Outbound to a loopback peer: reported sent, never sent.
        assert_eq!(conn.send_to(b"x", victim_addr).await.unwrap(), 1);
        let mut buf = [0u8; 16];
        let quiet = tokio::time::timeout(Duration::from_millis(100), victim.recv_from(&mut buf));
        assert!(quiet.await.is_err(), "a datagram reached a denied peer");
        // Inbound from it: dropped; close() then ends the reader.
        victim.send_to(b"y", relay_addr).await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(100), conn.recv_from(&mut buf));
        assert!(
            read.await.is_err(),
            "a datagram from a denied peer was delivered"
        );
        assert_eq!(registry.denied_datagrams.load(Ordering::Relaxed), 2);
        conn.close().await.unwrap();
        assert!(conn.recv_from(&mut buf).await.is_err());
        drop(conn);
        assert_eq!(registry.total(), 0);
    }
}
