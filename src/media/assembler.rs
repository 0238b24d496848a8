//! `FrameAssembler`: the receive side of H.264 or VP8 over RTP, as a pure type. RTP packets go in
//! (in any order, with gaps and duplicates); complete access units and keyframe requests
//! come out, at the times the caller asks (`poll(now)`, `poll_timeout()`).
//!
//! What it decides, libwebrtc-style:
//! - Which packets to ask for again (NACK): a missing packet at once, then again each
//!   round trip if it has still not come, at most [`MAX_NACKS`] times; never packets of a
//!   frame already given up, and none at all for a hole too large to repair (after an
//!   outage a keyframe is cheaper than a retransmission storm).
//! - On a link that loses more than now and then ([`ECHO_LOSS`]) with a long round
//!   trip, each NACK is sent a second time shortly after the first: a lost NACK or a
//!   lost retransmission would otherwise cost a second round trip, and two round trips
//!   there are a freeze. The sender answers both (a few percent more retransmissions);
//!   the copy that comes second is a duplicate. Not while the stream sits in a queue
//!   ([`ECHO_MAX_QUEUE`]): that loss is congestion.
//! - Frames leave in order. A frame with a missing packet is held for a retransmission
//!   (NACK) for about two and a half round trips, room for one lost retransmission
//!   ([`FrameAssembler::repair_wait`]); frames behind it wait too (a P-frame needs the
//!   one before it).
//! - A burst of losses ([`BURST_PACKETS`] missing at once) asks for a keyframe at once as
//!   well, and a complete keyframe behind incomplete frames is decoded without waiting
//!   for them.
//! - Only when the wait runs out is the frame given up. From then on the decoder needs a
//!   keyframe: frames are dropped until one starts, and a keyframe request goes out, at
//!   most one per round trip (+ margin), repeated while none arrives, and none while a
//!   keyframe is arriving.
//! - The round trip used for all these waits includes the queue this stream sits in now
//!   ([`FrameAssembler::set_queue_delay`]): a link that suddenly narrows fills a queue
//!   long before a round-trip measurement shows it.
//! - The stream starts at a keyframe; a decoder that cannot decode a frame
//!   ([`FrameAssembler::decoder_failed`]) puts it back into waiting for one.
//!
//! It knows nothing of sockets or threads, so loss, reordering, duplicates and timeouts are
//! unit-tested below with scripted packet sequences and instants.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::codec::vp8::Vp8Packet;

use super::codec::VideoCodec;
use rtc::rtp::packetizer::Depacketizer as _;

/// At most this many packets are held while waiting for a missing one (about 1.5 s of
/// 720p video); beyond it the frame is given up at once, so a hostile or broken sender
/// cannot grow the receiver.
const MAX_HELD_PACKETS: usize = 2048;
/// A packet is asked for at most this many times.
pub const MAX_NACKS: u32 = 10;
/// At this much loss (a fraction of the stream's packets, measured here) and a round
/// trip of at least [`ECHO_RTT`], NACKs are sent twice.
/// The loss counted here is what FEC did not rebuild first, about half of the link's:
/// a link that loses 2 % shows about 1 %. An echo costs one packet per lost packet.
pub const ECHO_LOSS: f64 = 0.01;
pub const ECHO_RTT: Duration = Duration::from_millis(60);
/// No echo while this stream sits in a queue this long: that loss is congestion (a full
/// bottleneck drops its tail), and a second copy of each repair only adds to it.
pub const ECHO_MAX_QUEUE: Duration = Duration::from_millis(40);
/// A stream whose first packet does not begin a keyframe asks for one this long after
/// it (the packets before it may only be reordered, rarely by more than a few ms).
pub const FIRST_PACKET_REORDER: Duration = Duration::from_millis(20);
/// With this many packets missing at once (a link that has just narrowed drops a burst),
/// a keyframe is asked for at once, while the repairs go on: about what a keyframe of a
/// small picture costs, and repairs of a burst that size wait in the same full queue.
/// Whichever completes first is decoded (a whole keyframe is jumped to, and the sender
/// drops what waits before it).
pub const BURST_PACKETS: usize = 20;
/// A queue (one way) above which a frame that waits for a repair also asks for a keyframe,
/// a round trip and a half into its wait, while the repairs go on: whichever completes
/// first is decoded. On such a path (a link that just narrowed) a retransmission crosses
/// the queue twice and the full queue drops it as often as the original, while the
/// keyframe is made at the lowered rate and resolution. Random loss on an unqueued path
/// (a retransmission comes in one round trip) never asks early.
pub const QUEUED_PATH: Duration = Duration::from_millis(80);
/// On a queued path a keyframe request is sent twice, this long apart: the request crosses
/// the receiver's own uplink, full too when both narrowed, whose tail drops take one
/// request in two or three (seen: a lost first request cost 0.86 s more). A second copy
/// a moment later is dropped on its own; the sender makes one keyframe for both (the
/// second finds it on its way).
pub const REQUEST_ECHO_GAP: Duration = Duration::from_millis(40);
/// A hole of more packets than this is not repaired packet by packet.
const MAX_NACK_HOLE: u64 = 300;
/// Nor is one across which the RTP clock (90 kHz) jumps more than half a second: that was
/// an outage, and its frames are stale by now.
const MAX_NACK_HOLE_TICKS: u32 = 45_000;

/// One complete frame ready for the decoder: an H.264 access unit in Annex B, or a VP8
/// frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    pub codec: VideoCodec,
    pub data: Bytes,
    pub rtp_timestamp: u32,
    pub keyframe: bool,
    /// At least one of its packets arrived out of order (e.g. retransmitted).
    pub repaired: bool,
}

/// What the assembler wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembled {
    /// Decode this.
    Frame(AccessUnit),
    /// Ask the sender for a keyframe (RTCP PLI).
    RequestKeyframe,
    /// A burst of packets was lost at once: the path has likely just narrowed. Comes
    /// right before the [`Assembled::RequestKeyframe`] it causes; the sender should hear
    /// "send less" with it, so the keyframe is not made at the old rate.
    BurstLost,
    /// Ask the sender to send these packets again (RTCP NACK).
    Nack(Vec<u16>),
}

/// Counters for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssemblerStats {
    /// Frames handed out.
    pub frames: u64,
    /// Frames that waited for a missing packet and got it.
    pub frames_repaired: u64,
    /// Frames given up (a packet never came) or dropped while waiting for a keyframe.
    pub frames_dropped: u64,
    pub keyframe_requests: u64,
    /// Of those, sent a second time on a queued path ([`REQUEST_ECHO_GAP`]).
    pub keyframe_requests_echoed: u64,
    /// NACK messages sent, and packets asked for in them.
    pub nacks: u64,
    pub nacked_packets: u64,
    /// Of those, packets asked for a second time at once (an echo) on a lossy link.
    pub echoed_packets: u64,
    pub duplicate_packets: u64,
    /// Packets that arrived after their frame was handed out or given up.
    pub late_packets: u64,
}

#[derive(Debug)]
struct Held {
    timestamp: u32,
    marker: bool,
    payload: Bytes,
    /// Arrived after a packet with a higher sequence number.
    out_of_order: bool,
}

/// A packet that has not arrived: when we last asked for it, and how often.
#[derive(Debug, Clone, Copy)]
struct Missing {
    asked: Option<Instant>,
    times: u32,
    /// The first request has been echoed (sent again shortly after).
    echoed: bool,
}

/// The share of the stream's packets lost, in one-second windows, smoothed.
#[derive(Debug, Clone, Copy, Default)]
struct LossMeter {
    since: Option<Instant>,
    arrived: u32,
    lost: u32,
    loss: f64,
}

