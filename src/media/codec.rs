//! The video codecs a call can use, behind two traits: [`VideoEncoder`] and
//! [`VideoDecoder`]. H.264 ([`super::h264`], openh264) is preferred; VP8 ([`super::vp8`],
//! libvpx) is what a call falls back to when the other side offers or accepts no H.264
//! (Firefox without its OpenH264 plugin). Which one a call uses is settled by the SDP
//! exchange (`call::peer`); everything downstream asks [`VideoCodec`].

use super::MediaError;
use super::h264::{EncodedFrame, EncoderSettings, H264Decoder, H264Encoder};
use super::video::VideoFrame;
use super::vp8::{Vp8Decoder, Vp8Encoder};

/// A video codec Duet sends and receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum VideoCodec {
    /// Constrained Baseline, packetization mode 1.
    #[default]
    H264,
    #[serde(rename = "VP8")]
    Vp8,
}

impl VideoCodec {
    /// The SDP/RTP name (`a=rtpmap:<pt> <name>/90000`), also the end of its MIME type.
    pub fn rtp_name(self) -> &'static str {
        match self {
            VideoCodec::H264 => "H264",
            VideoCodec::Vp8 => "VP8",
        }
    }

    /// The codec of a MIME type (`video/H264`, `video/VP8`, any case).
    pub fn from_mime(mime: &str) -> Option<VideoCodec> {
        let name = mime.rsplit('/').next().unwrap_or(mime);
        [VideoCodec::H264, VideoCodec::Vp8]
            .into_iter()
            .find(|c| c.rtp_name().eq_ignore_ascii_case(name))
    }

    pub fn new_encoder(
        self,
        settings: EncoderSettings,
    ) -> Result<Box<dyn VideoEncoder>, MediaError> {
        Ok(match self {
            VideoCodec::H264 => Box::new(H264Encoder::new(settings)?),
            VideoCodec::Vp8 => Box::new(Vp8Encoder::new(settings)?),
        })
    }

    pub fn new_decoder(self) -> Result<Box<dyn VideoDecoder>, MediaError> {
        Ok(match self {
            VideoCodec::H264 => Box::new(H264Decoder::new()?),
            VideoCodec::Vp8 => Box::new(Vp8Decoder::new()?),
        })
    }
}

impl std::fmt::Display for VideoCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.rtp_name())
    }
}

/// A video encoder as the send pipeline drives it: frames in, compressed frames out
/// (`None`: rate control dropped this one), steered by the congestion controller and the
/// receiver's keyframe requests.
pub trait VideoEncoder {
    fn codec(&self) -> VideoCodec;
    /// The next frame will be a keyframe.
    fn request_keyframe(&mut self);
    fn settings(&self) -> EncoderSettings;
    /// The target bitrate from the next frame on, without a keyframe.
    fn set_bitrate(&mut self, bps: u32);
    /// The frame rate the rate control budgets for, from the next frame on.
    fn set_frame_rate(&mut self, fps: f32);
    /// Encodes one frame; a frame of a new size starts over with a keyframe.
    fn encode(&mut self, frame: &VideoFrame) -> Result<Option<EncodedFrame>, MediaError>;
}

/// A video decoder: one complete compressed frame (an H.264 access unit in Annex B, a
/// VP8 frame) in, a picture out (`None`: none yet). `Err` means the frame was broken and
/// the stream needs a keyframe.
pub trait VideoDecoder {
    fn decode(&mut self, frame: &[u8]) -> Result<Option<VideoFrame>, MediaError>;
}

impl VideoEncoder for H264Encoder {
    fn codec(&self) -> VideoCodec {
        VideoCodec::H264
    }
    fn request_keyframe(&mut self) {
        H264Encoder::request_keyframe(self);
    }
    fn settings(&self) -> EncoderSettings {
        H264Encoder::settings(self)
    }
    fn set_bitrate(&mut self, bps: u32) {
        H264Encoder::set_bitrate(self, bps);
    }
    fn set_frame_rate(&mut self, fps: f32) {
        H264Encoder::set_frame_rate(self, fps);
    }
    fn encode(&mut self, frame: &VideoFrame) -> Result<Option<EncodedFrame>, MediaError> {
        H264Encoder::encode(self, frame)
    }
}

