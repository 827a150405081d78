//! Filesystem content store: blobs under `blobs/<alg>/<xx>/<hex>`, uploads under `uploads/<id>`.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::num::NonZeroU64;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use berth_oci::{Algorithm, Digest, DigestHasher};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::chunks::{self, PooledChunk};
use super::{ByteStream, ContentError, ContentStore, UploadId};

/// While an upload streams, its writer hands dirty pages to the disk every this many bytes, so the
/// disk writes while the network delivers and the fsync at commit waits only for the tail.
/// Small enough to matter for a typical layer of a few MiB, which a larger interval would leave
/// almost whole to the fsync at commit.
const WRITEBACK_EVERY: u64 = 1 << 20;

/// The hash of an upload's first `offset` bytes, kept between requests so committing a streamed
/// upload does not read it back. Lost on restart, when the commit re-reads the data instead.
struct RunningHash {
    offset: u64,
    hasher: DigestHasher,
}

type SessionLock = Arc<tokio::sync::Mutex<Option<RunningHash>>>;

pub struct FsContentStore {
    dirs: Arc<DurableDirs>,
    sessions: Mutex<HashMap<UploadId, SessionLock>>,
}

impl FsContentStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        let dirs = DurableDirs {
            root,
            synced: Mutex::default(),
        };
        for dir in ["blobs", "uploads", "tmp"] {
            dirs.create(&dirs.root.join(dir))?;
        }
        // tmp/ holds only the unfinished writes of a process that died: one process owns a root.
        for entry in fs::read_dir(dirs.root.join("tmp"))? {
            fs::remove_file(entry?.path())?;
        }
        Ok(FsContentStore {
            dirs: Arc::new(dirs),
            sessions: Mutex::default(),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dirs
            .root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    async fn open_blob(&self, digest: &Digest) -> Result<File, ContentError> {
        let path = self.blob_path(digest);
        blocking(move || File::open(path).map_err(|e| not_found_as(e, ContentError::BlobUnknown)))
            .await
    }

    fn upload_path(&self, id: UploadId) -> PathBuf {
        self.dirs.root.join("uploads").join(id.to_string())
    }

    /// One lock per upload serialises appends and the commit of the same session.
    fn session(&self, id: UploadId) -> SessionLock {
        let mut sessions = self.sessions.lock().expect("session map poisoned");
        sessions.entry(id).or_default().clone()
    }

    fn forget_session(&self, id: UploadId) {
        self.sessions
            .lock()
            .expect("session map poisoned")
            .remove(&id);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ContentError> + Send + 'static,
) -> Result<T, ContentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ContentError::Io(io::Error::other(e)))?
}

fn not_found_as(err: io::Error, missing: ContentError) -> ContentError {
    if err.kind() == io::ErrorKind::NotFound {
        missing
    } else {
        ContentError::from_io(err)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The store's directory tree, made crash-safe as it grows: a new directory's entry lives in its
/// parent, which is synced too. Without that, a blob published into a shard created a moment
/// earlier could vanish with its directory while the metadata says it is stored. A directory that
/// merely exists is not trusted (another publish may have just created it and not yet synced its
/// parent, or a crash may have cut that short): each is synced into its parent once, a few hundred
/// fsyncs in a store's life.
struct DurableDirs {
    root: PathBuf,
    /// Directories whose entries this store has synced into their parents.
    synced: Mutex<BTreeSet<PathBuf>>,
}

impl DurableDirs {
    fn is_synced(&self, dir: &Path) -> bool {
        self.synced.lock().expect("dir set poisoned").contains(dir)
    }

    /// Creates `dir` (inside the root) and its missing ancestors, durably.
    fn create(&self, dir: &Path) -> io::Result<()> {
        if dir == self.root || self.is_synced(dir) {
            return Ok(());
        }
        let parent = dir
            .parent()
            .expect("a directory under the root has a parent");
        self.create(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(err) => return Err(err),
        }
        sync_dir(parent)?;
        self.synced
            .lock()
            .expect("dir set poisoned")
            .insert(dir.to_owned());
        Ok(())
    }

    /// Whether `dest` is stored already. Another request may have renamed it into place a moment
    /// ago and not yet synced its directory, so that is done before the answer is trusted: the
    /// caller is about to record the blob as stored.
    fn already_published(&self, dest: &Path) -> Result<bool, ContentError> {
        if !dest.exists() {
            return Ok(false);
        }
        let parent = dest.parent().expect("blob paths have a parent");
        self.create(parent)
            .and_then(|()| sync_dir(parent))
            .map_err(ContentError::from_io)?;
        Ok(true)
    }

    /// Moves a fully written, synced file to `dest` and makes the rename itself durable.
    fn publish(&self, src: &Path, dest: &Path) -> Result<(), ContentError> {
        let parent = dest.parent().expect("blob paths have a parent");
        self.create(parent).map_err(ContentError::from_io)?;
        fs::rename(src, dest).map_err(ContentError::from_io)?;
        sync_dir(parent).map_err(ContentError::from_io)
    }
}

fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = DigestHasher::new(algorithm);
    let mut buffer = vec![0; chunks::CHUNK];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buffer[..n]);
    }
}

