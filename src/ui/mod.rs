//! The desktop window (egui/eframe).
//!
//! - this module: [`App`], what the window knows (lobby values, the screen: lobby,
//!   call being set up or call, sign-in, the incoming call), its update step and what
//!   carries out each command (call, accept, hang up ...).
//! - [`command`]: [`UiCommand`], what a person asks for in a view.
//! - [`lobby`]: the lobby view: room or meeting id, name, server, device pickers with a
//!   live self-preview, **Call**; signing in for direct calls; the incoming-call dialog.
//! - [`in_call`]: the call view: remote video, picture-in-picture self-view, mute,
//!   camera off, hang up, end meeting, chat, stats overlay.
//! - [`video`]: pictures from the media threads into textures.
//! - `yuv_gl`: I420 planes as three textures, converted to RGB by a shader while egui
//!   draws (the desktop window's path; `--video-on-cpu` and the tests convert on the CPU).
//!
//! Each frame is one update step, then drawing ([`App::ui`]). The update step carries out
//! the commands the views returned in the last frame, picks up finished background work
//! and keeps the lobby's devices (self-preview, microphone meter) open as chosen. Views
//! only draw what is there and return [`UiCommand`]s.
//!
//! The UI never waits: calls, sign-in, device listing and opening the camera run on the
//! tokio runtime or on blocking threads; each frame the UI looks at their results without
//! blocking. Sessions and media threads wake the UI when there is
//! something new to draw, so an idle window does not redraw.

mod command;
mod in_call;
mod lobby;
pub mod video;
mod yuv_gl;

use std::time::Duration;

use eframe::egui;
use futures_util::FutureExt as _;
use tokio::task::JoinHandle;

use crate::call::presence::SignInError;
use crate::call::{
    self, AudioInput, CallState, Connection, Presence, PresenceEvent, SessionConfig, Target,
    VideoInput,
};
use crate::media::Devices;
use crate::media::audio::WavFile;
use crate::media::capture::Capture;
use crate::media::device::LoopPlayer;
use crate::media::picture::{Notify, PictureSlot};
use crate::meetings::{CreateRoomRequest, CreatedRoom, MeetingError};
use crate::signaling::protocol::validate_name;
pub use command::UiCommand;
use in_call::InCall;
use video::VideoTexture;

/// The ring of an incoming call, built into the binary from `assets/`.
pub const RING_WAV: &[u8] = include_bytes!("../../assets/ring.wav");
/// The window icon, from `assets/`.
pub const ICON_PNG: &[u8] = include_bytes!("../../assets/icon.png");

/// What the lobby remembers between runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Lobby {
    /// A room name, a meeting id or a join link.
    pub room: String,
    pub name: String,
    /// Empty: the default server (started in-process when none answers).
    pub server: String,
    /// Sent with "New meeting" to servers that require an API key (empty: none).
    pub api_key: String,
    pub video: VideoChoice,
    pub audio: AudioChoice,
    /// None: the default speaker.
    pub speaker: Option<String>,
    /// Whom "Call" rings in a direct call.
    pub call_to: String,
    /// Show the camera in the lobby.
    pub preview: bool,
    /// Which clean-up stages a microphone goes through (a test tone never does).
    pub processing: crate::media::processing::ProcessingSettings,
    /// Host tokens of the meetings created here, by room id: joining one of them with
    /// its token makes us its host (who may end it for both).
    pub host_tokens: std::collections::BTreeMap<String, String>,
}

impl Default for Lobby {
    fn default() -> Self {
        Lobby {
            room: String::new(),
            name: String::new(),
            server: String::new(),
            api_key: String::new(),
            video: VideoChoice::Camera(None),
            audio: AudioChoice::Microphone(None),
            speaker: None,
            call_to: String::new(),
            preview: true,
            processing: crate::media::processing::ProcessingSettings::ALL,
            host_tokens: std::collections::BTreeMap::new(),
        }
    }
}

impl Lobby {
    /// What a call from this lobby asks of its session, through `server`, to `target`:
    /// a pure function of the lobby's choices (the app adds its command-line settings).
    pub fn session_config(&self, server: &str, target: Target) -> SessionConfig {
        let mut config = SessionConfig::synthetic(server, "");
        config.target = target;
        config.name = Some(self.name.trim().to_owned()).filter(|n| !n.is_empty());
        config.video = self.video.input();
        config.audio = self.audio.input();
        config.processing = self.processing;
        config.play_audio = true;
        config.speaker = self.speaker.clone();
        config.show_video = true;
        config
    }
}

