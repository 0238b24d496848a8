//! Microphone clean-up before encoding: echo cancellation (AEC3), noise suppression and
//! automatic gain (AGC2), from `sonora`, a pure-Rust port of WebRTC's audio processing.
//!
//! The echo canceller needs to hear both sides: every frame that goes to the speaker
//! (the far end, [`AudioProcessor::process_render`]) and every microphone frame (the
//! near end, [`AudioProcessor::process_capture`]), which it cleans in place. It finds the
//! delay between the two itself, so the caller only has to feed both sides in order.
//!
//! sonora works on 10 ms frames; the rest of the pipeline uses 20 ms frames
//! ([`FRAME_SAMPLES`](super::audio::FRAME_SAMPLES)), so each call splits its frame into
//! 10 ms pieces.

use sonora::config::{
    AdaptiveDigital, EchoCanceller, GainController2, NoiseSuppression, NoiseSuppressionLevel,
};
use sonora::{AudioProcessing, Config, StreamConfig};

use super::MediaError;
use super::audio::SAMPLE_RATE;

/// Samples in one 10 ms frame, the unit sonora processes.
pub const PROCESSING_FRAME_SAMPLES: usize = SAMPLE_RATE as usize / 100;

/// Which clean-up stages run; each can be switched on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ProcessingSettings {
    pub echo_cancellation: bool,
    pub noise_suppression: bool,
    pub auto_gain: bool,
}

impl ProcessingSettings {
    /// Everything on: what a real microphone next to a loudspeaker needs.
    pub const ALL: ProcessingSettings = ProcessingSettings {
        echo_cancellation: true,
        noise_suppression: true,
        auto_gain: true,
    };
    /// Everything off: frames pass through untouched.
    pub const OFF: ProcessingSettings = ProcessingSettings {
        echo_cancellation: false,
        noise_suppression: false,
        auto_gain: false,
    };

    pub fn is_off(&self) -> bool {
        *self == Self::OFF
    }

