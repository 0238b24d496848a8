//! The call's media pipelines and what they measure.
//!
//! Sending: a thread per medium encodes (CPU work stays off the async runtime; video
//! frames come from a [`crate::media::capture::Capture`] thread) and hands access units /
//! Opus packets over a channel to an async writer that puts them on the WebRTC track.
//!
//! Receiving video: an async reader feeds RTP packets to a [`FrameAssembler`], which
//! hands out complete access units in order (waiting up to two and a half round trips
//! for retransmitted packets) and decides what to NACK and when to send a keyframe
//! request; a decoder thread decodes and feeds the sinks.
//! Receiving audio: one async task puts packets through the jitter buffer and Opus decoder
//! (both cheap) into the audio sink. Every stage records into [`MediaStats`], including
//! the voice meters of what is sent and received (`media::level`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::media::Sample;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
    TransportLayerNack, nack_pairs_from_sequence_numbers,
};
use rtc::rtp::codec::vp8::Vp8Payloader;
use rtc::rtp::packetizer::{Packetizer as _, new_packetizer};
use rtc::rtp::sequence::new_random_sequencer;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::mpsc;
use webrtc::media_stream::track_local::{TrackLocal as _, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use super::pacer::PacerHandle;
use super::peer::{LocalTrack, PeerStats, is_keyframe_request};
use super::sleep_until;
use crate::media::arrival::ArrivalMonitor;
use crate::media::assembler::{AccessUnit, Assembled, FrameAssembler};
use crate::media::audio::{AudioSink, AudioSource, OpusDecoder, OpusEncoder, SAMPLE_RATE};
use crate::media::capture::CapturedFrame;
use crate::media::codec::{VideoCodec, VideoDecoder};
use crate::media::h264::EncoderSettings;
use crate::media::jitter::{JitterBuffer, JitterStats, Playout};
use crate::media::ladder::{Ladder, scaled_size};
use crate::media::level::{SpeechMean, VoiceLevel, VoiceMeter};
use crate::media::pace;
use crate::media::picture::{Notify, PictureSlot};
use crate::media::processing::AudioProcessor;
use crate::media::scale::Scaler;
use crate::media::video::{
    TestPattern, VideoFrame, Y4mWriter, psnr_luma, read_strip, wall_clock_us32,
};

/// Everything measured during a call. Locked briefly, a few times per frame.
#[derive(Debug)]
pub struct MediaStats {
    pub started: Instant,
    /// REMBs we sent (our direction was queued: "send at most this").
    pub rate_requests_sent: u64,
    /// ICE restarts we made, and signaling connections that got our seat back.
    pub ice_restarts: u64,
    /// Peer connections replaced by fresh ones before they carried media (ours or theirs).
    pub fresh_connections: u64,
    pub signaling_resumes: u64,
    pub connected_after: Option<Duration>,
    pub both_in_room_at: Option<Instant>,
    pub first_frame_after: Option<Duration>,
    /// The video codec sent and received (known once each pipeline started).
    pub video_codec_sent: Option<VideoCodec>,
    pub video_codec_received: Option<VideoCodec>,
    pub video_frames_sent: u64,
    pub video_frames_skipped: u64,
    pub video_bytes_sent: u64,
    pub keyframes_sent: u64,
    pub keyframe_requests_received: u64,
    /// PLIs we sent (the assembler's decisions).
    pub keyframe_requests_sent: u64,
    /// Video packets we asked for again (NACK).
    pub nacked_packets: u64,
    /// The bitrate the video encoder is asked for now.
    pub encoder_bitrate_bps: u32,
    /// The size of the pictures sent now (the resolution ladder's step).
    pub sent_resolution: (usize, usize),
    pub audio_frames_sent: u64,
    /// The microphone as sent (after processing, before muting: a muted person who
    /// speaks sees it), and whether they speak (never while muted).
    pub microphone_level: VoiceLevel,
    /// The other person's voice as received.
    pub remote_voice: VoiceLevel,
    /// The level of what was sent and received while someone spoke.
    pub speech_sent: SpeechMean,
    pub speech_received: SpeechMean,
    /// Time the audio processing took per 20 ms microphone frame, microseconds.
    pub processing_us: Vec<u32>,
    pub video_frames_received: u64,
    pub video_frames_decoded: u64,
    /// Frames given up (a packet never came) or dropped waiting for a keyframe.
    pub video_frames_broken: u64,
    /// Frames completed by a retransmitted (or reordered) packet.
    pub video_frames_repaired: u64,
    pub video_bytes_received: u64,
    pub first_decoded_at: Option<Instant>,
    pub last_decoded_at: Option<Instant>,
    /// Glass-to-glass latency from the strip, microseconds.
    pub latencies_us: Vec<u32>,
    pub last_frame_number: Option<u32>,
    pub strip_frames: u64,
    pub frames_out_of_order: u64,
    /// Decoded frames whose strip repeats the previous frame number.
    pub frozen_frames: u64,
    /// Freezes as WebRTC statistics define them (see [`FreezeDetector`]).
    pub freezes: FreezeDetector,
    /// One sample per second of the call (rates, estimate, repair counters).
    pub timeline: Vec<Second>,
    pub lost_frames: u64,
    pub psnr_db: Vec<f64>,
    pub encode_us: Vec<u32>,
    pub decode_us: Vec<u32>,
    pub decoded_width: usize,
    pub decoded_height: usize,
    pub audio_frames_decoded: u64,
    pub audio_frames_concealed: u64,
    /// The audio jitter buffer: what it holds now and aims to hold, and its counters.
    pub audio_jitter: Duration,
    pub audio_jitter_target: Duration,
    pub audio_jitter_stats: JitterStats,
    /// The last second of received audio, for measuring its frequency.
    pub audio_tail: VecDeque<i16>,
    pub chat_sent: Vec<String>,
    pub chat_received: Vec<String>,
}

impl MediaStats {
    pub fn new() -> MediaStats {
        MediaStats {
            started: Instant::now(),
            rate_requests_sent: 0,
            ice_restarts: 0,
            fresh_connections: 0,
            signaling_resumes: 0,
            connected_after: None,
            both_in_room_at: None,
            first_frame_after: None,
            video_codec_sent: None,
            video_codec_received: None,
            video_frames_sent: 0,
            video_frames_skipped: 0,
            video_bytes_sent: 0,
            keyframes_sent: 0,
            keyframe_requests_received: 0,
            keyframe_requests_sent: 0,
            nacked_packets: 0,
            encoder_bitrate_bps: 0,
            sent_resolution: (0, 0),
            audio_frames_sent: 0,
            microphone_level: VoiceLevel::default(),
            remote_voice: VoiceLevel::default(),
            speech_sent: SpeechMean::default(),
            speech_received: SpeechMean::default(),
            processing_us: Vec::new(),
            video_frames_received: 0,
            video_frames_decoded: 0,
            video_frames_broken: 0,
            video_frames_repaired: 0,
            video_bytes_received: 0,
            first_decoded_at: None,
            last_decoded_at: None,
            latencies_us: Vec::new(),
            last_frame_number: None,
            strip_frames: 0,
            frames_out_of_order: 0,
            frozen_frames: 0,
            freezes: FreezeDetector::default(),
            timeline: Vec::new(),
            lost_frames: 0,
            psnr_db: Vec::new(),
            encode_us: Vec::new(),
            decode_us: Vec::new(),
            decoded_width: 0,
            decoded_height: 0,
            audio_frames_decoded: 0,
            audio_frames_concealed: 0,
            audio_jitter: Duration::ZERO,
            audio_jitter_target: Duration::ZERO,
            audio_jitter_stats: JitterStats::default(),
            audio_tail: VecDeque::new(),
            chat_sent: Vec::new(),
            chat_received: Vec::new(),
        }
    }
}

impl MediaStats {
    /// What the window shows of these figures.
    pub fn view(&self) -> super::handle::MediaView {
        super::handle::MediaView {
            video_frames_decoded: self.video_frames_decoded,
            decoded: (self.decoded_width, self.decoded_height),
            sent_resolution: self.sent_resolution,
            encoder_bitrate_bps: self.encoder_bitrate_bps,
            microphone_level: self.microphone_level,
            remote_voice: self.remote_voice,
            audio_jitter: self.audio_jitter,
            audio_jitter_target: self.audio_jitter_target,
        }
    }

    /// Adds a sample to the timeline, at most one a second.
    pub fn record_second(&mut self, peer: &PeerStats) {
        let t = self.started.elapsed();
        let last = self.timeline.last();
        if last.is_some_and(|l| t.as_secs_f64() - l.t_s < 0.99) {
            return;
        }
        let kbps = |now: u64, before: u64, secs: f64| {
            (secs > 0.0)
                .then(|| ((now.saturating_sub(before)) as f64 * 8.0 / secs / 1000.0).round())
        };
        let (secs, sent_before, received_before) = match last {
            Some(l) => (t.as_secs_f64() - l.t_s, l.bytes_sent, l.bytes_received),
            None => (0.0, 0, 0),
        };
        let sample = Second {
            t_s: (t.as_secs_f64() * 10.0).round() / 10.0,
            estimate_kbps: peer
                .estimate_bitrate_bps
                .map(|b| (b as f64 / 1000.0).round()),
            target_kbps: peer.target_bitrate_bps.map(|b| (b as f64 / 1000.0).round()),
            encoder_kbps: f64::from(self.encoder_bitrate_bps / 1000),
            sent_height: self.sent_resolution.1,
            sent_kbps: kbps(peer.bytes_sent, sent_before, secs),
            received_kbps: kbps(peer.bytes_received, received_before, secs),
            rtt_ms: peer.rtt_ms.map(|r| (r * 10.0).round() / 10.0),
            packets_lost: peer.packets_lost,
            nacks_sent: self.nacked_packets,
            retransmitted_packets: peer.retransmitted_packets,
            fec_packets_sent: peer.fec_packets_sent,
            fec_recovered: peer.fec_recovered,
            jitter_buffer_ms: self.audio_jitter.as_millis() as u64,
            plis_sent: peer.plis_sent,
            plis_received: peer.plis_received,
            keyframes_sent: self.keyframes_sent,
            frames_decoded: self.video_frames_decoded,
            frames_repaired: self.video_frames_repaired,
            frames_broken: self.video_frames_broken,
            freezes: self.freezes.count,
            bytes_sent: peer.bytes_sent,
            bytes_received: peer.bytes_received,
        };
        self.timeline.push(sample);
    }
}

/// One second of a call, for the report's timeline. Counters are totals so far.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Second {
    pub t_s: f64,
    /// The congestion controller's estimate for all media.
    pub estimate_kbps: Option<f64>,
    /// The sending target: the estimate capped at 1.5 x what was really sent.
    pub target_kbps: Option<f64>,
    /// What the video encoder is asked for.
    pub encoder_kbps: f64,
    /// The height of the pictures sent (the resolution ladder's step).
    pub sent_height: usize,
    /// Bytes on the wire (all media, headers, retransmissions) over the last second.
    pub sent_kbps: Option<f64>,
    pub received_kbps: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub packets_lost: u64,
    pub nacks_sent: u64,
    pub retransmitted_packets: u64,
    /// FlexFEC repair packets sent; lost packets rebuilt from the other side's FEC.
    pub fec_packets_sent: u64,
    pub fec_recovered: u64,
    /// Received audio waiting in the jitter buffer.
    pub jitter_buffer_ms: u64,
    pub plis_sent: u64,
    pub plis_received: u64,
    pub keyframes_sent: u64,
    pub frames_decoded: u64,
    pub frames_repaired: u64,
    pub frames_broken: u64,
    pub freezes: u64,
    #[serde(skip)]
    bytes_sent: u64,
    #[serde(skip)]
    bytes_received: u64,
}

