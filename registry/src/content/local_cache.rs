//! A bounded copy on local disk of blobs read from an object store, so repeated pulls through one instance are served from its own disk (by `sendfile` on plain HTTP/1) instead of the store.
//!
//! A blob enters the copy when a read from its first byte has streamed to the end and the bytes
//! hashed to its digest; until then it is a temporary file that nothing serves. Copies and the
//! temporary files being filled together stay within the limit: a fill starts only once room for
//! the whole blob is made, by evicting the least recently used copies. The copy starts empty
//! at every start, which deletes whatever a crash left half-written and needs no scan. Deleting a
//! blob (garbage collection) removes this instance's copy; other instances keep theirs until
//! evicted, which serves nobody anything wrong: blobs are immutable, and every read of one is first
//! authorised by the metadata, which no longer links it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;
use berth_oci::{Digest, DigestHasher};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{ByteStream, ContentError, ContentStore, UploadId, chunks};
use crate::metrics::Metrics;

/// Chunks queued between a read and the file it fills: when the disk falls behind, the read waits
/// rather than hold more.
const FILL_AHEAD: usize = 4;

/// `inner` with a copy of the blobs read from it kept in a local directory.
pub struct LocalCache {
    inner: Arc<dyn ContentStore>,
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    metrics: Metrics,
}

#[derive(Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    bytes: u64,
    /// Bytes of the temporary files of fills under way, counted against the limit too.
    filling_bytes: u64,
    /// Recency ticks: a larger `used` is a more recent use.
    clock: u64,
    /// Fills under way, by digest, with their number. A delete takes the digest out, so a fill
    /// that began before it is not published after it.
    filling: HashMap<Digest, u64>,
    fills: u64,
}

struct Entry {
    size: u64,
    used: u64,
}

