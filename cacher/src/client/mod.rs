//! A client for one remote registry's `/v2/` API: manifests, blobs, uploads and mounts, with
//! challenge-driven authentication and retries on transient failures.

mod auth;
mod blob;
mod retry;

use std::time::Duration;

use berth_oci::manifest::ManifestDocument;
use berth_oci::{Digest, RepoName, media_type};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};

pub use blob::{BlobReader, TransferCounter, short};
pub use retry::RetryPolicy;

use crate::secret::Secret;

/// Registries refuse manifests over 4 MiB; so does the client, before buffering one.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Error bodies are read up to this size and the rest dropped: an OCI error document is small,
/// and a broken or hostile registry could otherwise hold the copy with an endless one.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Every manifest type the client can copy, for content negotiation.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5";

#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{context}: {reason}")]
    Transport {
        context: String,
        reason: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{context}: the registry answered {status}{detail}")]
    Status {
        context: String,
        status: StatusCode,
        /// The OCI error codes of the answer, if it had any.
        codes: Vec<String>,
        detail: String,
        /// What a 429 said about the limit it enforces.
        rate_limit: Option<Box<RateLimit>>,
    },
    /// The destination hashed an uploaded blob and refused it: what the source sent was not the
    /// blob its digest names.
    #[error("blob {digest} arrived corrupted: the destination refused its content{detail}")]
    Corrupted { digest: Digest, detail: String },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("{context}: content does not match {expected} (got {actual})")]
    DigestMismatch {
        context: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    fn transport(context: impl Into<String>, source: reqwest::Error) -> ClientError {
        ClientError::Transport {
            context: context.into(),
            reason: retry::transport_reason(&source),
            source,
        }
    }

    /// Whether trying the same operation again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. }
            | ClientError::DigestMismatch { .. }
            | ClientError::Corrupted { .. } => true,
            ClientError::Status { status, .. } => retry::is_retryable_status(*status),
            ClientError::Auth(_) | ClientError::Invalid(_) => false,
        }
    }

    /// Whether the registry could not be reached or kept failing as a server in trouble does
    /// (DNS, connection, TLS, timeouts, 5xx, 429), as opposed to answering that something is
    /// wrong with the request.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Status { status, .. } => retry::is_retryable_status(*status),
            _ => false,
        }
    }
}

/// The limit a 429 answer says was reached, from the `ratelimit-limit`, `ratelimit-remaining`
/// and `Retry-After` headers Docker Hub sends (and berth-registry forwards from its upstreams).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// `100;w=21600`: 100 pulls per window of 21600 seconds.
    pub limit: Option<String>,
    pub remaining: Option<String>,
    /// Seconds, or an HTTP date.
    pub retry_after: Option<String>,
}

impl RateLimit {
    fn from_headers(headers: &reqwest::header::HeaderMap) -> RateLimit {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        RateLimit {
            limit: text("ratelimit-limit"),
            remaining: text("ratelimit-remaining"),
            retry_after: text("retry-after"),
        }
    }
}

/// `limit 100 per 21600 s, 0 remaining, resets in 60 s`, saying which parts were not given.
impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Docker Hub's form is `COUNT;w=SECONDS`; the window is the same on both headers.
        let count = |value: &str| value.split(';').next().unwrap_or(value).trim().to_owned();
        let window = |value: &str| {
            value
                .split(';')
                .skip(1)
                .find_map(|part| part.trim().strip_prefix("w="))
                .map(str::to_owned)
        };
        match &self.limit {
            Some(limit) => match window(limit) {
                Some(window) => write!(f, "limit {} per {window} s", count(limit))?,
                None => write!(f, "limit {}", count(limit))?,
            },
            None => f.write_str("limit not given")?,
        }
        match &self.remaining {
            Some(remaining) => write!(f, ", {} remaining", count(remaining))?,
            None => f.write_str(", remaining count not given")?,
        }
        match &self.retry_after {
            Some(seconds) if seconds.parse::<u64>().is_ok() => {
                write!(f, ", resets in {seconds} s")
            }
            Some(date) => write!(f, ", resets at {date}"),
            None => f.write_str(", reset time not given"),
        }
    }
}

/// The access a request needs, as token-service scopes (`repository:NAME:pull,push`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope(Vec<String>);

