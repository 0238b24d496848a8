//! Changing openh264's bitrate and frame rate while it runs, which its safe API cannot
//! do (rebuilding the encoder costs a keyframe; a congestion controller changes the
//! rate every second). One of the crate's two `unsafe` islands (the other is libvpx in
//! [`super::vp8`]): two `SetOption` calls with
//! plain-old-data arguments, on an encoder we own exclusively.

#![allow(unsafe_code)]

use openh264::encoder::Encoder;
use openh264_sys2::{
    ENCODER_OPTION, ENCODER_OPTION_BITRATE, ENCODER_OPTION_FRAME_RATE, ENCODER_OPTION_MAX_BITRATE,
    SBitrateInfo, SPATIAL_LAYER_0, SPATIAL_LAYER_ALL,
};

/// openh264 refused an option (its `CM_RETURN` code; 1 is `cmInitExpected`: the encoder
/// is set up on its first frame, so options before that are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("openh264 refused the option (code {0})")]
pub struct Refused(pub i32);

/// `cmInitExpected`: the encoder has not encoded its first frame yet.
pub const NOT_STARTED: Refused = Refused(1);

fn set_bitrate_option(
    encoder: &mut Encoder,
    option: ENCODER_OPTION,
    layer: i32,
    bps: u32,
) -> Result<(), Refused> {
    let mut info = SBitrateInfo {
        iLayer: layer,
        iBitrate: i32::try_from(bps).unwrap_or(i32::MAX),
    };
    // SAFETY: `raw_api` is the encoder's own handle, valid for as long as `encoder` (we
    // hold it mutably, so nothing else calls into it meanwhile). BITRATE and MAX_BITRATE
    // read one `SBitrateInfo` through the pointer during the call and keep nothing; it
    // lives on our stack until the call returns. Neither option changes anything the
    // safe wrapper relies on (dimensions, data format, buffers).
    let code = unsafe {
        encoder
            .raw_api()
            .set_option(option, std::ptr::addr_of_mut!(info).cast())
    };
    if code == 0 {
        Ok(())
    } else {
        Err(Refused(code))
    }
}

/// Sets the target bitrate (and the cap, equal to it) without a keyframe. Raising goes
/// cap first, lowering target first, because openh264 refuses a target above the cap.
pub fn set_bitrate(encoder: &mut Encoder, current_bps: u32, bps: u32) -> Result<(), Refused> {
    if bps >= current_bps {
        set_bitrate_option(encoder, ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_0, bps)?;
        set_bitrate_option(encoder, ENCODER_OPTION_BITRATE, SPATIAL_LAYER_ALL, bps)
    } else {
        set_bitrate_option(encoder, ENCODER_OPTION_BITRATE, SPATIAL_LAYER_ALL, bps)?;
        set_bitrate_option(encoder, ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_0, bps)
    }
}

/// Sets the frame rate the rate control budgets for (frames per second).
pub fn set_frame_rate(encoder: &mut Encoder, fps: f32) -> Result<(), Refused> {
    let mut value = fps;
    // SAFETY: as in `set_bitrate_option`; FRAME_RATE reads one `float` during the call.
    let code = unsafe {
        encoder.raw_api().set_option(
            ENCODER_OPTION_FRAME_RATE,
            std::ptr::addr_of_mut!(value).cast(),
        )
    };
    if code == 0 {
        Ok(())
    } else {
        Err(Refused(code))
    }
}