/// Freezes as the WebRTC statistics spec defines them: a frame whose inter-frame delay
/// exceeds max(3 x the average, the average + 150 ms), the average taken over the last
/// 30 frames before it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FreezeDetector {
    last: Option<Instant>,
    recent: VecDeque<Duration>,
    pub count: u64,
    pub total: Duration,
    /// The longest single freeze.
    pub longest: Duration,
}

impl FreezeDetector {
    /// A frame was rendered (decoded) at `at`; returns the gap before it if that was a
    /// freeze.
    pub fn frame(&mut self, at: Instant) -> Option<Duration> {
        let mut freeze = None;
        if let Some(last) = self.last.replace(at) {
            let delay = at.saturating_duration_since(last);
            if !self.recent.is_empty() {
                let average = self.recent.iter().sum::<Duration>() / self.recent.len() as u32;
                if delay > (average * 3).max(average + Duration::from_millis(150)) {
                    self.count += 1;
                    self.total += delay;
                    self.longest = self.longest.max(delay);
                    freeze = Some(delay);
                }
            }
            self.recent.push_back(delay);
            if self.recent.len() > 30 {
                self.recent.pop_front();
            }
        }
        freeze
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
    /// The connection's round-trip time, for the receivers' repair waits.
    rtt: RttWatch,
    /// To the video encoder thread, once it runs.
    encoder_control: Option<std::sync::mpsc::Sender<EncoderControl>>,
    /// To the audio encoder thread: the loss (percent) the other side reports.
    audio_loss: Option<std::sync::mpsc::Sender<u8>>,
    threads: Vec<JoinHandle<()>>,
    /// The video encoder thread, which hands the frames channel back when it ends (a
    /// fresh peer connection starts another encoder on the same source).
    video_thread: Option<JoinHandle<std::sync::mpsc::Receiver<CapturedFrame>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipelines {
    pub fn new() -> Pipelines {
        Pipelines::default()
    }

    /// Tells the receivers the connection's current round-trip time.
    pub fn set_rtt(&self, rtt: Duration) {
        self.rtt.0.send_replace(rtt);
    }

    /// Stops every thread and task and waits for them. Returns the video frames channel
    /// (when a video sender ran and ended cleanly), so pipelines can start again.
    pub async fn stop(&mut self) -> Option<std::sync::mpsc::Receiver<CapturedFrame>> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let threads = std::mem::take(&mut self.threads);
        let video = self.video_thread.take();
        let frames = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            video.and_then(|t| t.join().ok())
        })
        .await
        .ok()
        .flatten();
        // Whatever starts next runs until its own stop.
        self.stop = Arc::new(AtomicBool::new(false));
        self.encoder_control = None;
        self.audio_loss = None;
        frames
    }

    /// Video: encode on a thread, write samples from a task; keyframe requests (PLI/FIR)
    /// and bitrate targets reach the encoder through one control channel.
    ///
    /// Frames come from a [`crate::media::capture::Capture`] through `frames`. When none
    /// come (the camera is off), a black frame of the last size goes out every 250 ms so
    /// the other side sees "no picture" instead of a frozen one.
    pub fn start_video_sender(
        &mut self,
        frames: std::sync::mpsc::Receiver<CapturedFrame>,
        settings: EncoderSettings,
        track: LocalTrack,
        pacer: PacerHandle,
        stats: StatsHandle,
    ) {
        let (tx, mut rx) = mpsc::channel::<(Bytes, Duration)>(8);
        let (control_tx, control) = std::sync::mpsc::channel::<EncoderControl>();
        self.encoder_control = Some(control_tx.clone());
        let stop = self.stop.clone();
        let thread_stats = stats.clone();
        let rtt = self.rtt.subscribe();
        // Chosen from the other side's description, which is applied before media starts.
        let codec = track.video_codec().unwrap_or_default();
        stats.lock().video_codec_sent = Some(codec);
        let spawned = std::thread::Builder::new()
            .name("duet-video-send".into())
            .spawn(move || {
                // The configured bitrate is the ceiling; the start is the congestion
                // controller's (the first second at the ceiling fills a thin link's queue).
                let start = EncoderSettings {
                    bitrate_bps: settings.bitrate_bps.min(video_bitrate_for(u64::from(
                        super::peer::INITIAL_BITRATE_BPS,
                    ))),
                    ..settings
                };
                let mut encoder = match codec.new_encoder(start) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, "video encoder");
                        return frames;
                    }
                };
                // Frames captured before the call connected are stale: skip them.
                while frames.try_recv().is_ok() {}
                // The capture instant of the last frame sent: a sample's duration is the
                // time between two captures, so RTP timestamps follow the capture clock.
                let mut last_capture = Instant::now();
                let mut keyframes = KeyframePacer::default();
                let mut size = (640, 360);
                // The resolution ladder starts with the first frame (the source's size).
                let mut ladder: Option<Ladder> = None;
                let mut scaler = Scaler::new();
                let mut next_due = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let (frame, captured_at) = match frames.recv_timeout(Duration::from_millis(250))
                    {
                        Ok(f) => {
                            size = (f.frame.width, f.frame.height);
                            (f.frame, f.captured_at)
                        }
                        Err(_) => (VideoFrame::black(size.0, size.1), Instant::now()),
                    };
                    let now = Instant::now();
                    let ladder = ladder.get_or_insert_with(|| {
                        Ladder::new(frame.height, settings.fps).starting_at(start.bitrate_bps)
                    });
                    for c in control.try_iter() {
                        let step = match c {
                            EncoderControl::Keyframe => {
                                keyframes.request(now, *rtt.borrow());
                                None
                            }
                            // The receiver's "send at most": the ladder hears it at once
                            // too (a keyframe it asks for with it takes the step down).
                            EncoderControl::Ceiling(bps) => {
                                if bps < encoder.settings().bitrate_bps {
                                    encoder.set_bitrate(bps);
                                }
                                (ladder.bitrate() == 0 || bps < ladder.bitrate())
                                    .then(|| ladder.update(bps, now))
                                    .flatten()
                            }
                            // The configured bitrate is the ceiling.
                            EncoderControl::Bitrate { target, estimate } => {
                                encoder.set_bitrate(target.min(settings.bitrate_bps));
                                ladder.update(estimate.min(settings.bitrate_bps), now)
                            }
                        };
                        if let Some(step) = step {
                            tracing::info!(
                                ?step,
                                bps = ladder.bitrate(),
                                "sending resolution/frame rate"
                            );
                            encoder.set_frame_rate(step.fps);
                        }
                    }
                    // A keyframe is due anyway: a step down that waits comes with it.
                    if keyframes.is_due(now)
                        && let Some(step) = ladder.keyframe_coming()
                    {
                        tracing::info!(
                            ?step,
                            bps = ladder.bitrate(),
                            "sending resolution/frame rate with the keyframe asked for"
                        );
                        encoder.set_frame_rate(step.fps);
                    }
                    // The pacer holds video while the cut path's queue drains: nothing
                    // made meanwhile could leave (a keyframe asked for waits for the end).
                    if pacer.video_paused(now) {
                        continue;
                    }
                    // Below the source's frame rate, frames are dropped evenly.
                    let step = ladder.step();
                    if step.fps < settings.fps {
                        if now + Duration::from_millis(5) < next_due {
                            continue;
                        }
                        let interval = Duration::from_secs_f32(1.0 / step.fps.max(1.0));
                        next_due = (next_due + interval).max(now + interval / 2);
                    }
                    let (w, h) = scaled_size((frame.width, frame.height), step.height);
                    let frame = match scaler.scale(frame, w, h) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!(error = %e, "scaling a frame");
                            continue;
                        }
                    };
                    thread_stats.lock().sent_resolution = (frame.width, frame.height);
                    if keyframes.take_due(now) {
                        encoder.request_keyframe();
                    }
                    let t0 = Instant::now();
                    let encoded = encoder.encode(&frame);
                    let took = t0.elapsed();
                    match encoded {
                        Ok(Some(au)) => {
                            if au.keyframe {
                                keyframes.sent(
                                    now,
                                    au.data.len(),
                                    u64::from(encoder.settings().bitrate_bps),
                                );
                            }
                            let mut s = thread_stats.lock();
                            s.encode_us.push(took.as_micros() as u32);
                            s.video_frames_sent += 1;
                            s.video_bytes_sent += au.data.len() as u64;
                            s.keyframes_sent += u64::from(au.keyframe);
                            s.encoder_bitrate_bps = encoder.settings().bitrate_bps;
                            drop(s);
                            // A skipped frame's duration is carried into the next sample.
                            let duration = captured_at.saturating_duration_since(last_capture);
                            last_capture = last_capture.max(captured_at);
                            if tx.blocking_send((Bytes::from(au.data), duration)).is_err() {
                                return frames;
                            }
                        }
                        Ok(None) => thread_stats.lock().video_frames_skipped += 1,
                        Err(e) => tracing::warn!(error = %e, "encoding a frame failed"),
                    }
                }
                frames
            });
        match spawned {
            Ok(t) => self.video_thread = Some(t),
            Err(e) => tracing::error!(error = %e, "cannot start the video thread"),
        }
        let writer_track = track.clone();
        self.tasks.push(tokio::spawn(async move {
            let Some(pt) = wait_payload_type(&writer_track).await else {
                tracing::error!(%codec, "no negotiated payload type for the video codec");
                return;
            };
            // The track's own packetizer is H.264's (see `Peer::choose_video_codec`); VP8
            // frames are packetized here (RFC 7741, with picture ids) and written as RTP.
            let mut vp8 = (codec == VideoCodec::Vp8).then(|| {
                let mut payloader = Vp8Payloader::default();
                payloader.enable_picture_id = true;
                new_packetizer(
                    Instant::now(),
                    VIDEO_MTU,
                    pt,
                    writer_track.ssrc,
                    Box::new(payloader),
                    Box::new(new_random_sequencer()),
                    90_000,
                )
            });
            while let Some((data, duration)) = rx.recv().await {
                if let Some(packetizer) = vp8.as_mut() {
                    let ticks = (duration.as_secs_f64() * 90_000.0) as u32;
                    let packets = match packetizer.packetize(Instant::now(), &data, ticks) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::debug!(error = %e, "packetizing a VP8 frame");
                            continue;
                        }
                    };
                    for packet in packets {
                        if let Err(e) = writer_track.track.write_rtp(packet).await {
                            tracing::debug!(error = %e, "writing a VP8 packet");
                        }
                    }
                    continue;
                }
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
        // PLI/FIR from the receiver: a keyframe, when the pacer allows.
        self.tasks.push(tokio::spawn(async move {
            while let Some(event) = track.track.poll().await {
                let TrackLocalEvent::OnRtcpPacket(packets) = event else {
                    continue;
                };
                // A REMB first: a keyframe asked for with it is made at the lower rate.
                let remb = packets.iter().find_map(|p| {
                    p.as_any()
                        .downcast_ref::<ReceiverEstimatedMaximumBitrate>()
                        .map(|r| r.bitrate)
                });
                if let Some(bps) = remb.filter(|b| b.is_finite() && *b > 0.0) {
                    let video = video_bitrate_for(bps as u64);
                    if control_tx.send(EncoderControl::Ceiling(video)).is_err() {
                        return;
                    }
                }
                if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                    stats.lock().keyframe_requests_received += 1;
                    if control_tx.send(EncoderControl::Keyframe).is_err() {
                        return;
                    }
                }
            }
        }));
    }

    /// The fraction of our packets the other side loses: Opus FEC is sized to it (with a
    /// little headroom: loss comes in bursts).
    pub fn set_remote_loss(&self, fraction: f64) {
        let percent = expected_loss_percent(fraction);
        if let Some(tx) = &self.audio_loss {
            let _ = tx.send(percent);
        }
    }

    /// The sending target and the congestion controller's estimate, for all media: the
    /// video encoder gets what is left of the target after audio and packet overhead; the
    /// resolution ladder follows the estimate (what the path carries), so a still picture
    /// that needs little is not also sent small.
    /// `fec` is the share of FEC repair packets sent along (they come out of the video's
    /// part).
    pub fn set_send_bitrate(&self, target_bps: u64, estimate_bps: u64, fec: f64) {
        let video = |bps: u64| {
            let share = f64::from(video_bitrate_for(bps)) / (1.0 + fec.clamp(0.0, 1.0));
            (share as u32).max(crate::media::h264::MIN_BITRATE_BPS)
        };
        if let Some(control) = &self.encoder_control {
            let _ = control.send(EncoderControl::Bitrate {
                target: video(target_bps),
                estimate: video(estimate_bps.max(target_bps)),
            });
        }
    }

    /// Audio: a 20 ms clock on a thread, Opus encode, write from a task. With a
    /// `processor`, the microphone is cleaned (echo, noise, gain) before encoding; the
    /// receiver feeds the same processor what goes to the speaker.
    /// While `muted` is set, silence is sent instead of the source (which keeps running,
    /// so unmuting is instant).
    pub fn start_audio_sender(
        &mut self,
        mut source: Box<dyn AudioSource>,
        processor: Option<Arc<Mutex<AudioProcessor>>>,
        muted: Arc<AtomicBool>,
        track: LocalTrack,
        stats: StatsHandle,
    ) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        let (loss_tx, loss) = std::sync::mpsc::channel::<u8>();
        self.audio_loss = Some(loss_tx);
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
                let mut meter = VoiceMeter::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut pcm = match source.next_frame() {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!(error = %e, "audio source failed");
                            return;
                        }
                    };
                    // Processed even while muted, so the echo canceller stays adapted.
                    let mut took = None;
                    if let Some(processor) = processor.as_ref() {
                        let mut processor =
                            processor.lock().unwrap_or_else(PoisonError::into_inner);
                        let t0 = Instant::now();
                        if let Err(e) = processor.process_capture(&mut pcm) {
                            tracing::warn!(error = %e, "audio processing (sent unprocessed)");
                        }
                        took = Some(t0.elapsed());
                    }
                    let mut level = meter.frame(&pcm);
                    let muted = muted.load(Ordering::Relaxed);
                    if muted {
                        pcm.fill(0);
                        level.speaking = false;
                    }
                    {
                        let mut s = stats.lock();
                        s.microphone_level = level;
                        s.speech_sent.add(level);
                        if let Some(took) = took
                            && s.processing_us.len() < MAX_TIMINGS
                        {
                            s.processing_us.push(took.as_micros() as u32);
                        }
                    }
                    if let Some(percent) = loss.try_iter().last()
                        && let Err(e) = encoder.set_expected_loss(percent)
                    {
                        tracing::warn!(error = %e, "setting Opus FEC");
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
        let (tx, rx) = std::sync::mpsc::sync_channel::<AccessUnit>(16);
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<()>();
        let stats = sinks.stats.clone();
        let mut rtt = self.rtt.subscribe();
        self.tasks.push(tokio::spawn(async move {
            let media_ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
            let codec = match track.codec(media_ssrc).await {
                Some(c) => VideoCodec::from_mime(&c.mime_type).unwrap_or_else(|| {
                    tracing::warn!(mime = %c.mime_type, "unexpected video codec; trying H.264");
                    VideoCodec::H264
                }),
                None => VideoCodec::H264,
            };
            tracing::info!(%codec, "receiving video");
            stats.lock().video_codec_received = Some(codec);
            let mut assembler = FrameAssembler::for_codec(codec);
            let mut arrival = ArrivalMonitor::new();
            // A burst's "send less", sent with the keyframe request that follows it.
            let mut burst_remb: Option<u64> = None;
            loop {
                let wake = assembler.poll_timeout();
                tokio::select! {
                    event = track.poll() => match event {
                        Some(TrackRemoteEvent::OnRtpPacket(packet)) => {
                            stats.lock().video_bytes_received += packet.payload.len() as u64;
                            let h = &packet.header;
                            // Our direction queued: ask the sender for what gets through.
                            if let Some(bps) =
                                arrival.push(Instant::now(), h.timestamp, packet.payload.len())
                            {
                                let remb = ReceiverEstimatedMaximumBitrate {
                                    sender_ssrc: 0,
                                    bitrate: bps as f32,
                                    ssrcs: vec![media_ssrc],
                                };
                                let sent = track.write_rtcp(vec![Box::new(remb)]).await;
                                stats.lock().rate_requests_sent += 1;
                                tracing::debug!(?sent, bps, queue = ?arrival.queue(), "REMB sent");
                            }
                            assembler.set_queue_delay(arrival.queue());
                            assembler.push(
                                h.sequence_number,
                                h.timestamp,
                                h.marker,
                                packet.payload,
                                Instant::now(),
                            );
                        }
                        Some(_) => continue,
                        None => break,
                    },
                    Some(()) = failed_rx.recv() => assembler.decoder_failed(Instant::now()),
                    _ = sleep_until(wake), if wake.is_some() => {}
                }
                // Measurements only (the watch starts with a guess) for the arrival monitor
                // and the assembler's empty-path round trip.
                let measured = rtt.has_changed().unwrap_or(false);
                let now_rtt = *rtt.borrow_and_update();
                assembler.set_rtt(now_rtt);
                if measured {
                    arrival.set_rtt(now_rtt);
                    assembler.rtt_measured(now_rtt);
                }
                let now = Instant::now();
                while let Some(out) = assembler.poll(now) {
                    match out {
                        Assembled::Frame(au) => {
                            stats.lock().video_frames_received += 1;
                            if tx.try_send(au).is_err() {
                                // The next frame needs this one: start again from a keyframe.
                                tracing::debug!("decoder busy; dropping an access unit");
                                assembler.decoder_failed(now);
                            }
                        }
                        Assembled::Nack(seqs) => {
                            let nack = TransportLayerNack {
                                sender_ssrc: 0,
                                media_ssrc,
                                nacks: nack_pairs_from_sequence_numbers(&seqs),
                            };
                            let sent = track.write_rtcp(vec![Box::new(nack)]).await;
                            tracing::trace!(?sent, ?seqs, loss = assembler.loss(), "NACK sent");
                        }
                        Assembled::BurstLost => burst_remb = Some(arrival.burst_request(now)),
                        Assembled::RequestKeyframe => {
                            let pli = PictureLossIndication {
                                sender_ssrc: 0,
                                media_ssrc,
                            };
                            let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::new();
                            if let Some(bps) = burst_remb.take() {
                                packets.push(Box::new(ReceiverEstimatedMaximumBitrate {
                                    sender_ssrc: 0,
                                    bitrate: bps as f32,
                                    ssrcs: vec![media_ssrc],
                                }));
                                stats.lock().rate_requests_sent += 1;
                                tracing::debug!(bps, "REMB sent with the burst's keyframe request");
                            }
                            packets.push(Box::new(pli));
                            let sent = track.write_rtcp(packets).await;
                            tracing::debug!(?sent, "keyframe request (PLI) sent");
                        }
                    }
                }
                let a = assembler.stats();
                let mut s = stats.lock();
                s.video_frames_broken = a.frames_dropped;
                s.video_frames_repaired = a.frames_repaired;
                s.keyframe_requests_sent = a.keyframe_requests;
                s.nacked_packets = a.nacked_packets;
            }
        }));
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name("duet-video-recv".into())
            .spawn(move || video_decode_loop(rx, sinks, stop, failed_tx));
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
            // Packets go into the jitter buffer as they come; a 20 ms clock takes
            // one frame out for the decoder (a late packet is waited for, as long as
            // the measured jitter calls for).
            let mut jitter = JitterBuffer::new();
            let mut voice = VoiceMeter::new();
            let mut clock = tokio::time::interval(Duration::from_millis(20));
            loop {
                let playout = tokio::select! {
                    event = track.poll() => {
                        let Some(event) = event else { break };
                        if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                            jitter.push(
                                Instant::now(),
                                packet.header.sequence_number,
                                packet.header.timestamp,
                                packet.payload.to_vec(),
                            );
                        }
                        continue;
                    }
                    _ = clock.tick() => jitter.pop(),
                };
                {
                    let mut s = sinks.stats.lock();
                    s.audio_jitter = jitter.delay();
                    s.audio_jitter_target = jitter.target();
                    s.audio_jitter_stats = jitter.stats();
                }
                let Some(playout) = playout else {
                    continue;
                };
                {
                    let (pcm, concealed) = match &playout {
                        Playout::Packet(p) => (decoder.decode(Some(p), false), false),
                        Playout::Lost { next: Some(n) } => (decoder.decode(Some(n), true), true),
                        Playout::Lost { next: None } | Playout::Stretch => {
                            (decoder.decode(None, false), true)
                        }
                    };
                    let Ok(pcm) = pcm else {
                        continue;
                    };
                    {
                        let mut s = sinks.stats.lock();
                        s.remote_voice = voice.frame(&pcm);
                        let heard = s.remote_voice;
                        s.speech_received.add(heard);
                        s.audio_frames_decoded += 1;
                        s.audio_frames_concealed += u64::from(concealed);
                        s.audio_tail.extend(pcm.iter().copied());
                        let excess = s.audio_tail.len().saturating_sub(SAMPLE_RATE as usize);
                        s.audio_tail.drain(..excess);
                    }
                    // The echo canceller hears what the speaker is about to play.
                    if let Some(processor) = sinks.far_end.as_ref() {
                        let mut processor =
                            processor.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Err(e) = processor.process_render(&pcm) {
                            tracing::debug!(error = %e, "far end for the echo canceller");
                        }
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

/// The test pattern the remote sends (see [`TestPattern`]), to measure the quality of
/// what arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedPattern {
    pub noisy: bool,
    /// The size the remote renders it at: pictures it scaled down for a thin link are
    /// not compared (a pattern rendered small is not the same picture).
    pub width: usize,
    pub height: usize,
}

/// What the video encoder is told while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderControl {
    /// The receiver lost a frame (PLI/FIR): send a keyframe.
    Keyframe,
    /// Encode at `target` bits per second from now on; choose the resolution for
    /// `estimate` (both the video's share).
    Bitrate { target: u32, estimate: u32 },
    /// The receiver asked for at most this (REMB, the video's share): encode at no more
    /// until the next `Bitrate`. It can come with a keyframe request (a burst was lost),
    /// and the keyframe must not be made at the rate from before.
    Ceiling(u32),
}

/// RTP packets of VP8 frames are at most this large (webrtc-rs's own packetizer's size,
/// which H.264 samples get).
const VIDEO_MTU: usize = 1200;

/// At most this many per-frame timings are kept for the report (an hour of 20 ms frames).
const MAX_TIMINGS: usize = 180_000;

/// Audio's share of the estimate: Opus at 32 kbit/s plus RTP/UDP/IP/SRTP headers on 50
/// packets a second.
const AUDIO_BUDGET_BPS: u64 = 56_000;

/// The video encoder's bitrate for a total estimate: audio's share off the top, then 10 %
/// for packet headers and retransmissions.
pub fn video_bitrate_for(total_bps: u64) -> u32 {
    let video = total_bps.saturating_sub(AUDIO_BUDGET_BPS) / 10 * 9;
    u32::try_from(video)
        .unwrap_or(u32::MAX)
        .max(crate::media::h264::MIN_BITRATE_BPS)
}

/// The loss Opus should expect (percent) for a measured loss fraction: a little above it
/// (loss comes in bursts), at least 1 % (FEC costs little when nothing is lost, and the
/// first loss is repaired), at most 25 %.
pub fn expected_loss_percent(fraction: f64) -> u8 {
    let percent = (fraction.clamp(0.0, 1.0) * 100.0 * 1.5).ceil() as u8;
    percent.clamp(1, 25)
}

/// Keyframes on request, but not back to back: a keyframe is many packets, and on a thin
/// link a second one right behind the first only makes the loss that asked for it worse.
/// - A request that comes less than a round trip, plus
///   [`KeyframePacer::IN_FLIGHT_MARGIN`], plus the time the keyframe takes to send at the
///   target rate (40 kB take most of a second at 400 kbit/s), after a keyframe left was
///   sent before that keyframe could have arrived: the keyframe on its way answers it,
///   and it is dropped. (If that keyframe is lost too, the receiver asks again once it
///   should have come.) Under congestion this is what stops a storm: the round trip is
///   long, and every lost frame of the queue asked for one.
/// - A request within [`KeyframePacer::MIN_INTERVAL`] of the last keyframe waits until
///   the interval is over (it is not dropped).
#[derive(Debug, Default)]
pub struct KeyframePacer {
    requested: bool,
    last: Option<Instant>,
    /// How long the last keyframe takes to send at the target rate.
    sending: Duration,
    answered: u64,
    /// Whether the stream's first keyframe has gone out.
    started: bool,
}

impl KeyframePacer {
    pub const MIN_INTERVAL: Duration = Duration::from_millis(300);
    pub const IN_FLIGHT_MARGIN: Duration = Duration::from_millis(30);
    /// A keyframe's sending time counts up to this (the pacer lets nothing wait longer
    /// than half a second, and a receiver whose keyframe was lost asks again).
    pub const MAX_SENDING: Duration = Duration::from_secs(1);

    /// A keyframe request arrived at `now`; `rtt` is the latest round trip.
    pub fn request(&mut self, now: Instant, rtt: Duration) {
        let in_flight = self.last.is_some_and(|t| {
            now.saturating_duration_since(t) < rtt + Self::IN_FLIGHT_MARGIN + self.sending
        });
        if in_flight {
            self.answered += 1;
            return;
        }
        self.requested = true;
    }

    /// Requests dropped because a keyframe was already on its way.
    pub fn answered_in_flight(&self) -> u64 {
        self.answered
    }

    /// Whether a keyframe is asked for and may be made now.
    pub fn is_due(&self, now: Instant) -> bool {
        self.requested
            && self
                .last
                .is_none_or(|t| now.saturating_duration_since(t) >= Self::MIN_INTERVAL)
    }

    /// Whether the next frame should be a keyframe (clears the request when it is).
    pub fn take_due(&mut self, now: Instant) -> bool {
        let due = self.is_due(now);
        if due {
            self.requested = false;
        }
        due
    }

    /// A keyframe of `bytes` went out (requested or not) while the target was `bps`.
    /// The stream's first keyframe holds no request off: its first packets can cross
    /// before the receiver listens (webrtc-rs drops RTP that arrives before it has made
    /// the remote track, seen on relayed set-ups), and a receiver that asks right after
    /// it has the rest of it and cannot decode it.
    pub fn sent(&mut self, now: Instant, bytes: usize, bps: u64) {
        if !std::mem::replace(&mut self.started, true) {
            return;
        }
        self.last = Some(now);
        self.sending =
            Duration::from_secs_f64(bytes as f64 * 8.0 / bps.max(1) as f64).min(Self::MAX_SENDING);
    }
}

/// The latest round-trip time, shared with the receive tasks.
#[derive(Clone)]
struct RttWatch(Arc<tokio::sync::watch::Sender<Duration>>);

impl Default for RttWatch {
    fn default() -> Self {
        RttWatch(Arc::new(tokio::sync::watch::Sender::new(
            Duration::from_millis(100),
        )))
    }
}

impl RttWatch {
    fn subscribe(&self) -> tokio::sync::watch::Receiver<Duration> {
        self.0.subscribe()
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
    /// When the remote sends the test pattern: compare decoded pixels with it.
    pub reference_pattern: Option<ExpectedPattern>,
    /// The microphone's echo canceller, told what the speaker plays (None: off).
    pub far_end: Option<Arc<Mutex<AudioProcessor>>>,
}

fn video_decode_loop(
    rx: std::sync::mpsc::Receiver<AccessUnit>,
    sinks: ReceiveSinks,
    stop: Arc<AtomicBool>,
    decoder_failed: mpsc::UnboundedSender<()>,
) {
    // Made for the codec of the first frame (the receive task learns it from the track).
    let mut decoder: Option<(VideoCodec, Box<dyn VideoDecoder>)> = None;
    let mut reference: Option<TestPattern> = None;
    let mut decoded = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let au = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(au) => au,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if decoder.as_ref().is_none_or(|(c, _)| *c != au.codec) {
            match au.codec.new_decoder() {
                Ok(d) => decoder = Some((au.codec, d)),
                Err(e) => {
                    tracing::error!(error = %e, codec = %au.codec, "video decoder");
                    return;
                }
            }
        }
        let Some((_, decoder)) = decoder.as_mut() else {
            continue;
        };
        let t0 = Instant::now();
        let frame = match decoder.decode(&au.data) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "undecodable access unit");
                let _ = decoder_failed.send(());
                continue;
            }
        };
        let took = t0.elapsed();
        let now = Instant::now();
        let strip = read_strip(&frame);
        let latency = strip.map(|s| wall_clock_us32().wrapping_sub(s.captured_us));
        // Re-rendering the reference costs as much as rendering the source, so quality
        // is sampled on every 10th frame to keep measuring cheaper than calling.
        // The reference is the pattern at the size the remote renders it; pictures the
        // sender scaled down for a thin link are not compared with it.
        let psnr = match (strip, sinks.reference_pattern) {
            (Some(s), Some(expected)) if decoded.is_multiple_of(10) => {
                let pattern = reference.get_or_insert_with(|| {
                    TestPattern::new(expected.width, expected.height, 30.0, expected.noisy)
                });
                let reference = pattern.render(s.frame_number);
                (reference.width == frame.width && reference.height == frame.height)
                    .then(|| psnr_luma(&reference, &frame, pattern.content_top()))
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
            if let Some(gap) = s.freezes.frame(now) {
                tracing::debug!(?gap, keyframe = au.keyframe, "video froze");
            }
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
            slot.put(frame.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_is_a_gap_well_beyond_the_average_frame_interval() {
        let t = Instant::now();
        let mut f = FreezeDetector::default();
        let mut at = t;
        for _ in 0..30 {
            at += Duration::from_millis(33);
            f.frame(at);
        }
        at += Duration::from_millis(150); // < avg + 150 ms: jitter, not a freeze
        f.frame(at);
        assert_eq!(f.count, 0);
        at += Duration::from_millis(400);
        f.frame(at);
        assert_eq!(f.count, 1);
        assert_eq!(f.total, Duration::from_millis(400));
        for _ in 0..30 {
            at += Duration::from_millis(33);
            f.frame(at);
        }
        at += Duration::from_millis(250);
        f.frame(at);
        assert_eq!(f.count, 2);
        assert_eq!(f.total, Duration::from_millis(650));
        assert_eq!(f.longest, Duration::from_millis(400));
    }

    #[test]
    fn keyframe_requests_are_spaced_and_those_a_keyframe_in_flight_answers_are_dropped() {
        let start = Instant::now();
        let t = start + Duration::from_secs(10);
        let rtt = Duration::from_millis(100);
        let mut k = KeyframePacer::default();
        k.sent(start, 1000, 8_000_000); // the stream's first
        assert!(!k.take_due(t), "no request, no keyframe");
        k.request(t, rtt);
        assert!(k.take_due(t));
        // A small keyframe on a fast link: 1 kB at 8 Mbit/s takes 1 ms to send.
        k.sent(t, 1000, 8_000_000);
        assert!(!k.take_due(t), "one request, one keyframe");
        // Sent before the keyframe could have arrived: answered by it.
        k.request(t + Duration::from_millis(80), rtt);
        assert!(!k.take_due(t + KeyframePacer::MIN_INTERVAL));
        assert_eq!(k.answered_in_flight(), 1);
        // After a round trip: the keyframe was lost too, or something after it.
        let later = t + Duration::from_millis(200);
        k.request(later, rtt);
        assert!(!k.take_due(later), "too soon after the last one");
        assert!(
            k.take_due(t + KeyframePacer::MIN_INTERVAL),
            "but not forgotten"
        );
        k.sent(t + KeyframePacer::MIN_INTERVAL, 1000, 8_000_000);
        assert!(!k.take_due(t + KeyframePacer::MIN_INTERVAL * 3));
        // A long round trip (a queue) holds requests off for longer.
        let queued = Duration::from_millis(600);
        k.request(t + KeyframePacer::MIN_INTERVAL * 3, queued);
        assert_eq!(k.answered_in_flight(), 2);
        // So does a big keyframe on a thin link: 40 kB at 400 kbit/s takes 0.8 s to send.
        let big = t + Duration::from_secs(5);
        k.sent(big, 40_000, 400_000);
        k.request(big + Duration::from_millis(700), rtt);
        assert_eq!(k.answered_in_flight(), 3);
        k.request(big + Duration::from_millis(950), rtt);
        assert!(k.take_due(big + Duration::from_millis(950)));
    }

    #[test]
    fn a_request_right_after_the_streams_first_keyframe_is_answered_at_once() {
        // The first keyframe's first packets can cross before the receiver listens; a
        // receiver that asks at once has seen the rest of it and cannot decode it.
        let t = Instant::now();
        let rtt = Duration::from_millis(100);
        let mut k = KeyframePacer::default();
        k.sent(t, 60_000, 800_000);
        let soon = t + Duration::from_millis(50);
        k.request(soon, rtt);
        assert!(k.take_due(soon));
        assert_eq!(k.answered_in_flight(), 0);
        // The second keyframe counts as usual.
        k.sent(soon, 60_000, 800_000);
        k.request(soon + Duration::from_millis(50), rtt);
        assert_eq!(k.answered_in_flight(), 1);
    }

    #[test]
    fn opus_expects_a_little_more_loss_than_measured() {
        assert_eq!(expected_loss_percent(0.0), 1);
        assert_eq!(expected_loss_percent(0.02), 3);
        assert_eq!(expected_loss_percent(0.1), 15);
        assert_eq!(expected_loss_percent(0.9), 25);
        assert_eq!(expected_loss_percent(f64::NAN), 1);
    }

    #[test]
    fn video_gets_the_estimate_minus_audio_and_overhead() {
        assert_eq!(video_bitrate_for(1_056_000), 900_000);
        assert_eq!(video_bitrate_for(0), crate::media::h264::MIN_BITRATE_BPS);
        assert_eq!(video_bitrate_for(u64::MAX), u32::MAX);
        assert_eq!(video_bitrate_for(3_000_000), 2_649_600);
    }
}
