//! Content on shared object storage (S3, Azure Blob, GCS, WebDAV), where every registry instance
//! sees every blob and every upload, so a `POST`, its `PATCH`es and the final `PUT` may each land
//! on a different instance.
//!
//! Layout under the configured prefix, found by key and never by listing (a WebDAV blobstore may
//! not allow `PROPFIND`):
//! - `blobs/<alg>/<xx>/<hex>`: committed content, written only after it was verified.
//! - `uploads/<id>/state`: the session's [`UploadState`] (its parts, in order).
//! - `uploads/<id>/<part>`: the bytes one `PATCH` (or `PUT`) delivered, streamed as they arrive.
//!
//! The running hash of an upload lives in the instance that received its bytes; when that instance
//! finishes a part it writes the digest of everything so far into the state, so a commit on any
//! instance verifies without reading the data back. Only when the hash chain broke (parts from
//! several instances) does the commit re-hash what is stored.

mod cloud;
mod webdav;

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use berth_oci::{Algorithm, Digest, DigestHasher};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{ByteStream, ContentError, ContentStore, UploadId};

pub use cloud::{AzureConfig, GcsConfig, S3Config};
pub use webdav::WebDavConfig;

/// What an object store reports about one object.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ObjectInfo {
    pub(crate) size: u64,
    pub(crate) modified: SystemTime,
}

/// The few operations Berth needs of a store of named objects. Keys are `/`-separated relative
/// paths of safe characters; a missing object is `None` (or no error, for deletes).
#[async_trait]
pub(crate) trait Objects: Send + Sync + 'static {
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ContentError>;

    /// Streams `range` of the object (all of it without one).
    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<ByteStream>, ContentError>;

    /// Reads a small object whole.
    async fn get_all(&self, key: &str) -> Result<Option<Bytes>, ContentError>;

    /// Writes a small object whole, replacing any.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ContentError>;

    /// Writes the object from `body` without holding it whole, visible only once complete;
    /// returns its size. The body ending early is the caller's business: `body` just ends.
    async fn put_stream(&self, key: &str, body: ByteStream) -> Result<u64, ContentError>;

    /// Copies an object, on the store's side where it can.
    async fn copy(&self, from: &str, to: &str) -> Result<(), ContentError>;

    async fn delete(&self, key: &str) -> Result<(), ContentError>;

    /// A URL anyone holding it may `GET` the object from until `expires_in` has passed, where the
    /// store can sign one.
    async fn signed_url(
        &self,
        _key: &str,
        _expires_in: Duration,
    ) -> Result<Option<String>, ContentError> {
        Ok(None)
    }
}

/// An upload session as stored: its parts in order and, when known, the digest of all of them.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct UploadState {
    parts: Vec<Part>,
    /// The sha256 of the parts' bytes, concatenated, as the instance that wrote the last part saw
    /// them; absent when that instance had not seen all the parts before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<Digest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Part {
    name: String,
    size: u64,
}

impl UploadState {
    fn size(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }
}

/// The hash of an upload's first `offset` bytes, as this instance streamed them.
#[derive(Clone)]
struct RunningHash {
    offset: u64,
    hasher: DigestHasher,
}

/// Running hashes of the uploads whose bytes this instance received last; bounded, since a
/// session that moved to another instance never tells this one.
const RUNNING_HASHES: usize = 4096;

pub struct ObjectContentStore {
    objects: Arc<dyn Objects>,
    running: quick_cache::sync::Cache<UploadId, RunningHash>,
    /// Serialises this instance's appends to one session, as a read-modify-write of its state.
    /// Instances do not coordinate: a client sends a session's chunks one after another, and one
    /// that sends two at once through different instances gets a session whose digest fails.
    sessions: quick_cache::sync::Cache<UploadId, Arc<tokio::sync::Mutex<()>>>,
    redirect: Option<Duration>,
}

impl ObjectContentStore {
    pub(crate) fn new(objects: Arc<dyn Objects>) -> Self {
        ObjectContentStore {
            objects,
            running: quick_cache::sync::Cache::new(RUNNING_HASHES),
            sessions: quick_cache::sync::Cache::new(RUNNING_HASHES),
            redirect: None,
        }
    }

