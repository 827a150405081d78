//! Counts failed logins per user and client address and turns that pair away once it has too
//! many, so one tenant's mistakes behind a shared address (a Diego cell) lock out no one else;
//! and per address alone, with a larger allowance, so rotating user names does not buy unlimited
//! bcrypt work.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Windows tracked at most; beyond it the oldest are forgotten first.
const MAX_TRACKED: usize = 65_536;
/// An address's allowance over all user names, as a multiple of the per-user one: large enough
/// for the many tenants behind one cell, small enough to bound the bcrypt work one address causes.
const ADDRESS_FACTOR: u32 = 10;

/// A user name is kept as a keyed hash (names are the caller's choice and may be long); `None`
/// counts for the address as a whole.
type Key = (Option<u64>, IpAddr);

pub(super) struct FailureLimiter {
    per_minute: u32,
    hasher: RandomState,
    windows: Mutex<HashMap<Key, (Instant, u32)>>,
}

impl FailureLimiter {
    /// `per_minute` of 0 never limits.
    pub(super) fn new(per_minute: u32) -> FailureLimiter {
        FailureLimiter {
            per_minute,
            hasher: RandomState::new(),
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn keys(&self, user: &str, client: Option<IpAddr>) -> Option<[(Key, u32); 2]> {
        let client = client.filter(|_| self.per_minute > 0)?;
        Some([
            ((Some(self.hasher.hash_one(user)), client), self.per_minute),
            (
                (None, client),
                self.per_minute.saturating_mul(ADDRESS_FACTOR),
            ),
        ])
    }

    /// Whether `user` has used up its failures from `client` for the current minute, or
    /// `client` its failures over all users.
    pub(super) fn is_blocked(&self, user: &str, client: Option<IpAddr>) -> bool {
        let Some(keys) = self.keys(user, client) else {
            return false;
        };
        let windows = self.windows.lock().expect("limiter lock");
        keys.iter().any(|(key, allowance)| {
            windows
                .get(key)
                .is_some_and(|(start, count)| start.elapsed() < WINDOW && count >= allowance)
        })
    }

    pub(super) fn record_failure(&self, user: &str, client: Option<IpAddr>) {
        let Some(keys) = self.keys(user, client) else {
            return;
        };
        let mut windows = self.windows.lock().expect("limiter lock");
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        while windows.len() >= MAX_TRACKED {
            let oldest = windows
                .iter()
                .min_by_key(|(_, (start, _))| *start)
                .map(|(key, _)| *key)
                .expect("a full map has entries");
            windows.remove(&oldest);
        }
        for (key, _) in keys {
            let window = windows.entry(key).or_insert((Instant::now(), 0));
            if window.0.elapsed() >= WINDOW {
                *window = (Instant::now(), 0);
            }
            window.1 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_a_user_at_an_address_after_its_allowance() {
        let limiter = FailureLimiter::new(2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        limiter.record_failure("bob", a);
        assert!(!limiter.is_blocked("bob", a));
        limiter.record_failure("bob", a);
        assert!(limiter.is_blocked("bob", a));
        // Others behind the same address, and bob elsewhere, are not affected.
        assert!(!limiter.is_blocked("alice", a));
        assert!(!limiter.is_blocked("bob", b));
        let unlimited = FailureLimiter::new(0);
        for _ in 0..10 {
            unlimited.record_failure("bob", a);
        }
        assert!(!unlimited.is_blocked("bob", a));
    }

    #[test]
    fn rotating_user_names_runs_into_the_addresses_allowance() {
        let limiter = FailureLimiter::new(2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for i in 0..2 * ADDRESS_FACTOR {
            assert!(!limiter.is_blocked(&format!("guess{i}"), a), "{i}");
            limiter.record_failure(&format!("guess{i}"), a);
        }
        assert!(limiter.is_blocked("anyone", a));
        assert!(!limiter.is_blocked("anyone", Some(IpAddr::from([10, 0, 0, 2]))));
    }
}
