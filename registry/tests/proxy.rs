//! The pull-through cache against real parts: CNCF distribution plays Docker Hub behind a
//! counting proxy; skopeo, docker and ctr pull through berth's `hub/` prefix.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use berth_testkit::upstream::*;
use common::*;

/// Publishing generated images to the upstream, as their publisher would.
trait Publish {
    fn push(&self, repo_tag: &str, image: &Image);
    /// Pushes `top` (an image manifest or an index) and every blob below it as `repo_tag`.
    fn push_tree(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob]);
    /// Like [`Publish::push_tree`], with more `skopeo copy` options (`--format v2s2`).
    fn push_converted(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob], options: &[&str]);
}

impl Publish for Distribution {
    fn push(&self, repo_tag: &str, image: &Image) {
        self.push_tree(repo_tag, &image.manifest, &image.blobs());
    }

    fn push_tree(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob]) {
        self.push_converted(repo_tag, top, blobs, &[]);
    }

    fn push_converted(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob], options: &[&str]) {
        let layout = self.scratch().join("push");
        let _ = std::fs::remove_dir_all(&layout);
        write_oci_layout(&layout, "v1", top, blobs);
        self.push_layout(
            &layout,
            "v1",
            repo_tag,
            &["--all"]
                .into_iter()
                .chain(options.iter().copied())
                .collect::<Vec<_>>(),
        );
    }
}

/// How often the registry under test checks a cached tag upstream: short, so the tests can wait
/// it out, long enough that a pull's own requests fall inside it.
const REVALIDATE_SECONDS: u64 = 6;

/// The `proxy:` section mirroring the upstream at `host` under `hub/`, logged in if given.
fn proxy_config(host: &str, login: Option<(&str, &Path)>) -> String {
    let login = login.map_or_else(String::new, |(user, file)| {
        format!(
            "    username: {user}\n    password_file: {}\n",
            file.display()
        )
    });
    format!(
        "proxy:\n  - prefix: hub\n    url: http://{host}\n    docker_hub: true\n    \
         revalidate_seconds: {REVALIDATE_SECONDS}\n{login}"
    )
}

/// skopeo copies `reference` (below `docker://`) from `registry` to a fresh OCI layout in
/// `dir`; the manifest digest it wrote, or skopeo's complaint.
fn skopeo_pull(registry: SocketAddr, reference: &str, dir: &Path) -> Result<String, String> {
    skopeo_copy(registry, reference, dir, &[])
}

/// Like [`skopeo_pull`], with more `skopeo copy` options (`--all`).
fn skopeo_copy(
    registry: SocketAddr,
    reference: &str,
    dir: &Path,
    options: &[&str],
) -> Result<String, String> {
    let layout = dir.join(format!("pulled-{}", uuid_like()));
    let output = run_output(
        skopeo()
            .args(["copy", "--src-tls-verify=false"])
            .args(options)
            .arg(format!("docker://{registry}/{reference}"))
            .arg(oci_ref(&layout, "pulled")),
        Duration::from_secs(300),
    );
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(read_layout_ref(&layout, "pulled").1)
}

/// A name no other pull of this test uses.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// `GET` (or `HEAD`) of manifest `reference` of `repo`: its status and digest header.
fn manifest(registry: SocketAddr, method: &str, repo: &str, reference: &str) -> RawResponse {
    blocking_request_with(
        registry,
        method,
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Accept", MANIFEST_ACCEPT)],
        b"",
        Duration::from_secs(60),
    )
    .expect("the registry answers")
}

/// Asserts that every blob of `image` was downloaded from the upstream exactly once.
fn assert_each_blob_fetched_once(proxy: &CountingProxy, image: &Image) {
    for blob in image.blobs() {
        let gets = proxy.count("GET", &format!("/blobs/{}", blob.digest));
        assert_eq!(gets, 1, "{}: {:?}", blob.digest, proxy.requests());
    }
}

/// Asserts that `reply` served the manifest `digest`.
fn assert_serves(reply: &RawResponse, digest: &str) {
    let body = String::from_utf8_lossy(&reply.body);
    assert_eq!(reply.status, 200, "{body}");
    assert_eq!(
        reply.header("docker-content-digest"),
        Some(digest),
        "{body}"
    );
}

