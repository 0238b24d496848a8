//! The real camera through `nokhwa`, as a [`VideoSource`].
//!
//! Format negotiation prefers what needs no decoding (YUYV, NV12) near 1280x720 at 30 fps
//! and takes MJPEG (decoded to RGB) only when that is all the camera offers. Frames are
//! converted to I420 here. With no camera, opening fails with a clear
//! [`MediaError::Device`] and the caller falls back to the test pattern.

use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
};

use super::MediaError;
use super::video::{VideoFrame, VideoSource};

/// Formats we accept, best first.
static FORMATS: [FrameFormat; 3] = [FrameFormat::YUYV, FrameFormat::NV12, FrameFormat::MJPEG];

/// Names of the cameras present (for pickers); empty when there are none.
pub fn list_cameras() -> Vec<String> {
    nokhwa::query(ApiBackend::Auto)
        .map(|cams| cams.iter().map(|c| c.human_name()).collect())
        .unwrap_or_default()
}

/// The first camera, streaming. nokhwa's camera is not `Send`, so it lives on a thread
/// of its own that converts frames to I420 and hands them over a small channel.
pub struct Camera {
    frames: std::sync::mpsc::Receiver<Result<VideoFrame, MediaError>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    fps: f64,
    description: String,
}

fn device_error(e: impl std::fmt::Display) -> MediaError {
    MediaError::Device(format!("camera: {e}"))
}

/// Opens the camera called `name` (or the first one) and starts its stream; returns it
/// with (fps, description).
fn open_camera(name: Option<&str>) -> Result<(nokhwa::Camera, f64, String), MediaError> {
    let cameras = nokhwa::query(ApiBackend::Auto).map_err(device_error)?;
    let info = match name {
        Some(n) => cameras
            .iter()
            .find(|c| c.human_name() == n)
            .ok_or_else(|| MediaError::Device(format!("camera {n:?} not found")))?,
        None => cameras
            .first()
            .ok_or_else(|| MediaError::Device("no camera found".into()))?,
    };
    let wanted = CameraFormat::new(Resolution::new(1280, 720), FrameFormat::YUYV, 30);
    let requested = RequestedFormat::with_formats(RequestedFormatType::Closest(wanted), &FORMATS);
    let mut camera = nokhwa::Camera::new(info.index().clone(), requested).map_err(device_error)?;
    camera.open_stream().map_err(device_error)?;
    let format = camera.camera_format();
    let description = format!(
        "camera {} ({}x{} {} @ {} fps)",
        info.human_name(),
        format.width(),
        format.height(),
        format.format(),
        format.frame_rate()
    );
    Ok((camera, f64::from(format.frame_rate().max(1)), description))
}

fn grab(camera: &mut nokhwa::Camera) -> Result<VideoFrame, MediaError> {
    let buffer = camera.frame().map_err(device_error)?;
    let res = buffer.resolution();
    let (w, h) = (res.width() as usize, res.height() as usize);
    match buffer.source_frame_format() {
        FrameFormat::YUYV => yuyv_to_i420(buffer.buffer(), w, h),
        FrameFormat::NV12 => nv12_to_i420(buffer.buffer(), w, h),
        _ => {
            let rgb = buffer.decode_image::<RgbFormat>().map_err(device_error)?;
            rgb_to_i420(rgb.as_raw(), w, h)
        }
    }
}

impl Camera {
    pub fn open_default() -> Result<Camera, MediaError> {
        Camera::open(None)
    }