/// The camera picker's value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VideoChoice {
    /// A camera by name (None: the first one).
    Camera(Option<String>),
    TestPattern,
}

/// The microphone picker's value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AudioChoice {
    /// A microphone by name (None: the default one).
    Microphone(Option<String>),
    Tone,
}

impl AudioChoice {
    fn input(&self) -> AudioInput {
        match self {
            AudioChoice::Microphone(name) => AudioInput::Microphone(name.clone()),
            AudioChoice::Tone => AudioInput::Sine(440.0),
        }
    }
}

impl VideoChoice {
    fn input(&self) -> VideoInput {
        match self {
            VideoChoice::Camera(name) => VideoInput::Camera(name.clone()),
            VideoChoice::TestPattern => VideoInput::TestPattern {
                width: 640,
                height: 360,
                fps: 30.0,
                noisy: false,
            },
        }
    }
}

/// The room to join from what a person typed: a room name, a meeting id (any case,
/// with or without dashes), or a join link (`https://host/r/<id>`).
pub fn room_from_input(input: &str) -> String {
    signaling_server::ids::parse_room_ref(input).unwrap_or_default()
}

/// Creating a meeting, and the last one created.
struct Meetings {
    creating: Option<JoinHandle<CreateResult>>,
    last: Option<CreatedRoom>,
    schedule_open: bool,
    date: jiff::civil::Date,
    hour: u32,
    minute: u32,
    title: String,
}

type CreateResult = (
    Result<CreatedRoom, MeetingError>,
    Option<signaling_server::Server>,
);

/// Sign-in for direct calls.
enum SignIn {
    Out,
    Pending(JoinHandle<SignInResult>),
    In(Presence),
}

/// A call set up in the background (and the server it started, if any), or why not.
type SetUp = Result<(InCall, Option<signaling_server::Server>), String>;

type SignInResult = (
    Result<Presence, SignInError>,
    Option<signaling_server::Server>,
);

/// A call ringing us.
struct Ringing {
    call_id: String,
    from: String,
    /// Plays the ring until dropped (None: the ring sound is unusable).
    ring: Option<LoopPlayer>,
}

/// The lobby's live camera picture.
struct Preview {
    camera: Opened<VideoChoice, Capture>,
    slot: PictureSlot,
    texture: VideoTexture,
    /// The microphone's meter beside the self-preview.
    mic: Opened<AudioChoice, crate::media::level::SourceMeter>,
}

/// A device the lobby keeps open for the current choice (the self-preview's camera, the
/// meter's microphone): opened off the UI thread, reopened when the choice changes (the
/// old one released first), and closed when a call needs the device.
struct Opened<C, T> {
    choice: Option<C>,
    value: Option<T>,
    opening: Option<JoinHandle<(T, Option<String>)>>,
    /// Why what is open is not what was chosen (a fallback), or why opening failed.
    note: Option<String>,
}

impl<C: Clone + PartialEq + Send + 'static, T: Send + 'static> Opened<C, T> {
    fn new() -> Self {
        Opened {
            choice: None,
            value: None,
            opening: None,
            note: None,
        }
    }

    /// Makes `want` the open choice (None: nothing open); true when it changed and
    /// `open` was started on a blocking thread.
    fn choose(
        &mut self,
        runtime: &tokio::runtime::Handle,
        want: Option<C>,
        open: impl FnOnce(C) -> (T, Option<String>) + Send + 'static,
    ) -> bool {
        if want == self.choice {
            return false;
        }
        self.choice = want.clone();
        self.note = None;
        let old = self.value.take();
        if let Some(o) = self.opening.take() {
            o.abort();
        }
        self.opening = want.map(|choice| {
            runtime.spawn_blocking(move || {
                drop(old); // release the previous device first
                open(choice)
            })
        });
        true
    }

    /// Takes what a finished opening gave; `what` names the device in a failure note.
    fn poll(&mut self, what: &str) {
        if let Some(result) = take_finished(&mut self.opening) {
            match result {
                Ok((value, note)) => {
                    self.value = Some(value);
                    self.note = note;
                }
                Err(e) => self.note = Some(format!("{what} failed: {e}")),
            }
        }
    }

    /// Forgets the choice; the future releases the device (off the async threads).
    fn close(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.choice = None;
        let (value, opening) = (self.value.take(), self.opening.take());
        async move {
            if let Some(o) = opening {
                o.abort();
                if let Ok((value, _)) = o.await {
                    let _ = tokio::task::spawn_blocking(move || drop(value)).await;
                }
            }
            if let Some(value) = value {
                let _ = tokio::task::spawn_blocking(move || drop(value)).await;
            }
        }
    }
}

