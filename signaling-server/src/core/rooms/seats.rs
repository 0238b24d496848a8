//! Seats kept for `resume`: a dropped member stays *away* for the grace, what would be
//! sent to it is queued (bounded), and a `resume` with its token on a new connection
//! takes the seat back.

use super::*;

/// Most messages kept for an away member; beyond that the oldest are dropped.
pub const AWAY_QUEUE_MESSAGES: usize = 64;
/// Most bytes (of JSON) kept for an away member; beyond that the oldest are dropped.
pub const AWAY_QUEUE_BYTES: usize = 256 * 1024;

/// A member whose connection dropped: its seat is kept until `deadline`, and what would
/// have been sent to it waits here.
#[derive(Debug)]
pub(super) struct Away {
    pub(super) deadline: Instant,
    pub(super) queue: VecDeque<(ServerMessage, usize)>,
    /// Sum of the queued messages' JSON lengths.
    pub(super) bytes: usize,
    /// Messages dropped because the queue was full.
    pub(super) dropped: usize,
}

impl Away {
    pub(super) fn new(deadline: Instant) -> Away {
        Away {
            deadline,
            queue: VecDeque::new(),
            bytes: 0,
            dropped: 0,
        }
    }

    /// Queues `msg`, dropping the oldest messages to stay within the bounds: a member
    /// that comes back needs the latest state (a new offer supersedes an old one) more
    /// than the history.
    pub(super) fn push(&mut self, msg: ServerMessage, peer_id: &str) {
        let size = msg.to_json().len();
        self.queue.push_back((msg, size));
        self.bytes += size;
        while self.queue.len() > AWAY_QUEUE_MESSAGES || self.bytes > AWAY_QUEUE_BYTES {
            let Some((_, dropped)) = self.queue.pop_front() else {
                break;
            };
            self.bytes -= dropped;
            self.dropped += 1;
            warn!(
                peer = %peer_id,
                dropped = self.dropped,
                "queue of an away member full; dropped its oldest message"
            );
        }
    }
}

impl Rooms {
    /// Whether a drop of `conn` keeps its seat: resume is on and it sits in a live room.
    /// A caller whose call still rings does not: there is no call to come back to yet.
    pub(super) fn keeps_seat(&self, conn: ConnId) -> bool {
        if self.config.resume_grace.is_zero() {
            return false;
        }
        let Some(room_name) = self.conns.get(&conn).and_then(|c| c.room.as_deref()) else {
            return false;
        };
        let ringing = self.calls.contains_key(room_name);
        !ringing
            && self
                .rooms
                .get(room_name)
                .is_some_and(|r| r.ended_at.is_none() && r.members.contains(&conn))
    }

