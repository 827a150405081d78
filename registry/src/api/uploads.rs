//! Blob upload sessions: start (or mount, or monolithic), chunked and streamed PATCH, finish, status, cancel.

use axum::body::Body;
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use berth_oci::{Digest, RepoName};
use futures_util::TryStreamExt;
use serde::Deserialize;

use super::{AppState, HandlerResult, empty, header_value, location};
use crate::auth::Grant;
use crate::content::{ByteStream, ContentError, UploadId};
use crate::error::RegistryError;
use crate::metadata::MetadataError;

#[derive(Deserialize, Default)]
pub(super) struct UploadQuery {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
}

pub(super) fn query(uri: &Uri) -> Result<UploadQuery, RegistryError> {
    Query::<UploadQuery>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| RegistryError::UploadInvalid(format!("query: {e}")))
}

fn parse_digest(text: &str) -> Result<Digest, RegistryError> {
    text.parse()
        .map_err(|e: berth_oci::DigestError| RegistryError::DigestInvalid(e.to_string()))
}

/// The request body as a store stream, counted into the bytes-received metric as it flows.
fn body_stream(state: &AppState, body: Body) -> ByteStream {
    let metrics = state.metrics.clone();
    Box::pin(
        body.into_data_stream()
            .map_err(std::io::Error::other)
            .inspect_ok(move |chunk| metrics.add_received(chunk.len() as u64)),
    )
}

/// The `Range` header value for an upload of `size` bytes, as clients expect it (`0-0` when empty).
fn range_header(size: u64) -> HeaderValue {
    header_value(format_args!("0-{}", size.saturating_sub(1)))
}

fn session_response(
    status: StatusCode,
    repo: &RepoName,
    id: UploadId,
    size: u64,
) -> axum::response::Response {
    empty(
        status,
        [
            (
                "Location",
                location(repo, format_args!("blobs/uploads/{id}")),
            ),
            ("Range", range_header(size)),
            ("Docker-Upload-UUID", header_value(id)),
        ],
    )
}

fn blob_created(repo: &RepoName, digest: &Digest) -> axum::response::Response {
    empty(
        StatusCode::CREATED,
        [
            ("Location", location(repo, format_args!("blobs/{digest}"))),
            ("Docker-Content-Digest", header_value(digest)),
        ],
    )
}

fn content_error(err: ContentError) -> RegistryError {
    match err {
        ContentError::OffsetMismatch { actual, requested } => RegistryError::RangeInvalid(format!(
            "the upload holds {actual} bytes, the chunk starts at {requested}"
        )),
        ContentError::DigestMismatch { expected, actual } => {
            RegistryError::DigestMismatch { expected, actual }
        }
        ContentError::BodyInterrupted(err) => {
            RegistryError::UploadInvalid(format!("the body ended early: {err}"))
        }
        other => other.into(),
    }
}

/// Parses `Content-Range: <start>-<end>` and checks it against `Content-Length`; returns `start`.
fn chunk_start(headers: &HeaderMap) -> Result<Option<u64>, RegistryError> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let invalid =
        || RegistryError::RangeInvalid(format!("Content-Range {value:?} is not <start>-<end>"));
    let text = value.to_str().map_err(|_| invalid())?;
    let text = text
        .trim_start_matches("bytes")
        .trim_start_matches(['=', ' ']);
    let text = text.split('/').next().unwrap_or_default();
    let (start, end) = text.split_once('-').ok_or_else(invalid)?;
    let (start, end) = (
        start.trim().parse::<u64>().map_err(|_| invalid())?,
        end.trim().parse::<u64>().map_err(|_| invalid())?,
    );
    if end < start {
        return Err(invalid());
    }
    // `0-18446744073709551615` is one byte longer than any length can say.
    let chunk = (end - start).checked_add(1);
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if length.is_some_and(|len| Some(len) != chunk) {
        return Err(RegistryError::RangeInvalid(format!(
            "Content-Range {start}-{end} does not match Content-Length"
        )));
    }
    Ok(Some(start))
}

/// Checks that upload `id` exists and belongs to `repo`.
async fn owned_upload(
    state: &AppState,
    repo: &RepoName,
    id: UploadId,
) -> Result<(), RegistryError> {
    match state.metadata.upload_repository(id).await? {
        Some(owner) if &owner == repo => Ok(()),
        _ => Err(RegistryError::UploadUnknown),
    }
}