/// What the window shows: the lobby, a call being set up, or a call. One value, so a
/// call on screen and a call still being set up cannot both exist.
enum Screen {
    Lobby,
    /// A call being set up (server lookup, first connection); the call view shows
    /// "Finding the server" meanwhile.
    Connecting(JoinHandle<SetUp>),
    InCall(Box<InCall>),
}

/// The app.
pub struct App {
    pub lobby: Lobby,
    runtime: tokio::runtime::Handle,
    notify: Option<Notify>,
    screen: Screen,
    /// Shown in the lobby: why the last call ended or could not start.
    pub message: Option<String>,
    devices: Option<Devices>,
    listing: Option<JoinHandle<Devices>>,
    preview: Preview,
    meetings: Meetings,
    sign_in: SignIn,
    /// Sign in again after a call that used the signed-in connection.
    resume_sign_in: bool,
    ringing: Option<Ringing>,
    auto_call: bool,
    /// Open calls with the stats overlay showing.
    pub show_stats: bool,
    /// ICE servers added to the signaling server's list (`--ice-server`).
    pub extra_ice_servers: Vec<crate::signaling::protocol::IceServer>,
    /// Relay-only calls (`--relay-only`).
    pub relay_only: bool,
    /// Video is drawn by OpenGL (the window runs on glow), not converted on the CPU.
    gpu_video: bool,
    /// The test pattern's size when it is sent (`--video test-pattern:WxH`).
    pub pattern_size: Option<(usize, usize)>,
    /// The signaling server this app started (nothing answered on the default port); it
    /// runs until the app closes, since the other person is connected to it too.
    embedded_server: Option<signaling_server::Server>,
    /// What the views of the last frame asked for, carried out by the next update step.
    commands: Vec<UiCommand>,
}

impl App {
    pub fn new(runtime: tokio::runtime::Handle, lobby: Lobby) -> App {
        App {
            lobby,
            runtime,
            notify: None,
            screen: Screen::Lobby,
            message: None,
            devices: None,
            listing: None,
            preview: Preview {
                camera: Opened::new(),
                slot: PictureSlot::default(),
                texture: VideoTexture::new("preview", false),
                mic: Opened::new(),
            },
            meetings: Meetings {
                creating: None,
                last: None,
                schedule_open: false,
                date: jiff::Zoned::now().date(),
                hour: 9,
                minute: 0,
                title: String::new(),
            },
            sign_in: SignIn::Out,
            resume_sign_in: false,
            ringing: None,
            auto_call: false,
            show_stats: false,
            extra_ice_servers: Vec::new(),
            relay_only: false,
            gpu_video: false,
            pattern_size: None,
            embedded_server: None,
            commands: Vec::new(),
        }
    }

    /// Calls the lobby's room as soon as the window shows (`--auto-call`).
    /// Draws video with OpenGL from now on (the window runs on glow): the decoded
    /// planes go to the GPU as they are and a shader makes them RGB.
    pub fn draw_video_with_opengl(&mut self) {
        self.gpu_video = true;
        self.preview.texture = VideoTexture::new("preview", true);
    }

    pub fn call_on_start(&mut self) {
        self.auto_call = true;
    }

    /// Whether the call view is showing.
    pub fn in_call(&self) -> bool {
        !matches!(self.screen, Screen::Lobby)
    }

    /// Whether a call is ringing us (the dialog is showing).
    pub fn is_ringing(&self) -> bool {
        self.ringing.is_some()
    }

    /// The name we are signed in as, for direct calls.
    pub fn signed_in_as(&self) -> Option<&str> {
        match &self.sign_in {
            SignIn::In(p) => Some(p.name()),
            _ => None,
        }
    }

    fn name(&self) -> Option<String> {
        Some(self.lobby.name.trim().to_owned()).filter(|n| !n.is_empty())
    }

    /// Joins the lobby's room (or meeting), if the values are valid.
    pub fn start_call(&mut self) {
        let room = match validate_name("room", &room_from_input(&self.lobby.room)) {
            Ok(r) => r.to_owned(),
            Err(e) => {
                self.message = Some(format!(
                    "Enter a room name first ({}).",
                    e.message.trim_matches('`')
                ));
                return;
            }
        };
        if self.lobby.name.trim().chars().count() > 64 {
            self.message = Some("Your name can be at most 64 characters.".into());
            return;
        }
        let target = Target::Room {
            room: room.clone(),
            host_token: self.lobby.host_tokens.get(&room).cloned(),
        };
        self.begin(target, room, None);
    }

