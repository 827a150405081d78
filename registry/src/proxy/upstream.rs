//! The client for one upstream registry: manifest `HEAD`/`GET` and blob `GET`, logged in with Basic or Bearer tokens as the upstream asks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use berth_oci::{Challenge, Digest};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Method, RequestBuilder, Response};
use serde::Deserialize;

use super::config::{Credentials, UpstreamConfig};
use crate::config::ConfigError;
use crate::metrics::Metrics;

/// Why an upstream did not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream} unreachable: {source}")]
    Unreachable {
        upstream: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("upstream {upstream} answered {status}")]
    Status { upstream: String, status: u16 },
    /// 429: the upstream's pull limit is spent for now.
    #[error(
        "upstream {upstream} rate limit reached (limit {}, remaining {}, retry after {})",
        or_unknown(limit.as_deref()),
        or_unknown(remaining.as_deref()),
        retry_after.map_or_else(|| "unknown".to_owned(), |s| format!("{s} s"))
    )]
    RateLimited {
        upstream: String,
        limit: Option<String>,
        remaining: Option<String>,
        retry_after: Option<u64>,
    },
    #[error(
        "upstream {upstream} refused the configured credentials (or anonymous access): {reason}"
    )]
    Unauthorized { upstream: String, reason: String },
    #[error("upstream {upstream} has no such {what}")]
    NotFound { upstream: String, what: String },
    #[error("upstream {upstream} sent content for {expected} that hashes to {actual}")]
    DigestMismatch {
        upstream: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("upstream {upstream} sent an unusable answer: {reason}")]
    Invalid { upstream: String, reason: String },
}

/// A header the upstream may leave out, for a message.
fn or_unknown(value: Option<&str>) -> &str {
    value.unwrap_or("unknown")
}

impl UpstreamError {
    /// The HTTP status (or `unreachable`) for the warning line.
    pub fn status_text(&self) -> String {
        match self {
            UpstreamError::Unreachable { .. } => "unreachable".into(),
            UpstreamError::Status { status, .. } => status.to_string(),
            UpstreamError::RateLimited { .. } => "429".into(),
            UpstreamError::Unauthorized { .. } => "401".into(),
            UpstreamError::NotFound { .. } => "404".into(),
            UpstreamError::DigestMismatch { .. } | UpstreamError::Invalid { .. } => {
                "invalid".into()
            }
        }
    }
}

/// The manifest types the cache asks for: all it can store, so it keeps what the upstream has
/// byte for byte, and answers each client as its own `Accept` allows.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// How long an upstream may take to answer a request's head; bodies run as long as they flow.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Token lifetime when the token service does not say (the distribution spec's default).
const DEFAULT_TOKEN_SECONDS: u64 = 60;

/// A manifest as the upstream sent it, its digest checked.
#[derive(Debug)]
pub struct FetchedManifest {
    pub digest: Digest,
    pub media_type: Option<String>,
    pub bytes: Bytes,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// How requests to a repository of the upstream are authorized, as learnt from its challenges.
#[derive(Clone)]
enum Login {
    Basic,
    Bearer { token: String, until: Instant },
}

pub struct Upstream {
    /// The local prefix, which also names the upstream in logs and metrics.
    pub prefix: String,
    base: url::Url,
    docker_hub: bool,
    pub revalidate_after: Duration,
    credentials: Option<Credentials>,
    client: reqwest::Client,
    /// Per upstream repository: tokens are scoped to one.
    logins: Mutex<HashMap<String, Login>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("prefix", &self.prefix)
            .field("base", &self.base.as_str())
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, ConfigError> {
        let client = crate::config::outbound_client_builder(config.ca_file.as_deref())?
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ConfigError::Invalid(format!("proxy {}: client: {e}", config.prefix)))?;
        let base = url::Url::parse(&config.url)
            .map_err(|e| ConfigError::Invalid(format!("proxy {}: url: {e}", config.prefix)))?;
        Ok(Upstream {
            prefix: config.prefix.clone(),
            base,
            docker_hub: config.docker_hub,
            revalidate_after: config.revalidate_after(),
            credentials: config.credentials()?,
            client,
            logins: Mutex::default(),
        })
    }

