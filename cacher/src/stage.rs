//! One staging run as Cloud Controller starts it: read the image's config, cache the image in the
//! internal registry when asked, and write the staging result.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_oci::{RepoName, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientError, ClientOptions, Credentials, RegistryClient, RetryPolicy};
use crate::config::{CacherConfig, OnCacheFailure, RegistryIdentity};
use crate::copy::{self, CopyError, CopyOptions, Destination, Platform, Source};
use crate::identity::{IdentityError, IdentityFiles, InstanceIdentity};
use crate::progress::{Progress, REPORT_INTERVAL, human_bytes, rate};
use crate::reference::{ImageReference, ReferenceError};
use crate::result::{self, ExecutionMetadata, MetadataError};
use crate::secret::Secret;

/// Where Cloud Foundry mounts the foundation's trusted certificates in every container.
const CF_SYSTEM_CERTS: &str = "/etc/cf-system-certificates";

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("instance identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("reading trusted certificates from {0}: {1}")]
    Certificates(PathBuf, String),
    #[error("writing the staging result to {0}: {1}")]
    WriteResult(PathBuf, std::io::Error),
}

/// What Cloud Controller asked for on the command line.
#[derive(Debug)]
pub struct StageRequest {
    pub docker_ref: String,
    pub output: PathBuf,
    pub insecure_registries: Vec<String>,
    /// One-shot credentials for the source registry.
    pub credentials: Option<Credentials>,
}

/// What the staging environment says about the app.
#[derive(Debug, Default, Clone)]
pub struct StagingEnv {
    /// The app's GUID (`VCAP_APPLICATION.application_id`).
    pub app_id: Option<String>,
    /// The app's own choice (`BERTH_CACHE`, or the 2015 `DIEGO_DOCKER_CACHE`), if it made one.
    pub cache: Option<bool>,
    /// Directory of extra trusted certificates (`CF_SYSTEM_CERT_PATH`).
    pub cert_dir: PathBuf,
    /// The container's instance identity files (`CF_INSTANCE_CERT`, `CF_INSTANCE_KEY`).
    pub instance_identity: Option<IdentityFiles>,
}

impl StagingEnv {
    pub fn from_process() -> StagingEnv {
        let app_id = std::env::var("VCAP_APPLICATION")
            .ok()
            .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
            .and_then(|v| v.get("application_id")?.as_str().map(str::to_owned));
        let flag = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        };
        StagingEnv {
            app_id,
            cache: flag("BERTH_CACHE").or_else(|| flag("DIEGO_DOCKER_CACHE").filter(|on| *on)),
            cert_dir: std::env::var_os("CF_SYSTEM_CERT_PATH")
                .map_or_else(|| PathBuf::from(CF_SYSTEM_CERTS), PathBuf::from),
            instance_identity: IdentityFiles::from_env(),
        }
    }
}

