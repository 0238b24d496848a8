//! `MediaPacer`: the send pacer of a Duet call, an interceptor in webrtc-rs's chain at the
//! pacer's slot (between the NACK responder and TWCC numbering).
//!
//! Why not the crate's own pacer: it keeps one queue for everything and releases at
//! exactly the estimate, so a keyframe (dozens of packets) holds the audio behind it for
//! hundreds of milliseconds on a thin link. libwebrtc's choices are taken instead:
//! - audio is not paced: its packets (small, 50 a second) pass at once, so video can
//!   never starve it;
//! - video leaves at 2.5 x the congestion controller's estimate (a frame's packets are
//!   spread, not held a whole frame interval), except just after the path's rate was cut
//!   ([`CUT_PACING_FACTOR`]): the bottleneck's queue is full then, and a 2.5 x burst is
//!   dropped at its tail;
//! - no video packet waits longer than [`MAX_QUEUE_TIME`]: one that has is released
//!   whatever the budget (a queue that grows without end is only latency).
//!
//! - the estimate may not run far ahead of what is really sent (libwebrtc caps its
//!   estimate at 1.5 x the acknowledged rate): webrtc-rs's GCC keeps raising its estimate
//!   while a still picture needs 300 kbit/s, and the first keyframe after that is paced
//!   at 2.5 x an estimate of several Mbit/s into a 1 Mbit/s link, tail-dropped, asked for
//!   again: a keyframe storm. The capped estimate is the sending target; it paces the
//!   video here and is published ([`PacerHandle`]) for the encoder;
//! - the receiver's REMB ("send at most this", `media::arrival`: our direction is queued)
//!   is a ceiling for [`REMB_HOLD`];
//! - a standing queue is not allowed to stay ([`QueueGuard`]): GCC's delay detector sees
//!   a queue while it grows, not once it is full (a full queue's delay no longer rises),
//!   so a round trip 100 ms above the path's minimum puts a ceiling on the target that
//!   drains it, then lifts slowly.
//!
//! - a keyframe makes everything queued before it useless (a receiver decodes from a
//!   keyframe on, and jumps to a whole one: `media::assembler`): when one enters the queue,
//!   the older video packets and retransmissions still waiting are dropped, and later
//!   retransmissions of packets from before it are refused. On a link that has just
//!   narrowed, that queue is what keeps the bottleneck full; the keyframe asked for to
//!   end a freeze would otherwise wait behind it (or be dropped at its tail).
//!
//! - a REMB far below the rate sent is a cut of the path under us ([`DrainPause`]): video
//!   is held (and the encoder makes none) for a moment, so the bottleneck's queue, full
//!   of what was sent at the old rate, drains before the next frame, the keyframe the
//!   receiver asks for included.
//!
//! Packets leave with their release instant as `now`, so the congestion controller's send
//! history records when they really left.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::sansio::Protocol;
use rtc::shared::marshal::MarshalSize as _;

use crate::media::assembler::starts_keyframe_of;
use crate::media::codec::VideoCodec;

/// Video leaves this many times faster than the estimate (libwebrtc's pacing factor).
pub const PACING_FACTOR: f64 = 2.5;
/// ... but only this much faster for [`CUT_HOLD`] after the path's rate was cut: the
/// queue at the bottleneck is full then, and a burst at 2.5 x (a keyframe at a new
/// resolution, retransmissions) is tail-dropped whole, asked for again, dropped again.
pub const CUT_PACING_FACTOR: f64 = 1.2;
pub const CUT_HOLD: Duration = Duration::from_secs(2);
/// A fall of the path's rate by more than this share is a cut (not an estimate's jitter).
const CUT_SHARE: f64 = 0.85;
/// The most video the queue may hold, in time at the current rate.
pub const MAX_QUEUE_TIME: Duration = Duration::from_millis(500);
/// The sending target is at most this many times the rate really sent in the last
/// [`SENT_RATE_WINDOW`], plus [`APP_LIMITED_HEADROOM_BPS`] (room to grow into).
pub const APP_LIMITED_FACTOR: f64 = 1.5;
pub const APP_LIMITED_HEADROOM_BPS: f64 = 100_000.0;
/// The cap never goes below this: a still or black picture must not make the next
/// keyframe crawl out.
pub const APP_LIMITED_FLOOR_BPS: f64 = 300_000.0;
pub const SENT_RATE_WINDOW: Duration = Duration::from_secs(1);
/// A REMB is a ceiling for this long (the receiver repeats it while the queue stands).
pub const REMB_HOLD: Duration = Duration::from_millis(1500);
/// At most this many packets are queued; more are refused (the NACK responder still has
/// them, so a refused packet is repaired like a lost one).
const MAX_QUEUED_PACKETS: usize = 4096;

/// A leaky bucket of bits: refilled at a rate, capped at one burst, and never more than one
/// burst in debt (an overdue release may overdraw it, but must not silence the pacer for
/// seconds afterwards: a debt that deep is how a standing queue forms).
#[derive(Debug, Clone)]
struct Bucket {
    rate_bps: f64,
    bits: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn burst(&self) -> f64 {
        // 40 ms at the current rate, but at least two full packets.
        (self.rate_bps * 0.04).max(2.0 * 1500.0 * 8.0)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.bits = (self.bits + elapsed * self.rate_bps).min(self.burst());
        }
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }

    fn can_release(&self) -> bool {
        self.bits > 0.0
    }

    fn consume(&mut self, bits: f64) {
        self.bits = (self.bits - bits).max(-self.burst());
    }

    /// When the budget is positive again.
    fn releasable_at(&self) -> Option<Instant> {
        let at = self.at?;
        if self.bits > 0.0 {
            return Some(at);
        }
        let wait = (-self.bits + 1.0) / self.rate_bps.max(1.0);
        Some(at + Duration::from_secs_f64(wait))
    }
}

