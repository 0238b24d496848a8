//! The audio jitter buffer: received 20 ms Opus packets wait here until their time to
//! play, and how long they wait follows the jitter measured on the path.
//!
//! A playout clock asks [`JitterBuffer::pop`] for one 20 ms frame every 20 ms. Playing
//! starts once the buffer holds its target delay; from then on:
//! - the packet whose turn it is plays ([`Playout::Packet`]);
//! - a packet missing while the buffer holds less than its target, or nothing at all is
//!   here, is waited for: the frame is concealed *without* moving on
//!   ([`Playout::Stretch`]), the late packet still plays when it comes, and the delay
//!   grew by 20 ms, as it must for this much jitter;
//! - a packet missing while the buffer holds its target is lost: the decoder conceals
//!   it, with the next packet's in-band FEC when that one is already here
//!   ([`Playout::Lost`]);
//! - when the buffer holds more than the target plus [`JitterBuffer::EXCESS`], a packet
//!   is dropped now and then ([`JitterStats::skipped`]): delay that jitter no longer
//!   calls for is given back.
//!
//! The target is the 97th percentile of how much later than the earliest packets
//! arrived over the last [`JitterBuffer::WINDOW`] (their transit time, arrival minus RTP
//! timestamp, above the window's minimum), plus two frames, within
//! [`JitterBuffer::MIN_TARGET`]..[`JitterBuffer::MAX_TARGET`]. A steady path gets
//! 40 ms; packets spread over 80 ms get ~120 ms. Pure: time comes in as arguments.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// What the decoder is to play next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    Packet(Vec<u8>),
    /// The packet with this place in the sequence never came; `next` is the following
    /// packet if it is already here (its FEC can rebuild the lost one).
    Lost {
        next: Option<Vec<u8>>,
    },
    /// Nothing is here yet: conceal one frame and wait (the delay grows by a frame).
    Stretch,
}

/// Counters for the call report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets that came after their turn (dropped).
    pub late: u64,
    /// Packets declared lost (concealed, perhaps rebuilt by FEC).
    pub lost: u64,
    /// Frames concealed while waiting for a held-back packet.
    pub stretched: u64,
    /// Packets dropped to bring the delay back down.
    pub skipped: u64,
}

#[derive(Debug)]
pub struct JitterBuffer {
    /// Packets by extended sequence number.
    packets: BTreeMap<u64, Vec<u8>>,
    /// The extended sequence number of the newest packet so far.
    newest: Option<u64>,
    /// The next to play (None: not started).
    next: Option<u64>,
    /// Transit times (arrival minus RTP time, ms, relative to the first packet) of the
    /// packets of the last window.
    transit: VecDeque<(Instant, f64)>,
    first: Option<(Instant, u32)>,
    target: Duration,
    /// Frames in a row with nothing to play.
    empty_ticks: u32,
    /// Frames played since a packet was last dropped.
    since_skip: u32,
    stats: JitterStats,
}

/// One packet: 20 ms of audio, 960 RTP ticks at 48 kHz.
const FRAME: Duration = Duration::from_millis(20);
const TICKS_PER_MS: f64 = 48.0;

impl Default for JitterBuffer {
    fn default() -> Self {
        JitterBuffer::new()
    }
}

impl JitterBuffer {
    pub const MIN_TARGET: Duration = Duration::from_millis(40);
    pub const MAX_TARGET: Duration = Duration::from_millis(300);
    pub const WINDOW: Duration = Duration::from_secs(10);
    /// Held beyond the target by this much, a packet is dropped.
    pub const EXCESS: Duration = Duration::from_millis(60);
    /// After this many frames with nothing to play (the other side stopped sending, or
    /// the path is down), playing stops until the target is buffered again.
    const MAX_EMPTY_TICKS: u32 = 25;
    /// At most one packet in this many frames is dropped (each drop is a small jump in
    /// the sound): excess delay goes at 20 ms per 100 ms.
    const SKIP_EVERY: u32 = 5;
    /// A packet this far ahead of the one due restarts the sequence (a new sender).
    const MAX_JUMP: u64 = 500;

    pub fn new() -> JitterBuffer {
        JitterBuffer {
            packets: BTreeMap::new(),
            newest: None,
            next: None,
            transit: VecDeque::new(),
            first: None,
            target: Self::MIN_TARGET,
            empty_ticks: 0,
            since_skip: 0,
            stats: JitterStats::default(),
        }
    }

    /// The delay it aims to hold.
    pub fn target(&self) -> Duration {
        self.target
    }