    /// Rings the person signed in as `lobby.call_to`.
    pub fn dial(&mut self) {
        let to = self.lobby.call_to.trim().to_owned();
        if let Err(e) = validate_name("name", &to) {
            self.message = Some(format!(
                "Enter the name of the person to call ({}).",
                e.message.trim_matches('`')
            ));
            return;
        }
        // The server wants the caller to hold a name: the signed-in connection, else
        // one claimed for this call.
        let connection = match std::mem::replace(&mut self.sign_in, SignIn::Out) {
            SignIn::In(p) => {
                self.resume_sign_in = true;
                Some(p.into_connection())
            }
            other => {
                self.sign_in = other;
                if self.name().is_none() {
                    self.message = Some("Enter your name first: they see who is calling.".into());
                    return;
                }
                None
            }
        };
        let title = format!("call with {to}");
        self.begin(Target::Dial { to }, title, connection);
    }

    /// Accepts the ringing call.
    pub fn accept(&mut self) {
        let Some(ringing) = self.ringing.take() else {
            return;
        };
        let SignIn::In(presence) = std::mem::replace(&mut self.sign_in, SignIn::Out) else {
            return;
        };
        self.resume_sign_in = true;
        let title = format!("call with {}", ringing.from);
        let target = Target::Accept {
            call_id: ringing.call_id,
        };
        self.begin(target, title, Some(presence.into_connection()));
    }

    /// Declines the ringing call (the caller is told).
    pub fn decline(&mut self) {
        if let Some(ringing) = self.ringing.take()
            && let SignIn::In(presence) = &self.sign_in
        {
            presence.decline(&ringing.call_id);
            self.message = Some(format!("You declined the call from {}.", ringing.from));
        }
    }

    /// Creates a meeting on the server: now (`scheduled` false) or at the date and time
    /// picked in the lobby (local time). Its id goes into the room field.
    pub fn create_meeting(&mut self, scheduled: bool) {
        let starts_at = if scheduled {
            let time = jiff::civil::Time::new(
                i8::try_from(self.meetings.hour).unwrap_or(0),
                i8::try_from(self.meetings.minute).unwrap_or(0),
                0,
                0,
            );
            let local = time.and_then(|t| {
                self.meetings
                    .date
                    .to_datetime(t)
                    .to_zoned(jiff::tz::TimeZone::system())
            });
            match local {
                Ok(t) => Some(
                    t.timestamp()
                        .round(jiff::Unit::Second)
                        .map_or_else(|_| t.timestamp().to_string(), |ts| ts.to_string()),
                ),
                Err(e) => {
                    self.message = Some(format!("That date and time cannot be used: {e}."));
                    return;
                }
            }
        } else {
            None
        };
        let title = self.meetings.title.trim().to_owned();
        let request = CreateRoomRequest {
            starts_at,
            title: (!title.is_empty()).then_some(title),
            ttl_s: None,
        };
        let server = self.lobby.server.clone();
        let api_key = Some(self.lobby.api_key.trim().to_owned()).filter(|k| !k.is_empty());
        let notify = self.notify.clone();
        self.message = None;
        self.meetings.creating = Some(self.runtime.spawn(async move {
            let result = match crate::signaling::resolve_server(Some(&server)).await {
                Ok((server, embedded)) => (
                    crate::meetings::create(&server, &request, api_key.as_deref()).await,
                    embedded,
                ),
                Err(e) => (Err(MeetingError::Unreachable(e.to_string())), None),
            };
            if let Some(n) = notify {
                n.notify();
            }
            result
        }));
    }

    /// Sets the "Schedule…" date and time (local), as the pickers would.
    pub fn set_schedule(&mut self, date: jiff::civil::Date, hour: u32, minute: u32) {
        self.meetings.schedule_open = true;
        (self.meetings.date, self.meetings.hour, self.meetings.minute) = (date, hour, minute);
    }

    /// The meeting created last (id, link, start), if any.
    pub fn created_meeting(&self) -> Option<&CreatedRoom> {
        self.meetings.last.as_ref()
    }

    /// Signs in as the lobby's name, to be reachable for direct calls.
    pub fn sign_in(&mut self) {
        let Some(name) = self.name() else {
            self.message = Some("Enter your name first: it is what others call.".into());
            return;
        };
        if let Err(e) = validate_name("name", &name) {
            self.message = Some(format!("That name cannot be used: {}.", e.message));
            return;
        }
        let server = self.lobby.server.clone();
        let notify = self.notify.clone();
        self.message = None;
        self.sign_in = SignIn::Pending(self.runtime.spawn(async move {
            let result = sign_in_with_retry(&server, &name, notify.clone()).await;
            if let Some(n) = notify {
                n.notify();
            }
            result
        }));
    }