/// The bits sent in the last [`SENT_RATE_WINDOW`].
#[derive(Debug, Default)]
struct SentRate {
    window: VecDeque<(Instant, f64)>,
    bits: f64,
    first: Option<Instant>,
}

impl SentRate {
    fn record(&mut self, now: Instant, bits: f64) {
        self.first.get_or_insert(now);
        self.window.push_back((now, bits));
        self.bits += bits;
    }

    /// Bits per second over the window; None until a whole window has been seen.
    fn bps(&mut self, now: Instant) -> Option<f64> {
        while let Some(&(at, bits)) = self.window.front() {
            if now.saturating_duration_since(at) <= SENT_RATE_WINDOW {
                break;
            }
            self.bits -= bits;
            self.window.pop_front();
        }
        let since = now.saturating_duration_since(self.first?);
        (since >= SENT_RATE_WINDOW).then(|| self.bits.max(0.0) / SENT_RATE_WINDOW.as_secs_f64())
    }
}

/// The pacer seen from outside the interceptor chain: the sending target it works with,
/// and a ceiling put on it ([`QueueGuard`]); bits per second, 0 for none.
#[derive(Debug, Clone, Default)]
pub struct PacerHandle {
    target: Arc<AtomicU64>,
    ceiling: Arc<AtomicU64>,
    remb: Arc<AtomicU64>,
    /// Until when video is held ([`DrainPause`]).
    paused_until: Arc<Mutex<Option<Instant>>>,
}

impl PacerHandle {
    pub fn target_bps(&self) -> Option<u64> {
        Some(self.target.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    pub fn set_ceiling(&self, bps: Option<u64>) {
        self.ceiling.store(bps.unwrap_or(0), Ordering::Relaxed);
    }

    /// The receiver's REMB while it holds, if any.
    pub fn remb_bps(&self) -> Option<f64> {
        Some(self.remb.load(Ordering::Relaxed))
            .filter(|&b| b > 0)
            .map(|b| b as f64)
    }

    /// Whether video is held at `now` ([`DrainPause`]): a frame made now could not leave.
    pub fn video_paused(&self, now: Instant) -> bool {
        self.paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| now < until)
    }

    /// The ceiling put on the target, if any.
    pub fn ceiling_bps(&self) -> Option<f64> {
        Some(self.ceiling.load(Ordering::Relaxed))
            .filter(|&b| b > 0)
            .map(|b| b as f64)
    }
}

/// A pause of the video after a sudden cut of the path's rate, so that the bottleneck's
/// queue drains before the next frame (see PERFORMANCE.md, the `step` row).
///
/// When a link narrows under a sender, its queue fills within a fraction of a second and
/// tail-drops until feedback arrives (the receiver's REMB and keyframe request, which
/// cross the receiver's own uplink first). By then the queue is full of what was sent at
/// the old rate, and whatever is sent next waits behind it or is dropped at its tail, the
/// keyframe asked for to end the freeze included; a sender that only slows to the new
/// rate keeps that queue standing for seconds. So when a REMB comes in far below the rate
/// sent ([`DrainPause::SHARE`]), video is held for [`DrainPause::HOLD`] (about what a
/// bottleneck's buffer holds) and the encoder makes none; audio still passes. A keyframe
/// asked for meanwhile is made when the pause ends, into an emptied queue, and arrives no
/// later than it would have behind the full one. The cost when nothing was lost: a gap
/// of [`DrainPause::HOLD`] in frames that the queue delayed anyway.
#[derive(Debug, Default)]
pub struct DrainPause {
    until: Option<Instant>,
}

impl DrainPause {
    /// A REMB below this share of the rate sent is a cut (not an estimate's jitter or a
    /// gentle correction: those come with a queue that the rate sent has just built).
    pub const SHARE: f64 = 0.4;
    pub const HOLD: Duration = Duration::from_millis(300);
    /// No second pause this soon after one: the receiver repeats its REMB while its queue
    /// drains, and the rate sent still counts the time before the cut.
    pub const REARM: Duration = Duration::from_secs(2);

    /// A REMB of `remb_bps` arrived at `now`; `sent_bps` is the rate sent over the last
    /// [`SENT_RATE_WINDOW`] (None: not known yet). True when it starts a pause.
    pub fn remb(&mut self, now: Instant, remb_bps: f64, sent_bps: Option<f64>) -> bool {
        let rearmed = self
            .until
            .is_none_or(|until| now.saturating_duration_since(until) >= Self::REARM);
        let cut = sent_bps.is_some_and(|sent| remb_bps < sent * Self::SHARE);
        if rearmed && cut {
            self.until = Some(now + Self::HOLD);
        }
        rearmed && cut
    }

