//! The call view: the other person large, us small, the controls, chat and stats.

use std::time::{Duration, Instant};

use eframe::egui;

use super::video::VideoTexture;
use super::{App, UiCommand};
use std::sync::Arc;

use crate::call::{CallState, Command, SessionHandle, Snapshot};

/// A call on screen.
pub struct InCall {
    session: SessionHandle,
    title: String,
    started: Instant,
    remote: VideoTexture,
    local: VideoTexture,
    show_chat: bool,
    show_stats: bool,
    /// The microphone and speaker pickers are open, with the devices to offer.
    show_devices: bool,
    devices: crate::media::Devices,
    pub(super) chat_input: String,
    chat_seen: usize,
    rates: Rates,
    /// The call as this frame shows it (taken once per frame).
    now: Arc<Snapshot>,
}

/// Per-second rates for the stats overlay, from counters sampled once a second.
#[derive(Default)]
struct Rates {
    at: Option<Instant>,
    frames: u64,
    bytes_in: u64,
    bytes_out: u64,
    fps: f64,
    kbps_in: f64,
    kbps_out: f64,
}

impl Rates {
    fn sample(&mut self, frames: u64, bytes_in: u64, bytes_out: u64) {
        let now = Instant::now();
        match self.at {
            Some(at) if now - at < Duration::from_secs(1) => return,
            Some(at) => {
                let secs = (now - at).as_secs_f64();
                self.fps = frames.saturating_sub(self.frames) as f64 / secs;
                self.kbps_in = bytes_in.saturating_sub(self.bytes_in) as f64 * 8.0 / secs / 1e3;
                self.kbps_out = bytes_out.saturating_sub(self.bytes_out) as f64 * 8.0 / secs / 1e3;
            }
            None => {}
        }
        self.at = Some(now);
        (self.frames, self.bytes_in, self.bytes_out) = (frames, bytes_in, bytes_out);
    }
}

impl InCall {
    pub fn new(session: SessionHandle, title: String, show_stats: bool, gpu: bool) -> InCall {
        let now = session.snapshot();
        InCall {
            session,
            title,
            started: Instant::now(),
            remote: VideoTexture::new("remote", gpu),
            local: VideoTexture::new("self", gpu),
            show_chat: false,
            show_stats,
            show_devices: false,
            devices: crate::media::Devices::default(),
            chat_input: String::new(),
            chat_seen: 0,
            rates: Rates::default(),
            now,
        }
    }

    /// The devices a person can switch to during the call (the lobby's lists).
    pub fn set_devices(&mut self, devices: crate::media::Devices) {
        self.devices = devices;
    }

    /// The update step's part: the call as it is now (the snapshot, the pictures into
    /// textures, the per-second rates).
    pub fn refresh(&mut self, ctx: &egui::Context) {
        self.remote.update(ctx, self.session.remote_picture());
        self.now = self.session.snapshot();
        if self.now.live.camera_on {
            self.local.update(ctx, self.session.local_picture());
        } else {
            // Pictures the camera made before it stopped are not kept for when it is back.
            let _ = self.session.local_picture().take();
            self.local.clear();
        }
        self.rates.sample(
            self.now.media.video_frames_decoded,
            self.now.live.peer.bytes_received,
            self.now.live.peer.bytes_sent,
        );
    }

    /// Passes a command on to the session.
    pub fn command(&mut self, command: Command) {
        self.session.command(command);
    }

