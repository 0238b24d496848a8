//! `MediaPacer`: the send pacer of a Duet call, an interceptor in webrtc-rs's chain at the
//! pacer's slot (between the NACK responder and TWCC numbering).
//!
//! Why not the crate's own pacer: it keeps one queue for everything and releases at
//! exactly the estimate, so a keyframe (dozens of packets) holds the audio behind it for
//! hundreds of milliseconds on a thin link. libwebrtc's choices are taken instead:
//! - audio is not paced: its packets (small, 50 a second) pass at once, so video can
//!   never starve it;
//! - video leaves at 2.5 x the congestion controller's estimate (a frame's packets are
//!   spread, not held a whole frame interval);
//! - no video packet waits longer than [`MAX_QUEUE_TIME`]: one that has is released
//!   whatever the budget (a queue that grows without end is only latency).
//!
//! Packets leave with their release instant as `now`, so the congestion controller's send
//! history records when they really left.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::marshal::MarshalSize as _;

/// Video leaves this many times faster than the estimate (libwebrtc's pacing factor).
pub const PACING_FACTOR: f64 = 2.5;
/// The most video the queue may hold, in time at the current rate.
pub const MAX_QUEUE_TIME: Duration = Duration::from_millis(500);
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

pub struct MediaPacer {
    bucket: Bucket,
    /// The congestion controller's latest estimate, bits per second.
    target_bps: f64,
    audio_ssrcs: HashSet<u32>,
    /// Queued video; each packet's `now` is when it was queued.
    video: VecDeque<TaggedPacket>,
    /// Ready to leave: RTCP, audio, and released video, in order.
    out: VecDeque<TaggedPacket>,
    read: VecDeque<TaggedPacket>,
    refused: u64,
}

impl MediaPacer {
    pub fn new(initial_bps: f64) -> MediaPacer {
        MediaPacer {
            bucket: Bucket {
                rate_bps: initial_bps * PACING_FACTOR,
                bits: initial_bps * PACING_FACTOR * 0.04,
                at: None,
            },
            target_bps: initial_bps,
            audio_ssrcs: HashSet::new(),
            video: VecDeque::new(),
            out: VecDeque::new(),
            read: VecDeque::new(),
            refused: 0,
        }
    }

    fn bits_of(packet: &TaggedPacket) -> f64 {
        match &packet.message.packet {
            Packet::Rtp(rtp) => (rtp.marshal_size() * 8) as f64,
            _ => 0.0,
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
            self.target_bps = *bits_per_second;
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
            self.out.push_back(msg);
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
        self.bucket.rate_bps = self.target_bps * PACING_FACTOR;
        self.bucket.refill(now);
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
            packet.now = now;
            self.out.push_back(packet);
        }
    }
}

impl Interceptor for MediaPacer {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        if info.mime_type.to_ascii_lowercase().starts_with("audio/") {
            self.audio_ssrcs.insert(info.ssrc);
        }
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.audio_ssrcs.remove(&info.ssrc);
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
