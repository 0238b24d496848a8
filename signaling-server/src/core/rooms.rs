//! The room and direct-call state machine, with no I/O.
//!
//! Every input (a parsed client message, a connection coming or going, the clock
//! ticking) is a method call that appends the messages to send to an [`Outbox`]. Who
//! is in which room, who holds which name and which calls are ringing lives here and
//! nowhere else; [`crate::state::hub::Hub`] wraps it in one mutex, which is what makes
//! concurrent joins race-free, and delivers the outbox to the connections.
//!
//! Rooms come in two kinds. An ad-hoc room is created by the first `join` of its name;
//! its first member is host, the role passes on when the host leaves, and it is
//! forgotten `room_ttl` after it became empty or ended. A meeting is created through the
//! HTTP API with a [`Meeting`]: it has a host token (whoever presents it is host), a
//! start time (earlier joins get `not_started`), its own ttl counted from `starts_at` at
//! the earliest, and it stays `ended` for `ended_retention` so late joiners hear so.
//! Meeting changes that must outlive the process (ended, forgotten) are queued as
//! [`MeetingEvent`]s for the store.
//!
//! Seats survive a dropped connection. Every `joined` carries a fresh resume token (only
//! its hash is kept). When a member's connection ends without `leave`, the member stays
//! in the room as *away* for `resume_grace`: the seat still counts, the partner hears
//! `peer_reconnecting`, and whatever would have been sent to the member is queued
//! (bounded). A `resume` with the token on a new connection moves the seat there and
//! replays the queue; when the grace runs out, [`Rooms::tick`] removes the member exactly
//! as an abrupt disconnect did before (`peer_left/disconnected`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tracing::{debug, info, warn};

use crate::core::clock::{Now, format_rfc3339};
use crate::ids;
use crate::protocol::api::{RoomInfo, RoomState};
use crate::protocol::{
    CallRejectReason, ClientMessage, ErrorCode, LeaveReason, PeerInfo, RoomEndReason,
    ServerMessage, validate_name,
};

/// A connection's number inside the server (never sent on the wire; `peer_id` is).
pub type ConnId = u64;

/// Messages to deliver, in order.
pub type Outbox = Vec<(ConnId, ServerMessage)>;

/// Timing of rooms and calls.
#[derive(Debug, Clone, Copy)]
pub struct RoomsConfig {
    /// How long an empty (or ended) ad-hoc room is kept.
    pub room_ttl: Duration,
    /// How long a direct call rings.
    pub ring_timeout: Duration,
    /// How long before its `starts_at` a meeting can be joined.
    pub early_join: Duration,
    /// How long an ended meeting is remembered (refusing joins with `room_ended`).
    pub ended_retention: Duration,
    /// How long a member whose connection dropped keeps its seat for a `resume`; zero
    /// turns resume off (no token in `joined`, a drop leaves the room at once).
    pub resume_grace: Duration,
    /// Most rooms held at once; a `join` that would create one more is refused with
    /// `rate_limited`.
    pub max_rooms: usize,
    /// Most rooms one connection may create in a minute (by joining names no room has
    /// yet); more are refused with `rate_limited`.
    pub rooms_per_minute: usize,
    /// The same for all connections from one client address together (a client that
    /// reconnects for every room would escape the per-connection cap).
    pub rooms_per_minute_per_address: usize,
}

/// The window of the room-creation caps.
const MINUTE: Duration = Duration::from_secs(60);

/// Most messages kept for an away member; beyond that the oldest are dropped.
pub const AWAY_QUEUE_MESSAGES: usize = 64;
/// Most bytes (of JSON) kept for an away member; beyond that the oldest are dropped.
pub const AWAY_QUEUE_BYTES: usize = 256 * 1024;

/// How long an ended meeting is remembered by default: 7 days.
pub const ENDED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What makes a room created through the HTTP API a meeting.
#[derive(Clone, PartialEq, Eq)]
pub struct Meeting {
    /// SHA-256 of the host token ([`ids::secret_hash`]); the token itself is not kept.
    pub token_hash: [u8; 32],
    pub title: Option<String>,
    pub starts_at: OffsetDateTime,
    /// How long the room lives once empty (counted from `starts_at` at the earliest).
    pub ttl: Duration,
    pub created_at: OffsetDateTime,
    /// When and why it ended, once it has.
    pub ended: Option<(OffsetDateTime, RoomEndReason)>,
}

impl std::fmt::Debug for Meeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token hash stays out of logs and debug output.
        f.debug_struct("Meeting")
            .field("title", &self.title)
            .field("starts_at", &self.starts_at)
            .field("ttl", &self.ttl)
            .field("created_at", &self.created_at)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Meeting {
    /// The earliest moment it may be forgotten if nobody comes: `starts_at + ttl`.
    pub fn first_expiry(&self) -> OffsetDateTime {
        self.starts_at + self.ttl
    }
}

/// A meeting change the store must record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeetingEvent {
    Ended {
        room: String,
        at: OffsetDateTime,
        reason: RoomEndReason,
    },
    /// Ended long enough ago to be forgotten.
    Forgotten { room: String },
}

/// Why `DELETE /api/rooms/{id}` cannot end a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCheck {
    UnknownRoom,
    /// No token, a wrong one, or an ad-hoc room (which has none).
    WrongToken,
    Ended,
}

#[derive(Debug)]
struct Conn {
    peer_id: String,
    /// Display name given in `join` (or the registered name in a direct call).
    display_name: Option<String>,
    /// Name claimed with `register`.
    registered: Option<String>,
    room: Option<String>,
    /// The call that is ringing this connection, if any.
    rung_by: Option<String>,
    /// Hash of the resume token of the seat it holds (set with each `joined`).
    resume_hash: Option<[u8; 32]>,
    /// When it created rooms, over the last minute.
    created: VecDeque<Instant>,
    /// The client's address, when known.
    address: Option<IpAddr>,
}

/// A member whose connection dropped: its seat is kept until `deadline`, and what would
/// have been sent to it waits here.
#[derive(Debug)]
struct Away {
    deadline: Instant,
    queue: VecDeque<(ServerMessage, usize)>,
    /// Sum of the queued messages' JSON lengths.
    bytes: usize,
    /// Messages dropped because the queue was full.
    dropped: usize,
}

impl Away {
    fn new(deadline: Instant) -> Away {
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
    fn push(&mut self, msg: ServerMessage, peer_id: &str) {
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

#[derive(Debug, Default)]
struct Room {
    /// In order of arrival; at most two.
    members: Vec<ConnId>,
    host: Option<ConnId>,
    empty_since: Option<Instant>,
    ended_at: Option<Instant>,
    /// Set for rooms created through the HTTP API.
    meeting: Option<Meeting>,
}

#[derive(Debug)]
struct PendingCall {
    caller: ConnId,
    callee: ConnId,
    deadline: Instant,
}

/// Rejects the message with an `error`; nothing else changes.
struct Refusal(ErrorCode, String);

fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(code, message.into()))
}

/// All rooms, names and ringing calls of one server.
#[derive(Debug)]
pub struct Rooms {
    config: RoomsConfig,
    conns: HashMap<ConnId, Conn>,
    rooms: HashMap<String, Room>,
    names: HashMap<String, ConnId>,
    calls: HashMap<String, PendingCall>,
    /// Members whose connection dropped, by the `ConnId` that still holds their seat.
    away: HashMap<ConnId, Away>,
    events: Vec<MeetingEvent>,
    /// When rooms were created from each client address, over the last minute.
    created_from: HashMap<IpAddr, VecDeque<Instant>>,
}

impl Rooms {
    pub fn new(config: RoomsConfig) -> Rooms {
        Rooms {
            config,
            conns: HashMap::new(),
            rooms: HashMap::new(),
            names: HashMap::new(),
            calls: HashMap::new(),
            away: HashMap::new(),
            events: Vec::new(),
            created_from: HashMap::new(),
        }
    }

