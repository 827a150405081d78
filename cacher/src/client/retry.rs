//! When and how long to wait before trying a request again: transport errors, 429 and 5xx.

use std::time::{Duration, SystemTime};

use reqwest::header::RETRY_AFTER;
use reqwest::{RequestBuilder, Response, StatusCode};

/// Longest wait a `Retry-After` header may impose; a registry asking for more fails the copy.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(8),
        }
    }
}

pub(super) fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

impl RetryPolicy {
    /// The wait before the retry after try number `attempt` (1-based): exponential backoff with
    /// equal jitter, so cells that failed together (a registry restart, a rate limit) do not all
    /// come back at the same instant, while each still waits at least half its backoff.
    pub fn backoff(&self, attempt: u32) -> Duration {
        equal_jitter(self.ceiling(attempt), rand::random::<f64>())
    }

    /// The exponential backoff, `first_delay` doubled per try up to `max_delay`.
    fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// Sends the request `build` makes, again after a pause while the failure is transient and
    /// tries remain. The last response (whatever its status) or transport error is returned.
    pub async fn send(
        &self,
        what: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, reqwest::Error> {
        let mut attempt = 1;
        loop {
            let outcome = build().send().await;
            let last = attempt >= self.attempts;
            let (wait, reason) = match &outcome {
                Ok(response) if !last && is_retryable_status(response.status()) => {
                    let wait = retry_after(response).unwrap_or_else(|| self.backoff(attempt));
                    (wait, response.status().to_string())
                }
                Err(err) if !last => (self.backoff(attempt), transport_reason(err)),
                _ => return outcome,
            };
            eprintln!(
                "  {what}: {reason}; retrying in {:.1} s (try {}/{})",
                wait.as_secs_f64(),
                attempt + 1,
                self.attempts
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// Half of `ceiling`, plus `unit` (in `[0, 1)`) of the other half.
fn equal_jitter(ceiling: Duration, unit: f64) -> Duration {
    let half = ceiling / 2;
    half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
}

/// A short cause for a retry line, without the URL reqwest's `Display` adds.
pub(super) fn transport_reason(err: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(err);
    let mut deepest = None;
    while let Some(cause) = source {
        deepest = Some(cause.to_string());
        source = cause.source();
    }
    deepest.unwrap_or_else(|| err.to_string())
}

/// `Retry-After` as seconds or as an HTTP date, capped.
fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.ceiling(1), Duration::from_millis(200));
        assert_eq!(policy.ceiling(2), Duration::from_millis(400));
        assert_eq!(policy.ceiling(10), Duration::from_secs(8));
        assert_eq!(policy.ceiling(u32::MAX), Duration::from_secs(8));
    }

    #[test]
    fn equal_jitter_stays_between_half_and_the_whole_backoff() {
        let ceiling = Duration::from_millis(800);
        assert_eq!(equal_jitter(ceiling, 0.0), Duration::from_millis(400));
        assert_eq!(equal_jitter(ceiling, 0.5), Duration::from_millis(600));
        assert_eq!(equal_jitter(ceiling, 1.0), ceiling);
        assert_eq!(equal_jitter(Duration::ZERO, 0.7), Duration::ZERO);
        let policy = RetryPolicy::default();
        for attempt in 1..=8 {
            let ceiling = policy.ceiling(attempt);
            let waits: Vec<Duration> = (0..1000).map(|_| policy.backoff(attempt)).collect();
            for wait in &waits {
                assert!(
                    *wait >= ceiling / 2 && *wait <= ceiling,
                    "try {attempt}: {wait:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
            // Jittered: the waits spread over the range instead of repeating one value.
            let (low, high) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
            assert!(
                *high - *low > ceiling / 4,
                "try {attempt}: {low:?}..{high:?}"
            );
        }
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for code in [429, 500, 502, 503, 504] {
            assert!(is_retryable_status(StatusCode::from_u16(code).unwrap()));
        }
        for code in [400, 401, 403, 404, 416, 501] {
            assert!(!is_retryable_status(StatusCode::from_u16(code).unwrap()));
        }
    }
}