    pub fn sign_out(&mut self) {
        self.sign_in = SignIn::Out;
        self.resume_sign_in = false;
        self.ringing = None;
    }

    /// Starts the session in the background; the call view shows at once.
    fn begin(&mut self, target: Target, title: String, connection: Option<Connection>) {
        self.message = None;
        // The camera and microphone are the session's now: close the lobby's first.
        let camera = self.preview.camera.close();
        self.preview.texture.clear();
        let mic = self.preview.mic.close();
        let lobby = self.lobby.clone();
        let notify = self.notify.clone();
        let show_stats = self.show_stats;
        let gpu_video = self.gpu_video;
        let pattern_size = self.pattern_size;
        let (extra_ice_servers, relay_only) = (self.extra_ice_servers.clone(), self.relay_only);
        self.screen = Screen::Connecting(self.runtime.spawn(async move {
            camera.await;
            mic.await;
            let (server, embedded) = if connection.is_some() {
                (lobby.server.clone(), None)
            } else {
                crate::signaling::resolve_server(Some(lobby.server.as_str()))
                    .await
                    .map_err(|e| format!("Cannot start a signaling server: {e}"))?
            };
            let mut config = lobby.session_config(&server, target);
            if let (VideoInput::TestPattern { width, height, .. }, Some((w, h))) =
                (&mut config.video, pattern_size)
            {
                (*width, *height) = (w, h);
            }
            config.extra_ice_servers = extra_ice_servers;
            config.relay_only = relay_only;
            config.notify = notify.clone();
            let session = call::start_on(config, connection);
            if let Some(n) = notify {
                n.notify();
            }
            Ok((InCall::new(session, title, show_stats, gpu_video), embedded))
        }));
    }

    /// Hangs up (the session finishes in the background) and returns to the lobby.
    pub fn hang_up(&mut self) {
        match std::mem::replace(&mut self.screen, Screen::Lobby) {
            Screen::InCall(c) => c.finish(&self.runtime),
            Screen::Connecting(task) => task.abort(),
            Screen::Lobby => {}
        }
        if std::mem::take(&mut self.resume_sign_in) {
            self.sign_in();
        }
    }

