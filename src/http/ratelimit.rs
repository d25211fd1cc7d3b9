//! Per-client-address limits (logins, refreshes).
//!
//! [`LoginLimiter`] counts client addresses (logins, refreshes): a client is an IPv4
//! address, or an IPv6 network of `limits.ipv6_prefix` bits
//! (default /64: one subscriber usually holds a whole /64, so counting per /128
//! would give them 2^64 budgets). An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
//! what a dual-stack socket reports for an IPv4 peer) is that IPv4 address.
//! The counting, and its bounded memory, is [`crate::ratelimit::KeyedLimiter`]'s.

use crate::http::error::ApiError;
use crate::ratelimit::KeyedLimiter;
use std::net::{IpAddr, Ipv6Addr};

/// Client addresses, each with `per_minute` requests a minute.
pub struct LoginLimiter {
    ipv6_prefix: u8,
    counts: KeyedLimiter<IpAddr>,
}

/// The address with IPv4-mapped IPv6 turned into IPv4. Every comparison of client
/// addresses (trusted proxies, rate limits) goes through this.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// What a client is counted as: its IPv4 address, or its IPv6 network.
pub(crate) fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

impl LoginLimiter {
    pub fn new(per_minute: u32, ipv6_prefix: u8) -> Self {
        LoginLimiter {
            ipv6_prefix,
            counts: KeyedLimiter::new(per_minute),
        }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        Ok(self.counts.check(client_key(ip, self.ipv6_prefix))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::MAX_TRACKED;
    use std::net::Ipv4Addr;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn is_limited(result: Result<(), ApiError>) -> bool {
        matches!(result, Err(ApiError::RateLimited { retry_after_secs }) if (1..=60).contains(&retry_after_secs))
    }

    #[test]
    fn each_address_has_its_own_budget() {
        let limiter = LoginLimiter::new(2, 64);
        let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
        let b = IpAddr::from(Ipv4Addr::new(192, 0, 2, 2));
        assert!(limiter.check(a).is_ok() && limiter.check(a).is_ok());
        assert!(is_limited(limiter.check(a)));
        assert!(limiter.check(b).is_ok());
    }

    #[test]
    fn ipv6_addresses_of_one_prefix_share_a_budget() {
        let limiter = LoginLimiter::new(2, 64);
        assert!(limiter.check(ip("2001:db8:1:2::1")).is_ok());
        assert!(limiter
            .check(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
            .is_ok());
        assert!(is_limited(limiter.check(ip("2001:db8:1:2:abcd::9"))));
        // The next /64 is another client.
        assert!(limiter.check(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn the_ipv6_prefix_is_configurable() {
        let per_48 = LoginLimiter::new(1, 48);
        assert!(per_48.check(ip("2001:db8:1:2::1")).is_ok());
        assert!(is_limited(per_48.check(ip("2001:db8:1:ffff::1"))));
        assert!(per_48.check(ip("2001:db8:2::1")).is_ok());

        let per_128 = LoginLimiter::new(1, 128);
        assert!(per_128.check(ip("2001:db8::1")).is_ok());
        assert!(per_128.check(ip("2001:db8::2")).is_ok());
        assert!(is_limited(per_128.check(ip("2001:db8::1"))));

        assert_eq!(client_key(ip("ffff::1"), 1), ip("8000::"));
    }

    #[test]
    fn an_ipv4_mapped_address_is_its_ipv4_address() {
        let limiter = LoginLimiter::new(2, 64);
        assert!(limiter.check(ip("::ffff:192.0.2.1")).is_ok());
        assert!(limiter.check(ip("192.0.2.1")).is_ok());
        assert!(is_limited(limiter.check(ip("::ffff:192.0.2.1"))));
        // Not grouped with other IPv4 addresses by the IPv6 prefix.
        assert!(limiter.check(ip("::ffff:192.0.2.2")).is_ok());
        assert_eq!(canonical_ip(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn a_full_table_evicts_and_never_stops_limiting() {
        let limiter = LoginLimiter::new(1, 64);
        let limited = ip("192.0.2.77");
        // An address at its limit: a count of 2 (above every newcomer's 1).
        let _ = limiter.check(limited);
        assert!(is_limited(limiter.check(limited)));
        for n in 0..(MAX_TRACKED as u32 * 2) {
            let _ = limiter.check(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + n)));
            // Memory stays bounded whatever the number of addresses.
            assert!(limiter.counts.tracked() <= MAX_TRACKED);
        }
        // New addresses are still counted and limited once the table has been full.
        let newcomer = ip("198.51.100.1");
        assert!(limiter.check(newcomer).is_ok());
        assert!(is_limited(limiter.check(newcomer)));
        // And the client that was over its limit was never evicted.
        assert!(is_limited(limiter.check(limited)));
    }
}
