//! Talking to a signaling server: a WebSocket client that sends [`ClientMessage`]s and
//! delivers [`ServerMessage`]s, plus the embedded-server helper.
//!
//! The protocol types are the server crate's own ([`protocol`]), so client and server
//! cannot disagree about the wire format.

pub use signaling_server::protocol;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use protocol::{ClientMessage, ServerMessage};
use tokio::sync::mpsc;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;

use crate::tls::Trust;

/// The address the app uses when no server is configured.
pub const DEFAULT_SERVER: &str = "127.0.0.1:8787";

/// Starts the signaling server in-process on `addr`, as the app does when nothing
/// answers at the default address.
pub async fn start_embedded(
    addr: SocketAddr,
) -> Result<signaling_server::Server, signaling_server::StartError> {
    let config = signaling_server::Config {
        listen: addr,
        ..signaling_server::Config::default()
    };
    signaling_server::Server::start(config).await
}

/// The server to use: `given` when set; otherwise the default address, starting the
/// signaling server in-process there when nothing answers (the returned handle keeps it
/// running; stop it when done).
pub async fn resolve_server(
    given: Option<&str>,
) -> Result<(String, Option<signaling_server::Server>), signaling_server::StartError> {
    if let Some(s) = given.map(str::trim).filter(|s| !s.is_empty()) {
        return Ok((s.to_owned(), None));
    }
    let answering = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(DEFAULT_SERVER),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if answering {
        return Ok((DEFAULT_SERVER.to_owned(), None));
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], 8787));
    match start_embedded(addr).await {
        Ok(server) => {
            tracing::info!("no signaling server answered; started one on {DEFAULT_SERVER}");
            Ok((DEFAULT_SERVER.to_owned(), Some(server)))
        }
        // Someone else won the race for the port: use theirs.
        Err(signaling_server::StartError::Bind { .. }) => Ok((DEFAULT_SERVER.to_owned(), None)),
        Err(e) => Err(e),
    }
}

/// `ws://HOST:PORT/ws` from what a person may type: `HOST:PORT`, `ws://HOST:PORT`,
/// `http://HOST:PORT`, with or without `/ws`.
pub fn ws_url(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    let rest = s
        .strip_prefix("ws://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    if let Some(secure) = s
        .strip_prefix("wss://")
        .or_else(|| s.strip_prefix("https://"))
    {
        let path = if secure.contains('/') { "" } else { "/ws" };
        return format!("wss://{secure}{path}");
    }
    let path = if rest.contains('/') { "" } else { "/ws" };
    format!("ws://{rest}{path}")
}

/// The host of a `ws://` / `wss://` URL (no port, no brackets), for messages.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// A plain `ws://` handshake answered with something that is not HTTP at all: most
/// likely a TLS alert from a server that only speaks TLS.
fn looks_like_tls(error: &tokio_tungstenite::tungstenite::Error) -> bool {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    matches!(error, Error::Protocol(ProtocolError::HttparseError(_)))
}

/// Why the signaling connection could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SignalingError {
    #[error("cannot reach the signaling server at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// A `wss://` connection failed in TLS: `reason` says why in words ("the server's
    /// certificate has expired ...").
    #[error("cannot connect securely to {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("the signaling server connection is closed")]
    Closed,
}

/// What the connection reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Message(ServerMessage),
    /// The connection ended; `detail` says how.
    Closed {
        detail: String,
    },
}

/// How often the client pings the server.
const PING_EVERY: Duration = Duration::from_secs(2);
/// A connection on which nothing (not even a pong) arrived for this long is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(6);

/// A connected client. Messages are sent in order by a background task; what arrives
/// goes to the channel given to [`Client::connect`].
#[derive(Debug, Clone)]
pub struct Client {
    outgoing: mpsc::UnboundedSender<ClientMessage>,
    /// Set by [`Client::abandon`]: the reader reports nothing more.
    abandoned: Arc<AtomicBool>,
}

impl Client {
    /// Connects (with a timeout) and starts the reader and writer tasks. `wss://`
    /// servers are checked against the process's default [`Trust`]
    /// ([`crate::tls::set_default_trust`]).
    pub async fn connect(
        server: &str,
        incoming: mpsc::UnboundedSender<Incoming>,
    ) -> Result<Client, SignalingError> {
        Client::connect_with(server, &crate::tls::default_trust(), incoming).await
    }

