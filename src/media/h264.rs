//! H.264 with openh264: an encoder set up for calls (constrained baseline, bitrate rate
//! control with frame skipping, which openh264 needs to hold a bitrate; a skipped frame
//! yields no access unit; bitrate and frame rate changed while running, without a
//! keyframe; IDRs with SPS/PPS on request and at a long safety interval) and a decoder that
//! turns access units back into I420 frames.

use openh264::OpenH264API;
use openh264::decoder::Decoder;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile,
    RateControlMode, SpsPpsStrategy, UsageType,
};
use openh264::formats::YUVSource as _;

use super::MediaError;
use super::video::VideoFrame;

/// The lowest bitrate the encoder is asked for (openh264's own floor is lower, but below
/// this a picture is not worth sending).
pub const MIN_BITRATE_BPS: u32 = 50_000;

/// How to encode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSettings {
    pub bitrate_bps: u32,
    pub fps: f32,
    /// An IDR at least this often (frames). Receivers ask for keyframes when they need
    /// one, so this is only a safety net: periodic IDRs on a thin link cause the loss they
    /// are meant to repair.
    pub keyframe_interval: u32,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        EncoderSettings {
            bitrate_bps: 1_500_000,
            fps: 30.0,
            keyframe_interval: 900,
        }
    }
}

/// One encoded picture: an access unit in Annex-B (start codes), SPS/PPS in front of IDRs.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub data: Vec<u8>,
    pub keyframe: bool,
}

/// The encoder. Not `Sync`; lives on the encoding thread.
pub struct H264Encoder {
    inner: Encoder,
    /// What is wanted now (bitrate and frame rate change while running).
    settings: EncoderSettings,
    /// The bitrate and frame rate the encoder was built with; it returns to them when the
    /// picture size changes (openh264 re-initialises from its build configuration).
    built: EncoderSettings,
    /// What the running encoder uses; None until its first frame (it is set up then).
    applied: Option<(u32, f32)>,
    size: Option<(usize, usize)>,
    keyframe_requested: bool,
}

fn config(s: EncoderSettings) -> EncoderConfig {
    EncoderConfig::new()
        .bitrate(BitRate::from_bps(s.bitrate_bps))
        .max_frame_rate(FrameRate::from_hz(s.fps))
        .rate_control_mode(RateControlMode::Bitrate)
        .skip_frames(true)
        .usage_type(UsageType::CameraVideoRealTime)
        .profile(Profile::Baseline)
        .complexity(Complexity::Low)
        .sps_pps_strategy(SpsPpsStrategy::ConstantId)
        .intra_frame_period(IntraFramePeriod::from_num_frames(s.keyframe_interval))
        // A "scene change" IDR is many packets sent unasked; on a thin link it causes the
        // loss it is meant to avoid. Receivers ask for keyframes when they need one.
        .scene_change_detect(false)
        .num_threads(1)
}

impl H264Encoder {
    pub fn new(settings: EncoderSettings) -> Result<H264Encoder, MediaError> {
        let inner = Encoder::with_api_config(OpenH264API::from_source(), config(settings))
            .map_err(|e| MediaError::Codec(format!("openh264 encoder: {e}")))?;
        Ok(H264Encoder {
            inner,
            settings,
            built: settings,
            applied: None,
            size: None,
            keyframe_requested: false,
        })
    }

    /// The next frame will be an IDR (answering a PLI, or for a new receiver).
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

    /// Changes the frame rate the rate control budgets for, from the next frame on.
    pub fn set_frame_rate(&mut self, fps: f32) {
        self.settings.fps = fps.clamp(1.0, 60.0);
    }

    /// Brings the running encoder to the wanted bitrate and frame rate.
    fn apply_rates(&mut self) {
        let Some((bps, fps)) = self.applied else {
            return; // not set up yet: refused until the first frame
        };
        let want = (self.settings.bitrate_bps, self.settings.fps);
        if bps != want.0 {
            match super::openh264_rate::set_bitrate(&mut self.inner, bps, want.0) {
                Ok(()) => self.applied = Some((want.0, fps)),
                Err(e) => tracing::warn!(error = %e, bps = want.0, "setting the bitrate"),
            }
        }
        if fps != want.1 {
            match super::openh264_rate::set_frame_rate(&mut self.inner, want.1) {
                Ok(()) => self.applied = self.applied.map(|(b, _)| (b, want.1)),
                Err(e) => tracing::warn!(error = %e, fps = want.1, "setting the frame rate"),
            }
        }
    }