fn metrics(registry: SocketAddr) -> String {
    let reply = blocking_get(registry, "/metrics", Duration::from_secs(10)).expect("metrics");
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// The value of the metrics line starting with `series` (labels included), if there is one.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

fn manifest_gets(proxy: &CountingProxy) -> usize {
    proxy.count("GET", "/v2/library/alpine/manifests/")
}

fn manifest_heads(proxy: &CountingProxy) -> usize {
    proxy.count("HEAD", "/v2/library/alpine/manifests/")
}

#[test]
fn a_tag_costs_one_upstream_get_then_heads_once_per_window_and_follows_upstream_moves() {
    let distribution = Distribution::start(None);
    let image = Image::generate(1901, "amd64", &[40_000, 9_000]);
    distribution.push("library/alpine:3.20", &image);
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));
    let dir = tempfile::tempdir().unwrap();

    // First pull: one manifest GET (a Docker Hub pull), each blob fetched once.
    let pulled = skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap();
    assert_eq!(pulled, image.manifest.digest);
    assert_eq!(manifest_gets(&proxy), 1, "{:?}", proxy.requests());
    assert_each_blob_fetched_once(&proxy, &image);
    let text = metrics(registry.addr());
    assert_eq!(
        metric(
            &text,
            r#"berth_registry_proxy_upstream_manifest_requests_total{upstream="hub",method="GET"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"berth_registry_proxy_upstream_ratelimit_remaining{upstream="hub"}"#
        ),
        Some((PULL_LIMIT - 1) as f64),
        "{text}"
    );
    let layer_bytes: usize = image.blobs().iter().map(|b| b.size()).sum();
    assert_eq!(
        metric(
            &text,
            r#"berth_registry_proxy_upstream_blob_bytes_total{upstream="hub"}"#
        ),
        Some(layer_bytes as f64),
        "{text}"
    );

    // Within the window: nothing upstream at all, by tag or by digest.
    proxy.clear();
    let again = skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap();
    assert_eq!(again, image.manifest.digest);
    let by_digest = format!("hub/alpine@{}", image.manifest.digest);
    assert_eq!(
        skopeo_pull(registry.addr(), &by_digest, dir.path()).unwrap(),
        image.manifest.digest
    );
    assert_eq!(
        proxy.requests(),
        vec![],
        "a cached pull asks the upstream nothing"
    );
    let hits = metric(
        &metrics(registry.addr()),
        r#"berth_registry_proxy_cache_hits_total{upstream="hub"}"#,
    );
    assert!(hits.is_some_and(|h| h >= 2.0), "{hits:?}");

    // After the window: one HEAD (free on Docker Hub), no GET.
    std::thread::sleep(Duration::from_secs(REVALIDATE_SECONDS) + Duration::from_millis(300));
    let reply = manifest(registry.addr(), "GET", "hub/alpine", "3.20");
    assert_serves(&reply, &image.manifest.digest);
    assert_eq!(
        (manifest_heads(&proxy), manifest_gets(&proxy)),
        (1, 0),
        "{:?}",
        proxy.requests()
    );

    // The tag moves upstream: served as it was until the window ends, then the new image.
    let moved = Image::generate(1902, "amd64", &[30_000]);
    distribution.push("library/alpine:3.20", &moved);
    proxy.clear();
    let reply = manifest(registry.addr(), "GET", "hub/alpine", "3.20");
    assert_serves(&reply, &image.manifest.digest);
    assert_eq!(proxy.requests(), vec![]);
    std::thread::sleep(Duration::from_secs(REVALIDATE_SECONDS) + Duration::from_millis(300));
    let pulled = skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap();
    assert_eq!(pulled, moved.manifest.digest);
    assert_eq!(
        (manifest_heads(&proxy), manifest_gets(&proxy)),
        (1, 1),
        "{:?}",
        proxy.requests()
    );
    // The old image stays pullable by digest, from the cache.
    proxy.clear();
    assert_eq!(
        skopeo_pull(registry.addr(), &by_digest, dir.path()).unwrap(),
        image.manifest.digest
    );
    assert_eq!(proxy.requests(), vec![]);
    // The full name is the same repository: the same image, from the cache, no second Hub pull.
    let full = skopeo_pull(registry.addr(), "hub/library/alpine:3.20", dir.path()).unwrap();
    assert_eq!(full, moved.manifest.digest);
    assert_eq!(proxy.requests(), vec![]);
}

