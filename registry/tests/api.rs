//! The HTTP API against the OCI Distribution Specification v1.1 (and the Docker Registry v2
//! behaviour clients rely on), endpoint by endpoint and error by error, over real HTTP to the real
//! binary. Every check is on what a client sees: status, headers, the OCI error code, bytes.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderName, RANGE};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};

const OCTET_STREAM: &str = "application/octet-stream";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const MANIFEST_LIMIT: usize = 4 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// This suite's checks on top of the shared [`Reply`]: the framing every answer of the API must
/// get right, OCI errors and headers, `Link` pagination and JSON lists.
impl Reply {
    /// Checks what every response must get right, whatever the endpoint: the API version header,
    /// and a Content-Length that frames the body (none at all on 204, as HTTP requires; on HEAD,
    /// the length a GET would send, which the caller knows).
    #[track_caller]
    fn checked(self) -> Reply {
        assert_eq!(
            self.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "{self}"
        );
        let length = self.header("content-length");
        if self.status == 204 {
            assert_eq!(length, None, "a 204 must not carry Content-Length: {self}");
            assert!(self.body.is_empty(), "{self}");
        } else if self.method == Method::HEAD {
            assert!(length.is_some(), "HEAD without Content-Length: {self}");
            assert!(self.body.is_empty(), "{self}");
        } else {
            let expected = self.body.len().to_string();
            assert_eq!(length, Some(expected.as_str()), "Content-Length: {self}");
        }
        self
    }

    /// Asserts an OCI error: `status` and, but on HEAD which has no body, `code` first in
    /// `{"errors":[...]}`.
    #[track_caller]
    fn expect_error(&self, status: u16, code: &str) -> &Reply {
        self.expect(status);
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self}"
        );
        if self.method != Method::HEAD {
            assert_eq!(self.json()["errors"][0]["code"], code, "{self}");
        }
        self
    }

    #[track_caller]
    fn expect_header(&self, name: &str, value: &str) -> &Reply {
        assert_eq!(self.header(name), Some(value), "{name}: {self}");
        self
    }

    /// The target of `Link: <target>; rel="next"`, if the reply has one.
    #[track_caller]
    fn next_link(&self) -> Option<String> {
        let link = self.header("link")?;
        let parsed = link
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .filter(|(_, params)| params.trim() == "; rel=\"next\"");
        let (target, _) = parsed.unwrap_or_else(|| panic!("malformed Link {link:?}: {self}"));
        Some(target.to_string())
    }

    /// The strings of the JSON array under `key`.
    fn list(&self, key: &str) -> Vec<String> {
        let body = self.json();
        let entries = body[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} array: {self}"));
        entries
            .iter()
            .map(|v| v.as_str().expect("a string entry").to_string())
            .collect()
    }
}

/// Sends `request` and checks what every reply must get right.
async fn send(request: RequestBuilder) -> Reply {
    send_request(request).await.checked()
}

/// `uri` with `key=value` added to its query.
fn with_query(uri: &str, key: &str, value: &str) -> String {
    let separator = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{separator}{key}={value}")
}

/// A manifest as pushed: pretty-printed, so a registry that re-serialised it would change its
/// bytes.
fn manifest(media_type: &str, value: &Value) -> Blob {
    Blob::new(
        media_type,
        serde_json::to_vec_pretty(value).expect("serialize a manifest"),
    )
}

/// A small single-layer OCI image, different for every seed.
fn small_image(seed: u64) -> Image {
    Image::generate(seed, "amd64", &[3000])
}

/// The OCI image manifest of an artifact: `artifactType` if given, `config`, one `layer`, and
/// `subject` if given.
fn artifact(
    artifact_type: Option<&str>,
    config: &Blob,
    layer: &Blob,
    subject: Option<&Blob>,
    annotations: Value,
) -> Blob {
    let mut value = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": annotations,
    });
    if let Some(artifact_type) = artifact_type {
        value["artifactType"] = json!(artifact_type);
    }
    if let Some(subject) = subject {
        value["subject"] = subject.descriptor();
    }
    manifest(OCI_MANIFEST, &value)
}

/// The Docker schema 2 manifest of `image`'s config and layers.
fn docker_manifest(image: &Image) -> Blob {
    let layers: Vec<Value> = image
        .layers
        .iter()
        .map(|l| Blob::new(DOCKER_LAYER, l.blob.bytes.clone()).descriptor())
        .collect();
    manifest(
        DOCKER_MANIFEST,
        &json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": Blob::new(DOCKER_CONFIG, image.config.bytes.clone()).descriptor(),
            "layers": layers,
        }),
    )
}

/// An index (OCI or Docker list, by `media_type`) over `children`, one platform each.
fn index_of(media_type: &str, children: &[(&Blob, &str)]) -> Blob {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(child, arch)| {
            let mut descriptor = child.descriptor();
            descriptor["platform"] = json!({ "architecture": arch, "os": "linux" });
            descriptor
        })
        .collect();
    manifest(
        media_type,
        &json!({ "schemaVersion": 2, "mediaType": media_type, "manifests": manifests }),
    )
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut paths = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("read a storage directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            paths.insert(path.strip_prefix(dir).expect("below dir").to_path_buf());
        }
    }
    paths
}

/// Polls `probe` until it yields a value, for state a server settles on after a request it never
/// answered.
async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a connection and sends `head` (the request line, and any headers of its own) for a body
/// of `declared` bytes, of which it sends only `sent`.
fn partial_request(addr: SocketAddr, head: &str, declared: usize, sent: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to the registry");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    write!(
        stream,
        "{head}\r\nHost: {addr}\r\nContent-Type: {OCTET_STREAM}\r\n\
         Content-Length: {declared}\r\n\r\n"
    )
    .expect("write the request head");
    stream.write_all(sent).expect("write part of the body");
    stream.flush().expect("flush");
    stream
}

/// Reads a response's status line and headers off `stream`.
fn read_response_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("read a response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A registry under test and a client for it.
struct Api {
    registry: Registry,
    client: reqwest::Client,
}

impl Api {
    fn start() -> Api {
        Api {
            registry: Registry::start(),
            client: http_client(),
        }
    }

    /// Like [`Api::start`], storing under `root` instead of a fresh temporary directory.
    fn start_on(root: &Path) -> Api {
        let root = root.to_str().expect("a UTF-8 storage root");
        Api {
            registry: Registry::start_configured("{}", &[("BERTH_STORAGE_ROOT", root)]),
            client: http_client(),
        }
    }

    /// Like [`Api::start`], with `yaml` as the configuration file.
    fn start_with_config(yaml: &str) -> Api {
        Api {
            registry: Registry::start_with_config(yaml),
            client: http_client(),
        }
    }

    /// `target` is a path below `/v2/`, or, starting with `/`, a path of the server such as a
    /// `Location` it returned.
    fn request(&self, method: Method, target: &str) -> RequestBuilder {
        let url = if target.starts_with('/') {
            absolute(&self.registry, target)
        } else {
            format!("{}/v2/{target}", self.registry.url())
        };
        self.client.request(method, url)
    }

    async fn get(&self, target: &str) -> Reply {
        send(self.request(Method::GET, target)).await
    }

    async fn head(&self, target: &str) -> Reply {
        send(self.request(Method::HEAD, target)).await
    }

    async fn delete(&self, target: &str) -> Reply {
        send(self.request(Method::DELETE, target)).await
    }

    /// Sends a request exactly as written, for targets an HTTP client would normalise away.
    fn raw(&self, method: &str, target: &str, body: &[u8]) -> Reply {
        self.raw_with(method, target, &[("Accept", "*/*")], body)
    }

    /// Like [`Api::raw`], with exactly `headers` besides `Host`, `Connection` and
    /// `Content-Length`.
    fn raw_with(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let raw = blocking_request_with(
            self.registry.addr(),
            method,
            target,
            headers,
            body,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
        let mut headers = HeaderMap::new();
        for (name, value) in &raw.headers {
            let name = HeaderName::try_from(name.as_str()).expect("a header name");
            headers.append(name, value.parse().expect("a header value"));
        }
        Reply {
            what: format!("{method} {target}"),
            method: method.parse().expect("a method"),
            status: raw.status,
            headers,
            body: raw.body,
        }
        .checked()
    }

    /// Pushes `bytes` to `repo` in a single POST, asserts it was created, returns the digest.
    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let target = format!("{repo}/blobs/uploads/?digest={digest}");
        let reply = send(
            self.request(Method::POST, &target)
                .header(CONTENT_TYPE, OCTET_STREAM)
                .body(bytes.to_vec()),
        )
        .await;
        expect_blob_created(&reply, repo, &digest);
        digest
    }

    /// Opens an upload session in `repo`, checks the 202, and returns its `Location`.
    async fn start_upload(&self, repo: &str) -> String {
        let reply = send(
            self.request(Method::POST, &format!("{repo}/blobs/uploads/"))
                .header(CONTENT_LENGTH, "0"),
        )
        .await;
        expect_session(&reply, repo, 0)
    }

    /// PATCHes `bytes` to upload `location`, with `Content-Range: <range>` if given.
    async fn patch(&self, location: &str, range: Option<&str>, bytes: &[u8]) -> Reply {
        let mut request = self
            .request(Method::PATCH, location)
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(bytes.to_vec());
        if let Some(range) = range {
            request = request.header(CONTENT_RANGE, range);
        }
        send(request).await
    }

    /// Closes upload `location` as `digest` with `bytes` as the final chunk.
    async fn finish(&self, location: &str, digest: &str, bytes: &[u8]) -> Reply {
        let target = with_query(location, "digest", digest);
        send(
            self.request(Method::PUT, &target)
                .header(CONTENT_TYPE, OCTET_STREAM)
                .body(bytes.to_vec()),
        )
        .await
    }

    async fn put_manifest(&self, repo: &str, reference: &str, manifest: &Blob) -> Reply {
        send(
            self.request(Method::PUT, &format!("{repo}/manifests/{reference}"))
                .header(CONTENT_TYPE, &manifest.media_type)
                .body(manifest.bytes.clone()),
        )
        .await
    }

    /// PUTs `manifest` as `repo:reference` and asserts it was created.
    async fn push_manifest(&self, repo: &str, reference: &str, manifest: &Blob) -> Reply {
        let reply = self.put_manifest(repo, reference, manifest).await;
        reply
            .expect(201)
            .expect_header(
                "location",
                &format!("/v2/{repo}/manifests/{}", manifest.digest),
            )
            .expect_header("docker-content-digest", &manifest.digest);
        reply
    }

    /// Pushes the blobs `image`'s manifest references (config and layers) to `repo`.
    async fn push_blobs(&self, repo: &str, image: &Image) {
        for blob in image.blobs() {
            self.push_blob(repo, &blob.bytes).await;
        }
    }

    /// Pushes `image`'s blobs, then its manifest as `repo:reference`.
    async fn push_image(&self, repo: &str, reference: &str, image: &Image) {
        self.push_blobs(repo, image).await;
        self.push_manifest(repo, reference, &image.manifest).await;
    }

    /// Asserts `repo` serves blob `digest` as exactly `bytes`.
    async fn expect_blob(&self, repo: &str, digest: &str, bytes: &[u8]) {
        let blob = self.get(&format!("{repo}/blobs/{digest}")).await;
        assert!(blob.expect(200).body == bytes, "{blob}");
    }

    /// Asserts GET and HEAD of `repo:reference` serve `manifest` byte for byte, with its type,
    /// digest and length.
    async fn expect_manifest(&self, repo: &str, reference: &str, manifest: &Blob) {
        let target = format!("{repo}/manifests/{reference}");
        let length = manifest.size().to_string();
        for reply in [self.get(&target).await, self.head(&target).await] {
            reply
                .expect(200)
                .expect_header("content-type", &manifest.media_type)
                .expect_header("docker-content-digest", &manifest.digest)
                .expect_header("content-length", &length);
            if reply.method == Method::GET {
                assert!(
                    reply.body == manifest.bytes,
                    "bytes differ from those pushed: {reply}"
                );
            }
        }
    }

    /// Follows `Link` from `first` to the last page, returning each page's `key` entries.
    async fn pages(&self, first: &str, key: &str) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        let mut next = Some(first.to_string());
        while let Some(target) = next {
            let reply = self.get(&target).await;
            reply.expect(200);
            pages.push(reply.list(key));
            next = reply.next_link();
            assert!(pages.len() <= 100, "Link never ends: {reply}");
        }
        pages
    }

    /// The value of the Prometheus sample named exactly `series` (name and labels), if any.
    async fn metric(&self, series: &str) -> Option<f64> {
        let reply = self.get("/metrics").await;
        reply.expect(200);
        let text = String::from_utf8(reply.body).expect("metrics are text");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.trim().parse().expect("a sample value"))
    }
}

