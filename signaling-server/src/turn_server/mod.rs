//! The optional embedded STUN/TURN server (UDP), built on the `turn` 0.17 crate.
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
//!
//! TCP/TLS transports to the server are not offered: `turn` 0.17's server handles UDP
//! 5-tuples only. Clients that can only use TCP need coturn (see `docs/DEPLOY.md`).

pub mod auth;
pub mod gate;
pub mod peers;
pub mod relay;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use tokio::net::UdpSocket;
use tracing::{info, warn};

use crate::turn::{IceConfig, TurnCredentials};
use auth::RestAuth;
use gate::{CRATE_MAX_LIFETIME, Gate};
use peers::{PeerPolicy, PeerRange};
use relay::{Registry, RelayGenerator};

/// The embedded TURN server's flags (one group of `signaling-server --help`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Embedded STUN/TURN server (UDP)")]
pub struct TurnServerConfig {
    /// Runs a STUN/TURN server on this UDP address (e.g. 0.0.0.0:3478); off by default.
    /// `welcome` and /api/ice-servers then list stun: and turn: URLs for it, with
    /// credentials from --turn-secret/--turn-secret-file (or a random per-process secret).
    #[arg(id = "turn_listen", long = "turn-listen", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Public IP of this host: announced as the relay address and in the URLs. Needed when
    /// --turn-listen is a wildcard address (0.0.0.0 or [::]).
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
        Ok(public)
    }
}

/// A running embedded TURN server.
pub struct TurnServer {
    server: turn::server::Server,
    local_addr: SocketAddr,
    public_addr: SocketAddr,
    registry: Arc<Registry>,
    gate: std::sync::Weak<Gate>,
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
    /// `ice` (taking the secret from it, or putting a random one there if it has none).
    pub async fn start_for(
        settings: &TurnServerConfig,
        ice: &mut IceConfig,
        credential_lifetime: Duration,
    ) -> Result<Option<TurnServer>, TurnError> {
        let Some(listen) = settings.listen else {
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
        let server = TurnServer::start(settings, listen, secret).await?;
        let host = match server.public_addr {
            SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        ice.stun_urls.push(format!("stun:{host}"));
        ice.turn_urls.push(format!("turn:{host}?transport=udp"));
        Ok(Some(server))
    }

    /// Binds `listen` and starts relaying with credentials minted from `secret`.
    pub async fn start(
        settings: &TurnServerConfig,
        listen: SocketAddr,
        secret: Vec<u8>,
    ) -> Result<TurnServer, TurnError> {
        let public_ip = settings.public_ip(listen)?;
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
        let gate = Arc::new(Gate {
            socket,
            unauthenticated: Default::default(),
            auth: auth.clone(),
            realm: settings.realm.clone(),
            policy: Arc::clone(&policy),
            registry: Arc::clone(&registry),
            pending: Arc::clone(&pending),
            max_lifetime: settings.allocation_lifetime,
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
        Ok(TurnServer {
            server,
            local_addr,
            public_addr,
            registry,
            gate: weak_gate,
        })
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
