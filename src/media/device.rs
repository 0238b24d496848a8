//! Real audio devices through `cpal`: the microphone as an [`AudioSource`] and the
//! speaker as an [`AudioSink`].
//!
//! Each cpal stream lives on a thread of its own (streams are not `Send` on every
//! platform) and exchanges 48 kHz mono samples with the call through a small shared
//! buffer. Whatever format and rate the device offers is converted here. Opening fails
//! with a clear [`MediaError::Device`] when there is no device or it cannot start, so
//! the caller can fall back to a synthetic source or the null sink.
//!
//! Which devices a person is offered ([`list_audio_devices`]): when a sound server runs
//! (PulseAudio, or PipeWire's PulseAudio service: nearly every desktop), its inputs and
//! outputs by the names the desktop's sound settings show, through cpal's PulseAudio
//! host; the monitors of outputs are not microphones. Without one, ALSA's system default
//! and each sound card, never one of ALSA's plugins (rate converters, JACK, upmix...).
//! The default comes first; `PULSE_SOURCE` / `PULSE_SINK` choose it as for any
//! PulseAudio client.
//!
//! A device that goes away mid-call (unplugged, its sound server gone) is an error from
//! the next `next_frame` / `write`, never a hang: cpal reports it, or the device simply
//! stops calling back ([`STALLED_AFTER`]). The call then falls back (`media::live_device`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cpal::traits::{DeviceTrait as _, HostTrait as _, StreamTrait as _};
use cpal::{FromSample, SizedSample};

use super::MediaError;
use super::audio::{AudioSink, AudioSource, FRAME_SAMPLES, Resampler, SAMPLE_RATE};

/// Most audio buffered between the device and the call (keeps latency bounded when the
/// device clock and ours drift apart).
const MAX_BUFFERED: usize = SAMPLE_RATE as usize / 5; // 200 ms

/// A device that has called back, then not for this long, is gone (a stream whose device
/// was removed may just stop, without an error). A stream that has not started yet is
/// not judged: a busy sound server can take seconds to ask for the first samples.
pub const STALLED_AFTER: Duration = Duration::from_secs(4);

/// Samples shared between a device thread and the call, and the device's health.
struct Shared {
    samples: Mutex<VecDeque<i16>>,
    ready: Condvar,
    /// When the device last called back (None: not yet).
    alive: Mutex<Option<Instant>>,
    /// What the stream reported when its device went away.
    failed: Mutex<Option<String>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            samples: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            alive: Mutex::new(None),
            failed: Mutex::new(None),
        }
    }

    /// The device called back.
    fn touch(&self) {
        *self.alive.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// The stream's error callback: errors that mean the device is gone are kept.
    fn stream_error(&self, what: &str, e: &cpal::Error) {
        use cpal::ErrorKind as K;
        tracing::warn!(error = %e, "{what} stream");
        if matches!(
            e.kind(),
            K::DeviceNotAvailable | K::HostUnavailable | K::StreamInvalidated
        ) {
            self.lose(&e.to_string());
        }
    }

    /// The device is gone (`why`).
    fn lose(&self, why: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.is_none() {
            *failed = Some(why.to_owned());
        }
    }

    /// Err when the device is gone (`description` names it in the message).
    fn check(&self, description: &str) -> Result<(), MediaError> {
        if let Some(e) = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(MediaError::Device(format!("{description} was lost: {e}")));
        }
        let quiet = self
            .alive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|t| t.elapsed());
        if let Some(quiet) = quiet.filter(|&q| q >= STALLED_AFTER) {
            return Err(MediaError::Device(format!(
                "{description} stopped ({} s without sound)",
                quiet.as_secs()
            )));
        }
        Ok(())
    }

    fn push(&self, pcm: impl IntoIterator<Item = i16>) {
        let mut q = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        q.extend(pcm);
        let excess = q.len().saturating_sub(MAX_BUFFERED);
        q.drain(..excess);
        self.ready.notify_one();
    }
}

/// A running device thread.
struct DeviceThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a sound server's device is checked for still being there: a sound server
/// moves the stream of a removed device to the default one without telling cpal, so the
/// stream goes on and only the device list shows the loss.
const PRESENCE_EVERY: Duration = Duration::from_secs(2);

/// A device opened by [`spawn_device`]'s `open`: its stream, its description, and the
/// host's id for it.
struct Opened {
    stream: cpal::Stream,
    description: String,
    id: String,
    /// Whether it is a sound server's device (cpal's PulseAudio host).
    on_server: bool,
}

