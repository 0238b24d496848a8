//! The listener wrapper: looks at each STUN request before `turn` 0.17 handles it.
//!
//! The crate has no hooks for peer filtering, quotas or a lifetime ceiling, but it reads
//! every datagram through the `Conn` it is given. [`Gate`] is that `Conn`. For requests
//! that carry valid credentials (checked exactly as the crate does, with the same key) it
//! - answers CreatePermission/ChannelBind naming a denied peer with 403 Forbidden, and
//!   drops Send indications to one (indications get no answer);
//! - answers an Allocate over quota with 486 (per user) or 508 (in total);
//! - lowers the LIFETIME of Allocate/Refresh to `--turn-allocation-lifetime`, re-signing
//!   the request with the key so the crate accepts it and grants the lowered value;
//! - tells the relay generator whose Allocate is being handled ([`PendingUser`]).
//!
//! Unauthenticated Allocate/Refresh/CreatePermission/ChannelBind requests pass to the
//! crate (it answers 401 with a nonce, or 400/438) only within [`UnauthenticatedLimit`]:
//! the crate remembers every nonce it hands out and forgets one only when a client
//! presents it again, so a flood of them from spoofed sources would grow the server's
//! memory without end (verified: turn 0.17.2 `Request::respond_with_nonce`). The limit
//! bounds that growth by time; a client with valid credentials is never limited. Clients
//! of the TCP/TLS fronts are counted by their own IP ([`Origins`]), not the bridge's.
//!
//! Everything else (ChannelData, Binding) passes untouched. ChannelData, the bulk of the
//! traffic, is recognised by its first byte and costs nothing here.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use stun::attributes::{
    ATTR_FINGERPRINT, ATTR_LIFETIME, ATTR_MESSAGE_INTEGRITY, ATTR_REALM, ATTR_USERNAME,
    ATTR_XOR_PEER_ADDRESS,
};
use stun::error_code::{
    CODE_ALLOC_QUOTA_REACHED, CODE_FORBIDDEN, CODE_INSUFFICIENT_CAPACITY, ErrorCode,
    ErrorCodeAttribute,
};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, Getter as _, METHOD_ALLOCATE,
    METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND, Message,
    MessageType, Setter,
};
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use tracing::debug;
use turn::proto::chandata::ChannelData;
use turn::proto::lifetime::{DEFAULT_LIFETIME, Lifetime};
use webrtc_util::Conn;

use super::auth::{RestAuth, user_of};
use super::peers::PeerPolicy;
use super::relay::{PendingUser, QuotaError, Registry};
use super::stream::Origins;

/// The crate grants a requested LIFETIME only below this; otherwise its default (10 min).
pub const CRATE_MAX_LIFETIME: Duration = Duration::from_secs(3600);

const MAGIC_COOKIE: u32 = 0x2112_A442;

/// What to do with one datagram from a client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Replace(Vec<u8>),
    Reply(Vec<u8>),
    Drop,
}

/// Token buckets for unauthenticated requests: one per source address and one for all.
#[derive(Debug)]
pub struct UnauthenticatedLimit {
    inner: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    all: Bucket,
    by_source: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, burst: f64, per_second: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for UnauthenticatedLimit {
    fn default() -> Self {
        UnauthenticatedLimit {
            inner: Mutex::new(Buckets {
                all: Bucket {
                    tokens: Self::ALL_BURST,
                    at: Instant::now(),
                },
                by_source: HashMap::new(),
            }),
        }
    }
}

impl UnauthenticatedLimit {
    /// Per source: a client needs one or two (its first Allocate, and one after a nonce
    /// goes stale) per allocation.
    pub const SOURCE_BURST: f64 = 10.0;
    pub const SOURCE_PER_SECOND: f64 = 2.0;
    /// For all sources together.
    pub const ALL_BURST: f64 = 200.0;
    pub const ALL_PER_SECOND: f64 = 50.0;
    /// Sources remembered at most (idle ones are forgotten first).
    const MAX_SOURCES: usize = 10_000;

