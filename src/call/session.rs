//! `call::Session`: one call, end to end. It owns the signaling connection, the
//! [`Call`] state machine, the [`Peer`] and the media [`Pipelines`], runs the machine's
//! actions, and publishes the state for observers (UI, headless command, tests).
//!
//! Everything runs on one task that reacts to inputs (server messages, peer events,
//! user commands) one at a time, so the order of signaling operations is exactly the
//! order of events: no locks around the peer connection.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::media::{MediaStats, Pipelines, ReceiveSinks, StatsHandle};
use super::peer::{Peer, PeerConfig, PeerEvent, PeerStats};
use super::state::{Action, Call, CallState, EndReason, Event, PeerState, Role};
use crate::media::audio::{AudioSink, AudioSource, NullSink, Sine, WavFile, WavSink};
use crate::media::camera::Camera;
use crate::media::capture::Capture;
use crate::media::device::{Microphone, Speaker};
use crate::media::h264::EncoderSettings;
use crate::media::picture::{Notify, PictureSlot};
use crate::media::video::{TestPattern, VideoFrame, VideoSource, Y4mFile, Y4mWriter};
use crate::signaling::protocol::{ClientMessage, IceServer, ServerMessage};
use crate::signaling::{Client, Incoming};

/// Which camera-like source to send.
#[derive(Debug, Clone, PartialEq)]
pub enum VideoInput {
    /// The camera with this name, or the first one (falls back to the test pattern, with
    /// a warning, if absent).
    Camera(Option<String>),
    TestPattern {
        width: usize,
        height: usize,
        fps: f64,
        noisy: bool,
    },
    File(PathBuf),
}

/// Which microphone-like source to send.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioInput {
    /// The microphone with this name, or the default one (falls back to a 440 Hz tone,
    /// with a warning, if absent).
    Microphone(Option<String>),
    Sine(f64),
    File(PathBuf),
}

/// Whom a session calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Join a room (its host when `host_token` is the room's token).
    Room {
        room: String,
        host_token: Option<String>,
    },
    /// Ring the person signed in as `to`.
    Dial { to: String },
    /// Take the call `call_id` that rang on the [`Connection`] given to [`start_on`].
    Accept { call_id: String },
}

impl Target {
    pub fn room(room: &str) -> Target {
        Target::Room {
            room: room.to_owned(),
            host_token: None,
        }
    }
}

/// An open signaling connection handed to a session (e.g. the one a person is signed in
/// on, which an incoming call rang).
pub struct Connection {
    pub client: Client,
    pub incoming: mpsc::UnboundedReceiver<Incoming>,
    /// From that connection's `welcome`.
    pub ice_servers: Vec<IceServer>,
    /// The connection already holds a name (`register`ed).
    pub registered: bool,
}

/// Everything a session needs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `HOST:PORT` or a `ws://` URL.
    pub server: String,
    pub target: Target,
    pub name: Option<String>,
    pub video: VideoInput,
    pub audio: AudioInput,
    pub encoder: EncoderSettings,
    /// Added to the server's `ice_servers`.
    pub extra_ice_servers: Vec<IceServer>,
    pub relay_only: bool,
    /// Gather a loopback candidate too (calls within one machine).
    pub loopback: bool,
    pub record_video: Option<PathBuf>,
    pub record_audio: Option<PathBuf>,
    /// Play received audio on the speaker (else it is only decoded/recorded).
    pub play_audio: bool,
    /// Speaker by name (None: the default one).
    pub speaker: Option<String>,
    /// Fill [`SessionHandle::local_picture`] and [`SessionHandle::remote_picture`] with
    /// RGBA pictures for a window (headless runs skip the conversion).
    pub show_video: bool,
    /// Called when there is something new to show (picture, state, chat).
    pub notify: Option<Notify>,
    /// The remote sends the test pattern: measure PSNR against it (`Some(noisy)`).
    pub reference_pattern: Option<bool>,
    /// Chat lines to send once the data channel is open.
    pub chat: Vec<String>,
    /// Testing aid: hold our offer/answer back this long (candidates go first).
    pub hold_description: Option<Duration>,
}

