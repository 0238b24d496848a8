//! Meetings (rooms created through the HTTP API) in cluster mode: stored in Redis, so
//! that every instance sees them and they outlive every instance (with Redis persistence,
//! AOF, they outlive a Redis restart too; see docs/DEPLOY.md).
//!
//! # Data in Redis
//! - `duet:meeting:{room}`: a hash. `token` = hex SHA-256 of the host token, `title`,
//!   `starts_at`, `ttl`, `created_at` (Unix ms), `empty_since` (Unix ms, while nobody is
//!   in it), and once it ended `ended` (Unix ms) and `reason` (`host_ended`, `expired`).
//!   No ttl: it lives until a sweep forgets it.
//! - `duet:meetings`: sorted set of meeting ids by `starts_at` (the listing).
//! - `duet:meeting_due`: sorted set of meeting ids by when a sweep must look at them
//!   again: an empty meeting when it expires (`max(starts_at, empty_since) + ttl`), an
//!   ended one when it is forgotten (`ended + retention`). A join takes the meeting out;
//!   the last member leaving puts it back (the `LEAVE` script in `mod.rs`).
//!
//! Membership stays in the room hash `duet:room:{room}` like any room's (flagged
//! `meeting`, which changes the host rule: the host is whoever presents the token, and
//! nobody inherits the role). The `JOIN` script reads the meeting for `not_started`,
//! `room_ended` and the host token. The sweep runs on every instance; the script's
//! `ZREM` of the due entry decides which instance acts.

use time::OffsetDateTime;
use tracing::{debug, info, warn};

use super::{
    BUSY_PREFIX, Cluster, ScriptAnswer, Unreachable, from_unix_millis, hex, meeting_key, millis,
    room_key, unix_millis,
};
use crate::core::clock::format_rfc3339;
use crate::core::rooms::Meeting;
use crate::ids;
use crate::protocol::api::{RoomInfo, RoomState};
use crate::protocol::{RoomEndReason, ServerMessage};
use crate::state::{BackendError, EndRefused, Meetings};

/// Key prefix of a meeting's hash.
pub(super) const MEETING_PREFIX: &str = "duet:meeting:";
/// Sorted set of meetings by `starts_at` (spelled out in the scripts).
const MEETINGS: &str = "duet:meetings";
/// Sorted set of meetings by when the sweep must look at them (spelled out in the scripts).
const DUE: &str = "duet:meeting_due";

/// Stores a new meeting unless the id is taken (by a meeting or a live room).
const CREATE: &str = r"
local room, token, title, starts_at, ttl, created_at = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return cjson.encode({status = 'taken'})
end
redis.call('HSET', KEYS[1], 'token', token, 'starts_at', starts_at, 'ttl', ttl,
           'created_at', created_at, 'empty_since', created_at)
if title ~= '' then redis.call('HSET', KEYS[1], 'title', title) end
redis.call('ZADD', 'duet:meetings', starts_at, room)
redis.call('ZADD', 'duet:meeting_due',
           math.max(tonumber(starts_at), tonumber(created_at)) + tonumber(ttl), room)
return cjson.encode({status = 'created'})
";

/// A meeting whose due time came: an ended one is forgotten, an empty one expires.
const DUE_SCRIPT: &str = r"
local room, retention = ARGV[1], ARGV[2]
NOW_MS
local due = redis.call('ZSCORE', 'duet:meeting_due', room)
if not due or tonumber(due) > now_ms then
  return cjson.encode({status = 'not_due'})
end
redis.call('ZREM', 'duet:meeting_due', room)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', 'duet:meetings', room)
  return cjson.encode({status = 'gone'})
end
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', 'duet:meetings', room)
  return cjson.encode({status = 'forgotten'})
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return cjson.encode({status = 'occupied'})
end
redis.call('HSET', KEYS[1], 'ended', now_ms, 'reason', 'expired')
redis.call('HDEL', KEYS[1], 'empty_since')
redis.call('ZADD', 'duet:meeting_due', now_ms + tonumber(retention), room)
return cjson.encode({status = 'expired'})
";

/// A room's two hashes as read in one transaction.
type Fields = Vec<(String, String)>;

impl Cluster {
    /// Stores `meeting` as `room`; `false` when that id is taken.
    pub async fn create_meeting(&self, room: &str, meeting: &Meeting) -> Result<bool, Unreachable> {
        let answer: ScriptAnswer = self
            .script(
                self.scripts
                    .create_meeting
                    .key(meeting_key(room))
                    .key(room_key(room))
                    .arg(room)
                    .arg(hex(&meeting.token_hash))
                    .arg(meeting.title.as_deref().unwrap_or(""))
                    .arg(unix_millis(meeting.starts_at).to_string())
                    .arg(millis(meeting.ttl))
                    .arg(unix_millis(meeting.created_at).to_string()),
            )
            .await?;
        Ok(answer.status == "created")
    }