/// Starts `open` on a new thread, keeps the stream it returns alive there until stopped
/// (checking a sound server's device is still there, see [`PRESENCE_EVERY`]; a lost one
/// is reported through `shared`), and reports whether opening worked.
fn spawn_device(
    name: &str,
    direction: Direction,
    shared: Arc<Shared>,
    open: impl FnOnce() -> Result<Opened, MediaError> + Send + 'static,
) -> Result<(DeviceThread, String), MediaError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let opened = match open() {
                Ok(opened) => {
                    let _ = tx.send(Ok(opened.description.clone()));
                    opened
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            // Only a sound server's device can be looked for in its list (cpal may have
            // opened ALSA's "default" instead, when the server would not take a client).
            let watch = opened.on_server && !opened.id.is_empty();
            let mut checked = Instant::now();
            // Missing from two lists in a row (a list taken while another device comes
            // or goes can fail or miss one).
            let mut missing = 0;
            while !thread_stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if watch && checked.elapsed() >= PRESENCE_EVERY {
                    checked = Instant::now();
                    match device_present(direction, &opened.id) {
                        Some(false) => missing += 1,
                        Some(true) => missing = 0,
                        None => {}
                    }
                    if missing >= 2 {
                        shared.lose("the device was removed");
                    }
                }
            }
            drop(opened.stream);
        })
        .map_err(|e| MediaError::Device(format!("cannot start the audio thread: {e}")))?;
    let mut handle = DeviceThread {
        stop,
        thread: Some(thread),
    };
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(description)) => Ok((handle, description)),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            // Do not wait for a thread stuck in the audio system.
            handle.thread = None;
            Err(MediaError::Device(
                "the audio device did not start within 5 s".into(),
            ))
        }
    }
}

fn device_name(device: &cpal::Device) -> String {
    device
        .description()
        .map(|d| d.name().to_owned())
        .unwrap_or_else(|_| "unnamed device".into())
}

/// The host's own name for a device (PulseAudio: the source or sink name; ALSA: the PCM).
fn device_id(device: &cpal::Device) -> String {
    device.id().map(|id| id.id().to_owned()).unwrap_or_default()
}

/// The sound server's host (cpal's PulseAudio host), if it takes a client now.
fn sound_server_host() -> Option<cpal::Host> {
    #[cfg(target_os = "linux")]
    {
        cpal::host_from_id(cpal::HostId::PulseAudio).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Whether a host is the sound server's (cpal's PulseAudio host).
fn is_sound_server(host: cpal::HostId) -> bool {
    #[cfg(target_os = "linux")]
    {
        host == cpal::HostId::PulseAudio
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = host;
        false
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Input,
    Output,
}

impl Direction {
    fn what(self) -> &'static str {
        match self {
            Direction::Input => "microphone",
            Direction::Output => "speaker",
        }
    }
}

/// Whether a person would pick this device (module docs): `id` is the host's name for it.
fn is_pickable(server: bool, id: &str) -> bool {
    if server {
        !id.ends_with(".monitor")
    } else {
        id == "default" || id.starts_with("plughw:")
    }
}

/// The default device: for a sound server the one `PULSE_SOURCE` / `PULSE_SINK` names
/// when set (as libpulse does), else the server's default.
fn default_device(host: &cpal::Host, direction: Direction) -> Option<cpal::Device> {
    if is_sound_server(host.id()) {
        let variable = match direction {
            Direction::Input => "PULSE_SOURCE",
            Direction::Output => "PULSE_SINK",
        };
        if let Ok(wanted) = std::env::var(variable)
            && let Some(device) = all_devices(host, direction)
                .into_iter()
                .find(|d| device_id(d) == wanted)
        {
            return Some(device);
        }
    }
    match direction {
        Direction::Input => host.default_input_device(),
        Direction::Output => host.default_output_device(),
    }
}

fn all_devices(host: &cpal::Host, direction: Direction) -> Vec<cpal::Device> {
    list_devices(host, direction).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "listing audio devices");
        Vec::new()
    })
}

/// The host's devices one way, or why they could not be listed.
fn list_devices(host: &cpal::Host, direction: Direction) -> Result<Vec<cpal::Device>, cpal::Error> {
    match direction {
        Direction::Input => host.input_devices().map(|d| d.collect()),
        Direction::Output => host.output_devices().map(|d| d.collect()),
    }
}

