//! The optional embedded STUN/TURN server (UDP, with optional TCP and TLS fronts), built
//! on the `turn` 0.17 crate.
//!
//! One public host can then offer signaling and relaying with no other software. The
//! credentials are the TURN REST ones `welcome` already hands out, so coturn with
//! `use-auth-secret` and the same secret can replace it without any other change.
//!
//! Pieces, all in front of or beside the crate (it has no hooks for them):
//! - [`auth`]: `expiry:id` usernames, expiry check, long-term key from the secret.
//! - [`gate`]: the listener socket wrapper: 403 for denied peers, quotas, lifetime ceiling.
//! - [`relay`]: relay sockets from a port range at the public IP; the peer filter on every
//!   datagram; allocation counting.
//! - [`peers`]: the denied peer ranges and `--turn-allow-peer` exceptions.
//! - [`stream`]: TURN over TCP (`--turn-listen-tcp`) and TLS (`--turn-listen-tls`), each
//!   stream bridged to the UDP listener on this host (the crate handles UDP 5-tuples only).
//! - [`framing`]: STUN/ChannelData messages over a byte stream (also used by the client).

pub mod auth;
pub mod framing;
pub mod gate;
pub mod peers;
pub mod relay;
pub mod stream;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use tokio::net::UdpSocket;
use tracing::{info, warn};

use crate::tls::ServerTls;
use crate::turn::{IceConfig, TurnCredentials};
use auth::RestAuth;
use gate::{CRATE_MAX_LIFETIME, Gate};
use peers::{PeerPolicy, PeerRange};
use relay::{Registry, RelayGenerator};
use stream::{Fronts, Origins, StreamLimits, Transport};

/// The embedded TURN server's flags (one group of `signaling-server --help`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Embedded STUN/TURN server (UDP, TCP, TLS)")]
pub struct TurnServerConfig {
    /// Runs a STUN/TURN server on this UDP address (e.g. 0.0.0.0:3478); off by default.
    /// `welcome` and /api/ice-servers then list stun: and turn: URLs for it, with
    /// credentials from --turn-secret/--turn-secret-file (or a random per-process secret).
    #[arg(id = "turn_listen", long = "turn-listen", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Public IP of this host: announced as the relay address and in the URLs. Needed when
    /// --turn-listen is a wildcard address (`0.0.0.0` or `[::]`).
    #[arg(id = "turn_public_ip", long = "turn-public-ip", value_name = "IP")]
    pub public_ip: Option<IpAddr>,

    /// TURN realm (part of the long-term key; coturn's `realm`).
    #[arg(
        id = "turn_realm",
        long = "turn-realm",
        value_name = "REALM",
        default_value = "duet"
    )]
    pub realm: String,

    /// Lowest UDP port for relay addresses.
    #[arg(
        id = "turn_min_port",
        long = "turn-min-port",
        value_name = "PORT",
        default_value_t = 49152
    )]
    pub min_port: u16,

    /// Highest UDP port for relay addresses (inclusive).
    #[arg(
        id = "turn_max_port",
        long = "turn-max-port",
        value_name = "PORT",
        default_value_t = 65535
    )]
    pub max_port: u16,

    /// Most allocations one user (the `<id>` of `<expiry>:<id>`) holds at once; 0 = no limit.
    #[arg(
        id = "turn_user_quota",
        long = "turn-user-quota",
        value_name = "N",
        default_value_t = 10
    )]
    pub user_quota: usize,

    /// Most allocations held at once in total; 0 = no limit.
    #[arg(
        id = "turn_total_quota",
        long = "turn-total-quota",
        value_name = "N",
        default_value_t = 1000
    )]
    pub total_quota: usize,

    /// Longest lifetime granted to an allocation per Allocate/Refresh (clients refresh
    /// before it ends). At most 59m59s.
    #[arg(
        id = "turn_allocation_lifetime",
        long = "turn-allocation-lifetime",
        value_name = "DURATION",
        default_value = "10m",
        value_parser = humantime::parse_duration
    )]
    pub allocation_lifetime: Duration,

    /// Peer range the relay may reach although it is loopback, private, link-local,
    /// multicast or reserved (repeatable), e.g. 127.0.0.0/8 for tests or 10.0.0.0/8 on a LAN.
    #[arg(id = "turn_allow_peer", long = "turn-allow-peer", value_name = "CIDR")]
    pub allow_peers: Vec<PeerRange>,

    /// Also offers TURN over TCP on this address (e.g. 0.0.0.0:3478), for networks that
    /// block UDP: `turn:HOST:PORT?transport=tcp`. Needs --turn-listen.
    #[arg(id = "turn_listen_tcp", long = "turn-listen-tcp", value_name = "ADDR")]
    pub listen_tcp: Option<SocketAddr>,

    /// Also offers TURN over TLS on this address (e.g. 0.0.0.0:5349, or :443 on an IP of
    /// its own), with --tls-cert/--tls-key: `turns:HOST:PORT?transport=tcp`. Needs
    /// --turn-listen.
    #[arg(id = "turn_listen_tls", long = "turn-listen-tls", value_name = "ADDR")]
    pub listen_tls: Option<SocketAddr>,

    /// Host name in the turns: URL: a name the TLS certificate is valid for. Default: the
    /// public IP (which the certificate then must name).
    #[arg(id = "turn_tls_host", long = "turn-tls-host", value_name = "NAME")]
    pub tls_host: Option<String>,

    /// Most TCP/TLS streams open at once (both fronts together); 0 = no limit.
    #[arg(
        id = "turn_max_streams",
        long = "turn-max-streams",
        value_name = "N",
        default_value_t = 1000
    )]
    pub max_streams: usize,

    /// Most TCP/TLS streams open at once from one IP address; 0 = no limit.
    #[arg(
        id = "turn_max_streams_per_ip",
        long = "turn-max-streams-per-ip",
        value_name = "N",
        default_value_t = 20
    )]
    pub max_streams_per_ip: usize,

    /// How long a new TCP/TLS stream has for its TLS handshake and first whole message.
    #[arg(
        id = "turn_stream_setup_timeout",
        long = "turn-stream-setup-timeout",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    pub stream_setup_timeout: Duration,
}