impl LocalCache {
    /// Keeps up to `max_bytes` of the blobs read from `inner` in `dir`, which is emptied first,
    /// counting its hits and misses in `metrics`.
    pub fn open(
        inner: Arc<dyn ContentStore>,
        dir: impl Into<PathBuf>,
        max_bytes: u64,
        metrics: Metrics,
    ) -> io::Result<LocalCache> {
        let dir = dir.into();
        metrics.set_blob_cache_bytes(0);
        match fs::remove_dir_all(&dir) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => fs::create_dir_all(&dir)?,
        }
        Ok(LocalCache {
            inner,
            shared: Arc::new(Shared {
                dir,
                max_bytes,
                index: Mutex::default(),
                metrics,
            }),
        })
    }

    /// The local copy of `digest`, opened, if there is one.
    async fn hit(&self, digest: &Digest) -> Result<Option<File>, ContentError> {
        // A miss, the common case on a store read, is answered without a trip to the blocking pool.
        if !self.shared.index().entries.contains_key(digest) {
            return Ok(None);
        }
        let (shared, digest) = (self.shared.clone(), digest.clone());
        let file = tokio::task::spawn_blocking(move || shared.open(&digest))
            .await
            .map_err(|e| ContentError::Io(io::Error::other(e)))?;
        if file.is_some() {
            self.shared.metrics.blob_cache_read(true);
        }
        Ok(file)
    }
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}", digest.algorithm().as_str(), digest.hex()))
    }

    /// Opens the copy of `digest` and marks it used; `None` if there is none.
    fn open(&self, digest: &Digest) -> Option<File> {
        {
            let mut index = self.index();
            index.clock += 1;
            let clock = index.clock;
            index.entries.get_mut(digest)?.used = clock;
        }
        // Evicted since, or removed underneath: either way a miss, and no entry stays behind.
        File::open(self.path(digest)).ok().or_else(|| {
            self.remove(&mut self.index(), digest);
            None
        })
    }

    /// Registers a fill of `digest`, `size` bytes, and counts them against the limit, evicting
    /// the least recently used copies to make room; `None` if it is here or being filled already,
    /// or if other fills hold the room it needs.
    fn start_fill(&self, digest: &Digest, size: u64) -> Option<u64> {
        let mut index = self.index();
        if size > self.max_bytes
            || index.entries.contains_key(digest)
            || index.filling.contains_key(digest)
        {
            return None;
        }
        while index.bytes + index.filling_bytes + size > self.max_bytes {
            let oldest = index
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(digest, _)| digest.clone())?;
            self.remove(&mut index, &oldest);
        }
        index.filling_bytes += size;
        index.fills += 1;
        let id = index.fills;
        index.filling.insert(digest.clone(), id);
        Some(id)
    }

    /// Writes what arrives on `chunks` to a temporary file and, once the read has ended, publishes
    /// it as `digest` if it is the `size` bytes the fill was given room for and they hash to the
    /// digest. A read that stopped early (a client gone, a store error) never is.
    fn fill(&self, digest: Digest, id: u64, size: u64, mut chunks: mpsc::Receiver<Bytes>) {
        let temp = self.dir.join(format!("fill-{id}"));
        let written = (|| -> io::Result<bool> {
            let mut file = File::create(&temp)?;
            let mut hasher = DigestHasher::new(digest.algorithm());
            let mut written = 0u64;
            while let Some(chunk) = chunks.blocking_recv() {
                written += chunk.len() as u64;
                if written > size {
                    return Ok(false);
                }
                hasher.update(&chunk);
                file.write_all(&chunk)?;
            }
            Ok(written == size && hasher.finish() == digest)
        })();
        // The read goes on without its copy from here.
        drop(chunks);
        let published = match written {
            Ok(true) => self.publish(&digest, id, &temp, size),
            Ok(false) => Ok(false),
            Err(err) => Err(err),
        };
        if !matches!(published, Ok(true)) {
            let _ = fs::remove_file(&temp);
            let mut index = self.index();
            if index.filling.get(&digest) == Some(&id) {
                index.filling.remove(&digest);
            }
            index.filling_bytes -= size;
        }
        if let Err(err) = published {
            tracing::warn!(digest = %digest, error = %err, "keeping a local copy of a blob failed; it is read from the store");
        }
    }

    /// Makes the verified file `temp`, whose `size` bytes its fill counted, the copy of
    /// `digest`, unless the digest was deleted since the fill began.
    fn publish(&self, digest: &Digest, id: u64, temp: &PathBuf, size: u64) -> io::Result<bool> {
        let mut index = self.index();
        if index.filling.get(digest) != Some(&id) {
            return Ok(false);
        }
        index.filling.remove(digest);
        fs::rename(temp, self.path(digest))?;
        index.clock += 1;
        let used = index.clock;
        index.entries.insert(digest.clone(), Entry { size, used });
        index.filling_bytes -= size;
        index.bytes += size;
        self.metrics.set_blob_cache_bytes(index.bytes);
        Ok(true)
    }

    /// Drops the copy of `digest` and any fill of it under way.
    fn remove(&self, index: &mut Index, digest: &Digest) {
        index.filling.remove(digest);
        if let Some(entry) = index.entries.remove(digest) {
            index.bytes -= entry.size;
            self.metrics.set_blob_cache_bytes(index.bytes);
            let _ = fs::remove_file(self.path(digest));
        }
    }
}

/// `stream`, with every chunk also handed to `copy` until it ends (or `copy` stops taking them).
fn tee(stream: ByteStream, copy: mpsc::Sender<Bytes>) -> ByteStream {
    Box::pin(futures_util::stream::unfold(
        (stream, Some(copy)),
        |(mut stream, mut copy)| async move {
            let item = stream.next().await;
            copy = match (&item, copy.take()) {
                (Some(Ok(chunk)), Some(sender)) => {
                    sender.send(chunk.clone()).await.is_ok().then_some(sender)
                }
                // The end, or an error (which the digest check turns away): the fill may finish.
                _ => None,
            };
            item.map(|item| (item, (stream, copy)))
        },
    ))
}

