//! One WebSocket connection after the HTTP upgrade: a single task that reads frames,
//! enforces the limits, hands parsed messages to the [`Hub`], writes what the hub queues
//! for it, and pings.
//!
//! Memory is the design constraint here (thousands of mostly idle connections): the
//! task waits for socket readiness instead of parking a read buffer, frees its buffers
//! whenever they are empty, and keeps one reusable timer. The `ping_timeout` rule is
//! "any byte from the client proves it alive"; pings give an idle client a reason to send.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Duration, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, error, info, info_span};

use crate::core::clock::Now;
use crate::core::rate_limit::{RateLimit, RateLimiter, Verdict};
use crate::core::rooms::ConnId;
use crate::protocol::{ClientMessage, ErrorCode, PROTOCOL_VERSION, RoomEndReason, ServerMessage};
use crate::state::cluster::Cluster;
use crate::state::hub::{Hub, Registration};
use crate::state::store::Store;
use crate::tls::Stream;
use crate::turn::IceConfig;
use crate::ws::framing::{Decoder, Event, Opcode, close_code, encode_close, encode_frame};

/// How much to ask the kernel for per read.
const READ_CHUNK: usize = 4096;
/// Most queued messages written in one batch.
const WRITE_BATCH: usize = 64;

/// What a connection's task needs from the server, and nothing more (built by
/// [`crate::server`], which this module does not know).
#[derive(Debug)]
pub(crate) struct WsContext {
    /// Largest message, in bytes (`--max-message-bytes`).
    pub max_message_bytes: usize,
    /// Messages (and pings) per connection (`--rate-*`).
    pub rate_limit: RateLimit,
    pub ping_interval: Duration,
    /// Silence after which a connection is dropped; also the write deadline.
    pub ping_timeout: Duration,
    /// For the `ice_servers` of `welcome`.
    pub ice: Arc<IceConfig>,
    pub hub: Arc<Hub>,
    /// Set in cluster mode (`--redis`): rooms live in Redis, and client messages go here.
    pub cluster: Option<Arc<Cluster>>,
    /// Where a host's `end_room` of a meeting is stored first (in-process backend).
    pub store: Store,
    /// Stop: connections close with 1001.
    pub shutdown: CancellationToken,
    /// Tasks the server's stop waits for.
    pub tasks: TaskTracker,
}

