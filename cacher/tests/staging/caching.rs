//! Clean stagings: cached by digest, the configured platform of an index, caching turned off.

use serde_json::json;

use crate::common::*;
use crate::support::*;

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
