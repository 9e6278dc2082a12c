//! When a failed outbound delivery is tried again (SPEC 10): the schedule as data, with
//! jitter and `Retry-After` passed in so the decision is a pure function that the engine
//! applies and tests pin.

use std::time::Duration;

/// Delays after the 1st, 2nd, ... failed attempt: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
/// 14 h, 20 h. After them one last attempt at the end of the retry window.
pub const BACKOFF: [Duration; 8] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(14 * 3600),
    Duration::from_secs(20 * 3600),
];

/// The default retry window: the last attempt comes 72 h after the first.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(72 * 3600);

/// Most jitter added to a delay, as a fraction of it.
pub const JITTER: f64 = 0.1;

/// When to try a delivery next, in Unix milliseconds, or `None` when it is dead.
///
/// - `first_ms`: when its first attempt was made; `failed`: attempts made so far, all failed.
/// - `now_ms`: when the last one failed; `retry_after`: the receiver's `Retry-After` (on
///   `429`/`503`), honoured when it asks for more than the schedule, within the window.
/// - `jitter`: a random number in `[0, 1)`; up to [`JITTER`] of the delay is added.
pub fn next_attempt(
    first_ms: i64,
    failed: usize,
    now_ms: i64,
    retry_after: Option<Duration>,
    jitter: f64,
    window: Duration,
) -> Option<i64> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let window_end = first_ms.saturating_add(ms(window));
    if failed == 0 {
        return Some(now_ms);
    }
    if now_ms >= window_end {
        // The attempt at the window's end has failed: the delivery is dead.
        return None;
    }
    let Some(delay) = BACKOFF.get(failed - 1) else {
        // After the scheduled ones, one last attempt at the window's end.
        return (failed == BACKOFF.len() + 1).then_some(window_end);
    };
    let jittered = ms(*delay) + (ms(*delay) as f64 * JITTER * jitter.clamp(0.0, 1.0)) as i64;
    let wait = retry_after.map_or(jittered, |r| jittered.max(ms(r)));
    Some(now_ms.saturating_add(wait).min(window_end))
}

/// A `Retry-After` value: delay seconds or an HTTP date, relative to `now_secs`.
pub fn parse_retry_after(value: &str, now_secs: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    Some(Duration::from_secs(u64::try_from(at.unix_timestamp() - now_secs).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn the_schedule_of_spec_10_without_jitter() {
        let first = 1_000_000;
        let mut now = first;
        let mut times = Vec::new();
        for failed in 1.. {
            match next_attempt(first, failed, now, None, 0.0, DEFAULT_WINDOW) {
                Some(t) => {
                    times.push(t - now);
                    now = t;
                }
                None => break,
            }
        }
        let expected = [5_000, 300_000, 1_800_000, 2 * H, 5 * H, 10 * H, 14 * H, 20 * H];
        assert_eq!(&times[..8], &expected);
        // The last attempt is at the window's end: 72 h after the first.
        assert_eq!(times.len(), 9);
        assert_eq!(now - first, 72 * H);
    }

    #[test]
    fn jitter_adds_at_most_a_tenth_and_retry_after_is_honoured_within_the_window() {
        assert_eq!(next_attempt(0, 1, 0, None, 0.999_999, DEFAULT_WINDOW), Some(5_499));
        assert_eq!(next_attempt(0, 1, 0, Some(Duration::from_secs(60)), 0.0, DEFAULT_WINDOW), Some(60_000));
        assert_eq!(
            next_attempt(0, 1, 0, Some(Duration::from_secs(1)), 0.0, DEFAULT_WINDOW),
            Some(5_000),
            "never sooner"
        );
        let end = 72 * H;
        assert_eq!(next_attempt(0, 2, 0, Some(Duration::from_secs(1_000_000)), 0.0, DEFAULT_WINDOW), Some(end));
        assert_eq!(next_attempt(0, 3, end, None, 0.0, DEFAULT_WINDOW), None, "past the window: dead");
        assert_eq!(next_attempt(0, 0, 42, None, 0.5, DEFAULT_WINDOW), Some(42), "a first attempt goes now");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after(" 120 ", 0), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1_445_412_420), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("soon", 0), None);
    }
}
