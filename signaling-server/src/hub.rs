//! The meeting point of all connections: [`Rooms`] behind one mutex, plus each
//! connection's outgoing queue.
//!
//! Each input is applied to [`Rooms`] and its outbox delivered while the lock is held.
//! That one lock is the whole concurrency story: ten simultaneous joins are simply
//! applied one after another, and messages to one connection are queued in the order
//! they were produced. The critical section is a few hash-map operations plus
//! serializing the outgoing JSON, never I/O: delivery is a non-blocking `try_send`.
//! A client whose queue is full is too slow to keep up; it is disconnected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::warn;

use crate::ids;
use crate::protocol::ClientMessage;
use crate::rooms::{ConnId, Outbox, Rooms, RoomsConfig};

/// A registered connection: its id, public `peer_id` and the queue of JSON texts to send.
#[derive(Debug)]
pub struct Registration {
    pub conn: ConnId,
    pub peer_id: String,
    pub outgoing: mpsc::Receiver<String>,
}

#[derive(Debug)]
struct Inner {
    rooms: Rooms,
    queues: HashMap<ConnId, mpsc::Sender<String>>,
}

/// Shared state of one server.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    queue_len: usize,
}

impl Hub {
    pub fn new(config: RoomsConfig, queue_len: usize) -> Hub {
        Hub {
            inner: Mutex::new(Inner {
                rooms: Rooms::new(config),
                queues: HashMap::new(),
            }),
            next_conn: AtomicU64::new(1),
            queue_len: queue_len.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is updated by plain hash-map operations that cannot leave it half
        // done, so a panic elsewhere while holding the lock does not corrupt it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new connection joins the hub.
    pub fn connect(&self) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let peer_id = ids::peer_id();
        let (tx, rx) = mpsc::channel(self.queue_len);
        let mut inner = self.lock();
        inner.rooms.connect(conn, peer_id.clone());
        inner.queues.insert(conn, tx);
        Registration {
            conn,
            peer_id,
            outgoing: rx,
        }
    }

    /// A message from `conn`.
    pub fn handle(&self, conn: ConnId, msg: ClientMessage) {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut out = Outbox::new();
        inner.rooms.handle(conn, msg, now, &mut out);
        inner.deliver(out, now);
    }

    /// `conn` is gone; idempotent.
    pub fn disconnect(&self, conn: ConnId) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.queues.remove(&conn);
        let mut out = Outbox::new();
        inner.rooms.disconnect(conn, now, &mut out);
        inner.deliver(out, now);
    }

    /// Ring timeouts and room expiry.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut out = Outbox::new();
        inner.rooms.tick(now, &mut out);
        inner.deliver(out, now);
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
    fn deliver(&mut self, mut out: Outbox, now: Instant) {
        // A loop, not recursion: kicking a slow client produces more messages.
        while !out.is_empty() {
            let mut too_slow = Vec::new();
            for (conn, msg) in out.drain(..) {
                let Some(queue) = self.queues.get(&conn) else {
                    continue; // already gone; its own task is cleaning up
                };
                match queue.try_send(msg.to_json()) {
                    Ok(()) => {}
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