#[test]
fn instances_sharing_the_stores_make_one_upstream_pull_between_them() {
    let distribution = Distribution::start(None);
    let image = Image::generate(1907, "amd64", &[20_000]);
    distribution.push("library/alpine:3.20", &image);
    let proxy = CountingProxy::start(distribution.addr());
    let dir = tempfile::tempdir().unwrap();
    let content = Content::s3(dir.path());
    let metadata = SharedMetadata::new("postgres", dir.path());
    let mut yaml = proxy_config(&proxy.host(), None);
    yaml = with_storage(&yaml, "content", &content.section().expect("an S3 section"));
    yaml = with_storage(&yaml, "metadata", metadata.section());
    let instances = [
        Registry::start_with_config(&yaml),
        Registry::start_with_config(&yaml),
    ];
    // Slow enough that every instance's first pull finds the tag (or blob) uncached.
    proxy.set_mode(Mode::Slow);
    let by_tag = |instance: &Registry| {
        let addr = instance.addr();
        std::thread::spawn(move || manifest(addr, "GET", "hub/alpine", "3.20"))
    };
    let by_digest = |instance: &Registry, digest: &str| {
        let (addr, digest) = (instance.addr(), digest.to_owned());
        std::thread::spawn(move || manifest(addr, "GET", "hub/alpine", &digest))
    };
    let mut pulls: Vec<_> = (0..6).map(|i| by_tag(&instances[i % 2])).collect();
    // A digest no instance has seen yet: also fetched once between them.
    let other = Image::generate(1908, "amd64", &[10_000]);
    distribution.push("library/alpine:other", &other);
    pulls.extend((0..4).map(|i| by_digest(&instances[i % 2], &other.manifest.digest)));
    let expected = [&image.manifest.digest; 6]
        .into_iter()
        .chain([&other.manifest.digest; 4]);
    for (pull, digest) in pulls.into_iter().zip(expected) {
        assert_serves(&pull.join().unwrap(), digest);
    }
    assert_eq!(manifest_gets(&proxy), 2, "{:?}", proxy.requests());
    assert_eq!(
        proxy.count("GET", &format!("/manifests/{}", other.manifest.digest)),
        1,
        "{:?}",
        proxy.requests()
    );

    // Each blob pulled through both instances at once: downloaded from the upstream once.
    let blob_gets: Vec<_> = image
        .blobs()
        .into_iter()
        .flat_map(|blob| [(0, blob), (1, blob)])
        .map(|(i, blob)| {
            let (addr, blob) = (instances[i].addr(), blob.clone());
            std::thread::spawn(move || {
                let path = format!("/v2/hub/alpine/blobs/{}", blob.digest);
                let reply = blocking_get(addr, &path, Duration::from_secs(60)).unwrap();
                (reply, blob)
            })
        })
        .collect();
    for get in blob_gets {
        let (reply, blob) = get.join().unwrap();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert!(reply.body == blob.bytes, "{} served whole", blob.digest);
    }
    assert_each_blob_fetched_once(&proxy, &image);

    // The tag moves upstream: once the window is over each instance checks it with a HEAD, and
    // the new image is fetched once between them.
    let moved = Image::generate(1909, "amd64", &[15_000]);
    distribution.push("library/alpine:3.20", &moved);
    std::thread::sleep(Duration::from_secs(REVALIDATE_SECONDS) + Duration::from_millis(300));
    proxy.clear();
    let pulls: Vec<_> = (0..4).map(|i| by_tag(&instances[i % 2])).collect();
    for pull in pulls {
        assert_serves(&pull.join().unwrap(), &moved.manifest.digest);
    }
    assert_eq!(
        (manifest_heads(&proxy), manifest_gets(&proxy)),
        (2, 1),
        "{:?}",
        proxy.requests()
    );
}

