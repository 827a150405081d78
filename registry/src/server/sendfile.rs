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
//! `sendfile` runs on the async worker thread, where waiting for the disk would stall every
//! other connection on it. So before a frame is handed to hyper its pages are checked with a read
//! that refuses to wait (`RWF_NOWAIT`); a frame that is not in the page cache is read into it on
//! the blocking pool first, and each frame asks the kernel to start reading the next one.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::num::NonZeroU64;
use std::ops::Range;
use std::os::unix::fs::FileExt;
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

/// Asks the kernel to start reading the frame at `start` (up to `end`) into the page cache, without
/// waiting for it. Advice only: a filesystem that ignores it serves just as correctly.
fn prefetch(file: &File, start: u64, end: u64) {
    let len = end.saturating_sub(start).min(FRAME as u64);
    if let Some(len) = NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, start, Some(len), rustix::fs::Advice::WillNeed);
    }
}

/// Whether the first and last byte of `frame` are in the page cache, asked without waiting for
/// the disk. Sequential readahead fills what lies between. Unsupported or failing probes say no.
fn is_cached(file: &File, frame: &Range<u64>) -> bool {
    [frame.start, frame.end - 1].into_iter().all(|offset| {
        let mut byte = [0u8];
        let probe = rustix::io::preadv2(
            file,
            &mut [io::IoSliceMut::new(&mut byte)],
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        );
        probe == Ok(1)
    })
}

/// Reads `frame` of `file` into the page cache, waiting for the disk; run on the blocking pool.
fn load(file: &File, frame: Range<u64>) -> io::Result<()> {
    let mut scratch = vec![0u8; 256 << 10];
    let mut offset = frame.start;
    while offset < frame.end {
        let want = scratch.len().min((frame.end - offset) as usize);
        match file.read_at(&mut scratch[..want], offset) {
            Ok(0) => break, // a short file fails later, in `poll_send_file`, with a clear error
            Ok(n) => offset += n as u64,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
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
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + use<> {
        let end = range.end;
        prefetch(&file, range.start, end);
        let file = Arc::new(file);
        let sender = self.clone();
        let frames = (range.start..end)
            .step_by(FRAME)
            .map(move |start| start..end.min(start + FRAME as u64));
        // Lazy: a segment is queued only when hyper takes its frame, so queue order is write order.
        futures_util::stream::iter(frames).then(move |frame| {
            let (file, sender) = (file.clone(), sender.clone());
            async move {
                if !is_cached(&file, &frame) {
                    let (file, frame) = (file.clone(), frame.clone());
                    tokio::task::spawn_blocking(move || load(&file, frame))
                        .await
                        .map_err(io::Error::other)??;
                }
                prefetch(&file, frame.end, end);
                let len = (frame.end - frame.start) as usize;
                sender.segments().push_back(Segment {
                    file,
                    offset: frame.start,
                    len,
                });
                Ok(Bytes::from_static(&PLACEHOLDER[..len]))
            }
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
    /// hyper's queued strategy writes only through `poll_write_vectored`; a plain write while a
    /// segment waits means hyper copied the placeholders into a buffer of its own, so it is
    /// refused before any of them reach the client.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if is_placeholder(buf) {
            this.poll_send_file(cx, buf.len())
        } else if !this.sender.segments().is_empty() {
            Poll::Ready(Err(io::Error::other(
                "a file segment is queued but hyper wrote copied bytes: is writev(true) set?",
            )))
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
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper_util::rt::TokioIo;
    use std::io::Write;
    use std::time::Duration;
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

    #[tokio::test]
    async fn a_plain_write_while_a_segment_waits_is_refused() {
        let sender = FileSender::default();
        let (mut server, _client) = pair(sender.clone()).await;
        let body = frames(&sender, file_of(b"0123456789"), 0..10).await;
        let copied = body[0].to_vec();
        let err = server.write(&copied).await.unwrap_err();
        assert!(err.to_string().contains("copied"), "{err}");
    }

    /// Serves one connection with hyper: `GET /START-END` answers that range of `data`.
    async fn serve_with_hyper(data: &[u8], writev: bool) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let file = file_of(data);
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let sender = FileSender::default();
            let io = TokioIo::new(SendfileStream::new(tcp, sender.clone()));
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let (start, end) = request.uri().path()[1..].split_once('-').unwrap();
                let range: Range<u64> = start.parse().unwrap()..end.parse().unwrap();
                let len = range.end - range.start;
                let body = sender.body(file.try_clone().unwrap(), range);
                let body = StreamBody::new(body.map_ok(Frame::data));
                let response = hyper::Response::builder()
                    .header("content-length", len)
                    .body(body)
                    .unwrap();
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(writev)
                .serve_connection(io, service)
                .await;
        });
        addr
    }

    /// Sends `GET path` on `client`, waits a little so the server fills the socket and has to
    /// wait for it to drain, then reads the response's body (whatever arrives before it ends).
    async fn get(client: &mut TcpStream, path: &str) -> Vec<u8> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if client.read(&mut byte).await.unwrap() == 0 {
                return Vec::new();
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        let mut filled = 0;
        while filled < len {
            match client.read(&mut body[filled..]).await.unwrap() {
                0 => break,
                n => filled += n,
            }
        }
        body.truncate(filled);
        body
    }

    #[tokio::test]
    async fn hyper_sends_the_files_bytes_through_a_full_socket_and_on_a_reused_connection() {
        let data: Vec<u8> = (0..FRAME * 4 + 333).map(|i| (i * 7 % 253) as u8).collect();
        let addr = serve_with_hyper(&data, true).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let whole = get(&mut client, &format!("/0-{}", data.len())).await;
        assert!(whole == data, "whole body: {} bytes", whole.len());
        let (start, end) = (FRAME - 1000, 3 * FRAME + 1000);
        let part = get(&mut client, &format!("/{start}-{end}")).await;
        assert!(part == data[start..end], "range: {} bytes", part.len());
    }

    #[tokio::test]
    async fn hyper_copying_the_body_breaks_the_connection_instead_of_sending_placeholders() {
        let data = vec![7u8; FRAME + 5];
        let addr = serve_with_hyper(&data, false).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let body = get(&mut client, &format!("/0-{}", data.len())).await;
        assert!(
            body.is_empty(),
            "{} body bytes reached the client",
            body.len()
        );
    }

    #[tokio::test]
    async fn frames_not_in_the_page_cache_are_read_in_before_hyper_gets_them() {
        // In the crate's directory, so on a disk: a memory file system never drops pages.
        let mut file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        file.write_all(&vec![9u8; FRAME * 2]).unwrap();
        file.sync_all().unwrap();
        let whole = 0..(FRAME * 2) as u64;
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(
            !is_cached(&file, &whole),
            "the pages were dropped from the cache"
        );
        let sender = FileSender::default();
        frames(&sender, file.try_clone().unwrap(), whole).await;
        for frame in [0..FRAME as u64, FRAME as u64..(FRAME * 2) as u64] {
            assert!(is_cached(&file, &frame), "{frame:?} is cached once queued");
        }
    }

    #[test]
    fn only_the_placeholder_region_is_a_placeholder() {
        assert!(is_placeholder(&PLACEHOLDER[..1]));
        assert!(is_placeholder(&PLACEHOLDER[FRAME - 1..]));
        assert!(!is_placeholder(&PLACEHOLDER[..0]));
        assert!(!is_placeholder(&[0u8; 16]));
    }
}
