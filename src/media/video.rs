//! Raw video: the I420 frame type, the `VideoSource` trait and its synthetic and file
//! implementations, the machine-readable strip, and Y4M recording.
//!
//! The test pattern is a pure function of its frame number (plus optional noise seeded by
//! it), so a receiver that reads the frame number back from the strip can re-render the
//! exact source picture and measure quality (PSNR) from pixels alone. The strip's
//! timestamp is wall-clock microseconds (mod 2^32), so two processes on one machine can
//! measure glass-to-glass latency.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::MediaError;

/// A picture in I420: full-resolution Y plane, then U and V at half width and height,
/// tightly packed. Width and height are even.
#[derive(Clone, PartialEq, Eq)]
pub struct VideoFrame {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for VideoFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VideoFrame({}x{})", self.width, self.height)
    }
}

impl VideoFrame {
    /// A black frame (Y 16, chroma neutral).
    pub fn black(width: usize, height: usize) -> VideoFrame {
        let (w, h) = (width & !1, height & !1);
        let luma = w * h;
        let mut data = vec![16u8; luma + luma / 2];
        data[luma..].fill(128);
        VideoFrame {
            width: w,
            height: h,
            data,
        }
    }

    /// A frame from three planes with strides (as a decoder hands them out).
    pub fn from_planes(
        width: usize,
        height: usize,
        planes: [&[u8]; 3],
        strides: [usize; 3],
    ) -> VideoFrame {
        // Rows are appended, not written over a cleared frame: this runs for every
        // decoded picture, and clearing 1.4 MB first cost more than the copy.
        let (w, h) = (width & !1, height & !1);
        let mut data = Vec::with_capacity(w * h + w * h / 2);
        let dims = [(w, h), (w / 2, h / 2), (w / 2, h / 2)];
        for ((plane, stride), (pw, ph)) in planes.into_iter().zip(strides).zip(dims) {
            for row in 0..ph {
                data.extend_from_slice(&plane[row * stride..][..pw]);
            }
        }
        VideoFrame {
            width: w,
            height: h,
            data,
        }
    }

    pub fn y(&self) -> &[u8] {
        &self.data[..self.width * self.height]
    }

    pub fn u(&self) -> &[u8] {
        let l = self.width * self.height;
        &self.data[l..l + l / 4]
    }

    pub fn v(&self) -> &[u8] {
        let l = self.width * self.height;
        &self.data[l + l / 4..]
    }

    pub fn y_mut(&mut self) -> &mut [u8] {
        let l = self.width * self.height;
        &mut self.data[..l]
    }

    /// RGBA pixels (BT.601 limited range), e.g. for a texture or a PNG.
    pub fn to_rgba(&self) -> Vec<u8> {
        let (w, h) = (self.width, self.height);
        let mut out = vec![255u8; w * h * 4];
        let (y, u, v) = (self.y(), self.u(), self.v());
        for row in 0..h {
            for col in 0..w {
                let c = i32::from(y[row * w + col]) - 16;
                let d = i32::from(u[(row / 2) * (w / 2) + col / 2]) - 128;
                let e = i32::from(v[(row / 2) * (w / 2) + col / 2]) - 128;
                let px = &mut out[(row * w + col) * 4..][..3];
                px[0] = ((298 * c + 409 * e + 128) >> 8).clamp(0, 255) as u8;
                px[1] = ((298 * c - 100 * d - 208 * e + 128) >> 8).clamp(0, 255) as u8;
                px[2] = ((298 * c + 516 * d + 128) >> 8).clamp(0, 255) as u8;
            }
        }
        out
    }
}

impl openh264::formats::YUVSource for VideoFrame {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.width, self.width / 2, self.width / 2)
    }

    fn y(&self) -> &[u8] {
        VideoFrame::y(self)
    }

    fn u(&self) -> &[u8] {
        VideoFrame::u(self)
    }

    fn v(&self) -> &[u8] {
        VideoFrame::v(self)
    }
}

/// Something that produces pictures: a camera, the test pattern, a file.
pub trait VideoSource: Send {
    /// The next picture. Synthetic sources return at once; the caller paces them.
    fn next_frame(&mut self) -> Result<VideoFrame, MediaError>;
    /// Nominal frames per second.
    fn frame_rate(&self) -> f64;
    /// What it is, for logs and the UI.
    fn describe(&self) -> String;
}

