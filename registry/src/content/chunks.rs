//! Reused 256 KiB buffers for the two hot paths: blob reads (a byte range of a file streamed as
//! chunks read on the blocking pool) and upload writes (request bodies gathered into whole pieces).
//!
//! `tokio::fs::File` reads into a buffer of its own and copies into the caller's, and a fresh
//! chunk is allocated for every read; here each chunk is read with `pread` straight into a buffer
//! from a small pool, handed to hyper without copying, and returned to the pool when hyper has
//! written it. Uploads copy each request-body frame into a pooled piece at once, so hyper gets its
//! receive buffer back and refills it in place instead of faulting in fresh memory for every read
//! (page faults were a tenth of the registry's CPU while ingesting a 20-layer image).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::ByteStream;

/// Size of one piece: large enough for few syscalls and thread hops, small enough that many
/// concurrent transfers stay lean.
pub(super) const CHUNK: usize = 256 << 10;
/// Buffers kept for reuse; more are allocated under load and freed when returned to a full pool.
const POOL_KEEP: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buffer() -> Box<[u8]> {
    let reused = POOL.lock().expect("buffer pool poisoned").pop();
    reused.unwrap_or_else(|| vec![0; CHUNK].into_boxed_slice())
}

/// A filled prefix of a pooled buffer; dropping it gives the buffer back.
pub(super) struct PooledChunk {
    buffer: Option<Box<[u8]>>,
    len: usize,
}

impl PooledChunk {
    pub(super) fn new() -> PooledChunk {
        PooledChunk {
            buffer: Some(take_buffer()),
            len: 0,
        }
    }

    fn buffer(&mut self) -> &mut [u8] {
        self.buffer
            .as_deref_mut()
            .expect("buffer present until drop")
    }

    /// Appends as much of `bytes` as fits and says how much that was.
    pub(super) fn fill_from(&mut self, bytes: &[u8]) -> usize {
        let start = self.len;
        let buffer = self.buffer();
        let taken = bytes.len().min(buffer.len() - start);
        buffer[start..start + taken].copy_from_slice(&bytes[..taken]);
        self.len += taken;
        taken
    }

    pub(super) fn is_full(&self) -> bool {
        self.len == CHUNK
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.buffer.as_deref().expect("buffer present until drop")[..self.len]
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            let mut pool = POOL.lock().expect("buffer pool poisoned");
            if pool.len() < POOL_KEEP {
                pool.push(buffer);
            }
        }
    }
}

/// Reads the next chunk of `file` at `offset`, at most `remaining` bytes.
fn read_chunk(file: &File, offset: u64, remaining: u64) -> io::Result<Bytes> {
    let mut chunk = PooledChunk::new();
    let want = CHUNK.min(usize::try_from(remaining).unwrap_or(usize::MAX));
    while chunk.len < want {
        let len = chunk.len;
        match file.read_at(&mut chunk.buffer()[len..want], offset + len as u64) {
            Ok(0) => break,
            Ok(n) => chunk.len += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    if chunk.is_empty() {
        // Committed blobs are immutable, so a short file means the store was damaged underneath.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file is shorter than its recorded size",
        ));
    }
    Ok(Bytes::from_owner(chunk))
}

/// Streams `range` of `file`, one blocking-pool read per chunk.
pub(super) fn stream(file: File, range: Range<u64>) -> ByteStream {
    let file = Arc::new(file);
    let chunks = futures_util::stream::try_unfold(range, move |range| {
        let file = file.clone();
        async move {
            if range.start >= range.end {
                return Ok(None);
            }
            let remaining = range.end - range.start;
            let chunk =
                tokio::task::spawn_blocking(move || read_chunk(&file, range.start, remaining))
                    .await
                    .map_err(io::Error::other)??;
            let next = range.start + chunk.len() as u64..range.end;
            Ok(Some((chunk, next)))
        }
    });
    Box::pin(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    async fn collect(file: File, range: Range<u64>) -> io::Result<Vec<u8>> {
        let chunks: Vec<Bytes> = stream(file, range).try_collect().await?;
        Ok(chunks.concat())
    }

    #[tokio::test]
    async fn streams_exactly_the_range_across_chunk_boundaries() {
        let data: Vec<u8> = (0..CHUNK * 2 + 1234).map(|i| (i % 251) as u8).collect();
        let len = data.len() as u64;
        for range in [
            0..len,
            1..len - 1,
            CHUNK as u64 - 1..CHUNK as u64 + 1,
            5..5,
            7..8,
        ] {
            let got = collect(file_of(&data), range.clone()).await.unwrap();
            let want = &data[range.start as usize..range.end as usize];
            assert_eq!(got, want, "range {range:?}");
        }
    }

    #[tokio::test]
    async fn a_file_shorter_than_the_range_is_an_error_not_a_short_body() {
        let err = collect(file_of(b"0123456789"), 0..20).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pieces_fill_up_to_their_size_and_no_further() {
        let mut piece = PooledChunk::new();
        assert!(piece.is_empty());
        assert_eq!(piece.fill_from(b"abc"), 3);
        let big = vec![9u8; CHUNK];
        assert_eq!(piece.fill_from(&big), CHUNK - 3);
        assert!(piece.is_full());
        assert_eq!(piece.fill_from(b"more"), 0);
        assert_eq!(&piece.as_ref()[..4], b"abc\x09");
        assert_eq!(piece.as_ref().len(), CHUNK);
    }

    #[tokio::test]
    async fn returned_buffers_are_reused() {
        let data = vec![7u8; CHUNK * 3];
        collect(file_of(&data), 0..data.len() as u64).await.unwrap();
        let pooled = POOL.lock().unwrap().len();
        assert!(pooled >= 1, "chunks went back to the pool");
        assert!(pooled <= POOL_KEEP);
    }
}
