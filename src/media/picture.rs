//! Pictures on their way to a display, and the slot where the newest one waits.
//!
//! The thread that produced a frame (the decoder, the camera capture) leaves it, as the
//! I420 picture it is, in a [`PictureSlot`]; the UI takes it out (a move, not a copy)
//! only when it is newer than the one on screen, and uploads its planes to textures
//! that a shader converts to RGB while drawing (`ui::video`). So no thread converts
//! pixels for the screen, and the UI thread never waits on media.

use std::sync::{Arc, Mutex, PoisonError};

use super::video::VideoFrame;

/// A picture for the screen: a decoded or captured I420 frame.
pub type Picture = VideoFrame;

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
        assert!(slot.take().is_none());
        let p = |w| VideoFrame::black(w, 2);
        slot.put(p(2));
        slot.put(p(4));
        assert_eq!(slot.serial(), 2);
        assert_eq!(slot.take().map(|p| p.width), Some(4));
        assert!(slot.take().is_none());
    }
}