impl SessionConfig {
    /// A test-pattern + sine call into `room` on `server`.
    pub fn synthetic(server: &str, room: &str) -> SessionConfig {
        SessionConfig {
            server: server.to_owned(),
            target: Target::room(room),
            name: None,
            video: VideoInput::TestPattern {
                width: 640,
                height: 360,
                fps: 30.0,
                noisy: false,
            },
            audio: AudioInput::Sine(440.0),
            encoder: EncoderSettings::default(),
            extra_ice_servers: Vec::new(),
            relay_only: false,
            loopback: true,
            record_video: None,
            record_audio: None,
            play_audio: false,
            speaker: None,
            show_video: false,
            notify: None,
            reference_pattern: None,
            chat: Vec::new(),
            hold_description: None,
        }
    }
}

/// What the user can ask of a running session.
#[derive(Debug, Clone)]
pub enum Command {
    HangUp,
    Chat(String),
    /// Mute (false) or unmute the microphone: silence is sent while muted.
    Microphone(bool),
    /// Turn the camera off (false: the device is released, black frames are sent) or on.
    Camera(bool),
    /// The host ends the room for both.
    EndMeeting,
}

/// One line of the chat, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatLine {
    pub mine: bool,
    pub text: String,
}

/// What a UI shows besides the state; peer statistics refresh every second.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub is_host: bool,
    pub peer_name: Option<String>,
    pub peer: PeerStats,
    pub chat: Vec<ChatLine>,
    /// Devices that were missing or failed, and what is used instead.
    pub warnings: Vec<String>,
    /// What the camera-like source is, e.g. "test pattern 640x360".
    pub video_source: Option<String>,
    pub microphone_on: bool,
    pub camera_on: bool,
}

type LiveHandle = Arc<Mutex<Live>>;

fn lock_live(live: &LiveHandle) -> std::sync::MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running session.
pub struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<CallState>,
    stats: StatsHandle,
    live: LiveHandle,
    local: PictureSlot,
    remote: PictureSlot,
    task: tokio::task::JoinHandle<Report>,
}

impl SessionHandle {
    pub fn hang_up(&self) {
        let _ = self.commands.send(Command::HangUp);
    }

    pub fn chat(&self, text: &str) {
        let _ = self.commands.send(Command::Chat(text.to_owned()));
    }

