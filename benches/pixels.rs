//! Pixel and sample conversions on the media path, at 1280x720 (and 1 s of audio): time
//! per call, printed as JSON. `cargo bench -p duet --bench pixels`.
//!
//! What the camera hands over (YUYV, NV12, RGB from MJPEG) to I420, the CPU fallback's
//! I420 -> RGBA, and resampling a device's 44.1 kHz to 48 kHz.

use std::time::Instant;

use duet::media::audio::Resampler;
use duet::media::camera::{nv12_to_i420, rgb_to_i420, yuyv_to_i420};
use duet::media::scale::Scaler;
use duet::media::video::TestPattern;
use fast_image_resize::{FilterType, ResizeAlg};
use serde_json::json;

/// Milliseconds per call of `f`, after a warm-up.
fn ms_per_call(mut f: impl FnMut()) -> f64 {
    for _ in 0..20 {
        f();
    }
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1000.0 / f64::from(n)
}

/// The sender's ladder steps from 720p, with the scaler's algorithm and others.
fn scaling(frame: &duet::media::video::VideoFrame) -> serde_json::Value {
    let algorithms = [
        (
            "convolution_bilinear",
            ResizeAlg::Convolution(FilterType::Bilinear),
        ),
        (
            "interpolation_bilinear",
            ResizeAlg::Interpolation(FilterType::Bilinear),
        ),
        (
            "super_sampling_bilinear_2",
            ResizeAlg::SuperSampling(FilterType::Bilinear, 2),
        ),
        ("nearest", ResizeAlg::Nearest),
    ];
    let mut out = serde_json::Map::new();
    for (name, algorithm) in algorithms {
        let mut per_size = serde_json::Map::new();
        for (w, h) in [(960, 540), (640, 360), (480, 270), (320, 180)] {
            let mut scaler = Scaler::with_algorithm(algorithm);
            let ms = ms_per_call(|| drop(scaler.scale(frame.clone(), w, h)));
            per_size.insert(format!("to_{h}p"), json!((ms * 1000.0).round() / 1000.0));
        }
        out.insert(name.to_owned(), per_size.into());
    }
    out.into()
}

fn main() {
    let (w, h) = (1280, 720);
    let frame = TestPattern::new(w, h, 30.0, false).render(7);
    let yuyv: Vec<u8> = (0..w * h * 2).map(|i| (i * 7 % 251) as u8).collect();
    let nv12: Vec<u8> = (0..w * h * 3 / 2).map(|i| (i * 5 % 241) as u8).collect();
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 13 % 253) as u8).collect();
    let tone: Vec<f32> = (0..44_100)
        .map(|i| (i as f32 * std::f32::consts::TAU * 440.0 / 44_100.0).sin() * 0.5)
        .collect();
    let results = json!({
        "resolution": format!("{w}x{h}"),
        "yuyv_to_i420_ms": ms_per_call(|| drop(yuyv_to_i420(&yuyv, w, h))),
        "nv12_to_i420_ms": ms_per_call(|| drop(nv12_to_i420(&nv12, w, h))),
        "rgb_to_i420_ms": ms_per_call(|| drop(rgb_to_i420(&rgb, w, h))),
        "i420_to_rgba_cpu_fallback_ms": ms_per_call(|| drop(frame.to_rgba())),
        "scale_720p_ms": scaling(&frame),
        "resample_1s_44100_to_48000_ms": ms_per_call(|| {
            let mut r = Resampler::new(44_100, 48_000).expect("resampler");
            let mut out = Vec::new();
            for piece in tone.chunks(1024) {
                r.push(piece, &mut out);
            }
        }),
    });
    println!("{}", serde_json::to_string_pretty(&results).expect("json"));
}
