//! Server settings: the command line of `signaling-server`, and the same struct for
//! embedding (`Config::default()` is exactly the command line with no flags).
//!
//! Defaults are chosen for a public host: the protocol's message and rate limits, a
//! connection cap, pings every 10 s with a 30 s timeout, and TURN credentials that expire.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::core::rate_limit::RateLimit;
use crate::turn::server::TurnServerConfig;
use crate::turn::{IceConfig, TurnCredentials};

/// Duet signaling server: rooms of two, SDP/ICE relay, direct calls by name, and
/// time-limited TURN credentials, over one WebSocket endpoint (`/ws`) plus a small
/// HTTP API (`/healthz`, `/api/ice-servers`), all on one port.
#[derive(Debug, Clone, Parser)]
#[command(name = "signaling-server", version, about, long_about = None)]
pub struct Config {
    /// Address and port to listen on (HTTP and WebSocket). Use 0.0.0.0:8787 to accept
    /// connections from other machines; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,

    /// How long a room stays after its last member left (e.g. 10m, 1h). An ended room
    /// keeps refusing joins for the same time.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub room_ttl: Duration,

    /// Largest accepted message in bytes; larger ones are refused with error/too_large
    /// without being buffered.
    #[arg(long, default_value_t = 65_536)]
    pub max_message_bytes: usize,

    /// Rate limit: token bucket size (messages) per connection.
    #[arg(long, default_value_t = 200.0)]
    pub rate_burst: f64,

    /// Rate limit: tokens refilled per second per connection; 0 turns rate limiting off
    /// (for benchmarks only).
    #[arg(long, default_value_t = 50.0)]
    pub rate_per_second: f64,

    /// Rate limit: dropped messages in a row (without a 1 s pause) before the connection
    /// is closed with 1008.
    #[arg(long, default_value_t = 50)]
    pub rate_max_dropped: u32,

    /// Most WebSocket connections held at once; more get HTTP 503.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,

    /// Most WebSocket connections from one client address at once; more get HTTP 429.
    #[arg(long, default_value_t = 32)]
    pub max_connections_per_ip: usize,

    /// Most TCP connections one address may hold open while they speak HTTP (requests,
    /// keep-alive, WebSocket upgrades; an upgraded WebSocket counts for
    /// --max-connections-per-ip instead); more are answered 429 and closed at once.
    /// Connections from a --trusted-proxy are not counted.
    #[arg(long, default_value_t = 256)]
    pub max_tcp_connections_per_ip: usize,

    /// A reverse proxy in front of this server (CIDR, e.g. 10.0.0.5/32; repeatable). For
    /// connections from these addresses the client's own address is read from
    /// X-Forwarded-For (the rightmost entry that is not itself a trusted proxy), and the
    /// per-address limits count it. From anywhere else X-Forwarded-For is ignored.
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// A web page origin allowed to open the WebSocket, e.g. https://duet.example.org
    /// (repeatable). Browsers send their page's Origin; another origin gets HTTP 403. The
    /// server's own pages are always allowed, and clients that send no Origin (the app)
    /// are not affected. Without this flag any origin may connect.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,

    /// A join that would create a room while this many are held (ad-hoc and scheduled)
    /// gets error/rate_limited.
    #[arg(long, default_value_t = 100_000)]
    pub max_rooms: usize,

    /// Most new rooms one connection may create in a minute (by joining a name no room
    /// has yet); more get error/rate_limited.
    #[arg(long, default_value_t = 30)]
    pub rooms_per_minute: usize,

    /// Most new rooms all connections from one client address may create in a minute
    /// together; more get error/rate_limited.
    #[arg(long, default_value_t = 120)]
    pub rooms_per_minute_per_address: usize,

    /// Messages queued for one slow client before it is disconnected.
    #[arg(long, default_value_t = 1024)]
    pub send_queue: usize,

    /// Bytes queued for one slow client before it is disconnected (at least two of the
    /// largest messages).
    #[arg(long, default_value_t = 1024 * 1024)]
    pub send_queue_bytes: usize,

    /// Interval between WebSocket pings.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// A client silent for this long (no pong, no message) is dropped (its seat is then
    /// kept for --resume-grace).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_timeout: Duration,

    /// How long a direct call rings before call_rejected/no_answer.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ring_timeout: Duration,

    /// How long a member whose connection dropped without `leave` keeps its seat for a
    /// `resume` (the partner hears `peer_reconnecting`); 0 turns resume off (a drop is
    /// `peer_left/disconnected` at once, `joined` carries no `resume_token`).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub resume_grace: Duration,