    /// Encodes one frame; `None` if the encoder produced nothing for it.
    pub fn encode(&mut self, frame: &VideoFrame) -> Result<Option<EncodedFrame>, MediaError> {
        self.apply_rates();
        if std::mem::take(&mut self.keyframe_requested) {
            self.inner.force_intra_frame();
        }
        let size = Some((frame.width, frame.height));
        let stream = self
            .inner
            .encode(frame)
            .map_err(|e| MediaError::Codec(format!("openh264 encode: {e}")))?;
        if self.size != size {
            // (Re)initialised from the build configuration: rates go back to those.
            self.size = size;
            self.applied = Some((self.built.bitrate_bps, self.built.fps));
        }
        let keyframe = matches!(stream.frame_type(), FrameType::IDR | FrameType::I);
        if matches!(stream.frame_type(), FrameType::Skip | FrameType::Invalid) {
            return Ok(None);
        }
        let data = stream.to_vec();
        Ok((!data.is_empty()).then_some(EncodedFrame { data, keyframe }))
    }
}

/// The decoder.
pub struct H264Decoder {
    inner: Decoder,
}

impl H264Decoder {
    pub fn new() -> Result<H264Decoder, MediaError> {
        let inner =
            Decoder::new().map_err(|e| MediaError::Codec(format!("openh264 decoder: {e}")))?;
        Ok(H264Decoder { inner })
    }

    /// Decodes one access unit (Annex-B). `Ok(None)` when it yields no picture yet;
    /// `Err` for a broken unit (the caller asks the sender for a keyframe).
    pub fn decode(&mut self, access_unit: &[u8]) -> Result<Option<VideoFrame>, MediaError> {
        let decoded = self
            .inner
            .decode(access_unit)
            .map_err(|e| MediaError::Codec(format!("openh264 decode: {e}")))?;
        Ok(decoded.map(|yuv| {
            let (w, h) = yuv.dimensions();
            let (sy, su, sv) = yuv.strides();
            VideoFrame::from_planes(w, h, [yuv.y(), yuv.u(), yuv.v()], [sy, su, sv])
        }))
    }
}

/// NAL unit types in an Annex-B access unit (for tests and diagnostics).
pub fn nal_types(annex_b: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut i = 0;
    while i + 3 < annex_b.len() {
        let three = annex_b[i] == 0 && annex_b[i + 1] == 0 && annex_b[i + 2] == 1;
        let four = i + 4 < annex_b.len() && annex_b[i..i + 4] == [0, 0, 0, 1];
        if three {
            types.push(annex_b[i + 3] & 0x1f);
            i += 3;
        } else if four {
            types.push(annex_b[i + 4] & 0x1f);
            i += 4;
        } else {
            i += 1;
        }
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::video::{TestPattern, VideoSource as _, psnr_luma, read_strip};

    #[test]
    fn encode_decode_keeps_the_strip_and_quality() {
        let mut pattern = TestPattern::new(640, 360, 30.0, false);
        let mut enc = H264Encoder::new(EncoderSettings::default()).unwrap();
        let mut dec = H264Decoder::new().unwrap();
        let mut decoded = 0;
        for i in 0..40 {
            if i == 20 {
                enc.request_keyframe();
            }
            let frame = pattern.next_frame().unwrap();
            let Some(au) = enc.encode(&frame).unwrap() else {
                continue;
            };
            if i == 0 || i == 20 {
                assert!(au.keyframe, "frame {i} should be an IDR");
                let types = nal_types(&au.data);
                assert!(
                    types.contains(&7) && types.contains(&8),
                    "SPS/PPS: {types:?}"
                );
            }
            if let Some(out) = dec.decode(&au.data).unwrap() {
                decoded += 1;
                let strip = read_strip(&out).expect("strip readable after H.264");
                assert_eq!(strip.frame_number, i);
                let psnr = psnr_luma(&pattern.render(i), &out, pattern.content_top());
                assert!(psnr > 30.0, "frame {i}: {psnr:.1} dB");
            }
        }
        assert!(decoded >= 38, "{decoded}");
    }
}
