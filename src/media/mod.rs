//! Media: raw frames, sources, codecs and sinks. Media flows one way through small
//! stages joined by channels:
//! `source -> encoder -> track -> network -> depacketizer -> decoder -> sink`.
//!
//! - [`video`]: I420 frames, the `VideoSource` trait, test pattern + strip, Y4M files.
//! - [`h264`]: H.264 encoding/decoding with openh264.
//! - [`vp8`]: VP8 encoding/decoding with libvpx (its own small `unsafe` island: the C API).
//! - [`codec`]: the `VideoEncoder`/`VideoDecoder` traits over both, and `VideoCodec`,
//!   the codec a call negotiated (H.264 preferred, VP8 when the other side has no H.264).
//! - [`ladder`]: which resolution and frame rate to send at a bitrate (pure).
//! - [`scale`]: I420 frames to a smaller size (fast_image_resize), strip kept.
//! - [`openh264_rate`]: bitrate and frame rate changes while encoding (one of the crate's
//!   two `unsafe` islands: two openh264 `SetOption` calls; the other is [`vp8`]).
//! - [`assembler`]: received H.264 or VP8 RTP packets -> complete access units, waiting for
//!   retransmissions and deciding when to ask for a keyframe (pure, unit-tested).
//! - [`arrival`]: a received stream's one-way queueing delay and rate, and when to ask
//!   its sender to slow down (REMB) (pure, unit-tested).
//! - [`audio`]: 48 kHz mono PCM, the `AudioSource` trait, sine and WAV sources, Opus, sinks.
//! - [`jitter`]: the audio jitter buffer: received packets wait as long as the measured
//!   jitter calls for (pure, unit-tested).
//! - [`level`]: how loud a stream is and whether someone speaks in it, for meters and
//!   "speaking" indicators (pure, unit-tested).
//! - [`processing`]: echo cancellation, noise suppression and automatic gain for the
//!   microphone (sonora, a pure-Rust port of WebRTC's audio processing).
//! - [`device`]: the real microphone and speaker (cpal) behind the same traits.
//! - [`live_device`]: the call's microphone and speaker: changed while the call runs,
//!   and replaced (default device, else silence) when one is lost.
//! - [`camera`]: the real camera (nokhwa) as a `VideoSource`, and pixel format conversion.
//! - [`capture`]: a video source on its own thread, feeding the encoder and a self-view.
//! - [`sources`]: opening the configured sources, falling back to the test pattern or a
//!   tone (with a warning) when a camera, microphone or file is missing; `Tee`.
//! - [`picture`]: pictures (I420) on their way to a display, and the slot the newest one
//!   waits in.

pub mod arrival;
pub mod assembler;
pub mod audio;
pub mod camera;
pub mod capture;
pub mod codec;
pub mod device;
pub mod h264;
pub mod jitter;
pub mod ladder;
pub mod level;
pub mod live_device;
pub mod openh264_rate;
pub mod picture;
pub mod processing;
pub mod scale;
pub mod sources;
pub mod video;
pub mod vp8;

/// The real devices present, by name (for pickers and `duet devices`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    pub cameras: Vec<String>,
    pub microphones: Vec<String>,
    pub speakers: Vec<String>,
}

impl Devices {
    /// Asks the system; this can take a while (ALSA probes every card), so a UI calls it
    /// off its own thread.
    pub fn list() -> Devices {
        let (microphones, speakers) = device::list_audio_devices();
        Devices {
            cameras: camera::list_cameras(),
            microphones,
            speakers,
        }
    }
}

/// Sleeps until the next tick of a `period` clock; a thread running late does not try to
/// catch up in a burst.
pub fn pace(next: &mut std::time::Instant, period: std::time::Duration) {
    *next += period;
    let now = std::time::Instant::now();
    if *next > now {
        std::thread::sleep(*next - now);
    } else {
        *next = now;
    }
}

/// A media stage failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("file error: {0}")]
    Io(String),
    #[error("unsupported or broken media: {0}")]
    Format(String),
    #[error("codec error: {0}")]
    Codec(String),
    #[error("device error: {0}")]
    Device(String),
}
