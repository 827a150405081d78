//! Metadata store: repositories, tags, manifests and what they reference, blob ownership, referrers
//! and upload sessions.

mod batch;
mod cached;
mod sql;
mod sqlite;

use std::time::SystemTime;

use async_trait::async_trait;
use berth_oci::{Digest, Reference, RepoName, Tag};
use serde::Serialize;

use crate::content::UploadId;
use crate::quota::{Quota, QuotaExceeded, QuotaUsage};

pub use cached::CachedMetadata;
pub use sql::{DatabaseConfig, DatabaseTls, MetadataConfig, SqlMetadataStore, TlsMode};
pub use sqlite::SqliteMetadataStore;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{0} is not in this repository")]
    MissingReference(Digest),
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("connection pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// A shared database (PostgreSQL, MySQL) failed the statement or could not be reached.
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// The store could not be set up as configured (an unreadable password file, a bad URL).
    #[error("{0}")]
    Setup(String),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error("worker thread failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    /// The shared commit a write was part of failed (or never answered).
    #[error("group commit: {0}")]
    GroupCommit(String),
    /// The garbage collector is deleting these bytes right now; write them again shortly.
    #[error("{0} is being garbage-collected; retry")]
    BeingCollected(Digest),
    /// Recording this would take a scope past its quota; nothing was recorded.
    #[error("{0}")]
    QuotaExceeded(QuotaExceeded),
}

impl MetadataError {
    /// The same failure for another write of a failed group commit; a full disk stays one.
    fn replicate(&self) -> MetadataError {
        match self {
            MetadataError::Database(rusqlite::Error::SqliteFailure(failure, message)) => {
                MetadataError::Database(rusqlite::Error::SqliteFailure(*failure, message.clone()))
            }
            other => MetadataError::GroupCommit(other.to_string()),
        }
    }

    /// Whether the database could not write because its disk is full.
    pub fn is_storage_full(&self) -> bool {
        match self {
            MetadataError::Database(rusqlite::Error::SqliteFailure(failure, _)) => {
                failure.code == rusqlite::ErrorCode::DiskFull
            }
            MetadataError::Sql(err) => sql::db::classify(err) == sql::db::Failure::StorageFull,
            _ => false,
        }
    }

    /// Whether the database could not be reached (down, restarting, out of connections) even
    /// after the retries: the request may succeed later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, MetadataError::Sql(err) if sql::db::classify(err) == sql::db::Failure::Unavailable)
    }
}

/// A manifest to record: what it is, and every blob and child manifest it needs.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub subject: Option<Digest>,
    /// The manifest's `annotations` object as JSON text, kept for referrers listings.
    pub annotations: Option<String>,
    pub blobs: Vec<Digest>,
    pub manifests: Vec<Digest>,
    /// Set for a manifest a pull-through cache fetched from its upstream: the sizes of `blobs`,
    /// in order. Blobs the repository does not hold are then linked with these sizes before
    /// their bytes are here (they are fetched when first pulled), and child manifests need not
    /// be recorded yet (they are fetched when asked for by digest). A blob so linked is
    /// collected like any other once unreferenced; with no bytes stored there is nothing to
    /// delete but its row.
    pub upstream_sizes: Option<Vec<u64>>,
}

/// What serving a manifest needs to know before reading its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// One entry of a referrers response (an OCI descriptor).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Referrer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Value>,
}

/// Content the garbage collector found unreferenced or queued for deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    pub digest: Digest,
    pub size: u64,
}

/// Bytes a repository or top-level namespace can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UsageEntry {
    pub name: String,
    pub bytes: u64,
}

/// Storage in use, largest first: each digest counted once per namespace and once per repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Usage {
    pub namespaces: Vec<UsageEntry>,
    pub repositories: Vec<UsageEntry>,
    /// Every scope of the quotas in force that holds anything, fullest (by share) first.
    #[serde(default)]
    pub quota_scopes: Vec<crate::quota::ScopeUsage>,
}

/// A manifest GET served: `repo` gave out manifest `digest` at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    pub repo: RepoName,
    pub digest: Digest,
    pub at: SystemTime,
}

/// A tag and what retention weighs about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedManifest {
    pub repo: RepoName,
    pub tag: Tag,
    pub digest: Digest,
    /// When the tag was last pointed at `digest` (its push, for a staging).
    pub tagged_at: SystemTime,
    /// The last pull of `digest` or of any manifest it lists in `repo` (an index's images), if
    /// one was recorded.
    pub pulled_at: Option<SystemTime>,
}

