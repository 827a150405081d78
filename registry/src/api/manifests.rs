//! Manifest pull, push and delete.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use berth_oci::{Digest, Reference, RepoName};
use bytes::Bytes;

use super::{AppState, HandlerResult, empty, header_value, location};
use crate::error::RegistryError;
use crate::metadata::MetadataError;

pub(super) async fn get(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
    head: bool,
) -> HandlerResult {
    let info = state
        .metadata
        .manifest(repo, reference)
        .await?
        .ok_or_else(|| RegistryError::ManifestUnknown(reference.to_string()))?;
    let headers = [
        (header::CONTENT_TYPE, header_value(&info.media_type)),
        (header::CONTENT_LENGTH, header_value(info.size)),
        (
            header::HeaderName::from_static("docker-content-digest"),
            header_value(&info.digest),
        ),
        (
            header::ETAG,
            header_value(format_args!("\"{}\"", info.digest)),
        ),
    ];
    if head {
        return Ok((headers, Body::empty()).into_response());
    }
    let bytes = match state.manifest_bytes.get(&info.digest) {
        Some(bytes) => bytes,
        None => {
            let bytes = state.content.read_all(&info.digest).await?;
            state
                .manifest_bytes
                .insert(info.digest.clone(), bytes.clone());
            bytes
        }
    };
    Ok((headers, bytes).into_response())
}

async fn read_limited(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, RegistryError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(RegistryError::ManifestTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let too_large = std::error::Error::source(&err)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            RegistryError::ManifestTooLarge { limit }
        } else {
            RegistryError::ManifestInvalid(format!("could not read the manifest body: {err}"))
        }
    })
}

pub(super) async fn put(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    body: Body,
) -> HandlerResult {
    let bytes = read_limited(body, headers, state.limits.max_manifest_bytes).await?;
    state.metrics.add_received(bytes.len() as u64);
    let digest = match reference {
        Reference::Digest(expected) => {
            let actual = expected.same_algorithm_of(&bytes);
            if &actual != expected {
                return Err(RegistryError::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
            actual
        }
        Reference::Tag(_) => Digest::sha256_of(&bytes),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let manifest = crate::manifest::parse(content_type, &bytes, digest.clone())?;
    if let Some(missing) = state.metadata.missing_reference(repo, &manifest).await? {
        return Err(RegistryError::ManifestBlobUnknown(missing));
    }
    let tag = match reference {
        Reference::Tag(tag) => Some(tag),
        Reference::Digest(_) => None,
    };
    // The same bytes may have been queued for deletion when no repository held them any more;
    // recording the manifest takes them back, unless the collector is deleting them right now:
    // then they are written again once it is done, which takes milliseconds.
    let mut attempts = 0;
    loop {
        state.content.put(&digest, bytes.clone()).await?;
        match state.metadata.put_manifest(repo, &manifest, tag).await {
            Ok(()) => break,
            Err(MetadataError::MissingReference(digest)) => {
                return Err(RegistryError::ManifestBlobUnknown(digest));
            }
            Err(MetadataError::BeingCollected(_)) if attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(other) => return Err(other.into()),
        }
    }
    state.manifest_bytes.insert(digest.clone(), bytes);
    let mut response_headers = vec![
        (
            "Location",
            location(repo, format_args!("manifests/{digest}")),
        ),
        ("Docker-Content-Digest", header_value(&digest)),
    ];
    if let Some(subject) = &manifest.subject {
        response_headers.push(("OCI-Subject", header_value(subject)));
    }
    Ok(empty(StatusCode::CREATED, response_headers))
}

pub(super) async fn delete(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
) -> HandlerResult {
    let deleted = match reference {
        Reference::Digest(digest) => state.metadata.delete_manifest(repo, digest).await?,
        Reference::Tag(tag) => state.metadata.delete_tag(repo, tag).await?,
    };
    if !deleted {
        return Err(RegistryError::ManifestUnknown(reference.to_string()));
    }
    Ok(empty(StatusCode::ACCEPTED, []))
}
