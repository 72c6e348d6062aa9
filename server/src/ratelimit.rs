//! Per-address rate limits for the unauthenticated endpoints (register, login), which
//! cost an Argon2 hash each and are what a password guesser or a bot would hammer. The
//! buckets are governor's (GCRA); this module only fixes the policy and bounds memory.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Addresses remembered before the ones back at a full bucket are forgotten.
const MAX_TRACKED: usize = 50_000;

/// A token bucket per client address.
pub struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// Allow `burst` requests at once, refilled at `per_minute` (0: never refilled).
    pub fn new(per_minute: f64, burst: f64) -> RateLimiter {
        let period = if per_minute > 0.0 {
            Duration::from_secs_f64((60.0 / per_minute).min(1e9))
        } else {
            Duration::from_secs(1_000_000_000)
        };
        let burst =
            NonZeroU32::new(burst.clamp(1.0, u32::MAX as f64) as u32).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("a period of at least 1 ns")
            .allow_burst(burst);
        RateLimiter {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }

    /// Take one request's worth for `ip`; `Err(seconds)` says how long until the next.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.limiter.len() > MAX_TRACKED {
            // A full bucket carries no information: forget those to bound memory.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_address() {
        let r = RateLimiter::new(60.0, 2.0);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(r.check(a).is_ok());
        assert!(r.check(a).is_ok());
        assert_eq!(r.check(a), Err(1));
        assert!(r.check(b).is_ok());
    }

    #[test]
    fn no_refill_keeps_refusing() {
        let r = RateLimiter::new(0.0, 1.0);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(r.check(a).is_ok());
        assert!(r.check(a).unwrap_err() > 3600);
    }
}
