//! `Ladder`: which resolution and frame rate to send at a given bitrate, libwebrtc's
//! "balanced" degradation as a pure type. Bitrates in, (height, fps) decisions out.
//!
//! - Down after [`Ladder::DOWN_AFTER`]: when the bitrate has stayed below what the current
//!   rung needs that long, the sender steps to the highest rung the bitrate can hold then
//!   (720p -> 540p -> 360p -> 270p -> 180p), in one step; below the lowest rung's floor the
//!   frame rate goes down instead (30 -> 20 -> 15 fps). Meanwhile the encoder already
//!   sends at the lower bitrate (smaller frames at a lower quality). Why wait: a new
//!   resolution starts with a keyframe, and a bitrate that has just fallen is a link that
//!   has just narrowed, its queue full. A keyframe sent into that queue is dropped and
//!   asked for again, and two quick steps (480p -> 360p -> 270p as the estimate comes
//!   down) are two of them. libwebrtc too scales down only after its quality scaler has
//!   seen a high quantizer for a while.
//! - At once when a keyframe is coming anyway (the receiver lost a frame and asked for
//!   one): the wait only spares a keyframe, and this one is paid already. Sent at the
//!   lower resolution it is also smaller, so it crosses the narrowed link sooner
//!   ([`Ladder::keyframe_coming`]).
//! - Up slowly: one step at a time, and only after the bitrate has stayed above the next
//!   rung's (higher) threshold for [`Ladder::UP_AFTER`]; the gap between the two
//!   thresholds and the wait are the hysteresis that keeps it from flapping.
//! - Never above the source: a 360p camera starts (and stays at most) at 360p.

use std::time::{Duration, Instant};

/// One step of the ladder: a picture height, and the video bitrates (bits per second)
/// below which it is left and above which it is entered from the rung below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rung {
    pub height: usize,
    pub stay_above: u32,
    pub enter_above: u32,
}

/// Heights and thresholds at 30 fps for openh264 at Constrained Baseline, from
/// libwebrtc's defaults for the same resolutions, rounded.
pub const RUNGS: [Rung; 5] = [
    Rung {
        height: 720,
        stay_above: 1_000_000,
        enter_above: 1_500_000,
    },
    Rung {
        height: 540,
        stay_above: 600_000,
        enter_above: 900_000,
    },
    Rung {
        height: 360,
        stay_above: 300_000,
        enter_above: 450_000,
    },
    Rung {
        height: 270,
        stay_above: 180_000,
        enter_above: 270_000,
    },
    Rung {
        height: 180,
        stay_above: 0,
        enter_above: 0,
    },
];

/// Frame rates below the lowest rung, with the bitrate each needs to stay and to enter.
const FRAME_RATES: [(f32, u32, u32); 3] = [
    (30.0, 110_000, 160_000),
    (20.0, 75_000, 110_000),
    (15.0, 0, 0),
];

/// What to send: picture height (the width follows the source's aspect) and frame rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub height: usize,
    pub fps: f32,
}

/// Where the sender is on the ladder. See the module docs.
#[derive(Debug, Clone)]
pub struct Ladder {
    /// The highest rung the source allows, and the height sent there.
    top: usize,
    top_height: usize,
    rung: usize,
    rate: usize,
    /// Since when the bitrate has allowed a step up.
    up_since: Option<Instant>,
    /// Since when it has been below what the current step needs.
    down_since: Option<Instant>,
    /// The latest bitrate given to [`Ladder::update`].
    bps: u32,
    source_fps: f32,
}

impl Ladder {
    /// How long the bitrate must allow a step up before it is taken.
    pub const UP_AFTER: Duration = Duration::from_secs(3);
    /// How long the bitrate must stay below the current step's floor before stepping down.
    pub const DOWN_AFTER: Duration = Duration::from_millis(1500);