impl LossMeter {
    /// A new highest packet arrived, `lost` packets after the one before.
    fn record(&mut self, lost: u64, now: Instant) {
        let since = *self.since.get_or_insert(now);
        self.arrived += 1;
        self.lost = self
            .lost
            .saturating_add(u32::try_from(lost).unwrap_or(u32::MAX));
        if now.saturating_duration_since(since) >= Duration::from_secs(1) && self.arrived >= 20 {
            let window = f64::from(self.lost) / f64::from(self.arrived + self.lost);
            self.loss = (self.loss + window) / 2.0;
            *self = LossMeter {
                since: Some(now),
                loss: self.loss,
                ..LossMeter::default()
            };
        }
    }
}

/// The receive-side reassembly of one H.264 or VP8 RTP stream. See the module docs.
#[derive(Debug)]
pub struct FrameAssembler {
    codec: VideoCodec,
    held: BTreeMap<u64, Held>,
    /// The highest extended sequence number seen (for unwrapping 16-bit numbers), and
    /// its packet's RTP timestamp.
    highest: Option<u64>,
    highest_timestamp: u32,
    /// Where the next frame to hand out starts; None: not known (at the start, or after
    /// giving up), then the next keyframe's first packet decides.
    next: Option<u64>,
    /// A burst was reported ([`Assembled::BurstLost`]); its keyframe request is next.
    burst_lost: bool,
    /// When the last keyframe request is sent again ([`REQUEST_ECHO_GAP`]).
    request_echo: Option<Instant>,
    /// Packets below this number are done with (handed out, given up or dropped).
    floor: Option<u64>,
    /// Since when the frame at `next` has been incomplete while later packets wait.
    incomplete_since: Option<Instant>,
    /// Frames are dropped until a keyframe starts (since when, for the first request).
    awaiting_keyframe: Option<Instant>,
    last_request: Option<Instant>,
    /// Packets to ask for again, by extended sequence number.
    missing: BTreeMap<u64, Missing>,
    rtt: Duration,
    /// The shortest round trip measured: the path without a queue (None: none yet).
    min_rtt: Option<Duration>,
    loss: LossMeter,
    /// The queueing delay our direction has now ([`FrameAssembler::set_queue_delay`]).
    queue: Duration,
    stats: AssemblerStats,
}

impl Default for FrameAssembler {
    fn default() -> Self {
        FrameAssembler::new()
    }
}

impl FrameAssembler {
    /// An assembler for H.264.
    pub fn new() -> FrameAssembler {
        FrameAssembler::for_codec(VideoCodec::H264)
    }

    pub fn for_codec(codec: VideoCodec) -> FrameAssembler {
        FrameAssembler {
            codec,
            held: BTreeMap::new(),
            highest: None,
            highest_timestamp: 0,
            next: None,
            floor: None,
            incomplete_since: None,
            awaiting_keyframe: None,
            burst_lost: false,
            request_echo: None,
            last_request: None,
            missing: BTreeMap::new(),
            rtt: Duration::from_millis(100),
            min_rtt: None,
            loss: LossMeter::default(),
            queue: Duration::ZERO,
            stats: AssemblerStats::default(),
        }
    }

