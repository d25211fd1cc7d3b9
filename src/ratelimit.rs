//! A fixed one-minute window per key, with bounded memory: the counting behind
//! every per-client limit (client addresses in `http::ratelimit`, refresh-token
//! families in the token issuer, users on the phone endpoint).
//!
//! A full table never turns the limit off: it evicts. When `MAX_TRACKED` keys
//! are counted in one window, the half with the smallest counts is dropped (one
//! O(n) pass per `MAX_TRACKED / 2` new keys, so O(1) amortised). Those are the
//! keys furthest from their limit, so the ones being limited stay limited, and a
//! flood of new keys cannot lock anyone out either (failing closed would let
//! whoever controls many addresses stop every login).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many keys are counted per window (about 5 MB of table).
pub const MAX_TRACKED: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(60);

/// Any key, each with `per_minute` requests a minute.
pub struct KeyedLimiter<K> {
    per_minute: u32,
    state: Mutex<Window<K>>,
}

struct Window<K> {
    started: Instant,
    counts: HashMap<K, u32>,
}

/// A key over its limit: the seconds left in the window (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited for {retry_after_secs} s")]
pub struct Limited {
    pub retry_after_secs: u64,
}

impl<K: Hash + Eq> KeyedLimiter<K> {
    pub fn new(per_minute: u32) -> Self {
        KeyedLimiter {
            per_minute,
            state: Mutex::new(Window {
                started: Instant::now(),
                counts: HashMap::new(),
            }),
        }
    }

    /// Counts one request of `key`: past `per_minute` in this window, 429 with the
    /// seconds left in it.
    pub fn check(&self, key: K) -> Result<(), Limited> {
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(window.started) >= WINDOW {
            window.started = now;
            window.counts.clear();
        }
        if window.counts.len() >= MAX_TRACKED && !window.counts.contains_key(&key) {
            evict_smallest_half(&mut window.counts);
        }
        let count = window.counts.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        if *count > self.per_minute {
            let left = WINDOW.saturating_sub(now.duration_since(window.started));
            return Err(Limited {
                retry_after_secs: left.as_secs().max(1),
            });
        }
        Ok(())
    }

    /// How many keys the current window counts.
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counts
            .len()
    }
}

/// Drops the half of the entries with the smallest counts (ties broken arbitrarily).
fn evict_smallest_half<K>(counts: &mut HashMap<K, u32>) {
    let mut values: Vec<u32> = counts.values().copied().collect();
    let middle = values.len() / 2;
    let (_, &mut threshold, _) = values.select_nth_unstable(middle);
    // Everything below the median goes, then entries equal to it until half are gone.
    let mut to_drop = middle;
    for drop_equal in [false, true] {
        counts.retain(|_, count| {
            let goes = to_drop > 0 && (*count < threshold || (drop_equal && *count == threshold));
            to_drop -= usize::from(goes);
            !goes
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn eviction_drops_the_smallest_half() {
        let mut counts: HashMap<IpAddr, u32> = (0..10u32)
            .map(|n| (IpAddr::from(Ipv4Addr::from(n)), n % 5 + 1))
            .collect();
        evict_smallest_half(&mut counts);
        assert_eq!(counts.len(), 5);
        assert!(counts.values().all(|&c| c >= 3), "{counts:?}");
    }

    #[test]
    fn each_key_has_its_own_budget() {
        let limiter = KeyedLimiter::new(2);
        assert!(limiter.check("a").is_ok() && limiter.check("a").is_ok());
        assert!(
            matches!(limiter.check("a"), Err(Limited { retry_after_secs }) if (1..=60).contains(&retry_after_secs))
        );
        assert!(limiter.check("b").is_ok());
    }
}