    /// A ladder for a source of this height and frame rate, starting at the top: the
    /// source's own height (at most 720p), with the thresholds of the smallest rung that
    /// is at least as high (a 480p camera is sent at 480p, and holds it like 540p).
    pub fn new(source_height: usize, source_fps: f32) -> Ladder {
        let top = RUNGS
            .iter()
            .rposition(|r| r.height >= source_height)
            .unwrap_or(0);
        Ladder {
            top,
            top_height: source_height.min(RUNGS[top].height),
            rung: top,
            rate: 0,
            up_since: None,
            down_since: None,
            bps: 0,
            source_fps,
        }
    }

    /// The same ladder, started on the highest rung `bps` can *enter*, not merely hold: a
    /// call's first bitrate is a guess, and a step down in its first second costs a
    /// keyframe while the link is least known (on a lossy link, a freeze). libwebrtc
    /// limits the first frames' size by the start bitrate the same way; the picture grows
    /// once the estimate does.
    pub fn starting_at(mut self, bps: u32) -> Ladder {
        while self.rung + 1 < RUNGS.len() && bps < RUNGS[self.rung].enter_above {
            self.rung += 1;
        }
        self
    }

    /// The latest bitrate given to [`Ladder::update`] (bits per second, video).
    pub fn bitrate(&self) -> u32 {
        self.bps
    }

    /// What to send now.
    pub fn step(&self) -> Step {
        let height = if self.rung == self.top {
            self.top_height
        } else {
            RUNGS[self.rung].height
        };
        Step {
            height,
            fps: FRAME_RATES[self.rate].0.min(self.source_fps),
        }
    }

    /// The video bitrate changed (or is the same, later): the new step if it changes.
    pub fn update(&mut self, bps: u32, now: Instant) -> Option<Step> {
        let before = self.step();
        self.bps = bps;
        let below = if self.rung + 1 < RUNGS.len() {
            self.rate == 0 && bps < RUNGS[self.rung].stay_above
        } else {
            self.rate + 1 < FRAME_RATES.len() && bps < FRAME_RATES[self.rate].1
        };
        if !below {
            self.down_since = None;
        } else if now.saturating_duration_since(*self.down_since.get_or_insert(now))
            < Ladder::DOWN_AFTER
        {
            self.up_since = None;
            return None;
        }
        self.step_down(bps);
        // Up one step, after the bitrate has allowed it for a while.
        let can_go_up = if self.rate > 0 {
            bps >= FRAME_RATES[self.rate - 1].2
        } else {
            self.rung > self.top && bps >= RUNGS[self.rung - 1].enter_above
        };
        if can_go_up {
            let since = *self.up_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= Ladder::UP_AFTER {
                if self.rate > 0 {
                    self.rate -= 1;
                } else {
                    self.rung -= 1;
                }
                self.up_since = None;
            }
        } else {
            self.up_since = None;
        }
        let after = self.step();
        (after != before).then_some(after)
    }
}

impl Ladder {
    /// A keyframe is about to be made for another reason (a receiver asked for one): a
    /// step down the latest bitrate is waiting for is taken now, with that keyframe,
    /// instead of costing one more later. The new step, if it changes.
    pub fn keyframe_coming(&mut self) -> Option<Step> {
        // Only while a step down waits.
        self.down_since?;
        let before = self.step();
        self.step_down(self.bps);
        let after = self.step();
        (after != before).then_some(after)
    }

    /// Down as far as `bps` needs now: the rungs (the frame rate is only lowered at the
    /// bottom rung), then the frame rate.
    fn step_down(&mut self, bps: u32) {
        self.down_since = None;
        while self.rate == 0 && self.rung + 1 < RUNGS.len() && bps < RUNGS[self.rung].stay_above {
            self.rung += 1;
            self.up_since = None;
        }
        if self.rung + 1 == RUNGS.len() {
            while self.rate + 1 < FRAME_RATES.len() && bps < FRAME_RATES[self.rate].1 {
                self.rate += 1;
                self.up_since = None;
            }
        }
    }
}