    /// The audio held now, from the frame due to the newest packet.
    pub fn delay(&self) -> Duration {
        match (self.next, self.newest) {
            (Some(next), Some(newest)) if newest >= next => FRAME * (newest - next + 1) as u32,
            (None, Some(_)) => FRAME * self.packets.len() as u32,
            _ => Duration::ZERO,
        }
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// The extended form of a 16-bit sequence number, near the newest.
    fn extend(&self, seq: u16) -> u64 {
        let Some(newest) = self.newest else {
            return u64::from(seq) + (1 << 16);
        };
        let base = newest & !0xffff;
        [base.wrapping_sub(1 << 16), base, base + (1 << 16)]
            .into_iter()
            .map(|b| b + u64::from(seq))
            .min_by_key(|c| c.abs_diff(newest))
            .unwrap_or(newest)
    }

    /// A packet arrived at `now`.
    pub fn push(&mut self, now: Instant, seq: u16, rtp_time: u32, payload: Vec<u8>) {
        let ext = self.extend(seq);
        if let Some(newest) = self.newest {
            if ext > newest + Self::MAX_JUMP {
                // A new sequence (the sender started over): so do we.
                *self = JitterBuffer {
                    stats: self.stats,
                    ..JitterBuffer::new()
                };
                return self.push(now, seq, rtp_time, payload);
            }
            if ext + Self::MAX_JUMP < newest {
                self.stats.late += 1;
                return;
            }
        }
        if self.next.is_some_and(|next| ext < next) {
            self.stats.late += 1;
            return;
        }
        self.newest = Some(self.newest.map_or(ext, |n| n.max(ext)));
        self.packets.insert(ext, payload);
        self.measure(now, rtp_time);
    }

    fn measure(&mut self, now: Instant, rtp_time: u32) {
        let (t0, ts0) = *self.first.get_or_insert((now, rtp_time));
        let media_ms = f64::from(rtp_time.wrapping_sub(ts0) as i32) / TICKS_PER_MS;
        let arrival_ms = now.saturating_duration_since(t0).as_secs_f64() * 1000.0;
        self.transit.push_back((now, arrival_ms - media_ms));
        while self
            .transit
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) > Self::WINDOW)
        {
            self.transit.pop_front();
        }
        let min = self
            .transit
            .iter()
            .map(|&(_, t)| t)
            .fold(f64::INFINITY, f64::min);
        let mut late: Vec<f64> = self.transit.iter().map(|&(_, t)| t - min).collect();
        late.sort_by(f64::total_cmp);
        let p97 = late
            .get((late.len() * 97 / 100).min(late.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0);
        // The packet due waits behind the newest: one frame, plus one frame of margin.
        let target = Duration::from_secs_f64((p97.max(0.0) + 40.0) / 1000.0);
        self.target = target.clamp(Self::MIN_TARGET, Self::MAX_TARGET);
    }

