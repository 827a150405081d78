//! End-to-end tests with real clients: skopeo, docker (a private dockerd), podman (a private
//! store), containerd's ctr (a private containerd), plus the server's life cycle: a crash during a
//! large streamed upload and its resumption, SIGTERM draining a download in flight within the
//! grace period, and one process per storage root. Every client must be installed: a missing one
//! fails the test.

mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The digests a manifest lists as layers.
fn manifest_layers(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("manifest has layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("layer digest").to_string())
        .collect()
}

/// Pushes `top` (an image manifest, or an index with all its platforms) and the `blobs` below it
/// to `registry` as `repo:tag` with skopeo, from a generated OCI layout.
fn skopeo_push(registry: &Registry, repo: &str, tag: &str, top: &Blob, blobs: &[&Blob]) {
    let layout = registry
        .scratch()
        .join(format!("src-{}", repo.replace('/', "-")));
    write_oci_layout(&layout, tag, top, blobs);
    let mut copy = skopeo();
    copy.args(["copy", "--dest-tls-verify=false"]);
    if top.media_type == OCI_INDEX {
        copy.arg("--all");
    }
    run(copy
        .arg(oci_ref(&layout, tag))
        .arg(format!("docker://{}/{repo}:{tag}", registry.host())));
}

/// The manifest bytes skopeo reads for `reference` (`docker://…`), as the registry serves them.
fn skopeo_inspect_raw(reference: &str) -> Vec<u8> {
    run_bytes(
        skopeo()
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(reference),
    )
}

/// Asserts the OCI layout at `layout` holds each of `blobs` byte for byte.
#[track_caller]
fn assert_layout_holds(layout: &std::path::Path, blobs: &[&Blob]) {
    for blob in blobs {
        assert_eq!(
            read_layout_blob(layout, &blob.digest),
            blob.bytes,
            "blob {} changed in the round trip",
            blob.digest
        );
    }
}

#[tokio::test]
async fn skopeo_round_trips_a_four_layer_image() {
    let registry = Registry::start();
    let client = http_client();

    let base = client
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(base.status(), 200);
    assert_eq!(
        base.headers()
            .get("docker-distribution-api-version")
            .and_then(|v| v.to_str().ok()),
        Some("registry/2.0"),
        "GET /v2/ must carry Docker-Distribution-API-Version"
    );

    let image = Image::generate(
        1,
        "amd64",
        &[300 * 1024, 1024 * 1024, 64 * 1024, 2 * 1024 * 1024 + 17],
    );
    skopeo_push(&registry, "e2e/app", "v1", &image.manifest, &image.blobs());
    let dest = format!("docker://{}/e2e/app:v1", registry.host());

    // The exact bytes come back, from skopeo and over plain HTTP.
    let raw = skopeo_inspect_raw(&dest);
    assert_eq!(
        String::from_utf8_lossy(&raw),
        String::from_utf8_lossy(&image.manifest.bytes),
        "skopeo inspect --raw must return the manifest bytes that were pushed"
    );
    assert_eq!(raw, image.manifest.bytes);
    let served = assert_manifest_served(
        &client,
        &registry,
        "e2e/app",
        "v1",
        &image.manifest.digest,
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(manifest_layers(&served), image.layer_digests());
    assert_manifest_served(
        &client,
        &registry,
        "e2e/app",
        &image.manifest.digest,
        &image.manifest.digest,
        OCI_MANIFEST,
    )
    .await;

    // skopeo's own reading of the image agrees.
    let inspect: Value = serde_json::from_str(&run(skopeo()
        .args(["inspect", "--tls-verify=false"])
        .arg(&dest)))
    .expect("skopeo inspect prints JSON");
    assert_eq!(inspect["Digest"], image.manifest.digest.as_str());
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Layers"], serde_json::json!(image.layer_digests()));

    let tags: Value = client
        .get(format!("{}/v2/e2e/app/tags/list", registry.url()))
        .send()
        .await
        .expect("GET tags/list")
        .json()
        .await
        .expect("tags/list is JSON");
    assert_eq!(tags["name"], "e2e/app");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));

    // And back out into a fresh layout: same manifest, same blobs, same bytes.
    let back = registry.scratch().join("back");
    run(skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(&dest)
        .arg(oci_ref(&back, "v1")));
    let (media_type, digest, size) = read_layout_ref(&back, "v1");
    assert_eq!(
        digest, image.manifest.digest,
        "the manifest digest must survive the round trip"
    );
    assert_eq!(media_type, OCI_MANIFEST);
    assert_eq!(size as usize, image.manifest.size());
    assert_eq!(read_layout_blob(&back, &digest), image.manifest.bytes);
    let manifest: Value =
        serde_json::from_slice(&read_layout_blob(&back, &digest)).expect("manifest JSON");
    assert_eq!(manifest_layers(&manifest), image.layer_digests());
    assert_layout_holds(&back, &image.blobs());

    let listed: Value = serde_json::from_str(&run(skopeo()
        .args(["list-tags", "--tls-verify=false"])
        .arg(format!("docker://{}/e2e/app", registry.host()))))
    .expect("skopeo list-tags prints JSON");
    assert_eq!(listed["Tags"], serde_json::json!(["v1"]));

    // skopeo delete resolves the tag and deletes the manifest by digest.
    run(skopeo().args(["delete", "--tls-verify=false"]).arg(&dest));
    let by_digest = get_manifest(&client, &registry, "e2e/app", &image.manifest.digest).await;
    assert_eq!(
        by_digest.status, 404,
        "the deleted manifest by digest: {by_digest:?}"
    );
    let by_tag = get_manifest(&client, &registry, "e2e/app", "v1").await;
    assert_eq!(
        by_tag.status, 404,
        "the tag of the deleted manifest: {by_tag:?}"
    );
}