    /// One frame: the update step, then the views, drawn into the window's root `ui`.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.update(ui.ctx());
        self.commands = self.draw(ui);
        if !self.commands.is_empty() {
            // Carried out by the next frame's update step: let it come now.
            ui.ctx().request_repaint();
        }
    }

    /// The update step: the commands of the last frame, then the news of background work,
    /// then the lobby's devices as chosen.
    fn update(&mut self, ctx: &egui::Context) {
        if self.notify.is_none() {
            let ctx = ctx.clone();
            self.notify = Some(Notify::new(move || ctx.request_repaint()));
        }
        if std::mem::take(&mut self.auto_call) {
            self.commands.push(UiCommand::Call);
        }
        for command in std::mem::take(&mut self.commands) {
            self.apply(command);
        }
        self.poll();
        match &mut self.screen {
            Screen::Lobby => {
                self.ensure_devices_listed();
                self.update_preview(ctx);
                self.update_mic_meter(ctx);
            }
            Screen::InCall(call) => call.refresh(ctx),
            Screen::Connecting(_) => {}
        }
    }

    /// Draws the screen and the incoming-call dialog; what the person asked for.
    fn draw(&mut self, ui: &mut egui::Ui) -> Vec<UiCommand> {
        let mut commands = if self.in_call() {
            self.call_view(ui)
        } else {
            self.lobby_view(ui)
        };
        if self.ringing.is_some() {
            commands.extend(self.incoming_dialog(ui));
        }
        commands
    }

    /// Carries out one command.
    pub fn apply(&mut self, command: UiCommand) {
        match command {
            UiCommand::Call => self.start_call(),
            UiCommand::Dial => self.dial(),
            UiCommand::Accept => self.accept(),
            UiCommand::Decline => self.decline(),
            UiCommand::CreateMeeting { scheduled } => self.create_meeting(scheduled),
            UiCommand::SignIn => self.sign_in(),
            UiCommand::SignOut => self.sign_out(),
            UiCommand::HangUp => self.hang_up(),
            UiCommand::Session(c) => match &mut self.screen {
                Screen::InCall(call) => call.command(c),
                _ => tracing::debug!(command = ?c, "no call for a session command"),
            },
        }
    }

    /// Picks up finished background work and news from the session and sign-in.
    fn poll(&mut self) {
        let set_up = match &mut self.screen {
            Screen::Connecting(task) => finished(task),
            _ => None,
        };
        if let Some(call) = set_up {
            self.screen = Screen::Lobby;
            match call {
                Ok(Ok((mut call, embedded))) => {
                    // The lobby's device lists, for choosing another one mid-call.
                    call.set_devices(self.devices.clone().unwrap_or_default());
                    self.screen = Screen::InCall(Box::new(call));
                    self.keep_server(embedded);
                }
                Ok(Err(e)) => self.message = Some(e),
                Err(e) => self.message = Some(format!("Setting up the call failed: {e}")),
            }
        }
        let ended = match &self.screen {
            Screen::InCall(c) => match c.state() {
                CallState::Ended(reason) => Some(reason.to_string()),
                _ => None,
            },
            _ => None,
        };
        if let Some(reason) = ended {
            self.message = Some(format!("Call ended: {reason}."));
            self.hang_up();
        }
        if let Some(created) = take_finished(&mut self.meetings.creating) {
            let created = created.and_then(|(room, embedded)| {
                self.keep_server(embedded);
                room.map_err(|e| e.to_string())
            });
            match created {
                Ok(room) => {
                    self.lobby.room = room.room_id.clone();
                    self.lobby
                        .host_tokens
                        .insert(room.room_id.clone(), room.host_token.clone());
                    self.meetings.schedule_open = false;
                    self.meetings.last = Some(room);
                }
                Err(e) => self.message = Some(format!("Cannot create the meeting: {e}.")),
            }
        }
        if let Some(devices) = take_finished(&mut self.listing) {
            self.devices = Some(devices.unwrap_or_default());
        }
        let signed_in = match &mut self.sign_in {
            SignIn::Pending(task) => finished(task),
            _ => None,
        };
        if let Some(result) = signed_in {
            self.sign_in = SignIn::Out;
            let result = result.and_then(|(presence, embedded)| {
                self.keep_server(embedded);
                presence.map_err(|e| e.to_string())
            });
            match result {
                Ok(presence) => self.sign_in = SignIn::In(presence),
                Err(e) => self.message = Some(format!("Cannot sign in: {e}.")),
            }
        }
        let events = match &mut self.sign_in {
            SignIn::In(p) => p.poll(),
            _ => Vec::new(),
        };
        for event in events {
            self.presence_event(event);
        }
    }

    /// Keeps a signaling server this app started for as long as the app runs.
    fn keep_server(&mut self, started: Option<signaling_server::Server>) {
        if started.is_some() {
            self.embedded_server = started;
        }
    }

    fn presence_event(&mut self, event: PresenceEvent) {
        match event {
            PresenceEvent::IncomingCall { call_id, from } => {
                if self.in_call() || self.ringing.is_some() {
                    // Busy: the signed-in connection is not the one in the call.
                    if let SignIn::In(p) = &self.sign_in {
                        p.decline(&call_id);
                    }
                    return;
                }
                let ring = WavFile::from_bytes("ring.wav", RING_WAV)
                    .map(|sound| LoopPlayer::start(sound, self.lobby.speaker.as_deref()));
                if let Err(e) = &ring {
                    tracing::warn!(error = %e, "the built-in ring sound is unusable");
                }
                self.ringing = Some(Ringing {
                    call_id,
                    from,
                    ring: ring.ok(),
                });
            }
            PresenceEvent::CallCancelled { call_id } => {
                if let Some(r) = self.ringing.take_if(|r| r.call_id == call_id) {
                    self.message = Some(format!("Missed call from {}.", r.from));
                }
            }
            PresenceEvent::Lost { detail } => {
                self.sign_in = SignIn::Out;
                self.ringing = None;
                self.message = Some(format!(
                    "Signed out: the server connection ended ({detail})."
                ));
            }
        }
    }

    fn incoming_dialog(&mut self, root: &mut egui::Ui) -> Option<UiCommand> {
        let ringing = self.ringing.as_ref()?;
        let from = ringing.from.clone();
        let note = match &ringing.ring {
            Some(ring) => ring.problem().map(|p| format!("(ringing silently: {p})")),
            None => Some("(ringing silently)".to_owned()),
        };
        let mut answer = None;
        // Anchored at the top with a fixed width, the note under the buttons: a note
        // that appears a frame later (the ring cannot play) must not move the buttons
        // from under a click.
        egui::Window::new("Incoming call")
            .collapsible(false)
            .resizable(false)
            .anchor(egui::Align2::CENTER_TOP, egui::vec2(0.0, 120.0))
            .show(root.ctx(), |ui| {
                ui.set_width(300.0);
                ui.heading(format!("{from} is calling"));
                ui.horizontal(|ui| {
                    if ui.button("Accept").clicked() {
                        answer = Some(true);
                    }
                    if ui.button("Decline").clicked() {
                        answer = Some(false);
                    }
                });
                if let Some(n) = note {
                    ui.weak(n);
                }
            });
        answer.map(|yes| {
            if yes {
                UiCommand::Accept
            } else {
                UiCommand::Decline
            }
        })
    }
}

