//! Cache retention end to end: berth-cacher stages images for two apps into a berth-registry
//! process (CNCF distribution as the upstream), then `berth-registry gc` expires the stagings
//! retention does not keep and frees their bytes. Cloud Controller cannot run here: a small HTTP
//! server stands in for it and for UAA, answering the documented v3 droplet listing (paged by
//! `pagination.next.href`) and the client credentials token response.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tempfile::TempDir;

use common::*;

const CLIENT_ID: &str = "berth-retention";
const CLIENT_SECRET: &str = "stand-in-secret";
const ACCESS_TOKEN: &str = "stand-in-token";

/// What the Cloud Controller stand-in answers.
#[derive(Default)]
struct Foundation {
    /// Whether it answers at all (503 otherwise, as a Cloud Controller being upgraded does).
    up: AtomicBool,
    /// Images of staged droplets, two to a page.
    images: Mutex<Vec<Option<String>>>,
    base: Mutex<String>,
}

async fn token(headers: HeaderMap, body: String) -> Response {
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(format!("Basic {basic}").as_str())
        || body != "grant_type=client_credentials"
    {
        return (StatusCode::UNAUTHORIZED, r#"{"error":"unauthorized"}"#).into_response();
    }
    axum::Json(json!({
        "access_token": ACCESS_TOKEN,
        "token_type": "bearer",
        "expires_in": 43199,
        "scope": "cloud_controller.global_auditor",
        "jti": "0f1e2d3c"
    }))
    .into_response()
}

async fn droplets(
    State(foundation): State<Arc<Foundation>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if !foundation.up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(format!("Bearer {ACCESS_TOKEN}").as_str())
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if param("states") != Some("STAGED") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let page: usize = param("page").map_or(1, |p| p.parse().unwrap_or(1));
    let images = foundation.images.lock().unwrap().clone();
    let pages = images.len().div_ceil(2).max(1);
    let base = foundation.base.lock().unwrap().clone();
    let link = |page: usize| json!({ "href": format!("{base}/v3/droplets?page={page}&per_page=2&states=STAGED") });
    let resources: Vec<Value> = images
        .iter()
        .skip((page - 1) * 2)
        .take(2)
        .enumerate()
        .map(|(i, image)| {
            json!({
                "guid": format!("droplet-{page}-{i}"),
                "state": "STAGED",
                "error": null,
                "lifecycle": { "type": "docker", "data": {} },
                "execution_metadata": "",
                "process_types": { "web": "/app/start" },
                "checksum": null,
                "buildpacks": null,
                "stack": null,
                "image": image,
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
                "relationships": { "app": { "data": { "guid": "some-app" } } },
                "links": {},
                "metadata": { "labels": {}, "annotations": {} }
            })
        })
        .collect();
    axum::Json(json!({
        "pagination": {
            "total_results": images.len(),
            "total_pages": pages,
            "first": link(1),
            "last": link(pages),
            "next": if page < pages { link(page + 1) } else { Value::Null },
            "previous": if page > 1 { link(page - 1) } else { Value::Null },
        },
        "resources": resources,
    }))
    .into_response()
}

/// Cloud Controller and UAA stand-ins on one port; dropping it stops them.
struct CloudController {
    addr: SocketAddr,
    foundation: Arc<Foundation>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CloudController {
    fn start() -> CloudController {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("a local address");
        let foundation = Arc::new(Foundation::default());
        *foundation.base.lock().unwrap() = format!("http://{addr}");
        let router = Router::new()
            .route("/uaa/oauth/token", post(token))
            .route("/v3/droplets", get(droplets))
            .with_state(foundation.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("serve the stand-in");
            });
        });
        CloudController {
            addr,
            foundation,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for CloudController {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The berth-registry binary, built with the workspace next to berth-cacher.
fn registry_binary() -> PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth-cacher")).with_file_name("berth-registry");
    assert!(
        binary.exists(),
        "{} is missing: build the workspace (cargo build -p berth-registry) first",
        binary.display()
    );
    binary
}

/// berth-registry as a process of its own, with retention configured; dropping it stops it.
struct Registry {
    dir: TempDir,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Registry {
    fn start(retention: &str) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("berth-retention-")
            .tempdir()
            .expect("a temporary directory");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "listen: {addr}\nstorage:\n  root: {}\nlog:\n  level: info\n\
                 gc:\n  interval_seconds: 0\n  grace_seconds: 0\nretention:\n{retention}",
                dir.path().join("root").display()
            ),
        )
        .expect("write the registry config");
        let child = spawn_logged(
            Command::new(registry_binary())
                .arg("--config")
                .arg(dir.path().join("config.yml"))
                .arg("serve"),
            &dir.path().join("log"),
        );
        let registry = Registry {
            dir,
            addr,
            child: Some(child),
        };
        for _ in 0..300 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return registry;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("berth-registry did not start listening on {addr}");
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `berth-registry gc`, asking the running server; returns what it printed.
    fn gc(&self, dry_run: bool) -> String {
        let mut cmd = Command::new(registry_binary());
        cmd.arg("--config")
            .arg(self.dir.path().join("config.yml"))
            .arg("gc");
        if dry_run {
            cmd.arg("--dry-run");
        }
        let output = run_output(&mut cmd, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "berth-registry gc failed\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    fn tags(&self, repo: &str) -> Vec<String> {
        let response = http(
            reqwest::Method::GET,
            &format!("{}/v2/{repo}/tags/list", self.url()),
        );
        assert_eq!(response.status, 200, "tags of {repo}");
        let body: Value = serde_json::from_slice(&response.body).expect("a tag list");
        let mut tags: Vec<String> =
            serde_json::from_value(body["tags"].clone()).expect("tag names");
        tags.sort();
        tags
    }

    fn has_manifest(&self, repo: &str, digest: &str) -> bool {
        let url = format!("{}/v2/{repo}/manifests/{digest}", self.url());
        http(reqwest::Method::HEAD, &url).status == 200
    }

    /// Whether the blob's bytes are still on disk.
    fn stores(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.root()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        print_log_on_panic("berth-registry", &self.dir.path().join("log"));
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }
}

/// One staging: the image, and where the cacher put it.
struct Staged {
    image: Image,
    /// `host/cache/<guid>/<id>@<digest>`, as written to the staging result.
    docker_image: String,
    repo: String,
    digest: String,
}

fn stage(registry: &Registry, upstream: &Upstream, guid: &str, seed: u64) -> Staged {
    let image = Image::new(
        "amd64",
        vec![Layer::generate(seed, 4096), Layer::generate(seed + 1, 2048)],
        json!({ "Entrypoint": ["/app/start"], "ExposedPorts": { "8080/tcp": {} } }),
    );
    let source = format!("apps/{guid}:v{seed}");
    upstream.push(&source, &image.manifest, &image.blobs());
    let cacher = Cacher::new();
    let config = cacher.dir().join("berth-cacher.yml");
    std::fs::write(
        &config,
        format!(
            "registry:\n  url: {}\nrepository_key: {REPOSITORY_KEY}\n",
            registry.url()
        ),
    )
    .expect("write the cacher config");
    let cacher = cacher
        .env("BERTH_CACHER_CONFIG", &config.to_string_lossy())
        .env("BERTH_CACHE", "true")
        .app(guid);
    let reference = format!("{}/{source}", upstream.host());
    cacher
        .run(&cacher.builder_args(&reference, &[]))
        .expect_code(0);
    let docker_image = cacher.result()["lifecycle_metadata"]["docker_image"]
        .as_str()
        .expect("a docker_image in the staging result")
        .to_owned();
    let (name, digest) = docker_image.split_once('@').expect("pinned by digest");
    let repo = name.split_once('/').expect("host/repository").1.to_owned();
    assert_eq!(repo, cache_repository(guid));
    assert_eq!(digest, image.manifest.digest);
    // Tag times are in seconds: the next staging is a second newer.
    thread::sleep(Duration::from_millis(1100));
    Staged {
        digest: digest.to_owned(),
        image,
        docker_image,
        repo,
    }
}

#[test]
fn gc_keeps_each_apps_newest_pulled_and_running_stagings_and_frees_the_rest() {
    let upstream = Upstream::start(None);
    let cloud_controller = CloudController::start();
    let secret = tempfile::NamedTempFile::new().expect("a secret file");
    std::fs::write(secret.path(), format!("{CLIENT_SECRET}\n")).expect("write the secret");
    let registry = Registry::start(&format!(
        "  pull_flush_seconds: 3600\n  cache:\n    keep_stagings: 2\n    pulled_within_days: 30\n\
         \x20 cloud_controller:\n    api_url: http://{0}\n    uaa_url: http://{0}/uaa\n\
         \x20   client_id: {CLIENT_ID}\n    client_secret_file: {1}\n    timeout_seconds: 5\n",
        cloud_controller.addr,
        secret.path().display()
    ));
    let (app_a, app_b) = (new_guid(), new_guid());
    let a: Vec<Staged> = [10, 20, 30]
        .into_iter()
        .map(|seed| stage(&registry, &upstream, &app_a, seed))
        .collect();
    let b: Vec<Staged> = [40, 50]
        .into_iter()
        .map(|seed| stage(&registry, &upstream, &app_b, seed))
        .collect();
    let a_newer: Vec<Staged> = [60, 70]
        .into_iter()
        .map(|seed| stage(&registry, &upstream, &app_a, seed))
        .collect();
    let b_newest = stage(&registry, &upstream, &app_b, 80);
    // App A: a[0] (oldest) has nothing to keep it; a[1] runs in a droplet; a[2] is pulled (a
    // GET); a_newer are its newest two. App B: b[0] goes; b[1] and b_newest are its newest two.
    let pulled = tempfile::tempdir().expect("a directory for the pull");
    skopeo_pull(
        &format!("{}/{}@{}", registry.addr, a[2].repo, a[2].digest),
        pulled.path(),
    );
    // A HEAD is no pull.
    assert!(registry.has_manifest(&a[0].repo, &a[0].digest));
    cloud_controller.foundation.images.lock().unwrap().extend([
        Some("docker.io/library/busybox:1.36".to_owned()),
        None,
        Some(b_newest.docker_image.clone()),
        Some(a[1].docker_image.clone()),
    ]);

    let all_tags_a = registry.tags(&cache_repository(&app_a));
    let all_tags_b = registry.tags(&cache_repository(&app_b));
    // A staging tag each, and the cacher's record tag of each source reference beside it.
    let per_staging = all_tags_a.len() / 5;
    assert!(per_staging >= 1, "{all_tags_a:?}");
    assert_eq!(
        (all_tags_a.len(), all_tags_b.len()),
        (5 * per_staging, 3 * per_staging)
    );
    let expected = format!(
        "retention: 2 stagings, {} tags, 2 manifests\n",
        2 * per_staging
    );

    // Cloud Controller not answering: retention deletes nothing.
    let output = registry.gc(false);
    assert!(
        output.contains("retention: 0 stagings, 0 tags, 0 manifests (skipped: "),
        "{output}"
    );
    assert_eq!(registry.tags(&cache_repository(&app_a)), all_tags_a);
    assert_eq!(registry.tags(&cache_repository(&app_b)), all_tags_b);
    let metrics = http(reqwest::Method::GET, &format!("{}/metrics", registry.url()));
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("berth_registry_retention_skipped_total 1"),
        "the skipped run is counted"
    );

    cloud_controller.foundation.up.store(true, Ordering::SeqCst);
    let output = registry.gc(true);
    assert!(
        output.starts_with("would delete") && output.contains(&expected),
        "{output}"
    );
    assert_eq!(registry.tags(&cache_repository(&app_a)), all_tags_a, "dry");

    let output = registry.gc(false);
    assert!(
        output.starts_with("deleted") && output.contains(&expected),
        "{output}"
    );
    let gone = [&a[0], &b[0]];
    let kept = [&a[1], &a[2], &a_newer[0], &a_newer[1], &b[1], &b_newest];
    for staged in gone {
        assert!(!registry.has_manifest(&staged.repo, &staged.digest));
        for blob in staged.image.blobs() {
            assert!(
                !registry.stores(&blob.digest),
                "{} still stored",
                blob.digest
            );
        }
    }
    for staged in kept {
        assert!(registry.has_manifest(&staged.repo, &staged.digest));
        for blob in staged.image.blobs() {
            assert!(registry.stores(&blob.digest), "{} gone", blob.digest);
        }
        skopeo_pull(
            &format!("{}/{}@{}", registry.addr, staged.repo, staged.digest),
            pulled.path(),
        );
    }
    assert_eq!(
        registry.tags(&cache_repository(&app_a)).len(),
        4 * per_staging
    );
    assert_eq!(
        registry.tags(&cache_repository(&app_b)).len(),
        2 * per_staging
    );
}