/// The picture size for a step: `height`, and the width that keeps the source's aspect,
/// both even (I420 halves them for chroma). Never larger than the source.
pub fn scaled_size(source: (usize, usize), height: usize) -> (usize, usize) {
    let (w, h) = source;
    if height >= h || h == 0 {
        return source;
    }
    let width = (w * height + h / 2) / h;
    (width.max(2) & !1, height.max(2) & !1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_starts_on_the_rung_its_start_bitrate_can_enter() {
        let t = Instant::now();
        // 670 kbit/s holds 540p (a 480p source's rung) but cannot enter it: 360p.
        let mut l = Ladder::new(480, 30.0).starting_at(670_000);
        assert_eq!(l.step().height, 360);
        // No step down when the first estimate comes a little lower; up once it allows.
        assert_eq!(l.update(500_000, t), None);
        assert_eq!(l.update(1_000_000, t), None);
        assert_eq!(
            l.update(1_000_000, t + Ladder::UP_AFTER).map(|s| s.height),
            Some(480)
        );
        // Enough to enter the top: it starts there.
        assert_eq!(
            Ladder::new(720, 30.0).starting_at(2_000_000).step().height,
            720
        );
        assert_eq!(
            Ladder::new(720, 30.0).starting_at(100_000).step().height,
            180
        );
    }

    #[test]
    fn steps_down_after_a_while_as_far_as_needed_then() {
        let t = Instant::now();
        let later = |secs: f64| t + Duration::from_secs_f64(secs);
        let wait = Ladder::DOWN_AFTER.as_secs_f64();
        let mut l = Ladder::new(720, 30.0);
        assert_eq!(
            l.step(),
            Step {
                height: 720,
                fps: 30.0
            }
        );
        assert_eq!(l.update(2_000_000, t), None);
        // A dip shorter than the wait changes nothing.
        assert_eq!(l.update(700_000, t), None);
        assert_eq!(l.update(2_000_000, later(wait / 2.0)), None);
        assert_eq!(l.update(700_000, later(wait)), None);
        assert_eq!(
            l.update(700_000, later(2.0 * wait)),
            Some(Step {
                height: 540,
                fps: 30.0
            })
        );
        // The estimate coming down in steps (a link that narrowed): one step down, to
        // where the bitrate is when the wait has run out.
        assert_eq!(l.update(500_000, later(3.0 * wait)), None);
        assert_eq!(l.update(350_000, later(3.5 * wait)), None);
        assert_eq!(
            l.update(200_000, later(4.0 * wait)),
            Some(Step {
                height: 270,
                fps: 30.0
            })
        );
        // Below the bottom rung's floor, the frame rate gives.
        assert_eq!(l.update(90_000, later(5.0 * wait)), None);
        assert_eq!(
            l.update(90_000, later(6.0 * wait)),
            Some(Step {
                height: 180,
                fps: 20.0
            })
        );
        assert_eq!(l.update(90_000, later(7.0 * wait)), None);
        assert_eq!(l.update(50_000, later(9.0 * wait)), None);
        assert_eq!(
            l.update(50_000, later(10.0 * wait)).map(|s| s.fps),
            Some(15.0)
        );
    }

    #[test]
    fn a_keyframe_asked_for_takes_a_waiting_step_down_with_it() {
        let t = Instant::now();
        let mut l = Ladder::new(480, 30.0);
        assert_eq!(l.update(1_500_000, t), None);
        // Nothing waits: a keyframe changes nothing.
        assert_eq!(l.keyframe_coming(), None);
        // The link narrowed (a receiver's "send at most 370 kbit/s" with its keyframe
        // request): no waiting for the step down, it comes with that keyframe, as far
        // as the bitrate needs (480p holds like 540p: 600 kbit/s; 360p 300 kbit/s).
        assert_eq!(l.update(370_000, t), None);
        assert_eq!(
            l.keyframe_coming(),
            Some(Step {
                height: 360,
                fps: 30.0
            })
        );
        // Taken: the next keyframe, and the wait's end, change nothing more.
        assert_eq!(l.keyframe_coming(), None);
        assert_eq!(l.update(370_000, t + Ladder::DOWN_AFTER * 2), None);
        // A dip that is over by the time of the keyframe is not a step.
        assert_eq!(l.update(200_000, t + Ladder::DOWN_AFTER * 3), None);
        assert_eq!(l.update(400_000, t + Ladder::DOWN_AFTER * 3), None);
        assert_eq!(l.keyframe_coming(), None);
        assert_eq!(l.step().height, 360);
    }

    #[test]
    fn steps_up_one_at_a_time_after_the_bitrate_has_held() {
        let t = Instant::now();
        let mut l = Ladder::new(720, 30.0);
        for i in 0..10 {
            l.update(50_000, t + Ladder::DOWN_AFTER * i);
        }
        assert_eq!(
            l.step(),
            Step {
                height: 180,
                fps: 15.0
            }
        );
        // Enough for everything, but only one step per UP_AFTER.
        let mut at = t;
        let mut steps = Vec::new();
        for _ in 0..60 {
            at += Duration::from_millis(500);
            if let Some(s) = l.update(3_000_000, at) {
                steps.push((s, at - t));
            }
        }
        let order: Vec<(usize, f32)> = steps.iter().map(|(s, _)| (s.height, s.fps)).collect();
        assert_eq!(
            order,
            [
                (180, 20.0),
                (180, 30.0),
                (270, 30.0),
                (360, 30.0),
                (540, 30.0),
                (720, 30.0)
            ]
        );
        for pair in steps.windows(2) {
            assert!(pair[1].1 - pair[0].1 >= Ladder::UP_AFTER);
        }
    }

    #[test]
    fn a_bitrate_between_the_thresholds_does_not_flap() {
        let t = Instant::now();
        let mut l = Ladder::new(720, 30.0);
        l.update(800_000, t);
        l.update(800_000, t + Ladder::DOWN_AFTER); // 540p
        assert_eq!(l.step().height, 540);
        // Between 540p's floor and 720p's entry: stays, however long.
        for i in 1..20 {
            assert_eq!(l.update(1_200_000, t + Duration::from_secs(i)), None);
        }
        // A dip resets the wait for going up.
        let (t0, t) = (t, t + Ladder::DOWN_AFTER);
        let mut l = Ladder::new(720, 30.0);
        l.update(800_000, t0);
        l.update(800_000, t);
        assert_eq!(l.step().height, 540);
        l.update(1_600_000, t);
        l.update(800_000, t + Duration::from_secs(2));
        assert_eq!(l.update(1_600_000, t + Duration::from_secs(4)), None);
        assert_eq!(
            l.update(1_600_000, t + Duration::from_secs(7))
                .map(|s| s.height),
            Some(720)
        );
    }

    #[test]
    fn a_source_between_rungs_is_sent_at_its_own_height_first() {
        let t = Instant::now();
        let mut l = Ladder::new(480, 30.0);
        assert_eq!(
            l.step(),
            Step {
                height: 480,
                fps: 30.0
            }
        );
        // It holds like 540p, then steps to the rungs below, and back to 480.
        assert_eq!(l.update(500_000, t), None);
        assert_eq!(
            l.update(500_000, t + Ladder::DOWN_AFTER).map(|s| s.height),
            Some(360)
        );
        let back = (1..10).find_map(|i| l.update(1_000_000, t + Duration::from_secs(i)));
        assert_eq!(back.map(|s| s.height), Some(480));
        // Above 720p, 720p is the top.
        assert_eq!(Ladder::new(1080, 30.0).step().height, 720);
        assert_eq!(Ladder::new(100, 30.0).step().height, 100);
    }

    #[test]
    fn never_above_the_source() {
        let t = Instant::now();
        let mut l = Ladder::new(360, 15.0);
        assert_eq!(
            l.step(),
            Step {
                height: 360,
                fps: 15.0
            }
        );
        assert_eq!(l.update(5_000_000, t + Duration::from_secs(10)), None);
        assert_eq!(scaled_size((640, 360), 720), (640, 360));
        assert_eq!(scaled_size((1280, 720), 540), (960, 540));
        assert_eq!(scaled_size((640, 480), 270), (360, 270));
        assert_eq!(scaled_size((1280, 720), 180), (320, 180));
        assert_eq!(scaled_size((641, 361), 180), (320, 180));
    }
}