/// Like [`finished`], for an optional task, which is cleared once it has finished.
fn take_finished<T>(task: &mut Option<JoinHandle<T>>) -> Option<Result<T, String>> {
    let result = finished(task.as_mut()?)?;
    *task = None;
    Some(result)
}

/// The result of a finished task, without waiting; None while it runs.
fn finished<T>(task: &mut JoinHandle<T>) -> Option<Result<T, String>> {
    if !task.is_finished() {
        return None;
    }
    // It has finished, so this does not wait.
    task.now_or_never().map(|r| r.map_err(|e| e.to_string()))
}

/// Signs in (starting the in-process server when none answers); right after a call the
/// server may not have dropped our previous connection (which held the name) yet, so a
/// taken name is retried briefly.
async fn sign_in_with_retry(server: &str, name: &str, notify: Option<Notify>) -> SignInResult {
    let (server, embedded) = match crate::signaling::resolve_server(Some(server)).await {
        Ok(found) => found,
        Err(e) => return (Err(SignInError::Unreachable(e.to_string())), None),
    };
    let mut attempt = 0;
    loop {
        match Presence::sign_in(&server, name, notify.clone()).await {
            Err(SignInError::NameTaken(_)) if attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return (other, embedded),
        }
    }
}

/// eframe glue: persistence of the lobby.
pub struct DesktopApp {
    pub app: App,
}

pub const STORAGE_KEY: &str = "duet-lobby";

