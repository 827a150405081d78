//! S3-compatible storage, Azure Blob Storage and Google Cloud Storage through the `object_store`
//! crate, configured from `storage.content`.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutPayload};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{ObjectInfo, Objects, SMALL_REQUEST, invalid, read_secret};
use crate::content::{ByteStream, ContentError};

/// An S3-compatible bucket: AWS S3, MinIO, Ceph RGW, SeaweedFS.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// The service's URL, for anything but AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Address the bucket in the path (`endpoint/bucket/key`), as most S3-compatible stores need.
    #[serde(default)]
    pub path_style: bool,
    /// With `secret_access_key_file`; without both, AWS's standard environment variables, web
    /// identity or the instance profile supply credentials.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign the service's certificate, beside the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Keys start with this (a folder in a shared bucket).
    #[serde(default)]
    pub prefix: String,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// An Azure Blob Storage container.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    pub account: String,
    pub container: String,
    /// The account's shared key; without it, Azure's standard environment (service principal,
    /// managed identity) supplies credentials.
    #[serde(default)]
    pub access_key_file: Option<PathBuf>,
    /// The blob service's URL where it is not `https://<account>.blob.core.windows.net`
    /// (an emulator, a sovereign cloud).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub prefix: String,
}

/// A Google Cloud Storage bucket.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    pub bucket: String,
    /// A service account's JSON key; without it, the application default credentials.
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    #[serde(default)]
    pub prefix: String,
}

// Credentials stay out of logs: only what locates the store is printed.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AzureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureConfig")
            .field("account", &self.account)
            .field("container", &self.container)
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for GcsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsConfig")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Bytes an upload part buffers before it becomes a multipart upload, and the size of each part
/// sent: with two parts in flight, what one upload holds in memory is bounded by three of them.
const PART_BYTES: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 2;

pub(super) struct Cloud {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    prefix: String,
}

fn client_options(ca_file: Option<&PathBuf>) -> Result<ClientOptions, ContentError> {
    // No total timeout: it would cut a long blob download to a slow client mid-stream.
    let mut options = ClientOptions::new()
        .with_timeout_disabled()
        .with_connect_timeout(Duration::from_secs(5));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            ContentError::Io(std::io::Error::new(
                e.kind(),
                format!("reading {}: {e}", path.display()),
            ))
        })?;
        for certificate in object_store::Certificate::from_pem_bundle(&pem).map_err(store_error)? {
            options = options.with_root_certificate(certificate);
        }
    }
    Ok(options)
}

impl Cloud {
    pub(super) fn s3(config: &S3Config) -> Result<Self, ContentError> {
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_client_options(client_options(config.ca_file.as_ref())?);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        match (&config.access_key_id, &config.secret_access_key_file) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(read_secret(secret)?);
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "storage.content.s3: give access_key_id and secret_access_key_file together",
                ));
            }
        }
        let store = Arc::new(builder.build().map_err(store_error)?);
        Ok(Cloud {
            signer: Some(store.clone()),
            store,
            prefix: config.prefix.clone(),
        })
    }

    pub(super) fn azure(config: &AzureConfig) -> Result<Self, ContentError> {
        let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_account(&config.account)
            .with_container_name(&config.container)
            .with_client_options(client_options(config.ca_file.as_ref())?);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint.clone())
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(key) = &config.access_key_file {
            builder = builder.with_access_key(read_secret(key)?);
        }
        let store = Arc::new(builder.build().map_err(store_error)?);
        Ok(Cloud {
            signer: Some(store.clone()),
            store,
            prefix: config.prefix.clone(),
        })
    }

    pub(super) fn gcs(config: &GcsConfig) -> Result<Self, ContentError> {
        let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(&config.bucket)
            .with_client_options(client_options(None)?);
        if let Some(key) = &config.service_account_file {
            builder = builder.with_service_account_path(key.to_string_lossy());
        }
        let store = Arc::new(builder.build().map_err(store_error)?);
        Ok(Cloud {
            signer: Some(store.clone()),
            store,
            prefix: config.prefix.clone(),
        })
    }

    fn path(&self, key: &str) -> Path {
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{prefix}/{key}"))
        }
    }
}

pub(super) fn store_error(err: object_store::Error) -> ContentError {
    ContentError::Store(Box::new(err))
}

fn timed_out() -> ContentError {
    ContentError::Store("object storage did not answer in time".into())
}

async fn small<T>(
    request: impl Future<Output = object_store::Result<T>>,
) -> Result<Option<T>, ContentError> {
    match tokio::time::timeout(SMALL_REQUEST, request).await {
        Err(_) => Err(timed_out()),
        Ok(Ok(value)) => Ok(Some(value)),
        Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
        Ok(Err(err)) => Err(store_error(err)),
    }
}

#[async_trait]
impl Objects for Cloud {
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ContentError> {
        Ok(small(self.store.head(&self.path(key)))
            .await?
            .map(|meta| ObjectInfo {
                size: meta.size,
                modified: meta.last_modified.into(),
            }))
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<ByteStream>, ContentError> {
        let options = GetOptions {
            range: range.map(Into::into),
            ..GetOptions::default()
        };
        let Some(result) = small(self.store.get_opts(&self.path(key), options)).await? else {
            return Ok(None);
        };
        Ok(Some(Box::pin(
            result.into_stream().map_err(std::io::Error::other),
        )))
    }

    async fn get_all(&self, key: &str) -> Result<Option<Bytes>, ContentError> {
        let path = self.path(key);
        small(async { self.store.get(&path).await?.bytes().await }).await
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ContentError> {
        small(
            self.store
                .put(&self.path(key), PutPayload::from_bytes(bytes)),
        )
        .await?;
        Ok(())
    }

    async fn put_stream(&self, key: &str, mut body: ByteStream) -> Result<u64, ContentError> {
        let mut writer = object_store::buffered::BufWriter::with_capacity(
            self.store.clone(),
            self.path(key),
            PART_BYTES,
        )
        .with_max_concurrency(PARTS_IN_FLIGHT);
        let mut size = 0u64;
        let written: Result<(), ContentError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(ContentError::Io)?;
                size += chunk.len() as u64;
                writer.put(chunk).await.map_err(store_error)?;
            }
            writer
                .shutdown()
                .await
                .map_err(|e| ContentError::Store(Box::new(e)))
        }
        .await;
        if let Err(err) = written {
            // An unfinished multipart upload is invisible; aborting frees its parts at once.
            let _ = writer.abort().await;
            return Err(err);
        }
        Ok(size)
    }

    async fn copy(&self, from: &str, to: &str) -> Result<(), ContentError> {
        match self.store.copy(&self.path(from), &self.path(to)).await {
            Ok(()) => Ok(()),
            Err(err) => Err(store_error(err)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ContentError> {
        small(self.store.delete(&self.path(key))).await?;
        Ok(())
    }

    async fn signed_url(
        &self,
        key: &str,
        expires_in: Duration,
    ) -> Result<Option<String>, ContentError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(reqwest::Method::GET, &self.path(key), expires_in)
            .await
            .map_err(store_error)?;
        Ok(Some(url.to_string()))
    }
}