#[tokio::test]
async fn skopeo_round_trips_a_multi_arch_index() {
    let registry = Registry::start();
    let client = http_client();
    let multi = MultiArchImage::generate(2);
    skopeo_push(&registry, "e2e/multi", "v1", &multi.index, &multi.blobs());
    let dest = format!("docker://{}/e2e/multi:v1", registry.host());

    let raw = skopeo_inspect_raw(&dest);
    assert_eq!(
        raw, multi.index.bytes,
        "skopeo inspect --raw must return the index bytes that were pushed"
    );

    let index = get_manifest(&client, &registry, "e2e/multi", "v1").await;
    assert_eq!(index.status, 200, "GET the index by tag: {index:?}");
    assert_eq!(index.content_type.as_deref(), Some(OCI_INDEX));
    assert_eq!(index.digest.as_deref(), Some(multi.index.digest.as_str()));
    assert_eq!(index.body, multi.index.bytes);

    for image in &multi.images {
        let url = format!(
            "{}/v2/e2e/multi/manifests/{}",
            registry.url(),
            image.manifest.digest
        );
        let head = client
            .head(&url)
            .header("Accept", MANIFEST_ACCEPT)
            .send()
            .await
            .expect("HEAD child manifest");
        assert_eq!(head.status(), 200, "HEAD {url}");
        assert_eq!(
            head.headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok()),
            Some(image.manifest.digest.as_str())
        );
        assert_eq!(
            head.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some(OCI_MANIFEST)
        );
        assert_eq!(
            head.headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()),
            Some(image.manifest.size().to_string().as_str()),
            "HEAD {url} Content-Length"
        );
        let served = assert_manifest_served(
            &client,
            &registry,
            "e2e/multi",
            &image.manifest.digest,
            &image.manifest.digest,
            OCI_MANIFEST,
        )
        .await;
        assert_eq!(served["config"]["digest"], image.config.digest.as_str());
        assert_eq!(manifest_layers(&served), image.layer_digests());

        let child = format!(
            "docker://{}/e2e/multi@{}",
            registry.host(),
            image.manifest.digest
        );
        assert_eq!(
            skopeo_inspect_raw(&child),
            image.manifest.bytes,
            "skopeo inspect --raw {child}"
        );
    }

    let back = registry.scratch().join("back");
    run(skopeo()
        .args(["copy", "--all", "--src-tls-verify=false"])
        .arg(&dest)
        .arg(oci_ref(&back, "v1")));
    let (media_type, digest, _) = read_layout_ref(&back, "v1");
    assert_eq!(
        digest, multi.index.digest,
        "the index digest must survive the round trip"
    );
    assert_eq!(media_type, OCI_INDEX);
    assert_eq!(read_layout_blob(&back, &digest), multi.index.bytes);
    assert_layout_holds(&back, &multi.blobs());
}

