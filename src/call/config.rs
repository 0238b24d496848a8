//! What a session is asked to do: whom to call ([`Target`]), with which sources
//! ([`VideoInput`], [`AudioInput`]) and settings ([`SessionConfig`]), optionally on an
//! already open signaling [`Connection`].

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::media::h264::EncoderSettings;
use crate::media::picture::Notify;
use crate::media::processing::ProcessingSettings;
use crate::signaling::protocol::IceServer;
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
    /// Take the call `call_id` that rang on the [`Connection`] given to
    /// [`start_on`](super::start_on).
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
    /// Echo cancellation, noise suppression and gain on what we send. None: on for a
    /// real microphone (which hears our speaker), off for synthetic sources (which
    /// tests compare sample by sample).
    pub audio_processing: Option<bool>,
    /// Which clean-up stages run when it is on (all by default).
    pub processing: ProcessingSettings,
    /// Fill [`SessionHandle::local_picture`](super::SessionHandle::local_picture) and
    /// [`SessionHandle::remote_picture`](super::SessionHandle::remote_picture) with the
    /// pictures (I420) for a window (headless runs hand none out).
    pub show_video: bool,
    /// Called when there is something new to show (picture, state, chat).
    pub notify: Option<Notify>,
    /// The remote sends the test pattern: measure PSNR against it.
    pub reference_pattern: Option<super::pipelines::ExpectedPattern>,
    /// Chat lines to send once the data channel is open.
    pub chat: Vec<String>,
    /// Testing aid: hold our offer/answer back this long (candidates go first).
    pub hold_description: Option<Duration>,
    /// Testing aid: the first offer or answer we send names a wrong DTLS fingerprint (as
    /// if changed in transit), so that connection's handshake fails.
    pub corrupt_first_fingerprint: bool,
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
            audio_processing: None,
            processing: ProcessingSettings::ALL,
            show_video: false,
            notify: None,
            reference_pattern: None,
            chat: Vec::new(),
            hold_description: None,
            corrupt_first_fingerprint: false,
        }
    }
}