/// What the blocking writer achieved: the size and hash of what is durably in the file.
struct WriteOutcome {
    size: u64,
    hash: Option<RunningHash>,
    error: Option<io::Error>,
}

/// Drains `chunks` into `file` (positioned at its end, `size` bytes long), hashing only what was
/// written, so on a write error the file is cut back to the last whole piece and hash and data
/// agree.
///
/// Every [`WRITEBACK_EVERY`] bytes it hands the new pages to the disk: `POSIX_FADV_DONTNEED` on
/// dirty pages starts their writeback and returns (Linux; PostgreSQL's fallback where
/// `sync_file_range`, which rustix and nix lack, is missing, and `unsafe` is not allowed here).
/// Unlike `fdatasync` it waits for no I/O, commits no journal and flushes no disk cache, so the
/// streams of a push do not queue behind each other. Only clean pages leave the cache, and the pages
/// just written are not clean yet. An error of that writeback stays recorded against the file
/// until an fsync reports it, which the one at commit does, on whichever descriptor.
fn write_chunks(
    mut file: File,
    mut size: u64,
    mut hash: Option<RunningHash>,
    mut chunks: mpsc::Receiver<PooledChunk>,
) -> WriteOutcome {
    let mut handed = size;
    while let Some(chunk) = chunks.blocking_recv() {
        let piece = chunk.as_ref();
        if let Err(error) = file.write_all(piece) {
            let _ = file.set_len(size);
            return WriteOutcome {
                size,
                hash,
                error: Some(error),
            };
        }
        if let Some(running) = &mut hash {
            running.hasher.update(piece);
            running.offset += piece.len() as u64;
        }
        size += piece.len() as u64;
        if size >= handed + WRITEBACK_EVERY {
            // Advice only: a refusal leaves the pages to the fsync at commit.
            let _ = rustix::fs::fadvise(
                &file,
                handed,
                NonZeroU64::new(size - handed),
                rustix::fs::Advice::DontNeed,
            );
            handed = size;
        }
    }
    WriteOutcome {
        size,
        hash,
        error: None,
    }
}