#[tokio::test]
async fn docker_pushes_and_pulls_through_a_private_dockerd() {
    let registry = Registry::start();
    let client = http_client();
    let image = Image::generate(3, "amd64", &[256 * 1024, 700 * 1024, 40 * 1024]);
    let archive = docker_archive(&registry, &image, "e2e/local:v1");

    let multi = MultiArchImage::generate(8);
    skopeo_push(&registry, "e2e/multi", "v1", &multi.index, &multi.blobs());

    let dockerd = Dockerd::start(&registry.host());
    let loaded = run(dockerd.docker().arg("load").arg("-i").arg(&archive));
    assert!(
        loaded.contains("e2e/local:v1"),
        "docker load output: {loaded}"
    );
    assert_eq!(
        dockerd.image_id("e2e/local:v1"),
        image.config.digest,
        "docker's image id is the config digest"
    );

    let remote = format!("{}/e2e/docker", registry.host());
    let (v1, v2) = (format!("{remote}:v1"), format!("{remote}:v2"));
    let pushed = dockerd.tag_and_push("e2e/local:v1", &v1);
    let pushed_digest = digest_after(&pushed, "digest:")
        .unwrap_or_else(|| panic!("no digest in docker push output: {pushed}"));

    // What docker pushed is served back byte for byte, blobs included.
    let manifest = assert_manifest_served(
        &client,
        &registry,
        "e2e/docker",
        "v1",
        &pushed_digest,
        DOCKER_MANIFEST,
    )
    .await;
    assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
    assert_eq!(manifest_layers(&manifest).len(), image.layers.len());

    // A second tag of the same image: every layer is found already present.
    let again = dockerd.tag_and_push("e2e/local:v1", &v2);
    assert_eq!(
        digest_after(&again, "digest:").as_deref(),
        Some(pushed_digest.as_str()),
        "push of v2: {again}"
    );
    assert_eq!(
        again.matches("Layer already exists").count(),
        image.layers.len(),
        "push of v2: {again}"
    );

    dockerd.remove_all_images(&["e2e/local:v1", &v1, &v2]);
    dockerd.pull_expecting(&v1, &pushed_digest);
    let inspected = run(dockerd.docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{json .RepoDigests}}",
        &v1,
    ]));
    let (id, repo_digests) = inspected
        .trim()
        .split_once(' ')
        .expect("id and repo digests");
    assert_eq!(id, image.config.digest, "image id after pull");
    let repo_digests: Vec<String> = serde_json::from_str(repo_digests).expect("RepoDigests JSON");
    assert_eq!(repo_digests, vec![format!("{remote}@{pushed_digest}")]);

    // By digest too.
    run(dockerd.docker().args(["rmi", &v1]));
    let by_digest = format!("{remote}@{pushed_digest}");
    dockerd.pull_expecting(&by_digest, &pushed_digest);
    assert_eq!(dockerd.image_id(&by_digest), image.config.digest);

    // An OCI index: docker picks linux/amd64 from it and records the index digest.
    let multi_remote = format!("{}/e2e/multi", registry.host());
    dockerd.pull_expecting(&format!("{multi_remote}:v1"), &multi.index.digest);
    let inspected = run(dockerd.docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{.Architecture}} {{json .RepoDigests}}",
        &format!("{multi_remote}:v1"),
    ]));
    let fields: Vec<&str> = inspected.trim().splitn(3, ' ').collect();
    let amd64 = multi
        .images
        .iter()
        .find(|i| i.architecture == "amd64")
        .expect("an amd64 image");
    assert_eq!(
        fields[0], amd64.config.digest,
        "docker pulled the amd64 image out of the index"
    );
    assert_eq!(fields[1], "amd64");
    let repo_digests: Vec<String> = serde_json::from_str(fields[2]).expect("RepoDigests JSON");
    assert_eq!(
        repo_digests,
        vec![format!("{multi_remote}@{}", multi.index.digest)]
    );
}

