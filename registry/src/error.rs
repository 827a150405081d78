//! The registry's one error type and its mapping to the OCI error JSON.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_oci::{Digest, NameError};

use crate::content::ContentError;
use crate::metadata::MetadataError;
use crate::proxy::UpstreamError;
use crate::quota::QuotaExceeded;

/// Everything a request can fail with. Each variant maps to exactly one OCI error code and status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry")]
    BlobUnknown(Option<Digest>),
    #[error("blob upload unknown to registry")]
    UploadUnknown,
    #[error("blob upload invalid: {0}")]
    UploadInvalid(String),
    #[error("chunk does not continue the upload: {0}")]
    RangeInvalid(String),
    #[error("requested range not satisfiable: {0}")]
    RangeNotSatisfiable(String),
    #[error("provided digest did not match uploaded content")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("digest invalid: {0}")]
    DigestInvalid(String),
    #[error("manifest unknown")]
    ManifestUnknown(String),
    /// The manifest exists, but not in a form the client's `Accept` header names.
    #[error("{reason}")]
    ManifestNotAccepted {
        reference: String,
        media_type: String,
        reason: String,
    },
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest references a blob or manifest unknown to this repository")]
    ManifestBlobUnknown(Digest),
    #[error("manifest is larger than {limit} bytes")]
    ManifestTooLarge { limit: usize },
    #[error("{0}")]
    NameInvalid(NameError),
    #[error("repository name not known to registry")]
    NameUnknown(String),
    #[error("{0}")]
    TagInvalid(NameError),
    #[error("{0}")]
    Unsupported(String),
    #[error("method not allowed; the Allow header lists what this path takes")]
    MethodNotAllowed {
        /// The `Allow` value, unless the router adds it itself.
        allow: Option<&'static str>,
    },
    #[error("not found")]
    NotFound,
    #[error("{message}")]
    Unauthorized {
        /// The `WWW-Authenticate` value telling the client how to authenticate.
        challenge: HeaderValue,
        message: &'static str,
    },
    #[error("requested access to the resource is denied")]
    Denied,
    #[error("{0}")]
    QuotaExceeded(QuotaExceeded),
    #[error("too many failed logins from this address; try again in a minute")]
    TooManyRequests,
    /// Another instance is doing this work now.
    #[error("{0}")]
    Busy(&'static str),
    /// A store this instance depends on does not answer: load balancers should take it out.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
    /// A write into a pull-through cache's prefix, which only its upstream fills.
    #[error("{0} mirrors an upstream registry through the pull-through cache; it is read-only")]
    ProxiedReadOnly(String),
    /// An upstream of the pull-through cache failed to give what was asked.
    #[error("{0}")]
    Upstream(#[from] crate::proxy::UpstreamError),
    /// The download of a blob from an upstream, which this request waited for, failed.
    #[error("the blob's download from the upstream failed: {0}")]
    BlobFetchFailed(String),
    #[error("storage: {0}")]
    Content(#[from] ContentError),
    #[error("metadata: {0}")]
    Metadata(#[source] MetadataError),
}

impl From<MetadataError> for RegistryError {
    fn from(err: MetadataError) -> Self {
        match err {
            MetadataError::QuotaExceeded(refusal) => RegistryError::QuotaExceeded(refusal),
            other => RegistryError::Metadata(other),
        }
    }
}

impl From<NameError> for RegistryError {
    fn from(err: NameError) -> Self {
        match err {
            NameError::Name => RegistryError::NameInvalid(err),
            NameError::Tag | NameError::Reference => RegistryError::TagInvalid(err),
        }
    }
}

impl RegistryError {
    fn code_and_status(&self) -> (&'static str, StatusCode) {
        use RegistryError::*;
        match self {
            BlobUnknown(_) => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            UploadUnknown => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
            UploadInvalid(_) => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST),
            RangeInvalid(_) => ("BLOB_UPLOAD_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
            RangeNotSatisfiable(_) => ("UNSUPPORTED", StatusCode::RANGE_NOT_SATISFIABLE),
            DigestMismatch { .. } | DigestInvalid(_) => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            // Distribution answers a client that cannot read the manifest as if it did not exist.
            ManifestUnknown(_) | ManifestNotAccepted { .. } => {
                ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND)
            }
            ManifestInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestBlobUnknown(_) => ("MANIFEST_BLOB_UNKNOWN", StatusCode::BAD_REQUEST),
            ManifestTooLarge { .. } => ("SIZE_INVALID", StatusCode::PAYLOAD_TOO_LARGE),
            NameInvalid(_) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            NameUnknown(_) => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            // The OCI spec allows only its own codes and has none for a malformed tag; Docker's
            // TAG_INVALID is outside them.
            TagInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            Unsupported(_) => ("UNSUPPORTED", StatusCode::BAD_REQUEST),
            MethodNotAllowed { .. } => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            // A path outside the API: the spec has no code for it, UNSUPPORTED is the nearest.
            NotFound => ("UNSUPPORTED", StatusCode::NOT_FOUND),
            Unauthorized { .. } => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
            Denied | QuotaExceeded(_) => ("DENIED", StatusCode::FORBIDDEN),
            TooManyRequests => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            // DENIED rather than 405 UNSUPPORTED: the method is fine, this repository is not
            // writable, and clients print DENIED's message instead of retrying.
            ProxiedReadOnly(_) => ("DENIED", StatusCode::FORBIDDEN),
            Upstream(UpstreamError::RateLimited { .. }) => {
                ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS)
            }
            // The upstream failing is a gateway's failure; down or overloaded it may recover.
            Upstream(UpstreamError::Unreachable { .. }) => {
                ("UNKNOWN", StatusCode::SERVICE_UNAVAILABLE)
            }
            Upstream(UpstreamError::Status { status, .. }) if *status >= 500 => {
                ("UNKNOWN", StatusCode::SERVICE_UNAVAILABLE)
            }
            Upstream(_) | BlobFetchFailed(_) => ("UNKNOWN", StatusCode::BAD_GATEWAY),
            Unhealthy(_) | Busy(_) => ("UNKNOWN", StatusCode::SERVICE_UNAVAILABLE),
            Content(ContentError::UploadUnknown) => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
            Content(ContentError::BlobUnknown) => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            Content(ContentError::StorageFull) => ("UNKNOWN", StatusCode::INSUFFICIENT_STORAGE),
            Metadata(err) if err.is_storage_full() => ("UNKNOWN", StatusCode::INSUFFICIENT_STORAGE),
            // The bytes were being deleted as they were pushed again: a retry writes them anew.
            Metadata(MetadataError::BeingCollected(_)) => {
                ("UNKNOWN", StatusCode::SERVICE_UNAVAILABLE)
            }
            // Shared object storage or the shared database failing is usually brief: the
            // client's retry may well succeed.
            Content(ContentError::Store(_)) => ("UNKNOWN", StatusCode::SERVICE_UNAVAILABLE),
            Metadata(err) if err.is_unavailable() => ("UNKNOWN", StatusCode::SERVICE_UNAVAILABLE),
            Content(_) | Metadata(_) => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    fn detail(&self) -> serde_json::Value {
        use RegistryError::*;
        match self {
            BlobUnknown(Some(digest)) | ManifestBlobUnknown(digest) => {
                serde_json::json!({ "digest": digest })
            }
            DigestMismatch { expected, actual } => {
                serde_json::json!({ "expected": expected, "actual": actual })
            }
            ManifestUnknown(reference) => serde_json::json!({ "reference": reference }),
            ManifestNotAccepted {
                reference,
                media_type,
                ..
            } => serde_json::json!({ "reference": reference, "mediaType": media_type }),
            NameUnknown(name) => serde_json::json!({ "name": name }),
            ManifestTooLarge { limit } => serde_json::json!({ "limit": limit }),
            QuotaExceeded(refusal) => serde_json::json!(refusal),
            _ => serde_json::Value::Null,
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        // Internal failures are logged with their cause once, here; the client sees only the code.
        let message = if let RegistryError::Upstream(_) | RegistryError::BlobFetchFailed(_) = &self
        {
            // Says which upstream failed and how, never with what credentials.
            tracing::warn!(error = %self, "upstream request failed");
            self.to_string()
        } else if status == StatusCode::INSUFFICIENT_STORAGE {
            tracing::error!(error = %self, "request failed");
            "the registry's storage is full".to_owned()
        } else if let RegistryError::Metadata(MetadataError::BeingCollected(_)) = &self {
            "the content was being garbage-collected as it was pushed; retry".to_owned()
        } else if let RegistryError::Unhealthy(_) | RegistryError::Busy(_) = &self {
            self.to_string()
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
            match &self {
                RegistryError::Content(_) => "the registry's object storage is unavailable; retry",
                _ => "the registry's database is unreachable; retry",
            }
            .to_owned()
        } else if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
            "internal storage error".to_owned()
        } else {
            self.to_string()
        };
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": message, "detail": self.detail() }]
        });
        let mut response = (status, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let upstream_failed = matches!(
            self,
            RegistryError::Upstream(_) | RegistryError::BlobFetchFailed(_)
        );
        if status.is_server_error() && !upstream_failed {
            response.extensions_mut().insert(StorageFailure);
        }
        match self {
            RegistryError::Unauthorized { challenge, .. } => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge);
            }
            // The client sees the upstream's limit as if it had asked the upstream itself: the
            // cacher reports it in the staging log.
            RegistryError::Upstream(UpstreamError::RateLimited {
                limit,
                remaining,
                retry_after,
                ..
            }) => {
                let headers = response.headers_mut();
                if let Some(seconds) = retry_after {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                for (name, value) in [
                    ("ratelimit-limit", limit),
                    ("ratelimit-remaining", remaining),
                ] {
                    if let Some(value) =
                        value.as_deref().and_then(|v| HeaderValue::from_str(v).ok())
                    {
                        headers.insert(name, value);
                    }
                }
            }
            RegistryError::MethodNotAllowed { allow: Some(allow) } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        response
    }
}

/// Marks a response that failed inside a store, so the request middleware can count it.
#[derive(Debug, Clone, Copy)]
pub struct StorageFailure;

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_failure(code: std::ffi::c_int) -> RegistryError {
        let failure = rusqlite::ffi::Error::new(code);
        RegistryError::Metadata(MetadataError::Database(rusqlite::Error::SqliteFailure(
            failure, None,
        )))
    }

    #[tokio::test]
    async fn a_quota_refusal_is_denied_with_its_figures() {
        let refusal = crate::quota::QuotaExceeded {
            quota: "cache".into(),
            scope: "cache".into(),
            max_bytes: 100,
            used_bytes: 90,
            needed_bytes: 20,
        };
        let response =
            RegistryError::from(MetadataError::QuotaExceeded(refusal.clone())).into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let error = &body["errors"][0];
        assert_eq!(error["code"], "DENIED");
        assert_eq!(error["message"], refusal.to_string());
        assert_eq!(error["detail"]["used_bytes"], 90);
    }

    #[test]
    fn a_full_disk_is_507_whichever_store_hits_it() {
        let content =
            RegistryError::Content(ContentError::from_io(std::io::Error::from_raw_os_error(28)));
        for err in [content, sqlite_failure(rusqlite::ffi::SQLITE_FULL)] {
            assert_eq!(
                err.into_response().status(),
                StatusCode::INSUFFICIENT_STORAGE
            );
        }
        let busy = sqlite_failure(rusqlite::ffi::SQLITE_BUSY);
        assert_eq!(
            busy.into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[tokio::test]
    async fn an_unreachable_database_is_503_and_a_failed_statement_500() {
        let refused = RegistryError::from(MetadataError::Sql(sqlx::Error::Io(
            std::io::ErrorKind::ConnectionRefused.into(),
        )));
        let response = refused.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errors"][0]["code"], "UNKNOWN");
        assert_eq!(
            body["errors"][0]["message"],
            "the registry's database is unreachable; retry"
        );
        let timed_out = RegistryError::from(MetadataError::Sql(sqlx::Error::PoolTimedOut));
        assert_eq!(
            timed_out.into_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let busy = RegistryError::from(MetadataError::Sql(sqlx::Error::RowNotFound));
        assert_eq!(
            busy.into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
