//! Meetings: rooms created through the HTTP API, with a host token, a start time and
//! their own ttl; what `GET /api/rooms` shows; the changes the store must record.

use super::*;

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

impl Rooms {
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
                meeting: Some(Box::new(meeting)),
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
}
