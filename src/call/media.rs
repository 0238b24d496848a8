//! The call's media pipelines and what they measure.
//!
//! Sending: a thread per medium encodes (CPU work stays off the async runtime; video
//! frames come from a [`crate::media::capture::Capture`] thread) and hands access units / Opus packets over a channel to an async writer that
//! puts them on the WebRTC track. Receiving: an async reader depacketizes RTP (H.264
//! access units are complete at the marker bit, no extra frame of delay) and hands them
//! to a decoder thread that feeds the sinks. Every stage records into [`MediaStats`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::media::Sample;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer as _;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::mpsc;
use webrtc::media_stream::track_local::{TrackLocal as _, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use super::peer::{LocalTrack, is_keyframe_request};
use crate::media::audio::{
    AudioSink, AudioSource, JitterBuffer, OpusDecoder, OpusEncoder, Playout, SAMPLE_RATE,
};
use crate::media::h264::{EncoderSettings, H264Decoder, H264Encoder};
use crate::media::pace;
use crate::media::picture::{Notify, Picture, PictureSlot};
use crate::media::video::{
    TestPattern, VideoFrame, Y4mWriter, psnr_luma, read_strip, wall_clock_us32,
};

/// Everything measured during a call. Locked briefly, a few times per frame.
#[derive(Debug)]
pub struct MediaStats {
    pub started: Instant,
    pub connected_after: Option<Duration>,
    pub both_in_room_at: Option<Instant>,
    pub first_frame_after: Option<Duration>,
    pub video_frames_sent: u64,
    pub video_frames_skipped: u64,
    pub video_bytes_sent: u64,
    pub keyframes_sent: u64,
    pub keyframe_requests_received: u64,
    pub audio_frames_sent: u64,
    pub video_frames_received: u64,
    pub video_frames_decoded: u64,
    pub video_frames_broken: u64,
    pub video_bytes_received: u64,
    pub first_decoded_at: Option<Instant>,
    pub last_decoded_at: Option<Instant>,
    /// Glass-to-glass latency from the strip, microseconds.
    pub latencies_us: Vec<u32>,
    pub last_frame_number: Option<u32>,
    pub strip_frames: u64,
    pub frames_out_of_order: u64,
    pub frozen_frames: u64,
    pub lost_frames: u64,
    pub psnr_db: Vec<f64>,
    pub encode_us: Vec<u32>,
    pub decode_us: Vec<u32>,
    pub decoded_width: usize,
    pub decoded_height: usize,
    pub audio_frames_decoded: u64,
    pub audio_frames_concealed: u64,
    /// The last second of received audio, for measuring its frequency.
    pub audio_tail: VecDeque<i16>,
    pub chat_sent: Vec<String>,
    pub chat_received: Vec<String>,
}

impl MediaStats {
    pub fn new() -> MediaStats {
        MediaStats {
            started: Instant::now(),
            connected_after: None,
            both_in_room_at: None,
            first_frame_after: None,
            video_frames_sent: 0,
            video_frames_skipped: 0,
            video_bytes_sent: 0,
            keyframes_sent: 0,
            keyframe_requests_received: 0,
            audio_frames_sent: 0,
            video_frames_received: 0,
            video_frames_decoded: 0,
            video_frames_broken: 0,
            video_bytes_received: 0,
            first_decoded_at: None,
            last_decoded_at: None,
            latencies_us: Vec::new(),
            last_frame_number: None,
            strip_frames: 0,
            frames_out_of_order: 0,
            frozen_frames: 0,
            lost_frames: 0,
            psnr_db: Vec::new(),
            encode_us: Vec::new(),
            decode_us: Vec::new(),
            decoded_width: 0,
            decoded_height: 0,
            audio_frames_decoded: 0,
            audio_frames_concealed: 0,
            audio_tail: VecDeque::new(),
            chat_sent: Vec::new(),
            chat_received: Vec::new(),
        }
    }
}

impl Default for MediaStats {
    fn default() -> Self {
        MediaStats::new()
    }
}

/// Shared handle to the stats.
#[derive(Debug, Clone, Default)]
pub struct StatsHandle(Arc<Mutex<MediaStats>>);

impl StatsHandle {
    pub fn lock(&self) -> MutexGuard<'_, MediaStats> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Threads and tasks of the media pipelines, stopped together.
#[derive(Default)]
pub struct Pipelines {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipelines {
    pub fn new() -> Pipelines {
        Pipelines::default()
    }

    /// Stops every thread and task and waits for them.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    /// Video: capture and encode on a thread, write samples from a task; answer
    /// keyframe requests.
    ///
    /// Frames come from a [`crate::media::capture::Capture`] through `frames`. When none
    /// come (the camera is off), a black frame of the last size goes out every 250 ms so
    /// the other side sees "no picture" instead of a frozen one.
    pub fn start_video_sender(
        &mut self,
        frames: std::sync::mpsc::Receiver<VideoFrame>,
        settings: EncoderSettings,
        track: LocalTrack,
        stats: StatsHandle,
    ) {
        let (tx, mut rx) = mpsc::channel::<(Bytes, Duration)>(8);
        let stop = self.stop.clone();
        let keyframe = Arc::new(AtomicBool::new(false));
        let keyframe_flag = keyframe.clone();
        let thread_stats = stats.clone();
        let spawned = std::thread::Builder::new()
            .name("duet-video-send".into())
            .spawn(move || {
                let mut encoder = match H264Encoder::new(settings) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, "video encoder");
                        return;
                    }
                };
                // Frames captured before the call connected are stale: skip them.
                while frames.try_recv().is_ok() {}
                let mut last_sample = Instant::now();
                let mut size = (640, 360);
                while !stop.load(Ordering::Relaxed) {
                    let frame = match frames.recv_timeout(Duration::from_millis(250)) {
                        Ok(f) => {
                            size = (f.width, f.height);
                            f
                        }
                        Err(_) => VideoFrame::black(size.0, size.1),
                    };
                    if keyframe_flag.swap(false, Ordering::Relaxed) {
                        encoder.request_keyframe();
                    }
                    let t0 = Instant::now();
                    let encoded = encoder.encode(&frame);
                    let took = t0.elapsed();
                    match encoded {
                        Ok(Some(au)) => {
                            let mut s = thread_stats.lock();
                            s.encode_us.push(took.as_micros() as u32);
                            s.video_frames_sent += 1;
                            s.video_bytes_sent += au.data.len() as u64;
                            s.keyframes_sent += u64::from(au.keyframe);
                            drop(s);
                            // A skipped frame's duration is carried into the next sample.
                            let now = Instant::now();
                            let duration = now - last_sample;
                            last_sample = now;
                            if tx.blocking_send((Bytes::from(au.data), duration)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => thread_stats.lock().video_frames_skipped += 1,
                        Err(e) => tracing::warn!(error = %e, "encoding a frame failed"),
                    }
                }
            });
        match spawned {
            Ok(t) => self.threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start the video thread"),
        }
        let writer_track = track.clone();
        self.tasks.push(tokio::spawn(async move {
            let Some(pt) = wait_payload_type(&writer_track).await else {
                tracing::error!("no negotiated H.264 payload type");
                return;
            };
            while let Some((data, duration)) = rx.recv().await {
                let sample = Sample {
                    data,
                    duration,
                    ..Sample::new(Instant::now())
                };
                let writer = writer_track.track.sample_writer(writer_track.ssrc, pt);
                if let Err(e) = writer.write_sample(&sample).await {
                    tracing::debug!(error = %e, "writing a video sample");
                }
            }
        }));
        // PLI/FIR from the receiver: the next frame becomes an IDR.
        self.tasks.push(tokio::spawn(async move {
            while let Some(event) = track.track.poll().await {
                if let TrackLocalEvent::OnRtcpPacket(packets) = event
                    && packets.iter().any(|p| is_keyframe_request(p.as_ref()))
                {
                    stats.lock().keyframe_requests_received += 1;
                    keyframe.store(true, Ordering::Relaxed);
                }
            }
        }));
    }

    /// Audio: a 20 ms clock on a thread, Opus encode, write from a task.
    /// While `muted` is set, silence is sent instead of the source (which keeps running,
    /// so unmuting is instant).
    pub fn start_audio_sender(
        &mut self,
        mut source: Box<dyn AudioSource>,
        muted: Arc<AtomicBool>,
        track: LocalTrack,
        stats: StatsHandle,
    ) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name("duet-audio-send".into())
            .spawn(move || {
                let mut encoder = match OpusEncoder::new(32_000) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, "audio encoder");
                        return;
                    }
                };
                let period = Duration::from_millis(20);
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let mut pcm = match source.next_frame() {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!(error = %e, "audio source failed");
                            return;
                        }
                    };
                    if muted.load(Ordering::Relaxed) {
                        pcm.fill(0);
                    }
                    match encoder.encode(&pcm) {
                        Ok(packet) => {
                            stats.lock().audio_frames_sent += 1;
                            if tx.blocking_send(Bytes::from(packet)).is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "encoding audio failed"),
                    }
                    pace(&mut next, period);
                }
            });
        match spawned {
            Ok(t) => self.threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start the audio thread"),
        }
        self.tasks.push(tokio::spawn(async move {
            let Some(pt) = wait_payload_type(&track).await else {
                tracing::error!("no negotiated Opus payload type");
                return;
            };
            while let Some(data) = rx.recv().await {
                let sample = Sample {
                    data,
                    duration: Duration::from_millis(20),
                    ..Sample::new(Instant::now())
                };
                let writer = track.track.sample_writer(track.ssrc, pt);
                if let Err(e) = writer.write_sample(&sample).await {
                    tracing::debug!(error = %e, "writing an audio sample");
                }
            }
        }));
    }

    /// A remote track arrived: start its receive pipeline.
    pub async fn start_receiver(&mut self, track: Arc<dyn TrackRemote>, sinks: ReceiveSinks) {
        match track.kind().await {
            RtpCodecKind::Video => self.start_video_receiver(track, sinks),
            RtpCodecKind::Audio => self.start_audio_receiver(track, sinks),
            other => tracing::warn!(?other, "ignoring a remote track of an unexpected kind"),
        }
    }

    fn start_video_receiver(&mut self, track: Arc<dyn TrackRemote>, sinks: ReceiveSinks) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(16);
        let need_keyframe = Arc::new(AtomicBool::new(false));
        let decoder_needs_keyframe = need_keyframe.clone();
        let stats = sinks.stats.clone();
        self.tasks.push(tokio::spawn(async move {
            let media_ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
            let mut depacketizer = H264Packet::default();
            let mut access_unit = bytes::BytesMut::new();
            let mut last_seq: Option<u16> = None;
            let mut broken = false;
            let mut last_pli = Instant::now() - Duration::from_secs(1);
            while let Some(event) = track.poll().await {
                let TrackRemoteEvent::OnRtpPacket(packet) = event else {
                    continue;
                };
                let seq = packet.header.sequence_number;
                if last_seq.is_some_and(|l| seq != l.wrapping_add(1)) {
                    // A gap (NACK may still fill it later, but this frame is damaged).
                    broken = true;
                    depacketizer = H264Packet::default();
                }
                last_seq = Some(seq);
                stats.lock().video_bytes_received += packet.payload.len() as u64;
                match depacketizer.depacketize(&packet.payload) {
                    Ok(nal) => access_unit.extend_from_slice(&nal),
                    Err(_) => broken = true,
                }
                if packet.header.marker {
                    let au = access_unit.split().freeze();
                    if broken {
                        stats.lock().video_frames_broken += 1;
                        need_keyframe.store(true, Ordering::Relaxed);
                    }
                    // A damaged frame, or one the decoder could not decode (e.g. the first
                    // keyframe was lost before this receiver existed): ask for a keyframe
                    // (at most every 200 ms) rather than wait for the sender's next
                    // periodic one, seconds away.
                    if need_keyframe.load(Ordering::Relaxed)
                        && last_pli.elapsed() > Duration::from_millis(200)
                    {
                        need_keyframe.store(false, Ordering::Relaxed);
                        last_pli = Instant::now();
                        let pli = PictureLossIndication {
                            sender_ssrc: 0,
                            media_ssrc,
                        };
                        let sent = track.write_rtcp(vec![Box::new(pli)]).await;
                        tracing::debug!(?sent, "keyframe request (PLI) sent");
                    }
                    if std::mem::take(&mut broken) {
                        continue;
                    }
                    stats.lock().video_frames_received += 1;
                    if tx.try_send(au).is_err() {
                        tracing::debug!("decoder busy; dropping an access unit");
                    }
                }
            }
        }));
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name("duet-video-recv".into())
            .spawn(move || video_decode_loop(rx, sinks, stop, decoder_needs_keyframe));
        match spawned {
            Ok(t) => self.threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start the video decoder thread"),
        }
    }

    fn start_audio_receiver(&mut self, track: Arc<dyn TrackRemote>, sinks: ReceiveSinks) {
        self.tasks.push(tokio::spawn(async move {
            let mut decoder = match OpusDecoder::new() {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "audio decoder");
                    return;
                }
            };
            let mut jitter = JitterBuffer::new(3);
            while let Some(event) = track.poll().await {
                let TrackRemoteEvent::OnRtpPacket(packet) = event else {
                    continue;
                };
                jitter.push(packet.header.sequence_number, packet.payload.to_vec());
                while let Some(playout) = jitter.pop() {
                    let (pcm, concealed) = match &playout {
                        Playout::Packet(p) => (decoder.decode(Some(p), false), false),
                        Playout::Lost { next: Some(n) } => (decoder.decode(Some(n), true), true),
                        Playout::Lost { next: None } => (decoder.decode(None, false), true),
                    };
                    let Ok(pcm) = pcm else {
                        continue;
                    };
                    {
                        let mut s = sinks.stats.lock();
                        s.audio_frames_decoded += 1;
                        s.audio_frames_concealed += u64::from(concealed);
                        s.audio_tail.extend(pcm.iter().copied());
                        let excess = s.audio_tail.len().saturating_sub(SAMPLE_RATE as usize);
                        s.audio_tail.drain(..excess);
                    }
                    if let Some(sink) = sinks.audio.as_ref() {
                        let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Err(e) = sink.write(&pcm) {
                            tracing::warn!(error = %e, "audio sink");
                        }
                    }
                }
            }
        }));
    }
}

