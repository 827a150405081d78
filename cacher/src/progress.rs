//! Progress for `cf logs`: a line per blob and a summary, a report of the transfers in flight at
//! a fixed interval while bytes move, plus a live bar on a terminal.
//!
//! Diego streams stdout into the staging log line by line, so everything here is whole plain
//! lines: no carriage returns or terminal control codes unless stdout is a terminal.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_oci::Digest;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{TransferCounter, short};

/// How often the transfers in flight are reported while bytes move: often enough that a long
/// layer never looks like a hang in `cf logs`, seldom enough not to flood it.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Reports a copy. Lines go to stdout, which Diego streams into the staging log.
pub struct Progress {
    shared: Arc<Shared>,
    reporter: Option<tokio::task::AbortHandle>,
}

struct Shared {
    counter: TransferCounter,
    bar: Option<ProgressBar>,
    started: Instant,
    plan: Mutex<Plan>,
}

/// What the copy has to stream and how far it got.
#[derive(Default)]
struct Plan {
    /// Bytes of the blobs that must be streamed: the destination has neither them nor a mount.
    to_copy: u64,
    /// Bytes of the blobs streamed completely.
    copied: u64,
    /// When the copy planned its blobs.
    since: Option<Instant>,
    in_flight: BTreeMap<u64, InFlight>,
    next_id: u64,
}

struct InFlight {
    digest: Digest,
    size: u64,
    counter: TransferCounter,
    started: Instant,
}

impl Progress {
    /// Starts reporting the transfers in flight every `interval` while bytes move. Needs a Tokio
    /// runtime.
    pub fn new(counter: TransferCounter, interval: Duration) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {bytes} received, {bytes_per_sec}")
                    .expect("static template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let shared = Arc::new(Shared {
            counter,
            bar,
            started: Instant::now(),
            plan: Mutex::default(),
        });
        let reporter = tokio::spawn(report_while_moving(shared.clone(), interval));
        Progress {
            shared,
            reporter: Some(reporter.abort_handle()),
        }
    }

    pub fn counter(&self) -> TransferCounter {
        self.shared.counter.clone()
    }

    pub fn line(&self, line: &str) {
        self.shared.line(line);
    }

    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The copy has `bytes` of blobs to bring over, unless some turn out to be there already.
    pub fn plan(&self, bytes: u64) {
        let mut plan = self.shared.plan();
        plan.to_copy = bytes;
        plan.copied = 0;
        plan.since = Some(Instant::now());
    }

    /// A blob of `size` bytes needs no transfer after all (present or mounted).
    pub fn skip(&self, size: u64) {
        let mut plan = self.shared.plan();
        plan.to_copy = plan.to_copy.saturating_sub(size);
    }

    /// Follows one attempt at streaming a blob; its bytes are counted by the returned
    /// transfer's counter. Dropping the transfer without [`Transfer::complete`] forgets it.
    pub fn track(&self, digest: &Digest, size: u64) -> Transfer {
        let counter = self.shared.counter.child();
        let mut plan = self.shared.plan();
        let id = plan.next_id;
        plan.next_id += 1;
        plan.in_flight.insert(
            id,
            InFlight {
                digest: digest.clone(),
                size,
                counter: counter.clone(),
                started: Instant::now(),
            },
        );
        Transfer {
            shared: self.shared.clone(),
            id,
            counter,
        }
    }

    pub fn finish(&mut self) {
        if let Some(reporter) = self.reporter.take() {
            reporter.abort();
        }
        if let Some(bar) = &self.shared.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One blob being streamed.
pub struct Transfer {
    shared: Arc<Shared>,
    id: u64,
    counter: TransferCounter,
}

impl Transfer {
    pub fn counter(&self) -> TransferCounter {
        self.counter.clone()
    }

    /// The blob arrived whole.
    pub fn complete(self) {
        let mut plan = self.shared.plan();
        if let Some(done) = plan.in_flight.remove(&self.id) {
            plan.copied += done.size;
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.shared.plan().in_flight.remove(&self.id);
    }
}

impl Shared {
    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().expect("progress lock")
    }

    fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.counter.get());
                bar.println(line);
            }
            None => println!("{line}"),
        }
    }

    /// The lines of a report: one per blob in flight, then the total.
    fn report(&self) -> Vec<String> {
        let plan = self.plan();
        let now = Instant::now();
        let mut lines = Vec::new();
        let mut in_flight = 0;
        for blob in plan.in_flight.values() {
            let received = blob.counter.get().min(blob.size);
            in_flight += received;
            lines.push(format!(
                "  {}  {}",
                short(&blob.digest),
                figures(received, blob.size, now - blob.started)
            ));
        }
        let received = (plan.copied + in_flight).min(plan.to_copy);
        let since = plan.since.unwrap_or(self.started);
        lines.push(format!(
            "  total         {}",
            figures(received, plan.to_copy, now - since)
        ));
        lines
    }
}

