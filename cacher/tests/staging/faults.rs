//! Upstream faults: dropped connections, transient errors, stalls, corrupt blobs, bad configs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::support::*;

#[test]
fn dropped_connections_and_transient_errors_are_survived() {
    let upstream = Upstream::start(None);
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    let image = web_image(5, &[800 * KIB, 300 * KIB, 200 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let [cut, failing, limited] = [0, 1, 2].map(|i| image.layers[i].blob.digest.clone());
    const CUT_AT: usize = 256 * KIB;
    proxy.inject(&cut, Fault::Cut(CUT_AT), Some(1));
    proxy.inject(&failing, Fault::Status(500), Some(2));
    proxy.inject(&limited, Fault::Status(429), Some(1));

    let guid = new_guid();
    let reference = format!("{}/team/app:1.0", proxy.host());
    let (cacher, outcome) = stage_cached(&berth, "", &reference, &guid, &[]);
    let repo = cache_repository(&guid);
    assert_eq!(
        docker_image(&cacher.result()),
        berth.pinned(&repo, &image.manifest.digest)
    );

    let requests = |digest: &str| -> Vec<(Option<String>, u16)> {
        proxy
            .exchanges()
            .into_iter()
            .filter(|e| e.path.ends_with(digest))
            .map(|e| (e.range, e.status))
            .collect()
    };
    // The dropped transfer resumed where it broke off instead of starting over.
    let resumed = requests(&cut);
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert_eq!(resumed[0], (None, 200));
    let range = resumed[1]
        .0
        .as_deref()
        .expect("a Range on the second request");
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("Range {range}"));
    assert!(start > 0 && start <= CUT_AT, "resumed at {start}");
    assert_eq!(resumed[1].1, 206);
    assert!(
        outcome.stderr.contains("connection lost after"),
        "{}",
        outcome.stderr
    );
    assert_eq!(requests(&failing), [(None, 500), (None, 500), (None, 200)]);
    assert_eq!(requests(&limited), [(None, 429), (None, 200)]);
    assert!(
        outcome
            .stderr
            .contains("429 Too Many Requests; retrying in 1.0 s"),
        "Retry-After must be honoured: {}",
        outcome.stderr
    );

    assert_image_served(&berth, &repo, &image);
}

#[test]
fn a_stalled_upstream_ends_the_copy_at_its_deadline_leaves_nothing_behind_and_stages_uncached() {
    let upstream = Upstream::start(None);
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    let image = web_image(13, &[600 * KIB, 400 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    // Part of each layer arrives, then the source goes silent with the connections open.
    for layer in &image.layers {
        proxy.inject(&layer.blob.digest, Fault::Stall(100 * KIB), None);
    }

    let reference = format!("{}/team/app:1.0", proxy.host());
    let started = Instant::now();
    let (cacher, outcome) = stage_cached(
        &berth,
        "copy_timeout_seconds: 3\n",
        &reference,
        &new_guid(),
        &[],
    );
    let took = started.elapsed();
    assert_staged_uncached(&cacher, &outcome, &reference, "the copy ran out of time");
    assert!(
        outcome
            .stdout
            .contains("did not finish within 3 s (copy_timeout_seconds")
            && outcome.stdout.contains("nothing was cached"),
        "{}",
        outcome.stdout
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "ended after {took:?}"
    );
    let uploads = files_below(&berth.root().join("uploads"));
    assert_eq!(uploads, Vec::<PathBuf>::new(), "upload sessions left open");
    for repo in berth.catalog() {
        assert_eq!(berth.tags(&repo), Vec::<String>::new(), "{repo}");
        assert_eq!(
            berth.manifest(&repo, &image.manifest.digest),
            None,
            "{repo}"
        );
    }
    assert_not_stored(
        &berth,
        &image
            .layers
            .iter()
            .map(|l| l.blob.digest.as_str())
            .collect::<Vec<_>>(),
    );
}

#[test]
fn a_corrupted_blob_fails_staging_and_commits_nothing() {
    let upstream = Upstream::start(None);
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    let image = web_image(6, &[300 * KIB, 200 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let bad = &image.layers[1].blob;
    proxy.inject(&bad.digest, Fault::Corrupt, None);
    let mut corrupted = bad.bytes.clone();
    corrupted[0] ^= 0xff;
    let corrupted = sha256(&corrupted);

    let reference = format!("{}/team/app:1.0", proxy.host());
    let (_, outcome) = stage_failing(&berth, "attempts: 2\n", &reference, &[]);
    let failure = failure_line(&outcome);
    // Blamed on the source, after the configured number of tries.
    assert!(
        failure.contains(&format!("blob {} arrived corrupted", bad.digest)),
        "{failure}"
    );
    assert!(
        outcome.stderr.contains("starting it again (try 2/2)"),
        "{}",
        outcome.stderr
    );
    let fetched = proxy
        .exchanges()
        .iter()
        .filter(|e| e.path.ends_with(&bad.digest))
        .count();
    assert_eq!(fetched, 2);
    assert!(!outcome.stdout.contains("Staging process finished"));

    let repos = berth.catalog();
    for repo in &repos {
        for digest in [&bad.digest, &corrupted] {
            assert!(!berth.has_blob(repo, digest), "{repo} has {digest}");
        }
        assert_eq!(berth.tags(repo), Vec::<String>::new(), "{repo}");
        assert_eq!(berth.manifest(repo, &image.manifest.digest), None, "{repo}");
    }
    // Nor anywhere in its storage, whatever the layout.
    assert_not_stored(&berth, &[&bad.digest, &corrupted]);
}

#[test]
fn a_bad_image_config_stops_the_copy_and_leaves_no_upload_behind() {
    let upstream = Upstream::start(None);
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    let layers = vec![
        Layer::generate(70, 300 * KIB),
        Layer::generate(71, 200 * KIB),
    ];
    let image = Image::new(
        "amd64",
        layers,
        json!({ "Cmd": ["serve"], "ExposedPorts": { "70000/tcp": {} } }),
    );
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    // The layers are slow to come, so their uploads are open when the config turns out bad.
    for layer in &image.layers {
        proxy.inject(
            &layer.blob.digest,
            Fault::Delay(Duration::from_secs(3)),
            None,
        );
    }

    let reference = format!("{}/team/app:1.0", proxy.host());
    let started = Instant::now();
    let (_, outcome) = stage_failing(&berth, "", &reference, &[]);
    let failure = failure_line(&outcome);
    assert!(failure.contains("\"70000/tcp\""), "{failure}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the copy stopped instead of waiting for the slow layers: {:?}",
        started.elapsed()
    );
    let uploads = files_below(&berth.root().join("uploads"));
    assert_eq!(uploads, Vec::<PathBuf>::new(), "upload sessions left open");
    for repo in berth.catalog() {
        assert_eq!(berth.tags(&repo), Vec::<String>::new(), "{repo}");
        assert_eq!(
            berth.manifest(&repo, &image.manifest.digest),
            None,
            "{repo}"
        );
    }
}
