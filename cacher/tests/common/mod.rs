//! Harness for the cacher's end-to-end tests: berth-registry in-process as the internal registry,
//! CNCF distribution (`docker-registry`) as the upstream, a counting and fault-injecting proxy in
//! front of it, generated images, the cacher binary, and a private dockerd.
//!
//! A missing tool is a test failure, never a skip: see [`require_tool`].

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use tempfile::TempDir;

pub use berth_testkit::*;

/// The key the tests configure, so they can predict each app's repository.
pub const REPOSITORY_KEY: &str = "00112233445566778899aabbccddeeff";

// ---------------------------------------------------------------------------------------------
// Tools and processes
// ---------------------------------------------------------------------------------------------

/// Collects a spawned child's piped output, killing it if it outlives `timeout`.
pub fn wait_output(mut child: Child, timeout: Duration, shown: &str) -> Output {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let finished = wait_timeout(&mut child, timeout).is_some();
    if !finished {
        let _ = child.kill();
    }
    let output = Output {
        status: child.wait().expect("reap the child"),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    assert!(
        finished,
        "{shown} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Reads a pipe to its end on a thread of its own, so a chatty child never blocks on a full pipe.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Polls `ready` until it holds, panicking with `what` and the log at `log` after `timeout`.
fn wait_until(what: &str, timeout: Duration, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} was not ready within {timeout:?}\n--- log ---\n{}",
            tail_file(log, LOG_TAIL_LINES)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Writes an htpasswd file at `path` with a bcrypt entry for each of `users` (user, password),
/// made by Apache's `htpasswd`.
fn write_htpasswd(path: &Path, users: &[(&str, &str)]) {
    let lines: Vec<String> = users
        .iter()
        .map(|(user, password)| {
            run(Command::new(require_tool("htpasswd")).args(["-Bbn", user, password]))
                .trim()
                .to_owned()
        })
        .collect();
    fs::write(path, lines.join("\n") + "\n").expect("write htpasswd");
}

/// Every file below `dir`, however deep.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Every file below `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_below(dir)
        .into_iter()
        .filter(|path| {
            fs::read(path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temporary directory")
}

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// One plain request (manifest types accepted), for checking what a registry holds.
pub fn http(method: reqwest::Method, url: &str) -> HttpResponse {
    http_as(method, url, None)
}

/// Like [`http`], presenting `authorization` (a whole `Authorization` header value).
pub fn http_as(method: reqwest::Method, url: &str, authorization: Option<&str>) -> HttpResponse {
    block_on(async {
        let mut request = reqwest::Client::new()
            .request(method, url)
            .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT);
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        HttpResponse {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.expect("a response body").to_vec(),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Generated images
// ---------------------------------------------------------------------------------------------

/// A gzipped layer tar and the digest of the tar itself (its diff_id).
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

impl Layer {
    /// One file of `size` random bytes derived from `seed`, under `layer-<seed>/`.
    pub fn generate(seed: u64, size: usize) -> Layer {
        let data = Rng::new(seed).bytes(size);
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_size(size as u64);
        tar.append_data(&mut header, format!("layer-{seed}/data.bin"), &data[..])
            .expect("append to a tar");
        let tar = tar.into_inner().expect("finish a tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        Layer {
            diff_id: sha256(&tar),
            blob: Blob::new(OCI_LAYER_GZIP, gz.finish().expect("gzip")),
        }
    }
}

/// A single-platform OCI image.
#[derive(Clone, Debug)]
pub struct Image {
    pub architecture: String,
    pub layers: Vec<Layer>,
    pub config: Blob,
    pub manifest: Blob,
}

impl Image {
    /// An image for linux/`architecture` whose config's `config` object is `runtime`
    /// (`Entrypoint`, `Cmd`, `ExposedPorts`, ...).
    pub fn new(architecture: &str, layers: Vec<Layer>, runtime: Value) -> Image {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": runtime,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = Blob::new(
            OCI_CONFIG,
            serde_json::to_vec(&config).expect("config JSON"),
        );
        let layer_descriptors: Vec<Value> = layers.iter().map(|l| l.blob.descriptor()).collect();
        // Pretty-printed: a copy that re-serialised the manifest would change its digest.
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layer_descriptors,
        });
        let manifest = Blob::new(
            OCI_MANIFEST,
            serde_json::to_vec_pretty(&manifest).expect("manifest JSON"),
        );
        Image {
            architecture: architecture.into(),
            layers,
            config,
            manifest,
        }
    }

    /// Config and layers.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config)
            .chain(self.layers.iter().map(|l| &l.blob))
            .collect()
    }

    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.blob.digest.clone()).collect()
    }
}

/// An OCI index over single-platform (linux) images.
pub fn index_of(images: &[&Image]) -> Blob {
    let manifests: Vec<Value> = images
        .iter()
        .map(|image| {
            let mut descriptor = image.manifest.descriptor();
            descriptor["platform"] = json!({ "architecture": image.architecture, "os": "linux" });
            descriptor
        })
        .collect();
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    Blob::new(
        OCI_INDEX,
        serde_json::to_vec_pretty(&index).expect("index JSON"),
    )
}

/// Writes an OCI image layout at `layout` whose `index.json` names `top` as `tag`.
pub fn write_oci_layout(layout: &Path, tag: &str, top: &Blob, blobs: &[&Blob]) {
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).expect("create blobs/sha256");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write oci-layout");
    for blob in blobs.iter().copied().chain([top]) {
        let hex = blob
            .digest
            .strip_prefix("sha256:")
            .expect("a sha256 digest");
        fs::write(dir.join(hex), &blob.bytes).expect("write a blob");
    }
    let mut descriptor = top.descriptor();
    descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor] });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("index.json"),
    )
    .expect("write index.json");
}