impl VideoEncoder for Vp8Encoder {
    fn codec(&self) -> VideoCodec {
        VideoCodec::Vp8
    }
    fn request_keyframe(&mut self) {
        Vp8Encoder::request_keyframe(self);
    }
    fn settings(&self) -> EncoderSettings {
        Vp8Encoder::settings(self)
    }
    fn set_bitrate(&mut self, bps: u32) {
        Vp8Encoder::set_bitrate(self, bps);
    }
    fn set_frame_rate(&mut self, fps: f32) {
        Vp8Encoder::set_frame_rate(self, fps);
    }
    fn encode(&mut self, frame: &VideoFrame) -> Result<Option<EncodedFrame>, MediaError> {
        Vp8Encoder::encode(self, frame)
    }
}

impl VideoDecoder for H264Decoder {
    fn decode(&mut self, frame: &[u8]) -> Result<Option<VideoFrame>, MediaError> {
        H264Decoder::decode(self, frame)
    }
}

impl VideoDecoder for Vp8Decoder {
    fn decode(&mut self, frame: &[u8]) -> Result<Option<VideoFrame>, MediaError> {
        Vp8Decoder::decode(self, frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_are_named_as_in_sdp() {
        assert_eq!(VideoCodec::from_mime("video/H264"), Some(VideoCodec::H264));
        assert_eq!(VideoCodec::from_mime("video/vp8"), Some(VideoCodec::Vp8));
        assert_eq!(VideoCodec::from_mime("VP8"), Some(VideoCodec::Vp8));
        assert_eq!(VideoCodec::from_mime("video/VP9"), None);
    }

    #[test]
    fn the_bitrate_follows_the_target_both_ways_without_a_keyframe() {
        use crate::media::video::{TestPattern, VideoSource as _};
        for codec in [VideoCodec::H264, VideoCodec::Vp8] {
            let mut pattern = TestPattern::new(640, 360, 30.0, true);
            let mut enc = codec
                .new_encoder(EncoderSettings {
                    bitrate_bps: 2_000_000,
                    ..EncoderSettings::default()
                })
                .unwrap();
            // Two seconds at each rate; bits per second and keyframes per stretch.
            let mut stretch = |enc: &mut Box<dyn VideoEncoder>| {
                let (mut bytes, mut keyframes) = (0usize, 0);
                for _ in 0..60 {
                    if let Some(f) = enc.encode(&pattern.next_frame().unwrap()).unwrap() {
                        bytes += f.data.len();
                        keyframes += usize::from(f.keyframe);
                    }
                }
                (bytes * 8 / 2, keyframes)
            };
            let (high, first_keyframes) = stretch(&mut enc);
            assert_eq!(
                first_keyframes, 1,
                "{codec}: the stream starts with one keyframe"
            );
            enc.set_bitrate(300_000);
            let (low, keyframes) = stretch(&mut enc);
            assert_eq!(
                keyframes, 0,
                "{codec}: lowering the bitrate costs no keyframe"
            );
            enc.set_bitrate(2_000_000);
            let (again, keyframes) = stretch(&mut enc);
            assert_eq!(keyframes, 0, "{codec}: raising it neither");
            eprintln!("{codec} bps: {high} -> {low} -> {again}");
            assert!(low < 450_000, "{codec}: {low} bit/s at a 300 kbit/s target");
            assert!(low * 2 < high, "{codec}: {high} then {low}");
            assert!(again > low * 2, "{codec}: back up: {low} then {again}");
            assert_eq!(enc.settings().bitrate_bps, 2_000_000, "{codec}");
        }
    }
}