    pub fn command(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// A copy of the live information (host, peer stats, chat, warnings).
    pub fn live(&self) -> Live {
        lock_live(&self.live).clone()
    }

    /// Our own video, for the self-view (when `show_video`).
    pub fn local_picture(&self) -> &PictureSlot {
        &self.local
    }

    /// The other person's video (when `show_video`).
    pub fn remote_picture(&self) -> &PictureSlot {
        &self.remote
    }

    /// The current state.
    pub fn state(&self) -> CallState {
        self.state.borrow().clone()
    }

    /// A receiver that changes with the state.
    pub fn watch_state(&self) -> watch::Receiver<CallState> {
        self.state.clone()
    }

    pub fn stats(&self) -> &StatsHandle {
        &self.stats
    }

    /// Waits until the state satisfies `f` (or the session ends); false on timeout.
    pub async fn wait_for(&self, timeout: Duration, f: impl Fn(&CallState) -> bool) -> bool {
        let mut rx = self.state.clone();
        tokio::time::timeout(timeout, async {
            loop {
                if f(&rx.borrow_and_update()) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return f(&rx.borrow());
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Waits for the session to end and returns its report.
    pub async fn finished(self) -> Report {
        match self.task.await {
            Ok(report) => report,
            Err(e) => Report::failed(format!("session task failed: {e}")),
        }
    }
}

/// Starts a session on the current tokio runtime, on a new signaling connection.
pub fn start(config: SessionConfig) -> SessionHandle {
    start_on(config, None)
}

/// Starts a session; with `connection`, on that open signaling connection.
pub fn start_on(config: SessionConfig, connection: Option<Connection>) -> SessionHandle {
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (state_tx, state) = watch::channel(CallState::Idle);
    let stats = StatsHandle::default();
    let live = Arc::new(Mutex::new(Live {
        microphone_on: true,
        camera_on: true,
        ..Live::default()
    }));
    let (local, remote) = (PictureSlot::default(), PictureSlot::default());
    let (frames_tx, frames_rx) = std::sync::mpsc::sync_channel(2);
    let session = Session {
        config,
        call: Call::new(),
        state_tx,
        stats: stats.clone(),
        live: live.clone(),
        local: local.clone(),
        remote: remote.clone(),
        capture: None,
        frames_tx,
        frames_rx: Some(frames_rx),
        mic_muted: Arc::new(AtomicBool::new(false)),
        client: None,
        peer: None,
        pipelines: Pipelines::new(),
        chat: None,
        chat_open: false,
        chat_queue: Vec::new(),
        media_started: false,
        last_peer_stats: PeerStats::default(),
        warnings: Vec::new(),
        sinks: None,
    };
    let task = tokio::spawn(session.run(command_rx, connection));
    SessionHandle {
        commands,
        state,
        stats,
        live,
        local,
        remote,
        task,
    }
}

enum Input {
    Signal(Incoming),
    Peer(PeerEvent),
    Command(Command),
    ChatOpen,
    ChatMessage(String),
    /// The video source opened (on a blocking thread), with any fallback warning.
    CaptureReady(Capture, Option<String>),
    /// Time to refresh the peer statistics.
    StatsTick,
}

struct Session {
    config: SessionConfig,
    call: Call,
    state_tx: watch::Sender<CallState>,
    stats: StatsHandle,
    live: LiveHandle,
    local: PictureSlot,
    remote: PictureSlot,
    /// The running video source; None while the camera is off (or still opening).
    capture: Option<Capture>,
    /// Captures feed the encoder through this channel (it outlives camera off/on).
    frames_tx: std::sync::mpsc::SyncSender<VideoFrame>,
    frames_rx: Option<std::sync::mpsc::Receiver<VideoFrame>>,
    mic_muted: Arc<AtomicBool>,
    client: Option<Client>,
    peer: Option<Peer>,
    pipelines: Pipelines,
    chat: Option<Arc<dyn DataChannel>>,
    chat_open: bool,
    chat_queue: Vec<String>,
    media_started: bool,
    last_peer_stats: PeerStats,
    warnings: Vec<String>,
    /// Built on the first remote track, shared by both; dropped at close, which
    /// finishes the recordings.
    sinks: Option<ReceiveSinks>,
}

impl Session {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        connection: Option<Connection>,
    ) -> Report {
        let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
        let (chat_tx, mut chat_rx) = mpsc::unbounded_channel::<Input>();
        self.chat_queue = self.config.chat.clone();
        self.open_capture(&chat_tx);
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let (connected, mut signal_rx, registered) = match connection {
            Some(c) => {
                self.client = Some(c.client);
                let welcome = ServerMessage::Welcome {
                    protocol: 1,
                    server: String::new(),
                    ice_servers: c.ice_servers,
                };
                self.apply(Event::Server(welcome), &peer_tx, &chat_tx).await;
                (Ok(()), c.incoming, c.registered)
            }
            None => {
                let (signal_tx, signal_rx) = mpsc::unbounded_channel();
                let connected = match Client::connect(&self.config.server, signal_tx).await {
                    Ok(client) => {
                        self.client = Some(client);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                };
                (connected, signal_rx, false)
            }
        };
        let first = match connected {
            Ok(()) => match self.config.target.clone() {
                Target::Room { room, host_token } => Event::Join {
                    room,
                    name: self.config.name.clone(),
                    host_token,
                },
                Target::Dial { to } => Event::Dial {
                    to,
                    register_as: if registered {
                        None
                    } else {
                        self.config.name.clone()
                    },
                },
                Target::Accept { call_id } => Event::Accept { call_id },
            },
            Err(detail) => Event::ServerClosed { detail },
        };
        self.apply(first, &peer_tx, &chat_tx).await;

        while !self.call.state().is_ended() {
            let input = tokio::select! {
                Some(i) = signal_rx.recv() => Input::Signal(i),
                Some(e) = peer_rx.recv() => Input::Peer(e),
                Some(i) = chat_rx.recv() => i,
                c = commands.recv() => Input::Command(c.unwrap_or(Command::HangUp)),
                _ = stats_tick.tick(), if self.peer.is_some() => Input::StatsTick,
            };
            self.input(input, &peer_tx, &chat_tx).await;
        }
        self.shut_down().await;
        self.report()
    }

    async fn input(
        &mut self,
        input: Input,
        peer_tx: &mpsc::UnboundedSender<PeerEvent>,
        chat_tx: &mpsc::UnboundedSender<Input>,
    ) {
        match input {
            Input::Signal(Incoming::Message(msg)) => {
                self.apply(Event::Server(msg), peer_tx, chat_tx).await;
            }
            Input::Signal(Incoming::Closed { detail }) => {
                self.apply(Event::ServerClosed { detail }, peer_tx, chat_tx)
                    .await;
            }
            Input::Peer(PeerEvent::LocalCandidate(c)) => {
                self.apply(Event::LocalCandidate(c), peer_tx, chat_tx).await;
            }
            Input::Peer(PeerEvent::State(state)) => {
                tracing::info!(%state, "peer connection");
                match state {
                    RTCPeerConnectionState::Connected => {
                        self.apply(Event::Peer(PeerState::Connected), peer_tx, chat_tx)
                            .await;
                        self.start_media();
                    }
                    RTCPeerConnectionState::Disconnected => {
                        self.apply(Event::Peer(PeerState::Disconnected), peer_tx, chat_tx)
                            .await;
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        self.apply(Event::Peer(PeerState::Failed), peer_tx, chat_tx)
                            .await;
                    }
                    _ => {}
                }
            }
            Input::Peer(PeerEvent::Track(track)) => {
                let sinks = self.receive_sinks();
                self.pipelines.start_receiver(track, sinks).await;
            }
            Input::Peer(PeerEvent::DataChannel(channel)) => {
                self.attach_chat(channel, chat_tx);
            }
            Input::ChatOpen => {
                self.chat_open = true;
                for line in std::mem::take(&mut self.chat_queue) {
                    self.send_chat(line).await;
                }
            }
            Input::ChatMessage(text) => {
                self.stats.lock().chat_received.push(text.clone());
                lock_live(&self.live)
                    .chat
                    .push(ChatLine { mine: false, text });
                self.notify();
            }
            Input::CaptureReady(capture, warning) => {
                if let Some(w) = warning {
                    self.warn(w);
                }
                lock_live(&self.live).video_source = Some(capture.describe().to_owned());
                if self.config.show_video {
                    capture.preview_into(self.local.clone(), self.config.notify.clone());
                }
                capture.feed_encoder(self.frames_tx.clone());
                if lock_live(&self.live).camera_on && !self.call.state().is_ended() {
                    self.capture = Some(capture);
                } else {
                    // Turned off (or hung up) while it was opening.
                    tokio::task::spawn_blocking(move || drop(capture));
                }
            }
            Input::StatsTick => {
                if let Some(peer) = self.peer.as_ref() {
                    let stats = peer.stats().await;
                    lock_live(&self.live).peer = stats;
                    self.notify();
                }
            }
            Input::Command(Command::Microphone(on)) => {
                self.mic_muted.store(!on, Ordering::Relaxed);
                lock_live(&self.live).microphone_on = on;
            }
            Input::Command(Command::Camera(on)) => {
                let was = std::mem::replace(&mut lock_live(&self.live).camera_on, on);
                if on && !was {
                    self.open_capture(chat_tx);
                } else if !on && let Some(capture) = self.capture.take() {
                    // Joining the camera thread may take a frame's time: off the runtime.
                    tokio::task::spawn_blocking(move || drop(capture));
                }
            }
            Input::Command(Command::EndMeeting) => {
                self.apply(Event::EndRoom, peer_tx, chat_tx).await;
            }
            Input::Command(Command::Chat(text)) => {
                if self.chat_open {
                    self.send_chat(text).await;
                } else {
                    self.chat_queue.push(text);
                }
            }
            Input::Command(Command::HangUp) => {
                self.apply(Event::HangUp, peer_tx, chat_tx).await;
            }
        }
    }

    /// Feeds the machine and carries out its actions (which may feed it again).
    async fn apply(
        &mut self,
        event: Event,
        peer_tx: &mpsc::UnboundedSender<PeerEvent>,
        chat_tx: &mpsc::UnboundedSender<Input>,
    ) {
        let mut pending = std::collections::VecDeque::from([event]);
        while let Some(event) = pending.pop_front() {
            let joined_both = matches!(
                &event,
                Event::Server(crate::signaling::protocol::ServerMessage::PeerJoined { .. })
                    | Event::Server(crate::signaling::protocol::ServerMessage::Joined {
                        members: 2,
                        ..
                    })
            );
            for action in self.call.handle(event) {
                if let Some(next) = self.act(action, peer_tx, chat_tx).await {
                    pending.push_back(next);
                }
            }
            {
                let mut live = lock_live(&self.live);
                live.is_host = self.call.is_host();
                live.peer_name = self.call.peer_name().map(str::to_owned);
            }
            if joined_both {
                self.stats
                    .lock()
                    .both_in_room_at
                    .get_or_insert(Instant::now());
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let state = self.call.state().clone();
        let changed = self.state_tx.send_if_modified(|current| {
            if *current == state {
                false
            } else {
                *current = state;
                true
            }
        });
        if changed {
            self.notify();
        }
    }

    fn notify(&self) {
        if let Some(n) = &self.config.notify {
            n.notify();
        }
    }

    fn warn(&mut self, warning: String) {
        tracing::warn!("{warning}");
        lock_live(&self.live).warnings.push(warning.clone());
        self.warnings.push(warning);
        self.notify();
    }

    /// Opens the video source on a blocking thread (a camera takes a while); it arrives
    /// as [`Input::CaptureReady`].
    fn open_capture(&self, chat_tx: &mpsc::UnboundedSender<Input>) {
        let input = self.config.video.clone();
        let tx = chat_tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut warnings = Vec::new();
            let source = open_video(&input, &mut warnings);
            let capture = Capture::start(source);
            let _ = tx.send(Input::CaptureReady(capture, warnings.pop()));
        });
    }

    async fn act(
        &mut self,
        action: Action,
        peer_tx: &mpsc::UnboundedSender<PeerEvent>,
        chat_tx: &mpsc::UnboundedSender<Input>,
    ) -> Option<Event> {
        match action {
            Action::Send(msg) => {
                self.send(msg);
                None
            }
            Action::StartPeer { role, ice_servers } => {
                let mut servers = ice_servers;
                servers.extend(self.config.extra_ice_servers.iter().cloned());
                let config = PeerConfig {
                    ice_servers: servers,
                    relay_only: self.config.relay_only,
                    loopback: self.config.loopback,
                };
                let mut peer = match Peer::new(role, &config, peer_tx.clone()).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot create the peer connection");
                        return Some(Event::Peer(PeerState::Failed));
                    }
                };
                if let Some(chat) = peer.chat.clone() {
                    self.attach_chat(chat, chat_tx);
                }
                let next = if role == Role::Offerer {
                    match peer.create_offer().await {
                        Ok(sdp) => Some(Event::LocalDescription { sdp, role }),
                        Err(e) => {
                            tracing::error!(error = %e, "creating the offer");
                            Some(Event::Peer(PeerState::Failed))
                        }
                    }
                } else {
                    None
                };
                self.peer = Some(peer);
                next
            }
            Action::RemoteOffer(sdp) => {
                let peer = self.peer.as_mut()?;
                match peer.accept_offer(sdp).await {
                    Ok(answer) => Some(Event::LocalDescription {
                        sdp: answer,
                        role: Role::Answerer,
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, "answering the offer");
                        Some(Event::Peer(PeerState::Failed))
                    }
                }
            }
            Action::RemoteAnswer(sdp) => {
                let peer = self.peer.as_mut()?;
                match peer.accept_answer(sdp).await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::error!(error = %e, "applying the answer");
                        Some(Event::Peer(PeerState::Failed))
                    }
                }
            }
            Action::RemoteCandidate(c) => {
                if let Some(peer) = self.peer.as_mut() {
                    peer.add_candidate(c).await;
                }
                None
            }
            Action::ClosePeer => {
                self.close_peer().await;
                None
            }
            Action::Disconnect => {
                self.client = None; // the writer sends what is queued (e.g. `leave`), then closes
                None
            }
        }
    }

    fn send(&mut self, msg: ClientMessage) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let hold = self.config.hold_description;
        match (&msg, hold) {
            (ClientMessage::Offer { .. } | ClientMessage::Answer { .. }, Some(delay)) => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = client.send(msg);
                });
            }
            _ => {
                let _ = client.send(msg);
            }
        }
    }

    fn attach_chat(
        &mut self,
        channel: Arc<dyn DataChannel>,
        chat_tx: &mpsc::UnboundedSender<Input>,
    ) {
        self.chat = Some(channel.clone());
        let tx = chat_tx.clone();
        // Ends when the peer connection closes (its event streams end).
        tokio::spawn(async move {
            while let Some(event) = channel.poll().await {
                let input = match event {
                    DataChannelEvent::OnOpen => Input::ChatOpen,
                    DataChannelEvent::OnMessage(m) => {
                        Input::ChatMessage(String::from_utf8_lossy(&m.data).into_owned())
                    }
                    DataChannelEvent::OnClose => break,
                    _ => continue,
                };
                if tx.send(input).is_err() {
                    break;
                }
            }
        });
    }

    async fn send_chat(&mut self, text: String) {
        let Some(chat) = self.chat.clone() else {
            self.chat_queue.push(text);
            return;
        };
        match chat.send_text(&text).await {
            Ok(()) => {
                self.stats.lock().chat_sent.push(text.clone());
                lock_live(&self.live)
                    .chat
                    .push(ChatLine { mine: true, text });
                self.notify();
            }
            Err(e) => tracing::warn!(error = %e, "sending a chat message"),
        }
    }

    fn receive_sinks(&mut self) -> ReceiveSinks {
        if let Some(sinks) = &self.sinks {
            return sinks.clone();
        }
        let record_video = self
            .config
            .record_video
            .as_ref()
            .map(|p| Arc::new(Mutex::new(Y4mWriter::new(p, 30))));
        let mut outputs: Vec<Box<dyn AudioSink>> = Vec::new();
        if let Some(path) = self.config.record_audio.as_ref() {
            match WavSink::create(path) {
                Ok(sink) => outputs.push(Box::new(sink)),
                Err(e) => self.warnings.push(format!("cannot record audio: {e}")),
            }
        }
        if self.config.play_audio {
            match Speaker::open(self.config.speaker.as_deref()) {
                Ok(speaker) => outputs.push(Box::new(speaker)),
                Err(e) => self.warn(format!("{e}; received audio is not played")),
            }
        }
        let audio: Box<dyn AudioSink> = match outputs.len() {
            0 => Box::new(NullSink),
            1 => outputs.remove(0),
            _ => Box::new(Tee(outputs)),
        };
        let sinks = ReceiveSinks {
            stats: self.stats.clone(),
            display: self
                .config
                .show_video
                .then(|| (self.remote.clone(), self.config.notify.clone())),
            record_video,
            audio: Some(Arc::new(Mutex::new(audio))),
            reference_pattern: self.config.reference_pattern,
        };
        self.sinks = Some(sinks.clone());
        sinks
    }

    fn start_media(&mut self) {
        if self.media_started {
            return;
        }
        let Some(peer) = self.peer.as_ref() else {
            return;
        };
        self.media_started = true;
        {
            let mut stats = self.stats.lock();
            stats.connected_after = Some(stats.started.elapsed());
        }
        let (video, audio) = (peer.video.clone(), peer.audio.clone());
        if let Some(frames) = self.frames_rx.take() {
            self.pipelines.start_video_sender(
                frames,
                self.config.encoder,
                video,
                self.stats.clone(),
            );
        }
        let mut warnings = Vec::new();
        let source = open_audio(&self.config.audio, &mut warnings);
        for w in warnings {
            self.warn(w);
        }
        self.pipelines.start_audio_sender(
            source,
            self.mic_muted.clone(),
            audio,
            self.stats.clone(),
        );
    }

    async fn close_peer(&mut self) {
        if let Some(peer) = self.peer.as_ref() {
            self.last_peer_stats = peer.stats().await;
            peer.close().await;
        }
        self.peer = None;
        self.chat = None;
        self.pipelines.stop().await;
        self.sinks = None;
    }

    async fn shut_down(&mut self) {
        self.close_peer().await;
        if let Some(capture) = self.capture.take() {
            let _ = tokio::task::spawn_blocking(move || drop(capture)).await;
        }
        self.client = None;
        self.publish();
    }

    fn report(&self) -> Report {
        Report::from_stats(
            &self.stats.lock(),
            &self.last_peer_stats,
            self.call.state(),
            &self.warnings,
        )
    }
}

