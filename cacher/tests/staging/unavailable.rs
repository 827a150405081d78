//! An internal registry full, stopped, unusable or refusing the push: staging goes on uncached.

use crate::common::*;
use crate::support::*;

#[test]
fn a_full_internal_registry_stages_uncached_with_a_warning() {
    let upstream = Upstream::start(None);
    let disk = SmallDisk::mount(6);
    let berth = Berth::start_on(&disk.root);
    // Random bytes do not compress: the layers alone are more than the disk holds.
    let image = web_image(21, &[3 << 20, 3 << 20, 2 << 20]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());

    let reference = format!("{}/team/app:1.0", upstream.host());
    let (cacher, outcome) = stage_cached(&berth, "", &reference, &new_guid(), &[]);
    assert_staged_uncached(
        &cacher,
        &outcome,
        &reference,
        "the internal registry's storage is full",
    );
    for repo in berth.catalog() {
        assert_eq!(berth.tags(&repo), Vec::<String>::new(), "{repo}");
    }
}

#[test]
fn a_stopped_internal_registry_stages_uncached_unless_configured_to_fail() {
    let upstream = Upstream::start(None);
    let image = web_image(22, &[256 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());
    let mut berth = Berth::start();
    berth.stop();

    let (cacher, outcome) = stage_cached(&berth, "attempts: 2\n", &reference, &new_guid(), &[]);
    assert_staged_uncached(
        &cacher,
        &outcome,
        &reference,
        "the internal registry cannot be reached",
    );

    let (_, outcome) = stage_failing(
        &berth,
        "attempts: 2\non_cache_failure: fail\n",
        &reference,
        &[],
    );
    let failure = failure_line(&outcome);
    assert!(
        failure.contains(" in cache/") && failure.contains("Connection refused"),
        "{failure}"
    );
    assert!(!outcome.stdout.contains("Warning"), "{}", outcome.stdout);
}

#[test]
fn a_cacher_that_cannot_set_up_its_registry_client_stages_uncached_with_a_warning() {
    let upstream = Upstream::start(None);
    let image = web_image(29, &[64 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());
    let berth = Berth::start();
    let missing = berth.root().join("no-such-ca.pem");
    let cacher = Cacher::configured(&berth, &format!("  ca_file: {}\n", missing.display()), "")
        .app(&new_guid())
        .env("BERTH_CACHE", "true");
    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    let why = "the cacher cannot set up its connection to the internal registry";
    assert_staged_uncached(&cacher, &outcome, &reference, why);
    assert!(
        outcome.stdout.contains("no-such-ca.pem"),
        "{}",
        outcome.stdout
    );
    assert_eq!(berth.catalog(), Vec::<String>::new());
}

/// Berth as an internal registry that lets the cacher's robot pull but not push, answering
/// `403 DENIED` as it does a push over quota.
#[test]
fn an_internal_registry_denying_the_push_stages_uncached_with_a_warning() {
    let robot = ("robot$berth-cacher", unique_secret());
    let berth = Berth::start_with_auth(
        "mode: basic\naccess:\n  - repositories: cache\n    grants: { \"robot:berth-cacher\": [pull] }\n",
        &[(robot.0, &robot.1)],
    );
    let upstream = Upstream::start(None);
    let image = web_image(28, &[64 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());

    let cacher = Cacher::caching_into_as(&berth, (robot.0, &robot.1), "")
        .app(&new_guid())
        .env("BERTH_CACHE", "true");
    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    let why = "the internal registry denied the copy (over quota, or not allowed)";
    assert_staged_uncached(&cacher, &outcome, &reference, why);
    assert!(
        outcome.stdout.contains("403 Forbidden: DENIED"),
        "{}",
        outcome.stdout
    );
}

/// The image config is read from the cache when the cache holds it; a cache that says so and then
/// fails to serve it is passed over for the source, and the staging is not failed for it.
#[test]
fn a_cache_that_fails_to_serve_the_config_it_holds_is_passed_over_for_the_source() {
    let upstream = Upstream::start(None);
    let berth = Berth::start();
    let proxy = Proxy::start(&berth.host());
    let image = web_image(29, &[64 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());
    let guid = new_guid();
    let stage = || {
        let internal = format!("http://{}", proxy.host());
        let cacher = Cacher::configured_at(&internal, "", "attempts: 2\n")
            .app(&guid)
            .env("BERTH_CACHE", "true");
        let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
        (cacher, outcome)
    };
    let (first, outcome) = stage();
    outcome.expect_code(0);
    let cached = docker_image(&first.result()).to_owned();

    let config = format!(
        "GET /v2/{}/blobs/{}",
        cache_repository(&guid),
        image.config.digest
    );
    proxy.inject(&config, Fault::Status(500), None);
    let (again, outcome) = stage();
    outcome.expect_code(0);
    assert_eq!(docker_image(&again.result()), cached);
    assert!(
        proxy.exchanges().iter().any(|e| e.status == 500),
        "the cache was asked for the config and failed"
    );
}
