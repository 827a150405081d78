//! Private upstreams: credentials never leak, wrong passwords fail, berth-registry's token flow.

use std::fs;
use std::time::Duration;

use crate::common::*;
use crate::support::*;

#[test]
fn credentials_never_leak() {
    let user = "team-user";
    let password = unique_secret();
    let upstream = Upstream::start(Some((user, &password)));
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    let image = web_image(7, &[200 * KIB, 100 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", proxy.host());
    let basic = basic_encoded(user, &password);
    let user_flag = format!("-dockerUser={user}");
    let password_flag = format!("-dockerPassword={password}");

    for in_env in [false, true] {
        let mut cacher = opted_in(&berth, "", &new_guid());
        let mut extra = vec![user_flag.as_str()];
        if in_env {
            cacher = cacher.env("CF_DOCKER_PASSWORD", &password);
        } else {
            extra.push(&password_flag);
        }
        // Held back long enough to read the process table while the cacher is at work.
        proxy.inject(
            "/manifests/1.0",
            Fault::Delay(Duration::from_secs(2)),
            Some(1),
        );
        let child = cacher.spawn(&cacher.builder_args(&reference, &extra));
        let pid = child.id();
        proxy.wait_until_applied("/manifests/1.0", Duration::from_secs(30));
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("read cmdline");
        let environ = fs::read(format!("/proc/{pid}/environ")).expect("read environ");
        let outcome = cacher.wait(child);
        outcome.expect_code(0);

        let masked = "*".repeat(password.len());
        let (table, expected) = if in_env {
            (&environ, format!("CF_DOCKER_PASSWORD={masked}"))
        } else {
            (&cmdline, format!("-dockerPassword={masked}"))
        };
        assert!(
            table
                .split(|&b| b == 0)
                .any(|entry| entry == expected.as_bytes()),
            "{expected} in {}",
            String::from_utf8_lossy(table)
        );
        for (what, bytes) in [("cmdline", &cmdline), ("environ", &environ)] {
            for secret in [&password, &basic] {
                assert!(
                    !String::from_utf8_lossy(bytes).contains(secret.as_str()),
                    "the password leaked into {what}"
                );
            }
        }
        assert_never_shown(
            user,
            &password,
            &outcome,
            &[cacher.dir(), berth.root().as_path()],
        );
    }
}

#[test]
fn a_wrong_password_fails_with_an_authentication_message() {
    let upstream = Upstream::start(Some(("team-user", &unique_secret())));
    let berth = Berth::start();
    let wrong = unique_secret();
    let reference = format!("{}/team/app:1.0", upstream.host());
    let login = ["-dockerUser=team-user", &format!("-dockerPassword={wrong}")];
    let (_, outcome) = stage_failing(&berth, "", &reference, &login);
    let failure = failure_line(&outcome);
    assert!(
        failure.contains("authentication failed") && failure.contains("rejected the credentials"),
        "{failure}"
    );
    assert!(!outcome.stderr.contains(&wrong) && !outcome.stdout.contains(&wrong));
    assert_eq!(berth.catalog(), Vec::<String>::new());
}

/// berth-registry as an upstream of the Docker Hub kind: the token flow, and `private/` readable
/// by alice alone. Its tokens live `lifetime_seconds` (plus the registry's clock-skew leeway).
/// Alice has pushed `image` as `private/app:1.0`.
fn token_mode_upstream(alice_password: &str, lifetime_seconds: u64, image: &Image) -> Berth {
    let upstream = Berth::start_with_auth(
        &format!(
            "mode: token\n\
             access:\n  - repositories: private\n    grants: {{ \"user:alice\": [push] }}\n\
             token: {{ service: berth-registry, issuer: berth-registry, \
             lifetime_seconds: {lifetime_seconds} }}\n"
        ),
        &[("alice", alice_password)],
    );
    let login = Some(("alice", alice_password));
    upstream.push("private/app:1.0", &image.manifest, &image.blobs(), login);
    upstream
}

#[test]
fn private_image_from_a_token_mode_berth_registry_is_cached_and_pulls_without_it() {
    let password = unique_secret();
    let image = web_image(11, &[600 * KIB, 1024 * KIB, 64 * KIB]);
    let mut upstream = token_mode_upstream(&password, 300, &image);
    let berth = Berth::start();
    // Private indeed: an anonymous pull is sent to the token service.
    let anonymous = http(
        reqwest::Method::GET,
        &format!("{}/v2/private/app/manifests/1.0", upstream.url()),
    );
    assert_eq!(anonymous.status, 401);
    let challenge = anonymous.headers["www-authenticate"]
        .to_str()
        .expect("an ASCII challenge");
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{}/auth/token\",service=\"berth-registry\",\
             scope=\"repository:private/app:pull\"",
            upstream.url()
        )
    );

    let guid = new_guid();
    let reference = format!("{}/private/app:1.0", upstream.host());
    let login = ["-dockerUser=alice", &format!("-dockerPassword={password}")];
    let (cacher, outcome) = stage_cached(&berth, "", &reference, &guid, &login);
    let record = record_tag(&guid, &reference, Some(("alice", &password)));
    let (cached, _) = assert_cached_staging(&berth, &cacher, &outcome, (&guid, &record), &image);
    assert_never_shown(
        "alice",
        &password,
        &outcome,
        &[cacher.dir(), berth.root().as_path()],
    );

    // Apps start from the internal copy alone.
    upstream.stop();
    assert_skopeo_pulls(&cached, cacher.dir(), &image);
}