    /// Opens the camera called `name` (as [`list_cameras`] lists it), or the first one.
    pub fn open(name: Option<&str>) -> Result<Camera, MediaError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let wanted = name.map(str::to_owned);
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let (frames_tx, frames) = std::sync::mpsc::sync_channel(2);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("duet-camera".into())
            .spawn(move || {
                let mut camera = match open_camera(wanted.as_deref()) {
                    Ok((camera, fps, description)) => {
                        let _ = opened_tx.send(Ok((fps, description)));
                        camera
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                while !thread_stop.load(Ordering::Relaxed) {
                    let frame = grab(&mut camera);
                    let failed = frame.is_err();
                    if frames_tx.send(frame).is_err() || failed {
                        break;
                    }
                }
                let _ = camera.stop_stream();
            })
            .map_err(device_error)?;
        match opened_rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(Ok((fps, description))) => Ok(Camera {
                frames,
                stop,
                thread: Some(thread),
                fps,
                description,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(MediaError::Device(
                "the camera did not start within 10 s".into(),
            )),
        }
    }
}

impl VideoSource for Camera {
    fn next_frame(&mut self) -> Result<VideoFrame, MediaError> {
        match self.frames.recv_timeout(std::time::Duration::from_secs(2)) {
            Ok(frame) => frame,
            Err(_) => Err(MediaError::Device(
                "the camera stopped delivering frames".into(),
            )),
        }
    }

    fn frame_rate(&self) -> f64 {
        self.fps
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Unblock a thread waiting to hand over a frame, then wait for it.
        while self.frames.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn short(what: &str) -> MediaError {
    MediaError::Format(format!("camera frame shorter than its {what} size"))
}

/// The three planes of an I420 frame, for the `yuv` crate to write into.
fn planes(f: &mut VideoFrame) -> yuv::YuvPlanarImageMut<'_, u8> {
    let (w, h) = (f.width, f.height);
    let (y, chroma) = f.data.split_at_mut(w * h);
    let (u, v) = chroma.split_at_mut(w * h / 4);
    yuv::YuvPlanarImageMut {
        y_plane: yuv::BufferStoreMut::Borrowed(y),
        y_stride: w as u32,
        u_plane: yuv::BufferStoreMut::Borrowed(u),
        u_stride: (w / 2) as u32,
        v_plane: yuv::BufferStoreMut::Borrowed(v),
        v_stride: (w / 2) as u32,
        width: w as u32,
        height: h as u32,
    }
}

fn conversion(what: &str, e: yuv::YuvError) -> MediaError {
    MediaError::Format(format!("camera {what} frame: {e}"))
}

/// Packed 4:2:2 `Y0 U Y1 V` to I420 (the `yuv` crate: SIMD, chroma of two rows averaged).
pub fn yuyv_to_i420(src: &[u8], width: usize, height: usize) -> Result<VideoFrame, MediaError> {
    if src.len() < width * height * 2 {
        return Err(short("YUYV"));
    }
    let mut f = VideoFrame::black(width, height);
    let (w, h) = (f.width, f.height);
    let packed = yuv::YuvPackedImage {
        yuy: &src[..width * height * 2],
        yuy_stride: (width * 2) as u32,
        width: w as u32,
        height: h as u32,
    };
    yuv::yuyv422_to_yuv420(&mut planes(&mut f), &packed).map_err(|e| conversion("YUYV", e))?;
    Ok(f)
}

/// NV12 (Y plane, then interleaved UV at half resolution) to I420.
pub fn nv12_to_i420(src: &[u8], width: usize, height: usize) -> Result<VideoFrame, MediaError> {
    if src.len() < width * height * 3 / 2 {
        return Err(short("NV12"));
    }
    let mut f = VideoFrame::black(width, height);
    let (w, h) = (f.width, f.height);
    let luma = w * h;
    for row in 0..h {
        f.data[row * w..][..w].copy_from_slice(&src[row * width..][..w]);
    }
    let uv = &src[width * height..];
    for row in 0..h / 2 {
        for cx in 0..w / 2 {
            f.data[luma + row * (w / 2) + cx] = uv[row * width + cx * 2];
            f.data[luma + luma / 4 + row * (w / 2) + cx] = uv[row * width + cx * 2 + 1];
        }
    }
    Ok(f)
}

/// Packed RGB (8 bits each, a decoded MJPEG frame) to I420, BT.601 limited range (the
/// `yuv` crate).
pub fn rgb_to_i420(src: &[u8], width: usize, height: usize) -> Result<VideoFrame, MediaError> {
    if src.len() < width * height * 3 {
        return Err(short("RGB"));
    }
    let mut f = VideoFrame::black(width, height);
    yuv::rgb_to_yuv420(
        &mut planes(&mut f),
        &src[..width * height * 3],
        (width * 3) as u32,
        yuv::YuvRange::Limited,
        yuv::YuvStandardMatrix::Bt601,
        yuv::YuvConversionMode::Balanced,
    )
    .map_err(|e| conversion("RGB", e))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::video::TestPattern;

    /// I420 -> packed formats -> I420 gives the same picture back.
    #[test]
    fn conversions_round_trip() {
        let src = TestPattern::new(64, 48, 30.0, false).render(3);
        let (w, h) = (src.width, src.height);
        let mut yuyv = Vec::new();
        let mut nv12 = src.y().to_vec();
        for row in 0..h {
            for cx in 0..w / 2 {
                let c = (row / 2) * (w / 2) + cx;
                yuyv.extend([
                    src.y()[row * w + cx * 2],
                    src.u()[c],
                    src.y()[row * w + cx * 2 + 1],
                    src.v()[c],
                ]);
            }
        }
        for c in 0..(w / 2) * (h / 2) {
            nv12.extend([src.u()[c], src.v()[c]]);
        }
        assert_eq!(yuyv_to_i420(&yuyv, w, h).unwrap(), src);
        assert_eq!(nv12_to_i420(&nv12, w, h).unwrap(), src);
        // RGB goes through a lossy colour conversion: close, not equal.
        let rgba = src.to_rgba();
        let rgb: Vec<u8> = rgba.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
        let back = rgb_to_i420(&rgb, w, h).unwrap();
        let max_diff = back
            .y()
            .iter()
            .zip(src.y())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max_diff <= 3, "{max_diff}");
        assert!(yuyv_to_i420(&yuyv[..10], w, h).is_err());
    }
}