/// Runs the staging and returns the image reference written to the result.
pub async fn run(
    request: StageRequest,
    config: Option<&CacherConfig>,
    env: &StagingEnv,
) -> Result<String, StageError> {
    let reference = ImageReference::parse(&request.docker_ref)?;
    let retry = RetryPolicy {
        attempts: config.map_or(RetryPolicy::default().attempts, |c| c.attempts),
        ..RetryPolicy::default()
    };
    let roots = load_roots(&env.cert_dir)?;
    let caching = config.filter(|config| env.cache.unwrap_or(config.cache_by_default));
    let record = caching
        .and_then(|config| record_tag(config, env, &reference, request.credentials.as_ref()));
    // Without a key, an app that pushes by its own identity keeps one repository per source.
    let source_repository = caching
        .filter(|config| config.repository_key.is_none())
        .and_then(|config| source_id(config, env, &reference, request.credentials.as_ref()));
    // Public images of a registry the internal registry mirrors are read through its cache, so
    // the foundation pulls each from the Internet once. Private ones never enter that shared
    // cache: whoever could pull from it would see them.
    let proxied = config
        .filter(|_| request.credentials.is_none())
        .and_then(|config| config.proxy_repository(&reference));
    let source_options = ClientOptions {
        credentials: request.credentials,
        insecure: request.insecure_registries.contains(&reference.registry),
        extra_roots: roots.clone(),
        identity: None,
        retry,
    };
    // The internal registry's client is built on another thread while the source is contacted:
    // loading the system roots takes milliseconds a re-cache would otherwise wait for.
    let building = config
        .filter(|_| caching.is_some() || proxied.is_some())
        .map(|config| {
            let (config, env) = (config.clone(), env.clone());
            tokio::task::spawn_blocking(move || internal_client(&config, &env, roots, retry))
        });
    let platform = match config {
        Some(config) => Platform::parse(&config.platform).expect("validated with the config"),
        None => Platform::parse("linux/amd64").expect("valid platform"),
    };
    let direct = async {
        let client = RegistryClient::connect(reference.api_host(), source_options).await?;
        let source = Source {
            client: Arc::new(client),
            repo: reference.repository.clone(),
            reference: reference.manifest_reference(),
        };
        let image = copy::resolve(&source, &platform).await?;
        Ok::<_, CopyError>((source, image))
    };
    let to_dest = |config: &CacherConfig, internal: Result<Internal, StageError>| {
        internal.map(|(client, app_id)| Destination {
            client,
            repo: cache_repository(
                &config.namespace,
                app_id.as_deref(),
                config.repository_key.as_ref(),
                source_repository.as_deref(),
            ),
        })
    };
    let mut looked_in_cache = false;
    let (resolved, dest) = match (&proxied, building) {
        (Some(repo), Some(building)) => {
            let internal = building.await.expect("building a client does not panic");
            let client = match &internal {
                Ok((client, _)) => Some(client.clone()),
                Err(err) => {
                    println!(
                        "Warning: the internal registry's cache of {} cannot be used ({err}): \
                         reading {reference} from its own registry",
                        reference.registry
                    );
                    None
                }
            };
            let dest = caching.map(|config| to_dest(config, internal));
            let cached = caching.zip(dest.as_ref().and_then(|dest| dest.as_ref().ok()));
            let read = match client {
                Some(client) => {
                    let mirror = Mirror {
                        client,
                        repo,
                        reference: &reference,
                        platform: &platform,
                    };
                    mirror.read(cached, record.as_ref()).await
                }
                None => ThroughMirror::Direct {
                    looked_in_cache: false,
                },
            };
            match read {
                ThroughMirror::Found(source, image) => (Ok((source, image)), dest),
                ThroughMirror::Restaged(docker_image, metadata) => {
                    return finish(&request.output, &docker_image, &metadata);
                }
                ThroughMirror::Direct {
                    looked_in_cache: looked,
                } => {
                    looked_in_cache = looked;
                    (direct.await, dest)
                }
            }
        }
        (_, building) => {
            let resolved = direct.await;
            let dest = match caching.zip(building) {
                Some((config, building)) => Some(to_dest(
                    config,
                    building.await.expect("building a client does not panic"),
                )),
                None => None,
            };
            (resolved, dest)
        }
    };
    let (source, image) = match (resolved, caching.zip(dest.as_ref())) {
        (Ok(resolved), _) => resolved,
        (Err(CopyError::Client(err)), Some((config, Ok(dest))))
            if err.is_unavailable() && !looked_in_cache =>
        {
            let why = format!("{} cannot be reached", reference.registry);
            let restaged = from_cache(
                &reference,
                record.as_ref(),
                config,
                dest,
                &platform,
                (&why, &err),
            )
            .await;
            let (docker_image, metadata) = restaged.ok_or(CopyError::Client(err))?;
            return finish(&request.output, &docker_image, &metadata);
        }
        (Err(err), _) => return Err(err.into()),
    };
    let dest = match (caching, dest) {
        (Some(config), Some(Err(err))) => {
            if config.on_cache_failure == OnCacheFailure::Fail {
                return Err(err);
            }
            warn_uncached(&reference, &err);
            None
        }
        (_, dest) => dest.and_then(Result::ok),
    };
    // The config (for the metadata) is read while the layers stream: a slow upstream answers
    // even a small blob in milliseconds. A bad config stops the copy, which cancels its uploads.
    // A copy that fails the staging (a corrupt source, say) abandons the config too.
    let stop = CancellationToken::new();
    let copy_failed = CancellationToken::new();
    let metadata = async {
        let read = copy::read_config(&source, &image, dest.as_ref());
        let metadata = tokio::select! {
            read = read => match read {
                Ok(config) => {
                    ExecutionMetadata::from_image_config(&config).map_err(StageError::from)
                }
                Err(err) => Err(err.into()),
            },
            () = copy_failed.cancelled() => return None,
        };
        if metadata.is_err() {
            stop.cancel();
        }
        Some(metadata)
    };
    let (metadata, docker_image) = match (caching, &dest) {
        (Some(config), Some(dest)) => {
            let copied = async {
                let record = record.as_ref();
                let copied = cache(&reference, record, &source, &image, config, dest, &stop).await;
                if copied
                    .as_ref()
                    .is_err_and(|err| !goes_on_uncached(config, err))
                {
                    copy_failed.cancel();
                }
                copied
            };
            match tokio::join!(metadata, copied) {
                // A bad config is why the copy stopped.
                (Some(Err(err)), _) => return Err(err),
                (Some(Ok(metadata)), Ok(copied)) => (metadata, copied),
                (Some(Ok(metadata)), Err(err)) if goes_on_uncached(config, &err) => {
                    warn_uncached(&reference, &err);
                    (metadata, reference.builder_form())
                }
                (_, Err(err)) => return Err(err),
                (None, Ok(_)) => unreachable!("the config is abandoned only when the copy fails"),
            }
        }
        _ => (
            metadata
                .await
                .expect("nothing abandons it without a copy")?,
            reference.builder_form(),
        ),
    };
    finish(&request.output, &docker_image, &metadata)
}

