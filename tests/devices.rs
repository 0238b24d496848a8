//! Real audio devices: a tone played on the default speaker is heard on the default
//! microphone. Runs against a PulseAudio null sink, which `make test` (and CI) provides
//! and selects with PULSE_SINK / PULSE_SOURCE; elsewhere it says why it did not run,
//! unless `DUET_REQUIRE_AUDIO_TEST=1` (set by `make test`), where that fails it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use duet::media::audio::{AudioSink as _, AudioSource as _, Sine, dominant_frequency};
use duet::media::device::{Microphone, Speaker, list_audio_devices};

/// Tests that play into the default null sink, or load and unload devices, take turns:
/// the sink's monitor is the default microphone (one test's sound would be another's
/// unexpected input), and a device coming or going mid-stream is what these tests provoke.
static DEFAULT_SINK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn default_sink() -> std::sync::MutexGuard<'static, ()> {
    DEFAULT_SINK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn speaker_to_microphone_through_a_null_sink() {
    if std::env::var("PULSE_SOURCE").as_deref() != Ok("nullsink.monitor") {
        assert!(
            std::env::var("DUET_REQUIRE_AUDIO_TEST").is_err(),
            "the audio test needs the PulseAudio null sink (PULSE_SOURCE=nullsink.monitor)"
        );
        eprintln!("not run: needs the PulseAudio null sink that `make test` sets up");
        return;
    }
    let _turn = default_sink();
    // The sound server's own devices, by their descriptions, the default first (here
    // the ones PULSE_SINK / PULSE_SOURCE name); none of ALSA's plugins.
    let (inputs, outputs) = list_audio_devices();
    println!("microphones {inputs:?}\nspeakers {outputs:?}");
    assert_eq!(
        outputs.first().map(String::as_str),
        Some("Null Output"),
        "{outputs:?}"
    );
    assert_eq!(
        inputs.first().map(String::as_str),
        Some("Monitor of Null Output"),
        "{inputs:?}"
    );
    for name in inputs.iter().chain(&outputs) {
        for plugin in ["Plugin", "JACK", "Open Sound System", "Discard all samples"] {
            assert!(
                !name.contains(plugin),
                "a pseudo-device is offered: {name:?}"
            );
        }
    }
    let mut speaker = Speaker::open_default().unwrap();
    let mut mic = Microphone::open_default().unwrap();
    println!("{} -> {}", speaker.describe(), mic.describe());
    // A device picked by the name the list gives opens too.
    let named = Speaker::open(Some(&outputs[0])).unwrap();
    assert!(
        named.describe().contains("Null Output"),
        "{}",
        named.describe()
    );
    drop(named);
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
fn a_missing_device_is_an_error_that_names_it_not_a_crash() {
    // Whatever this machine has, a device that is not there is an error that says which.
    let name = "no such device 7f3a";
    let mic = Microphone::open(Some(name)).map(|m| m.describe());
    let err = mic.expect_err("a microphone that does not exist opened");
    assert!(err.to_string().contains(name), "{err}");
    let speaker = Speaker::open(Some(name)).map(|s| s.describe());
    let err = speaker.expect_err("a speaker that does not exist opened");
    assert!(err.to_string().contains(name), "{err}");
}

/// With no camera (as on these machines), a call asked to use it falls back to the test
/// pattern, says so in the report, and the other side still gets video.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_camera_falls_back_to_the_test_pattern() {
    use duet::call::{self, CallState, SessionConfig, VideoInput};
    if !duet::media::camera::list_cameras().is_empty() {
        eprintln!("not run: this machine has a camera");
        return;
    }
    assert!(duet::media::camera::Camera::open_default().is_err());
    let server = signaling_server::Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let mut with_camera = SessionConfig::synthetic(&server.ws_url(), "cam");
    with_camera.video = VideoInput::Camera(None);
    let a = call::start(with_camera);
    assert!(
        a.wait_for(Duration::from_secs(5), |s| matches!(
            s,
            CallState::WaitingForPeer { .. }
        ))
        .await
    );
    let b = call::start(SessionConfig::synthetic(&server.ws_url(), "cam"));
    assert!(
        b.wait_for(Duration::from_secs(10), |s| matches!(
            s,
            CallState::InCall { .. }
        ))
        .await
    );
    // Frames flow from the fallback pattern (wait for them rather than a fixed time).
    for _ in 0..100 {
        if b.stats().lock().video_frames_decoded > 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.hang_up();
    let (ra, rb) = (a.finished().await, b.finished().await);
    assert!(
        ra.warnings
            .iter()
            .any(|w| w.contains("camera") && w.contains("test pattern")),
        "{:?}",
        ra.warnings
    );
    assert!(rb.frames_decoded > 20, "{ra:?}\n{rb:?}");
    server.stop().await;
}

/// A PulseAudio null sink (a speaker) or null source (a microphone) of our own,
/// unloaded when dropped or by [`TempDevice::unplug`]: a device that can be taken away
/// mid-call.
struct TempDevice {
    module: Option<String>,
    description: String,
}

impl TempDevice {
    fn speaker(description: &str) -> TempDevice {
        TempDevice::load("sink", description)
    }

    fn microphone(description: &str) -> TempDevice {
        TempDevice::load("source", description)
    }

    fn load(kind: &str, description: &str) -> TempDevice {
        let out = std::process::Command::new("pactl")
            .args([
                "load-module",
                &format!("module-null-{kind}"),
                &format!("{kind}_name={}", description.to_lowercase()),
                "rate=48000",
                // The sink takes properties; the null source has a description argument.
                &if kind == "sink" {
                    format!("sink_properties=device.description={description}")
                } else {
                    format!("description={description}")
                },
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        TempDevice {
            module: Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
            description: description.to_owned(),
        }
    }

    fn unplug(&mut self) {
        if let Some(module) = self.module.take() {
            let status = std::process::Command::new("pactl")
                .args(["unload-module", &module])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
}

impl Drop for TempDevice {
    fn drop(&mut self) {
        self.unplug();
    }
}

/// Whether the PulseAudio null sink `make test` sets up is here (else: why not, or a
/// failure under `DUET_REQUIRE_AUDIO_TEST`).
fn null_sink_here() -> bool {
    if std::env::var("PULSE_SOURCE").as_deref() == Ok("nullsink.monitor") {
        return true;
    }
    assert!(
        std::env::var("DUET_REQUIRE_AUDIO_TEST").is_err(),
        "the audio test needs the PulseAudio null sink (PULSE_SOURCE=nullsink.monitor)"
    );
    eprintln!("not run: needs the PulseAudio null sink that `make test` sets up");
    false
}

/// Reads frames (as the call's 20 ms clock does) until `done`, at most 10 s.
fn frames_until(mic: &mut dyn duet::media::audio::AudioSource, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut finished = done();
    while !finished && std::time::Instant::now() < deadline {
        let frame = mic.next_frame().unwrap();
        assert_eq!(frame.len(), duet::media::audio::FRAME_SAMPLES);
        std::thread::sleep(Duration::from_millis(20));
        finished = done();
    }
    assert!(finished, "gave up after 10 s reading {}", mic.describe());
}

/// Reads frames until `switch` has warnings; returns them.
fn frames_until_warned(
    mic: &mut dyn duet::media::audio::AudioSource,
    switch: &duet::media::live_device::DeviceSwitch,
) -> Vec<String> {
    let warnings = std::sync::Mutex::new(Vec::new());
    frames_until(mic, || {
        let mut w = warnings.lock().unwrap();
        w.extend(switch.take_warnings());
        !w.is_empty()
    });
    warnings.into_inner().unwrap()
}

#[test]
fn a_microphone_unplugged_mid_call_falls_back_and_another_can_be_chosen() {
    use duet::media::live_device::{DeviceSwitch, LiveMicrophone};
    if !null_sink_here() {
        return;
    }
    // Loading and unloading devices is not done while another test streams.
    let _turn = default_sink();
    let mut first = TempDevice::microphone("DuetMicOne");
    let second = TempDevice::microphone("DuetMicTwo");
    let switch = DeviceSwitch::default();
    let mic = Microphone::open(Some(&first.description)).unwrap();
    let mut live = LiveMicrophone::new(Box::new(mic), switch.clone());
    assert!(switch.using().unwrap().contains("DuetMicOne"));
    frames_until(&mut live, || true);
    // Unplugged: frames keep coming (silence meanwhile), a warning says what happened,
    // and the default microphone takes over.
    first.unplug();
    let warnings = frames_until_warned(&mut live, &switch);
    println!("{warnings:?}");
    assert!(warnings[0].contains("DuetMicOne"), "{warnings:?}");
    assert!(warnings[0].contains("now using"), "{warnings:?}");
    let using = switch.using().unwrap();
    assert!(using.contains("Monitor of Null Output"), "{using}");
    // Another is chosen: it takes over at the next frame.
    switch.choose(Some(second.description.clone()));
    frames_until(&mut live, || {
        switch.using().is_some_and(|u| u.contains("DuetMicTwo"))
    });
    // A device that is not there: a warning, and the one in use stays.
    switch.choose(Some("no such microphone 5c1d".into()));
    let warnings = frames_until_warned(&mut live, &switch);
    assert!(warnings[0].contains("5c1d"), "{warnings:?}");
    assert!(warnings[0].contains("still using"), "{warnings:?}");
    assert!(switch.using().unwrap().contains("DuetMicTwo"));
}

#[test]
fn a_speaker_unplugged_mid_call_falls_back_to_the_default() {
    use duet::media::live_device::{DeviceSwitch, LiveSpeaker};
    if !null_sink_here() {
        return;
    }
    // It falls back to the default speaker, the null sink.
    let _turn = default_sink();
    let mut sink = TempDevice::speaker("DuetSpeakerOne");
    let switch = DeviceSwitch::default();
    let speaker = Speaker::open(Some(&sink.description)).unwrap();
    let mut live = LiveSpeaker::new(Box::new(speaker), switch.clone());
    let mut tone = Sine::new(440.0);
    let mut play_until = |done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut finished = done();
        while !finished && std::time::Instant::now() < deadline {
            live.write(&tone.next_frame().unwrap()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            finished = done();
        }
        assert!(finished, "gave up after 10 s");
    };
    play_until(&|| true);
    sink.unplug();
    let warnings = std::sync::Mutex::new(Vec::new());
    play_until(&|| {
        let mut w = warnings.lock().unwrap();
        w.extend(switch.take_warnings());
        !w.is_empty() && switch.using().is_some_and(|u| u.contains("Null Output"))
    });
    let warnings = warnings.into_inner().unwrap();
    assert!(warnings[0].contains("DuetSpeakerOne"), "{warnings:?}");
    assert!(warnings[0].contains("default speaker"), "{warnings:?}");
}

/// The echo canceller on a real device loop: what the speaker plays comes back into the
/// microphone (the null sink's monitor: the sound server's own buffering and delay, as
/// between a laptop's speaker and its microphone, minus the room). After it has adapted,
/// what is left of the echo must be at least 30 dB below it.
#[test]
fn the_echo_canceller_removes_the_speaker_from_a_real_microphone_loop() {
    use duet::media::processing::{AudioProcessor, ProcessingSettings};
    if !null_sink_here() {
        return;
    }
    let _turn = default_sink();
    let mut speaker = Speaker::open_default().unwrap();
    let mut mic = Microphone::open_default().unwrap();
    let mut processor = AudioProcessor::new(ProcessingSettings {
        echo_cancellation: true,
        noise_suppression: false,
        auto_gain: false,
    });
    // The far end: noise bursts with a speech-like rhythm (broadband, as a voice is), a
    // fixed seed so every run is the same.
    let mut seed: u32 = 0x1234_5678;
    let mut far_end = |frame: usize| -> Vec<i16> {
        let on = (frame / 15) % 3 != 2; // 300 ms talk, 300 ms talk, 300 ms pause
        (0..duet::media::audio::FRAME_SAMPLES)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let white = f32::from((seed >> 16) as u16 as i16) / 32768.0;
                if on { (white * 6000.0) as i16 } else { 0 }
            })
            .collect()
    };
    let energy = |pcm: &[i16]| pcm.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>();
    let (mut echo, mut left) = (0.0, 0.0);
    // 20 s at the call's 20 ms pace; the last 4 s are measured.
    let frames = 1000;
    for i in 0..frames {
        let far = far_end(i);
        processor.process_render(&far).unwrap();
        speaker.write(&far).unwrap();
        let mut near = mic.next_frame().unwrap();
        let heard = energy(&near);
        processor.process_capture(&mut near).unwrap();
        if i >= frames - 200 {
            echo += heard;
            left += energy(&near);
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    // The loop really carries the far end: its echo is loud at the microphone.
    let samples = 200.0 * duet::media::audio::FRAME_SAMPLES as f64;
    let echo_dbfs = 10.0 * (echo / samples / 32768.0f64.powi(2)).max(1e-12).log10();
    assert!(
        echo_dbfs > -40.0,
        "the microphone heard too little: {echo_dbfs:.1} dBFS"
    );
    let suppressed_db = 10.0 * (echo / left.max(1.0)).log10();
    println!(
        "echo at {echo_dbfs:.1} dBFS, suppressed by {suppressed_db:.1} dB (ERLE reported {:?})",
        processor.echo_return_loss_enhancement_db()
    );
    assert!(suppressed_db >= 30.0, "only {suppressed_db:.1} dB");
}

/// Issue 13's proof as a whole call over a real device loop. Bob's speaker is a null
/// sink whose monitor is his microphone, so everything he plays comes back into what he
/// sends: without audio processing Ann hears herself; with it (on by default for a
/// microphone), what comes back of Ann's own signal must be at least 30 dB below what she
/// sent, while a voice played into Bob's microphone (the near end) still reaches her.
#[test]
fn in_a_call_over_a_device_loop_the_far_end_does_not_hear_itself_but_hears_the_near_end() {
    if !null_sink_here() {
        return;
    }
    let _turn = default_sink();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(signaling_server::Server::start(
            signaling_server::Config::ephemeral(),
        ))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("duet-device-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bobs_room = TempDevice::speaker("DuetLoopBob");
    let sink = bobs_room.description.to_lowercase();
    // Ann's voice: noise bursts with a speech-like rhythm (broadband, as a voice is).
    let far = far_end_bursts(40 * 48_000);
    write_wav(&dir.join("far.wav"), &far);
    // The near end: a voiced sound (150 Hz and its harmonics) in syllables, 8 s.
    let near = voiced_syllables(8 * 48_000);
    write_wav(&dir.join("near.wav"), &near);

    let call = |tag: &str, processing: &str, seconds: u64, near_at: Option<u64>| {
        let room = format!("loop-{tag}");
        let spawn = |name: &str, args: &[&str]| {
            let log = std::fs::File::create(dir.join(format!("{tag}-{name}.log"))).unwrap();
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_duet"));
            command
                .args(["call", "--headless", "--server", &server.ws_url()])
                .args(["--room", &room, "--name", name])
                .args(["--width", "320", "--height", "240"])
                .args(["--duration", &format!("{seconds}s"), "--wait", "20s"])
                .arg("--report")
                .arg(dir.join(format!("{tag}-{name}.json")))
                .args(args)
                .stderr(log);
            if name == "bob" {
                command
                    .env("PULSE_SINK", &sink)
                    .env("PULSE_SOURCE", format!("{sink}.monitor"));
            }
            command.spawn().unwrap()
        };
        let mut bob = spawn(
            "bob",
            &[
                "--audio",
                "mic",
                "--speaker",
                "--audio-processing",
                processing,
            ],
        );
        let far_path = dir.join("far.wav");
        let heard = dir.join(format!("{tag}-ann.wav"));
        let mut ann = spawn(
            "ann",
            &[
                "--audio",
                far_path.to_str().unwrap(),
                "--audio-processing",
                "off",
                "--record-audio",
                heard.to_str().unwrap(),
            ],
        );
        if let Some(at) = near_at {
            let bob_log = dir.join(format!("{tag}-bob.log"));
            assert!(
                wait_for_text(&bob_log, "connected; staying", Duration::from_secs(20)),
                "{}",
                std::fs::read_to_string(&bob_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_secs(at));
            let played = std::process::Command::new("paplay")
                .arg(format!("--device={sink}"))
                .arg(dir.join("near.wav"))
                .status()
                .unwrap();
            assert!(played.success());
        }
        let (a, b) = (ann.wait().unwrap(), bob.wait().unwrap());
        assert!(a.success() && b.success(), "{a:?} {b:?}");
        let report = |name: &str| -> serde_json::Value {
            let path = dir.join(format!("{tag}-{name}.json"));
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        let wav = hound::WavReader::open(&heard).unwrap();
        assert_eq!(wav.spec().sample_rate, 48_000);
        let pcm: Vec<i16> = wav.into_samples::<i16>().map(Result::unwrap).collect();
        (pcm, report("bob"))
    };
    let sent_db = level_db(&far);

    // Without processing the loop is real: Ann hears herself nearly as loud as she spoke.
    let (pcm, _) = call("off", "off", 6, None);
    let echo_db = level_db(window(&pcm, 3.0, 5.5));
    println!("processing off: Ann sent {sent_db:.1} dBFS and heard herself at {echo_db:.1} dBFS");
    assert!(echo_db > sent_db - 15.0, "the loop carried too little");

    // With processing: after it has adapted, her echo is gone; the near end is not.
    let (pcm, bob) = call("on", "on", 22, Some(12));
    let residual_db = level_db(window(&pcm, 7.5, 11.5));
    let near_db = level_db(window(&pcm, 14.0, 19.0));
    let played_db = level_db(&near);
    println!(
        "processing on: residual {residual_db:.1} dBFS ({:.1} dB below what Ann sent); near end \
         played at {played_db:.1} dBFS, heard at {near_db:.1} dBFS; Bob's processing: {}",
        sent_db - residual_db,
        bob["audio_processing"]
    );
    assert!(
        sent_db - residual_db >= 30.0,
        "Ann's own voice came back only {:.1} dB lower",
        sent_db - residual_db
    );
    assert!(
        near_db >= residual_db + 20.0 && near_db >= played_db - 12.0,
        "the near end did not come through: {near_db:.1} dBFS"
    );
    drop(bobs_room);
    runtime.block_on(server.stop());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `samples` of noise bursts: 300 ms on, 300 ms on, 300 ms off, about -20 dBFS when on.
fn far_end_bursts(samples: usize) -> Vec<i16> {
    let mut seed: u32 = 0x1234_5678;
    (0..samples)
        .map(|i| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let white = f32::from((seed >> 16) as u16 as i16) / 32768.0;
            let on = (i / 14_400) % 3 != 2;
            if on { (white * 6000.0) as i16 } else { 0 }
        })
        .collect()
}

/// `samples` of a voiced sound: 150 Hz with decaying harmonics up to 3 kHz, in 250 ms
/// syllables with 150 ms gaps.
fn voiced_syllables(samples: usize) -> Vec<i16> {
    (0..samples)
        .map(|i| {
            let t = i as f64 / 48_000.0;
            let in_syllable = (i % 19_200) as f64 / 12_000.0;
            if in_syllable >= 1.0 {
                return 0;
            }
            let envelope = (std::f64::consts::PI * in_syllable).sin();
            let voice: f64 = (1..=20)
                .map(|k| (2.0 * std::f64::consts::PI * 150.0 * k as f64 * t).sin() / k as f64)
                .sum();
            (voice * envelope * 3000.0) as i16
        })
        .collect()
}

fn write_wav(path: &std::path::Path, pcm: &[i16]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).unwrap();
    for &s in pcm {
        writer.write_sample(s).unwrap();
    }
    writer.finalize().unwrap();
}

/// The samples from `from` to `to` seconds (mono, 48 kHz).
fn window(pcm: &[i16], from: f64, to: f64) -> &[i16] {
    let at = |s: f64| ((s * 48_000.0) as usize).min(pcm.len());
    &pcm[at(from)..at(to)]
}

/// RMS level in dBFS.
fn level_db(pcm: &[i16]) -> f64 {
    let energy = pcm.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / pcm.len().max(1) as f64;
    10.0 * (energy / 32768.0f64.powi(2)).max(1e-12).log10()
}

/// Whether `needle` appears in the file at `path` within `timeout`.
fn wait_for_text(path: &std::path::Path, needle: &str, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