    /// A room as `GET /api/rooms/{room}` shows it (the same from every instance):
    /// a meeting, or an ad-hoc room (forgotten as soon as it is empty).
    pub async fn room_info(&self, room: &str) -> Result<Option<RoomInfo>, Unreachable> {
        let (fields, meeting) = self.read_room(room).await?;
        Ok(self.info_of(room, &fields, &meeting, OffsetDateTime::now_utc()))
    }

    /// Both hashes of `room`, read atomically.
    async fn read_room(&self, room: &str) -> Result<(Fields, Fields), Unreachable> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HGETALL")
            .arg(room_key(room))
            .cmd("HGETALL")
            .arg(meeting_key(room));
        self.pipeline(&pipe).await
    }

    async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, Unreachable> {
        let mut redis = self.redis.clone();
        tokio::time::timeout(super::OP_TIMEOUT, pipe.query_async(&mut redis))
            .await
            .map_err(|_| Unreachable::Timeout)?
            .map_err(Unreachable::from)
    }

    fn info_of(
        &self,
        room: &str,
        fields: &Fields,
        meeting: &Fields,
        now: OffsetDateTime,
    ) -> Option<RoomInfo> {
        let members = fields.iter().filter(|(f, _)| f.starts_with("m:")).count();
        let get = |name: &str| meeting.iter().find(|(f, _)| f == name).map(|(_, v)| v);
        let time = |name: &str| {
            get(name)
                .and_then(|v| v.parse::<i128>().ok())
                .and_then(from_unix_millis)
        };
        if meeting.is_empty() {
            return self.ad_hoc_info(room, fields, members);
        }
        let starts_at = time("starts_at")?;
        let ttl = get("ttl")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(self.config.room_ttl, std::time::Duration::from_millis);
        let ended = time("ended");
        let state = if ended.is_some() {
            RoomState::Ended
        } else if now < starts_at - self.config.early_join {
            RoomState::Scheduled
        } else if members == 0 {
            RoomState::Open
        } else {
            RoomState::Active
        };
        let expires_at = match (ended, state) {
            (Some(at), _) => Some(at),
            (None, RoomState::Active) => None,
            (None, _) => {
                let emptied = time("empty_since").unwrap_or(now) + ttl;
                Some(emptied.max(starts_at + ttl))
            }
        };
        Some(RoomInfo {
            room_id: room.to_owned(),
            title: get("title").cloned(),
            starts_at: Some(format_rfc3339(starts_at)),
            expires_at: expires_at.map(format_rfc3339),
            members: if ended.is_some() { 0 } else { members },
            state,
            ttl_s: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        })
    }

    fn ad_hoc_info(&self, room: &str, fields: &Fields, members: usize) -> Option<RoomInfo> {
        if fields.is_empty() {
            return None;
        }
        let ended = fields.iter().find(|(f, _)| f == "ended").map(|(_, at)| {
            from_unix_millis(at.parse::<i128>().unwrap_or(0)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
        });
        let state = match (ended, members) {
            (Some(_), _) => RoomState::Ended,
            (None, 0) => RoomState::Open,
            (None, _) => RoomState::Active,
        };
        Some(RoomInfo {
            room_id: room.to_owned(),
            title: None,
            starts_at: None,
            expires_at: ended.map(format_rfc3339),
            members,
            state,
            ttl_s: i64::try_from(self.config.room_ttl.as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// Meetings whose `starts_at` lies in `[from, to]`, earliest first (ended ones too,
    /// until they are forgotten).
    pub async fn list_meetings(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<Vec<RoomInfo>, Unreachable> {
        let bound = |t: Option<OffsetDateTime>, open: &str| {
            t.map_or_else(|| open.to_owned(), |t| unix_millis(t).to_string())
        };
        let ids: Vec<String> = self
            .command(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(MEETINGS)
                    .arg(bound(from, "-inf"))
                    .arg(bound(to, "+inf")),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for id in &ids {
            pipe.cmd("HGETALL")
                .arg(room_key(id))
                .cmd("HGETALL")
                .arg(meeting_key(id));
        }
        let hashes: Vec<Fields> = self.pipeline(&pipe).await?;
        let now = OffsetDateTime::now_utc();
        Ok(ids
            .iter()
            .zip(hashes.chunks(2))
            .filter_map(|(id, pair)| match pair {
                [fields, meeting] if !meeting.is_empty() => self.info_of(id, fields, meeting, now),
                _ => None,
            })
            .collect())
    }

    /// `DELETE /api/rooms/{room}` with `token`: ends the meeting for everybody in it
    /// (`room_ended/host_ended`, on whichever instance they are).
    pub async fn end_meeting(
        &self,
        room: &str,
        token: Option<&str>,
    ) -> Result<Result<RoomInfo, EndRefused>, Unreachable> {
        let (fields, meeting) = self.read_room(room).await?;
        if meeting.is_empty() {
            // An ad-hoc room has no host token.
            return Ok(Err(if fields.is_empty() {
                EndRefused::UnknownRoom
            } else {
                EndRefused::WrongToken
            }));
        }
        let stored = meeting
            .iter()
            .find(|(f, _)| f == "token")
            .and_then(|(_, v)| unhex32(v));
        // Compared as hashes, in constant time (ids::secret_matches).
        let matches = stored
            .zip(token)
            .is_some_and(|(hash, t)| ids::secret_matches(&hash, t));
        if !matches {
            return Ok(Err(EndRefused::WrongToken));
        }
        let answer = self
            .script(
                self.end
                    .key(room_key(room))
                    .key(meeting_key(room))
                    .arg("")
                    .arg(millis(self.config.room_ttl))
                    .arg(unix_millis(OffsetDateTime::now_utc()))
                    .arg(BUSY_PREFIX)
                    .arg(room)
                    .arg(millis(self.config.ended_retention)),
            )
            .await?;
        if answer.status != "ended" {
            return Ok(Err(EndRefused::Ended));
        }
        info!(room, "room ended through the API");
        for member in &answer.others {
            self.route(
                &member.seat(),
                room,
                ServerMessage::RoomEnded {
                    room: room.to_owned(),
                    reason: RoomEndReason::HostEnded,
                },
            );
        }
        let info = self.room_info(room).await?;
        Ok(info.ok_or(EndRefused::UnknownRoom))
    }

    /// Expires empty meetings whose ttl ran out and forgets ended ones after the
    /// retention (whichever instance comes first; the script decides).
    pub(super) async fn sweep_meetings(&self) {
        let now = unix_millis(OffsetDateTime::now_utc());
        let due: Result<Vec<String>, _> = self
            .command(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(DUE)
                    .arg("-inf")
                    .arg(now.to_string())
                    .arg("LIMIT")
                    .arg(0)
                    .arg(64),
            )
            .await;
        let due = match due {
            Ok(due) => due,
            Err(e) => {
                debug!(error = %e, "meeting sweep failed");
                return;
            }
        };
        for room in due {
            let answer = self
                .script(
                    self.scripts
                        .meeting_due
                        .key(meeting_key(&room))
                        .key(room_key(&room))
                        .arg(&room)
                        .arg(millis(self.config.ended_retention)),
                )
                .await;
            match answer {
                Ok(a) if a.status == "expired" => info!(room = %room, "meeting expired"),
                Ok(a) if a.status == "forgotten" => debug!(room = %room, "ended meeting forgotten"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, room = %room, "meeting sweep failed"),
            }
        }
    }
}

#[async_trait::async_trait]
impl Meetings for Cluster {
    async fn create(&self, room: &str, meeting: Meeting) -> Result<Option<RoomInfo>, BackendError> {
        // One script checks the id is free and stores it.
        if !self.create_meeting(room, &meeting).await? {
            return Ok(None);
        }
        Ok(self.room_info(room).await?)
    }

    async fn info(&self, room: &str) -> Result<Option<RoomInfo>, BackendError> {
        Ok(self.room_info(room).await?)
    }

    async fn list(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<Vec<RoomInfo>, BackendError> {
        Ok(self.list_meetings(from, to).await?)
    }

    async fn end(
        &self,
        room: &str,
        token: Option<&str>,
    ) -> Result<Result<RoomInfo, EndRefused>, BackendError> {
        Ok(self.end_meeting(room, token).await?)
    }
}

/// The scripts of this module.
#[derive(Debug)]
pub(super) struct MeetingScripts {
    create_meeting: redis::Script,
    meeting_due: redis::Script,
}

impl MeetingScripts {
    pub(super) fn new() -> MeetingScripts {
        MeetingScripts {
            create_meeting: super::script(CREATE),
            meeting_due: super::script(DUE_SCRIPT),
        }
    }
}

/// 32 bytes from 64 hex digits.
fn unhex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let digits = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let hash = ids::secret_hash("a host token");
        assert_eq!(unhex32(&hex(&hash)), Some(hash));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(unhex32(&"g".repeat(64)), None);
    }
}