/// Where received media goes.
#[derive(Clone)]
pub struct ReceiveSinks {
    pub stats: StatsHandle,
    /// Where decoded pictures go for display (converted to RGBA on the decoder thread),
    /// and whom to wake when one arrives. None: nobody looks (headless).
    pub display: Option<(PictureSlot, Option<Notify>)>,
    pub record_video: Option<Arc<Mutex<Y4mWriter>>>,
    pub audio: Option<Arc<Mutex<Box<dyn AudioSink>>>>,
    /// When the remote sends the test pattern: compare decoded pixels with it (noisy?).
    pub reference_pattern: Option<bool>,
}

fn video_decode_loop(
    rx: std::sync::mpsc::Receiver<Bytes>,
    sinks: ReceiveSinks,
    stop: Arc<AtomicBool>,
    need_keyframe: Arc<AtomicBool>,
) {
    let mut decoder = match H264Decoder::new() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "video decoder");
            return;
        }
    };
    let mut reference: Option<TestPattern> = None;
    let mut decoded = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let au = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(au) => au,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let t0 = Instant::now();
        let frame = match decoder.decode(&au) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "undecodable access unit");
                need_keyframe.store(true, Ordering::Relaxed);
                continue;
            }
        };
        let took = t0.elapsed();
        let now = Instant::now();
        let strip = read_strip(&frame);
        let latency = strip.map(|s| wall_clock_us32().wrapping_sub(s.captured_us));
        // Re-rendering the reference costs as much as rendering the source, so quality
        // is sampled on every 10th frame to keep measuring cheaper than calling.
        let psnr = match (strip, sinks.reference_pattern) {
            (Some(s), Some(noisy)) if decoded % 10 == 0 => {
                let pattern = reference.get_or_insert_with(|| {
                    TestPattern::new(frame.width, frame.height, 30.0, noisy)
                });
                Some(psnr_luma(
                    &pattern.render(s.frame_number),
                    &frame,
                    pattern.content_top(),
                ))
            }
            _ => None,
        };
        {
            let mut s = sinks.stats.lock();
            s.video_frames_decoded += 1;
            s.decode_us.push(took.as_micros() as u32);
            s.decoded_width = frame.width;
            s.decoded_height = frame.height;
            if s.first_decoded_at.is_none() {
                s.first_decoded_at = Some(now);
                s.first_frame_after = Some(now - s.started);
            }
            s.last_decoded_at = Some(now);
            if let Some(data) = strip {
                s.strip_frames += 1;
                if let Some(l) = latency.filter(|&l| l < 10_000_000) {
                    s.latencies_us.push(l);
                }
                match s.last_frame_number {
                    Some(last) if data.frame_number == last => s.frozen_frames += 1,
                    Some(last) if data.frame_number < last => s.frames_out_of_order += 1,
                    Some(last) => s.lost_frames += u64::from(data.frame_number - last - 1),
                    None => {}
                }
                s.last_frame_number = Some(data.frame_number.max(s.last_frame_number.unwrap_or(0)));
            }
            if let Some(p) = psnr {
                s.psnr_db.push(p);
            }
        }
        if let Some(rec) = sinks.record_video.as_ref() {
            let mut rec = rec.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = rec.write(&frame) {
                tracing::warn!(error = %e, "recording video");
            }
        }
        decoded += 1;
        if let Some((slot, notify)) = sinks.display.as_ref() {
            slot.put(Picture::from_frame(&frame));
            if let Some(n) = notify {
                n.notify();
            }
        }
    }
}

async fn wait_payload_type(track: &LocalTrack) -> Option<rtc::rtp_transceiver::PayloadType> {
    for _ in 0..100 {
        if let Some(pt) = track.payload_type().await {
            return Some(pt);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