    fn to_config(self) -> Config {
        Config {
            echo_canceller: self.echo_cancellation.then(EchoCanceller::default),
            // High (~18 dB) rather than the default Moderate (~12 dB): a laptop fan or
            // a room's hum should all but disappear, and speech survives it well.
            noise_suppression: self.noise_suppression.then(|| NoiseSuppression {
                level: NoiseSuppressionLevel::High,
                ..Default::default()
            }),
            // Digital gain only: we do not touch the system's microphone volume.
            gain_controller2: self.auto_gain.then(|| GainController2 {
                input_volume_controller: false,
                adaptive_digital: Some(AdaptiveDigital::default()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl Default for ProcessingSettings {
    fn default() -> Self {
        Self::ALL
    }
}

/// The processing stage's own view of the echo (sonora's statistics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessingStatistics {
    /// How much echo the canceller removes (ERLE), dB.
    pub echo_return_loss_enhancement_db: Option<f64>,
    /// How likely it is that echo is left in what is sent, 0-1.
    pub residual_echo_likelihood: Option<f64>,
    /// The delay between speaker and microphone the canceller found, ms.
    pub delay_ms: Option<i32>,
}

/// Audio processing refused a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessingError {
    #[error(
        "a frame of {len} samples is not a whole number of 10 ms frames ({PROCESSING_FRAME_SAMPLES} samples)"
    )]
    FrameLength { len: usize },
    #[error("audio processing failed: {0}")]
    Sonora(String),
}

impl From<ProcessingError> for MediaError {
    fn from(e: ProcessingError) -> MediaError {
        MediaError::Format(e.to_string())
    }
}

impl From<sonora::Error> for ProcessingError {
    fn from(e: sonora::Error) -> ProcessingError {
        ProcessingError::Sonora(e.to_string())
    }
}

/// Echo cancellation, noise suppression and gain for one 48 kHz mono call.
pub struct AudioProcessor {
    apm: AudioProcessing,
    settings: ProcessingSettings,
    /// sonora writes to a separate output buffer; reused so a frame allocates nothing.
    scratch: Vec<i16>,
}

impl std::fmt::Debug for AudioProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioProcessor")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AudioProcessor {
    pub fn new(settings: ProcessingSettings) -> AudioProcessor {
        let stream = StreamConfig::new(SAMPLE_RATE, 1);
        let apm = AudioProcessing::builder()
            .config(settings.to_config())
            .capture_config(stream)
            .render_config(stream)
            .build();
        AudioProcessor {
            apm,
            settings,
            scratch: vec![0; PROCESSING_FRAME_SAMPLES],
        }
    }

    pub fn settings(&self) -> ProcessingSettings {
        self.settings
    }

    /// Switches stages on or off mid-call. A stage switched on starts unadapted (the echo
    /// canceller needs a second or two of far-end speech again).
    pub fn set_settings(&mut self, settings: ProcessingSettings) {
        if settings != self.settings {
            self.settings = settings;
            self.apm.apply_config(settings.to_config());
        }
    }

    /// Cleans a microphone frame in place. `frame` holds any whole number of 10 ms
    /// frames (a pipeline's 20 ms frame is two).
    pub fn process_capture(&mut self, frame: &mut [i16]) -> Result<(), ProcessingError> {
        check_length(frame.len())?;
        if self.settings.is_off() {
            return Ok(());
        }
        for piece in frame.chunks_exact_mut(PROCESSING_FRAME_SAMPLES) {
            self.apm.process_capture_i16(piece, &mut self.scratch)?;
            piece.copy_from_slice(&self.scratch);
        }
        Ok(())
    }

    /// Tells the echo canceller what is about to be played (the far end). The frame is
    /// not changed: sonora's render side only analyses it.
    pub fn process_render(&mut self, frame: &[i16]) -> Result<(), ProcessingError> {
        check_length(frame.len())?;
        if !self.settings.echo_cancellation {
            return Ok(());
        }
        for piece in frame.chunks_exact(PROCESSING_FRAME_SAMPLES) {
            self.apm.process_render_i16(piece, &mut self.scratch)?;
        }
        Ok(())
    }

    /// The echo canceller's own estimate of how much echo it removes, in dB, once it has
    /// one.
    pub fn echo_return_loss_enhancement_db(&self) -> Option<f64> {
        self.apm.statistics().echo_return_loss_enhancement
    }

    /// What the stage says about itself now (for the call's report).
    pub fn statistics(&self) -> ProcessingStatistics {
        let s = self.apm.statistics();
        ProcessingStatistics {
            echo_return_loss_enhancement_db: s.echo_return_loss_enhancement,
            residual_echo_likelihood: s.residual_echo_likelihood,
            delay_ms: s.delay_median_ms.or(s.delay_ms),
        }
    }
}

fn check_length(len: usize) -> Result<(), ProcessingError> {
    if len == 0 || !len.is_multiple_of(PROCESSING_FRAME_SAMPLES) {
        return Err(ProcessingError::FrameLength { len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::audio::FRAME_SAMPLES;
    use std::f64::consts::TAU;
    use std::time::{Duration, Instant};

    const RATE: f64 = SAMPLE_RATE as f64;

    /// A small deterministic noise generator (xorshift), uniform in [-1, 1).
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

    /// Something like a voice: a few harmonics of a gliding pitch with a falling
    /// spectrum, plus breath noise, switched on and off at syllable rate with pauses
    /// between phrases. Broadband and non-stationary, as the echo canceller expects.
    fn speech_like(seconds: f64, pitch: f64, syllable_hz: f64, level: f64, seed: u64) -> Vec<f64> {
        speech_like_at(seconds, pitch, syllable_hz, level, seed, 0.0)
    }

    fn speech_like_at(
        seconds: f64,
        pitch: f64,
        syllable_hz: f64,
        level: f64,
        seed: u64,
        phrase_offset: f64,
    ) -> Vec<f64> {
        let n = (seconds * RATE) as usize;
        let mut noise = Noise(seed);
        let mut phase = 0.0;
        let mut smoothed_noise = 0.0;
        (0..n)
            .map(|i| {
                let t = i as f64 / RATE;
                let f0 = pitch * (1.0 + 0.15 * (TAU * 0.7 * t).sin());
                phase = (phase + TAU * f0 / RATE) % TAU;
                let voiced: f64 = (1..=12)
                    .map(|h| {
                        let h = f64::from(h);
                        (h * phase).sin() / h.powf(0.8)
                    })
                    .sum();
                // Lightly low-passed noise: the unvoiced part.
                smoothed_noise = 0.7 * smoothed_noise + 0.3 * noise.next();
                let syllable = (0.5 - 0.5 * (TAU * syllable_hz * t).cos()).powi(2);
                // Phrases of 2.5 s with a 0.5 s pause.
                let phrase = if (t + phrase_offset) % 3.0 < 2.5 {
                    1.0
                } else {
                    0.0
                };
                level * syllable * phrase * (0.25 * voiced + 0.6 * smoothed_noise)
            })
            .collect()
    }

    /// A room: 80 ms of flight, then 200 ms of exponentially decaying reflections,
    /// scaled so the echo arrives about 10 dB below what the speaker played.
    fn room_impulse_response() -> Vec<(usize, f64)> {
        let delay = (0.080 * RATE) as usize;
        let length = (0.200 * RATE) as usize;
        let mut noise = Noise(0x5eed_1234);
        let mut taps: Vec<(usize, f64)> = (0..length)
            .map(|k| {
                let decay = (-(k as f64) / (0.030 * RATE)).exp();
                (delay + k, noise.next() * decay)
            })
            .collect();
        let energy: f64 = taps.iter().map(|(_, g)| g * g).sum();
        let scale = (0.1 / energy).sqrt();
        for (_, g) in &mut taps {
            *g *= scale;
        }
        taps
    }

    fn convolve(signal: &[f64], taps: &[(usize, f64)]) -> Vec<f64> {
        let mut out = vec![0.0; signal.len()];
        for &(delay, gain) in taps {
            if delay >= signal.len() {
                continue;
            }
            for (o, s) in out[delay..].iter_mut().zip(signal) {
                *o += gain * s;
            }
        }
        out
    }

    /// The far end and its echo at the microphone, shared by the tests (the convolution
    /// is the slow part of a debug build).
    fn far_and_echo() -> &'static (Vec<f64>, Vec<f64>) {
        static CALL: std::sync::OnceLock<(Vec<f64>, Vec<f64>)> = std::sync::OnceLock::new();
        CALL.get_or_init(|| {
            let far = speech_like(SECONDS, 130.0, 4.0, 0.5, 1);
            let echo = convolve(&far, &room_impulse_response());
            (far, echo)
        })
    }

    fn to_i16(signal: &[f64]) -> Vec<i16> {
        signal
            .iter()
            .map(|s| (s * 32767.0).round().clamp(-32768.0, 32767.0) as i16)
            .collect()
    }

    fn energy(signal: &[i16]) -> f64 {
        signal.iter().map(|&s| f64::from(s) * f64::from(s)).sum()
    }

    fn db(ratio: f64) -> f64 {
        10.0 * ratio.log10()
    }

    /// Runs a call: `far` goes to the speaker (render side), `near` is what the
    /// microphone hears, both in 20 ms frames as in the pipeline. Returns the processed
    /// microphone signal and the mean time per 10 ms of processing (both sides).
    fn run(settings: ProcessingSettings, far: &[i16], near: &[i16]) -> (Vec<i16>, Duration) {
        let mut processor = AudioProcessor::new(settings);
        let mut out = Vec::with_capacity(near.len());
        let started = Instant::now();
        for (far, near) in far
            .chunks_exact(FRAME_SAMPLES)
            .zip(near.chunks_exact(FRAME_SAMPLES))
        {
            processor.process_render(far).expect("render");
            let mut frame = near.to_vec();
            processor.process_capture(&mut frame).expect("capture");
            out.extend_from_slice(&frame);
        }
        let per_10ms = started.elapsed() / (out.len() / PROCESSING_FRAME_SAMPLES) as u32;
        (out, per_10ms)
    }

    fn echo_only() -> ProcessingSettings {
        ProcessingSettings {
            echo_cancellation: true,
            ..ProcessingSettings::OFF
        }
    }

    const SECONDS: f64 = 10.0;
    const SECOND: usize = SAMPLE_RATE as usize;

    fn erle_db(echo: &[i16], out: &[i16]) -> f64 {
        db(energy(echo) / energy(out).max(1.0))
    }

    #[test]
    fn echo_is_cancelled_after_convergence() {
        let (far, echo) = far_and_echo();
        let (far, echo) = (to_i16(far), to_i16(echo));
        let (out, per_10ms) = run(echo_only(), &far, &echo);
        let per_second: Vec<String> = echo
            .chunks(SECOND)
            .zip(out.chunks(SECOND))
            .map(|(e, o)| format!("{:.0}", erle_db(e, o)))
            .collect();
        println!(
            "echo {:.1} dB below the far end; AEC alone, ERLE per second: {per_second:?}; \
             {per_10ms:?} per 10 ms",
            db(energy(&far) / energy(&echo))
        );
        // AEC3 keeps its suppressor cautious for its first 2.5 s of far-end speech (its
        // "initial state"), so the echo canceller alone is judged from 3 s...
        let alone = erle_db(&echo[3 * SECOND..], &out[3 * SECOND..]);
        // ...and with noise suppression, as a call runs it, from 2 s.
        let with_ns = ProcessingSettings {
            noise_suppression: true,
            ..echo_only()
        };
        let (out, _) = run(with_ns, &far, &echo);
        let with_ns = erle_db(&echo[2 * SECOND..], &out[2 * SECOND..]);
        println!("ERLE: AEC alone after 3 s {alone:.1} dB; AEC + NS after 2 s {with_ns:.1} dB");
        assert!(alone >= 35.0, "AEC alone: ERLE {alone:.1} dB");
        assert!(with_ns >= 35.0, "AEC + NS: ERLE {with_ns:.1} dB");
    }

    /// The local talker's level after processing relative to the talker alone, when they
    /// talk over the far end from 4 s on (after convergence), judged from 4.5 s.
    fn double_talk_change_db(talker_level: f64) -> f64 {
        let (far, echo) = far_and_echo();
        // A higher voice at another rhythm whose pauses fall elsewhere.
        let start = 4 * SECOND;
        let mut talker = speech_like_at(SECONDS, 210.0, 3.3, talker_level, 2, 1.3);
        talker[..start].iter_mut().for_each(|s| *s = 0.0);
        let mixed: Vec<f64> = echo.iter().zip(&talker).map(|(e, t)| e + t).collect();
        let (out, _) = run(echo_only(), &to_i16(far), &to_i16(&mixed));
        let talker = to_i16(&talker);
        let judged = start + SECOND / 2;
        let above_echo = db(energy(&talker[judged..]) / energy(&to_i16(echo)[judged..]));
        let change = db(energy(&out[judged..]) / energy(&talker[judged..]));
        println!("double talk, talker {above_echo:+.1} dB over the echo: {change:+.2} dB");
        change
    }

    #[test]
    fn near_end_survives_double_talk() {
        // Measured, not asserted: a talker only ~6 dB over the echo is ducked by about
        // 4 dB while both talk (AEC3's suppressor errs towards removing echo).
        double_talk_change_db(0.3);
        // A talker ~10 dB over the echo (closer to the microphone than the speaker is)
        // keeps their level.
        let change = double_talk_change_db(0.5);
        assert!(change.abs() <= 3.0, "near end changed by {change:+.2} dB");
    }

    #[test]
    fn stationary_noise_is_suppressed() {
        let mut noise = Noise(7);
        // A fan: steady broadband noise about -35 dBFS.
        let fan: Vec<f64> = (0..(5.0 * RATE) as usize)
            .map(|_| 0.03 * noise.next())
            .collect();
        let fan = to_i16(&fan);
        let silence = vec![0; fan.len()];
        let settings = ProcessingSettings {
            noise_suppression: true,
            ..ProcessingSettings::OFF
        };
        let (out, per_10ms) = run(settings, &silence, &fan);
        let judged = SAMPLE_RATE as usize;
        let reduction = db(energy(&fan[judged..]) / energy(&out[judged..]).max(1.0));
        println!("stationary noise lowered by {reduction:.1} dB; {per_10ms:?} per 10 ms");
        assert!(reduction >= 15.0, "noise lowered by {reduction:.1} dB");
    }

    #[test]
    fn everything_on_costs_little() {
        let (far, echo) = far_and_echo();
        let (_, per_10ms) = run(ProcessingSettings::ALL, &to_i16(far), &to_i16(echo));
        println!("all stages: {per_10ms:?} per 10 ms frame (both sides)");
        // Generous: tests run in parallel on a loaded machine; real time is 10 ms.
        assert!(per_10ms < Duration::from_millis(5), "{per_10ms:?}");
    }

    #[test]
    fn off_passes_frames_through_untouched() {
        let mut processor = AudioProcessor::new(ProcessingSettings::OFF);
        let original: Vec<i16> = (0..FRAME_SAMPLES as i16).map(|i| i * 17).collect();
        let mut frame = original.clone();
        processor.process_render(&original).expect("render");
        processor.process_capture(&mut frame).expect("capture");
        assert_eq!(frame, original);
    }

    #[test]
    fn frames_must_be_whole_10ms_pieces() {
        let mut processor = AudioProcessor::new(ProcessingSettings::ALL);
        let mut odd = vec![0; 700];
        assert_eq!(
            processor.process_capture(&mut odd),
            Err(ProcessingError::FrameLength { len: 700 })
        );
        assert_eq!(
            processor.process_render(&[]),
            Err(ProcessingError::FrameLength { len: 0 })
        );
        let mut ten_ms = vec![0; PROCESSING_FRAME_SAMPLES];
        assert_eq!(processor.process_capture(&mut ten_ms), Ok(()));
    }
}
