//! VP8 with libvpx (Debian's `libvpx-dev`, through the `env-libvpx-sys` bindings): the
//! codec browsers without H.264 (Firefox without its OpenH264 plugin) send and receive.
//!
//! The encoder is set up for calls the way libwebrtc sets up its own: one pass, CBR, no
//! look-ahead, frame dropping when the rate control runs over (a dropped frame yields no
//! frame), realtime speed, one token partition, keyframes capped in size. Controls match
//! [`super::h264::H264Encoder`]'s: a keyframe on request, bitrate and frame rate changed
//! while running without a keyframe (`vpx_codec_enc_config_set`), and a new picture size
//! (the resolution ladder's step) starts a new encoder, whose first frame is a keyframe.
//!
//! This module holds the crate's second `unsafe` island: the libvpx C API. Every call is
//! wrapped here in a safe type that owns its codec context and destroys it on drop.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::os::raw::{c_int, c_long, c_uint, c_ulong};

use vpx_sys as vpx;

use super::MediaError;
use super::h264::{EncodedFrame, EncoderSettings, MIN_BITRATE_BPS};
use super::video::VideoFrame;

/// The RTP clock: pts and durations are given to libvpx in 90 kHz ticks.
const TIMEBASE_HZ: i32 = 90_000;

fn error_text(ctx: &mut vpx::vpx_codec_ctx_t, what: &str, code: vpx::vpx_codec_err_t) -> String {
    // SAFETY: `ctx` is a context libvpx initialised (or zeroed, for which vpx_codec_error
    // returns a static string); both functions return pointers to static or
    // context-owned NUL-terminated strings (or null), read before any other call.
    let (message, detail) = unsafe {
        let message = vpx::vpx_codec_err_to_string(code);
        let detail = vpx::vpx_codec_error_detail(ctx);
        (c_text(message), c_text(detail))
    };
    match detail {
        Some(d) => format!("{what}: {} ({d})", message.unwrap_or_default()),
        None => format!("{what}: {}", message.unwrap_or_default()),
    }
}