    /// How often ring timeouts, resume grace and room expiry are checked.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// ICE server URL handed to clients in `welcome` (repeatable): stun:HOST:PORT,
    /// turn:HOST:PORT?transport=udp, turns:... TURN URLs need --turn-secret(-file) or
    /// --turn-username/--turn-password.
    #[arg(long = "ice-server", value_name = "URL")]
    pub ice_servers: Vec<String>,

    /// Shared secret for minting TURN REST credentials (coturn `use-auth-secret`).
    /// Prefer --turn-secret-file or the environment: command lines are visible to others.
    #[arg(long, env = "DUET_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<String>,

    /// File holding the TURN shared secret (surrounding whitespace ignored).
    #[arg(long, conflicts_with = "turn_secret")]
    pub turn_secret_file: Option<PathBuf>,

    /// Lifetime of minted TURN credentials.
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    pub turn_credential_lifetime: Duration,

    /// Fixed TURN username for everybody (instead of a shared secret).
    #[arg(long, requires = "turn_password", conflicts_with_all = ["turn_secret", "turn_secret_file"])]
    pub turn_username: Option<String>,

    /// Fixed TURN password (with --turn-username).
    #[arg(long, requires = "turn_username")]
    pub turn_password: Option<String>,

    /// Runtime worker threads; 0 means one per CPU core. One thread relays over 200,000
    /// messages/s and gives the lowest latency (no cross-thread wake-ups).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,

    /// SQLite database for rooms created through the HTTP API (created if missing);
    /// `:memory:` keeps them in memory only.
    #[arg(long, value_name = "PATH", default_value_os_t = default_db_path())]
    pub db: PathBuf,

    /// Run as one instance of a cluster that shares its rooms through Redis, e.g.
    /// redis://127.0.0.1:6379/0 (see docs/DEPLOY.md). Without it the server holds
    /// everything in this process. A URL with a password belongs in the environment
    /// (DUET_REDIS_URL): command lines are visible to others.
    #[arg(
        long,
        value_name = "URL",
        env = "DUET_REDIS_URL",
        hide_env_values = true
    )]
    pub redis: Option<Secret>,

    /// Base URL of this server as people reach it, for `join_url` (e.g.
    /// https://duet.example.org). Default: `http://` (`https://` with --tls-cert) plus
    /// the request's Host header.
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,

    /// How long before its `starts_at` a scheduled room can be joined.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub early_join: Duration,

    /// API key that creating and listing rooms require (`Authorization: Bearer KEY`);
    /// at least 32 characters. Without one, creating is open (rate-limited per address)
    /// and listing is refused. Prefer --api-key-file or the environment: command lines
    /// are visible to others.
    #[arg(long, env = "DUET_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// File holding the API key (surrounding whitespace ignored).
    #[arg(long, value_name = "PATH", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,

    /// HTTP API rate limit per client address: bucket size (requests).
    #[arg(long, default_value_t = 100.0)]
    pub api_rate_burst: f64,

    /// HTTP API rate limit per client address: requests refilled per second; 0 turns it
    /// off.
    #[arg(long, default_value_t = 5.0)]
    pub api_rate_per_second: f64,

    /// Rooms one client address may create per minute when no API key is set (creating
    /// is open then, so this is what keeps one client from filling the database); 0
    /// turns it off. With an API key, key holders are not limited by this.
    #[arg(long, default_value_t = 10.0)]
    pub create_rate_per_minute: f64,

    /// Rooms one client address may create at once before `--create-rate-per-minute`
    /// applies (no API key set).
    #[arg(long, default_value_t = 5.0)]
    pub create_rate_burst: f64,

    /// Deadline for a request's line and headers, counted from when the server starts
    /// waiting for them; it also closes a kept-alive connection that sends no next
    /// request (the connection is closed without an answer).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// Deadline for a request's body, counted from the end of its headers; a late body
    /// gets 408 and the connection is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_body_timeout: Duration,

    /// An HTTP connection on which no byte moves either way for this long is closed
    /// (e.g. a client that never reads its answer). Also bounds the WebSocket handshake.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,

    /// On shutdown, how long connections get to finish (WebSockets hear 1001, HTTP
    /// requests complete) before the rest are closed forcibly.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// PEM certificate chain (e.g. certbot's fullchain.pem): serve HTTPS and WSS on
    /// --listen itself, with --tls-key. Both files are read again on SIGHUP. Without it
    /// the server speaks plain HTTP/WS (put a TLS proxy in front on a public host).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert (PKCS#8, PKCS#1 or SEC1, e.g. certbot's privkey.pem).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as
    /// `signaling_server=debug`. RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log: String,

    /// The embedded STUN/TURN server (`--turn-listen` and friends; off by default).
    #[command(flatten)]
    pub turn_server: TurnServerConfig,
}

