//! How the rest of the program sees a running call: [`SessionHandle`] (commands in;
//! [`Snapshot`]s of state, live information and media figures, pictures and the final
//! report out).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::peer::PeerStats;
use super::pipelines::StatsHandle;
use super::report::Report;
use super::state::CallState;
use crate::media::level::VoiceLevel;
use crate::media::picture::PictureSlot;

/// What the user can ask of a running session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    HangUp,
    Chat(String),
    /// Mute (false) or unmute the microphone: silence is sent while muted.
    Microphone(bool),
    /// Turn the camera off (false: the device is released, black frames are sent) or on.
    Camera(bool),
    /// The host ends the room for both.
    EndMeeting,
    /// Use this microphone from now on (a name `media::device::list_audio_devices`
    /// gives; None: the default). Mute stays as it is; the call is not renegotiated.
    UseMicrophone(Option<String>),
    /// Play received audio on this speaker from now on (None: the default).
    UseSpeaker(Option<String>),
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
    /// The microphone and speaker in use (their descriptions), when they are devices.
    pub microphone_device: Option<String>,
    pub speaker_device: Option<String>,
    pub camera_on: bool,
}

/// What the window shows of the media pipelines, copied from their statistics when a
/// snapshot is taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MediaView {
    pub video_frames_decoded: u64,
    /// The other person's picture as decoded (0 x 0 before the first frame).
    pub decoded: (usize, usize),
    /// What we send: the picture size and the encoder's bitrate.
    pub sent_resolution: (usize, usize),
    pub encoder_bitrate_bps: u32,
    pub microphone_level: VoiceLevel,
    pub remote_voice: VoiceLevel,
    pub audio_jitter: Duration,
    pub audio_jitter_target: Duration,
}

/// A call at one moment, as a UI shows it: the state, the live information and the
/// media figures. The session publishes a new one whenever something changes and ten
/// times a second while media flows; a reader takes it with one borrow of a `watch`,
/// never a lock the session or a media thread holds.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: CallState,
    pub live: Live,
    pub media: MediaView,
}

/// A running session.
pub struct SessionHandle {
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) snapshot: watch::Receiver<Arc<Snapshot>>,
    pub(super) stats: StatsHandle,
    pub(super) local: PictureSlot,
    pub(super) remote: PictureSlot,
    pub(super) task: tokio::task::JoinHandle<Report>,
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

    /// The call as it is now (state, live information, media figures).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
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
        self.snapshot.borrow().state.clone()
    }

    /// A receiver that changes with every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Everything measured so far (for reports and tests; a UI reads [`Self::snapshot`]).
    pub fn stats(&self) -> &StatsHandle {
        &self.stats
    }

    /// Waits until the state satisfies `f` (or the session ends); false on timeout.
    pub async fn wait_for(&self, timeout: Duration, f: impl Fn(&CallState) -> bool) -> bool {
        let mut rx = self.snapshot.clone();
        tokio::time::timeout(timeout, async {
            loop {
                if f(&rx.borrow_and_update().state) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return f(&rx.borrow().state);
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