/// # Safety
/// `p` is null or points to a NUL-terminated string valid for this call.
unsafe fn c_text(p: *const std::os::raw::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated (the caller's promise).
    Some(
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn kbps(bps: u32) -> c_uint {
    bps.div_ceil(1000).max(1)
}

/// One libvpx VP8 encoder context for one picture size.
struct Context {
    ctx: vpx::vpx_codec_ctx_t,
    cfg: vpx::vpx_codec_enc_cfg_t,
    width: usize,
    height: usize,
}

impl Context {
    fn new(width: usize, height: usize, s: EncoderSettings) -> Result<Context, MediaError> {
        let codec = |e: String| MediaError::Codec(e);
        let mut cfg = MaybeUninit::<vpx::vpx_codec_enc_cfg_t>::zeroed();
        // SAFETY: vpx_codec_vp8_cx returns libvpx's static interface; config_default
        // fills the whole struct `cfg` points to (it is zeroed, so plain data either way).
        let code = unsafe {
            vpx::vpx_codec_enc_config_default(vpx::vpx_codec_vp8_cx(), cfg.as_mut_ptr(), 0)
        };
        if code != vpx::VPX_CODEC_OK {
            return Err(codec(format!("libvpx VP8 default configuration: {code:?}")));
        }
        // SAFETY: initialised by vpx_codec_enc_config_default above (and zeroed before).
        let mut cfg = unsafe { cfg.assume_init() };
        cfg.g_w = width as c_uint;
        cfg.g_h = height as c_uint;
        cfg.g_timebase = vpx::vpx_rational {
            num: 1,
            den: TIMEBASE_HZ,
        };
        cfg.g_threads = 1;
        cfg.g_lag_in_frames = 0;
        cfg.g_error_resilient = 0;
        cfg.g_pass = vpx::vpx_enc_pass::VPX_RC_ONE_PASS;
        cfg.rc_end_usage = vpx::vpx_rc_mode::VPX_CBR;
        cfg.rc_target_bitrate = kbps(s.bitrate_bps);
        cfg.rc_min_quantizer = 2;
        cfg.rc_max_quantizer = 56;
        cfg.rc_undershoot_pct = 100;
        cfg.rc_overshoot_pct = 15;
        cfg.rc_buf_initial_sz = 500;
        cfg.rc_buf_optimal_sz = 600;
        cfg.rc_buf_sz = 1000;
        // Frames are dropped rather than the buffer overrun (openh264's frame skipping).
        cfg.rc_dropframe_thresh = 30;
        cfg.rc_resize_allowed = 0;
        cfg.kf_mode = vpx::vpx_kf_mode::VPX_KF_AUTO;
        cfg.kf_min_dist = 0;
        cfg.kf_max_dist = s.keyframe_interval.max(1);
        let mut ctx = MaybeUninit::<vpx::vpx_codec_ctx_t>::zeroed();
        // SAFETY: `ctx` is zeroed storage for the context (libvpx's documented way), `cfg`
        // a complete configuration, the interface static, the ABI version the bindings
        // were generated for (checked against the installed library by pkg-config).
        let code = unsafe {
            vpx::vpx_codec_enc_init_ver(
                ctx.as_mut_ptr(),
                vpx::vpx_codec_vp8_cx(),
                &cfg,
                0,
                vpx::VPX_ENCODER_ABI_VERSION as c_int,
            )
        };
        // SAFETY: zeroed is a valid (if uninitialised) context value; after a failed
        // init libvpx leaves it without a private part, which vpx_codec_destroy ignores.
        let mut ctx = unsafe { ctx.assume_init() };
        if code != vpx::VPX_CODEC_OK {
            return Err(codec(error_text(&mut ctx, "libvpx VP8 encoder", code)));
        }
        let mut context = Context {
            ctx,
            cfg,
            width,
            height,
        };
        // libwebrtc's realtime settings: speed -6 (fast, for a camera), no denoising, static
        // blocks skipped, one token partition, a keyframe at most 9 x an average frame.
        let max_intra_pct =
            (0.5 * f64::from(cfg.rc_buf_optimal_sz) * f64::from(s.fps) / 10.0).max(300.0) as c_int;
        for (control, value) in [
            (vpx::vp8e_enc_control_id::VP8E_SET_CPUUSED, -6),
            (vpx::vp8e_enc_control_id::VP8E_SET_NOISE_SENSITIVITY, 0),
            (vpx::vp8e_enc_control_id::VP8E_SET_STATIC_THRESHOLD, 1),
            (vpx::vp8e_enc_control_id::VP8E_SET_TOKEN_PARTITIONS, 0),
            (
                vpx::vp8e_enc_control_id::VP8E_SET_MAX_INTRA_BITRATE_PCT,
                max_intra_pct,
            ),
        ] {
            // SAFETY: an initialised context; each of these controls takes one int.
            let code =
                unsafe { vpx::vpx_codec_control_(&mut context.ctx, control as c_int, value) };
            if code != vpx::VPX_CODEC_OK {
                return Err(codec(error_text(
                    &mut context.ctx,
                    "libvpx VP8 control",
                    code,
                )));
            }
        }
        Ok(context)
    }

    fn set_bitrate(&mut self, bps: u32) -> Result<(), MediaError> {
        self.cfg.rc_target_bitrate = kbps(bps);
        // SAFETY: an initialised context and a configuration it was built from (only the
        // target changed).
        let code = unsafe { vpx::vpx_codec_enc_config_set(&mut self.ctx, &self.cfg) };
        if code != vpx::VPX_CODEC_OK {
            return Err(MediaError::Codec(error_text(
                &mut self.ctx,
                "libvpx VP8 bitrate",
                code,
            )));
        }
        Ok(())
    }

    /// Encodes one frame; the compressed frame, None when rate control dropped it.
    fn encode(
        &mut self,
        frame: &VideoFrame,
        pts: i64,
        duration: u32,
        keyframe: bool,
    ) -> Result<Option<EncodedFrame>, MediaError> {
        let (w, h) = (frame.width, frame.height);
        if w != self.width || h != self.height || w % 2 != 0 || h % 2 != 0 {
            return Err(MediaError::Codec(format!(
                "VP8: a {w}x{h} frame for a {}x{} encoder",
                self.width, self.height
            )));
        }
        if frame.data.len() < w * h + 2 * (w / 2) * (h / 2) {
            return Err(MediaError::Codec(
                "VP8: a frame shorter than its size".into(),
            ));
        }
        let mut image = MaybeUninit::<vpx::vpx_image_t>::zeroed();
        // SAFETY: vpx_img_wrap only describes the buffer (contiguous I420 of w x h, even
        // sizes, strides w and w/2, length checked above); libvpx reads the picture and
        // never writes to it, and the buffer outlives the vpx_codec_encode call below.
        let wrapped = unsafe {
            vpx::vpx_img_wrap(
                image.as_mut_ptr(),
                vpx::vpx_img_fmt::VPX_IMG_FMT_I420,
                w as c_uint,
                h as c_uint,
                1,
                frame.data.as_ptr().cast_mut(),
            )
        };
        if wrapped.is_null() {
            return Err(MediaError::Codec(
                "VP8: the frame could not be wrapped".into(),
            ));
        }
        let flags = if keyframe {
            vpx::VPX_EFLAG_FORCE_KF as vpx::vpx_enc_frame_flags_t
        } else {
            0
        };
        // SAFETY: an initialised context; `wrapped` points to `image`, set up above.
        let code = unsafe {
            vpx::vpx_codec_encode(
                &mut self.ctx,
                wrapped,
                pts,
                c_ulong::from(duration),
                flags,
                c_ulong::from(vpx::VPX_DL_REALTIME),
            )
        };
        if code != vpx::VPX_CODEC_OK {
            return Err(MediaError::Codec(error_text(
                &mut self.ctx,
                "libvpx VP8 encode",
                code,
            )));
        }
        let mut out: Option<EncodedFrame> = None;
        let mut iter: vpx::vpx_codec_iter_t = std::ptr::null();
        loop {
            // SAFETY: an initialised context and the iterator libvpx hands back; the
            // packet stays valid until the next call on the context.
            let packet = unsafe { vpx::vpx_codec_get_cx_data(&mut self.ctx, &mut iter) };
            if packet.is_null() {
                break;
            }
            // SAFETY: non-null, from libvpx, valid until the next call (see above).
            let packet = unsafe { &*packet };
            if packet.kind != vpx::vpx_codec_cx_pkt_kind::VPX_CODEC_CX_FRAME_PKT {
                continue;
            }
            // SAFETY: a frame packet's union member is `frame`; its buffer holds `sz`
            // bytes until the next call on the context (copied at once).
            let (data, key) = unsafe {
                let f = packet.data.frame;
                let bytes = if f.buf.is_null() || f.sz == 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(f.buf.cast::<u8>(), f.sz as usize)
                };
                (bytes.to_vec(), f.flags & vpx::VPX_FRAME_IS_KEY != 0)
            };
            let frame = out.get_or_insert(EncodedFrame {
                data: Vec::new(),
                keyframe: false,
            });
            frame.data.extend_from_slice(&data);
            frame.keyframe |= key;
        }
        Ok(out.filter(|f| !f.data.is_empty()))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: an initialised context, destroyed once (Context owns it).
        let _ = unsafe { vpx::vpx_codec_destroy(&mut self.ctx) };
    }
}

/// The encoder. Not `Send` (it holds libvpx's context); lives on the encoding thread.
pub struct Vp8Encoder {
    context: Option<Context>,
    settings: EncoderSettings,
    /// The bitrate the running context uses.
    applied_bps: u32,
    keyframe_requested: bool,
    /// The next frame's presentation time, in 90 kHz ticks.
    pts: i64,
}

impl Vp8Encoder {
    pub fn new(settings: EncoderSettings) -> Result<Vp8Encoder, MediaError> {
        // A context needs a picture size; opening one here checks that libvpx works.
        let probe = Context::new(320, 180, settings)?;
        Ok(Vp8Encoder {
            context: Some(probe),
            settings,
            applied_bps: settings.bitrate_bps,
            keyframe_requested: false,
            pts: 0,
        })
    }

    pub fn request_keyframe(&mut self) {
        self.keyframe_requested = true;
    }

    pub fn settings(&self) -> EncoderSettings {
        self.settings
    }

    /// Changes the target bitrate, from the next frame on, without a keyframe.
    pub fn set_bitrate(&mut self, bps: u32) {
        self.settings.bitrate_bps = bps.max(MIN_BITRATE_BPS);
    }

    /// Changes the frame rate the rate control budgets for (the frames' durations), from
    /// the next frame on.
    pub fn set_frame_rate(&mut self, fps: f32) {
        self.settings.fps = fps.clamp(1.0, 60.0);
    }

    pub fn encode(&mut self, frame: &VideoFrame) -> Result<Option<EncodedFrame>, MediaError> {
        let size = (frame.width, frame.height);
        let mut keyframe = std::mem::take(&mut self.keyframe_requested);
        let context = match self.context.take() {
            Some(c) if (c.width, c.height) == size => c,
            _ => {
                // A new size: a new encoder, which starts with a keyframe.
                keyframe = true;
                self.applied_bps = self.settings.bitrate_bps;
                Context::new(size.0, size.1, self.settings)?
            }
        };
        let context = self.context.insert(context);
        if self.applied_bps != self.settings.bitrate_bps {
            match context.set_bitrate(self.settings.bitrate_bps) {
                Ok(()) => self.applied_bps = self.settings.bitrate_bps,
                Err(e) => tracing::warn!(error = %e, "setting the VP8 bitrate"),
            }
        }
        let duration = (TIMEBASE_HZ as f32 / self.settings.fps).round().max(1.0) as u32;
        let pts = self.pts;
        self.pts += i64::from(duration);
        let encoded = context.encode(frame, pts, duration, keyframe);
        if keyframe && !matches!(encoded, Ok(Some(_))) {
            self.keyframe_requested = true; // dropped or failed: the next one then
        }
        encoded
    }
}

/// The decoder.
pub struct Vp8Decoder {
    ctx: vpx::vpx_codec_ctx_t,
}

impl Vp8Decoder {
    pub fn new() -> Result<Vp8Decoder, MediaError> {
        let cfg = vpx::vpx_codec_dec_cfg_t {
            threads: 1,
            w: 0,
            h: 0,
        };
        let mut ctx = MaybeUninit::<vpx::vpx_codec_ctx_t>::zeroed();
        // SAFETY: zeroed storage for the context, a complete configuration, libvpx's
        // static VP8 decoder interface and the ABI version of the bindings.
        let code = unsafe {
            vpx::vpx_codec_dec_init_ver(
                ctx.as_mut_ptr(),
                vpx::vpx_codec_vp8_dx(),
                &cfg,
                0,
                vpx::VPX_DECODER_ABI_VERSION as c_int,
            )
        };
        // SAFETY: zeroed is a valid context value (see the encoder).
        let mut ctx = unsafe { ctx.assume_init() };
        if code != vpx::VPX_CODEC_OK {
            let text = error_text(&mut ctx, "libvpx VP8 decoder", code);
            // SAFETY: destroying a context whose init failed is a no-op error.
            let _ = unsafe { vpx::vpx_codec_destroy(&mut ctx) };
            return Err(MediaError::Codec(text));
        }
        Ok(Vp8Decoder { ctx })
    }

    /// Decodes one frame. `Ok(None)` when it yields no picture; `Err` for a broken frame
    /// (the caller asks the sender for a keyframe).
    pub fn decode(&mut self, frame: &[u8]) -> Result<Option<VideoFrame>, MediaError> {
        let len = c_uint::try_from(frame.len())
            .map_err(|_| MediaError::Codec("VP8: frame too large".into()))?;
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: an initialised context; `frame` is valid for `len` bytes during the call
        // (libvpx copies what it keeps).
        let code = unsafe {
            vpx::vpx_codec_decode(
                &mut self.ctx,
                frame.as_ptr(),
                len,
                std::ptr::null_mut(),
                0 as c_long,
            )
        };
        if code != vpx::VPX_CODEC_OK {
            return Err(MediaError::Codec(error_text(
                &mut self.ctx,
                "libvpx VP8 decode",
                code,
            )));
        }
        let mut iter: vpx::vpx_codec_iter_t = std::ptr::null();
        let mut picture = None;
        loop {
            // SAFETY: an initialised context and libvpx's iterator; the image stays valid
            // until the next decode call (copied at once).
            let image = unsafe { vpx::vpx_codec_get_frame(&mut self.ctx, &mut iter) };
            if image.is_null() {
                break;
            }
            // SAFETY: non-null, from libvpx (see above).
            let image = unsafe { &*image };
            if image.fmt != vpx::vpx_img_fmt::VPX_IMG_FMT_I420 {
                return Err(MediaError::Codec(format!(
                    "VP8: unexpected picture format {:?}",
                    image.fmt
                )));
            }
            let (w, h) = (image.d_w as usize, image.d_h as usize);
            let strides = [
                image.stride[0].max(0) as usize,
                image.stride[1].max(0) as usize,
                image.stride[2].max(0) as usize,
            ];
            let rows = [h, h.div_ceil(2), h.div_ceil(2)];
            if image.planes[..3].iter().any(|p| p.is_null())
                || strides[0] < w
                || strides[1] < w.div_ceil(2)
            {
                return Err(MediaError::Codec(
                    "VP8: a picture without its planes".into(),
                ));
            }
            // SAFETY: each plane of an I420 image holds `rows` rows of `stride` bytes
            // (libvpx's layout); the slices live until the next decode call.
            let planes: [&[u8]; 3] = unsafe {
                [0, 1, 2].map(|i| std::slice::from_raw_parts(image.planes[i], strides[i] * rows[i]))
            };
            picture = Some(VideoFrame::from_planes(w, h, planes, strides));
        }
        Ok(picture)
    }
}

impl Drop for Vp8Decoder {
    fn drop(&mut self) {
        // SAFETY: an initialised context, destroyed once.
        let _ = unsafe { vpx::vpx_codec_destroy(&mut self.ctx) };
    }
}

/// Whether a depacketized VP8 frame (its payload header first) is a keyframe: the
/// frame tag's P bit is 0 (RFC 6386 9.1).
pub fn is_keyframe(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 0x01 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::video::{TestPattern, VideoSource as _, psnr_luma, read_strip};

    #[test]
    fn encode_decode_keeps_the_strip_and_quality() {
        let mut pattern = TestPattern::new(640, 360, 30.0, false);
        let mut enc = Vp8Encoder::new(EncoderSettings::default()).unwrap();
        let mut dec = Vp8Decoder::new().unwrap();
        let mut decoded = 0;
        for i in 0..40 {
            if i == 20 {
                enc.request_keyframe();
            }
            let frame = pattern.next_frame().unwrap();
            let Some(out) = enc.encode(&frame).unwrap() else {
                continue;
            };
            assert_eq!(out.keyframe, is_keyframe(&out.data), "frame {i}");
            if i == 0 || i == 20 {
                assert!(out.keyframe, "frame {i} should be a keyframe");
            }
            if let Some(picture) = dec.decode(&out.data).unwrap() {
                decoded += 1;
                let strip = read_strip(&picture).expect("strip readable after VP8");
                assert_eq!(strip.frame_number, i);
                let psnr = psnr_luma(&pattern.render(i), &picture, pattern.content_top());
                assert!(psnr > 30.0, "frame {i}: {psnr:.1} dB");
            }
        }
        assert!(decoded >= 38, "{decoded}");
    }

    #[test]
    fn a_new_picture_size_starts_with_a_keyframe_and_decodes() {
        let mut enc = Vp8Encoder::new(EncoderSettings::default()).unwrap();
        let mut dec = Vp8Decoder::new().unwrap();
        for (w, h) in [(640, 360), (320, 180), (640, 360)] {
            let mut pattern = TestPattern::new(w, h, 30.0, false);
            for i in 0..5 {
                let out = enc
                    .encode(&pattern.next_frame().unwrap())
                    .unwrap()
                    .expect("a frame");
                assert_eq!(out.keyframe, i == 0, "{w}x{h} frame {i}");
                let picture = dec.decode(&out.data).unwrap().expect("a picture");
                assert_eq!((picture.width, picture.height), (w, h));
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        let mut dec = Vp8Decoder::new().unwrap();
        let garbage = dec.decode(&[0xff; 64]);
        assert!(matches!(garbage, Err(_) | Ok(None)), "{garbage:?}");
        assert!(dec.decode(&[]).unwrap().is_none());
        // And a real stream decodes after it.
        let mut enc = Vp8Encoder::new(EncoderSettings::default()).unwrap();
        let mut pattern = TestPattern::new(320, 180, 30.0, false);
        let key = enc.encode(&pattern.next_frame().unwrap()).unwrap().unwrap();
        assert!(dec.decode(&key.data).unwrap().is_some());
    }
}
