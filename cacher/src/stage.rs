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
use crate::config::{CacherConfig, RegistryIdentity};
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
    let source_options = ClientOptions {
        credentials: request.credentials,
        insecure: request.insecure_registries.contains(&reference.registry),
        extra_roots: roots.clone(),
        identity: None,
        retry,
    };
    // The destination's client is built on another thread while the source is contacted: loading
    // the system roots takes milliseconds a re-cache would otherwise wait for.
    let caching = config.filter(|config| env.cache.unwrap_or(config.cache_by_default));
    let building = caching.map(|config| {
        let (config, env) = (config.clone(), env.clone());
        tokio::task::spawn_blocking(move || destination(&config, &env, roots, retry))
    });
    let source = Source {
        client: Arc::new(RegistryClient::connect(reference.api_host(), source_options).await?),
        repo: reference.repository.clone(),
        reference: reference.manifest_reference(),
    };
    let platform = match config {
        Some(config) => Platform::parse(&config.platform).expect("validated with the config"),
        None => Platform::parse("linux/amd64").expect("valid platform"),
    };
    let image = copy::resolve(&source, &platform).await?;
    let dest = match building {
        Some(building) => Some(building.await.expect("building a client does not panic")?),
        None => None,
    };
    // The config (for the metadata) is read while the layers stream: a slow upstream answers
    // even a small blob in milliseconds. A bad config stops the copy, which cancels its uploads.
    // A failed copy (a stalled source that ran out its time, say) abandons the config too.
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
                let copied = cache(&reference, &source, &image, config, dest, &stop).await;
                if copied.is_err() {
                    copy_failed.cancel();
                }
                copied
            };
            match tokio::join!(metadata, copied) {
                // A bad config is why the copy stopped.
                (Some(Err(err)), _) | (_, Err(err)) => return Err(err),
                (Some(Ok(metadata)), Ok(copied)) => (metadata, copied),
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
    let bytes = result::render(&docker_image, &metadata)?;
    result::write(&request.output, &bytes)
        .map_err(|e| StageError::WriteResult(request.output.clone(), e))?;
    Ok(docker_image)
}

/// The app's repository in the internal registry.
fn destination(
    config: &CacherConfig,
    env: &StagingEnv,
    mut roots: Vec<reqwest::Certificate>,
    retry: RetryPolicy,
) -> Result<Destination, StageError> {
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
    Ok(Destination {
        client: Arc::new(RegistryClient::new(
            &config.registry.url,
            ClientOptions {
                credentials,
                insecure: false,
                extra_roots: roots,
                identity,
                retry,
            },
        )?),
        repo: cache_repository(
            &config.namespace,
            app_id.as_deref(),
            config.repository_key.as_ref(),
        ),
    })
}

async fn cache(
    reference: &ImageReference,
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
        tag: Some(staging_tag()),
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
fn cache_repository(namespace: &str, app_id: Option<&str>, key: Option<&Secret>) -> RepoName {
    let app = app_id.filter(|id| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-')
    });
    let id = match (app, key) {
        (Some(app), Some(key)) => {
            let key = hex::decode(key.expose()).expect("validated with the config");
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
            mac.update(app.as_bytes());
            hex::encode(&mac.finalize().into_bytes()[..16])
        }
        _ => uuid::Uuid::new_v4().simple().to_string(),
    };
    format!("{namespace}/{}/{id}", app.unwrap_or("unknown-app"))
        .parse()
        .expect("namespace, GUID and hex id form a valid name")
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
        let first = cache_repository("cache", Some(GUID), Some(&key));
        let again = cache_repository("cache", Some(GUID), Some(&key));
        assert_eq!(first, again);
        assert!(first.as_str().starts_with(&format!("cache/{GUID}/")));
        let other_key = Secret::new("ffeeddccbbaa99887766554433221100".into());
        assert_ne!(
            first,
            cache_repository("cache", Some(GUID), Some(&other_key))
        );
        // Without a key every staging gets a fresh id.
        assert_ne!(
            cache_repository("cache", Some(GUID), None),
            cache_repository("cache", Some(GUID), None)
        );
        // A GUID that is not a safe path component is not used.
        let odd = cache_repository("cache", Some("../../x"), Some(&key));
        assert!(odd.as_str().starts_with("cache/unknown-app/"));
    }

    #[test]
    fn staging_tags_sort_by_time() {
        let tag = staging_tag().to_string();
        assert_eq!(tag.len(), 1 + 11 + 1 + 8);
        assert!(tag.starts_with('s'));
    }
}