/// Why the loop ended: close with this code and reason, or just drop the socket.
enum Exit {
    Close(u16, &'static str),
    Drop(&'static str),
}

/// Takes `conn` out of the hub when dropped: at the end of its task, and also when the
/// task panics or is cancelled, so a member is never left behind in a room.
/// In cluster mode the member also leaves in Redis, in a task of its own (tracked, so
/// that the server's stop waits for it): an await here would enlarge every connection's
/// task, also without `--redis`.
struct Departure {
    ctx: Arc<WsContext>,
    conn: ConnId,
}

impl Drop for Departure {
    fn drop(&mut self) {
        if let Some(cluster) = &self.ctx.cluster
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (cluster, conn) = (Arc::clone(cluster), self.conn);
            self.ctx
                .tasks
                .spawn_on(async move { cluster.disconnect(conn).await }, &runtime);
        }
        self.ctx.hub.disconnect(self.conn);
    }
}

/// What `process_inbox` leaves to its async caller.
enum Pending {
    /// A host's `end_room` of a meeting: store the end first.
    StoreEnd(String),
    /// Cluster mode: a message for [`Cluster::handle`]. Boxed: the size of this enum
    /// counts in every connection's task.
    Cluster(Box<ClientMessage>),
}

/// The connection's task: runs it until it ends; `read_ahead` is what the HTTP layer
/// had already read past the upgrade request. The connection joins the hub (and its
/// `welcome` is prepared) when this is called.
///
/// A plain function around one `async` block that borrows the connection, not an
/// `async fn`: those keep their arguments in their state next to what the arguments
/// are moved into, and every byte of this future is paid by every idle connection.
pub(crate) fn run(
    stream: Stream,
    read_ahead: bytes::Bytes,
    ctx: Arc<WsContext>,
    client: std::net::IpAddr,
) -> impl Future<Output = ()> + Send + use<> {
    let registration = ctx.hub.connect(Some(client));
    if let Some(cluster) = &ctx.cluster {
        cluster.connect(registration.conn, &registration.peer_id, client);
    }
    let span = info_span!("ws", peer = %registration.peer_id);
    let conn = registration.conn;
    // From here on, whatever happens to this future, `conn` leaves the hub.
    let departure = Departure { ctx, conn };
    let mut connection = Connection::new(stream, read_ahead, &departure.ctx, registration);
    let remote = connection.stream.peer_addr().ok();
    span.in_scope(|| info!(?remote, "connected"));
    async move {
        let exit = connection.serve(&departure.ctx, conn).await;
        match exit {
            Exit::Close(code, reason) if code != close_code::NORMAL => {
                info!(code, reason, "closed by the server");
            }
            Exit::Close(_, reason) | Exit::Drop(reason) => info!(reason, "disconnected"),
        }
        drop(connection);
        drop(departure);
    }
    .instrument(span)
}

struct Connection {
    stream: Stream,
    /// Bytes read but not yet decoded (empty and unallocated when idle).
    inbox: BytesMut,
    /// Frames to write (empty and unallocated when idle).
    outbox: Vec<u8>,
    /// What the hub queued for this connection.
    outgoing: crate::state::hub::Outgoing,
    decoder: Decoder,
    limiter: RateLimiter,
    last_heard: Instant,
}

impl Connection {
    fn new(
        stream: Stream,
        read_ahead: bytes::Bytes,
        ctx: &WsContext,
        registration: Registration,
    ) -> Self {
        let now = Instant::now();
        let mut outbox = Vec::new();
        let welcome = ServerMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            server: format!("signaling-server {}", env!("CARGO_PKG_VERSION")),
            ice_servers: ctx
                .ice
                .ice_servers(&registration.peer_id, SystemTime::now()),
        };
        encode_frame(&mut outbox, Opcode::Text, welcome.to_json().as_bytes());
        Connection {
            stream,
            inbox: BytesMut::from(&read_ahead[..]),
            outbox,
            outgoing: registration.outgoing,
            decoder: Decoder::new(ctx.max_message_bytes),
            limiter: RateLimiter::new(ctx.rate_limit, now),
            last_heard: now,
        }
    }

    async fn serve(&mut self, ctx: &WsContext, conn: ConnId) -> Exit {
        let config = ctx;
        let ping = sleep_until((Instant::now() + config.ping_interval).into());
        tokio::pin!(ping);

        // Anything the HTTP layer read ahead is processed before waiting for more.
        if let Err(exit) = self.process_all(ctx, conn).await {
            return Box::pin(self.finish(exit)).await;
        }
        loop {
            if let Err(exit) = self.flush(config.ping_timeout).await {
                return Box::pin(self.finish(exit)).await;
            }
            let step = tokio::select! {
                _ = ctx.shutdown.cancelled() => {
                    Err(Exit::Close(close_code::GOING_AWAY, "server shutting down"))
                }
                queued = self.outgoing.recv() => match queued {
                    Some(text) => {
                        self.queue_text(&text);
                        self.drain_outgoing();
                        Ok(())
                    }
                    None => Err(Exit::Close(
                        close_code::TRY_AGAIN_LATER,
                        "too slow reading messages",
                    )),
                },
                ready = self.stream.wait_readable(&mut self.inbox) => match ready {
                    Ok(already_read) => match self.read(already_read) {
                        Ok(()) => self.process_all(ctx, conn).await,
                        Err(exit) => Err(exit),
                    },
                    Err(_) => Err(Exit::Drop("socket error")),
                },
                () = &mut ping => {
                    let now = Instant::now();
                    if now.duration_since(self.last_heard) >= config.ping_timeout {
                        Err(Exit::Drop("no answer to pings"))
                    } else {
                        encode_frame(&mut self.outbox, Opcode::Ping, b"");
                        ping.as_mut().reset((now + config.ping_interval).into());
                        Ok(())
                    }
                }
            };
            if let Err(exit) = step {
                return Box::pin(self.finish(exit)).await;
            }
        }
    }

    /// One non-blocking read (unless `already_read` says how much a TLS read just
    /// added).
    fn read(&mut self, already_read: Option<usize>) -> Result<(), Exit> {
        let read = match already_read {
            Some(n) => Ok(n),
            None => {
                self.inbox.reserve(READ_CHUNK);
                self.stream.try_read_buf(&mut self.inbox)
            }
        };
        match read {
            Ok(0) => return Err(Exit::Drop("connection closed without a close frame")),
            Ok(_) => self.last_heard = Instant::now(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Exit::Drop("socket error")),
        }
        Ok(())
    }