    /// [`Client::connect`] trusting the certificate authorities of `trust`.
    pub async fn connect_with(
        server: &str,
        trust: &Trust,
        incoming: mpsc::UnboundedSender<Incoming>,
    ) -> Result<Client, SignalingError> {
        let url = ws_url(server);
        let unreachable = |detail: String| SignalingError::Unreachable {
            url: url.clone(),
            detail,
        };
        // wss:// always goes through rustls; a TLS failure is an error, never a reason
        // to try without TLS.
        let connector = if url.starts_with("wss://") {
            let config = trust.client_config().map_err(|e| SignalingError::Tls {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            Connector::Rustls(config)
        } else {
            Connector::Plain
        };
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            url.as_str(),
            None,
            false,
            Some(connector),
        );
        let (ws, _) = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| unreachable("timed out after 5 s".into()))?
            .map_err(|e| match crate::tls::explain(&e, host_of(&url)) {
                Some(reason) => SignalingError::Tls {
                    url: url.clone(),
                    reason,
                },
                None if url.starts_with("ws://") && looks_like_tls(&e) => {
                    unreachable(format!("{e} (the server seems to speak TLS: use wss://)"))
                }
                None => unreachable(e.to_string()),
            })?;
        let (mut sink, mut stream) = ws.split();
        let (outgoing, mut to_send) = mpsc::unbounded_channel::<ClientMessage>();
        // The writer also pings every 2 s: a connection whose path silently died (the
        // laptop changed networks) is noticed by the reader within seconds instead of
        // when TCP gives up, minutes later.
        tokio::spawn(async move {
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let frame = tokio::select! {
                    msg = to_send.recv() => match msg {
                        Some(msg) => Message::text(msg.to_json()),
                        None => break,
                    },
                    _ = ping.tick() => Message::Ping(Default::default()),
                };
                if sink.send(frame).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let abandoned = Arc::new(AtomicBool::new(false));
        let quiet = abandoned.clone();
        tokio::spawn(async move {
            let detail = loop {
                let Ok(next) = tokio::time::timeout(SILENCE_LIMIT, stream.next()).await else {
                    break format!(
                        "no answer from the server for {} s",
                        SILENCE_LIMIT.as_secs()
                    );
                };
                match next {
                    Some(Ok(Message::Text(text))) => match text.parse::<ServerMessage>() {
                        Ok(msg) => {
                            if quiet.load(Ordering::Relaxed)
                                || incoming.send(Incoming::Message(msg)).is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable server message"),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        break frame.map_or("closed by the server".to_owned(), |f| {
                            format!("closed by the server ({}: {})", u16::from(f.code), f.reason)
                        });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e.to_string(),
                    None => break "connection closed".to_owned(),
                }
            };
            if !quiet.load(Ordering::Relaxed) {
                let _ = incoming.send(Incoming::Closed { detail });
            }
        });
        Ok(Client {
            outgoing,
            abandoned,
        })
    }

    /// Gives this connection up (a newer one replaces it, or the network it ran on is
    /// gone): nothing it still receives, not even its end, is reported any more, so an
    /// old connection dying late cannot be mistaken for the new one.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    /// Queues a message; fails only when the connection is gone.
    pub fn send(&self, msg: ClientMessage) -> Result<(), SignalingError> {
        self.outgoing.send(msg).map_err(|_| SignalingError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_from_what_people_type() {
        assert_eq!(ws_url("127.0.0.1:8787"), "ws://127.0.0.1:8787/ws");
        assert_eq!(ws_url("ws://h:1/ws"), "ws://h:1/ws");
        assert_eq!(ws_url("http://h:1/"), "ws://h:1/ws");
        assert_eq!(ws_url("wss://example.org"), "wss://example.org/ws");
        assert_eq!(ws_url("https://h:8443/"), "wss://h:8443/ws");
        assert_eq!(host_of("wss://localhost:8443/ws"), "localhost");
        assert_eq!(host_of("wss://example.org/ws"), "example.org");
        assert_eq!(host_of("wss://[::1]:9/ws"), "::1");
    }
}
