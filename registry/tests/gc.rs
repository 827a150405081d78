//! Garbage collection against the real binary while it serves: what `berth-registry gc` deletes
//! is exactly what nothing references, checked against the blob files on disk and with skopeo.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