/// Opens the configured video source; a broken file falls back to the test pattern
/// with a warning rather than failing the call.
pub fn open_video(input: &VideoInput, warnings: &mut Vec<String>) -> Box<dyn VideoSource> {
    match input {
        VideoInput::Camera(name) => match Camera::open(name.as_deref()) {
            Ok(camera) => Box::new(camera),
            Err(e) => {
                warnings.push(format!("{e}; sending the test pattern instead"));
                Box::new(TestPattern::new(640, 360, 30.0, false))
            }
        },
        VideoInput::TestPattern {
            width,
            height,
            fps,
            noisy,
        } => Box::new(TestPattern::new(*width, *height, *fps, *noisy)),
        VideoInput::File(path) => match Y4mFile::open(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                warnings.push(format!("{e}; sending the test pattern instead"));
                Box::new(TestPattern::new(640, 360, 30.0, false))
            }
        },
    }
}

/// Several sinks fed the same audio (e.g. speaker and recording).
struct Tee(Vec<Box<dyn AudioSink>>);

impl AudioSink for Tee {
    fn write(&mut self, pcm: &[i16]) -> Result<(), crate::media::MediaError> {
        for sink in &mut self.0 {
            sink.write(pcm)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.0.iter().map(|s| s.describe()).collect();
        names.join(" + ")
    }
}

fn open_audio(input: &AudioInput, warnings: &mut Vec<String>) -> Box<dyn AudioSource> {
    match input {
        AudioInput::Microphone(name) => match Microphone::open(name.as_deref()) {
            Ok(mic) => Box::new(mic),
            Err(e) => {
                warnings.push(format!("{e}; sending a 440 Hz tone instead"));
                Box::new(Sine::new(440.0))
            }
        },
        AudioInput::Sine(f) => Box::new(Sine::new(*f)),
        AudioInput::File(path) => match WavFile::open(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                warnings.push(format!("{e}; sending a 440 Hz tone instead"));
                Box::new(Sine::new(440.0))
            }
        },
    }
}