    /// The frame to play now (called every 20 ms); None: nothing to play.
    pub fn pop(&mut self) -> Option<Playout> {
        let Some(next) = self.next else {
            // Not playing: start once the target is held.
            let first = *self.packets.keys().next()?;
            if self.delay() < self.target {
                return None;
            }
            self.next = Some(first);
            self.empty_ticks = 0;
            return self.pop();
        };
        self.since_skip = self.since_skip.saturating_add(1);
        if self.newest.is_none_or(|newest| newest < next) {
            // Nothing here: wait for it, and stop after a while.
            self.empty_ticks += 1;
            if self.empty_ticks > Self::MAX_EMPTY_TICKS {
                self.next = None;
                return None;
            }
            self.stats.stretched += 1;
            return Some(Playout::Stretch);
        }
        self.empty_ticks = 0;
        if !self.packets.contains_key(&next) {
            if self.delay() < self.target {
                // Late, or lost: the buffer is short of its target anyway, so wait.
                self.stats.stretched += 1;
                return Some(Playout::Stretch);
            }
            self.next = Some(next + 1);
            self.stats.lost += 1;
            return Some(Playout::Lost {
                next: self.packets.get(&(next + 1)).cloned(),
            });
        }
        let mut due = next;
        if self.delay() > self.target + Self::EXCESS
            && self.since_skip >= Self::SKIP_EVERY
            && self.packets.contains_key(&(next + 1))
        {
            self.packets.remove(&next);
            due = next + 1;
            self.since_skip = 0;
            self.stats.skipped += 1;
        }
        self.next = Some(due + 1);
        self.packets.remove(&due).map(Playout::Packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_TEST_DELAY: u64 = 200;

    /// Feeds packets sent every 20 ms, arriving `delay(i)` ms after they were sent, and
    /// plays every 20 ms; returns what was played and the target at the end.
    fn run(
        packets: u16,
        first_seq: u16,
        mut delay: impl FnMut(u16) -> Option<u64>,
    ) -> (Vec<Playout>, JitterBuffer) {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        let mut arrivals: Vec<(u64, u16)> = (0..packets)
            .filter_map(|i| delay(i).map(|d| (u64::from(i) * 20 + d, i)))
            .collect();
        arrivals.sort();
        let mut played = Vec::new();
        let mut arrivals = arrivals.into_iter().peekable();
        // Until the last packet has had time to play, and a little more.
        let end = u64::from(packets) * 20 + 2 * MAX_TEST_DELAY + 40;
        for ms in 0..end {
            while let Some(&(at, i)) = arrivals.peek() {
                if at > ms {
                    break;
                }
                let seq = first_seq.wrapping_add(i);
                let now = t0 + Duration::from_millis(at);
                jb.push(now, seq, u32::from(i) * 960, vec![i as u8, (i >> 8) as u8]);
                arrivals.next();
            }
            if ms % 20 == 10
                && let Some(p) = jb.pop()
            {
                played.push(p);
            }
        }
        (played, jb)
    }

    fn index(p: &Playout) -> Option<u16> {
        match p {
            Playout::Packet(b) => Some(u16::from(b[0]) | (u16::from(b[1]) << 8)),
            _ => None,
        }
    }

    #[test]
    fn a_steady_path_plays_everything_in_order_with_a_small_delay() {
        let (played, jb) = run(500, 65_000, |_| Some(5));
        let order: Vec<u16> = played.iter().filter_map(index).collect();
        assert_eq!(order, (0..500).collect::<Vec<_>>(), "across the wrap");
        let stats = jb.stats();
        assert_eq!(
            (stats.late, stats.lost, stats.skipped),
            (0, 0, 0),
            "{stats:?}"
        );
        assert!(
            stats.stretched <= 25,
            "only after the last packet: {stats:?}"
        );
        assert!(
            jb.target() <= Duration::from_millis(45),
            "{:?}",
            jb.target()
        );
    }

    #[test]
    fn jitter_raises_the_target_until_nothing_comes_too_late() {
        // Each packet 0-80 ms late (a spread pattern), for 20 s.
        let (played, jb) = run(1000, 0, |i| Some(u64::from(i * 37 % 81)));
        let target = jb.target();
        assert!(
            (Duration::from_millis(100)..=Duration::from_millis(130)).contains(&target),
            "{target:?}"
        );
        // Once adapted (after the first second), every packet plays.
        let order: Vec<u16> = played.iter().filter_map(index).collect();
        let after: Vec<u16> = order.iter().copied().filter(|&i| i >= 100).collect();
        assert_eq!(after, (100..1000).collect::<Vec<_>>());
        assert!(jb.stats().late <= 10, "{:?}", jb.stats());
    }

    #[test]
    fn a_lost_packet_is_concealed_with_the_next_packets_fec() {
        let (played, jb) = run(50, 10, |i| (i != 20).then_some(0));
        let lost = played
            .iter()
            .position(|p| matches!(p, Playout::Lost { .. }))
            .expect("a loss");
        assert_eq!(index(&played[lost - 1]), Some(19));
        assert_eq!(
            played[lost],
            Playout::Lost {
                next: Some(vec![21, 0])
            }
        );
        assert_eq!(index(&played[lost + 1]), Some(21));
        assert_eq!(jb.stats().lost, 1);
    }

    #[test]
    fn a_held_back_burst_stretches_then_the_extra_delay_is_given_back() {
        // Packets 100-109 are held 200 ms, then all arrive at once.
        let (played, jb) = run(600, 0, |i| {
            Some(if (100..110).contains(&i) {
                200 - u64::from(i - 100) * 20
            } else {
                0
            })
        });
        let stats = jb.stats();
        assert!(stats.stretched >= 5, "{stats:?}");
        assert_eq!(stats.late, 0, "waited for, not dropped: {stats:?}");
        let order: Vec<u16> = played.iter().filter_map(index).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "in order");
        assert!(order.contains(&105));
        assert!(stats.skipped >= 1, "{stats:?}");
        assert!(
            jb.delay() <= jb.target() + JitterBuffer::EXCESS,
            "the delay came back down: {:?} target {:?}",
            jb.delay(),
            jb.target()
        );
    }

    #[test]
    fn silence_from_the_sender_stops_playing_and_a_new_sequence_starts_over() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut jb = JitterBuffer::new();
        jb.push(ms(0), 5, 0, vec![1]);
        assert_eq!(jb.pop(), None, "one packet is under the target");
        jb.push(ms(20), 6, 960, vec![2]);
        assert_eq!(jb.pop(), Some(Playout::Packet(vec![1])));
        assert_eq!(jb.pop(), Some(Playout::Packet(vec![2])));
        for _ in 0..JitterBuffer::MAX_EMPTY_TICKS {
            assert_eq!(jb.pop(), Some(Playout::Stretch));
        }
        assert_eq!(jb.pop(), None, "stopped");
        // A sender that starts over far away in the sequence.
        jb.push(ms(5000), 30_000, 5_000_000, vec![9]);
        jb.push(ms(5020), 30_001, 5_000_960, vec![10]);
        assert_eq!(jb.pop(), Some(Playout::Packet(vec![9])));
        jb.push(ms(5030), 7, 1920, vec![0]);
        assert_eq!(jb.stats().late, 1, "from before the restart");
        assert_eq!(jb.pop(), Some(Playout::Packet(vec![10])));
    }
}