/// Whether the device with the host's id `id` is still listed; None when the list could
/// not be taken.
fn device_present(direction: Direction, id: &str) -> Option<bool> {
    let host = sound_server_host()?;
    let devices = list_devices(&host, direction).ok()?;
    if devices.is_empty() {
        return None;
    }
    Some(devices.iter().any(|d| device_id(d) == id))
}

/// The devices a person can pick, each with its name in the pickers, the default
/// first; names are unique (a repeated one gets the host's id in brackets).
fn pickable_devices(host: &cpal::Host, direction: Direction) -> Vec<(String, cpal::Device)> {
    let server = is_sound_server(host.id());
    let default = default_device(host, direction).map(|d| device_id(&d));
    let mut devices: Vec<cpal::Device> = all_devices(host, direction)
        .into_iter()
        .filter(|d| {
            let id = device_id(d);
            is_pickable(server, &id) || default.as_ref() == Some(&id)
        })
        .collect();
    // Stable: the default first, the rest in the host's order.
    devices.sort_by_key(|d| default.as_ref() != Some(&device_id(d)));
    let mut named: Vec<(String, cpal::Device)> = Vec::new();
    for device in devices {
        let mut name = device_name(&device);
        if named.iter().any(|(n, _)| *n == name) {
            name = format!("{name} [{}]", device_id(&device));
        }
        named.push((name, device));
    }
    named
}

/// The device called `wanted` (as [`list_audio_devices`] names it), or the default one.
fn find_device(direction: Direction, wanted: Option<&str>) -> Result<cpal::Device, MediaError> {
    let host = cpal::default_host();
    let what = direction.what();
    match wanted {
        None => default_device(&host, direction)
            .ok_or_else(|| MediaError::Device(format!("no {what} found"))),
        Some(w) => pickable_devices(&host, direction)
            .into_iter()
            .find_map(|(name, device)| (name == w).then_some(device))
            .ok_or_else(|| MediaError::Device(format!("{what} {w:?} not found"))),
    }
}

/// The stream configuration for a device: its own rate and channels; through a sound
/// server, 20 ms periods (left to itself the server buffers a recording for up to 2 s).
fn stream_config(
    device: &cpal::Device,
    supported: &cpal::SupportedStreamConfig,
) -> cpal::StreamConfig {
    let mut config = supported.config();
    if device.id().is_ok_and(|id| is_sound_server(id.host())) {
        config.buffer_size = cpal::BufferSize::Fixed(config.sample_rate / 50);
    }
    config
}

/// The default microphone, as 48 kHz mono 20 ms frames.
pub struct Microphone {
    shared: Arc<Shared>,
    description: String,
    _thread: DeviceThread,
}

impl Microphone {
    pub fn open_default() -> Result<Microphone, MediaError> {
        Microphone::open(None)
    }

    /// Opens the input device called `name` (as [`list_audio_devices`] lists it), or the
    /// default one.
    pub fn open(name: Option<&str>) -> Result<Microphone, MediaError> {
        let shared = Arc::new(Shared::new());
        let cb_shared = shared.clone();
        let wanted = name.map(str::to_owned);
        let (thread, description) =
            spawn_device("duet-mic", Direction::Input, shared.clone(), move || {
                let device = find_device(Direction::Input, wanted.as_deref())?;
                let supported = device
                    .default_input_config()
                    .map_err(|e| MediaError::Device(format!("microphone: {e}")))?;
                let config = stream_config(&device, &supported);
                let stream = match supported.sample_format() {
                    cpal::SampleFormat::F32 => input_stream::<f32>(&device, &config, cb_shared),
                    cpal::SampleFormat::I16 => input_stream::<i16>(&device, &config, cb_shared),
                    cpal::SampleFormat::I32 => input_stream::<i32>(&device, &config, cb_shared),
                    cpal::SampleFormat::U16 => input_stream::<u16>(&device, &config, cb_shared),
                    other => Err(MediaError::Device(format!(
                        "microphone sample format {other} is not supported"
                    ))),
                }?;
                stream
                    .play()
                    .map_err(|e| MediaError::Device(format!("microphone: {e}")))?;
                Ok(Opened {
                    stream,
                    description: format!(
                        "microphone {} ({} Hz, {} ch)",
                        device_name(&device),
                        config.sample_rate,
                        config.channels
                    ),
                    id: device_id(&device),
                    on_server: device.id().is_ok_and(|id| is_sound_server(id.host())),
                })
            })?;
        Ok(Microphone {
            shared,
            description,
            _thread: thread,
        })
    }
}