#[test]
fn a_wrong_password_for_a_token_mode_upstream_fails_and_stores_nothing() {
    let password = unique_secret();
    let image = web_image(12, &[128 * KIB, 64 * KIB]);
    let upstream = token_mode_upstream(&password, 300, &image);
    let berth = Berth::start();

    let wrong = unique_secret();
    let reference = format!("{}/private/app:1.0", upstream.host());
    let login = ["-dockerUser=alice", &format!("-dockerPassword={wrong}")];
    let (cacher, outcome) = stage_failing(&berth, "", &reference, &login);
    let failure = failure_line(&outcome);
    assert!(
        failure.contains("authentication failed")
            && failure.contains("the token service refused the credentials"),
        "{failure}"
    );
    assert!(!outcome.stdout.contains("Staging process finished"));

    assert_eq!(berth.catalog(), Vec::<String>::new());
    let mut digests: Vec<&str> = image.blobs().iter().map(|b| b.digest.as_str()).collect();
    digests.push(&image.manifest.digest);
    assert_not_stored(&berth, &digests);
    assert_never_shown(
        "alice",
        &wrong,
        &outcome,
        &[cacher.dir(), berth.root().as_path()],
    );
}

#[test]
fn a_token_that_expires_mid_copy_is_fetched_again() {
    // One-second tokens, which berth-registry still accepts for its 10 s clock-skew leeway.
    const LIFETIME_AND_LEEWAY: Duration = Duration::from_secs(1 + 10);
    let password = unique_secret();
    let image = web_image(13, &[400 * KIB, 300 * KIB, 200 * KIB]);
    let upstream = token_mode_upstream(&password, 1, &image);
    let proxy = Proxy::start(&upstream.host());
    let berth = Berth::start();
    // One blob at a time, the middle one held back until the token it was sent with has expired:
    // it reaches the registry with a dead token, and every request after it needs a new one.
    let held = image.layers[1].blob.digest.clone();
    proxy.inject(
        &held,
        Fault::Delay(LIFETIME_AND_LEEWAY + Duration::from_secs(2)),
        Some(1),
    );

    let guid = new_guid();
    let reference = format!("{}/private/app:1.0", proxy.host());
    let login = ["-dockerUser=alice", &format!("-dockerPassword={password}")];
    let (cacher, outcome) = stage_cached(&berth, "parallel_blobs: 1\n", &reference, &guid, &login);

    // Refused as expired, then sent again with a fresh token.
    let held_requests: Vec<(Option<String>, u16)> = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.path.ends_with(&held))
        .map(|e| (e.range, e.status))
        .collect();
    assert_eq!(held_requests, [(None, 401), (None, 200)]);

    let repo = cache_repository(&guid);
    assert_eq!(
        docker_image(&cacher.result()),
        berth.pinned(&repo, &image.manifest.digest)
    );
    assert_image_served(&berth, &repo, &image);
    assert_never_shown(
        "alice",
        &password,
        &outcome,
        &[cacher.dir(), berth.root().as_path()],
    );
}
