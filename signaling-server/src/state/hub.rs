//! The meeting point of all connections: [`Rooms`] behind one mutex, plus each
//! connection's outgoing queue.
//!
//! Each input is applied to [`Rooms`] and its outbox delivered while the lock is held.
//! That one lock is the whole concurrency story: ten simultaneous joins are simply
//! applied one after another, and messages to one connection are queued in the order
//! they were produced. The critical section is a few hash-map operations, never I/O and
//! never JSON: delivery is a non-blocking `try_send` of the message itself, and each
//! connection's task serializes what it takes out of its queue (a 6 kB offer's SDP is
//! escaped there, in parallel, not while every other connection waits for the lock).
//! A client whose queue is full (in messages or in bytes) is too slow to keep up; it is
//! disconnected.
//!
//! Meeting changes the state machine makes on its own (a host's `end_room`, expiry) are
//! handed to the [`Store`] thread under the same lock, so they are recorded in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use time::OffsetDateTime;
use tokio::sync::mpsc;
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

/// The receiving end of one connection's queue, which keeps count of the bytes in it.
#[derive(Debug)]
pub struct Outgoing {
    rx: mpsc::Receiver<Box<ServerMessage>>,
    bytes: Arc<AtomicUsize>,
}

impl Outgoing {
    /// The next message's JSON (None: the hub dropped this connection). Cancel-safe.
    pub async fn recv(&mut self) -> Option<String> {
        let msg = self.rx.recv().await?;
        Some(self.taken(&msg))
    }

    /// The next message's JSON if one is queued.
    pub fn try_recv(&mut self) -> Option<String> {
        let msg = self.rx.try_recv().ok()?;
        Some(self.taken(&msg))
    }

    fn taken(&self, msg: &ServerMessage) -> String {
        self.bytes.fetch_sub(msg.weight(), Ordering::Relaxed);
        msg.to_json()
    }
}

/// The sending end of one connection's queue. Boxed: a channel allocates its slots in
/// blocks, and a slot of the whole enum would make every idle connection's queue
/// kilobytes larger.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<Box<ServerMessage>>,
    bytes: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Inner {
    rooms: Rooms,
    queues: HashMap<ConnId, Queue>,
    /// Most bytes queued for one connection.
    queue_bytes: usize,
}

/// Shared state of one server.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    queue_len: usize,
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
                queue_bytes,
            }),
            next_conn: AtomicU64::new(1),
            queue_len: queue_len.max(1),
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
        let (tx, rx) = mpsc::channel(self.queue_len);
        let bytes = Arc::new(AtomicUsize::new(0));
        let mut inner = self.lock();
        inner.rooms.connect(conn, peer_id.clone(), address);
        inner.queues.insert(
            conn,
            Queue {
                tx,
                bytes: Arc::clone(&bytes),
            },
        );
        Registration {
            conn,
            peer_id,
            outgoing: Outgoing { rx, bytes },
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
        let now = Now::system();
        let mut inner = self.lock();
        self.finish(&mut inner, vec![(conn, msg)], now);
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
                let Some(queue) = self.queues.get(&conn) else {
                    continue; // already gone; its own task is cleaning up
                };
                let len = msg.weight();
                if queue.bytes.load(Ordering::Relaxed) + len > self.queue_bytes {
                    too_slow.push(conn);
                    continue;
                }
                match queue.tx.try_send(Box::new(msg)) {
                    Ok(()) => {
                        queue.bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => too_slow.push(conn),
                    // The connection task ended and will call `disconnect` itself.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            for conn in too_slow {
                if self.queues.remove(&conn).is_some() {
                    warn!(
                        conn,
                        "client too slow to read its messages; disconnecting it"
                    );
                    self.rooms.disconnect(conn, now, &mut out);
                }
            }
        }
    }
}