/// Wall-clock microseconds, truncated to 32 bits (wraps every 71 minutes).
pub fn wall_clock_us32() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u32)
        .unwrap_or(0)
}

/// What the strip carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripData {
    pub frame_number: u32,
    /// [`wall_clock_us32`] when the frame was captured.
    pub captured_us: u32,
}

/// The strip's blocks are one macroblock each, so compression keeps them readable.
pub const STRIP_BLOCK: usize = 16;
const STRIP_BITS: usize = 72; // 32 frame number + 32 timestamp + 8 check

/// Height of the strip for frames `width` pixels wide (0 if it does not fit).
pub fn strip_height(width: usize) -> usize {
    let per_row = width / STRIP_BLOCK;
    if per_row == 0 {
        return 0;
    }
    STRIP_BITS.div_ceil(per_row) * STRIP_BLOCK
}

fn check_byte(data: StripData) -> u8 {
    let mut c: u8 = 0x5a;
    for b in data
        .frame_number
        .to_le_bytes()
        .into_iter()
        .chain(data.captured_us.to_le_bytes())
    {
        c = c.rotate_left(3) ^ b;
    }
    c
}

fn strip_bits(data: StripData) -> [bool; STRIP_BITS] {
    let word = (u128::from(data.frame_number) << 40)
        | (u128::from(data.captured_us) << 8)
        | u128::from(check_byte(data));
    let mut bits = [false; STRIP_BITS];
    for (i, bit) in bits.iter_mut().enumerate() {
        *bit = (word >> (STRIP_BITS - 1 - i)) & 1 == 1;
    }
    bits
}

/// Paints the strip (top rows of the luma plane) into `frame`.
pub fn write_strip(frame: &mut VideoFrame, data: StripData) {
    let w = frame.width;
    let per_row = w / STRIP_BLOCK;
    if per_row == 0 || strip_height(w) > frame.height {
        return;
    }
    let bits = strip_bits(data);
    let y = frame.y_mut();
    for (i, &bit) in bits.iter().enumerate() {
        let (bx, by) = ((i % per_row) * STRIP_BLOCK, (i / per_row) * STRIP_BLOCK);
        let value = if bit { 235 } else { 16 };
        for row in by..by + STRIP_BLOCK {
            y[row * w + bx..][..STRIP_BLOCK].fill(value);
        }
    }
    // Unused blocks of the last strip row stay mid-grey.
    let used = STRIP_BITS % per_row;
    if used != 0 {
        let by = (STRIP_BITS / per_row) * STRIP_BLOCK;
        for row in by..by + STRIP_BLOCK {
            y[row * w + used * STRIP_BLOCK..(row + 1) * w].fill(128);
        }
    }
}

/// Reads the strip back; `None` if it is unreadable (wrong check byte).
pub fn read_strip(frame: &VideoFrame) -> Option<StripData> {
    let w = frame.width;
    let per_row = w / STRIP_BLOCK;
    if per_row == 0 || strip_height(w) > frame.height {
        return None;
    }
    let y = frame.y();
    let mut word: u128 = 0;
    for i in 0..STRIP_BITS {
        let (bx, by) = ((i % per_row) * STRIP_BLOCK, (i / per_row) * STRIP_BLOCK);
        // The block's centre 8x8 avoids edge ringing.
        let mut sum = 0u32;
        for row in by + 4..by + 12 {
            sum += y[row * w + bx + 4..][..8]
                .iter()
                .map(|&p| u32::from(p))
                .sum::<u32>();
        }
        word = (word << 1) | u128::from(sum / 64 > 125);
    }
    let data = StripData {
        frame_number: (word >> 40) as u32,
        captured_us: (word >> 8) as u32,
    };
    (check_byte(data) == (word & 0xff) as u8).then_some(data)
}

/// A moving test picture: a drifting gradient, a bouncing box and colour bars, with the
/// strip on top. `noisy` adds random noise to every pixel (the encoder's worst case).
#[derive(Debug, Clone)]
pub struct TestPattern {
    width: usize,
    height: usize,
    fps: f64,
    noisy: bool,
    next: u32,
}

