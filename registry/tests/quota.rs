//! Quotas against the real binary: pushes through skopeo and docker that would take a scope past
//! its quota are refused with `DENIED` naming the quota and its usage, and leave nothing behind;
//! mounts count, `/metrics` shows the use, and deleting makes room again.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

const KIB: usize = 1024;

/// A registry that never collects on its own, with `quotas` (YAML list items) in force.
fn quota_registry(quotas: &str) -> Registry {
    Registry::start_with_config(&format!("gc:\n  interval_seconds: 0\nquotas:\n{quotas}"))
}

/// Every file below `dir`, relative to it.
fn files(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap();
                found.insert(relative.to_string_lossy().into_owned());
            }
        }
    }
    found
}

/// Blob and manifest files, and upload data, in `registry`'s storage.
fn stored(registry: &Registry) -> (BTreeSet<String>, BTreeSet<String>) {
    let root = registry.root();
    (files(&root.join("blobs")), files(&root.join("uploads")))
}

fn request(registry: &Registry, method: &str, target: &str) -> RawResponse {
    blocking_request_with(
        registry.addr(),
        method,
        target,
        &[],
        b"",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

fn status(registry: &Registry, method: &str, target: &str) -> u16 {
    request(registry, method, target).status
}

/// Runs `berth-registry ARGS` against `registry`'s configuration and storage; its stdout.
fn berth(registry: &Registry, args: &[&str]) -> String {
    run(
        std::process::Command::new(env!("CARGO_BIN_EXE_berth-registry"))
            .arg("--config")
            .arg(registry.config_path())
            .args(args)
            .env("BERTH_STORAGE_ROOT", registry.root()),
    )
}

fn metrics(registry: &Registry) -> String {
    String::from_utf8(request(registry, "GET", "/metrics").body).unwrap()
}

/// Copies `image` into `repo:tag` with skopeo; the command's output, whatever its outcome.
fn skopeo_push(registry: &Registry, image: &Image, repo: &str, tag: &str) -> std::process::Output {
    let layout = registry.scratch().join(format!(
        "src-{}",
        image.manifest.digest.trim_start_matches("sha256:")
    ));
    write_oci_layout(&layout, tag, &image.manifest, &image.blobs());
    run_output(
        skopeo()
            .args(["copy", "--dest-tls-verify=false", "--retry-times=0"])
            .arg(oci_ref(&layout, tag))
            .arg(format!("docker://{}/{repo}:{tag}", registry.host())),
        Duration::from_secs(120),
    )
}

/// Pushes `blob` into `repo` in one request (a monolithic upload); the status.
fn push_blob(registry: &Registry, repo: &str, blob: &Blob) -> u16 {
    let target = format!("/v2/{repo}/blobs/uploads/?digest={}", blob.digest);
    blocking_request_with(
        registry.addr(),
        "POST",
        &target,
        &[("Content-Type", "application/octet-stream")],
        &blob.bytes,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("POST {target}: {e}"))
    .status
}

/// Asserts that `repo` has no tag `tag` and cannot read any of `digests`.
#[track_caller]
fn assert_absent(registry: &Registry, repo: &str, tag: &str, digests: &[&str]) {
    assert_eq!(
        status(registry, "GET", &format!("/v2/{repo}/manifests/{tag}")),
        404
    );
    for digest in digests {
        let target = format!("/v2/{repo}/blobs/{digest}");
        assert_eq!(status(registry, "HEAD", &target), 404, "{target}");
    }
}

#[test]
fn skopeo_push_past_a_quota_is_denied_and_leaves_nothing_behind() {
    let registry = quota_registry(
        "  - {repositories: team/*, max_bytes: 400KiB}\n  - {repositories: team, max_bytes: 1MiB}\n",
    );
    let small = Image::generate(701, "amd64", &[100 * KIB]);
    let big = Image::generate(702, "amd64", &[350 * KIB]);
    let pushed = skopeo_push(&registry, &small, "team/a/app", "v1");
    assert!(pushed.status.success(), "{pushed:?}");

    let (blobs_before, uploads_before) = stored(&registry);
    let refused = skopeo_push(&registry, &big, "team/a/app", "v2");
    assert!(!refused.status.success());
    // skopeo logs the message as a quoted field, its quotes escaped.
    let said = String::from_utf8_lossy(&refused.stderr).replace("\\\"", "\"");
    let used = small
        .blobs()
        .iter()
        .chain([&&small.manifest])
        .map(|blob| blob.bytes.len())
        .sum::<usize>();
    assert!(said.contains("denied"), "{said}");
    assert!(
        said.contains(&format!(
            "quota \"team/*\" exceeded: team/a holds {:.1} KiB ({used} bytes) of its 400.0 KiB",
            used as f64 / 1024.0
        )),
        "{said}"
    );
    // The layer that did not fit is nowhere: not linked, not stored, no upload data; no manifest
    // or tag. (The small config blob may have been linked before the layer was refused, like any
    // blob whose manifest never comes: the collector's grace period covers it.)
    let big_layer = &big.layers[0].blob.digest;
    assert_absent(&registry, "team/a/app", "v2", &[big_layer]);
    let (blobs_after, uploads_after) = stored(&registry);
    let added: Vec<_> = blobs_after.difference(&blobs_before).collect();
    let config_file = format!("sha256/{}/{}", &big.config.hex()[..2], big.config.hex());
    assert!(
        added.iter().all(|file| **file == config_file),
        "only the config may have been stored: {added:?}"
    );
    assert_eq!(uploads_after, uploads_before);

    // Each app has a quota of its own: the same image fits under another one.
    let pushed = skopeo_push(&registry, &big, "team/b/app", "v1");
    assert!(pushed.status.success(), "{pushed:?}");
    // A mount into the full scope is refused too, with the same error.
    let mount = request(
        &registry,
        "POST",
        &format!("/v2/team/a/other/blobs/uploads/?mount={big_layer}&from=team/b/app"),
    );
    assert_eq!(mount.status, 403);
    let body: serde_json::Value = serde_json::from_slice(&mount.body).unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert_eq!(body["errors"][0]["detail"]["scope"], "team/a");
    assert_absent(&registry, "team/a/other", "v1", &[big_layer]);

    let text = metrics(&registry);
    let b_used: usize = big
        .blobs()
        .iter()
        .chain([&&big.manifest])
        .map(|blob| blob.bytes.len())
        .sum();
    for line in [
        format!(
            "berth_registry_quota_limit_bytes{{quota=\"team/*\"}} {}",
            400 * KIB
        ),
        format!("berth_registry_quota_used_bytes{{quota=\"team/*\"}} {b_used}"),
        "berth_registry_quota_scopes{quota=\"team/*\"} 2".to_owned(),
        format!(
            "berth_registry_quota_limit_bytes{{quota=\"team\"}} {}",
            1024 * KIB
        ),
    ] {
        assert!(text.contains(&line), "{line} in\n{text}");
    }

    let usage = berth(&registry, &["usage"]);
    let line = |bytes: usize, scope: &str| format!("{bytes:>16}  {:>16}  {scope}", 400 * KIB);
    assert!(usage.contains(&line(b_used, "team/b (team/*)")), "{usage}");
    // With the refused image's config, if it was linked before its layer was refused.
    let with_config = used + big.config.bytes.len();
    assert!(
        [used, with_config]
            .iter()
            .any(|bytes| usage.contains(&line(*bytes, "team/a (team/*)"))),
        "{usage}"
    );

    // Deleting makes room again: once team/a holds nothing of v1, the big image fits.
    let target = format!("/v2/team/a/app/manifests/{}", small.manifest.digest);
    assert_eq!(status(&registry, "DELETE", &target), 202);
    for blob in small.blobs() {
        let target = format!("/v2/team/a/app/blobs/{}", blob.digest);
        assert_eq!(status(&registry, "DELETE", &target), 202, "{target}");
    }
    let pushed = skopeo_push(&registry, &big, "team/a/app", "v2");
    assert!(pushed.status.success(), "{pushed:?}");
}

#[test]
fn docker_push_past_a_quota_is_denied_and_leaves_nothing_behind() {
    let registry = quota_registry("  - {repositories: team/*, max_bytes: 200KiB}\n");
    let image = Image::generate(711, "amd64", &[300 * KIB]);
    let archive = docker_archive(&registry, &image, "e2e/local:v1");
    let dockerd = Dockerd::start(&registry.host());
    run(dockerd.docker().arg("load").arg("-i").arg(&archive));
    let remote = format!("{}/team/a/app:v1", registry.host());
    run(dockerd.docker().args(["tag", "e2e/local:v1", &remote]));

    let (blobs_before, uploads_before) = stored(&registry);
    let pushed = run_output(
        dockerd.docker().args(["push", &remote]),
        Duration::from_secs(180),
    );
    assert!(!pushed.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&pushed.stdout),
        String::from_utf8_lossy(&pushed.stderr)
    );
    // docker may have pushed the small config before the layer was refused.
    assert!(
        said.contains("denied: quota \"team/*\" exceeded: team/a holds ")
            && said.contains(" of its 200.0 KiB (204800 bytes); this push needs "),
        "{said}"
    );
    // docker compresses the layer itself, so its digest is docker's own: what is checked is that
    // no layer-sized object reached the storage, nor any upload data, manifest or tag.
    let (blobs_after, uploads_after) = stored(&registry);
    let root = registry.root().join("blobs");
    let added: Vec<_> = blobs_after.difference(&blobs_before).collect();
    for file in &added {
        let size = std::fs::metadata(root.join(file)).unwrap().len();
        assert!(size < 100 * KIB as u64, "{file} ({size} bytes) was stored");
    }
    assert_eq!(uploads_after, uploads_before);
    assert_absent(&registry, "team/a/app", "v1", &[]);
    let catalog = String::from_utf8(request(&registry, "GET", "/v2/_catalog").body).unwrap();
    let tags = request(&registry, "GET", "/v2/team/a/app/tags/list");
    if tags.status == 200 {
        let list: serde_json::Value = serde_json::from_slice(&tags.body).unwrap();
        assert!(
            list["tags"].as_array().is_none_or(Vec::is_empty),
            "{list} in {catalog}"
        );
    }
}

#[test]
fn concurrent_pushes_never_take_a_scope_past_its_quota() {
    let registry = quota_registry("  - {repositories: race, max_bytes: 50KiB}\n");
    let blobs: Vec<Blob> = (0..24u64)
        .map(|i| {
            Blob::new(
                "application/octet-stream",
                Rng::new(800 + i).bytes(10 * KIB),
            )
        })
        .collect();
    let statuses: Vec<u16> = std::thread::scope(|threads| {
        let pushes: Vec<_> = blobs
            .iter()
            .enumerate()
            .map(|(i, blob)| {
                let registry = &registry;
                threads.spawn(move || push_blob(registry, &format!("race/r{i}"), blob))
            })
            .collect();
        pushes
            .into_iter()
            .map(|push| push.join().unwrap())
            .collect()
    });
    // The check and the link share one write transaction: exactly what fits is taken.
    let taken = statuses.iter().filter(|s| **s == 201).count();
    let refused = statuses.iter().filter(|s| **s == 403).count();
    assert_eq!((taken, refused), (5, 19), "{statuses:?}");
    let text = metrics(&registry);
    let line = format!(
        "berth_registry_quota_used_bytes{{quota=\"race\"}} {}",
        50 * KIB
    );
    assert!(text.contains(&line), "{line} in\n{text}");
    // Bytes a refused push had already published are queued for the collector: after one run
    // the storage holds exactly the blobs that were taken.
    berth(&registry, &["gc"]);
    let (blobs_left, uploads_left) = stored(&registry);
    assert_eq!(blobs_left.len(), 5, "{blobs_left:?}");
    assert!(uploads_left.is_empty(), "{uploads_left:?}");
}

#[test]
fn a_reload_puts_changed_quotas_in_force() {
    let registry = quota_registry("  - {repositories: hup, max_bytes: 1MiB}\n");
    let blob = |seed| Blob::new("application/octet-stream", Rng::new(seed).bytes(10 * KIB));
    assert_eq!(push_blob(&registry, "hup/a", &blob(900)), 201);
    registry.write_config(
        "gc:\n  interval_seconds: 0\nquotas:\n  - {repositories: hup, max_bytes: 15KiB}\n  \
         - {repositories: other/*, max_bytes: 1KiB}\n",
    );
    assert!(registry.reload());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !registry.log().contains("quotas reloaded") {
        assert!(std::time::Instant::now() < deadline, "{}", registry.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(push_blob(&registry, "hup/b", &blob(901)), 403);
    assert_eq!(push_blob(&registry, "other/x/y", &blob(902)), 403);
    let text = metrics(&registry);
    for line in [
        format!(
            "berth_registry_quota_limit_bytes{{quota=\"hup\"}} {}",
            15 * KIB
        ),
        format!(
            "berth_registry_quota_used_bytes{{quota=\"hup\"}} {}",
            10 * KIB
        ),
        "berth_registry_quota_scopes{quota=\"other/*\"} 0".to_owned(),
    ] {
        assert!(text.contains(&line), "{line} in\n{text}");
    }
}