impl eframe::App for DesktopApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.app.ui(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, STORAGE_KEY, &self.app.lobby);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable as _;

    /// The app's views alone (no update step): what they ask for is kept, not done.
    struct Drawn {
        app: App,
        asked: Vec<UiCommand>,
    }

    fn views(app: App) -> Harness<'static, Drawn> {
        let mut harness = Harness::new_ui_state(
            |ui, d: &mut Drawn| {
                let asked = d.app.draw(ui);
                d.asked.extend(asked);
            },
            Drawn {
                app,
                asked: Vec::new(),
            },
        );
        harness.run_steps(2);
        harness
    }

    /// Clicks `label` (after the layout settled) and returns what the views asked for.
    fn click(harness: &mut Harness<'_, Drawn>, label: &str) -> Vec<UiCommand> {
        harness.run_steps(1);
        harness.state_mut().asked.clear();
        harness.get_by_label(label).click();
        harness.run_steps(1);
        std::mem::take(&mut harness.state_mut().asked)
    }

    #[test]
    fn each_lobby_control_asks_for_its_command_and_does_nothing_itself() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut harness = views(App::new(runtime.handle().clone(), Lobby::default()));
        assert_eq!(click(&mut harness, "Call"), [UiCommand::Call]);
        assert_eq!(click(&mut harness, "Ring"), [UiCommand::Dial]);
        assert_eq!(
            click(&mut harness, "Sign in (enter your name above)"),
            [UiCommand::SignIn]
        );
        assert_eq!(
            click(&mut harness, "New meeting"),
            [UiCommand::CreateMeeting { scheduled: false }]
        );
        assert_eq!(click(&mut harness, "Schedule…"), []);
        assert_eq!(
            click(&mut harness, "Create"),
            [UiCommand::CreateMeeting { scheduled: true }]
        );
        // Drawing alone started nothing: no call, no sign-in, no meeting, no listing.
        let app = &harness.state().app;
        assert!(matches!(app.screen, Screen::Lobby));
        assert!(matches!(app.sign_in, SignIn::Out));
        assert!(app.meetings.creating.is_none() && app.listing.is_none());
        assert!(app.message.is_none());
    }

    #[test]
    fn the_incoming_call_dialog_asks_to_accept_or_decline() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut app = App::new(runtime.handle().clone(), Lobby::default());
        app.ringing = Some(Ringing {
            call_id: "c1".into(),
            from: "ann".into(),
            ring: None,
        });
        let mut harness = views(app);
        assert_eq!(click(&mut harness, "Accept"), [UiCommand::Accept]);
        assert_eq!(click(&mut harness, "Decline"), [UiCommand::Decline]);
        assert!(harness.state().app.ringing.is_some(), "nothing done yet");
    }

    #[test]
    fn each_call_control_asks_for_its_command() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut app = App::new(runtime.handle().clone(), Lobby::default());
        // A call being set up: only Hang up.
        app.screen = Screen::Connecting(runtime.spawn(std::future::pending()));
        let mut harness = views(app);
        assert_eq!(click(&mut harness, "Hang up"), [UiCommand::HangUp]);
        // A call on screen (its server does not answer: the view is what matters).
        let session = {
            let _in_runtime = runtime.enter();
            call::start(SessionConfig::synthetic("127.0.0.1:9", "room"))
        };
        let call = InCall::new(session, "room".into(), false, false);
        harness.state_mut().app.screen = Screen::InCall(Box::new(call));
        harness.run_steps(2);
        assert_eq!(click(&mut harness, "Hang up"), [UiCommand::HangUp]);
        assert_eq!(
            click(&mut harness, "Mute microphone"),
            [UiCommand::Session(call::Command::Microphone(false))]
        );
        assert_eq!(
            click(&mut harness, "Camera off"),
            [UiCommand::Session(call::Command::Camera(false))]
        );
        // Chat, stats and devices open in the view itself.
        assert_eq!(click(&mut harness, "Chat"), []);
        harness.get_by_label("Send");
        if let Screen::InCall(c) = &mut harness.state_mut().app.screen {
            c.chat_input = " hello ".into();
        }
        assert_eq!(
            click(&mut harness, "Send"),
            [UiCommand::Session(call::Command::Chat("hello".into()))]
        );
        if let Screen::InCall(c) =
            std::mem::replace(&mut harness.state_mut().app.screen, Screen::Lobby)
        {
            c.finish(runtime.handle());
        }
    }

    #[test]
    fn rooms_from_names_ids_and_links() {
        assert_eq!(room_from_input(" standup "), "standup");
        assert_eq!(room_from_input("kxp-47qm-zt9-4fh"), "kxp-47qm-zt9-4fh");
        assert_eq!(room_from_input("KXP 47QM ZT9 4FH"), "kxp-47qm-zt9-4fh");
        assert_eq!(
            room_from_input("https://duet.example.org/r/kxp-47qm-zt9-4fh"),
            "kxp-47qm-zt9-4fh"
        );
        assert_eq!(
            room_from_input("http://127.0.0.1:8787/r/kxp-47qm-zt9-4fh/"),
            "kxp-47qm-zt9-4fh"
        );
    }

    #[test]
    fn the_lobby_says_what_a_call_asks_of_its_session() {
        let lobby = Lobby {
            name: "  ada ".into(),
            video: VideoChoice::TestPattern,
            audio: AudioChoice::Tone,
            speaker: Some("Desk speakers".into()),
            ..Lobby::default()
        };
        let target = Target::Room {
            room: "standup".into(),
            host_token: None,
        };
        let config = lobby.session_config("ws://127.0.0.1:8787/ws", target.clone());
        assert_eq!(config.server, "ws://127.0.0.1:8787/ws");
        assert_eq!(config.target, target);
        assert_eq!(config.name.as_deref(), Some("ada"));
        assert!(matches!(
            config.video,
            VideoInput::TestPattern {
                width: 640,
                height: 360,
                ..
            }
        ));
        assert!(matches!(config.audio, AudioInput::Sine(_)));
        assert_eq!(config.speaker.as_deref(), Some("Desk speakers"));
        assert!(config.play_audio && config.show_video);
        // A blank name is no name; a microphone gets the lobby's processing.
        let lobby = Lobby {
            name: "   ".into(),
            ..Lobby::default()
        };
        let config = lobby.session_config("ws://x/ws", target);
        assert_eq!(config.name, None);
        assert!(matches!(config.audio, AudioInput::Microphone(None)));
        assert_eq!(config.processing, lobby.processing);
    }

    #[test]
    fn assets_are_usable() {
        assert!(WavFile::from_bytes("ring.wav", RING_WAV).is_ok());
        assert!(eframe::icon_data::from_png_bytes(ICON_PNG).is_ok());
    }
}