/// Prints a report every `interval` in which bytes arrived.
async fn report_while_moving(shared: Arc<Shared>, interval: Duration) {
    let start = tokio::time::Instant::now() + interval;
    let mut ticks = tokio::time::interval_at(start, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = shared.counter.get();
    loop {
        ticks.tick().await;
        let now = shared.counter.get();
        if now == last {
            continue;
        }
        last = now;
        for line in shared.report() {
            shared.line(&line);
        }
    }
}

/// `1.5 MiB of 4.0 MiB (37%), 300.0 KiB/s, about 9 s left`.
fn figures(received: u64, size: u64, elapsed: Duration) -> String {
    let percent = received
        .saturating_mul(100)
        .checked_div(size)
        .unwrap_or(100);
    let seconds = elapsed.as_secs_f64();
    let left = if received >= size {
        "done".to_owned()
    } else if received == 0 || seconds < 0.001 {
        "time left unknown".to_owned()
    } else {
        let per_second = received as f64 / seconds;
        let remaining = ((size - received) as f64 / per_second).ceil() as u64;
        format!("about {} left", duration_text(remaining))
    };
    format!(
        "{} of {} ({percent}%), {}, {left}",
        human_bytes(received),
        human_bytes(size),
        rate(received, elapsed)
    )
}

/// `45 s`, `3 min 20 s`, `1 h 5 min`.
fn duration_text(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

/// `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `30.0 MiB/s`, or nothing measurable.
pub fn rate(bytes: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    if seconds < 0.001 {
        return "-".into();
    }
    format!("{}/s", human_bytes((bytes as f64 / seconds) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_and_rates() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(5 * 1024 * 1024 + 512 * 1024), "5.5 MiB");
        assert_eq!(rate(10 * 1024 * 1024, Duration::from_secs(2)), "5.0 MiB/s");
        assert_eq!(rate(1, Duration::ZERO), "-");
    }

    #[test]
    fn figures_give_the_share_rate_and_time_left() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(
            figures(MIB, 4 * MIB, Duration::from_secs(2)),
            "1.0 MiB of 4.0 MiB (25%), 512.0 KiB/s, about 6 s left"
        );
        assert_eq!(
            figures(MIB, 200 * MIB, Duration::from_secs(1)),
            "1.0 MiB of 200.0 MiB (0%), 1.0 MiB/s, about 3 min 19 s left"
        );
        assert_eq!(
            figures(0, MIB, Duration::from_secs(5)),
            "0 B of 1.0 MiB (0%), 0 B/s, time left unknown"
        );
        assert_eq!(
            figures(MIB, MIB, Duration::from_secs(1)),
            "1.0 MiB of 1.0 MiB (100%), 1.0 MiB/s, done"
        );
        assert_eq!(duration_text(3 * 3600 + 120), "3 h 2 min");
    }

    #[tokio::test]
    async fn reports_each_blob_in_flight_and_the_total() {
        let mut progress = Progress::new(TransferCounter::default(), REPORT_INTERVAL);
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        progress.plan(3000 + 1000 + 500);
        progress.skip(500);
        let first = progress.track(&a, 3000);
        let second = progress.track(&b, 1000);
        first.counter().add(1500);
        second.counter().add(1000);
        second.complete();
        let report = progress.shared.report();
        assert_eq!(report.len(), 2, "{report:?}");
        assert!(
            report[0].starts_with(&format!("  {}  1.5 KiB of 2.9 KiB (50%), ", short(&a))),
            "{report:?}"
        );
        assert!(
            report[1].starts_with("  total         2.4 KiB of 3.9 KiB (62%), "),
            "{report:?}"
        );
        // A failed attempt is forgotten; its retry starts from zero.
        drop(first);
        assert_eq!(progress.shared.report().len(), 1);
        assert_eq!(progress.counter().get(), 2500);
        progress.finish();
    }
}