#[tokio::test]
async fn podman_pushes_and_pulls_with_a_private_store() {
    let registry = Registry::start();
    let client = http_client();
    let image = Image::generate(4, "amd64", &[180 * 1024, 520 * 1024]);
    let archive = docker_archive(&registry, &image, "e2e/local:v1");

    let podman = Podman::new();
    run(podman.podman().arg("--version"));
    let local = podman.load(&archive);
    assert!(local.ends_with("e2e/local:v1"), "podman named it {local}");
    let id = run(podman
        .podman()
        .args(["image", "inspect", "--format", "{{.Id}}", &local]));
    assert_eq!(
        format!("sha256:{}", id.trim()),
        image.config.digest,
        "podman's image id is the config digest"
    );

    let remote = format!("{}/e2e/podman", registry.host());
    let digest_file = podman.dir().join("pushed.digest");
    run(podman
        .podman()
        .args([
            "push",
            "--tls-verify=false",
            "--format",
            "oci",
            "--digestfile",
        ])
        .arg(&digest_file)
        .args([local.as_str(), &format!("docker://{remote}:v1")]));
    let pushed_digest = std::fs::read_to_string(&digest_file)
        .expect("podman wrote the digest file")
        .trim()
        .to_string();
    assert!(
        pushed_digest.starts_with("sha256:") && pushed_digest.len() == 71,
        "digest file: {pushed_digest:?}"
    );

    // The archive held a Docker schema 2 image; `--format oci` has podman convert it.
    let manifest = assert_manifest_served(
        &client,
        &registry,
        "e2e/podman",
        "v1",
        &pushed_digest,
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    // Converting rewrites the config (so its digest), never the filesystem it describes.
    let pushed_config = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string();
    let config: Value = serde_json::from_slice(
        &get_blob_checked(&client, &registry, "e2e/podman", &pushed_config).await,
    )
    .expect("the pushed config is JSON");
    let diff_ids: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!(diff_ids));
    assert_eq!(config["architecture"], "amd64");

    run(podman.podman().args(["rmi", "--all", "--force"]));
    let left = run(podman.podman().args(["images", "-q"]));
    assert_eq!(left.trim(), "", "the image must be gone before pulling");

    run(podman
        .podman()
        .args(["pull", "--tls-verify=false", &format!("{remote}:v1")]));
    let inspected = run(podman.podman().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{.Digest}}",
        &format!("{remote}:v1"),
    ]));
    let (id, digest) = inspected.trim().split_once(' ').expect("id and digest");
    assert_eq!(
        format!("sha256:{id}"),
        pushed_config,
        "podman image id after pull"
    );
    assert_eq!(digest, pushed_digest, "podman's digest after pull");

    // The arm64 image out of an OCI index.
    let multi = MultiArchImage::generate(9);
    skopeo_push(&registry, "e2e/multi", "v1", &multi.index, &multi.blobs());
    let multi_remote = format!("{}/e2e/multi:v1", registry.host());
    run(podman.podman().args([
        "pull",
        "--tls-verify=false",
        "--platform",
        "linux/arm64",
        &multi_remote,
    ]));
    let inspected = run(podman.podman().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{.Architecture}} {{.Digest}} {{json .RepoDigests}}",
        &multi_remote,
    ]));
    let fields: Vec<&str> = inspected.trim().splitn(4, ' ').collect();
    let arm64 = multi
        .images
        .iter()
        .find(|i| i.architecture == "arm64")
        .expect("an arm64 image");
    assert_eq!(
        format!("sha256:{}", fields[0]),
        arm64.config.digest,
        "podman pulled the arm64 image out of the index"
    );
    assert_eq!(fields[1], "arm64");
    assert_eq!(
        fields[2], multi.index.digest,
        "podman records the digest of the index it pulled"
    );
    let repo_digests: Vec<String> = serde_json::from_str(fields[3]).expect("RepoDigests JSON");
    let repo = format!("{}/e2e/multi", registry.host());
    for digest in [&multi.index.digest, &arm64.manifest.digest] {
        assert!(
            repo_digests.contains(&format!("{repo}@{digest}")),
            "{digest} not in RepoDigests {repo_digests:?}"
        );
    }
}

