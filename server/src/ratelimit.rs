//! Per-address token buckets for the unauthenticated endpoints (register, login), which
//! cost an Argon2 hash each and are what a password guesser or a bot would hammer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket per client address.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    /// Allow `burst` requests at once, refilled at `per_minute`.
    pub fn new(per_minute: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            per_sec: per_minute / 60.0,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `ip`; `Err(seconds)` says how long until the next is due.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("not poisoned");
        if b.len() > 50_000 {
            // Full buckets carry no information: forget them to bound memory.
            let (per_sec, burst) = (self.per_sec, self.burst);
            b.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * per_sec < burst);
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else if self.per_sec > 0.0 {
            Err(((1.0 - *tokens) / self.per_sec).ceil() as u64)
        } else {
            Err(u64::MAX)
        }
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
}
