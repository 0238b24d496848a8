//! Starting and stopping a server: the database, the HTTP routes (axum; the API
//! handlers are in `http/api.rs`), the WebSocket upgrade, and the background sweeper.
//!
//! axum routes HTTP because the meetings API grows here; its `ws` extractor is not used
//! because the server does its own framing (see `ws/framing.rs`). Connections are accepted
//! by our own loop over hyper's HTTP/1 server (not `axum::serve`, whose protocol-sniffing
//! wrapper hides the socket): after the RFC 6455 handshake the raw stream (TCP, or TLS over
//! TCP) is taken back from hyper, so an idle plain-TCP connection can wait on readiness
//! with no buffer.
//!
//! Every phase of an HTTP connection has a deadline, so that no client can hold a
//! connection (and with it the server's shutdown) for ever: the request line and
//! headers (hyper's header timer, which also runs while a kept-alive connection waits
//! for its next request), the body (`http::api`, answered `408`), and no bytes moving
//! either way (a watchdog here; catches a client that never reads its answer). Shutdown
//! lets connections finish for `shutdown_grace`, then drops the rest.
//!
//! With `--tls-cert`/`--tls-key` every accepted connection first completes a TLS
//! handshake (within the header deadline, in the connection's own task), then the same
//! HTTP/1 and WebSocket code runs over the TLS stream (`tls::Stream`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::core::rate_limit::{PerAddress, Present, RateLimit};
use crate::core::rooms::{ENDED_RETENTION, RoomsConfig};
use crate::http::api::{self as http_api, ApiContext, ApiState, ClientAddr};
use crate::state::cluster::{Cluster, ClusterConfig, ClusterError};
use crate::state::hub::Hub;
use crate::state::store::{Store, StoreError, StoreThread};
use crate::state::{LocalMeetings, Meetings};
use crate::tls::{ServerTls, Stream, TlsError};
use crate::turn::server::{TurnError, TurnServer};
use crate::ws::connection::{self, WsContext};
use crate::ws::framing;

/// What the accept loop, the upgrade and the sweeper share; each layer below gets only
/// its own context ([`WsContext`], [`ApiContext`]), so none of them imports this module.
#[derive(Debug)]
struct Shared {
    pub config: Config,
    /// For every WebSocket connection's task.
    pub ws: Arc<WsContext>,
    /// For the HTTP API handlers.
    pub api: Arc<ApiContext>,
    pub hub: Arc<Hub>,
    /// Set in cluster mode (`--redis`): rooms live in Redis, and client messages go here.
    pub cluster: Option<Arc<Cluster>>,
    /// Stop accepting; connections finish what they are doing and close.
    pub shutdown: CancellationToken,
    /// The shutdown grace is over: connection tasks end at once, dropping their sockets.
    pub force_close: CancellationToken,
    pub tasks: TaskTracker,
    pub connections: AtomicUsize,
    /// Open WebSockets per client address.
    pub per_ip: Arc<PerAddress>,
    /// Open TCP connections in their HTTP phase per peer address.
    pub tcp_per_ip: Arc<PerAddress>,
    /// HTTPS/WSS settings when `--tls-cert` is set.
    pub tls: Option<Arc<ServerTls>>,
}

