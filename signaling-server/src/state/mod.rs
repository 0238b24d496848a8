//! Where the rooms live and how messages reach connections: [`hub`], the in-process
//! backend (the default: the state machine of [`crate::core::rooms`] behind one mutex),
//! or [`cluster`], the Redis backend (`--redis`). [`store`] keeps the in-process
//! backend's meetings in SQLite.
//!
//! The HTTP API sees either backend through one trait, [`Meetings`]. The WebSocket path
//! does not: there the in-process backend is applied synchronously under its lock, with
//! no await and no allocation per message, and putting Redis round trips behind the same
//! interface would make that path async (slower, for nothing) or hide network I/O inside
//! a lock; the connection task picks the backend once per message instead (see
//! [`cluster`]).

pub mod cluster;
pub mod hub;
pub mod store;

use std::sync::Arc;

use time::OffsetDateTime;
use tracing::warn;

use crate::core::clock::Now;
use crate::core::rooms::{HostCheck, Meeting, MeetingEvent};
use crate::protocol::RoomEndReason;
use crate::protocol::api::{RoomInfo, RoomState};
use hub::Hub;
use store::{Store, StoreError, StoredMeeting};

/// Why a backend could not answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Cluster mode: Redis did not answer (try again shortly).
    #[error(transparent)]
    Unreachable(#[from] cluster::Unreachable),
    /// The in-process backend's database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `DELETE /api/rooms/{id}` did not end a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndRefused {
    UnknownRoom,
    /// No token, a wrong one, or an ad-hoc room (which has none).
    WrongToken,
    Ended,
}

/// What the HTTP API asks of wherever meetings live.
#[async_trait::async_trait]
pub trait Meetings: Send + Sync + std::fmt::Debug {
    /// Stores `meeting` as `room` (durably, before it answers) and opens it for joins;
    /// `Ok(None)` when that id is taken.
    async fn create(&self, room: &str, meeting: Meeting) -> Result<Option<RoomInfo>, BackendError>;

    /// A room, meeting or ad hoc, as `GET /api/rooms/{room}` shows it.
    async fn info(&self, room: &str) -> Result<Option<RoomInfo>, BackendError>;

    /// Meetings whose `starts_at` lies in `[from, to]`, earliest first.
    async fn list(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<Vec<RoomInfo>, BackendError>;

    /// Ends `room` if `token` is its host token: the end is stored first, then every
    /// member hears `room_ended/host_ended`. The room as it is then.
    async fn end(
        &self,
        room: &str,
        token: Option<&str>,
    ) -> Result<Result<RoomInfo, EndRefused>, BackendError>;
}

/// The in-process backend's meetings: the hub's state machine, stored in SQLite.
#[derive(Debug)]
pub struct LocalMeetings {
    pub hub: Arc<Hub>,
    pub store: Store,
}

#[async_trait::async_trait]
impl Meetings for LocalMeetings {
    async fn create(&self, room: &str, meeting: Meeting) -> Result<Option<RoomInfo>, BackendError> {
        if self.hub.room_info(room).is_some() {
            return Ok(None);
        }
        let stored = StoredMeeting {
            room_id: room.to_owned(),
            meeting: meeting.clone(),
        };
        if !self.store.insert(stored).await? {
            return Ok(None);
        }
        if !self.hub.add_meeting(room, meeting) {
            // An ad-hoc room took the name in between: give the stored one up.
            self.store.record(vec![MeetingEvent::Forgotten {
                room: room.to_owned(),
            }]);
            return Ok(None);
        }
        Ok(self.hub.room_info(room))
    }

    async fn info(&self, room: &str) -> Result<Option<RoomInfo>, BackendError> {
        Ok(self.hub.room_info(room))
    }

    async fn list(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<Vec<RoomInfo>, BackendError> {
        Ok(self.hub.list_meetings(from, to))
    }

    async fn end(
        &self,
        room: &str,
        token: Option<&str>,
    ) -> Result<Result<RoomInfo, EndRefused>, BackendError> {
        match self.hub.check_host(room, token) {
            Ok(()) => {}
            Err(HostCheck::UnknownRoom) => return Ok(Err(EndRefused::UnknownRoom)),
            Err(HostCheck::WrongToken) => return Ok(Err(EndRefused::WrongToken)),
            Err(HostCheck::Ended) => return Ok(Err(EndRefused::Ended)),
        }
        // Stored first, so that members hear `room_ended` only once it is durable.
        let now = Now::system();
        self.store
            .end(room.to_owned(), now.wall, RoomEndReason::HostEnded)
            .await?;
        self.hub.end_by_host(room);
        let Some(info) = self.hub.room_info(room) else {
            return Ok(Err(EndRefused::UnknownRoom));
        };
        if info.state != RoomState::Ended {
            warn!(room, "room not ended after DELETE");
        }
        Ok(Ok(info))
    }
}