    /// Marks `conn` (in a room) away and tells the other member.
    pub(super) fn go_away(&mut self, conn: ConnId, now: Now, out: &mut Outbox) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let peer_id = c.peer_id.clone();
        let room_name = c.room.clone().unwrap_or_default();
        info!(room = %room_name, peer = %peer_id, grace = ?self.config.resume_grace, "away");
        self.away
            .insert(conn, Away::new(now.mono + self.config.resume_grace));
        for other in self.others(&room_name, conn) {
            self.send(
                other,
                ServerMessage::PeerReconnecting {
                    peer_id: peer_id.clone(),
                },
                out,
            );
        }
    }

    /// Sends `msg` to a room member, or queues it while the member is away.
    pub(super) fn send(&mut self, to: ConnId, msg: ServerMessage, out: &mut Outbox) {
        match self.away.get_mut(&to) {
            Some(away) => {
                let peer_id = self.conns.get(&to).map_or("", |c| c.peer_id.as_str());
                away.push(msg, peer_id);
            }
            None => out.push((to, msg)),
        }
    }

    /// The away member `conn` did not come back in time: it leaves as a dropped
    /// connection did before resume existed.
    pub(super) fn expire_away(&mut self, conn: ConnId, now: Now, out: &mut Outbox) {
        let Some(away) = self.away.remove(&conn) else {
            return;
        };
        if let Some(c) = self.conns.get(&conn) {
            info!(
                peer = %c.peer_id,
                room = ?c.room,
                undelivered = away.queue.len(),
                "resume grace over"
            );
        }
        self.leave_room(conn, LeaveReason::Disconnected, now, out);
        self.conns.remove(&conn);
    }

    /// A fresh resume token for a `joined`, or none when resume is off.
    pub(super) fn new_resume_token(&self) -> Option<String> {
        (!self.config.resume_grace.is_zero()).then(ids::resume_token)
    }

    /// `conn` (a new connection) takes back the seat `peer_id` left in `room` when its
    /// connection dropped: same peer id, host role and partner; a fresh token; then what
    /// was queued meanwhile. The partner hears nothing (it was told `peer_reconnecting`).
    pub(super) fn resume(
        &mut self,
        conn: ConnId,
        room: &str,
        peer_id: &str,
        token: &str,
        now: Now,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
        let fail = |why: &str| refuse(ErrorCode::ResumeFailed, why);
        if self.config.resume_grace.is_zero() {
            return fail("this server does not keep seats (resume is off)");
        }
        if self.conns.get(&conn).is_none_or(|c| c.room.is_some()) {
            return fail("this connection is in a room already; resume on a new connection");
        }
        let room_name = room.trim();
        let Some(r) = self.rooms.get(room_name) else {
            return fail("there is no such room (it may have expired)");
        };
        if r.ended_at.is_some() {
            return fail("the room has ended");
        }
        let seat = r
            .members
            .iter()
            .copied()
            .find(|m| self.conns.get(m).is_some_and(|c| c.peer_id == peer_id));
        let Some(seat) = seat else {
            return fail("`peer_id` is not in that room (its grace may be over)");
        };
        // The token is checked before anything about the seat is revealed.
        let matches = self
            .conns
            .get(&seat)
            .and_then(|c| c.resume_hash.as_ref())
            .is_some_and(|hash| ids::secret_matches(hash, token));
        if !matches {
            info!(
                room = room_name,
                peer = peer_id,
                "resume with a wrong token"
            );
            return fail("wrong `resume_token`");
        }
        if !self.away.contains_key(&seat) {
            // Its old connection has not been noticed dead yet (a path that died
            // silently, e.g. the client changed networks, is only noticed at the ping
            // timeout). The token proves the client: its new connection wins, and the
            // old one is treated as dropped now.
            info!(
                room = room_name,
                peer = peer_id,
                "resume takes over a connection not yet noticed dead"
            );
            self.disconnect(seat, now, out);
        }
        let Some(away) = self.away.get(&seat) else {
            return fail("that member's seat cannot be kept (e.g. its call still rings)");
        };
        if away.deadline <= now.mono {
            // The sweep has not run yet; do what it would do.
            self.expire_away(seat, now, out);
            return fail("the grace period is over");
        }
        let away = self.away.remove(&seat);
        let old = self.conns.remove(&seat);
        let (Some(away), Some(old)) = (away, old) else {
            return refuse(ErrorCode::Internal, "away member state missing");
        };
        let Some(r) = self.rooms.get_mut(room_name) else {
            return refuse(ErrorCode::Internal, "room state missing");
        };
        for m in &mut r.members {
            if *m == seat {
                *m = conn;
            }
        }
        if r.host == Some(seat) {
            r.host = Some(conn);
        }
        let host = r.host == Some(conn);
        let members = r.members.len();
        let peers = self.peer_infos(&self.others(room_name, conn));
        let resume_token = self.new_resume_token();
        let Some(me) = self.conns.get_mut(&conn) else {
            return refuse(ErrorCode::Internal, "unknown connection");
        };
        me.peer_id = old.peer_id;
        me.display_name = old.display_name;
        me.room = Some(room_name.to_owned());
        me.resume_hash = resume_token.as_deref().map(ids::secret_hash);
        info!(
            room = room_name,
            peer = %me.peer_id,
            replayed = away.queue.len(),
            dropped = away.dropped,
            "resumed"
        );
        out.push((
            conn,
            ServerMessage::Joined {
                room: room_name.to_owned(),
                peer_id: me.peer_id.clone(),
                members,
                host,
                peers,
                resume_token,
            },
        ));
        out.extend(away.queue.into_iter().map(|(msg, _)| (conn, msg)));
        Ok(())
    }
}