/// The digests a manifest lists as layers.
pub fn manifest_layers(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("a manifest with layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("a layer digest").to_owned())
        .collect()
}

pub fn skopeo() -> Command {
    let mut cmd = Command::new(require_tool("skopeo"));
    // The host's signature policy is not under test.
    cmd.arg("--insecure-policy");
    cmd
}

/// Pulls `reference` from an insecure registry with skopeo, which verifies every blob, into a
/// `dir:` copy under `dir` (blobs and manifest kept byte for byte); returns the manifest's digest
/// and the manifest.
pub fn skopeo_pull(reference: &str, dir: &Path) -> (String, Value) {
    skopeo_pull_as(reference, dir, None)
}

/// Like [`skopeo_pull`], presenting `credentials`.
pub fn skopeo_pull_as(
    reference: &str,
    dir: &Path,
    credentials: Option<(&str, &str)>,
) -> (String, Value) {
    let out = dir.join(format!("pulled-{}", uuid::Uuid::new_v4().simple()));
    let mut cmd = skopeo();
    cmd.args(["copy", "--src-tls-verify=false"]);
    if let Some((user, password)) = credentials {
        cmd.arg(format!("--src-creds={user}:{password}"));
    }
    run(cmd
        .arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", out.display())));
    let bytes = fs::read(out.join("manifest.json")).expect("the pulled manifest");
    let manifest = serde_json::from_slice(&bytes).expect("manifest JSON");
    (sha256(&bytes), manifest)
}

/// Pushes `top` (an image manifest or an index) and `blobs` below it to `destination`
/// (`host/repo:tag`) with skopeo, as a developer would push their app's image, from an OCI layout
/// written under `dir`.
fn skopeo_push(
    dir: &Path,
    destination: &str,
    top: &Blob,
    blobs: &[&Blob],
    credentials: Option<(&str, &str)>,
) {
    let (_, tag) = destination.rsplit_once(':').expect("host/repo:tag");
    let layout = dir.join(format!("layout-{}", uuid::Uuid::new_v4().simple()));
    write_oci_layout(&layout, tag, top, blobs);
    let mut cmd = skopeo();
    cmd.args(["copy", "--dest-tls-verify=false"]);
    if top.media_type == OCI_INDEX {
        cmd.arg("--all");
    }
    if let Some((user, password)) = credentials {
        cmd.arg(format!("--dest-creds={user}:{password}"));
    }
    run(cmd
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{destination}")));
}

// ---------------------------------------------------------------------------------------------
// In-process HTTP servers: the internal registry and the proxy
// ---------------------------------------------------------------------------------------------

/// A router served on 127.0.0.1 by a runtime of its own on a background thread, so tests stay
/// synchronous and a blocked test thread never stalls the server. Dropping it shuts it down.
struct BackgroundServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundServer {
    fn start(
        name: &str,
        tls: Option<berth_registry::server::ServerTls>,
        router: impl FnOnce() -> Router + Send + 'static,
    ) -> BackgroundServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a server runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind 127.0.0.1:0");
                    addr_tx
                        .send(listener.local_addr().expect("a local address"))
                        .expect("report the address");
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    berth_registry::server::serve(
                        listener,
                        router(),
                        tls,
                        shutdown,
                        &berth_registry::config::Limits {
                            shutdown_grace_seconds: 1,
                            ..Default::default()
                        },
                    )
                    .await;
                });
            })
            .expect("spawn a server thread");
        BackgroundServer {
            addr: addr_rx.recv().expect("the server's address"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Shuts the server down and waits for its thread; its address stays known.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// berth-registry in-process with its own storage root: the internal registry the cacher copies
/// into, or (with access control) an upstream of the kind the cacher pulls from.
pub struct Berth {
    dir: TempDir,
    root: PathBuf,
    server: BackgroundServer,
    tls: bool,
}

impl Berth {
    /// Open to everyone, as the internal registry on a trusted network.
    pub fn start() -> Berth {
        let dir = tempdir("berth-cacher-e2e-");
        let root = dir.path().join("root");
        Berth::serve(dir, root, None, None)
    }

    /// Like [`Berth::start`], storing everything under `root` (a small disk, say).
    pub fn start_on(root: &Path) -> Berth {
        Berth::serve(tempdir("berth-cacher-e2e-"), root.to_owned(), None, None)
    }

    /// Open to everyone, with `quotas_yaml` (a list, as under `quotas:` in its configuration) in
    /// force. The registry keeps its quotas in its database, so they are put there before it
    /// serves.
    pub fn start_with_quotas(quotas_yaml: &str) -> Berth {
        use berth_registry::metadata::{MetadataStore, SqliteMetadataStore};

        let dir = tempdir("berth-cacher-e2e-quota-");
        let quotas: Vec<berth_registry::quota::Quota> =
            serde_norway::from_str(quotas_yaml).expect("a quota list");
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("create the storage root");
        let metadata = SqliteMetadataStore::open(&root.join("metadata.sqlite"))
            .expect("open the metadata store");
        block_on(metadata.set_quotas(&quotas)).expect("put the quotas in force");
        Berth::serve(dir, root, None, None)
    }

    /// With access control: `auth_yaml` is an `auth:` section (`mode`, `access`, `token`, ...);
    /// `users` become the htpasswd file (bcrypt) its `htpasswd` is pointed at.
    pub fn start_with_auth(auth_yaml: &str, users: &[(&str, &str)]) -> Berth {
        let dir = tempdir("berth-cacher-e2e-auth-");
        let mut config: berth_registry::auth::AuthConfig =
            serde_norway::from_str(auth_yaml).expect("an auth configuration");
        if !users.is_empty() {
            let htpasswd = dir.path().join("htpasswd");
            write_htpasswd(&htpasswd, users);
            config.htpasswd.get_or_insert(htpasswd);
        }
        let root = dir.path().join("root");
        Berth::serve(dir, root, Some(config), None)
    }

    /// Over HTTPS with the certificate and key `tls`, asking clients for a certificate: with
    /// `auth_yaml` naming an `instance_identity` bundle, apps present their instance identity.
    pub fn start_with_identity(
        auth_yaml: &str,
        (certificate, private_key): (&Path, &Path),
    ) -> Berth {
        let config: berth_registry::auth::AuthConfig =
            serde_norway::from_str(auth_yaml).expect("an auth configuration");
        let tls = berth_registry::server::ServerTls::load(&berth_registry::config::TlsConfig {
            certificate: certificate.to_owned(),
            private_key: private_key.to_owned(),
        })
        .expect("load the server certificate");
        tls.request_client_certificates(true);
        let dir = tempdir("berth-cacher-e2e-identity-");
        let root = dir.path().join("root");
        Berth::serve(dir, root, Some(config), Some(tls))
    }

    fn serve(
        dir: TempDir,
        root: PathBuf,
        auth: Option<berth_registry::auth::AuthConfig>,
        tls: Option<berth_registry::server::ServerTls>,
    ) -> Berth {
        use berth_registry::api::{AppState, router};
        use berth_registry::auth::Auth;
        use berth_registry::config::Limits;
        use berth_registry::content::FsContentStore;
        use berth_registry::metadata::SqliteMetadataStore;

        let auth = auth.map(|config| block_on(Auth::load(&config)).expect("load the auth config"));
        let https = tls.is_some();
        let store = root.clone();
        let server = BackgroundServer::start("berth-registry", tls, move || {
            let root = store;
            let content = FsContentStore::open(&root).expect("open the content store");
            let metadata = SqliteMetadataStore::open(&root.join("metadata.sqlite"))
                .expect("open the metadata store");
            let state = AppState::new(Arc::new(content), Arc::new(metadata), Limits::default());
            router(Arc::new(match auth {
                Some(auth) => state.with_auth(auth),
                None => state,
            }))
        });
        Berth {
            dir,
            root,
            server,
            tls: https,
        }
    }

    /// `127.0.0.1:PORT`, as image references spell it.
    pub fn host(&self) -> String {
        self.server.addr.to_string()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.server.addr)
    }

    /// `host/repo@digest`: the reference pinning manifest `digest` of `repo` here.
    pub fn pinned(&self, repo: &str, digest: &str) -> String {
        format!("{}/{repo}@{digest}", self.host())
    }

    pub fn root(&self) -> PathBuf {
        self.root.clone()
    }

    pub fn catalog(&self) -> Vec<String> {
        let response = http(reqwest::Method::GET, &format!("{}/v2/_catalog", self.url()));
        assert_eq!(response.status, 200, "GET /v2/_catalog");
        let catalog: Value = serde_json::from_slice(&response.body).expect("catalog JSON");
        serde_json::from_value(catalog["repositories"].clone()).expect("a repository list")
    }

    /// The tags of `repo`; none for a repository that does not exist.
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let response = http(
            reqwest::Method::GET,
            &format!("{}/v2/{repo}/tags/list", self.url()),
        );
        if response.status == 404 {
            return Vec::new();
        }
        assert_eq!(response.status, 200, "GET tags of {repo}");
        let list: Value = serde_json::from_slice(&response.body).expect("tag list JSON");
        serde_json::from_value(list["tags"].clone()).unwrap_or_default()
    }

    /// The bytes of manifest `reference` in `repo`, if it is there.
    pub fn manifest(&self, repo: &str, reference: &str) -> Option<Vec<u8>> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        let response = http(reqwest::Method::GET, &url);
        match response.status {
            200 => Some(response.body),
            404 => None,
            status => panic!("GET {url} answered {status}"),
        }
    }

    pub fn has_blob(&self, repo: &str, digest: &str) -> bool {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.url());
        match http(reqwest::Method::HEAD, &url).status {
            200 => true,
            404 => false,
            status => panic!("HEAD {url} answered {status}"),
        }
    }

    /// Pushes `top` and `blobs` below it as `repo_tag` with skopeo, logging in with
    /// `credentials` when given.
    pub fn push(
        &self,
        repo_tag: &str,
        top: &Blob,
        blobs: &[&Blob],
        credentials: Option<(&str, &str)>,
    ) {
        let destination = format!("{}/{repo_tag}", self.host());
        skopeo_push(self.dir.path(), &destination, top, blobs, credentials);
    }

    /// Stops serving; the storage stays until the value is dropped.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

