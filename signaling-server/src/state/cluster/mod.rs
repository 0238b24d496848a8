//! Cluster mode (`--redis URL`): several instances of the server behind one load balancer
//! act as one service, sharing room membership through Redis.
//!
//! # The seam
//! The in-process [`Hub`] stays exactly what it is and stays the default: without
//! `--redis` nothing here exists and no message takes a different path. With `--redis`,
//! the connection task hands every client message to [`Cluster::handle`] instead of
//! the hub; the hub is then only each connection's registry and outgoing queue (and
//! its slow-client rule), which this module delivers into with [`Hub::send`].
//!
//! This is a routing layer rather than a second implementation of the hub behind a
//! trait: [`crate::core::rooms::Rooms`] is a synchronous state machine applied under one
//! mutex, and putting Redis round trips behind the same interface would either make
//! the single-process path async (slower, for nothing) or hide network I/O inside a
//! lock. Instead the state that must be shared lives in Redis and is changed only by
//! Lua scripts (atomic: ten racing joins on two instances give exactly two `joined`),
//! and the little each instance must know to relay fast (the room and partner of each
//! of *its* connections) is cached here, kept current by the notices it delivers.
//!
//! # Data in Redis
//! - `duet:room:{room}`: a hash. `host` = peer id of the host, `m:{peer_id}` =
//!   `"{instance}\n{display name}"` per member (at most two), `ended` once its host
//!   ended it (the key then expires after `--room-ttl`). An ad-hoc room's key is deleted
//!   when its last member leaves.
//! - `duet:busy:{peer_id}`: the room (or call) a peer is in or rung by.
//! - `duet:call:{call_id}`: a call that rings (see *Direct calls*).
//! - `duet:name:{name}`: `"{peer_id}\n{instance}"` of the connection that registered it;
//!   claimed by a Lua script (taken unless its holder's instance is dead), freed when
//!   that connection ends.
//! - `duet:instance:{id}`: exists while instance `id` is alive (a heartbeat refreshes its
//!   ttl). A join finding a member whose instance key is gone removes that member (its
//!   partner hears `peer_left/disconnected`), so a killed instance does not hold seats.
//! - Channel `duet:to:{id}`: what instance `id` must deliver to its connections, as
//!   frames of the `wire` module (recipient peer id, room, sender instance, and the message's JSON as
//!   the recipient's client gets it, built once by the sender; the receiver parses only
//!   the notices that change what it knows of its member). Each
//!   instance publishes through one ordered queue and one Redis connection, and Redis
//!   delivers one publisher's messages to a channel in order, so a member's messages
//!   reach its partner in the order sent. A message is delivered only if its recipient
//!   is still in the message's room.
//!
//! # Direct calls
//! `call` runs one script on the callee's name: offline (no live holder), busy (a
//! `duet:busy:{peer_id}` marker, set while a peer is in a room or rung), or ringing: the
//! call's room is created with the caller in it (flagged `ringing`, so joins find it
//! full) and `duet:call:{call_id}` records the call. That record is the arbiter of how a
//! ringing call ends: `accept` (the callee joins), `reject`, the ring timeout (a timer on
//! the caller's instance), the caller leaving or dropping, the callee dropping: each
//! deletes the record in a script, and only the one that did acts on it.
//!
//! # Seats kept for `resume`
//! Every `joined` carries a token; the room hash keeps its hash (`t:{peer_id}`). A
//! dropped connection (or a member of a dead instance) makes its seat *away*:
//! `a:{peer_id}` = the deadline, and `"{room}\n{peer_id}"` in the sorted set
//! `duet:away`; the partner hears `peer_reconnecting`, and what it sends meanwhile is
//! queued in `duet:queue:{peer_id}` (the newest 64, at most 256 KiB, as on one instance). A `resume` through any instance moves the
//! seat there in one script and hands over the queue. Every instance sweeps `duet:away`
//! for deadlines that passed; removing the entry (`ZREM`) decides which one gives the
//! seat up.
//!
//! A `resume` whose seat's connection still looks open takes it over: that connection's
//! instance is told to let go (an envelope flagged `taken_over`), the seat is made away
//! and resumed. Scripts that end or move a seat on behalf of a connection check that the
//! seat is still where that connection is, so a late departure cannot undo a resume.
//!
//! # Meetings and room caps
//! Meetings of the HTTP API live in Redis too (see [`meetings`]); `GET
//! /api/rooms/{id}` reads Redis, so every instance answers the same. The room caps hold
//! cluster-wide, checked by the `JOIN` script when a join would create a room:
//! `--max-rooms` counts `duet:rooms` (a sorted set of the rooms joins and calls
//! created, by when they lapse unless renewed: live rooms are renewed with their keys,
//! ended ones lapse after `--room-ttl`) plus the meetings; `--rooms-per-minute` and
//! `--rooms-per-minute-per-address` keep the creation times of the last minute in lists
//! `duet:created:c:{peer_id}` and `duet:created:a:{address}`. The connection limits
//! (`--max-connections*`, the HTTP rate limits) stay per instance: they protect the
//! instance's own sockets and memory.
//!
//! # A dead instance
//! Its liveness key expires [`INSTANCE_TTL`] after its last heartbeat. Each instance's
//! heartbeat then finds its members' partners that were there and makes their seats
//! away (or, with resume off, takes them out: `peer_left/disconnected`); a join does the
//! same for members it finds there. Everything else it held (room keys, names, busy
//! markers) has a ttl of [`STATE_TTL`] that only live instances renew.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Secret;
use crate::core::clock::format_rfc3339;
use crate::core::rooms::{AWAY_QUEUE_BYTES, AWAY_QUEUE_MESSAGES, ConnId};
use crate::ids;
use crate::protocol::{
    CallRejectReason, ClientMessage, ErrorCode, LeaveReason, PeerInfo, RoomEndReason,
    ServerMessage, validate_name,
};
use crate::state::hub::Hub;

mod meetings;
mod wire;

/// Longest wait for one Redis operation before the client hears `unavailable`.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an instance refreshes its liveness key.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Ttl of the liveness key: an instance silent this long counts as dead.
const INSTANCE_TTL: Duration = Duration::from_secs(6);
/// Ttl of the shared state of this instance's connections (room and name keys, busy
/// markers), refreshed every [`STATE_REFRESH_BEATS`] heartbeats: state left behind by a
/// dead instance goes away by itself.
const STATE_TTL: Duration = Duration::from_secs(60);
/// Heartbeats between refreshes of [`STATE_TTL`] (a pipeline of a few commands per
/// connection, so not every heartbeat).
const STATE_REFRESH_BEATS: u32 = 10;
/// Wait before subscribing again after the subscription broke.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);
/// Most messages waiting to be published; beyond that they are dropped (Redis is gone).
const PUBLISH_QUEUE: usize = 65_536;
/// Most messages published in one pipeline.
const PUBLISH_BATCH: usize = 256;

const ROOM_PREFIX: &str = "duet:room:";
const INSTANCE_PREFIX: &str = "duet:instance:";
const NAME_PREFIX: &str = "duet:name:";
const BUSY_PREFIX: &str = "duet:busy:";
const CALL_PREFIX: &str = "duet:call:";
/// Envelopes waiting for an away member (the scripts spell it out too).
const QUEUE_PREFIX: &str = "duet:queue:";
/// Sorted set of the rooms joins and calls created, by when each lapses unless renewed
/// (spelled out in the scripts).
const ROOMS_SET: &str = "duet:rooms";
/// Sorted set of away seats, `"{room}\n{peer_id}"` by deadline (spelled out in the scripts).
const AWAY_SET: &str = "duet:away";

/// What turns [`LEAVE`] into the grace sweep's script: only a seat still away, and only
/// once (the sorted set's `ZREM` decides between instances).
const EXPIRE_CHECK: &str = r"
if redis.call('ZREM', 'duet:away', room .. '\n' .. me) == 0 or redis.call('HEXISTS', key, 'a:' .. me) == 0 then
  return cjson.encode({left = false})
end
";
const CHANNEL_PREFIX: &str = "duet:to:";
/// Lists of when rooms were created (Unix ms, newest first) per address (`a:{ip}`) and
/// per connection (`c:{peer_id}`), for the per-minute caps.
const CREATED_PREFIX: &str = "duet:created:";

