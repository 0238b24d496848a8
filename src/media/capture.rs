//! `Capture`: a video source running on its own thread at its own frame rate.
//!
//! One capture feeds two consumers that must not slow each other down: the encoder
//! (through a small channel; frames are dropped, not queued, when it falls behind) and
//! the self-view (I420 pictures left in a [`PictureSlot`]). The source is opened and
//! released with the capture, so "camera off" really lets the camera go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::picture::{Notify, PictureSlot};
use super::video::{VideoFrame, VideoSource};

/// A frame for the encoder, with the instant it was captured: the sender's RTP
/// timestamps are derived from these instants, so when the encoder thread gets to a frame
/// (scheduling, a slow encode before it) does not show in them.
#[derive(Debug, Clone)]
pub struct CapturedFrame {
    pub frame: VideoFrame,
    pub captured_at: Instant,
}

/// Where a capture sends its frames.
#[derive(Clone, Default)]
struct Outputs {
    encoder: Option<SyncSender<CapturedFrame>>,
    preview: Option<(PictureSlot, Option<Notify>)>,
}

/// A running capture; stops (and joins its thread) when dropped.
pub struct Capture {
    outputs: Arc<Mutex<Outputs>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    description: String,
}

impl Capture {
    /// Starts pulling frames from `source`, paced at its frame rate.
    pub fn start(mut source: Box<dyn VideoSource>) -> Capture {
        let outputs = Arc::new(Mutex::new(Outputs::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let description = source.describe();
        let (thread_outputs, thread_stop) = (outputs.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("duet-capture".into())
            .spawn(move || {
                let period = Duration::from_secs_f64(1.0 / source.frame_rate().max(1.0));
                let mut next = Instant::now();
                while !thread_stop.load(Ordering::Relaxed) {
                    let frame = match source.next_frame() {
                        Ok(f) => CapturedFrame {
                            frame: f,
                            captured_at: Instant::now(),
                        },
                        Err(e) => {
                            tracing::error!(error = %e, "video source failed");
                            return;
                        }
                    };
                    let out = thread_outputs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    if let Some((slot, notify)) = out.preview {
                        slot.put(frame.frame.clone());
                        if let Some(n) = notify {
                            n.notify();
                        }
                    }
                    if let Some(tx) = out.encoder {
                        match tx.try_send(frame) {
                            Ok(()) | Err(TrySendError::Full(_)) => {}
                            Err(TrySendError::Disconnected(_)) => {
                                thread_outputs
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .encoder = None;
                            }
                        }
                    }
                    super::pace(&mut next, period);
                }
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the capture thread");
                None
            }
        };
        Capture {
            outputs,
            stop,
            thread,
            description,
        }
    }

    /// Sends every frame from now on to the encoder's channel too.
    pub fn feed_encoder(&self, tx: SyncSender<CapturedFrame>) {
        self.outputs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .encoder = Some(tx);
    }

    /// Leaves an RGBA copy of every frame in `slot` (and calls `notify`), for a self-view.
    pub fn preview_into(&self, slot: PictureSlot, notify: Option<Notify>) {
        self.outputs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .preview = Some((slot, notify));
    }

    /// What is being captured, e.g. "camera X (1280x720 YUYV @ 30 fps)".
    pub fn describe(&self) -> &str {
        &self.description
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::video::TestPattern;

    #[test]
    fn feeds_the_encoder_and_the_preview_and_stops_when_dropped() {
        let capture = Capture::start(Box::new(TestPattern::new(64, 48, 100.0, false)));
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let slot = PictureSlot::default();
        capture.feed_encoder(tx);
        capture.preview_into(slot.clone(), None);
        let first = rx.recv_timeout(Duration::from_secs(2)).unwrap();
        let second = rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_eq!((first.frame.width, first.frame.height), (64, 48));
        // Each frame carries when it was captured: 10 ms apart at 100 fps.
        assert!(second.captured_at <= Instant::now());
        let gap = second.captured_at - first.captured_at;
        assert!(gap >= Duration::from_millis(5), "{gap:?}");
        std::thread::sleep(Duration::from_millis(50));
        let picture = slot.take().unwrap();
        assert_eq!(picture.data.len(), 64 * 48 * 3 / 2);
        drop(capture);
        // The thread is gone, so the channel's sender is dropped: it drains then ends.
        while rx.recv_timeout(Duration::from_millis(500)).is_ok() {}
        assert!(matches!(
            rx.recv_timeout(Duration::from_millis(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
