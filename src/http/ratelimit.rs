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
