//! End-to-end staging runs of the berth-cacher binary as Cloud Controller starts it: CNCF
//! distribution, or berth-registry in token mode, as the upstream (behind a counting,
//! fault-injecting proxy where a test needs one), berth-registry as the internal registry, and
//! skopeo and dockerd pulling the cached copy.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

const KIB: usize = 1024;

/// What a typical web app's image config says about how to run it. The ports are listed so that
/// sorting them as strings ("10000/tcp" < "8080/tcp") would give the wrong order.
fn web_runtime() -> Value {
    json!({
        "Entrypoint": ["/app/start", "--verbose"],
        "Cmd": ["serve", "--port=8080"],
        "WorkingDir": "/app",
        "User": "vcap",
        "Env": ["PATH=/usr/bin:/bin"],
        "ExposedPorts": { "8080/tcp": {}, "10000/tcp": {} },
    })
}

/// `execution_metadata` as Cloud Controller must receive it for [`web_runtime`].
const WEB_EXECUTION_METADATA: &str = concat!(
    r#"{"cmd":["serve","--port=8080"],"entrypoint":["/app/start","--verbose"],"workdir":"/app","#,
    r#""ports":[{"Port":8080,"Protocol":"tcp"},{"Port":10000,"Protocol":"tcp"}],"user":"vcap"}"#
);

/// The whole staging result for an image with [`web_runtime`], apps starting `docker_image`.
fn web_staging_result(docker_image: &str) -> Value {
    json!({
        "lifecycle_type": "docker",
        "lifecycle_metadata": { "docker_image": docker_image },
        "process_types": { "web": "/app/start --verbose serve --port=8080" },
        "execution_metadata": WEB_EXECUTION_METADATA,
    })
}

fn web_image(seed: u64, layer_sizes: &[usize]) -> Image {
    let layers = layer_sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| Layer::generate(seed * 100 + i as u64, size))
        .collect();
    Image::new("amd64", layers, web_runtime())
}