/// What expiring one tag deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub tags: u64,
    /// The tag's manifest, if no other tag kept it, and the images of an index that nothing else
    /// in the repository kept.
    pub manifests: u64,
}

/// A page of a sorted listing: entries after `last`, at most `limit` of them.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub last: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<String>,
    /// Whether entries follow the last one returned.
    pub more: bool,
}

/// Where registry metadata lives. Every method is one transaction: a reader never sees a tag
/// pointing at a manifest that is not fully recorded.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Size of `digest` if `repo` owns that blob.
    async fn repository_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError>;

    /// Up to `limit` repositories owning the blob `digest`, in name order.
    async fn blob_owners(
        &self,
        digest: &Digest,
        limit: u32,
    ) -> Result<Vec<RepoName>, MetadataError>;

    /// Gives `repo` the blob `digest` another repository already holds (a mount); false if no
    /// repository holds it any more (the garbage collector may have taken it meanwhile).
    async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError>;

    /// Removes `repo`'s ownership of `digest`; false if it had none.
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError>;

    /// Records `manifest` in `repo` and points `tag` at it, after checking that `repo` holds every
    /// blob and child manifest it references ([`MetadataError::MissingReference`] otherwise), or,
    /// for a manifest from an upstream ([`NewManifest::upstream_sizes`]), linking its blobs.
    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetadataError>;

    /// The first blob or child manifest `manifest` references that `repo` does not hold. Asked
    /// before a manifest's bytes are stored, so one that will be refused leaves nothing behind;
    /// [`MetadataStore::put_manifest`] checks again in its transaction.
    async fn missing_reference(
        &self,
        repo: &RepoName,
        manifest: &NewManifest,
    ) -> Result<Option<Digest>, MetadataError>;

    async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<ManifestInfo>, MetadataError>;

    /// Deletes a manifest and every tag pointing at it; false if `repo` had no such manifest.
    /// Bytes no repository holds as a manifest any more are queued for the garbage collector.
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, MetadataError>;

    /// Deletes a tag, leaving its manifest; false if there was no such tag.
    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetadataError>;

    /// Tags of `repo` in lexical order, or `None` if the repository is unknown.
    async fn tags(
        &self,
        repo: &RepoName,
        page: &PageRequest,
    ) -> Result<Option<Page>, MetadataError>;

    async fn repositories(&self, page: &PageRequest) -> Result<Page, MetadataError>;

    /// Manifests in `repo` whose subject is `subject`, optionally only of `artifact_type`.
    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, MetadataError>;

    async fn create_upload(&self, repo: &RepoName, id: UploadId) -> Result<(), MetadataError>;

    /// The repository an upload session belongs to.
    async fn upload_repository(&self, id: UploadId) -> Result<Option<RepoName>, MetadataError>;

    /// Ends upload session `id`; false if it had ended already.
    async fn delete_upload(&self, id: UploadId) -> Result<bool, MetadataError>;

    /// Ends upload session `id` and records that `repo` owns its committed blob `digest` of
    /// `size` bytes, in one transaction; false if the session had ended already (the blob is
    /// linked either way).
    async fn complete_upload(
        &self,
        id: UploadId,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, MetadataError>;

    /// Every upload session and when it started.
    async fn uploads(&self) -> Result<Vec<(UploadId, SystemTime)>, MetadataError>;

    /// Up to `limit` blobs, after `after` in digest order, that no manifest of any repository
    /// references and no repository was given since `linked_before`, changing nothing (what a
    /// collection would take). A read: the registry's writes go on meanwhile.
    async fn unreferenced(
        &self,
        linked_before: SystemTime,
        after: Option<&Digest>,
        limit: u32,
    ) -> Result<Vec<Garbage>, MetadataError>;

    /// Queues for deletion those of `candidates` that are still as [`MetadataStore::unreferenced`]
    /// found them, deciding again in the transaction that removes each blob's row and every
    /// repository's link to it: from then on no pull, mount or manifest push can reach it, and a
    /// push of its bytes takes it back. Returns what it queued.
    async fn queue_unreferenced(
        &self,
        linked_before: SystemTime,
        candidates: &[Digest],
    ) -> Result<Vec<Garbage>, MetadataError>;

    /// Up to `limit` queued digests, including those a sweep that died had claimed.
    async fn queued_garbage(&self, limit: u32) -> Result<Vec<Garbage>, MetadataError>;

    /// Claims the queued `digests` for deleting their bytes, in one transaction; returns those
    /// still queued (a push may have taken some back) and not held by a push. Until [`MetadataStore::end_sweep`], pushes
    /// of those bytes fail with [`MetadataError::BeingCollected`].
    async fn begin_sweep(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetadataError>;

    /// Removes `digests` from the queue once their bytes are gone.
    async fn end_sweep(&self, digests: &[Digest]) -> Result<(), MetadataError>;

    /// Up to `limit` manifests of repositories under `prefix` (every repository if empty),
    /// created before `created_before`, that no tag points at, no index in their repository
    /// lists, and whose subject (if any) is gone from their repository.
    async fn untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError>;

    /// Deletes what [`MetadataStore::untagged_manifests`] finds, in one transaction that decides
    /// and deletes together (a tag or index pushed meanwhile keeps its manifest), queueing bytes
    /// no repository holds any more; returns what it deleted.
    async fn delete_untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError>;

    /// Storage in use per top-level namespace and per repository.
    async fn usage(&self) -> Result<Usage, MetadataError>;

    /// Records manifest pulls in one transaction; a manifest's last pull only moves forward, and
    /// pulls of manifests that are gone are dropped.
    async fn record_pulls(&self, pulls: &[Pull]) -> Result<(), MetadataError>;

    /// Every tag of repositories under `prefix` (the repository itself or below it; all if
    /// empty), by repository, newest tagged first.
    async fn tags_under(&self, prefix: &str) -> Result<Vec<TaggedManifest>, MetadataError>;

    /// Deletes tag `tag` of `repo` if it still points at `digest`, was tagged no later than
    /// `tagged_at`, and (with `pulled_before`) what it names was last pulled before that; then the
    /// manifest if no tag points at it any more and no index in `repo` lists it, and likewise
    /// the images of a deleted index. One transaction: a tag moved or pushed again meanwhile, or a
    /// pull recorded meanwhile, keeps everything. Deleted manifests' bytes are queued as by
    /// [`MetadataStore::delete_manifest`].
    async fn expire_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        tagged_at: SystemTime,
        pulled_before: Option<SystemTime>,
    ) -> Result<Expired, MetadataError>;
    /// Makes `quotas` the ones in force. From then on every write that gives a repository a
    /// digest its scope does not hold yet (an upload completing, a mount, a manifest) fails with
    /// [`MetadataError::QuotaExceeded`] if that takes a scope past its limit, checked in the
    /// write's own transaction; bytes a refused upload or manifest published are queued for the
    /// collector unless someone holds them. A new rule's scopes are counted from what is stored.
    async fn set_quotas(&self, quotas: &[Quota]) -> Result<(), MetadataError>;

    /// Whether `repo` could be given `digest` of `size` bytes now without passing a quota, asked
    /// before the bytes are published so a refused push usually publishes nothing.
    async fn check_quotas(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError>;

    /// Use against each quota in force.
    async fn quota_usage(&self) -> Result<Vec<QuotaUsage>, MetadataError>;

    /// Takes or renews the lease `name` for `holder` for `ttl` (by the database's clock); true if
    /// `holder` holds it now. Work that must run on one instance at a time runs only while its
    /// instance holds the lease; one that dies loses it when it expires.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError>;

    /// Gives the lease up early, if `holder` holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetadataError>;

    /// Whether several registry processes may use this store at once (a shared database). Pushes
    /// then hold their digests here ([`MetadataStore::hold`]); with the embedded store, which one
    /// process owns, they hold them in that process's memory ([`crate::gc::Reservations`]).
    fn is_shared(&self) -> bool {
        false
    }

    /// Holds `digest` under the id `hold` for a push, from before its bytes are stored until they
    /// are recorded, for `ttl` at most: [`MetadataStore::begin_sweep`] claims no held digest.
    /// False, holding nothing, while a sweep has claimed the digest (try again shortly: the push
    /// then writes the bytes anew).
    async fn hold(
        &self,
        digest: &Digest,
        hold: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError>;

    /// Ends the hold `hold`.
    async fn release(&self, hold: &str) -> Result<(), MetadataError>;
}

#[cfg(test)]
pub(crate) mod behaviour;