    /// Opens the store `config` describes, checking that it answers.
    pub async fn open(config: &ObjectStoreConfig) -> Result<Self, ContentError> {
        let objects: Arc<dyn Objects> = match config {
            ObjectStoreConfig::S3(s3) => Arc::new(cloud::Cloud::s3(s3)?),
            ObjectStoreConfig::Azure(azure) => Arc::new(cloud::Cloud::azure(azure)?),
            ObjectStoreConfig::Gcs(gcs) => Arc::new(cloud::Cloud::gcs(gcs)?),
            ObjectStoreConfig::Webdav(webdav) => Arc::new(webdav::WebDav::new(webdav)?),
        };
        let store = ObjectContentStore::new(objects);
        store.check().await?;
        Ok(store)
    }

    /// Blob `GET`s answer with a redirect to a URL signed for `expires_in`, where the store can
    /// sign one.
    pub fn with_redirects(mut self, expires_in: Duration) -> Self {
        self.redirect = Some(expires_in);
        self
    }

    fn state_key(id: UploadId) -> String {
        format!("uploads/{id}/state")
    }

    fn part_key(id: UploadId, part: &str) -> String {
        format!("uploads/{id}/{part}")
    }

    async fn state(&self, id: UploadId) -> Result<UploadState, ContentError> {
        let bytes = self
            .objects
            .get_all(&Self::state_key(id))
            .await?
            .ok_or(ContentError::UploadUnknown)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ContentError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("upload {id} state: {e}"),
            ))
        })
    }

    async fn write_state(&self, id: UploadId, state: &UploadState) -> Result<(), ContentError> {
        let bytes = serde_json::to_vec(state).expect("upload state serialises");
        self.objects
            .put(&Self::state_key(id), Bytes::from(bytes))
            .await
    }

    /// Deletes an upload's parts, then its state (so a half-deleted session is still found and
    /// can be deleted again).
    async fn remove_upload(&self, id: UploadId, state: &UploadState) -> Result<(), ContentError> {
        for part in &state.parts {
            self.objects.delete(&Self::part_key(id, &part.name)).await?;
        }
        self.objects.delete(&Self::state_key(id)).await?;
        self.running.remove(&id);
        self.sessions.remove(&id);
        Ok(())
    }

    /// Streams an upload's parts in order, as one body.
    fn parts_stream(&self, id: UploadId, state: &UploadState) -> ByteStream {
        let objects = self.objects.clone();
        let keys: Vec<String> = state
            .parts
            .iter()
            .map(|p| Self::part_key(id, &p.name))
            .collect();
        let parts = futures_util::stream::iter(keys).then(move |key| {
            let objects = objects.clone();
            async move {
                match objects.get(&key, None).await {
                    Ok(Some(stream)) => stream,
                    Ok(None) => error_stream(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("upload part {key} is missing"),
                    )),
                    Err(err) => error_stream(io::Error::other(err)),
                }
            }
        });
        Box::pin(parts.flatten())
    }

    async fn hash_parts(
        &self,
        id: UploadId,
        state: &UploadState,
        algorithm: Algorithm,
    ) -> Result<Digest, ContentError> {
        let mut hasher = DigestHasher::new(algorithm);
        let mut parts = self.parts_stream(id, state);
        while let Some(chunk) = parts.next().await {
            hasher.update(&chunk?);
        }
        Ok(hasher.finish())
    }

    /// Makes the verified upload the blob at `key`: a copy on the store's side for one part, a
    /// streamed concatenation for several.
    async fn publish(
        &self,
        id: UploadId,
        state: &UploadState,
        key: &str,
    ) -> Result<(), ContentError> {
        match state.parts.as_slice() {
            [] => self.objects.put(key, Bytes::new()).await,
            [only] => {
                self.objects
                    .copy(&Self::part_key(id, &only.name), key)
                    .await
            }
            _ => {
                let size = self
                    .objects
                    .put_stream(key, self.parts_stream(id, state))
                    .await?;
                if size != state.size() {
                    // A part changed underneath; the blob written is not the one verified.
                    self.objects.delete(key).await?;
                    return Err(ContentError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("upload {id} changed while it was committed"),
                    )));
                }
                Ok(())
            }
        }
    }
}