#[test]
fn cached_tags_pull_while_the_upstream_rate_limits_or_is_down() {
    let distribution = Distribution::start(None);
    let image = Image::generate(1903, "amd64", &[20_000]);
    distribution.push("library/alpine:3.20", &image);
    distribution.push(
        "library/alpine:edge",
        &Image::generate(1904, "amd64", &[1_000]),
    );
    let mut proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap(),
        image.manifest.digest
    );

    // 429 from the upstream: the cached tag still pulls, and the metric and log say why.
    proxy.set_mode(Mode::RateLimited);
    std::thread::sleep(Duration::from_secs(REVALIDATE_SECONDS) + Duration::from_millis(300));
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap(),
        image.manifest.digest
    );
    assert!(manifest_heads(&proxy) >= 1, "{:?}", proxy.requests());
    let stale = |registry: &Registry| {
        metric(
            &metrics(registry.addr()),
            r#"berth_registry_proxy_stale_served_total{upstream="hub"}"#,
        )
        .unwrap_or(0.0)
    };
    assert!(stale(&registry) >= 1.0);
    let log = registry.log();
    assert!(
        log.contains("serving the cached manifest") && log.contains("429"),
        "{log}"
    );
    // A tag never cached cannot be served: the client sees the upstream's limit.
    let reply = manifest(registry.addr(), "GET", "hub/alpine", "edge");
    assert_eq!(
        reply.status,
        429,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = String::from_utf8_lossy(&reply.body);
    assert!(body.contains("TOOMANYREQUESTS"), "{body}");
    assert!(
        body.contains("(limit 100;w=21600, remaining 0;w=21600, retry after 60 s)"),
        "{body}"
    );
    assert_eq!(reply.header("retry-after"), Some("60"));
    assert_eq!(reply.header("ratelimit-limit"), Some("100;w=21600"));
    assert_eq!(reply.header("ratelimit-remaining"), Some("0;w=21600"));

    // The upstream gone altogether: the same.
    // Within the window after a failed check the cached tag is served without asking again.
    proxy.clear();
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap(),
        image.manifest.digest
    );
    assert_eq!(
        manifest_heads(&proxy) + manifest_gets(&proxy),
        0,
        "{:?}",
        proxy.requests()
    );
    let before = stale(&registry);
    proxy.stop();
    std::thread::sleep(Duration::from_secs(REVALIDATE_SECONDS) + Duration::from_millis(300));
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap(),
        image.manifest.digest
    );
    assert!(stale(&registry) > before);
    let reply = manifest(registry.addr(), "GET", "hub/alpine", "edge");
    assert_eq!(
        reply.status,
        503,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}

#[test]
fn upstream_credentials_are_used_and_a_wrong_password_fails_cleanly() {
    let distribution = Distribution::start(Some(("puller", "right-horse-battery")));
    let image = Image::generate(1905, "amd64", &[10_000]);
    distribution.push("library/alpine:3.20", &image);
    let proxy = CountingProxy::start(distribution.addr());
    let dir = tempfile::tempdir().unwrap();
    let right = password_file(dir.path(), "right-horse-battery");
    let registry =
        Registry::start_with_config(&proxy_config(&proxy.host(), Some(("puller", &right))));
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap(),
        image.manifest.digest
    );

    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = password_file(wrong_dir.path(), "wrong-staple-secret");
    let refused =
        Registry::start_with_config(&proxy_config(&proxy.host(), Some(("puller", &wrong))));
    let reply = manifest(refused.addr(), "GET", "hub/alpine", "3.20");
    let body = String::from_utf8_lossy(&reply.body);
    assert_eq!(reply.status, 502, "{body}");
    assert!(
        body.contains("upstream hub") && body.contains("credentials"),
        "{body}"
    );
    let log = refused.log();
    assert!(!log.contains("wrong-staple-secret") && !body.contains("wrong-staple-secret"));
    assert!(log.contains("upstream request failed"), "{log}");
}

#[test]
fn concurrent_first_pulls_download_each_blob_once() {
    let distribution = Distribution::start(None);
    let image = Image::generate(1906, "amd64", &[256 << 20, 1 << 20]);
    distribution.push("library/alpine:big", &image);
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));
    let dir = tempfile::tempdir().unwrap();
    let addr = registry.addr();
    let pulls: Vec<_> = (0..10)
        .map(|_| {
            let dir = dir.path().to_owned();
            std::thread::spawn(move || skopeo_pull(addr, "hub/alpine:big", &dir))
        })
        .collect();
    for pull in pulls {
        assert_eq!(pull.join().unwrap().unwrap(), image.manifest.digest);
    }
    assert_each_blob_fetched_once(&proxy, &image);
    assert_eq!(manifest_gets(&proxy), 1, "{:?}", proxy.requests());
}

