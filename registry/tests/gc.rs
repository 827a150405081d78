//! Garbage collection against the real binary while it serves: what `berth-registry gc` deletes
//! is exactly what nothing references, checked against the blob files on disk and with skopeo.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// A registry that never collects on its own; `grace_seconds` as given, untagged manifests of
/// `scratch` collected.
fn collecting_registry(grace_seconds: u64) -> Registry {
    Registry::start_with_config(&format!(
        "gc:\n  interval_seconds: 0\n  grace_seconds: {grace_seconds}\n  untagged: [scratch]\n"
    ))
}

/// Runs `berth-registry ARGS` against `registry`'s configuration and storage; its stdout.
fn berth(registry: &Registry, args: &[&str]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_berth-registry"))
        .arg("--config")
        .arg(registry.config_path())
        .args(args)
        .env("BERTH_STORAGE_ROOT", registry.root()))
}

/// Every content object stored: blobs and manifests, by digest.
fn stored(root: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let blobs = root.join("blobs/sha256");
    for shard in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(shard.path()).unwrap().flatten() {
            found.insert(format!("sha256:{}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn digests(images: &[&Image]) -> BTreeSet<String> {
    images
        .iter()
        .flat_map(|image| {
            image
                .blobs()
                .into_iter()
                .chain([&image.manifest])
                .map(|blob| blob.digest.clone())
        })
        .collect()
}

fn push(registry: &Registry, image: &Image, repo: &str, tag: &str) {
    let layout = registry.scratch().join(format!(
        "src-{}",
        image.manifest.digest.trim_start_matches("sha256:")
    ));
    write_oci_layout(&layout, tag, &image.manifest, &image.blobs());
    run(skopeo()
        .args(["copy", "--dest-tls-verify=false"])
        .arg(oci_ref(&layout, tag))
        .arg(format!("docker://{}/{repo}:{tag}", registry.host())));
}

fn request(
    registry: &Registry,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    blocking_request_with(
        registry.addr(),
        method,
        target,
        headers,
        body,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

fn delete(registry: &Registry, target: &str) -> u16 {
    request(registry, "DELETE", target, &[], b"").status
}

/// Pushes `blob` into `repo` in one request, as a monolithic upload.
fn push_blob(registry: &Registry, repo: &str, blob: &Blob) {
    let target = format!("/v2/{repo}/blobs/uploads/?digest={}", blob.digest);
    let octets = [("Content-Type", "application/octet-stream")];
    assert_eq!(
        request(registry, "POST", &target, &octets, &blob.bytes).status,
        201
    );
}

fn pull_verifies(registry: &Registry, repo: &str, tag: &str) {
    let layout = registry
        .scratch()
        .join(format!("pulled-{}-{tag}", repo.replace('/', "-")));
    run(skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/{repo}:{tag}", registry.host()))
        .arg(oci_ref(&layout, tag)));
}

#[test]
fn collection_frees_exactly_what_nothing_references() {
    let registry = collecting_registry(1);
    let kept = Image::generate(601, "amd64", &[300 * 1024, 20 * 1024]);
    let dropped = Image::generate(602, "amd64", &[200 * 1024]);
    let shared = Image::generate(603, "amd64", &[100 * 1024]);
    let (untagged, retagged) = (
        Image::generate(604, "amd64", &[50 * 1024]),
        Image::generate(605, "amd64", &[60 * 1024]),
    );
    push(&registry, &kept, "keep/app", "v1");
    push(&registry, &dropped, "drop/app", "v1");
    push(&registry, &shared, "keep/shared", "v1");
    push(&registry, &shared, "drop/shared", "v1");
    push(&registry, &untagged, "scratch/app", "v1");
    push(&registry, &retagged, "scratch/app", "v1");
    // A layer pushed whose manifest never came, and deleted manifests.
    let loose = Image::generate(606, "amd64", &[40 * 1024]);
    push_blob(&registry, "loose/app", &loose.layers[0].blob);
    for (repo, image) in [("drop/app", &dropped), ("drop/shared", &shared)] {
        let target = format!("/v2/{repo}/manifests/{}", image.manifest.digest);
        assert_eq!(delete(&registry, &target), 202, "{target}");
    }
    let before = stored(&registry.root());
    // Rows carry whole seconds: 2.1 s puts everything so far past a 1 s grace.
    std::thread::sleep(Duration::from_millis(2100));
    // Pushed within the grace period: kept however unreferenced.
    let young = Image::generate(607, "amd64", &[30 * 1024]);
    let young_layer = &young.layers[0].blob;
    push_blob(&registry, "loose/young", young_layer);

    let dry = berth(&registry, &["gc", "--dry-run"]);
    assert!(dry.contains("would delete 1 untagged manifests"), "{dry}");
    let mut after_dry = before.clone();
    after_dry.insert(young_layer.digest.clone());
    assert_eq!(
        stored(&registry.root()),
        after_dry,
        "a dry run deletes nothing"
    );

    let done = berth(&registry, &["gc"]);
    assert!(done.contains("deleted 1 untagged manifests"), "{done}");
    let mut live = digests(&[&kept, &shared, &retagged]);
    live.insert(young_layer.digest.clone());
    assert_eq!(
        stored(&registry.root()),
        live,
        "storage holds exactly the live content"
    );

    for (repo, tag) in [
        ("keep/app", "v1"),
        ("keep/shared", "v1"),
        ("scratch/app", "v1"),
    ] {
        pull_verifies(&registry, repo, tag);
    }
    let gone = request(
        &registry,
        "GET",
        &format!("/v2/loose/app/blobs/{}", loose.layers[0].blob.digest),
        &[],
        b"",
    );
    assert_eq!(gone.status, 404);
    // A second run finds nothing left to do.
    let again = berth(&registry, &["gc"]);
    assert!(
        again.contains("deleted 0 untagged manifests and 0 objects, 0 bytes"),
        "{again}"
    );

    let metrics = String::from_utf8(request(&registry, "GET", "/metrics", &[], b"").body).unwrap();
    for expected in [
        "berth_registry_gc_last_run_timestamp_seconds",
        "berth_registry_gc_last_run_deleted_objects 0",
        "berth_registry_storage_bytes{namespace=\"keep\"}",
        "berth_registry_storage_bytes{namespace=\"scratch\"}",
    ] {
        assert!(metrics.contains(expected), "{expected} in\n{metrics}");
    }
    // Each digest counted once per namespace, manifests included.
    let keep_bytes: usize = [&kept, &shared]
        .iter()
        .flat_map(|image| image.blobs().into_iter().chain([&image.manifest]))
        .map(|blob| blob.bytes.len())
        .sum();
    let line = format!("berth_registry_storage_bytes{{namespace=\"keep\"}} {keep_bytes}");
    assert!(metrics.contains(&line), "{line} in\n{metrics}");
    let usage = berth(&registry, &["usage"]);
    for repo in ["keep/app", "keep/shared", "scratch/app", "loose/young"] {
        assert!(usage.contains(repo), "{repo} in\n{usage}");
    }
    assert!(registry.log().contains("garbage collection done"));
}

/// Pushes of every kind race repeated collections for a minute: skopeo pushes and moves tags
/// (images share a base layer, so mounts and deduplication race the collector too) and pulls,
/// docker pushes and moves a tag, whole repositories' manifests are deleted. Afterwards every tag
/// pulls and verifies, and storage holds exactly the live content, computed from what the test
/// itself pushed and deleted.
#[test]
fn pushes_pulls_tag_moves_and_deletes_race_repeated_collections() {
    const RUN: Duration = Duration::from_secs(60);
    const GRACE: u64 = 5;
    let registry = Registry::start_with_config(&format!(
        "gc:\n  interval_seconds: 0\n  grace_seconds: {GRACE}\n"
    ));
    let mut rng = Rng::new(77);
    let base = make_layer(&mut rng, "race-base", 96 * 1024);
    let images: Vec<Image> = (0..10u64)
        .map(|i| {
            let own = make_layer(&mut rng, &format!("race-{i}"), 24 * 1024 + i as usize * 512);
            Image::from_layers(700 + i, "amd64", vec![base.clone(), own])
        })
        .collect();
    let layouts: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let layout = registry.scratch().join(format!("race-src-{i}"));
            write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
            layout
        })
        .collect();
    let dockerd = Dockerd::start(&registry.host());
    for (i, layout) in layouts.iter().take(2).enumerate() {
        let archive = registry.scratch().join(format!("race-{i}.tar"));
        run(skopeo()
            .arg("copy")
            .arg(oci_ref(layout, "v1"))
            .arg(format!(
                "docker-archive:{}:race/local:{i}",
                archive.display()
            ))
            .arg("--quiet"));
        run(dockerd.docker().arg("load").arg("-i").arg(&archive));
    }

    let stop = AtomicBool::new(false);
    // (repository, manifest digest) pairs that must live on, and those deleted.
    let live = Mutex::new(BTreeSet::new());
    let started = Instant::now();
    let host = registry.host();
    std::thread::scope(|scope| {
        let collections = scope.spawn(|| {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                berth(&registry, &["gc"]);
                runs += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            runs
        });
        let skopeo_pushes = scope.spawn(|| {
            let mut pushes = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let i = pushes % images.len();
                // Tags move between images; every 4th push goes to a repository of its own that
                // the deleter empties.
                let (repo, tag) = if pushes % 4 == 3 {
                    (format!("race/del{pushes}"), "v1".to_string())
                } else {
                    (format!("race/s{}", pushes % 3), format!("t{}", pushes % 2))
                };
                run(skopeo()
                    .args(["copy", "--quiet", "--dest-tls-verify=false"])
                    .arg(oci_ref(&layouts[i], "v1"))
                    .arg(format!("docker://{host}/{repo}:{tag}")));
                if !repo.starts_with("race/del") {
                    live.lock()
                        .unwrap()
                        .insert((repo, images[i].manifest.digest.clone()));
                }
                pushes += 1;
            }
            pushes
        });
        let deletes = scope.spawn(|| {
            let mut deleted = 0;
            let mut next = 3;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(400));
                let i = next % images.len();
                let target = format!("/v2/race/del{next}/manifests/{}", images[i].manifest.digest);
                match delete(&registry, &target) {
                    202 => {
                        deleted += 1;
                        next += 4;
                    }
                    404 => {} // not pushed yet
                    status => panic!("DELETE {target}: {status}"),
                }
            }
            deleted
        });
        let docker_pushes = scope.spawn(|| {
            let mut pushes = 0;
            while !stop.load(Ordering::Relaxed) {
                let k = pushes % 2;
                let remote = format!("{host}/race/docker:latest");
                let out = dockerd.tag_and_push(&format!("race/local:{k}"), &remote);
                let digest = digest_after(&out, "digest:")
                    .unwrap_or_else(|| panic!("no digest in docker push output: {out}"));
                live.lock()
                    .unwrap()
                    .insert(("race/docker".to_string(), digest));
                pushes += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            pushes
        });
        let pulls = scope.spawn(|| {
            let mut pulls = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let repo = format!("race/s{}", pulls % 3);
                let tag = format!("t{}", pulls % 2);
                let listed = request(&registry, "GET", &format!("/v2/{repo}/tags/list"), &[], b"");
                if listed.status == 404 || !String::from_utf8_lossy(&listed.body).contains(&tag) {
                    continue;
                }
                // Tags there only ever move between live images: each pull must verify.
                pull_verifies(&registry, &repo, &tag);
                pulls += 1;
            }
            pulls
        });
        std::thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
        let counts = [
            ("collections", collections.join().unwrap()),
            ("skopeo pushes", skopeo_pushes.join().unwrap()),
            ("deletes", deletes.join().unwrap()),
            ("docker pushes", docker_pushes.join().unwrap()),
            ("pulls", pulls.join().unwrap()),
        ];
        eprintln!("after {:?}: {counts:?}", started.elapsed());
        for (what, count) in counts {
            assert!(count >= 3, "only {count} {what} in a minute");
        }
    });

    // Past the grace period, what nothing references goes; the rest stays, byte for byte.
    std::thread::sleep(Duration::from_secs(GRACE + 2));
    berth(&registry, &["gc"]);
    let mut expected = BTreeSet::new();
    for (repo, digest) in live.lock().unwrap().iter() {
        let got = request(
            &registry,
            "GET",
            &format!("/v2/{repo}/manifests/{digest}"),
            &[(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )],
            b"",
        );
        assert_eq!(got.status, 200, "{repo}@{digest}");
        let manifest: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        expected.insert(digest.clone());
        expected.insert(manifest["config"]["digest"].as_str().unwrap().to_string());
        for layer in manifest["layers"].as_array().unwrap() {
            expected.insert(layer["digest"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        stored(&registry.root()),
        expected,
        "storage holds exactly the live content"
    );
    for repo in ["race/s0", "race/s1", "race/s2"] {
        for tag in ["t0", "t1"] {
            pull_verifies(&registry, repo, tag);
        }
    }
    // docker pulls the image its tag names now, every layer fetched again.
    let ids = run(dockerd.docker().args(["images", "-q", "--no-trunc"]));
    let ids: BTreeSet<&str> = ids.split_whitespace().collect();
    run(dockerd.docker().args(["rmi", "-f"]).args(&ids));
    run(dockerd
        .docker()
        .args(["pull", &format!("{host}/race/docker:latest")]));
}