#[async_trait]
impl ContentStore for FsContentStore {
    /// The directories are still there (a lost mount, a deleted root are caught).
    async fn check(&self) -> Result<(), ContentError> {
        for dir in ["blobs", "uploads"] {
            let meta = tokio::fs::metadata(self.dirs.root.join(dir))
                .await
                .map_err(ContentError::from_io)?;
            if !meta.is_dir() {
                return Err(ContentError::Io(io::Error::other(format!(
                    "{dir} is not a directory"
                ))));
            }
        }
        Ok(())
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, ContentError> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(ContentError::from_io(err)),
        }
    }

    async fn read(&self, digest: &Digest, range: Range<u64>) -> Result<ByteStream, ContentError> {
        let file = self.open_blob(digest).await?;
        Ok(chunks::stream(file, range))
    }

    async fn open_file(&self, digest: &Digest) -> Result<Option<File>, ContentError> {
        self.open_blob(digest).await.map(Some)
    }

    async fn read_all(&self, digest: &Digest) -> Result<Bytes, ContentError> {
        let bytes = tokio::fs::read(self.blob_path(digest))
            .await
            .map_err(|e| not_found_as(e, ContentError::BlobUnknown))?;
        Ok(Bytes::from(bytes))
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), ContentError> {
        let actual = digest.same_algorithm_of(&bytes);
        if &actual != digest {
            return Err(ContentError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let dest = self.blob_path(digest);
        let temp = self.dirs.root.join("tmp").join(UploadId::new().to_string());
        let dirs = self.dirs.clone();
        blocking(move || {
            if dirs.already_published(&dest)? {
                return Ok(());
            }
            let written = File::create(&temp)
                .and_then(|mut file| file.write_all(&bytes).and_then(|()| file.sync_all()))
                .map_err(ContentError::from_io)
                .and_then(|()| dirs.publish(&temp, &dest));
            if written.is_err() {
                let _ = fs::remove_file(&temp);
            }
            written
        })
        .await
    }

    async fn create_upload(&self, id: UploadId) -> Result<(), ContentError> {
        let path = self.upload_path(id);
        blocking(move || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(ContentError::from_io)?;
            Ok(())
        })
        .await
    }

    async fn upload_size(&self, id: UploadId) -> Result<u64, ContentError> {
        // Waits for a write in progress, even one whose request is gone, to report a settled size.
        let session = self.session(id);
        let _settled = session.lock().await;
        let meta = tokio::fs::metadata(self.upload_path(id))
            .await
            .map_err(|e| not_found_as(e, ContentError::UploadUnknown))?;
        Ok(meta.len())
    }

    async fn append_upload(
        &self,
        id: UploadId,
        offset: Option<u64>,
        mut body: ByteStream,
    ) -> Result<u64, ContentError> {
        let mut running = self.session(id).lock_owned().await;
        let path = self.upload_path(id);
        let (file, size) = blocking(move || {
            let mut file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| not_found_as(e, ContentError::UploadUnknown))?;
            let size = file.seek(SeekFrom::End(0))?;
            Ok((file, size))
        })
        .await?;
        if let Some(requested) = offset.filter(|&o| o != size) {
            return Err(ContentError::OffsetMismatch {
                actual: size,
                requested,
            });
        }
        let hash = match running.take() {
            Some(hash) if hash.offset == size => Some(hash),
            _ if size == 0 => Some(RunningHash {
                offset: 0,
                hasher: DigestHasher::new(Algorithm::Sha256),
            }),
            _ => None,
        };
        // A short queue of 256 KiB pieces: the disk is slower than the socket, so more would only
        // hold memory.
        let (sender, receiver) = mpsc::channel(2);
        // The writer holds the session until its last piece is on disk, also when this request
        // is dropped mid-body (its client went away): the next PATCH or status request then sees
        // the upload's settled size, never one a leftover writer is still extending, and the
        // running hash is kept.
        let writer = tokio::task::spawn_blocking(move || {
            let mut outcome = write_chunks(file, size, hash, receiver);
            *running = outcome.hash.take();
            outcome
        });
        let mut body_error = None;
        let mut piece = PooledChunk::new();
        'body: while let Some(item) = body.next().await {
            let frame = match item {
                Ok(frame) => frame,
                Err(err) => {
                    body_error = Some(err);
                    break;
                }
            };
            let mut rest = &frame[..];
            while !rest.is_empty() {
                rest = &rest[piece.fill_from(rest)..];
                if piece.is_full()
                    && sender
                        .send(std::mem::replace(&mut piece, PooledChunk::new()))
                        .await
                        .is_err()
                {
                    break 'body; // the writer stopped on an error it reports below
                }
            }
        }
        if !piece.is_empty() {
            // An error here is the writer's, reported below.
            let _ = sender.send(piece).await;
        }
        drop(sender);
        let outcome = writer
            .await
            .map_err(|e| ContentError::Io(io::Error::other(e)))?;
        if let Some(err) = outcome.error {
            return Err(ContentError::from_io(err));
        }
        if let Some(err) = body_error {
            return Err(ContentError::BodyInterrupted(err));
        }
        Ok(outcome.size)
    }

    async fn commit_upload(&self, id: UploadId, digest: &Digest) -> Result<u64, ContentError> {
        let session = self.session(id);
        let mut running = session.lock().await;
        let hash = running.take();
        let path = self.upload_path(id);
        let dest = self.blob_path(digest);
        let expected = digest.clone();
        let dirs = self.dirs.clone();
        let committed = blocking(move || {
            let file =
                File::open(&path).map_err(|e| not_found_as(e, ContentError::UploadUnknown))?;
            file.sync_all().map_err(ContentError::from_io)?;
            let size = file.metadata()?.len();
            let actual = match hash {
                Some(h) if h.offset == size && h.hasher.algorithm() == expected.algorithm() => {
                    h.hasher.finish()
                }
                _ => hash_file(&path, expected.algorithm())?,
            };
            if actual != expected {
                fs::remove_file(&path).map_err(ContentError::from_io)?;
                return Err(ContentError::DigestMismatch { expected, actual });
            }
            if dirs.already_published(&dest)? {
                fs::remove_file(&path).map_err(ContentError::from_io)?;
            } else {
                dirs.publish(&path, &dest)?;
            }
            Ok(size)
        })
        .await;
        self.forget_session(id);
        committed
    }

    async fn delete(&self, digests: &[Digest]) -> Result<(), ContentError> {
        let paths: Vec<PathBuf> = digests.iter().map(|d| self.blob_path(d)).collect();
        let root = self.dirs.root.clone();
        blocking(move || {
            let mut deleted = false;
            for path in paths {
                match fs::remove_file(&path) {
                    Ok(()) => deleted = true,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(ContentError::from_io(err)),
                }
            }
            // Durable, or a crash could bring back bytes the metadata no longer tracks, and
            // nothing would ever collect them again. One filesystem sync commits the whole batch's
            // directory entries in one journal commit, where a sync per shard directory would
            // commit once per shard.
            if deleted {
                let root = File::open(&root).map_err(ContentError::from_io)?;
                rustix::fs::syncfs(&root).map_err(|e| ContentError::from_io(e.into()))?;
            }
            Ok(())
        })
        .await
    }

    async fn delete_upload(&self, id: UploadId) -> Result<(), ContentError> {
        let session = self.session(id);
        let _running = session.lock().await;
        let removed = tokio::fs::remove_file(self.upload_path(id))
            .await
            .map_err(|e| not_found_as(e, ContentError::UploadUnknown));
        self.forget_session(id);
        removed
    }

    async fn delete_idle_upload(
        &self,
        id: UploadId,
        idle_since: SystemTime,
    ) -> Result<bool, ContentError> {
        let session = self.session(id);
        let _running = session.lock().await;
        let path = self.upload_path(id);
        let modified = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta.modified()?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                self.forget_session(id);
                return Ok(true);
            }
            Err(err) => return Err(ContentError::from_io(err)),
        };
        if modified > idle_since {
            return Ok(false);
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(ContentError::from_io(err)),
        }
        self.forget_session(id);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_content_behaviour_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsContentStore::open(dir.path()).unwrap();
        crate::content::behaviour::run_all(&store).await;
    }

    #[tokio::test]
    async fn opening_clears_the_unfinished_writes_of_a_dead_process() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsContentStore::open(dir.path()).unwrap();
        let digest = Digest::sha256_of(b"kept");
        store
            .put(&digest, Bytes::from_static(b"kept"))
            .await
            .unwrap();
        let id = UploadId::new();
        store.create_upload(id).await.unwrap();
        drop(store);
        fs::write(dir.path().join("tmp").join("half-written"), b"partial").unwrap();

        let store = FsContentStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.stat(&digest).await.unwrap(), Some(4), "blobs stay");
        assert_eq!(store.upload_size(id).await.unwrap(), 0, "uploads stay");
    }

    #[tokio::test]
    async fn commit_after_restart_rehashes_the_upload_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let id = UploadId::new();
        let data = Bytes::from(vec![7u8; 3 * chunks::CHUNK + 17]);
        {
            let store = FsContentStore::open(dir.path()).unwrap();
            store.create_upload(id).await.unwrap();
            let half = data.slice(..data.len() / 2);
            store
                .append_upload(id, Some(0), crate::content::behaviour::once(half))
                .await
                .unwrap();
        }
        let store = FsContentStore::open(dir.path()).unwrap();
        let rest = data.slice(data.len() / 2..);
        let offset = (data.len() / 2) as u64;
        store
            .append_upload(id, Some(offset), crate::content::behaviour::once(rest))
            .await
            .unwrap();
        let digest = Digest::sha256_of(&data);
        assert_eq!(
            store.commit_upload(id, &digest).await.unwrap(),
            data.len() as u64
        );
        assert_eq!(store.read_all(&digest).await.unwrap(), data);
    }

    /// `data` as request-body frames of `size` bytes.
    fn frames(
        data: &[u8],
        size: usize,
    ) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        let frames: Vec<io::Result<Bytes>> = data
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(frames)
    }

    /// Streams `data` into a new upload in frames of `frame` bytes, commits it and reads it back.
    async fn assert_round_trip(data: &[u8], frame: usize) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsContentStore::open(dir.path()).unwrap();
        let id = UploadId::new();
        store.create_upload(id).await.unwrap();
        let size = store
            .append_upload(id, Some(0), Box::pin(frames(data, frame)))
            .await
            .unwrap();
        assert_eq!(size, data.len() as u64);
        let digest = Digest::sha256_of(data);
        assert_eq!(store.commit_upload(id, &digest).await.unwrap(), size);
        assert_eq!(store.read_all(&digest).await.unwrap(), data);
    }

    #[tokio::test]
    async fn frames_straddling_piece_boundaries_are_written_in_order() {
        let data: Vec<u8> = (0..chunks::CHUNK * 4 + 99)
            .map(|i| (i % 253) as u8)
            .collect();
        assert_round_trip(&data, 100_003).await;
    }

    #[tokio::test]
    async fn a_request_dropped_mid_body_keeps_its_data_and_running_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsContentStore::open(dir.path()).unwrap();
        let id = UploadId::new();
        store.create_upload(id).await.unwrap();
        let data: Vec<u8> = (0..chunks::CHUNK * 3 + 5)
            .map(|i| (i % 241) as u8)
            .collect();
        // A client that sends part of a blob, stalls and goes away: its request is dropped.
        let stalled = frames(&data, 64 << 10).chain(futures_util::stream::pending());
        let dropped = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            store.append_upload(id, Some(0), Box::pin(stalled)),
        )
        .await;
        assert!(dropped.is_err(), "the body never ended");
        // Every whole piece that arrived is on disk; the partial one never reached the writer.
        let settled = (chunks::CHUNK * 3) as u64;
        assert_eq!(store.upload_size(id).await.unwrap(), settled);
        store
            .append_upload(
                id,
                Some(settled),
                crate::content::behaviour::once(Bytes::from(data[settled as usize..].to_vec())),
            )
            .await
            .unwrap();
        // The commit uses the hash computed as the bytes arrived: a byte changed on disk since goes
        // unseen, which shows the dropped request left its running hash to the session instead of
        // losing it (the commit would then re-hash the file and refuse the digest).
        let path = store.upload_path(id);
        let mut on_disk = fs::read(&path).unwrap();
        on_disk[0] ^= 0xff;
        fs::write(&path, &on_disk).unwrap();
        let digest = Digest::sha256_of(&data);
        assert_eq!(
            store.commit_upload(id, &digest).await.unwrap(),
            data.len() as u64
        );
    }

    #[test]
    fn durable_directories_are_created_with_their_missing_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = DurableDirs {
            root: dir.path().to_owned(),
            synced: Mutex::default(),
        };
        let deep = dirs.root.join("a/b/c");
        dirs.create(&deep).unwrap();
        assert!(deep.is_dir());
        dirs.create(&deep).unwrap();
        let file = dirs.root.join("a/file");
        fs::write(&file, b"x").unwrap();
        assert!(
            dirs.create(&file.join("d")).is_err(),
            "a file in the way is an error, not a directory"
        );
        assert!(file.is_file());
    }

    #[tokio::test]
    async fn uploads_past_the_writeback_interval_commit_intact() {
        let mut data = vec![0x5a; WRITEBACK_EVERY as usize * 2 + 4099];
        data[WRITEBACK_EVERY as usize + 1] = 1;
        assert_round_trip(&data, 3 << 20).await;
    }
}
