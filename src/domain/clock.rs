//! Time as an injectable dependency, so signature windows, attribution windows and
//! secret grace periods can be pinned in tests.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Milliseconds since the Unix epoch, UTC. All stored times use this unit.
pub type UnixMillis = i64;

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> UnixMillis;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMillis {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(now_ms: UnixMillis) -> Self {
        ManualClock(Arc::new(AtomicI64::new(now_ms)))
    }

    pub fn set_ms(&self, now_ms: UnixMillis) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance_ms(&self, by: i64) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> UnixMillis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Formats a time as RFC 3339 with millisecond precision (`2026-11-20T10:00:00.000Z`).
pub fn format_rfc3339(ms: UnixMillis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => {
            let fmt = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&fmt).unwrap_or_default()
        }
        Err(_) => String::new(),
    }
}

/// Parses an RFC 3339 timestamp (any offset) into Unix milliseconds.
///
/// # Errors
/// Returns a message saying what was expected when the text is not RFC 3339.
pub fn parse_rfc3339(text: &str) -> Result<UnixMillis, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| "expected an RFC 3339 timestamp such as 2026-11-20T10:00:00Z".to_string())?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| "timestamp out of range".into())
}

/// Says how long `ms` is in the largest whole unit, for reasons ("2 days", "1 hour").
pub fn human_duration(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    let (n, unit) = if secs >= 86_400 {
        (secs / 86_400, "day")
    } else if secs >= 3600 {
        (secs / 3600, "hour")
    } else if secs >= 60 {
        (secs / 60, "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

fn datetime(ms: UnixMillis) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `ms` plus `months` calendar months (UTC), the day clamped to the month's length:
/// 31 January + 1 month = 28 (or 29) February.
pub fn add_months(ms: UnixMillis, months: u32) -> UnixMillis {
    let t = datetime(ms);
    let total = i64::from(t.year()) * 12 + i64::from(u8::from(t.month()) - 1) + i64::from(months);
    let (year, month0) = (total.div_euclid(12), total.rem_euclid(12));
    let Ok(month) = time::Month::try_from(u8::try_from(month0 + 1).unwrap_or(1)) else { return ms };
    let year = i32::try_from(year).unwrap_or(i32::MAX);
    let day = t.day().min(month.length(year));
    match time::Date::from_calendar_date(year, month, day) {
        Ok(date) => {
            let moved = t.replace_date(date);
            i64::try_from(moved.unix_timestamp_nanos() / 1_000_000).unwrap_or(ms)
        }
        Err(_) => ms,
    }
}

/// The calendar month (UTC) of `ms` as `YYYYMM`, e.g. 202611.
pub fn month_of(ms: UnixMillis) -> u32 {
    let t = datetime(ms);
    u32::try_from(t.year()).unwrap_or(0) * 100 + u32::from(u8::from(t.month()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        let jan31 = parse_rfc3339("2026-01-31T12:00:00Z").unwrap();
        assert_eq!(format_rfc3339(add_months(jan31, 1)), "2026-02-28T12:00:00.000Z");
        assert_eq!(format_rfc3339(add_months(jan31, 12)), "2027-01-31T12:00:00.000Z");
        assert_eq!(format_rfc3339(add_months(jan31, 13)), "2027-02-28T12:00:00.000Z");
        let leap = parse_rfc3339("2028-02-29T00:00:00Z").unwrap();
        assert_eq!(format_rfc3339(add_months(leap, 12)), "2029-02-28T00:00:00.000Z");
        assert_eq!(month_of(jan31), 202601);
        assert_eq!(month_of(parse_rfc3339("2026-12-31T23:59:59Z").unwrap()), 202612);
    }

    #[test]
    fn rfc3339_round_trip() {
        let ms = parse_rfc3339("2026-11-20T10:00:00Z").unwrap();
        assert_eq!(format_rfc3339(ms), "2026-11-20T10:00:00.000Z");
        assert_eq!(parse_rfc3339("2026-11-20T11:00:00+01:00").unwrap(), ms);
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(2 * 86_400_000 + 5), "2 days");
        assert_eq!(human_duration(3_600_000), "1 hour");
        assert_eq!(human_duration(59_999), "59 seconds");
    }
}