/// A password nobody else could print by accident.
fn unique_secret() -> String {
    format!(
        "Pw-{}-{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// `user:secret` as Basic authentication encodes it.
fn basic_encoded(user: &str, secret: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
}

/// Neither `secret` nor its Basic encoding as `user` was printed or written to a file in `dirs`.
fn assert_never_shown(user: &str, secret: &str, outcome: &Outcome, dirs: &[&Path]) {
    let basic = basic_encoded(user, secret);
    for secret in [secret, basic.as_str()] {
        assert!(
            !outcome.stdout.contains(secret),
            "the password leaked into stdout"
        );
        assert!(
            !outcome.stderr.contains(secret),
            "the password leaked into stderr"
        );
        for dir in dirs {
            assert_eq!(
                files_containing(dir, secret.as_bytes()),
                Vec::<PathBuf>::new(),
                "files holding the password"
            );
        }
    }
}

/// A cacher staging app `guid` into `berth` with caching opted in; `config` is more of its
/// configuration.
fn opted_in(berth: &Berth, config: &str, guid: &str) -> Cacher {
    Cacher::caching_into(berth, config)
        .app(guid)
        .env("BERTH_CACHE", "true")
}

/// Stages `reference` for app `guid` with caching on and the `extra` flags, and checks it
/// succeeded; returns the cacher (for its result) and what it printed.
fn stage_cached(
    berth: &Berth,
    config: &str,
    reference: &str,
    guid: &str,
    extra: &[&str],
) -> (Cacher, Outcome) {
    let cacher = opted_in(berth, config, guid);
    let outcome = cacher.run(&cacher.builder_args(reference, extra));
    outcome.expect_code(0);
    (cacher, outcome)
}

/// Like [`stage_cached`] with a new app, for a staging that must fail: exit code 2, and no
/// staging result.
fn stage_failing(
    berth: &Berth,
    config: &str,
    reference: &str,
    extra: &[&str],
) -> (Cacher, Outcome) {
    let cacher = opted_in(berth, config, &new_guid());
    let outcome = cacher.run(&cacher.builder_args(reference, extra));
    outcome.expect_code(2);
    assert!(!cacher.result_path().exists());
    (cacher, outcome)
}

fn docker_image(result: &Value) -> &str {
    result["lifecycle_metadata"]["docker_image"]
        .as_str()
        .unwrap_or_else(|| panic!("no docker_image in {result}"))
}

/// Asserts a clean staging of `image` for app `guid` cached it by digest: nothing on stderr, the
/// closing line on stdout, a result that starts apps from the cached copy, and one repository
/// for the app with one staging tag, and the `record` tag marking the app's newest staging of
/// the reference, on the very bytes the upstream served. Returns the cached reference and the
/// staging tag.
#[track_caller]
fn assert_cached_staging(
    berth: &Berth,
    cacher: &Cacher,
    outcome: &Outcome,
    (guid, record): (&str, &str),
    image: &Image,
) -> (String, String) {
    assert_eq!(outcome.stderr, "", "a clean staging warns about nothing");
    assert!(
        outcome.stdout.ends_with("Staging process finished\n"),
        "{}",
        outcome.stdout
    );
    let repo = cache_repository(guid);
    let cached = berth.pinned(&repo, &image.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));
    assert_eq!(berth.catalog(), [repo.as_str()]);
    let record = record.to_owned();
    let mut tags = berth.tags(&repo);
    tags.retain(|tag| *tag != record);
    assert_eq!(tags.len(), 1, "{tags:?} besides {record}");
    let tag = tags.remove(0);
    for tag in [&tag, &record] {
        assert_eq!(
            berth.manifest(&repo, tag).as_deref(),
            Some(&image.manifest.bytes[..]),
            "{tag}"
        );
    }
    (cached, tag)
}

/// Asserts skopeo pulls `image` as `reference`, verifying every blob, into a copy under `dir`.
#[track_caller]
fn assert_skopeo_pulls(reference: &str, dir: &Path, image: &Image) {
    let (digest, manifest) = skopeo_pull(reference, dir);
    assert_eq!(digest, image.manifest.digest);
    assert_eq!(manifest_layers(&manifest), image.layer_digests());
    assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
}

/// Asserts `repo` of `berth` serves every blob of `image`, and its manifest by digest, byte for
/// byte.
#[track_caller]
fn assert_image_served(berth: &Berth, repo: &str, image: &Image) {
    for blob in image.blobs() {
        let response = http(
            reqwest::Method::GET,
            &format!("{}/v2/{repo}/blobs/{}", berth.url(), blob.digest),
        );
        assert_eq!(response.status, 200);
        assert!(response.body == blob.bytes, "{} differs", blob.digest);
    }
    assert_eq!(
        berth.manifest(repo, &image.manifest.digest).as_deref(),
        Some(&image.manifest.bytes[..])
    );
}

/// Asserts no file anywhere in `berth`'s storage is named after one of `digests`, whatever the
/// layout.
#[track_caller]
fn assert_not_stored(berth: &Berth, digests: &[&str]) {
    for digest in digests {
        let hex = &digest["sha256:".len()..];
        let named: Vec<PathBuf> = files_below(&berth.root())
            .into_iter()
            .filter(|path| path.file_name().is_some_and(|n| n == hex))
            .collect();
        assert_eq!(named, Vec::<PathBuf>::new());
    }
}

/// Asserts a staging of `reference` went on uncached: the result the builder writes without a
/// cache, and a warning in the staging log saying `why`.
#[track_caller]
fn assert_staged_uncached(cacher: &Cacher, outcome: &Outcome, reference: &str, why: &str) {
    assert_eq!(cacher.result(), web_staging_result(reference));
    let warning = format!("Warning: the image is not cached: {why}: ");
    assert!(outcome.stdout.contains(&warning), "{}", outcome.stdout);
    assert!(
        outcome.stdout.contains(&format!(
            "Warning: staging goes on uncached: the app starts from {reference}, "
        )),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.ends_with("Staging process finished\n"),
        "{}",
        outcome.stdout
    );
}

/// The `Staging process failed: ...` line of a failed run.
fn failure_line(outcome: &Outcome) -> &str {
    outcome
        .stderr
        .lines()
        .find(|l| l.starts_with("Staging process failed: "))
        .unwrap_or_else(|| panic!("no failure line in {}", outcome.stderr))
}

#[test]
fn private_image_is_cached_by_digest_and_pulls_without_the_upstream() {
    let password = unique_secret();
    let mut upstream = Upstream::start(Some(("team-user", &password)));
    let berth = Berth::start();
    let image = web_image(1, &[600 * KIB, 1024 * KIB, 64 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());

    let guid = new_guid();
    let reference = format!("{}/team/app:1.0", upstream.host());
    let login = [
        "-dockerUser=team-user",
        &format!("-dockerPassword={password}"),
    ];
    let (cacher, outcome) = stage_cached(&berth, "", &reference, &guid, &login);
    assert!(
        outcome.stdout.starts_with("Staging process started ...\n"),
        "{}",
        outcome.stdout
    );
    // One repository for the app, one staging tag on the very bytes the upstream served.
    let record = record_tag(&guid, &reference, Some(("team-user", &password)));
    let (cached, tag) = assert_cached_staging(&berth, &cacher, &outcome, (&guid, &record), &image);
    assert!(
        tag.len() == 21
            && tag.starts_with('s')
            && tag[1..12].bytes().all(|b| b.is_ascii_digit())
            && tag.as_bytes()[12] == b'-',
        "staging tag {tag}"
    );

    // The foundation no longer needs the upstream: skopeo and docker pull the cached copy.
    upstream.stop();
    assert_skopeo_pulls(&cached, cacher.dir(), &image);

    let dockerd = Dockerd::start(&berth.host());
    let output = run(dockerd.docker().args(["pull", &cached]));
    assert!(
        output.contains(&format!("Digest: {}", image.manifest.digest)),
        "{output}"
    );
    let inspected = run(dockerd.docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{.Config.WorkingDir}} {{.Config.User}}",
        &cached,
    ]));
    assert_eq!(
        inspected.trim(),
        format!("{} /app vcap", image.config.digest)
    );
}

