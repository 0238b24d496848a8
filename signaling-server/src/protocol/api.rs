//! The HTTP API's bodies (`/api/rooms`, `/api/ice-servers`) as serde types, shared with
//! clients: the server writes them, the Duet desktop app reads them with the same types.
//!
//! The routes and rules are in `shared/spec/signaling-protocol.md` ("HTTP API") and, with
//! every choice the spec leaves open, in `docs/PROTOCOL.md`. The handlers live in the
//! server's private `http::api` module; the OpenAPI document is served at
//! [`OPENAPI_PATH`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::protocol::IceServer;

pub use crate::ids::parse_room_ref;

/// `POST` creates a room, `GET` lists rooms; `ROOMS_PATH/{room_id}` is one room.
pub const ROOMS_PATH: &str = "/api/rooms";
/// `GET`: the ICE server list with fresh TURN credentials.
pub const ICE_SERVERS_PATH: &str = "/api/ice-servers";
/// `GET`: the OpenAPI 3 document of this API.
pub const OPENAPI_PATH: &str = "/api/openapi.json";
/// `ttl_s` when the request has none: 10 minutes.
pub const DEFAULT_TTL_S: i64 = 600;
/// Largest `ttl_s`: 7 days.
pub const MAX_TTL_S: i64 = 7 * 24 * 3600;
/// Longest `title`, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

/// `POST /api/rooms` body. Every field is optional; an empty body is `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateRoomRequest {
    /// When the room opens (RFC 3339); defaults to now. Joins earlier than this minus the
    /// server's early-join grace get `error/not_started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "2026-11-20T10:00:00Z")]
    pub starts_at: Option<String>,
    /// Shown to people; at most 200 characters, no control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "Weekly 1:1")]
    pub title: Option<String>,
    /// How long the room lives once empty, in seconds (1 to 604800; default 600). The
    /// clock starts at `starts_at` at the earliest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 600, minimum = 1, maximum = 604800)]
    pub ttl_s: Option<i64>,
}

/// `201` answer to `POST /api/rooms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedRoom {
    /// 13 random characters (65 bits) in groups, e.g. `kxp-47qm-zt9-4fh`.
    #[schema(example = "kxp-47qm-zt9-4fh")]
    pub room_id: String,
    /// `<public base URL>/r/<room_id>`.
    #[schema(example = "http://127.0.0.1:8787/r/kxp-47qm-zt9-4fh")]
    pub join_url: String,
    /// Present it in `join` (`host_token`) to be the room's host, or as
    /// `Authorization: Bearer` to end the room with `DELETE`. Shown only here.
    pub host_token: String,
    /// RFC 3339, UTC.
    pub starts_at: String,
    /// When the room ends if nobody comes: `starts_at` plus its ttl (RFC 3339, UTC).
    pub expires_at: String,
}

/// A room's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoomState {
    /// Before `starts_at` minus the early-join grace: joins get `error/not_started`.
    Scheduled,
    /// Joinable and empty.
    Open,
    /// At least one member.
    Active,
    /// Ended by its host or expired: joins get `error/room_ended`.
    Ended,
}

/// `GET /api/rooms/{room_id}` answer (also the entries of [`RoomList`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomInfo {
    pub room_id: String,
    /// `null` for rooms without a title and for ad-hoc rooms.
    pub title: Option<String>,
    /// RFC 3339, UTC; `null` for ad-hoc rooms (created by a `join`).
    pub starts_at: Option<String>,
    /// When the room will end if it stays empty (RFC 3339, UTC); `null` while members
    /// are in it; for an ended room, when it ended.
    pub expires_at: Option<String>,
    /// Members in the room now (0, 1 or 2).
    pub members: usize,
    pub state: RoomState,
    /// The room's time-to-live once empty, in seconds.
    pub ttl_s: i64,
}

/// `GET /api/rooms?from=..&to=..` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomList {
    /// Rooms created through the API whose `starts_at` lies in the window, ended ones
    /// included, earliest first.
    pub rooms: Vec<RoomInfo>,
}

/// `GET /api/ice-servers` answer: the same list as `welcome.ice_servers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IceServers {
    pub ice_servers: Vec<IceServer>,
}

/// Every error of the HTTP API, with a 4xx (or 500) status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Machine-readable: `bad_json`, `bad_field`, `unauthorized`, `unknown_room`,
    /// `room_ended`, `not_found`, `method_not_allowed`, `too_large`, `rate_limited`,
    /// `internal`.
    #[schema(example = "bad_field")]
    pub error: String,
    /// For people; may change.
    pub message: String,
}

/// The join URL of `room_id` under `base` (`http://host:port`, trailing `/` allowed).
pub fn join_url(base: &str, room_id: &str) -> String {
    format!("{}/r/{room_id}", base.trim_end_matches('/'))
}

/// The `Authorization` header value for an API key or host token.
pub fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_spec_field_names() {
        let req: CreateRoomRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(req, CreateRoomRequest::default());
        assert_eq!(serde_json::to_string(&req).unwrap(), "{}");
        let state = serde_json::to_string(&RoomState::Scheduled).unwrap();
        assert_eq!(state, "\"scheduled\"");
        assert_eq!(join_url("http://h:1/", "a-b"), "http://h:1/r/a-b");
        assert_eq!(
            parse_room_ref(&join_url("http://h:1", "kxp-47qm-zt9-4fh")).as_deref(),
            Some("kxp-47qm-zt9-4fh")
        );
    }
}
