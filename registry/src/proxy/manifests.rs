//! Manifests of proxied repositories: fetched when missing, tags revalidated with `HEAD`, stored as the upstream sent them.

use berth_oci::manifest::ManifestDocument;
use berth_oci::{Digest, Reference, RepoName, Tag};

use super::{Mirror, Turn, UpstreamError};
use crate::api::AppState;
use crate::error::RegistryError;

/// Makes what `reference` names in the proxied `repo` current enough to serve: fetched if not
/// cached; for a tag not checked within the upstream's window, checked with a `HEAD` and fetched
/// again only if it moved. When the upstream fails a check, the cached copy stays (and is served).
pub async fn refresh_manifest(
    state: &AppState,
    mirror: &Mirror,
    repo: &RepoName,
    reference: &Reference,
) -> Result<(), RegistryError> {
    let (proxy, upstream, metrics) = (&state.proxy, &mirror.upstream, &state.metrics);
    let key = format!("{repo}:{reference}");
    let fresh = |cached: bool| match reference {
        // Content-addressed: a cached digest is current for ever.
        Reference::Digest(_) => cached,
        Reference::Tag(_) => cached && proxy.checked_within(&key, upstream.revalidate_after),
    };
    if fresh(state.metadata.manifest(repo, reference).await?.is_some()) {
        metrics.proxy_cache_hit(&upstream.prefix);
        return Ok(());
    }
    proxy
        .one_at_a_time(&key, async {
            // Whoever held the turn before may have done the work.
            let cached = state.metadata.manifest(repo, reference).await?;
            if fresh(cached.is_some()) {
                metrics.proxy_cache_hit(&upstream.prefix);
                return Ok(());
            }
            let tag = match reference {
                Reference::Digest(digest) => {
                    let digest = digest.to_string();
                    let fetch = fetch_and_store(state, mirror, repo, &digest, None);
                    return once_across_instances(state, repo, reference, None, fetch).await;
                }
                Reference::Tag(tag) => tag,
            };
            let Some(cached) = cached else {
                let fetch = fetch_and_store(state, mirror, repo, tag.as_str(), Some(tag));
                once_across_instances(state, repo, reference, None, fetch).await?;
                proxy.mark_checked(key.clone());
                return Ok(());
            };
            let checked = match upstream
                .head_manifest(metrics, &mirror.remote, tag.as_str())
                .await
            {
                Ok(current) if current == cached.digest => {
                    metrics.proxy_cache_hit(&upstream.prefix);
                    Ok(())
                }
                // Moved upstream: fetched by its digest, so what is stored is what the HEAD named.
                Ok(current) => {
                    let current = current.to_string();
                    let fetch = fetch_and_store(state, mirror, repo, &current, Some(tag));
                    once_across_instances(state, repo, reference, Some(&cached.digest), fetch).await
                }
                Err(err) => Err(err.into()),
            };
            // Marked checked either way: after a failure too, the next check waits for the
            // window, so pulls neither wait on an upstream that is down nor press one that
            // rate-limits.
            proxy.mark_checked(key.clone());
            if let Err(err) = checked {
                // A foundation's pulls must not fail for an upstream outage or rate limit: what
                // was cached is still a valid image of that tag.
                tracing::warn!(
                    upstream = %upstream.prefix,
                    repository = %repo,
                    tag = %tag,
                    status = %status_of(&err),
                    error = %err,
                    "upstream check failed; serving the cached manifest"
                );
                metrics.proxy_stale_served(&upstream.prefix);
            }
            Ok(())
        })
        .await
}

/// Runs `fetch` (an upstream manifest GET, a Docker Hub pull, and storing what it got) once among
/// the instances sharing the metadata store: one that finds another fetching the same reference
/// waits until what `reference` names in `repo` is no longer `before` and serves that instead.
/// Within one instance [`Proxy::one_at_a_time`](super::Proxy) already keeps it to one fetch.
async fn once_across_instances(
    state: &AppState,
    repo: &RepoName,
    reference: &Reference,
    before: Option<&Digest>,
    fetch: impl Future<Output = Result<(), RegistryError>>,
) -> Result<(), RegistryError> {
    let name = super::lease_name("manifest", &format!("{repo}:{reference}"));
    let stored = || async {
        let now = state.metadata.manifest(repo, reference).await?;
        Ok(now.is_some_and(|stored| Some(&stored.digest) != before))
    };
    match Turn::take(state, name, stored).await? {
        Turn::Stored => Ok(()),
        turn => {
            let fetched = fetch.await;
            turn.done().await;
            fetched
        }
    }
}

fn status_of(err: &RegistryError) -> String {
    match err {
        RegistryError::Upstream(err) => err.status_text(),
        RegistryError::ManifestUnknown(_) => "404".into(),
        other => other.to_string(),
    }
}

/// Fetches manifest `reference` (a tag or digest) of the mirror and stores it in `repo`, tagged
/// `tag` if given, with its blobs recorded from their descriptors, their bytes not fetched yet.
async fn fetch_and_store(
    state: &AppState,
    mirror: &Mirror,
    repo: &RepoName,
    reference: &str,
    tag: Option<&Tag>,
) -> Result<(), RegistryError> {
    let fetched = mirror
        .upstream
        .get_manifest(
            &state.metrics,
            &mirror.remote,
            reference,
            state.limits.max_manifest_bytes,
        )
        .await
        .map_err(|err| match err {
            UpstreamError::NotFound { .. } => RegistryError::ManifestUnknown(reference.to_owned()),
            other => other.into(),
        })?;
    let mut manifest = crate::manifest::parse(
        fetched.media_type.as_deref(),
        &fetched.bytes,
        fetched.digest.clone(),
    )?;
    let document = ManifestDocument::parse(&fetched.bytes)
        .map_err(|e| RegistryError::ManifestInvalid(e.to_string()))?;
    // `parse` lists an image's blobs in this same order; an index has none.
    let sizes: Vec<u64> = if manifest.blobs.is_empty() {
        Vec::new()
    } else {
        document.blobs().map(|blob| blob.size).collect()
    };
    manifest.upstream_sizes = Some(sizes);
    crate::api::store_manifest(state, repo, &manifest, fetched.bytes, tag).await
}