pub(crate) async fn new_session(
    state: &AppState,
    repo: &RepoName,
) -> Result<UploadId, RegistryError> {
    let id = UploadId::new();
    state.metadata.create_upload(repo, id).await?;
    if let Err(err) = state.content.create_upload(id).await {
        state.metadata.delete_upload(id).await?;
        return Err(err.into());
    }
    state.metrics.upload_started();
    Ok(id)
}

async fn end_session(state: &AppState, id: UploadId) -> Result<(), RegistryError> {
    if state.metadata.delete_upload(id).await? {
        state.metrics.upload_ended();
    }
    Ok(())
}

/// Ends upload session `id` and discards its data.
pub(crate) async fn discard_session(state: &AppState, id: UploadId) -> Result<(), RegistryError> {
    match state.content.delete_upload(id).await {
        Ok(()) | Err(ContentError::UploadUnknown) => {}
        Err(err) => return Err(err.into()),
    }
    end_session(state, id).await
}

/// Commits upload `id` as `digest` and gives `repo` the blob. A digest mismatch ends the session
/// too, since the data is discarded and the client must start over; so does a quota refusal,
/// since no retry can succeed until the scope has room again.
pub(crate) async fn commit(
    state: &AppState,
    repo: &RepoName,
    id: UploadId,
    digest: &Digest,
) -> Result<(), RegistryError> {
    // Asked before the bytes are published, so a full scope usually leaves nothing to collect;
    // the store checks again as it links, which decides between pushes racing for the last room.
    let size = state.content.upload_size(id).await.map_err(content_error)?;
    let _held = state.reservations.hold(digest).await?;
    if let Err(refused) = state.metadata.check_quotas(repo, digest, size).await {
        discard_session(state, id).await?;
        return Err(refused.into());
    }
    match state.content.commit_upload(id, digest).await {
        Ok(size) => {
            // Failing otherwise leaves a published blob unlinked and the session's row behind:
            // the client retries, and the purge of idle sessions removes the row.
            match state.metadata.complete_upload(id, repo, digest, size).await {
                Ok(true) => state.metrics.upload_ended(),
                Ok(false) => {}
                Err(refused @ MetadataError::QuotaExceeded(_)) => {
                    end_session(state, id).await?;
                    return Err(refused.into());
                }
                Err(err) => return Err(err.into()),
            }
            Ok(())
        }
        Err(err @ ContentError::DigestMismatch { .. }) => {
            end_session(state, id).await?;
            Err(content_error(err))
        }
        Err(err) => Err(content_error(err)),
    }
}

/// Repositories a mount without `from` considers when looking for the blob.
const MOUNT_CANDIDATES: u32 = 64;

/// Mounts `digest` into `repo` from `from` or, without `from`, from any repository holding it,
/// either only if the caller may pull the source by a grant of its own: knowing a digest or a
/// name must not let anyone with push somewhere link a layer out of a by-name namespace (an app
/// out of another app's cache). Otherwise the client gets an upload session, as for any blob the
/// registry does not have.
async fn try_mount(
    state: &AppState,
    repo: &RepoName,
    digest: &Digest,
    from: Option<&str>,
    grant: &Grant,
) -> Result<bool, RegistryError> {
    let mut size = None;
    match from {
        Some(from) => {
            if let Ok(from) = from.parse::<RepoName>()
                && grant.pulls_by_grant(&from)
            {
                size = state.metadata.repository_blob(&from, digest).await?;
            }
        }
        None => {
            for owner in state.metadata.blob_owners(digest, MOUNT_CANDIDATES).await? {
                if grant.pulls_by_grant(&owner) {
                    size = state.metadata.repository_blob(&owner, digest).await?;
                    break;
                }
            }
        }
    }
    if size.is_none() || state.content.stat(digest).await?.is_none() {
        return Ok(false);
    }
    Ok(state.metadata.link_blob(repo, digest).await?)
}

