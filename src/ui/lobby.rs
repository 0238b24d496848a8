//! The lobby: where a call starts.

use eframe::egui;

use super::{App, AudioChoice, SignIn, UiCommand, VideoChoice};
use crate::media::Devices;
use crate::media::capture::Capture;
use crate::media::level::SourceMeter;

impl App {
    /// The lobby; what the person asked for.
    pub(super) fn lobby_view(&mut self, root: &mut egui::Ui) -> Vec<UiCommand> {
        let mut commands = Vec::new();
        egui::Panel::right("preview")
            .resizable(false)
            .min_size(340.0)
            .show(root, |ui| self.preview_panel(ui));
        egui::CentralPanel::default().show(root, |ui| {
            ui.heading("Duet");
            ui.label(
                "Type a room name (or paste a meeting id or link) and press Call. \
                 Whoever joins the same room is called.",
            );
            ui.add_space(8.0);
            let mut enter = false;
            egui::Grid::new("lobby")
                .num_columns(2)
                .spacing([12.0, 6.0])
                .show(ui, |ui| {
                    let label = ui.label("Room");
                    let room = ui
                        .add(
                            egui::TextEdit::singleline(&mut self.lobby.room)
                                .hint_text("e.g. standup, or a meeting id / link")
                                .desired_width(260.0)
                                .id_salt("room"),
                        )
                        .labelled_by(label.id);
                    enter |= room.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                    ui.end_row();
                    let label = ui.label("Your name");
                    ui.add(
                        egui::TextEdit::singleline(&mut self.lobby.name)
                            .desired_width(260.0)
                            .id_salt("name"),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("Server");
                    ui.add(
                        egui::TextEdit::singleline(&mut self.lobby.server)
                            .hint_text("built-in (127.0.0.1:8787)")
                            .desired_width(260.0)
                            .id_salt("server"),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("API key");
                    ui.add(
                        egui::TextEdit::singleline(&mut self.lobby.api_key)
                            .password(true)
                            .hint_text("only if the server needs one for meetings")
                            .desired_width(260.0)
                            .id_salt("api_key"),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                    self.device_pickers(ui);
                });
            ui.add_space(8.0);
            let call = ui.add_sized([120.0, 32.0], egui::Button::new("Call"));
            if call.clicked() || enter {
                commands.push(UiCommand::Call);
            }
            ui.add_space(12.0);
            ui.separator();
            commands.extend(self.meetings_section(ui));
            ui.add_space(8.0);
            ui.separator();
            commands.extend(self.direct_calls(ui));
            if let Some(message) = &self.message {
                ui.add_space(8.0);
                ui.colored_label(ui.visuals().warn_fg_color, message);
            }
        });
        commands
    }

    /// Lists the devices once, on a blocking thread.
    pub(super) fn ensure_devices_listed(&mut self) {
        if self.devices.is_none() && self.listing.is_none() {
            let notify = self.notify.clone();
            self.listing = Some(self.runtime.spawn_blocking(move || {
                let devices = Devices::list();
                if let Some(n) = notify {
                    n.notify();
                }
                devices
            }));
        }
    }

    fn device_pickers(&mut self, ui: &mut egui::Ui) {
        let devices = self.devices.clone().unwrap_or_default();
        let listing = self.devices.is_none();
        let mut cameras = vec![(VideoChoice::Camera(None), "first camera".to_owned())];
        cameras.extend(
            devices
                .cameras
                .iter()
                .map(|n| (VideoChoice::Camera(Some(n.clone())), n.clone())),
        );
        cameras.push((VideoChoice::TestPattern, "test pattern".to_owned()));
        picker(ui, "Camera", &mut self.lobby.video, cameras);
        let mut microphones = vec![(
            AudioChoice::Microphone(None),
            "default microphone".to_owned(),
        )];
        microphones.extend(
            devices
                .microphones
                .iter()
                .map(|n| (AudioChoice::Microphone(Some(n.clone())), n.clone())),
        );
        microphones.push((AudioChoice::Tone, "test tone (440 Hz)".to_owned()));
        picker(ui, "Microphone", &mut self.lobby.audio, microphones);
        let mut speakers = vec![(None, "default speaker".to_owned())];
        speakers.extend(
            devices
                .speakers
                .iter()
                .map(|n| (Some(n.clone()), n.clone())),
        );
        picker(ui, "Speaker", &mut self.lobby.speaker, speakers);
        ui.label("Sound clean-up");
        ui.horizontal(|ui| {
            let p = &mut self.lobby.processing;
            ui.checkbox(&mut p.echo_cancellation, "Echo cancellation")
                .on_hover_text("Removes your speaker's sound from your microphone.");
            ui.checkbox(&mut p.noise_suppression, "Noise suppression")
                .on_hover_text("Quietens fans, keyboards and hum.");
            ui.checkbox(&mut p.auto_gain, "Automatic gain")
                .on_hover_text("Evens out a voice that is too quiet or too loud.");
        });
        ui.end_row();
        ui.label("");
        ui.horizontal(|ui| {
            if listing {
                ui.spinner();
                ui.weak("looking for devices…");
            } else {
                let summary = format!(
                    "{} camera(s), {} microphone(s), {} speaker(s) found",
                    devices.cameras.len(),
                    devices.microphones.len(),
                    devices.speakers.len()
                );
                ui.weak(summary);
                if ui.small_button("Refresh").clicked() {
                    self.devices = None;
                }
            }
        });
        ui.end_row();
    }

    /// Starts, restarts (another camera picked) or stops the lobby's self-preview.
    pub(super) fn update_preview(&mut self, ctx: &egui::Context) {
        let want = self.lobby.preview.then(|| self.lobby.video.clone());
        let slot = self.preview.slot.clone();
        let notify = self.notify.clone();
        // A fallback source (no camera: the test pattern) still previews; the note says why.
        let reopened = self
            .preview
            .camera
            .choose(&self.runtime, want, move |choice| {
                let mut warnings = Vec::new();
                let source = crate::media::sources::open_video(&choice.input(), &mut warnings);
                let capture = Capture::start(source);
                capture.preview_into(slot, notify.clone());
                if let Some(n) = notify {
                    n.notify();
                }
                (capture, warnings.pop())
            });
        if reopened {
            self.preview.texture.clear();
        }
        self.preview.camera.poll("preview");
        self.preview.texture.update(ctx, &self.preview.slot);
    }

    /// Starts, restarts (another microphone picked) or stops the lobby's microphone meter:
    /// it runs with the self-preview, so a person sees and hears themselves before a call.
    pub(super) fn update_mic_meter(&mut self, ctx: &egui::Context) {
        let want = self.lobby.preview.then(|| self.lobby.audio.clone());
        self.preview.mic.choose(&self.runtime, want, |choice| {
            let mut warnings = Vec::new();
            let source = crate::media::sources::open_audio(&choice.input(), &mut warnings);
            (SourceMeter::start(source), warnings.pop())
        });
        self.preview.mic.poll("microphone");
        if self.preview.mic.value.is_some() {
            // The bar moves ten times a second.
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
    }

    fn preview_panel(&mut self, ui: &mut egui::Ui) {
        ui.add_space(8.0);
        ui.checkbox(&mut self.lobby.preview, "Show my camera");
        let width = ui.available_width();
        let (rect, _) =
            ui.allocate_exact_size(egui::vec2(width, width * 9.0 / 16.0), egui::Sense::hover());
        ui.painter()
            .rect_filled(rect, 6.0, egui::Color32::from_gray(20));
        match self.preview.texture.fit(rect) {
            Some(r) => self.preview.texture.paint(ui, r),
            None => {
                let text = if self.lobby.preview {
                    "starting camera…"
                } else {
                    "preview off"
                };
                ui.painter().text(
                    rect.center(),
                    egui::Align2::CENTER_CENTER,
                    text,
                    egui::FontId::proportional(14.0),
                    egui::Color32::GRAY,
                );
            }
        }
        if let Some(note) = &self.preview.camera.note {
            ui.colored_label(ui.visuals().warn_fg_color, note);
        }
        if let Some(meter) = &self.preview.mic.value {
            let level = meter.level();
            ui.horizontal(|ui| {
                ui.label("Microphone");
                ui.add(
                    egui::ProgressBar::new(level.fraction())
                        .desired_width(160.0)
                        .desired_height(8.0),
                )
                .on_hover_text(format!("{:.0} dBFS", level.dbfs));
                if level.speaking {
                    ui.label("· hearing you");
                }
            });
            if let Some(problem) = meter.problem() {
                ui.colored_label(ui.visuals().warn_fg_color, problem);
            }
        }
        if let Some(note) = &self.preview.mic.note {
            ui.colored_label(ui.visuals().warn_fg_color, note);
        }
    }

    fn direct_calls(&mut self, ui: &mut egui::Ui) -> Option<UiCommand> {
        let mut command = None;
        ui.strong("Direct calls");
        match &self.sign_in {
            SignIn::Out => {
                ui.horizontal(|ui| {
                    let label = if self.lobby.name.trim().is_empty() {
                        "Sign in (enter your name above)".to_owned()
                    } else {
                        format!("Sign in as {}", self.lobby.name.trim())
                    };
                    if ui.button(label).clicked() {
                        command = Some(UiCommand::SignIn);
                    }
                    ui.weak("so others can call you by name");
                });
            }
            SignIn::Pending(_) => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("signing in…");
                });
            }
            SignIn::In(p) => {
                let name = p.name().to_owned();
                ui.horizontal(|ui| {
                    ui.label(format!("Signed in as {name}: others can call you."));
                    if ui.small_button("Sign out").clicked() {
                        command = Some(UiCommand::SignOut);
                    }
                });
            }
        }
        ui.horizontal(|ui| {
            let label = ui.label("Person to call");
            let field = ui
                .add(
                    egui::TextEdit::singleline(&mut self.lobby.call_to)
                        .hint_text("their name")
                        .desired_width(180.0)
                        .id_salt("call_to"),
                )
                .labelled_by(label.id);
            let enter = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Ring").clicked() || enter {
                command = Some(UiCommand::Dial);
            }
        });
        command
    }