#[test]
fn multi_arch_index_resolves_the_configured_platform() {
    let upstream = Upstream::start(None);
    let berth = Berth::start();
    let base = Layer::generate(20, 300 * KIB);
    let amd64 = Image::new(
        "amd64",
        vec![base.clone(), Layer::generate(21, 200 * KIB)],
        json!({ "Cmd": ["/run-amd64"] }),
    );
    let arm64 = Image::new(
        "arm64",
        vec![base, Layer::generate(22, 150 * KIB)],
        json!({ "Cmd": ["/run-arm64"] }),
    );
    let index = index_of(&[&amd64, &arm64]);
    let mut blobs = vec![&amd64.manifest, &arm64.manifest];
    blobs.extend(amd64.blobs());
    blobs.extend(arm64.blobs());
    upstream.push("team/multi:2.0", &index, &blobs);
    let reference = format!("{}/team/multi:2.0", upstream.host());

    let stage = |config: &str| {
        let guid = new_guid();
        let (cacher, _) = stage_cached(&berth, config, &reference, &guid, &[]);
        (cacher.result(), cache_repository(&guid))
    };
    let has_image = |repo: &str, image: &Image| {
        berth.manifest(repo, &image.manifest.digest).as_deref() == Some(&image.manifest.bytes[..])
            && image
                .blobs()
                .iter()
                .all(|b| berth.has_blob(repo, &b.digest))
    };

    let (result, repo) = stage("");
    assert_eq!(
        docker_image(&result),
        berth.pinned(&repo, &amd64.manifest.digest)
    );
    assert_eq!(result["process_types"]["web"], "/run-amd64");
    assert!(has_image(&repo, &amd64));
    assert_eq!(berth.manifest(&repo, &arm64.manifest.digest), None);
    assert!(!berth.has_blob(&repo, &arm64.layers[1].blob.digest));
    assert_eq!(berth.manifest(&repo, &index.digest), None);

    let (result, repo) = stage("platform: linux/arm64\n");
    assert_eq!(
        docker_image(&result),
        berth.pinned(&repo, &arm64.manifest.digest)
    );
    assert_eq!(result["process_types"]["web"], "/run-arm64");
    assert!(has_image(&repo, &arm64));
    assert_eq!(berth.manifest(&repo, &amd64.manifest.digest), None);

    // keep_index: the whole index is there, and apps still start the configured platform.
    let (result, repo) = stage("keep_index: true\n");
    assert_eq!(
        docker_image(&result),
        berth.pinned(&repo, &amd64.manifest.digest)
    );
    assert_eq!(
        berth.manifest(&repo, &index.digest).as_deref(),
        Some(&index.bytes[..])
    );
    assert!(has_image(&repo, &amd64));
    assert!(has_image(&repo, &arm64));
}