impl Shared {
    /// `https` with TLS, else `http`.
    pub fn http_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
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
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
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
        config.check_timeouts()?;
        let mut ice = config.ice_config()?;
        let api_key = config.api_key()?;
        let public_url = config.public_url()?;
        let tls = ServerTls::from_files(config.tls_cert.as_deref(), config.tls_key.as_deref())?
            .map(Arc::new);
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
            tls.as_ref(),
        )
        .await?;
        let db = config.db.clone();
        let (store, store_thread, meetings) = tokio::task::spawn_blocking(move || Store::open(&db))
            .await
            .map_err(|_| StoreError::Closed)??;
        let hub = Arc::new(Hub::new(
            RoomsConfig {
                room_ttl: config.room_ttl,
                ring_timeout: config.ring_timeout,
                early_join: config.early_join,
                ended_retention: ENDED_RETENTION,
                resume_grace: config.resume_grace,
                max_rooms: config.max_rooms,
                rooms_per_minute: config.rooms_per_minute,
                rooms_per_minute_per_address: config.rooms_per_minute_per_address,
            },
            config.send_queue,
            // Room for at least two of the largest messages.
            config
                .send_queue_bytes
                .max(2 * config.max_message_bytes + 1024),
            Some(store.clone()),
        ));
        for stored in meetings {
            hub.add_meeting(&stored.room_id, stored.meeting);
        }
        // Also on loopback: a local server is often reached through a tunnel or proxy.
        if api_key.is_none() {
            warn!(
                per_minute = config.create_rate_per_minute,
                "no API key: anyone who reaches this server can create rooms (rate-limited \
                 per address) and listing rooms is disabled; set --api-key-file or DUET_API_KEY"
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
            RateLimit {
                burst: config.create_rate_burst.max(1.0),
                per_second: config.create_rate_per_minute / 60.0,
                max_dropped: u32::MAX,
            },
        );
        let cluster = match &config.redis {
            Some(url) => Some(
                Cluster::start(
                    ClusterConfig {
                        url: url.clone(),
                        room_ttl: config.room_ttl,
                        ring_timeout: config.ring_timeout,
                        resume_grace: config.resume_grace,
                        sweep_interval: config.sweep_interval,
                        early_join: config.early_join,
                        ended_retention: ENDED_RETENTION,
                        max_rooms: config.max_rooms,
                        rooms_per_minute: config.rooms_per_minute,
                        rooms_per_minute_per_address: config.rooms_per_minute_per_address,
                    },
                    Arc::clone(&hub),
                )
                .await?,
            ),
            None => None,
        };
        let ice = Arc::new(ice);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let meetings: Arc<dyn Meetings> = match &cluster {
            Some(cluster) => Arc::clone(cluster) as Arc<dyn Meetings>,
            None => Arc::new(LocalMeetings {
                hub: Arc::clone(&hub),
                store: store.clone(),
            }),
        };
        let api = Arc::new(ApiContext {
            api,
            meetings,
            ice: Arc::clone(&ice),
            scheme: if tls.is_some() { "https" } else { "http" },
            local_addr,
            body_timeout: config.http_body_timeout,
            tasks: tasks.clone(),
        });
        let ws = Arc::new(WsContext {
            max_message_bytes: config.max_message_bytes,
            rate_limit: config.rate_limit(),
            ping_interval: config.ping_interval,
            ping_timeout: config.ping_timeout,
            ice,
            hub: Arc::clone(&hub),
            cluster: cluster.clone(),
            store,
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        });
        let shared = Arc::new(Shared {
            ws,
            api,
            hub,
            cluster,
            tls,
            shutdown,
            force_close: CancellationToken::new(),
            tasks,
            connections: AtomicUsize::new(0),
            per_ip: Default::default(),
            tcp_per_ip: Default::default(),
            config,
        });
        shared.tasks.spawn(sweep(Arc::clone(&shared)));
        if let Some(tls) = &shared.tls {
            shared
                .tasks
                .spawn(reload_on_hangup(Arc::clone(tls), shared.shutdown.clone()));
        }
        let serve = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        info!(%local_addr, tls = shared.tls.is_some(), "signaling server listening");
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

    /// `ws://ADDR/ws`, or `wss://ADDR/ws` with TLS.
    pub fn ws_url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        format!("{scheme}://{}/ws", self.local_addr)
    }

    /// `http://ADDR`, or `https://ADDR` with TLS.
    pub fn http_url(&self) -> String {
        format!("{}://{}", self.shared.http_scheme(), self.local_addr)
    }

    /// Reads the TLS certificate and key files again (what SIGHUP does); new
    /// connections get them, open ones keep theirs. On an error the old ones stay.
    /// Without TLS there is nothing to do.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.shared.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// (open WebSocket connections, rooms including empty ones not yet expired).
    pub fn counts(&self) -> (usize, usize) {
        self.shared.hub.counts()
    }

    /// Members of `room` right now, if it exists.
    pub fn room_members(&self, room: &str) -> Option<usize> {
        self.shared.hub.members(room)
    }

    /// Stops listening, closes every WebSocket (code 1001), lets HTTP requests in
    /// progress finish for `shutdown_grace`, then drops whatever connection is left, and
    /// waits until every task of this server has ended. Bounded whatever clients do.
    pub async fn stop(self) {
        let shared = &self.shared;
        shared.shutdown.cancel();
        shared.tasks.close();
        let drain = async {
            let grace = shared.config.shutdown_grace;
            if tokio::time::timeout(grace, shared.tasks.wait())
                .await
                .is_err()
            {
                warn!(
                    tasks = shared.tasks.len(),
                    "connections still open after the shutdown grace; closing them"
                );
                shared.force_close.cancel();
                // Connection tasks end at their next poll; what is left (a room being
                // stored) waits for the database thread, which answers promptly.
                if tokio::time::timeout(FORCE_WAIT, shared.tasks.wait())
                    .await
                    .is_err()
                {
                    warn!(
                        tasks = shared.tasks.len(),
                        "tasks still running; not waiting"
                    );
                }
            }
        };
        // The TURN server shuts down on its own clock, at the same time.
        let turn = async {
            if let Some(turn) = self.turn {
                turn.stop().await;
            }
        };
        tokio::join!(drain, turn);
        if let Some(cluster) = &shared.cluster {
            cluster.stop().await;
        }
        let _ = self.serve.await;
        let store_thread = self.store_thread;
        let _ = tokio::task::spawn_blocking(move || store_thread.stop()).await;
        info!(addr = %self.local_addr, "signaling server stopped");
    }
}