#[test]
fn content_that_proves_wrong_is_not_stored_and_the_next_pull_gets_it_right() {
    let distribution = Distribution::start(None);
    let image = Image::generate(1907, "amd64", &[200_000]);
    distribution.push("library/alpine:3.20", &image);
    distribution.push(
        "library/alpine:other",
        &Image::generate(1915, "amd64", &[1_000]),
    );
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));
    let dir = tempfile::tempdir().unwrap();
    let layer = &image.layers[0].blob;
    let path = format!("/v2/hub/alpine/blobs/{}", layer.digest);
    assert_eq!(
        manifest(registry.addr(), "GET", "hub/alpine", "3.20").status,
        200
    );

    proxy.set_mode(Mode::Corrupt);
    // A manifest whose bytes do not hash to their digest is refused, and nothing is tagged.
    let refused = manifest(registry.addr(), "GET", "hub/alpine", "other");
    let complaint = String::from_utf8_lossy(&refused.body);
    assert_eq!(refused.status, 502, "{complaint}");
    assert!(complaint.contains("hashes to"), "{complaint}");
    proxy.set_mode(Mode::Relay);
    let tags = blocking_get(
        registry.addr(),
        "/v2/hub/alpine/tags/list",
        Duration::from_secs(10),
    );
    assert!(!String::from_utf8_lossy(&tags.unwrap().body).contains("other"));
    proxy.set_mode(Mode::Corrupt);
    let broken = blocking_get(registry.addr(), &path, Duration::from_secs(30)).unwrap();
    assert!(
        broken.status != 200 || broken.body.len() < layer.size(),
        "a blob that hashes wrong must not arrive whole ({} bytes of {})",
        broken.body.len(),
        layer.size()
    );
    // Logged by the download once the client has its broken body, so possibly a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !registry.log().contains("nothing was stored") {
        assert!(std::time::Instant::now() < deadline, "{}", registry.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let hex = layer.digest.trim_start_matches("sha256:");
    let file = registry
        .root()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    assert!(
        !file.exists(),
        "nothing is stored under a digest its bytes do not have"
    );
    // A HEAD answers from the manifest's record, without fetching.
    proxy.clear();
    let head =
        blocking_request(registry.addr(), "HEAD", &path, b"", Duration::from_secs(10)).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(layer.size().to_string().as_str())
    );
    assert_eq!(proxy.requests(), vec![]);

    proxy.set_mode(Mode::Relay);
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap(),
        image.manifest.digest
    );
}

#[test]
fn a_blob_the_upstream_refuses_leaves_no_upload_behind() {
    let distribution = Distribution::start(None);
    let image = Image::generate(1916, "amd64", &[300_000]);
    distribution.push("library/alpine:3.21", &image);
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));
    assert_eq!(
        manifest(registry.addr(), "GET", "hub/alpine", "3.21").status,
        200
    );
    let layer = &image.layers[0].blob;
    let path = format!("/v2/hub/alpine/blobs/{}", layer.digest);
    // The session is opened while the upstream answers; an upstream refusing the blob must take
    // it away again, rows and files.
    proxy.set_mode(Mode::RateLimited);
    let refused = blocking_get(registry.addr(), &path, Duration::from_secs(30)).unwrap();
    assert_eq!(
        refused.status,
        429,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let uploads = std::fs::read_dir(registry.root().join("uploads"))
        .unwrap()
        .count();
    assert_eq!(uploads, 0, "no upload directory left");
    assert_eq!(
        registry.metadata_rows("SELECT COUNT(*) FROM uploads"),
        vec![vec!["0".to_owned()]],
        "no upload session left"
    );

    proxy.set_mode(Mode::Relay);
    let fetched = blocking_get(registry.addr(), &path, Duration::from_secs(30)).unwrap();
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body.len(), layer.size());
}

#[test]
fn docker_and_ctr_pull_through_the_proxy() {
    let distribution = Distribution::start(None);
    let image = Image::generate(1908, "amd64", &[50_000]);
    distribution.push("library/alpine:3.20", &image);
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));

    let dockerd = Dockerd::start(&registry.host());
    dockerd.pull_expecting(
        &format!("{}/hub/alpine:3.20", registry.host()),
        &image.manifest.digest,
    );
    assert_eq!(
        dockerd.image_id(&format!("{}/hub/alpine:3.20", registry.host())),
        image.config.digest
    );
    drop(dockerd);

    let containerd = Containerd::start();
    let reference = format!("{}/hub/library/alpine:3.20", registry.host());
    run(&mut containerd.pull(&reference, &[]));
    assert_eq!(
        ctr_image_digest(&containerd, &reference),
        image.manifest.digest
    );
    for blob in image.blobs() {
        let bytes = run_bytes(containerd.ctr().args(["content", "get", &blob.digest]));
        assert_eq!(bytes, blob.bytes, "containerd's copy of {}", blob.digest);
    }
    // Two spellings of one upstream repository: its manifest and its blobs fetched once in all.
    assert_eq!(manifest_gets(&proxy), 1, "{:?}", proxy.requests());
    assert_each_blob_fetched_once(&proxy, &image);
}