    /// The current round-trip time (from RTCP or ICE); sets how long a hole is waited for.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = rtt.min(Duration::from_secs(2));
    }

    /// A round trip that was measured (not the starting guess): the shortest one is the
    /// path without a queue.
    pub fn rtt_measured(&mut self, rtt: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// How much queue the packets of this stream sit in now (one way, measured on
    /// arrival: `media::arrival`). A retransmission or a keyframe waits in the same
    /// queue, and the round trip from RTCP learns of a queue only a report later: when
    /// the link suddenly narrows, the last round trip is a clean path's, and waiting
    /// that long for a repair gives up every frame in the queue.
    pub fn set_queue_delay(&mut self, queue: Duration) {
        self.queue = queue.min(Duration::from_secs(2));
    }

    /// The round trip a repair takes now: the last measured one, or the empty path's plus
    /// our queue when that is longer (the measurement came before the queue). Before any
    /// measurement of the empty path, their sum.
    fn repair_rtt(&self) -> Duration {
        match self.min_rtt {
            Some(min) => self.rtt.max(min + self.queue),
            None => self.rtt + self.queue,
        }
    }

    /// When a frame held for a repair on a queued path also asks for a keyframe (see
    /// [`QUEUED_PATH`]): once, a round trip and a half after it started waiting.
    fn queued_request_due(&self) -> Option<Instant> {
        if self.awaiting_keyframe.is_some() || self.queue < QUEUED_PATH {
            return None;
        }
        let since = self.incomplete_since?;
        if self.last_request.is_some_and(|t| t >= since) {
            return None;
        }
        let rtt = self.repair_rtt();
        let due = since + rtt + rtt / 2 + Duration::from_millis(50);
        Some(match self.last_request {
            Some(t) => due.max(t + self.request_interval()),
            None => due,
        })
    }

    /// How long an incomplete frame waits for a retransmission: the NACK goes out at once,
    /// the answer takes a round trip; and if the retransmission is lost too (as likely as
    /// the original), the NACK is repeated 1.5 round trips after the first and its answer
    /// needs another round trip: 2.5 round trips, plus margin for the sender's pacer.
    /// Giving up costs more: a keyframe request, a round trip and a keyframe's worth of
    /// packets.
    pub fn repair_wait(&self) -> Duration {
        (self.repair_rtt() * 5 / 2 + Duration::from_millis(100))
            .clamp(Duration::from_millis(100), Duration::from_millis(1500))
    }

    /// The shortest time between two keyframe requests: a round trip plus margin, so a
    /// request is not repeated before the keyframe it asked for could have arrived.
    pub fn request_interval(&self) -> Duration {
        let rtt = self.repair_rtt();
        (rtt + rtt / 2 + Duration::from_millis(50)).max(Duration::from_millis(100))
    }

    pub fn stats(&self) -> AssemblerStats {
        self.stats
    }

    /// One RTP packet of the stream.
    pub fn push(&mut self, seq: u16, timestamp: u32, marker: bool, payload: Bytes, now: Instant) {
        let first_ever = self.highest.is_none();
        let seq = self.unwrap(seq);
        let out_of_order = self.highest.is_some_and(|h| seq < h);
        if let Some(h) = self.highest.filter(|&h| seq > h + 1) {
            let jump = timestamp.wrapping_sub(self.highest_timestamp);
            if seq - h - 1 > MAX_NACK_HOLE || (jump < 0x8000_0000 && jump > MAX_NACK_HOLE_TICKS) {
                // An outage, not a loss: the frames in it are gone; a keyframe follows.
                self.missing.clear();
            } else {
                self.loss.record(seq - h - 1, now);
                for m in h + 1..seq {
                    self.missing.insert(
                        m,
                        Missing {
                            asked: None,
                            times: 0,
                            echoed: false,
                        },
                    );
                }
            }
        } else if self.highest.is_some_and(|h| seq == h + 1) {
            self.loss.record(0, now);
        }
        self.missing.remove(&seq);
        if self.highest.is_none_or(|h| seq > h) {
            self.highest_timestamp = timestamp;
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        if first_ever {
            // The stream must begin with a keyframe. A first packet that begins one
            // (H.264: with its SPS): its other packets may still be late, a request goes
            // out after the usual wait. A first packet from the middle of a frame: the
            // keyframe's start came before this receiver listened (the sender's first
            // packets cross while DTLS is still finishing here), so ask at once, allowing
            // only for reordering.
            let wait = if self.unambiguous_keyframe_start(&payload) {
                self.repair_wait()
            } else {
                FIRST_PACKET_REORDER
            };
            self.awaiting_keyframe = Some(now + wait);
        }
        if self.floor.is_some_and(|f| seq < f) {
            self.stats.late_packets += 1;
            return;
        }
        if self.held.contains_key(&seq) {
            self.stats.duplicate_packets += 1;
            return;
        }
        if self.held.len() >= 2 * MAX_HELD_PACKETS {
            return; // poll() has not been called; it gives up on the first of these
        }
        self.held.insert(
            seq,
            Held {
                timestamp,
                marker,
                payload,
                out_of_order,
            },
        );
    }

    /// The decoder could not decode what it was given: ask for a keyframe now (within
    /// the rate limit) and drop frames until it comes.
    pub fn decoder_failed(&mut self, now: Instant) {
        if self.awaiting_keyframe.is_none() {
            self.awaiting_keyframe = Some(now);
        }
    }

    /// When [`FrameAssembler::poll`] should be called again even if no packet arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let repair = self.incomplete_since.map(|t| t + self.repair_wait());
        let request = self.keyframe_request_due();
        let queued = self.queued_request_due();
        let echo = self.echo_gap();
        let nack = self
            .missing
            .values()
            .filter(|m| m.times < MAX_NACKS)
            .filter_map(|m| {
                let asked = m.asked?;
                Some(match echo {
                    Some(gap) if m.times == 1 && !m.echoed => asked + gap,
                    _ => asked + self.nack_interval(),
                })
            })
            .min();
        [repair, request, queued, nack, self.request_echo]
            .into_iter()
            .flatten()
            .min()
    }

    /// The share of this stream's packets lost lately (one-second windows, smoothed).
    pub fn loss(&self) -> f64 {
        self.loss.loss
    }

    /// How long after the first request a NACK is echoed, when the link calls for it
    /// (module docs): long enough that a short burst which took the first does not take
    /// the echo too, short against the round trip.
    fn echo_gap(&self) -> Option<Duration> {
        let rtt = self.repair_rtt();
        (self.loss.loss >= ECHO_LOSS && self.rtt >= ECHO_RTT && self.queue < ECHO_MAX_QUEUE)
            .then(|| (rtt / 4).max(Duration::from_millis(20)))
    }

    /// How long to wait before asking for a packet again: its retransmission needs a
    /// round trip, plus margin for the sender's pacer (asking again too soon only buys a
    /// second copy of the same packet).
    fn nack_interval(&self) -> Duration {
        let rtt = self.repair_rtt();
        rtt + (rtt / 2).max(Duration::from_millis(25))
    }

    /// The packets to ask for now (updating when each was asked for).
    fn due_nacks(&mut self, now: Instant) -> Vec<u16> {
        let floor = self.floor.unwrap_or(0);
        self.missing
            .retain(|&seq, m| seq >= floor && m.times < MAX_NACKS);
        let interval = self.nack_interval();
        let echo = self.echo_gap();
        let mut due = Vec::new();
        for (&seq, m) in self.missing.iter_mut() {
            if m.asked.is_none_or(|t| now >= t + interval) {
                m.asked = Some(now);
                m.times += 1;
                due.push(seq as u16); // the low 16 bits are the RTP sequence number
            } else if let (Some(gap), Some(asked)) = (echo, m.asked)
                && m.times == 1
                && !m.echoed
                && now >= asked + gap
            {
                // The echo: the first request again, its retry time unchanged.
                m.echoed = true;
                self.stats.echoed_packets += 1;
                due.push(seq as u16);
            }
        }
        due
    }

    /// Whether the frame being assembled is the keyframe awaited: while its packets come
    /// in (or are repaired) another request would only send a second keyframe behind it,
    /// and on a thin link a keyframe takes a while. If it cannot be completed it is given
    /// up like any frame, and the request follows.
    fn keyframe_arriving(&self) -> bool {
        self.awaiting_keyframe.is_some()
            && self
                .next
                .and_then(|n| self.held.get(&n))
                .is_some_and(|p| starts_keyframe_of(self.codec, &p.payload))
    }

    /// When the next keyframe request is due: while one is awaited and not arriving, and
    /// no sooner than the request interval after the last.
    fn keyframe_request_due(&self) -> Option<Instant> {
        let due = self
            .awaiting_keyframe
            .filter(|_| !self.keyframe_arriving())?;
        Some(match self.last_request {
            Some(t) => due.max(t + self.request_interval()),
            None => due,
        })
    }

    /// What to do now; call until it returns None.
    pub fn poll(&mut self, now: Instant) -> Option<Assembled> {
        if let Some(frame) = self.next_frame(now) {
            return Some(Assembled::Frame(frame));
        }
        // Holes are repaired while frames are decoded, and in the keyframe that is
        // arriving (on a thin link its tail is what a full queue drops); not in frames
        // that wait for a keyframe anyway.
        if self.awaiting_keyframe.is_none() || self.keyframe_arriving() {
            let nacks = self.due_nacks(now);
            if !nacks.is_empty() {
                self.stats.nacks += 1;
                self.stats.nacked_packets += nacks.len() as u64;
                return Some(Assembled::Nack(nacks));
            }
        }
        if std::mem::take(&mut self.burst_lost) {
            return Some(self.request_keyframe(now));
        }
        if self.request_echo.is_some_and(|t| now >= t) {
            self.request_echo = None;
            self.stats.keyframe_requests_echoed += 1;
            return Some(Assembled::RequestKeyframe);
        }
        let burst = self.awaiting_keyframe.is_none()
            && self.missing.len() >= BURST_PACKETS
            && self
                .last_request
                .is_none_or(|t| now >= t + self.request_interval());
        if burst {
            tracing::debug!(
                missing = self.missing.len(),
                "a burst lost: keyframe asked for"
            );
            self.last_request = Some(now);
            self.stats.keyframe_requests += 1;
            self.burst_lost = true;
            return Some(Assembled::BurstLost);
        }
        if self.queued_request_due().is_some_and(|due| now >= due) {
            tracing::debug!(
                queue = ?self.queue,
                "a frame waits for a repair on a queued path: keyframe asked for too"
            );
            self.last_request = Some(now);
            self.stats.keyframe_requests += 1;
            self.burst_lost = true;
            return Some(Assembled::BurstLost);
        }
        if self.keyframe_request_due().is_some_and(|due| now >= due) {
            self.last_request = Some(now);
            self.stats.keyframe_requests += 1;
            return Some(self.request_keyframe(now));
        }
        None
    }

    /// A keyframe request going out now; on a queued path its echo is due a moment later.
    fn request_keyframe(&mut self, now: Instant) -> Assembled {
        self.request_echo = (self.queue >= QUEUED_PATH).then(|| now + REQUEST_ECHO_GAP);
        Assembled::RequestKeyframe
    }

    /// The next complete frame, giving up on one whose repair wait has run out.
    fn next_frame(&mut self, now: Instant) -> Option<AccessUnit> {
        loop {
            if self.next.is_none() {
                self.next = self.find_start()?;
            }
            let start = self.next?;
            match self.complete_frame(start) {
                Some(end) => {
                    self.incomplete_since = None;
                    if let Some(frame) = self.take_frame(start, end, now) {
                        return Some(frame);
                    }
                }
                None => {
                    if !self.held.keys().any(|&s| s > start) {
                        // Nothing behind the hole yet: the frame may just be in flight.
                        self.incomplete_since = None;
                        return None;
                    }
                    if let Some(key) = self.complete_keyframe_after(start) {
                        // A keyframe behind the hole is already whole: nothing before it
                        // is needed any more (libwebrtc's frame buffer jumps the same way).
                        self.skip_to(key);
                        continue;
                    }
                    let since = *self.incomplete_since.get_or_insert(now);
                    if now < since + self.repair_wait() && self.held.len() < MAX_HELD_PACKETS {
                        return None;
                    }
                    self.give_up(now);
                }
            }
        }
    }

    /// The first held packet a frame can start at: anything while decoding goes on (at the
    /// start, after the previous frame); the first packet of a keyframe while one is awaited.
    fn find_start(&mut self) -> Option<Option<u64>> {
        let first = *self.held.keys().next()?;
        if self.awaiting_keyframe.is_none() {
            return Some(Some(first));
        }
        let start = self
            .held
            .iter()
            .find(|(_, p)| starts_keyframe_of(self.codec, &p.payload))
            .map(|(s, _)| *s);
        match start {
            Some(s) => {
                let dropped = self.held.range(..s).count();
                self.held.retain(|&k, _| k >= s);
                self.floor = Some(s);
                self.stats.frames_dropped += u64::from(dropped > 0);
                Some(Some(s))
            }
            None => {
                // No keyframe yet: what is held cannot be decoded; keep only the newest
                // frame's packets (its first packet may still arrive, reordered).
                let newest = self.held.values().next_back().map(|p| p.timestamp);
                self.held.retain(|_, p| Some(p.timestamp) == newest);
                self.floor = self.held.keys().next().copied().or(self.floor);
                None
            }
        }
    }

    /// The last sequence number of the frame starting at `start`, if all its packets are
    /// here: a run of consecutive numbers with one timestamp, ending at a marker (or
    /// followed by a packet of the next frame).
    fn complete_frame(&self, start: u64) -> Option<u64> {
        let ts = self.held.get(&start)?.timestamp;
        let mut seq = start;
        loop {
            let p = self.held.get(&seq)?;
            if p.timestamp != ts {
                // The marker packet was never sent (or a sender does not set it): the
                // frame ended before this packet.
                return seq.checked_sub(1).filter(|&e| e >= start);
            }
            if p.marker {
                return Some(seq);
            }
            seq += 1;
        }
    }

    /// Removes the frame's packets and depacketizes them; None when it is dropped (no
    /// keyframe yet, or not valid H.264).
    fn take_frame(&mut self, start: u64, end: u64, now: Instant) -> Option<AccessUnit> {
        self.next = Some(end + 1);
        self.floor = Some(end + 1);
        let mut rest = self.held.split_off(&(end + 1));
        std::mem::swap(&mut rest, &mut self.held);
        let packets = rest; // start..=end
        let first = packets.get(&start)?;
        let keyframe = starts_keyframe_of(self.codec, &first.payload);
        let rtp_timestamp = first.timestamp;
        if self.awaiting_keyframe.is_some() && !keyframe {
            self.stats.frames_dropped += 1;
            return None;
        }
        let mut h264 = H264Packet::default();
        let mut data = BytesMut::new();
        let mut repaired = false;
        for p in packets.values() {
            repaired |= p.out_of_order;
            let payload = match self.codec {
                VideoCodec::H264 => h264.depacketize(&p.payload),
                // A fresh descriptor per packet: the crate's keeps flags of the last one.
                VideoCodec::Vp8 => Vp8Packet::default().depacketize(&p.payload),
            };
            match payload {
                Ok(part) => data.extend_from_slice(&part),
                Err(e) => {
                    tracing::debug!(error = %e, codec = %self.codec, "malformed packet; frame dropped");
                    self.stats.frames_dropped += 1;
                    self.awaiting_keyframe.get_or_insert(now);
                    return None;
                }
            }
        }
        if keyframe {
            self.awaiting_keyframe = None;
            self.last_request = None;
            self.request_echo = None;
        }
        self.stats.frames += 1;
        self.stats.frames_repaired += u64::from(repaired);
        Some(AccessUnit {
            codec: self.codec,
            data: data.freeze(),
            rtp_timestamp,
            keyframe,
            repaired,
        })
    }

    /// The first packet of a complete keyframe held after `start`, if any. A keyframe
    /// begins with its SPS; a packet that begins with an IDR slice only begins one if the
    /// packet before it is here and belongs to an earlier frame (a keyframe's later
    /// slices begin with an IDR NAL too).
    fn complete_keyframe_after(&self, start: u64) -> Option<u64> {
        self.held
            .range(start + 1..)
            .filter(|(seq, p)| {
                self.unambiguous_keyframe_start(&p.payload)
                    || starts_keyframe_of(self.codec, &p.payload)
                        && self
                            .held
                            .get(&(*seq - 1))
                            .is_some_and(|before| before.timestamp != p.timestamp)
            })
            .map(|(&seq, _)| seq)
            .find(|&seq| self.complete_frame(seq).is_some())
    }

    /// Drops everything before the keyframe starting at `key` (frames that wait for a
    /// repair, and the repairs they wait for).
    fn skip_to(&mut self, key: u64) {
        tracing::debug!(
            skipped = self.held.range(..key).count(),
            "frames skipped for a complete keyframe"
        );
        self.stats.frames_dropped += 1;
        self.held.retain(|&k, _| k >= key);
        self.missing.retain(|&k, _| k >= key);
        self.floor = Some(key);
        self.next = Some(key);
        self.incomplete_since = None;
    }

    /// The frame at `next` will not be completed: drop it and wait for a keyframe.
    fn give_up(&mut self, now: Instant) {
        tracing::debug!(held = self.held.len(), "frame lost; waiting for a keyframe");
        self.stats.frames_dropped += 1;
        if let Some(start) = self.next {
            // Its packets (one timestamp; a keyframe's IDR fragment must not pass for the
            // start of another), and every later one up to the next keyframe, go in
            // find_start.
            let ts = self.held.get(&start).map(|p| p.timestamp);
            self.held
                .retain(|&k, p| k > start && Some(p.timestamp) != ts);
            self.floor = Some(start + 1);
        }
        self.next = None;
        self.incomplete_since = None;
        self.awaiting_keyframe.get_or_insert(now);
        // Nothing before the keyframe is worth a retransmission now.
        self.missing.clear();
    }

    /// Whether a packet can only be the first of a keyframe (H.264: its SPS; VP8: the
    /// start of a frame whose header says key frame).
    fn unambiguous_keyframe_start(&self, payload: &[u8]) -> bool {
        match self.codec {
            VideoCodec::H264 => starts_with_sps(payload),
            VideoCodec::Vp8 => vp8_starts_keyframe(payload),
        }
    }

    fn unwrap(&self, seq: u16) -> u64 {
        let Some(h) = self.highest else {
            // Start high enough that numbers just below the first one stay positive.
            return (1 << 32) + u64::from(seq);
        };
        let base = h & !0xffff;
        let candidates = [base.wrapping_sub(0x1_0000), base, base + 0x1_0000];
        candidates
            .into_iter()
            .map(|b| b + u64::from(seq))
            .min_by_key(|&c| c.abs_diff(h))
            .unwrap_or(h)
    }
}