/// A secret from the command line or environment; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Shortest API key accepted.
pub const MIN_API_KEY_CHARS: usize = 32;

/// `$XDG_DATA_HOME/duet/signaling.sqlite3`, else `~/.local/share/duet/...`, else
/// `./duet-signaling.sqlite3`.
pub fn default_db_path() -> PathBuf {
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|home| home.join(".local/share"))
        });
    match data_home {
        Some(dir) => dir.join("duet").join("signaling.sqlite3"),
        None => PathBuf::from("duet-signaling.sqlite3"),
    }
}

impl Default for Config {
    fn default() -> Self {
        // Every flag has a default, so parsing an empty command line cannot fail.
        Config::try_parse_from(["signaling-server"]).expect("defaults parse")
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("ICE server URL `{0}` must start with stun:, stuns:, turn: or turns:")]
    BadIceUrl(String),
    #[error(
        "TURN URL `{0}` needs --turn-secret, --turn-secret-file or --turn-username/--turn-password"
    )]
    TurnWithoutCredentials(String),
    #[error("cannot read the TURN secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the TURN secret is empty")]
    EmptySecret,
    #[error("--max-message-bytes must be at least 1024")]
    MessageLimitTooSmall,
    #[error("--ping-interval must be shorter than --ping-timeout")]
    PingTiming,
    #[error("cannot read the API key file {path}: {source}")]
    ApiKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API key is {0} characters long; it must have at least 32")]
    ApiKeyTooShort(usize),
    #[error("--public-url `{0}` must start with http:// or https://")]
    BadPublicUrl(String),
    #[error("--{0} must be more than zero and at most a day")]
    BadTimeout(&'static str),
}