    /// Whether one more unauthenticated request from `source` may reach the crate.
    pub fn admit(&self, source: IpAddr, now: Instant) -> bool {
        let mut b = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if b.by_source.len() >= Self::MAX_SOURCES && !b.by_source.contains_key(&source) {
            // Forget the sources whose buckets are full again (idle for a while).
            let refill = Duration::from_secs_f64(Self::SOURCE_BURST / Self::SOURCE_PER_SECOND);
            b.by_source
                .retain(|_, bucket| now.saturating_duration_since(bucket.at) < refill);
            if b.by_source.len() >= Self::MAX_SOURCES {
                return false;
            }
        }
        let own = b.by_source.entry(source).or_insert(Bucket {
            tokens: Self::SOURCE_BURST,
            at: now,
        });
        if !own.take(now, Self::SOURCE_BURST, Self::SOURCE_PER_SECOND) {
            return false;
        }
        b.all.take(now, Self::ALL_BURST, Self::ALL_PER_SECOND)
    }
}

/// The TURN listener socket as the crate sees it.
#[derive(Debug)]
pub struct Gate {
    pub socket: UdpSocket,
    /// How many unauthenticated requests may reach the crate.
    pub unauthenticated: UnauthenticatedLimit,
    pub auth: RestAuth,
    pub realm: String,
    pub policy: Arc<PeerPolicy>,
    pub registry: Arc<Registry>,
    pub pending: PendingUser,
    pub max_lifetime: Duration,
    /// The real clients behind the TCP/TLS fronts' bridge sockets.
    pub origins: Arc<Origins>,
}

impl Gate {
    fn permitted(&self, peer: SocketAddr) -> bool {
        self.policy.permits(peer.ip()) || self.registry.is_own_relay(peer)
    }

    pub(crate) fn inspect(&self, datagram: &[u8], src: SocketAddr) -> Verdict {
        // Classified exactly as the crate does: what it takes for ChannelData passes
        // (cheap, the bulk of the traffic); anything else it decodes as STUN, masking the
        // two top bits of the type, so a "STUN" message with those bits set (RFC 5389
        // says they are zero) would reach it as, say, an Allocate without being looked
        // at here. Those are dropped.
        if ChannelData::is_channel_data(datagram) {
            return Verdict::Pass;
        }
        if datagram.first().is_some_and(|b| b & 0xC0 != 0) {
            debug!(%src, "datagram neither ChannelData nor STUN dropped");
            return Verdict::Drop;
        }
        let mut m = Message::new();
        m.raw = datagram.to_vec();
        if m.decode().is_err() {
            return Verdict::Pass;
        }
        let (class, method) = (m.typ.class, m.typ.method);
        if class == CLASS_INDICATION && method == METHOD_SEND {
            return if self.peers_permitted(&m) {
                Verdict::Pass
            } else {
                debug!(%src, "Send indication to a denied peer dropped");
                Verdict::Drop
            };
        }
        let watched = [
            METHOD_ALLOCATE,
            METHOD_REFRESH,
            METHOD_CREATE_PERMISSION,
            METHOD_CHANNEL_BIND,
        ];
        if class != CLASS_REQUEST || !watched.contains(&method) {
            return Verdict::Pass;
        }
        if method == METHOD_ALLOCATE {
            self.set_pending(None);
        }
        let Some((username, key)) = self.authenticated(&m) else {
            // The crate answers: 401 with a nonce (which it keeps), or 400 for bad
            // credentials; within the limit.
            // A stream client is counted as itself, not as the bridge's loopback address.
            let source = self.origins.client_of(src).unwrap_or(src.ip());
            if !self.unauthenticated.admit(source, Instant::now()) {
                debug!(%src, "unauthenticated request over the limit dropped");
                return Verdict::Drop;
            }
            return Verdict::Pass;
        };
        if method == METHOD_CREATE_PERMISSION || method == METHOD_CHANNEL_BIND {
            if self.peers_permitted(&m) {
                return Verdict::Pass;
            }
            debug!(%src, user = user_of(&username), "permission for a denied peer refused");
            return reply(&m, CODE_FORBIDDEN, b"Forbidden: peer address denied", &key);
        }
        if method == METHOD_ALLOCATE {
            if let Err(e) = self.registry.check(user_of(&username)) {
                debug!(%src, user = user_of(&username), reason = %e, "allocation refused");
                return match e {
                    QuotaError::User => reply(
                        &m,
                        CODE_ALLOC_QUOTA_REACHED,
                        b"Allocation Quota Reached",
                        &key,
                    ),
                    QuotaError::Total => reply(
                        &m,
                        CODE_INSUFFICIENT_CAPACITY,
                        b"Insufficient Capacity",
                        &key,
                    ),
                };
            }
            self.set_pending(Some(username));
        }
        match self.lowered_lifetime(&m) {
            Some(lifetime) => match with_lifetime(&m, lifetime, &key) {
                Ok(raw) => Verdict::Replace(raw),
                Err(e) => {
                    debug!(%src, error = %e, "cannot rewrite LIFETIME; request dropped");
                    Verdict::Drop
                }
            },
            None => Verdict::Pass,
        }
    }

