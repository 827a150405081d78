//! A WebDAV store, such as Cloud Foundry's internal blobstore (nginx's WebDAV module behind basic
//! auth, which allows `PUT`, `DELETE` and `COPY` but no `MKCOL` or `MOVE`): `GET` with ranges,
//! `HEAD`, `PUT`, `DELETE` and `COPY`, never `PROPFIND`, relying on the server to create a `PUT`'s
//! missing folders (nginx's `create_full_put_path`) and to write each `PUT` to a temporary file it
//! renames into place once the body is whole.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::{Method, StatusCode, header};
use serde::Deserialize;

use super::{ObjectInfo, Objects, SMALL_REQUEST, invalid, read_secret};
use crate::content::{ByteStream, ContentError};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebDavConfig {
    /// The folder objects go under, e.g. `https://blobstore.service.cf.internal:4443/admin/berth`.
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign the server's certificate, beside the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for WebDavConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebDavConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

pub(super) struct WebDav {
    client: reqwest::Client,
    base: reqwest::Url,
    credentials: Option<(String, String)>,
}

fn request_error(err: reqwest::Error) -> ContentError {
    ContentError::Store(Box::new(err))
}

fn status_error(method: &Method, key: &str, status: StatusCode) -> ContentError {
    ContentError::Store(format!("WebDAV {method} {key} answered {status}").into())
}

impl WebDav {
    pub(super) fn new(config: &WebDavConfig) -> Result<Self, ContentError> {
        let mut base = reqwest::Url::parse(&config.url)
            .map_err(|e| invalid(format!("storage.content.webdav.url: {e}")))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let credentials = match (&config.username, &config.password_file) {
            (Some(user), Some(file)) => Some((user.clone(), read_secret(file)?)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "storage.content.webdav: give username and password_file together",
                ));
            }
        };
        // No total timeout: it would cut a long blob download to a slow client mid-stream.
        let client = crate::config::outbound_client_builder(config.ca_file.as_deref())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| invalid(format!("WebDAV client: {e}")))?;
        Ok(WebDav {
            client,
            base,
            credentials,
        })
    }

    fn request(&self, method: Method, key: &str) -> reqwest::RequestBuilder {
        let url = self.base.join(key).expect("object keys are relative paths");
        let request = self.client.request(method, url);
        match &self.credentials {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        }
    }

    async fn send_small(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ContentError> {
        tokio::time::timeout(SMALL_REQUEST, request.send())
            .await
            .map_err(|_| ContentError::Store("WebDAV server did not answer in time".into()))?
            .map_err(request_error)
    }
}

#[async_trait]
impl Objects for WebDav {
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ContentError> {
        let response = self.send_small(self.request(Method::HEAD, key)).await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => {
                // The header, not the body's length: a HEAD answer has no body.
                let size = response
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .ok_or_else(|| {
                        ContentError::Store(format!("WebDAV HEAD {key}: no Content-Length").into())
                    })?;
                let modified = response
                    .headers()
                    .get(header::LAST_MODIFIED)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| httpdate::parse_http_date(v).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                Ok(Some(ObjectInfo { size, modified }))
            }
            status => Err(status_error(&Method::HEAD, key, status)),
        }
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<ByteStream>, ContentError> {
        let mut request = self.request(Method::GET, key);
        if let Some(range) = &range {
            request = request.header(
                header::RANGE,
                format!("bytes={}-{}", range.start, range.end - 1),
            );
        }
        let response = self.send_small(request).await?;
        match response.status() {
            StatusCode::NOT_FOUND => return Ok(None),
            StatusCode::PARTIAL_CONTENT if range.is_some() => {}
            // A server that ignores ranges sends everything: right only if everything was asked.
            StatusCode::OK
                if range.is_none()
                    || range.as_ref().is_some_and(|r| {
                        r.start == 0 && response.content_length() == Some(r.end)
                    }) => {}
            status => return Err(status_error(&Method::GET, key, status)),
        }
        Ok(Some(Box::pin(
            response.bytes_stream().map_err(std::io::Error::other),
        )))
    }

    async fn get_all(&self, key: &str) -> Result<Option<Bytes>, ContentError> {
        let response = self.send_small(self.request(Method::GET, key)).await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => {
                let bytes = tokio::time::timeout(SMALL_REQUEST, response.bytes())
                    .await
                    .map_err(|_| ContentError::Store("WebDAV body did not arrive in time".into()))?
                    .map_err(request_error)?;
                Ok(Some(bytes))
            }
            status => Err(status_error(&Method::GET, key, status)),
        }
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ContentError> {
        // Said even when 0: without the header an empty body is no body to nginx, which then
        // refuses the PUT ("request body must be in a file").
        let length = bytes.len();
        let response = self
            .send_small(
                self.request(Method::PUT, key)
                    .header(header::CONTENT_LENGTH, length)
                    .body(bytes),
            )
            .await?;
        match response.status() {
            status if status.is_success() => Ok(()),
            status => Err(status_error(&Method::PUT, key, status)),
        }
    }

    async fn put_stream(&self, key: &str, body: ByteStream) -> Result<u64, ContentError> {
        let sent = Arc::new(AtomicU64::new(0));
        let counted = {
            let sent = sent.clone();
            body.inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            })
        };
        let response = self
            .request(Method::PUT, key)
            .body(reqwest::Body::wrap_stream(counted))
            .send()
            .await
            .map_err(request_error)?;
        match response.status() {
            status if status.is_success() => Ok(sent.load(Ordering::Relaxed)),
            status => Err(status_error(&Method::PUT, key, status)),
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<(), ContentError> {
        let destination = self.base.join(to).expect("object keys are relative paths");
        let copy = Method::from_bytes(b"COPY").expect("COPY is a method name");
        // The server copies on its side; a large blob takes a while, so no small-request deadline.
        let response = self
            .request(copy.clone(), from)
            .header("Destination", destination.as_str())
            .header("Overwrite", "T")
            .send()
            .await
            .map_err(request_error)?;
        match response.status() {
            status if status.is_success() => Ok(()),
            // A server without COPY, or (nginx) one whose COPY cannot create the destination's
            // folder, which only a PUT creates: stream the bytes through once.
            StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED
            | StatusCode::CONFLICT
            | StatusCode::INTERNAL_SERVER_ERROR => {
                let body = self.get(from, None).await?.ok_or_else(|| {
                    ContentError::Store(format!("WebDAV copy source {from} is missing").into())
                })?;
                self.put_stream(to, body).await.map(drop)
            }
            status => Err(status_error(&copy, from, status)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ContentError> {
        let response = self.send_small(self.request(Method::DELETE, key)).await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(()),
            status if status.is_success() => Ok(()),
            status => Err(status_error(&Method::DELETE, key, status)),
        }
    }
}