/// The digest `ctr images ls` lists for `reference`.
#[tokio::test]
async fn containerd_pulls_and_pushes_with_ctr() {
    let registry = Registry::start();
    let client = http_client();
    let image = Image::generate(5, "amd64", &[150 * 1024, 300 * 1024, 90 * 1024]);
    skopeo_push(&registry, "e2e/app", "v1", &image.manifest, &image.blobs());
    let multi = MultiArchImage::generate(6);
    skopeo_push(&registry, "e2e/multi", "v1", &multi.index, &multi.blobs());

    let containerd = Containerd::start();
    let app = format!("{}/e2e/app:v1", registry.host());
    run(&mut containerd.pull(&app, &[]));
    assert_eq!(ctr_image_digest(&containerd, &app), image.manifest.digest);
    for blob in std::iter::once(&image.manifest).chain(image.blobs()) {
        let bytes = run_bytes(containerd.ctr().args(["content", "get", &blob.digest]));
        assert_eq!(bytes, blob.bytes, "containerd's copy of {}", blob.digest);
    }

    let multi_ref = format!("{}/e2e/multi:v1", registry.host());
    run(&mut containerd.pull(&multi_ref, &["--all-platforms"]));
    assert_eq!(
        ctr_image_digest(&containerd, &multi_ref),
        multi.index.digest
    );
    for blob in std::iter::once(&multi.index).chain(multi.blobs()) {
        let bytes = run_bytes(containerd.ctr().args(["content", "get", &blob.digest]));
        assert_eq!(bytes, blob.bytes, "containerd's copy of {}", blob.digest);
    }

    // ctr pushes what it pulled into other repositories of the same registry.
    let copy = format!("{}/e2e/ctr-pushed:v1", registry.host());
    run(containerd.ctr().args(["images", "tag", &app, &copy]));
    run(containerd
        .ctr()
        .args(["images", "push", "--plain-http", &copy]));
    assert_manifest_served(
        &client,
        &registry,
        "e2e/ctr-pushed",
        "v1",
        &image.manifest.digest,
        OCI_MANIFEST,
    )
    .await;

    let multi_copy = format!("{}/e2e/ctr-multi:v1", registry.host());
    run(containerd
        .ctr()
        .args(["images", "tag", &multi_ref, &multi_copy]));
    run(containerd
        .ctr()
        .args(["images", "push", "--plain-http", &multi_copy]));
    let index = get_manifest(&client, &registry, "e2e/ctr-multi", "v1").await;
    assert_eq!(index.status, 200, "{index:?}");
    assert_eq!(index.body, multi.index.bytes);
    assert_eq!(index.digest.as_deref(), Some(multi.index.digest.as_str()));
    for image in &multi.images {
        assert_manifest_served(
            &client,
            &registry,
            "e2e/ctr-multi",
            &image.manifest.digest,
            &image.manifest.digest,
            OCI_MANIFEST,
        )
        .await;
    }
}

