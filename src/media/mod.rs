//! Media: raw frames, sources, codecs and sinks. Media flows one way through small
//! stages joined by channels:
//! `source -> encoder -> track -> network -> depacketizer -> decoder -> sink`.
//!
//! - [`video`]: I420 frames, the `VideoSource` trait, test pattern + strip, Y4M files.
//! - [`h264`]: H.264 encoding/decoding with openh264, and RTP depacketizing into access units.
//! - [`audio`]: 48 kHz mono PCM, the `AudioSource` trait, sine and WAV sources, Opus, sinks.
//! - [`device`]: the real microphone and speaker (cpal) behind the same traits.
//! - [`camera`]: the real camera (nokhwa) as a `VideoSource`, and pixel format conversion.

pub mod audio;
pub mod camera;
pub mod device;
pub mod h264;
pub mod video;

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