impl Scope {
    pub fn pull(repo: &RepoName) -> Scope {
        Scope(vec![format!("repository:{repo}:pull")])
    }

    pub fn push(repo: &RepoName) -> Scope {
        Scope(vec![format!("repository:{repo}:pull,push")])
    }

    fn key(&self) -> String {
        self.0.join(" ")
    }

    fn entries(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// A manifest exactly as the registry served it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub bytes: Bytes,
    pub digest: Digest,
}

/// How a push of a blob began.
#[derive(Debug)]
pub enum UploadStart {
    /// The registry mounted the blob from another repository: nothing to send.
    Mounted,
    /// An upload session to send the blob to.
    Session(Url),
}

#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    pub credentials: Option<Credentials>,
    /// Accept any TLS certificate and fall back to plain HTTP, as Docker does for registries
    /// listed as insecure.
    pub insecure: bool,
    /// PEM roots trusted in addition to the system's (neither is used for an insecure registry).
    pub extra_roots: Vec<reqwest::Certificate>,
    /// The TLS client certificate to present, if any.
    pub identity: Option<reqwest::Identity>,
    pub retry: RetryPolicy,
}

pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    auth: auth::Authenticator,
    retry: RetryPolicy,
}

fn parse_base(base: &str) -> Result<Url, ClientError> {
    Url::parse(base).map_err(|e| ClientError::Invalid(format!("registry URL {base:?}: {e}")))
}

impl RegistryClient {
    /// A client for `host[:port]`. HTTPS unless the host is insecure and does not speak it.
    pub async fn connect(
        host: &str,
        options: ClientOptions,
    ) -> Result<RegistryClient, ClientError> {
        let insecure = options.insecure;
        let https = RegistryClient::new(&format!("https://{host}"), options)?;
        // An insecure registry gets one HTTPS try before plain HTTP, as Docker does: a plain
        // HTTP server fails every TLS handshake, so retrying one only delays the fallback.
        let probe = RetryPolicy {
            attempts: if insecure { 1 } else { https.retry.attempts },
            ..https.retry
        };
        match https.ping_with(&probe).await {
            Ok(()) => Ok(https),
            Err(ClientError::Transport { .. }) if insecure => {
                let http = RegistryClient {
                    base: parse_base(&format!("http://{host}"))?,
                    ..https
                };
                http.ping().await?;
                Ok(http)
            }
            Err(err) => Err(err),
        }
    }