/// Size of the blob the crash test uploads.
const CRASH_BLOB: usize = 64 * 1024 * 1024;
/// How much of it is streamed before the server is killed.
const CRASH_SENT_BEFORE_KILL: usize = 24 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;
/// Piece size of the streamed body.
const STREAM_PIECE: usize = 256 * 1024;

/// Parses `Range: 0-N` into N.
fn range_end(range: &str) -> u64 {
    let (start, end) = range
        .trim()
        .split_once('-')
        .unwrap_or_else(|| panic!("malformed Range {range:?}"));
    assert_eq!(start, "0", "Range must start at 0: {range:?}");
    end.parse()
        .unwrap_or_else(|_| panic!("malformed Range {range:?}"))
}

async fn start_upload(client: &reqwest::Client, registry: &Registry, repo: &str) -> String {
    let url = format!("{}/v2/{repo}/blobs/uploads/", registry.url());
    let reply = send_request(client.post(&url)).await;
    absolute(registry, &reply.expect(202).location())
}

/// PATCHes `data` (which starts at `offset` of the blob) with a Content-Range, returning the
/// new upload location.
async fn patch_range(
    client: &reqwest::Client,
    registry: &Registry,
    location: &str,
    offset: u64,
    data: Vec<u8>,
) -> String {
    let end = offset + data.len() as u64 - 1;
    let reply = send_request(
        client
            .patch(location)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{offset}-{end}"))
            .header("Content-Length", data.len().to_string())
            .body(data),
    )
    .await;
    reply.expect(202);
    assert_eq!(
        reply.header("range").map(range_end),
        Some(end),
        "Range after PATCH {offset}-{end}: {reply}"
    );
    absolute(registry, &reply.location())
}

/// PATCHes what follows `offset` in `data` to upload `location` in pieces of `piece` bytes,
/// returning the upload's location after the last one.
async fn patch_from(
    client: &reqwest::Client,
    registry: &Registry,
    mut location: String,
    data: &[u8],
    mut offset: usize,
    piece: usize,
) -> String {
    while offset < data.len() {
        let end = (offset + piece).min(data.len());
        let bytes = data[offset..end].to_vec();
        location = patch_range(client, registry, &location, offset as u64, bytes).await;
        offset = end;
    }
    location
}

