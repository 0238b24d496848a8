//! Starting and stopping a server: the database, the HTTP routes (axum; the API
//! handlers are in `http_api.rs`), the WebSocket upgrade, and the background sweeper.
//!
//! axum routes HTTP because the meetings API grows here; its `ws` extractor is not used
//! because the server does its own framing (see `websocket.rs`). Connections are accepted
//! by our own loop over hyper's HTTP/1 server (not `axum::serve`, whose protocol-sniffing
//! wrapper hides the socket): after the RFC 6455 handshake the raw `TcpStream` is taken
//! back from hyper, so an idle connection can wait on readiness with no buffer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::http_api::{self, ApiState, ClientAddr};
use crate::hub::Hub;
use crate::rate_limit::RateLimit;
use crate::rooms::{ENDED_RETENTION, RoomsConfig};
use crate::store::{Store, StoreError, StoreThread};
use crate::turn::IceConfig;
use crate::turn_server::{TurnError, TurnServer};
use crate::{connection, websocket};

/// What every request handler and connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub ice: IceConfig,
    pub hub: Hub,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub connections: AtomicUsize,
    pub store: Store,
    pub api: ApiState,
    pub local_addr: SocketAddr,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Turn(#[from] TurnError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A running server. Dropping it does not stop it; call [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    serve: JoinHandle<()>,
    store_thread: StoreThread,
    turn: Option<TurnServer>,
}

impl Server {
    /// Binds `config.listen` and starts serving in the current tokio runtime.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let mut ice = config.ice_config()?;
        let api_key = config.api_key()?;
        let public_url = config.public_url()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        // Adds the embedded server's URLs to `ice` when --turn-listen is set.
        let turn = TurnServer::start_for(
            &config.turn_server,
            &mut ice,
            config.turn_credential_lifetime,
        )
        .await?;
        let db = config.db.clone();
        let (store, store_thread, meetings) = tokio::task::spawn_blocking(move || Store::open(&db))
            .await
            .map_err(|_| StoreError::Closed)??;
        let hub = Hub::new(
            RoomsConfig {
                room_ttl: config.room_ttl,
                ring_timeout: config.ring_timeout,
                early_join: config.early_join,
                ended_retention: ENDED_RETENTION,
            },
            config.send_queue,
            Some(store.clone()),
        );
        for stored in meetings {
            hub.add_meeting(&stored.room_id, stored.meeting);
        }
        if api_key.is_none() && !local_addr.ip().is_loopback() {
            warn!(
                "no API key: anyone who reaches this server can create and list rooms \
                 (set --api-key-file or DUET_API_KEY)"
            );
        }
        let api = ApiState::new(
            api_key.as_deref(),
            public_url,
            RateLimit {
                burst: config.api_rate_burst,
                per_second: config.api_rate_per_second,
                max_dropped: u32::MAX,
            },
        );
        let shared = Arc::new(Shared {
            hub,
            store,
            api,
            local_addr,
            ice,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            connections: AtomicUsize::new(0),
            config,
        });
        shared.tasks.spawn(sweep(Arc::clone(&shared)));
        let serve = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        info!(%local_addr, "signaling server listening");
        Ok(Server {
            local_addr,
            shared,
            serve,
            store_thread,
            turn,
        })
    }

    /// The embedded TURN server's UDP address, when it runs (`--turn-listen`).
    pub fn turn_addr(&self) -> Option<SocketAddr> {
        self.turn.as_ref().map(TurnServer::local_addr)
    }

    /// The embedded TURN server, when it runs.
    pub fn turn_server(&self) -> Option<&TurnServer> {
        self.turn.as_ref()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.local_addr)
    }

    /// `http://ADDR`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// (open WebSocket connections, rooms including empty ones not yet expired).
    pub fn counts(&self) -> (usize, usize) {
        self.shared.hub.counts()
    }

    /// Members of `room` right now, if it exists.
    pub fn room_members(&self, room: &str) -> Option<usize> {
        self.shared.hub.members(room)
    }

    /// Closes every connection (code 1001), stops listening and waits until every task
    /// of this server has ended.
    pub async fn stop(self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        let _ = self.serve.await;
        if let Some(turn) = self.turn {
            turn.stop().await;
        }
        let store_thread = self.store_thread;
        let _ = tokio::task::spawn_blocking(move || store_thread.stop()).await;
        info!(addr = %self.local_addr, "signaling server stopped");
    }
}

/// Accepts TCP connections and serves HTTP/1.1 on each until shutdown.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let app = router(Arc::clone(&shared));
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ClientAddr(peer));
                request
            },
        ));
        let shutdown = shared.shutdown.clone();
        shared.tasks.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(error = %e, "HTTP connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/ws", get(upgrade))
        .merge(http_api::routes())
        .fallback(http_api::not_found)
        .method_not_allowed_fallback(http_api::method_not_allowed)
        .with_state(shared)
}

/// Counts a connection for `--max-connections`; the slot is freed on drop.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// The RFC 6455 opening handshake.
async fn upgrade(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let headers = request.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return plain(
            StatusCode::BAD_REQUEST,
            "this endpoint speaks WebSocket only (Upgrade: websocket)\n",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = plain(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version; use 13\n",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    let Ok(accept) = HeaderValue::from_str(&websocket::accept_key(key)) else {
        return plain(StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key\n");
    };
    if shared.shutdown.is_cancelled() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n");
    }
    let held = shared.connections.fetch_add(1, Ordering::Relaxed);
    let slot = Slot(Arc::clone(&shared));
    if held >= shared.config.max_connections {
        warn!(held, "connection limit reached; refusing a WebSocket");
        return plain(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
    }

    let on_upgrade = hyper::upgrade::on(request);
    let fut = async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let shared = Arc::clone(&_slot.0);
                connection::run(parts.io.into_inner(), parts.read_buf, shared).await;
            }
            Err(_) => warn!("upgraded connection is not a TCP stream; dropping it"),
        }
    };
    shared.tasks.spawn(fut);

    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Drives time-based rules: ring timeouts and room expiry.
async fn sweep(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(shared.config.sweep_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = every.tick() => shared.hub.tick(),
        }
    }
}
