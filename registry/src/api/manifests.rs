//! Manifest pull, push and delete.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use berth_oci::{Digest, Reference, RepoName, Tag, media_type};
use bytes::Bytes;

use super::{AppState, HandlerResult, empty, header_value, location};
use crate::error::RegistryError;
use crate::manifest;
use crate::metadata::{ManifestInfo, MetadataError, NewManifest};

/// The manifest kinds a client's `Accept` headers name, where the registry must not serve one
/// unasked. As in distribution, only exact media types count: `*/*`, wildcards and `q` values
/// are ignored, so a request without `Accept` names none of them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Accepted {
    oci_manifest: bool,
    oci_index: bool,
    docker_list: bool,
}

impl Accepted {
    fn from_headers(headers: &HeaderMap) -> Accepted {
        let mut accepted = Accepted::default();
        let listed = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|entry| entry.split(';').next().unwrap_or_default().trim());
        for media_type in listed {
            let is = |known: &str| media_type.eq_ignore_ascii_case(known);
            accepted.oci_manifest |= is(media_type::OCI_MANIFEST);
            accepted.oci_index |= is(media_type::OCI_INDEX);
            accepted.docker_list |= is(media_type::DOCKER_MANIFEST_LIST);
        }
        accepted
    }

    /// Why a manifest of `media_type` must not be served to this client, if it must not.
    fn refusal(self, media_type: &str) -> Option<String> {
        let refused = match media_type {
            media_type::OCI_MANIFEST if !self.oci_manifest => "OCI image manifest",
            media_type::OCI_INDEX if !self.oci_index => "OCI image index",
            _ => return None,
        };
        Some(format!(
            "{refused} found, but the Accept header does not include {media_type}"
        ))
    }
}

/// The platform whose image a manifest list is answered with for clients that cannot read lists.
const DEFAULT_OS: &str = "linux";
const DEFAULT_ARCHITECTURE: &str = "amd64";

async fn manifest_bytes(state: &AppState, digest: &Digest) -> Result<Bytes, RegistryError> {
    if let Some(bytes) = state.manifest_bytes.get(digest) {
        return Ok(bytes);
    }
    let bytes = state.content.read_all(digest).await?;
    state.manifest_bytes.insert(digest.clone(), bytes.clone());
    Ok(bytes)
}

/// What `reference` names in `repo`, in a form the client's `Accept` allows, as distribution
/// decides it: an OCI manifest or index only to clients that name its type; a Docker manifest
/// list asked for by tag by a client that does not name lists is answered with its linux/amd64
/// image. Docker schema 2 manifests go to everyone, since nothing is ever rewritten to schema 1.
async fn negotiate(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
    accepted: Accepted,
) -> Result<ManifestInfo, RegistryError> {
    let mut info = state
        .metadata
        .manifest(repo, reference)
        .await?
        .ok_or_else(|| RegistryError::ManifestUnknown(reference.to_string()))?;
    let not_accepted = |info: &ManifestInfo, reason: String| RegistryError::ManifestNotAccepted {
        reference: reference.to_string(),
        media_type: info.media_type.clone(),
        reason,
    };
    if info.media_type == media_type::DOCKER_MANIFEST_LIST
        && matches!(reference, Reference::Tag(_))
        && !accepted.docker_list
    {
        let list = manifest_bytes(state, &info.digest).await?;
        let image = match manifest::platform_image(&list, DEFAULT_OS, DEFAULT_ARCHITECTURE) {
            Some(image) => {
                let image = Reference::Digest(image);
                // A cached list's images are fetched when first asked for.
                if let Some(mirror) = state.proxy.mirror(repo) {
                    crate::proxy::refresh_manifest(state, &mirror, repo, &image).await?;
                }
                state.metadata.manifest(repo, &image).await?
            }
            None => None,
        };
        info = image.ok_or_else(|| {
            not_accepted(
                &info,
                format!(
                    "manifest list found, but the Accept header does not include {} and the \
                     list has no {DEFAULT_OS}/{DEFAULT_ARCHITECTURE} image in this repository",
                    media_type::DOCKER_MANIFEST_LIST
                ),
            )
        })?;
    }
    match accepted.refusal(&info.media_type) {
        Some(reason) => Err(not_accepted(&info, reason)),
        None => Ok(info),
    }
}

