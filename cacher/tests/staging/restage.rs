//! Restaging with the upstream down or refusing: the app's newest cached staging of the reference.

use crate::common::*;
use crate::support::*;

#[test]
fn restage_with_the_upstream_down_uses_the_apps_newest_cached_staging_of_that_reference() {
    let mut upstream = Upstream::start(None);
    let berth = Berth::start();
    let guid = new_guid();
    let reference = format!("{}/team/app:1.0", upstream.host());
    // 1.0 is staged twice, the tag moving between stagings; then the app stages 2.0.
    let first = web_image(23, &[128 * KIB]);
    let second = web_image(24, &[128 * KIB]);
    let other = web_image(25, &[128 * KIB]);
    for (image, tag) in [(&first, "1.0"), (&second, "1.0"), (&other, "2.0")] {
        upstream.push(&format!("team/app:{tag}"), &image.manifest, &image.blobs());
        let reference = format!("{}/team/app:{tag}", upstream.host());
        stage_cached(&berth, "", &reference, &guid, &[]);
    }
    upstream.stop();

    let repo = cache_repository(&guid);
    let before = berth.tags(&repo);
    let (cacher, outcome) = stage_cached(&berth, "attempts: 2\n", &reference, &guid, &[]);
    let cached = berth.pinned(&repo, &second.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));
    // The restage is a staging of its own for retention: a new staging tag on the image it uses.
    let mut added = berth.tags(&repo);
    added.retain(|tag| !before.contains(tag));
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(added[0].starts_with('s'), "{added:?}");
    assert_eq!(
        berth.manifest(&repo, &added[0]).as_deref(),
        Some(&second.manifest.bytes[..])
    );
    assert!(
        outcome.stdout.contains(&format!(
            "Warning: staging from this app's newest cached staging of {reference}: {cached}\n"
        )),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome
            .stdout
            .contains(&format!("Warning: {} cannot be reached: ", upstream.host())),
        "{}",
        outcome.stdout
    );
}

#[test]
fn restage_with_the_upstream_answering_503_or_429_uses_the_cached_staging() {
    let upstream = Upstream::start(None);
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    let image = web_image(30, &[64 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let guid = new_guid();
    let reference = format!("{}/team/app:1.0", proxy.host());
    stage_cached(&berth, "", &reference, &guid, &[]);

    let cached = berth.pinned(&cache_repository(&guid), &image.manifest.digest);
    for status in [503, 429] {
        // Both tries of the cacher's first request.
        proxy.inject("/v2/", Fault::Status(status), Some(2));
        let (cacher, outcome) = stage_cached(&berth, "attempts: 2\n", &reference, &guid, &[]);
        assert_eq!(cacher.result(), web_staging_result(&cached), "{status}");
        assert!(
            outcome.stdout.contains(&format!("answered {status}")),
            "{}",
            outcome.stdout
        );
    }
}

#[test]
fn restage_with_the_upstream_down_never_takes_another_reference_or_another_apps_cache() {
    let mut upstream = Upstream::start(None);
    let berth = Berth::start();
    let image = web_image(26, &[128 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    upstream.push("team/app:1.1", &image.manifest, &image.blobs());
    let guid = new_guid();
    let reference = format!("{}/team/app:1.0", upstream.host());
    stage_cached(&berth, "", &reference, &guid, &[]);
    upstream.stop();

    // Another tag of the same image, and the same reference for another app.
    let same_image = format!("{}/team/app:1.1", upstream.host());
    for (reference, guid) in [(&same_image, guid.as_str()), (&reference, &new_guid())] {
        let cacher = opted_in(&berth, "attempts: 2\n", guid);
        let outcome = cacher.run(&cacher.builder_args(reference, &[]));
        outcome.expect_code(2);
        assert!(!cacher.result_path().exists());
        assert!(
            outcome.stdout.contains(&format!(
                "cannot be reached, and no cached staging of {reference} for this app could be \
                 read from the internal registry (there is none)\n"
            )),
            "{}",
            outcome.stdout
        );
        let failure = failure_line(&outcome);
        assert!(failure.contains(&upstream.host()), "{failure}");
        // The tag a cached staging would carry stays out of the staging log.
        let record = record_tag(guid, reference, None);
        assert!(!outcome.stdout.contains(&record) && !outcome.stderr.contains(&record));
    }
}

#[test]
fn restage_of_a_private_image_with_the_upstream_down_needs_the_credentials_it_was_staged_with() {
    let password = unique_secret();
    let mut upstream = Upstream::start(Some(("team-user", &password)));
    let berth = Berth::start();
    let image = web_image(27, &[128 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let guid = new_guid();
    let reference = format!("{}/team/app:1.0", upstream.host());
    let password_flag = format!("-dockerPassword={password}");
    let staged = ["-dockerUser=team-user", password_flag.as_str()];
    stage_cached(&berth, "", &reference, &guid, &staged);
    upstream.stop();

    let (cacher, _) = stage_cached(&berth, "attempts: 2\n", &reference, &guid, &staged);
    let cached = berth.pinned(&cache_repository(&guid), &image.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));

    // Whoever holds the repository key and knows the app and the image still needs the password.
    let guessed = ["-dockerUser=team-user", "-dockerPassword=not-the-password"];
    let cacher = opted_in(&berth, "attempts: 2\n", &guid);
    let outcome = cacher.run(&cacher.builder_args(&reference, &guessed));
    outcome.expect_code(2);
    assert!(!cacher.result_path().exists());
}
