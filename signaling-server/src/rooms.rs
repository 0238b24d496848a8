//! The room and direct-call state machine, with no I/O.
//!
//! Every input (a parsed client message, a connection coming or going, the clock
//! ticking) is a method call that appends the messages to send to an [`Outbox`]. Who
//! is in which room, who holds which name and which calls are ringing lives here and
//! nowhere else; [`crate::hub::Hub`] wraps it in one mutex, which is what makes
//! concurrent joins race-free, and delivers the outbox to the connections.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::ids;
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
    /// How long an empty (or ended) room is kept.
    pub room_ttl: Duration,
    /// How long a direct call rings.
    pub ring_timeout: Duration,
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
}

#[derive(Debug, Default)]
struct Room {
    /// In order of arrival; at most two.
    members: Vec<ConnId>,
    host: Option<ConnId>,
    empty_since: Option<Instant>,
    ended_at: Option<Instant>,
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
}

impl Rooms {
    pub fn new(config: RoomsConfig) -> Rooms {
        Rooms {
            config,
            conns: HashMap::new(),
            rooms: HashMap::new(),
            names: HashMap::new(),
            calls: HashMap::new(),
        }
    }

    /// A new connection with its public `peer_id`.
    pub fn connect(&mut self, conn: ConnId, peer_id: String) {
        self.conns.insert(
            conn,
            Conn {
                peer_id,
                display_name: None,
                registered: None,
                room: None,
                rung_by: None,
            },
        );
    }