    /// Microphone and speaker pickers: a choice takes over at once (the call goes on).
    fn device_pickers(&mut self, ui: &mut egui::Ui) -> Option<UiCommand> {
        let mut command = None;
        let rows = [
            (
                "Microphone",
                "default microphone",
                self.now.live.microphone_device.clone(),
                self.devices.microphones.clone(),
            ),
            (
                "Speaker",
                "default speaker",
                self.now.live.speaker_device.clone(),
                self.devices.speakers.clone(),
            ),
        ];
        for (label, default, using, names) in rows {
            ui.horizontal(|ui| {
                ui.label(label);
                let shown = using.unwrap_or_else(|| "none".into());
                let mut chosen: Option<Option<String>> = None;
                egui::ComboBox::from_id_salt(label)
                    .selected_text(shown)
                    .show_ui(ui, |ui| {
                        if ui.selectable_label(false, default).clicked() {
                            chosen = Some(None);
                        }
                        for name in &names {
                            if ui.selectable_label(false, name).clicked() {
                                chosen = Some(Some(name.clone()));
                            }
                        }
                    });
                if let Some(name) = chosen {
                    command = Some(UiCommand::Session(if label == "Microphone" {
                        Command::UseMicrophone(name)
                    } else {
                        Command::UseSpeaker(name)
                    }));
                }
            });
        }
        command
    }

    pub fn state(&self) -> CallState {
        self.session.state()
    }

    /// Hangs up; the session finishes in the background.
    pub fn finish(self, runtime: &tokio::runtime::Handle) {
        self.session.hang_up();
        let session = self.session;
        runtime.spawn(async move {
            let _ = session.finished().await;
        });
    }
}

