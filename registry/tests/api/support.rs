//! What every module of this suite shares: a registry with a client, checks every reply must pass,
//! and generated manifests.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderName};
use reqwest::{Method, RequestBuilder};
use serde_json::Value;

use crate::common::*;

pub(crate) const OCTET_STREAM: &str = "application/octet-stream";
pub(crate) const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub(crate) const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub(crate) const SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub(crate) const MANIFEST_LIMIT: usize = 4 << 20;

/// This suite's checks on top of the shared [`Reply`]: the framing every answer of the API must
/// get right, OCI errors and headers, `Link` pagination and JSON lists.
impl Reply {
    /// Checks what every response must get right, whatever the endpoint: the API version header,
    /// and a Content-Length that frames the body (none at all on 204, as HTTP requires; on HEAD,
    /// the length a GET would send, which the caller knows).
    #[track_caller]
    pub(crate) fn checked(self) -> Reply {
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
    pub(crate) fn expect_error(&self, status: u16, code: &str) -> &Reply {
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
    pub(crate) fn expect_header(&self, name: &str, value: &str) -> &Reply {
        assert_eq!(self.header(name), Some(value), "{name}: {self}");
        self
    }

    /// The target of `Link: <target>; rel="next"`, if the reply has one.
    #[track_caller]
    pub(crate) fn next_link(&self) -> Option<String> {
        let link = self.header("link")?;
        let parsed = link
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .filter(|(_, params)| params.trim() == "; rel=\"next\"");
        let (target, _) = parsed.unwrap_or_else(|| panic!("malformed Link {link:?}: {self}"));
        Some(target.to_string())
    }

    /// The strings of the JSON array under `key`.
    pub(crate) fn list(&self, key: &str) -> Vec<String> {
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
pub(crate) async fn send(request: RequestBuilder) -> Reply {
    send_request(request).await.checked()
}

/// `uri` with `key=value` added to its query.
pub(crate) fn with_query(uri: &str, key: &str, value: &str) -> String {
    let separator = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{separator}{key}={value}")
}

/// A manifest as pushed: pretty-printed, so a registry that re-serialised it would change its
/// bytes.
pub(crate) fn manifest(media_type: &str, value: &Value) -> Blob {
    Blob::new(
        media_type,
        serde_json::to_vec_pretty(value).expect("serialize a manifest"),
    )
}

/// A small single-layer OCI image, different for every seed.
pub(crate) fn small_image(seed: u64) -> Image {
    Image::generate(seed, "amd64", &[3000])
}

/// Polls `probe` until it yields a value, for state a server settles on after a request it never
/// answered.
pub(crate) async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A registry under test and a client for it.
pub(crate) struct Api {
    pub(crate) registry: Registry,
    pub(crate) client: reqwest::Client,
}

impl Api {
    pub(crate) fn start() -> Api {
        Api {
            registry: Registry::start(),
            client: http_client(),
        }
    }

    /// Like [`Api::start`], storing under `root` instead of a fresh temporary directory.
    pub(crate) fn start_on(root: &Path) -> Api {
        let root = root.to_str().expect("a UTF-8 storage root");
        Api {
            registry: Registry::start_configured("{}", &[("BERTH_STORAGE_ROOT", root)]),
            client: http_client(),
        }
    }

    /// Like [`Api::start`], with `yaml` as the configuration file.
    pub(crate) fn start_with_config(yaml: &str) -> Api {
        Api {
            registry: Registry::start_with_config(yaml),
            client: http_client(),
        }
    }

    /// `target` is a path below `/v2/`, or, starting with `/`, a path of the server such as a
    /// `Location` it returned.
    pub(crate) fn request(&self, method: Method, target: &str) -> RequestBuilder {
        let url = if target.starts_with('/') {
            absolute(&self.registry, target)
        } else {
            format!("{}/v2/{target}", self.registry.url())
        };
        self.client.request(method, url)
    }

    pub(crate) async fn get(&self, target: &str) -> Reply {
        send(self.request(Method::GET, target)).await
    }

    pub(crate) async fn head(&self, target: &str) -> Reply {
        send(self.request(Method::HEAD, target)).await
    }

    pub(crate) async fn delete(&self, target: &str) -> Reply {
        send(self.request(Method::DELETE, target)).await
    }

    /// Sends a request exactly as written, for targets an HTTP client would normalise away.
    pub(crate) fn raw(&self, method: &str, target: &str, body: &[u8]) -> Reply {
        self.raw_with(method, target, &[("Accept", "*/*")], body)
    }

    /// Like [`Api::raw`], with exactly `headers` besides `Host`, `Connection` and
    /// `Content-Length`.
    pub(crate) fn raw_with(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
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
    pub(crate) async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
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
    pub(crate) async fn start_upload(&self, repo: &str) -> String {
        let reply = send(
            self.request(Method::POST, &format!("{repo}/blobs/uploads/"))
                .header(CONTENT_LENGTH, "0"),
        )
        .await;
        expect_session(&reply, repo, 0)
    }

    /// PATCHes `bytes` to upload `location`, with `Content-Range: <range>` if given.
    pub(crate) async fn patch(&self, location: &str, range: Option<&str>, bytes: &[u8]) -> Reply {
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
    pub(crate) async fn finish(&self, location: &str, digest: &str, bytes: &[u8]) -> Reply {
        let target = with_query(location, "digest", digest);
        send(
            self.request(Method::PUT, &target)
                .header(CONTENT_TYPE, OCTET_STREAM)
                .body(bytes.to_vec()),
        )
        .await
    }

    pub(crate) async fn put_manifest(&self, repo: &str, reference: &str, manifest: &Blob) -> Reply {
        send(
            self.request(Method::PUT, &format!("{repo}/manifests/{reference}"))
                .header(CONTENT_TYPE, &manifest.media_type)
                .body(manifest.bytes.clone()),
        )
        .await
    }

    /// PUTs `manifest` as `repo:reference` and asserts it was created.
    pub(crate) async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        manifest: &Blob,
    ) -> Reply {
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
    pub(crate) async fn push_blobs(&self, repo: &str, image: &Image) {
        for blob in image.blobs() {
            self.push_blob(repo, &blob.bytes).await;
        }
    }

    /// Pushes `image`'s blobs, then its manifest as `repo:reference`.
    pub(crate) async fn push_image(&self, repo: &str, reference: &str, image: &Image) {
        self.push_blobs(repo, image).await;
        self.push_manifest(repo, reference, &image.manifest).await;
    }

    /// Asserts `repo` serves blob `digest` as exactly `bytes`.
    pub(crate) async fn expect_blob(&self, repo: &str, digest: &str, bytes: &[u8]) {
        let blob = self.get(&format!("{repo}/blobs/{digest}")).await;
        assert!(blob.expect(200).body == bytes, "{blob}");
    }

    /// Asserts GET and HEAD of `repo:reference` serve `manifest` byte for byte, with its type,
    /// digest and length.
    pub(crate) async fn expect_manifest(&self, repo: &str, reference: &str, manifest: &Blob) {
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
    pub(crate) async fn pages(&self, first: &str, key: &str) -> Vec<Vec<String>> {
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
    pub(crate) async fn metric(&self, series: &str) -> Option<f64> {
        self.metric_and_page_size(series).await.0
    }

    /// Like [`Api::metric`], with the size of the `/metrics` page it was read from.
    pub(crate) async fn metric_and_page_size(&self, series: &str) -> (Option<f64>, usize) {
        let reply = self.get("/metrics").await;
        reply.expect(200);
        let size = reply.body.len();
        let text = String::from_utf8(reply.body).expect("metrics are text");
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.trim().parse().expect("a sample value"));
        (value, size)
    }
}

#[track_caller]
pub(crate) fn expect_blob_created(reply: &Reply, repo: &str, digest: &str) {
    reply
        .expect(201)
        .expect_header("location", &format!("/v2/{repo}/blobs/{digest}"))
        .expect_header("docker-content-digest", digest);
}

/// Asserts `reply` describes an open upload session of `repo` holding `size` bytes and returns its
/// `Location`.
#[track_caller]
pub(crate) fn expect_session(reply: &Reply, repo: &str, size: u64) -> String {
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