#[async_trait]
impl ContentStore for LocalCache {
    async fn check(&self) -> Result<(), ContentError> {
        self.inner.check().await
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, ContentError> {
        self.inner.stat(digest).await
    }

    async fn read(&self, digest: &Digest, range: Range<u64>) -> Result<ByteStream, ContentError> {
        if let Some(file) = self.hit(digest).await? {
            return Ok(chunks::stream(file, range));
        }
        // Counted here only: a GET that asked `open_file` first comes here after its miss.
        self.shared.metrics.blob_cache_read(false);
        let stream = self.inner.read(digest, range.clone()).await?;
        // Only a read from the first byte can prove, by its hash, that it was the whole blob.
        let fill = (range.start == 0)
            .then(|| self.shared.start_fill(digest, range.end))
            .flatten();
        let Some(id) = fill else {
            return Ok(stream);
        };
        let (copy, chunks) = mpsc::channel(FILL_AHEAD);
        let (shared, digest) = (self.shared.clone(), digest.clone());
        tokio::task::spawn_blocking(move || shared.fill(digest, id, range.end, chunks));
        Ok(tee(stream, copy))
    }

    async fn open_file(&self, digest: &Digest) -> Result<Option<File>, ContentError> {
        match self.hit(digest).await? {
            Some(file) => Ok(Some(file)),
            None => self.inner.open_file(digest).await,
        }
    }

    async fn redirect_url(&self, digest: &Digest) -> Result<Option<String>, ContentError> {
        self.inner.redirect_url(digest).await
    }

    async fn read_all(&self, digest: &Digest) -> Result<Bytes, ContentError> {
        self.inner.read_all(digest).await
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), ContentError> {
        self.inner.put(digest, bytes).await
    }

    async fn delete(&self, digests: &[Digest]) -> Result<(), ContentError> {
        // The store first: a read that starts a fill in between still finds its fill dropped
        // here, and one that starts after finds nothing to copy.
        self.inner.delete(digests).await?;
        let shared = self.shared.clone();
        let local = digests.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut index = shared.index();
            for digest in &local {
                shared.remove(&mut index, digest);
            }
        })
        .await
        .map_err(|e| ContentError::Io(io::Error::other(e)))
    }

    async fn create_upload(&self, id: UploadId) -> Result<(), ContentError> {
        self.inner.create_upload(id).await
    }

    async fn upload_size(&self, id: UploadId) -> Result<u64, ContentError> {
        self.inner.upload_size(id).await
    }

    async fn append_upload(
        &self,
        id: UploadId,
        offset: Option<u64>,
        body: ByteStream,
    ) -> Result<u64, ContentError> {
        self.inner.append_upload(id, offset, body).await
    }

    async fn commit_upload(&self, id: UploadId, digest: &Digest) -> Result<u64, ContentError> {
        self.inner.commit_upload(id, digest).await
    }

    async fn delete_upload(&self, id: UploadId) -> Result<(), ContentError> {
        self.inner.delete_upload(id).await
    }

    async fn delete_idle_upload(
        &self,
        id: UploadId,
        idle_since: SystemTime,
    ) -> Result<bool, ContentError> {
        self.inner.delete_idle_upload(id, idle_since).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures_util::TryStreamExt;

    use super::*;
    use crate::content::FsContentStore;
    use crate::content::behaviour::{self, once};

    struct Fixture {
        store: Arc<FsContentStore>,
        cache: LocalCache,
        _dir: tempfile::TempDir,
    }

    fn fixture(max_bytes: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsContentStore::open(dir.path().join("store")).unwrap());
        let cache = LocalCache::open(
            store.clone(),
            dir.path().join("cache"),
            max_bytes,
            Metrics::default(),
        )
        .unwrap();
        Fixture {
            store,
            cache,
            _dir: dir,
        }
    }

    impl Fixture {
        async fn put(&self, bytes: Vec<u8>) -> (Digest, Bytes) {
            let bytes = Bytes::from(bytes);
            let digest = Digest::sha256_of(&bytes);
            self.cache.put(&digest, bytes.clone()).await.unwrap();
            (digest, bytes)
        }

        async fn read(&self, digest: &Digest, range: Range<u64>) -> Vec<u8> {
            let stream = self.cache.read(digest, range).await.unwrap();
            let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
            let bytes = chunks.concat();
            self.settled().await;
            bytes
        }

        /// Waits for every fill to be published or dropped.
        async fn settled(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.cache.shared.index().filling.is_empty() {
                assert!(Instant::now() < deadline, "a fill never ended");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        fn kept(&self) -> Vec<Digest> {
            let mut kept: Vec<Digest> = self.cache.shared.index().entries.keys().cloned().collect();
            kept.sort_by_key(ToString::to_string);
            kept
        }

        /// The files in the cache directory: exactly the kept copies, no leftovers.
        fn files(&self) -> usize {
            fs::read_dir(&self.cache.shared.dir).unwrap().count()
        }
    }

    fn blob(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[tokio::test]
    async fn passes_the_content_behaviour_suite() {
        let fixture = fixture(1 << 20);
        behaviour::run_all(&fixture.cache).await;
    }

    #[tokio::test]
    async fn a_whole_read_is_kept_and_served_once_the_store_has_lost_it() {
        let fixture = fixture(4 << 20);
        let (digest, bytes) = fixture.put(blob(1, 600 << 10)).await;
        assert_eq!(fixture.read(&digest, 0..bytes.len() as u64).await, bytes);
        assert_eq!(fixture.kept(), vec![digest.clone()]);
        // Gone from the store underneath (another instance's collection, say): still served here.
        fixture
            .store
            .delete(std::slice::from_ref(&digest))
            .await
            .unwrap();
        assert_eq!(fixture.read(&digest, 0..bytes.len() as u64).await, bytes);
        assert_eq!(fixture.read(&digest, 3..70_000).await, &bytes[3..70_000]);
        let mut file = fixture
            .cache
            .open_file(&digest)
            .await
            .unwrap()
            .expect("a file");
        let mut local = Vec::new();
        io::Read::read_to_end(&mut file, &mut local).unwrap();
        assert_eq!(local, bytes);
        assert_eq!(fixture.files(), 1);
        let text = fixture.cache.shared.metrics.render();
        for line in [
            "berth_registry_blob_cache_misses_total 1\n",
            "berth_registry_blob_cache_hits_total 3\n",
            &format!("berth_registry_blob_cache_bytes {}\n", bytes.len()),
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
    }

    #[tokio::test]
    async fn reads_that_cannot_prove_the_whole_blob_are_not_kept() {
        let fixture = fixture(4 << 20);
        let (digest, bytes) = fixture.put(blob(2, 600 << 10)).await;
        // Not from the first byte.
        assert_eq!(
            fixture.read(&digest, 1..bytes.len() as u64).await,
            &bytes[1..]
        );
        // From the first byte, but not to the end.
        assert_eq!(fixture.read(&digest, 0..1000).await, &bytes[..1000]);
        // Abandoned by its client after the first chunk.
        let mut stream = fixture
            .cache
            .read(&digest, 0..bytes.len() as u64)
            .await
            .unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        drop(stream);
        fixture.settled().await;
        assert_eq!(fixture.kept(), vec![]);
        assert_eq!(fixture.files(), 0);
        // Bytes that do not hash to the digest.
        let id = fixture
            .cache
            .shared
            .start_fill(&digest, bytes.len() as u64)
            .unwrap();
        let (copy, chunks) = mpsc::channel(FILL_AHEAD);
        let shared = fixture.cache.shared.clone();
        let filling = tokio::task::spawn_blocking({
            let digest = digest.clone();
            let size = bytes.len() as u64;
            move || shared.fill(digest, id, size, chunks)
        });
        let wrong = tee(once(Bytes::from(blob(3, 600 << 10))), copy);
        let _: Vec<Bytes> = wrong.try_collect().await.unwrap();
        filling.await.unwrap();
        assert_eq!(fixture.kept(), vec![]);
        assert_eq!(fixture.files(), 0);
    }

    #[tokio::test]
    async fn the_least_recently_used_go_first_and_the_limit_holds() {
        let fixture = fixture(3 << 10);
        let mut blobs = Vec::new();
        for seed in 0..3 {
            let (digest, bytes) = fixture.put(blob(seed, 1 << 10)).await;
            fixture.read(&digest, 0..1024).await;
            blobs.push((digest, bytes));
        }
        assert_eq!(fixture.kept().len(), 3);
        // The first is used again, so the second is the least recently used.
        assert!(
            fixture
                .cache
                .open_file(&blobs[0].0)
                .await
                .unwrap()
                .is_some()
        );
        let (fourth, _) = fixture.put(blob(9, 1 << 10)).await;
        fixture.read(&fourth, 0..1024).await;
        let mut expected = vec![blobs[0].0.clone(), blobs[2].0.clone(), fourth];
        expected.sort_by_key(ToString::to_string);
        assert_eq!(fixture.kept(), expected);
        assert_eq!(fixture.cache.shared.index().bytes, 3 << 10);
        assert_eq!(fixture.files(), 3);
        // A blob larger than the whole copy is served, never kept.
        let (big, bytes) = fixture.put(blob(7, 4 << 10)).await;
        assert_eq!(fixture.read(&big, 0..4096).await, bytes);
        assert_eq!(fixture.kept().len(), 3);
        assert_eq!(fixture.files(), 3);
    }

    #[tokio::test]
    async fn copies_being_filled_count_against_the_limit() {
        let fixture = fixture(3 << 10);
        let (first, first_bytes) = fixture.put(blob(10, 2 << 10)).await;
        let (second, second_bytes) = fixture.put(blob(11, 2 << 10)).await;
        // The first read holds room for its copy until it ends: the second gets none.
        let reading = fixture.cache.read(&first, 0..2048).await.unwrap();
        let other = fixture.cache.read(&second, 0..2048).await.unwrap();
        for (stream, bytes) in [(reading, &first_bytes), (other, &second_bytes)] {
            let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
            assert_eq!(&chunks.concat(), bytes);
        }
        fixture.settled().await;
        assert_eq!(fixture.kept(), vec![first.clone()]);
        // Read again once no fill holds the room, it takes the first's place.
        assert_eq!(fixture.read(&second, 0..2048).await, second_bytes);
        assert_eq!(fixture.kept(), vec![second]);
        assert_eq!(fixture.files(), 1);
        let index = fixture.cache.shared.index();
        assert_eq!((index.bytes, index.filling_bytes), (2 << 10, 0));
    }

    #[tokio::test]
    async fn a_deleted_blob_is_dropped_even_while_it_is_being_read() {
        let fixture = fixture(4 << 20);
        let (digest, bytes) = fixture.put(blob(4, 600 << 10)).await;
        fixture.read(&digest, 0..bytes.len() as u64).await;
        fixture
            .cache
            .delete(std::slice::from_ref(&digest))
            .await
            .unwrap();
        assert_eq!(fixture.kept(), vec![]);
        assert!(matches!(
            fixture.cache.read(&digest, 0..1).await,
            Err(ContentError::BlobUnknown)
        ));
        // Deleted while a read is copying it: the read is served, the copy dropped.
        let (digest, bytes) = fixture.put(blob(5, 600 << 10)).await;
        let stream = fixture
            .cache
            .read(&digest, 0..bytes.len() as u64)
            .await
            .unwrap();
        fixture
            .cache
            .delete(std::slice::from_ref(&digest))
            .await
            .unwrap();
        let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), bytes);
        // The delete ended the fill's registration; its temporary file goes when the fill ends.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fixture.files() > 0 {
            assert!(Instant::now() < deadline, "the dropped copy stays on disk");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(fixture.kept(), vec![]);
    }

    #[tokio::test]
    async fn every_start_begins_empty() {
        let fixture = fixture(4 << 20);
        let (digest, bytes) = fixture.put(blob(6, 10_000)).await;
        fixture.read(&digest, 0..bytes.len() as u64).await;
        fs::write(fixture.cache.shared.dir.join("fill-7"), b"left by a crash").unwrap();
        let again = LocalCache::open(
            fixture.store.clone(),
            fixture.cache.shared.dir.clone(),
            4 << 20,
            Metrics::default(),
        )
        .unwrap();
        assert_eq!(fs::read_dir(&again.shared.dir).unwrap().count(), 0);
        assert!(
            again.open_file(&digest).await.unwrap().is_some(),
            "from the store"
        );
        assert_eq!(again.shared.index().entries.len(), 0);
    }
}