    /// When the pause ends, if one was ever started.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Whether video is held at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}

/// How far above the path's minimum round trip a standing queue is not tolerated.
pub const QUEUE_LIMIT: Duration = Duration::from_millis(100);
/// The minimum round trip is taken over this many samples (a new path, e.g. after a
/// move, has a new minimum).
const MIN_RTT_SAMPLES: usize = 60;

/// After a queue drained, the ceiling climbs from the rate that drained it by this much a
/// second (or [`RECOVERY_GROWTH`] of itself, if more), and only while the sender uses
/// most of it (GCC's increase near its last decrease, and libwebrtc's rule that an
/// estimate does not grow while the sender is application-limited): the next probe of
/// the link's rate is gentle instead of another 1.5x-a-second climb into the same queue.
const RECOVERY_BPS_PER_SEC: f64 = 60_000.0;
const RECOVERY_GROWTH: f64 = 0.08;
/// Well above the rate that built the last queue (1.2 x), the link has likely changed
/// (a better Wi-Fi, a faster route): the ceiling grows by this share of itself a second.
const RECOVERY_GROWTH_ABOVE_KNEE: f64 = 0.25;
/// "Uses most of it": the rate sent is at least this share of the ceiling.
const RECOVERY_USE: f64 = 0.75;

/// Watches the round trip for a standing queue (see the module docs): round-trip samples
/// and the rate sent in, a ceiling for the target out.
/// - A queue appears (round trip > minimum + [`QUEUE_LIMIT`]): the ceiling is 0.7 x the
///   rate sent over the last second (what entered the queue is more than the link
///   carries).
/// - It has not started to shrink a second later: 0.7 x again (a drain, BBR-style).
/// - It is gone: the ceiling stays at the rate that drained it and climbs while used:
///   slowly up to a little above the rate that built the queue (the knee), faster beyond
///   (above the congestion controller's estimate it no longer matters).
/// - A receiver's REMB below the ceiling (a link cut under us: the REMB, not the ceiling,
///   drained that queue) lowers it: when the REMB lapses, the target climbs from what
///   drained the queue instead of jumping back to a ceiling the cut link never carried
///   and filling its queue again.
#[derive(Debug, Default)]
pub struct QueueGuard {
    samples: VecDeque<Duration>,
    ceiling: Option<f64>,
    /// Whether a queue stands (since the last sample).
    queue: bool,
    /// The rate sent when the last queue was found.
    knee: f64,
    last: Option<Instant>,
    /// When the ceiling was last cut (a drain shows only after a while).
    cut_at: Option<Instant>,
    /// Bytes sent so far, over the last [`SENT_RATE_WINDOW`].
    sent: VecDeque<(Instant, u64)>,
}

/// A standing queue's ceiling is cut again at most this often: the round trip needs
/// about this long to show that a cut drains it.
const CUT_EVERY: Duration = Duration::from_secs(1);

impl QueueGuard {
    /// A new round-trip sample at `now`, the bytes sent so far (all media) and the
    /// receiver's REMB while it holds; returns the ceiling to apply (None: none).
    pub fn update(
        &mut self,
        now: Instant,
        rtt: Duration,
        bytes_sent: u64,
        remb_bps: Option<f64>,
    ) -> Option<f64> {
        let ceiling = self.follow_rtt(now, rtt, bytes_sent);
        if let (Some(c), Some(remb)) = (ceiling, remb_bps)
            && remb < c
        {
            self.ceiling = Some(remb.max(APP_LIMITED_FLOOR_BPS / 3.0));
        }
        self.ceiling
    }

    fn follow_rtt(&mut self, now: Instant, rtt: Duration, bytes_sent: u64) -> Option<f64> {
        self.sent.push_back((now, bytes_sent));
        while self
            .sent
            .get(1)
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= SENT_RATE_WINDOW)
        {
            self.sent.pop_front();
        }
        let sent_bps = match (self.sent.front(), self.sent.back()) {
            (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
                b1.saturating_sub(b0) as f64 * 8.0 / (t1 - t0).as_secs_f64()
            }
            _ => return self.ceiling,
        };
        let previous = self.samples.back().copied();
        let elapsed = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        self.last = Some(now);
        if self.samples.len() == MIN_RTT_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(rtt);
        let min = self.samples.iter().min().copied().unwrap_or(rtt);
        let floor = APP_LIMITED_FLOOR_BPS / 3.0;
        if rtt > min + QUEUE_LIMIT {
            let draining = previous.is_some_and(|p| rtt < p);
            let may_cut = self
                .cut_at
                .is_none_or(|at| now.saturating_duration_since(at) >= CUT_EVERY);
            let ceiling = match (self.queue, self.ceiling) {
                (true, Some(c)) if draining || !may_cut => c,
                (true, Some(c)) => {
                    self.cut_at = Some(now);
                    c * 0.7
                }
                _ => {
                    self.knee = sent_bps;
                    self.cut_at = Some(now);
                    sent_bps * 0.7
                }
            };
            self.ceiling = Some(ceiling.max(floor));
            self.queue = true;
            return self.ceiling;
        }
        if std::mem::take(&mut self.queue) {
            // Just drained: the ceiling that drained it stays for now.
        } else if let Some(c) = self.ceiling
            && sent_bps >= c * RECOVERY_USE
        {
            let step = if c > self.knee * 1.2 {
                c * RECOVERY_GROWTH_ABOVE_KNEE
            } else {
                (c * RECOVERY_GROWTH).max(RECOVERY_BPS_PER_SEC)
            };
            self.ceiling = Some(c + step * elapsed.as_secs_f64());
        }
        self.ceiling
    }
}

pub struct MediaPacer {
    bucket: Bucket,
    /// The congestion controller's latest estimate, bits per second.
    estimate_bps: f64,
    /// The estimate capped by what is really sent (see the module docs).
    target_bps: f64,
    /// What the path carries as far as we know (estimate, ceiling, REMB), and until when
    /// video is paced gently after that was cut.
    path_bps: f64,
    cut_until: Option<Instant>,
    sent: SentRate,
    /// The receiver's last REMB and until when it holds.
    remb: Option<(f64, Instant)>,
    drain: DrainPause,
    handle: PacerHandle,
    audio_ssrcs: HashSet<u32>,
    /// Video streams (H.264, VP8) by their SSRC, and the RTX SSRC of each.
    h264: HashMap<u32, H264Stream>,
    rtx_of: HashMap<u32, u32>,
    /// Queued video; each packet's `now` is when it was queued.
    video: VecDeque<TaggedPacket>,
    /// Ready to leave: RTCP, audio, and released video, in order.
    out: VecDeque<TaggedPacket>,
    read: VecDeque<TaggedPacket>,
    refused: u64,
    /// Video packets dropped or refused because a keyframe made them useless.
    superseded: u64,
}

/// What the pacer follows of an H.264 stream.
#[derive(Debug, Default)]
struct H264Stream {
    /// H.264 or VP8 (the name is history: keyframes are found in both).
    codec: VideoCodec,
    rtx: Option<u32>,
    /// The timestamp of the last frame queued.
    last_timestamp: Option<u32>,
    /// The sequence number the last keyframe starts at.
    keyframe_start: Option<u16>,
}

impl MediaPacer {
    pub fn new(initial_bps: f64) -> MediaPacer {
        MediaPacer {
            bucket: Bucket {
                rate_bps: initial_bps * PACING_FACTOR,
                bits: initial_bps * PACING_FACTOR * 0.04,
                at: None,
            },
            estimate_bps: initial_bps,
            target_bps: initial_bps,
            path_bps: initial_bps,
            cut_until: None,
            sent: SentRate::default(),
            remb: None,
            drain: DrainPause::default(),
            handle: PacerHandle::default(),
            audio_ssrcs: HashSet::new(),
            h264: HashMap::new(),
            rtx_of: HashMap::new(),
            video: VecDeque::new(),
            out: VecDeque::new(),
            read: VecDeque::new(),
            refused: 0,
            superseded: 0,
        }
    }