#[track_caller]
fn expect_blob_created(reply: &Reply, repo: &str, digest: &str) {
    reply
        .expect(201)
        .expect_header("location", &format!("/v2/{repo}/blobs/{digest}"))
        .expect_header("docker-content-digest", digest);
}

/// Asserts `reply` describes an open upload session of `repo` holding `size` bytes and returns its
/// `Location`.
#[track_caller]
fn expect_session(reply: &Reply, repo: &str, size: u64) -> String {
    let location = reply.location();
    let id = location
        .strip_prefix(&format!("/v2/{repo}/blobs/uploads/"))
        .unwrap_or_else(|| panic!("session Location outside {repo}: {reply}"));
    assert!(
        id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "the session id must be a UUID: {reply}"
    );
    let range = format!("0-{}", size.saturating_sub(1));
    reply
        .expect_header("docker-upload-uuid", id)
        .expect_header("range", &range);
    location
}

// ---------------------------------------------------------------------------------------------
// Base and routing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn base_endpoint_answers_200_with_the_api_version() {
    let api = Api::start();
    for reply in [api.get("").await, api.head("").await] {
        reply
            .expect(200)
            .expect_header("content-type", "application/json");
    }
    assert_eq!(api.get("").await.json(), json!({}));
}

#[tokio::test]
async fn unknown_paths_and_methods_get_oci_errors() {
    let api = Api::start();
    for target in ["repo/unknown/thing", "repo/manifests", "/v3/", "/nothing"] {
        api.get(target).await.expect_error(404, "UNSUPPORTED");
    }
    let digest = sha256(b"x");
    let session = "0b3ad7c4-6c2e-4a4f-9d51-1f2a3b4c5d6e";
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ];
    for (target, allow) in [
        (
            "repo/manifests/latest".to_string(),
            "GET, HEAD, PUT, DELETE",
        ),
        (format!("repo/blobs/{digest}"), "GET, HEAD, DELETE"),
        ("repo/blobs/uploads/".to_string(), "POST"),
        (
            format!("repo/blobs/uploads/{session}"),
            "GET, PATCH, PUT, DELETE",
        ),
        ("repo/tags/list".to_string(), "GET"),
        ("_catalog".to_string(), "GET"),
        (format!("repo/referrers/{digest}"), "GET"),
    ] {
        for method in &methods {
            let reply = send(api.request(method.clone(), &target)).await;
            if allow.split(", ").any(|m| m == method.as_str()) {
                assert_ne!(reply.status, 405, "{method} {target} is allowed: {reply}");
            } else {
                reply.expect_error(405, "UNSUPPORTED");
                assert_eq!(
                    reply.header("allow"),
                    Some(allow),
                    "{method} {target}: {reply}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_wrong_method_outside_the_repository_api_is_an_oci_405_with_allow() {
    let api = Api::start();
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    // Every route the server has besides `/v2/{name}/...`.
    for (target, allow) in [
        ("/v2/", ["GET", "HEAD"].as_slice()),
        ("/healthz", &["GET", "HEAD"]),
        ("/metrics", &["GET", "HEAD"]),
        ("/auth/token", &["GET", "HEAD", "POST"]),
    ] {
        for method in &methods {
            let reply = send(api.request(method.clone(), target)).await;
            if allow.contains(&method.as_str()) {
                assert_ne!(reply.status, 405, "{method} {target} is allowed: {reply}");
                continue;
            }
            reply.expect_error(405, "UNSUPPORTED");
            let listed: BTreeSet<&str> = reply
                .header("allow")
                .unwrap_or_else(|| panic!("no Allow: {reply}"))
                .split(',')
                .map(str::trim)
                .collect();
            assert_eq!(listed, allow.iter().copied().collect(), "{reply}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Blobs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn blobs_are_served_whole_with_digest_length_and_type() {
    let api = Api::start();
    let bytes = Rng::new(1).bytes(70_000);
    let digest = api.push_blob("pull/blob", &bytes).await;
    let target = format!("pull/blob/blobs/{digest}");

    for reply in [api.get(&target).await, api.head(&target).await] {
        reply
            .expect(200)
            .expect_header("content-length", "70000")
            .expect_header("docker-content-digest", &digest)
            .expect_header("content-type", OCTET_STREAM);
    }
    assert!(api.get(&target).await.body == bytes);

    let empty = api.push_blob("pull/blob", b"").await;
    let reply = api.get(&format!("pull/blob/blobs/{empty}")).await;
    reply
        .expect(200)
        .expect_header("docker-content-digest", &empty);

    let unknown = format!("pull/blob/blobs/{}", sha256(b"never pushed"));
    api.get(&unknown).await.expect_error(404, "BLOB_UNKNOWN");
    api.head(&unknown).await.expect_error(404, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn blob_ranges_give_206_or_416() {
    let api = Api::start();
    let bytes = Rng::new(2).bytes(1000);
    let digest = api.push_blob("pull/range", &bytes).await;
    let target = format!("pull/range/blobs/{digest}");
    let ranged =
        async |range: &str| send(api.request(Method::GET, &target).header(RANGE, range)).await;

    for (range, span, content_range) in [
        ("bytes=10-19", 10..20, "bytes 10-19/1000"),
        ("bytes=990-", 990..1000, "bytes 990-999/1000"),
        ("bytes=-5", 995..1000, "bytes 995-999/1000"),
        ("bytes=900-5000", 900..1000, "bytes 900-999/1000"),
    ] {
        let reply = ranged(range).await;
        reply
            .expect(206)
            .expect_header("content-range", content_range)
            .expect_header("docker-content-digest", &digest);
        assert!(reply.body == bytes[span], "{range}: {reply}");
    }

    for range in ["bytes=1000-", "bytes=5-2", "bytes=-0"] {
        ranged(range)
            .await
            .expect_error(416, "UNSUPPORTED")
            .expect_header("content-range", "bytes */1000");
    }
}

/// Large blob bodies leave through the kernel (sendfile) on plain HTTP/1 and through user space on
/// HTTP/2; both must carry exactly the stored bytes, whole and in ranges that cross the server's
/// internal frame boundaries, back to back on reused and concurrent connections.
#[tokio::test]
async fn large_blobs_arrive_intact_whole_and_in_ranges() {
    let api = Api::start();
    let bytes = Rng::new(3).bytes((5 << 20) + 12345);
    let digest = api.push_blob("pull/large", &bytes).await;
    let small = Rng::new(4).bytes(100);
    let small_digest = api.push_blob("pull/large", &small).await;
    let target = format!("pull/large/blobs/{digest}");
    let (len, frame) = (bytes.len(), 2 << 20);
    let spans = [
        0..len,
        1..len - 1,
        frame - 70_000..frame + 70_000,
        frame - 100_000..2 * frame + 100_000,
        70_000..len,
        len - 65_536..len,
    ];
    let from_file = "berth_registry_sent_from_file_bytes_total";
    let sent_from_file_before = api.metric(from_file).await.expect("the sendfile counter");
    for span in &spans {
        let range = format!("bytes={}-{}", span.start, span.end - 1);
        let reply = send(api.request(Method::GET, &target).header(RANGE, &range)).await;
        reply.expect(206);
        assert!(reply.body == bytes[span.clone()], "{range}: {reply}");
        api.expect_blob("pull/large", &small_digest, &small).await;
    }
    let downloads: Vec<_> = (0..8)
        .map(|_| tokio::spawn(send(api.request(Method::GET, &target))))
        .collect();
    for download in downloads {
        let reply = download.await.expect("a download task");
        assert!(
            reply.expect(200).body == bytes,
            "concurrent download: {reply}"
        );
    }
    let path = format!("/v2/{target}");
    let http10 = raw_bodies(api.registry.addr(), &format!("GET {path} HTTP/1.0\r\n\r\n"));
    assert!(http10.len() == 1 && http10[0] == bytes, "HTTP/1.0");
    let pipelined = raw_bodies(
        api.registry.addr(),
        &format!(
            "GET {path} HTTP/1.1\r\nHost: berth\r\nRange: bytes=100-199999\r\n\r\n\
             GET {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(pipelined.len() == 2, "two pipelined responses");
    assert!(
        pipelined[0] == bytes[100..200_000] && pipelined[1] == bytes,
        "pipelined bodies"
    );
    // Every HTTP/1 body above but the small blob's went out with sendfile.
    let sent_from_file = (spans.iter().map(|s| s.len()).sum::<usize>() + 10 * len + 199_900) as f64;
    let sent_from_file_after = api.metric(from_file).await.expect("the sendfile counter");
    assert_eq!(sent_from_file_after - sent_from_file_before, sent_from_file);

    let curl = require_tool("curl");
    let scratch = api.registry.scratch().join("h2c");
    let url = format!("{}/v2/{target}", api.registry.url());
    for range in [None, Some(1..len - 1)] {
        let mut command = Command::new(&curl);
        command.args([
            "-sS",
            "--fail",
            "--http2-prior-knowledge",
            "-w",
            "%{http_version}",
            "-o",
        ]);
        command.arg(&scratch).arg(&url);
        if let Some(range) = &range {
            command.args(["-r", &format!("{}-{}", range.start, range.end - 1)]);
        }
        assert_eq!(run(&mut command), "2", "curl spoke HTTP/2");
        let got = std::fs::read(&scratch).expect("read the HTTP/2 download");
        assert!(got == bytes[range.unwrap_or(0..len)], "HTTP/2 body");
    }
    assert_eq!(
        api.metric(from_file).await,
        Some(sent_from_file_after),
        "HTTP/2 bodies are copied, not sent from the file"
    );
}

/// Sends `requests` (raw HTTP/1, possibly several) on one connection at once and returns the
/// bodies of the responses, split by their `Content-Length`; the last request must close.
fn raw_bodies(addr: SocketAddr, requests: &str) -> Vec<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).expect("connect to the registry");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a read timeout");
    stream
        .write_all(requests.as_bytes())
        .expect("send the requests");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the responses");
    let mut bodies = Vec::new();
    let mut rest = &raw[..];
    while !rest.is_empty() {
        let head_end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head")
            + 4;
        let head = String::from_utf8_lossy(&rest[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .expect("a Content-Length")
            .trim()
            .parse()
            .expect("a length");
        bodies.push(rest[head_end..head_end + len].to_vec());
        rest = &rest[head_end + len..];
    }
    bodies
}

#[tokio::test]
async fn a_repository_reads_only_its_own_blobs() {
    let api = Api::start();
    let image = small_image(3);
    api.push_image("tenant/a", "v1", &image).await;
    api.push_blob("tenant/b", b"b's own blob").await;

    for blob in image.blobs() {
        let target = format!("tenant/b/blobs/{}", blob.digest);
        api.get(&target).await.expect_error(404, "BLOB_UNKNOWN");
        api.head(&target).await.expect_error(404, "BLOB_UNKNOWN");
    }
    let manifest = format!("tenant/b/manifests/{}", image.manifest.digest);
    api.get(&manifest)
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    // Knowing the digests is not enough to make another repository's blobs one's own.
    api.put_manifest("tenant/b", "stolen", &image.manifest)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
}

#[tokio::test]
async fn deleting_a_blob_unlinks_it_from_that_repository_only() {
    let api = Api::start();
    let bytes = b"shared by two repositories";
    let digest = api.push_blob("del/a", bytes).await;
    api.push_blob("del/b", bytes).await;

    let target = format!("del/a/blobs/{digest}");
    api.delete(&target).await.expect(202);
    api.get(&target).await.expect_error(404, "BLOB_UNKNOWN");
    api.head(&target).await.expect_error(404, "BLOB_UNKNOWN");
    api.delete(&target).await.expect_error(404, "BLOB_UNKNOWN");
    let other = api.get(&format!("del/b/blobs/{digest}")).await;
    assert!(other.expect(200).body == bytes);
}

// ---------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn post_then_put_uploads_a_blob_and_ends_the_session() {
    let api = Api::start();
    let bytes = Rng::new(4).bytes(50_000);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/put").await;

    let reply = api.finish(&location, &digest, &bytes).await;
    expect_blob_created(&reply, "push/put", &digest);
    api.expect_blob("push/put", &digest, &bytes).await;
    api.get(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn chunks_in_order_then_put_without_body() {
    let api = Api::start();
    let bytes = Rng::new(5).bytes(100_000);
    let digest = sha256(&bytes);
    let mut location = api.start_upload("push/chunked").await;

    for (start, end) in [(0, 40_000), (40_000, 75_000), (75_000, 100_000)] {
        let range = format!("{start}-{}", end - 1);
        let reply = api.patch(&location, Some(&range), &bytes[start..end]).await;
        reply.expect(202);
        location = expect_session(&reply, "push/chunked", end as u64);
    }
    let reply = api.finish(&location, &digest, b"").await;
    expect_blob_created(&reply, "push/chunked", &digest);
    api.expect_blob("push/chunked", &digest, &bytes).await;
}

#[tokio::test]
async fn an_out_of_order_chunk_is_416_and_the_upload_resumes_where_it_was() {
    let api = Api::start();
    let bytes = Rng::new(6).bytes(300);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/order").await;
    api.patch(&location, Some("0-99"), &bytes[..100])
        .await
        .expect(202);

    // A gap, an overlap, and a range that disagrees with the body's length.
    for (range, chunk) in [
        ("200-299", &bytes[200..]),
        ("50-149", &bytes[50..150]),
        ("100-199", &bytes[100..150]),
    ] {
        api.patch(&location, Some(range), chunk)
            .await
            .expect_error(416, "BLOB_UPLOAD_INVALID");
        let status = api.get(&location).await;
        status.expect(204);
        expect_session(&status, "push/order", 100);
    }

    let reply = api
        .patch(&location, Some("100-199"), &bytes[100..200])
        .await;
    expect_session(reply.expect(202), "push/order", 200);
    let reply = api.patch(&location, Some("200-299"), &bytes[200..]).await;
    expect_session(reply.expect(202), "push/order", 300);
    expect_blob_created(
        &api.finish(&location, &digest, b"").await,
        "push/order",
        &digest,
    );
    api.expect_blob("push/order", &digest, &bytes).await;
}

#[tokio::test]
async fn content_ranges_at_the_limits_of_u64_are_416_and_the_upload_resumes() {
    let api = Api::start();
    let bytes = Rng::new(8).bytes(100);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/huge").await;
    let max = u64::MAX;
    for range in [
        format!("0-{max}"),
        format!("bytes=0-{max}"),
        format!("0-{max}/*"),
        format!("1-{max}"),
        format!("{max}-{max}"),
        format!("{max}-0"),
        "0-18446744073709551616".to_string(),
        "18446744073709551616-18446744073709551616".to_string(),
        "-1-0".to_string(),
    ] {
        for method in [Method::PATCH, Method::PUT] {
            let target = match method {
                Method::PUT => with_query(&location, "digest", &digest),
                _ => location.clone(),
            };
            send(
                api.request(method, &target)
                    .header(CONTENT_TYPE, OCTET_STREAM)
                    .header(CONTENT_RANGE, &range)
                    .body(bytes.clone()),
            )
            .await
            .expect_error(416, "BLOB_UPLOAD_INVALID");
        }
        let status = api.get(&location).await;
        expect_session(status.expect(204), "push/huge", 0);
    }
    expect_blob_created(
        &api.finish(&location, &digest, &bytes).await,
        "push/huge",
        &digest,
    );
}

#[tokio::test]
async fn patches_without_content_range_stream_onto_the_end() {
    let api = Api::start();
    let bytes = Rng::new(7).bytes(90_000);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/stream").await;

    let reply = api.patch(&location, None, &bytes[..30_000]).await;
    expect_session(reply.expect(202), "push/stream", 30_000);
    // A body of unknown length, sent chunked, as docker streams a layer.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = bytes[30_000..60_000]
        .chunks(7_000)
        .map(|piece| Ok(piece.to_vec()))
        .collect();
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let reply = send(
        api.request(Method::PATCH, &location)
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(streamed),
    )
    .await;
    expect_session(reply.expect(202), "push/stream", 60_000);

    // The last chunk rides on the closing PUT.
    let reply = api.finish(&location, &digest, &bytes[60_000..]).await;
    expect_blob_created(&reply, "push/stream", &digest);
    api.expect_blob("push/stream", &digest, &bytes).await;
}

#[tokio::test]
async fn abandoned_upload_sessions_are_purged_and_active_ones_kept() {
    let api = Api::start_with_config("limits:\n  upload_max_idle_seconds: 2\n");
    let abandoned = api.start_upload("purge/app").await;
    api.patch(&abandoned, None, b"left behind")
        .await
        .expect(202);

    // The other session gets a piece every half second for four seconds: never idle for two.
    let active = api.start_upload("purge/app").await;
    let bytes = Rng::new(51).bytes(8 * 1000);
    for piece in bytes.chunks(1000) {
        api.patch(&active, None, piece).await.expect(202);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eventually("the abandoned session to be purged", async || {
        (api.get(&abandoned).await.status == 404).then_some(())
    })
    .await;
    api.get(&abandoned)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    let left = tree(&api.registry.root().join("uploads"));
    let active_id = active.rsplit('/').next().expect("an upload id");
    assert_eq!(
        left,
        BTreeSet::from([PathBuf::from(active_id)]),
        "only the active session's data is left"
    );
    api.finish(&active, &sha256(&bytes), &[]).await.expect(201);
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn upload_status_is_204_with_range_and_uuid() {
    let api = Api::start();
    let location = api.start_upload("push/status").await;
    let status = api.get(&location).await;
    assert_eq!(
        expect_session(status.expect(204), "push/status", 0),
        location
    );

    api.patch(&location, None, &[7; 10]).await.expect(202);
    let status = api.get(&location).await;
    assert_eq!(
        expect_session(status.expect(204), "push/status", 10),
        location
    );
}

#[tokio::test]
async fn a_cancelled_upload_is_gone() {
    let api = Api::start();
    let bytes = b"abandoned half way";
    let location = api.start_upload("push/cancel").await;
    api.patch(&location, None, &bytes[..8]).await.expect(202);

    api.delete(&location).await.expect(204);
    api.get(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.patch(&location, None, &bytes[8..])
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.finish(&location, &sha256(bytes), b"")
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.delete(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn an_upload_is_reachable_only_through_its_own_repository() {
    let api = Api::start();
    let location = api.start_upload("owner/a").await;
    let id = location.rsplit('/').next().expect("an id");

    let foreign = format!("owner/b/blobs/uploads/{id}");
    api.get(&foreign)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.patch(&foreign, None, b"intruder")
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.delete(&foreign)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    for id in ["00000000-0000-4000-8000-000000000000", "not-a-uuid"] {
        api.get(&format!("owner/a/blobs/uploads/{id}"))
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    }
    // The intruder's bytes did not land in the session.
    let status = api.get(&location).await;
    expect_session(status.expect(204), "owner/a", 0);
}

#[tokio::test]
async fn a_digest_mismatch_is_400_and_stores_nothing() {
    let api = Api::start();
    let bytes = Rng::new(8).bytes(20_000);
    let claimed = sha256(b"something else");
    let actual = sha256(&bytes);

    let target = format!("push/mismatch/blobs/uploads/?digest={claimed}");
    send(api.request(Method::POST, &target).body(bytes.clone()))
        .await
        .expect_error(400, "DIGEST_INVALID");

    let location = api.start_upload("push/mismatch").await;
    api.patch(&location, None, &bytes).await.expect(202);
    api.finish(&location, &claimed, b"")
        .await
        .expect_error(400, "DIGEST_INVALID");
    // The data is discarded with the session: the client must start over.
    api.get(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");

    for digest in [&claimed, &actual] {
        api.head(&format!("push/mismatch/blobs/{digest}"))
            .await
            .expect_error(404, "BLOB_UNKNOWN");
    }
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn malformed_digests_are_digest_invalid() {
    let api = Api::start();
    let bytes = b"a blob";
    let digest = sha256(bytes);
    let uppercase = format!("sha256:{}", digest["sha256:".len()..].to_uppercase());
    for bad in [
        "sha256:123",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        uppercase.as_str(),
        "nocolon",
    ] {
        api.get(&format!("r/blobs/{bad}"))
            .await
            .expect_error(400, "DIGEST_INVALID");
        // Without a colon it would be a tag. No manifest can have such a reference: reading one
        // is unknown, as in distribution, writing one invalid.
        if bad.contains(':') {
            let target = format!("r/manifests/{bad}");
            for reply in [api.get(&target).await, api.head(&target).await] {
                reply.expect_error(404, "MANIFEST_UNKNOWN");
            }
            for method in [Method::PUT, Method::DELETE] {
                send(api.request(method, &target).body(r#"{"schemaVersion":2}"#))
                    .await
                    .expect_error(400, "DIGEST_INVALID");
            }
        }
        api.get(&format!("r/referrers/{bad}"))
            .await
            .expect_error(400, "DIGEST_INVALID");
        send(
            api.request(Method::POST, &format!("r/blobs/uploads/?digest={bad}"))
                .body(bytes.to_vec()),
        )
        .await
        .expect_error(400, "DIGEST_INVALID");
        send(api.request(
            Method::POST,
            &format!("r/blobs/uploads/?mount={bad}&from=s"),
        ))
        .await
        .expect_error(400, "DIGEST_INVALID");
    }

    // Neither a malformed nor a missing digest costs the session its data.
    let location = api.start_upload("r").await;
    api.patch(&location, None, bytes).await.expect(202);
    api.finish(&location, "sha256:zz", b"")
        .await
        .expect_error(400, "DIGEST_INVALID");
    send(api.request(Method::PUT, &location))
        .await
        .expect_error(400, "DIGEST_INVALID");
    expect_blob_created(&api.finish(&location, &digest, b"").await, "r", &digest);
}

#[tokio::test]
async fn mounting_needs_a_source_that_owns_the_blob() {
    let api = Api::start();
    let bytes = b"a base layer";
    let digest = api.push_blob("mount/src", bytes).await;
    let elsewhere = api.push_blob("mount/third", b"owned by a third").await;
    let mount = async |repo: &str, digest: &str, from: Option<&str>| {
        let mut target = format!("{repo}/blobs/uploads/?mount={digest}");
        if let Some(from) = from {
            target = with_query(&target, "from", from);
        }
        send(api.request(Method::POST, &target)).await
    };

    expect_blob_created(
        &mount("mount/dst", &digest, Some("mount/src")).await,
        "mount/dst",
        &digest,
    );
    api.expect_blob("mount/dst", &digest, bytes).await;

    // A source that does not own the blob, or is no repository at all: an upload session instead.
    for from in ["mount/src", "Not/A/Name", "mount/none"] {
        let reply = mount("mount/other", &elsewhere, Some(from)).await;
        let location = expect_session(reply.expect(202), "mount/other", 0);
        api.delete(&location).await.expect(204);
        api.head(&format!("mount/other/blobs/{elsewhere}"))
            .await
            .expect_error(404, "BLOB_UNKNOWN");
    }
    // The session offered instead of a mount takes the upload.
    let reply = mount("mount/other", &elsewhere, Some("mount/src")).await;
    let location = expect_session(reply.expect(202), "mount/other", 0);
    let reply = api.finish(&location, &elsewhere, b"owned by a third").await;
    expect_blob_created(&reply, "mount/other", &elsewhere);

    // Without `from` the registry mounts from whichever repository holds the blob (the spec
    // allows it; the cacher relies on it), and offers a session when none does.
    expect_blob_created(
        &mount("mount/anon", &digest, None).await,
        "mount/anon",
        &digest,
    );
    let never = sha256(b"nobody has this");
    let reply = mount("mount/anon", &never, None).await;
    expect_session(reply.expect(202), "mount/anon", 0);
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_manifest_kind_round_trips_by_tag_and_digest() {
    let api = Api::start();
    let repo = "kinds";

    let image = small_image(10);
    api.push_image(repo, "oci", &image).await;

    let multi = MultiArchImage::generate(11);
    for child in &multi.images {
        for blob in child.blobs() {
            api.push_blob(repo, &blob.bytes).await;
        }
        api.push_manifest(repo, &child.manifest.digest, &child.manifest)
            .await;
    }
    api.push_manifest(repo, "index", &multi.index).await;

    let docker = docker_manifest(&image);
    api.push_manifest(repo, "docker", &docker).await;
    let docker_arm = docker_manifest(&multi.images[1]);
    api.push_manifest(repo, &docker_arm.digest, &docker_arm)
        .await;
    let list = index_of(
        DOCKER_MANIFEST_LIST,
        &[(&docker, "amd64"), (&docker_arm, "arm64")],
    );
    api.push_manifest(repo, "docker-list", &list).await;

    // No mediaType field: the Content-Type it was pushed with is the type it is served with.
    let untyped = manifest(
        OCI_MANIFEST,
        &json!({
            "schemaVersion": 2,
            "config": image.config.descriptor(),
            "layers": [image.layers[0].blob.descriptor()],
        }),
    );
    api.push_manifest(repo, "untyped", &untyped).await;

    for (tag, pushed) in [
        ("oci", &image.manifest),
        ("index", &multi.index),
        ("docker", &docker),
        ("docker-list", &list),
        ("untyped", &untyped),
    ] {
        api.expect_manifest(repo, tag, pushed).await;
        api.expect_manifest(repo, &pushed.digest, pushed).await;
        let again = api.push_manifest(repo, &pushed.digest, pushed).await;
        assert_eq!(again.header("oci-subject"), None, "no subject: {again}");
    }
    for child in [&multi.images[0].manifest, &docker_arm] {
        api.expect_manifest(repo, &child.digest, child).await;
    }
    let tags = api.get(&format!("{repo}/tags/list")).await;
    assert_eq!(
        tags.expect(200).list("tags"),
        ["docker", "docker-list", "index", "oci", "untyped"],
        "a push by digest adds no tag"
    );
}

#[tokio::test]
async fn content_type_parameters_are_ignored() {
    let api = Api::start();
    let image = small_image(12);
    api.push_blobs("params", &image).await;
    let reply = send(
        api.request(Method::PUT, "params/manifests/v1")
            .header(CONTENT_TYPE, format!("{OCI_MANIFEST}; charset=utf-8"))
            .body(image.manifest.bytes.clone()),
    )
    .await;
    reply.expect(201);
    api.expect_manifest("params", "v1", &image.manifest).await;
}

/// The `Accept` headers real clients send for a manifest, one entry per header line, as captured
/// from each: dockerd (Debian's docker.io 20.10), containerd 1.6, and containers/image, the
/// library of skopeo, podman and Garden's image plugin (grootfs).
const DOCKERD_ACCEPT: &[&str] = &[
    SCHEMA1_SIGNED,
    "application/json",
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
];
const CONTAINERD_ACCEPT: &[&str] = &["application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"];
const CONTAINERS_IMAGE_ACCEPT: &[&str] = &[
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    SCHEMA1_SIGNED,
    "application/vnd.docker.distribution.manifest.v1+json",
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
];

/// What a client gets for a tag, then for that manifest's digest: the manifest served, or `None`
/// for `404 MANIFEST_UNKNOWN`.
type Served<'a> = (Option<&'a Blob>, Option<&'a Blob>);

#[tokio::test]
async fn manifests_are_negotiated_on_accept_as_distribution_does() {
    let api = Api::start();
    let repo = "negotiated";
    let image = small_image(40);
    api.push_image(repo, "oci", &image).await;
    let multi = MultiArchImage::generate(41);
    for child in &multi.images {
        api.push_image(repo, &child.manifest.digest, child).await;
    }
    api.push_manifest(repo, "index", &multi.index).await;
    let docker = docker_manifest(&image);
    api.push_manifest(repo, "docker", &docker).await;
    let docker_arm = docker_manifest(&multi.images[1]);
    api.push_manifest(repo, &docker_arm.digest, &docker_arm)
        .await;
    let list = index_of(
        DOCKER_MANIFEST_LIST,
        &[(&docker_arm, "arm64"), (&docker, "amd64")],
    );
    api.push_manifest(repo, "list", &list).await;
    let arm_only = index_of(DOCKER_MANIFEST_LIST, &[(&docker_arm, "arm64")]);
    api.push_manifest(repo, "arm-only", &arm_only).await;
    // A list whose linux/amd64 image is an OCI manifest.
    let oci_list = index_of(DOCKER_MANIFEST_LIST, &[(&image.manifest, "amd64")]);
    api.push_manifest(repo, "oci-list", &oci_list).await;

    let everything = [
        ("oci", &image.manifest),
        ("index", &multi.index),
        ("docker", &docker),
        ("list", &list),
        ("arm-only", &arm_only),
        ("oci-list", &oci_list),
    ];
    let all = everything.map(|(_, m)| (Some(m), Some(m)));
    let legacy = [
        (None, None),
        (None, None),
        (Some(&docker), Some(&docker)),
        (Some(&docker), Some(&list)),
        (None, Some(&arm_only)),
        (None, Some(&oci_list)),
    ];
    let mut oci_only = legacy;
    oci_only[0] = (Some(&image.manifest), Some(&image.manifest));
    oci_only[5] = (Some(&image.manifest), Some(&oci_list));
    let none: &[&str] = &[];
    let clients: [(&str, &[&str], [Served<'_>; 6]); 7] = [
        ("dockerd", DOCKERD_ACCEPT, all),
        ("containerd", CONTAINERD_ACCEPT, all),
        ("containers/image", CONTAINERS_IMAGE_ACCEPT, all),
        ("no Accept", none, legacy),
        ("curl's */*", &["*/*"], legacy),
        (
            "a Docker schema 2 client",
            &[DOCKER_MANIFEST, SCHEMA1_SIGNED, "application/json"],
            legacy,
        ),
        (
            "an OCI image manifest client",
            &["application/vnd.oci.image.manifest.v1+json; q=0.9"],
            oci_only,
        ),
    ];
    for (client, accept, expected) in clients {
        let headers: Vec<(&str, &str)> = accept.iter().map(|value| ("Accept", *value)).collect();
        for ((tag, pushed), (by_tag, by_digest)) in everything.iter().zip(expected) {
            for (reference, served) in [(*tag, by_tag), (pushed.digest.as_str(), by_digest)] {
                let target = format!("/v2/{repo}/manifests/{reference}");
                for method in ["GET", "HEAD"] {
                    let reply = api.raw_with(method, &target, &headers, b"");
                    let what = format!("{client}, {method} {reference} ({tag})");
                    let Some(served) = served else {
                        reply.expect_error(404, "MANIFEST_UNKNOWN");
                        if method == "GET" {
                            let error = &reply.json()["errors"][0];
                            assert_eq!(error["detail"]["reference"], reference, "{what}: {reply}");
                            assert!(
                                error["message"].as_str().unwrap().contains("Accept header"),
                                "{what}: {reply}"
                            );
                        }
                        continue;
                    };
                    reply.expect(200);
                    assert_eq!(
                        reply.header("content-type"),
                        Some(served.media_type.as_str()),
                        "{what}: {reply}"
                    );
                    assert_eq!(
                        reply.header("docker-content-digest"),
                        Some(served.digest.as_str()),
                        "{what}: {reply}"
                    );
                    assert_eq!(
                        reply.header("content-length"),
                        Some(served.size().to_string().as_str()),
                        "{what}: {reply}"
                    );
                    if method == "GET" {
                        assert!(reply.body == served.bytes, "{what}: {reply}");
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn artifacts_with_a_subject_are_listed_as_its_referrers() {
    let api = Api::start();
    let repo = "refs";
    let image = small_image(13);
    let empty = Blob::new(OCI_EMPTY, b"{}".to_vec());
    let sbom_layer = Blob::new(
        "application/spdx+json",
        br#"{"spdxVersion":"SPDX-2.3"}"#.to_vec(),
    );
    let sig_config = Blob::new(
        "application/vnd.example.signature.config.v1+json",
        br#"{"signer":"ci"}"#.to_vec(),
    );
    let sig_layer = Blob::new("application/vnd.example.signature.v1", b"signed".to_vec());
    for blob in [&empty, &sbom_layer, &sig_config, &sig_layer] {
        api.push_blob(repo, &blob.bytes).await;
    }

    let sbom = artifact(
        Some("application/vnd.example.sbom.v1"),
        &empty,
        &sbom_layer,
        Some(&image.manifest),
        json!({ "org.example.kind": "sbom" }),
    );
    let signature = artifact(
        None,
        &sig_config,
        &sig_layer,
        Some(&image.manifest),
        json!({ "org.example.kind": "signature" }),
    );
    let referring_index = manifest(
        OCI_INDEX,
        &json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [],
            "subject": image.manifest.descriptor(),
            "annotations": { "org.example.kind": "index" },
        }),
    );

    // The spec requires accepting referrers before their subject exists.
    for (reference, pushed) in [
        ("sbom", &sbom),
        (signature.digest.as_str(), &signature),
        ("index", &referring_index),
    ] {
        let reply = api.push_manifest(repo, reference, pushed).await;
        reply.expect_header("oci-subject", &image.manifest.digest);
        api.expect_manifest(repo, &pushed.digest, pushed).await;
    }
    api.push_image(repo, "v1", &image).await;

    let target = format!("{repo}/referrers/{}", image.manifest.digest);
    let reply = api.get(&target).await;
    reply.expect(200).expect_header("content-type", OCI_INDEX);
    assert_eq!(reply.header("oci-filters-applied"), None, "{reply}");
    let descriptor = |pushed: &Blob, artifact_type: Option<&str>, kind: &str| {
        let mut d = pushed.descriptor();
        if let Some(artifact_type) = artifact_type {
            d["artifactType"] = json!(artifact_type);
        }
        d["annotations"] = json!({ "org.example.kind": kind });
        d
    };
    let sbom_descriptor = descriptor(&sbom, Some("application/vnd.example.sbom.v1"), "sbom");
    let mut expected = vec![
        sbom_descriptor.clone(),
        // Without artifactType an image manifest is listed under its config's media type, an
        // index under none.
        descriptor(&signature, Some(&sig_config.media_type), "signature"),
        descriptor(&referring_index, None, "index"),
    ];
    let by_digest = |a: &Value, b: &Value| a["digest"].as_str().cmp(&b["digest"].as_str());
    expected.sort_by(by_digest);
    let listed = |reply: &Reply| {
        let index = reply.json();
        assert_eq!(index["schemaVersion"], 2, "{reply}");
        assert_eq!(index["mediaType"], OCI_INDEX, "{reply}");
        let mut manifests = index["manifests"].as_array().expect("manifests").clone();
        manifests.sort_by(by_digest);
        manifests
    };
    assert_eq!(listed(&reply), expected);

    let filtered = api
        .get(&with_query(
            &target,
            "artifactType",
            "application/vnd.example.sbom.v1",
        ))
        .await;
    filtered
        .expect(200)
        .expect_header("oci-filters-applied", "artifactType")
        .expect_header("content-type", OCI_INDEX);
    assert_eq!(filtered.json()["manifests"], json!([sbom_descriptor]));

    // Nothing refers to the artifact, and nothing in another repository refers to the image.
    for target in [
        format!("{repo}/referrers/{}", sbom.digest),
        format!("elsewhere/referrers/{}", image.manifest.digest),
    ] {
        let reply = api.get(&target).await;
        reply.expect(200).expect_header("content-type", OCI_INDEX);
        assert_eq!(
            reply.json(),
            json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] })
        );
    }

    api.delete(&format!("{repo}/manifests/{}", sbom.digest))
        .await
        .expect(202);
    expected.retain(|d| *d != sbom_descriptor);
    assert_eq!(listed(&api.get(&target).await), expected);
}

#[tokio::test]
async fn a_manifest_referencing_a_missing_blob_or_child_is_rejected_and_not_stored() {
    let api = Api::start();
    let repo = "missing";
    let image = small_image(14);
    api.push_blob(repo, &image.config.bytes).await;

    let reply = api.put_manifest(repo, "v1", &image.manifest).await;
    reply.expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(
        reply.json()["errors"][0]["detail"]["digest"],
        image.layers[0].blob.digest
    );

    let index = index_of(OCI_INDEX, &[(&image.manifest, "amd64")]);
    api.put_manifest(repo, "index", &index)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");

    for reference in ["v1", "index", &image.manifest.digest, &index.digest] {
        let target = format!("{repo}/manifests/{reference}");
        api.get(&target).await.expect_error(404, "MANIFEST_UNKNOWN");
        api.head(&target)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
    let tags = api.get(&format!("{repo}/tags/list")).await;
    assert!(tags.expect(200).list("tags").is_empty());
    let stored = tree(&api.registry.root().join("blobs"));
    for refused in [&image.manifest.digest, &index.digest] {
        let hex = refused.strip_prefix("sha256:").expect("a sha256 digest");
        assert!(
            !stored.iter().any(|path| path.ends_with(hex)),
            "the bytes of refused manifest {refused} were stored"
        );
    }
}

#[tokio::test]
async fn a_manifest_whose_digest_differs_from_the_url_is_digest_invalid() {
    let api = Api::start();
    let image = small_image(15);
    api.push_blobs("mismatch", &image).await;
    let claimed = sha256(b"another manifest");
    api.put_manifest("mismatch", &claimed, &image.manifest)
        .await
        .expect_error(400, "DIGEST_INVALID");
    for digest in [&claimed, &image.manifest.digest] {
        api.get(&format!("mismatch/manifests/{digest}"))
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
}

#[tokio::test]
async fn manifests_up_to_4_mib_are_accepted_and_larger_ones_get_413() {
    let api = Api::start();
    let image = small_image(16);
    api.push_blobs("big", &image).await;
    // An annotation pads the manifest to exactly `size` bytes.
    let padded = |size: usize| {
        let value = |pad: usize| {
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": image.config.descriptor(),
                "layers": [image.layers[0].blob.descriptor()],
                "annotations": { "pad": "x".repeat(pad) },
            })
        };
        let overhead = serde_json::to_vec(&value(0)).expect("serialize").len();
        let bytes = serde_json::to_vec(&value(size - overhead)).expect("serialize");
        assert_eq!(bytes.len(), size);
        Blob::new(OCI_MANIFEST, bytes)
    };

    let largest = padded(MANIFEST_LIMIT);
    api.push_manifest("big", "largest", &largest).await;
    api.expect_manifest("big", "largest", &largest).await;

    let too_large = padded(MANIFEST_LIMIT + 1);
    api.put_manifest("big", "too-large", &too_large)
        .await
        .expect_error(413, "SIZE_INVALID");
    // Without a Content-Length the limit is found while reading.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = too_large
        .bytes
        .chunks(64 * 1024)
        .map(|piece| Ok(piece.to_vec()))
        .collect();
    send(
        api.request(Method::PUT, "big/manifests/too-large")
            .header(CONTENT_TYPE, OCI_MANIFEST)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            ))),
    )
    .await
    .expect_error(413, "SIZE_INVALID");
    api.get(&format!("big/manifests/{}", too_large.digest))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    api.get("big/manifests/too-large")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn invalid_manifests_are_manifest_invalid() {
    let api = Api::start();
    let image = small_image(17);
    let json_bytes = |value: Value| serde_json::to_vec(&value).expect("serialize");
    let schema1 = json_bytes(json!({
        "schemaVersion": 1, "name": "invalid", "tag": "v1", "architecture": "amd64",
        "fsLayers": [], "history": [], "signatures": [],
    }));
    // A null field is as good as a missing one to a JSON reader.
    let image_manifest = |schema_version: Value, config: Value| {
        json_bytes(json!({
            "schemaVersion": schema_version,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [],
        }))
    };
    let config = image.config.descriptor();
    let text =
        json_bytes(json!({ "schemaVersion": 2, "mediaType": "text/plain", "manifests": [] }));
    let cases = [
        (OCI_MANIFEST, b"not json at all".to_vec(), None),
        (OCI_MANIFEST, image_manifest(json!(2), Value::Null), None),
        (
            OCI_MANIFEST,
            image_manifest(Value::Null, config.clone()),
            None,
        ),
        (OCI_MANIFEST, image_manifest(json!(3), config), None),
        ("text/plain", text, None),
        // The Content-Type contradicts the mediaType field.
        (DOCKER_MANIFEST, image.manifest.bytes.clone(), None),
        // Schema 1 is refused with advice, whichever way it is labelled.
        (SCHEMA1_SIGNED, schema1.clone(), Some("schema 1")),
        ("application/json", schema1, Some("schema 1")),
    ];
    for (content_type, body, message) in cases {
        let reply = send(
            api.request(Method::PUT, "invalid/manifests/v1")
                .header(CONTENT_TYPE, content_type)
                .body(body),
        )
        .await;
        reply.expect_error(400, "MANIFEST_INVALID");
        if let Some(message) = message {
            let text = reply.json()["errors"][0]["message"].to_string();
            assert!(text.contains(message), "{reply}");
        }
    }
    // Nothing was recorded, not even the repository.
    api.get("invalid/tags/list")
        .await
        .expect_error(404, "NAME_UNKNOWN");
}

#[tokio::test]
async fn deleting_a_manifest_by_digest_removes_its_tags() {
    let api = Api::start();
    let image = small_image(18);
    api.push_image("delm", "a", &image).await;
    api.push_manifest("delm", "b", &image.manifest).await;
    let other = small_image(19);
    api.push_image("delm", "other", &other).await;

    let target = format!("delm/manifests/{}", image.manifest.digest);
    api.delete(&target).await.expect(202);
    for reference in [image.manifest.digest.as_str(), "a", "b"] {
        let target = format!("delm/manifests/{reference}");
        api.get(&target).await.expect_error(404, "MANIFEST_UNKNOWN");
        api.head(&target)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
    api.delete(&target)
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    let tags = api.get("delm/tags/list").await;
    assert_eq!(tags.expect(200).list("tags"), ["other"]);
    api.expect_manifest("delm", "other", &other.manifest).await;
}

#[tokio::test]
async fn deleting_a_tag_keeps_the_manifest() {
    let api = Api::start();
    let image = small_image(20);
    api.push_image("delt", "keep", &image).await;
    api.push_manifest("delt", "drop", &image.manifest).await;

    api.delete("delt/manifests/drop").await.expect(202);
    api.get("delt/manifests/drop")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    api.delete("delt/manifests/drop")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    api.expect_manifest("delt", "keep", &image.manifest).await;
    api.expect_manifest("delt", &image.manifest.digest, &image.manifest)
        .await;
    let tags = api.get("delt/tags/list").await;
    assert_eq!(tags.expect(200).list("tags"), ["keep"]);
}

// ---------------------------------------------------------------------------------------------
// Listings
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tags_paginate_with_n_last_and_link() {
    let api = Api::start();
    let image = small_image(21);
    let pushed = ["v2", "latest", "v10", "alpha", "1.0", "v1", "beta"];
    api.push_image("paged", pushed[0], &image).await;
    for tag in &pushed[1..] {
        api.push_manifest("paged", tag, &image.manifest).await;
    }
    let mut all: Vec<String> = pushed.iter().map(|t| t.to_string()).collect();
    all.sort();

    let whole = api.get("paged/tags/list").await;
    assert_eq!(whole.expect(200).json()["name"], "paged");
    assert_eq!(whole.list("tags"), all);
    assert_eq!(whole.header("link"), None, "{whole}");

    let pages = api.pages("paged/tags/list?n=3", "tags").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), all);

    let first = api.get("paged/tags/list?n=3").await;
    let expected = format!("/v2/paged/tags/list?n=3&last={}", all[2]);
    assert_eq!(first.next_link(), Some(expected));

    let after = api.get(&format!("paged/tags/list?last={}", all[4])).await;
    assert_eq!(after.expect(200).list("tags"), all[5..]);

    // n=0 must give an empty list and no Link.
    let none = api.get("paged/tags/list?n=0").await;
    assert!(none.expect(200).list("tags").is_empty());
    assert_eq!(none.header("link"), None, "{none}");

    let beyond = api.get("paged/tags/list?n=100").await;
    assert_eq!(beyond.expect(200).list("tags"), all);
    assert_eq!(beyond.header("link"), None, "{beyond}");
}

#[tokio::test]
async fn the_catalog_paginates_with_n_last_and_link() {
    let api = Api::start();
    let repos = ["cat/e", "cat/a", "cat/d", "b", "cat/c"];
    for repo in repos {
        api.push_blob(repo, repo.as_bytes()).await;
    }
    let mut all: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
    all.sort();

    let whole = api.get("_catalog").await;
    assert_eq!(whole.expect(200).list("repositories"), all);
    assert_eq!(whole.header("link"), None, "{whole}");

    let pages = api.pages("_catalog?n=2", "repositories").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(pages.concat(), all);

    let none = api.get("_catalog?n=0").await;
    assert!(none.expect(200).list("repositories").is_empty());
    assert_eq!(none.header("link"), None, "{none}");
}

#[tokio::test]
async fn an_unknown_repository_is_404_but_has_no_referrers() {
    let api = Api::start();
    api.get("nobody/tags/list")
        .await
        .expect_error(404, "NAME_UNKNOWN");
    api.get("nobody/manifests/latest")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    // The referrers API must never answer 404: clients take that as "unsupported".
    let reply = api.get(&format!("nobody/referrers/{}", sha256(b"x"))).await;
    reply.expect(200).expect_header("content-type", OCI_INDEX);
    assert_eq!(reply.json()["manifests"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// Names and tags
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_names_are_rejected_and_create_nothing() {
    let api = Api::start();
    let root = api.registry.root();
    let before = tree(&root);
    let image = small_image(22);
    let blob = &image.layers[0].blob;
    let long = format!("{}/{}", "a".repeat(200), "b".repeat(55));
    assert_eq!(long.len(), 256);

    let targets = [
        "/v2/Upper/blobs/uploads/".to_string(),
        "/v2/../blobs/uploads/".to_string(),
        "/v2/a/../b/blobs/uploads/".to_string(),
        "/v2/%2e%2e/blobs/uploads/".to_string(),
        "/v2/a/%2E%2E/blobs/uploads/".to_string(),
        "/v2//abs/blobs/uploads/".to_string(),
        "/v2/a%00b/blobs/uploads/".to_string(),
        "/v2/a%2fb/blobs/uploads/".to_string(),
        "/v2/trailing//blobs/uploads/".to_string(),
        format!("/v2/{long}/blobs/uploads/"),
    ];
    for target in &targets {
        let upload = with_query(target, "digest", &blob.digest);
        api.raw("POST", &upload, &blob.bytes)
            .expect_error(400, "NAME_INVALID");
        api.raw("POST", target, b"")
            .expect_error(400, "NAME_INVALID");
        let manifests = target.replace("/blobs/uploads/", "/manifests/latest");
        api.raw("PUT", &manifests, &image.manifest.bytes)
            .expect_error(400, "NAME_INVALID");
        api.raw("GET", &manifests, b"")
            .expect_error(400, "NAME_INVALID");
        let tags = target.replace("/blobs/uploads/", "/tags/list");
        api.raw("GET", &tags, b"").expect_error(400, "NAME_INVALID");
        let blobs = target.replace("/blobs/uploads/", &format!("/blobs/{}", blob.digest));
        api.raw("DELETE", &blobs, b"")
            .expect_error(400, "NAME_INVALID");
    }
    // With no resource word left there is no route at all.
    api.raw("GET", "/v2/../../etc/passwd", b"")
        .expect_error(404, "UNSUPPORTED");

    assert_eq!(
        tree(&root),
        before,
        "a rejected request changed the storage root"
    );
    let catalog = api.get("_catalog").await;
    assert!(catalog.expect(200).list("repositories").is_empty());

    // The longest valid name works.
    let longest = &long[..255];
    api.push_blob(longest, &blob.bytes).await;
}

#[tokio::test]
async fn invalid_tags_are_rejected() {
    let api = Api::start();
    let image = small_image(23);
    api.push_blobs("tagged", &image).await;
    let too_long = "t".repeat(129);
    for tag in [
        too_long.as_str(),
        ".hidden",
        "-dash",
        "a%2Fb",
        "a%3Ab",
        "caf%C3%A9",
    ] {
        api.put_manifest("tagged", tag, &image.manifest)
            .await
            .expect_error(400, "MANIFEST_INVALID");
        api.delete(&format!("tagged/manifests/{tag}"))
            .await
            .expect_error(400, "MANIFEST_INVALID");
        // No manifest can have such a tag: reading it is unknown, as in distribution.
        let target = format!("tagged/manifests/{tag}");
        for reply in [api.get(&target).await, api.head(&target).await] {
            reply.expect_error(404, "MANIFEST_UNKNOWN");
        }
        let error = api.get(&target).await.json()["errors"][0].clone();
        assert_eq!(error["detail"]["reference"], tag);
    }
    api.get(&format!("tagged/manifests/{}", image.manifest.digest))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");

    let longest = "t".repeat(128);
    api.push_manifest("tagged", &longest, &image.manifest).await;
    api.push_manifest("tagged", "_Under.score-1", &image.manifest)
        .await;
    let tags = api.get("tagged/tags/list").await;
    assert_eq!(
        tags.expect(200).list("tags"),
        ["_Under.score-1", longest.as_str()]
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency and broken connections
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_to_one_tag_leave_one_whole_manifest() {
    let api = Api::start();
    let image = small_image(24);
    api.push_blobs("race", &image).await;
    let manifests: Vec<Blob> = (0..16)
        .map(|i| {
            manifest(
                OCI_MANIFEST,
                &json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": image.config.descriptor(),
                    "layers": [image.layers[0].blob.descriptor()],
                    "annotations": { "writer": i.to_string() },
                }),
            )
        })
        .collect();

    let pushes: Vec<_> = manifests
        .iter()
        .map(|m| {
            let request = api
                .request(Method::PUT, "race/manifests/latest")
                .header(CONTENT_TYPE, OCI_MANIFEST)
                .body(m.bytes.clone());
            tokio::spawn(send(request))
        })
        .collect();
    for push in pushes {
        push.await.expect("the push task").expect(201);
    }

    let latest = api.get("race/manifests/latest").await;
    latest.expect(200);
    let winner = manifests
        .iter()
        .find(|m| latest.header("docker-content-digest") == Some(m.digest.as_str()))
        .unwrap_or_else(|| panic!("the tag points at none of the pushes: {latest}"));
    assert!(latest.body == winner.bytes, "{latest}");
    for pushed in &manifests {
        api.expect_manifest("race", &pushed.digest, pushed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_of_one_blob_store_it_once() {
    let api = Api::start();
    let bytes = Rng::new(25).bytes(1 << 20);
    let digest = sha256(&bytes);

    let mut uploads = Vec::new();
    for i in 0..8 {
        let repo = format!("dedupe/r{}", i % 2);
        let location = api.start_upload(&repo).await;
        let request = api
            .request(Method::PUT, &with_query(&location, "digest", &digest))
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(bytes.clone());
        uploads.push((repo, tokio::spawn(send(request))));
    }
    for i in 0..4 {
        let target = format!("dedupe/m{i}/blobs/uploads/?digest={digest}");
        let request = api.request(Method::POST, &target).body(bytes.clone());
        uploads.push((format!("dedupe/m{i}"), tokio::spawn(send(request))));
    }
    for (repo, upload) in uploads {
        expect_blob_created(&upload.await.expect("the upload task"), &repo, &digest);
        api.expect_blob(&repo, &digest, &bytes).await;
    }

    let stored: Vec<PathBuf> = tree(&api.registry.root().join("blobs"))
        .into_iter()
        .filter(|p| api.registry.root().join("blobs").join(p).is_file())
        .collect();
    assert_eq!(stored.len(), 1, "one copy of the blob: {stored:?}");
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn errors_decided_before_the_body_reach_a_client_still_sending_it() {
    let api = Api::start();
    // Far more than the socket buffers hold, so the client is still writing when the answer comes.
    let big = Rng::new(27).bytes(16 << 20);
    let location = api.start_upload("early").await;
    api.patch(&location, Some("0-9"), &big[..10])
        .await
        .expect(202);

    // Whether a client sees the reset is a race, so each is tried a few times.
    for _ in 0..3 {
        let gap = format!("20-{}", 20 + big.len() - 1);
        api.patch(&location, Some(&gap), &big)
            .await
            .expect_error(416, "BLOB_UPLOAD_INVALID");
        api.finish(&location, "sha256:bad", &big)
            .await
            .expect_error(400, "DIGEST_INVALID");
        let unknown = "early/blobs/uploads/00000000-0000-4000-8000-000000000000";
        api.patch(unknown, None, &big)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        let target = format!("Early/blobs/uploads/?digest={}", sha256(&big));
        send(api.request(Method::POST, &target).body(big.clone()))
            .await
            .expect_error(400, "NAME_INVALID");
    }

    // A client waiting for 100 Continue gets the answer without being asked for the body.
    let head = "PATCH /v2/early/blobs/uploads/00000000-0000-4000-8000-000000000000 HTTP/1.1\r\n\
        Expect: 100-continue";
    let mut stream = partial_request(api.registry.addr(), head, big.len(), b"");
    let answer = read_response_head(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");

    let status = api.get(&location).await;
    expect_session(status.expect(204), "early", 10);
}

/// A storage root on a tmpfs of a few MiB: a full disk a test can cause and relieve. Mounting
/// needs root, as the rest of these suites do for dockerd; without it the test fails.
struct SmallDisk {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl SmallDisk {
    fn mount(mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("create the mount point");
        run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&root));
        SmallDisk { _dir: dir, root }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.root)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_is_507_leaves_nothing_partial_and_the_server_keeps_serving() {
    let disk = SmallDisk::mount(24);
    let api = Api::start_on(&disk.root);
    let small = Rng::new(31).bytes(1 << 20);
    let small_digest = api.push_blob("full/app", &small).await;
    let big = Rng::new(32).bytes(32 << 20);
    let big_digest = sha256(&big);

    let target = format!("full/app/blobs/uploads/?digest={big_digest}");
    let reply = send(
        api.request(Method::POST, &target)
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(big.clone()),
    )
    .await;
    reply.expect_error(507, "UNKNOWN");
    let message = reply.json()["errors"][0]["message"].clone();
    assert_eq!(message, "the registry's storage is full", "{reply}");
    api.head(&format!("full/app/blobs/{big_digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    for dir in ["uploads", "tmp"] {
        assert_eq!(
            tree(&disk.root.join(dir)),
            BTreeSet::new(),
            "{dir}/ after the failed POST"
        );
    }

    // A session keeps the whole pieces that fit, so a client can resume once there is room.
    let location = api.start_upload("full/app").await;
    api.patch(&location, None, &big)
        .await
        .expect_error(507, "UNKNOWN");
    let status = api.get(&location).await;
    let range = status
        .expect(204)
        .header("range")
        .expect("a Range header")
        .to_owned();
    let kept: usize = range
        .strip_prefix("0-")
        .and_then(|end| end.parse::<usize>().ok())
        .map(|end| end + 1)
        .unwrap_or_else(|| panic!("range {range}"));
    assert!(kept > 0 && kept < big.len(), "kept {kept} bytes");
    let on_disk = std::fs::metadata(
        disk.root
            .join("uploads")
            .join(location.rsplit('/').next().unwrap()),
    )
    .expect("the session's file")
    .len();
    assert_eq!(
        on_disk, kept as u64,
        "the session reports what its file holds"
    );

    // The server kept serving; cancelling the session frees its space for the next push.
    let served = api.get(&format!("full/app/blobs/{small_digest}")).await;
    assert_eq!(served.expect(200).body, small);
    api.delete(&location).await.expect(204);
    assert_eq!(tree(&disk.root.join("uploads")), BTreeSet::new());
    api.push_blob("full/app", &Rng::new(33).bytes(4 << 20))
        .await;
}

#[tokio::test]
async fn a_truncated_upload_body_leaves_nothing_visible() {
    let api = Api::start();
    let bytes = Rng::new(26).bytes(200_000);
    let digest = sha256(&bytes);
    let sent = 70_000;

    // Each request is dropped half way, as by a client that died. A monolithic POST has no
    // session to resume: it must leave nothing behind.
    let head = format!("POST /v2/trunc/post/blobs/uploads/?digest={digest} HTTP/1.1");
    drop(partial_request(
        api.registry.addr(),
        &head,
        bytes.len(),
        &bytes[..sent],
    ));
    let failed = r#"berth_registry_http_requests_total{route="upload",method="POST",status="400"}"#;
    eventually("the truncated POST to be answered", async || {
        api.metric(failed).await
    })
    .await;
    api.head(&format!("trunc/post/blobs/{digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );

    // A session keeps what arrived, so the client can resume from the reported offset.
    let location = api.start_upload("trunc/put").await;
    let head = format!("PUT {} HTTP/1.1", with_query(&location, "digest", &digest));
    drop(partial_request(
        api.registry.addr(),
        &head,
        bytes.len(),
        &bytes[..sent],
    ));
    let expected_range = format!("0-{}", sent - 1);
    eventually("the truncated PUT to be stored", async || {
        let status = api.get(&location).await;
        (status.header("range") == Some(expected_range.as_str())).then_some(())
    })
    .await;
    api.head(&format!("trunc/put/blobs/{digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    let range = format!("{sent}-{}", bytes.len() - 1);
    api.patch(&location, Some(&range), &bytes[sent..])
        .await
        .expect(202);
    expect_blob_created(
        &api.finish(&location, &digest, b"").await,
        "trunc/put",
        &digest,
    );
    api.expect_blob("trunc/put", &digest, &bytes).await;

    api.get("").await.expect(200);
    let catalog = api.get("_catalog").await;
    assert_eq!(catalog.expect(200).list("repositories"), ["trunc/put"]);
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// The JSON request log lines of `registry`'s log whose path starts with `prefix`.
fn request_log(registry: &Registry, prefix: &str) -> Vec<Value> {
    let log = std::fs::read_to_string(registry.log_path()).expect("read the server log");
    let mut lines = Vec::new();
    for line in log.lines().filter(|l| !l.starts_with("===== berth-e2e")) {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(entry["timestamp"].is_string(), "{line}");
        assert!(entry["level"].is_string(), "{line}");
        let is_request = entry["target"] == "berth_registry::request";
        if is_request
            && entry["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(prefix))
        {
            lines.push(entry);
        }
    }
    lines
}

#[tokio::test]
async fn the_json_request_log_has_one_line_per_request_with_its_fields() {
    let api = Api {
        registry: Registry::start_configured("{}", &[("BERTH_LOG_FORMAT", "json")]),
        client: http_client(),
    };
    let bytes = Rng::new(9).bytes(5000);
    let digest = api.push_blob("logged/app", &bytes).await;
    let blob = format!("logged/app/blobs/{digest}");
    api.expect_blob("logged/app", &digest, &bytes).await;
    let sent = async || {
        let reply = api.get("/metrics").await;
        let text = String::from_utf8(reply.expect(200).body.clone()).expect("metrics are text");
        let series = "berth_registry_sent_bytes_total ";
        let line = text.lines().find_map(|line| line.strip_prefix(series));
        let value: f64 = line.expect("bytes sent").parse().expect("a sample");
        (value, reply.body.len() as f64)
    };
    let (before, metrics_body) = sent().await;
    api.head(&blob).await.expect(200);
    assert_eq!(
        sent().await.0,
        before + metrics_body,
        "only the metrics answer counts: a HEAD sends no body"
    );
    api.get("logged/app/manifests/nothing?n=1")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    send(api.request(Method::POST, "logged/app/tags/list"))
        .await
        .expect_error(405, "UNSUPPORTED");

    let expected = [
        ("POST", "/v2/logged/app/blobs/uploads/", 201, Some(0)),
        ("GET", blob.as_str(), 200, Some(bytes.len())),
        ("HEAD", blob.as_str(), 200, Some(0)),
        ("GET", "/v2/logged/app/manifests/nothing", 404, None),
        ("POST", "logged/app/tags/list", 405, None),
    ];
    let lines = eventually("the request log lines", async || {
        let lines = request_log(&api.registry, "/v2/logged");
        (lines.len() >= expected.len()).then_some(lines)
    })
    .await;
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per request: {lines:#?}"
    );
    for (line, (method, path, status, body)) in lines.iter().zip(expected) {
        let path = path
            .strip_prefix('/')
            .map_or(format!("/v2/{path}"), |p| format!("/{p}"));
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["path"], path, "the path, without its query: {line}");
        assert_eq!(line["version"], "HTTP/1.1", "{line}");
        assert_eq!(line["status"], status, "{line}");
        let logged = line["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("bytes: {line}"));
        match body {
            Some(body) => assert_eq!(logged, body as u64, "bytes of the response body: {line}"),
            None => assert!(logged > 0, "an error's JSON body is counted: {line}"),
        }
        let duration = line["duration_ms"].as_f64();
        assert!(duration.is_some_and(|d| d >= 0.0), "duration_ms: {line}");
    }
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tls = Tls::generate(dir.path());
    let registry = Registry::start_tls(tls.clone());
    assert!(registry.url().starts_with("https://"), "{}", registry.url());

    let trusting = tls.client();
    let reply = send(trusting.get(format!("{}/v2/", registry.url()))).await;
    reply.expect(200);

    // The certificate is really checked, and plain HTTP gets no API.
    let untrusting = http_client();
    let refused = untrusting
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "an unknown certificate was accepted: {refused:?}"
    );
    let plain = format!("http://{}/v2/", registry.addr());
    let plain = untrusting.get(&plain).send().await;
    assert!(
        !matches!(plain, Ok(ref r) if r.status() == 200),
        "plain HTTP was served: {plain:?}"
    );
}