fn duration_text(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

impl App {
    /// The call view (or the call being set up); what the person asked for.
    pub(super) fn call_view(&mut self, root: &mut egui::Ui) -> Vec<UiCommand> {
        let ctx = root.ctx().clone();
        let mut commands = Vec::new();
        let super::Screen::InCall(c) = &mut self.screen else {
            // Panels before the central one (egui lays them out in that order).
            egui::Panel::bottom("controls").show(root, |ui| {
                if ui.button("Hang up").clicked() {
                    commands.push(UiCommand::HangUp);
                }
            });
            egui::CentralPanel::default().show(root, |ui| {
                ui.centered_and_justified(|ui| {
                    ui.horizontal_centered(|ui| {
                        ui.spinner();
                        ui.label("Finding the server…");
                    });
                });
            });
            return commands;
        };
        let state = c.now.state.clone();
        let (microphone, remote_voice) = (c.now.media.microphone_level, c.now.media.remote_voice);
        let (microphone_on, camera_on) = (c.now.live.microphone_on, c.now.live.camera_on);
        // The microphone meter moves ten times a second (video repaints on its own).
        ctx.request_repaint_after(Duration::from_millis(100));

        egui::Panel::bottom("controls").show(root, |ui| {
            // Laid out from the bottom up: the buttons keep their place whatever status
            // or warning line appears above them (a click is never moved from under).
            ui.with_layout(egui::Layout::bottom_up(egui::Align::Min), |ui| {
                ui.add_space(4.0);
                ui.horizontal(|ui| {
                    let hang = egui::Button::new(
                        egui::RichText::new("Hang up").color(egui::Color32::WHITE),
                    )
                    .fill(egui::Color32::from_rgb(200, 40, 40));
                    if ui.add(hang).clicked() {
                        commands.push(UiCommand::HangUp);
                    }
                    let mic = if microphone_on {
                        "Mute microphone"
                    } else {
                        "Unmute microphone"
                    };
                    if ui.button(mic).clicked() {
                        commands.push(UiCommand::Session(Command::Microphone(!microphone_on)));
                    }
                    let cam = if camera_on { "Camera off" } else { "Camera on" };
                    if ui.button(cam).clicked() {
                        commands.push(UiCommand::Session(Command::Camera(!camera_on)));
                    }
                    ui.toggle_value(&mut c.show_chat, "Chat");
                    ui.toggle_value(&mut c.show_stats, "Stats");
                    ui.toggle_value(&mut c.show_devices, "Devices")
                        .on_hover_text("Choose another microphone or speaker.");
                    if c.now.live.is_host && !state.is_ended() {
                        let end = ui
                            .button("End meeting for both")
                            .on_hover_text("You are the host: this ends the room for both of you.");
                        if end.clicked() {
                            commands.push(UiCommand::Session(Command::EndMeeting));
                        }
                    }
                });
                if c.show_devices {
                    commands.extend(c.device_pickers(ui));
                }
                for w in c.now.live.warnings.iter().rev() {
                    ui.colored_label(ui.visuals().warn_fg_color, w);
                }
                ui.horizontal(|ui| {
                    ui.label("Microphone");
                    ui.add(
                        egui::ProgressBar::new(microphone.fraction())
                            .desired_width(120.0)
                            .desired_height(8.0),
                    )
                    .on_hover_text(format!("{:.0} dBFS", microphone.dbfs));
                    if !microphone_on && microphone.dbfs > crate::media::level::SPEAKING_ON_DBFS {
                        ui.colored_label(
                            ui.visuals().warn_fg_color,
                            "you are speaking while muted",
                        );
                    } else if microphone.speaking {
                        ui.label("· you are speaking");
                    }
                    if remote_voice.speaking {
                        let who = c
                            .now
                            .live
                            .peer_name
                            .as_deref()
                            .unwrap_or("the other person");
                        ui.label(format!("· {who} is speaking"));
                    }
                });
                ui.horizontal(|ui| {
                    let with = c
                        .now
                        .live
                        .peer_name
                        .as_ref()
                        .map(|n| format!(" with {n}"))
                        .unwrap_or_default();
                    ui.label(format!(
                        "{}{with} · {} · {}",
                        c.title,
                        state.describe(),
                        duration_text(c.started.elapsed())
                    ));
                    if !microphone_on {
                        ui.colored_label(ui.visuals().warn_fg_color, "· microphone muted");
                    }
                });
                ui.add_space(4.0);
            });
        });

        if c.show_chat {
            egui::Panel::right("chat")
                .min_size(240.0)
                .show(root, |ui| commands.extend(chat_panel(ui, c)));
        } else if c.now.live.chat.len() > c.chat_seen {
            // A message arrived while the chat was closed: open it.
            c.show_chat = true;
        }

        egui::CentralPanel::default()
            .frame(egui::Frame::new().fill(egui::Color32::from_gray(12)))
            .show(root, |ui| {
                let area = ui.max_rect();
                match c.remote.fit(area) {
                    Some(r) => c.remote.paint(ui, r),
                    None => {
                        ui.painter().text(
                            area.center(),
                            egui::Align2::CENTER_CENTER,
                            state.describe(),
                            egui::FontId::proportional(20.0),
                            egui::Color32::LIGHT_GRAY,
                        );
                    }
                }
                // Self-view, picture in picture, bottom right.
                let pip_w = (area.width() * 0.22).clamp(120.0, 320.0);
                let pip_area = egui::Rect::from_min_size(
                    area.right_bottom() - egui::vec2(pip_w + 12.0, pip_w * 9.0 / 16.0 + 12.0),
                    egui::vec2(pip_w, pip_w * 9.0 / 16.0),
                );
                ui.painter()
                    .rect_filled(pip_area, 4.0, egui::Color32::from_gray(30));
                match c.local.fit(pip_area) {
                    Some(r) if camera_on => c.local.paint(ui, r),
                    _ => {
                        let text = if camera_on { "…" } else { "camera off" };
                        ui.painter().text(
                            pip_area.center(),
                            egui::Align2::CENTER_CENTER,
                            text,
                            egui::FontId::proportional(13.0),
                            egui::Color32::GRAY,
                        );
                    }
                }
                if c.show_stats {
                    stats_overlay(ui, area, c);
                }
            });
        commands
    }
}

/// The chat: the lines so far and a field to write one; a message to send.
fn chat_panel(ui: &mut egui::Ui, c: &mut InCall) -> Option<UiCommand> {
    let mut command = None;
    ui.heading("Chat");
    c.chat_seen = c.now.live.chat.len();
    let input_height = 36.0;
    egui::ScrollArea::vertical()
        .max_height(ui.available_height() - input_height)
        .stick_to_bottom(true)
        .show(ui, |ui| {
            if c.now.live.chat.is_empty() {
                ui.weak("No messages yet.");
            }
            for line in &c.now.live.chat {
                let who = if line.mine {
                    "you".to_owned()
                } else {
                    c.now
                        .live
                        .peer_name
                        .clone()
                        .unwrap_or_else(|| "them".into())
                };
                ui.label(format!("{who}: {}", line.text));
            }
        });
    ui.horizontal(|ui| {
        let field = ui.add(
            egui::TextEdit::singleline(&mut c.chat_input)
                .hint_text("message")
                .desired_width(160.0)
                .id_salt("chat_input"),
        );
        let enter = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if (ui.button("Send").clicked() || enter) && !c.chat_input.trim().is_empty() {
            command = Some(UiCommand::Session(Command::Chat(
                c.chat_input.trim().to_owned(),
            )));
            c.chat_input.clear();
            field.request_focus();
        }
    });
    command
}

fn stats_overlay(ui: &egui::Ui, area: egui::Rect, c: &InCall) {
    let s = &c.now.media;
    let resolution = if s.decoded.0 > 0 {
        format!("{}x{}", s.decoded.0, s.decoded.1)
    } else {
        "-".into()
    };
    let encoder_kbps = s.encoder_bitrate_bps / 1000;
    let (sent_w, sent_h) = s.sent_resolution;
    let audio_buffer = format!(
        "{} ms (aims at {} ms)",
        s.audio_jitter.as_millis(),
        s.audio_jitter_target.as_millis()
    );
    let p = &c.now.live.peer;
    let total = p.packets_received + p.packets_lost;
    let loss_fraction = if total > 0 {
        p.packets_lost as f64 / total as f64
    } else {
        0.0
    };
    let loss = if total > 0 {
        format!("{:.1} %", loss_fraction * 100.0)
    } else {
        "-".into()
    };
    let network =
        crate::call::peer::NetworkQuality::assess(loss_fraction, p.rtt_ms, p.estimate_bitrate_bps);
    let estimate = p
        .estimate_bitrate_bps
        .map_or("-".into(), |b| format!("{} kbit/s", b / 1000));
    let lines = [
        ("network", format!("{network} (estimate {estimate})")),
        (
            "sending",
            format!("{sent_w}x{sent_h} at {encoder_kbps} kbit/s"),
        ),
        ("resolution", resolution),
        ("fps", format!("{:.0}", c.rates.fps)),
        (
            "bitrate",
            format!(
                "{:.0} kbit/s in, {:.0} out",
                c.rates.kbps_in, c.rates.kbps_out
            ),
        ),
        ("RTT", p.rtt_ms.map_or("-".into(), |r| format!("{r:.0} ms"))),
        ("packet loss", loss),
        (
            "repair",
            format!(
                "{} rebuilt by FEC, {} retransmitted; {} FEC sent",
                p.fec_recovered, p.retransmissions_received, p.fec_packets_sent
            ),
        ),
        ("audio buffer", audio_buffer),
        ("codecs", "H.264, Opus".into()),
        (
            "path",
            match (
                &p.candidate_type,
                &p.local_candidate_type,
                &p.remote_candidate_type,
            ) {
                (Some(path), Some(l), Some(r)) => format!("{path} (you {l}, them {r})"),
                (Some(path), ..) => path.clone(),
                _ => "-".into(),
            },
        ),
    ];
    let text: String = lines
        .iter()
        .map(|(k, v)| format!("{k:<12} {v}\n"))
        .collect();
    let galley = ui.painter().layout_no_wrap(
        text.trim_end().to_owned(),
        egui::FontId::monospace(13.0),
        egui::Color32::WHITE,
    );
    let rect = egui::Rect::from_min_size(
        area.left_top() + egui::vec2(12.0, 12.0),
        galley.size() + egui::vec2(16.0, 12.0),
    );
    ui.painter()
        .rect_filled(rect, 4.0, egui::Color32::from_black_alpha(170));
    ui.painter().galley(
        rect.min + egui::vec2(8.0, 6.0),
        galley,
        egui::Color32::WHITE,
    );
}