/// How long [`Server::stop`] waits for tasks after forcing connections closed.
const FORCE_WAIT: Duration = Duration::from_secs(1);

/// Spawns a connection's task, which ends (dropping its socket) when shutdown is forced.
fn spawn_connection<F>(shared: &Shared, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    shared.tasks.spawn(UntilForced {
        task,
        force: shared.force_close.clone().cancelled_owned(),
    });
}

pin_project_lite::pin_project! {
    /// A connection's task that ends when `force` is cancelled. Written out rather than
    /// an `async move` block around `select!`: such a block keeps the task it captured
    /// and the copy `select!` polls side by side in its state, which doubled every idle
    /// connection's task (3.6 kB instead of 1.8 kB).
    struct UntilForced<F> {
        #[pin]
        task: F,
        #[pin]
        force: tokio_util::sync::WaitForCancellationFutureOwned,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for UntilForced<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.task.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if this.force.poll(cx).is_ready() {
            debug!("connection closed by the shutdown");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// When bytes last moved on a connection, for the idle deadline.
#[derive(Debug)]
struct Activity {
    origin: Instant,
    /// Milliseconds after `origin`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn idle_deadline(&self, limit: Duration) -> Instant {
        self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed)) + limit
    }

    /// Resolves once no byte has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.idle_deadline(limit);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A connection's stream that notes in [`Activity`] every time bytes move.
#[derive(Debug)]
struct Watched {
    stream: Stream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and serves HTTP/1.1 on each until shutdown.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let app = router(Arc::clone(&shared));
    let trusted: Arc<[ipnet::IpNet]> = shared.config.trusted_proxies.clone().into();
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
        // Per peer address, before a byte is read: many half-open or slow connections
        // from one address must not take the file descriptors everybody else needs. A
        // trusted proxy carries many clients, so it is not counted here.
        let present = if trusted.iter().any(|net| net.contains(&peer.ip())) {
            None
        } else {
            let (present, held) = shared.tcp_per_ip.enter(peer.ip());
            if held > shared.config.max_tcp_connections_per_ip {
                debug!(%peer, held, "per-address TCP connection limit reached; refusing");
                let _ = tcp.try_write(
                    b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                );
                continue;
            }
            Some(present)
        };
        let _ = tcp.set_nodelay(true);
        let trusted = Arc::clone(&trusted);
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut request: Request<hyper::body::Incoming>| {
                let client = http_api::client_addr(peer, request.headers(), &trusted);
                request.extensions_mut().insert(ClientAddr(client));
                request
            },
        ));
        let shutdown = shared.shutdown.clone();
        let header_timeout = shared.config.http_header_timeout;
        let idle_timeout = shared.config.http_idle_timeout;
        let activity = Activity::new();
        let tls = shared.tls.as_ref().map(|tls| tls.acceptor());
        spawn_connection(&shared, async move {
            let _present = present;
            let stream = match tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => {
                    // Under the header deadline: a client that stalls the handshake is
                    // no different from one that stalls its request.
                    let handshake = tokio::time::timeout(header_timeout, acceptor.accept(tcp));
                    tokio::select! {
                        result = handshake => match result {
                            Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                            Ok(Err(e)) => {
                                debug!(error = %e, %peer, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "TLS handshake not completed in time");
                                return;
                            }
                        },
                        () = shutdown.cancelled() => return,
                    }
                }
            };
            let io = Watched {
                stream,
                activity: Arc::clone(&activity),
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(connection);
            let idle = activity.idle_for(idle_timeout);
            tokio::pin!(idle);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(error = %e, %peer, "HTTP connection ended with an error");
                    }
                }
                () = &mut idle => debug!(%peer, "HTTP connection idle; closing it"),
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = connection => {}
                        () = idle => {}
                    }
                }
            }
        });
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let api = http_api::routes().with_state(Arc::clone(&shared.api));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ws", get(upgrade))
        .with_state(shared)
        .merge(api)
        .merge(crate::http::web::routes())
        .fallback(http_api::not_found)
        .method_not_allowed_fallback(http_api::method_not_allowed)
}

