//! The call as a plain state machine: events in, actions out, no I/O.
//!
//! `idle -> joining -> waiting for peer -> connecting -> in call -> ended(reason)`;
//! `in call <-> reconnecting` while the media path is lost (ICE restarts), and
//! `connecting -> connecting` on a fresh peer connection when one fails before it ever
//! carried media (a failed or stalled DTLS handshake).
//! The machine decides *what* happens (send `join`, start the peer connection as the
//! offerer, forward a candidate, hang up); the session ([`super::session`]) does it with
//! sockets and the peer connection. Because it knows nothing of either, every path, including the
//! odd ones (peer leaves while connecting, server error while joining), is unit-tested
//! here in microseconds.

use std::time::{Duration, Instant};

use signaling_server::protocol::{
    CallRejectReason, ClientMessage, ErrorCode, IceCandidate, IceServer, LeaveReason, ServerMessage,
};

/// A connection that has been `disconnected` this long gets an ICE restart.
pub const ICE_RESTART_AFTER: Duration = Duration::from_secs(2);
/// While it does not come back, the restart is repeated this often (a restart during an
/// outage fails its checks within a fraction of a second; the next one finds the path).
pub const ICE_RESTART_RETRY: Duration = Duration::from_secs(2);
/// A connection that has not come back after this long ends the call.
pub const RECONNECT_GIVE_UP: Duration = Duration::from_secs(30);
/// A new connection that is not up after this long is given up for a fresh one (a DTLS
/// handshake can stall with ICE up: webrtc-rs then stays `connecting` for good).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// ICE found a path but the DTLS handshake has not finished this long after: it failed
/// (webrtc-rs reports a failed handshake only in its log; the connection stays
/// `connecting`). A handshake takes a few round trips; this leaves room for two of its
/// retransmissions (after 1 s and 2 s).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that fails before it ever carried media (a DTLS handshake that failed,
/// or ICE that found no path) is replaced by a fresh one at most this many times.
pub const MAX_FRESH_CONNECTIONS: u32 = 2;
/// After the signaling connection drops mid-call, reconnecting is tried after these
/// waits (then every 5 s), for as long as the server keeps our seat.
const SIGNALING_BACKOFF_MS: [u64; 5] = [250, 500, 1000, 2000, 5000];
/// The server keeps a seat this long (its default `--resume-grace`); trying longer is
/// pointless.
pub const RESUME_FOR: Duration = Duration::from_secs(30);
/// At most this many messages wait for the signaling connection to come back.
const MAX_OUTBOX: usize = 200;
/// Chat lines longer than this (bytes) are cut: a peer must not be able to flood the UI.
pub const MAX_CHAT_BYTES: usize = 4096;
/// At most this many lines wait for the chat channel to open.
const MAX_QUEUED_CHAT: usize = 100;

/// Who makes the offer. The spec: the member already in the room offers, the newcomer
/// answers (and is the polite peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Offerer,
    Answerer,
}

/// Why a call ended, in words a person understands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EndReason {
    /// We hung up.
    HungUp,
    /// The other person left or their connection dropped.
    PeerLeft { disconnected: bool },
    /// The room already has two people.
    RoomFull,
    /// The host ended the room, or it expired.
    RoomEnded { expired: bool },
    /// The media connection could not be established or was lost.
    ConnectionFailed,
    /// The signaling server refused something (`error` message).
    Refused { code: ErrorCode, message: String },
    /// The signaling server could not be reached or went away before the call started.
    ServerLost { detail: String },
    /// A direct call did not happen: declined, unanswered, busy or offline.
    CallRejected {
        to: String,
        reason: CallRejectReason,
    },
    /// The caller gave up before we answered.
    CallCancelled,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::HungUp => write!(f, "you hung up"),
            EndReason::PeerLeft {
                disconnected: false,
            } => write!(f, "peer left"),
            EndReason::PeerLeft { disconnected: true } => {
                write!(f, "peer left (their connection dropped)")
            }
            EndReason::RoomFull => write!(f, "the room is full: two people are already in it"),
            EndReason::RoomEnded { expired: false } => write!(f, "the host ended the meeting"),
            EndReason::RoomEnded { expired: true } => write!(f, "the meeting has expired"),
            EndReason::ConnectionFailed => write!(f, "the media connection failed"),
            EndReason::Refused { code, message } => match code {
                ErrorCode::NotStarted => write!(f, "the meeting has not started yet: {message}"),
                ErrorCode::RoomEnded => write!(f, "that meeting is over"),
                ErrorCode::NotHost => write!(f, "that is not this meeting's host key"),
                ErrorCode::NameTaken => write!(f, "your name is already signed in elsewhere"),
                _ => write!(f, "server refused: {message} ({})", code.as_str()),
            },
            EndReason::ServerLost { detail } => write!(f, "signaling server unreachable: {detail}"),
            EndReason::CallRejected { to, reason } => match reason {
                CallRejectReason::Rejected => write!(f, "{to} declined the call"),
                CallRejectReason::NoAnswer => write!(f, "{to} did not answer"),
                CallRejectReason::Busy => write!(f, "{to} is busy in another call"),
                CallRejectReason::Offline => write!(f, "{to} is not signed in"),
            },
            EndReason::CallCancelled => write!(f, "the caller hung up before you answered"),
        }
    }
}

/// Where the call is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallState {
    Idle,
    /// `join` (or `accept`) sent, waiting for `joined`.
    Joining {
        room: String,
    },
    /// A direct call: `register`/`call` sent, waiting for the server to ring them.
    Dialing {
        to: String,
    },
    /// A direct call: they are being rung; we wait in room `room` (the call id).
    Ringing {
        room: String,
        to: String,
    },
    /// In the room alone.
    WaitingForPeer {
        room: String,
        peer_id: String,
    },
    /// The other person is there; the peer connection is being set up.
    Connecting {
        room: String,
        role: Role,
    },
    /// Media connection up.
    InCall {
        room: String,
        role: Role,
    },
    /// The media connection dropped for a moment; ICE is trying to get it back.
    Reconnecting {
        room: String,
        role: Role,
    },
    Ended(EndReason),
}

impl CallState {
    /// A short status line for the UI and logs.
    pub fn describe(&self) -> String {
        match self {
            CallState::Idle => "idle".into(),
            CallState::Joining { room } => format!("joining {room}"),
            CallState::Dialing { to } => format!("calling {to}"),
            CallState::Ringing { to, .. } => format!("ringing {to}"),
            CallState::WaitingForPeer { room, .. } => {
                format!("waiting for the other person in {room}")
            }
            CallState::Connecting { .. } => "connecting".into(),
            CallState::InCall { .. } => "connected".into(),
            CallState::Reconnecting { .. } => "reconnecting…".into(),
            CallState::Ended(reason) => format!("ended: {reason}"),
        }
    }

    pub fn is_ended(&self) -> bool {
        matches!(self, CallState::Ended(_))
    }

    fn in_room(&self) -> bool {
        matches!(
            self,
            CallState::WaitingForPeer { .. }
                | CallState::Ringing { .. }
                | CallState::Connecting { .. }
                | CallState::InCall { .. }
                | CallState::Reconnecting { .. }
        )
    }
}

/// The peer connection's state, as far as the call cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Connected,
    /// Connectivity lost for now (ICE may recover by itself).
    Disconnected,
    /// ICE failed or the connection closed under us.
    Failed,
    /// ICE found a path (the DTLS handshake runs on it next).
    PathFound,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The user wants to join `room` (as its host when `host_token` is right).
    Join {
        room: String,
        name: Option<String>,
        host_token: Option<String>,
    },
    /// The user wants to call the person signed in as `to`. The server needs us to hold
    /// a name first: `register_as` claims one on this connection (None: already done).
    Dial {
        to: String,
        register_as: Option<String>,
    },
    /// The user accepts the incoming call `call_id` (rung on this connection).
    Accept {
        call_id: String,
    },
    /// The host ends the room for both.
    EndRoom,
    /// A message from the signaling server.
    Server(ServerMessage),
    /// The signaling connection ended or could not be opened.
    ServerClosed {
        detail: String,
    },
    /// A new signaling connection is open (after [`Action::ConnectSignaling`]).
    SignalingConnected,
    /// Our peer connection produced its offer or answer.
    LocalDescription {
        sdp: String,
        role: Role,
    },
    /// Our peer connection found a candidate (`None`: gathering complete).
    LocalCandidate(Option<IceCandidate>),
    Peer(PeerState),
    /// Creating or negotiating the peer connection failed.
    PeerFailed {
        detail: String,
    },
    /// ICE servers from the `welcome` of a connection opened before this call.
    IceServers(Vec<IceServer>),
    /// The chat data channel is open.
    ChatOpen,
    /// The user typed a chat line.
    ChatTyped(String),
    /// The other person sent a chat line.
    ChatReceived(String),
    /// The user turned the microphone on (true) or muted it.
    Microphone(bool),
    /// The user turned the camera on (true) or off.
    Camera(bool),
    /// An address of this machine went away (a laptop moved to another network): the
    /// media path and the signaling connection may both have been bound to it.
    NetworkChanged,
    /// Time has passed: the deadline from [`Call::poll_timeout`] may be due.
    Timeout,
    HangUp,
}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(ClientMessage),
    /// Create the peer connection with these ICE servers; an offerer starts negotiating.
    StartPeer {
        role: Role,
        ice_servers: Vec<IceServer>,
    },
    RemoteOffer(String),
    RemoteAnswer(String),
    /// Candidates are handed over in arrival order; the peer queues them until it has
    /// the remote description.
    RemoteCandidate(Option<IceCandidate>),
    /// Open a new signaling connection (the old one dropped mid-call); its outcome comes
    /// back as [`Event::SignalingConnected`] or [`Event::ServerClosed`].
    ConnectSignaling,
    /// The media connection is up for the first time: start sending.
    StartMedia,
    /// Restart ICE (new credentials, candidates gathered again) and offer again.
    RestartIce,
    /// Replace the peer connection by a fresh one (new DTLS certificate and ICE
    /// credentials, same call, devices and encoder settings); media, if it ran, starts
    /// again with [`Action::StartMedia`] once the new connection is up. `offer`: we start
    /// it (make the offer now); else the other side's offer follows.
    FreshPeer {
        offer: bool,
        ice_servers: Vec<IceServer>,
    },
    /// Take back our outstanding offer (the other side's crossed it and wins).
    RollbackOffer,
    /// Send this chat line over the data channel.
    SendChat(String),
    /// Show a received chat line.
    ShowChat(String),
    /// Send the microphone (true) or silence.
    SetMicrophone(bool),
    /// Open the camera (true) or release it and send black.
    SetCamera(bool),
    /// Close the peer connection and stop the devices.
    ClosePeer,
    /// Close the signaling connection.
    Disconnect,
}