impl Default for TurnServerConfig {
    /// The flags' defaults (TURN off), as in `Config::default().turn_server`.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            turn: TurnServerConfig,
        }
        // Every flag has a default, so parsing an empty command line cannot fail.
        <Only as clap::Parser>::try_parse_from(["turn"])
            .expect("defaults parse")
            .turn
    }
}

/// The embedded TURN server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("--turn-public-ip is required when --turn-listen is a wildcard address")]
    NoPublicIp,
    #[error("--turn-public-ip and --turn-listen must both be IPv4 or both IPv6")]
    FamilyMismatch,
    #[error("the relay port range --turn-min-port..--turn-max-port is empty or starts at 0")]
    PortRange,
    #[error("--turn-allocation-lifetime must be between 30s and 59m59s")]
    Lifetime,
    #[error("--turn-realm must not be empty")]
    EmptyRealm,
    #[error(
        "the embedded TURN server needs shared-secret credentials (--turn-secret), \
         not --turn-username/--turn-password"
    )]
    StaticCredentials,
    #[error("cannot listen for TURN on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the TURN server: {0}")]
    Turn(#[from] turn::Error),
    #[error(
        "--turn-listen-tcp and --turn-listen-tls need --turn-listen (the UDP server they front)"
    )]
    StreamWithoutUdp,
    #[error("--turn-listen-tls needs --tls-cert and --tls-key")]
    TlsWithoutCertificate,
    #[error("--turn-stream-setup-timeout must be between 100ms and 5m")]
    SetupTimeout,
}

impl TurnServerConfig {
    /// Checks the flags; returns the address announced to clients.
    fn public_ip(&self, listen: SocketAddr) -> Result<IpAddr, TurnError> {
        let public = match self.public_ip {
            Some(ip) => ip,
            None if listen.ip().is_unspecified() => return Err(TurnError::NoPublicIp),
            None => listen.ip(),
        };
        if public.is_ipv4() != listen.is_ipv4() {
            return Err(TurnError::FamilyMismatch);
        }
        if self.min_port == 0 || self.max_port < self.min_port {
            return Err(TurnError::PortRange);
        }
        if self.allocation_lifetime < Duration::from_secs(30)
            || self.allocation_lifetime >= CRATE_MAX_LIFETIME
        {
            return Err(TurnError::Lifetime);
        }
        if self.realm.is_empty() {
            return Err(TurnError::EmptyRealm);
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(300))
            .contains(&self.stream_setup_timeout)
        {
            return Err(TurnError::SetupTimeout);
        }
        Ok(public)
    }