    /// The connection ended (closed, dropped or kicked): leave everything it was part of.
    pub fn disconnect(&mut self, conn: ConnId, now: Instant, out: &mut Outbox) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        self.leave_room(conn, LeaveReason::Disconnected, now, out);
        if let Some(call_id) = self.conn_mut(conn).and_then(|c| c.rung_by.take()) {
            self.end_pending_call(&call_id, Some(CallRejectReason::Offline), false, out);
        }
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(name) = c.registered {
                self.names.remove(&name);
            }
            debug!(peer = %c.peer_id, "connection removed");
        }
    }

    /// One message from `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: ClientMessage, now: Instant, out: &mut Outbox) {
        let result = match msg {
            ClientMessage::Join {
                room,
                name,
                host_token: _,
            } => self.join(conn, &room, name.as_deref(), now, out),
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
        };
        if let Err(Refusal(code, message)) = result {
            out.push((conn, ServerMessage::error(code, message)));
        }
    }

    /// Time passes: unanswered calls stop ringing, empty and ended rooms expire.
    pub fn tick(&mut self, now: Instant, out: &mut Outbox) {
        let overdue: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in overdue {
            info!(call = %call_id, "call not answered");
            self.end_pending_call(&call_id, Some(CallRejectReason::NoAnswer), true, out);
        }
        let ttl = self.config.room_ttl;
        self.rooms.retain(|name, room| {
            let since = room.ended_at.or(room.empty_since);
            let keep = since.is_none_or(|t| now.saturating_duration_since(t) < ttl);
            if !keep {
                info!(room = %name, "room expired");
            }
            keep
        });
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
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
        now: Instant,
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
        if let Some(existing) = self.rooms.get(room) {
            if existing.ended_at.is_some() {
                return refuse(ErrorCode::RoomEnded, format!("room `{room}` has ended"));
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
        self.leave_room(conn, LeaveReason::Left, now, out);
        self.enter_room(conn, room, display, out);
        Ok(())
    }

    /// Puts `conn` (in no room) into `room`, creating it if needed, and announces it.
    fn enter_room(
        &mut self,
        conn: ConnId,
        room_name: &str,
        display: Option<String>,
        out: &mut Outbox,
    ) {
        let room = self.rooms.entry(room_name.to_owned()).or_default();
        room.members.push(conn);
        room.empty_since = None;
        let host = *room.host.get_or_insert(conn) == conn;
        let members = room.members.len();
        let others: Vec<ConnId> = room
            .members
            .iter()
            .copied()
            .filter(|&m| m != conn)
            .collect();
        let peers = others
            .iter()
            .filter_map(|m| self.conns.get(m))
            .map(|c| PeerInfo {
                peer_id: c.peer_id.clone(),
                name: c.display_name.clone(),
            })
            .collect();
        let Some(me) = self.conns.get_mut(&conn) else {
            return;
        };
        me.room = Some(room_name.to_owned());
        me.display_name = display.clone();
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
            },
        ));
        for other in others {
            out.push((
                other,
                ServerMessage::PeerJoined {
                    peer_id: peer_id.clone(),
                    name: display.clone(),
                },
            ));
        }
    }

    /// Takes `conn` out of its room (if any), telling the other member and handing over
    /// the host role; a caller leaving a ringing call cancels it.
    fn leave_room(&mut self, conn: ConnId, reason: LeaveReason, now: Instant, out: &mut Outbox) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(room_name) = c.room.take() else {
            return;
        };
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
        for &other in &room.members {
            out.push((
                other,
                ServerMessage::PeerLeft {
                    peer_id: peer_id.clone(),
                    reason,
                },
            ));
        }
        if room.host == Some(conn) {
            room.host = room.members.first().copied();
            if let Some(new_host) = room.host {
                let host_peer = self.peer_id(new_host);
                out.push((new_host, ServerMessage::HostChanged { peer_id: host_peer }));
            }
        }
        if let Some(room) = self.rooms.get_mut(&room_name)
            && room.members.is_empty()
        {
            room.empty_since = Some(now);
        }
    }

    fn leave(&mut self, conn: ConnId, now: Instant, out: &mut Outbox) -> Result<(), Refusal> {
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

    fn end_room(&mut self, conn: ConnId, now: Instant, out: &mut Outbox) -> Result<(), Refusal> {
        let Some(room_name) = self.conns.get(&conn).and_then(|c| c.room.clone()) else {
            return refuse(ErrorCode::NotInCall, "you are not in a room");
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return refuse(ErrorCode::Internal, "room state missing");
        };
        if room.host != Some(conn) {
            return refuse(ErrorCode::NotHost, "only the host can end the room");
        }
        let members = std::mem::take(&mut room.members);
        room.host = None;
        room.empty_since = None;
        room.ended_at = Some(now);
        info!(room = %room_name, peer = %self.peer_id(conn), "room ended by host");
        if let Some(call) = self.calls.remove(&room_name)
            && let Some(callee) = self.conns.get_mut(&call.callee)
        {
            callee.rung_by = None;
            out.push((
                call.callee,
                ServerMessage::CallCancelled {
                    call_id: room_name.clone(),
                },
            ));
        }
        for m in members {
            if let Some(c) = self.conns.get_mut(&m) {
                c.room = None;
            }
            out.push((
                m,
                ServerMessage::RoomEnded {
                    room: room_name.clone(),
                    reason: RoomEndReason::HostEnded,
                },
            ));
        }
        Ok(())
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
        out.push((other, msg));
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

    fn call(
        &mut self,
        conn: ConnId,
        to: &str,
        now: Instant,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
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
        self.enter_room(conn, &call_id, Some(from.clone()), out);
        self.calls.insert(
            call_id.clone(),
            PendingCall {
                caller: conn,
                callee,
                deadline: now + self.config.ring_timeout,
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
        now: Instant,
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
        self.enter_room(conn, call_id, name, out);
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
                    _ => "other",
                };
                (*c, kind)
            })
            .collect()
    }

    fn rooms_with(n: u64) -> Rooms {
        let mut r = Rooms::new(CFG);
        for c in 1..=n {
            r.connect(c, format!("peer{c}"));
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

    #[test]
    fn join_order_decides_host_and_fullness() {
        let t = Instant::now();
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
        let t = Instant::now();
        let mut r = rooms_with(2);
        let mut out = Outbox::new();
        r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
        r.handle(2, ClientMessage::Register { name: "b".into() }, t, &mut out);
        r.handle(1, ClientMessage::Call { to: "b".into() }, t, &mut out);
        out.clear();
        r.tick(t + Duration::from_secs(29), &mut out);
        assert!(out.is_empty());
        r.tick(t + Duration::from_secs(30), &mut out);
        assert_eq!(
            kinds(&out),
            vec![(1, "call_rejected"), (2, "call_cancelled")]
        );
        assert_eq!(r.room_count(), 0);
    }

    #[test]
    fn empty_and_ended_rooms_expire_after_the_ttl() {
        let t = Instant::now();
        let mut r = rooms_with(2);
        let mut out = Outbox::new();
        r.handle(1, join("empty"), t, &mut out);
        r.handle(1, ClientMessage::Leave, t, &mut out);
        r.handle(2, join("ended"), t, &mut out);
        r.handle(2, ClientMessage::EndRoom, t, &mut out);
        out.clear();
        r.tick(t + Duration::from_secs(599), &mut out);
        assert_eq!(r.room_count(), 2);
        // An ended room refuses joins until it expires, then the name is free again.
        r.handle(1, join("ended"), t, &mut out);
        assert_eq!(kinds(&out), vec![(1, "error")]);
        r.tick(t + Duration::from_secs(600), &mut out);
        assert_eq!(r.room_count(), 0);
    }

    #[test]
    fn disconnect_cleans_everything() {
        let t = Instant::now();
        let mut r = rooms_with(2);
        let mut out = Outbox::new();
        r.handle(1, ClientMessage::Register { name: "a".into() }, t, &mut out);
        r.handle(1, join("x"), t, &mut out);
        r.handle(2, join("x"), t, &mut out);
        out.clear();
        r.disconnect(1, t, &mut out);
        assert_eq!(kinds(&out), vec![(2, "peer_left"), (2, "host_changed")]);
        assert_eq!(r.connection_count(), 1);
        r.connect(3, "peer3".into());
        out.clear();
        r.handle(3, ClientMessage::Register { name: "a".into() }, t, &mut out);
        assert_eq!(kinds(&out), vec![(3, "registered")], "name freed");
    }
}
