//! Copying an image between registries: resolve the manifest (picking a platform from an index),
//! then skip, mount or stream each blob, several at a time, and push manifests last.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_oci::manifest::{self, Descriptor, ManifestDocument};
use berth_oci::{Algorithm, Digest, RepoName, Tag, media_type};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::client::{BlobReader, ClientError, Manifest, RegistryClient, UploadStart, short};
use crate::progress::{Progress, human_bytes, rate};

/// Image configs are small JSON documents; anything bigger is not one.
const MAX_CONFIG_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source, or a manifest or blob read from it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The registry copied into.
    #[error(transparent)]
    Destination(ClientError),
    #[error(
        "{0} uses the Docker schema 1 manifest format, which is deprecated and cannot be cached. \
         Push the image again with a current docker, podman, buildah or skopeo: they write \
         schema 2 or OCI manifests"
    )]
    Schema1(String),
    #[error("{reference} has no image for {wanted}; it has: {available}")]
    NoPlatform {
        reference: String,
        wanted: Platform,
        available: String,
    },
    #[error("manifest {0}")]
    Manifest(String),
    #[error("blob {digest}: {failure}")]
    Blob {
        digest: Digest,
        failure: BlobFailure,
    },
    /// Another part of the staging failed; the copy stopped and cancelled its uploads.
    #[error("the copy was stopped")]
    Stopped,
    #[error(
        "the copy did not finish within {} s (copy_timeout_seconds in the cacher configuration): \
         it was stopped, its uploads cancelled, and nothing was cached. The source registry \
         answered too slowly or stalled",
        .0.as_secs()
    )]
    TimedOut(Duration),
}

/// Why a blob could not be copied.
#[derive(Debug)]
pub enum BlobFailure {
    /// What the source sent, or failed to send.
    Source(String),
    /// The destination failed or refused the upload.
    Destination(Box<ClientError>),
}

impl fmt::Display for BlobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobFailure::Source(reason) => f.write_str(reason),
            BlobFailure::Destination(err) => err.fmt(f),
        }
    }
}

impl CopyError {
    /// The destination's error, when the copy failed because of where it was going
    /// (unreachable, full, over quota, refusing) rather than the image or where it comes from.
    pub fn destination_error(&self) -> Option<&ClientError> {
        match self {
            CopyError::Destination(err) => Some(err),
            CopyError::Blob {
                failure: BlobFailure::Destination(err),
                ..
            } => Some(err),
            _ => None,
        }
    }
}

