//! `VoiceMeter`: how loud a stream of 20 ms PCM frames is, and whether someone is
//! speaking in it, as a pure type (frames in, a [`VoiceLevel`] out), for the microphone
//! meter and the "speaking" indicators. [`SourceMeter`] runs one on an audio source of
//! its own thread (the lobby's "is my microphone working" bar).
//!
//! - The level is the frame's RMS in dBFS, shown the way level meters move: it rises at
//!   once and falls back 1 dB per frame (50 dB/s), so speech reads as a steady bar rather
//!   than a flicker.
//! - Speaking is a level above [`SPEAKING_ON_DBFS`] for [`ON_FRAMES`] frames in a row (a
//!   click or a key is shorter), and stays on until the level has been under
//!   [`SPEAKING_OFF_DBFS`] for [`HANG_FRAMES`] (the pauses between words do not blink it).
//!   The thresholds suit what is sent (after noise suppression and gain) and what is
//!   received; a fan left in by a raw microphone can read as speech.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::audio::AudioSource;

/// The quietest level shown; silence reads as this.
pub const FLOOR_DBFS: f32 = -70.0;
/// Speaking starts above this level ...
pub const SPEAKING_ON_DBFS: f32 = -42.0;
/// ... and ends below this one.
pub const SPEAKING_OFF_DBFS: f32 = -48.0;
/// Frames (20 ms) above the start level before speaking is shown: 60 ms.
pub const ON_FRAMES: u32 = 3;
/// Frames below the end level before speaking ends: 400 ms.
pub const HANG_FRAMES: u32 = 20;

/// What a meter shows now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VoiceLevel {
    /// The level as a meter shows it, dBFS, [`FLOOR_DBFS`]..=0.
    pub dbfs: f32,
    /// The last frame's own level (RMS, dBFS), without the meter's fall-back.
    pub frame_dbfs: f32,
    pub speaking: bool,
}

impl Default for VoiceLevel {
    fn default() -> Self {
        VoiceLevel {
            dbfs: FLOOR_DBFS,
            frame_dbfs: FLOOR_DBFS,
            speaking: false,
        }
    }
}

/// The mean level of a stream's frames while someone speaks in it (for the report).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpeechMean {
    sum_dbfs: f64,
    frames: u64,
}

impl SpeechMean {
    /// Counts the frame `level` describes if it is speech.
    pub fn add(&mut self, level: VoiceLevel) {
        if level.speaking {
            self.sum_dbfs += f64::from(level.frame_dbfs);
            self.frames += 1;
        }
    }

    /// The mean, rounded to 0.1 dB; None if nobody spoke.
    pub fn dbfs(&self) -> Option<f64> {
        (self.frames > 0).then(|| (self.sum_dbfs / self.frames as f64 * 10.0).round() / 10.0)
    }
}

impl VoiceLevel {
    /// The level as a fraction of the meter's length (0 at the floor, 1 at full scale).
    pub fn fraction(&self) -> f32 {
        ((self.dbfs - FLOOR_DBFS) / -FLOOR_DBFS).clamp(0.0, 1.0)
    }
}

/// The meter of one stream. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct VoiceMeter {
    shown: VoiceLevel,
    loud_frames: u32,
    quiet_frames: u32,
}

impl VoiceMeter {
    pub fn new() -> VoiceMeter {
        VoiceMeter::default()
    }

    /// The RMS level of `pcm` in dBFS (at least [`FLOOR_DBFS`]).
    pub fn dbfs(pcm: &[i16]) -> f32 {
        if pcm.is_empty() {
            return FLOOR_DBFS;
        }
        let energy: f64 = pcm.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
        let rms = (energy / pcm.len() as f64).sqrt() / f64::from(i16::MAX);
        if rms <= 0.0 {
            return FLOOR_DBFS;
        }
        ((20.0 * rms.log10()) as f32).clamp(FLOOR_DBFS, 0.0)
    }

    /// The next frame; returns what the meter shows after it.
    pub fn frame(&mut self, pcm: &[i16]) -> VoiceLevel {
        let level = VoiceMeter::dbfs(pcm);
        self.shown.frame_dbfs = level;
        self.shown.dbfs = level.max(self.shown.dbfs - 1.0).max(FLOOR_DBFS);
        if level > SPEAKING_ON_DBFS {
            self.loud_frames += 1;
        } else {
            self.loud_frames = 0;
        }
        if level < SPEAKING_OFF_DBFS {
            self.quiet_frames += 1;
        } else {
            self.quiet_frames = 0;
        }
        if self.loud_frames >= ON_FRAMES {
            self.shown.speaking = true;
        } else if self.quiet_frames >= HANG_FRAMES {
            self.shown.speaking = false;
        }
        self.shown
    }

