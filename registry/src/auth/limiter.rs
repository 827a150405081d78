//! Counts failed logins per user and client address and turns that pair away once it has too
//! many, so one tenant's mistakes behind a shared address (a Diego cell) lock out no one else.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Pairs tracked at most; beyond it the oldest windows are forgotten first.
const MAX_TRACKED: usize = 65_536;

/// A user name is kept as a keyed hash: names are the caller's choice and may be long.
type Key = (u64, IpAddr);

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

    fn key(&self, user: &str, client: Option<IpAddr>) -> Option<Key> {
        let client = client.filter(|_| self.per_minute > 0)?;
        Some((self.hasher.hash_one(user), client))
    }

    /// Whether `user` has used up its failures from `client` for the current minute.
    pub(super) fn is_blocked(&self, user: &str, client: Option<IpAddr>) -> bool {
        let Some(key) = self.key(user, client) else {
            return false;
        };
        let windows = self.windows.lock().expect("limiter lock");
        windows
            .get(&key)
            .is_some_and(|(start, count)| start.elapsed() < WINDOW && *count >= self.per_minute)
    }

    pub(super) fn record_failure(&self, user: &str, client: Option<IpAddr>) {
        let Some(key) = self.key(user, client) else {
            return;
        };
        let mut windows = self.windows.lock().expect("limiter lock");
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        let window = windows.entry(key).or_insert((Instant::now(), 0));
        if window.0.elapsed() >= WINDOW {
            *window = (Instant::now(), 0);
        }
        window.1 += 1;
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
}
