//! The desktop window (egui/eframe): a lobby (room, name, server, sources, **Call**)
//! and the call view (remote video, self state line, duration, **Hang up**).
//!
//! The UI never waits: a call is a [`call::SessionHandle`] running on the tokio runtime;
//! each frame the UI reads its state and newest decoded picture and sends commands
//! (hang up). Decoded frames are uploaded to one texture, only when a new one arrived.

use std::time::{Duration, Instant};

use eframe::egui;
use futures_util::FutureExt as _;

use crate::call::{self, AudioInput, CallState, SessionConfig, SessionHandle, VideoInput};
use crate::signaling::protocol::validate_name;

/// What the lobby remembers between runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lobby {
    pub room: String,
    pub name: String,
    /// Empty: the default server (started in-process when none answers).
    pub server: String,
    pub video: VideoChoice,
    pub audio: AudioChoice,
}

impl Default for Lobby {
    fn default() -> Self {
        Lobby {
            room: String::new(),
            name: String::new(),
            server: String::new(),
            video: VideoChoice::Camera,
            audio: AudioChoice::Microphone,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VideoChoice {
    Camera,
    TestPattern,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AudioChoice {
    Microphone,
    Tone,
}

/// A call in progress, as the UI sees it.
struct InCall {
    session: SessionHandle,
    room: String,
    started: Instant,
    texture: Option<egui::TextureHandle>,
    shown_frame: u64,
    /// Kept alive for the call when the app started the server itself.
    embedded_server: Option<signaling_server::Server>,
}

/// The app.
pub struct App {
    pub lobby: Lobby,
    runtime: tokio::runtime::Handle,
    call: Option<InCall>,
    /// A call being set up (server lookup), not yet on screen.
    pending: Option<tokio::task::JoinHandle<Result<InCall, String>>>,
    /// Shown in the lobby: why the last call ended or could not start.
    pub message: Option<String>,
}

impl App {
    pub fn new(runtime: tokio::runtime::Handle, lobby: Lobby) -> App {
        App {
            lobby,
            runtime,
            call: None,
            pending: None,
            message: None,
        }
    }

    /// Whether the call view is showing.
    pub fn in_call(&self) -> bool {
        self.call.is_some() || self.pending.is_some()
    }

    /// Starts a call with the lobby's values, if they are valid.
    pub fn start_call(&mut self) {
        let room = match validate_name("room", &self.lobby.room) {
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
        self.message = None;
        let lobby = self.lobby.clone();
        self.pending = Some(self.runtime.spawn(async move {
            let given = Some(lobby.server.as_str());
            let (server, embedded) = crate::signaling::resolve_server(given)
                .await
                .map_err(|e| format!("Cannot start a signaling server: {e}"))?;
            let mut config = SessionConfig::synthetic(&server, &room);
            config.name = Some(lobby.name.trim().to_owned()).filter(|n| !n.is_empty());
            config.video = match lobby.video {
                VideoChoice::Camera => VideoInput::Camera,
                VideoChoice::TestPattern => VideoInput::TestPattern {
                    width: 640,
                    height: 360,
                    fps: 30.0,
                    noisy: false,
                },
            };
            config.audio = match lobby.audio {
                AudioChoice::Microphone => AudioInput::Microphone,
                AudioChoice::Tone => AudioInput::Sine(440.0),
            };
            config.play_audio = true;
            Ok(InCall {
                session: call::start(config),
                room,
                started: Instant::now(),
                texture: None,
                shown_frame: 0,
                embedded_server: embedded,
            })
        }));
    }

    /// Hangs up (the session finishes in the background) and returns to the lobby.
    pub fn hang_up(&mut self) {
        if let Some(c) = self.call.take() {
            c.session.hang_up();
            self.runtime.spawn(async move {
                let _ = c.session.finished().await;
                if let Some(server) = c.embedded_server {
                    server.stop().await;
                }
            });
        }
        if let Some(p) = self.pending.take() {
            p.abort();
        }
    }

    /// One frame of UI, drawn into the window's root `ui`.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.poll();
        if self.in_call() {
            self.call_view(ui);
            ui.ctx().request_repaint_after(Duration::from_millis(15));
        } else {
            self.lobby_view(ui);
        }
    }

    /// Picks up a call that finished setting up, and a call that ended by itself.
    fn poll(&mut self) {
        if self.pending.as_ref().is_some_and(|p| p.is_finished())
            && let Some(p) = self.pending.take()
        {
            // It has finished, so this does not wait.
            match p.now_or_never() {
                Some(Ok(Ok(call))) => self.call = Some(call),
                Some(Ok(Err(e))) => self.message = Some(e),
                _ => {}
            }
        }
        let ended = self.call.as_ref().and_then(|c| match c.session.state() {
            CallState::Ended(reason) => Some(reason.to_string()),
            _ => None,
        });
        if let Some(reason) = ended {
            self.message = Some(format!("Call ended: {reason}."));
            self.hang_up();
        }
    }

    fn lobby_view(&mut self, root: &mut egui::Ui) {
        egui::CentralPanel::default().show(root, |ui| {
            ui.heading("Duet");
            ui.label("Type a room name and press Call. Whoever joins the same room is called.");
            ui.add_space(8.0);
            egui::Grid::new("lobby").num_columns(2).show(ui, |ui| {
                let label = ui.label("Room");
                let room = ui
                    .add(
                        egui::TextEdit::singleline(&mut self.lobby.room)
                            .hint_text("e.g. standup")
                            .id_salt("room"),
                    )
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("Your name");
                ui.add(egui::TextEdit::singleline(&mut self.lobby.name).id_salt("name"))
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("Server");
                ui.add(
                    egui::TextEdit::singleline(&mut self.lobby.server)
                        .hint_text("built-in (127.0.0.1:8787)")
                        .id_salt("server"),
                )
                .labelled_by(label.id);
                ui.end_row();
                ui.label("Camera");
                ui.horizontal(|ui| {
                    ui.radio_value(&mut self.lobby.video, VideoChoice::Camera, "Camera");
                    ui.radio_value(
                        &mut self.lobby.video,
                        VideoChoice::TestPattern,
                        "Test pattern",
                    );
                });
                ui.end_row();
                ui.label("Microphone");
                ui.horizontal(|ui| {
                    ui.radio_value(&mut self.lobby.audio, AudioChoice::Microphone, "Microphone");
                    ui.radio_value(&mut self.lobby.audio, AudioChoice::Tone, "Test tone");
                });
                ui.end_row();
                if room.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                    self.start_call();
                }
            });
            ui.add_space(8.0);
            if ui.button("Call").clicked() {
                self.start_call();
            }
            if let Some(message) = &self.message {
                ui.add_space(8.0);
                ui.colored_label(ui.visuals().warn_fg_color, message);
            }
        });
    }

    fn call_view(&mut self, root: &mut egui::Ui) {
        let mut hang_up = false;
        let ctx = root.ctx().clone();
        egui::Panel::bottom("controls").show(root, |ui| {
            ui.horizontal(|ui| {
                if ui.button("Hang up").clicked() {
                    hang_up = true;
                }
                match &self.call {
                    Some(c) => {
                        let secs = c.started.elapsed().as_secs();
                        ui.label(format!(
                            "{} · {} · {:02}:{:02}",
                            c.room,
                            c.session.state().describe(),
                            secs / 60,
                            secs % 60
                        ));
                    }
                    None => {
                        ui.label("finding the server…");
                    }
                }
            });
        });
        egui::CentralPanel::default().show(root, |ui| {
            let Some(c) = self.call.as_mut() else {
                ui.centered_and_justified(|ui| ui.label("Connecting…"));
                return;
            };
            if let Some((n, frame)) = c.session.latest_frame().get()
                && n != c.shown_frame
            {
                c.shown_frame = n;
                let image = egui::ColorImage::from_rgba_unmultiplied(
                    [frame.width, frame.height],
                    &frame.to_rgba(),
                );
                match &mut c.texture {
                    Some(t) => t.set(image, egui::TextureOptions::LINEAR),
                    None => {
                        c.texture =
                            Some(ctx.load_texture("remote", image, egui::TextureOptions::LINEAR));
                    }
                }
            }
            match &c.texture {
                Some(t) => {
                    // Aspect-correct, as large as the window allows.
                    let size = t.size_vec2();
                    let avail = ui.available_size();
                    let scale = (avail.x / size.x).min(avail.y / size.y);
                    ui.centered_and_justified(|ui| {
                        ui.add(egui::Image::new((t.id(), size * scale)));
                    });
                }
                None => {
                    ui.centered_and_justified(|ui| {
                        ui.label(c.session.state().describe());
                    });
                }
            }
        });
        if hang_up {
            self.hang_up();
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
