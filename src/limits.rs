//! Rate limits (SPEC 11), with governor: per client IP on clicks and on failed
//! authentication, per merchant and per partner after the signature check (an unverified
//! request never spends a merchant's quota). Memory is bounded: idle keys are dropped by a
//! periodic sweep that runs off the reactor, and past `max_keys` new keys are refused
//! (fail closed, counted) until the sweep makes room.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock as GovClock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// Limits and their defaults; `[limits]` in the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub enabled: bool,
    pub clicks_per_ip_per_second: u32,
    pub clicks_burst: u32,
    pub failures_per_ip_per_minute: u32,
    pub merchant_per_second: u32,
    pub merchant_burst: u32,
    pub partner_per_second: u32,
    pub partner_burst: u32,
    /// Keys each limiter keeps at most.
    pub max_keys: usize,
    pub sweep_interval_ms: u64,
}

pub const DEFAULT_CLICKS_PER_IP_PER_SECOND: u32 = 20;
pub const DEFAULT_FAILURES_PER_IP_PER_MINUTE: u32 = 30;
pub const DEFAULT_MERCHANT_PER_SECOND: u32 = 5_000;
pub const DEFAULT_PARTNER_PER_SECOND: u32 = 50;
pub const DEFAULT_MAX_KEYS: usize = 100_000;
pub const DEFAULT_LIMITER_SWEEP_MS: u64 = 10_000;

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            enabled: true,
            clicks_per_ip_per_second: DEFAULT_CLICKS_PER_IP_PER_SECOND,
            clicks_burst: 2 * DEFAULT_CLICKS_PER_IP_PER_SECOND,
            failures_per_ip_per_minute: DEFAULT_FAILURES_PER_IP_PER_MINUTE,
            merchant_per_second: DEFAULT_MERCHANT_PER_SECOND,
            merchant_burst: 2 * DEFAULT_MERCHANT_PER_SECOND,
            partner_per_second: DEFAULT_PARTNER_PER_SECOND,
            partner_burst: 2 * DEFAULT_PARTNER_PER_SECOND,
            max_keys: DEFAULT_MAX_KEYS,
            sweep_interval_ms: DEFAULT_LIMITER_SWEEP_MS,
        }
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

/// `rate` cells per `per`, with bursts of `burst`.
fn quota(rate: u32, per: Duration, burst: u32) -> Quota {
    let period = per / rate.max(1);
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(nz(rate)))
        .allow_burst(nz(burst))
}

/// One keyed limiter with a bound on its keys.
pub struct KeyedLimit<K: Hash + Eq + Clone, C: GovClock = DefaultClock> {
    inner: RateLimiter<K, HashMapStateStore<K>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    max_keys: usize,
    /// Requests refused because the key table was full.
    pub refused_full: AtomicU64,
}

impl<K: Hash + Eq + Clone, C: GovClock + Clone> KeyedLimit<K, C> {
    pub fn new(quota: Quota, max_keys: usize, clock: C) -> Self {
        KeyedLimit {
            inner: RateLimiter::hashmap_with_clock(quota, clock.clone()),
            clock,
            max_keys,
            refused_full: AtomicU64::new(0),
        }
    }

