//! Flood control: the protocol's token bucket (per WebSocket connection; the HTTP API
//! keeps one per client address), and [`PerAddress`], the count of connections each
//! client address holds (for the per-address connection limits of the server and of the
//! TURN fronts).
//!
//! A bucket of `burst` messages refills at `per_second`. A message that finds it empty
//! is dropped; the client hears `error/rate_limited` at most once a second; and more than
//! `max_dropped` drops without a one-second pause close the connection with 1008.
//! Time is passed in, so the rules are tested without sleeping.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to do with one incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Process it.
    Allow,
    /// Drop it; `notify` says whether to answer `error/rate_limited` this time.
    Drop { notify: bool },
    /// Drop it and close the connection with 1008 (policy violation).
    Close,
}

/// Token bucket settings; `per_second == 0.0` turns limiting off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: f64,
    pub per_second: f64,
    pub max_dropped: u32,
}

/// One connection's bucket.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    tokens: f64,
    refilled_at: Instant,
    dropped_in_a_row: u32,
    last_drop: Option<Instant>,
    last_notice: Option<Instant>,
}

const PAUSE: Duration = Duration::from_secs(1);

impl RateLimiter {
    pub fn new(limit: RateLimit, now: Instant) -> RateLimiter {
        RateLimiter {
            limit,
            tokens: limit.burst,
            refilled_at: now,
            dropped_in_a_row: 0,
            last_drop: None,
            last_notice: None,
        }
    }

    /// Charges one message arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.limit.per_second <= 0.0 {
            return Verdict::Allow;
        }
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        let paused = self
            .last_drop
            .is_none_or(|t| now.saturating_duration_since(t) >= PAUSE);
        self.dropped_in_a_row = if paused { 1 } else { self.dropped_in_a_row + 1 };
        self.last_drop = Some(now);
        if self.dropped_in_a_row > self.limit.max_dropped {
            return Verdict::Close;
        }
        let notify = self
            .last_notice
            .is_none_or(|t| now.saturating_duration_since(t) >= PAUSE);
        if notify {
            self.last_notice = Some(now);
        }
        Verdict::Drop { notify }
    }

    /// How long after the last [`check`](Self::check) until one message would be
    /// allowed again (zero when one would be now, or when limiting is off).
    pub fn retry_after(&self) -> Duration {
        if self.limit.per_second <= 0.0 || self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.limit.per_second)
    }
}

/// How many connections each address holds; [`Present`] counts one while it lives.
#[derive(Debug, Default)]
pub(crate) struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PerAddress {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more from `ip`; returns it with how many `ip` holds now, this one included.
    pub(crate) fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> (Present, usize) {
        let mut map = self.lock();
        let n = map.entry(ip).or_insert(0);
        *n += 1;
        (Present(Arc::clone(self), ip), *n)
    }
}

/// One connection counted in a [`PerAddress`] until dropped.
#[derive(Debug)]
pub(crate) struct Present(Arc<PerAddress>, std::net::IpAddr);

impl Drop for Present {
    fn drop(&mut self) {
        let mut map = self.0.lock();
        if let Some(n) = map.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: RateLimit = RateLimit {
        burst: 200.0,
        per_second: 50.0,
        max_dropped: 50,
    };

    #[test]
    fn burst_then_drop_then_close() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(SPEC, t0);
        for _ in 0..200 {
            assert_eq!(r.check(t0), Verdict::Allow);
        }
        assert_eq!(r.check(t0), Verdict::Drop { notify: true });
        for _ in 0..49 {
            assert_eq!(r.check(t0), Verdict::Drop { notify: false });
        }
        assert_eq!(r.check(t0), Verdict::Close);
    }

    #[test]
    fn refills_and_pause_resets_the_streak() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(SPEC, t0);
        for _ in 0..200 {
            r.check(t0);
        }
        for _ in 0..40 {
            assert!(matches!(r.check(t0), Verdict::Drop { .. }));
        }
        // A 1-second pause: 50 tokens back and the drop streak forgotten.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..50 {
            assert_eq!(r.check(t1), Verdict::Allow);
        }
        assert_eq!(r.check(t1), Verdict::Drop { notify: true });
        for _ in 0..49 {
            assert!(matches!(r.check(t1), Verdict::Drop { .. }));
        }
        assert_eq!(r.check(t1), Verdict::Close);
    }

    #[test]
    fn steady_rate_under_the_limit_is_never_dropped() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(SPEC, t0);
        for i in 0..10_000u64 {
            let t = t0 + Duration::from_millis(i * 21); // ~47.6 msg/s
            assert_eq!(r.check(t), Verdict::Allow);
        }
    }

    #[test]
    fn retry_after_is_the_time_to_the_next_token() {
        let t0 = Instant::now();
        let per_minute = RateLimit {
            burst: 2.0,
            per_second: 10.0 / 60.0,
            max_dropped: u32::MAX,
        };
        let mut r = RateLimiter::new(per_minute, t0);
        assert_eq!(r.retry_after(), Duration::ZERO);
        assert_eq!(r.check(t0), Verdict::Allow);
        assert_eq!(r.check(t0), Verdict::Allow);
        assert!(matches!(r.check(t0), Verdict::Drop { .. }));
        let wait = r.retry_after();
        assert!(
            (wait.as_secs_f64() - 6.0).abs() < 0.01,
            "one token every 6 s: {wait:?}"
        );
        assert!(matches!(r.check(t0 + wait / 2), Verdict::Drop { .. }));
        assert_eq!(
            r.check(t0 + wait + Duration::from_millis(1)),
            Verdict::Allow
        );
    }

    #[test]
    fn zero_rate_means_unlimited() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(
            RateLimit {
                per_second: 0.0,
                ..SPEC
            },
            t0,
        );
        for _ in 0..100_000 {
            assert_eq!(r.check(t0), Verdict::Allow);
        }
    }
}
