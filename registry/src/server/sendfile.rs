//! Zero-copy blob downloads on plain HTTP/1: the kernel moves file pages to the socket
//! (`sendfile`), so blob bytes never pass through the registry's memory.
//!
//! hyper writes only bytes it is given, so a blob body is made of placeholders: frames that point
//! into [`PLACEHOLDER`], each queued, in order, with the file segment it stands for. The
//! connection's transport, [`SendfileStream`], recognises a placeholder by its address and sends
//! the queued segment in its place. This needs hyper to hand body buffers to the transport
//! untouched, which its queued write strategy does; `serve` pins that strategy with `writev(true)`.
//! A placeholder that does not match the queue exactly fails the connection: a client may see a
//! broken download, never wrong bytes.
//!
//! Only plain-TCP connections get a [`FileSender`], and only HTTP/1 requests use it: TLS and
//! HTTP/2 re-frame the body in user space, so they stream through `content::chunks` instead.
//! Like nginx without `aio`, `sendfile` waits for the disk on the worker thread when a blob is not
//! in the page cache; sequential-access advice widens the kernel's readahead to keep that rare.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::num::NonZeroU64;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Largest placeholder frame: big enough that hyper asks for few frames per blob.
const FRAME: usize = 2 << 20;

/// Address range that marks body bytes as "send from the queued file instead". Never read: it is
/// zero-filled static memory, so it costs address space, not resident memory.
static PLACEHOLDER: [u8; FRAME] = [0; FRAME];

fn is_placeholder(buf: &[u8]) -> bool {
    let start = PLACEHOLDER.as_ptr() as usize;
    let at = buf.as_ptr() as usize;
    !buf.is_empty() && (start..start + FRAME).contains(&at)
}

/// The part of a file one placeholder frame stands for; shrinks from the front as it is sent.
struct Segment {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

/// One connection's queue of segments waiting to be sent, shared by the response bodies that fill
/// it and the transport that drains it. Attached to each request on a plain-TCP connection.
#[derive(Clone, Default)]
pub struct FileSender {
    segments: Arc<Mutex<VecDeque<Segment>>>,
}

impl FileSender {
    fn segments(&self) -> MutexGuard<'_, VecDeque<Segment>> {
        self.segments.lock().expect("sendfile queue poisoned")
    }

    /// A response body that sends `range` of `file` on this sender's connection.
    pub fn body(
        &self,
        file: File,
        range: Range<u64>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        // Advice only; a filesystem that ignores it serves just as correctly.
        let _ = rustix::fs::fadvise(
            &file,
            range.start,
            NonZeroU64::new(range.end - range.start),
            rustix::fs::Advice::Sequential,
        );
        let file = Arc::new(file);
        let sender = self.clone();
        let frames = (range.start..range.end)
            .step_by(FRAME)
            .map(move |start| start..range.end.min(start + FRAME as u64));
        // Lazy: a segment is queued only when hyper takes its frame, so queue order is write order.
        futures_util::stream::iter(frames).map(move |frame| {
            let len = (frame.end - frame.start) as usize;
            sender.segments().push_back(Segment {
                file: file.clone(),
                offset: frame.start,
                len,
            });
            Ok(Bytes::from_static(&PLACEHOLDER[..len]))
        })
    }
}

/// A TCP connection that sends queued file segments where hyper writes placeholders.
pub(super) struct SendfileStream {
    tcp: TcpStream,
    sender: FileSender,
}

impl SendfileStream {
    pub(super) fn new(tcp: TcpStream, sender: FileSender) -> Self {
        SendfileStream { tcp, sender }
    }

