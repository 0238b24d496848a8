//! H.264 with openh264: an encoder set up for calls (constrained baseline, bitrate rate
//! control with frame skipping, which openh264 needs to hold a bitrate; a skipped frame
//! yields no access unit), periodic IDR with SPS/PPS and a decoder that turns
//! access units back into I420 frames.

use openh264::OpenH264API;
use openh264::decoder::Decoder;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile,
    RateControlMode, SpsPpsStrategy, UsageType,
};
use openh264::formats::YUVSource as _;

use super::MediaError;
use super::video::VideoFrame;

/// How to encode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSettings {
    pub bitrate_bps: u32,
    pub fps: f32,
    /// An IDR at least this often (frames).
    pub keyframe_interval: u32,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        EncoderSettings {
            bitrate_bps: 1_500_000,
            fps: 30.0,
            keyframe_interval: 90,
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
    settings: EncoderSettings,
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
        .num_threads(1)
}

impl H264Encoder {
    pub fn new(settings: EncoderSettings) -> Result<H264Encoder, MediaError> {
        let inner = Encoder::with_api_config(OpenH264API::from_source(), config(settings))
            .map_err(|e| MediaError::Codec(format!("openh264 encoder: {e}")))?;
        Ok(H264Encoder {
            inner,
            settings,
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

    /// Changes the target bitrate while running. openh264's safe API has no runtime
    /// bitrate setter, so the encoder is rebuilt; the next frame is an IDR.
    pub fn set_bitrate(&mut self, bps: u32) -> Result<(), MediaError> {
        if bps == self.settings.bitrate_bps {
            return Ok(());
        }
        let settings = EncoderSettings {
            bitrate_bps: bps,
            ..self.settings
        };
        *self = H264Encoder::new(settings)?;
        Ok(())
    }

    /// Encodes one frame; `None` if the encoder produced nothing for it.
    pub fn encode(&mut self, frame: &VideoFrame) -> Result<Option<EncodedFrame>, MediaError> {
        if std::mem::take(&mut self.keyframe_requested) {
            self.inner.force_intra_frame();
        }
        let stream = self
            .inner
            .encode(frame)
            .map_err(|e| MediaError::Codec(format!("openh264 encode: {e}")))?;
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

    #[test]
    fn bitrate_change_keeps_encoding() {
        let mut pattern = TestPattern::new(320, 240, 30.0, false);
        let mut enc = H264Encoder::new(EncoderSettings::default()).unwrap();
        enc.encode(&pattern.next_frame().unwrap()).unwrap();
        enc.set_bitrate(300_000).unwrap();
        let au = enc.encode(&pattern.next_frame().unwrap()).unwrap().unwrap();
        assert!(au.keyframe);
        assert_eq!(enc.settings().bitrate_bps, 300_000);
    }
}