/// Whether an RTP payload begins with a sequence parameter set (alone or first in a
/// STAP-A): only a keyframe's first packet does.
fn starts_with_sps(payload: &[u8]) -> bool {
    const SPS: u8 = 7;
    const STAP_A: u8 = 24;
    match payload.first().map(|h| h & 0x1f) {
        Some(SPS) => true,
        Some(STAP_A) => payload.get(3).is_some_and(|&h| h & 0x1f == SPS),
        _ => false,
    }
}

/// Whether an RTP payload of `codec` begins a keyframe.
pub fn starts_keyframe_of(codec: VideoCodec, payload: &[u8]) -> bool {
    match codec {
        VideoCodec::H264 => starts_keyframe(payload),
        VideoCodec::Vp8 => vp8_starts_keyframe(payload),
    }
}

/// Whether a VP8 RTP payload (RFC 7741) begins a keyframe: the payload descriptor marks
/// the start of partition 0 (S = 1, PID = 0), and the frame tag behind it has P = 0.
pub fn vp8_starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let (extended, start, partition) = (first & 0x80 != 0, first & 0x10 != 0, first & 0x07);
    if !start || partition != 0 {
        return false;
    }
    let mut at = 1;
    if extended {
        let Some(&x) = payload.get(1) else {
            return false;
        };
        at = 2;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits (M).
            let Some(&id) = payload.get(at) else {
                return false;
            };
            at += if id & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            at += 1; // TID/Y/KEYIDX
        }
    }
    payload.get(at).is_some_and(|tag| tag & 0x01 == 0)
}

