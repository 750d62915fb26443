//! A token-bucket rate limiter that is told the time.

use std::time::{Duration, Instant};

/// Paces a byte stream to `rate` bytes per second with a burst of one second, except at the
/// start: the bucket starts with a tenth of a second's worth, so a fresh limiter does not let
/// a second's worth through at once on top of the rate.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_s` (at least 1).
    pub fn new(bytes_per_s: u64) -> Self {
        let rate = bytes_per_s.max(1) as f64;
        Self {
            rate,
            burst: rate,
            tokens: rate / 10.0,
            last: None,
        }
    }

    /// Takes `bytes` at time `now`; returns how long the caller must wait before sending them.
    /// Reservations queue: concurrent callers are paced one after another.
    pub fn reserve(&mut self, now: Instant, bytes: usize) -> Duration {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate_after_the_burst() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1000);
        // A fresh limiter starts with a tenth of a second's worth, not a full burst.
        assert_eq!(r.reserve(t0, 100), Duration::ZERO);
        assert_eq!(r.reserve(t0, 1), Duration::from_millis(1));
        let t0 = t0 + Duration::from_millis(1002);
        assert_eq!(r.reserve(t0, 1000), Duration::ZERO);
        assert_eq!(r.reserve(t0, 500), Duration::from_millis(500));
        // Half a second later the debt is paid; another 500 bytes wait another half second.
        assert_eq!(
            r.reserve(t0 + Duration::from_millis(500), 500),
            Duration::from_millis(500)
        );
        // Idle time refills up to the burst only.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(r.reserve(later, 1000), Duration::ZERO);
        assert!(r.reserve(later, 1) > Duration::ZERO);
    }
}
