//! Progress lines in the staging log while a slow layer is copied.

use std::time::Duration;

use crate::common::*;
use crate::support::*;

/// `1.5 MiB` in bytes.
fn parse_bytes(text: &str) -> f64 {
    let (value, unit) = text
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("{text:?}"));
    let value: f64 = value.parse().unwrap_or_else(|_| panic!("{text:?}"));
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        _ => panic!("unit of {text:?}"),
    };
    value * scale
}

/// The figures of a progress line `LABEL  1.5 MiB of 2.0 MiB (75%), 160.0 KiB/s, about 3 s left`:
/// received, size, percent, bytes per second and seconds left.
fn progress_figures(line: &str) -> (f64, f64, u64, f64, Option<u64>) {
    let parsed = (|| {
        let (_, figures) = line.trim_start().split_once("  ")?;
        let (received, rest) = figures.trim_start().split_once(" of ")?;
        let (size, rest) = rest.split_once(" (")?;
        let (percent, rest) = rest.split_once("%), ")?;
        let (per_second, left) = rest.split_once("/s, ")?;
        let left = left
            .strip_prefix("about ")
            .and_then(|l| l.strip_suffix(" s left"))
            .and_then(|l| l.parse().ok());
        Some((
            parse_bytes(received),
            parse_bytes(size),
            percent.parse().ok()?,
            parse_bytes(per_second),
            left,
        ))
    })();
    parsed.unwrap_or_else(|| panic!("not a progress line: {line:?}"))
}

#[test]
fn a_slow_layer_reports_progress_every_few_seconds_in_the_staging_log() {
    let upstream = Upstream::start(None);
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    let image = web_image(12, &[2048 * KIB, 1024 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    const PER_SECOND: usize = 160 * KIB;
    for layer in &image.layers {
        proxy.inject(&layer.blob.digest, Fault::Throttle(PER_SECOND), None);
    }

    let guid = new_guid();
    let cacher = opted_in(&berth, "", &guid);
    let reference = format!("{}/team/app:1.0", proxy.host());
    let (outcome, lines) = cacher.run_timed(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    // Plain lines for the staging log: no carriage returns or escape sequences.
    assert!(
        !outcome.stdout.contains(['\r', '\x1b']),
        "{:?}",
        outcome.stdout
    );
    let at = |prefix: &str| {
        lines
            .iter()
            .find(|(_, line)| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:#?}"))
            .0
    };
    let (caching, cached) = (at("Caching "), at("Cached in "));
    let totals: Vec<(Duration, &str)> = lines
        .iter()
        .filter(|(_, line)| line.starts_with("  total "))
        .map(|(at, line)| (*at, line.as_str()))
        .collect();
    assert!(totals.len() >= 2, "{lines:#?}");
    // At least every five seconds while bytes move, and not much more often.
    let mut marks = vec![caching];
    marks.extend(totals.iter().map(|(at, _)| *at));
    marks.push(cached);
    for pair in marks.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap <= Duration::from_millis(6000),
            "{gap:?} between reports: {lines:#?}"
        );
    }
    for pair in totals.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(4000),
            "{gap:?} between reports: {lines:#?}"
        );
    }

    // The first report names both layers, then the total, with figures the throttle explains.
    let first = lines
        .iter()
        .position(|(at, _)| *at == totals[0].0)
        .expect("the first report");
    let big = &image.layers[0].blob;
    let big_line = &lines[first - 2..first]
        .iter()
        .find(|(_, line)| line.starts_with(&format!("  {}  ", &big.digest[7..19])))
        .unwrap_or_else(|| panic!("no line for the large layer before {first}: {lines:#?}"))
        .1;
    let (received, size, percent, per_second, left) = progress_figures(big_line);
    assert_eq!(size, 2.0 * 1024.0 * 1024.0, "{big_line}");
    assert!(received > 0.0 && received < size, "{big_line}");
    assert_eq!(percent, (received * 100.0 / size) as u64, "{big_line}");
    let expected = PER_SECOND as f64;
    assert!(
        per_second > expected * 0.6 && per_second < expected * 1.25,
        "{big_line}"
    );
    let left = left.unwrap_or_else(|| panic!("no time left in {big_line}"));
    let predicted = (size - received) / expected;
    assert!(
        (left as f64 - predicted).abs() <= predicted * 0.5 + 2.0,
        "{big_line}: {predicted:.1} s predicted"
    );
    let (received, total, _, per_second, left) = progress_figures(totals[0].1);
    let layers = (3 * 1024 * KIB) as f64;
    assert!(
        total >= layers && total < layers + 64.0 * 1024.0,
        "{}",
        totals[0].1
    );
    assert!(received > 0.0 && received < total, "{}", totals[0].1);
    assert!(
        per_second > expected * 1.2 && per_second < expected * 2.5,
        "two layers at once: {}",
        totals[0].1
    );
    assert!(left.is_some(), "{}", totals[0].1);

    assert_image_served(&berth, &cache_repository(&guid), &image);
}