    /// The limits of the TCP/TLS fronts. Idle: a client holding an allocation refreshes
    /// it within the lifetime ceiling, so a minute more than that.
    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            max_streams: self.max_streams,
            max_streams_per_ip: self.max_streams_per_ip,
            setup_timeout: self.stream_setup_timeout,
            idle_timeout: self.allocation_lifetime + Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A running embedded TURN server.
pub struct TurnServer {
    server: turn::server::Server,
    local_addr: SocketAddr,
    public_addr: SocketAddr,
    registry: Arc<Registry>,
    gate: std::sync::Weak<Gate>,
    fronts: Fronts,
    tcp_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer")
            .field("local_addr", &self.local_addr)
            .field("public_addr", &self.public_addr)
            .field("allocations", &self.allocations())
            .finish_non_exhaustive()
    }
}

impl TurnServer {
    /// Starts the server if `settings.listen` is set, and adds its `stun:`/`turn:` URLs to
    /// `ice` (taking the secret from it, or putting a random one there if it has none):
    /// UDP first, then TCP and TLS when their fronts are on. `tls`: the server's
    /// certificate, for `--turn-listen-tls`.
    pub async fn start_for(
        settings: &TurnServerConfig,
        ice: &mut IceConfig,
        credential_lifetime: Duration,
        tls: Option<&Arc<ServerTls>>,
    ) -> Result<Option<TurnServer>, TurnError> {
        let Some(listen) = settings.listen else {
            if settings.listen_tcp.is_some() || settings.listen_tls.is_some() {
                return Err(TurnError::StreamWithoutUdp);
            }
            return Ok(None);
        };
        let secret = match &ice.credentials {
            TurnCredentials::Secret { secret, .. } => secret.clone(),
            TurnCredentials::Static { .. } => return Err(TurnError::StaticCredentials),
            TurnCredentials::None => {
                info!("no TURN secret given: using a random one for this process");
                let secret = crate::ids::random_chars(32).into_bytes();
                ice.credentials = TurnCredentials::Secret {
                    secret: secret.clone(),
                    lifetime: credential_lifetime,
                };
                secret
            }
        };
        let server = TurnServer::start(settings, listen, secret, tls).await?;
        let ip = match server.public_addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let host = format!("{ip}:{}", server.public_addr.port());
        ice.stun_urls.push(format!("stun:{host}"));
        ice.turn_urls.push(format!("turn:{host}?transport=udp"));
        if let Some(tcp) = server.tcp_addr {
            ice.turn_urls
                .push(format!("turn:{ip}:{}?transport=tcp", tcp.port()));
        }
        if let Some(tls) = server.tls_addr {
            let name = settings.tls_host.as_deref().unwrap_or(&ip);
            ice.turn_urls
                .push(format!("turns:{name}:{}?transport=tcp", tls.port()));
        }
        Ok(Some(server))
    }