    /// Decodes and handles everything complete in the inbox. A host's `end_room` of a
    /// meeting is stored first (awaited, as `DELETE /api/rooms/{id}` does), so that a
    /// member who hears `room_ended` can rely on it surviving a restart.
    async fn process_all(&mut self, ctx: &WsContext, conn: ConnId) -> Result<(), Exit> {
        if let Some(cluster) = &ctx.cluster {
            // Boxed: inline, its future would enlarge every connection's task, also
            // without --redis.
            return Box::pin(self.process_all_clustered(ctx, cluster, conn)).await;
        }
        while let Some(pending) = self.process_inbox(ctx, conn)? {
            let Pending::StoreEnd(room) = pending else {
                continue; // only in cluster mode
            };
            // Boxed: rare, and inline its future would enlarge every connection's task.
            Box::pin(self.end_meeting(ctx, conn, room)).await;
        }
        if self.inbox.is_empty() {
            self.inbox = BytesMut::new();
        }
        Ok(())
    }

    /// A host's `end_room` of a meeting: the end is stored, then applied.
    async fn end_meeting(&mut self, ctx: &WsContext, conn: ConnId, room: String) {
        let now = Now::system();
        if let Err(e) = ctx
            .store
            .end(room.clone(), now.wall, RoomEndReason::HostEnded)
            .await
        {
            error!(error = %e, %room, "cannot store the end of a meeting");
            self.queue_error(
                ErrorCode::Internal,
                "the meeting could not be ended; try again",
            );
            return;
        }
        ctx.hub.handle(conn, ClientMessage::EndRoom);
        self.drain_outgoing();
    }

    /// [`Connection::process_all`] in cluster mode: every message goes to the cluster.
    async fn process_all_clustered(
        &mut self,
        ctx: &WsContext,
        cluster: &Cluster,
        conn: ConnId,
    ) -> Result<(), Exit> {
        while let Some(pending) = self.process_inbox(ctx, conn)? {
            if let Pending::Cluster(msg) = pending {
                cluster.handle(conn, *msg).await;
                self.drain_outgoing();
            }
        }
        if self.inbox.is_empty() {
            self.inbox = BytesMut::new();
        }
        Ok(())
    }

    /// Handles messages until the inbox has no complete one (`Ok(None)`), or until a
    /// host's `end_room` of a meeting (`Ok(Some(Pending::StoreEnd(room)))`: the caller
    /// stores the end, then applies it and calls again for the rest).
    /// In cluster mode every message is left to the caller (`Ok(Some(Pending::Cluster))`).
    fn process_inbox(&mut self, ctx: &WsContext, conn: ConnId) -> Result<Option<Pending>, Exit> {
        let hub = &ctx.hub;
        loop {
            let event = match self.decoder.decode(&mut self.inbox) {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(None),
                Err(violation) => {
                    debug!(%violation, "closing");
                    return Err(Exit::Close(close_code::PROTOCOL_ERROR, violation.0));
                }
            };
            match event {
                // A ping costs a token like a message: a ping flood is a flood.
                Event::Ping(payload) => {
                    if self.admit()? {
                        encode_frame(&mut self.outbox, Opcode::Pong, &payload);
                    }
                }
                Event::Pong => {}
                // The closing handshake echoes the peer's code (RFC 6455 §5.5.1).
                Event::Close(code) => {
                    return Err(Exit::Close(code.unwrap_or(close_code::NORMAL), "bye"));
                }
                Event::CloseWithBadReason => {
                    return Err(Exit::Close(
                        close_code::INVALID_DATA,
                        "close reason is not UTF-8",
                    ));
                }
                Event::Text(text) => {
                    if self.admit()? {
                        match ClientMessage::parse(&text) {
                            Ok(msg) if ctx.cluster.is_some() => {
                                debug!(kind = msg.kind(), bytes = text.len(), "message");
                                return Ok(Some(Pending::Cluster(Box::new(msg))));
                            }
                            Ok(ClientMessage::EndRoom)
                                if let Some(room) = hub.hosted_meeting(conn) =>
                            {
                                debug!(kind = "end_room", %room, "message; storing the end first");
                                return Ok(Some(Pending::StoreEnd(room)));
                            }
                            Ok(msg) => {
                                debug!(kind = msg.kind(), bytes = text.len(), "message");
                                hub.handle(conn, msg);
                                // Replies go out in the order of the messages they answer,
                                // before any error this loop raises for a later message.
                                self.drain_outgoing();
                            }
                            Err(e) => self.queue_error(e.code, &e.message),
                        }
                    }
                }
                Event::Binary => {
                    if self.admit()? {
                        self.queue_error(ErrorCode::BadJson, "binary frames are not accepted");
                    }
                }
                Event::InvalidUtf8 => {
                    if self.admit()? {
                        self.queue_error(ErrorCode::BadJson, "text frame is not valid UTF-8");
                    }
                }
                Event::TooLarge => {
                    if self.admit()? {
                        let message = format!(
                            "message larger than {} bytes was dropped",
                            self.decoder.max_message()
                        );
                        self.queue_error(ErrorCode::TooLarge, &message);
                    }
                }
            }
        }
    }