fn input_stream<T>(
    device: &cpal::Device,
    config: &cpal::StreamConfig,
    shared: Arc<Shared>,
) -> Result<cpal::Stream, MediaError>
where
    T: SizedSample,
    f32: FromSample<T>,
{
    let channels = usize::from(config.channels.max(1));
    let mut resampler = Resampler::new(config.sample_rate, SAMPLE_RATE)?;
    let mut resampled = Vec::new();
    let errors = shared.clone();
    device
        .build_input_stream(
            *config,
            move |data: &[T], _| {
                let mono: Vec<f32> = data
                    .chunks(channels)
                    .map(|c| c.iter().map(|&s| s.to_sample::<f32>()).sum::<f32>() / c.len() as f32)
                    .collect();
                resampled.clear();
                resampler.push(&mono, &mut resampled);
                let pcm = resampled
                    .iter()
                    .map(|v| (v.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16);
                shared.push(pcm);
                shared.touch();
            },
            move |e| errors.stream_error("microphone", &e),
            None,
        )
        .map_err(|e| MediaError::Device(format!("microphone: {e}")))
}

impl AudioSource for Microphone {
    /// Waits for 20 ms of audio; if the device stalls, returns what there is padded
    /// with silence so the call keeps its pace.
    fn next_frame(&mut self) -> Result<Vec<i16>, MediaError> {
        self.shared.check(&self.description)?;
        let q = self
            .shared
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut q, _) = self
            .shared
            .ready
            .wait_timeout_while(q, Duration::from_millis(60), |q| q.len() < FRAME_SAMPLES)
            .unwrap_or_else(PoisonError::into_inner);
        let take = q.len().min(FRAME_SAMPLES);
        let mut frame: Vec<i16> = q.drain(..take).collect();
        frame.resize(FRAME_SAMPLES, 0);
        Ok(frame)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// The default speaker, playing 48 kHz mono.
pub struct Speaker {
    shared: Arc<Shared>,
    description: String,
    _thread: DeviceThread,
}

impl Speaker {
    pub fn open_default() -> Result<Speaker, MediaError> {
        Speaker::open(None)
    }

    /// Opens the output device called `name` (as [`list_audio_devices`] lists it), or
    /// the default one.
    pub fn open(name: Option<&str>) -> Result<Speaker, MediaError> {
        let shared = Arc::new(Shared::new());
        let cb_shared = shared.clone();
        let wanted = name.map(str::to_owned);
        let (thread, description) = spawn_device(
            "duet-speaker",
            Direction::Output,
            shared.clone(),
            move || {
                let device = find_device(Direction::Output, wanted.as_deref())?;
                let supported = device
                    .default_output_config()
                    .map_err(|e| MediaError::Device(format!("speaker: {e}")))?;
                let config = stream_config(&device, &supported);
                let stream = match supported.sample_format() {
                    cpal::SampleFormat::F32 => output_stream::<f32>(&device, &config, cb_shared),
                    cpal::SampleFormat::I16 => output_stream::<i16>(&device, &config, cb_shared),
                    cpal::SampleFormat::I32 => output_stream::<i32>(&device, &config, cb_shared),
                    cpal::SampleFormat::U16 => output_stream::<u16>(&device, &config, cb_shared),
                    other => Err(MediaError::Device(format!(
                        "speaker sample format {other} is not supported"
                    ))),
                }?;
                stream
                    .play()
                    .map_err(|e| MediaError::Device(format!("speaker: {e}")))?;
                Ok(Opened {
                    stream,
                    description: format!(
                        "speaker {} ({} Hz, {} ch)",
                        device_name(&device),
                        config.sample_rate,
                        config.channels
                    ),
                    id: device_id(&device),
                    on_server: device.id().is_ok_and(|id| is_sound_server(id.host())),
                })
            },
        )?;
        Ok(Speaker {
            shared,
            description,
            _thread: thread,
        })
    }
}

fn output_stream<T>(
    device: &cpal::Device,
    config: &cpal::StreamConfig,
    shared: Arc<Shared>,
) -> Result<cpal::Stream, MediaError>
where
    T: SizedSample + FromSample<f32>,
{
    let channels = usize::from(config.channels.max(1));
    let rate = config.sample_rate;
    let mut resampler = Resampler::new(SAMPLE_RATE, rate)?;
    let mut device_rate: Vec<f32> = Vec::new();
    let errors = shared.clone();
    device
        .build_output_stream(
            *config,
            move |out: &mut [T], _| {
                let frames = out.len() / channels;
                shared.touch();
                // Device-rate samples from the queue, through the resampler, until there
                // are enough (or the queue runs dry: the rest is silence).
                while device_rate.len() < frames {
                    let pcm: Vec<f32> = {
                        let mut q = shared
                            .samples
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        // What the missing device samples are made from (at equal
                        // rates exactly that many; else the resampler keeps the rest).
                        let want = ((frames - device_rate.len()) as u64 * u64::from(SAMPLE_RATE))
                            .div_ceil(u64::from(rate.max(1)))
                            as usize;
                        let take = q.len().min(want);
                        q.drain(..take)
                            .map(|s| f32::from(s) / f32::from(i16::MAX))
                            .collect()
                    };
                    if pcm.is_empty() {
                        break;
                    }
                    resampler.push(&pcm, &mut device_rate);
                }
                let ready = device_rate.len().min(frames);
                for (frame, v) in out
                    .chunks_mut(channels)
                    .zip(device_rate.drain(..ready).chain(std::iter::repeat(0.0)))
                {
                    frame.fill(T::from_sample(v));
                }
            },
            move |e| errors.stream_error("speaker", &e),
            None,
        )
        .map_err(|e| MediaError::Device(format!("speaker: {e}")))
}

impl AudioSink for Speaker {
    fn write(&mut self, pcm: &[i16]) -> Result<(), MediaError> {
        self.shared.check(&self.description)?;
        self.shared.push(pcm.iter().copied());
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Names of the audio devices a person can pick (module docs), inputs and outputs, the
/// default first of each.
pub fn list_audio_devices() -> (Vec<String>, Vec<String>) {
    let host = cpal::default_host();
    let names = |direction| {
        pickable_devices(&host, direction)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    };
    (names(Direction::Input), names(Direction::Output))
}

/// A sound played in a loop on a speaker until dropped (the ring of an incoming call).
///
/// Everything, opening the speaker included, happens on its own thread, so starting and
/// stopping never make the caller (the UI) wait; a failure is reported by
/// [`LoopPlayer::problem`].
pub struct LoopPlayer {
    stop: Arc<AtomicBool>,
    problem: Arc<Mutex<Option<String>>>,
}

impl LoopPlayer {
    /// Starts playing `sound` (looping) on the speaker called `speaker` (or the default).
    pub fn start(mut sound: impl AudioSource + 'static, speaker: Option<&str>) -> LoopPlayer {
        let stop = Arc::new(AtomicBool::new(false));
        let problem = Arc::new(Mutex::new(None));
        let (thread_stop, thread_problem) = (stop.clone(), problem.clone());
        let speaker = speaker.map(str::to_owned);
        let report = move |e: MediaError| {
            *thread_problem
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
        };
        let spawned = std::thread::Builder::new()
            .name("duet-ring".into())
            .spawn(move || {
                let mut out = match Speaker::open(speaker.as_deref()) {
                    Ok(out) => out,
                    Err(e) => return report(e),
                };
                let period = Duration::from_millis(20);
                let mut next = std::time::Instant::now();
                while !thread_stop.load(Ordering::Relaxed) {
                    let played = sound.next_frame().and_then(|pcm| out.write(&pcm));
                    if let Err(e) = played {
                        return report(e);
                    }
                    super::pace(&mut next, period);
                }
            });
        if let Err(e) = spawned {
            *problem.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(format!("cannot start the ring thread: {e}"));
        }
        LoopPlayer { stop, problem }
    }

    /// Why nothing is (or no longer) playing, if so.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for LoopPlayer {
    /// Stops the sound; the thread ends by itself within one 20 ms frame.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_devices_a_person_would_pick_are_offered() {
        // A sound server: its sources and sinks, not the monitors of its sinks.
        assert!(is_pickable(
            true,
            "alsa_input.pci-0000_00_1f.3.analog-stereo"
        ));
        assert!(is_pickable(true, "nullsink"));
        assert!(!is_pickable(true, "nullsink.monitor"));
        // ALSA alone: the default and the sound cards, none of its plugins.
        assert!(is_pickable(false, "default"));
        assert!(is_pickable(false, "plughw:CARD=PCH,DEV=0"));
        for plugin in [
            "null",
            "pulse",
            "lavrate",
            "samplerate",
            "speexrate",
            "jack",
            "oss",
        ] {
            assert!(!is_pickable(false, plugin), "{plugin}");
        }
        assert!(
            !is_pickable(false, "hw:CARD=PCH,DEV=0"),
            "plughw converts, hw does not"
        );
        assert!(!is_pickable(false, "upmix"));
    }
}