impl TestPattern {
    pub fn new(width: usize, height: usize, fps: f64, noisy: bool) -> TestPattern {
        TestPattern {
            width: width.max(16) & !1,
            height: height.max(16) & !1,
            fps,
            noisy,
            next: 0,
        }
    }

    /// The picture for `frame_number` without the strip: the same input gives the
    /// same pixels, which is what lets a receiver compute PSNR.
    pub fn render(&self, frame_number: u32) -> VideoFrame {
        let (w, h) = (self.width, self.height);
        let mut f = VideoFrame::black(w, h);
        let n = frame_number as usize;
        let top = strip_height(w).min(h);
        {
            let y = f.y_mut();
            // Smooth diagonal gradient drifting 2 px per frame: each row is a window of
            // one triangle wave (period 512) laid out longer than a row, so a row is one
            // copy (this runs for every 720p frame).
            let wave: Vec<u8> = (0..512 + w)
                .map(|g| {
                    let g = g % 512;
                    let g = if g < 256 { g } else { 511 - g };
                    (16 + g * 219 / 255) as u8
                })
                .collect();
            for row in top..h {
                let g = (row + 2 * n) % 512;
                y[row * w..(row + 1) * w].copy_from_slice(&wave[g..g + w]);
            }
            // A 64x64 white box bouncing around.
            let bw = 64.min(w / 4);
            let span_x = w.saturating_sub(bw).max(1);
            let span_y = (h - top).saturating_sub(bw).max(1);
            let bounce = |t: usize, span: usize| {
                let t = t % (2 * span);
                if t < span { t } else { 2 * span - t }
            };
            let bx = bounce(n * 4, span_x);
            let by = top + bounce(n * 3, span_y);
            for row in by..(by + bw).min(h) {
                y[row * w + bx..row * w + (bx + bw).min(w)].fill(235);
            }
        }
        // Chroma: eight vertical colour bars below the strip.
        let (cw, ch) = (w / 2, h / 2);
        let luma = w * h;
        let bars: [(u8, u8); 8] = [
            (128, 128),
            (44, 142),
            (156, 44),
            (72, 58),
            (184, 198),
            (100, 212),
            (212, 114),
            (128, 128),
        ];
        let u_row: Vec<u8> = (0..cw)
            .map(|col| bars[(col * 8 / cw.max(1)).min(7)].0)
            .collect();
        let v_row: Vec<u8> = (0..cw)
            .map(|col| bars[(col * 8 / cw.max(1)).min(7)].1)
            .collect();
        for row in top / 2..ch {
            f.data[luma + row * cw..][..cw].copy_from_slice(&u_row);
            f.data[luma + luma / 4 + row * cw..][..cw].copy_from_slice(&v_row);
        }
        if self.noisy {
            let mut s = u64::from(frame_number).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for p in f.y_mut()[top * w..].iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let noise = (s & 31) as i16 - 16;
                *p = (i16::from(*p) + noise).clamp(16, 235) as u8;
            }
        }
        f
    }

    /// Rows of the picture below the strip, where pixels can be compared.
    pub fn content_top(&self) -> usize {
        strip_height(self.width).min(self.height)
    }
}

impl VideoSource for TestPattern {
    fn next_frame(&mut self) -> Result<VideoFrame, MediaError> {
        let n = self.next;
        self.next = self.next.wrapping_add(1);
        let mut frame = self.render(n);
        write_strip(
            &mut frame,
            StripData {
                frame_number: n,
                captured_us: wall_clock_us32(),
            },
        );
        Ok(frame)
    }

    fn frame_rate(&self) -> f64 {
        self.fps
    }

    fn describe(&self) -> String {
        format!(
            "test pattern {}x{} @ {} fps{}",
            self.width,
            self.height,
            self.fps,
            if self.noisy { " (noisy)" } else { "" }
        )
    }
}

/// Luma PSNR in dB between two frames of the same size, over rows `from_row..`.
pub fn psnr_luma(a: &VideoFrame, b: &VideoFrame, from_row: usize) -> f64 {
    if a.width != b.width || a.height != b.height {
        return 0.0;
    }
    let start = from_row.min(a.height) * a.width;
    let (ya, yb) = (&a.y()[start..], &b.y()[start..]);
    if ya.is_empty() {
        return 0.0;
    }
    let sse: f64 = ya
        .iter()
        .zip(yb)
        .map(|(&p, &q)| {
            let d = f64::from(p) - f64::from(q);
            d * d
        })
        .sum();
    let mse = sse / ya.len() as f64;
    if mse == 0.0 {
        return 99.0;
    }
    10.0 * (255.0 * 255.0 / mse).log10()
}