/// Whether an RTP payload begins an H.264 keyframe: an IDR slice or SPS, alone, first in
/// a STAP-A, or the first fragment of an FU-A.
pub fn starts_keyframe(payload: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    const STAP_A: u8 = 24;
    const FU_A: u8 = 28;
    let Some(&header) = payload.first() else {
        return false;
    };
    match header & 0x1f {
        IDR | SPS => true,
        STAP_A => payload
            .get(3)
            .is_some_and(|&h| matches!(h & 0x1f, IDR | SPS)),
        FU_A => payload
            .get(1)
            .is_some_and(|&fu| fu & 0x80 != 0 && fu & 0x1f == IDR),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPS: &[u8] = &[0x67, 0x42, 0xe0, 0x1f];
    const IDR: &[u8] = &[0x65, 0x88, 0x84];
    const P: &[u8] = &[0x41, 0x9a, 0x02];

    /// Packets of a stream: (seq, timestamp, marker, payload).
    fn frame(seq: u16, ts: u32, nals: &[&[u8]]) -> Vec<(u16, u32, bool, Bytes)> {
        nals.iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    seq.wrapping_add(i as u16),
                    ts,
                    i + 1 == nals.len(),
                    Bytes::copy_from_slice(n),
                )
            })
            .collect()
    }

    fn push_all(a: &mut FrameAssembler, packets: &[(u16, u32, bool, Bytes)], now: Instant) {
        for (s, t, m, p) in packets {
            a.push(*s, *t, *m, p.clone(), now);
        }
    }

    fn drain(a: &mut FrameAssembler, now: Instant) -> Vec<Assembled> {
        std::iter::from_fn(|| a.poll(now)).collect()
    }

    fn timestamps(out: &[Assembled]) -> Vec<u32> {
        out.iter()
            .filter_map(|o| match o {
                Assembled::Frame(f) => Some(f.rtp_timestamp),
                _ => None,
            })
            .collect()
    }

    fn nacked(out: &[Assembled]) -> Vec<u16> {
        out.iter()
            .flat_map(|o| match o {
                Assembled::Nack(seqs) => seqs.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Everything but NACKs.
    fn decisions(out: Vec<Assembled>) -> Vec<Assembled> {
        out.into_iter()
            .filter(|o| !matches!(o, Assembled::Nack(_)))
            .collect()
    }

    fn requests(out: &[Assembled]) -> usize {
        out.iter()
            .filter(|o| **o == Assembled::RequestKeyframe)
            .count()
    }

    /// A keyframe (SPS + IDR) at seq 10, then P-frames of one packet each.
    fn stream(p_frames: u16) -> Vec<(u16, u32, bool, Bytes)> {
        let mut v = frame(10, 0, &[SPS, IDR]);
        for i in 0..p_frames {
            v.extend(frame(12 + i, 3000 * (u32::from(i) + 1), &[P]));
        }
        v
    }

    #[test]
    fn frames_in_order_come_out_at_once_with_start_codes() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        push_all(&mut a, &stream(3), t);
        let out = drain(&mut a, t);
        assert_eq!(timestamps(&out), [0, 3000, 6000, 9000]);
        assert_eq!(requests(&out), 0);
        let Assembled::Frame(key) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(key.keyframe && !key.repaired);
        assert_eq!(&key.data[..4], &[0, 0, 0, 1]);
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn a_stream_joined_mid_frame_asks_for_a_keyframe_at_once() {
        let t = Instant::now();
        // The keyframe never came: P-frames arrive.
        let mut a = FrameAssembler::new();
        let s = stream(3);
        push_all(&mut a, &s[2..], t);
        assert!(
            decisions(drain(&mut a, t)).is_empty(),
            "reordering allowed for"
        );
        assert_eq!(a.poll_timeout(), Some(t + FIRST_PACKET_REORDER));
        let out = drain(&mut a, t + FIRST_PACKET_REORDER);
        assert_eq!(requests(&out), 1, "{out:?}");
        assert!(timestamps(&out).is_empty(), "no frame before a keyframe");
        // A stream whose first packet begins a keyframe, with its second packet late:
        // that is waited for like any repair.
        let mut b = FrameAssembler::new();
        push_all(&mut b, &s[..1], t);
        assert_eq!(requests(&drain(&mut b, t + FIRST_PACKET_REORDER)), 0);
        push_all(&mut b, &s[1..], t + Duration::from_millis(30));
        let out = drain(&mut b, t + Duration::from_millis(30));
        assert_eq!(timestamps(&out), [0, 3000, 6000, 9000]);
        assert_eq!(requests(&out), 0);
    }

    #[test]
    fn a_reordered_packet_is_waited_for_and_the_frames_behind_it_keep_their_order() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        let s = stream(3);
        push_all(&mut a, &s[..2], t); // keyframe
        assert_eq!(timestamps(&drain(&mut a, t)), [0]);
        // 12 is late: 13 and 14 wait behind it, and 12 is asked for.
        push_all(&mut a, &s[3..], t);
        assert_eq!(drain(&mut a, t), [Assembled::Nack(vec![12])]);
        assert!(a.poll_timeout().is_some());
        push_all(&mut a, &s[2..3], t + Duration::from_millis(30));
        let out = drain(&mut a, t + Duration::from_millis(30));
        assert_eq!(timestamps(&out), [3000, 6000, 9000]);
        assert!(matches!(&out[0], Assembled::Frame(f) if f.repaired));
        assert_eq!(a.stats().frames_repaired, 1);
    }

    #[test]
    fn a_retransmission_within_the_wait_repairs_the_frame_without_a_keyframe_request() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.set_rtt(Duration::from_millis(80));
        let s = stream(5);
        push_all(&mut a, &s[..2], t);
        drain(&mut a, t);
        push_all(&mut a, &s[3..], t); // 12 lost
        assert_eq!(nacked(&drain(&mut a, t)), [12]);
        // Not asked again before its retransmission could be here; then once more.
        let within = t + Duration::from_millis(110);
        assert!(drain(&mut a, within).is_empty());
        let after_rtt = t + Duration::from_millis(120);
        assert_eq!(drain(&mut a, after_rtt), [Assembled::Nack(vec![12])]);
        let before = t + a.repair_wait() - Duration::from_millis(1);
        assert!(decisions(drain(&mut a, before)).is_empty());
        push_all(&mut a, &s[2..3], before); // the retransmission
        let out = drain(&mut a, before);
        assert_eq!(requests(&out), 0);
        assert_eq!(timestamps(&out), [3000, 6000, 9000, 12000, 15000]);
        assert_eq!(a.poll_timeout(), None, "nothing left to ask for");
        // Asked at once, then every 1.5 round trips within the 2.5 round trips' wait.
        assert_eq!(a.stats().nacked_packets, 3);
    }

    /// Two seconds of one-packet frames at 30 fps with every `nth` packet lost, each
    /// repaired a round trip later; returns the next free sequence number and time.
    fn lossy_seconds(a: &mut FrameAssembler, t: Instant, nth: u16) -> (u16, Instant) {
        push_all(a, &frame(10, 0, &[SPS, IDR]), t);
        let mut now = t;
        let mut repairs = Vec::new();
        for i in 0..60u16 {
            now = t + Duration::from_millis(33 * u64::from(i));
            let p = frame(12 + i, 3000 * (u32::from(i) + 1), &[P]);
            if i % nth == nth - 1 {
                repairs.push((now + a.repair_rtt(), p));
            } else {
                push_all(a, &p, now);
            }
            for (_, p) in repairs.extract_if(.., |(at, _)| *at <= now) {
                push_all(a, &p, now);
            }
            drain(a, now);
        }
        for (at, p) in repairs {
            push_all(a, &p, at);
            drain(a, at);
        }
        (72, now + Duration::from_millis(33))
    }

    #[test]
    fn on_a_lossy_link_with_a_long_round_trip_each_nack_is_echoed_once() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.set_rtt(Duration::from_millis(100));
        let (next, now) = lossy_seconds(&mut a, t, 10);
        assert!(a.loss() >= ECHO_LOSS, "{}", a.loss());
        let echoed = a.stats().echoed_packets;
        assert!(echoed > 0, "losses while the meter learned were echoed too");
        // A new loss: asked for at once, again a quarter round trip later (the echo),
        // then at the usual retry time only.
        let p = |i: u16| frame(next + i, 3000 * (62 + u32::from(i)), &[P]);
        push_all(&mut a, &p(1), now);
        assert_eq!(nacked(&drain(&mut a, now)), [next]);
        assert_eq!(a.poll_timeout(), Some(now + Duration::from_millis(25)));
        assert_eq!(
            nacked(&drain(&mut a, now + Duration::from_millis(25))),
            [next]
        );
        assert_eq!(a.stats().echoed_packets, echoed + 1);
        assert!(nacked(&drain(&mut a, now + Duration::from_millis(140))).is_empty());
        assert_eq!(
            nacked(&drain(&mut a, now + Duration::from_millis(150))),
            [next]
        );
        assert_eq!(
            a.stats().echoed_packets,
            echoed + 1,
            "the retry is not echoed"
        );
        push_all(&mut a, &p(0), now + Duration::from_millis(200));
        assert_eq!(
            timestamps(&drain(&mut a, now + Duration::from_millis(200))).len(),
            2
        );
        // A queue on the path: the loss is congestion, no echo.
        a.set_queue_delay(Duration::from_millis(200));
        let queued = now + Duration::from_millis(500);
        push_all(&mut a, &p(3), queued);
        assert_eq!(nacked(&drain(&mut a, queued)), [next + 2]);
        assert!(nacked(&drain(&mut a, queued + Duration::from_millis(80))).is_empty());
        a.set_queue_delay(Duration::ZERO);
        push_all(&mut a, &p(2), queued + Duration::from_millis(100));
        assert_eq!(
            timestamps(&drain(&mut a, queued + Duration::from_millis(100))).len(),
            2
        );
        // A short round trip: a second try comes in time anyway, no echo.
        a.set_rtt(Duration::from_millis(20));
        let later = now + Duration::from_secs(1);
        push_all(&mut a, &p(5), later);
        assert_eq!(nacked(&drain(&mut a, later)), [next + 4]);
        assert!(nacked(&drain(&mut a, later + Duration::from_millis(25))).is_empty());
    }

    #[test]
    fn a_rare_loss_is_not_echoed() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.set_rtt(Duration::from_millis(100));
        let (next, now) = lossy_seconds(&mut a, t, 1000);
        assert_eq!(a.loss(), 0.0);
        push_all(&mut a, &frame(next + 1, 3000 * 70, &[P]), now);
        assert_eq!(nacked(&drain(&mut a, now)), [next]);
        assert!(nacked(&drain(&mut a, now + Duration::from_millis(100))).is_empty());
        assert_eq!(a.stats().echoed_packets, 0);
    }

    #[test]
    fn a_hole_from_an_outage_is_not_nacked_and_a_given_up_frame_is_not_asked_for_again() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        push_all(&mut a, &stream(0), t);
        drain(&mut a, t);
        // 1000 packets lost in an outage: no NACK storm.
        push_all(&mut a, &frame(1012, 90000, &[P]), t);
        assert!(nacked(&drain(&mut a, t)).is_empty());
        // Nor for a few packets of a thin stream across a second of silence.
        let mut a = FrameAssembler::new();
        push_all(&mut a, &stream(0), t);
        drain(&mut a, t);
        push_all(&mut a, &frame(40, 90000, &[P]), t);
        assert!(nacked(&drain(&mut a, t)).is_empty());
        // A small loss is asked for, until the frame is given up.
        let mut a = FrameAssembler::new();
        push_all(&mut a, &stream(0), t);
        drain(&mut a, t);
        push_all(&mut a, &frame(13, 6000, &[P]), t);
        assert_eq!(nacked(&drain(&mut a, t)), [12]);
        let late = t + a.repair_wait();
        assert_eq!(decisions(drain(&mut a, late)), [Assembled::RequestKeyframe]);
        assert!(nacked(&drain(&mut a, late + Duration::from_secs(1))).is_empty());
    }

    #[test]
    fn a_packet_that_never_comes_costs_one_keyframe_request_and_frames_until_the_keyframe() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.set_rtt(Duration::from_millis(80));
        let s = stream(3);
        push_all(&mut a, &s[..2], t);
        drain(&mut a, t);
        push_all(&mut a, &s[3..], t); // 12 lost for good
        assert_eq!(
            drain(&mut a, t),
            [Assembled::Nack(vec![12])],
            "held for a retransmission"
        );
        let late = t + a.repair_wait();
        let out = decisions(drain(&mut a, late));
        assert_eq!(
            out,
            [Assembled::RequestKeyframe],
            "P-frames after a loss are useless"
        );
        // The retransmission comes too late: ignored.
        push_all(&mut a, &s[2..3], late);
        assert!(drain(&mut a, late).is_empty());
        assert_eq!(a.stats().late_packets, 1);
        // No second request within a round trip; one after it if no keyframe came.
        let soon = late + a.request_interval() - Duration::from_millis(1);
        assert!(drain(&mut a, soon).is_empty());
        let again = late + a.request_interval();
        assert_eq!(drain(&mut a, again), [Assembled::RequestKeyframe]);
        // The keyframe arrives: decoding goes on from it.
        let mut k = frame(15, 12000, &[SPS, IDR]);
        k.extend(frame(17, 15000, &[P]));
        push_all(&mut a, &k, again);
        let out = drain(&mut a, again);
        assert_eq!(timestamps(&out), [12000, 15000]);
        assert_eq!(a.poll_timeout(), None);
        assert_eq!(a.stats().keyframe_requests, 2);
    }

    #[test]
    fn a_complete_keyframe_behind_a_hole_is_decoded_at_once() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.set_rtt(Duration::from_millis(80));
        let s = stream(3);
        push_all(&mut a, &s[..2], t);
        drain(&mut a, t);
        // 12 is lost; the frame behind it waits, NACKed.
        push_all(&mut a, &s[3..], t);
        assert_eq!(drain(&mut a, t), [Assembled::Nack(vec![12])]);
        // A keyframe (a new resolution, or one asked for) arrives whole: the frames
        // before it are skipped without waiting for the repair, and no keyframe is asked
        // for; the hole is not asked for again.
        let soon = t + Duration::from_millis(30);
        let mut k = frame(15, 12000, &[SPS, IDR, IDR]);
        k.extend(frame(18, 15000, &[P]));
        push_all(&mut a, &k, soon);
        let out = drain(&mut a, soon);
        assert_eq!(timestamps(&out), [12000, 15000]);
        assert!(
            !out.contains(&Assembled::RequestKeyframe),
            "no request: {out:?}"
        );
        assert!(drain(&mut a, t + Duration::from_secs(2)).is_empty());
        assert_eq!(a.poll_timeout(), None);
        // A keyframe whose own packet is missing is not jumped to.
        let mut a = FrameAssembler::new();
        push_all(&mut a, &s[..2], t);
        drain(&mut a, t);
        push_all(&mut a, &s[3..], t);
        drain(&mut a, t);
        let k = frame(15, 12000, &[SPS, IDR, IDR]);
        push_all(&mut a, &[k[0].clone(), k[2].clone()], soon);
        assert!(timestamps(&drain(&mut a, soon)).is_empty());
    }

    #[test]
    fn a_burst_of_losses_asks_for_a_keyframe_at_once_and_keeps_repairing() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.set_rtt(Duration::from_millis(80));
        // A keyframe, then frames of five packets each.
        let mut s = frame(10, 0, &[SPS, IDR]);
        for f in 0..8u16 {
            s.extend(frame(12 + 5 * f, 3000 * u32::from(f + 1), &[P, P, P, P, P]));
        }
        push_all(&mut a, &s[..2], t);
        drain(&mut a, t);
        // A few lost: repaired, no keyframe.
        push_all(&mut a, &s[5..6], t);
        let out = drain(&mut a, t);
        assert_eq!(nacked(&out), [12, 13, 14]);
        assert_eq!(requests(&out), 0);
        // A burst: the keyframe is asked for now, the NACKs still go out.
        let t1 = t + Duration::from_millis(10);
        push_all(&mut a, &s[30..31], t1);
        let out = drain(&mut a, t1);
        assert_eq!(requests(&out), 1, "{out:?}");
        let burst = out.iter().position(|o| *o == Assembled::BurstLost);
        let request = out.iter().position(|o| *o == Assembled::RequestKeyframe);
        assert_eq!(burst.map(|b| b + 1), request, "the burst, then its request");
        assert_eq!(nacked(&out).len(), 24);
        assert_eq!(timestamps(&out), Vec::<u32>::new());
        // Not again within the request interval.
        push_all(&mut a, &s[32..33], t1);
        assert_eq!(requests(&drain(&mut a, t1)), 0);
        // The keyframe comes whole before the repairs: decoded at once.
        let t2 = t1 + Duration::from_millis(200);
        let k = frame(60, 200_000, &[SPS, IDR]);
        push_all(&mut a, &k, t2);
        let out = drain(&mut a, t2);
        assert_eq!(timestamps(&out), [200_000]);
        assert_eq!(a.stats().keyframe_requests, 1);
    }

    #[test]
    fn a_queue_on_the_path_lengthens_the_wait_for_a_repair() {
        // A link that just narrowed: the last round trip is a clean path's (1 ms), but the
        // packets now sit 250 ms in a queue, and so will the retransmission.
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.set_rtt(Duration::from_millis(1));
        let clean = a.repair_wait();
        a.set_queue_delay(Duration::from_millis(250));
        assert!(a.repair_wait() >= clean + Duration::from_millis(500));
        let s = stream(3);
        push_all(&mut a, &s[..2], t);
        drain(&mut a, t);
        push_all(&mut a, &s[3..], t); // 12 lost
        assert_eq!(nacked(&drain(&mut a, t)), [12]);
        // Not asked again every 25 ms while the first retransmission is still queued.
        assert!(drain(&mut a, t + Duration::from_millis(200)).is_empty());
        let arrives = t + Duration::from_millis(300);
        push_all(&mut a, &s[2..3], arrives);
        let out = drain(&mut a, arrives);
        assert_eq!(requests(&out), 0, "repaired, not given up");
        assert_eq!(timestamps(&out), [3000, 6000, 9000]);
    }

    #[test]
    fn on_a_queued_path_a_frame_waiting_for_a_repair_asks_for_a_keyframe_too() {
        // Both uplinks narrowed: a 250 ms queue each way, the round trip measured 1 ms
        // before it and 500 ms now.
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        a.rtt_measured(Duration::from_millis(1));
        a.rtt_measured(Duration::from_millis(500));
        a.set_rtt(Duration::from_millis(500));
        a.set_queue_delay(Duration::from_millis(250));
        let s = stream(5);
        push_all(&mut a, &s[..2], t);
        drain(&mut a, t);
        push_all(&mut a, &s[3..], t); // 12 lost
        assert_eq!(nacked(&drain(&mut a, t)), [12]);
        // A round trip and a half (+ 50 ms) into the wait: the keyframe is asked for
        // with "send less", once; the frame is still waited for.
        let early = t + Duration::from_millis(800);
        let before = drain(&mut a, early - Duration::from_millis(1));
        assert_eq!(requests(&before), 0);
        assert_eq!(
            nacked(&before),
            [12],
            "asked again 1.5 round trips after the first"
        );
        assert_eq!(a.poll_timeout(), Some(early));
        let out = drain(&mut a, early);
        assert_eq!(
            decisions(out),
            [Assembled::BurstLost, Assembled::RequestKeyframe]
        );
        // Sent once more a moment later (the first may be dropped on a full uplink),
        // then not again.
        let echo = early + REQUEST_ECHO_GAP;
        assert_eq!(requests(&drain(&mut a, echo - Duration::from_millis(1))), 0);
        assert_eq!(decisions(drain(&mut a, echo)), [Assembled::RequestKeyframe]);
        assert_eq!(
            requests(&drain(&mut a, early + Duration::from_millis(250))),
            0
        );
        // The retransmission wins the race (within the 1.35 s wait): decoded, nothing
        // given up.
        let repaired = early + Duration::from_millis(300);
        push_all(&mut a, &s[2..3], repaired);
        let out = drain(&mut a, repaired);
        assert_eq!(timestamps(&out), [3000, 6000, 9000, 12000, 15000]);
        assert_eq!(a.stats().frames_dropped, 0);
        assert_eq!(a.stats().keyframe_requests, 1);
        assert_eq!(a.stats().keyframe_requests_echoed, 1);
    }

    #[test]
    fn no_second_keyframe_request_while_the_keyframe_is_arriving() {
        /// A stream whose packet 12 is lost for good: by the returned instant the frame is
        /// given up and one keyframe request has gone out.
        fn waiting_for_a_keyframe(t: Instant) -> (FrameAssembler, Instant) {
            let mut a = FrameAssembler::new();
            a.set_rtt(Duration::from_millis(20));
            push_all(&mut a, &stream(0), t);
            drain(&mut a, t);
            push_all(&mut a, &frame(13, 6000, &[P]), t);
            drain(&mut a, t);
            let late = t + a.repair_wait();
            assert_eq!(decisions(drain(&mut a, late)), [Assembled::RequestKeyframe]);
            (a, late)
        }
        let t = Instant::now();
        let (mut a, late) = waiting_for_a_keyframe(t);
        // The keyframe's first packets come; on a thin link the rest takes long, far
        // longer than the request interval: no second request meanwhile.
        // SPS, then an IDR in three FU-A fragments (start, middle, end).
        let key = frame(
            14,
            9000,
            &[SPS, &[0x7c, 0x85, 1], &[0x7c, 0x05, 2], &[0x7c, 0x45, 3]],
        );
        push_all(&mut a, &key[..2], late);
        let slow = late + a.request_interval() * 4;
        assert_eq!(requests(&drain(&mut a, slow)), 0);
        push_all(&mut a, &key[2..], slow);
        assert_eq!(timestamps(&drain(&mut a, slow)), [9000]);
        assert_eq!(a.stats().keyframe_requests, 1);
        // A keyframe that cannot be completed is given up like any frame, and asked again.
        let (mut b, late) = waiting_for_a_keyframe(t);
        push_all(&mut b, &key[..2], late); // 16 is lost,
        push_all(&mut b, &key[3..], late); // and 17 ends the frame
        push_all(&mut b, &frame(18, 12000, &[P]), late);
        assert_eq!(nacked(&drain(&mut b, late)), [16]);
        let gone = late + b.repair_wait() + b.request_interval();
        assert_eq!(requests(&drain(&mut b, gone)), 1);
    }

    #[test]
    fn duplicates_are_ignored() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        let s = stream(2);
        push_all(&mut a, &s, t);
        push_all(&mut a, &s[1..3], t);
        assert_eq!(timestamps(&drain(&mut a, t)), [0, 3000, 6000]);
        push_all(&mut a, &s[2..], t); // after delivery: late, not delivered twice
        assert!(drain(&mut a, t).is_empty());
        assert_eq!(a.stats().duplicate_packets, 2);
    }

    #[test]
    fn a_stream_joined_mid_way_asks_for_a_keyframe_and_waits_for_it() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        push_all(&mut a, &frame(100, 9000, &[P]), t);
        assert!(drain(&mut a, t).is_empty(), "its keyframe may be reordered");
        let later = t + a.repair_wait();
        assert_eq!(drain(&mut a, later), [Assembled::RequestKeyframe]);
        push_all(&mut a, &frame(101, 12000, &[SPS, IDR]), later);
        assert_eq!(timestamps(&drain(&mut a, later)), [12000]);
    }

    #[test]
    fn fragmented_keyframes_reassemble_and_undecodable_frames_ask_for_another() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        // FU-A: indicator 28 (nri 3), header start|5, middle 5, end|5.
        let fu = |h: u8, body: u8| Bytes::from(vec![0x7c, h, body, body]);
        let packets = [
            (7u16, 0u32, false, fu(0x85, 1)),
            (8, 0, false, fu(0x05, 2)),
            (9, 0, true, fu(0x45, 3)),
        ];
        // Reordered arrival.
        for i in [1, 0, 2] {
            let (s, ts, m, p) = &packets[i];
            a.push(*s, *ts, *m, p.clone(), t);
        }
        let out = drain(&mut a, t);
        let Assembled::Frame(f) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(f.keyframe);
        assert_eq!(&f.data[..], &[0, 0, 0, 1, 0x65, 1, 1, 2, 2, 3, 3]);
        a.decoder_failed(t);
        assert_eq!(drain(&mut a, t), [Assembled::RequestKeyframe]);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        let mut s = frame(65534, 0, &[SPS, IDR]);
        s.extend(frame(0, 3000, &[P]));
        s.extend(frame(1, 6000, &[P]));
        push_all(&mut a, &s, t);
        assert_eq!(timestamps(&drain(&mut a, t)), [0, 3000, 6000]);
    }

    #[test]
    fn a_flood_behind_a_hole_is_given_up_not_held() {
        let t = Instant::now();
        let mut a = FrameAssembler::new();
        push_all(&mut a, &stream(0), t);
        drain(&mut a, t);
        // 12 never comes; thousands of P-frame packets pile up behind it.
        for i in 0..(MAX_HELD_PACKETS as u16 + 10) {
            a.push(
                13 + i,
                3000 * (u32::from(i) + 2),
                true,
                Bytes::from_static(P),
                t,
            );
        }
        let out = drain(&mut a, t);
        assert_eq!(requests(&out), 1);
        assert!(a.held.len() <= 1, "{} packets held", a.held.len());
    }

    #[test]
    fn keyframe_starts_are_recognised() {
        assert!(starts_keyframe(SPS));
        assert!(starts_keyframe(IDR));
        assert!(!starts_keyframe(P));
        assert!(starts_keyframe(&[0x78, 0x00, 0x04, 0x67, 1, 2, 3, 4]));
        assert!(!starts_keyframe(&[0x7c, 0x05, 1])); // FU-A middle
        assert!(!starts_keyframe(&[]));
        assert!(!starts_keyframe(&[0x78]));
    }

    #[test]
    fn vp8_keyframes_are_found_behind_any_payload_descriptor() {
        // S = 1, PID = 0, then a key frame's tag (P = 0) / an inter frame's (P = 1).
        assert!(vp8_starts_keyframe(&[0x10, 0x9c, 0x01, 0x2a]));
        assert!(!vp8_starts_keyframe(&[0x10, 0x9d, 0x01, 0x2a]));
        // Continuation (S = 0), and another partition (PID = 1).
        assert!(!vp8_starts_keyframe(&[0x00, 0x9c]));
        assert!(!vp8_starts_keyframe(&[0x11, 0x9c]));
        // X with a 15-bit picture id (M), TL0PICIDX and TID/KEYIDX before the tag.
        assert!(vp8_starts_keyframe(&[
            0x90, 0xe0, 0x81, 0x23, 0x07, 0x40, 0x9c
        ]));
        assert!(!vp8_starts_keyframe(&[
            0x90, 0xe0, 0x81, 0x23, 0x07, 0x40, 0x9d
        ]));
        // A 7-bit picture id only.
        assert!(vp8_starts_keyframe(&[0x90, 0x80, 0x05, 0x50]));
        assert!(!vp8_starts_keyframe(&[0x90, 0x80, 0x05]));
        assert!(!vp8_starts_keyframe(&[]));
    }

    /// Real VP8 through real RTP: libvpx encodes the pattern, webrtc-rs's payloader cuts
    /// it into packets, the assembler puts frames back together (its depacketizer) and
    /// libvpx decodes them. A lost packet that no retransmission repairs costs the frames
    /// up to a keyframe: the assembler asks for one, the encoder makes it, and decoding
    /// goes on from it.
    #[test]
    fn vp8_round_trip_through_rtp_and_a_lost_packet_brings_a_keyframe() {
        use crate::media::h264::EncoderSettings;
        use crate::media::video::{TestPattern, VideoSource as _, read_strip};
        use crate::media::vp8::{Vp8Decoder, Vp8Encoder};
        use rtc::rtp::codec::vp8::Vp8Payloader;
        use rtc::rtp::packetizer::Payloader as _;

        let mut pattern = TestPattern::new(640, 360, 30.0, false);
        let mut encoder = Vp8Encoder::new(EncoderSettings::default()).unwrap();
        let mut decoder = Vp8Decoder::new().unwrap();
        let mut payloader = Vp8Payloader::default();
        payloader.enable_picture_id = true;
        let mut a = FrameAssembler::for_codec(VideoCodec::Vp8);
        a.set_rtt(Duration::from_millis(20));
        let t0 = Instant::now();
        let mut seq = 1000u16;
        let (mut decoded, mut requests, mut keyframes_sent) = (0, 0, 0);
        let mut decoded_numbers = Vec::new();
        let mut lost_at = None;
        for i in 0..60u32 {
            let now = t0 + Duration::from_millis(33 * u64::from(i));
            let frame = pattern.next_frame().unwrap();
            let Some(encoded) = encoder.encode(&frame).unwrap() else {
                continue;
            };
            keyframes_sent += usize::from(encoded.keyframe);
            let packets = payloader
                .payload(1200, &Bytes::from(encoded.data.clone()))
                .unwrap();
            let count = packets.len();
            for (k, payload) in packets.into_iter().enumerate() {
                let s = seq;
                seq = seq.wrapping_add(1);
                // Frame 20's second packet never arrives (nor any retransmission).
                if i == 20 && k == 1.min(count - 1) {
                    lost_at = Some(i);
                    continue;
                }
                a.push(s, 3000 * i, k + 1 == count, payload, now);
            }
            // The receiver's clock runs on; a frame given up asks for a keyframe.
            for out in drain(&mut a, now + Duration::from_millis(30)) {
                match out {
                    Assembled::Frame(f) => {
                        assert_eq!(f.codec, VideoCodec::Vp8);
                        assert_eq!(f.keyframe, crate::media::vp8::is_keyframe(&f.data));
                        if let Some(picture) = decoder.decode(&f.data).unwrap() {
                            decoded += 1;
                            decoded_numbers.push(read_strip(&picture).unwrap().frame_number);
                        }
                    }
                    Assembled::RequestKeyframe => {
                        requests += 1;
                        encoder.request_keyframe();
                    }
                    Assembled::Nack(_) | Assembled::BurstLost => {}
                }
            }
        }
        eprintln!(
            "VP8 over RTP: {decoded} of 60 frames decoded, {requests} keyframe request(s), \
             {keyframes_sent} keyframes sent"
        );
        assert_eq!(lost_at, Some(20));
        assert!(requests >= 1, "no keyframe request after the loss");
        assert!(
            keyframes_sent >= 2,
            "the request was not answered: {keyframes_sent}"
        );
        // Everything but the frames between the loss and the keyframe was decoded, in order.
        assert!(decoded >= 50, "{decoded} decoded: {decoded_numbers:?}");
        assert!(!decoded_numbers.contains(&20), "{decoded_numbers:?}");
        assert!(decoded_numbers.contains(&59), "{decoded_numbers:?}");
        assert!(decoded_numbers.windows(2).all(|w| w[0] < w[1]));
        assert!(a.stats().frames_dropped >= 1);
    }
}
