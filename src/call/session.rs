//! `call::Session`: one call, end to end. It owns the signaling connection, the
//! [`Call`] state machine, the [`Peer`] and the media [`Pipelines`], runs the machine's
//! actions, and publishes the state for observers (UI, headless command, tests).
//!
//! Everything runs on one task that reacts to inputs (server messages, peer events,
//! user commands) one at a time, so the order of signaling operations is exactly the
//! order of events: no locks around the peer connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::config::{AudioInput, Connection, SessionConfig, Target};
use super::handle::{ChatLine, Command, Live, SessionHandle, Snapshot};
use super::pacer::QueueGuard;
use super::peer::{Peer, PeerConfig, PeerEvent, PeerEvents, PeerStats};
use super::pipelines::{Pipelines, ReceiveSinks, StatsHandle};
use super::repair::FecPolicy;
use super::report::Report;
use super::sleep_until;
use super::state::{Action, Call, Event, PeerState, Role};
use crate::media::audio::{AudioSink, NullSink, WavSink};
use crate::media::capture::{Capture, CapturedFrame};
use crate::media::device::Speaker;
use crate::media::live_device::{DeviceSwitch, LiveMicrophone, LiveSpeaker};
use crate::media::picture::PictureSlot;
use crate::media::processing::AudioProcessor;
use crate::media::sources::{Tee, open_audio, open_video};
use crate::media::video::Y4mWriter;
use crate::signaling::protocol::ClientMessage;
use crate::signaling::protocol::IceServer;
use crate::signaling::{Client, Incoming};

/// Starts a session on the current tokio runtime, on a new signaling connection.
pub fn start(config: SessionConfig) -> SessionHandle {
    start_on(config, None)
}

/// Starts a session; with `connection`, on that open signaling connection.
pub fn start_on(config: SessionConfig, connection: Option<Connection>) -> SessionHandle {
    let (commands, command_rx) = mpsc::unbounded_channel();
    let stats = StatsHandle::default();
    let call = Call::new();
    let live = Live {
        microphone_on: call.microphone_on(),
        camera_on: call.camera_on(),
        ..Live::default()
    };
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot {
        state: call.state().clone(),
        live: live.clone(),
        media: stats.lock().view(),
    }));
    let (local, remote) = (PictureSlot::default(), PictureSlot::default());
    let (frames_tx, frames_rx) = std::sync::mpsc::sync_channel(2);
    let session = Session {
        config,
        call,
        snapshot_tx,
        stats: stats.clone(),
        live,
        local: local.clone(),
        remote: remote.clone(),
        capture: None,
        frames_tx,
        frames_rx: Some(frames_rx),
        mic_muted: Arc::new(AtomicBool::new(false)),
        microphone: DeviceSwitch::default(),
        speaker: DeviceSwitch::default(),
        client: None,
        peer: None,
        peer_number: 0,
        fingerprint_corrupted: false,
        pipelines: Pipelines::new(),
        chat: None,
        held: std::collections::VecDeque::new(),
        addresses: super::peer::usable_addresses(),
        queue_guard: QueueGuard::default(),
        fec_policy: FecPolicy::default(),
        last_rtt: None,
        signal_tx: None,
        last_peer_stats: PeerStats::default(),
        warnings: Vec::new(),
        sinks: None,
        processor: None,
    };
    // One span per session: every log line of this call (and of the tasks it starts
    // inside it) says which room and which target it belongs to.
    let span = tracing::info_span!("session", target = ?session.config.target);
    let task = tokio::spawn(tracing::Instrument::instrument(
        session.run(command_rx, connection),
        span,
    ));
    SessionHandle {
        commands,
        snapshot,
        stats,
        local,
        remote,
        task,
    }
}

enum Input {
    Signal(Incoming),
    Peer(u64, PeerEvent),
    Command(Command),
    ChatOpen,
    ChatMessage(String),
    /// The video source opened (on a blocking thread), with any fallback warning.
    CaptureReady(Capture, Option<String>),
    /// Time to refresh the peer statistics.
    StatsTick,
    /// Time for a new snapshot of the media figures (published after every input).
    SnapshotTick,
    /// The call's deadline ([`Call::poll_timeout`]) has come.
    Timeout,
    /// A held-back description may go now.
    ReleaseHeld,
    /// A new signaling connection is open (to resume the seat).
    SignalingUp(Client),
}