    /// A new connection with its public `peer_id`, from `address` if known.
    pub fn connect(&mut self, conn: ConnId, peer_id: String, address: Option<IpAddr>) {
        self.conns.insert(
            conn,
            Conn {
                peer_id,
                display_name: None,
                registered: None,
                room: None,
                rung_by: None,
                resume_hash: None,
                created: VecDeque::new(),
                address,
            },
        );
    }

    /// The connection ended (closed, dropped or kicked) without `leave`. A member of a
    /// room keeps its seat as away for the resume grace; everything else it was part of
    /// (a registered name, a call ringing it) is let go at once.
    pub fn disconnect(&mut self, conn: ConnId, now: Now, out: &mut Outbox) {
        if !self.conns.contains_key(&conn) || self.away.contains_key(&conn) {
            return;
        }
        let keeps_seat = self.keeps_seat(conn);
        if keeps_seat {
            self.go_away(conn, now, out);
        } else {
            self.leave_room(conn, LeaveReason::Disconnected, now, out);
        }
        if let Some(call_id) = self.conn_mut(conn).and_then(|c| c.rung_by.take()) {
            self.end_pending_call(&call_id, Some(CallRejectReason::Offline), false, out);
        }
        if keeps_seat {
            // Names belong to the connection, not the seat: the next connection
            // registers again (and a caller meanwhile hears `offline`).
            if let Some(name) = self.conn_mut(conn).and_then(|c| c.registered.take()) {
                self.names.remove(&name);
            }
            return;
        }
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(name) = c.registered {
                self.names.remove(&name);
            }
            debug!(peer = %c.peer_id, "connection removed");
        }
    }