/// The internal registry's mirror of an image's registry, and the image there.
struct Mirror<'a> {
    client: Arc<RegistryClient>,
    repo: &'a RepoName,
    reference: &'a ImageReference,
    platform: &'a Platform,
}

/// What reading an image through the mirror came to.
enum ThroughMirror {
    Found(Source, copy::ResolvedImage),
    /// The upstream's pull limit is reached and the app's cached staging stands in: the docker
    /// image and its metadata.
    Restaged(String, ExecutionMetadata),
    /// The image is to be read from its own registry; the app's cached staging was looked for
    /// already if `looked_in_cache`.
    Direct {
        looked_in_cache: bool,
    },
}

impl Mirror<'_> {
    /// Reads the image through the mirror; when the upstream's pull limit is reached, from the
    /// app's newest cached staging of it in `cached` (the app's repository) instead, if there is
    /// one. Any failure leaves the source to be read directly, with a warning.
    async fn read(
        &self,
        cached: Option<(&CacherConfig, &Destination)>,
        record: Option<&Tag>,
    ) -> ThroughMirror {
        let reference = self.reference;
        let registry = &reference.registry;
        let err = match self.resolve().await {
            Ok((source, image)) => {
                println!(
                    "Reading {reference} through the internal registry's cache of {registry} ({})",
                    self.repo
                );
                return ThroughMirror::Found(source, image);
            }
            Err(err) => err,
        };
        let CopyError::Client(ClientError::Status {
            rate_limit: Some(limit),
            ..
        }) = &err
        else {
            println!(
                "Warning: the internal registry's cache of {registry} failed ({err}): reading \
                 {reference} from its own registry"
            );
            return ThroughMirror::Direct {
                looked_in_cache: false,
            };
        };
        println!(
            "Warning: {registry} refused the internal registry's pull of {reference}: its pull \
             rate limit is reached ({limit})"
        );
        let looked_in_cache = cached.is_some();
        if let Some((config, dest)) = cached {
            let why = format!("{registry}'s pull rate limit is reached");
            let restaged = from_cache(
                reference,
                record,
                config,
                dest,
                self.platform,
                (&why, limit),
            )
            .await;
            if let Some((docker_image, metadata)) = restaged {
                return ThroughMirror::Restaged(docker_image, metadata);
            }
        }
        println!("Warning: reading {reference} from {registry} directly");
        ThroughMirror::Direct { looked_in_cache }
    }

    /// The manifests are asked for once: any failure falls back to a cached staging or to the
    /// source, which beats waiting out the `Retry-After` of a rate-limited upstream. The blobs
    /// are then read with the client's own retries.
    async fn resolve(&self) -> Result<(Source, copy::ResolvedImage), CopyError> {
        let once = RetryPolicy {
            attempts: 1,
            ..self.client.retry_policy()
        };
        let asking = Source {
            client: Arc::new(self.client.with_retry(once)),
            repo: self.repo.clone(),
            reference: self.reference.manifest_reference(),
        };
        let image = copy::resolve(&asking, self.platform).await?;
        Ok((
            Source {
                client: self.client.clone(),
                ..asking
            },
            image,
        ))
    }
}