#[test]
fn pushes_and_deletes_into_a_proxied_prefix_are_denied() {
    // No upstream is needed: writes are refused before anything is asked of it.
    let registry = Registry::start_with_config(&proxy_config("127.0.0.1:9", None));
    let dir = tempfile::tempdir().unwrap();
    let image = Image::generate(1909, "amd64", &[1_000]);
    let layout = dir.path().join("layout");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
    let output = run_output(
        skopeo()
            .args(["copy", "--dest-tls-verify=false"])
            .arg(oci_ref(&layout, "v1"))
            .arg(format!("docker://{}/hub/mine:v1", registry.host())),
        Duration::from_secs(60),
    );
    assert!(!output.status.success());
    let complaint = String::from_utf8_lossy(&output.stderr);
    assert!(
        complaint.contains("read-only") || complaint.contains("denied"),
        "{complaint}"
    );
    for (method, path) in [
        ("POST", "/v2/hub/mine/blobs/uploads/"),
        ("PUT", "/v2/hub/mine/manifests/v1"),
        ("DELETE", "/v2/hub/mine/manifests/v1"),
        (
            "DELETE",
            &format!("/v2/hub/mine/blobs/{}", image.config.digest),
        ),
    ] {
        let reply =
            blocking_request(registry.addr(), method, path, b"", Duration::from_secs(10)).unwrap();
        assert_eq!(reply.status, 403, "{method} {path}");
        assert!(String::from_utf8_lossy(&reply.body).contains("DENIED"));
    }
    // Other prefixes take pushes as ever.
    run(skopeo()
        .args(["copy", "--dest-tls-verify=false"])
        .arg(oci_ref(&layout, "v1"))
        .arg(format!("docker://{}/apps/mine:v1", registry.host())));
}

#[test]
fn an_index_is_cached_as_sent_and_its_images_fetched_when_asked_for() {
    let distribution = Distribution::start(None);
    let multi = MultiArchImage::generate(1910);
    distribution.push_tree("library/alpine:multi", &multi.index, &multi.blobs());
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));
    let dir = tempfile::tempdir().unwrap();
    let (amd64, arm64) = (&multi.images[0], &multi.images[1]);

    // One platform: the index by tag, then that platform's image by digest; the other never.
    let pulled = skopeo_copy(
        registry.addr(),
        "hub/alpine:multi",
        dir.path(),
        &["--override-arch", "amd64", "--override-os", "linux"],
    )
    .unwrap();
    assert_eq!(pulled, amd64.manifest.digest);
    assert_eq!(manifest_gets(&proxy), 2, "{:?}", proxy.requests());
    assert_eq!(proxy.count("GET", &arm64.manifest.digest), 0);
    let index = manifest(registry.addr(), "GET", "hub/alpine", "multi");
    assert_eq!(
        index.body, multi.index.bytes,
        "the index is served as the upstream sent it"
    );

    // Every platform: only the image not asked for before is fetched now.
    proxy.clear();
    let all = skopeo_copy(registry.addr(), "hub/alpine:multi", dir.path(), &["--all"]).unwrap();
    assert_eq!(all, multi.index.digest);
    assert_eq!(manifest_gets(&proxy), 1, "{:?}", proxy.requests());
    assert_eq!(
        proxy.count("GET", &format!("manifests/{}", arm64.manifest.digest)),
        1
    );
}