/// Closes upload `location` as `digest` and checks the blob reads back whole.
async fn finish_upload(
    client: &reqwest::Client,
    registry: &Registry,
    repo: &str,
    location: &str,
    digest: &str,
    size: usize,
) {
    let sep = if location.contains('?') { '&' } else { '?' };
    let url = format!("{location}{sep}digest={digest}");
    let reply = send_request(client.put(&url).header("Content-Length", "0")).await;
    reply.expect(201);
    assert_eq!(
        reply.header("docker-content-digest"),
        Some(digest),
        "Docker-Content-Digest after the PUT: {reply}"
    );

    let blob_url = format!("{}/v2/{repo}/blobs/{digest}", registry.url());
    let head = send_request(client.head(&blob_url)).await;
    head.expect(200);
    assert_eq!(
        head.header("content-length"),
        Some(size.to_string().as_str()),
        "{head}"
    );
    let bytes = get_blob_checked(client, registry, repo, digest).await;
    assert_eq!(bytes.len(), size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_survives_a_hard_kill_mid_transfer() {
    let mut registry = Registry::start();
    let client = http_client();
    let repo = "e2e/crash";
    let data = std::sync::Arc::new(Rng::new(7).bytes(CRASH_BLOB));
    let digest = sha256(&data);
    let blob_url = format!("{}/v2/{repo}/blobs/{digest}", registry.url());

    let location = start_upload(&client, &registry, repo).await;
    eprintln!("upload session at {location}");

    // Stream the blob through a channel as a chunked request body with no length, paced so the
    // transfer is still flowing when the server is killed.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    }));
    let patch = client
        .patch(&location)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send();
    let request = tokio::spawn(patch);
    let sent_counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let data = data.clone();
        let sent_counter = sent_counter.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < CRASH_BLOB {
                let end = (sent + STREAM_PIECE).min(CRASH_BLOB);
                if tx.send(data[sent..end].to_vec()).await.is_err() {
                    break;
                }
                sent = end;
                sent_counter.store(sent, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sent_counter.load(std::sync::atomic::Ordering::SeqCst) < CRASH_SENT_BEFORE_KILL {
        assert!(
            std::time::Instant::now() < deadline,
            "the streamed PATCH stalled before {CRASH_SENT_BEFORE_KILL} bytes"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Pull the plug in the middle of the transfer, with bytes still flowing.
    registry.kill_hard();
    let _ = producer.await;
    let sent = sent_counter.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent < CRASH_BLOB,
        "the whole blob went out before the kill; the test proves nothing"
    );
    match request.await.expect("the request task") {
        Ok(resp) => panic!(
            "the interrupted PATCH got a response: {} {:?}",
            resp.status(),
            resp.headers()
        ),
        Err(e) => eprintln!(
            "interrupted PATCH failed as expected; {sent} bytes had been handed to it: {e}"
        ),
    }

    registry.restart();

    // Nothing half-written is visible as a blob.
    assert_eq!(
        head_status(&client, &blob_url).await,
        404,
        "HEAD {blob_url} after the crash"
    );
    let get = client.get(&blob_url).send().await.expect("GET the blob");
    assert_eq!(get.status(), 404, "GET {blob_url} after the crash");

    let status = client
        .get(&location)
        .send()
        .await
        .expect("GET the upload status");
    let code = status.status().as_u16();
    let headers = format!("{:?}", status.headers());
    let range = status
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    eprintln!("upload status after restart: {code} {headers}");
    // Abandoning the interrupted session and starting over works (into another repository, so
    // the resumed session below still has its blob to commit).
    let repo2 = "e2e/crash-fresh";
    let fresh = start_upload(&client, &registry, repo2).await;
    let fresh = patch_from(&client, &registry, fresh, &data, 0, 16 * CHUNK).await;
    finish_upload(&client, &registry, repo2, &fresh, &digest, CRASH_BLOB).await;

    // The session survived the crash with the bytes that reached the disk (the README promises
    // both), and resuming it from what the server says it holds completes the blob.
    assert_eq!(code, 204, "upload status after the crash: {code} {headers}");
    let range = range.unwrap_or_else(|| panic!("204 upload status without Range: {headers}"));
    let end = range_end(&range);
    // "0-0" is the empty upload by convention; otherwise end+1 bytes are held.
    let held = if end == 0 { 0 } else { end as usize + 1 };
    assert!(
        held > 0,
        "the session survived but kept none of the {sent} bytes streamed before the kill"
    );
    assert!(
        held <= sent,
        "the server claims {held} bytes but only {sent} were sent (Range {range})"
    );
    eprintln!("server kept {held} of {sent} streamed bytes; resuming from there");
    let location = status
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(|l| absolute(&registry, l))
        .unwrap_or_else(|| location.clone());
    let location = patch_from(&client, &registry, location, &data, held, 8 * CHUNK).await;
    finish_upload(&client, &registry, repo, &location, &digest, CRASH_BLOB).await;
    let after = client
        .get(&location)
        .send()
        .await
        .expect("GET the finished upload")
        .status();
    assert_eq!(after, 404, "GET {location} after the upload was committed");

    // The committed blobs survive another hard restart.
    registry.restart();
    get_blob_checked(&client, &registry, repo2, &digest).await;
    get_blob_checked(&client, &registry, repo, &digest).await;
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let mut registry = Registry::start();
    let status = registry
        .terminate(Duration::from_secs(10))
        .expect("berth-registry must exit within 10 s of SIGTERM");
    assert!(
        status.success(),
        "berth-registry exited with {status} on SIGTERM"
    );
    registry.restart();
}

/// What became of a curl download (throttled to `rate`) of a 48 MiB blob when the registry got
/// SIGTERM in the middle of it.
struct DrainOutcome {
    download_complete: bool,
    server_exit: std::process::ExitStatus,
    /// From SIGTERM to the server's exit.
    exit_after: Duration,
}

fn sigterm_during_a_download(mut registry: Registry, rate: &str) -> DrainOutcome {
    let blob = Rng::new(41).bytes(48 << 20);
    let digest = sha256(&blob);
    let target = format!("/v2/drain/app/blobs/uploads/?digest={digest}");
    let pushed = blocking_request(
        registry.addr(),
        "POST",
        &target,
        &blob,
        Duration::from_secs(60),
    )
    .expect("push the blob");
    assert_eq!(pushed.status, 201);

    let out = registry.scratch().join("download");
    let mut curl = Command::new(require_tool("curl"))
        .args(["-sS", "--fail", "--limit-rate", rate, "-o"])
        .arg(&out)
        .arg(format!("{}/v2/drain/app/blobs/{digest}", registry.url()))
        .spawn()
        .expect("start curl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&out).map_or(0, |m| m.len()) < 2 << 20 {
        assert!(Instant::now() < deadline, "the download did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    registry.signal("TERM");
    let signalled = Instant::now();

    let deadline = signalled + Duration::from_secs(5);
    while TcpStream::connect_timeout(&registry.addr(), Duration::from_secs(1)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let server_exit = registry
        .wait_exit(Duration::from_secs(40))
        .expect("berth-registry exits after SIGTERM");
    let exit_after = signalled.elapsed();
    let finished = curl.wait().expect("wait for curl");
    let downloaded = std::fs::read(&out).expect("read the download");
    DrainOutcome {
        download_complete: finished.success() && downloaded == blob,
        server_exit,
        exit_after,
    }
}

#[test]
fn sigterm_lets_a_download_in_flight_finish_and_refuses_new_connections() {
    // About 3 s for the whole blob, well inside the default 30 s grace.
    let outcome = sigterm_during_a_download(Registry::start(), "16M");
    assert!(outcome.download_complete, "the download in flight was cut");
    assert!(
        outcome.server_exit.success(),
        "exited with {}",
        outcome.server_exit
    );
}

#[test]
fn sigterm_waits_for_downloads_only_as_long_as_the_grace_period() {
    // About 24 s for the whole blob against a 1 s grace.
    let registry = Registry::start_with_config("limits:\n  shutdown_grace_seconds: 1\n");
    let outcome = sigterm_during_a_download(registry, "2M");
    assert!(
        !outcome.download_complete,
        "a 24 s download finished within a 1 s grace"
    );
    assert!(
        outcome.exit_after < Duration::from_secs(5),
        "exited {:?} after SIGTERM with a 1 s grace",
        outcome.exit_after
    );
    assert!(
        outcome.server_exit.success(),
        "exited with {}",
        outcome.server_exit
    );
}

#[test]
fn a_second_server_on_the_same_storage_root_refuses_to_start() {
    let registry = Registry::start();
    let output = run_output(
        Command::new(env!("CARGO_BIN_EXE_berth-registry"))
            .arg("serve")
            .env("BERTH_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("BERTH_STORAGE_ROOT", registry.root()),
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a second server started on the same root:\n{stderr}"
    );
    assert!(
        stderr.contains("in use by another berth-registry process"),
        "unclear refusal:\n{stderr}"
    );
    let still =
        blocking_get(registry.addr(), "/v2/", Duration::from_secs(2)).expect("first server");
    assert_eq!(still.status, 200, "the first server keeps serving");
}
