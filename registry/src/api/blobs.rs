//! Blob pull (whole or by single byte range) and delete.

use std::ops::Range;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse};
use berth_oci::{Digest, RepoName};

use super::{AppState, HandlerResult, empty, header_value};
use crate::error::RegistryError;
use crate::proxy::{Served, fetch_blob};
use crate::server::FileSender;

/// Parses a single `bytes=` range against a blob of `size` bytes. `Ok(None)` means serve it whole
/// (no header, or a multi-range request, which HTTP lets a server answer with the whole body).
fn byte_range(header: Option<&str>, size: u64) -> Result<Option<Range<u64>>, RegistryError> {
    let Some(spec) = header else { return Ok(None) };
    let unsatisfiable =
        || RegistryError::RangeNotSatisfiable(format!("{spec} is outside 0-{size}"));
    let Some(spec) = spec.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (start, end) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let number = |s: &str| s.trim().parse::<u64>().map_err(|_| unsatisfiable());
    let range = match (start.trim().is_empty(), end.trim().is_empty()) {
        (true, false) => {
            let suffix = number(end)?.min(size);
            if suffix == 0 {
                return Err(unsatisfiable());
            }
            size - suffix..size
        }
        (false, true) => number(start)?..size,
        (false, false) => number(start)?..number(end)?.saturating_add(1).min(size),
        (true, true) => return Err(unsatisfiable()),
    };
    if range.start >= size || range.start >= range.end {
        return Err(unsatisfiable());
    }
    Ok(Some(range))
}

/// Smallest body worth `sendfile`: below it, one `writev` of headers and bytes is cheaper than a
/// write for the headers and a `sendfile` for the bytes.
const SENDFILE_MIN: u64 = 64 << 10;

/// Serves a blob, or its headers for `head`. `file_sender` is set when the connection can take
/// the bytes straight from a file (plain HTTP/1).
pub(super) async fn get(
    state: &Arc<AppState>,
    repo: &RepoName,
    digest: &Digest,
    headers: &HeaderMap,
    head: bool,
    file_sender: Option<&FileSender>,
) -> HandlerResult {
    let size = state
        .metadata
        .repository_blob(repo, digest)
        .await?
        .ok_or_else(|| RegistryError::BlobUnknown(Some(digest.clone())))?;
    // A proxied blob is recorded from its manifest before its bytes are here; a HEAD answers
    // from that record, a GET fetches them now.
    let mut fetched = None;
    if !head
        && let Some(mirror) = state.proxy.mirror(repo)
        && state.content.stat(digest).await?.is_none()
        && let Served::Streaming(body) = fetch_blob(state, mirror, repo, digest, size).await?
    {
        fetched = Some(body);
    }
    if !head
        && fetched.is_none()
        && let Some(url) = state.content.redirect_url(digest).await?
    {
        // The client follows with its Range, if any, straight to the store.
        let headers = [
            (header::LOCATION, header_value(url)),
            (
                HeaderName::from_static("docker-content-digest"),
                header_value(digest),
            ),
        ];
        return Ok((StatusCode::TEMPORARY_REDIRECT, headers).into_response());
    }
    // The body of a download in progress is the whole blob; HTTP lets a server ignore Range.
    let requested = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| fetched.is_none());
    let range = match byte_range(requested, size) {
        Ok(range) => range,
        Err(err) => {
            let mut response = err.into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(format_args!("bytes */{size}")),
            );
            return Ok(response);
        }
    };
    let (status, span) = match &range {
        Some(range) => (StatusCode::PARTIAL_CONTENT, range.clone()),
        None => (StatusCode::OK, 0..size),
    };
    let mut headers = vec![
        (
            header::CONTENT_TYPE,
            header_value("application/octet-stream"),
        ),
        (header::CONTENT_LENGTH, header_value(span.end - span.start)),
        (
            HeaderName::from_static("docker-content-digest"),
            header_value(digest),
        ),
        (header::ACCEPT_RANGES, header_value("bytes")),
        (header::ETAG, header_value(format_args!("\"{digest}\""))),
        (header::CACHE_CONTROL, header_value("max-age=31536000")),
    ];
    if range.is_some() {
        headers.push((
            header::CONTENT_RANGE,
            header_value(format_args!("bytes {}-{}/{size}", span.start, span.end - 1)),
        ));
    }
    if head {
        return Ok((status, AppendHeaders(headers), Body::empty()).into_response());
    }
    if let Some(body) = fetched {
        return Ok((status, AppendHeaders(headers), body).into_response());
    }
    let len = span.end - span.start;
    let file = match file_sender.filter(|_| len >= SENDFILE_MIN) {
        Some(sender) => state
            .content
            .open_file(digest)
            .await?
            .map(|file| (sender, file)),
        None => None,
    };
    let body = match file {
        Some((sender, file)) => {
            state.metrics.add_sent_from_file(len);
            Body::from_stream(sender.body(file, span))
        }
        None => Body::from_stream(state.content.read(digest, span).await?),
    };
    Ok((status, AppendHeaders(headers), body).into_response())
}

pub(super) async fn delete(state: &AppState, repo: &RepoName, digest: &Digest) -> HandlerResult {
    if !state.metadata.unlink_blob(repo, digest).await? {
        return Err(RegistryError::BlobUnknown(Some(digest.clone())));
    }
    Ok(empty(StatusCode::ACCEPTED, []))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_http_semantics() {
        assert_eq!(byte_range(None, 10).unwrap(), None);
        assert_eq!(byte_range(Some("bytes=0-3"), 10).unwrap(), Some(0..4));
        assert_eq!(byte_range(Some("bytes=5-"), 10).unwrap(), Some(5..10));
        assert_eq!(byte_range(Some("bytes=-3"), 10).unwrap(), Some(7..10));
        assert_eq!(
            byte_range(Some("bytes=8-100"), 10).unwrap(),
            Some(8..10),
            "end is clamped"
        );
        assert_eq!(
            byte_range(Some("bytes=0-1,4-5"), 10).unwrap(),
            None,
            "multi-range gets the whole blob"
        );
        for bad in ["bytes=10-", "bytes=5-2", "bytes=-0", "bytes=x-1", "bytes=-"] {
            assert!(
                matches!(
                    byte_range(Some(bad), 10),
                    Err(RegistryError::RangeNotSatisfiable(_))
                ),
                "{bad}"
            );
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::api::strategies::{CASES, range_text};

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            #[test]
            fn any_range_header_gives_a_range_inside_the_blob_or_an_error(
                header in prop::option::of(range_text()),
                size in prop_oneof![0u64..100, any::<u64>(), Just(u64::MAX)],
            ) {
                if let Ok(Some(range)) = byte_range(header.as_deref(), size) {
                    prop_assert!(range.start < range.end && range.end <= size, "{range:?} of {size}");
                }
            }
        }
    }
}