#[test]
fn images_a_moved_tag_left_behind_are_collected_whether_their_blobs_were_fetched_or_not() {
    let distribution = Distribution::start(None);
    let old = Image::generate(1911, "amd64", &[30_000]);
    distribution.push("library/alpine:3.20", &old);
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&format!(
        "{}gc:\n  interval_seconds: 0\n  grace_seconds: 0\n  untagged: [hub]\n",
        proxy_config(&proxy.host(), None)
    ));
    // The old image's manifest and config are fetched; its layer never is.
    assert_eq!(
        manifest(registry.addr(), "GET", "hub/alpine", "3.20").status,
        200
    );
    let config = blocking_get(
        registry.addr(),
        &format!("/v2/hub/alpine/blobs/{}", old.config.digest),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(config.body, old.config.bytes);
    let stored = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        registry
            .root()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists()
    };
    assert!(stored(&old.config.digest) && !stored(&old.layers[0].blob.digest));

    let new = Image::generate(1912, "amd64", &[20_000]);
    distribution.push("library/alpine:3.20", &new);
    std::thread::sleep(Duration::from_secs(REVALIDATE_SECONDS) + Duration::from_millis(300));
    let moved = manifest(registry.addr(), "GET", "hub/alpine", "3.20");
    assert_serves(&moved, &new.manifest.digest);

    run(
        std::process::Command::new(env!("CARGO_BIN_EXE_berth-registry"))
            .arg("--config")
            .arg(registry.config_path())
            .arg("gc")
            .env("BERTH_STORAGE_ROOT", registry.root()),
    );
    assert!(!stored(&old.manifest.digest) && !stored(&old.config.digest));
    assert!(stored(&new.manifest.digest));
    // What the tag names now still pulls, its blobs fetched on demand.
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", dir.path()).unwrap(),
        new.manifest.digest
    );
}

#[test]
fn an_upstream_asking_for_bearer_tokens_gets_them_from_its_realm() {
    // Berth itself in token mode plays an upstream with a Docker-style token service.
    let scratch = tempfile::tempdir().unwrap();
    let htpasswd = scratch.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        htpasswd_line("puller", "token-horse-battery", 4) + "\n",
    )
    .unwrap();
    let upstream = Registry::start_with_config(&format!(
        "auth:\n  mode: token\n  htpasswd: {}\n  access:\n    - repositories: \"*\"\n{}",
        htpasswd.display(),
        "      grants: { \"authenticated\": [push] }\n"
    ));
    let image = Image::generate(1913, "amd64", &[10_000]);
    let layout = scratch.path().join("layout");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
    run(skopeo()
        .args([
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "puller:token-horse-battery",
        ])
        .arg(oci_ref(&layout, "v1"))
        .arg(format!("docker://{}/library/alpine:3.20", upstream.host())));
    let proxy = CountingProxy::start(upstream.addr());

    let right = password_file(scratch.path(), "token-horse-battery");
    let registry =
        Registry::start_with_config(&proxy_config(&proxy.host(), Some(("puller", &right))));
    assert_eq!(
        skopeo_pull(registry.addr(), "hub/alpine:3.20", scratch.path()).unwrap(),
        image.manifest.digest
    );

    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = password_file(wrong_dir.path(), "wrong-token-secret");
    let refused =
        Registry::start_with_config(&proxy_config(&proxy.host(), Some(("puller", &wrong))));
    let reply = manifest(refused.addr(), "GET", "hub/alpine", "3.20");
    let body = String::from_utf8_lossy(&reply.body);
    assert_eq!(reply.status, 502, "{body}");
    assert!(body.contains("token service answered 401"), "{body}");
    assert!(!refused.log().contains("wrong-token-secret"));
}

#[test]
fn a_client_that_cannot_read_manifest_lists_gets_the_default_image_of_a_cached_list() {
    let distribution = Distribution::start(None);
    let multi = MultiArchImage::generate(1914);
    distribution.push_converted(
        "library/alpine:list",
        &multi.index,
        &multi.blobs(),
        &["--format", "v2s2"],
    );
    let proxy = CountingProxy::start(distribution.addr());
    let registry = Registry::start_with_config(&proxy_config(&proxy.host(), None));
    let reply = blocking_request_with(
        registry.addr(),
        "GET",
        "/v2/hub/alpine/manifests/list",
        &[(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
        b"",
        Duration::from_secs(30),
    )
    .unwrap();
    let body = String::from_utf8_lossy(&reply.body);
    assert_eq!(reply.status, 200, "{body}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/vnd.docker.distribution.manifest.v2+json")
    );
    assert!(
        body.contains("\"layers\""),
        "an image manifest, not the list: {body}"
    );
    // The list by tag, then its linux/amd64 image by digest.
    assert_eq!(manifest_gets(&proxy), 2, "{:?}", proxy.requests());
}