/// Frames from a YUV4MPEG2 file (8-bit 4:2:0), looping at the end.
pub struct Y4mFile {
    path: PathBuf,
    decoder: y4m::Decoder<BufReader<std::fs::File>>,
    fps: f64,
}

impl Y4mFile {
    pub fn open(path: &Path) -> Result<Y4mFile, MediaError> {
        let decoder = Self::decoder(path)?;
        if decoder.get_bit_depth() != 8 || !is_420(decoder.get_colorspace()) {
            return Err(MediaError::Format(format!(
                "{}: only 8-bit 4:2:0 Y4M is supported",
                path.display()
            )));
        }
        let r = decoder.get_framerate();
        let fps = if r.den == 0 {
            30.0
        } else {
            r.num as f64 / r.den as f64
        };
        Ok(Y4mFile {
            path: path.to_owned(),
            decoder,
            fps,
        })
    }

    fn decoder(path: &Path) -> Result<y4m::Decoder<BufReader<std::fs::File>>, MediaError> {
        let file = std::fs::File::open(path)
            .map_err(|e| MediaError::Io(format!("{}: {e}", path.display())))?;
        y4m::decode(BufReader::new(file))
            .map_err(|e| MediaError::Format(format!("{}: {e:?}", path.display())))
    }
}

fn is_420(c: y4m::Colorspace) -> bool {
    matches!(
        c,
        y4m::Colorspace::C420
            | y4m::Colorspace::C420jpeg
            | y4m::Colorspace::C420paldv
            | y4m::Colorspace::C420mpeg2
    )
}

impl VideoSource for Y4mFile {
    fn next_frame(&mut self) -> Result<VideoFrame, MediaError> {
        let (w, h) = (self.decoder.get_width(), self.decoder.get_height());
        let frame = match self.decoder.read_frame() {
            Ok(f) => Some(VideoFrame::from_planes(
                w,
                h,
                [f.get_y_plane(), f.get_u_plane(), f.get_v_plane()],
                [w, w.div_ceil(2), w.div_ceil(2)],
            )),
            Err(y4m::Error::EOF) => None,
            Err(e) => return Err(MediaError::Format(format!("{e:?}"))),
        };
        match frame {
            Some(f) => Ok(f),
            None => {
                // Loop: reopen and read the first frame again.
                self.decoder = Self::decoder(&self.path)?;
                let f = self
                    .decoder
                    .read_frame()
                    .map_err(|e| MediaError::Format(format!("{e:?}")))?;
                Ok(VideoFrame::from_planes(
                    w,
                    h,
                    [f.get_y_plane(), f.get_u_plane(), f.get_v_plane()],
                    [w, w.div_ceil(2), w.div_ceil(2)],
                ))
            }
        }
    }

    fn frame_rate(&self) -> f64 {
        self.fps
    }

    fn describe(&self) -> String {
        format!("Y4M file {}", self.path.display())
    }
}

/// Writes frames to a Y4M file.
pub struct Y4mWriter {
    encoder: Option<y4m::Encoder<BufWriter<std::fs::File>>>,
    path: PathBuf,
    fps: usize,
}

impl Y4mWriter {
    /// The file is created with the first frame (its size decides the header).
    pub fn new(path: &Path, fps: usize) -> Y4mWriter {
        Y4mWriter {
            encoder: None,
            path: path.to_owned(),
            fps: fps.max(1),
        }
    }

    pub fn write(&mut self, frame: &VideoFrame) -> Result<(), MediaError> {
        if self.encoder.is_none() {
            let file = std::fs::File::create(&self.path)
                .map_err(|e| MediaError::Io(format!("{}: {e}", self.path.display())))?;
            let enc = y4m::encode(frame.width, frame.height, y4m::Ratio::new(self.fps, 1))
                .with_colorspace(y4m::Colorspace::C420jpeg)
                .write_header(BufWriter::new(file))
                .map_err(|e| MediaError::Io(format!("{e:?}")))?;
            self.encoder = Some(enc);
        }
        if let Some(enc) = self.encoder.as_mut() {
            enc.write_frame(&y4m::Frame::new([frame.y(), frame.u(), frame.v()], None))
                .map_err(|e| MediaError::Io(format!("{e:?}")))?;
        }
        Ok(())
    }
}

