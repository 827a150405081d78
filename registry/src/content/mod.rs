//! Content store: blob and manifest bytes addressed by digest, and the upload data that becomes them.

mod chunks;
mod fs;
mod local_cache;
mod objects;

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::str::FromStr;
use std::time::SystemTime;

use async_trait::async_trait;
use berth_oci::Digest;
use bytes::Bytes;
use futures_util::Stream;

pub use fs::FsContentStore;
pub use local_cache::LocalCache;
pub use objects::{
    AzureConfig, GcsConfig, ObjectContentStore, ObjectStoreConfig, S3Config, WebDavConfig,
};

/// A stream of bytes flowing into or out of the store.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Identifies an upload session. Always a UUID, so it is safe in paths and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UploadId(uuid::Uuid);

impl UploadId {
    pub fn new() -> Self {
        UploadId(uuid::Uuid::new_v4())
    }
}

impl Default for UploadId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for UploadId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::try_parse(s).map(UploadId)
    }
}

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("blob unknown")]
    BlobUnknown,
    #[error("upload unknown")]
    UploadUnknown,
    #[error("upload holds {actual} bytes, the request starts at {requested}")]
    OffsetMismatch { actual: u64, requested: u64 },
    #[error("uploaded content hashes to {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("the request body ended early: {0}")]
    BodyInterrupted(io::Error),
    #[error("storage is full")]
    StorageFull,
    /// Object storage failed or did not answer; another attempt may succeed.
    #[error("object storage: {0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ContentError {
    /// Classifies an I/O error from the backing store, so a full disk is reported as such.
    pub(crate) fn from_io(err: io::Error) -> Self {
        if err.raw_os_error() == Some(28) || err.kind() == io::ErrorKind::StorageFull {
            ContentError::StorageFull
        } else {
            ContentError::Io(err)
        }
    }
}

/// Where blob and manifest bytes live.
///
/// Invariants every backend keeps: a blob becomes readable under a digest only after its bytes were
/// verified to hash to that digest, and only whole (commit is atomic); upload data survives a
/// process restart so sessions can be resumed.
#[async_trait]
pub trait ContentStore: Send + Sync + 'static {
    /// Whether the store answers, for health checks.
    async fn check(&self) -> Result<(), ContentError>;

    /// Size of the committed blob, or `None` if there is none.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, ContentError>;

    /// Streams `range` of a committed blob.
    async fn read(&self, digest: &Digest, range: Range<u64>) -> Result<ByteStream, ContentError>;

    /// The committed blob as an open local file, for backends that keep one, so the server can
    /// let the kernel send it. `None` means such a backend has no file for it: use [`read`](Self::read).
    async fn open_file(&self, _digest: &Digest) -> Result<Option<std::fs::File>, ContentError> {
        Ok(None)
    }

    /// A URL the client may fetch the committed blob from instead, where the backend is set up to
    /// hand out signed ones.
    async fn redirect_url(&self, _digest: &Digest) -> Result<Option<String>, ContentError> {
        Ok(None)
    }

    /// Reads a small committed object, such as a manifest, whole.
    async fn read_all(&self, digest: &Digest) -> Result<Bytes, ContentError>;

    /// Stores `bytes` under `digest`, verifying first that they hash to it. Idempotent.
    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), ContentError>;

    /// Deletes committed objects `digests`, durably once it returns; one that is not there is no
    /// error. Only the garbage collector calls it, for content the metadata says nothing can
    /// reach, in batches so that a backend can make a batch durable at once.
    async fn delete(&self, digests: &[Digest]) -> Result<(), ContentError>;

    /// Starts empty upload data for `id`.
    async fn create_upload(&self, id: UploadId) -> Result<(), ContentError>;

    /// Bytes received so far for upload `id`.
    async fn upload_size(&self, id: UploadId) -> Result<u64, ContentError>;

    /// Appends `body` to upload `id`. When `offset` is given the upload must hold exactly that many
    /// bytes. Returns the upload's new size. Bytes that arrived before the body failed are kept, so
    /// the client can resume from the reported size.
    async fn append_upload(
        &self,
        id: UploadId,
        offset: Option<u64>,
        body: ByteStream,
    ) -> Result<u64, ContentError>;

    /// Verifies upload `id` against `digest` and atomically makes it the blob `digest`, returning
    /// its size. On a mismatch the upload data is discarded and nothing becomes visible.
    async fn commit_upload(&self, id: UploadId, digest: &Digest) -> Result<u64, ContentError>;

    /// Discards upload `id`.
    async fn delete_upload(&self, id: UploadId) -> Result<(), ContentError>;

    /// Discards upload `id` if its data has not changed since `idle_since`, deciding and deleting
    /// under the session's lock so an append cannot slip in between. True if the upload is gone.
    async fn delete_idle_upload(
        &self,
        id: UploadId,
        idle_since: SystemTime,
    ) -> Result<bool, ContentError>;
}

#[cfg(test)]
pub(crate) mod behaviour;