    fn bits_of(packet: &TaggedPacket) -> f64 {
        match &packet.message.packet {
            Packet::Rtp(rtp) => (rtp.marshal_size() * 8) as f64,
            _ => 0.0,
        }
    }

    /// Where the sending target can be read.
    pub fn handle(&self) -> PacerHandle {
        self.handle.clone()
    }

    /// The sending target: the estimate, capped by what was really sent lately.
    pub fn target_bps(&self) -> f64 {
        self.target_bps
    }

    fn update_target(&mut self, now: Instant) {
        let target = match self.sent.bps(now) {
            Some(sent) => self.estimate_bps.min(
                (sent * APP_LIMITED_FACTOR + APP_LIMITED_HEADROOM_BPS).max(APP_LIMITED_FLOOR_BPS),
            ),
            None => self.estimate_bps,
        };
        let remb = self
            .remb
            .filter(|&(_, until)| now < until)
            .map(|(bps, _)| bps.max(APP_LIMITED_FLOOR_BPS / 3.0));
        self.handle
            .remb
            .store(remb.map_or(0, |b| b.round() as u64), Ordering::Relaxed);
        let ceiling = [self.handle.ceiling_bps(), remb]
            .into_iter()
            .flatten()
            .reduce(f64::min);
        self.target_bps = ceiling.map_or(target, |c| target.min(c));
        let path = ceiling.map_or(self.estimate_bps, |c| self.estimate_bps.min(c));
        if path < self.path_bps * CUT_SHARE {
            self.cut_until = Some(now + CUT_HOLD);
        }
        self.path_bps = path;
        self.handle
            .target
            .store(self.target_bps.round() as u64, Ordering::Relaxed);
    }

    /// How much faster than the target video leaves now.
    pub fn pacing_factor(&self, now: Instant) -> f64 {
        if self.cut_until.is_some_and(|until| now < until) {
            CUT_PACING_FACTOR
        } else {
            PACING_FACTOR
        }
    }

    /// Video packets waiting.
    pub fn queued(&self) -> usize {
        self.video.len()
    }

    /// Video packets refused because the queue was full.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Video packets dropped or refused because a later keyframe made them useless.
    pub fn superseded(&self) -> u64 {
        self.superseded
    }