    fn meetings_section(&mut self, ui: &mut egui::Ui) -> Option<UiCommand> {
        let mut command = None;
        ui.strong("Meetings");
        let creating = self.meetings.creating.is_some();
        ui.horizontal(|ui| {
            ui.add_enabled_ui(!creating, |ui| {
                if ui
                    .button("New meeting")
                    .on_hover_text("A meeting id to share; you are its host")
                    .clicked()
                {
                    command = Some(UiCommand::CreateMeeting { scheduled: false });
                }
                ui.toggle_value(&mut self.meetings.schedule_open, "Schedule…");
            });
            if creating {
                ui.spinner();
            }
        });
        if self.meetings.schedule_open {
            ui.horizontal(|ui| {
                ui.label("Date");
                ui.add(
                    egui_extras::DatePickerButton::new(&mut self.meetings.date)
                        .id_salt("date")
                        .show_icon(false),
                );
                ui.label("Time");
                ui.add(
                    egui::DragValue::new(&mut self.meetings.hour)
                        .range(0..=23)
                        .custom_formatter(|v, _| format!("{v:02}")),
                );
                ui.label(":");
                ui.add(
                    egui::DragValue::new(&mut self.meetings.minute)
                        .range(0..=59)
                        .custom_formatter(|v, _| format!("{v:02}")),
                );
            });
            ui.horizontal(|ui| {
                let label = ui.label("Title");
                ui.add(
                    egui::TextEdit::singleline(&mut self.meetings.title)
                        .hint_text("optional")
                        .desired_width(200.0)
                        .id_salt("meeting_title"),
                )
                .labelled_by(label.id);
                if ui
                    .add_enabled(!creating, egui::Button::new("Create"))
                    .clicked()
                {
                    command = Some(UiCommand::CreateMeeting { scheduled: true });
                }
            });
        }
        if let Some(room) = self.meetings.last.clone() {
            ui.horizontal(|ui| {
                ui.label(format!("Meeting {}", room.room_id));
                if ui.small_button("Copy id").clicked() {
                    ui.ctx().copy_text(room.room_id.clone());
                }
                if ui.small_button("Copy link").clicked() {
                    ui.ctx().copy_text(room.join_url.clone());
                }
            });
            let starts = room
                .starts_at
                .parse::<jiff::Timestamp>()
                .map(|t| {
                    t.to_zoned(jiff::tz::TimeZone::system())
                        .strftime("%a %-d %b %Y, %H:%M")
                        .to_string()
                })
                .unwrap_or(room.starts_at.clone());
            ui.weak(format!(
                "starts {starts} · share the id or link · you are its host: press Call to join"
            ));
        }
        command
    }
}

/// One labelled row of the device grid: a drop-down of `choices` (value, text). A value
/// remembered from an earlier run whose device is gone stays selected, shown as missing.
fn picker<T: Clone + PartialEq>(
    ui: &mut egui::Ui,
    label: &str,
    value: &mut T,
    choices: Vec<(T, String)>,
) {
    let label = ui.label(label);
    let selected = choices
        .iter()
        .find(|(v, _)| v == value)
        .map_or_else(|| "(not found)".to_owned(), |(_, text)| text.clone());
    egui::ComboBox::from_id_salt(label.id)
        .selected_text(selected)
        .width(260.0)
        .show_ui(ui, |ui| {
            for (choice, text) in choices {
                ui.selectable_value(value, choice, text);
            }
        })
        .response
        .labelled_by(label.id);
    ui.end_row();
}
