//! The meeting point of all connections: [`Rooms`] behind one mutex, plus each
//! connection's outgoing queue.
//!
//! Each input is applied to [`Rooms`] and its outbox delivered while the lock is held.
//! That one lock is the whole concurrency story: ten simultaneous joins are simply
//! applied one after another, and messages to one connection are queued in the order
//! they were produced. The critical section is a few hash-map operations, never I/O and
//! never JSON: delivery is a non-blocking push of the message itself, and each
//! connection's task serializes what it takes out of its queue (a 6 kB offer's SDP is
//! escaped there, in parallel, not while every other connection waits for the lock).
//! A client whose queue is full (in messages or in bytes) is too slow to keep up; it is
//! disconnected.
//!
//! Meeting changes the state machine makes on its own (a host's `end_room`, expiry) are
//! handed to the [`Store`] thread under the same lock, so they are recorded in order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use time::OffsetDateTime;
use tracing::warn;

use crate::core::clock::Now;
use crate::core::rooms::{ConnId, HostCheck, Meeting, Outbox, Rooms, RoomsConfig};
use crate::ids;
use crate::protocol::api::RoomInfo;
use crate::protocol::{ClientMessage, ServerMessage};
use crate::state::store::Store;

/// A registered connection: its id, public `peer_id` and the queue of JSON texts to send.
#[derive(Debug)]
pub struct Registration {
    pub conn: ConnId,
    pub peer_id: String,
    pub outgoing: Outgoing,
}

/// The receiving end of one connection's queue.
#[derive(Debug)]
pub struct Outgoing(Arc<Mutex<QueueState>>);

/// One connection's queue: the hub (the only sender) pushes under its lock, the
/// connection's task takes. Not a tokio channel: that allocates its shared part and a
/// first block of slots up front (about 0.8 kB per connection, idle or not); here an
/// idle queue is one small allocation, its buffer freed whenever it runs empty.
#[derive(Debug, Default)]
struct QueueState {
    messages: VecDeque<Queued>,
    /// Sum of the queued messages' [`Queued::weight`].
    bytes: usize,
    /// The connection's task, waiting in [`Outgoing::recv`].
    waker: Option<Waker>,
    /// The hub let go of this connection ([`Queue`] dropped).
    sender_gone: bool,
    /// The connection's task ended ([`Outgoing`] dropped).
    receiver_gone: bool,
}

/// What waits in a connection's queue.
#[derive(Debug)]
enum Queued {
    Message(ServerMessage),
    /// A message's JSON text as another instance built it (cluster mode).
    Json(String),
}

impl Queued {
    /// What it counts against the queue's byte bound: as [`ServerMessage::weight`], a
    /// fixed part plus the long text.
    fn weight(&self) -> usize {
        match self {
            Queued::Message(msg) => msg.weight(),
            Queued::Json(json) => ServerMessage::WEIGHT_BASE + json.len(),
        }
    }

    fn into_json(self) -> String {
        match self {
            Queued::Message(msg) => msg.to_json(),
            Queued::Json(json) => json,
        }
    }
}