pub(super) async fn get(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
    request_headers: &HeaderMap,
    head: bool,
) -> HandlerResult {
    if let Some(mirror) = state.proxy.mirror(repo) {
        crate::proxy::refresh_manifest(state, &mirror, repo, reference).await?;
    }
    let info = negotiate(
        state,
        repo,
        reference,
        Accepted::from_headers(request_headers),
    )
    .await?;
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
    let bytes = manifest_bytes(state, &info.digest).await?;
    state.pulls.note(repo, &info.digest);
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
    let manifest = manifest::parse(content_type, &bytes, digest.clone())?;
    if let Some(missing) = state.metadata.missing_reference(repo, &manifest).await? {
        return Err(RegistryError::ManifestBlobUnknown(missing));
    }
    let tag = match reference {
        Reference::Tag(tag) => Some(tag),
        Reference::Digest(_) => None,
    };
    store(state, repo, &manifest, bytes, tag).await?;
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

/// Stores the manifest `bytes` and records `manifest` in `repo`, tagged `tag` if given: a push,
/// or a manifest a pull-through cache fetched.
pub(crate) async fn store(
    state: &AppState,
    repo: &RepoName,
    manifest: &NewManifest,
    bytes: Bytes,
    tag: Option<&Tag>,
) -> Result<(), RegistryError> {
    let digest = &manifest.digest;
    // Before its bytes are stored: a manifest its scope has no room for leaves nothing behind.
    state
        .metadata
        .check_quotas(repo, digest, bytes.len() as u64)
        .await?;
    // Held from storing to recording, so the collector cannot delete the bytes in between (they
    // may be queued already, when no repository held this manifest any more: recording takes
    // them back).
    let held = state.reservations.hold(digest).await?;
    state.content.put(digest, bytes.clone()).await?;
    state
        .metadata
        .put_manifest(repo, manifest, tag)
        .await
        .map_err(|err| match err {
            MetadataError::MissingReference(digest) => RegistryError::ManifestBlobUnknown(digest),
            other => other.into(),
        })?;
    drop(held);
    state.manifest_bytes.insert(digest.clone(), bytes);
    Ok(())
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

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    use super::*;
    use crate::api::strategies::{CASES, header_value};

    fn accept(values: &[&str]) -> Accepted {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        }
        Accepted::from_headers(&headers)
    }

    #[test]
    fn only_exact_media_types_are_accepted() {
        let everything = Accepted {
            oci_manifest: true,
            oci_index: true,
            docker_list: true,
        };
        assert_eq!(accept(&[]), Accepted::default());
        assert_eq!(accept(&["*/*", "application/*"]), Accepted::default());
        assert_eq!(
            accept(&[
                "application/vnd.oci.image.manifest.v1+json;q=0.5, \
                 APPLICATION/VND.OCI.IMAGE.INDEX.V1+JSON",
                " application/vnd.docker.distribution.manifest.list.v2+json ; q=0"
            ]),
            everything
        );
        assert_eq!(
            accept(&[media_type::OCI_MANIFEST]).refusal(media_type::OCI_MANIFEST),
            None
        );
        assert!(accept(&["*/*"]).refusal(media_type::OCI_INDEX).is_some());
        assert_eq!(accept(&[]).refusal(media_type::DOCKER_MANIFEST), None);
    }

    /// An `Accept` value of media types, some of those the registry looks for.
    fn accept_text() -> impl Strategy<Value = String> {
        let entry = prop_oneof![
            prop::sample::select(vec![
                media_type::OCI_MANIFEST,
                media_type::OCI_INDEX,
                media_type::DOCKER_MANIFEST,
                media_type::DOCKER_MANIFEST_LIST,
                "*/*",
                "application/*",
                "",
            ])
            .prop_map(str::to_owned),
            "[a-z/.+*]{0,30}",
        ];
        let parameters = prop_oneof![
            Just(""),
            Just(";q=0.5"),
            Just(" ; q=0"),
            Just(";"),
            Just(";;")
        ];
        prop::collection::vec((entry, parameters), 0..6).prop_map(|entries| {
            entries
                .into_iter()
                .map(|(entry, parameters)| format!("{entry}{parameters}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn any_accept_headers_name_what_they_list(
            values in prop::collection::vec(header_value(accept_text()), 0..4),
        ) {
            let mut headers = HeaderMap::new();
            for value in &values {
                headers.append(header::ACCEPT, value.clone());
            }
            let accepted = Accepted::from_headers(&headers);
            let lists = |wanted: &str| {
                values.iter().filter_map(|v| v.to_str().ok()).any(|v| {
                    v.to_ascii_lowercase().contains(wanted)
                })
            };
            // Naming a type is necessary for accepting it (not sufficient: `...+json-x` is no match).
            prop_assert!(!accepted.oci_manifest || lists(media_type::OCI_MANIFEST));
            prop_assert!(!accepted.oci_index || lists(media_type::OCI_INDEX));
            prop_assert!(!accepted.docker_list || lists(media_type::DOCKER_MANIFEST_LIST));
        }
    }
}