    /// Spends one cell of `key`; `Err(wait)` says how long until the next one.
    ///
    /// # Errors
    /// The time to wait, when the key is over its quota or the table is full.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        if self.inner.len() >= self.max_keys {
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            return Err(Duration::from_secs(1));
        }
        self.inner.check_key(key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops keys whose state is back to fresh (idle); returns the keys left.
    pub fn sweep(&self) -> usize {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
        self.inner.len()
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// Every limiter of the gateway.
pub struct Limits<C: GovClock = DefaultClock> {
    pub enabled: bool,
    pub clicks: KeyedLimit<IpAddr, C>,
    pub failures: KeyedLimit<IpAddr, C>,
    pub merchants: KeyedLimit<String, C>,
    pub partners: KeyedLimit<String, C>,
    /// IPs over their failure budget: since when, and for how long.
    blocked: Mutex<HashMap<IpAddr, (C::Instant, Duration)>>,
    clock: C,
    max_keys: usize,
}

impl<C: GovClock + Clone> Limits<C> {
    pub fn new(s: &LimitSettings, clock: C) -> Self {
        let k = s.max_keys;
        Limits {
            enabled: s.enabled,
            clicks: KeyedLimit::new(
                quota(s.clicks_per_ip_per_second, Duration::from_secs(1), s.clicks_burst),
                k,
                clock.clone(),
            ),
            failures: KeyedLimit::new(
                quota(s.failures_per_ip_per_minute, Duration::from_secs(60), s.failures_per_ip_per_minute),
                k,
                clock.clone(),
            ),
            merchants: KeyedLimit::new(
                quota(s.merchant_per_second, Duration::from_secs(1), s.merchant_burst),
                k,
                clock.clone(),
            ),
            partners: KeyedLimit::new(
                quota(s.partner_per_second, Duration::from_secs(1), s.partner_burst),
                k,
                clock.clone(),
            ),
            blocked: Mutex::new(HashMap::new()),
            clock,
            max_keys: k,
        }
    }

    /// What is left of a block placed at `since` for `wait`, if anything.
    fn remaining(&self, since: C::Instant, wait: Duration) -> Option<Duration> {
        let elapsed: Duration = self.clock.now().duration_since(since).into();
        wait.checked_sub(elapsed).filter(|d| !d.is_zero())
    }

    /// `Err(wait)` while `ip` is over its budget of failed authentications.
    ///
    /// # Errors
    /// The time until the IP may try again.
    pub fn check_blocked(&self, ip: IpAddr) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        let blocked = self.blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match blocked.get(&ip).and_then(|(since, wait)| self.remaining(*since, *wait)) {
            Some(left) => Err(left),
            None => Ok(()),
        }
    }

    /// Counts a failed authentication of `ip`; past the budget the IP is blocked until
    /// its next cell.
    pub fn record_failure(&self, ip: IpAddr) {
        if !self.enabled {
            return;
        }
        if let Err(wait) = self.failures.check(&ip) {
            let mut blocked = self.blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if blocked.len() < self.max_keys || blocked.contains_key(&ip) {
                blocked.insert(ip, (self.clock.now(), wait));
            }
        }
    }

    /// Drops idle keys and expired blocks everywhere; returns the keys kept in total and
    /// in the fullest table (each table is bounded by `limits.max_keys` on its own).
    pub fn sweep(&self) -> SweptKeys {
        let mut blocked = self.blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        blocked.retain(|_, (since, wait)| self.remaining(*since, *wait).is_some());
        blocked.shrink_to_fit();
        let b = blocked.len();
        drop(blocked);
        let tables = [self.clicks.sweep(), self.failures.sweep(), self.merchants.sweep(), self.partners.sweep(), b];
        SweptKeys { total: tables.iter().sum(), fullest: tables.iter().copied().max().unwrap_or(0) }
    }
}

/// What the limiters hold after a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweptKeys {
    pub total: usize,
    pub fullest: usize,
}

/// Whole seconds for `Retry-After`, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn settings() -> LimitSettings {
        LimitSettings {
            clicks_per_ip_per_second: 10,
            clicks_burst: 5,
            failures_per_ip_per_minute: 3,
            max_keys: 4,
            ..LimitSettings::default()
        }
    }

    #[test]
    fn clicks_burst_then_refill_at_the_rate() {
        let clock = FakeRelativeClock::default();
        let l = Limits::new(&settings(), clock.clone());
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        for i in 0..5 {
            assert!(l.clicks.check(&ip).is_ok(), "burst cell {i}");
        }
        let wait = l.clicks.check(&ip).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "10 per second: one cell per 100 ms");
        assert_eq!(retry_after_secs(wait), 1);
        clock.advance(Duration::from_millis(100));
        assert!(l.clicks.check(&ip).is_ok());
        assert!(l.clicks.check(&ip).is_err());
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        assert!(l.clicks.check(&other).is_ok(), "keys are independent");
    }

    #[test]
    fn failures_block_an_ip_until_its_next_cell() {
        let clock = FakeRelativeClock::default();
        let l = Limits::new(&settings(), clock.clone());
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        for _ in 0..3 {
            l.record_failure(ip);
            assert!(l.check_blocked(ip).is_ok());
        }
        l.record_failure(ip);
        let wait = l.check_blocked(ip).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20), "3 per minute: one cell per 20 s");
        clock.advance(Duration::from_secs(20));
        assert!(l.check_blocked(ip).is_ok());
    }

    #[test]
    fn idle_keys_are_dropped_and_the_table_is_bounded() {
        let clock = FakeRelativeClock::default();
        let l = Limits::new(&settings(), clock.clone());
        for i in 0..4u8 {
            l.clicks.check(&IpAddr::from([10, 0, 0, i])).unwrap();
        }
        assert_eq!(l.clicks.len(), 4);
        assert!(l.clicks.check(&IpAddr::from([10, 0, 0, 99])).is_err(), "full: new keys are refused");
        assert_eq!(l.clicks.refused_full.load(Ordering::Relaxed), 1);
        clock.advance(Duration::from_secs(10));
        assert_eq!(l.sweep(), SweptKeys { total: 0, fullest: 0 }, "idle keys are gone");
        assert!(l.clicks.check(&IpAddr::from([10, 0, 0, 99])).is_ok());
    }
}