/// Writes the staging result and returns the image it names.
fn finish(
    output: &Path,
    docker_image: &str,
    metadata: &ExecutionMetadata,
) -> Result<String, StageError> {
    let bytes = result::render(docker_image, metadata)?;
    result::write(output, &bytes).map_err(|e| StageError::WriteResult(output.to_owned(), e))?;
    Ok(docker_image.to_owned())
}

/// Whether a failed copy failed because of the internal registry (unreachable, full, over
/// quota, refusing), or ran out of time, rather than because of the image or its source.
fn is_cache_failure(err: &StageError) -> bool {
    matches!(err, StageError::Copy(err)
        if matches!(err, CopyError::TimedOut(_)) || err.destination_error().is_some())
}

fn goes_on_uncached(config: &CacherConfig, err: &StageError) -> bool {
    config.on_cache_failure == OnCacheFailure::StageUncached && is_cache_failure(err)
}

/// What kept the image out of the internal registry, in the words an app developer reads in the
/// staging log.
fn why_not_cached(err: &StageError) -> &'static str {
    let StageError::Copy(err) = err else {
        return "the cacher cannot set up its connection to the internal registry";
    };
    match err.destination_error() {
        None => "the copy ran out of time",
        Some(ClientError::Transport { .. }) => "the internal registry cannot be reached",
        Some(ClientError::Auth(_)) => "the internal registry refused the cacher's credentials",
        Some(ClientError::Status { status, .. }) if status.as_u16() == 507 => {
            "the internal registry's storage is full"
        }
        Some(ClientError::Status { codes, .. }) if codes.iter().any(|code| code == "DENIED") => {
            "the internal registry denied the copy (over quota, or not allowed)"
        }
        Some(err) if err.is_unavailable() => "the internal registry is unavailable",
        Some(_) => "the internal registry refused the copy",
    }
}

/// The staging log's word that the staging goes on without the cache, and why.
fn warn_uncached(reference: &ImageReference, err: &StageError) {
    println!(
        "Warning: the image is not cached: {}: {err}",
        why_not_cached(err)
    );
    println!(
        "Warning: staging goes on uncached: the app starts from {}, pulled from its own \
         registry at every start (on_cache_failure: stage-uncached)",
        reference.builder_form()
    );
}

/// The newest staging of `reference` this app cached, as the docker image a result names and
/// its metadata, when its source cannot serve it: `why` says so in the staging log, with
/// `detail`. `None` when there is none, or it cannot be read; the staging then goes on without
/// it.
async fn from_cache(
    reference: &ImageReference,
    record: Option<&Tag>,
    config: &CacherConfig,
    dest: &Destination,
    platform: &Platform,
    (why, detail): (&str, &dyn std::fmt::Display),
) -> Option<(String, ExecutionMetadata)> {
    let Some(tag) = record else {
        println!(
            "{why}, and without a repository_key and the app's GUID no cached staging of it \
             can be found"
        );
        return None;
    };
    let cached = Source {
        client: dest.client.clone(),
        repo: dest.repo.clone(),
        reference: tag.to_string(),
    };
    let read = async {
        let image = copy::resolve(&cached, platform).await?;
        let config = copy::read_config(&cached, &image, None).await?;
        let metadata = ExecutionMetadata::from_image_config(&config).map_err(StageError::from)?;
        Ok::<_, StageError>((image, metadata))
    };
    let (image, metadata) = match read.await {
        Ok(found) => found,
        Err(err) => {
            println!(
                "{why}, and no cached staging of {reference} for this app could be read from \
                 the internal registry ({})",
                lookup_failure(&err)
            );
            return None;
        }
    };
    let docker_image = format!(
        "{}/{}@{}",
        config.registry_name(),
        dest.repo,
        image.digest()
    );
    println!("Warning: {why}: {detail}");
    println!(
        "Warning: staging from this app's newest cached staging of {reference}: {docker_image}"
    );
    // This staging's own tag, so retention counts the image among the app's newest stagings.
    // Without it the staging still stands: the droplet pins the image by digest.
    let tag = staging_tag().to_string();
    if let Err(err) = dest
        .client
        .put_manifest(&dest.repo, &tag, &image.image)
        .await
    {
        println!("Warning: the staging could not be tagged in the internal registry: {err}");
    }
    Some((docker_image, metadata))
}

