//! Registry API helpers (async, reqwest).

use std::time::Duration;

use serde_json::Value;

use super::*;

/// A client for the registry's API that, like every real client, names the manifest types it
/// reads in `Accept` (the registry serves an OCI manifest to no one else).
pub fn http_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static(MANIFEST_ACCEPT),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .expect("build an HTTP client")
}

/// A response read whole, and the request that got it, for assertion messages.
pub struct Reply {
    /// The request as messages show it: method and URL, and more if the caller likes.
    pub what: String,
    pub method: reqwest::Method,
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(800)]);
        write!(
            f,
            "{} answered {} {:?} {body}",
            self.what, self.status, self.headers
        )
    }
}

impl Reply {
    /// Reads `response` (to a `method` request described as `what`) to its end.
    pub async fn read(method: reqwest::Method, what: String, response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"))
            .to_vec();
        Reply {
            what,
            method,
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self}"))
    }

    #[track_caller]
    pub fn expect(&self, status: u16) -> &Reply {
        assert_eq!(self.status, status, "{self}");
        self
    }

    #[track_caller]
    pub fn location(&self) -> String {
        self.header("location")
            .unwrap_or_else(|| panic!("no Location: {self}"))
            .to_string()
    }
}

/// Sends `request` and reads the reply whole; messages name it by method and URL.
pub async fn send_request(request: reqwest::RequestBuilder) -> Reply {
    let (client, request) = request.build_split();
    let request = request.expect("a well-formed request");
    let method = request.method().clone();
    let what = format!("{method} {}", request.url());
    let response = client
        .execute(request)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    Reply::read(method, what, response).await
}

/// A fetched manifest: status, Content-Type, Docker-Content-Digest, body.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub content_type: Option<String>,
    pub digest: Option<String>,
    pub body: Vec<u8>,
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub async fn get_manifest(
    client: &reqwest::Client,
    registry: &Registry,
    repo: &str,
    reference: &str,
) -> Fetched {
    let url = format!("{}/v2/{repo}/manifests/{reference}", registry.url());
    let resp = client
        .get(&url)
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Fetched {
        status: resp.status().as_u16(),
        content_type: header(&resp, "content-type"),
        digest: header(&resp, "docker-content-digest"),
        body: resp.bytes().await.expect("read the manifest body").to_vec(),
    }
}

/// GETs blob `digest` of `repo` and checks status 200 and that the bytes hash to the digest.
pub async fn get_blob_checked(
    client: &reqwest::Client,
    registry: &Registry,
    repo: &str,
    digest: &str,
) -> Vec<u8> {
    let url = format!("{}/v2/{repo}/blobs/{digest}", registry.url());
    let reply = send_request(client.get(&url)).await;
    reply.expect(200);
    assert_eq!(
        sha256(&reply.body),
        digest,
        "GET {url} returned bytes that hash to something else"
    );
    reply.body
}

pub async fn head_status(client: &reqwest::Client, url: &str) -> u16 {
    client
        .head(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("HEAD {url}: {e}"))
        .status()
        .as_u16()
}

/// Resolves a `Location` header against the registry's base URL.
pub fn absolute(registry: &Registry, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", registry.url())
    } else {
        format!("{}/{location}", registry.url())
    }
}

/// Asserts a pushed manifest is served back byte for byte under `reference` with the digest
/// header and the expected media type, and that every blob it references is there.
pub async fn assert_manifest_served(
    client: &reqwest::Client,
    registry: &Registry,
    repo: &str,
    reference: &str,
    expected_digest: &str,
    expected_type: &str,
) -> Value {
    let fetched = get_manifest(client, registry, repo, reference).await;
    assert_eq!(
        fetched.status, 200,
        "GET manifest {repo}:{reference}: {fetched:?}"
    );
    assert_eq!(
        sha256(&fetched.body),
        expected_digest,
        "manifest {repo}:{reference} bytes hash to another digest"
    );
    assert_eq!(
        fetched.digest.as_deref(),
        Some(expected_digest),
        "Docker-Content-Digest of {repo}:{reference}"
    );
    assert_eq!(
        fetched.content_type.as_deref(),
        Some(expected_type),
        "Content-Type of {repo}:{reference}"
    );
    let manifest: Value = serde_json::from_slice(&fetched.body).expect("the manifest is JSON");
    let mut referenced = Vec::new();
    if let Some(config) = manifest["config"]["digest"].as_str() {
        referenced.push(config.to_string());
    }
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        referenced.push(layer["digest"].as_str().expect("layer digest").to_string());
    }
    for digest in referenced {
        get_blob_checked(client, registry, repo, &digest).await;
    }
    manifest
}
