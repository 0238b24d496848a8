//! RGBA pictures on their way to a display, and the slot where the newest one waits.
//!
//! The thread that produced a frame (the decoder, the camera capture) converts it to
//! RGBA once and leaves it in a [`PictureSlot`]; the UI takes it out (a move, not a copy)
//! only when it is newer than the one on screen, and uploads it to its texture. So the
//! UI thread never converts pixels and never waits on media.

use std::sync::{Arc, Mutex, PoisonError};

use super::video::VideoFrame;

/// An RGBA picture, 4 bytes per pixel, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    pub width: usize,
    pub height: usize,
    pub rgba: Vec<u8>,
}

impl Picture {
    pub fn from_frame(frame: &VideoFrame) -> Picture {
        Picture {
            width: frame.width,
            height: frame.height,
            rgba: frame.to_rgba(),
        }
    }
}

/// Something to call when a new picture (or any other news) is ready, e.g. a UI's
/// "repaint now", so the UI sleeps until there is something to draw.
#[derive(Clone)]
pub struct Notify(std::sync::Arc<dyn Fn() + Send + Sync>);

impl Notify {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Notify {
        Notify(std::sync::Arc::new(f))
    }

    pub fn notify(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notify")
    }
}

#[derive(Debug, Default)]
struct Slot {
    serial: u64,
    picture: Option<Picture>,
}

/// Holds the newest picture of one video stream. Cloning shares the slot.
#[derive(Debug, Clone, Default)]
pub struct PictureSlot(Arc<Mutex<Slot>>);

impl PictureSlot {
    /// Replaces the waiting picture (an older one not yet shown is simply dropped).
    pub fn put(&self, picture: Picture) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.serial += 1;
        slot.picture = Some(picture);
    }

    /// Takes the waiting picture, if one arrived since it was last taken.
    pub fn take(&self) -> Option<Picture> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .picture
            .take()
    }

    /// How many pictures were put so far (0: none yet).
    pub fn serial(&self) -> u64 {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_moves_the_newest_picture_out_once() {
        let slot = PictureSlot::default();
        assert_eq!(slot.take(), None);
        let p = |w| Picture {
            width: w,
            height: 1,
            rgba: vec![0; w * 4],
        };
        slot.put(p(1));
        slot.put(p(2));
        assert_eq!(slot.serial(), 2);
        assert_eq!(slot.take().map(|p| p.width), Some(2));
        assert_eq!(slot.take(), None);
    }
}
