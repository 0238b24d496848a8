//! `Scaler`: I420 frames to a smaller size, for the sender's resolution ladder. Each
//! plane is resized on its own with `fast_image_resize` (SIMD convolution; bilinear is
//! enough for downscaling by at most 4 and costs ~1 ms for 720p -> 360p here), and the
//! test pattern's strip is re-drawn at the new size so receivers can still read the
//! frame number and capture time (measurements travel in the pixels).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::MediaError;
use super::video::{VideoFrame, read_strip, write_strip};

/// Keeps the resizer's buffers between frames.
pub struct Scaler {
    resizer: Resizer,
    options: ResizeOptions,
}

impl Default for Scaler {
    fn default() -> Self {
        Scaler::new()
    }
}

impl Scaler {
    pub fn new() -> Scaler {
        Scaler::with_algorithm(ResizeAlg::Convolution(FilterType::Bilinear))
    }

    /// A scaler with another of `fast_image_resize`'s algorithms (benches compare them).
    pub fn with_algorithm(algorithm: ResizeAlg) -> Scaler {
        Scaler {
            resizer: Resizer::new(),
            options: ResizeOptions::new().resize_alg(algorithm),
        }
    }

    /// `frame` at `width` x `height` (even numbers); the frame itself when it already is.
    pub fn scale(
        &mut self,
        frame: VideoFrame,
        width: usize,
        height: usize,
    ) -> Result<VideoFrame, MediaError> {
        let (w, h) = (width & !1, height & !1);
        if (w, h) == (frame.width, frame.height) || w == 0 || h == 0 {
            return Ok(frame);
        }
        let mut out = VideoFrame::black(w, h);
        let planes = [
            (frame.y(), frame.width, frame.height, 0, w, h),
            (
                frame.u(),
                frame.width / 2,
                frame.height / 2,
                w * h,
                w / 2,
                h / 2,
            ),
            (
                frame.v(),
                frame.width / 2,
                frame.height / 2,
                w * h + w * h / 4,
                w / 2,
                h / 2,
            ),
        ];
        for (src, sw, sh, offset, dw, dh) in planes {
            let err = |e: &dyn std::fmt::Display| MediaError::Codec(format!("scaling: {e}"));
            let src =
                ImageRef::new(sw as u32, sh as u32, src, PixelType::U8).map_err(|e| err(&e))?;
            // Straight into the output frame's plane.
            let mut dst = Image::from_slice_u8(
                dw as u32,
                dh as u32,
                &mut out.data[offset..offset + dw * dh],
                PixelType::U8,
            )
            .map_err(|e| err(&e))?;
            self.resizer
                .resize(&src, &mut dst, &self.options)
                .map_err(|e| err(&e))?;
        }
        if let Some(strip) = read_strip(&frame) {
            write_strip(&mut out, strip);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::video::{TestPattern, VideoSource as _, psnr_luma, strip_height};

    #[test]
    fn scaling_keeps_the_picture_and_the_strip() {
        let mut pattern = TestPattern::new(1280, 720, 30.0, false);
        let frame = pattern.next_frame().unwrap();
        let strip = read_strip(&frame).unwrap();
        let mut scaler = Scaler::new();
        let small = scaler.scale(frame.clone(), 640, 360).unwrap();
        assert_eq!((small.width, small.height), (640, 360));
        assert_eq!(small.data.len(), 640 * 360 * 3 / 2);
        assert_eq!(
            read_strip(&small),
            Some(strip),
            "measurements survive scaling"
        );
        // Below the strip, it is the source averaged 2x2.
        let mut boxed = VideoFrame::black(640, 360);
        let (src, w) = (frame.y(), frame.width);
        for (i, px) in boxed.y_mut().iter_mut().enumerate() {
            let (x, y) = (2 * (i % 640), 2 * (i / 640));
            let sum: u32 = [(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)]
                .iter()
                .map(|&(x, y)| u32::from(src[y * w + x]))
                .sum();
            *px = ((sum + 2) / 4) as u8;
        }
        let psnr = psnr_luma(&boxed, &small, strip_height(640));
        assert!(psnr > 30.0, "{psnr:.1} dB");
        // The same size is the same frame.
        let same = scaler.scale(frame.clone(), 1280, 720).unwrap();
        assert_eq!(same, frame);
    }
}