/// Why the lookup of a cached staging failed, without the names the error carries: the record
/// tag must not reach the staging log, which more people read than know the image's password.
fn lookup_failure(err: &StageError) -> String {
    match err {
        StageError::Copy(CopyError::Client(err)) => match err {
            ClientError::Status { status, .. } if status.as_u16() == 404 => "there is none".into(),
            ClientError::Status { status, detail, .. } => format!("it answered {status}{detail}"),
            ClientError::Transport { reason, .. } => reason.clone(),
            ClientError::Auth(_) => "it refused the cacher's credentials".into(),
            _ => "what it served is not what was cached".into(),
        },
        StageError::Metadata(err) => err.to_string(),
        _ => "what it holds is not a usable image".into(),
    }
}

/// A client of the internal registry, and the app GUID it may push under.
type Internal = (Arc<RegistryClient>, Option<String>);

/// The internal registry as the cacher reaches it: its own credentials or the app's instance
/// identity, never the app's credentials for its image.
fn internal_client(
    config: &CacherConfig,
    env: &StagingEnv,
    mut roots: Vec<reqwest::Certificate>,
    retry: RetryPolicy,
) -> Result<Internal, StageError> {
    if let Some(ca_file) = &config.registry.ca_file {
        roots.extend(read_pem(ca_file)?);
    }
    let credentials = config
        .registry
        .username
        .clone()
        .zip(config.registry.password.clone())
        .map(|(username, password)| Credentials { username, password });
    // With an instance identity the app is the one its certificate names: the registry lets it
    // push under that GUID alone.
    let (identity, app_id) = match config.registry.identity {
        Some(RegistryIdentity::Instance) => {
            let identity = InstanceIdentity::load(env.instance_identity.as_ref())?;
            (Some(identity.tls), Some(identity.app_guid))
        }
        None => (None, env.app_id.clone()),
    };
    let client = RegistryClient::new(
        &config.registry.url,
        ClientOptions {
            credentials,
            insecure: false,
            extra_roots: roots,
            identity,
            retry,
        },
    )?;
    Ok((Arc::new(client), app_id))
}

async fn cache(
    reference: &ImageReference,
    record: Option<&Tag>,
    source: &Source,
    image: &copy::ResolvedImage,
    config: &CacherConfig,
    dest: &Destination,
    stop: &CancellationToken,
) -> Result<String, StageError> {
    let registry = config.registry_name();
    println!(
        "Caching {reference} ({}) as {registry}/{}",
        image.digest(),
        dest.repo
    );
    let mut progress = Progress::new(Default::default(), REPORT_INTERVAL);
    let options = CopyOptions {
        keep_index: config.keep_index,
        parallel: config.parallel_blobs,
        attempts: config.attempts,
        tags: std::iter::once(staging_tag())
            .chain(record.cloned())
            .collect(),
        timeout: Duration::from_secs(config.copy_timeout_seconds),
    };
    let report = copy::copy(source, image, dest, &options, &progress, stop).await;
    progress.finish();
    let report = report?;
    println!(
        "Cached in {:.1} s: {} blobs copied ({}, {}), {} mounted, {} already cached",
        progress.elapsed().as_secs_f64(),
        report.copied,
        human_bytes(report.bytes),
        rate(report.bytes, progress.elapsed()),
        report.mounted,
        report.present
    );
    Ok(format!("{registry}/{}@{}", dest.repo, image.digest()))
}

/// `NAMESPACE/APP_GUID/ID`: one repository per app, so retention can keep each app's last few
/// stagings; `ID` is an HMAC of the GUID under the operator's key (stable across stagings, so
/// re-staging reuses the repository) or random without a key, and never guessable from the GUID.
fn cache_repository(
    namespace: &str,
    app_id: Option<&str>,
    key: Option<&Secret>,
    source: Option<&str>,
) -> RepoName {
    let app = app_id.filter(|id| berth_oci::is_app_guid(id));
    let id = match (app, key, source) {
        (Some(app), Some(key), _) => keyed_id(key, &[app.as_bytes()]),
        (Some(_), None, Some(source)) => source.to_owned(),
        _ => uuid::Uuid::new_v4().simple().to_string(),
    };
    format!("{namespace}/{}/{id}", app.unwrap_or("unknown-app"))
        .parse()
        .expect("namespace, GUID and hex id form a valid name")
}