/// The JSON report of a call.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub end_reason: String,
    pub ended: Option<EndReason>,
    pub time_to_connected_ms: Option<f64>,
    pub time_to_first_frame_ms: Option<f64>,
    /// From both members being in the room to the first decoded frame.
    pub setup_to_first_frame_ms: Option<f64>,
    pub frames_sent: u64,
    pub frames_skipped_by_encoder: u64,
    pub keyframes_sent: u64,
    pub keyframe_requests_received: u64,
    pub frames_received: u64,
    pub frames_broken: u64,
    pub frames_decoded: u64,
    pub decoded_resolution: Option<(usize, usize)>,
    pub fps_received: Option<f64>,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub frames_with_strip: u64,
    pub frames_out_of_order: u64,
    pub frozen_frames: u64,
    pub lost_frames: u64,
    pub psnr_db_mean: Option<f64>,
    pub psnr_db_min: Option<f64>,
    pub encode_ms_p50: Option<f64>,
    pub decode_ms_p50: Option<f64>,
    pub audio_frames_sent: u64,
    pub audio_frames_decoded: u64,
    pub audio_frames_concealed: u64,
    pub audio_dominant_hz: Option<f64>,
    pub bitrate_sent_kbps: Option<f64>,
    pub bitrate_received_kbps: Option<f64>,
    pub rtt_ms: Option<f64>,
    /// The path: host, srflx or relay (relay when either end is a TURN relay).
    pub candidate_type: Option<String>,
    pub local_candidate_type: Option<String>,
    pub remote_candidate_type: Option<String>,
    pub packets_lost: u64,
    pub chat_sent: Vec<String>,
    pub chat_received: Vec<String>,
    pub warnings: Vec<String>,
    /// CPU of the whole process while in the call, percent of one core (headless only).
    pub process_cpu_percent: Option<f64>,
    /// Peak resident memory of the process, MiB (headless only).
    pub process_peak_rss_mib: Option<f64>,
}