    /// The upstream's name for the repository `name` (the local name without the prefix).
    pub fn remote_name(&self, name: &str) -> String {
        if self.docker_hub && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_owned()
        }
    }

    /// The digest the upstream's tag (or digest) `reference` of `remote` names now, by `HEAD`,
    /// which Docker Hub does not count as a pull.
    pub async fn head_manifest(
        &self,
        metrics: &Metrics,
        remote: &str,
        reference: &str,
    ) -> Result<Digest, UpstreamError> {
        metrics.proxy_manifest_request(&self.prefix, "HEAD");
        let response = self
            .send(
                metrics,
                Method::HEAD,
                remote,
                &format!("manifests/{reference}"),
            )
            .await?;
        let response = self.check(response, || format!("manifest {remote}:{reference}"))?;
        content_digest(response.headers())
            .ok_or_else(|| self.invalid("a manifest HEAD without Docker-Content-Digest"))
    }

    /// The manifest `reference` of `remote`, read up to `limit` bytes and checked against the
    /// digest asked for (by digest) or the one the upstream declares (by tag).
    pub async fn get_manifest(
        &self,
        metrics: &Metrics,
        remote: &str,
        reference: &str,
        limit: usize,
    ) -> Result<FetchedManifest, UpstreamError> {
        metrics.proxy_manifest_request(&self.prefix, "GET");
        let response = self
            .send(
                metrics,
                Method::GET,
                remote,
                &format!("manifests/{reference}"),
            )
            .await?;
        let response = self.check(response, || format!("manifest {remote}:{reference}"))?;
        let declared = content_digest(response.headers());
        let media_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = response.bytes_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| self.unreachable(source))?;
            if bytes.len() + chunk.len() > limit {
                return Err(self.invalid(&format!("a manifest larger than {limit} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        let expected = match reference.parse::<Digest>() {
            Ok(asked) => asked,
            Err(_) => declared.unwrap_or_else(|| Digest::sha256_of(&bytes)),
        };
        let actual = expected.same_algorithm_of(&bytes);
        if actual != expected {
            return Err(UpstreamError::DigestMismatch {
                upstream: self.prefix.clone(),
                expected,
                actual,
            });
        }
        Ok(FetchedManifest {
            digest: actual,
            media_type,
            bytes: bytes.into(),
        })
    }

    /// Starts the download of blob `digest` of `remote`; the caller reads the body.
    pub async fn get_blob(
        &self,
        metrics: &Metrics,
        remote: &str,
        digest: &Digest,
    ) -> Result<Response, UpstreamError> {
        let response = self
            .send(metrics, Method::GET, remote, &format!("blobs/{digest}"))
            .await?;
        self.check(response, || format!("blob {digest} in {remote}"))
    }

    /// Sends a request about `remote`, logging in as its challenge asks and trying once more.
    async fn send(
        &self,
        metrics: &Metrics,
        method: Method,
        remote: &str,
        path: &str,
    ) -> Result<Response, UpstreamError> {
        let url = self
            .base
            .join(&format!("v2/{remote}/{path}"))
            .map_err(|e| self.invalid(&format!("url: {e}")))?;
        let request = || {
            self.client
                .request(method.clone(), url.clone())
                .header(header::ACCEPT, ACCEPT)
        };
        let login = self.login_for(remote);
        let response = self
            .execute(metrics, self.authorize(request(), login.as_ref()))
            .await?;
        if response.status() != StatusCode::UNAUTHORIZED
            || login.as_ref().is_some_and(|l| matches!(l, Login::Basic))
        {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse)
            .ok_or_else(|| self.unauthorized("no usable WWW-Authenticate challenge".into()))?;
        let login = self.log_in(metrics, remote, challenge).await?;
        self.logins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(remote.to_owned(), login.clone());
        self.execute(metrics, self.authorize(request(), Some(&login)))
            .await
    }

    async fn execute(
        &self,
        metrics: &Metrics,
        request: RequestBuilder,
    ) -> Result<Response, UpstreamError> {
        let response = tokio::time::timeout(HEAD_TIMEOUT, request.send())
            .await
            .map_err(|_| UpstreamError::Status {
                upstream: self.prefix.clone(),
                status: StatusCode::GATEWAY_TIMEOUT.as_u16(),
            })?
            .map_err(|source| self.unreachable(source))?;
        if let Some(remaining) = header_text(response.headers(), "ratelimit-remaining")
            .as_deref()
            .and_then(rate_limit_count)
        {
            metrics.proxy_rate_limit_remaining(&self.prefix, remaining);
        }
        Ok(response)
    }

    fn login_for(&self, remote: &str) -> Option<Login> {
        let logins = self
            .logins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match logins.get(remote)? {
            Login::Bearer { until, .. } if *until <= Instant::now() => None,
            login => Some(login.clone()),
        }
    }

    fn authorize(&self, request: RequestBuilder, login: Option<&Login>) -> RequestBuilder {
        match (login, &self.credentials) {
            (Some(Login::Bearer { token, .. }), _) => request.bearer_auth(token),
            (Some(Login::Basic), Some(credentials)) => {
                request.basic_auth(&credentials.username, Some(&credentials.password))
            }
            _ => request,
        }
    }

    /// Answers `challenge`: Basic needs configured credentials; Bearer asks the token service,
    /// with the credentials if there are any, anonymously otherwise.
    async fn log_in(
        &self,
        metrics: &Metrics,
        remote: &str,
        challenge: Challenge,
    ) -> Result<Login, UpstreamError> {
        let (realm, service, scope) = match challenge {
            Challenge::Basic if self.credentials.is_some() => return Ok(Login::Basic),
            Challenge::Basic => {
                return Err(
                    self.unauthorized("it asks for a password and none is configured".into())
                );
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => (realm, service, scope),
        };
        let mut url = url::Url::parse(&realm)
            .map_err(|e| self.unauthorized(format!("token realm {realm:?}: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = &service {
                query.append_pair("service", service);
            }
            query.append_pair(
                "scope",
                &scope.unwrap_or_else(|| format!("repository:{remote}:pull")),
            );
        }
        let mut request = self.client.get(url);
        if let Some(credentials) = &self.credentials {
            request = request.basic_auth(&credentials.username, Some(&credentials.password));
        }
        let response = self.execute(metrics, request).await?;
        if !response.status().is_success() {
            return Err(
                self.unauthorized(format!("the token service answered {}", response.status()))
            );
        }
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|e| self.unauthorized(format!("token answer: {e}")))?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unauthorized("the token answer holds no token".into()))?;
        // Renewed a little early, so a token never expires between check and use.
        let lifetime = answer
            .expires_in
            .unwrap_or(DEFAULT_TOKEN_SECONDS)
            .saturating_sub(5);
        Ok(Login::Bearer {
            token,
            until: Instant::now() + Duration::from_secs(lifetime),
        })
    }

    /// The response if it is a success, else the error it stands for.
    fn check(
        &self,
        response: Response,
        what: impl Fn() -> String,
    ) -> Result<Response, UpstreamError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let headers = response.headers();
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS => UpstreamError::RateLimited {
                upstream: self.prefix.clone(),
                limit: header_text(headers, "ratelimit-limit"),
                remaining: header_text(headers, "ratelimit-remaining"),
                retry_after: header_text(headers, "retry-after")
                    .and_then(|v| v.trim().parse().ok()),
            },
            StatusCode::NOT_FOUND => UpstreamError::NotFound {
                upstream: self.prefix.clone(),
                what: what(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                self.unauthorized(format!("it answered {status}"))
            }
            _ => UpstreamError::Status {
                upstream: self.prefix.clone(),
                status: status.as_u16(),
            },
        })
    }

    fn unreachable(&self, source: reqwest::Error) -> UpstreamError {
        UpstreamError::Unreachable {
            upstream: self.prefix.clone(),
            source,
        }
    }

    fn unauthorized(&self, reason: String) -> UpstreamError {
        UpstreamError::Unauthorized {
            upstream: self.prefix.clone(),
            reason,
        }
    }

    fn invalid(&self, reason: &str) -> UpstreamError {
        UpstreamError::Invalid {
            upstream: self.prefix.clone(),
            reason: reason.to_owned(),
        }
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

fn content_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The count in a `ratelimit-limit` or `ratelimit-remaining` value such as `95;w=21600`.
pub(super) fn rate_limit_count(value: &str) -> Option<u64> {
    value.split(';').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use berth_oci::media_type;

    use super::*;

    /// Whether `media_type` is one the cache asks upstreams for.
    fn asked_for(media_type: &str) -> bool {
        ACCEPT.split(',').any(|t| t.trim() == media_type)
    }

    #[test]
    fn rate_limit_headers_give_their_count() {
        assert_eq!(rate_limit_count("95;w=21600"), Some(95));
        assert_eq!(rate_limit_count(" 0 ;w=21600"), Some(0));
        assert_eq!(rate_limit_count("100"), Some(100));
        assert_eq!(rate_limit_count(""), None);
        assert_eq!(rate_limit_count("many;w=1"), None);
    }

    #[test]
    fn docker_hub_names_gain_library() {
        let mut config = UpstreamConfig::hub("hub");
        let hub = Upstream::new(&config).unwrap();
        assert_eq!(hub.remote_name("alpine"), "library/alpine");
        assert_eq!(hub.remote_name("library/alpine"), "library/alpine");
        assert_eq!(hub.remote_name("bitnami/redis"), "bitnami/redis");
        config.docker_hub = false;
        assert_eq!(
            Upstream::new(&config).unwrap().remote_name("alpine"),
            "alpine"
        );
    }

    #[test]
    fn every_stored_manifest_type_is_asked_for() {
        for media_type in [
            media_type::OCI_INDEX,
            media_type::OCI_MANIFEST,
            media_type::DOCKER_MANIFEST,
            media_type::DOCKER_MANIFEST_LIST,
        ] {
            assert!(asked_for(media_type), "{media_type}");
        }
    }
}