/// The cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--redis: not a usable Redis URL: {0}")]
    BadUrl(#[source] redis::RedisError),
    #[error("--redis: {0}")]
    Connection(#[source] redis::RedisError),
}

/// Why a Redis operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {OP_TIMEOUT:?}")]
    Timeout,
    #[error("redis answered something unexpected: {0}")]
    Answer(#[from] serde_json::Error),
}

/// Joins `me` to a room unless it has ended or has two live members. Members whose
/// instance is dead are removed first (returned as `gone`; when one was host, the
/// remaining member, if any, becomes host and is returned as `new_host`).
const JOIN: &str = r"
local key, mkey = KEYS[1], KEYS[2]
local me, inst, name, prefix, inst_ttl, busy = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
NOW_MS
SAME_HASH
redis.call('SET', prefix .. inst, '1', 'PX', inst_ttl)
if redis.call('HEXISTS', key, 'ended') == 1 then
  return cjson.encode({status = 'ended'})
end
local meeting, claims = false, false
if redis.call('EXISTS', mkey) == 1 then
  local m = redis.call('HMGET', mkey, 'ended', 'starts_at', 'token')
  if m[1] then
    return cjson.encode({status = 'ended'})
  end
  if now_ms < tonumber(m[2]) - tonumber(ARGV[12]) then
    return cjson.encode({status = 'not_started', starts_at = m[2]})
  end
  if ARGV[11] ~= '' then
    if not same_hash(ARGV[11], m[3]) then
      return cjson.encode({status = 'not_host'})
    end
    claims = true
  end
  meeting = true
end
if redis.call('HEXISTS', key, 'ringing') == 1 then
  return cjson.encode({status = 'full', members = 2})
end
local exists = redis.call('EXISTS', key) == 1
local fields = redis.call('HGETALL', key)
local host = false
local others = {}
local gone = {}
for i = 1, #fields, 2 do
  local f, v = fields[i], fields[i + 1]
  if f == 'host' then
    host = v
  elseif string.sub(f, 1, 2) == 'm:' then
    local sep = string.find(v, '\n', 1, true) or (#v + 1)
    local member = {peer = string.sub(f, 3), instance = string.sub(v, 1, sep - 1),
                    name = string.sub(v, sep + 1),
                    away = redis.call('HEXISTS', key, 'a:' .. string.sub(f, 3)) == 1}
    if member.peer ~= me then
      if not member.away and redis.call('EXISTS', prefix .. member.instance) == 0 then
        if ARGV[9] == '0' then
          redis.call('HDEL', key, f)
          table.insert(gone, member)
        else
          -- Its instance died: the seat waits for a resume like any dropped one.
          redis.call('HSET', key, 'a:' .. member.peer, ARGV[10])
          redis.call('ZADD', 'duet:away', ARGV[10], ARGV[7] .. '\n' .. member.peer)
          member.away = true
          table.insert(others, member)
        end
      else
        table.insert(others, member)
      end
    end
  end
end
local new_host = nil
for _, g in ipairs(gone) do
  if g.peer == host then
    host = false
    -- A meeting's host is whoever presents its token: nobody inherits the role.
    if #others > 0 and not meeting then
      host = others[1].peer
      new_host = host
    end
  end
end
if #others >= 2 then
  if new_host then
    redis.call('HSET', key, 'host', new_host)
  elseif not host then
    redis.call('HDEL', key, 'host')
  end
  return cjson.encode({status = 'full', members = #others, gone = (#gone > 0) and gone or nil,
                       others = others, new_host = new_host})
end
if not exists and not meeting then
  -- A new room: the cluster-wide caps (--max-rooms, --rooms-per-minute*).
  redis.call('ZREMRANGEBYSCORE', 'duet:rooms', '-inf', now_ms)
  local held = redis.call('ZCARD', 'duet:rooms') + redis.call('ZCARD', 'duet:meetings')
  if held >= tonumber(ARGV[13]) then
    return cjson.encode({status = 'rate_limited', why = 'rooms'})
  end
  local windows = {{KEYS[3], tonumber(ARGV[14]), 'address'}, {KEYS[4], tonumber(ARGV[15]), 'connection'}}
  for _, w in ipairs(windows) do
    if w[2] <= 0 then
      return cjson.encode({status = 'rate_limited', why = w[3]})
    end
    if redis.call('LLEN', w[1]) >= w[2] then
      local nth = tonumber(redis.call('LINDEX', w[1], w[2] - 1))
      if nth and nth > now_ms - 60000 then
        return cjson.encode({status = 'rate_limited', why = w[3]})
      end
    end
  end
  for _, w in ipairs(windows) do
    redis.call('LPUSH', w[1], now_ms)
    redis.call('LTRIM', w[1], 0, w[2] - 1)
    redis.call('PEXPIRE', w[1], 60000)
  end
  redis.call('ZADD', 'duet:rooms', now_ms + STATE_TTL_MS, ARGV[7])
end
local deposed = nil
if meeting then
  if claims then
    if host and host ~= me then deposed = host end
    host = me
  end
  redis.call('HSET', key, 'meeting', '1')
  redis.call('ZREM', 'duet:meeting_due', ARGV[7])
  redis.call('HDEL', mkey, 'empty_since')
elseif not host then
  host = me
end
redis.call('HSET', key, 'm:' .. me, inst .. '\n' .. name)
if host then
  redis.call('HSET', key, 'host', host)
else
  redis.call('HDEL', key, 'host')
end
if ARGV[8] ~= '' then redis.call('HSET', key, 't:' .. me, ARGV[8]) end
redis.call('PEXPIRE', key, STATE_TTL_MS)
redis.call('SET', busy .. me, ARGV[7], 'PX', STATE_TTL_MS)
return cjson.encode({status = 'joined', host = host or nil, others = (#others > 0) and others or nil,
                     gone = (#gone > 0) and gone or nil, new_host = new_host, deposed = deposed})
";

/// Takes `me` out of a room; the host role passes to the remaining member. An ad-hoc
/// room left empty is deleted (an ended one keeps its key until it expires).
const LEAVE: &str = r"
local key = KEYS[1]
local me, busy, room, only_from = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
EXPIRE_CHECK
if only_from and only_from ~= '' then
  -- A connection leaves only a seat it still holds (a resume may have moved it).
  local held = redis.call('HGET', key, 'm:' .. me)
  if not held or string.sub(held, 1, #only_from + 1) ~= only_from .. '\n' then
    return cjson.encode({left = false})
  end
end
if redis.call('GET', busy .. me) == room then
  redis.call('DEL', busy .. me)
end
redis.call('HDEL', key, 't:' .. me, 'a:' .. me)
redis.call('ZREM', 'duet:away', room .. '\n' .. me)
redis.call('DEL', 'duet:queue:' .. me, 'duet:queue:' .. me .. ':bytes')
if redis.call('HDEL', key, 'm:' .. me) == 0 then
  return cjson.encode({left = false})
end
local fields = redis.call('HGETALL', key)
local host = false
local rest = {}
for i = 1, #fields, 2 do
  local f, v = fields[i], fields[i + 1]
  if f == 'host' then
    host = v
  elseif string.sub(f, 1, 2) == 'm:' then
    local sep = string.find(v, '\n', 1, true) or (#v + 1)
    table.insert(rest, {peer = string.sub(f, 3), instance = string.sub(v, 1, sep - 1),
                        name = string.sub(v, sep + 1),
                        away = redis.call('HEXISTS', key, 'a:' .. string.sub(f, 3)) == 1})
  end
end
local new_host = nil
local meeting = redis.call('HEXISTS', key, 'meeting') == 1
if host == me then
  if #rest > 0 and not meeting then
    new_host = rest[1].peer
    redis.call('HSET', key, 'host', new_host)
  else
    redis.call('HDEL', key, 'host')
  end
end
if #rest == 0 and redis.call('HEXISTS', key, 'ended') == 0 then
  redis.call('DEL', key)
  redis.call('ZREM', 'duet:rooms', room)
  if meeting then
    -- An empty meeting expires `ttl` after it emptied, not before `starts_at + ttl`.
    local mkey = 'duet:meeting:' .. room
    local m = redis.call('HMGET', mkey, 'ended', 'starts_at', 'ttl')
    if m[2] and not m[1] then
      NOW_MS
      redis.call('HSET', mkey, 'empty_since', now_ms)
      redis.call('ZADD', 'duet:meeting_due',
                 math.max(tonumber(m[2]) + tonumber(m[3]), now_ms + tonumber(m[3])), room)
    end
  end
end
return cjson.encode({left = true, others = (#rest > 0) and rest or nil, new_host = new_host})
";

/// Ends a room if `me` is its host: every member out, `ended` (the time, Unix ms) kept
/// for `ttl_ms`.
const END: &str = r"
local key, mkey = KEYS[1], KEYS[2]
local me, ttl, now_ms, room, retention = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[6]
local meeting = redis.call('EXISTS', mkey) == 1
if meeting and redis.call('HEXISTS', mkey, 'ended') == 1 then
  return cjson.encode({status = 'ended_already'})
end
if me ~= '' and redis.call('HGET', key, 'host') ~= me then
  return cjson.encode({status = 'not_host'})
end
local fields = redis.call('HGETALL', key)
local members = {}
for i = 1, #fields, 2 do
  local f, v = fields[i], fields[i + 1]
  if string.sub(f, 1, 2) == 'm:' then
    local sep = string.find(v, '\n', 1, true) or (#v + 1)
    table.insert(members, {peer = string.sub(f, 3), instance = string.sub(v, 1, sep - 1),
                           name = string.sub(v, sep + 1)})
    redis.call('DEL', ARGV[4] .. string.sub(f, 3))
    redis.call('ZREM', 'duet:away', room .. '\n' .. string.sub(f, 3))
    redis.call('DEL', 'duet:queue:' .. string.sub(f, 3), 'duet:queue:' .. string.sub(f, 3) .. ':bytes')
  end
end
redis.call('DEL', key)
if meeting then
  -- Kept (refusing joins with room_ended) for the retention, then forgotten by a sweep.
  redis.call('HSET', mkey, 'ended', now_ms, 'reason', 'host_ended')
  redis.call('HDEL', mkey, 'empty_since')
  redis.call('ZADD', 'duet:meeting_due', tonumber(now_ms) + tonumber(retention), room)
else
  redis.call('HSET', key, 'ended', now_ms)
  redis.call('PEXPIRE', key, ttl)
  redis.call('ZADD', 'duet:rooms', tonumber(now_ms) + tonumber(ttl), room)
end
return cjson.encode({status = 'ended', others = (#members > 0) and members or nil})
";

/// Claims a name for `me` (`"{peer_id}\n{instance}"`) unless a live connection holds
/// it (a holder whose instance is dead loses it); frees `me`'s previous name (`KEYS[2]`).
const REGISTER: &str = r"
local me, prefix = ARGV[1], ARGV[2]
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= me then
  local sep = string.find(holder, '\n', 1, true) or (#holder + 1)
  if redis.call('EXISTS', prefix .. string.sub(holder, sep + 1)) == 1 then
    return cjson.encode({status = 'taken'})
  end
end
redis.call('SET', KEYS[1], me, 'PX', STATE_TTL_MS)
if KEYS[2] ~= KEYS[1] and redis.call('GET', KEYS[2]) == me then
  redis.call('DEL', KEYS[2])
end
return cjson.encode({status = 'registered'})
";

/// Frees a name if `me` still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return cjson.encode({status = 'released'})
";

/// Rings `callee`'s name for `me` (`from` its registered name): offline (no live holder),
/// self, busy (in a room or rung), or ringing: the call room is created with `me` in it
/// (closed to joins while it rings), both marked busy, and the call recorded (`KEYS[3]`,
/// the arbiter of how it ends).
const CALL: &str = r"
local me, inst, from, prefix, busy, call_id, ring_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local holder = redis.call('GET', KEYS[1])
if not holder then
  return cjson.encode({status = 'offline'})
end
local sep = string.find(holder, '\n', 1, true) or (#holder + 1)
local peer, at = string.sub(holder, 1, sep - 1), string.sub(holder, sep + 1)
if redis.call('EXISTS', prefix .. at) == 0 then
  return cjson.encode({status = 'offline'})
end
if peer == me then
  return cjson.encode({status = 'self'})
end
if redis.call('EXISTS', busy .. peer) == 1 then
  return cjson.encode({status = 'busy'})
end
redis.call('HSET', KEYS[2], 'm:' .. me, inst .. '\n' .. from, 'host', me, 'ringing', peer)
NOW_MS
redis.call('ZADD', 'duet:rooms', now_ms + STATE_TTL_MS, call_id)
if ARGV[8] ~= '' then redis.call('HSET', KEYS[2], 't:' .. me, ARGV[8]) end
redis.call('PEXPIRE', KEYS[2], STATE_TTL_MS)
redis.call('SET', busy .. me, call_id, 'PX', STATE_TTL_MS)
redis.call('SET', busy .. peer, call_id, 'PX', STATE_TTL_MS)
redis.call('SET', KEYS[3], cjson.encode({caller = me, caller_instance = inst, callee = peer,
                                          callee_instance = at}), 'PX', ring_ms)
return cjson.encode({status = 'ringing', others = {{peer = peer, instance = at, name = ''}}})
";

/// Ends a call that still rings (whoever comes first: reject, timeout, either side
/// gone); `gone` when it was answered or ended already.
const END_CALL: &str = r"
local call = redis.call('GET', KEYS[1])
if not call then
  return cjson.encode({status = 'gone'})
end
local c = cjson.decode(call)
local busy, call_id = ARGV[1], ARGV[2]
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', 'duet:rooms', call_id)
for _, p in ipairs({c.caller, c.callee}) do
  if redis.call('GET', busy .. p) == call_id then
    redis.call('DEL', busy .. p)
  end
end
return cjson.encode({status = 'ended', others = {
  {peer = c.caller, instance = c.caller_instance, name = ''},
  {peer = c.callee, instance = c.callee_instance, name = ''}}})
";

/// The callee `me` answers: the call is over (as ringing), `me` joins its room.
const ACCEPT: &str = r"
local call = redis.call('GET', KEYS[1])
if not call then
  return cjson.encode({status = 'gone'})
end
local c = cjson.decode(call)
local me, inst, name, busy, call_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if c.callee ~= me then
  return cjson.encode({status = 'gone'})
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'ringing')
local fields = redis.call('HGETALL', KEYS[2])
local host = nil
local others = {}
for i = 1, #fields, 2 do
  local f, v = fields[i], fields[i + 1]
  if f == 'host' then
    host = v
  elseif string.sub(f, 1, 2) == 'm:' then
    local sep = string.find(v, '\n', 1, true) or (#v + 1)
    table.insert(others, {peer = string.sub(f, 3), instance = string.sub(v, 1, sep - 1),
                          name = string.sub(v, sep + 1)})
  end
end
redis.call('HSET', KEYS[2], 'm:' .. me, inst .. '\n' .. name)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 't:' .. me, ARGV[6]) end
redis.call('PEXPIRE', KEYS[2], STATE_TTL_MS)
redis.call('SET', busy .. me, call_id, 'PX', STATE_TTL_MS)
return cjson.encode({status = 'joined', host = host, others = (#others > 0) and others or nil})
";

/// A member's connection dropped: its seat is kept (`a:{peer}` = the deadline, Unix ms,
/// also in the sorted set `duet:away`) unless the room ended or still rings.
const AWAY: &str = r"
local key = KEYS[1]
local me, deadline, room, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local held = redis.call('HGET', key, 'm:' .. me)
-- Only the seat as `at` knows it: a resume may have moved it meanwhile.
if not held or string.sub(held, 1, #at + 1) ~= at .. '\n'
   or redis.call('HEXISTS', key, 'ended') == 1 or redis.call('HEXISTS', key, 'ringing') == 1 then
  return cjson.encode({status = 'gone'})
end
redis.call('HSET', key, 'a:' .. me, deadline)
redis.call('ZADD', 'duet:away', deadline, room .. '\n' .. me)
local fields = redis.call('HGETALL', key)
local others = {}
for i = 1, #fields, 2 do
  local f, v = fields[i], fields[i + 1]
  if string.sub(f, 1, 2) == 'm:' and string.sub(f, 3) ~= me then
    local sep = string.find(v, '\n', 1, true) or (#v + 1)
    table.insert(others, {peer = string.sub(f, 3), instance = string.sub(v, 1, sep - 1),
                          name = string.sub(v, sep + 1),
                          away = redis.call('HEXISTS', key, 'a:' .. string.sub(f, 3)) == 1})
  end
end
return cjson.encode({status = 'away', others = (#others > 0) and others or nil})
";

/// A message for `peer`: queued while it is away (the newest 64, at most 256 KiB of
/// envelopes, as on one instance; the size is kept in `{queue}:bytes`), else where it is
/// now.
const QUEUE: &str = r"
local peer, envelope = ARGV[1], ARGV[2]
if redis.call('HEXISTS', KEYS[1], 'a:' .. peer) == 1 then
  local size_key = KEYS[2] .. ':bytes'
  redis.call('RPUSH', KEYS[2], envelope)
  local bytes = redis.call('INCRBY', size_key, #envelope)
  while redis.call('LLEN', KEYS[2]) > AWAY_QUEUE_MESSAGES or bytes > AWAY_QUEUE_BYTES do
    local oldest = redis.call('LPOP', KEYS[2])
    if not oldest then break end
    bytes = redis.call('DECRBY', size_key, #oldest)
  end
  redis.call('PEXPIRE', KEYS[2], STATE_TTL_MS)
  redis.call('PEXPIRE', size_key, STATE_TTL_MS)
  return cjson.encode({status = 'queued'})
end
local v = redis.call('HGET', KEYS[1], 'm:' .. peer)
if not v then
  return cjson.encode({status = 'gone'})
end
local sep = string.find(v, '\n', 1, true) or (#v + 1)
return cjson.encode({status = 'here', others = {{peer = peer, instance = string.sub(v, 1, sep - 1),
                                                 name = string.sub(v, sep + 1)}}})
";

/// A new connection (on instance `inst`) takes back the away seat of `peer` with its
/// token: a fresh token hash, the queue handed over.
const RESUME: &str = r"
local key = KEYS[1]
local peer, token, fresh, inst, now, busy, room = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
SAME_HASH
if redis.call('EXISTS', key) == 0 then
  return cjson.encode({status = 'no_room'})
end
if redis.call('HEXISTS', key, 'ended') == 1 then
  return cjson.encode({status = 'ended'})
end
local v = redis.call('HGET', key, 'm:' .. peer)
if not v then
  return cjson.encode({status = 'not_member'})
end
if not same_hash(redis.call('HGET', key, 't:' .. peer), token) then
  return cjson.encode({status = 'wrong_token'})
end
local deadline = redis.call('HGET', key, 'a:' .. peer)
if not deadline then
  local at = string.find(v, '\n', 1, true) or (#v + 1)
  return cjson.encode({status = 'not_away', others = {{peer = peer,
                       instance = string.sub(v, 1, at - 1), name = ''}}})
end
if tonumber(deadline) <= tonumber(now) then
  return cjson.encode({status = 'expired'})
end
local sep = string.find(v, '\n', 1, true) or (#v + 1)
local name = string.sub(v, sep + 1)
redis.call('HDEL', key, 'a:' .. peer)
redis.call('ZREM', 'duet:away', room .. '\n' .. peer)
redis.call('HSET', key, 'm:' .. peer, inst .. '\n' .. name, 't:' .. peer, fresh)
redis.call('PEXPIRE', key, STATE_TTL_MS)
redis.call('SET', busy .. peer, room, 'PX', STATE_TTL_MS)
local queue = redis.call('LRANGE', 'duet:queue:' .. peer, 0, -1)
redis.call('DEL', 'duet:queue:' .. peer, 'duet:queue:' .. peer .. ':bytes')
local fields = redis.call('HGETALL', key)
local host = nil
local others = {}
for i = 1, #fields, 2 do
  local f, w = fields[i], fields[i + 1]
  if f == 'host' then
    host = w
  elseif string.sub(f, 1, 2) == 'm:' and string.sub(f, 3) ~= peer then
    local s = string.find(w, '\n', 1, true) or (#w + 1)
    table.insert(others, {peer = string.sub(f, 3), instance = string.sub(w, 1, s - 1),
                          name = string.sub(w, s + 1),
                          away = redis.call('HEXISTS', key, 'a:' .. string.sub(f, 3)) == 1})
  end
end
return cjson.encode({status = 'resumed', host = host, name = name,
                     others = (#others > 0) and others or nil,
                     queue = (#queue > 0) and queue or nil})
";

/// A member as the scripts return it.
#[derive(Debug, Clone, Deserialize)]
struct ScriptMember {
    peer: String,
    instance: String,
    name: String,
    /// Its connection dropped; its seat waits for a `resume`.
    #[serde(default)]
    away: bool,
}

impl ScriptMember {
    fn seat(&self) -> Seat {
        Seat {
            peer_id: self.peer.clone(),
            instance: self.instance.clone(),
            away: self.away,
        }
    }

    fn info(&self) -> PeerInfo {
        PeerInfo {
            peer_id: self.peer.clone(),
            name: (!self.name.is_empty()).then(|| self.name.clone()),
        }
    }
}

/// What a script answered (fields absent when they do not apply).
#[derive(Debug, Deserialize)]
struct ScriptAnswer {
    #[serde(default)]
    status: String,
    #[serde(default)]
    left: bool,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    members: usize,
    #[serde(default)]
    others: Vec<ScriptMember>,
    #[serde(default)]
    gone: Vec<ScriptMember>,
    #[serde(default)]
    new_host: Option<String>,
    /// Envelopes queued for an away member, oldest first.
    #[serde(default)]
    queue: Vec<String>,
    /// `not_started`: when the meeting opens (Unix ms).
    #[serde(default)]
    starts_at: Option<String>,
    /// `rate_limited`: which cap (`rooms`, `address`, `connection`).
    #[serde(default)]
    why: Option<String>,
    /// A meeting's host that lost the role to a member presenting the host token.
    #[serde(default)]
    deposed: Option<String>,
}

/// Where a member's WebSocket is: its peer id on instance `instance` (or, `away`, the
/// seat of a dropped connection, whose messages are queued in Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seat {
    peer_id: String,
    instance: String,
    away: bool,
}

/// What one instance tells another (or itself): deliver `msg` to `to` if it is still in
/// `room`. `from` is the sending instance (where the member named in a `peer_joined` is).
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    to: String,
    room: String,
    from: String,
    msg: ServerMessage,
    /// Not a message: `to`'s seat in `room` was resumed on another connection; this
    /// one lets go of it (and `msg` is not delivered).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    taken_over: bool,
}

/// A callee being rung: its peer id, registered name and room.
struct Rung {
    peer_id: String,
    name: Option<String>,
    room: Option<String>,
}

/// One of this instance's connections.
#[derive(Debug)]
struct Member {
    peer_id: String,
    /// The client's address (for the per-address room-creation cap).
    address: IpAddr,
    room: Option<String>,
    partner: Option<Seat>,
    /// The room a join under way may have put it in (left again if the connection ends
    /// before the answer came back).
    joining: Option<String>,
    /// The name it registered (held in Redis, cluster-wide).
    registered: Option<String>,
    /// The call it placed while it rings (its room is the call id).
    calling: Option<String>,
    /// The call ringing it.
    rung_by: Option<String>,
    /// While a join is under way: what arrived meanwhile, delivered after `joined`.
    held: Option<Vec<Envelope>>,
}

#[derive(Debug, Default)]
struct Local {
    conns: HashMap<ConnId, Member>,
    by_peer: HashMap<String, ConnId>,
}

/// Settings the cluster takes from the server's configuration.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT/DB` (may hold a password: `Debug` does not show it).
    pub url: Secret,
    /// How long an ended room keeps refusing joins.
    pub room_ttl: Duration,
    /// How long a direct call rings.
    pub ring_timeout: Duration,
    /// How long a dropped member's seat waits for a `resume` (zero: resume off).
    pub resume_grace: Duration,
    /// How often away seats whose grace ran out (and meetings due to expire) are looked for.
    pub sweep_interval: Duration,
    /// How long before its `starts_at` a meeting can be joined.
    pub early_join: Duration,
    /// How long an ended meeting is remembered (refusing joins with `room_ended`).
    pub ended_retention: Duration,
    /// Most rooms held at once, cluster-wide (ad-hoc, calls and meetings).
    pub max_rooms: usize,
    /// Most rooms one connection may create in a minute.
    pub rooms_per_minute: usize,
    /// Most rooms all connections from one address may create in a minute, cluster-wide.
    pub rooms_per_minute_per_address: usize,
}

/// This instance's part of the cluster.
#[derive(Debug)]
pub struct Cluster {
    instance: String,
    channel: String,
    client: Client,
    redis: ConnectionManager,
    hub: Arc<Hub>,
    config: ClusterConfig,
    local: Mutex<Local>,
    /// (channel, frame) to publish, in order.
    publish: mpsc::Sender<(String, Vec<u8>)>,
    subscribed: AtomicBool,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    join: Script,
    leave: Script,
    end: Script,
    register: Script,
    release: Script,
    call: Script,
    end_call: Script,
    accept: Script,
    away: Script,
    queue: Script,
    resume: Script,
    expire: Script,
    scripts: meetings::MeetingScripts,
    /// Itself, for the ring timers' tasks.
    weak: Weak<Cluster>,
}

impl Cluster {
    /// Connects (lazily: Redis may come up later; `/healthz` says until it does) and
    /// starts the subscriber, publisher and heartbeat tasks.
    pub async fn start(config: ClusterConfig, hub: Arc<Hub>) -> Result<Arc<Cluster>, ClusterError> {
        let client = Client::open(config.url.0.as_str()).map_err(ClusterError::BadUrl)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(OP_TIMEOUT));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(ClusterError::Connection)?;
        let instance = ids::peer_id();
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        let cluster = Arc::new_cyclic(|weak| Cluster {
            channel: format!("{CHANNEL_PREFIX}{instance}"),
            instance,
            client,
            redis,
            hub,
            config,
            local: Mutex::new(Local::default()),
            publish,
            subscribed: AtomicBool::new(false),
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            join: script(JOIN),
            leave: script(&LEAVE.replace("EXPIRE_CHECK", "")),
            end: script(END),
            register: script(REGISTER),
            release: script(RELEASE),
            call: script(CALL),
            end_call: script(END_CALL),
            accept: script(ACCEPT),
            away: script(AWAY),
            queue: script(QUEUE),
            resume: script(RESUME),
            expire: script(&LEAVE.replace("EXPIRE_CHECK", EXPIRE_CHECK)),
            scripts: meetings::MeetingScripts::new(),
            weak: weak.clone(),
        });
        if let Err(e) = cluster.heartbeat().await {
            warn!(error = %e, "Redis not reachable at start; not ready until it is");
        }
        let tasks = vec![
            tokio::spawn(publish_loop(
                cluster.redis.clone(),
                queue,
                cluster.stop.clone(),
            )),
            tokio::spawn(Arc::clone(&cluster).subscribe_loop()),
            tokio::spawn(Arc::clone(&cluster).heartbeat_loop()),
            tokio::spawn(Arc::clone(&cluster).sweep_loop()),
        ];
        *cluster.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        info!(instance = %cluster.instance, "cluster mode: sharing rooms through Redis");
        Ok(cluster)
    }

    /// This instance's id in the cluster.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        // Plain map updates: a panic elsewhere cannot leave them half done.
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the background tasks (after the connections have left) and removes this
    /// instance's liveness key.
    pub async fn stop(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            let _ = task.await;
        }
        let key = format!("{INSTANCE_PREFIX}{}", self.instance);
        if let Err(e) = self.command::<()>(redis::cmd("DEL").arg(key)).await {
            debug!(error = %e, "liveness key not removed");
        }
    }

    /// Whether this instance can serve: Redis answers and the subscription is up.
    pub async fn ready(&self) -> Result<(), String> {
        let mut redis = self.redis.clone();
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut redis);
        match tokio::time::timeout(Duration::from_secs(1), ping).await {
            Ok(Ok(_)) if self.subscribed.load(Ordering::Relaxed) => Ok(()),
            Ok(Ok(_)) => Err("not subscribed to its Redis channel yet".to_owned()),
            Ok(Err(e)) => Err(format!("redis unreachable: {e}")),
            Err(_) => Err("redis unreachable: no answer to PING".to_owned()),
        }
    }

    /// A new connection (already registered with the hub as `conn`, `peer_id`).
    pub fn connect(&self, conn: ConnId, peer_id: &str, address: IpAddr) {
        let mut local = self.lock();
        local.by_peer.insert(peer_id.to_owned(), conn);
        local.conns.insert(
            conn,
            Member {
                peer_id: peer_id.to_owned(),
                address,
                room: None,
                partner: None,
                joining: None,
                registered: None,
                calling: None,
                rung_by: None,
                held: None,
            },
        );
    }

    /// `conn` is gone: it leaves its room (`peer_left/disconnected`). Idempotent.
    pub async fn disconnect(&self, conn: ConnId) {
        if let Err(e) = self.leave_room(conn, LeaveReason::Disconnected).await {
            warn!(error = %e, conn, "could not take a dropped member out of its room in Redis");
        }
        let rung_by = self
            .lock()
            .conns
            .get_mut(&conn)
            .and_then(|m| m.rung_by.take());
        if let Some(call_id) = rung_by
            && let Err(e) = self
                .end_call(&call_id, Some(CallRejectReason::Offline), false)
                .await
        {
            warn!(error = %e, call = %call_id, "could not end a call whose callee left");
        }
        let member = {
            let mut local = self.lock();
            let member = local.conns.remove(&conn);
            if let Some(member) = &member {
                local.by_peer.remove(&member.peer_id);
            }
            member
        };
        if let Some(name) = member.as_ref().and_then(|m| m.registered.as_deref()) {
            let me = format!(
                "{}\n{}",
                member.as_ref().map_or("", |m| &m.peer_id),
                self.instance
            );
            if let Err(e) = self.script(self.release.key(name_key(name)).arg(me)).await {
                warn!(error = %e, name, "could not free a registered name in Redis");
            }
        }
    }

    /// One message from `conn`; replies go to its hub queue.
    pub async fn handle(&self, conn: ConnId, msg: ClientMessage) {
        let result = match msg {
            ClientMessage::Join {
                room,
                name,
                host_token,
            } => {
                self.join(conn, &room, name.as_deref(), host_token.as_deref())
                    .await
            }
            ClientMessage::Offer { sdp } => {
                self.relay(conn, |from| ServerMessage::Offer { from, sdp })
                    .await
            }
            ClientMessage::Answer { sdp } => {
                self.relay(conn, |from| ServerMessage::Answer { from, sdp })
                    .await
            }
            ClientMessage::Candidate { candidate } => {
                self.relay(conn, |from| ServerMessage::Candidate { from, candidate })
                    .await
            }
            ClientMessage::Leave => match self.leave_room(conn, LeaveReason::Left).await {
                Ok(true) => Ok(()),
                Ok(false) => Err((ErrorCode::NotInCall, "you are not in a room".to_owned())),
                Err(e) => Err(unavailable(&e)),
            },
            ClientMessage::EndRoom => self.end_room(conn).await,
            ClientMessage::Register { name } => self.register(conn, &name).await,
            ClientMessage::Call { to } => self.place_call(conn, &to).await,
            ClientMessage::Accept { call_id } => self.accept_call(conn, &call_id).await,
            ClientMessage::Reject { call_id } => self.reject_call(conn, &call_id).await,
            ClientMessage::Resume {
                room,
                peer_id,
                resume_token,
            } => self.resume(conn, &room, &peer_id, &resume_token).await,
        };
        if let Err((code, message)) = result {
            self.hub.send(conn, ServerMessage::error(code, message));
        }
    }

    async fn join(
        &self,
        conn: ConnId,
        room: &str,
        name: Option<&str>,
        host_token: Option<&str>,
    ) -> Result<(), (ErrorCode, String)> {
        let room = validate_name("room", room).map_err(|e| (e.code, e.message))?;
        let display = match name.map(str::trim) {
            None | Some("") => None,
            Some(n) => Some(validate_name("name", n).map_err(|e| (e.code, e.message))?),
        };
        let (peer_id, current, address) = {
            let local = self.lock();
            let member = local
                .conns
                .get(&conn)
                .ok_or((ErrorCode::Internal, "unknown connection".to_owned()))?;
            (member.peer_id.clone(), member.room.clone(), member.address)
        };
        if current.as_deref() == Some(room) {
            // Joining the room it is in: leave and join again, as on one instance.
            self.leave_room(conn, LeaveReason::Left)
                .await
                .map_err(|e| unavailable(&e))?;
        }
        self.hold(conn, Some(room));
        let token = self.new_token();
        let answer = self
            .script(
                self.join
                    .key(room_key(room))
                    .key(meeting_key(room))
                    .key(format!("{CREATED_PREFIX}a:{address}"))
                    .key(format!("{CREATED_PREFIX}c:{peer_id}"))
                    .arg(&peer_id)
                    .arg(&self.instance)
                    .arg(display.unwrap_or(""))
                    .arg(INSTANCE_PREFIX)
                    .arg(millis(INSTANCE_TTL))
                    .arg(BUSY_PREFIX)
                    .arg(room)
                    .arg(token_hash(token.as_deref()))
                    .arg(if self.config.resume_grace.is_zero() {
                        "0"
                    } else {
                        "1"
                    })
                    .arg(
                        unix_millis(OffsetDateTime::now_utc() + self.config.resume_grace)
                            .to_string(),
                    )
                    .arg(host_token.map_or_else(String::new, |t| hex(&ids::secret_hash(t))))
                    .arg(millis(self.config.early_join).to_string())
                    .arg(self.config.max_rooms)
                    .arg(self.config.rooms_per_minute_per_address)
                    .arg(self.config.rooms_per_minute),
            )
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                self.hold(conn, None);
                return Err(unavailable(&e));
            }
        };
        // Members of dead instances were removed: their partners hear so.
        for gone in &answer.gone {
            info!(room, peer = %gone.peer, instance = %gone.instance, "member of a dead instance removed");
            for other in &answer.others {
                self.route(
                    &other.seat(),
                    room,
                    ServerMessage::PeerLeft {
                        peer_id: gone.peer.clone(),
                        reason: LeaveReason::Disconnected,
                    },
                );
            }
        }
        if let Some(new_host) = &answer.new_host
            && let Some(other) = answer.others.iter().find(|o| &o.peer == new_host)
        {
            self.route(
                &other.seat(),
                room,
                ServerMessage::HostChanged {
                    peer_id: new_host.clone(),
                },
            );
        }
        match answer.status.as_str() {
            "ended" => {
                self.hold(conn, None);
                Err((ErrorCode::RoomEnded, format!("room `{room}` has ended")))
            }
            "not_started" => {
                self.hold(conn, None);
                let starts_at = answer
                    .starts_at
                    .as_deref()
                    .and_then(|ms| ms.parse::<i64>().ok())
                    .and_then(|ms| from_unix_millis(ms.into()))
                    .map(format_rfc3339)
                    .unwrap_or_default();
                self.hub.send(
                    conn,
                    ServerMessage::Error {
                        code: ErrorCode::NotStarted,
                        message: format!("the room opens at {starts_at}"),
                        starts_at: Some(starts_at),
                    },
                );
                Ok(())
            }
            "not_host" => {
                self.hold(conn, None);
                info!(room, peer = %peer_id, "wrong host token");
                Err((
                    ErrorCode::NotHost,
                    "wrong `host_token` for this room".to_owned(),
                ))
            }
            "rate_limited" => {
                self.hold(conn, None);
                let message = match answer.why.as_deref() {
                    Some("address") => format!(
                        "at most {} new rooms a minute from one address; join one that exists or wait",
                        self.config.rooms_per_minute_per_address
                    ),
                    Some("connection") => format!(
                        "at most {} new rooms a minute; join one that exists or wait",
                        self.config.rooms_per_minute
                    ),
                    _ => {
                        warn!("room limit reached (cluster-wide); refusing a new room");
                        "the server holds as many rooms as it may; try again later".to_owned()
                    }
                };
                info!(room, peer = %peer_id, why = ?answer.why, "new room refused");
                Err((ErrorCode::RateLimited, message))
            }
            "full" => {
                self.hold(conn, None);
                info!(room, peer = %peer_id, "room full");
                self.hub.send(
                    conn,
                    ServerMessage::RoomFull {
                        room: room.to_owned(),
                        members: answer.members.max(2),
                    },
                );
                Ok(())
            }
            "joined" => {
                if let Some(old) = current.filter(|old| old != room) {
                    // In the new room now; out of the old one (its partner hears so).
                    self.leave_old_room(conn, &peer_id, &old).await;
                }
                let host = answer.host.as_deref() == Some(peer_id.as_str());
                info!(room, peer = %peer_id, members = answer.others.len() + 1, host, "joined");
                let held = {
                    let mut local = self.lock();
                    let Some(member) = local.conns.get_mut(&conn) else {
                        return Ok(());
                    };
                    member.room = Some(room.to_owned());
                    member.joining = None;
                    member.partner = answer.others.first().map(ScriptMember::seat);
                    self.hub.send(
                        conn,
                        ServerMessage::Joined {
                            room: room.to_owned(),
                            peer_id: peer_id.clone(),
                            members: answer.others.len() + 1,
                            host,
                            peers: answer.others.iter().map(ScriptMember::info).collect(),
                            resume_token: token,
                        },
                    );
                    member.held.take().unwrap_or_default()
                };
                for other in &answer.others {
                    self.send_to(
                        &other.seat(),
                        room,
                        ServerMessage::PeerJoined {
                            peer_id: peer_id.clone(),
                            name: display.map(str::to_owned),
                        },
                    )
                    .await;
                    if answer.deposed.as_deref() == Some(other.peer.as_str()) {
                        self.send_to(
                            &other.seat(),
                            room,
                            ServerMessage::HostChanged {
                                peer_id: peer_id.clone(),
                            },
                        )
                        .await;
                    }
                }
                for envelope in held {
                    self.receive(envelope);
                }
                Ok(())
            }
            other => {
                self.hold(conn, None);
                warn!(status = other, "unexpected answer from the join script");
                Err((
                    ErrorCode::Internal,
                    "unexpected answer from Redis".to_owned(),
                ))
            }
        }
    }

    /// Claims `name` cluster-wide for `conn` (its previous name, if any, is freed).
    async fn register(&self, conn: ConnId, name: &str) -> Result<(), (ErrorCode, String)> {
        let name = validate_name("name", name).map_err(|e| (e.code, e.message))?;
        let (peer_id, old) = {
            let local = self.lock();
            let member = local
                .conns
                .get(&conn)
                .ok_or((ErrorCode::Internal, "unknown connection".to_owned()))?;
            (member.peer_id.clone(), member.registered.clone())
        };
        let me = format!("{peer_id}\n{}", self.instance);
        let answer = self
            .script(
                self.register
                    .key(name_key(name))
                    .key(name_key(old.as_deref().unwrap_or(name)))
                    .arg(me)
                    .arg(INSTANCE_PREFIX),
            )
            .await
            .map_err(|e| unavailable(&e))?;
        if answer.status == "taken" {
            return Err((ErrorCode::NameTaken, format!("the name `{name}` is taken")));
        }
        info!(peer = %peer_id, name, "registered");
        if let Some(member) = self.lock().conns.get_mut(&conn) {
            member.registered = Some(name.to_owned());
        }
        self.hub.send(
            conn,
            ServerMessage::Registered {
                name: name.to_owned(),
            },
        );
        Ok(())
    }

    /// `call`: rings the holder of the name `to` (see [`CALL`]).
    async fn place_call(&self, conn: ConnId, to: &str) -> Result<(), (ErrorCode, String)> {
        let (peer_id, from, current) = {
            let local = self.lock();
            let member = local
                .conns
                .get(&conn)
                .ok_or((ErrorCode::Internal, "unknown connection".to_owned()))?;
            let Some(from) = member.registered.clone() else {
                return Err((
                    ErrorCode::BadField,
                    "register a name before calling (`register` first)".to_owned(),
                ));
            };
            (member.peer_id.clone(), from, member.room.clone())
        };
        let to = validate_name("to", to).map_err(|e| (e.code, e.message))?;
        let call_id = ids::call_id();
        let token = self.new_token();
        let answer = self
            .script(
                self.call
                    .key(name_key(to))
                    .key(room_key(&call_id))
                    .key(call_key(&call_id))
                    .arg(&peer_id)
                    .arg(&self.instance)
                    .arg(&from)
                    .arg(INSTANCE_PREFIX)
                    .arg(BUSY_PREFIX)
                    .arg(&call_id)
                    // The record outlives the ring by a margin: the timer ends it.
                    .arg(millis(self.config.ring_timeout + Duration::from_secs(60)))
                    .arg(token_hash(token.as_deref())),
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let rejected = |reason| {
            info!(call = %call_id, from = %from, to, ?reason, "call not placed");
            self.hub.send(
                conn,
                ServerMessage::CallRejected {
                    call_id: call_id.clone(),
                    reason,
                },
            );
            Ok(())
        };
        let callee = match answer.status.as_str() {
            "offline" => return rejected(CallRejectReason::Offline),
            "busy" => return rejected(CallRejectReason::Busy),
            "self" => return Err((ErrorCode::BadField, "`to` is your own name".to_owned())),
            "ringing" => match answer.others.first() {
                Some(callee) => callee.seat(),
                None => return Err((ErrorCode::Internal, "no callee in the answer".to_owned())),
            },
            other => {
                warn!(status = other, "unexpected answer from the call script");
                return Err((
                    ErrorCode::Internal,
                    "unexpected answer from Redis".to_owned(),
                ));
            }
        };
        if let Some(old) = current {
            // The caller is in the call's room now; out of the one it was in.
            self.leave_old_room(conn, &peer_id, &old).await;
        }
        info!(call = %call_id, from = %from, to, "ringing");
        {
            let mut local = self.lock();
            if let Some(member) = local.conns.get_mut(&conn) {
                member.room = Some(call_id.clone());
                member.partner = None;
                member.calling = Some(call_id.clone());
            }
            self.hub.send(
                conn,
                ServerMessage::Ringing {
                    call_id: call_id.clone(),
                    to: to.to_owned(),
                },
            );
            self.hub.send(
                conn,
                ServerMessage::Joined {
                    room: call_id.clone(),
                    peer_id: peer_id.clone(),
                    members: 1,
                    host: true,
                    peers: Vec::new(),
                    resume_token: token,
                },
            );
        }
        self.route(
            &callee,
            &call_id,
            ServerMessage::IncomingCall {
                call_id: call_id.clone(),
                from,
            },
        );
        if let Some(this) = self.weak.upgrade() {
            let ring = self.config.ring_timeout;
            tokio::spawn(async move {
                tokio::select! {
                    () = this.stop.cancelled() => {}
                    () = tokio::time::sleep(ring) => {
                        let ended = this
                            .end_call(&call_id, Some(CallRejectReason::NoAnswer), true)
                            .await;
                        match ended {
                            Ok(true) => info!(call = %call_id, "call not answered"),
                            Ok(false) => {}
                            Err(e) => warn!(error = %e, call = %call_id, "ring timeout not applied"),
                        }
                    }
                }
            });
        }
        Ok(())
    }

    /// Ends the ringing call `call_id` if it still rings (`Ok(false)` if it does not):
    /// the caller hears `call_rejected/caller_reason` (nothing when it gave up itself),
    /// the callee `call_cancelled` when `cancel_callee`.
    async fn end_call(
        &self,
        call_id: &str,
        caller_reason: Option<CallRejectReason>,
        cancel_callee: bool,
    ) -> Result<bool, Unreachable> {
        let answer = self
            .script(
                self.end_call
                    .key(call_key(call_id))
                    .key(room_key(call_id))
                    .arg(BUSY_PREFIX)
                    .arg(call_id),
            )
            .await?;
        if answer.status != "ended" {
            return Ok(false);
        }
        let (Some(caller), Some(callee)) = (answer.others.first(), answer.others.get(1)) else {
            return Ok(true);
        };
        if let Some(reason) = caller_reason {
            self.route(
                &caller.seat(),
                call_id,
                ServerMessage::CallRejected {
                    call_id: call_id.to_owned(),
                    reason,
                },
            );
        }
        if cancel_callee || caller_reason.is_none() {
            self.route(
                &callee.seat(),
                call_id,
                ServerMessage::CallCancelled {
                    call_id: call_id.to_owned(),
                },
            );
        }
        Ok(true)
    }

    /// Whether `call_id` is ringing `conn`.
    fn rung(&self, conn: ConnId, call_id: &str) -> Result<Rung, (ErrorCode, String)> {
        let local = self.lock();
        match local.conns.get(&conn) {
            Some(m) if m.rung_by.as_deref() == Some(call_id) => Ok(Rung {
                peer_id: m.peer_id.clone(),
                name: m.registered.clone(),
                room: m.room.clone(),
            }),
            _ => Err((
                ErrorCode::UnknownCall,
                "no call with that `call_id` is ringing you".to_owned(),
            )),
        }
    }

    /// `accept`: the callee joins the call's room.
    async fn accept_call(&self, conn: ConnId, call_id: &str) -> Result<(), (ErrorCode, String)> {
        let Rung {
            peer_id,
            name,
            room: current,
        } = self.rung(conn, call_id)?;
        self.hold(conn, Some(call_id));
        let token = self.new_token();
        let answer = self
            .script(
                self.accept
                    .key(call_key(call_id))
                    .key(room_key(call_id))
                    .arg(&peer_id)
                    .arg(&self.instance)
                    .arg(name.as_deref().unwrap_or(""))
                    .arg(BUSY_PREFIX)
                    .arg(call_id)
                    .arg(token_hash(token.as_deref())),
            )
            .await;
        let answer = match answer {
            Ok(answer) if answer.status == "joined" => answer,
            Ok(_) => {
                self.hold(conn, None);
                return Err((
                    ErrorCode::UnknownCall,
                    "no call with that `call_id` is ringing you".to_owned(),
                ));
            }
            Err(e) => {
                self.hold(conn, None);
                return Err(unavailable(&e));
            }
        };
        if let Some(old) = current {
            self.leave_old_room(conn, &peer_id, &old).await;
        }
        info!(call = %call_id, peer = %peer_id, "call accepted");
        let held = {
            let mut local = self.lock();
            let Some(member) = local.conns.get_mut(&conn) else {
                return Ok(());
            };
            member.rung_by = None;
            member.room = Some(call_id.to_owned());
            member.joining = None;
            member.partner = answer.others.first().map(ScriptMember::seat);
            self.hub.send(
                conn,
                ServerMessage::Joined {
                    room: call_id.to_owned(),
                    peer_id: peer_id.clone(),
                    members: answer.others.len() + 1,
                    host: answer.host.as_deref() == Some(peer_id.as_str()),
                    peers: answer.others.iter().map(ScriptMember::info).collect(),
                    resume_token: token,
                },
            );
            member.held.take().unwrap_or_default()
        };
        for other in &answer.others {
            self.route(
                &other.seat(),
                call_id,
                ServerMessage::PeerJoined {
                    peer_id: peer_id.clone(),
                    name: name.clone(),
                },
            );
        }
        for envelope in held {
            self.receive(envelope);
        }
        Ok(())
    }

    /// `reject`: the caller hears `call_rejected/rejected`.
    async fn reject_call(&self, conn: ConnId, call_id: &str) -> Result<(), (ErrorCode, String)> {
        let peer_id = self.rung(conn, call_id)?.peer_id;
        let ended = self
            .end_call(call_id, Some(CallRejectReason::Rejected), false)
            .await
            .map_err(|e| unavailable(&e))?;
        if let Some(member) = self.lock().conns.get_mut(&conn) {
            member.rung_by = None;
        }
        if !ended {
            return Err((
                ErrorCode::UnknownCall,
                "no call with that `call_id` is ringing you".to_owned(),
            ));
        }
        info!(call = %call_id, peer = %peer_id, "call rejected");
        Ok(())
    }

    /// A fresh resume token for a `joined`, or none when resume is off.
    fn new_token(&self) -> Option<String> {
        (!self.config.resume_grace.is_zero()).then(ids::resume_token)
    }

    /// `resume`: `conn` (a new connection, on any instance) takes back the seat `peer_id`
    /// left in `room` when its connection dropped; what was queued meanwhile follows
    /// its `joined`. The partner hears nothing.
    async fn resume(
        &self,
        conn: ConnId,
        room: &str,
        peer_id: &str,
        token: &str,
    ) -> Result<(), (ErrorCode, String)> {
        self.resume_once(conn, room, peer_id, token, false).await
    }

    /// Tells the instance of the seat's old connection to let go of it.
    fn take_over(&self, old: &Seat, room: &str) {
        let envelope = Envelope {
            to: old.peer_id.clone(),
            room: room.to_owned(),
            from: self.instance.clone(),
            msg: ServerMessage::PeerReconnecting {
                peer_id: old.peer_id.clone(),
            },
            taken_over: true,
        };
        if old.instance == self.instance {
            self.receive(envelope);
            return;
        }
        self.publish(&old.instance, &envelope.to, room, &envelope.msg, true);
    }

    /// [`Cluster::resume`]; `retried` after taking over a connection still open.
    async fn resume_once(
        &self,
        conn: ConnId,
        room: &str,
        peer_id: &str,
        token: &str,
        retried: bool,
    ) -> Result<(), (ErrorCode, String)> {
        let fail = |why: &str| Err((ErrorCode::ResumeFailed, why.to_owned()));
        if self.config.resume_grace.is_zero() {
            return fail("this server does not keep seats (resume is off)");
        }
        let own_peer = {
            let local = self.lock();
            match local.conns.get(&conn) {
                Some(m) if m.room.is_none() && m.joining.is_none() => m.peer_id.clone(),
                _ => {
                    return fail(
                        "this connection is in a room already; resume on a new connection",
                    );
                }
            }
        };
        let room = room.trim();
        let fresh = self.new_token();
        let now = unix_millis(OffsetDateTime::now_utc());
        self.hold(conn, Some(room));
        let answer = self
            .script(
                self.resume
                    .key(room_key(room))
                    .arg(peer_id)
                    .arg(hex(&ids::secret_hash(token)))
                    .arg(token_hash(fresh.as_deref()))
                    .arg(&self.instance)
                    .arg(now.to_string())
                    .arg(BUSY_PREFIX)
                    .arg(room),
            )
            .await;
        let answer = match answer {
            Ok(answer) if answer.status == "resumed" => answer,
            Ok(answer) => {
                self.hold(conn, None);
                return match answer.status.as_str() {
                    "no_room" => fail("there is no such room (it may have expired)"),
                    "ended" => fail("the room has ended"),
                    "not_member" => fail("`peer_id` is not in that room (its grace may be over)"),
                    "wrong_token" => {
                        info!(room, peer = peer_id, "resume with a wrong token");
                        fail("wrong `resume_token`")
                    }
                    "not_away" => {
                        // Its old connection has not been noticed dead yet (a path that
                        // died silently). The token proves the client: the old connection
                        // lets go, the seat is away for a moment, and this one takes it.
                        if retried {
                            return fail("that seat's connection is still open");
                        }
                        if let Some(old) = answer.others.first() {
                            info!(
                                room,
                                peer = peer_id,
                                "resume takes over a connection not yet noticed dead"
                            );
                            self.take_over(&old.seat(), room);
                            let marked = self.mark_away(room, peer_id, &old.instance).await;
                            if marked.unwrap_or(false) {
                                return Box::pin(
                                    self.resume_once(conn, room, peer_id, token, true),
                                )
                                .await;
                            }
                        }
                        fail("that seat's connection is still open")
                    }
                    _ => {
                        // The grace is over but the sweep has not run yet: do what it does.
                        self.expire_seat(room, peer_id).await;
                        fail("the grace period is over")
                    }
                };
            }
            Err(e) => {
                self.hold(conn, None);
                return Err(unavailable(&e));
            }
        };
        info!(
            room,
            peer = peer_id,
            replayed = answer.queue.len(),
            "resumed"
        );
        let held = {
            let mut local = self.lock();
            local.by_peer.remove(&own_peer);
            local.by_peer.insert(peer_id.to_owned(), conn);
            let Some(member) = local.conns.get_mut(&conn) else {
                return Ok(());
            };
            member.peer_id = peer_id.to_owned();
            member.room = Some(room.to_owned());
            member.joining = None;
            member.partner = answer.others.first().map(ScriptMember::seat);
            self.hub.send(
                conn,
                ServerMessage::Joined {
                    room: room.to_owned(),
                    peer_id: peer_id.to_owned(),
                    members: answer.others.len() + 1,
                    host: answer.host.as_deref() == Some(peer_id),
                    peers: answer.others.iter().map(ScriptMember::info).collect(),
                    resume_token: fresh,
                },
            );
            member.held.take().unwrap_or_default()
        };
        for queued in &answer.queue {
            match serde_json::from_str::<Envelope>(queued) {
                Ok(envelope) => self.receive(envelope),
                Err(e) => warn!(error = %e, "unreadable queued message"),
            }
        }
        for envelope in held {
            self.receive(envelope);
        }
        Ok(())
    }

    /// The away seat of `peer_id` in `room` is given up (once, whichever instance gets
    /// there first): its partner hears `peer_left/disconnected`.
    async fn expire_seat(&self, room: &str, peer_id: &str) {
        let answer = self
            .script(
                self.expire
                    .key(room_key(room))
                    .arg(peer_id)
                    .arg(BUSY_PREFIX)
                    .arg(room),
            )
            .await;
        match answer {
            Ok(answer) => {
                if answer.left {
                    info!(room, peer = peer_id, "resume grace over");
                }
                self.announce_leave(room, peer_id, LeaveReason::Disconnected, &answer)
                    .await;
            }
            Err(e) => debug!(error = %e, room, peer = peer_id, "grace sweep failed"),
        }
    }

    /// Gives up away seats whose grace ran out and expires meetings, every
    /// `sweep_interval`.
    async fn sweep_loop(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.config.sweep_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = every.tick() => {}
            }
            self.sweep_meetings().await;
            if self.config.resume_grace.is_zero() {
                continue;
            }
            let now = unix_millis(OffsetDateTime::now_utc());
            let due: Result<Vec<String>, _> = self
                .command(
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(AWAY_SET)
                        .arg("-inf")
                        .arg(now.to_string())
                        .arg("LIMIT")
                        .arg(0)
                        .arg(64),
                )
                .await;
            for entry in due.unwrap_or_default() {
                if let Some((room, peer)) = entry.split_once('\n') {
                    self.expire_seat(room, peer).await;
                }
            }
        }
    }

    /// Starts (joining `Some(room)`) or stops holding what arrives for `conn` while it
    /// joins; what was held when it stops without having joined is delivered as usual.
    fn hold(&self, conn: ConnId, joining: Option<&str>) {
        let held = {
            let mut local = self.lock();
            let Some(member) = local.conns.get_mut(&conn) else {
                return;
            };
            member.joining = joining.map(str::to_owned);
            std::mem::replace(&mut member.held, joining.map(|_| Vec::new()))
        };
        for envelope in held.unwrap_or_default() {
            self.receive(envelope);
        }
    }

    /// After joining another room: out of `old` in Redis, telling its other member (or,
    /// when `old` is a call it placed that still rings, cancelling that call).
    async fn leave_old_room(&self, conn: ConnId, peer_id: &str, old: &str) {
        let calling = {
            let mut local = self.lock();
            local
                .conns
                .get_mut(&conn)
                .and_then(|m| m.calling.take_if(|c| c == old))
        };
        if calling.is_some() {
            match self.end_call(old, None, true).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(error = %e, conn, call = old, "could not cancel the previous call"),
            }
        }
        match self
            .script(
                self.leave
                    .key(room_key(old))
                    .arg(peer_id)
                    .arg(BUSY_PREFIX)
                    .arg(old)
                    .arg(&self.instance),
            )
            .await
        {
            Ok(answer) => {
                self.announce_leave(old, peer_id, LeaveReason::Left, &answer)
                    .await;
            }
            Err(e) => {
                warn!(error = %e, conn, room = old, "could not leave the previous room in Redis")
            }
        }
    }

    /// Takes `conn` out of its room: `Ok(false)` if it was in none. A caller whose call
    /// still rings cancels it (the callee hears `call_cancelled`).
    async fn leave_room(&self, conn: ConnId, reason: LeaveReason) -> Result<bool, Unreachable> {
        let (peer_id, room, calling) = {
            let mut local = self.lock();
            let Some(member) = local.conns.get_mut(&conn) else {
                return Ok(false);
            };
            // A join cancelled half-way may have seated it: that seat goes too.
            let Some(room) = member.room.take().or_else(|| member.joining.take()) else {
                return Ok(false);
            };
            member.partner = None;
            let calling = member.calling.take();
            (member.peer_id.clone(), room, calling)
        };
        info!(room = %room, peer = %peer_id, ?reason, "left");
        if calling.as_deref() == Some(room.as_str()) && self.end_call(&room, None, true).await? {
            return Ok(true);
        }
        if reason == LeaveReason::Disconnected
            && calling.is_none()
            && self.mark_away(&room, &peer_id, &self.instance).await?
        {
            return Ok(true);
        }
        let answer = self
            .script(
                self.leave
                    .key(room_key(&room))
                    .arg(&peer_id)
                    .arg(BUSY_PREFIX)
                    .arg(&room)
                    .arg(&self.instance),
            )
            .await?;
        self.announce_leave(&room, &peer_id, reason, &answer).await;
        Ok(true)
    }

    /// Keeps the seat of `peer_id` (whose connection dropped, or whose instance died) for
    /// the resume grace, telling the others `peer_reconnecting`; `false` when resume is
    /// off or the seat cannot be kept (the room ended, or its call still rings).
    /// `at` is the instance whose connection held the seat.
    async fn mark_away(&self, room: &str, peer_id: &str, at: &str) -> Result<bool, Unreachable> {
        if self.config.resume_grace.is_zero() {
            return Ok(false);
        }
        let deadline = unix_millis(OffsetDateTime::now_utc() + self.config.resume_grace);
        let answer = self
            .script(
                self.away
                    .key(room_key(room))
                    .arg(peer_id)
                    .arg(deadline.to_string())
                    .arg(room)
                    .arg(at),
            )
            .await?;
        if answer.status != "away" {
            return Ok(false);
        }
        info!(room, peer = peer_id, grace = ?self.config.resume_grace, "away");
        for other in &answer.others {
            self.send_to(
                &other.seat(),
                room,
                ServerMessage::PeerReconnecting {
                    peer_id: peer_id.to_owned(),
                },
            )
            .await;
        }
        Ok(true)
    }

    async fn announce_leave(
        &self,
        room: &str,
        peer_id: &str,
        reason: LeaveReason,
        answer: &ScriptAnswer,
    ) {
        if !answer.left {
            return;
        }
        for other in &answer.others {
            self.send_to(
                &other.seat(),
                room,
                ServerMessage::PeerLeft {
                    peer_id: peer_id.to_owned(),
                    reason,
                },
            )
            .await;
            if answer.new_host.as_deref() == Some(other.peer.as_str()) {
                self.send_to(
                    &other.seat(),
                    room,
                    ServerMessage::HostChanged {
                        peer_id: other.peer.clone(),
                    },
                )
                .await;
            }
        }
    }

    /// [`Cluster::route`], or for an away member, its queue in Redis (or, if it has
    /// come back meanwhile, where it is now). Returns where the member is now.
    async fn send_to(&self, seat: &Seat, room: &str, msg: ServerMessage) -> Option<Seat> {
        if !seat.away {
            self.route(seat, room, msg);
            return Some(seat.clone());
        }
        let envelope = Envelope {
            to: seat.peer_id.clone(),
            room: room.to_owned(),
            from: self.instance.clone(),
            msg,
            taken_over: false,
        };
        let payload = match serde_json::to_string(&envelope) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot serialize a message for an away member");
                return None;
            }
        };
        let answer = self
            .script(
                self.queue
                    .key(room_key(room))
                    .key(format!("{QUEUE_PREFIX}{}", seat.peer_id))
                    .arg(&seat.peer_id)
                    .arg(payload),
            )
            .await;
        match answer {
            Ok(a) if a.status == "queued" => Some(seat.clone()),
            Ok(a) if a.status == "here" => {
                let here = a.others.first()?.seat();
                self.route(&here, room, envelope.msg);
                Some(here)
            }
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, to = %seat.peer_id, "message for an away member lost");
                None
            }
        }
    }

    async fn end_room(&self, conn: ConnId) -> Result<(), (ErrorCode, String)> {
        let (peer_id, room) = {
            let local = self.lock();
            let member = local.conns.get(&conn);
            match member.and_then(|m| Some((m.peer_id.clone(), m.room.clone()?))) {
                Some(found) => found,
                None => return Err((ErrorCode::NotInCall, "you are not in a room".to_owned())),
            }
        };
        let answer = self
            .script(
                self.end
                    .key(room_key(&room))
                    .key(meeting_key(&room))
                    .arg(&peer_id)
                    .arg(millis(self.config.room_ttl))
                    .arg(unix_millis(OffsetDateTime::now_utc()))
                    .arg(BUSY_PREFIX)
                    .arg(&room)
                    .arg(millis(self.config.ended_retention)),
            )
            .await
            .map_err(|e| unavailable(&e))?;
        if answer.status != "ended" {
            return Err((
                ErrorCode::NotHost,
                "only the host can end the room".to_owned(),
            ));
        }
        info!(room = %room, peer = %peer_id, "room ended by host");
        for member in &answer.others {
            self.route(
                &member.seat(),
                &room,
                ServerMessage::RoomEnded {
                    room: room.clone(),
                    reason: RoomEndReason::HostEnded,
                },
            );
        }
        Ok(())
    }

    /// Forwards an offer, answer or candidate to the other member of the sender's room
    /// (queued in Redis while that member is away).
    async fn relay(
        &self,
        conn: ConnId,
        make: impl FnOnce(String) -> ServerMessage,
    ) -> Result<(), (ErrorCode, String)> {
        let target = {
            let local = self.lock();
            local
                .conns
                .get(&conn)
                .and_then(|m| Some((m.peer_id.clone(), m.room.clone()?, m.partner.clone()?)))
        };
        let Some((peer_id, room, partner)) = target else {
            return Err((
                ErrorCode::NotInCall,
                "there is nobody to send this to: you are not in a room with another member"
                    .to_owned(),
            ));
        };
        debug!(peer = %peer_id, room = %room, "relay");
        if !partner.away {
            self.route(&partner, &room, make(peer_id));
            return Ok(());
        }
        let now = self.send_to(&partner, &room, make(peer_id)).await;
        if let Some(now) = now.filter(|n| !n.away) {
            // It came back (on `now.instance`): straight there from here on.
            let mut local = self.lock();
            if let Some(m) = local.conns.get_mut(&conn)
                && m.partner.as_ref().is_some_and(|p| p.peer_id == now.peer_id)
            {
                m.partner = Some(now);
            }
        }
        Ok(())
    }

    /// Sends `msg` to the member at `seat` in `room`: directly when it is connected
    /// here, else through its instance's channel.
    fn route(&self, seat: &Seat, room: &str, msg: ServerMessage) {
        if seat.instance == self.instance {
            self.receive(Envelope {
                to: seat.peer_id.clone(),
                room: room.to_owned(),
                from: self.instance.clone(),
                msg,
                taken_over: false,
            });
            return;
        }
        self.publish(&seat.instance, &seat.peer_id, room, &msg, false);
    }

    /// Sends `msg` for `to` in `room` to `instance` through its channel: a [`wire`]
    /// record with the message's JSON as its recipient's client will receive it.
    fn publish(&self, instance: &str, to: &str, room: &str, msg: &ServerMessage, taken_over: bool) {
        let mut flags = 0;
        if taken_over {
            flags |= wire::TAKEN_OVER;
        }
        if is_notice(msg) {
            flags |= wire::NOTICE;
        }
        let json = msg.to_json();
        let Some(record) = wire::encode(to, room, &self.instance, flags, &json) else {
            warn!(
                to,
                "message for another instance not sent: room name too long"
            );
            return;
        };
        let channel = format!("{CHANNEL_PREFIX}{instance}");
        if self.publish.try_send((channel, record)).is_err() {
            warn!(
                to,
                "publish queue full (Redis unreachable?); message dropped"
            );
        }
    }

    /// Delivers an envelope to one of this instance's connections, keeping its room and
    /// partner current from the notices it carries (the messages [`is_notice`] names:
    /// keep the two in step).
    fn receive(&self, envelope: Envelope) {
        let mut local = self.lock();
        let Some(&conn) = local.by_peer.get(&envelope.to) else {
            debug!(to = %envelope.to, "message for a connection no longer here");
            return;
        };
        let Some(member) = local.conns.get_mut(&conn) else {
            return;
        };
        if envelope.taken_over {
            if member.room.as_deref() == Some(envelope.room.as_str()) {
                info!(peer = %envelope.to, room = %envelope.room, "seat resumed elsewhere");
                member.room = None;
                member.partner = None;
                local.by_peer.remove(&envelope.to);
            }
            return;
        }
        if let Some(held) = &mut member.held {
            held.push(envelope);
            return;
        }
        let deliver = match &envelope.msg {
            // The callee of a call is in no room: these are about its ringing.
            ServerMessage::IncomingCall { call_id, .. } => {
                member.rung_by = Some(call_id.clone());
                true
            }
            ServerMessage::CallCancelled { call_id } => {
                let rung = member.rung_by.as_ref() == Some(call_id);
                if rung {
                    member.rung_by = None;
                }
                rung
            }
            _ => member.room.as_deref() == Some(envelope.room.as_str()),
        };
        if !deliver {
            debug!(to = %envelope.to, room = %envelope.room, "recipient not in that room; dropped");
            return;
        }
        match &envelope.msg {
            ServerMessage::CallRejected { .. } => {
                member.room = None;
                member.partner = None;
                member.calling = None;
            }
            ServerMessage::PeerJoined { peer_id, .. } => {
                // In a call's room, the callee has answered.
                member.calling = None;
                member.partner = Some(Seat {
                    peer_id: peer_id.clone(),
                    instance: envelope.from.clone(),
                    away: false,
                });
            }
            ServerMessage::PeerReconnecting { peer_id } => {
                if let Some(p) = member.partner.as_mut().filter(|p| &p.peer_id == peer_id) {
                    p.away = true;
                }
            }
            ServerMessage::PeerLeft { peer_id, .. }
                if member
                    .partner
                    .as_ref()
                    .is_some_and(|p| &p.peer_id == peer_id) =>
            {
                member.partner = None;
            }
            ServerMessage::RoomEnded { .. } => {
                member.room = None;
                member.partner = None;
            }
            _ => {}
        }
        // Under the cluster lock, so that the cache and the queue change together.
        self.hub.send(conn, envelope.msg);
    }

    /// A payload from this instance's channel.
    fn on_payload(&self, payload: &[u8]) {
        if wire::is_json_envelope(payload) {
            match serde_json::from_slice::<Envelope>(payload) {
                Ok(envelope) => self.receive(envelope),
                Err(e) => warn!(error = %e, "unreadable message on this instance's channel"),
            }
            return;
        }
        let records = match wire::decode(payload) {
            Ok(records) => records,
            Err(e) => {
                warn!(error = %e, "unreadable payload on this instance's channel");
                return;
            }
        };
        for record in records {
            match record {
                Ok(frame) => self.on_frame(&frame),
                Err(e) => warn!(error = %e, "unreadable message on this instance's channel"),
            }
        }
    }

    /// One message from this instance's channel.
    fn on_frame(&self, frame: &wire::Frame<'_>) {
        if frame.flags & (wire::NOTICE | wire::TAKEN_OVER) != 0 {
            match serde_json::from_slice::<ServerMessage>(frame.json) {
                Ok(msg) => self.receive(Envelope {
                    to: frame.to.to_owned(),
                    room: frame.room.to_owned(),
                    from: frame.from.to_owned(),
                    msg,
                    taken_over: frame.flags & wire::TAKEN_OVER != 0,
                }),
                Err(e) => warn!(error = %e, "unreadable message on this instance's channel"),
            }
            return;
        }
        match std::str::from_utf8(frame.json) {
            Ok(json) => self.receive_json(frame.to, frame.room, frame.from, json),
            Err(_) => warn!("message on this instance's channel is not UTF-8"),
        }
    }

    /// [`Cluster::receive`] of a message that is no notice (see [`is_notice`]), as the
    /// JSON text its recipient gets: queued as it is, if the recipient is still in
    /// `room`.
    fn receive_json(&self, to: &str, room: &str, from: &str, json: &str) {
        let mut local = self.lock();
        let Some(&conn) = local.by_peer.get(to) else {
            debug!(to, "message for a connection no longer here");
            return;
        };
        let Some(member) = local.conns.get_mut(&conn) else {
            return;
        };
        if let Some(held) = &mut member.held {
            match serde_json::from_str::<ServerMessage>(json) {
                Ok(msg) => held.push(Envelope {
                    to: to.to_owned(),
                    room: room.to_owned(),
                    from: from.to_owned(),
                    msg,
                    taken_over: false,
                }),
                Err(e) => warn!(error = %e, "unreadable message on this instance's channel"),
            }
            return;
        }
        if member.room.as_deref() != Some(room) {
            debug!(to, room, "recipient not in that room; dropped");
            return;
        }
        // Under the cluster lock, as in `receive`.
        self.hub.send_json(conn, json.to_owned());
    }

    async fn script(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
    ) -> Result<ScriptAnswer, Unreachable> {
        let mut redis = self.redis.clone();
        let text: String = tokio::time::timeout(OP_TIMEOUT, invocation.invoke_async(&mut redis))
            .await
            .map_err(|_| Unreachable::Timeout)??;
        Ok(serde_json::from_str(&text)?)
    }

    /// One command, bounded by [`OP_TIMEOUT`].
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Unreachable> {
        let mut redis = self.redis.clone();
        tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<T>(&mut redis))
            .await
            .map_err(|_| Unreachable::Timeout)?
            .map_err(Unreachable::from)
    }

    async fn heartbeat(&self) -> Result<(), Unreachable> {
        let key = format!("{INSTANCE_PREFIX}{}", self.instance);
        self.command(
            redis::cmd("SET")
                .arg(key)
                .arg("1")
                .arg("PX")
                .arg(millis(INSTANCE_TTL)),
        )
        .await
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut every = tokio::time::interval(HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut beats = 0u32;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = every.tick() => {}
            }
            beats = beats.wrapping_add(1);
            let mut result = self.heartbeat().await;
            if result.is_ok() {
                result = self.drop_dead_partners().await;
            }
            if result.is_ok() && beats.is_multiple_of(STATE_REFRESH_BEATS) {
                result = self.refresh_state().await;
            }
            match result {
                Ok(()) if failing => {
                    info!("Redis reachable again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    warn!(error = %e, "Redis unreachable; refusing joins until it is back");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Partners of this instance's members on instances that died (no heartbeat for
    /// [`INSTANCE_TTL`]) leave their rooms: the member hears `peer_left/disconnected`.
    async fn drop_dead_partners(&self) -> Result<(), Unreachable> {
        let partners: Vec<(String, Seat)> = {
            let local = self.lock();
            local
                .conns
                .values()
                .filter_map(|m| Some((m.room.clone()?, m.partner.clone()?)))
                .filter(|(_, p)| p.instance != self.instance && !p.away)
                .collect()
        };
        let mut instances: Vec<&str> = partners.iter().map(|(_, p)| p.instance.as_str()).collect();
        instances.sort_unstable();
        instances.dedup();
        if instances.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for instance in &instances {
            pipe.cmd("EXISTS")
                .arg(format!("{INSTANCE_PREFIX}{instance}"));
        }
        let mut redis = self.redis.clone();
        let alive: Vec<bool> = tokio::time::timeout(OP_TIMEOUT, pipe.query_async(&mut redis))
            .await
            .map_err(|_| Unreachable::Timeout)??;
        let dead: Vec<&str> = instances
            .iter()
            .zip(alive)
            .filter(|(_, alive)| !alive)
            .map(|(instance, _)| *instance)
            .collect();
        for (room, partner) in partners
            .iter()
            .filter(|(_, p)| dead.contains(&p.instance.as_str()))
        {
            info!(room = %room, peer = %partner.peer_id, instance = %partner.instance,
                  "member of a dead instance");
            if self
                .mark_away(room, &partner.peer_id, &partner.instance)
                .await?
            {
                continue;
            }
            let answer = self
                .script(
                    self.leave
                        .key(room_key(room))
                        .arg(&partner.peer_id)
                        .arg(BUSY_PREFIX)
                        .arg(room),
                )
                .await?;
            self.announce_leave(room, &partner.peer_id, LeaveReason::Disconnected, &answer)
                .await;
        }
        Ok(())
    }

    /// Renews the ttl of what this instance's connections hold in Redis.
    async fn refresh_state(&self) -> Result<(), Unreachable> {
        let mut pipe = redis::pipe();
        let ttl = millis(STATE_TTL);
        let lapse = (unix_millis(OffsetDateTime::now_utc()) + i128::from(ttl)).to_string();
        {
            let local = self.lock();
            for m in local.conns.values() {
                // GT: an ended room keeps its own, longer ttl.
                if let Some(room) = &m.room {
                    pipe.cmd("PEXPIRE")
                        .arg(room_key(room))
                        .arg(ttl)
                        .arg("GT")
                        .ignore();
                    // Counted for --max-rooms while it lives (XX: not one that is gone).
                    pipe.cmd("ZADD")
                        .arg(ROOMS_SET)
                        .arg("XX")
                        .arg("GT")
                        .arg(&lapse)
                        .arg(room)
                        .ignore();
                }
                if m.room.is_some() || m.rung_by.is_some() {
                    let busy = format!("{BUSY_PREFIX}{}", m.peer_id);
                    pipe.cmd("PEXPIRE").arg(busy).arg(ttl).arg("GT").ignore();
                }
                if let Some(name) = &m.registered {
                    pipe.cmd("PEXPIRE")
                        .arg(name_key(name))
                        .arg(ttl)
                        .arg("GT")
                        .ignore();
                }
            }
        }
        let mut redis = self.redis.clone();
        tokio::time::timeout(OP_TIMEOUT, pipe.query_async::<()>(&mut redis))
            .await
            .map_err(|_| Unreachable::Timeout)??;
        Ok(())
    }

    /// Receives this instance's channel, subscribing again whenever the connection
    /// breaks (Redis restarted or unreachable).
    async fn subscribe_loop(self: Arc<Self>) {
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(&self.channel).await {
                    Ok(()) => {
                        debug!(channel = %self.channel, "subscribed");
                        self.subscribed.store(true, Ordering::Relaxed);
                        let mut messages = pubsub.on_message();
                        loop {
                            tokio::select! {
                                () = self.stop.cancelled() => return,
                                next = messages.next() => match next {
                                    Some(msg) => self.on_payload(msg.get_payload_bytes()),
                                    None => break,
                                },
                            }
                        }
                        warn!("subscription to this instance's Redis channel lost");
                    }
                    Err(e) => debug!(error = %e, "cannot subscribe"),
                },
                Err(e) => debug!(error = %e, "cannot connect to Redis for the subscription"),
            }
            self.subscribed.store(false, Ordering::Relaxed);
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            }
        }
    }
}

/// Publishes queued messages in order: what has queued up is sent as one payload per
/// instance (one `PUBLISH` each, in one pipeline), while the previous pipeline's answer
/// is awaited more queues up. After `stop`, publishes what is still queued and ends.
async fn publish_loop(
    mut redis: ConnectionManager,
    mut queue: mpsc::Receiver<(String, Vec<u8>)>,
    stop: CancellationToken,
) {
    let mut batch = Vec::new();
    let mut payloads: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let stopping = tokio::select! {
            n = queue.recv_many(&mut batch, PUBLISH_BATCH) => n == 0,
            () = stop.cancelled() => true,
        };
        if stopping {
            while let Ok(item) = queue.try_recv() {
                batch.push(item);
            }
        }
        for (channel, payload) in batch.drain(..) {
            match payloads.iter_mut().find(|(c, _)| *c == channel) {
                Some((_, all)) => wire::append(all, &payload),
                None => payloads.push((channel, payload)),
            }
        }
        if !payloads.is_empty() {
            let mut pipe = redis::pipe();
            for (channel, payload) in payloads.drain(..) {
                pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
            }
            match tokio::time::timeout(OP_TIMEOUT, pipe.query_async::<()>(&mut redis)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "messages for other instances lost"),
                Err(_) => warn!("messages for other instances lost: Redis did not answer"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// Whether the instance that receives `msg` for one of its connections must read it
/// ([`Cluster::receive`] looks into these); any other message is delivered as it is.
fn is_notice(msg: &ServerMessage) -> bool {
    matches!(
        msg,
        ServerMessage::IncomingCall { .. }
            | ServerMessage::CallCancelled { .. }
            | ServerMessage::CallRejected { .. }
            | ServerMessage::PeerJoined { .. }
            | ServerMessage::PeerReconnecting { .. }
            | ServerMessage::PeerLeft { .. }
            | ServerMessage::RoomEnded { .. }
    )
}

/// A script with its placeholders filled in.
fn script(source: &str) -> Script {
    Script::new(
        &source
            .replace("NOW_MS", NOW_MS)
            .replace("SAME_HASH", SAME_HASH)
            .replace("STATE_TTL_MS", &millis(STATE_TTL).to_string())
            .replace("AWAY_QUEUE_MESSAGES", &AWAY_QUEUE_MESSAGES.to_string())
            .replace("AWAY_QUEUE_BYTES", &AWAY_QUEUE_BYTES.to_string()),
    )
}

/// `same_hash(a, b)`: whether two hex digests (of a host or resume token) are equal,
/// compared in constant time like [`ids::secret_matches`]: every character is looked at
/// whatever the first difference, so the time a wrong guess takes tells nothing about
/// how much of it was right. `false` when either is not a string (a missing field).
const SAME_HASH: &str = "local function same_hash(a, b)
  if type(a) ~= 'string' or type(b) ~= 'string' or #a ~= #b then
    return false
  end
  local diff = 0
  for i = 1, #a do
    diff = bit.bor(diff, bit.bxor(string.byte(a, i), string.byte(b, i)))
  end
  return diff == 0
end";

/// `now_ms`: Redis's own clock (Unix ms), so that every instance's scripts agree on it.
const NOW_MS: &str = "local now_t = redis.call('TIME')
local now_ms = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)";

fn name_key(name: &str) -> String {
    format!("{NAME_PREFIX}{name}")
}

fn call_key(call_id: &str) -> String {
    format!("{CALL_PREFIX}{call_id}")
}

fn room_key(room: &str) -> String {
    format!("{ROOM_PREFIX}{room}")
}

fn meeting_key(room: &str) -> String {
    format!("{}{room}", meetings::MEETING_PREFIX)
}

/// Unix ms as a time; `None` out of range.
fn from_unix_millis(ms: i128) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Hex of the SHA-256 of a resume token, as the scripts keep it ("" for none).
fn token_hash(token: Option<&str>) -> String {
    token.map_or_else(String::new, |t| hex(&ids::secret_hash(t)))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn unix_millis(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos() / 1_000_000
}

fn unavailable(e: &Unreachable) -> (ErrorCode, String) {
    warn!(error = %e, "Redis operation failed");
    (
        ErrorCode::Unavailable,
        "the service's shared state (Redis) is unreachable; try again shortly".to_owned(),
    )
}