/// The signaling connection, as far as the call cares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Signaling {
    Up,
    /// Dropped mid-call at `since`; the next attempt to reconnect is due at `next`.
    Down {
        since: Instant,
        attempts: usize,
        next: Instant,
    },
    /// Reconnected; `resume` sent, waiting for `joined`.
    Resuming {
        since: Instant,
    },
    /// Not coming back (no resume token, or the server no longer holds the seat);
    /// media may still flow peer to peer.
    Gone,
}

/// The machine.
#[derive(Debug)]
pub struct Call {
    state: CallState,
    /// The time of the latest timed event ([`Call::handle_at`]); the machine has no clock.
    now: Option<Instant>,
    ice_servers: Vec<IceServer>,
    peer_started: bool,
    media_started: bool,
    /// Since when the media connection has been down (while reconnecting).
    down_since: Option<Instant>,
    /// When we last restarted ICE (while reconnecting).
    restarted_at: Option<Instant>,
    /// Our address changed: restart ICE once signaling is back, whatever our role (the
    /// other side cannot know).
    restart_on_resume: bool,
    /// We sent an offer and have no answer yet (perfect negotiation's "glare" check).
    offer_outstanding: bool,
    /// The DTLS fingerprint of the other side's description our connection holds: an
    /// offer with another one comes from a fresh connection of theirs.
    remote_fingerprint: Option<String>,
    /// The other side's fingerprint on the connection we replaced last: descriptions that
    /// name it were meant for that connection (e.g. its ICE restart) and are dropped.
    stale_fingerprint: Option<String>,
    /// When the current connection was started (until it is first up).
    connecting_since: Option<Instant>,
    /// When ICE found a path for the connection that is not up yet.
    path_found_at: Option<Instant>,
    /// Fresh connections we started after one failed before carrying media.
    fresh_connections: u32,
    /// Our fresh connection's offer has no answer yet.
    fresh_offer_outstanding: bool,
    /// A fresh connection is due but signaling is away: it starts once our seat is back.
    fresh_on_resume: bool,
    /// Signaling connections that got our seat back.
    resumes: u64,
    host: bool,
    own_peer_id: Option<String>,
    peer_id: Option<String>,
    peer_name: Option<String>,
    chat_open: bool,
    chat_queue: Vec<String>,
    microphone_on: bool,
    camera_on: bool,
    signaling: Signaling,
    /// From `joined`: lets a new connection take our seat back (`resume`).
    resume_token: Option<String>,
    /// Messages for the server while the connection is down, sent after `resume`.
    outbox: std::collections::VecDeque<ClientMessage>,
}

impl Default for Call {
    fn default() -> Self {
        Call::new()
    }
}

impl Call {
    pub fn new() -> Call {
        Call {
            state: CallState::Idle,
            now: None,
            ice_servers: Vec::new(),
            peer_started: false,
            media_started: false,
            down_since: None,
            restarted_at: None,
            restart_on_resume: false,
            offer_outstanding: false,
            remote_fingerprint: None,
            stale_fingerprint: None,
            connecting_since: None,
            path_found_at: None,
            fresh_connections: 0,
            fresh_offer_outstanding: false,
            fresh_on_resume: false,
            resumes: 0,
            host: false,
            own_peer_id: None,
            peer_id: None,
            peer_name: None,
            chat_open: false,
            chat_queue: Vec::new(),
            microphone_on: true,
            camera_on: true,
            signaling: Signaling::Up,
            resume_token: None,
            outbox: std::collections::VecDeque::new(),
        }
    }

    /// Whether the signaling connection is up (false while reconnecting or gone).
    pub fn signaling_up(&self) -> bool {
        self.signaling == Signaling::Up
    }

    pub fn microphone_on(&self) -> bool {
        self.microphone_on
    }

    pub fn camera_on(&self) -> bool {
        self.camera_on
    }

