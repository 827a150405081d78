//! Progress for `cf logs`: a line per blob and a summary, plus a live bar on a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::client::TransferCounter;

/// Reports a copy. Lines go to stdout, which Diego streams into the staging log.
pub struct Progress {
    counter: TransferCounter,
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    pub fn new(counter: TransferCounter) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {bytes} received, {bytes_per_sec}")
                    .expect("static template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            counter,
            bar,
            started: Instant::now(),
        }
    }

    pub fn counter(&self) -> TransferCounter {
        self.counter.clone()
    }

    pub fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.counter.get());
                bar.println(line);
            }
            None => println!("{line}"),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
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
}