/// An `os/architecture[/variant]` platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(text: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: parts.get(2).map(|v| (*v).to_owned()),
            }),
            _ => Err(format!("{text:?} is not os/architecture[/variant]")),
        }
    }

    fn matches(&self, spec: &manifest::Platform) -> bool {
        spec.os == self.os
            && spec.architecture == self.architecture
            && (self.variant.is_none() || self.variant == spec.variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// Where an image is read from.
pub struct Source {
    pub client: Arc<RegistryClient>,
    pub repo: RepoName,
    /// Tag or digest, for messages and the first manifest request.
    pub reference: String,
}

/// An image whose manifests have been read from the source.
pub struct ResolvedImage {
    /// What the reference names: an image manifest or an index.
    pub top: Manifest,
    /// The image manifest for the chosen platform (`top` itself when it is not an index).
    pub image: Manifest,
    /// The digest `image` gives its config.
    pub config_digest: Digest,
    /// The config once read: the staging metadata and the copy need it, the source serves it once.
    config: tokio::sync::OnceCell<Bytes>,
}

impl ResolvedImage {
    pub fn digest(&self) -> &Digest {
        &self.image.digest
    }
}

/// Reads the manifest `source` names and, for an index, the image for `platform`.
pub async fn resolve(source: &Source, platform: &Platform) -> Result<ResolvedImage, CopyError> {
    let name = format!("{}:{}", source.repo, source.reference);
    let top = source
        .client
        .get_manifest(&source.repo, &source.reference)
        .await?;
    let image = if media_type::is_index(&top.media_type) {
        let entries = index_entries(&top, &name)?;
        let chosen = entries
            .iter()
            .find(|entry| entry.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| CopyError::NoPlatform {
                reference: name.clone(),
                wanted: platform.clone(),
                available: available_platforms(&entries),
            })?;
        source
            .client
            .get_manifest(&source.repo, &chosen.digest.to_string())
            .await?
    } else {
        top.clone()
    };
    let (config, _) = image_blobs(&image, &name)?;
    let config_digest = config.digest;
    Ok(ResolvedImage {
        top,
        image,
        config_digest,
        config: tokio::sync::OnceCell::new(),
    })
}

/// Reads the image's config, from `cache` when it holds it already, so re-caching an unchanged
/// image reads no blob from the source. A cache that cannot answer, or that says it holds the
/// config and then fails to serve it, is passed over: the staging needs the config whatever
/// becomes of the copy.
pub async fn read_config(
    source: &Source,
    image: &ResolvedImage,
    cache: Option<&Destination>,
) -> Result<Bytes, CopyError> {
    let config = image.config.get_or_try_init(|| async {
        if let Some(dest) = cache
            && let Ok(Some(_)) = dest
                .client
                .blob_size(&dest.repo, &image.config_digest)
                .await
            && let Ok(config) = dest
                .client
                .get_small_blob(&dest.repo, &image.config_digest, MAX_CONFIG_BYTES)
                .await
        {
            return Ok(config);
        }
        source
            .client
            .get_small_blob(&source.repo, &image.config_digest, MAX_CONFIG_BYTES)
            .await
    });
    Ok(config.await?.clone())
}

fn available_platforms(entries: &[Descriptor]) -> String {
    let names: Vec<String> = entries
        .iter()
        .filter_map(|m| m.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    if names.is_empty() {
        "no platforms listed".into()
    } else {
        names.join(", ")
    }
}

fn parse(manifest: &Manifest, name: &str) -> Result<ManifestDocument, CopyError> {
    if media_type::is_schema1(&manifest.media_type) {
        return Err(CopyError::Schema1(name.to_owned()));
    }
    if !media_type::is_supported_manifest(&manifest.media_type) {
        return Err(CopyError::Manifest(format!(
            "{name} has media type {:?}, which is not an image",
            manifest.media_type
        )));
    }
    ManifestDocument::parse(&manifest.bytes)
        .map_err(|e| CopyError::Manifest(format!("{name} ({}) is invalid: {e}", manifest.digest)))
}

/// The entries of an index.
fn index_entries(manifest: &Manifest, name: &str) -> Result<Vec<Descriptor>, CopyError> {
    parse(manifest, name)?.manifests.ok_or_else(|| {
        CopyError::Manifest(format!(
            "{name} ({}) is an index without manifests",
            manifest.digest
        ))
    })
}

/// An image manifest's config, and every blob the image needs in a registry (the config first).
fn image_blobs(
    manifest: &Manifest,
    name: &str,
) -> Result<(Descriptor, Vec<Descriptor>), CopyError> {
    let parsed = parse(manifest, name)?;
    let config = parsed.config.clone().ok_or_else(|| {
        CopyError::Manifest(format!(
            "{name} ({}) is an image manifest without a config",
            manifest.digest
        ))
    })?;
    Ok((config, parsed.blobs().cloned().collect()))
}

/// Where an image is written to.
pub struct Destination {
    pub client: Arc<RegistryClient>,
    pub repo: RepoName,
}

#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Copy every platform of an index and the index itself, not just the resolved image.
    pub keep_index: bool,
    /// Blobs in flight at once.
    pub parallel: usize,
    /// Tries per blob.
    pub attempts: u32,
    /// Tag the copied image with these, in order; it stays addressable by digest.
    pub tags: Vec<Tag>,
    /// How long the whole copy may take before it is stopped.
    pub timeout: Duration,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Blobs the destination repository already had.
    pub present: usize,
    /// Blobs mounted from another repository of the destination.
    pub mounted: usize,
    /// Blobs streamed from the source.
    pub copied: usize,
    /// Bytes read from the source, retries included.
    pub bytes: u64,
}

enum BlobOutcome {
    Present,
    Mounted,
    Copied,
}

/// Copies `image` (and with `keep_index`, the rest of its index) from `source` to `dest`. When
/// `stop` fires, blobs in flight cancel their uploads and the copy ends with
/// [`CopyError::Stopped`], leaving no upload session open and no manifest pushed; so it does,
/// with [`CopyError::TimedOut`], when `options.timeout` runs out.
pub async fn copy(
    source: &Source,
    image: &ResolvedImage,
    dest: &Destination,
    options: &CopyOptions,
    progress: &Progress,
    stop: &CancellationToken,
) -> Result<CopyReport, CopyError> {
    let deadline = tokio::time::Instant::now() + options.timeout;
    let inner = stop.child_token();
    let watchdog = async {
        tokio::time::sleep_until(deadline).await;
        inner.cancel();
        // The copy itself ends now, cancelling its uploads on the way out.
        std::future::pending().await
    };
    let copied = tokio::select! {
        copied = copy_until_stopped(source, image, dest, options, progress, &inner) => copied,
        never = watchdog => never,
    };
    match copied {
        // Only the watchdog cancels `inner` alone.
        Err(CopyError::Stopped) if inner.is_cancelled() && !stop.is_cancelled() => {
            Err(CopyError::TimedOut(options.timeout))
        }
        copied => copied,
    }
}

/// `work`, unless `stop` fires first.
async fn or_stopped<T>(
    stop: &CancellationToken,
    work: impl Future<Output = Result<T, CopyError>>,
) -> Result<T, CopyError> {
    tokio::select! {
        done = work => done,
        () = stop.cancelled() => Err(CopyError::Stopped),
    }
}

async fn copy_until_stopped(
    source: &Source,
    image: &ResolvedImage,
    dest: &Destination,
    options: &CopyOptions,
    progress: &Progress,
    stop: &CancellationToken,
) -> Result<CopyReport, CopyError> {
    let name = format!("{}:{}", source.repo, source.reference);
    let mut manifests = vec![image.image.clone()];
    if options.keep_index && image.top.digest != image.image.digest {
        let entries = index_entries(&image.top, &name)?;
        for entry in entries.iter().filter(|e| e.digest != image.image.digest) {
            let reference = entry.digest.to_string();
            let manifest = source.client.get_manifest(&source.repo, &reference);
            manifests.push(or_stopped(stop, async { Ok(manifest.await?) }).await?);
        }
    }
    let mut blobs = BTreeMap::new();
    for manifest in &manifests {
        for blob in image_blobs(manifest, &name)?.1 {
            blobs.insert(blob.digest.clone(), blob);
        }
    }
    // Largest first: a copy lasts as long as its last blob, so that one should be a small one.
    let mut blobs: Vec<&Descriptor> = blobs.values().collect();
    blobs.sort_by_key(|blob| std::cmp::Reverse(blob.size));
    progress.plan(blobs.iter().map(|blob| blob.size).sum());
    let before = progress.counter().get();
    // A failed blob stops the others, and each cancels its upload on the way out.
    let stop = stop.child_token();
    let outcomes: Vec<Result<BlobOutcome, CopyError>> = futures_util::stream::iter(blobs)
        .map(|blob| {
            let config_of = (blob.digest == image.config_digest).then_some(image);
            let stop = &stop;
            async move {
                let outcome = copy_blob(source, dest, blob, config_of, options, progress, stop);
                let outcome = outcome.await;
                if outcome.is_err() {
                    stop.cancel();
                }
                outcome
            }
        })
        .buffer_unordered(options.parallel.max(1))
        .collect()
        .await;
    // The failure that stopped the copy, not the stops it caused.
    let (outcomes, mut failures): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
    failures.sort_by_key(|failure| matches!(failure, Err(CopyError::Stopped)));
    if let Some(Err(failure)) = failures.into_iter().next() {
        return Err(failure);
    }
    if stop.is_cancelled() {
        return Err(CopyError::Stopped);
    }
    // Children before the index, everything by digest before the tag: a registry accepts a
    // manifest only when all it references is already there. A lone image is stored by its tag
    // alone, which makes it addressable by digest too, one durable commit fewer.
    // Registries name a manifest pushed by tag with its sha256 digest.
    let tag_stores_all = !options.tags.is_empty()
        && manifests.len() == 1
        && image.image.digest.algorithm() == Algorithm::Sha256;
    let mut pushes: Vec<(String, &Manifest)> = manifests
        .iter()
        .filter(|_| !tag_stores_all)
        .map(|manifest| (manifest.digest.to_string(), manifest))
        .collect();
    if manifests.len() > 1 {
        pushes.push((image.top.digest.to_string(), &image.top));
    }
    for tag in &options.tags {
        pushes.push((tag.to_string(), &image.image));
    }
    for (reference, manifest) in pushes {
        let push = dest.client.put_manifest(&dest.repo, &reference, manifest);
        or_stopped(&stop, async { push.await.map_err(CopyError::Destination) }).await?;
    }
    let mut report = CopyReport {
        bytes: progress.counter().get() - before,
        ..CopyReport::default()
    };
    for outcome in outcomes.into_iter().flatten() {
        match outcome {
            BlobOutcome::Present => report.present += 1,
            BlobOutcome::Mounted => report.mounted += 1,
            BlobOutcome::Copied => report.copied += 1,
        }
    }
    Ok(report)
}

/// Copies one blob unless `dest` has it; `config_of` is the image when the blob is its config,
/// which is read once for the staging metadata and the copy.
async fn copy_blob(
    source: &Source,
    dest: &Destination,
    blob: &Descriptor,
    config_of: Option<&ResolvedImage>,
    options: &CopyOptions,
    progress: &Progress,
    stop: &CancellationToken,
) -> Result<BlobOutcome, CopyError> {
    if stop.is_cancelled() {
        return Err(CopyError::Stopped);
    }
    let label = format!("  {}  {:>10}", short(&blob.digest), human_bytes(blob.size));
    if dest
        .client
        .blob_size(&dest.repo, &blob.digest)
        .await
        .map_err(CopyError::Destination)?
        .is_some()
    {
        progress.skip(blob.size);
        progress.line(&format!("{label}  already cached"));
        return Ok(BlobOutcome::Present);
    }
    let known = match config_of {
        Some(image) => Some(tokio::select! {
            config = read_config(source, image, None) => config?,
            () = stop.cancelled() => return Err(CopyError::Stopped),
        }),
        None => None,
    };
    let policy = source.client.retry_policy();
    let mut attempt = 1;
    loop {
        let location = match dest
            .client
            .start_upload(&dest.repo, Some(&blob.digest))
            .await
            .map_err(CopyError::Destination)?
        {
            UploadStart::Mounted => {
                progress.skip(blob.size);
                progress.line(&format!("{label}  mounted from the cache"));
                return Ok(BlobOutcome::Mounted);
            }
            UploadStart::Session(location) => location,
        };
        let started = Instant::now();
        let transfer = progress.track(&blob.digest, blob.size);
        let (body, failure) = match &known {
            Some(bytes) => (reqwest::Body::from(bytes.clone()), None),
            None => {
                let reader = BlobReader::new(
                    source.client.clone(),
                    source.repo.clone(),
                    blob.digest.clone(),
                    blob.size,
                    transfer.counter(),
                );
                let failure = reader.failure();
                (
                    reqwest::Body::wrap_stream(reader.into_stream()),
                    Some(failure),
                )
            }
        };
        let finish =
            dest.client
                .finish_upload(&dest.repo, location.clone(), &blob.digest, blob.size, body);
        let sent = tokio::select! {
            sent = finish => sent,
            () = stop.cancelled() => {
                dest.client.cancel_upload(&dest.repo, location).await;
                return Err(CopyError::Stopped);
            }
        };
        let err = match sent {
            Ok(()) => {
                transfer.complete();
                let elapsed = started.elapsed();
                progress.line(&format!(
                    "{label}  copied in {:.1} s ({})",
                    elapsed.as_secs_f64(),
                    rate(blob.size, elapsed)
                ));
                return Ok(BlobOutcome::Copied);
            }
            Err(err) => err,
        };
        dest.client.cancel_upload(&dest.repo, location).await;
        let source_failure = failure.and_then(|f| f.lock().expect("failure lock").take());
        // A blob the destination refused as corrupted came so from the source.
        let failure = match source_failure {
            Some(reason) => BlobFailure::Source(reason),
            None if matches!(err, ClientError::Corrupted { .. }) => {
                BlobFailure::Source(err.to_string())
            }
            None => BlobFailure::Destination(Box::new(err)),
        };
        let transient = match &failure {
            BlobFailure::Source(_) => true,
            BlobFailure::Destination(err) => err.is_transient(),
        };
        if !transient || attempt >= options.attempts {
            return Err(CopyError::Blob {
                digest: blob.digest.clone(),
                failure,
            });
        }
        eprintln!(
            "  blob {}: {failure}; starting it again (try {}/{})",
            short(&blob.digest),
            attempt + 1,
            options.attempts
        );
        tokio::select! {
            () = tokio::time::sleep(policy.backoff(attempt)) => attempt += 1,
            () = stop.cancelled() => return Err(CopyError::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let wanted = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(wanted.to_string(), "linux/arm64/v8");
        let spec = |os: &str, arch: &str, variant: Option<&str>| manifest::Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        };
        assert!(wanted.matches(&spec("linux", "arm64", Some("v8"))));
        assert!(!wanted.matches(&spec("linux", "arm64", None)));
        let amd64 = Platform::parse("linux/amd64").unwrap();
        assert!(amd64.matches(&spec("linux", "amd64", None)));
        assert!(!amd64.matches(&spec("unknown", "unknown", None)));
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("/amd64").is_err());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::client::detect_media_type;
    use crate::generated::{CASES, damaged_json, json_value};

    const KEYS: &[&str] = &[
        "schemaVersion",
        "mediaType",
        "config",
        "layers",
        "manifests",
        "digest",
        "size",
        "platform",
        "os",
        "architecture",
        "variant",
        "urls",
        "annotations",
        "subject",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// Whatever a registry serves as a manifest, reading it as an image or an index answers
        /// without panicking, as does everything the copy asks of what it accepts.
        #[test]
        fn any_manifest_parses_or_is_refused(
            bytes in damaged_json(json_value(KEYS)),
            header in prop::option::of(prop::sample::select(&[
                media_type::OCI_MANIFEST, media_type::OCI_INDEX, media_type::DOCKER_MANIFEST,
                "application/json", "text/plain",
            ][..])),
        ) {
            let manifest = Manifest {
                media_type: detect_media_type(header, &bytes),
                digest: Digest::sha256_of(&bytes),
                bytes: Bytes::from(bytes),
            };
            if let Ok((config, blobs)) = image_blobs(&manifest, "generated") {
                prop_assert_eq!(&blobs[0], &config);
            }
            if let Ok(entries) = index_entries(&manifest, "generated") {
                let wanted = Platform::parse("linux/amd64").expect("a platform");
                entries.iter().filter_map(|m| m.platform.as_ref()).for_each(|p| {
                    wanted.matches(p);
                });
                available_platforms(&entries);
            }
        }
    }
}