    /// When the machine wants an [`Event::Timeout`] even if nothing else happens.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state.is_ended() {
            return None;
        }
        let signaling = match self.signaling {
            Signaling::Down { next, .. } => Some(next),
            Signaling::Resuming { since } => Some(since + RESUME_FOR),
            _ => None,
        };
        let (connecting, handshake) = match self.state {
            CallState::Connecting { .. } => (
                self.connecting_since.map(|t| t + CONNECT_TIMEOUT),
                self.path_found_at.map(|t| t + HANDSHAKE_TIMEOUT),
            ),
            _ => (None, None),
        };
        [self.media_timeout(), signaling, connecting, handshake]
            .into_iter()
            .flatten()
            .min()
    }

    /// The media connection's deadline: the next ICE restart, or giving up.
    fn media_timeout(&self) -> Option<Instant> {
        let since = self.down_since?;
        let give_up = since + RECONNECT_GIVE_UP;
        let restart = match self.restarted_at {
            Some(t) => t + ICE_RESTART_RETRY,
            None => since + ICE_RESTART_AFTER,
        };
        // Without signaling a restart cannot be negotiated: only giving up is due then.
        Some(if self.restarts() && self.signaling == Signaling::Up {
            restart.min(give_up)
        } else {
            give_up
        })
    }

    /// Our role in the media negotiation, once there is one.
    fn role(&self) -> Option<Role> {
        match &self.state {
            CallState::Connecting { role, .. }
            | CallState::InCall { role, .. }
            | CallState::Reconnecting { role, .. } => Some(*role),
            _ => None,
        }
    }

    /// Whether we restart ICE when the connection is lost: the offerer does (the
    /// newcomer, the answerer, is the polite peer and answers the new offer).
    fn restarts(&self) -> bool {
        matches!(
            self.state,
            CallState::Reconnecting {
                role: Role::Offerer,
                ..
            }
        )
    }

    /// Applies one event that happened at `now` and returns what to do, in order.
    pub fn handle_at(&mut self, now: Instant, event: Event) -> Vec<Action> {
        self.now = Some(self.now.map_or(now, |n| n.max(now)));
        self.handle(event)
    }

    /// Whether we are the room's host (may end it for both).
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// The other person's display name, when they gave one.
    pub fn peer_name(&self) -> Option<&str> {
        self.peer_name.as_deref()
    }

    pub fn state(&self) -> &CallState {
        &self.state
    }

    /// How many times a new signaling connection got our seat back.
    pub fn resumes(&self) -> u64 {
        self.resumes
    }

    /// How many fresh connections we started after one failed before carrying media.
    pub fn fresh_connections(&self) -> u32 {
        self.fresh_connections
    }

    /// ICE servers from `welcome` (the session adds its own configured ones).
    pub fn ice_servers(&self) -> &[IceServer] {
        &self.ice_servers
    }

    /// Applies one event, at the time of the previous one, and returns what to do.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        if self.state.is_ended() {
            return Vec::new(); // an ended call stays ended; a new call is a new machine
        }
        let actions = self.decide(event);
        if matches!(self.signaling, Signaling::Up) || self.state.is_ended() {
            return actions;
        }
        // While the connection is down, what is for the server waits for it (in order);
        // `resume` itself goes on the new connection.
        let mut out = Vec::with_capacity(actions.len());
        for action in actions {
            match action {
                Action::Send(msg @ ClientMessage::Resume { .. }) => out.push(Action::Send(msg)),
                Action::Send(msg) => {
                    if matches!(msg, ClientMessage::Offer { .. }) {
                        // Only the newest offer means anything (an older one's answer
                        // would not fit our description any more).
                        self.outbox
                            .retain(|m| !matches!(m, ClientMessage::Offer { .. }));
                    }
                    if self.outbox.len() >= MAX_OUTBOX {
                        self.outbox.pop_front();
                    }
                    self.outbox.push_back(msg);
                }
                other => out.push(other),
            }
        }
        out
    }

    fn decide(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Join {
                room,
                name,
                host_token,
            } => self.join(room, name, host_token),
            Event::Dial { to, register_as } => self.dial(to, register_as),
            Event::Accept { call_id } => {
                if self.state != CallState::Idle {
                    return Vec::new();
                }
                self.state = CallState::Joining {
                    room: call_id.clone(),
                };
                vec![Action::Send(ClientMessage::Accept { call_id })]
            }
            Event::EndRoom => {
                if self.state.in_room() && self.host {
                    vec![Action::Send(ClientMessage::EndRoom)]
                } else {
                    Vec::new()
                }
            }
            Event::Server(msg) => self.server(msg),
            Event::ServerClosed { detail } => self.signaling_lost(detail),
            Event::SignalingConnected => match (&self.signaling, &self.resume_token) {
                (Signaling::Down { .. }, Some(token)) => {
                    let Some(now) = self.now else {
                        return Vec::new();
                    };
                    let (Some(room), Some(peer_id)) = (self.room(), self.own_peer_id.clone())
                    else {
                        return Vec::new();
                    };
                    let resume_token = token.clone();
                    self.signaling = Signaling::Resuming { since: now };
                    vec![Action::Send(ClientMessage::Resume {
                        room,
                        peer_id,
                        resume_token,
                    })]
                }
                _ => Vec::new(),
            },
            Event::LocalDescription { sdp, role } => match role {
                Role::Offerer => {
                    self.offer_outstanding = true;
                    vec![Action::Send(ClientMessage::Offer { sdp })]
                }
                Role::Answerer => vec![Action::Send(ClientMessage::Answer { sdp })],
            },
            Event::LocalCandidate(candidate) => {
                vec![Action::Send(ClientMessage::Candidate { candidate })]
            }
            Event::Peer(PeerState::Disconnected) => {
                self.connection_lost();
                Vec::new()
            }
            Event::Peer(PeerState::PathFound) => {
                if matches!(self.state, CallState::Connecting { .. }) {
                    self.path_found_at = self.path_found_at.or(self.now);
                }
                Vec::new()
            }
            Event::Peer(PeerState::Connected) => {
                if let CallState::Connecting { room, role }
                | CallState::Reconnecting { room, role } = &self.state
                {
                    self.state = CallState::InCall {
                        room: room.clone(),
                        role: *role,
                    };
                }
                self.down_since = None;
                self.restarted_at = None;
                self.restart_on_resume = false;
                self.connecting_since = None;
                self.path_found_at = None;
                if self.media_started || !matches!(self.state, CallState::InCall { .. }) {
                    Vec::new()
                } else {
                    self.media_started = true;
                    vec![Action::StartMedia]
                }
            }
            Event::Peer(PeerState::Failed) => {
                if !self.peer_started {
                    Vec::new()
                } else if self.media_started {
                    // It worked before: ICE restart may bring it back (offerer at once).
                    self.connection_lost();
                    if self.restarts()
                        && self.restarted_at.is_none()
                        && self.signaling == Signaling::Up
                    {
                        self.restarted_at = self.now;
                        vec![Action::RestartIce]
                    } else {
                        Vec::new()
                    }
                } else {
                    // It never carried media: nothing of it is worth keeping.
                    self.fresh_connection("the connection failed before it was up")
                }
            }
            Event::PeerFailed { detail } => {
                tracing::error!(%detail, "peer connection");
                if self.peer_started {
                    self.end(EndReason::ConnectionFailed, true)
                } else {
                    Vec::new()
                }
            }
            Event::IceServers(servers) => {
                self.ice_servers = servers;
                Vec::new()
            }
            Event::ChatOpen => {
                self.chat_open = true;
                std::mem::take(&mut self.chat_queue)
                    .into_iter()
                    .map(Action::SendChat)
                    .collect()
            }
            Event::ChatTyped(text) => {
                let text = cap_chat(text);
                if self.chat_open {
                    vec![Action::SendChat(text)]
                } else {
                    if self.chat_queue.len() < MAX_QUEUED_CHAT {
                        self.chat_queue.push(text);
                    }
                    Vec::new()
                }
            }
            Event::ChatReceived(text) => vec![Action::ShowChat(cap_chat(text))],
            Event::Microphone(on) => {
                if std::mem::replace(&mut self.microphone_on, on) == on {
                    Vec::new()
                } else {
                    vec![Action::SetMicrophone(on)]
                }
            }
            Event::Camera(on) => {
                if std::mem::replace(&mut self.camera_on, on) == on {
                    Vec::new()
                } else {
                    vec![Action::SetCamera(on)]
                }
            }
            Event::NetworkChanged => self.network_changed(),
            Event::Timeout => self.timeout(),
            Event::HangUp => self.end(EndReason::HungUp, true),
        }
    }

    /// The media connection went down (disconnected or failed) after it had been up.
    fn connection_lost(&mut self) {
        if let CallState::InCall { room, role } = &self.state {
            self.state = CallState::Reconnecting {
                room: room.clone(),
                role: *role,
            };
        }
        if matches!(self.state, CallState::Reconnecting { .. })
            && let Some(now) = self.now
        {
            self.down_since.get_or_insert(now);
        }
    }

    /// The machine lost an address mid-call. Waiting for each connection to notice costs
    /// seconds (2.5 s until ICE says disconnected, 6 s of silence on the WebSocket, then
    /// the offerer's 2 s before it restarts), so both start again now: a new signaling
    /// connection resumes the seat, and once it has, we restart ICE on sockets bound to
    /// the new address, whatever our role (the other side cannot know; if both restart at
    /// once, the crossing offers are settled as perfect negotiation says).
    fn network_changed(&mut self) -> Vec<Action> {
        if !matches!(
            self.state,
            CallState::InCall { .. } | CallState::Reconnecting { .. }
        ) {
            return Vec::new();
        }
        self.connection_lost();
        let Some(now) = self.now else {
            return Vec::new();
        };
        self.restart_on_resume = true;
        match self.signaling {
            Signaling::Up | Signaling::Resuming { .. } if self.resume_token.is_some() => {
                tracing::info!("the network changed: reconnecting signaling and media");
                self.signaling = Signaling::Down {
                    since: now,
                    attempts: 0,
                    next: now,
                };
                self.signaling_timeout()
            }
            Signaling::Down {
                since, attempts, ..
            } => {
                self.signaling = Signaling::Down {
                    since,
                    attempts,
                    next: now,
                };
                self.signaling_timeout()
            }
            // No way to resume (an older server): restart over the connection there is.
            Signaling::Up => {
                self.restart_on_resume = false;
                self.restarted_at = Some(now);
                vec![Action::RestartIce]
            }
            _ => Vec::new(),
        }
    }

    /// The signaling connection dropped (or a reconnection failed). Mid-call the media
    /// flows peer to peer, so the call goes on and the seat is resumed on a new
    /// connection; before the call is up there is nothing to go on with.
    fn signaling_lost(&mut self, detail: String) -> Vec<Action> {
        let mid_call = matches!(
            self.state,
            CallState::Connecting { .. }
                | CallState::InCall { .. }
                | CallState::Reconnecting { .. }
        );
        if !mid_call {
            return self.end(EndReason::ServerLost { detail }, false);
        }
        tracing::info!(%detail, "signaling connection lost mid-call");
        let (Some(now), Some(_)) = (self.now, &self.resume_token) else {
            // An older server (no resume): the call goes on without signaling.
            self.signaling = Signaling::Gone;
            return Vec::new();
        };
        let (since, attempts) = match self.signaling {
            Signaling::Down {
                since, attempts, ..
            } => (since, attempts),
            Signaling::Resuming { since } => (since, 1),
            Signaling::Up => (now, 0),
            Signaling::Gone => return Vec::new(),
        };
        let wait = SIGNALING_BACKOFF_MS[attempts.min(SIGNALING_BACKOFF_MS.len() - 1)];
        self.signaling = Signaling::Down {
            since,
            attempts,
            next: now + Duration::from_millis(wait),
        };
        Vec::new()
    }

    /// The room we are in, if any.
    fn room(&self) -> Option<String> {
        match &self.state {
            CallState::WaitingForPeer { room, .. }
            | CallState::Ringing { room, .. }
            | CallState::Connecting { room, .. }
            | CallState::InCall { room, .. }
            | CallState::Reconnecting { room, .. } => Some(room.clone()),
            _ => None,
        }
    }

    fn timeout(&mut self) -> Vec<Action> {
        let mut actions = self.signaling_timeout();
        actions.extend(self.media_timeout_due());
        if let (CallState::Connecting { .. }, Some(now)) = (&self.state, self.now) {
            if self
                .path_found_at
                .is_some_and(|t| now >= t + HANDSHAKE_TIMEOUT)
            {
                actions.extend(self.fresh_connection("the DTLS handshake did not finish"));
            } else if self
                .connecting_since
                .is_some_and(|t| now >= t + CONNECT_TIMEOUT)
            {
                actions.extend(self.fresh_connection("the connection did not come up"));
            }
        }
        actions
    }

    /// Our connection failed (or stalled) before it ever carried media. A fresh one (new
    /// DTLS certificate, new ICE credentials) is offered to the other side, which sees
    /// the new fingerprint and builds a fresh one too: a handshake that failed once
    /// (a lost flight that was never answered, a mangled description) is not repeated.
    /// After [`MAX_FRESH_CONNECTIONS`], or without signaling to offer it, the call ends.
    fn fresh_connection(&mut self, why: &str) -> Vec<Action> {
        if self.fresh_connections >= MAX_FRESH_CONNECTIONS || self.signaling == Signaling::Gone {
            tracing::warn!(why, "the media connection could not be set up");
            return self.end(EndReason::ConnectionFailed, true);
        }
        if self.signaling != Signaling::Up {
            // Its offer could not get through: it starts once our seat is back (and the
            // call ends if it does not come back).
            tracing::info!(why, "a fresh media connection waits for signaling");
            self.fresh_on_resume = true;
            self.connecting_since = None;
            self.path_found_at = None;
            return Vec::new();
        }
        self.fresh_connections += 1;
        tracing::warn!(
            why,
            attempt = self.fresh_connections,
            "starting a fresh media connection"
        );
        self.renew_peer();
        self.offer_outstanding = false;
        self.fresh_offer_outstanding = true;
        vec![Action::FreshPeer {
            offer: true,
            ice_servers: self.ice_servers.clone(),
        }]
    }

    /// Their offer (naming `fingerprint`) is answered on a fresh connection of ours.
    fn answer_on_a_fresh_peer(&mut self, fingerprint: Option<String>, sdp: String) -> Vec<Action> {
        self.renew_peer();
        self.offer_outstanding = false;
        self.remote_fingerprint = fingerprint;
        vec![
            Action::FreshPeer {
                offer: false,
                ice_servers: self.ice_servers.clone(),
            },
            Action::RemoteOffer(sdp),
        ]
    }

    /// Forgets the replaced connection: the call is connecting again (media, if it ran,
    /// starts again when the fresh one is up).
    fn renew_peer(&mut self) {
        if let Some((room, role)) = self.room().zip(self.role()) {
            self.state = CallState::Connecting { room, role };
        }
        self.media_started = false;
        self.chat_open = false;
        self.down_since = None;
        self.restarted_at = None;
        self.restart_on_resume = false;
        if let Some(old) = self.remote_fingerprint.take() {
            self.stale_fingerprint = Some(old);
        }
        self.connecting_since = self.now;
        self.path_found_at = None;
        self.fresh_offer_outstanding = false;
        self.fresh_on_resume = false;
    }

    fn signaling_timeout(&mut self) -> Vec<Action> {
        let Some(now) = self.now else {
            return Vec::new();
        };
        match self.signaling {
            Signaling::Down {
                since,
                attempts,
                next,
            } if now >= next => {
                if now >= since + RESUME_FOR {
                    tracing::warn!("signaling did not come back; the call goes on without it");
                    self.signaling = Signaling::Gone;
                    return Vec::new();
                }
                // Guard: if the attempt never reports back, another is due in 5 s.
                self.signaling = Signaling::Down {
                    since,
                    attempts: attempts + 1,
                    next: now + Duration::from_secs(5),
                };
                vec![Action::ConnectSignaling]
            }
            Signaling::Resuming { since } if now >= since + RESUME_FOR => {
                self.signaling = Signaling::Gone;
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn media_timeout_due(&mut self) -> Vec<Action> {
        let (Some(since), Some(now)) = (self.down_since, self.now) else {
            return Vec::new();
        };
        if now >= since + RECONNECT_GIVE_UP {
            return self.end(EndReason::ConnectionFailed, true);
        }
        let due = self.media_timeout().is_some_and(|t| now >= t);
        // A restart needs signaling (its offer must reach the other side): while the
        // connection is down, wait; resuming restarts at once.
        if due && self.restarts() && self.signaling == Signaling::Up {
            self.restarted_at = Some(now);
            return vec![Action::RestartIce];
        }
        Vec::new()
    }

    fn join(
        &mut self,
        room: String,
        name: Option<String>,
        host_token: Option<String>,
    ) -> Vec<Action> {
        if self.state != CallState::Idle {
            return Vec::new();
        }
        self.state = CallState::Joining { room: room.clone() };
        vec![Action::Send(ClientMessage::Join {
            room,
            name,
            host_token,
        })]
    }

    fn dial(&mut self, to: String, register_as: Option<String>) -> Vec<Action> {
        if self.state != CallState::Idle {
            return Vec::new();
        }
        self.state = CallState::Dialing { to: to.clone() };
        let mut actions = Vec::new();
        if let Some(name) = register_as {
            actions.push(Action::Send(ClientMessage::Register { name }));
        }
        actions.push(Action::Send(ClientMessage::Call { to }));
        actions
    }

    fn start_peer(&mut self, room: String, role: Role) -> Vec<Action> {
        self.state = CallState::Connecting { room, role };
        self.peer_started = true;
        self.connecting_since = self.now;
        self.path_found_at = None;
        vec![Action::StartPeer {
            role,
            ice_servers: self.ice_servers.clone(),
        }]
    }

    fn server(&mut self, msg: ServerMessage) -> Vec<Action> {
        if matches!(self.signaling, Signaling::Resuming { .. }) {
            match msg {
                ServerMessage::Joined {
                    host, resume_token, ..
                } => {
                    // Our seat is back: what waited goes out, in order.
                    tracing::info!("signaling resumed");
                    self.resumes += 1;
                    self.signaling = Signaling::Up;
                    self.host = host;
                    self.resume_token = resume_token;
                    let mut actions: Vec<Action> =
                        self.outbox.drain(..).map(Action::Send).collect();
                    // The media connection went down too (e.g. the network changed):
                    // restart ICE now that its offer can get through.
                    let moved = std::mem::take(&mut self.restart_on_resume);
                    if self.down_since.is_some() && (self.restarts() || moved) {
                        self.restarted_at = self.now;
                        actions.push(Action::RestartIce);
                    }
                    if std::mem::take(&mut self.fresh_on_resume) {
                        actions.extend(self.fresh_connection("it waited for signaling"));
                    }
                    return actions;
                }
                ServerMessage::Error {
                    code: ErrorCode::ResumeFailed,
                    message,
                    ..
                } => {
                    // The server gave our seat up: the other side was told we left.
                    self.signaling = Signaling::Gone;
                    return self.end(
                        EndReason::ServerLost {
                            detail: format!("could not rejoin the call: {message}"),
                        },
                        false,
                    );
                }
                _ => {}
            }
        }
        match msg {
            ServerMessage::Welcome { ice_servers, .. } => {
                self.ice_servers = ice_servers;
                Vec::new()
            }
            ServerMessage::Ringing { call_id, to } => {
                if matches!(self.state, CallState::Dialing { .. }) {
                    self.state = CallState::Ringing { room: call_id, to };
                }
                Vec::new()
            }
            ServerMessage::CallRejected { reason, .. } => match &self.state {
                CallState::Dialing { to } | CallState::Ringing { to, .. } => {
                    let to = to.clone();
                    // The server has already removed us from the call's room.
                    self.end(EndReason::CallRejected { to, reason }, false)
                }
                _ => Vec::new(),
            },
            ServerMessage::CallCancelled { call_id } => match &self.state {
                CallState::Joining { room } if *room == call_id => {
                    self.end(EndReason::CallCancelled, false)
                }
                _ => Vec::new(),
            },
            ServerMessage::HostChanged { peer_id } => {
                self.host = self.own_peer_id.as_deref() == Some(peer_id.as_str());
                Vec::new()
            }
            ServerMessage::Joined {
                room,
                peer_id,
                members,
                host,
                peers,
                resume_token,
            } => {
                let dialing = match &self.state {
                    CallState::Joining { .. } => None,
                    CallState::Dialing { to } | CallState::Ringing { to, .. } => Some(to.clone()),
                    _ => return Vec::new(),
                };
                self.host = host;
                self.resume_token = resume_token;
                self.own_peer_id = Some(peer_id.clone());
                if let Some(p) = peers.into_iter().next() {
                    self.peer_id = Some(p.peer_id);
                    self.peer_name = p.name;
                }
                if let Some(to) = dialing {
                    // The callee joins when they accept; until then it rings.
                    self.state = CallState::Ringing { room, to };
                    return Vec::new();
                }
                if members >= 2 {
                    // We are the newcomer: the member already there offers.
                    self.start_peer(room, Role::Answerer)
                } else {
                    self.state = CallState::WaitingForPeer { room, peer_id };
                    Vec::new()
                }
            }
            ServerMessage::PeerJoined { peer_id, name } => match &self.state {
                CallState::WaitingForPeer { room, .. } | CallState::Ringing { room, .. } => {
                    let room = room.clone();
                    self.peer_id = Some(peer_id);
                    self.peer_name = name;
                    self.start_peer(room, Role::Offerer)
                }
                _ => Vec::new(),
            },
            ServerMessage::RoomFull { .. } => self.end(EndReason::RoomFull, false),
            ServerMessage::Offer { sdp, .. } if self.peer_started => {
                let fingerprint = dtls_fingerprint(&sdp).map(str::to_owned);
                if fingerprint.is_some() && fingerprint == self.stale_fingerprint {
                    tracing::info!("an offer for the connection we replaced; dropped");
                    return Vec::new();
                }
                if self.remote_fingerprint.is_some()
                    && fingerprint.is_some()
                    && fingerprint != self.remote_fingerprint
                {
                    // The other side replaced its connection (ours cannot take a new
                    // DTLS certificate): a fresh one of ours answers it.
                    tracing::info!("the other side started a fresh connection");
                    return self.answer_on_a_fresh_peer(fingerprint, sdp);
                }
                // Both sides offered at once (both restarting ICE, or both starting a
                // fresh connection): the polite peer (the newcomer, our answerer) takes
                // its offer back and answers theirs; the impolite one ignores theirs and
                // waits for the answer to its own.
                let crossed = std::mem::take(&mut self.offer_outstanding);
                if crossed && self.role() == Some(Role::Offerer) {
                    tracing::info!("offers crossed: ours stands");
                    self.offer_outstanding = true;
                    return Vec::new();
                }
                if crossed && self.fresh_offer_outstanding {
                    // Our fresh connection has never been negotiated: rather than roll
                    // its offer back, a fresh one answers theirs.
                    tracing::info!("fresh offers crossed: answering theirs on a fresh connection");
                    return self.answer_on_a_fresh_peer(fingerprint, sdp);
                }
                if fingerprint.is_some() {
                    self.remote_fingerprint = fingerprint;
                }
                if crossed {
                    tracing::info!("offers crossed: taking ours back");
                    return vec![Action::RollbackOffer, Action::RemoteOffer(sdp)];
                }
                vec![Action::RemoteOffer(sdp)]
            }
            ServerMessage::Answer { sdp, .. } if self.peer_started => {
                let fingerprint = dtls_fingerprint(&sdp).map(str::to_owned);
                if fingerprint.is_some() && fingerprint == self.stale_fingerprint {
                    tracing::info!("an answer for the connection we replaced; dropped");
                    return Vec::new();
                }
                self.offer_outstanding = false;
                self.fresh_offer_outstanding = false;
                if fingerprint.is_some() {
                    self.remote_fingerprint = fingerprint;
                }
                vec![Action::RemoteAnswer(sdp)]
            }
            ServerMessage::Candidate { candidate, .. } if self.peer_started => {
                vec![Action::RemoteCandidate(candidate)]
            }
            ServerMessage::PeerLeft { reason, .. } if self.state.in_room() => self.end(
                EndReason::PeerLeft {
                    disconnected: reason == LeaveReason::Disconnected,
                },
                true,
            ),
            ServerMessage::RoomEnded { reason, .. } => {
                let expired = reason == signaling_server::protocol::RoomEndReason::Expired;
                self.end(EndReason::RoomEnded { expired }, false)
            }
            ServerMessage::Error { code, message, .. } => match self.state {
                // Refusals of the join (or of the direct call) end the attempt; later
                // errors are logged only (e.g. a late candidate after the peer left is
                // `not_in_call`).
                CallState::Joining { .. } | CallState::Dialing { .. } => {
                    self.end(EndReason::Refused { code, message }, false)
                }
                _ => {
                    if code == ErrorCode::Internal {
                        tracing::warn!(%message, "signaling server internal error");
                    } else {
                        tracing::debug!(%code, %message, "signaling error");
                    }
                    Vec::new()
                }
            },
            _ => Vec::new(),
        }
    }

    /// Ends the call; `leave` says whether the server still has us in a room.
    /// (Also forgets any reconnect deadline: an ended call wants no more time.)
    fn end(&mut self, reason: EndReason, leave: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        if leave && self.state.in_room() {
            actions.push(Action::Send(ClientMessage::Leave));
        }
        if self.peer_started {
            actions.push(Action::ClosePeer);
        }
        actions.push(Action::Disconnect);
        self.state = CallState::Ended(reason);
        self.down_since = None;
        actions
    }
}

/// The DTLS certificate fingerprint a description names (`a=fingerprint:sha-256 AB:..`,
/// session or media level; the first one), without its algorithm.
pub fn dtls_fingerprint(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|line| line.trim_end().strip_prefix("a=fingerprint:"))
        .and_then(|value| value.split_once(' '))
        .map(|(_, hex)| hex.trim())
        .filter(|hex| !hex.is_empty())
}

/// Cuts a chat line to [`MAX_CHAT_BYTES`] (at a character boundary).
fn cap_chat(mut text: String) -> String {
    if text.len() > MAX_CHAT_BYTES {
        let mut end = MAX_CHAT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(members: usize) -> Event {
        Event::Server(ServerMessage::Joined {
            room: "r".into(),
            peer_id: "me".into(),
            members,
            host: members == 1,
            peers: Vec::new(),
            resume_token: Some("token-1".into()),
        })
    }

    fn start(call: &mut Call) {
        let a = call.handle(Event::Join {
            room: "r".into(),
            name: None,
            host_token: None,
        });
        assert!(matches!(a[..], [Action::Send(ClientMessage::Join { .. })]));
    }

    #[test]
    fn first_in_room_offers_when_the_peer_arrives() {
        let mut call = Call::new();
        call.handle(Event::Server(ServerMessage::Welcome {
            protocol: 1,
            server: "s".into(),
            ice_servers: vec![IceServer {
                urls: vec!["stun:x".into()],
                username: None,
                credential: None,
            }],
        }));
        start(&mut call);
        assert!(call.handle(joined(1)).is_empty());
        assert!(matches!(call.state(), CallState::WaitingForPeer { .. }));
        let a = call.handle(Event::Server(ServerMessage::PeerJoined {
            peer_id: "p".into(),
            name: None,
        }));
        match &a[..] {
            [
                Action::StartPeer {
                    role: Role::Offerer,
                    ice_servers,
                },
            ] => assert_eq!(ice_servers.len(), 1),
            other => panic!("{other:?}"),
        }
        call.handle(Event::Peer(PeerState::Connected));
        assert!(matches!(call.state(), CallState::InCall { .. }));
        assert_eq!(call.state().describe(), "connected");
    }

    #[test]
    fn newcomer_answers_and_forwards_signaling() {
        let mut call = Call::new();
        start(&mut call);
        let a = call.handle(joined(2));
        assert!(matches!(
            a[..],
            [Action::StartPeer {
                role: Role::Answerer,
                ..
            }]
        ));
        let a = call.handle(Event::Server(ServerMessage::Offer {
            from: "p".into(),
            sdp: "v=0".into(),
        }));
        assert_eq!(a, vec![Action::RemoteOffer("v=0".into())]);
        let a = call.handle(Event::LocalDescription {
            sdp: "ans".into(),
            role: Role::Answerer,
        });
        assert_eq!(
            a,
            vec![Action::Send(ClientMessage::Answer { sdp: "ans".into() })]
        );
        let a = call.handle(Event::Server(ServerMessage::Candidate {
            from: "p".into(),
            candidate: None,
        }));
        assert_eq!(a, vec![Action::RemoteCandidate(None)]);
    }

    #[test]
    fn peer_left_ends_with_reason_and_cleans_up() {
        let mut call = Call::new();
        start(&mut call);
        call.handle(joined(2));
        call.handle(Event::Peer(PeerState::Connected));
        let a = call.handle(Event::Server(ServerMessage::PeerLeft {
            peer_id: "p".into(),
            reason: LeaveReason::Left,
        }));
        assert_eq!(
            a,
            vec![
                Action::Send(ClientMessage::Leave),
                Action::ClosePeer,
                Action::Disconnect
            ]
        );
        assert_eq!(call.state().describe(), "ended: peer left");
        // Ended is final.
        assert!(call.handle(Event::HangUp).is_empty());
    }

    #[test]
    fn refusals_and_failures() {
        let mut call = Call::new();
        start(&mut call);
        let a = call.handle(Event::Server(ServerMessage::RoomFull {
            room: "r".into(),
            members: 2,
        }));
        assert_eq!(a, vec![Action::Disconnect]);
        assert_eq!(call.state(), &CallState::Ended(EndReason::RoomFull));

        let mut call = Call::new();
        start(&mut call);
        call.handle(Event::Server(ServerMessage::error(
            ErrorCode::BadField,
            "bad room",
        )));
        assert!(matches!(
            call.state(),
            CallState::Ended(EndReason::Refused { .. })
        ));

        // An error creating or negotiating the connection ends the call.
        let mut call = Call::new();
        start(&mut call);
        call.handle(joined(2));
        let a = call.handle(Event::PeerFailed {
            detail: "bad SDP".into(),
        });
        assert_eq!(a.len(), 3);
        assert_eq!(call.state(), &CallState::Ended(EndReason::ConnectionFailed));

        let mut call = Call::new();
        start(&mut call);
        call.handle(Event::ServerClosed {
            detail: "refused".into(),
        });
        assert!(matches!(
            call.state(),
            CallState::Ended(EndReason::ServerLost { .. })
        ));
    }

    #[test]
    fn hang_up_while_waiting_leaves_the_room() {
        let mut call = Call::new();
        start(&mut call);
        call.handle(joined(1));
        let a = call.handle(Event::HangUp);
        assert_eq!(
            a,
            vec![Action::Send(ClientMessage::Leave), Action::Disconnect]
        );
    }

    #[test]
    fn losing_signaling_mid_call_keeps_the_call() {
        let mut call = Call::new();
        start(&mut call);
        call.handle(joined(2));
        call.handle(Event::Peer(PeerState::Connected));
        assert!(
            call.handle(Event::ServerClosed {
                detail: "gone".into()
            })
            .is_empty()
        );
        assert!(matches!(call.state(), CallState::InCall { .. }));
    }

    #[test]
    fn a_direct_call_rings_then_offers_when_they_accept() {
        let mut call = Call::new();
        let a = call.handle(Event::Dial {
            to: "bob".into(),
            register_as: Some("alice".into()),
        });
        assert!(matches!(
            &a[..],
            [
                Action::Send(ClientMessage::Register { .. }),
                Action::Send(ClientMessage::Call { .. })
            ]
        ));
        assert_eq!(call.state().describe(), "calling bob");
        call.handle(Event::Server(ServerMessage::Ringing {
            call_id: "call-x".into(),
            to: "bob".into(),
        }));
        call.handle(Event::Server(ServerMessage::Joined {
            room: "call-x".into(),
            peer_id: "me".into(),
            members: 1,
            host: true,
            peers: Vec::new(),
            resume_token: None,
        }));
        assert_eq!(call.state().describe(), "ringing bob");
        let a = call.handle(Event::Server(ServerMessage::PeerJoined {
            peer_id: "p".into(),
            name: Some("bob".into()),
        }));
        assert!(matches!(
            &a[..],
            [Action::StartPeer {
                role: Role::Offerer,
                ..
            }]
        ));
        assert_eq!(call.peer_name(), Some("bob"));
        assert!(call.is_host());
    }

    #[test]
    fn a_declined_call_ends_with_the_reason() {
        let mut call = Call::new();
        call.handle(Event::Dial {
            to: "bob".into(),
            register_as: None,
        });
        let a = call.handle(Event::Server(ServerMessage::CallRejected {
            call_id: "c".into(),
            reason: CallRejectReason::Rejected,
        }));
        assert_eq!(a, vec![Action::Disconnect]);
        assert_eq!(call.state().describe(), "ended: bob declined the call");
    }

    #[test]
    fn accepting_joins_as_the_answerer_and_a_cancel_ends_it() {
        let mut call = Call::new();
        let a = call.handle(Event::Accept {
            call_id: "call-x".into(),
        });
        assert!(matches!(
            &a[..],
            [Action::Send(ClientMessage::Accept { .. })]
        ));
        let a = call.handle(Event::Server(ServerMessage::Joined {
            room: "call-x".into(),
            peer_id: "me".into(),
            members: 2,
            host: false,
            peers: vec![signaling_server::protocol::PeerInfo {
                peer_id: "p".into(),
                name: Some("alice".into()),
            }],
            resume_token: None,
        }));
        assert!(matches!(
            &a[..],
            [Action::StartPeer {
                role: Role::Answerer,
                ..
            }]
        ));
        assert_eq!(call.peer_name(), Some("alice"));
        // Not the host: end_room is not even sent.
        assert!(call.handle(Event::EndRoom).is_empty());

        let mut late = Call::new();
        late.handle(Event::Accept {
            call_id: "call-y".into(),
        });
        late.handle(Event::Server(ServerMessage::CallCancelled {
            call_id: "call-y".into(),
        }));
        assert_eq!(late.state(), &CallState::Ended(EndReason::CallCancelled));
    }

    #[test]
    fn a_dropped_connection_reconnects_without_ending_the_call() {
        let mut call = Call::new();
        start(&mut call);
        call.handle(joined(2));
        assert_eq!(
            call.handle(Event::Peer(PeerState::Connected)),
            [Action::StartMedia]
        );
        call.handle(Event::Peer(PeerState::Disconnected));
        assert_eq!(call.state().describe(), "reconnecting…");
        assert!(
            call.handle(Event::Peer(PeerState::Connected)).is_empty(),
            "media keeps running: not started twice"
        );
        assert_eq!(call.state().describe(), "connected");
        assert_eq!(call.poll_timeout(), None);
    }

    /// A description naming DTLS fingerprint `fp`.
    fn sdp(fp: &str) -> String {
        format!("v=0\r\na=group:BUNDLE 0\r\na=fingerprint:sha-256 {fp}\r\nm=video 9\r\n")
    }

    fn offer_from_peer(fp: &str) -> Event {
        Event::Server(ServerMessage::Offer {
            from: "p".into(),
            sdp: sdp(fp),
        })
    }

    fn fresh(offer: bool) -> Action {
        Action::FreshPeer {
            offer,
            ice_servers: Vec::new(),
        }
    }

    /// An answerer connecting at `t`: the offer it answered names fingerprint "AA".
    fn answerer_connecting(t: Instant) -> Call {
        let mut call = Call::new();
        call.handle_at(t, Event::IceServers(Vec::new()));
        start(&mut call);
        call.handle(joined(2));
        call.handle(offer_from_peer("AA"));
        call
    }

    /// An answerer whose first connection failed: its fresh one has offered ("BB").
    fn answerer_on_a_fresh_connection(t: Instant) -> Call {
        let mut call = answerer_connecting(t);
        assert_eq!(call.handle(Event::Peer(PeerState::Failed)), [fresh(true)]);
        call.handle(Event::LocalDescription {
            sdp: sdp("BB"),
            role: Role::Offerer,
        });
        call
    }

    #[test]
    fn a_dtls_fingerprint_is_read_from_a_description() {
        assert_eq!(dtls_fingerprint(&sdp("AB:CD")), Some("AB:CD"));
        assert_eq!(dtls_fingerprint("v=0\r\nm=audio 9\r\n"), None);
        assert_eq!(dtls_fingerprint("a=fingerprint:sha-256 \r\n"), None);
        assert_eq!(dtls_fingerprint("a=fingerprint:garbage"), None);
    }

    #[test]
    fn a_connection_that_fails_before_it_is_up_is_replaced_twice_then_the_call_ends() {
        let t = Instant::now();
        let mut call = answerer_connecting(t);
        for attempt in 1..=MAX_FRESH_CONNECTIONS {
            // A failed handshake: a fresh connection of ours offers (whatever our role).
            assert_eq!(call.handle(Event::Peer(PeerState::Failed)), [fresh(true)]);
            assert!(matches!(call.state(), CallState::Connecting { .. }));
            assert_eq!(call.fresh_connections(), attempt);
            assert!(matches!(
                &call.handle(Event::LocalDescription {
                    sdp: sdp("BB"),
                    role: Role::Offerer,
                })[..],
                [Action::Send(ClientMessage::Offer { .. })]
            ));
        }
        let a = call.handle(Event::Peer(PeerState::Failed));
        assert_eq!(
            a,
            [
                Action::Send(ClientMessage::Leave),
                Action::ClosePeer,
                Action::Disconnect
            ]
        );
        assert_eq!(call.state(), &CallState::Ended(EndReason::ConnectionFailed));
    }

    #[test]
    fn a_connection_that_never_comes_up_is_replaced_after_the_connect_timeout() {
        let t = Instant::now();
        let mut call = offerer_connecting(t);
        assert_eq!(call.poll_timeout(), Some(t + CONNECT_TIMEOUT));
        assert!(
            call.handle_at(t + CONNECT_TIMEOUT / 2, Event::Timeout)
                .is_empty()
        );
        let later = t + CONNECT_TIMEOUT;
        assert_eq!(call.handle_at(later, Event::Timeout), [fresh(true)]);
        // The fresh one has its own deadline; once up, there is none.
        assert_eq!(call.poll_timeout(), Some(later + CONNECT_TIMEOUT));
        assert_eq!(
            call.handle(Event::Peer(PeerState::Connected)),
            [Action::StartMedia]
        );
        assert_eq!(call.poll_timeout(), None);
    }

    #[test]
    fn a_handshake_that_does_not_finish_once_ice_found_a_path_is_replaced() {
        let t = Instant::now();
        let mut call = answerer_connecting(t);
        let found = t + Duration::from_millis(300);
        assert!(
            call.handle_at(found, Event::Peer(PeerState::PathFound))
                .is_empty()
        );
        assert_eq!(call.poll_timeout(), Some(found + HANDSHAKE_TIMEOUT));
        // ICE reporting again (completed after connected) does not move the deadline.
        call.handle_at(
            found + Duration::from_secs(1),
            Event::Peer(PeerState::PathFound),
        );
        assert_eq!(call.poll_timeout(), Some(found + HANDSHAKE_TIMEOUT));
        assert_eq!(
            call.handle_at(found + HANDSHAKE_TIMEOUT, Event::Timeout),
            [fresh(true)]
        );
        // The fresh connection's handshake gets its own deadline, once its path is found.
        let later = found + HANDSHAKE_TIMEOUT;
        assert_eq!(call.poll_timeout(), Some(later + CONNECT_TIMEOUT));
        call.handle_at(later, Event::Peer(PeerState::PathFound));
        assert_eq!(
            call.handle(Event::Peer(PeerState::Connected)),
            [Action::StartMedia]
        );
        assert_eq!(call.poll_timeout(), None);
        // Mid-call, ICE finding a path again (after a restart) sets no deadline.
        call.handle(Event::Peer(PeerState::PathFound));
        assert_eq!(call.poll_timeout(), None);
    }

    #[test]
    fn a_fresh_connection_due_while_signaling_is_away_starts_once_the_seat_is_back() {
        let t = Instant::now();
        let mut call = answerer_connecting(t);
        call.handle_at(t, Event::Peer(PeerState::PathFound));
        call.handle_at(
            t,
            Event::ServerClosed {
                detail: "gone".into(),
            },
        );
        // The handshake deadline passes while signaling is away: nothing to offer over.
        let due = t + HANDSHAKE_TIMEOUT;
        let a = call.handle_at(due, Event::Timeout);
        assert!(
            a.iter().all(|a| matches!(a, Action::ConnectSignaling)),
            "{a:?}"
        );
        assert!(matches!(call.state(), CallState::Connecting { .. }));
        call.handle_at(due, Event::SignalingConnected);
        let resumed = call.handle_at(
            due,
            Event::Server(ServerMessage::Joined {
                room: "r".into(),
                peer_id: "me".into(),
                members: 2,
                host: false,
                peers: Vec::new(),
                resume_token: Some("token-2".into()),
            }),
        );
        assert_eq!(resumed, [fresh(true)]);
        assert_eq!(call.fresh_connections(), 1);
    }

    #[test]
    fn an_offer_with_a_new_fingerprint_gets_a_fresh_connection_and_media_starts_again() {
        // The offerer's handshake succeeded and media started; the answerer's failed, and
        // its fresh connection's offer names a new certificate.
        let t = Instant::now();
        let mut call = offerer_in_call(t);
        call.handle(Event::Server(ServerMessage::Answer {
            from: "p".into(),
            sdp: sdp("AA"),
        }));
        // An ICE restart keeps the certificate: answered on the same connection.
        assert_eq!(
            call.handle(offer_from_peer("AA")),
            [Action::RemoteOffer(sdp("AA"))]
        );
        let a = call.handle(offer_from_peer("CC"));
        assert_eq!(a, [fresh(false), Action::RemoteOffer(sdp("CC"))]);
        assert!(matches!(
            call.state(),
            CallState::Connecting {
                role: Role::Offerer,
                ..
            }
        ));
        assert_eq!(call.fresh_connections(), 0, "not ours: no attempt used");
        assert_eq!(
            call.handle(Event::Peer(PeerState::Connected)),
            [Action::StartMedia],
            "media starts again on the fresh connection"
        );
    }

    #[test]
    fn fresh_connections_started_by_both_sides_at_once_settle_like_crossing_offers() {
        let t = Instant::now();
        // The offerer (impolite): its fresh offer stands; theirs is ignored.
        let mut offerer = offerer_connecting(t);
        offerer.handle(Event::Server(ServerMessage::Answer {
            from: "p".into(),
            sdp: sdp("AA"),
        }));
        assert_eq!(
            offerer.handle(Event::Peer(PeerState::Failed)),
            [fresh(true)]
        );
        offerer.handle(Event::LocalDescription {
            sdp: sdp("OO"),
            role: Role::Offerer,
        });
        assert!(offerer.handle(offer_from_peer("BB")).is_empty());
        assert_eq!(
            offerer.handle(Event::Server(ServerMessage::Answer {
                from: "p".into(),
                sdp: sdp("BB"),
            })),
            [Action::RemoteAnswer(sdp("BB"))]
        );

        // The answerer (polite): its fresh connection was never negotiated; rather than
        // roll its offer back, another fresh one answers theirs (not counted: theirs).
        let mut answerer = answerer_on_a_fresh_connection(t);
        assert_eq!(
            answerer.handle(offer_from_peer("OO")),
            [fresh(false), Action::RemoteOffer(sdp("OO"))]
        );
        assert_eq!(answerer.fresh_connections(), 1);
    }

    #[test]
    fn descriptions_for_the_replaced_connection_are_dropped() {
        // The answerer's handshake failed; the offerer, connected, lost the path meanwhile
        // and restarts ICE on its old connection: that offer crosses the fresh one.
        let t = Instant::now();
        let mut answerer = answerer_on_a_fresh_connection(t);
        assert!(
            answerer.handle(offer_from_peer("AA")).is_empty(),
            "the old connection's ICE restart is not for the fresh one"
        );
        assert!(
            answerer
                .handle(Event::Server(ServerMessage::Answer {
                    from: "p".into(),
                    sdp: sdp("AA"),
                }))
                .is_empty()
        );
        // The answer from their fresh connection is.
        assert_eq!(
            answerer.handle(Event::Server(ServerMessage::Answer {
                from: "p".into(),
                sdp: sdp("CC"),
            })),
            [Action::RemoteAnswer(sdp("CC"))]
        );
    }

    /// An offerer at `t`, its peer just arrived (the connection is starting).
    fn offerer_connecting(t: Instant) -> Call {
        let mut call = Call::new();
        call.handle_at(t, Event::IceServers(Vec::new()));
        start(&mut call);
        call.handle(joined(1));
        call.handle(Event::Server(ServerMessage::PeerJoined {
            peer_id: "p".into(),
            name: None,
        }));
        call
    }

    /// An offerer in a call, connected at `t`.
    fn offerer_in_call(t: Instant) -> Call {
        let mut call = offerer_connecting(t);
        assert_eq!(
            call.handle(Event::Peer(PeerState::Connected)),
            [Action::StartMedia]
        );
        call
    }

    fn answerer_in_call(t: Instant) -> Call {
        let mut call = Call::new();
        call.handle_at(t, Event::IceServers(Vec::new()));
        start(&mut call);
        call.handle(joined(2));
        assert_eq!(
            call.handle(Event::Peer(PeerState::Connected)),
            [Action::StartMedia]
        );
        assert!(matches!(
            call.state(),
            CallState::InCall {
                role: Role::Answerer,
                ..
            }
        ));
        call
    }

    #[test]
    fn a_connection_down_for_two_seconds_gets_an_ice_restart_then_retries_then_gives_up() {
        let t = Instant::now();
        let mut call = offerer_in_call(t);
        call.handle_at(t, Event::Peer(PeerState::Disconnected));
        assert_eq!(call.poll_timeout(), Some(t + ICE_RESTART_AFTER));
        // Not yet.
        let early = t + ICE_RESTART_AFTER / 2;
        assert!(call.handle_at(early, Event::Timeout).is_empty());
        // Two seconds down: restart.
        let t1 = t + ICE_RESTART_AFTER;
        assert_eq!(call.handle_at(t1, Event::Timeout), [Action::RestartIce]);
        assert_eq!(call.poll_timeout(), Some(t1 + ICE_RESTART_RETRY));
        let t2 = t1 + ICE_RESTART_RETRY;
        assert_eq!(call.handle_at(t2, Event::Timeout), [Action::RestartIce]);
        // The new offer goes out like the first.
        assert_eq!(
            call.handle_at(
                t2,
                Event::LocalDescription {
                    sdp: "restart".into(),
                    role: Role::Offerer
                }
            ),
            [Action::Send(ClientMessage::Offer {
                sdp: "restart".into()
            })]
        );
        // Never back: the call ends after the give-up time, and leaves the room.
        let end = t + RECONNECT_GIVE_UP;
        assert!(call.poll_timeout().is_some_and(|d| d <= end));
        let a = call.handle_at(end, Event::Timeout);
        assert_eq!(a[0], Action::Send(ClientMessage::Leave));
        assert_eq!(call.state(), &CallState::Ended(EndReason::ConnectionFailed));
        assert_eq!(call.poll_timeout(), None);
    }

    #[test]
    fn a_failed_connection_is_restarted_at_once_by_the_offerer_and_waited_for_by_the_answerer() {
        let t = Instant::now();
        let mut call = offerer_in_call(t);
        assert_eq!(
            call.handle_at(t, Event::Peer(PeerState::Failed)),
            [Action::RestartIce]
        );
        assert_eq!(call.state().describe(), "reconnecting…");
        // Back before the retry: the deadline goes away, media is not restarted.
        assert!(
            call.handle_at(
                t + Duration::from_secs(1),
                Event::Peer(PeerState::Connected)
            )
            .is_empty()
        );
        assert_eq!(call.poll_timeout(), None);

        // The answerer (polite) does not restart; it answers the offerer's new offer.
        let mut call = Call::new();
        call.handle_at(t, Event::IceServers(Vec::new()));
        start(&mut call);
        call.handle(joined(2));
        call.handle(Event::Peer(PeerState::Connected));
        assert!(call.handle_at(t, Event::Peer(PeerState::Failed)).is_empty());
        assert!(
            call.handle_at(t + ICE_RESTART_AFTER * 2, Event::Timeout)
                .is_empty()
        );
        assert_eq!(
            call.handle(Event::Server(ServerMessage::Offer {
                from: "p".into(),
                sdp: "restart".into()
            })),
            [Action::RemoteOffer("restart".into())]
        );
        assert_eq!(call.poll_timeout(), Some(t + RECONNECT_GIVE_UP));
    }

    #[test]
    fn a_dropped_signaling_connection_is_resumed_and_what_waited_is_sent_in_order() {
        let t = Instant::now();
        let mut call = offerer_in_call(t);
        assert!(
            call.handle_at(
                t,
                Event::ServerClosed {
                    detail: "reset".into()
                }
            )
            .is_empty()
        );
        assert!(!call.signaling_up());
        assert_eq!(call.state().describe(), "connected", "media goes on");
        // A candidate and an ICE-restart offer made meanwhile wait.
        let cand = IceCandidate {
            candidate: "candidate:1 1 udp 1 10.0.1.3 5000 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            username_fragment: None,
        };
        assert!(
            call.handle(Event::LocalCandidate(Some(cand.clone())))
                .is_empty()
        );
        // Reconnect after a short wait; a failed attempt waits longer.
        let first = call.poll_timeout().unwrap();
        assert!(first <= t + Duration::from_millis(300));
        assert_eq!(
            call.handle_at(first, Event::Timeout),
            [Action::ConnectSignaling]
        );
        call.handle_at(
            first,
            Event::ServerClosed {
                detail: "refused".into(),
            },
        );
        let second = call.poll_timeout().unwrap();
        assert!(second > first + Duration::from_millis(300), "backoff");
        assert_eq!(
            call.handle_at(second, Event::Timeout),
            [Action::ConnectSignaling]
        );
        // Connected: resume with the token from `joined`.
        assert_eq!(
            call.handle_at(second, Event::SignalingConnected),
            [Action::Send(ClientMessage::Resume {
                room: "r".into(),
                peer_id: "me".into(),
                resume_token: "token-1".into(),
            })]
        );
        assert!(
            call.handle(Event::LocalDescription {
                sdp: "restart".into(),
                role: Role::Offerer
            })
            .is_empty(),
            "still waiting for joined"
        );
        let resumed = call.handle(Event::Server(ServerMessage::Joined {
            room: "r".into(),
            peer_id: "me".into(),
            members: 2,
            host: true,
            peers: Vec::new(),
            resume_token: Some("token-2".into()),
        }));
        assert_eq!(
            resumed,
            [
                Action::Send(ClientMessage::Candidate {
                    candidate: Some(cand)
                }),
                Action::Send(ClientMessage::Offer {
                    sdp: "restart".into()
                })
            ]
        );
        assert!(call.signaling_up());
        assert_eq!(call.state().describe(), "connected");
        // The next drop resumes with the new token.
        call.handle_at(
            second,
            Event::ServerClosed {
                detail: "again".into(),
            },
        );
        let at = call.poll_timeout().unwrap();
        call.handle_at(at, Event::Timeout);
        assert!(matches!(
            &call.handle_at(at, Event::SignalingConnected)[..],
            [Action::Send(ClientMessage::Resume { resume_token, .. })] if resume_token == "token-2"
        ));
    }

    #[test]
    fn a_lost_address_reconnects_signaling_and_restarts_ice_without_waiting() {
        let t = Instant::now();
        let mut call = offerer_in_call(t);
        let moved = t + Duration::from_secs(5);
        // At once: a new signaling connection (the old one is bound to a gone address).
        assert_eq!(
            call.handle_at(moved, Event::NetworkChanged),
            [Action::ConnectSignaling]
        );
        assert!(matches!(call.state(), CallState::Reconnecting { .. }));
        call.handle_at(moved, Event::SignalingConnected);
        // The seat is back: ICE restarts then, not 2 s later.
        let resumed = call.handle_at(
            moved + Duration::from_millis(100),
            Event::Server(ServerMessage::Joined {
                room: "r".into(),
                peer_id: "me".into(),
                members: 2,
                host: true,
                peers: Vec::new(),
                resume_token: Some("token-2".into()),
            }),
        );
        assert_eq!(resumed, [Action::RestartIce]);
        // The answerer restarts too when it is the one that moved.
        let mut call = answerer_in_call(t);
        assert_eq!(
            call.handle_at(moved, Event::NetworkChanged),
            [Action::ConnectSignaling]
        );
        call.handle_at(moved, Event::SignalingConnected);
        let resumed = call.handle_at(
            moved,
            Event::Server(ServerMessage::Joined {
                room: "r".into(),
                peer_id: "me".into(),
                members: 2,
                host: false,
                peers: Vec::new(),
                resume_token: Some("token-2".into()),
            }),
        );
        assert_eq!(resumed, [Action::RestartIce]);
        // Before the call is up, a network change is nobody's business.
        let mut idle = Call::new();
        assert!(idle.handle_at(t, Event::NetworkChanged).is_empty());
    }

    #[test]
    fn crossing_offers_are_settled_by_politeness() {
        let t = Instant::now();
        let offer = |sdp: &str| {
            Event::Server(ServerMessage::Offer {
                from: "p".into(),
                sdp: sdp.into(),
            })
        };
        let ours = |call: &mut Call| {
            call.handle(Event::LocalDescription {
                sdp: "ours".into(),
                role: Role::Offerer,
            })
        };
        // The offerer (impolite) keeps its offer and ignores theirs.
        let mut call = offerer_in_call(t);
        ours(&mut call);
        assert!(call.handle(offer("theirs")).is_empty());
        assert_eq!(
            call.handle(Event::Server(ServerMessage::Answer {
                from: "p".into(),
                sdp: "answer".into()
            })),
            [Action::RemoteAnswer("answer".into())]
        );
        // The answerer (polite) takes its own back and answers theirs.
        let mut call = answerer_in_call(t);
        ours(&mut call);
        assert_eq!(
            call.handle(offer("theirs")),
            [Action::RollbackOffer, Action::RemoteOffer("theirs".into())]
        );
        // Without a crossing, an offer is simply answered.
        assert_eq!(
            call.handle(offer("again")),
            [Action::RemoteOffer("again".into())]
        );
    }

    #[test]
    fn a_moved_client_restarts_ice_once_signaling_is_back_not_before() {
        let t = Instant::now();
        let mut call = offerer_in_call(t);
        // The network changed: both connections drop.
        call.handle_at(t, Event::Peer(PeerState::Disconnected));
        call.handle_at(
            t,
            Event::ServerClosed {
                detail: "gone".into(),
            },
        );
        // Restarting is due, but its offer could not get through: only reconnecting.
        let later = t + ICE_RESTART_AFTER + Duration::from_millis(100);
        assert_eq!(
            call.handle_at(later, Event::Timeout),
            [Action::ConnectSignaling]
        );
        assert!(
            call.poll_timeout().is_some_and(|d| d > later),
            "no busy deadline"
        );
        call.handle_at(later, Event::SignalingConnected);
        let resumed = call.handle(Event::Server(ServerMessage::Joined {
            room: "r".into(),
            peer_id: "me".into(),
            members: 2,
            host: true,
            peers: Vec::new(),
            resume_token: Some("token-2".into()),
        }));
        assert_eq!(
            resumed,
            [Action::RestartIce],
            "restart as soon as signaling is back"
        );
        // Two restart offers made while down: only the newest is sent.
        let mut call = offerer_in_call(t);
        call.handle_at(
            t,
            Event::ServerClosed {
                detail: "gone".into(),
            },
        );
        for sdp in ["first", "second"] {
            call.handle(Event::LocalDescription {
                sdp: sdp.into(),
                role: Role::Offerer,
            });
        }
        let at = call.poll_timeout().unwrap();
        call.handle_at(at, Event::Timeout);
        call.handle_at(at, Event::SignalingConnected);
        let resumed = call.handle(Event::Server(ServerMessage::Joined {
            room: "r".into(),
            peer_id: "me".into(),
            members: 2,
            host: true,
            peers: Vec::new(),
            resume_token: None,
        }));
        assert_eq!(
            resumed,
            [Action::Send(ClientMessage::Offer {
                sdp: "second".into()
            })]
        );
    }

    #[test]
    fn a_refused_resume_ends_the_call_and_an_old_server_just_goes_quiet() {
        let t = Instant::now();
        let mut call = offerer_in_call(t);
        call.handle_at(
            t,
            Event::ServerClosed {
                detail: "reset".into(),
            },
        );
        let at = call.poll_timeout().unwrap();
        call.handle_at(at, Event::Timeout);
        call.handle_at(at, Event::SignalingConnected);
        call.handle(Event::Server(ServerMessage::error(
            ErrorCode::ResumeFailed,
            "seat expired",
        )));
        assert!(matches!(
            call.state(),
            CallState::Ended(EndReason::ServerLost { detail }) if detail.contains("seat expired")
        ));

        // No resume token (an older server): the call goes on without signaling.
        let mut call = Call::new();
        call.handle_at(t, Event::IceServers(Vec::new()));
        start(&mut call);
        call.handle(Event::Server(ServerMessage::Joined {
            room: "r".into(),
            peer_id: "me".into(),
            members: 2,
            host: false,
            peers: Vec::new(),
            resume_token: None,
        }));
        call.handle(Event::Peer(PeerState::Connected));
        assert!(
            call.handle_at(
                t,
                Event::ServerClosed {
                    detail: "gone".into()
                }
            )
            .is_empty()
        );
        assert_eq!(call.poll_timeout(), None);
        assert_eq!(call.state().describe(), "connected");
    }

    #[test]
    fn chat_waits_for_the_channel_and_long_lines_are_cut() {
        let mut call = offerer_in_call(Instant::now());
        assert!(call.handle(Event::ChatTyped("early".into())).is_empty());
        assert_eq!(
            call.handle(Event::ChatOpen),
            [Action::SendChat("early".into())]
        );
        assert_eq!(
            call.handle(Event::ChatTyped("now".into())),
            [Action::SendChat("now".into())]
        );
        let flood = "é".repeat(MAX_CHAT_BYTES);
        match &call.handle(Event::ChatReceived(flood))[..] {
            [Action::ShowChat(text)] => {
                assert!(
                    text.len() <= MAX_CHAT_BYTES + '…'.len_utf8(),
                    "{}",
                    text.len()
                );
                assert!(text.ends_with('…'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn camera_and_microphone_switch_once_per_change() {
        let mut call = Call::new();
        assert!(call.camera_on() && call.microphone_on());
        assert_eq!(
            call.handle(Event::Camera(false)),
            [Action::SetCamera(false)]
        );
        assert!(call.handle(Event::Camera(false)).is_empty());
        assert!(!call.camera_on());
        assert_eq!(
            call.handle(Event::Microphone(false)),
            [Action::SetMicrophone(false)]
        );
        assert_eq!(
            call.handle(Event::Microphone(true)),
            [Action::SetMicrophone(true)]
        );
    }

    #[test]
    fn the_host_can_end_the_room() {
        let mut call = Call::new();
        start(&mut call);
        call.handle(joined(1));
        assert!(call.is_host());
        assert_eq!(
            call.handle(Event::EndRoom),
            vec![Action::Send(ClientMessage::EndRoom)]
        );
    }
}
