//! Streams a byte range of a file as chunks read on the blocking pool into reused buffers.
//!
//! Serving a blob is the registry's hottest path. `tokio::fs::File` reads into a buffer of its
//! own and copies into the caller's, and a fresh chunk is allocated for every read; here each
//! chunk is read with `pread` straight into a buffer from a small pool, handed to hyper without
//! copying, and returned to the pool when hyper has written it.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::ByteStream;

/// Size of one read: large enough for few syscalls and thread hops, small enough that many
/// concurrent downloads stay lean.
pub(super) const CHUNK: usize = 256 << 10;
/// Buffers kept for reuse; more are allocated under load and freed when returned to a full pool.
const POOL_KEEP: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buffer() -> Box<[u8]> {
    let reused = POOL.lock().expect("buffer pool poisoned").pop();
    reused.unwrap_or_else(|| vec![0; CHUNK].into_boxed_slice())
}

/// A filled prefix of a pooled buffer; dropping it gives the buffer back.
struct PooledChunk {
    buffer: Option<Box<[u8]>>,
    len: usize,
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
    let mut buffer = take_buffer();
    let want = buffer
        .len()
        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
    let mut len = 0;
    while len < want {
        match file.read_at(&mut buffer[len..want], offset + len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    if len == 0 {
        // Committed blobs are immutable, so a short file means the store was damaged underneath.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file is shorter than its recorded size",
        ));
    }
    Ok(Bytes::from_owner(PooledChunk {
        buffer: Some(buffer),
        len,
    }))
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

    #[tokio::test]
    async fn returned_buffers_are_reused() {
        let data = vec![7u8; CHUNK * 3];
        collect(file_of(&data), 0..data.len() as u64).await.unwrap();
        let pooled = POOL.lock().unwrap().len();
        assert!(pooled >= 1, "chunks went back to the pool");
        assert!(pooled <= POOL_KEEP);
    }
}