    /// Applies the rate limit to one message: `Ok(true)` to process it.
    fn admit(&mut self) -> Result<bool, Exit> {
        match self.limiter.check(Instant::now()) {
            Verdict::Allow => Ok(true),
            Verdict::Drop { notify } => {
                if notify {
                    self.queue_error(
                        ErrorCode::RateLimited,
                        "too many messages: this one was dropped",
                    );
                }
                Ok(false)
            }
            Verdict::Close => Err(Exit::Close(
                close_code::POLICY_VIOLATION,
                "rate limit exceeded",
            )),
        }
    }

    /// Moves what the hub queued into the write buffer.
    fn drain_outgoing(&mut self) {
        for _ in 0..WRITE_BATCH {
            match self.outgoing.try_recv() {
                Some(text) => self.queue_text(&text),
                None => break,
            }
        }
    }

    fn queue_text(&mut self, text: &str) {
        encode_frame(&mut self.outbox, Opcode::Text, text.as_bytes());
    }

    fn queue_error(&mut self, code: ErrorCode, message: &str) {
        debug!(%code, message, "error to client");
        self.queue_text(&ServerMessage::error(code, message).to_json());
    }

    /// Writes everything queued; a client that does not take it in time is dropped.
    async fn flush(&mut self, limit: Duration) -> Result<(), Exit> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        // Fast path without a timer: the socket usually takes everything at once.
        match self.stream.try_write(&self.outbox) {
            Ok(n) if n == self.outbox.len() => {
                self.outbox = Vec::new();
                return Ok(());
            }
            Ok(n) => {
                self.outbox.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Exit::Drop("socket error while writing")),
        }
        // Boxed so that an idle connection's task does not carry the timer's memory.
        Box::pin(self.flush_slowly(limit)).await
    }

    async fn flush_slowly(&mut self, limit: Duration) -> Result<(), Exit> {
        let write = async {
            self.stream.write_all(&self.outbox).await?;
            // TLS may hold the last record back until flushed; a no-op on plain TCP.
            self.stream.flush().await
        };
        match timeout(limit, write).await {
            Ok(Ok(())) => {
                self.outbox = Vec::new();
                Ok(())
            }
            Ok(Err(_)) => Err(Exit::Drop("socket error while writing")),
            Err(_) => Err(Exit::Drop("client stopped reading")),
        }
    }

    /// Sends what is still queued plus a close frame, then shuts the socket.
    async fn finish(&mut self, exit: Exit) -> Exit {
        if let Exit::Close(code, reason) = exit {
            self.drain_outgoing();
            encode_close(&mut self.outbox, code, reason);
            let _ = self.flush(Duration::from_secs(2)).await;
            let _ = timeout(Duration::from_secs(2), self.stream.shutdown()).await;
            // Drop the socket only once the client has closed its side (or after a
            // second): closing with unread input would send a TCP reset, which can
            // destroy our close frame before the client reads it. (Not at shutdown,
            // where the server should not be held up by clients that do not answer.)
            let linger = if code == close_code::GOING_AWAY {
                0
            } else {
                1000
            };
            let mut sink = [0u8; 512];
            let _ = timeout(Duration::from_millis(linger), async {
                while let Ok(n) = self.stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        exit
    }
}