struct Session {
    config: SessionConfig,
    call: Call,
    /// What a UI sees of the call, published by [`Session::publish`].
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    stats: StatsHandle,
    live: Live,
    local: PictureSlot,
    remote: PictureSlot,
    /// The running video source; None while the camera is off (or still opening).
    capture: Option<Capture>,
    /// Captures feed the encoder through this channel (it outlives camera off/on).
    frames_tx: std::sync::mpsc::SyncSender<CapturedFrame>,
    frames_rx: Option<std::sync::mpsc::Receiver<CapturedFrame>>,
    mic_muted: Arc<AtomicBool>,
    /// Choosing another microphone or speaker while the call runs, and what happened to
    /// the devices ([`crate::media::live_device`]).
    microphone: DeviceSwitch,
    speaker: DeviceSwitch,
    client: Option<Client>,
    peer: Option<Peer>,
    /// The number of the current peer connection (see [`PeerEvents`]).
    peer_number: u64,
    /// The wrong fingerprint of `corrupt_first_fingerprint` has been sent.
    fingerprint_corrupted: bool,
    pipelines: Pipelines,
    chat: Option<Arc<dyn DataChannel>>,
    /// Where a new signaling connection (resuming the seat) delivers.
    signal_tx: Option<mpsc::UnboundedSender<Incoming>>,
    /// Offers/answers held back by `hold_description` (a testing aid), with when they go.
    held: std::collections::VecDeque<(Instant, ClientMessage)>,
    last_peer_stats: PeerStats,
    /// Watches the round trip for a standing queue, with the last sample it saw.
    queue_guard: QueueGuard,
    fec_policy: FecPolicy,
    last_rtt: Option<Duration>,
    /// This machine's usable addresses at the last look (see [`super::peer::usable_addresses`]).
    addresses: std::collections::BTreeSet<std::net::IpAddr>,
    warnings: Vec<String>,
    /// Built on the first remote track, shared by both; dropped at close, which
    /// finishes the recordings.
    sinks: Option<ReceiveSinks>,
    /// The microphone's echo canceller etc., shared by the audio sender (near end) and
    /// receiver (far end); None when processing is off. Outlives reconnections.
    processor: Option<Arc<Mutex<AudioProcessor>>>,
}

