//! What every module shares: the web app's image, staging runs, and checks on what was cached.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::*;

pub(crate) const KIB: usize = 1024;

/// What a typical web app's image config says about how to run it. The ports are listed so that
/// sorting them as strings ("10000/tcp" < "8080/tcp") would give the wrong order.
pub(crate) fn web_runtime() -> Value {
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
pub(crate) const WEB_EXECUTION_METADATA: &str = concat!(
    r#"{"cmd":["serve","--port=8080"],"entrypoint":["/app/start","--verbose"],"workdir":"/app","#,
    r#""ports":[{"Port":8080,"Protocol":"tcp"},{"Port":10000,"Protocol":"tcp"}],"user":"vcap"}"#
);

/// The whole staging result for an image with [`web_runtime`], apps starting `docker_image`.
pub(crate) fn web_staging_result(docker_image: &str) -> Value {
    json!({
        "lifecycle_type": "docker",
        "lifecycle_metadata": { "docker_image": docker_image },
        "process_types": { "web": "/app/start --verbose serve --port=8080" },
        "execution_metadata": WEB_EXECUTION_METADATA,
    })
}

pub(crate) fn web_image(seed: u64, layer_sizes: &[usize]) -> Image {
    let layers = layer_sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| Layer::generate(seed * 100 + i as u64, size))
        .collect();
    Image::new("amd64", layers, web_runtime())
}

/// A password nobody else could print by accident.
pub(crate) fn unique_secret() -> String {
    format!(
        "Pw-{}-{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// `user:secret` as Basic authentication encodes it.
pub(crate) fn basic_encoded(user: &str, secret: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
}

/// Neither `secret` nor its Basic encoding as `user` was printed or written to a file in `dirs`.
pub(crate) fn assert_never_shown(user: &str, secret: &str, outcome: &Outcome, dirs: &[&Path]) {
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
pub(crate) fn opted_in(berth: &Berth, config: &str, guid: &str) -> Cacher {
    Cacher::caching_into(berth, config)
        .app(guid)
        .env("BERTH_CACHE", "true")
}

/// Stages `reference` for app `guid` with caching on and the `extra` flags, and checks it
/// succeeded; returns the cacher (for its result) and what it printed.
pub(crate) fn stage_cached(
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
pub(crate) fn stage_failing(
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

pub(crate) fn docker_image(result: &Value) -> &str {
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
pub(crate) fn assert_cached_staging(
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
pub(crate) fn assert_skopeo_pulls(reference: &str, dir: &Path, image: &Image) {
    let (digest, manifest) = skopeo_pull(reference, dir);
    assert_eq!(digest, image.manifest.digest);
    assert_eq!(manifest_layers(&manifest), image.layer_digests());
    assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
}

/// Asserts `repo` of `berth` serves every blob of `image`, and its manifest by digest, byte for
/// byte.
#[track_caller]
pub(crate) fn assert_image_served(berth: &Berth, repo: &str, image: &Image) {
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
pub(crate) fn assert_not_stored(berth: &Berth, digests: &[&str]) {
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
pub(crate) fn assert_staged_uncached(
    cacher: &Cacher,
    outcome: &Outcome,
    reference: &str,
    why: &str,
) {
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
pub(crate) fn failure_line(outcome: &Outcome) -> &str {
    outcome
        .stderr
        .lines()
        .find(|l| l.starts_with("Staging process failed: "))
        .unwrap_or_else(|| panic!("no failure line in {}", outcome.stderr))
}
