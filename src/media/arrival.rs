//! `ArrivalMonitor`: the receive side's view of the path a stream comes over, as a pure
//! type. Packet arrivals in (time, RTP timestamp, size); "slow down to N bit/s" out, to be
//! sent to the sender as RTCP REMB.
//!
//! Why: the sender's own signals are weak. webrtc-rs's GCC misses a standing queue, and a
//! round trip cannot say which direction is queued (both senders slowed down when one
//! uplink was). The receiver sees its own direction: each frame's first packet arrives
//! `capture time + one-way delay`, and the RTP timestamp is the capture time (the sender
//! derives it from the wall clock), so `arrival - timestamp` is the one-way delay plus a
//! constant. Its minimum over the last seconds is the empty path; anything above is queue.
//! While the queue is longer than [`QUEUE_LIMIT`], what arrives is what the bottleneck
//! carries, so the sender is asked for a bit less than that: [`REMB_SHARE`] of the
//! received rate (plus audio), every [`REPORT_EVERY`].
//!
//! Only a frame's first packet counts: the rest of a keyframe leaves the sender's pacer
//! later on purpose, which is not network delay.
//!
//! And a frame can also wait in the sender (its pacer, its encoder): that delay is not
//! the path's, and answering it with "send less" makes the sender queue more: a ratchet
//! (measured with Chromium as the sender: it obeyed down to 30-190 kbit/s on a clean
//! uplink). A queue on the path lengthens the round trip as well (ICE's checks cross the
//! same path but no pacer), so a request also needs the round trip to have grown by at
//! least half the one-way queue.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One-way queueing delay above which the sender is asked to slow down.
pub const QUEUE_LIMIT: Duration = Duration::from_millis(80);
/// While queued, a request at most this often.
pub const REPORT_EVERY: Duration = Duration::from_millis(250);
/// Once the queue is gone, the ceiling is lifted with a request for this much (a sender
/// such as Chromium keeps a REMB until the next one), sent [`LIFTS`] times (one may be
/// lost).
pub const LIFT_BPS: u64 = 100_000_000;
const LIFTS: u32 = 3;
/// The share of the arriving rate the sender is asked for (the rest drains the queue).
pub const REMB_SHARE: f64 = 0.85;
/// What the same sender's audio adds to the video arriving here (Opus plus headers).
const AUDIO_BPS: f64 = 56_000.0;
/// The empty path's delay is the minimum over this long.
const BASELINE: Duration = Duration::from_secs(10);
/// The arriving rate is measured over this long.
const RATE_WINDOW: Duration = Duration::from_millis(1000);
/// ... and over this long after a burst of losses: the link narrowed a moment ago, and
/// the last second still holds what it carried before.
const BURST_WINDOW: Duration = Duration::from_millis(400);
const RTP_CLOCK: f64 = 90_000.0;

/// See the module docs.
#[derive(Debug, Default)]
pub struct ArrivalMonitor {
    /// The first packet: when it arrived, and its timestamp.
    origin: Option<(Instant, u32)>,
    /// The latest timestamp seen and its unwrapped value (ticks since `origin`).
    last_ts: Option<(u32, i64)>,
    /// Candidates for the sliding minimum of the relative delay (seconds), increasing.
    minima: VecDeque<(Instant, f64)>,
    /// Bytes arrived, for the rate.
    arrived: VecDeque<(Instant, usize)>,
    arrived_bytes: usize,
    last_report: Option<Instant>,
    queue: Duration,
    /// The round trip now, and its minimum so far.
    rtt: Option<(Duration, Duration)>,
    /// Lifting requests still to send after a queue (0: none pending).
    lifts_due: u32,
}

impl ArrivalMonitor {
    pub fn new() -> ArrivalMonitor {
        ArrivalMonitor::default()
    }

    /// A new round-trip measurement (ICE checks: they cross the path, not a pacer).
    pub fn set_rtt(&mut self, rtt: Duration) {
        let min = self.rtt.map_or(rtt, |(_, m)| m.min(rtt));
        self.rtt = Some((rtt, min));
    }

    /// Whether the round trip grew along with the one-way queue (see the module docs).
    fn path_queued(&self) -> bool {
        self.rtt
            .is_some_and(|(rtt, min)| rtt.saturating_sub(min) >= self.queue / 2)
    }

    /// The queueing delay seen last.
    pub fn queue(&self) -> Duration {
        self.queue
    }

