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

//!
//! The state machine is one value, [`Rooms`]; its methods are split by job: this file
//! holds the rooms (join, leave, relay, end, expiry, the caps on new rooms), `meetings`
//! the rooms created through the HTTP API, `calls` direct calls by name, and `seats`
//! what keeps a dropped member's seat for `resume`.
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

mod calls;
mod meetings;
mod seats;
#[cfg(test)]
mod tests;

use calls::PendingCall;
pub use meetings::{ENDED_RETENTION, HostCheck, Meeting, MeetingEvent};
use seats::Away;
pub use seats::{AWAY_QUEUE_BYTES, AWAY_QUEUE_MESSAGES};

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

#[derive(Debug, Default)]
struct Room {
    /// In order of arrival; at most two.
    members: Vec<ConnId>,
    host: Option<ConnId>,
    empty_since: Option<Instant>,
    ended_at: Option<Instant>,
    /// Set for rooms created through the HTTP API. Boxed: most rooms are ad hoc, and
    /// inline it would make every room's entry 120 bytes larger.
    meeting: Option<Box<Meeting>>,
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
}