/// `ok`, or 503 when this instance cannot serve (cluster mode: Redis unreachable).
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let Some(cluster) = &shared.cluster else {
        return "ok".into_response();
    };
    match cluster.ready().await {
        Ok(()) => "ok".into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Counts a connection for `--max-connections` and `--max-connections-per-ip`; the slot
/// is freed on drop.
struct Slot {
    shared: Arc<Shared>,
    /// Counted for `--max-connections-per-ip` while the slot lives.
    _address: Present,
}

impl Slot {
    /// Takes a slot for a WebSocket from `client`, or says why not (the answer to give).
    fn take(
        shared: &Arc<Shared>,
        client: std::net::IpAddr,
    ) -> Result<Slot, (StatusCode, &'static str)> {
        let held = shared.connections.fetch_add(1, Ordering::Relaxed);
        let (present, from_client) = shared.per_ip.enter(client);
        let slot = Slot {
            shared: Arc::clone(shared),
            _address: present,
        };
        if held >= shared.config.max_connections {
            warn!(held, "connection limit reached; refusing a WebSocket");
            return Err((StatusCode::SERVICE_UNAVAILABLE, "too many connections\n"));
        }
        if from_client > shared.config.max_connections_per_ip {
            warn!(%client, from_client, "per-address connection limit reached; refusing a WebSocket");
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address\n",
            ));
        }
        Ok(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a WebSocket from a page at this `Origin` may open: no Origin (not a browser),
/// no `--allowed-origin` list, an origin on the list, or the server's own pages (the
/// Origin names the host the request was sent to).
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let own_host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, host)| host);
    matches!((own_host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
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
    let Ok(accept) = HeaderValue::from_str(&framing::accept_key(key)) else {
        return plain(StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key\n");
    };
    if !origin_allowed(headers, &shared.config.allowed_origins) {
        warn!(origin = ?headers.get(header::ORIGIN), "WebSocket from an origin not allowed");
        return plain(
            StatusCode::FORBIDDEN,
            "this page's origin may not use this server (see --allowed-origin)\n",
        );
    }
    if shared.shutdown.is_cancelled() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n");
    }
    let client = request
        .extensions()
        .get::<ClientAddr>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let slot = match Slot::take(&shared, client) {
        Ok(slot) => slot,
        Err((status, text)) => return plain(status, text),
    };

    let on_upgrade = hyper::upgrade::on(request);
    let handshake_limit = shared.config.http_idle_timeout;
    // `slot` is held (counted) for as long as this task runs. (Not moved again inside:
    // each move of a captured value leaves a second copy in the future's state.)
    let fut = async move {
        // The 101 is written by the HTTP connection's task; a client that does not take
        // it in time is dropped there, which ends this wait too. The timeout is a second
        // line, so this task can never outlive a lost connection.
        let upgraded = match tokio::time::timeout(handshake_limit, on_upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
            Err(_) => {
                debug!("WebSocket handshake not completed in time");
                return;
            }
        };
        match upgraded.downcast::<TokioIo<Watched>>() {
            Ok(parts) => {
                // From here the WebSocket's own deadlines apply (pings, write timeout).
                let stream = parts.io.into_inner().stream;
                let ctx = Arc::clone(&slot.shared.ws);
                connection::run(stream, parts.read_buf, ctx, client).await;
            }
            Err(_) => warn!("upgraded connection is not our stream; dropping it"),
        }
    };
    spawn_connection(&shared, fut);

    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Reloads the TLS certificate and key on SIGHUP until shutdown (Unix).
async fn reload_on_hangup(tls: Arc<ServerTls>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; the TLS certificate will not be reloaded");
                return;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = hangup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    match tls.reload() {
                        Ok(()) => info!(cert = %tls.cert_path().display(), "TLS certificate reloaded"),
                        Err(e) => warn!(error = %e, "TLS certificate not reloaded; keeping the old one"),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, shutdown);
    }
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