    /// Binds `listen` (and the TCP/TLS fronts' addresses) and starts relaying with
    /// credentials minted from `secret`.
    pub async fn start(
        settings: &TurnServerConfig,
        listen: SocketAddr,
        secret: Vec<u8>,
        tls: Option<&Arc<ServerTls>>,
    ) -> Result<TurnServer, TurnError> {
        let public_ip = settings.public_ip(listen)?;
        let tls = match (settings.listen_tls, tls) {
            (Some(_), None) => return Err(TurnError::TlsWithoutCertificate),
            (_, tls) => tls.cloned(),
        };
        let bind_tcp = |addr: SocketAddr| async move {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| TurnError::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| TurnError::Bind { addr, source })?;
            Ok::<_, TurnError>((listener, local))
        };
        let tcp = match settings.listen_tcp {
            Some(addr) => Some(bind_tcp(addr).await?),
            None => None,
        };
        let tls_listener = match settings.listen_tls {
            Some(addr) => Some(bind_tcp(addr).await?),
            None => None,
        };
        let socket = UdpSocket::bind(listen)
            .await
            .map_err(|source| TurnError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| TurnError::Bind {
            addr: listen,
            source,
        })?;
        let policy = Arc::new(PeerPolicy::new(
            &settings.allow_peers,
            &[public_ip, local_addr.ip()],
        ));
        let registry = Arc::new(Registry::new(settings.user_quota, settings.total_quota));
        let pending = Arc::new(Mutex::new(None));
        let auth = RestAuth::new(secret);
        let auth_for_fronts = auth.clone();
        let origins = Arc::new(Origins::default());
        let gate = Arc::new(Gate {
            socket,
            unauthenticated: Default::default(),
            auth: auth.clone(),
            realm: settings.realm.clone(),
            policy: Arc::clone(&policy),
            registry: Arc::clone(&registry),
            pending: Arc::clone(&pending),
            max_lifetime: settings.allocation_lifetime,
            origins: Arc::clone(&origins),
        });
        let generator = RelayGenerator {
            bind_ip: local_addr.ip(),
            public_ip,
            min_port: settings.min_port,
            max_port: settings.max_port,
            policy,
            registry: Arc::clone(&registry),
            pending,
        };
        let weak_gate = Arc::downgrade(&gate);
        let server = turn::server::Server::new(turn::server::config::ServerConfig {
            conn_configs: vec![turn::server::config::ConnConfig {
                conn: gate,
                relay_addr_generator: Box::new(generator),
            }],
            realm: settings.realm.clone(),
            auth_handler: Arc::new(auth),
            channel_bind_timeout: Duration::ZERO,
            alloc_close_notify: None,
        })
        .await?;
        let public_addr = SocketAddr::new(public_ip, local_addr.port());
        info!(
            %local_addr,
            %public_addr,
            relay_ports = %format!("{}-{}", settings.min_port, settings.max_port),
            realm = %settings.realm,
            allowed_peers = ?settings.allow_peers.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "embedded TURN server listening (UDP)"
        );
        let fronts = Fronts::new(
            local_addr,
            settings.stream_limits(),
            origins,
            auth_for_fronts,
        );
        let tcp_addr = tcp.map(|(listener, addr)| {
            fronts.serve(listener, Transport::Tcp);
            addr
        });
        let tls_addr = match (tls_listener, tls) {
            (Some((listener, addr)), Some(tls)) => {
                fronts.serve(listener, Transport::Tls(tls));
                Some(addr)
            }
            _ => None,
        };
        Ok(TurnServer {
            server,
            local_addr,
            public_addr,
            registry,
            gate: weak_gate,
            fronts,
            tcp_addr,
            tls_addr,
        })
    }

    /// The TCP front's address, when it runs (`--turn-listen-tcp`).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The TLS front's address, when it runs (`--turn-listen-tls`).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// TCP/TLS streams open now.
    pub fn open_streams(&self) -> usize {
        self.fronts.open_streams()
    }

    /// The UDP address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address clients are told (public IP, bound port).
    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// Allocations alive now.
    pub fn allocations(&self) -> usize {
        self.registry.total()
    }

    /// Datagrams dropped so far because their peer address is denied.
    pub fn denied_datagrams(&self) -> u64 {
        self.registry
            .denied_datagrams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every allocation and the listener; returns once their sockets are closed
    /// (or after 2 s at most).
    pub async fn stop(self) {
        self.fronts.stop(Duration::from_secs(1)).await;
        if let Err(e) = self.server.close().await {
            warn!(error = %e, "closing the TURN server");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while (self.registry.total() > 0 || self.gate.strong_count() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        info!(addr = %self.local_addr, "embedded TURN server stopped");
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::Config;

    #[test]
    fn flags_parse_and_defaults_agree() {
        let c = Config::try_parse_from([
            "signaling-server",
            "--turn-listen",
            "0.0.0.0:3478",
            "--turn-public-ip",
            "203.0.113.10",
            "--turn-min-port",
            "50000",
            "--turn-max-port",
            "50999",
            "--turn-allocation-lifetime",
            "5m",
            "--turn-allow-peer",
            "10.0.0.0/8",
            "--turn-allow-peer",
            "127.0.0.1",
        ])
        .unwrap();
        let t = &c.turn_server;
        assert_eq!(t.listen, Some("0.0.0.0:3478".parse().unwrap()));
        assert_eq!(
            t.public_ip(t.listen.unwrap()).unwrap().to_string(),
            "203.0.113.10"
        );
        assert_eq!((t.min_port, t.max_port), (50000, 50999));
        assert_eq!(t.allocation_lifetime, Duration::from_secs(300));
        assert_eq!(t.allow_peers.len(), 2);
        assert!(Config::try_parse_from(["s", "--turn-allow-peer", "nope"]).is_err());
        let d = TurnServerConfig::default();
        assert_eq!(
            format!("{d:?}"),
            format!("{:?}", Config::default().turn_server)
        );
        assert_eq!(d.listen, None);
        assert!(matches!(
            d.public_ip("0.0.0.0:3478".parse().unwrap()),
            Err(TurnError::NoPublicIp)
        ));
    }
}