pub(super) async fn start(
    state: &AppState,
    repo: &RepoName,
    uri: &Uri,
    body: Body,
    grant: &Grant,
) -> HandlerResult {
    let query = query(uri)?;
    if let Some(mount) = &query.mount {
        let digest = parse_digest(mount)?;
        if try_mount(state, repo, &digest, query.from.as_deref(), grant).await? {
            return Ok(blob_created(repo, &digest));
        }
    }
    let id = new_session(state, repo).await?;
    let Some(digest) = &query.digest else {
        return Ok(session_response(StatusCode::ACCEPTED, repo, id, 0));
    };
    let monolithic = async {
        let digest = parse_digest(digest)?;
        state
            .content
            .append_upload(id, Some(0), body_stream(state, body))
            .await
            .map_err(content_error)?;
        commit(state, repo, id, &digest).await?;
        Ok::<_, RegistryError>(digest)
    };
    match monolithic.await {
        Ok(digest) => Ok(blob_created(repo, &digest)),
        Err(err) => {
            // A monolithic push has no session for the client to resume: leave nothing behind.
            let _ = state.content.delete_upload(id).await;
            if state.metadata.upload_repository(id).await?.is_some() {
                end_session(state, id).await?;
            }
            Err(err)
        }
    }
}

pub(super) async fn patch(
    state: &AppState,
    repo: &RepoName,
    id: UploadId,
    headers: &HeaderMap,
    body: Body,
) -> HandlerResult {
    owned_upload(state, repo, id).await?;
    let start = chunk_start(headers)?;
    let size = state
        .content
        .append_upload(id, start, body_stream(state, body))
        .await
        .map_err(content_error)?;
    Ok(session_response(StatusCode::ACCEPTED, repo, id, size))
}

pub(super) async fn finish(
    state: &AppState,
    repo: &RepoName,
    id: UploadId,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> HandlerResult {
    owned_upload(state, repo, id).await?;
    let digest = query(uri)?
        .digest
        .ok_or_else(|| RegistryError::DigestInvalid("finishing an upload needs ?digest=".into()))?;
    let digest = parse_digest(&digest)?;
    let start = chunk_start(headers)?;
    state
        .content
        .append_upload(id, start, body_stream(state, body))
        .await
        .map_err(content_error)?;
    commit(state, repo, id, &digest).await?;
    Ok(blob_created(repo, &digest))
}

pub(super) async fn status(state: &AppState, repo: &RepoName, id: UploadId) -> HandlerResult {
    owned_upload(state, repo, id).await?;
    let size = state.content.upload_size(id).await?;
    Ok(session_response(StatusCode::NO_CONTENT, repo, id, size))
}

pub(super) async fn cancel(state: &AppState, repo: &RepoName, id: UploadId) -> HandlerResult {
    owned_upload(state, repo, id).await?;
    discard_session(state, id).await?;
    Ok(empty(StatusCode::NO_CONTENT, []))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::api::strategies::{CASES, header_value, range_text};

    #[test]
    fn content_range_takes_start_and_checks_the_length() {
        let headers = |range: &str, length: Option<&str>| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_RANGE, range.parse().unwrap());
            if let Some(length) = length {
                headers.insert(header::CONTENT_LENGTH, length.parse().unwrap());
            }
            headers
        };
        assert_eq!(chunk_start(&HeaderMap::new()).unwrap(), None);
        assert_eq!(chunk_start(&headers("5-9", Some("5"))).unwrap(), Some(5));
        assert_eq!(chunk_start(&headers("bytes=5-9", None)).unwrap(), Some(5));
        assert_eq!(
            chunk_start(&headers("bytes 0-9/10", Some("10"))).unwrap(),
            Some(0)
        );
        let max = u64::MAX;
        for (range, length) in [
            ("5-9", "4"),
            ("9-5", "1"),
            (&format!("0-{max}"), "0"),
            (&format!("0-{max}"), &max.to_string()),
            ("0-18446744073709551616", "1"),
        ] {
            assert!(
                matches!(
                    chunk_start(&headers(range, Some(length))),
                    Err(RegistryError::RangeInvalid(_))
                ),
                "{range} with {length}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn any_content_range_gives_a_start_that_fits_the_length_or_an_error(
            range in prop::option::of(header_value(range_text())),
            length in prop::option::of(prop_oneof![
                (0u64..1000).prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                ".{0,22}",
            ]),
        ) {
            let mut headers = HeaderMap::new();
            if let Some(range) = range {
                headers.insert(header::CONTENT_RANGE, range);
            }
            let length = length.and_then(|l| HeaderValue::from_str(&l).ok());
            if let Some(length) = &length {
                headers.insert(header::CONTENT_LENGTH, length.clone());
            }
            let length = length.and_then(|l| l.to_str().ok()?.parse::<u64>().ok());
            if let (Ok(Some(start)), Some(length)) = (chunk_start(&headers), length) {
                // The chunk's last byte, `start + length - 1`, is a `u64`.
                prop_assert!(length >= 1 && start.checked_add(length - 1).is_some());
            }
        }
    }
}