    /// Whether a drop of `conn` keeps its seat: resume is on and it sits in a live room.
    /// A caller whose call still rings does not: there is no call to come back to yet.
    fn keeps_seat(&self, conn: ConnId) -> bool {
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
    fn go_away(&mut self, conn: ConnId, now: Now, out: &mut Outbox) {
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

    /// `peers` of a `joined`: who these members are.
    fn peer_infos(&self, members: &[ConnId]) -> Vec<PeerInfo> {
        members
            .iter()
            .filter_map(|m| self.conns.get(m))
            .map(|c| PeerInfo {
                peer_id: c.peer_id.clone(),
                name: c.display_name.clone(),
            })
            .collect()
    }

    /// The members of `room_name` other than `conn`.
    fn others(&self, room_name: &str, conn: ConnId) -> Vec<ConnId> {
        self.rooms
            .get(room_name)
            .map(|r| r.members.iter().copied().filter(|&m| m != conn).collect())
            .unwrap_or_default()
    }

    /// Sends `msg` to a room member, or queues it while the member is away.
    fn send(&mut self, to: ConnId, msg: ServerMessage, out: &mut Outbox) {
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
    fn expire_away(&mut self, conn: ConnId, now: Now, out: &mut Outbox) {
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

    /// One message from `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: ClientMessage, now: Now, out: &mut Outbox) {
        let result = match msg {
            ClientMessage::Join {
                room,
                name,
                host_token,
            } => self.join(
                conn,
                &room,
                name.as_deref(),
                host_token.as_deref(),
                now,
                out,
            ),
            ClientMessage::Offer { sdp } => {
                self.relay(conn, out, |from| ServerMessage::Offer { from, sdp })
            }
            ClientMessage::Answer { sdp } => {
                self.relay(conn, out, |from| ServerMessage::Answer { from, sdp })
            }
            ClientMessage::Candidate { candidate } => self.relay(conn, out, |from| {
                ServerMessage::Candidate { from, candidate }
            }),
            ClientMessage::Leave => self.leave(conn, now, out),
            ClientMessage::EndRoom => self.end_room(conn, now, out),
            ClientMessage::Register { name } => self.register(conn, &name, out),
            ClientMessage::Call { to } => self.call(conn, &to, now, out),
            ClientMessage::Accept { call_id } => self.accept(conn, &call_id, now, out),
            ClientMessage::Reject { call_id } => self.reject(conn, &call_id, out),
            ClientMessage::Resume {
                room,
                peer_id,
                resume_token,
            } => self.resume(conn, &room, &peer_id, &resume_token, now, out),
        };
        match result {
            Ok(()) => {}
            Err(Refusal(ErrorCode::NotStarted, starts_at)) => {
                out.push((
                    conn,
                    ServerMessage::Error {
                        code: ErrorCode::NotStarted,
                        message: format!("the room opens at {starts_at}"),
                        starts_at: Some(starts_at),
                    },
                ));
            }
            Err(Refusal(code, message)) => out.push((conn, ServerMessage::error(code, message))),
        }
    }

    /// Time passes: away members whose grace ran out leave, unanswered calls stop
    /// ringing, empty and ended rooms expire.
    pub fn tick(&mut self, now: Now, out: &mut Outbox) {
        // Addresses that created no room in the last minute are forgotten here, not on
        // every join (the map stays small without a join paying for the whole of it).
        self.created_from.retain(|_, times| {
            times
                .back()
                .is_some_and(|&at| now.mono.saturating_duration_since(at) < MINUTE)
        });
        let mut gone: Vec<ConnId> = self
            .away
            .iter()
            .filter(|(_, a)| a.deadline <= now.mono)
            .map(|(&c, _)| c)
            .collect();
        // In connection order, so that the outcome does not depend on hash order.
        gone.sort_unstable();
        for conn in gone {
            self.expire_away(conn, now, out);
        }
        let overdue: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline <= now.mono)
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in overdue {
            info!(call = %call_id, "call not answered");
            self.end_pending_call(&call_id, Some(CallRejectReason::NoAnswer), true, out);
        }
        let config = self.config;
        let events = &mut self.events;
        self.rooms.retain(|name, room| {
            let Some(meeting) = &mut room.meeting else {
                let since = room.ended_at.or(room.empty_since);
                let keep =
                    since.is_none_or(|t| now.mono.saturating_duration_since(t) < config.room_ttl);
                if !keep {
                    info!(room = %name, "room expired");
                }
                return keep;
            };
            if let Some((ended, _)) = meeting.ended {
                let keep = now.wall < ended + config.ended_retention;
                if !keep {
                    debug!(room = %name, "ended meeting forgotten");
                    events.push(MeetingEvent::Forgotten { room: name.clone() });
                }
                return keep;
            }
            let expired = room.members.is_empty()
                && now.wall >= meeting.first_expiry()
                && room
                    .empty_since
                    .is_some_and(|t| now.mono.saturating_duration_since(t) >= meeting.ttl);
            if expired {
                info!(room = %name, "meeting expired");
                meeting.ended = Some((now.wall, RoomEndReason::Expired));
                room.ended_at = Some(now.mono);
                room.host = None;
                events.push(MeetingEvent::Ended {
                    room: name.clone(),
                    at: now.wall,
                    reason: RoomEndReason::Expired,
                });
            }
            true
        });
    }

    /// Meeting changes since the last call, oldest first, for the store.
    pub fn take_events(&mut self) -> Vec<MeetingEvent> {
        std::mem::take(&mut self.events)
    }

    /// Adds a meeting (created through the API, or loaded at start-up; possibly ended).
    /// `false` when a room of that name exists.
    pub fn add_meeting(&mut self, room: &str, meeting: Meeting, now: Now) -> bool {
        if self.rooms.contains_key(room) {
            return false;
        }
        let ended = meeting.ended.is_some();
        self.rooms.insert(
            room.to_owned(),
            Room {
                empty_since: Some(now.mono),
                ended_at: ended.then_some(now.mono),
                meeting: Some(meeting),
                ..Room::default()
            },
        );
        true
    }

    /// What `GET /api/rooms/{room}` shows.
    pub fn room_info(&self, room: &str, now: Now) -> Option<RoomInfo> {
        let r = self.rooms.get(room)?;
        let state = if r.ended_at.is_some() {
            RoomState::Ended
        } else if r
            .meeting
            .as_ref()
            .is_some_and(|m| now.wall < m.starts_at - self.config.early_join)
        {
            RoomState::Scheduled
        } else if r.members.is_empty() {
            RoomState::Open
        } else {
            RoomState::Active
        };
        let ttl = r.meeting.as_ref().map_or(self.config.room_ttl, |m| m.ttl);
        let expires_at = match (&r.meeting, state) {
            (Some(m), _) if m.ended.is_some() => m.ended.map(|(at, _)| at),
            (_, RoomState::Ended) => r.ended_at.map(|t| now.wall_of(t)),
            (_, RoomState::Active) => None,
            (meeting, _) => {
                let emptied = r.empty_since.map_or(now.wall, |t| now.wall_of(t)) + ttl;
                Some(
                    meeting
                        .as_ref()
                        .map_or(emptied, |m| emptied.max(m.first_expiry())),
                )
            }
        };
        Some(RoomInfo {
            room_id: room.to_owned(),
            title: r.meeting.as_ref().and_then(|m| m.title.clone()),
            starts_at: r.meeting.as_ref().map(|m| format_rfc3339(m.starts_at)),
            expires_at: expires_at.map(format_rfc3339),
            members: r.members.len(),
            state,
            ttl_s: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// Meetings whose `starts_at` lies in `[from, to]`, earliest first.
    pub fn list_meetings(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
        now: Now,
    ) -> Vec<RoomInfo> {
        let mut found: Vec<(OffsetDateTime, &String)> = self
            .rooms
            .iter()
            .filter_map(|(name, r)| Some((r.meeting.as_ref()?.starts_at, name)))
            .filter(|(t, _)| from.is_none_or(|f| *t >= f) && to.is_none_or(|e| *t <= e))
            .collect();
        found.sort();
        found
            .into_iter()
            .filter_map(|(_, name)| self.room_info(name, now))
            .collect()
    }

    /// Whether `token` may end the meeting `room` (for `DELETE /api/rooms/{room}`).
    pub fn check_host(&self, room: &str, token: Option<&str>) -> Result<(), HostCheck> {
        let r = self.rooms.get(room).ok_or(HostCheck::UnknownRoom)?;
        let matches = r
            .meeting
            .as_ref()
            .zip(token)
            .is_some_and(|(m, t)| ids::secret_matches(&m.token_hash, t));
        if !matches {
            return Err(HostCheck::WrongToken);
        }
        if r.ended_at.is_some() {
            return Err(HostCheck::Ended);
        }
        Ok(())
    }

    /// The live meeting `conn` is the host of, if any: its `end_room` must be stored
    /// before anybody hears of it.
    pub fn hosted_meeting(&self, conn: ConnId) -> Option<String> {
        let name = self.conns.get(&conn)?.room.clone()?;
        let room = self.rooms.get(&name)?;
        (room.host == Some(conn) && room.meeting.is_some() && room.ended_at.is_none())
            .then_some(name)
    }

    /// Ends `room` for everybody in it (`room_ended/host_ended`), as the host's
    /// `end_room` does. Callers check the host token first ([`Rooms::check_host`]).
    pub fn end_by_host(&mut self, room: &str, now: Now, out: &mut Outbox) -> bool {
        if self.rooms.get(room).is_none_or(|r| r.ended_at.is_some()) {
            return false;
        }
        info!(room, "room ended through the API");
        self.finish_room(room, now, out);
        true
    }

    /// Number of live connections (away members are not connected).
    pub fn connection_count(&self) -> usize {
        self.conns.len() - self.away.len()
    }

    /// Number of members away (connection dropped, seat kept for a resume).
    pub fn away_count(&self) -> usize {
        self.away.len()
    }

    /// Number of rooms, including empty and ended ones not yet expired.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Members of a room, if it exists.
    pub fn members(&self, room: &str) -> Option<usize> {
        self.rooms.get(room).map(|r| r.members.len())
    }

    fn conn_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&conn)
    }

    fn peer_id(&self, conn: ConnId) -> String {
        self.conns
            .get(&conn)
            .map(|c| c.peer_id.clone())
            .unwrap_or_default()
    }

    fn join(
        &mut self,
        conn: ConnId,
        room: &str,
        name: Option<&str>,
        host_token: Option<&str>,
        now: Now,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
        let room = validate_name("room", room).map_err(|e| Refusal(e.code, e.message))?;
        let display = match name.map(str::trim) {
            None | Some("") => None,
            Some(n) => Some(
                validate_name("name", n)
                    .map_err(|e| Refusal(e.code, e.message))?
                    .to_owned(),
            ),
        };
        let mut claims_host = false;
        if let Some(existing) = self.rooms.get(room) {
            if existing.ended_at.is_some() {
                return refuse(ErrorCode::RoomEnded, format!("room `{room}` has ended"));
            }
            if let Some(meeting) = &existing.meeting {
                if now.wall < meeting.starts_at - self.config.early_join {
                    // The message is made from `starts_at` in `handle`.
                    return refuse(ErrorCode::NotStarted, format_rfc3339(meeting.starts_at));
                }
                if let Some(token) = host_token {
                    if !ids::secret_matches(&meeting.token_hash, token) {
                        info!(room, peer = %self.peer_id(conn), "wrong host token");
                        return refuse(ErrorCode::NotHost, "wrong `host_token` for this room");
                    }
                    claims_host = true;
                }
            }
            let ringing = self.calls.contains_key(room);
            if !existing.members.contains(&conn) && (existing.members.len() >= 2 || ringing) {
                info!(room, peer = %self.peer_id(conn), "room full");
                out.push((
                    conn,
                    ServerMessage::RoomFull {
                        room: room.to_owned(),
                        members: existing.members.len().max(2),
                    },
                ));
                return Ok(());
            }
        }
        if !self.rooms.contains_key(room) {
            self.admit_new_room(conn, now)?;
        }
        self.leave_room(conn, LeaveReason::Left, now, out);
        self.enter_room(conn, room, display, claims_host, out);
        Ok(())
    }

    /// Whether `conn` may create one more room now (and counts it if so): the total and
    /// per-connection caps keep a client from filling the server with rooms.
    fn admit_new_room(&mut self, conn: ConnId, now: Now) -> Result<(), Refusal> {
        if self.rooms.len() >= self.config.max_rooms {
            warn!(
                rooms = self.rooms.len(),
                "room limit reached; refusing a new room"
            );
            return refuse(
                ErrorCode::RateLimited,
                "the server holds as many rooms as it may; try again later",
            );
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let minute_ago = |at: &Instant| now.mono.saturating_duration_since(*at) >= MINUTE;
        while c.created.front().is_some_and(minute_ago) {
            c.created.pop_front();
        }
        let from_address = c
            .address
            .and_then(|a| self.created_from.get_mut(&a))
            .map_or(0, |times| {
                while times.front().is_some_and(minute_ago) {
                    times.pop_front();
                }
                times.len()
            });
        if from_address >= self.config.rooms_per_minute_per_address {
            info!(peer = %c.peer_id, "too many new rooms from one address in a minute");
            return refuse(
                ErrorCode::RateLimited,
                format!(
                    "at most {} new rooms a minute from one address; join one that exists or wait",
                    self.config.rooms_per_minute_per_address
                ),
            );
        }
        if c.created.len() >= self.config.rooms_per_minute {
            info!(peer = %c.peer_id, "too many new rooms in a minute");
            return refuse(
                ErrorCode::RateLimited,
                format!(
                    "at most {} new rooms a minute; join one that exists or wait",
                    self.config.rooms_per_minute
                ),
            );
        }
        c.created.push_back(now.mono);
        if let Some(address) = c.address {
            self.created_from
                .entry(address)
                .or_default()
                .push_back(now.mono);
        }
        Ok(())
    }

    /// Puts `conn` (in no room) into `room`, creating it if needed, and announces it.
    /// In an ad-hoc room the first member is host; in a meeting, whoever `claims_host`
    /// (presented the right token), taking the role from an earlier holder.
    fn enter_room(
        &mut self,
        conn: ConnId,
        room_name: &str,
        display: Option<String>,
        claims_host: bool,
        out: &mut Outbox,
    ) {
        let room = self.rooms.entry(room_name.to_owned()).or_default();
        room.members.push(conn);
        room.empty_since = None;
        let mut deposed = None;
        if room.meeting.is_none() {
            room.host.get_or_insert(conn);
        } else if claims_host {
            deposed = room.host.replace(conn).filter(|&h| h != conn);
        }
        let host = room.host == Some(conn);
        let members = room.members.len();
        let others = self.others(room_name, conn);
        let peers = self.peer_infos(&others);
        let resume_token = self.new_resume_token();
        let Some(me) = self.conns.get_mut(&conn) else {
            return;
        };
        me.room = Some(room_name.to_owned());
        me.display_name = display.clone();
        me.resume_hash = resume_token.as_deref().map(ids::secret_hash);
        let peer_id = me.peer_id.clone();
        info!(room = room_name, peer = %peer_id, members, host, "joined");
        out.push((
            conn,
            ServerMessage::Joined {
                room: room_name.to_owned(),
                peer_id: peer_id.clone(),
                members,
                host,
                peers,
                resume_token,
            },
        ));
        for other in others {
            self.send(
                other,
                ServerMessage::PeerJoined {
                    peer_id: peer_id.clone(),
                    name: display.clone(),
                },
                out,
            );
            if deposed == Some(other) {
                self.send(
                    other,
                    ServerMessage::HostChanged {
                        peer_id: peer_id.clone(),
                    },
                    out,
                );
            }
        }
    }

    /// A fresh resume token for a `joined`, or none when resume is off.
    fn new_resume_token(&self) -> Option<String> {
        (!self.config.resume_grace.is_zero()).then(ids::resume_token)
    }

    /// `conn` (a new connection) takes back the seat `peer_id` left in `room` when its
    /// connection dropped: same peer id, host role and partner; a fresh token; then what
    /// was queued meanwhile. The partner hears nothing (it was told `peer_reconnecting`).
    fn resume(
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

    /// Takes `conn` out of its room (if any), telling the other member and handing over
    /// the host role; a caller leaving a ringing call cancels it.
    fn leave_room(&mut self, conn: ConnId, reason: LeaveReason, now: Now, out: &mut Outbox) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(room_name) = c.room.take() else {
            return;
        };
        c.resume_hash = None;
        let peer_id = c.peer_id.clone();
        info!(room = %room_name, peer = %peer_id, ?reason, "left");
        if self
            .calls
            .get(&room_name)
            .is_some_and(|call| call.caller == conn)
        {
            self.end_pending_call(&room_name, None, false, out);
            return;
        }
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        room.members.retain(|&m| m != conn);
        let remaining = room.members.clone();
        let mut new_host = None;
        if room.host == Some(conn) && room.meeting.is_some() {
            // A meeting's host is whoever presents its token; nobody inherits the role.
            room.host = None;
        } else if room.host == Some(conn) {
            room.host = room.members.first().copied();
            new_host = room.host;
        }
        for other in remaining {
            self.send(
                other,
                ServerMessage::PeerLeft {
                    peer_id: peer_id.clone(),
                    reason,
                },
                out,
            );
        }
        if let Some(new_host) = new_host {
            let host_peer = self.peer_id(new_host);
            self.send(
                new_host,
                ServerMessage::HostChanged { peer_id: host_peer },
                out,
            );
        }
        if let Some(room) = self.rooms.get_mut(&room_name)
            && room.members.is_empty()
        {
            room.empty_since = Some(now.mono);
        }
    }

    fn leave(&mut self, conn: ConnId, now: Now, out: &mut Outbox) -> Result<(), Refusal> {
        if self
            .conns
            .get(&conn)
            .and_then(|c| c.room.as_ref())
            .is_none()
        {
            return refuse(ErrorCode::NotInCall, "you are not in a room");
        }
        self.leave_room(conn, LeaveReason::Left, now, out);
        Ok(())
    }

    fn end_room(&mut self, conn: ConnId, now: Now, out: &mut Outbox) -> Result<(), Refusal> {
        let Some(room_name) = self.conns.get(&conn).and_then(|c| c.room.clone()) else {
            return refuse(ErrorCode::NotInCall, "you are not in a room");
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return refuse(ErrorCode::Internal, "room state missing");
        };
        if room.host != Some(conn) {
            return refuse(ErrorCode::NotHost, "only the host can end the room");
        }
        info!(room = %room_name, peer = %self.peer_id(conn), "room ended by host");
        self.finish_room(&room_name, now, out);
        Ok(())
    }

    /// Ends `room_name`: members out with `room_ended/host_ended`, a ringing call there
    /// cancelled, the room kept as ended (and recorded, for a meeting).
    fn finish_room(&mut self, room_name: &str, now: Now, out: &mut Outbox) {
        let Some(room) = self.rooms.get_mut(room_name) else {
            return;
        };
        let members = std::mem::take(&mut room.members);
        room.host = None;
        room.empty_since = None;
        room.ended_at = Some(now.mono);
        if let Some(meeting) = &mut room.meeting {
            meeting.ended = Some((now.wall, RoomEndReason::HostEnded));
            self.events.push(MeetingEvent::Ended {
                room: room_name.to_owned(),
                at: now.wall,
                reason: RoomEndReason::HostEnded,
            });
        }
        if let Some(call) = self.calls.remove(room_name)
            && let Some(callee) = self.conns.get_mut(&call.callee)
        {
            callee.rung_by = None;
            out.push((
                call.callee,
                ServerMessage::CallCancelled {
                    call_id: room_name.to_owned(),
                },
            ));
        }
        for m in members {
            if self.away.remove(&m).is_some() {
                // Nobody to tell and no seat to keep: a `resume` now hears that the room
                // ended, and so does a fresh `join`.
                if let Some(c) = self.conns.remove(&m) {
                    info!(room = room_name, peer = %c.peer_id, "away member's room ended");
                }
                continue;
            }
            if let Some(c) = self.conns.get_mut(&m) {
                c.room = None;
                c.resume_hash = None;
            }
            out.push((
                m,
                ServerMessage::RoomEnded {
                    room: room_name.to_owned(),
                    reason: RoomEndReason::HostEnded,
                },
            ));
        }
    }

    /// Forwards an offer, answer or candidate to the other member of the sender's room.
    fn relay(
        &mut self,
        conn: ConnId,
        out: &mut Outbox,
        make: impl FnOnce(String) -> ServerMessage,
    ) -> Result<(), Refusal> {
        let Some(me) = self.conns.get(&conn) else {
            return refuse(ErrorCode::Internal, "unknown connection");
        };
        let other = me
            .room
            .as_ref()
            .and_then(|r| self.rooms.get(r))
            .and_then(|room| room.members.iter().copied().find(|&m| m != conn));
        let Some(other) = other else {
            return refuse(
                ErrorCode::NotInCall,
                "there is nobody to send this to: you are not in a room with another member",
            );
        };
        let msg = make(me.peer_id.clone());
        debug!(peer = %me.peer_id, room = ?me.room, "relay");
        self.send(other, msg, out);
        Ok(())
    }

    fn register(&mut self, conn: ConnId, name: &str, out: &mut Outbox) -> Result<(), Refusal> {
        let name = validate_name("name", name).map_err(|e| Refusal(e.code, e.message))?;
        match self.names.get(name) {
            Some(&holder) if holder != conn => {
                return refuse(ErrorCode::NameTaken, format!("the name `{name}` is taken"));
            }
            Some(_) => {}
            None => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return refuse(ErrorCode::Internal, "unknown connection");
                };
                if let Some(old) = c.registered.replace(name.to_owned()) {
                    self.names.remove(&old);
                }
                self.names.insert(name.to_owned(), conn);
                info!(peer = %self.peer_id(conn), name, "registered");
            }
        }
        out.push((
            conn,
            ServerMessage::Registered {
                name: name.to_owned(),
            },
        ));
        Ok(())
    }

    fn call(&mut self, conn: ConnId, to: &str, now: Now, out: &mut Outbox) -> Result<(), Refusal> {
        let Some(from) = self.conns.get(&conn).and_then(|c| c.registered.clone()) else {
            return refuse(
                ErrorCode::BadField,
                "register a name before calling (`register` first)",
            );
        };
        let to = validate_name("to", to).map_err(|e| Refusal(e.code, e.message))?;
        let callee = match self.names.get(to) {
            None => {
                let call_id = ids::call_id();
                info!(call = %call_id, from, to, "call to offline name");
                out.push((
                    conn,
                    ServerMessage::CallRejected {
                        call_id,
                        reason: CallRejectReason::Offline,
                    },
                ));
                return Ok(());
            }
            Some(&callee) if callee == conn => {
                return refuse(ErrorCode::BadField, "`to` is your own name");
            }
            Some(&callee) => callee,
        };
        let busy = self
            .conns
            .get(&callee)
            .is_none_or(|c| c.room.is_some() || c.rung_by.is_some());
        if busy {
            let call_id = ids::call_id();
            info!(call = %call_id, from, to, "callee busy");
            out.push((
                conn,
                ServerMessage::CallRejected {
                    call_id,
                    reason: CallRejectReason::Busy,
                },
            ));
            return Ok(());
        }
        self.leave_room(conn, LeaveReason::Left, now, out);
        let call_id = ids::call_id();
        info!(call = %call_id, from, to, "ringing");
        out.push((
            conn,
            ServerMessage::Ringing {
                call_id: call_id.clone(),
                to: to.to_owned(),
            },
        ));
        self.enter_room(conn, &call_id, Some(from.clone()), false, out);
        self.calls.insert(
            call_id.clone(),
            PendingCall {
                caller: conn,
                callee,
                deadline: now.mono + self.config.ring_timeout,
            },
        );
        if let Some(c) = self.conns.get_mut(&callee) {
            c.rung_by = Some(call_id.clone());
        }
        out.push((callee, ServerMessage::IncomingCall { call_id, from }));
        Ok(())
    }

    /// The pending call `call_id` where `conn` is the callee.
    fn incoming_call(&self, conn: ConnId, call_id: &str) -> Result<(), Refusal> {
        match self.calls.get(call_id) {
            Some(call) if call.callee == conn => Ok(()),
            _ => refuse(
                ErrorCode::UnknownCall,
                "no call with that `call_id` is ringing you",
            ),
        }
    }

    fn accept(
        &mut self,
        conn: ConnId,
        call_id: &str,
        now: Now,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
        self.incoming_call(conn, call_id)?;
        self.calls.remove(call_id);
        let name = self.conns.get_mut(&conn).and_then(|c| {
            c.rung_by = None;
            c.registered.clone()
        });
        info!(call = %call_id, peer = %self.peer_id(conn), "call accepted");
        self.leave_room(conn, LeaveReason::Left, now, out);
        self.enter_room(conn, call_id, name, false, out);
        Ok(())
    }

    fn reject(&mut self, conn: ConnId, call_id: &str, out: &mut Outbox) -> Result<(), Refusal> {
        self.incoming_call(conn, call_id)?;
        info!(call = %call_id, peer = %self.peer_id(conn), "call rejected");
        self.end_pending_call(call_id, Some(CallRejectReason::Rejected), false, out);
        Ok(())
    }

    /// Ends a call that is still ringing: the room goes away with the caller in it.
    /// `caller_reason` is what the caller hears (none when the caller itself gave up);
    /// `cancel_callee` tells the callee that the ringing stopped.
    fn end_pending_call(
        &mut self,
        call_id: &str,
        caller_reason: Option<CallRejectReason>,
        cancel_callee: bool,
        out: &mut Outbox,
    ) {
        let Some(call) = self.calls.remove(call_id) else {
            return;
        };
        self.rooms.remove(call_id);
        if let Some(caller) = self.conns.get_mut(&call.caller)
            && caller.room.as_deref() == Some(call_id)
        {
            caller.room = None;
        }
        if let Some(callee) = self.conns.get_mut(&call.callee) {
            callee.rung_by = None;
        }
        if let Some(reason) = caller_reason {
            out.push((
                call.caller,
                ServerMessage::CallRejected {
                    call_id: call_id.to_owned(),
                    reason,
                },
            ));
        }
        // The callee hears `call_cancelled` whenever it did not end the call itself.
        if cancel_callee || caller_reason.is_none() {
            out.push((
                call.callee,
                ServerMessage::CallCancelled {
                    call_id: call_id.to_owned(),
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: RoomsConfig = RoomsConfig {
        room_ttl: Duration::from_secs(600),
        ring_timeout: Duration::from_secs(30),
        early_join: Duration::from_secs(300),
        ended_retention: ENDED_RETENTION,
        resume_grace: Duration::ZERO,
        max_rooms: 1_000,
        rooms_per_minute: 30,
        rooms_per_minute_per_address: 120,
    };

    fn kinds(out: &Outbox) -> Vec<(ConnId, &'static str)> {
        out.iter()
            .map(|(c, m)| {
                let kind = match m {
                    ServerMessage::Joined { .. } => "joined",
                    ServerMessage::PeerJoined { .. } => "peer_joined",
                    ServerMessage::RoomFull { .. } => "room_full",
                    ServerMessage::PeerLeft { .. } => "peer_left",
                    ServerMessage::HostChanged { .. } => "host_changed",
                    ServerMessage::Ringing { .. } => "ringing",
                    ServerMessage::IncomingCall { .. } => "incoming_call",
                    ServerMessage::CallRejected { .. } => "call_rejected",
                    ServerMessage::CallCancelled { .. } => "call_cancelled",
                    ServerMessage::Registered { .. } => "registered",
                    ServerMessage::RoomEnded { .. } => "room_ended",
                    ServerMessage::Error { .. } => "error",
                    ServerMessage::PeerReconnecting { .. } => "peer_reconnecting",
                    ServerMessage::Offer { .. } => "offer",
                    ServerMessage::Candidate { .. } => "candidate",
                    _ => "other",
                };
                (*c, kind)
            })
            .collect()
    }

    fn rooms_with(n: u64) -> Rooms {
        let mut r = Rooms::new(CFG);
        for c in 1..=n {
            r.connect(c, format!("peer{c}"), None);
        }
        r
    }

    fn join(room: &str) -> ClientMessage {
        ClientMessage::Join {
            room: room.into(),
            name: None,
            host_token: None,
        }
    }

    fn join_with(room: &str, token: &str) -> ClientMessage {
        ClientMessage::Join {
            room: room.into(),
            name: None,
            host_token: Some(token.into()),
        }
    }

    fn meeting(now: Now, starts_in: Duration, ttl: Duration) -> Meeting {
        Meeting {
            token_hash: ids::secret_hash("secret"),
            title: Some("t".into()),
            starts_at: now.wall + starts_in,
            ttl,
            created_at: now.wall,
            ended: None,
        }
    }

    fn state(r: &Rooms, room: &str, now: Now) -> RoomState {
        r.room_info(room, now).unwrap().state
    }

    #[test]
    fn meeting_opens_early_by_the_grace_and_says_when() {
        let t = Now::system();
        let mut r = rooms_with(1);
        let mut out = Outbox::new();
        let hour = Duration::from_secs(3600);
        assert!(r.add_meeting("m", meeting(t, hour, Duration::from_secs(60)), t));
        assert!(!r.add_meeting("m", meeting(t, hour, Duration::from_secs(60)), t));
        assert_eq!(state(&r, "m", t), RoomState::Scheduled);
        r.handle(1, join("m"), t, &mut out);
        let ServerMessage::Error {
            code: ErrorCode::NotStarted,
            starts_at: Some(starts_at),
            ..
        } = &out[0].1
        else {
            panic!("{out:?}");
        };
        assert_eq!(starts_at, &format_rfc3339(t.wall + hour));
        out.clear();
        let early = t.later(hour - Duration::from_secs(300));
        assert_eq!(state(&r, "m", early), RoomState::Open);
        r.handle(1, join("m"), early, &mut out);
        assert!(matches!(
            out[0].1,
            ServerMessage::Joined { host: false, .. }
        ));
        assert_eq!(state(&r, "m", early), RoomState::Active);
        // Nobody expires it before starts_at + ttl, even when empty for longer.
        r.handle(1, ClientMessage::Leave, early, &mut out);
        r.tick(t.later(hour + Duration::from_secs(59)), &mut out);
        assert_eq!(state(&r, "m", early), RoomState::Open);
        r.tick(t.later(hour + Duration::from_secs(60)), &mut out);
        assert_eq!(state(&r, "m", early), RoomState::Ended);
        assert!(matches!(
            r.take_events()[..],
            [MeetingEvent::Ended {
                reason: RoomEndReason::Expired,
                ..
            }]
        ));
    }

    #[test]
    fn meeting_host_is_whoever_has_the_token() {
        let t = Now::system();
        let mut r = rooms_with(3);
        let mut out = Outbox::new();
        r.add_meeting("m", meeting(t, Duration::ZERO, Duration::from_secs(60)), t);
        r.handle(1, join_with("m", "wrong"), t, &mut out);
        assert!(matches!(
            out[0].1,
            ServerMessage::Error {
                code: ErrorCode::NotHost,
                ..
            }
        ));
        assert_eq!(r.members("m"), Some(0));
        out.clear();
        r.handle(1, join("m"), t, &mut out);
        r.handle(2, join_with("m", "secret"), t, &mut out);
        assert!(matches!(
            out[0].1,
            ServerMessage::Joined { host: false, .. }
        ));
        assert!(matches!(out[1].1, ServerMessage::Joined { host: true, .. }));
        out.clear();
        r.handle(1, ClientMessage::EndRoom, t, &mut out);
        assert_eq!(kinds(&out), vec![(1, "error")]);
        out.clear();
        // The host leaving hands nothing over; the token brings the role back.
        r.handle(2, ClientMessage::Leave, t, &mut out);
        assert_eq!(kinds(&out), vec![(1, "peer_left")]);
        out.clear();
        r.handle(3, join_with("m", "secret"), t, &mut out);
        r.handle(3, ClientMessage::EndRoom, t, &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                (3, "joined"),
                (1, "peer_joined"),
                (1, "room_ended"),
                (3, "room_ended")
            ]
        );
        assert!(matches!(
            r.take_events()[..],
            [MeetingEvent::Ended {
                reason: RoomEndReason::HostEnded,
                ..
            }]
        ));
        assert_eq!(r.check_host("m", Some("secret")), Err(HostCheck::Ended));
        assert_eq!(r.check_host("m", Some("x")), Err(HostCheck::WrongToken));
        assert_eq!(r.check_host("n", Some("x")), Err(HostCheck::UnknownRoom));
        // Ended meetings are remembered for the retention, then forgotten.
        r.tick(t.later(ENDED_RETENTION - Duration::from_secs(1)), &mut out);
        assert_eq!(r.room_count(), 1);
        r.tick(t.later(ENDED_RETENTION), &mut out);
        assert_eq!(r.room_count(), 0);
        assert!(matches!(
            r.take_events()[..],
            [MeetingEvent::Forgotten { .. }]
        ));
    }

    #[test]
    fn one_address_creates_at_most_its_rooms_a_minute_however_many_connections_it_opens() {
        let t = Now::system();
        let mut r = Rooms::new(RoomsConfig {
            rooms_per_minute: 3,
            rooms_per_minute_per_address: 4,
            ..CFG
        });
        let here: IpAddr = "198.51.100.7".parse().unwrap();
        let there: IpAddr = "198.51.100.8".parse().unwrap();
        let mut out = Outbox::new();
        // A new connection for every room: 4 rooms, then refused.
        for c in 1..=5 {
            r.connect(c, format!("peer{c}"), Some(here));
            r.handle(c, join(&format!("r{c}")), t, &mut out);
        }
        assert_eq!(error_code(&out), Some(ErrorCode::RateLimited));
        assert_eq!(r.room_count(), 4);
        // Another address is not affected; a minute later this one may again.
        r.connect(6, "peer6".into(), Some(there));
        r.handle(6, join("r6"), t, &mut out);
        assert_eq!(kinds(&out).last(), Some(&(6, "joined")));
        let later = Now {
            mono: t.mono + MINUTE,
            wall: t.wall,
        };
        r.connect(7, "peer7".into(), Some(here));
        r.handle(7, join("r7"), later, &mut out);
        assert_eq!(kinds(&out).last(), Some(&(7, "joined")));
    }

    #[test]
    fn a_connection_creates_at_most_its_rooms_a_minute_and_the_server_its_total() {
        let t = Now::system();
        let mut r = Rooms::new(RoomsConfig {
            rooms_per_minute: 3,
            max_rooms: 5,
            ..CFG
        });
        for c in 1..=3 {
            r.connect(c, format!("peer{c}"), None);
        }
        let mut out = Outbox::new();
        for i in 0..3 {
            r.handle(1, join(&format!("r{i}")), t, &mut out);
            assert_eq!(kinds(&out).last(), Some(&(1, "joined")));
        }
        r.handle(1, join("r3"), t, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::RateLimited));
        assert_eq!(r.room_count(), 3, "nothing created");
        // Joining a room that exists is not creating one.
        out.clear();
        r.handle(1, join("r0"), t, &mut out);
        assert_eq!(kinds(&out).last(), Some(&(1, "joined")));
        // A minute later it may create again.
        r.handle(1, join("r3"), t.later(Duration::from_secs(60)), &mut out);
        assert_eq!(kinds(&out).last(), Some(&(1, "joined")));
        // The total: 5 rooms held (r0-r3, and r4 from another connection), no sixth.
        out.clear();
        r.handle(2, join("r4"), t, &mut out);
        assert_eq!(kinds(&out).last(), Some(&(2, "joined")));
        assert_eq!(r.room_count(), 5);
        out.clear();
        r.handle(3, join("r5"), t, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::RateLimited));
        assert_eq!(r.room_count(), 5);
    }

    #[test]
    fn join_order_decides_host_and_fullness() {
        let t = Now::system();
        let mut r = rooms_with(3);
        let mut out = Outbox::new();
        for c in 1..=3 {
            r.handle(c, join("x"), t, &mut out);
        }
        assert_eq!(
            kinds(&out),
            vec![
                (1, "joined"),
                (2, "joined"),
                (1, "peer_joined"),
                (3, "room_full")
            ]
        );
        assert!(matches!(out[0].1, ServerMessage::Joined { host: true, .. }));
        assert!(matches!(
            out[1].1,
            ServerMessage::Joined { host: false, .. }
        ));
    }

    #[test]
    fn ringing_times_out_on_the_clock_not_before() {
        let t = Now::system();
        let mut r = rooms_with(2);
        let mut out = Outbox::new();
        r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
        r.handle(2, ClientMessage::Register { name: "b".into() }, t, &mut out);
        r.handle(1, ClientMessage::Call { to: "b".into() }, t, &mut out);
        out.clear();
        r.tick(t.later(Duration::from_secs(29)), &mut out);
        assert!(out.is_empty());
        r.tick(t.later(Duration::from_secs(30)), &mut out);
        assert_eq!(
            kinds(&out),
            vec![(1, "call_rejected"), (2, "call_cancelled")]
        );
        assert_eq!(r.room_count(), 0);
    }

    #[test]
    fn empty_and_ended_rooms_expire_after_the_ttl() {
        let t = Now::system();
        let mut r = rooms_with(2);
        let mut out = Outbox::new();
        r.handle(1, join("empty"), t, &mut out);
        r.handle(1, ClientMessage::Leave, t, &mut out);
        r.handle(2, join("ended"), t, &mut out);
        r.handle(2, ClientMessage::EndRoom, t, &mut out);
        out.clear();
        r.tick(t.later(Duration::from_secs(599)), &mut out);
        assert_eq!(r.room_count(), 2);
        // An ended room refuses joins until it expires, then the name is free again.
        r.handle(1, join("ended"), t, &mut out);
        assert_eq!(kinds(&out), vec![(1, "error")]);
        r.tick(t.later(Duration::from_secs(600)), &mut out);
        assert_eq!(r.room_count(), 0);
    }

    #[test]
    fn disconnect_cleans_everything() {
        let t = Now::system();
        let mut r = rooms_with(2);
        let mut out = Outbox::new();
        r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        out.clear();
        r.disconnect(1, t, &mut out);
        assert_eq!(kinds(&out), vec![(2, "peer_left"), (2, "host_changed")]);
        assert_eq!(r.connection_count(), 1);
        r.connect(3, "peer3".into(), None);
        out.clear();
        r.handle(3, ClientMessage::Register { name: "a".into() }, t, &mut out);
        assert_eq!(kinds(&out), vec![(3, "registered")], "name freed");
    }

    const GRACE: Duration = Duration::from_secs(30);

    fn resumable(n: u64) -> Rooms {
        let mut r = Rooms::new(RoomsConfig {
            resume_grace: GRACE,
            ..CFG
        });
        for c in 1..=n {
            r.connect(c, format!("peer{c}"), None);
        }
        r
    }

    /// The `resume_token` of the last `joined` sent to `conn`.
    fn token_of(out: &Outbox, conn: ConnId) -> String {
        out.iter()
            .rev()
            .find_map(|(c, m)| match m {
                ServerMessage::Joined {
                    resume_token: Some(t),
                    ..
                } if *c == conn => Some(t.clone()),
                _ => None,
            })
            .expect("a joined with a token")
    }

    fn resume(room: &str, peer_id: &str, token: &str) -> ClientMessage {
        ClientMessage::Resume {
            room: room.into(),
            peer_id: peer_id.into(),
            resume_token: token.into(),
        }
    }

    fn error_code(out: &Outbox) -> Option<ErrorCode> {
        out.iter().find_map(|(_, m)| match m {
            ServerMessage::Error { code, .. } => Some(*code),
            _ => None,
        })
    }

    #[test]
    fn a_dropped_member_keeps_its_seat_and_resumes_it() {
        let t = Now::system();
        let mut r = resumable(5);
        let mut out = Outbox::new();
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        let token = token_of(&out, 1);
        assert!(token.len() >= 32);
        assert_ne!(token, token_of(&out, 2));
        out.clear();
        r.disconnect(1, t, &mut out);
        assert_eq!(kinds(&out), vec![(2, "peer_reconnecting")]);
        assert_eq!((r.connection_count(), r.away_count()), (4, 1));
        out.clear();
        // The seat still counts, and what the partner sends waits for it.
        r.handle(3, join("x"), t, &mut out);
        assert_eq!(kinds(&out), vec![(3, "room_full")]);
        out.clear();
        r.handle(2, ClientMessage::Offer { sdp: "o".into() }, t, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // A wrong token changes nothing.
        r.handle(4, resume("x", "peer1", "wrong"), t, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
        assert_eq!(out.len(), 1);
        assert_eq!((r.members("x"), r.away_count()), (Some(2), 1));
        out.clear();
        let soon = t.later(Duration::from_secs(10));
        r.handle(4, resume(" x ", "peer1", &token), soon, &mut out);
        assert_eq!(kinds(&out), vec![(4, "joined"), (4, "offer")]);
        let ServerMessage::Joined {
            room,
            peer_id,
            members,
            host,
            peers,
            resume_token: Some(fresh),
        } = &out[0].1
        else {
            panic!("{out:?}");
        };
        assert_eq!((room.as_str(), peer_id.as_str()), ("x", "peer1"));
        assert_eq!((*members, *host), (2, true));
        assert_eq!(peers[0].peer_id, "peer2");
        assert_ne!(fresh, &token);
        let fresh = fresh.clone();
        assert_eq!((r.connection_count(), r.away_count()), (4, 0));
        out.clear();
        // The resumed seat is an ordinary one: relaying works both ways, the host
        // role is there, and the grace no longer runs.
        r.handle(2, ClientMessage::Answer { sdp: "a".into() }, soon, &mut out);
        r.handle(4, ClientMessage::Offer { sdp: "o".into() }, soon, &mut out);
        assert_eq!(kinds(&out), vec![(4, "other"), (2, "offer")]);
        out.clear();
        r.tick(t.later(GRACE * 2), &mut out);
        assert!(out.is_empty(), "{out:?}");
        // The old token is spent; the fresh one works once more.
        r.disconnect(4, soon, &mut out);
        out.clear();
        r.handle(5, resume("x", "peer1", &token), soon, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
        out.clear();
        r.handle(5, resume("x", "peer1", &fresh), soon, &mut out);
        assert_eq!(kinds(&out), vec![(5, "joined")]);
        r.handle(5, ClientMessage::EndRoom, soon, &mut out);
        assert_eq!(r.members("x"), Some(0));
    }

    #[test]
    fn the_grace_runs_out_on_the_clock_like_a_disconnect() {
        let t = Now::system();
        let mut r = resumable(3);
        let mut out = Outbox::new();
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        let token = token_of(&out, 1);
        r.disconnect(1, t, &mut out);
        out.clear();
        r.tick(t.later(GRACE - Duration::from_millis(1)), &mut out);
        assert!(out.is_empty(), "{out:?}");
        r.tick(t.later(GRACE), &mut out);
        assert_eq!(kinds(&out), vec![(2, "peer_left"), (2, "host_changed")]);
        assert!(matches!(
            out[0].1,
            ServerMessage::PeerLeft {
                reason: LeaveReason::Disconnected,
                ..
            }
        ));
        assert_eq!((r.connection_count(), r.away_count()), (2, 0));
        assert_eq!(r.members("x"), Some(1));
        out.clear();
        r.handle(3, resume("x", "peer1", &token), t, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
        // A resume that beats the sweep to an overdue seat finds the grace over too.
        r.handle(3, join("x"), t, &mut out);
        let token3 = token_of(&out, 3);
        r.disconnect(3, t, &mut out);
        r.connect(4, "peer4".into(), None);
        out.clear();
        r.handle(4, resume("x", "peer3", &token3), t.later(GRACE), &mut out);
        assert_eq!(kinds(&out), vec![(2, "peer_left"), (4, "error")]);
        assert_eq!(r.members("x"), Some(1));
    }

    #[test]
    fn the_away_queue_is_bounded_and_keeps_the_newest() {
        let t = Now::system();
        let mut r = resumable(3);
        let mut out = Outbox::new();
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        let token = token_of(&out, 1);
        r.disconnect(1, t, &mut out);
        for i in 0..100 {
            let sdp = format!("{i}");
            r.handle(2, ClientMessage::Offer { sdp }, t, &mut out);
        }
        out.clear();
        r.handle(3, resume("x", "peer1", &token), t, &mut out);
        assert_eq!(out.len(), 1 + AWAY_QUEUE_MESSAGES);
        assert!(matches!(&out[1].1, ServerMessage::Offer { sdp, .. } if sdp == "36"));
        assert!(matches!(&out[64].1, ServerMessage::Offer { sdp, .. } if sdp == "99"));
        let token = token_of(&out, 3);
        r.disconnect(3, t, &mut out);
        // Big messages hit the byte bound before the count bound.
        let big = "v".repeat(60_000);
        for _ in 0..10 {
            let sdp = big.clone();
            r.handle(2, ClientMessage::Offer { sdp }, t, &mut out);
        }
        r.connect(4, "peer4".into(), None);
        out.clear();
        r.handle(4, resume("x", "peer1", &token), t, &mut out);
        assert_eq!(out.len(), 1 + 4, "256 KiB hold four 60 kB offers");
    }

    #[test]
    fn without_a_grace_a_drop_leaves_at_once_and_resume_is_refused() {
        let t = Now::system();
        let mut r = rooms_with(3);
        let mut out = Outbox::new();
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        assert!(out.iter().all(|(_, m)| !matches!(
            m,
            ServerMessage::Joined {
                resume_token: Some(_),
                ..
            }
        )));
        out.clear();
        r.disconnect(1, t, &mut out);
        assert_eq!(kinds(&out), vec![(2, "peer_left"), (2, "host_changed")]);
        out.clear();
        r.handle(3, resume("x", "peer1", "anything"), t, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
    }

    fn wrong_token(token: &str) -> String {
        token.chars().rev().collect()
    }

    #[test]
    fn resume_takes_over_present_members_and_is_refused_for_ended_rooms_and_busy_connections() {
        let t = Now::system();
        let mut r = resumable(5);
        let mut out = Outbox::new();
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        let token1 = token_of(&out, 1);
        let token2 = token_of(&out, 2);
        out.clear();
        // Peer 1 still looks connected, but the token proves it: the new connection
        // takes the seat over (its old path may have died silently).
        r.handle(3, resume("x", "peer1", &wrong_token(&token1)), t, &mut out);
        assert_eq!(kinds(&out), vec![(3, "error")], "not with a wrong token");
        out.clear();
        r.handle(3, resume("x", "peer1", &token1), t, &mut out);
        assert_eq!(
            kinds(&out),
            vec![(2, "peer_reconnecting"), (3, "joined")],
            "{out:?}"
        );
        let token1 = token_of(&out, 3);
        out.clear();
        // The old connection closing later changes nothing.
        r.disconnect(1, t, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(r.away_count(), 0);
        // Unknown room or peer.
        r.handle(5, resume("y", "peer1", &token1), t, &mut out);
        r.handle(5, resume("x", "peer9", &token1), t, &mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        // A connection in a room resumes nothing.
        r.disconnect(2, t, &mut out);
        r.handle(4, join("z"), t, &mut out);
        out.clear();
        r.handle(4, resume("x", "peer2", &token2), t, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
        out.clear();
        // The host (peer 1, on connection 3 since the takeover) ends the room while the
        // partner is away: the seat goes with it.
        r.handle(3, ClientMessage::EndRoom, t, &mut out);
        assert_eq!(kinds(&out), vec![(3, "room_ended")]);
        assert_eq!(r.away_count(), 0);
        out.clear();
        r.handle(3, resume("x", "peer2", &token2), t, &mut out);
        assert_eq!(error_code(&out), Some(ErrorCode::ResumeFailed));
    }

    #[test]
    fn an_explicit_leave_while_the_partner_is_away_is_queued_for_it() {
        let t = Now::system();
        let mut r = resumable(3);
        let mut out = Outbox::new();
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        let token = token_of(&out, 2);
        r.disconnect(2, t, &mut out);
        r.handle(1, ClientMessage::Leave, t, &mut out);
        out.clear();
        r.handle(3, resume("x", "peer2", &token), t, &mut out);
        assert_eq!(
            kinds(&out),
            vec![(3, "joined"), (3, "peer_left"), (3, "host_changed")]
        );
        assert!(matches!(
            out[0].1,
            ServerMessage::Joined {
                members: 1,
                host: true,
                ..
            }
        ));
    }

    #[test]
    fn a_ringing_caller_that_drops_cancels_the_call_and_names_are_released() {
        let t = Now::system();
        let mut r = resumable(3);
        let mut out = Outbox::new();
        r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
        r.handle(2, ClientMessage::Register { name: "b".into() }, t, &mut out);
        r.handle(1, ClientMessage::Call { to: "b".into() }, t, &mut out);
        out.clear();
        r.disconnect(1, t, &mut out);
        assert_eq!(kinds(&out), vec![(2, "call_cancelled")]);
        assert_eq!(r.away_count(), 0);
        out.clear();
        // Once accepted, a call's room keeps seats like any other; the name does not
        // stay with the away seat.
        r.connect(4, "peer4".into(), None);
        r.handle(4, ClientMessage::Register { name: "d".into() }, t, &mut out);
        r.handle(4, ClientMessage::Call { to: "b".into() }, t, &mut out);
        let call_id = out
            .iter()
            .find_map(|(_, m)| match m {
                ServerMessage::IncomingCall { call_id, .. } => Some(call_id.clone()),
                _ => None,
            })
            .unwrap();
        r.handle(2, ClientMessage::Accept { call_id }, t, &mut out);
        out.clear();
        r.disconnect(2, t, &mut out);
        assert_eq!(kinds(&out), vec![(4, "peer_reconnecting")]);
        out.clear();
        r.handle(3, ClientMessage::Register { name: "b".into() }, t, &mut out);
        assert_eq!(kinds(&out), vec![(3, "registered")]);
    }
}
