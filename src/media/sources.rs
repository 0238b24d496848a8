//! Opening the configured media sources, with the fallbacks a call needs: a missing
//! camera or microphone, or a broken file, becomes the test pattern or a tone plus a
//! warning, never a failed call. Also [`Tee`], one audio stream into several sinks.

use super::audio::{AudioSink, AudioSource, Sine, WavFile};
use super::camera::Camera;
use super::device::Microphone;
use super::video::{TestPattern, VideoSource, Y4mFile};
use crate::call::{AudioInput, VideoInput};

/// Opens the configured video source; a broken file falls back to the test pattern
/// with a warning rather than failing the call.
pub fn open_video(input: &VideoInput, warnings: &mut Vec<String>) -> Box<dyn VideoSource> {
    match input {
        VideoInput::Camera(name) => match Camera::open(name.as_deref()) {
            Ok(camera) => Box::new(camera),
            Err(e) => {
                warnings.push(format!("{e}; sending the test pattern instead"));
                Box::new(TestPattern::new(640, 360, 30.0, false))
            }
        },
        VideoInput::TestPattern {
            width,
            height,
            fps,
            noisy,
        } => Box::new(TestPattern::new(*width, *height, *fps, *noisy)),
        VideoInput::File(path) => match Y4mFile::open(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                warnings.push(format!("{e}; sending the test pattern instead"));
                Box::new(TestPattern::new(640, 360, 30.0, false))
            }
        },
    }
}

/// Several sinks fed the same audio (e.g. speaker and recording).
pub struct Tee(pub Vec<Box<dyn AudioSink>>);

impl AudioSink for Tee {
    fn write(&mut self, pcm: &[i16]) -> Result<(), crate::media::MediaError> {
        for sink in &mut self.0 {
            sink.write(pcm)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.0.iter().map(|s| s.describe()).collect();
        names.join(" + ")
    }
}

pub fn open_audio(input: &AudioInput, warnings: &mut Vec<String>) -> Box<dyn AudioSource> {
    match input {
        AudioInput::Microphone(name) => match Microphone::open(name.as_deref()) {
            Ok(mic) => Box::new(mic),
            Err(e) => {
                warnings.push(format!("{e}; sending a 440 Hz tone instead"));
                Box::new(Sine::new(440.0))
            }
        },
        AudioInput::Sine(f) => Box::new(Sine::new(*f)),
        AudioInput::File(path) => match WavFile::open(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                warnings.push(format!("{e}; sending a 440 Hz tone instead"));
                Box::new(Sine::new(440.0))
            }
        },
    }
}