    /// Whether a video packet may still be queued (see the module docs on keyframes);
    /// a keyframe's first packet drops what waits before it.
    fn admit(&mut self, rtp: &rtc::rtp::Packet) -> bool {
        let ssrc = rtp.header.ssrc;
        if let Some(&media) = self.rtx_of.get(&ssrc) {
            // A retransmission: its payload starts with the original sequence number.
            let start = self.h264.get(&media).and_then(|s| s.keyframe_start);
            let original = rtp
                .payload
                .get(..2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]));
            return match (start, original) {
                (Some(k), Some(o)) => (o.wrapping_sub(k) as i16) >= 0,
                _ => true,
            };
        }
        let Some(stream) = self.h264.get_mut(&ssrc) else {
            return true;
        };
        let timestamp = rtp.header.timestamp;
        let new_frame = stream.last_timestamp != Some(timestamp);
        stream.last_timestamp = Some(timestamp);
        if new_frame && starts_keyframe_of(stream.codec, &rtp.payload) {
            stream.keyframe_start = Some(rtp.header.sequence_number);
            let rtx = stream.rtx;
            let before = self.video.len();
            self.video.retain(|p| match &p.message.packet {
                Packet::Rtp(q) => q.header.ssrc != ssrc && Some(q.header.ssrc) != rtx,
                _ => true,
            });
            let dropped = before - self.video.len();
            if dropped > 0 {
                tracing::debug!(dropped, "queued video dropped for a keyframe");
                self.superseded += dropped as u64;
            }
        }
        true
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for MediaPacer {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        // The congestion controller (wire-ward of us) marks its estimate on inbound
        // feedback; this is where it can reach the pacer.
        if let Some(Attribute::TargetBitrateChanged { bits_per_second }) =
            msg.message.get(&Attribute::TargetBitrateChanged {
                bits_per_second: 0.0,
            })
        {
            self.estimate_bps = *bits_per_second;
            self.update_target(msg.now);
        }
        if let Packet::Rtcp(packets) = &msg.message.packet
            && let Some(remb) = packets
                .iter()
                .find_map(|p| p.as_any().downcast_ref::<ReceiverEstimatedMaximumBitrate>())
            && remb.bitrate.is_finite()
            && remb.bitrate > 0.0
        {
            let bps = f64::from(remb.bitrate);
            let sent = self.sent.bps(msg.now);
            if self.drain.remb(msg.now, bps, sent) {
                tracing::info!(
                    remb_bps = bps.round(),
                    sent_bps = sent.unwrap_or(0.0).round(),
                    pause_ms = DrainPause::HOLD.as_millis(),
                    "video paused: the path was cut, its queue drains"
                );
                *self
                    .handle
                    .paused_until
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = self.drain.until();
            }
            self.remb = Some((bps, msg.now + REMB_HOLD));
            self.update_target(msg.now);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        // Only video RTP is paced; audio and RTCP (feedback is only useful fresh) pass.
        let audio = match &msg.message.packet {
            Packet::Rtp(rtp) => self.audio_ssrcs.contains(&rtp.header.ssrc),
            _ => true,
        };
        if audio {
            self.sent.record(msg.now, Self::bits_of(&msg));
            self.out.push_back(msg);
            return Ok(());
        }
        if let Packet::Rtp(rtp) = &msg.message.packet
            && !self.admit(rtp)
        {
            self.superseded += 1;
            return Ok(());
        }
        if self.video.len() >= MAX_QUEUED_PACKETS {
            self.refused += 1;
            return Ok(());
        }
        self.video.push_back(msg);
        self.handle_timeout_at(None);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.out.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.handle_timeout_at(Some(now));
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let head = self.video.front()?;
        // Nothing leaves before a pause ends (not even an overdue packet). The bucket's
        // last refill is the latest time the pacer was given: once that reached the end,
        // the pause is over (returning its end again would wake the pacer for nothing).
        if let Some(until) = self.drain.until()
            && self.bucket.at.is_none_or(|at| at < until)
        {
            return Some(until);
        }
        let deadline = head.now + MAX_QUEUE_TIME;
        Some(
            self.bucket
                .releasable_at()
                .map_or(deadline, |t| t.min(deadline)),
        )
    }
}

impl MediaPacer {
    /// Releases what the budget allows; `now` None: the newest queued packet's time.
    fn handle_timeout_at(&mut self, now: Option<Instant>) {
        let Some(now) = now.or_else(|| self.video.back().map(|p| p.now)) else {
            return;
        };
        self.update_target(now);
        self.bucket.rate_bps = self.target_bps * self.pacing_factor(now);
        self.bucket.refill(now);
        if self.drain.holds(now) {
            return;
        }
        while let Some(head) = self.video.front() {
            let bits = Self::bits_of(head);
            let overdue = now >= head.now + MAX_QUEUE_TIME;
            if !overdue && !self.bucket.can_release() {
                break;
            }
            let Some(mut packet) = self.video.pop_front() else {
                break;
            };
            self.bucket.consume(bits);
            self.sent.record(now, bits);
            packet.now = now;
            self.out.push_back(packet);
        }
    }
}

impl Interceptor for MediaPacer {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        let mime = info.mime_type.to_ascii_lowercase();
        if mime.starts_with("audio/") {
            self.audio_ssrcs.insert(info.ssrc);
        } else if let Some(codec) = VideoCodec::from_mime(&mime) {
            self.h264.insert(
                info.ssrc,
                H264Stream {
                    codec,
                    rtx: info.ssrc_rtx,
                    ..H264Stream::default()
                },
            );
            if let Some(rtx) = info.ssrc_rtx {
                self.rtx_of.insert(rtx, info.ssrc);
            }
        }
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.audio_ssrcs.remove(&info.ssrc);
        if let Some(stream) = self.h264.remove(&info.ssrc)
            && let Some(rtx) = stream.rtx
        {
            self.rtx_of.remove(&rtx);
        }
    }

    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::AttributedPacket;

