//! A read-through cache in front of a metadata store for the two lookups every pull makes.
//!
//! Resolving a manifest reference and checking blob ownership are answered from memory, so a
//! pull of hot content never waits for a database thread. Correct only while every write goes
//! through this process, which the data-directory lock guarantees for the embedded store.
//!
//! Invalidation is by generation: each write bumps a counter after it commits and an entry is
//! trusted only if it was read under the current one. A reader that raced a write therefore
//! stores an entry that is already stale, never one that looks fresh.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use berth_oci::{Digest, Reference, RepoName, Tag};

use super::{
    Expired, Garbage, ManifestInfo, MetadataError, MetadataStore, NewManifest, Page, PageRequest,
    Pull, Referrer, TaggedManifest, Usage,
};
use crate::content::UploadId;
use crate::quota::{Quota, QuotaUsage};

/// Entries per cache; an entry is a few hundred bytes, so each cache stays within a few MiB.
const ENTRIES: usize = 16_384;

/// Values read under one generation of the data they depend on.
struct Generational<K, V> {
    generation: AtomicU64,
    entries: quick_cache::sync::Cache<K, (u64, V)>,
}

impl<K, V> Generational<K, V>
where
    K: Eq + std::hash::Hash + Clone,
    V: Clone,
{
    fn new() -> Self {
        Generational {
            generation: AtomicU64::new(0),
            entries: quick_cache::sync::Cache::new(ENTRIES),
        }
    }

    async fn get_or_read<F>(&self, key: K, read: F) -> Result<V, MetadataError>
    where
        F: Future<Output = Result<V, MetadataError>>,
    {
        let current = self.generation.load(Ordering::Acquire);
        if let Some((generation, value)) = self.entries.get(&key)
            && generation == current
        {
            return Ok(value);
        }
        let value = read.await?;
        self.entries.insert(key, (current, value.clone()));
        Ok(value)
    }

    /// Marks everything read so far as stale; called after a write has committed (or failed).
    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

pub struct CachedMetadata<S> {
    inner: S,
    manifests: Generational<(RepoName, Reference), Option<ManifestInfo>>,
    blobs: Generational<(RepoName, Digest), Option<u64>>,
}

impl<S: MetadataStore> CachedMetadata<S> {
    pub fn new(inner: S) -> Self {
        CachedMetadata {
            inner,
            manifests: Generational::new(),
            blobs: Generational::new(),
        }
    }

    /// Runs a write, then invalidates what it may have changed whatever its outcome: a write
    /// that failed late may still have committed.
    async fn writing<T>(
        &self,
        manifests: bool,
        blobs: bool,
        write: impl Future<Output = Result<T, MetadataError>>,
    ) -> Result<T, MetadataError> {
        let result = write.await;
        if manifests {
            self.manifests.invalidate();
        }
        if blobs {
            self.blobs.invalidate();
        }
        result
    }
}

#[async_trait]
impl<S: MetadataStore> MetadataStore for CachedMetadata<S> {
    async fn repository_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError> {
        let key = (repo.clone(), digest.clone());
        self.blobs
            .get_or_read(key, self.inner.repository_blob(repo, digest))
            .await
    }

    async fn blob_owners(
        &self,
        digest: &Digest,
        limit: u32,
    ) -> Result<Vec<RepoName>, MetadataError> {
        self.inner.blob_owners(digest, limit).await
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError> {
        self.writing(false, true, self.inner.link_blob(repo, digest))
            .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError> {
        self.writing(false, true, self.inner.unlink_blob(repo, digest))
            .await
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetadataError> {
        self.writing(true, true, self.inner.put_manifest(repo, manifest, tag))
            .await
    }

    async fn missing_reference(
        &self,
        repo: &RepoName,
        manifest: &NewManifest,
    ) -> Result<Option<Digest>, MetadataError> {
        self.inner.missing_reference(repo, manifest).await
    }

    async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<ManifestInfo>, MetadataError> {
        let key = (repo.clone(), reference.clone());
        self.manifests
            .get_or_read(key, self.inner.manifest(repo, reference))
            .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        self.writing(true, true, self.inner.delete_manifest(repo, digest))
            .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetadataError> {
        self.writing(true, false, self.inner.delete_tag(repo, tag))
            .await
    }

    async fn tags(
        &self,
        repo: &RepoName,
        page: &PageRequest,
    ) -> Result<Option<Page>, MetadataError> {
        self.inner.tags(repo, page).await
    }

    async fn repositories(&self, page: &PageRequest) -> Result<Page, MetadataError> {
        self.inner.repositories(page).await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, MetadataError> {
        self.inner.referrers(repo, subject, artifact_type).await
    }

    async fn create_upload(&self, repo: &RepoName, id: UploadId) -> Result<(), MetadataError> {
        self.inner.create_upload(repo, id).await
    }

    async fn upload_repository(&self, id: UploadId) -> Result<Option<RepoName>, MetadataError> {
        self.inner.upload_repository(id).await
    }

    async fn delete_upload(&self, id: UploadId) -> Result<bool, MetadataError> {
        self.inner.delete_upload(id).await
    }

    async fn complete_upload(
        &self,
        id: UploadId,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, MetadataError> {
        self.writing(
            false,
            true,
            self.inner.complete_upload(id, repo, digest, size),
        )
        .await
    }

    async fn uploads(&self) -> Result<Vec<(UploadId, SystemTime)>, MetadataError> {
        self.inner.uploads().await
    }

    async fn unreferenced(
        &self,
        linked_before: SystemTime,
        after: Option<&Digest>,
        limit: u32,
    ) -> Result<Vec<Garbage>, MetadataError> {
        self.inner.unreferenced(linked_before, after, limit).await
    }

    async fn queue_unreferenced(
        &self,
        linked_before: SystemTime,
        candidates: &[Digest],
    ) -> Result<Vec<Garbage>, MetadataError> {
        self.writing(
            false,
            true,
            self.inner.queue_unreferenced(linked_before, candidates),
        )
        .await
    }

    async fn queued_garbage(&self, limit: u32) -> Result<Vec<Garbage>, MetadataError> {
        self.inner.queued_garbage(limit).await
    }

    async fn begin_sweep(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetadataError> {
        self.inner.begin_sweep(digests).await
    }

    async fn end_sweep(&self, digests: &[Digest]) -> Result<(), MetadataError> {
        self.inner.end_sweep(digests).await
    }

    async fn untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
        self.inner
            .untagged_manifests(prefix, created_before, limit)
            .await
    }

    async fn delete_untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
        self.writing(
            true,
            true,
            self.inner
                .delete_untagged_manifests(prefix, created_before, limit),
        )
        .await
    }

    async fn usage(&self) -> Result<Usage, MetadataError> {
        self.inner.usage().await
    }

    async fn record_pulls(&self, pulls: &[Pull]) -> Result<(), MetadataError> {
        self.inner.record_pulls(pulls).await
    }

    async fn tags_under(&self, prefix: &str) -> Result<Vec<TaggedManifest>, MetadataError> {
        self.inner.tags_under(prefix).await
    }

    async fn expire_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        tagged_at: SystemTime,
        pulled_before: Option<SystemTime>,
    ) -> Result<Expired, MetadataError> {
        self.writing(
            true,
            true,
            self.inner
                .expire_tag(repo, tag, digest, tagged_at, pulled_before),
        )
        .await
    }

    async fn set_quotas(&self, quotas: &[Quota]) -> Result<(), MetadataError> {
        self.inner.set_quotas(quotas).await
    }

    async fn check_quotas(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError> {
        self.inner.check_quotas(repo, digest, size).await
    }

    async fn quota_usage(&self) -> Result<Vec<QuotaUsage>, MetadataError> {
        self.inner.quota_usage().await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError> {
        self.inner.acquire_lease(name, holder, ttl).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetadataError> {
        self.inner.release_lease(name, holder).await
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    async fn hold(
        &self,
        digest: &Digest,
        hold: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError> {
        self.inner.hold(digest, hold, ttl).await
    }

    async fn release(&self, hold: &str) -> Result<(), MetadataError> {
        self.inner.release(hold).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::SqliteMetadataStore;

    fn cached_store(dir: &tempfile::TempDir) -> CachedMetadata<SqliteMetadataStore> {
        CachedMetadata::new(SqliteMetadataStore::open(&dir.path().join("m.sqlite")).unwrap())
    }

    #[tokio::test]
    async fn passes_the_metadata_behaviour_suite() {
        let dir = tempfile::tempdir().unwrap();
        crate::metadata::behaviour::run_all(&cached_store(&dir)).await;
    }

    #[tokio::test]
    async fn an_entry_read_before_a_write_is_never_served_after_it() {
        let cache: Generational<&str, u32> = Generational::new();
        // The read starts, a write commits and invalidates, then the read finishes with the old
        // value: it is stored, but under a generation that is already over.
        let old = cache.get_or_read("k", async {
            cache.invalidate();
            Ok(1)
        });
        assert_eq!(old.await.unwrap(), 1);
        let fresh = cache.get_or_read("k", async { Ok(2) }).await.unwrap();
        assert_eq!(fresh, 2);
        let hit = cache
            .get_or_read("k", async { panic!("should be served from memory") })
            .await
            .unwrap();
        assert_eq!(hit, 2);
    }

    #[tokio::test]
    async fn a_moved_tag_is_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = cached_store(&dir);
        let repo: RepoName = "app/web".parse().unwrap();
        let tag: Tag = "latest".parse().unwrap();
        let reference = Reference::Tag(tag.clone());
        for body in [&b"one"[..], b"two"] {
            let manifest = crate::metadata::behaviour::manifest(body, vec![]);
            store
                .put_manifest(&repo, &manifest, Some(&tag))
                .await
                .unwrap();
            let seen = store.manifest(&repo, &reference).await.unwrap().unwrap();
            assert_eq!(seen.digest, manifest.digest);
        }
        store.delete_tag(&repo, &tag).await.unwrap();
        assert_eq!(store.manifest(&repo, &reference).await.unwrap(), None);
    }
}