    fn set_pending(&self, user: Option<String>) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = user;
    }

    /// (username, key) when the request's MESSAGE-INTEGRITY verifies with our key.
    fn authenticated(&self, m: &Message) -> Option<(String, Vec<u8>)> {
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return None;
        }
        let username = TextAttribute::get_from_as(m, ATTR_USERNAME).ok()?.text;
        let realm = TextAttribute::get_from_as(m, ATTR_REALM).ok()?.text;
        let key = self.auth.key(&username, &realm, SystemTime::now()).ok()?;
        // Constant-time comparison inside (stun's check_hmac uses `subtle`).
        MessageIntegrity(key.clone()).check(&mut m.clone()).ok()?;
        Some((username, key))
    }

    /// Every XOR-PEER-ADDRESS is a permitted peer (an unreadable one is not).
    fn peers_permitted(&self, m: &Message) -> bool {
        m.attributes
            .0
            .iter()
            .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
            .all(|a| xor_address(&a.value, &m.transaction_id.0).is_some_and(|p| self.permitted(p)))
    }

    /// The lifetime to grant instead, when the crate would grant more than our ceiling.
    fn lowered_lifetime(&self, m: &Message) -> Option<Duration> {
        let mut requested = Lifetime::default();
        let granted = match requested.get_from(m) {
            Ok(()) if requested.0 < CRATE_MAX_LIFETIME => requested.0,
            _ => DEFAULT_LIFETIME,
        };
        // A zero Refresh deletes the allocation; never turn that into a refresh.
        (granted > self.max_lifetime && !(m.contains(ATTR_LIFETIME) && requested.0.is_zero()))
            .then_some(self.max_lifetime)
    }
}