impl Config {
    /// A configuration for tests and embedding: listen on `127.0.0.1:0`, rooms in
    /// memory only (no database file), defaults otherwise.
    pub fn ephemeral() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: PathBuf::from(crate::state::store::IN_MEMORY),
            ..Config::default()
        }
    }

    /// The API key, if one is configured, checked for length.
    pub fn api_key(&self) -> Result<Option<String>, ConfigError> {
        let key = match (&self.api_key, &self.api_key_file) {
            (Some(Secret(key)), _) => key.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::ApiKeyFile {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
            (None, None) => return Ok(None),
        };
        let chars = key.chars().count();
        if chars < MIN_API_KEY_CHARS {
            return Err(ConfigError::ApiKeyTooShort(chars));
        }
        Ok(Some(key))
    }

    /// `--public-url` without a trailing `/`, checked.
    pub fn public_url(&self) -> Result<Option<String>, ConfigError> {
        match &self.public_url {
            None => Ok(None),
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                Ok(Some(url.trim_end_matches('/').to_owned()))
            }
            Some(url) => Err(ConfigError::BadPublicUrl(url.clone())),
        }
    }

    /// Checks the HTTP deadlines: a zero one would close every connection at once, and
    /// an absurdly long one would overflow the clock arithmetic of the timers.
    pub fn check_timeouts(&self) -> Result<(), ConfigError> {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (name, value) in [
            ("http-header-timeout", self.http_header_timeout),
            ("http-body-timeout", self.http_body_timeout),
            ("http-idle-timeout", self.http_idle_timeout),
            ("shutdown-grace", self.shutdown_grace),
            ("resume-grace", self.resume_grace),
        ] {
            // A zero grace is fine: stop closes every connection at once, and resume
            // is simply off.
            let zero_allowed = matches!(name, "shutdown-grace" | "resume-grace");
            if (value.is_zero() && !zero_allowed) || value > DAY {
                return Err(ConfigError::BadTimeout(name));
            }
        }
        Ok(())
    }

    /// Checks the settings and builds what `welcome` hands out.
    pub fn ice_config(&self) -> Result<IceConfig, ConfigError> {
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::MessageLimitTooSmall);
        }
        if self.ping_interval >= self.ping_timeout {
            return Err(ConfigError::PingTiming);
        }
        let mut ice = IceConfig::default();
        for url in &self.ice_servers {
            let scheme = url.split(':').next().unwrap_or_default();
            match scheme {
                "stun" | "stuns" => ice.stun_urls.push(url.clone()),
                "turn" | "turns" => ice.turn_urls.push(url.clone()),
                _ => return Err(ConfigError::BadIceUrl(url.clone())),
            }
        }
        let secret = match (&self.turn_secret, &self.turn_secret_file) {
            (Some(s), _) => Some(s.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::SecretFile {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        ice.credentials = match (secret, &self.turn_username, &self.turn_password) {
            (Some(s), _, _) if s.is_empty() => return Err(ConfigError::EmptySecret),
            (Some(secret), _, _) => TurnCredentials::Secret {
                secret: secret.into_bytes(),
                lifetime: self.turn_credential_lifetime,
            },
            (None, Some(username), Some(password)) => TurnCredentials::Static {
                username: username.clone(),
                password: password.clone(),
            },
            _ => TurnCredentials::None,
        };
        if let (Some(url), TurnCredentials::None) = (ice.turn_urls.first(), &ice.credentials) {
            return Err(ConfigError::TurnWithoutCredentials(url.clone()));
        }
        Ok(ice)
    }

    /// The per-connection token bucket.
    pub fn rate_limit(&self) -> RateLimit {
        RateLimit {
            burst: self.rate_burst,
            per_second: self.rate_per_second,
            max_dropped: self.rate_max_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_protocol() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.max_message_bytes, 65_536);
        assert_eq!(c.room_ttl, Duration::from_secs(600));
        assert_eq!(c.ping_timeout, Duration::from_secs(30));
        assert_eq!(c.rate_limit().burst, 200.0);
        assert!(c.ice_config().unwrap().stun_urls.is_empty());
        assert_eq!(c.early_join, Duration::from_secs(300));
        assert!(c.db.ends_with("signaling.sqlite3"), "{:?}", c.db);
        assert_eq!(Config::ephemeral().db, PathBuf::from(":memory:"));
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        assert_eq!(c.http_body_timeout, Duration::from_secs(10));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(30));
        assert!(c.shutdown_grace < Duration::from_secs(5));
        assert_eq!(c.create_rate_per_minute, 10.0);
        assert_eq!(c.resume_grace, Duration::from_secs(30));
        assert!(c.check_timeouts().is_ok());
        let no_resume = Config {
            resume_grace: Duration::ZERO,
            ..Config::ephemeral()
        };
        assert!(no_resume.check_timeouts().is_ok());
        let zero = Config {
            http_body_timeout: Duration::ZERO,
            ..Config::ephemeral()
        };
        assert!(matches!(
            zero.check_timeouts(),
            Err(ConfigError::BadTimeout("http-body-timeout"))
        ));
        let endless = Config {
            http_idle_timeout: Duration::from_secs(u64::MAX),
            ..Config::ephemeral()
        };
        assert!(matches!(
            endless.check_timeouts(),
            Err(ConfigError::BadTimeout("http-idle-timeout"))
        ));
    }

    #[test]
    fn api_keys_must_be_long_and_stay_out_of_debug() {
        let mut c = Config::ephemeral();
        assert_eq!(c.api_key().unwrap(), None);
        c.api_key = Some(Secret("short".into()));
        assert!(matches!(c.api_key(), Err(ConfigError::ApiKeyTooShort(5))));
        let key = "k".repeat(32);
        c.api_key = Some(Secret(format!(" {key}\n")));
        assert_eq!(c.api_key().unwrap(), Some(key.clone()));
        assert!(!format!("{c:?}").contains(&key));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "x".repeat(31)).unwrap();
        let c = Config {
            api_key_file: Some(file),
            ..Config::ephemeral()
        };
        assert!(matches!(c.api_key(), Err(ConfigError::ApiKeyTooShort(31))));
        let c = Config {
            public_url: Some("duet.example/".into()),
            ..Config::ephemeral()
        };
        assert!(c.public_url().is_err());
    }

    #[test]
    fn turn_needs_credentials_and_urls_are_checked() {
        let mut c = Config {
            ice_servers: vec!["turn:127.0.0.1:3478".into()],
            ..Config::default()
        };
        assert!(matches!(
            c.ice_config(),
            Err(ConfigError::TurnWithoutCredentials(_))
        ));
        c.turn_secret = Some("k".into());
        assert!(c.ice_config().is_ok());
        c.ice_servers.push("http://x".into());
        assert!(matches!(c.ice_config(), Err(ConfigError::BadIceUrl(_))));
    }

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from([
            "signaling-server",
            "--listen",
            "0.0.0.0:9000",
            "--room-ttl",
            "1h",
            "--ice-server",
            "stun:example.invalid:3478",
            "--rate-per-second",
            "0",
            "--resume-grace",
            "0s",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.resume_grace, Duration::ZERO);
        assert_eq!(c.room_ttl, Duration::from_secs(3600));
        assert_eq!(c.rate_per_second, 0.0);
    }
}