fn error_stream(err: io::Error) -> ByteStream {
    Box::pin(futures_util::stream::iter([Err(err)]))
}

fn blob_key(digest: &Digest) -> String {
    let hex = digest.hex();
    format!(
        "blobs/{}/{}/{}",
        digest.algorithm().as_str(),
        &hex[..2],
        hex
    )
}

/// Which object store holds the content, as configured under `storage.content`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ObjectStoreConfig {
    S3(S3Config),
    Azure(AzureConfig),
    Gcs(GcsConfig),
    Webdav(WebDavConfig),
}

impl ObjectStoreConfig {
    /// Whether blob `GET`s can be redirected to URLs this store signs.
    pub fn signs_urls(&self) -> bool {
        !matches!(self, ObjectStoreConfig::Webdav(_))
    }
}

/// Requests that move no bulk data must answer within this; bulk transfers are bounded by the
/// client-facing body timeouts instead.
pub(crate) const SMALL_REQUEST: Duration = Duration::from_secs(30);

/// A configuration the store cannot be opened with.
pub(crate) fn invalid(message: impl Into<String>) -> ContentError {
    ContentError::Io(io::Error::new(io::ErrorKind::InvalidInput, message.into()))
}

/// Reads a secret from a file, trimming the line end an editor leaves.
pub(crate) fn read_secret(path: &std::path::Path) -> Result<String, ContentError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ContentError::Io(io::Error::new(
            e.kind(),
            format!("reading {}: {e}", path.display()),
        ))
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// A `PATCH` body that hashes what passes, counts it, and ends (keeping the error aside) when the
/// client's body fails, so the part written holds exactly the bytes that arrived.
struct Metered {
    hash: Option<RunningHash>,
    error: Option<io::Error>,
}

fn metered(body: ByteStream, meter: Arc<std::sync::Mutex<Metered>>) -> ByteStream {
    let stream =
        futures_util::stream::unfold((body, meter, false), |(mut body, meter, done)| async move {
            if done {
                return None;
            }
            match body.next().await {
                Some(Ok(chunk)) => {
                    if let Some(running) = &mut meter.lock().expect("meter poisoned").hash {
                        running.hasher.update(&chunk);
                        running.offset += chunk.len() as u64;
                    }
                    Some((Ok(chunk), (body, meter, false)))
                }
                Some(Err(err)) => {
                    meter.lock().expect("meter poisoned").error = Some(err);
                    None
                }
                None => None,
            }
        });
    Box::pin(stream)
}