/// The app's GUID when it is safe as a repository path component.
fn app_guid(env: &StagingEnv) -> Option<&str> {
    env.app_id
        .as_deref()
        .filter(|id| berth_oci::is_app_guid(id))
}

/// 32 hex digits of HMAC-SHA256 under `key` over `parts` joined by NUL. Only the last part may
/// hold a NUL, so no two lists of parts share an input.
fn keyed_id(key: &Secret, parts: &[&[u8]]) -> String {
    let key = hex::decode(key.expose()).expect("validated with the config");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b"\0");
        }
        mac.update(part);
    }
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// `src-ID`: the tag that marks, in the app's repository, its newest staging of `reference`, so
/// a restage can find it by exact name when the source is down. `ID` is an HMAC under the
/// operator's key of the app's GUID, the normalised reference and the credentials the image was
/// read with: a different reference or app never shares it, nobody without the key can name it,
/// and, for an image that needed credentials, nobody without those either, the key leaked or not.
/// Only with a key and the app's GUID, which make the repository the app's own at every staging.
fn record_tag(
    config: &CacherConfig,
    env: &StagingEnv,
    reference: &ImageReference,
    credentials: Option<&Credentials>,
) -> Option<Tag> {
    source_id(config, env, reference, credentials)
        .map(|id| format!("src-{id}").parse().expect("a valid tag"))
}

/// The id of the app's staging source (see [`record_tag`]): under the operator's key; or, where
/// only the app itself may push under its GUID (instance identity) and there is no key, a plain
/// hash, which then also names the app's repository for that source (one repository per app and
/// reference). For an image read without credentials the name is then computable by whoever
/// knows the GUID and the reference, and lets them pull a copy of what they could pull from its
/// origin anyway; for one read with credentials it needs those too; and nobody but the app can
/// push there, so nobody can plant a record for it.
fn source_id(
    config: &CacherConfig,
    env: &StagingEnv,
    reference: &ImageReference,
    credentials: Option<&Credentials>,
) -> Option<String> {
    let app = app_guid(env)?;
    let key = config.repository_key.as_ref();
    if key.is_none() && config.registry.identity != Some(RegistryIdentity::Instance) {
        return None;
    }
    let reference = reference.to_string();
    let mut parts = vec![
        b"staging-source".as_slice(),
        app.as_bytes(),
        reference.as_bytes(),
    ];
    // Neither the reference nor a user name from the command line holds a NUL, so the parts
    // stay apart however the password is spelt.
    if let Some(credentials) = credentials {
        parts.extend([
            credentials.username.as_bytes(),
            credentials.password.expose().as_bytes(),
        ]);
    }
    Some(match key {
        Some(key) => keyed_id(key, &parts),
        None => {
            use sha2::Digest as _;
            let mut hash = Sha256::new();
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    hash.update(b"\0");
                }
                hash.update(part);
            }
            hex::encode(&hash.finalize()[..16])
        }
    })
}

/// `s<unix seconds>-<random>`: sorts by staging time for retention, unique per staging.
fn staging_tag() -> Tag {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("s{seconds:011}-{}", &random[..8])
        .parse()
        .expect("a valid tag")
}

/// Cloud Foundry's trusted certificates, added to the system roots.
fn load_roots(dir: &Path) -> Result<Vec<reqwest::Certificate>, StageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(StageError::Certificates(dir.to_owned(), err.to_string())),
    };
    let mut roots = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            roots.extend(read_pem(&path)?);
        }
    }
    Ok(roots)
}

