//! Public images read through the internal registry's pull-through cache: CNCF distribution plays
//! Docker Hub behind a counting proxy, mirrored by berth-registry under `hub/`.

use std::path::Path;

use berth_testkit::upstream::{CountingProxy, Mode, password_file};

use crate::common::*;
use crate::support::*;

/// The upstream registry, the counting proxy apps and the internal registry reach it through,
/// and the internal registry mirroring it under `hub/`.
struct Hub {
    upstream: Upstream,
    counting: CountingProxy,
    berth: Berth,
}

impl Hub {
    /// With `login`, the upstream asks for it, and the internal registry pulls as that user (an
    /// operator's Docker Hub account).
    fn start(login: Option<(&str, &str)>, scratch: &Path) -> Hub {
        let upstream = Upstream::start(login);
        let counting = CountingProxy::start(upstream.addr());
        let login = login.map_or_else(String::new, |(user, password)| {
            format!(
                "  username: {user}\n  password_file: {}\n",
                password_file(scratch, password).display()
            )
        });
        let berth = Berth::start_with_proxy(&format!(
            "- prefix: hub\n  url: http://{}\n  revalidate_seconds: 300\n{login}",
            counting.host()
        ));
        Hub {
            upstream,
            counting,
            berth,
        }
    }

    /// The cacher's configuration lines that read the upstream's public images through `hub/`.
    fn proxies(&self) -> String {
        format!("proxies: {{'{}': hub}}\n", self.counting.host())
    }

    /// `host/repo:tag` of the upstream as apps name it.
    fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.counting.host())
    }

    fn publish(&self, repo_tag: &str, image: &Image) {
        self.upstream
            .push(repo_tag, &image.manifest, &image.blobs());
    }

    fn manifest_requests(&self, method: &str, repo: &str) -> usize {
        self.counting
            .count(method, &format!("/v2/{repo}/manifests/"))
    }
}

#[test]
fn a_public_image_is_pulled_through_the_proxy_once_per_foundation() {
    let scratch = tempfile::tempdir().unwrap();
    let hub = Hub::start(None, scratch.path());
    let image = web_image(61, &[96 * KIB, 32 * KIB]);
    hub.publish("team/app:1.0", &image);
    let reference = hub.reference("team/app:1.0");

    let first = new_guid();
    let (cacher, outcome) = stage_cached(&hub.berth, &hub.proxies(), &reference, &first, &[]);
    let cached = hub
        .berth
        .pinned(&cache_repository(&first), &image.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));
    assert!(
        outcome.stdout.contains(&format!(
            "Reading {reference} through the internal registry's cache of {} (hub/team/app)\n",
            hub.counting.host()
        )),
        "{}",
        outcome.stdout
    );
    assert_eq!(
        hub.manifest_requests("GET", "team/app"),
        1,
        "{:?}",
        hub.counting.requests()
    );
    // Each blob crossed from the upstream once, whoever read it.
    for blob in image.blobs() {
        assert_eq!(
            hub.counting.count("GET", &blob.digest),
            1,
            "{}",
            blob.digest
        );
    }

    // Another app staging the same image costs the upstream no pull, and within the mirror's
    // revalidation window not even a HEAD.
    let second = new_guid();
    let (cacher, _) = stage_cached(&hub.berth, &hub.proxies(), &reference, &second, &[]);
    let cached = hub
        .berth
        .pinned(&cache_repository(&second), &image.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));
    for (method, count) in [("GET", 1), ("HEAD", 0)] {
        assert_eq!(
            hub.manifest_requests(method, "team/app"),
            count,
            "{method}: {:?}",
            hub.counting.requests()
        );
    }
    for blob in image.blobs() {
        assert_eq!(
            hub.counting.count("GET", &blob.digest),
            1,
            "{}",
            blob.digest
        );
    }
}

#[test]
fn with_the_upstream_rate_limiting_a_restage_uses_the_cached_staging_and_says_why() {
    let scratch = tempfile::tempdir().unwrap();
    let hub = Hub::start(None, scratch.path());
    let image = web_image(62, &[64 * KIB]);
    hub.publish("team/app:1.0", &image);
    let reference = hub.reference("team/app:1.0");
    // Staged before the operator turned the proxy on: the internal registry's mirror has never
    // seen the tag, so it can only pass the upstream's 429 on.
    let guid = new_guid();
    stage_cached(&hub.berth, "", &reference, &guid, &[]);
    let cached = hub
        .berth
        .pinned(&cache_repository(&guid), &image.manifest.digest);

    hub.counting.set_mode(Mode::RateLimited);
    let started = std::time::Instant::now();
    let (cacher, outcome) = stage_cached(&hub.berth, &hub.proxies(), &reference, &guid, &[]);
    assert_eq!(cacher.result(), web_staging_result(&cached));
    assert!(
        outcome.stdout.contains(&format!(
            "Warning: {} refused the internal registry's pull of {reference}: its pull rate \
             limit is reached (limit 100 per 21600 s, 0 remaining, resets in 60 s)\n",
            hub.counting.host()
        )),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.contains(&format!(
            "Warning: staging from this app's newest cached staging of {reference}: {cached}\n"
        )),
        "{}",
        outcome.stdout
    );
    // Neither the cacher nor the registry waited out the upstream's Retry-After.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn private_images_go_direct_and_never_enter_the_shared_cache() {
    let scratch = tempfile::tempdir().unwrap();
    let (user, password) = ("operator", unique_secret());
    let hub = Hub::start(Some((user, &password)), scratch.path());
    let public = web_image(63, &[32 * KIB]);
    let private = web_image(64, &[32 * KIB]);
    hub.publish("team/app:1.0", &public);
    hub.publish("team/private:1.0", &private);

    stage_cached(
        &hub.berth,
        &hub.proxies(),
        &hub.reference("team/app:1.0"),
        &new_guid(),
        &[],
    );
    let guid = new_guid();
    let reference = hub.reference("team/private:1.0");
    let user_flag = format!("-dockerUser={user}");
    let password_flag = format!("-dockerPassword={password}");
    let (cacher, outcome) = stage_cached(
        &hub.berth,
        &hub.proxies(),
        &reference,
        &guid,
        &[&user_flag, &password_flag],
    );
    let cached = hub
        .berth
        .pinned(&cache_repository(&guid), &private.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));
    assert!(
        !outcome
            .stdout
            .contains("through the internal registry's cache")
    );
    let catalog = hub.berth.catalog();
    assert!(
        catalog.iter().any(|repo| repo == "hub/team/app"),
        "{catalog:?}"
    );
    assert!(
        !catalog
            .iter()
            .any(|repo| repo.starts_with("hub/team/private")),
        "{catalog:?}"
    );
    assert_never_shown(user, &password, &outcome, &[cacher.dir()]);
}

#[test]
fn with_the_internal_registry_down_a_proxied_image_stages_directly() {
    let scratch = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(None, scratch.path());
    let image = web_image(65, &[32 * KIB]);
    hub.publish("team/app:1.0", &image);
    let reference = hub.reference("team/app:1.0");
    let cacher = opted_in(&hub.berth, &hub.proxies(), &new_guid());
    hub.berth.stop();

    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    assert!(
        outcome.stdout.contains(&format!(
            "Warning: the internal registry's cache of {} failed (",
            hub.counting.host()
        )),
        "{}",
        outcome.stdout
    );
    assert_staged_uncached(
        &cacher,
        &outcome,
        &reference,
        "the internal registry cannot be reached",
    );
    assert_eq!(hub.manifest_requests("GET", "team/app"), 1);
}
