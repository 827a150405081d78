//! The internal registry as foundations run it: robot account, instance identity, shared layers.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use base64::Engine;
use serde_json::json;

use crate::common::*;
use crate::support::*;

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

/// As the BOSH release sets the cacher up, instance identity and no repository key: the app keeps
/// one repository per source, named by a hash of its GUID and the reference, so a restage with
/// the upstream down finds its cached copy there; another app, with its own certificate, finds
/// nothing of it.
#[test]
fn with_instance_identity_and_no_key_a_restage_with_the_upstream_down_uses_the_apps_cache() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = DiegoCa::generate(dir.path(), "diego");
    let (certificate, key) = loopback_server_certificate(dir.path());
    let berth =
        Berth::start_with_identity(&internal_identity_mode(&ca.bundle), (&certificate, &key));
    let mut upstream = Upstream::start(None);
    let image = web_image(31, &[96 * KIB]);
    upstream.push("team/app:1.0", &image.manifest, &image.blobs());
    let reference = format!("{}/team/app:1.0", upstream.host());
    let stage = |app: &str| {
        let identity = ca.issue(app, &Leaf::for_app(&new_guid(), &new_guid(), app));
        let cacher =
            Cacher::keyless_with_identity(&berth, &certificate, &identity, "attempts: 2\n")
                .app(app)
                .env("BERTH_CACHE", "true");
        let outcome = cacher.run(&cacher.builder_args(&reference, &[]));
        (cacher, outcome)
    };

    let app = new_guid();
    let (cacher, outcome) = stage(&app);
    outcome.expect_code(0);
    let cached = docker_image(&cacher.result()).to_owned();
    assert!(
        cached.starts_with(&format!("{}/cache/{app}/", berth.host()))
            && cached.ends_with(&format!("@{}", image.manifest.digest)),
        "{cached}"
    );
    // The same source again lands in the same repository.
    let (again, outcome) = stage(&app);
    outcome.expect_code(0);
    assert_eq!(docker_image(&again.result()), cached);

    upstream.stop();
    let (restaged, outcome) = stage(&app);
    outcome.expect_code(0);
    assert_eq!(restaged.result(), web_staging_result(&cached));
    assert!(
        outcome
            .stdout
            .contains("Warning: staging from this app's newest cached staging of"),
        "{}",
        outcome.stdout
    );
    let (_, outcome) = stage(&new_guid());
    outcome.expect_code(2);
}