/// Decodes an XOR-PEER-ADDRESS value the way `stun` 0.17 does (short addresses are padded
/// with zeros), so the address judged here is the one the crate would use.
fn xor_address(v: &[u8], transaction_id: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() <= 4 {
        return None;
    }
    let family = u16::from_be_bytes([v[0], v[1]]);
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(transaction_id);
    let raw = &v[4..];
    let ip = match family {
        1 if raw.len() <= 4 => {
            let mut ip = [0u8; 4];
            for (i, b) in raw.iter().enumerate() {
                ip[i] = b ^ mask[i];
            }
            IpAddr::V4(Ipv4Addr::from(ip))
        }
        2 if raw.len() <= 16 => {
            let mut ip = [0u8; 16];
            for (i, b) in raw.iter().enumerate() {
                ip[i] = b ^ mask[i];
            }
            IpAddr::V6(Ipv6Addr::from(ip))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// An error response to `m`, signed with `key` (RFC 5389 §10.2.2: errors other than
/// 400/401/420/438 to an authenticated request carry MESSAGE-INTEGRITY).
fn reply(m: &Message, code: ErrorCode, reason: &[u8], key: &[u8]) -> Verdict {
    let mut out = Message::new();
    let setters: [Box<dyn Setter>; 5] = [
        Box::new(m.transaction_id),
        Box::new(MessageType::new(m.typ.method, CLASS_ERROR_RESPONSE)),
        Box::new(ErrorCodeAttribute {
            code,
            reason: reason.to_vec(),
        }),
        Box::new(MessageIntegrity(key.to_vec())),
        Box::new(FINGERPRINT),
    ];
    match out.build(&setters) {
        Ok(()) => Verdict::Reply(out.raw),
        Err(_) => Verdict::Drop,
    }
}

/// `m` with its LIFETIME set to `lifetime`, re-signed with `key`.
fn with_lifetime(m: &Message, lifetime: Duration, key: &[u8]) -> Result<Vec<u8>, stun::Error> {
    let mut out = Message::new();
    out.typ = m.typ;
    out.transaction_id = m.transaction_id;
    out.write_header();
    for a in &m.attributes.0 {
        if a.typ == ATTR_MESSAGE_INTEGRITY {
            break;
        }
        if a.typ != ATTR_LIFETIME && a.typ != ATTR_FINGERPRINT {
            out.add(a.typ, &a.value);
        }
    }
    Lifetime(lifetime).add_to(&mut out)?;
    MessageIntegrity(key.to_vec()).add_to(&mut out)?;
    FINGERPRINT.add_to(&mut out)?;
    Ok(out.raw)
}

#[async_trait]
impl Conn for Gate {
    async fn connect(&self, _addr: SocketAddr) -> Result<(), webrtc_util::Error> {
        Err(webrtc_util::Error::Other(
            "the TURN listener does not connect".into(),
        ))
    }

    async fn recv(&self, _buf: &mut [u8]) -> Result<usize, webrtc_util::Error> {
        Err(webrtc_util::Error::Other("use recv_from".into()))
    }

    async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), webrtc_util::Error> {
        loop {
            let (n, src) = self.socket.recv_from(buf).await?;
            match self.inspect(&buf[..n], src) {
                Verdict::Pass => return Ok((n, src)),
                Verdict::Replace(raw) if raw.len() <= buf.len() => {
                    buf[..raw.len()].copy_from_slice(&raw);
                    return Ok((raw.len(), src));
                }
                Verdict::Replace(_) | Verdict::Drop => {}
                Verdict::Reply(raw) => {
                    if let Err(e) = self.socket.send_to(&raw, src).await {
                        debug!(%src, error = %e, "cannot send a TURN error response");
                    }
                }
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> Result<usize, webrtc_util::Error> {
        Err(webrtc_util::Error::Other("use send_to".into()))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> Result<usize, webrtc_util::Error> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> Result<SocketAddr, webrtc_util::Error> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> Result<(), webrtc_util::Error> {
        // Deliberately nothing: the crate calls this from every allocation's close (it is
        // each allocation's `turn_socket`). The socket closes when the crate drops it.
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use stun::xoraddr::XorMappedAddress;

    use super::*;

    #[test]
    fn unauthenticated_requests_are_limited_per_source_and_in_total() {
        let limit = UnauthenticatedLimit::default();
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let admitted = (0..100).filter(|_| limit.admit(a, t0)).count();
        assert_eq!(admitted, UnauthenticatedLimit::SOURCE_BURST as usize);
        // Refilled at its rate.
        let later = t0 + Duration::from_secs(1);
        let admitted = (0..100).filter(|_| limit.admit(a, later)).count();
        assert_eq!(admitted, UnauthenticatedLimit::SOURCE_PER_SECOND as usize);
        // Many sources (spoofed): the total holds.
        let limit = UnauthenticatedLimit::default();
        let admitted = (0..5_000u32)
            .filter(|i| limit.admit(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)), t0))
            .count();
        assert_eq!(admitted, UnauthenticatedLimit::ALL_BURST as usize);
    }

    #[test]
    fn xor_peer_address_decodes_like_stun() {
        for addr in ["10.0.0.1:3478", "[fe80::1]:9", "203.0.113.5:65535"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut m = Message::new();
            m.new_transaction_id().unwrap();
            XorMappedAddress {
                ip: addr.ip(),
                port: addr.port(),
            }
            .add_to_as(&mut m, ATTR_XOR_PEER_ADDRESS)
            .unwrap();
            let v = m.get(ATTR_XOR_PEER_ADDRESS).unwrap();
            assert_eq!(xor_address(&v, &m.transaction_id.0), Some(addr));
        }
        assert_eq!(xor_address(&[0, 1, 0, 0], &[0; 12]), None);
        assert_eq!(xor_address(&[0, 3, 0, 0, 1, 2, 3, 4], &[0; 12]), None);
    }

    #[test]
    fn lifetime_rewrite_is_signed_with_the_key() {
        let key = b"0123456789abcdef".to_vec();
        let mut m = Message::new();
        let setters: [Box<dyn Setter>; 5] = [
            Box::new(stun::agent::TransactionId::new()),
            Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            Box::new(Lifetime(Duration::from_secs(3000))),
            Box::new(MessageIntegrity(key.clone())),
            Box::new(FINGERPRINT),
        ];
        m.build(&setters).unwrap();
        let raw = with_lifetime(&m, Duration::from_secs(120), &key).unwrap();
        let mut out = Message::new();
        out.raw = raw;
        out.decode().unwrap();
        let mut lifetime = Lifetime::default();
        lifetime.get_from(&out).unwrap();
        assert_eq!(lifetime.0, Duration::from_secs(120));
        assert_eq!(out.transaction_id, m.transaction_id);
        MessageIntegrity(key).check(&mut out.clone()).unwrap();
        assert!(MessageIntegrity(b"wrong".to_vec()).check(&mut out).is_err());
    }
}