impl Session {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        connection: Option<Connection>,
    ) -> Report {
        let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
        let (chat_tx, mut chat_rx) = mpsc::unbounded_channel::<Input>();
        for line in self.config.chat.clone() {
            self.apply(Event::ChatTyped(line), &peer_tx, &chat_tx).await;
        }
        self.open_capture(&chat_tx);
        // Statistics, and with them the congestion controller's estimate for the encoder,
        // twice a second.
        // Four times a second: the queue guard reacts to a round trip that grew within a
        // quarter second of the sample (the ICE keepalive measures it five times a second).
        let mut stats_tick = tokio::time::interval(Duration::from_millis(250));
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The media figures a UI shows (meters, rates) move ten times a second.
        let mut snapshot_tick = tokio::time::interval(Duration::from_millis(100));
        snapshot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // Everything the server says arrives on one channel, whichever connection (the
        // first, or one that resumes the seat after a drop) it came on.
        let (signal_tx, mut signal_rx) = mpsc::unbounded_channel();
        let (connected, registered) = match connection {
            Some(c) => {
                self.client = Some(c.client);
                self.apply(Event::IceServers(c.ice_servers), &peer_tx, &chat_tx)
                    .await;
                let (forward, mut incoming) = (signal_tx.clone(), c.incoming);
                tokio::spawn(async move {
                    while let Some(i) = incoming.recv().await {
                        if forward.send(i).is_err() {
                            break;
                        }
                    }
                });
                (Ok(()), c.registered)
            }
            None => {
                let connected = match Client::connect(&self.config.server, signal_tx.clone()).await
                {
                    Ok(client) => {
                        self.client = Some(client);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                };
                (connected, false)
            }
        };
        self.signal_tx = Some(signal_tx);
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
            let deadline = self.call.poll_timeout();
            let release = self.held.front().map(|(at, _)| *at);
            let input = tokio::select! {
                Some(i) = signal_rx.recv() => Input::Signal(i),
                Some((n, e)) = peer_rx.recv() => Input::Peer(n, e),
                Some(i) = chat_rx.recv() => i,
                c = commands.recv() => Input::Command(c.unwrap_or(Command::HangUp)),
                _ = stats_tick.tick(), if self.peer.is_some() => Input::StatsTick,
                _ = snapshot_tick.tick(), if self.peer.is_some() => Input::SnapshotTick,
                _ = sleep_until(deadline), if deadline.is_some() => Input::Timeout,
                _ = sleep_until(release), if release.is_some() => Input::ReleaseHeld,
            };
            self.input(input, &peer_tx, &chat_tx).await;
            self.publish();
        }
        self.shut_down().await;
        self.report()
    }

    async fn input(
        &mut self,
        input: Input,
        peer_tx: &PeerEvents,
        chat_tx: &mpsc::UnboundedSender<Input>,
    ) {
        match input {
            Input::Peer(number, event) if number != self.peer_number => {
                tracing::debug!(?event, "from a replaced peer connection; ignored");
            }
            Input::Signal(Incoming::Message(msg)) => {
                self.apply(Event::Server(msg), peer_tx, chat_tx).await;
            }
            Input::Signal(Incoming::Closed { detail }) => {
                self.apply(Event::ServerClosed { detail }, peer_tx, chat_tx)
                    .await;
            }
            Input::Peer(_, PeerEvent::LocalCandidate(c)) => {
                self.apply(Event::LocalCandidate(c), peer_tx, chat_tx).await;
            }
            Input::Peer(_, PeerEvent::State(state)) => {
                tracing::info!(%state, "peer connection");
                match state {
                    RTCPeerConnectionState::Connected => {
                        self.apply(Event::Peer(PeerState::Connected), peer_tx, chat_tx)
                            .await;
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
            Input::Peer(_, PeerEvent::PathFound) => {
                self.apply(Event::Peer(PeerState::PathFound), peer_tx, chat_tx)
                    .await;
            }
            Input::Peer(_, PeerEvent::Track(track)) => {
                let sinks = self.receive_sinks();
                self.pipelines.start_receiver(track, sinks).await;
            }
            Input::Peer(_, PeerEvent::DataChannel(channel)) => {
                self.attach_chat(channel, chat_tx);
            }
            Input::ChatOpen => self.apply(Event::ChatOpen, peer_tx, chat_tx).await,
            Input::ChatMessage(text) => {
                self.apply(Event::ChatReceived(text), peer_tx, chat_tx)
                    .await;
            }
            Input::Timeout => self.apply(Event::Timeout, peer_tx, chat_tx).await,
            Input::SignalingUp(client) => {
                if let Some(old) = self.client.replace(client) {
                    old.abandon();
                }
                self.apply(Event::SignalingConnected, peer_tx, chat_tx)
                    .await;
            }
            Input::ReleaseHeld => {
                let now = Instant::now();
                while self.held.front().is_some_and(|(at, _)| *at <= now) {
                    if let (Some((_, msg)), Some(client)) = (self.held.pop_front(), &self.client) {
                        let _ = client.send(msg);
                    }
                }
            }
            Input::CaptureReady(capture, warning) => {
                if let Some(w) = warning {
                    self.warn(w);
                }
                self.live.video_source = Some(capture.describe().to_owned());
                if self.config.show_video {
                    capture.preview_into(self.local.clone(), self.config.notify.clone());
                }
                capture.feed_encoder(self.frames_tx.clone());
                if self.call.camera_on() && !self.call.state().is_ended() {
                    self.capture = Some(capture);
                } else {
                    // Turned off (or hung up) while it was opening.
                    tokio::task::spawn_blocking(move || drop(capture));
                }
            }
            Input::SnapshotTick => {}
            Input::StatsTick => {
                // Devices lost or changed since the last tick.
                let device_news: Vec<String> = [&self.microphone, &self.speaker]
                    .iter()
                    .flat_map(|d| d.take_warnings())
                    .collect();
                for warning in device_news {
                    self.warn(warning);
                }
                self.live.microphone_device = self.microphone.using();
                self.live.speaker_device = self.speaker.using();
                // A lost address (a laptop changing networks) is acted on at once.
                let addresses = super::peer::usable_addresses();
                let lost = self.addresses.difference(&addresses).next().is_some();
                self.addresses = addresses;
                if lost {
                    self.apply(Event::NetworkChanged, peer_tx, chat_tx).await;
                }
                if let Some(peer) = self.peer.as_ref() {
                    let stats = peer.stats(&self.addresses).await;
                    self.stats.lock().record_second(&stats);
                    let now = Instant::now();
                    if let Some(rtt) = stats.rtt_ms.filter(|r| r.is_finite() && *r > 0.0) {
                        let rtt = Duration::from_secs_f64(rtt / 1000.0);
                        self.pipelines.set_rtt(rtt);
                        // A new round-trip sample (they come about once a second).
                        if self.last_rtt != Some(rtt) {
                            let remb = peer.pacer().remb_bps();
                            let ceiling = self.queue_guard.update(now, rtt, stats.bytes_sent, remb);
                            peer.set_send_ceiling(ceiling.map(|c| c.round() as u64));
                        }
                        self.last_rtt = Some(rtt);
                    }
                    // FEC as the loss the other side reports calls for; the video
                    // encoder gets that much less of the target.
                    let rtt = stats
                        .rtt_ms
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .map(|r| Duration::from_secs_f64(r / 1000.0));
                    let fec = self
                        .fec_policy
                        .update(now, stats.remote_loss.unwrap_or(0.0), rtt);
                    peer.set_fec_overhead(fec);
                    if let Some(target) = stats.target_bitrate_bps {
                        let estimate = stats.estimate_bitrate_bps.unwrap_or(target);
                        self.pipelines.set_send_bitrate(target, estimate, fec);
                    }
                    if let Some(loss) = stats.remote_loss {
                        self.pipelines.set_remote_loss(loss);
                    }
                    self.live.peer = stats;
                }
            }
            Input::Command(Command::Microphone(on)) => {
                self.apply(Event::Microphone(on), peer_tx, chat_tx).await;
            }
            Input::Command(Command::Camera(on)) => {
                self.apply(Event::Camera(on), peer_tx, chat_tx).await;
            }
            Input::Command(Command::UseMicrophone(name)) => self.microphone.choose(name),
            Input::Command(Command::UseSpeaker(name)) => self.speaker.choose(name),
            Input::Command(Command::EndMeeting) => {
                self.apply(Event::EndRoom, peer_tx, chat_tx).await;
            }
            Input::Command(Command::Chat(text)) => {
                self.apply(Event::ChatTyped(text), peer_tx, chat_tx).await;
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
        peer_tx: &PeerEvents,
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
            for action in self.call.handle_at(Instant::now(), event) {
                if let Some(next) = self.act(action, peer_tx, chat_tx).await {
                    pending.push_back(next);
                }
            }
            self.live.is_host = self.call.is_host();
            self.live.peer_name = self.call.peer_name().map(str::to_owned);
            self.live.microphone_on = self.call.microphone_on();
            self.live.camera_on = self.call.camera_on();
            if joined_both {
                self.stats
                    .lock()
                    .both_in_room_at
                    .get_or_insert(Instant::now());
            }
            self.publish();
        }
    }

    /// A new snapshot for the UI; the UI is woken when the state changed (it repaints
    /// on its own ten times a second while in a call).
    fn publish(&self) {
        let snapshot = Snapshot {
            state: self.call.state().clone(),
            live: self.live.clone(),
            media: self.stats.lock().view(),
        };
        // The UI is woken for what it shows at once: the state, and the microphone and
        // camera switches (their buttons read the snapshot).
        let changed = {
            let last = self.snapshot_tx.borrow();
            last.state != snapshot.state
                || last.live.microphone_on != snapshot.live.microphone_on
                || last.live.camera_on != snapshot.live.camera_on
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
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
        self.live.warnings.push(warning.clone());
        self.warnings.push(warning);
        self.publish();
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
        peer_tx: &PeerEvents,
        chat_tx: &mpsc::UnboundedSender<Input>,
    ) -> Option<Event> {
        match action {
            Action::Send(msg) => {
                self.send(msg);
                None
            }
            Action::StartPeer { role, ice_servers } => {
                self.start_peer(role, ice_servers, peer_tx, chat_tx).await
            }
            Action::FreshPeer { offer, ice_servers } => {
                tracing::info!(offer, "replacing the peer connection by a fresh one");
                self.stats.lock().fresh_connections += 1;
                // The devices, the received pictures' sinks (and recordings) stay; the
                // pipelines start again once the fresh connection is up.
                self.drop_peer().await;
                // What was learnt of the old path (its round trip, its queue, its loss)
                // is not the new one's.
                self.queue_guard = QueueGuard::default();
                self.fec_policy = FecPolicy::default();
                self.last_rtt = None;
                let role = if offer { Role::Offerer } else { Role::Answerer };
                self.start_peer(role, ice_servers, peer_tx, chat_tx).await
            }
            Action::RemoteOffer(sdp) => {
                let peer = self.peer.as_mut()?;
                match peer.accept_offer(sdp).await {
                    Ok(answer) => Some(Event::LocalDescription {
                        sdp: answer,
                        role: Role::Answerer,
                    }),
                    Err(e) => Some(Event::PeerFailed {
                        detail: format!("answering the offer: {e}"),
                    }),
                }
            }
            Action::RollbackOffer => {
                let peer = self.peer.as_mut()?;
                if let Err(e) = peer.rollback().await {
                    tracing::warn!(error = %e, "taking our offer back");
                }
                None
            }
            Action::RemoteAnswer(sdp) => {
                let peer = self.peer.as_mut()?;
                match peer.accept_answer(sdp).await {
                    Ok(()) => None,
                    Err(e) => Some(Event::PeerFailed {
                        detail: format!("applying the answer: {e}"),
                    }),
                }
            }
            Action::RemoteCandidate(c) => {
                if let Some(peer) = self.peer.as_mut() {
                    peer.add_candidate(c).await;
                }
                None
            }
            Action::ConnectSignaling => {
                // The old connection, if still open, is given up (it may be bound to an
                // address that is gone); its late end must not count against the new one.
                if let Some(old) = self.client.take() {
                    old.abandon();
                }
                // Off the loop: connecting may take seconds; media goes on meanwhile.
                let (server, tx, done) = (
                    self.config.server.clone(),
                    self.signal_tx.clone()?,
                    chat_tx.clone(),
                );
                tokio::spawn(async move {
                    match Client::connect(&server, tx.clone()).await {
                        Ok(client) => {
                            let _ = done.send(Input::SignalingUp(client));
                        }
                        Err(e) => {
                            let _ = tx.send(Incoming::Closed {
                                detail: e.to_string(),
                            });
                        }
                    }
                });
                None
            }
            Action::StartMedia => {
                self.start_media();
                None
            }
            Action::RestartIce => {
                let peer = self.peer.as_mut()?;
                tracing::info!("restarting ICE");
                self.stats.lock().ice_restarts += 1;
                match peer.restart_ice().await {
                    Ok(sdp) => Some(Event::LocalDescription {
                        sdp,
                        role: Role::Offerer,
                    }),
                    // Not fatal: the call retries, and gives up after its deadline.
                    Err(e) => {
                        tracing::warn!(error = %e, "ICE restart");
                        None
                    }
                }
            }
            Action::SendChat(text) => {
                self.send_chat(text).await;
                None
            }
            Action::ShowChat(text) => {
                self.stats.lock().chat_received.push(text.clone());
                self.live.chat.push(ChatLine { mine: false, text });
                trim_scrollback(&mut self.live.chat);
                self.publish();
                self.notify();
                None
            }
            Action::SetMicrophone(on) => {
                self.mic_muted.store(!on, Ordering::Relaxed);
                None
            }
            Action::SetCamera(true) => {
                self.open_capture(chat_tx);
                None
            }
            Action::SetCamera(false) => {
                if let Some(capture) = self.capture.take() {
                    // Joining the camera thread may take a frame's time: off the runtime.
                    tokio::task::spawn_blocking(move || drop(capture));
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

    /// Builds a peer connection (the offerer's also makes its offer, and the chat
    /// channel); its events arrive tagged with a new number.
    async fn start_peer(
        &mut self,
        role: Role,
        ice_servers: Vec<IceServer>,
        peer_tx: &PeerEvents,
        chat_tx: &mpsc::UnboundedSender<Input>,
    ) -> Option<Event> {
        let mut servers = ice_servers;
        servers.extend(self.config.extra_ice_servers.iter().cloned());
        let config = PeerConfig {
            ice_servers: servers,
            relay_only: self.config.relay_only,
            loopback: self.config.loopback,
        };
        self.peer_number += 1;
        let mut peer = match Peer::new(role, &config, self.peer_number, peer_tx.clone()).await {
            Ok(p) => p,
            Err(e) => {
                return Some(Event::PeerFailed {
                    detail: format!("cannot create the peer connection: {e}"),
                });
            }
        };
        if let Some(chat) = peer.chat.clone() {
            self.attach_chat(chat, chat_tx);
        }
        let next = if role == Role::Offerer {
            match peer.create_offer().await {
                Ok(sdp) => Some(Event::LocalDescription { sdp, role }),
                Err(e) => Some(Event::PeerFailed {
                    detail: format!("creating the offer: {e}"),
                }),
            }
        } else {
            None
        };
        self.peer = Some(peer);
        next
    }

    fn send(&mut self, msg: ClientMessage) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let mut msg = msg;
        if self.config.corrupt_first_fingerprint
            && !self.fingerprint_corrupted
            && let ClientMessage::Offer { sdp } | ClientMessage::Answer { sdp } = &mut msg
        {
            self.fingerprint_corrupted = true;
            *sdp = corrupt_fingerprint(sdp);
        }
        let hold = self.config.hold_description;
        match (&msg, hold) {
            (ClientMessage::Offer { .. } | ClientMessage::Answer { .. }, Some(delay)) => {
                // Released by the session loop (in order), not by a task of its own.
                self.held.push_back((Instant::now() + delay, msg));
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
            tracing::warn!("chat line without a chat channel; dropped");
            return;
        };
        match chat.send_text(&text).await {
            Ok(()) => {
                self.stats.lock().chat_sent.push(text.clone());
                self.live.chat.push(ChatLine { mine: true, text });
                trim_scrollback(&mut self.live.chat);
                self.publish();
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
                Ok(speaker) => outputs.push(Box::new(LiveSpeaker::new(
                    Box::new(speaker),
                    self.speaker.clone(),
                ))),
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
            far_end: self.audio_processor(),
        };
        self.sinks = Some(sinks.clone());
        sinks
    }

    /// The audio processor, created on first use when the config (or, by default, a real
    /// microphone) asks for one.
    fn audio_processor(&mut self) -> Option<Arc<Mutex<AudioProcessor>>> {
        let wanted = self
            .config
            .audio_processing
            .unwrap_or(matches!(self.config.audio, AudioInput::Microphone(_)));
        if !wanted {
            return None;
        }
        let processor = self.processor.get_or_insert_with(|| {
            Arc::new(Mutex::new(AudioProcessor::new(self.config.processing)))
        });
        Some(processor.clone())
    }

    fn start_media(&mut self) {
        let Some(peer) = self.peer.as_ref() else {
            return;
        };
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
                peer.pacer(),
                self.stats.clone(),
            );
        }
        let mut warnings = Vec::new();
        let mut source = open_audio(&self.config.audio, &mut warnings);
        if matches!(self.config.audio, AudioInput::Microphone(_)) {
            // A lost microphone is replaced, another can be chosen (even when the
            // configured one did not open and a tone stands in for it).
            source = Box::new(LiveMicrophone::new(source, self.microphone.clone()));
        }
        for w in warnings {
            self.warn(w);
        }
        let processor = self.audio_processor();
        self.pipelines.start_audio_sender(
            source,
            processor,
            self.mic_muted.clone(),
            audio,
            self.stats.clone(),
        );
    }

    async fn close_peer(&mut self) {
        if let Some(peer) = self.peer.as_ref() {
            self.last_peer_stats = peer.stats(&self.addresses).await;
        }
        self.drop_peer().await;
        self.sinks = None;
    }

    /// Closes the peer connection and stops the pipelines; the video frames channel is
    /// kept for the next ones.
    async fn drop_peer(&mut self) {
        if let Some(peer) = self.peer.take() {
            peer.close().await;
        }
        self.chat = None;
        if let Some(frames) = self.pipelines.stop().await {
            self.frames_rx = Some(frames);
        }
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
        self.stats.lock().signaling_resumes = self.call.resumes();
        let processing = self.processor.as_ref().map(|p| {
            let p = p.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (p.settings(), p.statistics())
        });
        Report::from_stats(
            &self.stats.lock(),
            &self.last_peer_stats,
            self.call.state(),
            &self.warnings,
            processing,
        )
    }
}

/// The description with its DTLS fingerprint changed (the testing aid
/// `corrupt_first_fingerprint`): every hex digit of each fingerprint inverted.
fn corrupt_fingerprint(sdp: &str) -> String {
    sdp.split_inclusive('\n')
        .map(|line| {
            let parts = line
                .strip_prefix("a=fingerprint:")
                .and_then(|rest| rest.split_once(' '));
            match parts {
                Some((algorithm, hex)) => {
                    let flipped: String = hex
                        .chars()
                        .map(|c| {
                            c.to_digit(16)
                                .and_then(|d| char::from_digit(15 - d, 16))
                                .map_or(c, |h| h.to_ascii_uppercase())
                        })
                        .collect();
                    format!("a=fingerprint:{algorithm} {flipped}")
                }
                None => line.to_owned(),
            }
        })
        .collect()
}

/// The chat keeps this many lines on screen (older ones scroll away for good).
const CHAT_SCROLLBACK: usize = 500;

fn trim_scrollback(chat: &mut Vec<ChatLine>) {
    let excess = chat.len().saturating_sub(CHAT_SCROLLBACK);
    chat.drain(..excess);
}