    fn rtp(ssrc: u32, seq: u16, size: usize, now: Instant) -> TaggedPacket {
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                ssrc,
                sequence_number: seq,
                ..Default::default()
            },
            payload: bytes::Bytes::from(vec![0u8; size]),
        };
        TaggedPacket {
            now,
            transport: Default::default(),
            message: AttributedPacket::from(Packet::Rtp(packet)),
        }
    }

    fn bind(p: &mut MediaPacer, ssrc: u32, mime: &str) {
        p.bind_local_stream(&StreamInfo {
            ssrc,
            mime_type: mime.into(),
            ..Default::default()
        });
    }

    /// The receiver's REMB of `bps` arrives at `now`.
    fn receive_remb(p: &mut MediaPacer, bps: f32, now: Instant) {
        let remb = ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 0,
            bitrate: bps,
            ssrcs: vec![2],
        };
        p.handle_read(TaggedPacket {
            now,
            transport: Default::default(),
            message: AttributedPacket::new(Packet::Rtcp(vec![Box::new(remb)])),
        })
        .ok();
    }

    fn drain(p: &mut MediaPacer) -> Vec<u32> {
        std::iter::from_fn(|| p.poll_write())
            .map(|t| match t.message.packet {
                Packet::Rtp(r) => r.header.ssrc,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn a_burst_of_overdue_packets_does_not_leave_a_standing_queue() {
        let t = Instant::now();
        let mut p = MediaPacer::new(1_000_000.0);
        bind(&mut p, 2, "video/H264");
        // A retransmission storm: 1500 packets at once, far beyond the rate.
        for i in 0..1500 {
            p.handle_write(rtp(2, i, 1200, t)).ok();
        }
        let mut now = t;
        drain(&mut p);
        while p.queued() > 0 {
            now += Duration::from_millis(5);
            p.handle_timeout(now).ok();
            drain(&mut p);
        }
        // Then ordinary traffic: a 4-packet frame every 33 ms leaves within a frame time.
        for f in 0..30u16 {
            now += Duration::from_millis(33);
            for i in 0..4 {
                p.handle_write(rtp(2, 2000 + f * 4 + i, 1200, now)).ok();
            }
            let mut waited = Duration::ZERO;
            drain(&mut p);
            while p.queued() > 0 {
                let next = p
                    .poll_timeout()
                    .unwrap_or(now)
                    .max(now + Duration::from_millis(1));
                waited = next - now;
                p.handle_timeout(next).ok();
                drain(&mut p);
            }
            assert!(
                waited < Duration::from_millis(40),
                "frame {f} waited {waited:?}"
            );
        }
    }

    fn estimate(p: &mut MediaPacer, bps: f64, now: Instant) {
        let message =
            AttributedPacket::new(Packet::Rtcp(vec![])).with(Attribute::TargetBitrateChanged {
                bits_per_second: bps,
            });
        p.handle_read(TaggedPacket {
            now,
            transport: Default::default(),
            message,
        })
        .ok();
        while p.poll_read().is_some() {}
    }

    #[test]
    fn the_target_does_not_run_ahead_of_what_is_sent() {
        let t = Instant::now();
        let mut p = MediaPacer::new(1_000_000.0);
        bind(&mut p, 2, "video/H264");
        let handle = p.handle();
        // A still picture: 300 kbit/s (a 1250-byte packet every 33 ms) for 3 s while the
        // estimate climbs to 3 Mbit/s.
        let mut now = t;
        for i in 0..90u16 {
            now = t + Duration::from_millis(33 * u64::from(i));
            estimate(&mut p, 1_000_000.0 + f64::from(i) * 25_000.0, now);
            p.handle_write(rtp(2, i, 1238, now)).ok();
            p.handle_timeout(now).ok();
            drain(&mut p);
        }
        let target = handle.target_bps().unwrap_or(0) as f64;
        assert!(
            (500_000.0..=650_000.0).contains(&target),
            "1.5 x 300 kbit/s + 100 kbit/s, not the 3 Mbit/s estimate: {target}"
        );
        // A keyframe then leaves at 2.5 x the target, not at 2.5 x the estimate.
        let start = now + Duration::from_millis(33);
        for i in 0..40u16 {
            p.handle_write(rtp(2, 100 + i, 1200, start)).ok();
        }
        let mut at = start;
        drain(&mut p);
        while p.queued() > 0 {
            at = p
                .poll_timeout()
                .unwrap_or(at)
                .max(at + Duration::from_micros(100));
            p.handle_timeout(at).ok();
            drain(&mut p);
        }
        // 40 x 1.2 kB = 384 kbit: ~0.27 s at 2.5 x ~570 kbit/s, 0.05 s at 2.5 x 3 Mbit/s.
        assert!(at - start > Duration::from_millis(150), "{:?}", at - start);

        // A still picture at the start keeps at least the floor.
        let mut p = MediaPacer::new(2_000_000.0);
        bind(&mut p, 2, "video/H264");
        for i in 0..60u16 {
            let now = t + Duration::from_millis(33 * u64::from(i));
            p.handle_write(rtp(2, i, 100, now)).ok();
            p.handle_timeout(now).ok();
        }
        assert_eq!(p.target_bps(), APP_LIMITED_FLOOR_BPS);
    }

    #[test]
    fn a_remb_below_the_ceiling_lowers_it_so_the_target_climbs_from_there_when_it_lapses() {
        let ms = Duration::from_millis;
        let t = Instant::now();
        let mut guard = QueueGuard::default();
        let (mut at, mut bytes) = (t, 0u64);
        let mut step = |guard: &mut QueueGuard, rtt: u64, kbps: u64, remb: Option<f64>| {
            at += ms(250);
            bytes += kbps * 1000 / 8 / 4;
            guard.update(at, ms(rtt), bytes, remb)
        };
        // No ceiling yet: a REMB alone sets none (it is a ceiling itself while it holds).
        for _ in 0..8 {
            assert_eq!(step(&mut guard, 80, 1600, Some(2_000_000.0)), None);
            assert_eq!(step(&mut guard, 80, 1600, Some(900_000.0)), None);
        }
        // The link is cut under 1.6 Mbit/s: a queue (ceiling 0.7 x 1.6 M), and the
        // receiver's REMB says 350 kbit/s.
        let first = step(&mut guard, 500, 1600, None).unwrap_or(0.0);
        assert!((first - 1_120_000.0).abs() < 1.0, "{first}");
        assert_eq!(step(&mut guard, 450, 400, Some(350_000.0)), Some(350_000.0));
        // A REMB above the ceiling changes nothing.
        assert_eq!(step(&mut guard, 300, 350, Some(900_000.0)), Some(350_000.0));
        // Drained, the REMB lapsed: the ceiling climbs from 350 kbit/s, slowly.
        let mut c = 350_000.0;
        for _ in 0..8 {
            c = step(&mut guard, 85, (c / 1000.0) as u64, None).unwrap_or(0.0);
        }
        assert!(
            c > 350_000.0 && c <= 350_000.0 + 2.0 * RECOVERY_BPS_PER_SEC + 1.0,
            "{c}"
        );
        // Never below the floor.
        assert_eq!(
            step(&mut guard, 85, 100, Some(1_000.0)),
            Some(APP_LIMITED_FLOOR_BPS / 3.0)
        );
    }

    #[test]
    fn a_standing_queue_puts_a_ceiling_on_the_target_until_it_drains() {
        let ms = Duration::from_millis;
        let t = Instant::now();
        let mut guard = QueueGuard::default();
        // Samples every 250 ms; `rate` kbit/s sent meanwhile.
        let mut at = t;
        let mut bytes = 0u64;
        let mut step = |guard: &mut QueueGuard, rtt: u64, kbps: u64| {
            at += ms(250);
            bytes += kbps * 1000 / 8 / 4;
            guard.update(at, ms(rtt), bytes, None)
        };
        for _ in 0..8 {
            assert_eq!(step(&mut guard, 80, 1000), None);
        }
        assert_eq!(step(&mut guard, 150, 1000), None, "within the limit");
        // A queue: 0.7 x the rate sent over the last second.
        let first = step(&mut guard, 300, 1000).unwrap_or(0.0);
        assert!((first - 700_000.0).abs() < 1.0, "{first}");
        // Not draining, but too soon to tell: kept; a second later: cut again.
        assert_eq!(step(&mut guard, 310, 700), Some(first));
        assert_eq!(step(&mut guard, 320, 700), Some(first));
        assert_eq!(step(&mut guard, 330, 700), Some(first));
        assert_eq!(step(&mut guard, 330, 700), Some(first * 0.7));
        // Draining: kept.
        assert_eq!(step(&mut guard, 250, 450), Some(first * 0.7));
        assert_eq!(step(&mut guard, 200, 450), Some(first * 0.7));
        // Drained: the draining ceiling stays, then climbs slowly while used.
        let drained = step(&mut guard, 85, 450).unwrap_or(0.0);
        assert_eq!(drained, first * 0.7);
        // Not used (the window forgets the drain's second first): held.
        for _ in 0..4 {
            step(&mut guard, 85, 200);
        }
        let held = step(&mut guard, 85, 200).unwrap_or(0.0);
        for _ in 0..4 {
            assert_eq!(step(&mut guard, 85, 200), Some(held), "not used: held");
        }
        assert!(held < drained + 0.5 * RECOVERY_BPS_PER_SEC, "{held}");
        let drained = held;
        let mut c = drained;
        for _ in 0..8 {
            c = step(&mut guard, 85, (c / 1000.0) as u64).unwrap_or(0.0);
        }
        // Slowly: at most 60 kbit/s a second (less while the window still holds the idle
        // second).
        assert!(
            c > drained + 0.5 * RECOVERY_BPS_PER_SEC
                && c <= drained + 2.0 * RECOVERY_BPS_PER_SEC + 1.0,
            "{drained} -> {c}"
        );
        // Well above the rate that built the queue (the link got better): faster.
        for _ in 0..80 {
            c = step(&mut guard, 85, (c / 1000.0) as u64).unwrap_or(0.0);
        }
        assert!(c > 4_000_000.0, "{c}");

        // The pacer applies it.
        let mut p = MediaPacer::new(1_000_000.0);
        let handle = p.handle();
        handle.set_ceiling(Some(400_000));
        p.update_target(Instant::now());
        assert_eq!(p.target_bps(), 400_000.0);
        assert_eq!(handle.target_bps(), Some(400_000));
        handle.set_ceiling(None);
        p.update_target(Instant::now());
        assert_eq!(p.target_bps(), 1_000_000.0);
    }

    #[test]
    fn a_remb_is_a_ceiling_while_it_holds() {
        let t = Instant::now();
        let mut p = MediaPacer::new(2_000_000.0);
        let handle = p.handle();
        receive_remb(&mut p, 450_000.0, t);
        assert_eq!(p.target_bps(), 450_000.0);
        assert_eq!(handle.remb_bps(), Some(450_000.0));
        // Not repeated: it lapses.
        p.update_target(t + REMB_HOLD);
        assert_eq!(p.target_bps(), 2_000_000.0);
        assert_eq!(handle.remb_bps(), None);
    }

    /// An H.264 packet of `ssrc`: `payload` after the RTP header, at `timestamp`.
    fn h264(ssrc: u32, seq: u16, timestamp: u32, payload: &[u8], now: Instant) -> TaggedPacket {
        let mut packet = rtp(ssrc, seq, 0, now);
        if let Packet::Rtp(r) = &mut packet.message.packet {
            r.header.timestamp = timestamp;
            r.payload = bytes::Bytes::from([payload, &[0u8; 1000]].concat());
        }
        packet
    }

    #[test]
    fn a_keyframe_drops_the_video_queued_before_it_and_later_repairs_of_it() {
        const P_FRAME: &[u8] = &[0x41, 0x9a];
        const SPS: &[u8] = &[0x67, 0x42];
        let t = Instant::now();
        let mut p = MediaPacer::new(300_000.0);
        bind(&mut p, 1, "audio/opus");
        p.bind_local_stream(&StreamInfo {
            ssrc: 2,
            ssrc_rtx: Some(3),
            mime_type: "video/H264".into(),
            ..Default::default()
        });
        // A narrow link's backlog: P-frames and retransmissions of them.
        for i in 0..40u16 {
            p.handle_write(h264(2, 100 + i, 3000 * u32::from(i / 4), P_FRAME, t))
                .ok();
        }
        for i in 0..5u16 {
            let osn = (100 + i).to_be_bytes();
            p.handle_write(h264(3, i, 0, &[osn[0], osn[1], 0x41], t))
                .ok();
        }
        drain(&mut p);
        let backlog = p.queued();
        assert!(backlog > 20, "{backlog} queued");
        // A keyframe arrives: what waits before it goes, the keyframe is next in line.
        for i in 0..3u16 {
            let nal = if i == 0 { SPS } else { P_FRAME };
            p.handle_write(h264(2, 140 + i, 30_000, nal, t)).ok();
        }
        assert_eq!(p.superseded(), backlog as u64);
        assert_eq!(p.queued() + drain(&mut p).len(), 3);
        // A repair of a packet from before it is refused; of the keyframe's own, queued.
        let before = 139u16.to_be_bytes();
        p.handle_write(h264(3, 5, 0, &[before[0], before[1], 0x41], t))
            .ok();
        assert_eq!(p.superseded(), backlog as u64 + 1);
        let own = 141u16.to_be_bytes();
        p.handle_write(h264(3, 6, 0, &[own[0], own[1], 0x41], t))
            .ok();
        assert_eq!(p.superseded(), backlog as u64 + 1);
        // The keyframe's later packets do not drop the earlier ones (one frame), and
        // audio is never touched.
        p.handle_write(h264(2, 143, 30_000, SPS, t)).ok();
        p.handle_write(rtp(1, 0, 100, t)).ok();
        assert_eq!(p.superseded(), backlog as u64 + 1);
        assert!(drain(&mut p).contains(&1));
    }

    #[test]
    fn audio_passes_a_queued_keyframe() {
        let t = Instant::now();
        let mut p = MediaPacer::new(500_000.0);
        bind(&mut p, 1, "audio/opus");
        bind(&mut p, 2, "video/H264");
        // A 60-packet keyframe at 500 kbit/s: about 0.6 s of data at 2.5x.
        for i in 0..60 {
            p.handle_write(rtp(2, i, 1100, t)).ok();
        }
        let first = drain(&mut p);
        assert!(first.len() < 60, "video is paced: {} at once", first.len());
        p.handle_write(rtp(1, 0, 100, t)).ok();
        assert_eq!(drain(&mut p), [1], "audio does not wait behind video");
        assert!(p.queued() > 0);
    }

    #[test]
    fn a_remb_far_below_the_rate_sent_pauses_once() {
        let t = Instant::now();
        let mut d = DrainPause::default();
        // Not known yet how much is sent: no pause.
        assert!(!d.remb(t, 100_000.0, None));
        // A correction, not a cut.
        assert!(!d.remb(t, 900_000.0, Some(1_500_000.0)));
        assert!(!d.remb(t, 700_000.0, Some(1_500_000.0)));
        assert!(!d.holds(t));
        // The link went from 3 Mbit/s to 500 kbit/s under a sender at 1.5 Mbit/s.
        assert!(d.remb(t, 420_000.0, Some(1_500_000.0)));
        assert!(d.holds(t + DrainPause::HOLD / 2));
        assert!(!d.holds(t + DrainPause::HOLD));
        // The receiver repeats its REMB while the queue drains: no second pause.
        let again = t + DrainPause::HOLD + Duration::from_millis(200);
        assert!(!d.remb(again, 380_000.0, Some(1_200_000.0)));
        assert!(!d.holds(again));
        // Long after, a new cut pauses again.
        let later = t + DrainPause::HOLD + DrainPause::REARM;
        assert!(d.remb(later, 400_000.0, Some(1_500_000.0)));
        assert!(d.holds(later));
    }

    #[test]
    fn a_cut_holds_video_but_not_audio_until_the_pause_ends() {
        let t = Instant::now();
        let mut p = MediaPacer::new(2_000_000.0);
        let handle = p.handle();
        bind(&mut p, 1, "audio/opus");
        bind(&mut p, 2, "video/H264");
        // 1.2 s of video at about 1.5 Mbit/s: 4 packets of 1,200 bytes every 25 ms.
        let mut now = t;
        let mut seq = 0u16;
        for _ in 0..48 {
            for _ in 0..4 {
                p.handle_write(rtp(2, seq, 1200, now)).ok();
                seq += 1;
            }
            p.handle_timeout(now).ok();
            drain(&mut p);
            now += Duration::from_millis(25);
        }
        assert!(!handle.video_paused(now));
        // The path was cut to 500 kbit/s: the receiver's REMB says 420 kbit/s.
        receive_remb(&mut p, 420_000.0, now);
        assert!(handle.video_paused(now));
        // Video written during the pause waits, however long it waited; audio passes.
        let end = now + DrainPause::HOLD;
        p.handle_write(rtp(2, seq, 1200, now)).ok();
        p.handle_write(rtp(1, 7, 160, now)).ok();
        assert_eq!(drain(&mut p), vec![1]);
        assert_eq!(p.poll_timeout(), Some(end));
        p.handle_timeout(end - Duration::from_millis(1)).ok();
        assert!(drain(&mut p).is_empty());
        assert!(handle.video_paused(end - Duration::from_millis(1)));
        // At its end the video leaves.
        assert!(!handle.video_paused(end));
        p.handle_timeout(end).ok();
        assert_eq!(drain(&mut p), vec![2]);
    }

    #[test]
    fn after_a_cut_video_is_paced_gently_for_a_while() {
        let t = Instant::now();
        let mut p = MediaPacer::new(1_000_000.0);
        estimate(&mut p, 1_000_000.0, t);
        assert_eq!(p.pacing_factor(t), PACING_FACTOR);
        // A small dip is an estimate's jitter.
        estimate(&mut p, 950_000.0, t);
        assert_eq!(p.pacing_factor(t), PACING_FACTOR);
        // The link narrowed: the estimate (or a ceiling on it) is cut.
        let cut = t + Duration::from_millis(100);
        estimate(&mut p, 500_000.0, cut);
        assert_eq!(p.pacing_factor(cut), CUT_PACING_FACTOR);
        assert_eq!(p.pacing_factor(cut + CUT_HOLD / 2), CUT_PACING_FACTOR);
        assert_eq!(p.pacing_factor(cut + CUT_HOLD), PACING_FACTOR);
    }

    #[test]
    fn video_drains_at_the_paced_rate_and_never_holds_more_than_the_cap() {
        let t = Instant::now();
        let mut p = MediaPacer::new(1_000_000.0);
        bind(&mut p, 2, "video/H264");
        for i in 0..30 {
            p.handle_write(rtp(2, i, 1200, t)).ok();
        }
        let mut sent = drain(&mut p).len();
        let mut now = t;
        while p.queued() > 0 {
            let next = p.poll_timeout().unwrap_or(now + Duration::from_millis(1));
            assert!(next >= now);
            now = next.max(now + Duration::from_micros(100));
            p.handle_timeout(now).ok();
            sent += drain(&mut p).len();
        }
        assert_eq!(sent, 30);
        // 30 x ~1.2 kB = ~290 kbit at 2.5 Mbit/s: ~115 ms (minus the initial burst).
        let took = now - t;
        assert!(took < Duration::from_millis(200), "{took:?}");

        // A huge backlog at a tiny estimate: nothing waits longer than the cap.
        let mut p = MediaPacer::new(100_000.0);
        bind(&mut p, 2, "video/H264");
        for i in 0..400 {
            p.handle_write(rtp(2, i, 1200, t)).ok();
        }
        let mut now = t;
        drain(&mut p);
        while p.queued() > 0 {
            now += Duration::from_millis(5);
            p.handle_timeout(now).ok();
            drain(&mut p);
        }
        assert!(
            now - t <= MAX_QUEUE_TIME + Duration::from_millis(50),
            "{:?}",
            now - t
        );
    }
}
