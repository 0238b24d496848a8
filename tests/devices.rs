//! Real audio devices: a tone played on the default speaker is heard on the default
//! microphone. Runs against a PulseAudio null sink, which `make test` (and CI) provides
//! and selects with PULSE_SINK / PULSE_SOURCE; elsewhere it says why it did not run.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duet::media::audio::{AudioSink as _, AudioSource as _, Sine, dominant_frequency};
use duet::media::device::{Microphone, Speaker, list_audio_devices};

#[test]
fn speaker_to_microphone_through_a_null_sink() {
    if std::env::var("PULSE_SOURCE").as_deref() != Ok("nullsink.monitor") {
        eprintln!("not run: needs the PulseAudio null sink that `make test` sets up");
        return;
    }
    let (inputs, outputs) = list_audio_devices();
    assert!(
        !inputs.is_empty() && !outputs.is_empty(),
        "{inputs:?} {outputs:?}"
    );
    let mut speaker = Speaker::open_default().unwrap();
    let mut mic = Microphone::open_default().unwrap();
    println!("{} -> {}", speaker.describe(), mic.describe());
    let mut tone = Sine::new(1000.0);
    let mut heard = Vec::new();
    // 3 s: PulseAudio streams take a moment to start.
    for _ in 0..150 {
        speaker.write(&tone.next_frame().unwrap()).unwrap();
        heard.extend(mic.next_frame().unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    let tail = &heard[heard.len() - 48_000..];
    let loudest = tail.iter().map(|s| s.unsigned_abs()).max().unwrap();
    assert!(
        loudest > 1000,
        "the microphone heard silence (peak {loudest})"
    );
    let hz = dominant_frequency(tail);
    assert!((hz - 1000.0).abs() <= 10.0, "heard {hz} Hz");
}

#[test]
fn a_missing_device_is_an_error_not_a_crash() {
    // Whatever this machine has, opening returns (never panics); a call falls back.
    let _ = Microphone::open_default().map(|m| m.describe());
    let _ = Speaker::open_default().map(|s| s.describe());
}
