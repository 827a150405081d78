//! Counts failed logins per client address and turns a client away once it has too many.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond it the oldest windows are forgotten first.
const MAX_TRACKED: usize = 65_536;

pub(super) struct FailureLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    /// `per_minute` of 0 never limits.
    pub(super) fn new(per_minute: u32) -> FailureLimiter {
        FailureLimiter {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `client` has used up its failures for the current minute.
    pub(super) fn is_blocked(&self, client: Option<IpAddr>) -> bool {
        let (Some(client), true) = (client, self.per_minute > 0) else {
            return false;
        };
        let windows = self.windows.lock().expect("limiter lock");
        windows
            .get(&client)
            .is_some_and(|(start, count)| start.elapsed() < WINDOW && *count >= self.per_minute)
    }

    pub(super) fn record_failure(&self, client: Option<IpAddr>) {
        let (Some(client), true) = (client, self.per_minute > 0) else {
            return;
        };
        let mut windows = self.windows.lock().expect("limiter lock");
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        let window = windows.entry(client).or_insert((Instant::now(), 0));
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
    fn blocks_after_the_allowance_per_address() {
        let limiter = FailureLimiter::new(2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        limiter.record_failure(a);
        assert!(!limiter.is_blocked(a));
        limiter.record_failure(a);
        assert!(limiter.is_blocked(a));
        assert!(!limiter.is_blocked(b));
        let unlimited = FailureLimiter::new(0);
        for _ in 0..10 {
            unlimited.record_failure(a);
        }
        assert!(!unlimited.is_blocked(a));
    }
}
