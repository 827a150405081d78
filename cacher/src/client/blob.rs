//! Reading a blob as a size-checked stream that survives dropped connections by resuming with
//! `Range` requests.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_oci::{Digest, RepoName};
use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::CONTENT_RANGE;

use super::{ClientError, RegistryClient};

/// Bytes received from a source, shared by everything reporting progress. A counter made with
/// [`TransferCounter::child`] counts one transfer and adds to its parent as well.
#[derive(Debug, Clone, Default)]
pub struct TransferCounter {
    bytes: Arc<AtomicU64>,
    parent: Option<Arc<AtomicU64>>,
}

impl TransferCounter {
    pub fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A counter starting at zero whose additions count here too.
    pub fn child(&self) -> TransferCounter {
        TransferCounter {
            bytes: Arc::default(),
            parent: Some(self.bytes.clone()),
        }
    }
}

/// A blob read from `client`, counted and size-checked as it flows. The stream ends with an
/// error, never with a clean end, if the source sends more or fewer bytes than the descriptor
/// says, so a destination that receives it as a request body never commits a cut blob.
///
/// The digest is checked where the blob becomes visible: the destination hashes what it
/// receives and refuses a mismatch with `DIGEST_INVALID` (every registry must, the digest being
/// the blob's address), which the copy reports as corruption at the source and retries. Hashing
/// here as well would spend a second pass over every byte on the staging cell's CPU, which the
/// copy's wall time depends on, for a check the destination makes anyway.
pub struct BlobReader {
    client: Arc<RegistryClient>,
    repo: RepoName,
    digest: Digest,
    size: u64,
    /// Bytes delivered so far.
    offset: u64,
    /// Bytes to drop from the current response: a source that ignores `Range` starts over.
    skip: u64,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    resumes_left: u32,
    counter: TransferCounter,
    /// Why the stream failed, kept because an HTTP client reports a failed body only vaguely.
    failure: Arc<std::sync::Mutex<Option<String>>>,
    finished: bool,
}

impl BlobReader {
    pub fn new(
        client: Arc<RegistryClient>,
        repo: RepoName,
        digest: Digest,
        size: u64,
        counter: TransferCounter,
    ) -> BlobReader {
        let resumes_left = client.retry_policy().attempts;
        BlobReader {
            client,
            repo,
            digest,
            size,
            offset: 0,
            skip: 0,
            body: None,
            resumes_left,
            counter,
            failure: Arc::default(),
            finished: false,
        }
    }

    /// A handle on the reason the stream failed, readable after it has been consumed.
    pub fn failure(&self) -> Arc<std::sync::Mutex<Option<String>>> {
        self.failure.clone()
    }

    pub fn into_stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::unfold(self, |mut reader| async move {
            if reader.finished {
                return None;
            }
            match reader.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), reader)),
                Ok(None) => None,
                Err(err) => {
                    reader.finished = true;
                    *reader.failure.lock().expect("failure lock") = Some(err.to_string());
                    Some((Err(err), reader))
                }
            }
        })
    }

    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.body.is_none() {
                self.open().await?;
            }
            let body = self.body.as_mut().expect("opened above");
            match body.next().await {
                Some(Ok(mut chunk)) => {
                    self.counter.add(chunk.len() as u64);
                    if self.skip > 0 {
                        let dropped = self.skip.min(chunk.len() as u64);
                        self.skip -= dropped;
                        chunk = chunk.slice(dropped as usize..);
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    self.offset += chunk.len() as u64;
                    if self.offset > self.size {
                        return Err(invalid(format!(
                            "blob {} is larger than the {} bytes its descriptor says",
                            self.digest, self.size
                        )));
                    }
                    return Ok(Some(chunk));
                }
                Some(Err(err)) if self.resumes_left > 0 => {
                    self.resumes_left -= 1;
                    self.body = None;
                    eprintln!(
                        "  blob {}: connection lost after {} bytes ({}); resuming",
                        short(&self.digest),
                        self.offset,
                        super::retry::transport_reason(&err)
                    );
                    tokio::time::sleep(self.client.retry_policy().first_delay).await;
                }
                Some(Err(err)) => return Err(io::Error::other(err)),
                None if self.offset < self.size && self.resumes_left > 0 => {
                    // A body cut short without an error: resume like a dropped connection.
                    self.resumes_left -= 1;
                    self.body = None;
                }
                None if self.offset == self.size => return Ok(None),
                None => {
                    return Err(invalid(format!(
                        "blob {} ended after {} of its {} bytes",
                        self.digest, self.offset, self.size
                    )));
                }
            }
        }
    }

    async fn open(&mut self) -> io::Result<()> {
        let response = self
            .client
            .get_blob(&self.repo, &self.digest, self.offset)
            .await
            .map_err(client_to_io)?;
        self.skip = 0;
        if self.offset > 0 {
            let resumed_at = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(range_start);
            if response.status() != StatusCode::PARTIAL_CONTENT || resumed_at != Some(self.offset) {
                // The source sent the whole blob again: drop what was already delivered.
                self.skip = self.offset;
            }
        }
        self.body = Some(response.bytes_stream().boxed());
        Ok(())
    }
}

fn client_to_io(err: ClientError) -> io::Error {
    io::Error::other(err.to_string())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// `bytes START-END/TOTAL` → START.
fn range_start(content_range: &str) -> Option<u64> {
    content_range
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The first 12 hex digits, as Docker shows layer ids.
pub fn short(digest: &Digest) -> &str {
    &digest.hex()[..12]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range_starts() {
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_start("bytes */200"), None);
        assert_eq!(range_start("items 1-2/3"), None);
    }
}
