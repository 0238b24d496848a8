//! Time as the state machine sees it: a monotonic instant for timers (ring timeouts,
//! how long a room has been empty) and the wall clock for schedules (`starts_at`), which
//! people set by the calendar. Both are passed in, never read inside [`crate::core::rooms`],
//! so the rules stay testable; this module also holds the RFC 3339 helpers of the API.

use std::time::{Duration, Instant};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// One moment, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// For durations: never jumps.
    pub mono: Instant,
    /// For schedules: UTC, whole seconds.
    pub wall: OffsetDateTime,
}

impl Now {
    /// The system's clocks right now.
    pub fn system() -> Now {
        Now {
            mono: Instant::now(),
            wall: whole_seconds(OffsetDateTime::now_utc()),
        }
    }

    /// The same moment `d` later on both clocks (for tests and simulations).
    pub fn later(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            wall: self.wall + d,
        }
    }

    /// The wall-clock time of a monotonic `instant` (earlier or later than now).
    pub fn wall_of(&self, instant: Instant) -> OffsetDateTime {
        if instant >= self.mono {
            self.wall + instant.duration_since(self.mono)
        } else {
            self.wall - self.mono.duration_since(instant)
        }
    }
}

/// `t` in UTC without its fraction of a second.
pub fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    from_unix(t.unix_timestamp()).unwrap_or(t)
}

/// Seconds since 1970 as a UTC time; `None` out of range.
pub fn from_unix(seconds: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(seconds).ok()
}

/// RFC 3339 in UTC, e.g. `2026-11-20T10:00:00Z`.
pub fn format_rfc3339(t: OffsetDateTime) -> String {
    whole_seconds(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses RFC 3339 (`2026-11-20T10:00:00Z`, `2026-11-20T11:00:00+01:00`, fractions of a
/// second allowed, then dropped) into UTC whole seconds.
pub fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text.trim(), &Rfc3339)
        .map(|t| whole_seconds(t.to_offset(time::UtcOffset::UTC)))
        .map_err(|e| format!("not an RFC 3339 date-time such as 2026-11-20T10:00:00Z ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_in_utc() {
        let t = parse_rfc3339("2026-11-20T11:00:00.75+01:00").unwrap();
        assert_eq!(format_rfc3339(t), "2026-11-20T10:00:00Z");
        assert!(parse_rfc3339("2026-11-20 10:00").is_err());
        assert!(parse_rfc3339("tomorrow").is_err());
        let now = Now::system();
        let later = now.later(Duration::from_secs(90));
        assert_eq!(later.wall - now.wall, time::Duration::seconds(90));
        assert_eq!(now.wall_of(later.mono), later.wall);
        assert_eq!(later.wall_of(now.mono), now.wall);
    }
}