#[async_trait]
impl ContentStore for ObjectContentStore {
    /// A read of an object that need not exist: the store answers, with these credentials.
    async fn check(&self) -> Result<(), ContentError> {
        self.objects.head("uploads/.health").await.map(drop)
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, ContentError> {
        Ok(self.objects.head(&blob_key(digest)).await?.map(|i| i.size))
    }

    async fn read(&self, digest: &Digest, range: Range<u64>) -> Result<ByteStream, ContentError> {
        if range.is_empty() {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        self.objects
            .get(&blob_key(digest), Some(range))
            .await?
            .ok_or(ContentError::BlobUnknown)
    }

    async fn read_all(&self, digest: &Digest) -> Result<Bytes, ContentError> {
        self.objects
            .get_all(&blob_key(digest))
            .await?
            .ok_or(ContentError::BlobUnknown)
    }

    async fn redirect_url(&self, digest: &Digest) -> Result<Option<String>, ContentError> {
        match self.redirect {
            Some(expires_in) => self.objects.signed_url(&blob_key(digest), expires_in).await,
            None => Ok(None),
        }
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), ContentError> {
        let actual = digest.same_algorithm_of(&bytes);
        if &actual != digest {
            return Err(ContentError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let key = blob_key(digest);
        if self.objects.head(&key).await?.is_some() {
            return Ok(());
        }
        self.objects.put(&key, bytes).await
    }

    async fn delete(&self, digests: &[Digest]) -> Result<(), ContentError> {
        for digest in digests {
            self.objects.delete(&blob_key(digest)).await?;
        }
        Ok(())
    }

    async fn create_upload(&self, id: UploadId) -> Result<(), ContentError> {
        self.write_state(id, &UploadState::default()).await
    }

    async fn upload_size(&self, id: UploadId) -> Result<u64, ContentError> {
        Ok(self.state(id).await?.size())
    }

    async fn append_upload(
        &self,
        id: UploadId,
        offset: Option<u64>,
        body: ByteStream,
    ) -> Result<u64, ContentError> {
        let session = self
            .sessions
            .get_or_insert_with(&id, || Ok::<_, std::convert::Infallible>(Arc::default()))
            .unwrap_or_else(|never| match never {});
        let _appending = session.lock().await;
        let mut state = self.state(id).await?;
        let size = state.size();
        if let Some(requested) = offset.filter(|&o| o != size) {
            return Err(ContentError::OffsetMismatch {
                actual: size,
                requested,
            });
        }
        let previous = self.running.get(&id).filter(|r| r.offset == size);
        let hash = previous.or_else(|| {
            (size == 0).then(|| RunningHash {
                offset: 0,
                hasher: DigestHasher::new(Algorithm::Sha256),
            })
        });
        let meter = Arc::new(std::sync::Mutex::new(Metered { hash, error: None }));
        let name = format!("{size}-{}", UploadId::new());
        let key = Self::part_key(id, &name);
        let written = self
            .objects
            .put_stream(&key, metered(body, meter.clone()))
            .await?;
        let Metered { hash, error, .. } = std::mem::replace(
            &mut *meter.lock().expect("meter poisoned"),
            Metered {
                hash: None,
                error: None,
            },
        );
        if written > 0 {
            state.parts.push(Part {
                name,
                size: written,
            });
            state.digest = hash.as_ref().map(|h| h.hasher.clone().finish());
            self.write_state(id, &state).await?;
        } else {
            self.objects.delete(&key).await?;
        }
        match hash {
            Some(hash) => self.running.insert(id, hash),
            None => {
                self.running.remove(&id);
            }
        }
        match error {
            Some(err) => Err(ContentError::BodyInterrupted(err)),
            None => Ok(size + written),
        }
    }

    async fn commit_upload(&self, id: UploadId, digest: &Digest) -> Result<u64, ContentError> {
        let state = self.state(id).await?;
        let size = state.size();
        let actual = match &state.digest {
            Some(known) if known.algorithm() == digest.algorithm() => known.clone(),
            _ => self.hash_parts(id, &state, digest.algorithm()).await?,
        };
        if &actual != digest {
            self.remove_upload(id, &state).await?;
            return Err(ContentError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let key = blob_key(digest);
        if self.objects.head(&key).await?.is_none() {
            self.publish(id, &state, &key).await?;
        }
        self.remove_upload(id, &state).await?;
        Ok(size)
    }

    async fn delete_upload(&self, id: UploadId) -> Result<(), ContentError> {
        let state = self.state(id).await?;
        self.remove_upload(id, &state).await
    }

    async fn delete_idle_upload(
        &self,
        id: UploadId,
        idle_since: SystemTime,
    ) -> Result<bool, ContentError> {
        // The state is rewritten by every append, so its age is the session's idle time. Only one
        // instance purges at a time, and a client resuming a session idle this long is rare
        // enough that losing that race costs only its retry from scratch.
        let Some(info) = self.objects.head(&Self::state_key(id)).await? else {
            return Ok(true);
        };
        if info.modified > idle_since {
            return Ok(false);
        }
        match self.state(id).await {
            Ok(state) => self.remove_upload(id, &state).await?,
            Err(ContentError::UploadUnknown) => {}
            Err(err) => return Err(err),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