fn lock_queue(queue: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    // Every change is a few field updates that cannot be left half done.
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Outgoing {
    /// The next message's JSON (None: the hub dropped this connection and nothing is
    /// left). Cancel-safe.
    pub async fn recv(&mut self) -> Option<String> {
        std::future::poll_fn(|cx| self.poll_next(cx))
            .await
            .map(Queued::into_json)
    }

    /// The next message's JSON if one is queued.
    pub fn try_recv(&mut self) -> Option<String> {
        let next = lock_queue(&self.0).take();
        next.map(Queued::into_json)
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Queued>> {
        // Takes from the task's budget as tokio's channels do, so that a connection
        // always fed by others still yields to the scheduler now and then.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let mut state = lock_queue(&self.0);
        if let Some(msg) = state.take() {
            coop.made_progress();
            return Poll::Ready(Some(msg));
        }
        if state.sender_gone {
            coop.made_progress();
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl QueueState {
    fn take(&mut self) -> Option<Queued> {
        let msg = self.messages.pop_front()?;
        self.bytes = self.bytes.saturating_sub(msg.weight());
        if self.messages.is_empty() {
            // An idle connection holds no buffer.
            self.messages = VecDeque::new();
        }
        Some(msg)
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        let mut state = lock_queue(&self.0);
        state.receiver_gone = true;
        state.messages = VecDeque::new();
    }
}

/// The sending end of one connection's queue, held by the hub.
#[derive(Debug)]
struct Queue(Arc<Mutex<QueueState>>);

/// Why a message was not queued.
enum Refused {
    /// The queue holds its most messages or bytes: the client is too slow.
    Full,
    /// The connection's task ended (it takes itself out of the hub).
    Closed,
}

impl Queue {
    /// Queues `msg` unless that would pass `max_len` messages or `max_bytes` bytes.
    fn push(&self, msg: Queued, max_len: usize, max_bytes: usize) -> Result<(), Refused> {
        let weight = msg.weight();
        let waker = {
            let mut state = lock_queue(&self.0);
            if state.bytes + weight > max_bytes {
                return Err(Refused::Full);
            }
            if state.receiver_gone {
                return Err(Refused::Closed);
            }
            if state.messages.len() >= max_len {
                return Err(Refused::Full);
            }
            state.messages.push_back(msg);
            state.bytes += weight;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let waker = {
            let mut state = lock_queue(&self.0);
            state.sender_gone = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[derive(Debug)]
struct Inner {
    rooms: Rooms,
    queues: HashMap<ConnId, Queue>,
    /// Most messages queued for one connection.
    queue_len: usize,
    /// Most bytes queued for one connection.
    queue_bytes: usize,
}

/// Shared state of one server.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    store: Option<Store>,
}

impl Hub {
    /// A hub recording meeting changes in `store` (none: they are not recorded); each
    /// connection's queue holds at most `queue_len` messages and `queue_bytes` bytes.
    pub fn new(
        config: RoomsConfig,
        queue_len: usize,
        queue_bytes: usize,
        store: Option<Store>,
    ) -> Hub {
        Hub {
            inner: Mutex::new(Inner {
                rooms: Rooms::new(config),
                queues: HashMap::new(),
                queue_len: queue_len.max(1),
                queue_bytes,
            }),
            next_conn: AtomicU64::new(1),
            store,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is updated by plain hash-map operations that cannot leave it half
        // done, so a panic elsewhere while holding the lock does not corrupt it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new connection joins the hub, from `address` (the client's, for per-address
    /// limits; None when not known).
    pub fn connect(&self, address: Option<std::net::IpAddr>) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let peer_id = ids::peer_id();
        let state = Arc::new(Mutex::new(QueueState::default()));
        let mut inner = self.lock();
        inner.rooms.connect(conn, peer_id.clone(), address);
        inner.queues.insert(conn, Queue(Arc::clone(&state)));
        Registration {
            conn,
            peer_id,
            outgoing: Outgoing(state),
        }
    }

    /// A message from `conn`.
    pub fn handle(&self, conn: ConnId, msg: ClientMessage) {
        let now = Now::system();
        let mut inner = self.lock();
        let mut out = Outbox::new();
        inner.rooms.handle(conn, msg, now, &mut out);
        self.finish(&mut inner, out, now);
    }

    /// Queues `msg` for `conn` (cluster mode delivers through here); a connection that
    /// is gone is skipped, one too slow to keep up is disconnected as for any message.
    pub fn send(&self, conn: ConnId, msg: ServerMessage) {
        self.send_queued(conn, Queued::Message(msg));
    }

    /// [`Hub::send`] of a message's JSON text as another instance built it.
    pub fn send_json(&self, conn: ConnId, json: String) {
        self.send_queued(conn, Queued::Json(json));
    }

    fn send_queued(&self, conn: ConnId, item: Queued) {
        let mut inner = self.lock();
        if inner.push(conn, item) {
            return;
        }
        let now = Now::system();
        let mut out = Outbox::new();
        inner.kick(conn, now, &mut out);
        self.finish(&mut inner, out, now);
    }

    /// The live meeting `conn` hosts, if any ([`Rooms::hosted_meeting`]).
    pub fn hosted_meeting(&self, conn: ConnId) -> Option<String> {
        self.lock().rooms.hosted_meeting(conn)
    }

    /// `conn` is gone; idempotent.
    pub fn disconnect(&self, conn: ConnId) {
        let now = Now::system();
        let mut inner = self.lock();
        inner.queues.remove(&conn);
        let mut out = Outbox::new();
        inner.rooms.disconnect(conn, now, &mut out);
        self.finish(&mut inner, out, now);
    }

    /// Ring timeouts and room expiry.
    pub fn tick(&self) {
        let now = Now::system();
        let mut inner = self.lock();
        let mut out = Outbox::new();
        inner.rooms.tick(now, &mut out);
        self.finish(&mut inner, out, now);
    }

    /// Delivers `out` and hands meeting changes to the store.
    fn finish(&self, inner: &mut Inner, out: Outbox, now: Now) {
        inner.deliver(out, now);
        let events = inner.rooms.take_events();
        if let Some(store) = &self.store {
            store.record(events);
        }
    }

    /// Adds a meeting; `false` when a room of that name exists.
    pub fn add_meeting(&self, room: &str, meeting: Meeting) -> bool {
        self.lock().rooms.add_meeting(room, meeting, Now::system())
    }

    /// A room as `GET /api/rooms/{room}` shows it.
    pub fn room_info(&self, room: &str) -> Option<RoomInfo> {
        self.lock().rooms.room_info(room, Now::system())
    }

    /// Meetings starting in `[from, to]`, earliest first.
    pub fn list_meetings(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Vec<RoomInfo> {
        self.lock().rooms.list_meetings(from, to, Now::system())
    }

    /// Whether `token` may end the meeting `room`.
    pub fn check_host(&self, room: &str, token: Option<&str>) -> Result<(), HostCheck> {
        self.lock().rooms.check_host(room, token)
    }

    /// Ends `room` for its members (`room_ended/host_ended`); `false` if it was not live.
    pub fn end_by_host(&self, room: &str) -> bool {
        let now = Now::system();
        let mut inner = self.lock();
        let mut out = Outbox::new();
        let ended = inner.rooms.end_by_host(room, now, &mut out);
        self.finish(&mut inner, out, now);
        ended
    }

    /// (connections, rooms) right now.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.rooms.connection_count(), inner.rooms.room_count())
    }

    /// Members of `room`, if it exists.
    pub fn members(&self, room: &str) -> Option<usize> {
        self.lock().rooms.members(room)
    }
}

impl Inner {
    fn deliver(&mut self, mut out: Outbox, now: Now) {
        // A loop, not recursion: kicking a slow client produces more messages.
        while !out.is_empty() {
            let mut too_slow = Vec::new();
            for (conn, msg) in out.drain(..) {
                if !self.push(conn, Queued::Message(msg)) {
                    too_slow.push(conn);
                }
            }
            for conn in too_slow {
                self.kick(conn, now, &mut out);
            }
        }
    }

    /// Queues `item` for `conn`; `false` when `conn` is too slow to keep up.
    fn push(&self, conn: ConnId, item: Queued) -> bool {
        let Some(queue) = self.queues.get(&conn) else {
            return true; // already gone; its own task is cleaning up
        };
        match queue.push(item, self.queue_len, self.queue_bytes) {
            Ok(()) => true,
            Err(Refused::Full) => false,
            // The connection task ended and will call `disconnect` itself.
            Err(Refused::Closed) => true,
        }
    }

    /// Disconnects `conn`, too slow to read its messages; what that tells others is
    /// added to `out`.
    fn kick(&mut self, conn: ConnId, now: Now, out: &mut Outbox) {
        if self.queues.remove(&conn).is_some() {
            warn!(
                conn,
                "client too slow to read its messages; disconnecting it"
            );
            self.rooms.disconnect(conn, now, out);
        }
    }
}