    /// Sends up to `len` bytes of the segment at the front of the queue, which must be exactly
    /// what the placeholder being written stands for.
    fn poll_send_file(&self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        let mut segments = self.sender.segments();
        let Some(segment) = segments.front_mut().filter(|segment| segment.len == len) else {
            return Poll::Ready(Err(io::Error::other(
                "response body placeholder does not match the queued file segment",
            )));
        };
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                let mut offset = segment.offset;
                Ok(rustix::fs::sendfile(
                    &self.tcp,
                    &*segment.file,
                    Some(&mut offset),
                    len,
                )?)
            });
            match sent {
                Ok(0) => {
                    // Committed blobs are immutable, so a short file means damaged storage.
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file is shorter than its recorded size",
                    )));
                }
                Ok(n) => {
                    segment.offset += n as u64;
                    segment.len -= n;
                    if segment.len == 0 {
                        segments.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if is_placeholder(buf) {
            this.poll_send_file(cx, buf.len())
        } else {
            Pin::new(&mut this.tcp).poll_write(cx, buf)
        }
    }

    /// Writes the ordinary buffers before the first placeholder with one `writev`, or, when the
    /// placeholder comes first, sends its segment.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match bufs.iter().position(|buf| is_placeholder(buf)) {
            None => Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs),
            Some(first) if bufs[..first].iter().all(|buf| buf.is_empty()) => {
                this.poll_send_file(cx, bufs[first].len())
            }
            Some(first) => Pin::new(&mut this.tcp).poll_write_vectored(cx, &bufs[..first]),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected loopback pair: the server end sends files, the client end reads.
    async fn pair(sender: FileSender) -> (SendfileStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (SendfileStream::new(server, sender), client)
    }

    fn file_of(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    async fn frames(sender: &FileSender, file: File, range: Range<u64>) -> Vec<Bytes> {
        sender.body(file, range).try_collect().await.unwrap()
    }

    /// Writes `parts` as hyper's queued strategy does: vectored, resuming after partial writes.
    async fn write_vectored_all(stream: &mut SendfileStream, parts: &[&[u8]]) -> io::Result<()> {
        let mut parts: Vec<&[u8]> = parts.to_vec();
        while !parts.is_empty() {
            let slices: Vec<IoSlice<'_>> = parts.iter().map(|part| IoSlice::new(part)).collect();
            let mut written = stream.write_vectored(&slices).await?;
            while written > 0 {
                let first = parts[0].len().min(written);
                parts[0] = &parts[0][first..];
                written -= first;
                if parts[0].is_empty() {
                    parts.remove(0);
                }
            }
            parts.retain(|part| !part.is_empty());
        }
        stream.shutdown().await
    }

    #[tokio::test]
    async fn placeholders_go_out_as_their_file_segments_in_order() {
        let data: Vec<u8> = (0..FRAME * 2 + 77).map(|i| (i % 251) as u8).collect();
        let sender = FileSender::default();
        let (mut server, mut client) = pair(sender.clone()).await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let body = frames(&sender, file_of(&data), 5..data.len() as u64).await;
        assert_eq!(
            body.len(),
            3,
            "three frames for a little over two frames of data"
        );
        let head: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";
        let mut parts = vec![head];
        parts.extend(body.iter().map(|frame| &frame[..]));
        write_vectored_all(&mut server, &parts).await.unwrap();

        let got = reader.await.unwrap();
        assert_eq!(&got[..head.len()], head);
        assert!(
            got[head.len()..] == data[5..],
            "the file's bytes, not placeholders"
        );
        assert!(sender.segments().is_empty(), "every segment was sent");
    }

    #[tokio::test]
    async fn a_placeholder_that_does_not_match_the_queue_fails_the_write() {
        let (mut server, _client) = pair(FileSender::default()).await;
        let err = server.write(&PLACEHOLDER[..10]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other, "nothing queued: {err}");

        let sender = FileSender::default();
        let (mut server, _client) = pair(sender.clone()).await;
        let body = frames(&sender, file_of(b"0123456789"), 0..10).await;
        let err = server.write(&body[0][..5]).await.unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::Other,
            "shorter than queued: {err}"
        );
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_segment_is_an_error_not_a_short_body() {
        let sender = FileSender::default();
        let (mut server, _client) = pair(sender.clone()).await;
        let body = frames(&sender, file_of(b"0123456789"), 0..20).await;
        let err = write_vectored_all(&mut server, &[&body[0]])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn only_the_placeholder_region_is_a_placeholder() {
        assert!(is_placeholder(&PLACEHOLDER[..1]));
        assert!(is_placeholder(&PLACEHOLDER[FRAME - 1..]));
        assert!(!is_placeholder(&PLACEHOLDER[..0]));
        assert!(!is_placeholder(&[0u8; 16]));
    }
}