    /// A burst of packets was lost (`media::assembler`): the path has likely just
    /// narrowed, before any queue shows. The rate to ask the sender for at once: a share
    /// of what arrived lately ([`BURST_WINDOW`]), the bottleneck's rate if it is one.
    /// Counts as a request (the ceiling is lifted again once no queue stands).
    pub fn burst_request(&mut self, now: Instant) -> u64 {
        let recent =
            |&&(t, _): &&(Instant, usize)| now.saturating_duration_since(t) <= BURST_WINDOW;
        let bytes: usize = self.arrived.iter().filter(recent).map(|&(_, b)| b).sum();
        let window = self
            .arrived
            .iter()
            .find(recent)
            .map_or(BURST_WINDOW, |&(t, _)| {
                now.saturating_duration_since(t).max(BURST_WINDOW / 2)
            });
        self.last_report = Some(now);
        self.lifts_due = LIFTS;
        let rate = bytes as f64 * 8.0 / window.as_secs_f64();
        ((rate + AUDIO_BPS) * REMB_SHARE).round() as u64
    }

    /// One packet arrived at `now`; returns the rate (bits per second, all media) to ask
    /// the sender for, when one is due.
    pub fn push(&mut self, now: Instant, rtp_timestamp: u32, bytes: usize) -> Option<u64> {
        self.arrived.push_back((now, bytes));
        self.arrived_bytes += bytes;
        while self
            .arrived
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > RATE_WINDOW)
        {
            if let Some((_, b)) = self.arrived.pop_front() {
                self.arrived_bytes -= b;
            }
        }
        let (origin_at, _) = *self.origin.get_or_insert((now, rtp_timestamp));
        let ticks = match self.last_ts {
            None => 0,
            // Timestamps move on in small steps: the wrapping difference unwraps them.
            Some((ts, ticks)) => ticks + i64::from(rtp_timestamp.wrapping_sub(ts) as i32),
        };
        // Only a newer frame's first packet counts: later packets of a frame left the
        // pacer later on purpose, and older timestamps are reordered or retransmitted.
        let newer = self.last_ts.is_none_or(|(_, t)| ticks > t);
        if !newer {
            return None;
        }
        self.last_ts = Some((rtp_timestamp, ticks));
        let delay =
            now.saturating_duration_since(origin_at).as_secs_f64() - ticks as f64 / RTP_CLOCK;
        while self.minima.back().is_some_and(|&(_, d)| d >= delay) {
            self.minima.pop_back();
        }
        self.minima.push_back((now, delay));
        while self
            .minima
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > BASELINE)
        {
            self.minima.pop_front();
        }
        let min = self.minima.front().map_or(delay, |&(_, d)| d);
        self.queue = Duration::from_secs_f64((delay - min).max(0.0));
        let window = self
            .arrived
            .front()
            .map_or(Duration::ZERO, |&(t, _)| now.saturating_duration_since(t));
        let due = self
            .last_report
            .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_EVERY);
        if self.queue <= QUEUE_LIMIT / 2 && self.lifts_due > 0 && due {
            self.lifts_due -= 1;
            self.last_report = Some(now);
            return Some(LIFT_BPS);
        }
        if self.queue <= QUEUE_LIMIT || !due || window < RATE_WINDOW / 2 || !self.path_queued() {
            return None;
        }
        self.last_report = Some(now);
        self.lifts_due = LIFTS;
        let rate = self.arrived_bytes as f64 * 8.0 / window.as_secs_f64();
        Some(((rate + AUDIO_BPS) * REMB_SHARE).round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 30 frames a second of `packets` packets of 1000 bytes, arriving `extra(frame)` late.
    fn feed(
        m: &mut ArrivalMonitor,
        t: Instant,
        frames: std::ops::Range<u32>,
        packets: u32,
        extra: impl Fn(u32) -> Duration,
    ) -> Vec<u64> {
        let mut asked = Vec::new();
        for f in frames {
            let capture = Duration::from_micros(u64::from(f) * 33_333);
            let ts = 1_000u32.wrapping_add(f * 3000);
            for p in 0..packets {
                let at = t
                    + capture
                    + Duration::from_millis(20)
                    + extra(f)
                    + Duration::from_micros(u64::from(p) * 500);
                asked.extend(m.push(at, ts, 1000));
            }
        }
        asked
    }

    #[test]
    fn a_clean_path_asks_nothing_even_with_paced_keyframes() {
        let t = Instant::now();
        let mut m = ArrivalMonitor::new();
        // Every 30th frame a 60-packet keyframe spread over 200 ms by the sender's pacer.
        let mut asked = Vec::new();
        for f in 0..300u32 {
            let n: u32 = if f % 30 == 0 { 60 } else { 3 };
            let ts = f * 3000;
            let capture = Duration::from_micros(u64::from(f) * 33_333);
            for p in 0..n {
                let at = t
                    + capture
                    + Duration::from_millis(20)
                    + Duration::from_micros(u64::from(p) * 3_400);
                asked.extend(m.push(at, ts, 1000));
            }
        }
        assert!(asked.is_empty(), "{asked:?}");
        assert!(m.queue() < Duration::from_millis(5));
    }

    #[test]
    fn a_growing_queue_asks_for_less_than_arrives() {
        let t = Instant::now();
        let mut m = ArrivalMonitor::new();
        m.set_rtt(Duration::from_millis(20));
        assert!(feed(&mut m, t, 0..60, 3, |_| Duration::ZERO).is_empty());
        // The path's queue shows in the round trip too.
        m.set_rtt(Duration::from_millis(300));
        // The queue grows 10 ms a frame from frame 60 on: asked once past 80 ms, for
        // 0.85 x (what arrives + audio), and not more often than every 250 ms.
        let asked = feed(&mut m, t, 60..90, 3, |f| {
            Duration::from_millis(u64::from(f - 60) * 10)
        });
        assert!(m.queue() > QUEUE_LIMIT);
        assert!(!asked.is_empty());
        // Queued from about frame 68 to 90: 0.73 s, so at most 4 requests.
        assert!(asked.len() <= 4, "{asked:?}");
        // Then the queue drains: the ceiling is lifted, a few times, then nothing.
        let lifted = feed(&mut m, t, 90..150, 3, |_| Duration::ZERO);
        assert_eq!(lifted, [LIFT_BPS; 3]);
        // 3 x 1000 bytes x 30/s = 720 kbit/s arriving (less while queueing).
        for bps in &asked {
            assert!((450_000..=700_000).contains(bps), "{bps}");
        }
    }

    #[test]
    fn a_burst_asks_for_a_share_of_what_arrived_lately() {
        let t = Instant::now();
        let mut m = ArrivalMonitor::new();
        // 10 packets a frame (2.4 Mbit/s) for two seconds, then 2 (480 kbit/s): the
        // burst's request follows the narrow link, not the last second's average.
        feed(&mut m, t, 0..60, 10, |_| Duration::ZERO);
        feed(&mut m, t, 60..75, 2, |_| Duration::ZERO);
        let at = t + Duration::from_micros(75 * 33_333);
        let asked = m.burst_request(at);
        let expected = (480_000.0 + AUDIO_BPS) * REMB_SHARE;
        assert!(
            (asked as f64 - expected).abs() < expected * 0.15,
            "{asked} for {expected}"
        );
        // The ceiling is lifted once no queue stands.
        let lifted = feed(&mut m, t, 75..120, 2, |_| Duration::ZERO);
        assert_eq!(lifted, [LIFT_BPS; 3]);
    }

    #[test]
    fn a_frame_waiting_in_the_sender_is_not_the_paths_queue() {
        let t = Instant::now();
        let mut m = ArrivalMonitor::new();
        m.set_rtt(Duration::from_millis(20));
        assert!(feed(&mut m, t, 0..60, 3, |_| Duration::ZERO).is_empty());
        // One-way delay grows (the sender's pacer holds frames) but the round trip does
        // not: nothing is asked.
        let asked = feed(&mut m, t, 60..90, 3, |f| {
            Duration::from_millis(u64::from(f - 60) * 10)
        });
        assert!(m.queue() > QUEUE_LIMIT);
        assert!(asked.is_empty(), "{asked:?}");
    }

    #[test]
    fn timestamps_wrap_and_reordering_does_not_fool_it() {
        let t = Instant::now();
        let mut m = ArrivalMonitor::new();
        let start = u32::MAX - 30 * 3000;
        let mut asked = Vec::new();
        for f in 0..120u32 {
            let ts = start.wrapping_add(f * 3000);
            let at = t + Duration::from_micros(u64::from(f) * 33_333);
            asked.extend(m.push(at, ts, 1000));
            // A retransmission of an older frame, late.
            if f > 5 {
                asked.extend(m.push(at, start.wrapping_add((f - 5) * 3000), 1000));
            }
        }
        assert!(asked.is_empty(), "{asked:?}");
    }
}