/// What the proxy does to one matching request instead of relaying it faithfully.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer this status without asking upstream (`Retry-After: 1` with a 429).
    Status(u16),
    /// Relay this many bytes of the body, then drop the connection.
    Cut(usize),
    /// Flip the first byte of the body, keeping its length.
    Corrupt,
    /// Wait this long before relaying.
    Delay(Duration),
    /// Relay the body at this many bytes per second, in tenth-of-a-second slices.
    Throttle(usize),
    /// Relay this many bytes of the body, then send nothing more, keeping the connection open.
    Stall(usize),
}

struct Rule {
    needle: String,
    fault: Fault,
    /// Matching requests still to fault; `None` for all of them.
    left: Option<u32>,
}

/// One request the proxy answered.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct ProxyLog {
    rules: Vec<Rule>,
    exchanges: Vec<Exchange>,
    /// Blob body bytes relayed to the client, by digest.
    blob_bytes: BTreeMap<String, u64>,
}

struct ProxyContext {
    upstream: String,
    client: reqwest::Client,
    log: Mutex<ProxyLog>,
}

/// An HTTP proxy in front of a registry that counts the blob bytes it relays and injects faults
/// into requests whose path contains a chosen string.
pub struct Proxy {
    context: Arc<ProxyContext>,
    server: BackgroundServer,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let context = Arc::new(ProxyContext {
            upstream: format!("http://{upstream}"),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client"),
            log: Mutex::default(),
        });
        let state = context.clone();
        let server = BackgroundServer::start("proxy", None, move || {
            Router::new().fallback(relay).with_state(state)
        });
        Proxy { context, server }
    }

    pub fn host(&self) -> String {
        self.server.addr.to_string()
    }

    /// Applies `fault` to the next `times` requests (all of them with `None`) whose path
    /// contains `needle`.
    pub fn inject(&self, needle: &str, fault: Fault, times: Option<u32>) {
        self.log().rules.push(Rule {
            needle: needle.into(),
            fault,
            left: times,
        });
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.log().exchanges.clone()
    }

    /// Blob bytes relayed since the last call, by digest.
    pub fn take_blob_bytes(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.log().blob_bytes)
    }

    /// Waits until every fault injected for `needle` has been applied.
    pub fn wait_until_applied(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let pending = |log: &ProxyLog| {
            log.rules
                .iter()
                .any(|r| r.needle == needle && r.left != Some(0))
        };
        while pending(&self.log()) {
            assert!(Instant::now() < deadline, "no request for {needle} arrived");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, ProxyLog> {
        self.context.log.lock().expect("proxy log lock")
    }
}

async fn relay(State(context): State<Arc<ProxyContext>>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    let range = header_text(request.headers(), "range");
    let fault = {
        let mut log = context.log.lock().expect("proxy log lock");
        let rule = log
            .rules
            .iter_mut()
            .find(|r| path.contains(&r.needle) && r.left != Some(0));
        rule.map(|rule| {
            rule.left = rule.left.map(|n| n - 1);
            rule.fault
        })
    };
    let response = match fault {
        Some(Fault::Status(status)) => fault_status(status),
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            forward(&context, request, &path, None).await
        }
        fault => forward(&context, request, &path, fault).await,
    };
    let status = response.status().as_u16();
    let mut log = context.log.lock().expect("proxy log lock");
    log.exchanges.push(Exchange {
        path,
        range,
        status,
    });
    response
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn fault_status(status: u16) -> Response {
    let mut response = Response::new(Body::from(
        r#"{"errors":[{"code":"UNAVAILABLE","message":"injected by the test proxy"}]}"#,
    ));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    if status == 429 {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    response
}

async fn forward(
    context: &Arc<ProxyContext>,
    request: Request,
    path: &str,
    fault: Option<Fault>,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("a request body");
    let mut headers = parts.headers.clone();
    headers.remove("host");
    let upstream = context
        .client
        .request(parts.method.clone(), format!("{}{path}", context.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(err) => {
            let mut response = Response::new(Body::from(err.to_string()));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            return response;
        }
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if !matches!(name.as_str(), "transfer-encoding" | "connection") {
            response = response.header(name, value);
        }
    }
    let blob = match parts.method {
        axum::http::Method::GET => path.split_once("/blobs/").map(|(_, d)| d.to_owned()),
        _ => None,
    };
    let relayed = Relayed {
        upstream: upstream.bytes_stream().boxed(),
        sent: 0,
        fault,
        blob,
        context: context.clone(),
        fail_next: false,
        done: false,
        pending: Bytes::new(),
    };
    let stream = futures_util::stream::unfold(relayed, Relayed::next);
    response
        .body(Body::from_stream(stream))
        .expect("a relayed response")
}

/// A response body on its way through the proxy: counted, and cut or corrupted on request.
struct Relayed {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    sent: usize,
    fault: Option<Fault>,
    blob: Option<String>,
    context: Arc<ProxyContext>,
    fail_next: bool,
    done: bool,
    /// What a throttled body has received from upstream and not relayed yet.
    pending: Bytes,
}

impl Relayed {
    async fn next(mut self) -> Option<(io::Result<Bytes>, Relayed)> {
        if self.done {
            return None;
        }
        if self.fail_next {
            // Give the server time to flush what was relayed before the connection drops.
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.done = true;
            return Some((Err(io::Error::other("cut by the test proxy")), self));
        }
        let mut chunk = if self.pending.is_empty() {
            match self.upstream.next().await? {
                Ok(chunk) => chunk,
                Err(err) => {
                    self.done = true;
                    return Some((Err(io::Error::other(err)), self));
                }
            }
        } else {
            std::mem::take(&mut self.pending)
        };
        if let Some(Fault::Throttle(per_second)) = self.fault {
            let slice = (per_second / 10).max(1);
            if chunk.len() > slice {
                self.pending = chunk.split_off(slice);
            }
            let pause = Duration::from_secs_f64(chunk.len() as f64 / per_second as f64);
            tokio::time::sleep(pause).await;
        }
        if let Some(Fault::Stall(limit)) = self.fault
            && self.sent >= limit
        {
            std::future::pending::<()>().await;
        }
        match self.fault {
            Some(Fault::Stall(limit)) if self.sent + chunk.len() > limit => {
                self.pending = chunk.split_off(limit - self.sent);
            }
            Some(Fault::Cut(limit)) if self.sent + chunk.len() >= limit => {
                chunk = chunk.slice(..limit - self.sent);
                self.fail_next = true;
            }
            Some(Fault::Corrupt) if self.sent == 0 && !chunk.is_empty() => {
                let mut bytes = chunk.to_vec();
                bytes[0] ^= 0xff;
                chunk = Bytes::from(bytes);
            }
            _ => {}
        }
        self.sent += chunk.len();
        if let Some(digest) = &self.blob {
            let mut log = self.context.log.lock().expect("proxy log lock");
            *log.blob_bytes.entry(digest.clone()).or_default() += chunk.len() as u64;
        }
        Some((Ok(chunk), self))
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream registry
// ---------------------------------------------------------------------------------------------

/// CNCF distribution as the registry an app's image lives in, with Basic authentication
/// (htpasswd) when given credentials. Dropping it stops it.
pub struct Upstream {
    dir: TempDir,
    addr: SocketAddr,
    credentials: Option<(String, String)>,
    child: Option<Child>,
}

impl Upstream {
    pub fn start(credentials: Option<(&str, &str)>) -> Upstream {
        let binary = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("upstream-")
            .tempdir()
            .expect("a temporary directory");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let auth = match credentials {
            Some(login) => {
                let htpasswd = dir.path().join("htpasswd");
                write_htpasswd(&htpasswd, &[login]);
                format!(
                    "auth:\n  htpasswd:\n    realm: upstream\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: berth-e2e\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .expect("write the upstream config");
        let child = spawn_logged(
            Command::new(&binary).arg("serve").arg(&config),
            &dir.path().join("log"),
        );
        let upstream = Upstream {
            dir,
            addr,
            credentials: credentials.map(|(u, p)| (u.into(), p.into())),
            child: Some(child),
        };
        wait_until(
            "docker-registry",
            Duration::from_secs(15),
            &upstream.log_path(),
            || std::net::TcpStream::connect(addr).is_ok(),
        );
        upstream
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Pushes `top` (an image manifest or an index) and `blobs` below it as `repo_tag` with
    /// skopeo, as a developer would push their app's image.
    pub fn push(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob]) {
        let destination = format!("{}/{repo_tag}", self.host());
        let credentials = self
            .credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()));
        skopeo_push(self.dir.path(), &destination, top, blobs, credentials);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        print_log_on_panic("docker-registry", &self.log_path());
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The cacher
// ---------------------------------------------------------------------------------------------

/// The cacher binary as Cloud Controller starts it, with a directory of its own for the result
/// file, its configuration and its TMPDIR. The environment is exactly what the test sets.
pub struct Cacher {
    dir: TempDir,
    env: Vec<(String, String)>,
}

/// How a run of the cacher ended.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn from_output(output: Output) -> Outcome {
        Outcome {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics, showing everything printed, unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Outcome {
        assert_eq!(
            self.code,
            Some(code),
            "berth-cacher exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

impl Cacher {
    /// Without a cacher configuration: the plain builder.
    pub fn new() -> Cacher {
        let dir = tempfile::Builder::new()
            .prefix("cacher-")
            .tempdir()
            .expect("a temporary directory");
        for sub in ["tmp", "certs"] {
            fs::create_dir(dir.path().join(sub)).expect("create a directory");
        }
        Cacher {
            dir,
            env: Vec::new(),
        }
    }

    /// Configured to cache into `berth` under [`REPOSITORY_KEY`]; `extra` is more YAML.
    pub fn caching_into(berth: &Berth, extra: &str) -> Cacher {
        Cacher::configured(berth, "", extra)
    }

    /// Configured to cache into `berth` (serving HTTPS with the certificate `ca_file`) with the
    /// instance identity `identity` and no password, as the BOSH job configures it on
    /// foundations with instance identity.
    pub fn caching_into_with_identity(
        berth: &Berth,
        ca_file: &Path,
        identity: &InstanceIdentity,
    ) -> Cacher {
        let lines = format!("  identity: instance\n  ca_file: {}\n", ca_file.display());
        Cacher::configured(berth, &lines, "")
            .env("CF_INSTANCE_CERT", &identity.certificate.to_string_lossy())
            .env("CF_INSTANCE_KEY", &identity.key.to_string_lossy())
    }

    /// Like [`Cacher::caching_into`], pushing as `user` with `password`, as the BOSH job
    /// configures the cacher's robot account.
    pub fn caching_into_as(berth: &Berth, (user, password): (&str, &str), extra: &str) -> Cacher {
        let login = format!("  username: {user:?}\n  password: {password:?}\n");
        Cacher::configured(berth, &login, extra)
    }

    /// Like [`Cacher::caching_into`], with `registry_lines` (indented YAML) added to the
    /// `registry:` section.
    pub fn configured(berth: &Berth, registry_lines: &str, extra: &str) -> Cacher {
        let cacher = Cacher::new();
        let config = cacher.dir.path().join("berth-cacher.yml");
        fs::write(
            &config,
            format!(
                "registry:\n  url: {}\n{registry_lines}repository_key: {REPOSITORY_KEY}\n{extra}",
                berth.url()
            ),
        )
        .expect("write the cacher config");
        cacher.env("BERTH_CACHER_CONFIG", &config.to_string_lossy())
    }

    pub fn env(mut self, name: &str, value: &str) -> Cacher {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Staging for the app `guid`, as Diego describes it in the environment.
    pub fn app(self, guid: &str) -> Cacher {
        self.env(
            "VCAP_APPLICATION",
            &json!({ "application_id": guid, "name": "e2e" }).to_string(),
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn result_path(&self) -> PathBuf {
        self.dir.path().join("out/result.json")
    }

    /// Cloud Controller's flags for `reference`, its registry listed as insecure, and `extra`.
    pub fn builder_args(&self, reference: &str, extra: &[&str]) -> Vec<String> {
        let host = reference.split('/').next().expect("a registry host");
        let mut args = vec![
            format!(
                "-outputMetadataJSONFilename={}",
                self.result_path().display()
            ),
            format!("-dockerRef={reference}"),
            format!("-insecureDockerRegistries={host}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-cacher"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TMPDIR", self.dir.path().join("tmp"))
            .env("CF_SYSTEM_CERT_PATH", self.dir.path().join("certs"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args);
        cmd
    }

    pub fn run(&self, args: &[String]) -> Outcome {
        Outcome::from_output(run_output(&mut self.command(args), Duration::from_secs(90)))
    }

    /// Starts the cacher without waiting; finish with [`Cacher::wait`].
    pub fn spawn(&self, args: &[String]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start berth-cacher")
    }

    /// Runs the cacher like [`Cacher::run`], also noting when each line of its stdout arrived
    /// (counted from the start).
    pub fn run_timed(&self, args: &[String]) -> (Outcome, Vec<(Duration, String)>) {
        let started = Instant::now();
        let mut child = self.spawn(args);
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = thread::spawn(move || {
            // Split on newlines only, so a carriage return would show in the line.
            io::BufRead::split(io::BufReader::new(stdout), b'\n')
                .map_while(Result::ok)
                .map(|line| {
                    (
                        started.elapsed(),
                        String::from_utf8_lossy(&line).into_owned(),
                    )
                })
                .collect::<Vec<_>>()
        });
        let outcome = self.wait(child);
        let lines = reader.join().expect("the stdout reader");
        let stdout = lines.iter().map(|(_, line)| format!("{line}\n")).collect();
        (Outcome { stdout, ..outcome }, lines)
    }

    pub fn wait(&self, child: Child) -> Outcome {
        Outcome::from_output(wait_output(child, Duration::from_secs(90), "berth-cacher"))
    }

    /// The staging result file, parsed.
    pub fn result(&self) -> Value {
        let bytes = fs::read(self.result_path()).expect("read the staging result");
        serde_json::from_slice(&bytes).expect("the staging result is JSON")
    }
}

/// The repository the cacher must pick for app `guid` under [`REPOSITORY_KEY`]:
/// `cache/<guid>/<first 16 bytes of HMAC-SHA256(key, guid), hex>`.
pub fn cache_repository(guid: &str) -> String {
    use hmac::{Hmac, Mac};
    let key = hex::decode(REPOSITORY_KEY).expect("a hex key");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(guid.as_bytes());
    format!(
        "cache/{guid}/{}",
        hex::encode(&mac.finalize().into_bytes()[..16])
    )
}

/// The tag that marks app `guid`'s newest staging of `reference` read with `credentials` in its
/// repository: `src-<first 16 bytes of HMAC-SHA256(key, parts joined by NUL), hex>`, the parts
/// being `staging-source`, the GUID, the normalised reference (the tests name images on a
/// `host:port`, which normalisation leaves alone), and the user and password if any.
pub fn record_tag(guid: &str, reference: &str, credentials: Option<(&str, &str)>) -> String {
    use hmac::{Hmac, Mac};
    let key = hex::decode(REPOSITORY_KEY).expect("a hex key");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("staging-source\0{guid}\0{reference}").as_bytes());
    if let Some((user, password)) = credentials {
        mac.update(format!("\0{user}\0{password}").as_bytes());
    }
    format!("src-{}", hex::encode(&mac.finalize().into_bytes()[..16]))
}

pub fn new_guid() -> String {
    uuid::Uuid::new_v4().to_string()
}