    /// A client for a registry at a known base URL (`https://host:port`).
    pub fn new(base: &str, options: ClientOptions) -> Result<RegistryClient, ClientError> {
        let base = parse_base(base)?;
        // Building a client that checks certificates reads and parses the system's root
        // certificates, a few hundred files: do it once per registry, since the plain-HTTP
        // fallback above reuses it, and not at all for an insecure registry, whose certificates go
        // unchecked.
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("berth-cacher/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(30))
            .danger_accept_invalid_certs(options.insecure)
            .tls_built_in_root_certs(!options.insecure);
        if !options.insecure {
            for root in options.extra_roots {
                builder = builder.add_root_certificate(root);
            }
        }
        if let Some(identity) = options.identity {
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::transport("building the HTTP client", e))?;
        Ok(RegistryClient {
            http,
            base,
            auth: auth::Authenticator::new(options.credentials),
            retry: options.retry,
        })
    }

    /// The same registry, TLS identity and credentials under another retry policy. The
    /// connection pool is shared; tokens are fetched anew.
    pub fn with_retry(&self, retry: RetryPolicy) -> RegistryClient {
        RegistryClient {
            http: self.http.clone(),
            base: self.base.clone(),
            auth: auth::Authenticator::new(self.auth.credentials().cloned()),
            retry,
        }
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    fn url(&self, path: &str) -> Url {
        self.base
            .join(path)
            .expect("registry paths are valid URL paths")
    }

    /// Sends a request with authentication and retries. A first 401 teaches the client the
    /// registry's challenge and the request is sent once more with credentials or a token.
    async fn send(
        &self,
        what: &str,
        scope: &Scope,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, ClientError> {
        for round in 0..2 {
            let authorization = self
                .auth
                .authorization(&self.http, &self.retry, scope)
                .await?;
            let response = self
                .retry
                .send(what, || match &authorization {
                    Some(value) => build().header(AUTHORIZATION, value.clone()),
                    None => build(),
                })
                .await
                .map_err(|e| ClientError::transport(what, e))?;
            if response.status() == StatusCode::UNAUTHORIZED && round == 0 {
                self.auth.note_challenge(response.headers(), scope);
                continue;
            }
            if response.status() == StatusCode::UNAUTHORIZED {
                return Err(ClientError::Auth(if self.auth.has_credentials() {
                    format!("{what}: the registry rejected the credentials")
                } else {
                    format!("{what}: the registry requires credentials")
                }));
            }
            return Ok(response);
        }
        unreachable!("the loop returns in its second round")
    }

    /// `GET /v2/`: checks the registry answers and learns its authentication challenge.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.ping_with(&self.retry).await
    }

    async fn ping_with(&self, retry: &RetryPolicy) -> Result<(), ClientError> {
        let url = self.url("/v2/");
        let response = retry
            .send("checking the registry", || self.http.get(url.clone()))
            .await
            .map_err(|e| ClientError::transport(format!("reaching {}", self.base), e))?;
        if response.status() == StatusCode::UNAUTHORIZED {
            self.auth
                .note_challenge(response.headers(), &Scope::default());
            return Ok(());
        }
        expect(
            response,
            &[StatusCode::OK],
            &format!("checking {}", self.base),
        )
        .await
        .map(drop)
    }

    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<Manifest, ClientError> {
        let what = format!("fetching manifest {repo}:{reference}");
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let response = self
            .send(&what, &Scope::pull(repo), || {
                self.http.get(url.clone()).header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        let response = expect(response, &[StatusCode::OK], &what).await?;
        let header_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let bytes = read_limited(response, MAX_MANIFEST_BYTES, &what).await?;
        let expected = reference.parse::<Digest>().ok();
        let digest = match &expected {
            Some(expected) => expected.same_algorithm_of(&bytes),
            None => Digest::sha256_of(&bytes),
        };
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(ClientError::DigestMismatch {
                context: what,
                expected,
                actual: digest,
            });
        }
        let media_type = detect_media_type(header_type.as_deref(), &bytes);
        Ok(Manifest {
            media_type,
            bytes,
            digest,
        })
    }

    /// Pushes manifest bytes unchanged under `reference` (a tag or the digest).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<(), ClientError> {
        let what = format!("pushing manifest {repo}:{reference}");
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let response = self
            .send(&what, &Scope::push(repo), || {
                self.http
                    .put(url.clone())
                    .header(CONTENT_TYPE, &manifest.media_type)
                    .body(manifest.bytes.clone())
            })
            .await?;
        expect(response, &[StatusCode::CREATED, StatusCode::OK], &what).await?;
        Ok(())
    }

    /// The size of a blob in `repo`, or `None` if the repository does not have it.
    pub async fn blob_size(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, ClientError> {
        let what = format!("checking blob {digest} in {repo}");
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let response = self
            .send(&what, &Scope::pull(repo), || self.http.head(url.clone()))
            .await?;
        match response.status() {
            StatusCode::OK => Ok(response.content_length()),
            StatusCode::NOT_FOUND => Ok(None),
            _ => expect(response, &[], &what).await.map(|_| None),
        }
    }

    /// Starts reading a blob at byte `offset`; the caller checks for 200 or 206.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<Response, ClientError> {
        let what = format!("fetching blob {digest}");
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let response = self
            .send(&what, &Scope::pull(repo), || {
                let request = self.http.get(url.clone());
                if offset > 0 {
                    request.header(RANGE, format!("bytes={offset}-"))
                } else {
                    request
                }
            })
            .await?;
        expect(
            response,
            &[StatusCode::OK, StatusCode::PARTIAL_CONTENT],
            &what,
        )
        .await
    }

    /// Reads a small blob (an image config) whole, verifying its digest.
    pub async fn get_small_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        max: usize,
    ) -> Result<Bytes, ClientError> {
        let what = format!("fetching blob {digest}");
        let response = self.get_blob(repo, digest, 0).await?;
        let bytes = read_limited(response, max, &what).await?;
        let actual = digest.same_algorithm_of(&bytes);
        if &actual != digest {
            return Err(ClientError::DigestMismatch {
                context: what,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Starts pushing `digest` into `repo`, asking the registry to mount it from any repository
    /// it already has it in (OCI distribution 1.1 `mount` without `from`); registries that do
    /// not mount answer with an upload session instead.
    pub async fn start_upload(
        &self,
        repo: &RepoName,
        mount: Option<&Digest>,
    ) -> Result<UploadStart, ClientError> {
        let what = format!("starting an upload to {repo}");
        let mut url = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        if let Some(digest) = mount {
            url.query_pairs_mut()
                .append_pair("mount", &digest.to_string());
        }
        let response = self
            .send(&what, &Scope::push(repo), || {
                self.http.post(url.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        let status = response.status();
        let response = expect(
            response,
            &[StatusCode::CREATED, StatusCode::ACCEPTED],
            &what,
        )
        .await?;
        if status == StatusCode::CREATED {
            return Ok(UploadStart::Mounted);
        }
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ClientError::Invalid(format!("{what}: no Location in the answer")))?;
        let location = self
            .base
            .join(location)
            .map_err(|e| ClientError::Invalid(format!("{what}: bad Location {location:?}: {e}")))?;
        Ok(UploadStart::Session(location))
    }

    /// Sends the whole blob to an upload session and commits it as `digest`, which the registry
    /// checks. The body is not retried here: a stream can be sent only once, so the caller
    /// retries the whole blob.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        mut location: Url,
        digest: &Digest,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), ClientError> {
        let what = format!("uploading blob {digest}");
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let authorization = self
            .auth
            .authorization(&self.http, &self.retry, &Scope::push(repo))
            .await?;
        let mut request = self
            .http
            .put(location)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body);
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::transport(&what, e))?;
        match expect(response, &[StatusCode::CREATED], &what).await {
            Ok(_) => Ok(()),
            Err(ClientError::Status {
                status: StatusCode::BAD_REQUEST,
                codes,
                detail,
                ..
            }) if codes.iter().any(|code| code == "DIGEST_INVALID") => {
                Err(ClientError::Corrupted {
                    digest: digest.clone(),
                    detail,
                })
            }
            Err(err) => Err(err),
        }
    }

    /// Best-effort cancel of an upload session after a failed transfer.
    pub async fn cancel_upload(&self, repo: &RepoName, location: Url) {
        let _ = self
            .send("cancelling an upload", &Scope::push(repo), || {
                self.http.request(Method::DELETE, location.clone())
            })
            .await;
    }
}

/// Returns `response` if its status is one of `ok`, else an error carrying the registry's own
/// OCI error code and message when it sent one.
async fn expect(
    response: Response,
    ok: &[StatusCode],
    what: &str,
) -> Result<Response, ClientError> {
    let status = response.status();
    if ok.contains(&status) {
        return Ok(response);
    }
    let rate_limit = (status == StatusCode::TOO_MANY_REQUESTS)
        .then(|| Box::new(RateLimit::from_headers(response.headers())));
    let body = read_prefix(response, MAX_ERROR_BODY).await;
    let errors = oci_errors(&body);
    Err(ClientError::Status {
        context: what.to_owned(),
        status,
        codes: errors.iter().map(|e| e.code.clone()).collect(),
        detail: summary(&errors),
        rate_limit,
    })
}

#[derive(serde::Deserialize)]
struct OciError {
    code: String,
    #[serde(default)]
    message: String,
}

/// `: CODE: message` for each entry.
fn summary(errors: &[OciError]) -> String {
    errors
        .iter()
        .map(|e| format!(": {}: {}", e.code, e.message))
        .collect()
}

/// The entries of an OCI error body; none if the body is not one.
fn oci_errors(body: &[u8]) -> Vec<OciError> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<OciError>,
    }
    serde_json::from_slice::<Errors>(body)
        .map(|parsed| parsed.errors)
        .unwrap_or_default()
}

/// The first `max` bytes of a response body (fewer if it ends or fails sooner); the rest is
/// never read.
async fn read_prefix(response: Response, max: usize) -> Bytes {
    let mut body = BytesMut::new();
    let mut stream = response.bytes_stream();
    while body.len() < max {
        match stream.next().await {
            Some(Ok(chunk)) => {
                let room = max - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Some(Err(_)) | None => break,
        }
    }
    body.freeze()
}

/// Reads a response body of at most `max` bytes.
async fn read_limited(response: Response, max: usize, what: &str) -> Result<Bytes, ClientError> {
    read_limited_vec(response, max, what).await.map(Bytes::from)
}

/// [`read_limited`] into a vector sized from `Content-Length` up front, so a secret read this way
/// is not left behind in buffers a growing vector gave up.
async fn read_limited_vec(
    response: Response,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, ClientError> {
    let declared = response.content_length();
    if declared.is_some_and(|len| len > max as u64) {
        return Err(ClientError::Invalid(format!(
            "{what}: larger than {max} bytes"
        )));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::transport(what, e))?;
        if body.len() + chunk.len() > max {
            return Err(ClientError::Invalid(format!(
                "{what}: larger than {max} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The manifest's media type: the `Content-Type` when it names a manifest type, else the
/// document's own `mediaType`, else what its shape says (some registries serve `application/json`).
pub(crate) fn detect_media_type(header: Option<&str>, bytes: &[u8]) -> String {
    if let Some(header) = header
        && (media_type::is_supported_manifest(header) || media_type::is_schema1(header))
        && header != "application/json"
    {
        return header.to_owned();
    }
    match ManifestDocument::parse(bytes) {
        Ok(ManifestDocument {
            media_type: Some(declared),
            ..
        }) => declared,
        Ok(ManifestDocument {
            schema_version: Some(1),
            ..
        }) => media_type::DOCKER_SCHEMA1.to_owned(),
        Ok(ManifestDocument {
            manifests: Some(_), ..
        }) => media_type::OCI_INDEX.to_owned(),
        _ => media_type::OCI_MANIFEST.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_read_as_docker_hub_reports_them() {
        let hub = RateLimit {
            limit: Some("100;w=21600".into()),
            remaining: Some("0;w=21600".into()),
            retry_after: Some("60".into()),
        };
        assert_eq!(
            hub.to_string(),
            "limit 100 per 21600 s, 0 remaining, resets in 60 s"
        );
        let bare = RateLimit {
            limit: Some("200".into()),
            retry_after: Some("Wed, 21 Oct 2026 07:28:00 GMT".into()),
            ..RateLimit::default()
        };
        assert_eq!(
            bare.to_string(),
            "limit 200, remaining count not given, resets at Wed, 21 Oct 2026 07:28:00 GMT"
        );
    }

    #[test]
    fn media_type_falls_back_to_the_document() {
        assert_eq!(
            detect_media_type(Some(media_type::DOCKER_MANIFEST), b"{}"),
            media_type::DOCKER_MANIFEST
        );
        assert_eq!(
            detect_media_type(Some("application/json"), br#"{"schemaVersion":1}"#),
            media_type::DOCKER_SCHEMA1
        );
        assert_eq!(
            detect_media_type(Some("text/plain"), br#"{"schemaVersion":2,"manifests":[]}"#),
            media_type::OCI_INDEX
        );
        assert_eq!(
            detect_media_type(None, br#"{"schemaVersion":2,"config":{}}"#),
            media_type::OCI_MANIFEST
        );
    }

    #[tokio::test]
    async fn an_endless_error_body_is_cut() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
            let mut sent = 0u64;
            // Until the client hangs up.
            while socket.write_all(chunk.as_bytes()).await.is_ok() {
                sent += 0x4000;
            }
            sent
        });
        let client = RegistryClient::new(
            &format!("http://{addr}"),
            ClientOptions {
                retry: RetryPolicy {
                    attempts: 1,
                    ..RetryPolicy::default()
                },
                ..ClientOptions::default()
            },
        )
        .unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let fetched = tokio::time::timeout(
            Duration::from_secs(20),
            client.get_manifest(&repo, "latest"),
        )
        .await
        .expect("the error body is not read to its (missing) end");
        assert!(
            matches!(
                fetched,
                Err(ClientError::Status {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    ..
                })
            ),
            "{fetched:?}"
        );
        drop(client);
        let sent = tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("the server stops once the client hangs up")
            .unwrap();
        // What the client took in is bounded by the cut plus what socket buffers hold.
        assert!(sent < 64 * 1024 * 1024, "{sent} bytes sent");
    }

    #[test]
    fn oci_errors_are_summarised() {
        let body = br#"{"errors":[{"code":"DENIED","message":"no push"}]}"#;
        assert_eq!(summary(&oci_errors(body)), ": DENIED: no push");
        assert!(oci_errors(b"<html>").is_empty());
    }
}
