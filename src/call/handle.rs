//! How the rest of the program sees a running call: [`SessionHandle`] (commands in;
//! state, live information, pictures and the final report out).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::peer::PeerStats;
use super::pipelines::StatsHandle;
use super::report::Report;
use super::state::CallState;
use crate::media::picture::PictureSlot;

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

pub(super) type LiveHandle = Arc<Mutex<Live>>;

pub(super) fn lock_live(live: &LiveHandle) -> std::sync::MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running session.
pub struct SessionHandle {
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) state: watch::Receiver<CallState>,
    pub(super) stats: StatsHandle,
    pub(super) live: LiveHandle,
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
