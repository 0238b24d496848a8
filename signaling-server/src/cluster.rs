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
//! trait: [`crate::rooms::Rooms`] is a synchronous state machine applied under one
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
//! - `duet:name:{name}`: `"{peer_id}\n{instance}"` of the connection that registered it;
//!   claimed by a Lua script (taken unless its holder's instance is dead), freed when
//!   that connection ends.
//! - `duet:instance:{id}`: exists while instance `id` is alive (a heartbeat refreshes its
//!   ttl). A join finding a member whose instance key is gone removes that member (its
//!   partner hears `peer_left/disconnected`), so a killed instance does not hold seats.
//! - Channel `duet:to:{id}`: what instance `id` must deliver to its connections, as JSON
//!   envelopes (recipient peer id, room, sender instance, the [`ServerMessage`]). Each
//!   instance publishes through one ordered queue and one Redis connection, and Redis
//!   delivers one publisher's messages to a channel in order, so a member's messages
//!   reach its partner in the order sent. A message is delivered only if its recipient
//!   is still in the message's room.
//!
//! # What is not clustered yet
//! Names are registered cluster-wide (`duet:name:{name}` = `"{peer_id}\n{instance}"`,
//! freed when the connection ends or its instance dies), but direct calls (`call`,
//! `accept`, `reject`) are refused with `unavailable`;
//! `resume` is refused with `resume_failed` (no seat survives a dropped connection);
//! meetings of the HTTP API (`POST /api/rooms` answers 503 `unavailable`) and the
//! room caps (`--max-rooms`, `--rooms-per-minute*`) are not applied. `GET
//! /api/rooms/{id}` reads Redis, so every instance answers the same.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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

use crate::api::{RoomInfo, RoomState};
use crate::clock::format_rfc3339;
use crate::hub::Hub;
use crate::ids;
use crate::protocol::{
    ClientMessage, ErrorCode, LeaveReason, PeerInfo, RoomEndReason, ServerMessage, validate_name,
};
use crate::rooms::ConnId;

/// Longest wait for one Redis operation before the client hears `unavailable`.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an instance refreshes its liveness key.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Ttl of the liveness key: an instance silent this long counts as dead.
const INSTANCE_TTL: Duration = Duration::from_secs(6);
/// Wait before subscribing again after the subscription broke.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);
/// Most messages waiting to be published; beyond that they are dropped (Redis is gone).
const PUBLISH_QUEUE: usize = 65_536;

const ROOM_PREFIX: &str = "duet:room:";
const INSTANCE_PREFIX: &str = "duet:instance:";
const NAME_PREFIX: &str = "duet:name:";
const CHANNEL_PREFIX: &str = "duet:to:";

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
local key = KEYS[1]
local me, inst, name, prefix, inst_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
redis.call('SET', prefix .. inst, '1', 'PX', inst_ttl)
if redis.call('HEXISTS', key, 'ended') == 1 then
  return cjson.encode({status = 'ended'})
end
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
                    name = string.sub(v, sep + 1)}
    if member.peer ~= me then
      if redis.call('EXISTS', prefix .. member.instance) == 0 then
        redis.call('HDEL', key, f)
        table.insert(gone, member)
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
    if #others > 0 then
      host = others[1].peer
      new_host = host
    end
  end
end
if #others >= 2 then
  if new_host then redis.call('HSET', key, 'host', new_host) end
  return cjson.encode({status = 'full', members = #others, gone = (#gone > 0) and gone or nil,
                       others = others, new_host = new_host})
