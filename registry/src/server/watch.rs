//! Deadlines for a connection's request heads and idleness, kept outside hyper for HTTP/1 and
//! HTTP/2 alike: hyper's own header-read timer also closes HTTP/1 connections that merely wait for
//! their next request, and starts only after HTTP/2 detection has read the client's first bytes.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What a connection has done, updated by its transport and its request service. The counters
/// are compared between ticks, never read for their values.
#[derive(Default)]
pub(super) struct Activity {
    /// Reads that brought bytes, and writes.
    io_events: AtomicU64,
    reads: AtomicU64,
    /// `reads` when a request last started or was answered: reads past it, with nothing in
    /// flight, are the next request's head arriving.
    reads_at_boundary: AtomicU64,
    requests_started: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    /// Marks a request as started until the returned guard is dropped (its handler answered).
    pub(super) fn request(self: &Arc<Self>) -> InFlight {
        self.requests_started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.mark_boundary();
        InFlight(self.clone())
    }

    fn mark_boundary(&self) {
        self.reads_at_boundary
            .store(self.reads.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn wrote(&self) {
        self.io_events.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) {
        self.io_events.fetch_add(1, Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

pub(super) struct InFlight(Arc<Activity>);

/// A response body that keeps its request in flight until it is sent or dropped. Frames pass
/// through untouched (the sendfile transport recognises its placeholders by address).
pub(super) struct InFlightBody<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> InFlightBody<B> {
    pub(super) fn new(body: B, in_flight: InFlight) -> InFlightBody<B> {
        InFlightBody {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.mark_boundary();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a watched connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    /// A request head did not arrive whole within the header-read timeout: of the connection
    /// opening for the first request, of its first byte for the others.
    SlowHead,
    /// Nothing in flight and no byte moved for the idle timeout.
    Idle,
}

/// Resolves when the connection behind `activity` has outlived one of its deadlines.
pub(super) async fn expiry(activity: &Activity, header_read: Duration, idle: Duration) -> Expired {
    let opened = Instant::now();
    // Checking four times per shortest deadline closes a connection at most a quarter late.
    let tick = (header_read.min(idle) / 4).max(Duration::from_millis(50));
    let mut last_events = activity.io_events.load(Ordering::Relaxed);
    let mut quiet_since = opened;
    let mut head_since = None;
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        let waiting = activity.in_flight.load(Ordering::Relaxed) == 0;
        if activity.requests_started.load(Ordering::Relaxed) == 0 {
            if now - opened >= header_read {
                return Expired::SlowHead;
            }
        } else if waiting
            && activity.reads.load(Ordering::Relaxed)
                != activity.reads_at_boundary.load(Ordering::Relaxed)
        {
            if now - *head_since.get_or_insert(now) >= header_read {
                return Expired::SlowHead;
            }
        } else {
            head_since = None;
        }
        let events = activity.io_events.load(Ordering::Relaxed);
        if events != last_events || !waiting {
            last_events = events;
            quiet_since = now;
        } else if now - quiet_since >= idle {
            return Expired::Idle;
        }
    }
}

/// A transport that records each read and write in its connection's [`Activity`]. Writes are
/// passed on with the caller's buffers untouched (the sendfile transport below it recognises its
/// placeholders by address).
pub(super) struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub(super) fn new(inner: T, activity: Arc<Activity>) -> Watched<T> {
        Watched { inner, activity }
    }

    fn note_write(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(_)) = &polled {
            self.activity.wrote();
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_expires_after_the_header_timeout() {
        let activity = Activity::default();
        let started = Instant::now();
        let expired = expiry(&activity, Duration::from_secs(4), Duration::from_secs(60)).await;
        assert_eq!(expired, Expired::SlowHead);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took <= Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle_and_an_idle_connection_expires() {
        let activity = Arc::new(Activity::default());
        let guard = activity.request();
        let watching = expiry(&activity, Duration::from_secs(1), Duration::from_secs(2));
        tokio::pin!(watching);
        // A handler that takes long while nothing moves on the wire keeps its connection.
        assert!(
            tokio::time::timeout(Duration::from_secs(30), &mut watching)
                .await
                .is_err()
        );
        drop(guard);
        let started = Instant::now();
        assert_eq!(watching.await, Expired::Idle);
        assert!(started.elapsed() <= Duration::from_millis(2600));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_moving_keep_a_connection_open() {
        let activity = Arc::new(Activity::default());
        drop(activity.request());
        let toucher = {
            let activity = activity.clone();
            async move {
                for _ in 0..40 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    activity.wrote();
                }
            }
        };
        let watching = expiry(&activity, Duration::from_secs(1), Duration::from_secs(2));
        tokio::select! {
            expired = watching => panic!("expired while bytes moved: {expired:?}"),
            () = toucher => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_request_head_that_trickles_expires_after_the_header_timeout() {
        let activity = Arc::new(Activity::default());
        drop(activity.request());
        let trickler = {
            let activity = activity.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    activity.read();
                }
            }
        };
        let started = Instant::now();
        let expired = tokio::select! {
            expired = expiry(&activity, Duration::from_secs(3), Duration::from_secs(60)) => expired,
            () = trickler => unreachable!(),
        };
        assert_eq!(expired, Expired::SlowHead);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took <= Duration::from_secs(5),
            "{took:?}"
        );
    }
}