    /// What the meter shows now.
    pub fn level(&self) -> VoiceLevel {
        self.shown
    }
}

/// An audio source read and metered on its own thread until dropped; [`SourceMeter::level`]
/// never waits for the device. Dropping it stops the thread and closes the source
/// (within a frame: drop it off the UI thread).
pub struct SourceMeter {
    level: Arc<Mutex<VoiceLevel>>,
    problem: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SourceMeter {
    pub fn start(mut source: Box<dyn AudioSource>) -> SourceMeter {
        let level = Arc::new(Mutex::new(VoiceLevel::default()));
        let problem = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_level, thread_problem, thread_stop) =
            (level.clone(), problem.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("duet-meter".into())
            .spawn(move || {
                let mut meter = VoiceMeter::new();
                let mut next = Instant::now();
                while !thread_stop.load(Ordering::Relaxed) {
                    match source.next_frame() {
                        Ok(pcm) => {
                            let shown = meter.frame(&pcm);
                            *thread_level.lock().unwrap_or_else(PoisonError::into_inner) = shown;
                        }
                        Err(e) => {
                            *thread_problem
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                            return;
                        }
                    }
                    super::pace(&mut next, Duration::from_millis(20));
                }
            });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                *problem.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(format!("cannot start the meter: {e}"));
                None
            }
        };
        SourceMeter {
            level,
            problem,
            stop,
            thread,
        }
    }

    /// What the meter shows now.
    pub fn level(&self) -> VoiceLevel {
        *self.level.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the source stopped, if it failed.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for SourceMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20 ms frame of a 440 Hz tone at `dbfs` (RMS).
    fn tone(dbfs: f32) -> Vec<i16> {
        let peak = 10f32.powf(dbfs / 20.0) * std::f32::consts::SQRT_2 * f32::from(i16::MAX);
        (0..960)
            .map(|i| {
                let t = i as f32 / 48_000.0;
                (peak * (2.0 * std::f32::consts::PI * 440.0 * t).sin()) as i16
            })
            .collect()
    }

    #[test]
    fn a_source_meter_follows_its_source_on_its_own_thread() {
        let meter = SourceMeter::start(Box::new(crate::media::audio::Sine::new(440.0)));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !meter.level().speaking && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let level = meter.level();
        assert!(level.speaking && level.dbfs > -30.0, "{level:?}");
        assert_eq!(meter.problem(), None);
        drop(meter); // stops the thread
    }

    #[test]
    fn the_level_is_the_rms_in_dbfs() {
        assert!((VoiceMeter::dbfs(&tone(-20.0)) + 20.0).abs() < 0.2);
        assert!((VoiceMeter::dbfs(&tone(-6.0)) + 6.0).abs() < 0.2);
        assert_eq!(VoiceMeter::dbfs(&[0; 960]), FLOOR_DBFS);
        assert_eq!(VoiceMeter::dbfs(&[]), FLOOR_DBFS);
        assert_eq!(VoiceMeter::dbfs(&[i16::MIN; 960]), 0.0);
    }

    #[test]
    fn the_meter_rises_at_once_and_falls_slowly() {
        let mut m = VoiceMeter::new();
        let loud = m.frame(&tone(-20.0));
        assert!((loud.dbfs + 20.0).abs() < 0.2, "{loud:?}");
        assert!((loud.fraction() - 50.0 / 70.0).abs() < 0.01);
        let after = m.frame(&[0; 960]);
        assert!((after.dbfs + 21.0).abs() < 0.2, "{after:?}");
        for _ in 0..100 {
            m.frame(&[0; 960]);
        }
        assert_eq!(m.level().dbfs, FLOOR_DBFS);
        assert_eq!(m.level().fraction(), 0.0);
    }

    #[test]
    fn speech_is_shown_after_60_ms_and_held_over_pauses() {
        let mut m = VoiceMeter::new();
        // A click (one loud frame) is not speech.
        assert!(!m.frame(&tone(-20.0)).speaking);
        assert!(!m.frame(&[0; 960]).speaking);
        // Three loud frames are.
        assert!(!m.frame(&tone(-30.0)).speaking);
        assert!(!m.frame(&tone(-30.0)).speaking);
        assert!(m.frame(&tone(-30.0)).speaking);
        // A pause between words (200 ms) keeps it.
        for _ in 0..10 {
            assert!(m.frame(&[0; 960]).speaking);
        }
        assert!(m.frame(&tone(-30.0)).speaking);
        // 400 ms of quiet ends it; a level between the thresholds neither starts nor ends.
        for _ in 0..HANG_FRAMES - 1 {
            assert!(m.frame(&[0; 960]).speaking);
        }
        assert!(!m.frame(&[0; 960]).speaking);
        for _ in 0..10 {
            assert!(!m.frame(&tone(-45.0)).speaking);
        }
    }
}
