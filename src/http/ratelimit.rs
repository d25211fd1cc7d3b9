//! Per-client login limit: a fixed one-minute window per address, with bounded memory.

use crate::error::ApiError;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many addresses are tracked per window; addresses beyond it in the
/// same minute are let through rather than refused (memory stays bounded, and a
/// flood of addresses cannot lock out the clients already counted).
const MAX_TRACKED: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(60);

pub struct LoginLimiter {
    per_minute: u32,
    state: Mutex<Window>,
}

struct Window {
    started: Instant,
    counts: HashMap<IpAddr, u32>,
}

impl LoginLimiter {
    pub fn new(per_minute: u32) -> Self {
        LoginLimiter {
            per_minute,
            state: Mutex::new(Window {
                started: Instant::now(),
                counts: HashMap::new(),
            }),
        }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(window.started) >= WINDOW {
            window.started = now;
            window.counts.clear();
        }
        let tracked = window.counts.len();
        let count = match window.counts.get_mut(&ip) {
            Some(count) => count,
            None if tracked >= MAX_TRACKED => return Ok(()),
            None => window.counts.entry(ip).or_insert(0),
        };
        *count += 1;
        if *count > self.per_minute {
            let left = WINDOW.saturating_sub(now.duration_since(window.started));
            return Err(ApiError::RateLimited {
                retry_after_secs: left.as_secs().max(1),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn each_address_has_its_own_budget() {
        let limiter = LoginLimiter::new(2);
        let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
        let b = IpAddr::from(Ipv4Addr::new(192, 0, 2, 2));
        assert!(limiter.check(a).is_ok() && limiter.check(a).is_ok());
        assert!(
            matches!(limiter.check(a), Err(ApiError::RateLimited { retry_after_secs }) if (1..=60).contains(&retry_after_secs))
        );
        assert!(limiter.check(b).is_ok());
    }

    #[test]
    fn memory_stays_bounded_whatever_the_number_of_addresses() {
        let limiter = LoginLimiter::new(1);
        for n in 0..(MAX_TRACKED as u32 + 5_000) {
            let _ = limiter.check(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + n)));
        }
        let tracked = limiter.state.lock().unwrap().counts.len();
        assert_eq!(tracked, MAX_TRACKED);
        // A tracked address is still limited once the table is full.
        assert!(limiter
            .check(IpAddr::from(Ipv4Addr::from(0x0a00_0000)))
            .is_err());
    }
}
