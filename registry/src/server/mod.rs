//! Accepting connections (plain or TLS), serving them with hyper under the configured limits,
//! and draining them on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::either::Either;
use tower_http::timeout::TimeoutBody;

use crate::config::Limits;

mod sendfile;
mod tls;
mod watch;

pub use sendfile::FileSender;
use sendfile::SendfileStream;
pub use tls::ServerTls;
use watch::{Activity, Expired, Watched};

/// Facts about the connection a request arrived on, attached to every request.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: std::net::SocketAddr,
    pub tls: bool,
    /// The chain the client presented in the TLS handshake, leaf first. The handshake proved the
    /// client holds the leaf's key; whether the chain is trusted is for access control to say.
    pub client_certificates: Option<Arc<[CertificateDer<'static>]>>,
}

/// Says how many connections were turned away since it last spoke, at most once a second, so a
/// flood of refusals cannot flood the log too.
struct RefusalLog {
    since: Instant,
    refused: u64,
}

impl RefusalLog {
    fn refused(&mut self, max_connections: usize) {
        self.refused += 1;
        if self.since.elapsed() >= Duration::from_secs(1) {
            tracing::warn!(
                refused = self.refused,
                max_connections,
                "at the connection limit: refusing new connections"
            );
            *self = RefusalLog {
                since: Instant::now(),
                refused: 0,
            };
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and gives open
/// connections up to `limits.shutdown_grace_seconds` to finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
    limits: &Limits,
) {
    let seconds = Duration::from_secs;
    let header_read = seconds(limits.header_read_timeout_seconds);
    let tls_handshake = seconds(limits.tls_handshake_timeout_seconds);
    let idle = seconds(limits.idle_timeout_seconds);
    let body = seconds(limits.body_timeout_seconds);
    let grace = seconds(limits.shutdown_grace_seconds);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = RefusalLog {
        since: Instant::now() - seconds(1),
        refused: 0,
    };
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Plain connections send blobs with sendfile, which needs hyper's queued writes (see
    // sendfile); `pipeline_flush` would switch hyper back to copying, so it stays off.
    // Request heads are timed by `watch` instead of hyper, whose timer would also close
    // connections that merely wait for their next request.
    builder
        .http1()
        .writev(true)
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.refused(limits.max_connections);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let file_sender = FileSender::default();
        let request_sender = tls.is_none().then(|| file_sender.clone());
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor().clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut info = ConnectionInfo {
                peer,
                tls: acceptor.is_some(),
                client_certificates: None,
            };
            let io = match acceptor {
                None => Either::Left(SendfileStream::new(stream, file_sender)),
                Some(acceptor) => {
                    match tokio::time::timeout(tls_handshake, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            info.client_certificates =
                                stream.get_ref().1.peer_certificates().map(Arc::from);
                            Either::Right(stream)
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let requests = activity.clone();
            let service = TowerToHyperService::new(
                tower::ServiceBuilder::new()
                    .map_future(move |answer| {
                        let in_flight = requests.request();
                        async move {
                            let answered = answer.await;
                            drop(in_flight);
                            answered
                        }
                    })
                    .map_request(move |request: axum::http::Request<hyper::body::Incoming>| {
                        // A body that stops arriving fails its read, so its handler lets go of
                        // what it holds (an upload keeps the pieces that arrived).
                        let mut request = request.map(|incoming| TimeoutBody::new(body, incoming));
                        request.extensions_mut().insert(info.clone());
                        if let Some(sender) = &request_sender {
                            request.extensions_mut().insert(sender.clone());
                        }
                        request
                    })
                    .service(app),
            );
            let connection = watcher.watch(
                builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(Watched::new(io, activity.clone())),
                        service,
                    )
                    .into_owned(),
            );
            tokio::select! {
                served = connection => if let Err(err) = served {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                },
                expired = watch::expiry(&activity, header_read, idle) => match expired {
                    Expired::SlowHead => tracing::debug!(%peer, "closed: a request head took longer than the header-read timeout"),
                    Expired::Idle => tracing::debug!(%peer, "closed: idle"),
                },
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining open connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace_seconds = grace.as_secs(), "grace period over; closing the remaining connections"),
    }
}