#[test]
fn caching_off_writes_the_builder_reference_and_pushes_nothing() {
    let upstream = Upstream::start(None);
    let berth = Berth::start();
    let image = web_image(3, &[128 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());

    // Not opted in; and opted out of a foundation that caches by default.
    for cacher in [
        Cacher::caching_into(&berth, "").app(&new_guid()),
        Cacher::caching_into(&berth, "cache_by_default: true\n")
            .app(&new_guid())
            .env("BERTH_CACHE", "false"),
    ] {
        let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
        outcome.expect_code(0);
        assert_eq!(outcome.stderr, "");
        assert!(!outcome.stdout.contains("Caching"), "{}", outcome.stdout);
        assert_eq!(cacher.result(), web_staging_result(&reference));
    }
    assert_eq!(berth.catalog(), Vec::<String>::new());
}

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

/// On the registry as a foundation runs it (token mode, the robot's `push-by-name` on the cache,
/// anonymous by-name pulls there): the robot's mounts without `from` still find the layers other
/// stagings cached.
#[test]
fn a_second_app_on_the_same_base_transfers_only_its_own_layers() {
    let upstream = Upstream::start(None);
    let proxy = Proxy::start(&upstream.host());
    let robot = ("robot$berth-cacher", unique_secret());
    let berth = Berth::start_with_auth(INTERNAL_TOKEN_MODE, &[(robot.0, &robot.1)]);
    let base = vec![
        Layer::generate(40, 512 * KIB),
        Layer::generate(41, 256 * KIB),
    ];
    let with_own_layer = |seed: u64, cmd: &str| {
        let mut layers = base.clone();
        layers.push(Layer::generate(seed, 192 * KIB));
        Image::new("amd64", layers, json!({ "Cmd": [cmd] }))
    };
    let app_a = with_own_layer(42, "/a");
    let app_b = with_own_layer(43, "/b");
    upstream.push("team/a:1", &app_a.manifest, &app_a.blobs());
    upstream.push("team/b:1", &app_b.manifest, &app_b.blobs());

    // Layer bytes the upstream served for one staging, and the copy summary it printed.
    let stage = |repo_tag: &str, guid: &str| {
        let reference = format!("{}/{repo_tag}", proxy.host());
        let cacher = Cacher::caching_into_as(&berth, (robot.0, &robot.1), "")
            .app(guid)
            .env("BERTH_CACHE", "true");
        let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
        outcome.expect_code(0);
        let served = proxy.take_blob_bytes();
        let summary = outcome
            .stdout
            .lines()
            .find(|l| l.starts_with("Cached in"))
            .unwrap_or_else(|| panic!("no summary in {}", outcome.stdout))
            .to_owned();
        (served, summary)
    };
    let sizes = |blobs: &[&Blob]| -> BTreeMap<String, u64> {
        blobs
            .iter()
            .map(|b| (b.digest.clone(), b.bytes.len() as u64))
            .collect()
    };

    let guid_a = new_guid();
    let (served, summary) = stage("team/a:1", &guid_a);
    assert_eq!(served, sizes(&app_a.blobs()), "first staging of app A");
    assert!(
        summary.contains("4 blobs copied") && summary.contains("0 mounted"),
        "{summary}"
    );

    let (served, summary) = stage("team/b:1", &new_guid());
    assert_eq!(
        served,
        sizes(&[&app_b.config, &app_b.layers[2].blob]),
        "app B: only its config and own layer may come from upstream"
    );
    assert!(
        summary.contains("2 blobs copied") && summary.contains("2 mounted"),
        "{summary}"
    );

    let (served, summary) = stage("team/a:1", &guid_a);
    assert_eq!(served, BTreeMap::new(), "re-staging app A");
    assert!(
        summary.contains("0 blobs copied") && summary.contains("4 already cached"),
        "{summary}"
    );
}

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

#[test]
fn a_missing_docker_ref_is_a_flag_error() {
    let cacher = Cacher::new();
    let outcome = cacher.run(&[format!(
        "-outputMetadataJSONFilename={}",
        cacher.result_path().display()
    )]);
    outcome.expect_code(1);
    assert!(
        outcome
            .stderr
            .starts_with("missing flag: dockerRef required\n"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stdout.contains("Staging process started"));
    assert!(!cacher.result_path().exists());
}

#[test]
fn legacy_and_unknown_flags_are_ignored_with_a_warning() {
    let upstream = Upstream::start(None);
    let image = web_image(8, &[64 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());
    let cacher = Cacher::new();
    let outcome = cacher.run(&cacher.builder_args(
        &reference,
        &[
            "-cacheDockerImage",
            "-dockerRegistryHost=10.0.0.1",
            "-dockerRegistryPort",
            "8080",
            "--someFutureFlag=on",
        ],
    ));
    outcome.expect_code(0);
    let warnings: Vec<&str> = outcome
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(
        warnings,
        [
            "warning: ignoring legacy flag -cacheDockerImage",
            "warning: ignoring legacy flag -dockerRegistryHost",
            "warning: ignoring legacy flag -dockerRegistryPort",
            "warning: ignoring unknown flag -someFutureFlag",
        ]
    );
    assert_eq!(docker_image(&cacher.result()), reference);
}

// ---------------------------------------------------------------------------------------------
// berth-registry in token mode as the upstream
// ---------------------------------------------------------------------------------------------

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

/// The internal registry as a foundation runs it: token mode, the cache namespace pushable by the
/// cacher's robot account only, pullable by exact name by anyone, even with credentials it does
/// not know, listed to nobody, the robot included (its credential ships in the staging bundle).
const INTERNAL_TOKEN_MODE: &str = "mode: token\n\
     access:\n  - repositories: cache\n    anonymous: by-name\n    \
     foreign_credentials_as_anonymous: true\n    grants: { \"robot:berth-cacher\": [push-by-name] }\n";

#[test]
fn cacher_pushes_as_its_robot_and_cells_pull_by_name_with_origin_credentials() {
    let robot = ("robot$berth-cacher", unique_secret());
    let berth = Berth::start_with_auth(INTERNAL_TOKEN_MODE, &[(robot.0, &robot.1)]);
    let upstream = Upstream::start(None);
    let image = web_image(15, &[300 * KIB, 100 * KIB]);
    upstream.push("library/web:1.0", &image.manifest, &image.blobs());

    let guid = new_guid();
    let cacher = Cacher::caching_into_as(&berth, (robot.0, &robot.1), "")
        .app(&guid)
        .env("BERTH_CACHE", "true");
    let reference = format!("{}/library/web:1.0", upstream.host());
    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    let cached = berth.pinned(&cache_repository(&guid), &image.manifest.digest);
    assert_eq!(
        cacher.result()["lifecycle_metadata"]["docker_image"],
        cached.as_str()
    );
    // The robot's password lives in the cacher's configuration, and nowhere the cacher writes.
    let written = cacher
        .result_path()
        .parent()
        .expect("a result directory")
        .to_path_buf();
    assert_never_shown(robot.0, &robot.1, &outcome, &[&written, &berth.root()]);

    // A cell presents the origin registry's credentials, or none: both pull the exact name.
    let origin = ("dockerhub-user", "origin-password");
    for credentials in [Some(origin), None] {
        let (digest, manifest) = skopeo_pull_as(&cached, cacher.dir(), credentials);
        assert_eq!(digest, image.manifest.digest, "{credentials:?}");
        assert_eq!(manifest_layers(&manifest), image.layer_digests());
    }
    // Nobody without a grant lists the cache.
    for listing in [
        "_catalog".to_string(),
        format!("{}/tags/list", cache_repository(&guid)),
    ] {
        let response = http(
            reqwest::Method::GET,
            &format!("{}/v2/{listing}", berth.url()),
        );
        assert_eq!(response.status, 401, "{listing}");
    }
    // Not even the robot: a copy of its credential leaked from a bundle finds nothing.
    let login =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", robot.0, robot.1));
    let token_reply = http_as(
        reqwest::Method::GET,
        &format!(
            "{}/auth/token?service=berth-registry&scope=registry:catalog:*&scope=repository:{}:pull,push",
            berth.url(),
            cache_repository(&guid)
        ),
        Some(&format!("Basic {login}")),
    );
    assert_eq!(token_reply.status, 200, "the robot gets a token");
    let token: serde_json::Value = serde_json::from_slice(&token_reply.body).expect("token JSON");
    let bearer = format!("Bearer {}", token["token"].as_str().expect("a token"));
    let catalog = http_as(
        reqwest::Method::GET,
        &format!("{}/v2/_catalog", berth.url()),
        Some(&bearer),
    );
    assert!(
        catalog.status != 200 || !String::from_utf8_lossy(&catalog.body).contains("cache/"),
        "the robot listed the cache: {} {}",
        catalog.status,
        String::from_utf8_lossy(&catalog.body)
    );
    let tags = http_as(
        reqwest::Method::GET,
        &format!("{}/v2/{}/tags/list", berth.url(), cache_repository(&guid)),
        Some(&bearer),
    );
    assert!(
        [401, 403].contains(&tags.status),
        "the robot listing the tags of an app's cache got {}",
        tags.status
    );

    // Without the robot's password the cacher cannot push, and nothing lands: the app stages
    // uncached.
    let other = web_image(16, &[64 * KIB]);
    upstream.push("library/other:1.0", &other.manifest, &other.blobs());
    let cacher = Cacher::caching_into_as(&berth, (robot.0, "not-the-robot-password"), "")
        .app(&new_guid())
        .env("BERTH_CACHE", "true");
    let reference = format!("{}/library/other:1.0", upstream.host());
    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    let why = "the internal registry refused the cacher's credentials";
    assert_staged_uncached(&cacher, &outcome, &reference, why);
    let digests: Vec<&str> = other.blobs().iter().map(|b| b.digest.as_str()).collect();
    assert_not_stored(&berth, &digests);
}

/// The internal registry on a foundation with instance identity: each app pushes under its own
/// GUID, by its certificate, and anyone pulls by exact name.
fn internal_identity_mode(bundle: &Path) -> String {
    format!(
        "mode: token\ninstance_identity: {{ ca_file: {} }}\n\
         access:\n  - repositories: cache/{{app}}\n    anonymous: by-name\n    \
         foreign_credentials_as_anonymous: true\n    grants: {{ \"app:{{app}}\": [push-by-name] }}\n",
        bundle.display()
    )
}

#[test]
fn cacher_stages_an_app_with_its_instance_identity_and_no_password() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = DiegoCa::generate(dir.path(), "diego");
    let (certificate, key) = loopback_server_certificate(dir.path());
    let berth =
        Berth::start_with_identity(&internal_identity_mode(&ca.bundle), (&certificate, &key));
    let upstream = Upstream::start(None);
    let image = web_image(17, &[200 * KIB, 50 * KIB]);
    upstream.push("library/web:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/library/web:1.0", upstream.host());

    // The GUID comes from the certificate, the only one the registry lets this app push under,
    // whatever the environment says.
    let (app, elsewhere) = (new_guid(), new_guid());
    let identity = ca.issue("app", &Leaf::for_app(&new_guid(), &new_guid(), &app));
    let cacher = Cacher::caching_into_with_identity(&berth, &certificate, &identity)
        .app(&elsewhere)
        .env("BERTH_CACHE", "true");
    let config = fs::read_to_string(cacher.dir().join("berth-cacher.yml")).expect("the config");
    assert!(
        !config.contains("password") && !config.contains("username"),
        "{config}"
    );
    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    let cached = berth.pinned(&cache_repository(&app), &image.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));
    // A cell pulls the exact name without credentials, or with the origin's.
    for credentials in [None, Some(("dockerhub-user", "origin-password"))] {
        let (digest, manifest) = skopeo_pull_as(&cached, cacher.dir(), credentials);
        assert_eq!(digest, image.manifest.digest, "{credentials:?}");
        assert_eq!(manifest_layers(&manifest), image.layer_digests());
    }

    // Re-staging another app with the same base: its own certificate, its own repository.
    let second = new_guid();
    let identity = ca.issue("second", &Leaf::for_app(&new_guid(), &new_guid(), &second));
    let cacher = Cacher::caching_into_with_identity(&berth, &certificate, &identity)
        .app(&second)
        .env("BERTH_CACHE", "true");
    cacher
        .run(&cacher.builder_args(&reference, &[]))
        .expect_code(0);
    let cached = berth.pinned(&cache_repository(&second), &image.manifest.digest);
    assert_eq!(cacher.result(), web_staging_result(&cached));

    // Identity on but no certificate in the environment: the app stages uncached, and the
    // staging log says why.
    let cacher = Cacher::caching_into_with_identity(&berth, &certificate, &identity)
        .env("CF_INSTANCE_CERT", "")
        .app(&app)
        .env("BERTH_CACHE", "true");
    let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
    outcome.expect_code(0);
    assert!(
        outcome.stdout.contains("Warning") && outcome.stdout.contains("CF_INSTANCE_CERT"),
        "{}",
        outcome.stdout
    );
    assert_eq!(cacher.result(), web_staging_result(&reference));
}