fn read_pem(path: &Path) -> Result<Vec<reqwest::Certificate>, StageError> {
    let bytes = std::fs::read(path)
        .map_err(|e| StageError::Certificates(path.to_owned(), e.to_string()))?;
    reqwest::Certificate::from_pem_bundle(&bytes)
        .map_err(|e| StageError::Certificates(path.to_owned(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: &str = "5f9c2a1e-0b7d-4c3e-9a61-2d8f4e7b1c90";

    #[test]
    fn repository_names_are_per_app_stable_with_a_key_and_unguessable() {
        let key = Secret::new("00112233445566778899aabbccddeeff".into());
        let first = cache_repository("cache", Some(GUID), Some(&key), None);
        let again = cache_repository("cache", Some(GUID), Some(&key), None);
        assert_eq!(first, again);
        assert!(first.as_str().starts_with(&format!("cache/{GUID}/")));
        let other_key = Secret::new("ffeeddccbbaa99887766554433221100".into());
        assert_ne!(
            first,
            cache_repository("cache", Some(GUID), Some(&other_key), None)
        );
        // Without a key every staging gets a fresh id.
        assert_ne!(
            cache_repository("cache", Some(GUID), None, None),
            cache_repository("cache", Some(GUID), None, None)
        );
        // A GUID that is not a safe path component is not used.
        let odd = cache_repository("cache", Some("../../x"), Some(&key), None);
        assert!(odd.as_str().starts_with("cache/unknown-app/"));
    }

    #[test]
    fn record_tags_are_per_app_and_reference_and_need_a_key() {
        let config = |key: Option<&str>| CacherConfig {
            repository_key: key.map(|key| Secret::new(key.into())),
            ..serde_norway::from_str("registry: {url: 'http://r'}").unwrap()
        };
        let env = |app: &str| StagingEnv {
            app_id: Some(app.into()),
            ..StagingEnv::default()
        };
        let keyed = config(Some("00112233445566778899aabbccddeeff"));
        let tag = |config: &CacherConfig, app: &str, reference: &str| {
            let reference = ImageReference::parse(reference).unwrap();
            record_tag(config, &env(app), &reference, None)
        };
        let first = tag(&keyed, GUID, "team/app:1.0").expect("a tag");
        assert!(first.as_str().starts_with("src-") && first.as_str().len() == 36);
        // The reference is compared normalised.
        assert_eq!(
            Some(&first),
            tag(&keyed, GUID, "docker.io/team/app:1.0").as_ref()
        );
        assert_ne!(Some(&first), tag(&keyed, GUID, "team/app:1.1").as_ref());
        let pinned = format!("team/app:1.0@sha256:{}", "0".repeat(64));
        assert_ne!(Some(&first), tag(&keyed, GUID, &pinned).as_ref());
        let other_app = "0b7d5f9c-2a1e-4c3e-9a61-2d8f4e7b1c90";
        assert_ne!(
            Some(&first),
            tag(&keyed, other_app, "team/app:1.0").as_ref()
        );
        let other_key = config(Some("ffeeddccbbaa99887766554433221100"));
        assert_ne!(Some(&first), tag(&other_key, GUID, "team/app:1.0").as_ref());
        // Without a key or a usable GUID the app's repository is new at every staging, unless
        // only the app may push under its GUID (instance identity): then a plain hash serves.
        assert_eq!(tag(&config(None), GUID, "team/app:1.0"), None);
        let identity = CacherConfig {
            repository_key: None,
            ..serde_norway::from_str("registry: {url: 'https://r', identity: instance}").unwrap()
        };
        let unkeyed = tag(&identity, GUID, "team/app:1.0").expect("a tag");
        assert_ne!(unkeyed, first);
        assert_eq!(
            Some(&unkeyed),
            tag(&identity, GUID, "docker.io/team/app:1.0").as_ref()
        );
        assert_ne!(
            Some(&unkeyed),
            tag(&identity, other_app, "team/app:1.0").as_ref()
        );
        assert_eq!(tag(&keyed, "../x", "team/app:1.0"), None);
        // An image read with credentials is found again only with the same ones.
        let reference = ImageReference::parse("team/app:1.0").unwrap();
        let with = |username: &str, password: &str| {
            let credentials = Credentials {
                username: username.into(),
                password: Secret::new(password.into()),
            };
            record_tag(&keyed, &env(GUID), &reference, Some(&credentials))
        };
        let private = with("alice", "secret");
        assert_eq!(private, with("alice", "secret"));
        for other in [with("alice", "secreT"), with("bob", "secret"), Some(first)] {
            assert_ne!(private, other);
        }
    }

    #[test]
    fn staging_tags_sort_by_time() {
        let tag = staging_tag().to_string();
        assert_eq!(tag.len(), 1 + 11 + 1 + 8);
        assert!(tag.starts_with('s'));
    }
}