fn percentile_ms(values_us: &[u32], p: f64) -> Option<f64> {
    if values_us.is_empty() {
        return None;
    }
    let mut v = values_us.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(f64::from(v[i]) / 1000.0)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

impl Report {
    fn failed(reason: String) -> Report {
        Report {
            end_reason: reason,
            ..Report::default()
        }
    }

    fn from_stats(
        s: &MediaStats,
        peer: &PeerStats,
        state: &CallState,
        warnings: &[String],
    ) -> Report {
        let (end_reason, ended) = match state {
            CallState::Ended(r) => (r.to_string(), Some(r.clone())),
            other => (other.describe(), None),
        };
        let active = match (s.first_decoded_at, s.last_decoded_at) {
            (Some(a), Some(b)) if b > a => Some(b - a),
            _ => None,
        };
        let media_secs = s
            .connected_after
            .map(|c| s.started.elapsed().saturating_sub(c).as_secs_f64())
            .filter(|&x| x > 0.0);
        Report {
            end_reason,
            ended,
            time_to_connected_ms: s.connected_after.map(ms),
            time_to_first_frame_ms: s.first_frame_after.map(ms),
            setup_to_first_frame_ms: match (s.both_in_room_at, s.first_decoded_at) {
                (Some(a), Some(b)) => Some(ms(b.saturating_duration_since(a))),
                _ => None,
            },
            frames_sent: s.video_frames_sent,
            frames_skipped_by_encoder: s.video_frames_skipped,
            keyframes_sent: s.keyframes_sent,
            keyframe_requests_received: s.keyframe_requests_received,
            frames_received: s.video_frames_received,
            frames_broken: s.video_frames_broken,
            frames_decoded: s.video_frames_decoded,
            decoded_resolution: (s.decoded_width > 0)
                .then_some((s.decoded_width, s.decoded_height)),
            fps_received: active.filter(|d| d.as_secs_f64() > 0.5).map(|d| {
                ((s.video_frames_decoded - 1) as f64 / d.as_secs_f64() * 10.0).round() / 10.0
            }),
            latency_ms_p50: percentile_ms(&s.latencies_us, 0.5),
            latency_ms_p95: percentile_ms(&s.latencies_us, 0.95),
            frames_with_strip: s.strip_frames,
            frames_out_of_order: s.frames_out_of_order,
            frozen_frames: s.frozen_frames,
            lost_frames: s.lost_frames,
            psnr_db_mean: (!s.psnr_db.is_empty())
                .then(|| s.psnr_db.iter().sum::<f64>() / s.psnr_db.len() as f64),
            psnr_db_min: s.psnr_db.iter().copied().reduce(f64::min),
            encode_ms_p50: percentile_ms(&s.encode_us, 0.5),
            decode_ms_p50: percentile_ms(&s.decode_us, 0.5),
            audio_frames_sent: s.audio_frames_sent,
            audio_frames_decoded: s.audio_frames_decoded,
            audio_frames_concealed: s.audio_frames_concealed,
            audio_dominant_hz: (s.audio_tail.len() >= 4800).then(|| {
                let tail: Vec<i16> = s.audio_tail.iter().copied().collect();
                crate::media::audio::dominant_frequency(&tail)
            }),
            bitrate_sent_kbps: media_secs
                .map(|t| (peer.bytes_sent as f64 * 8.0 / t / 1000.0).round()),
            bitrate_received_kbps: media_secs
                .map(|t| (peer.bytes_received as f64 * 8.0 / t / 1000.0).round()),
            rtt_ms: peer.rtt_ms,
            candidate_type: peer.candidate_type.clone(),
            local_candidate_type: peer.local_candidate_type.clone(),
            remote_candidate_type: peer.remote_candidate_type.clone(),
            packets_lost: peer.packets_lost,
            chat_sent: s.chat_sent.clone(),
            chat_received: s.chat_received.clone(),
            warnings: warnings.to_vec(),
            process_cpu_percent: None,
            process_peak_rss_mib: None,
        }
    }
}