/// Reads a whole Y4M file (tests and tools).
pub fn read_y4m(mut reader: impl Read) -> Result<Vec<VideoFrame>, MediaError> {
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| MediaError::Io(e.to_string()))?;
    let mut dec = y4m::decode(&bytes[..]).map_err(|e| MediaError::Format(format!("{e:?}")))?;
    let (w, h) = (dec.get_width(), dec.get_height());
    let mut frames = Vec::new();
    loop {
        match dec.read_frame() {
            Ok(f) => frames.push(VideoFrame::from_planes(
                w,
                h,
                [f.get_y_plane(), f.get_u_plane(), f.get_v_plane()],
                [w, w / 2, w / 2],
            )),
            Err(y4m::Error::EOF) => return Ok(frames),
            Err(e) => return Err(MediaError::Format(format!("{e:?}"))),
        }
    }
}

/// Writes `frames` as Y4M to `out` (tests and tools).
pub fn write_y4m(out: impl Write, frames: &[VideoFrame], fps: usize) -> Result<(), MediaError> {
    let Some(first) = frames.first() else {
        return Ok(());
    };
    let mut enc = y4m::encode(first.width, first.height, y4m::Ratio::new(fps.max(1), 1))
        .with_colorspace(y4m::Colorspace::C420jpeg)
        .write_header(out)
        .map_err(|e| MediaError::Io(format!("{e:?}")))?;
    for f in frames {
        enc.write_frame(&y4m::Frame::new([f.y(), f.u(), f.v()], None))
            .map_err(|e| MediaError::Io(format!("{e:?}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_with_padded_strides_become_a_packed_frame() {
        // 5x3 rounds down to 4x2; each plane row carries padding that must not leak in.
        let y: Vec<u8> = (0..3 * 8).map(|i| i as u8).collect();
        let u = [100, 101, 0, 0, 102, 103, 0, 0];
        let v = [200, 201, 0, 0, 202, 203, 0, 0];
        let f = VideoFrame::from_planes(5, 3, [&y, &u, &v], [8, 4, 4]);
        assert_eq!((f.width, f.height), (4, 2));
        assert_eq!(f.y(), &[0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(f.u(), &[100, 101]);
        assert_eq!(f.v(), &[200, 201]);
    }

    #[test]
    fn strip_round_trips_and_detects_damage() {
        let mut p = TestPattern::new(640, 360, 30.0, false);
        let mut f = p.next_frame().unwrap();
        let data = StripData {
            frame_number: 123_456,
            captured_us: 0xdead_beef,
        };
        write_strip(&mut f, data);
        assert_eq!(read_strip(&f), Some(data));
        // Flip one block: the check byte catches it.
        let w = f.width;
        for row in 0..STRIP_BLOCK {
            let px = &mut f.y_mut()[row * w..][..STRIP_BLOCK];
            let v = if px[0] > 128 { 16 } else { 235 };
            px.fill(v);
        }
        assert_eq!(read_strip(&f), None);
        assert_eq!(strip_height(640), 32);
        assert_eq!(strip_height(1280), 16);
    }

    #[test]
    fn pattern_is_deterministic_and_moves() {
        let p = TestPattern::new(320, 240, 30.0, true);
        assert_eq!(p.render(7), p.render(7));
        assert!(psnr_luma(&p.render(7), &p.render(8), p.content_top()) < 30.0);
        assert_eq!(psnr_luma(&p.render(7), &p.render(7), 0), 99.0);
    }

    #[test]
    fn y4m_round_trip() {
        let mut p = TestPattern::new(64, 48, 30.0, false);
        let frames: Vec<_> = (0..3).map(|_| p.next_frame().unwrap()).collect();
        let mut bytes = Vec::new();
        write_y4m(&mut bytes, &frames, 30).unwrap();
        assert_eq!(read_y4m(&bytes[..]).unwrap(), frames);
    }
}