end
if not host then host = me end
redis.call('HSET', key, 'm:' .. me, inst .. '\n' .. name, 'host', host)
return cjson.encode({status = 'joined', host = host, others = (#others > 0) and others or nil,
                     gone = (#gone > 0) and gone or nil, new_host = new_host})
";

/// Takes `me` out of a room; the host role passes to the remaining member. An ad-hoc
/// room left empty is deleted (an ended one keeps its key until it expires).
const LEAVE: &str = r"
local key = KEYS[1]
local me = ARGV[1]
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
                        name = string.sub(v, sep + 1)})
  end
end
local new_host = nil
if host == me then
  if #rest > 0 then
    new_host = rest[1].peer
    redis.call('HSET', key, 'host', new_host)
  else
    redis.call('HDEL', key, 'host')
  end
end
if #rest == 0 and redis.call('HEXISTS', key, 'ended') == 0 then
  redis.call('DEL', key)
end
return cjson.encode({left = true, others = (#rest > 0) and rest or nil, new_host = new_host})
";

/// Ends a room if `me` is its host: every member out, `ended` (the time, Unix ms) kept
/// for `ttl_ms`.
const END: &str = r"
local key = KEYS[1]
local me, ttl, now_ms = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', key, 'host') ~= me then
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
  end
end
redis.call('DEL', key)
redis.call('HSET', key, 'ended', now_ms)
redis.call('PEXPIRE', key, ttl)
return cjson.encode({status = 'ended', others = (#members > 0) and members or nil})
";

/// Claims a name for `me` (`"{peer_id}\n{instance}"`) unless a live connection holds
/// it (a holder whose instance is dead loses it); frees `me`'s previous name (KEYS[2]).
const REGISTER: &str = r"
local me, prefix = ARGV[1], ARGV[2]
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= me then
  local sep = string.find(holder, '\n', 1, true) or (#holder + 1)
  if redis.call('EXISTS', prefix .. string.sub(holder, sep + 1)) == 1 then
    return cjson.encode({status = 'taken'})
  end
end
redis.call('SET', KEYS[1], me)
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

/// A member as the scripts return it.
#[derive(Debug, Clone, Deserialize)]
struct ScriptMember {
    peer: String,
    instance: String,
    name: String,
}

impl ScriptMember {
    fn seat(&self) -> Seat {
        Seat {
            peer_id: self.peer.clone(),
            instance: self.instance.clone(),
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
}

/// Where a member's WebSocket is: its peer id on instance `instance`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seat {
    peer_id: String,
    instance: String,
}

/// What one instance tells another (or itself): deliver `msg` to `to` if it is still in
/// `room`. `from` is the sending instance (where the member named in a `peer_joined` is).
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    to: String,
    room: String,
    from: String,
    msg: ServerMessage,
}

/// One of this instance's connections.
#[derive(Debug)]
struct Member {
    peer_id: String,
    room: Option<String>,
    partner: Option<Seat>,
    /// The room a join under way may have put it in (left again if the connection ends
    /// before the answer came back).
    joining: Option<String>,
    /// The name it registered (held in Redis, cluster-wide).
    registered: Option<String>,
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
    /// `redis://HOST:PORT/DB`.
    pub url: String,
    /// How long an ended room keeps refusing joins.
    pub room_ttl: Duration,
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
    publish: mpsc::Sender<(String, String)>,
    subscribed: AtomicBool,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    join: Script,
    leave: Script,
    end: Script,
    register: Script,
    release: Script,
}

impl Cluster {
    /// Connects (lazily: Redis may come up later; `/healthz` says until it does) and
    /// starts the subscriber, publisher and heartbeat tasks.
    pub async fn start(config: ClusterConfig, hub: Arc<Hub>) -> Result<Arc<Cluster>, ClusterError> {
        let client = Client::open(config.url.as_str()).map_err(ClusterError::BadUrl)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(OP_TIMEOUT));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(ClusterError::Connection)?;
        let instance = ids::peer_id();
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        let cluster = Arc::new(Cluster {
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
            join: Script::new(JOIN),
            leave: Script::new(LEAVE),
            end: Script::new(END),
            register: Script::new(REGISTER),
            release: Script::new(RELEASE),
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
    pub fn connect(&self, conn: ConnId, peer_id: &str) {
        let mut local = self.lock();
        local.by_peer.insert(peer_id.to_owned(), conn);
        local.conns.insert(
            conn,
            Member {
                peer_id: peer_id.to_owned(),
                room: None,
                partner: None,
                joining: None,
                registered: None,
                held: None,
            },
        );
    }

    /// `conn` is gone: it leaves its room (`peer_left/disconnected`). Idempotent.
    pub async fn disconnect(&self, conn: ConnId) {
        if let Err(e) = self.leave_room(conn, LeaveReason::Disconnected).await {
            warn!(error = %e, conn, "could not take a dropped member out of its room in Redis");
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
            ClientMessage::Join { room, name, .. } => self.join(conn, &room, name.as_deref()).await,
            ClientMessage::Offer { sdp } => {
                self.relay(conn, |from| ServerMessage::Offer { from, sdp })
            }
            ClientMessage::Answer { sdp } => {
                self.relay(conn, |from| ServerMessage::Answer { from, sdp })
            }
            ClientMessage::Candidate { candidate } => {
                self.relay(conn, |from| ServerMessage::Candidate { from, candidate })
            }
            ClientMessage::Leave => match self.leave_room(conn, LeaveReason::Left).await {
                Ok(true) => Ok(()),
                Ok(false) => Err((ErrorCode::NotInCall, "you are not in a room".to_owned())),
                Err(e) => Err(unavailable(&e)),
            },
            ClientMessage::EndRoom => self.end_room(conn).await,
            ClientMessage::Register { name } => self.register(conn, &name).await,
            ClientMessage::Call { .. }
            | ClientMessage::Accept { .. }
            | ClientMessage::Reject { .. } => Err((
                ErrorCode::Unavailable,
                "direct calls are not available on a clustered server yet".to_owned(),
            )),
            ClientMessage::Resume { .. } => Err((
                ErrorCode::ResumeFailed,
                "this server does not keep seats (resume is not available in cluster mode yet)"
                    .to_owned(),
            )),
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
    ) -> Result<(), (ErrorCode, String)> {
        let room = validate_name("room", room).map_err(|e| (e.code, e.message))?;
        let display = match name.map(str::trim) {
            None | Some("") => None,
            Some(n) => Some(validate_name("name", n).map_err(|e| (e.code, e.message))?),
        };
        let (peer_id, current) = {
            let local = self.lock();
            let member = local
                .conns
                .get(&conn)
                .ok_or((ErrorCode::Internal, "unknown connection".to_owned()))?;
            (member.peer_id.clone(), member.room.clone())
        };
        if current.as_deref() == Some(room) {
            // Joining the room it is in: leave and join again, as on one instance.
            self.leave_room(conn, LeaveReason::Left)
                .await
                .map_err(|e| unavailable(&e))?;
        }
        self.hold(conn, Some(room));
        let answer = self
            .script(
                self.join
                    .key(room_key(room))
                    .arg(&peer_id)
                    .arg(&self.instance)
                    .arg(display.unwrap_or(""))
                    .arg(INSTANCE_PREFIX)
                    .arg(millis(INSTANCE_TTL)),
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
                            resume_token: None,
                        },
                    );
                    member.held.take().unwrap_or_default()
                };
                for other in &answer.others {
                    self.route(
                        &other.seat(),
                        room,
                        ServerMessage::PeerJoined {
                            peer_id: peer_id.clone(),
                            name: display.map(str::to_owned),
                        },
                    );
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

    /// Starts (joining `Some(room)`) or stops holding what arrives for `conn` while it
    /// joins.
    fn hold(&self, conn: ConnId, joining: Option<&str>) {
        let mut local = self.lock();
        if let Some(member) = local.conns.get_mut(&conn) {
            member.held = joining.map(|_| Vec::new());
            member.joining = joining.map(str::to_owned);
        }
    }

    /// After joining another room: out of `old` in Redis, telling its other member.
    async fn leave_old_room(&self, conn: ConnId, peer_id: &str, old: &str) {
        match self
            .script(self.leave.key(room_key(old)).arg(peer_id))
            .await
        {
            Ok(answer) => self.announce_leave(old, peer_id, LeaveReason::Left, &answer),
            Err(e) => {
                warn!(error = %e, conn, room = old, "could not leave the previous room in Redis")
            }
        }
    }

    /// Takes `conn` out of its room: `Ok(false)` if it was in none.
    async fn leave_room(&self, conn: ConnId, reason: LeaveReason) -> Result<bool, Unreachable> {
        let (peer_id, room) = {
            let mut local = self.lock();
            let Some(member) = local.conns.get_mut(&conn) else {
                return Ok(false);
            };
            // A join cancelled half-way may have seated it: that seat goes too.
            let Some(room) = member.room.take().or_else(|| member.joining.take()) else {
                return Ok(false);
            };
            member.partner = None;
            (member.peer_id.clone(), room)
        };
        info!(room = %room, peer = %peer_id, ?reason, "left");
        let answer = self
            .script(self.leave.key(room_key(&room)).arg(&peer_id))
            .await?;
        self.announce_leave(&room, &peer_id, reason, &answer);
        Ok(true)
    }

    fn announce_leave(
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
            self.route(
                &other.seat(),
                room,
                ServerMessage::PeerLeft {
                    peer_id: peer_id.to_owned(),
                    reason,
                },
            );
            if answer.new_host.as_deref() == Some(other.peer.as_str()) {
                self.route(
                    &other.seat(),
                    room,
                    ServerMessage::HostChanged {
                        peer_id: other.peer.clone(),
                    },
                );
            }
        }
    }

    /// A room as `GET /api/rooms/{room}` shows it (the same from every instance);
    /// `None` when it does not exist (an empty room is forgotten at once).
    pub async fn room_info(&self, room: &str) -> Result<Option<RoomInfo>, Unreachable> {
        let fields: Vec<(String, String)> = self
            .command(redis::cmd("HGETALL").arg(room_key(room)))
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let members = fields.iter().filter(|(f, _)| f.starts_with("m:")).count();
        let ended = fields.iter().find(|(f, _)| f == "ended").map(|(_, at)| {
            let ms = at.parse::<i128>().unwrap_or(0);
            OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        });
        let state = match (ended, members) {
            (Some(_), _) => RoomState::Ended,
            (None, 0) => RoomState::Open,
            (None, _) => RoomState::Active,
        };
        Ok(Some(RoomInfo {
            room_id: room.to_owned(),
            title: None,
            starts_at: None,
            expires_at: ended.map(format_rfc3339),
            members,
            state,
            ttl_s: i64::try_from(self.config.room_ttl.as_secs()).unwrap_or(i64::MAX),
        }))
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
                    .arg(&peer_id)
                    .arg(millis(self.config.room_ttl))
                    .arg(unix_millis(OffsetDateTime::now_utc())),
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

    /// Forwards an offer, answer or candidate to the other member of the sender's room.
    fn relay(
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
        self.route(&partner, &room, make(peer_id));
        Ok(())
    }

    /// Sends `msg` to the member at `seat` in `room`: directly when it is connected
    /// here, else through its instance's channel.
    fn route(&self, seat: &Seat, room: &str, msg: ServerMessage) {
        let envelope = Envelope {
            to: seat.peer_id.clone(),
            room: room.to_owned(),
            from: self.instance.clone(),
            msg,
        };
        if seat.instance == self.instance {
            self.receive(envelope);
            return;
        }
        let payload = match serde_json::to_string(&envelope) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot serialize a message for another instance");
                return;
            }
        };
        let channel = format!("{CHANNEL_PREFIX}{}", seat.instance);
        if self.publish.try_send((channel, payload)).is_err() {
            warn!(to = %seat.peer_id, "publish queue full (Redis unreachable?); message dropped");
        }
    }

    /// Delivers an envelope to one of this instance's connections, keeping its room and
    /// partner current from the notices it carries.
    fn receive(&self, envelope: Envelope) {
        let mut local = self.lock();
        let Some(&conn) = local.by_peer.get(&envelope.to) else {
            debug!(to = %envelope.to, "message for a connection no longer here");
            return;
        };
        let Some(member) = local.conns.get_mut(&conn) else {
            return;
        };
        if let Some(held) = &mut member.held {
            held.push(envelope);
            return;
        }
        if member.room.as_deref() != Some(envelope.room.as_str()) {
            debug!(to = %envelope.to, room = %envelope.room, "recipient not in that room; dropped");
            return;
        }
        match &envelope.msg {
            ServerMessage::PeerJoined { peer_id, .. } => {
                member.partner = Some(Seat {
                    peer_id: peer_id.clone(),
                    instance: envelope.from.clone(),
                });
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
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(envelope) => self.receive(envelope),
            Err(e) => warn!(error = %e, "unreadable message on this instance's channel"),
        }
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
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = every.tick() => match self.heartbeat().await {
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
                },
            }
        }
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

/// Publishes queued messages in order, in pipelines of what has queued up; after
/// `stop`, publishes what is still queued and ends.
async fn publish_loop(
    mut redis: ConnectionManager,
    mut queue: mpsc::Receiver<(String, String)>,
    stop: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let stopping = tokio::select! {
            n = queue.recv_many(&mut batch, 256) => n == 0,
            () = stop.cancelled() => true,
        };
        if stopping {
            while let Ok(item) = queue.try_recv() {
                batch.push(item);
            }
        }
        if !batch.is_empty() {
            let mut pipe = redis::pipe();
            for (channel, payload) in batch.drain(..) {
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

fn name_key(name: &str) -> String {
    format!("{NAME_PREFIX}{name}")
}

fn room_key(room: &str) -> String {
    format!("{ROOM_PREFIX}{room}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
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
