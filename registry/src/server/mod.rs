//! Accepting connections (plain or TLS), serving them with hyper, and draining them on shutdown.

use std::future::Future;
use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::either::Either;

use crate::config::{ConfigError, TlsConfig};

mod sendfile;

pub use sendfile::FileSender;
use sendfile::SendfileStream;

/// Loads the certificate chain and key into a TLS acceptor (HTTP/2 and HTTP/1.1 by ALPN).
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, ConfigError> {
    let open = |path: &std::path::Path| {
        std::fs::File::open(path)
            .map(BufReader::new)
            .map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })
    };
    let certificates = rustls_pemfile::certs(&mut open(&tls.certificate)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ConfigError::Read {
            path: tls.certificate.clone(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{} holds no PEM certificate",
            tls.certificate.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut open(&tls.private_key)?)
        .map_err(|source| ConfigError::Read {
            path: tls.private_key.clone(),
            source,
        })?
        .ok_or_else(|| {
            ConfigError::Invalid(format!(
                "{} holds no PEM private key",
                tls.private_key.display()
            ))
        })?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|e| ConfigError::Invalid(format!("TLS certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Facts about the connection a request arrived on, attached to every request.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    pub peer: std::net::SocketAddr,
    pub tls: bool,
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and gives open
/// connections up to `grace` to finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Plain connections send blobs with sendfile, which needs hyper's queued writes (see
    // sendfile); `pipeline_flush` would switch hyper back to copying, so it stays off.
    builder.http1().writev(true);
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
        let _ = stream.set_nodelay(true);
        let info = ConnectionInfo {
            peer,
            tls: tls.is_some(),
        };
        let file_sender = FileSender::default();
        let request_sender = tls.is_none().then(|| file_sender.clone());
        let service = TowerToHyperService::new(
            tower::ServiceBuilder::new()
                .map_request(
                    move |mut request: axum::http::Request<hyper::body::Incoming>| {
                        request.extensions_mut().insert(info);
                        if let Some(sender) = &request_sender {
                            request.extensions_mut().insert(sender.clone());
                        }
                        request
                    },
                )
                .service(app.clone()),
        );
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let io = match tls {
                None => Either::Left(SendfileStream::new(stream, file_sender)),
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => Either::Right(stream),
                    Err(err) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        return;
                    }
                },
            };
            let served = watcher
                .watch(
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .into_owned(),
                )
                .await;
            if let Err(err) = served {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
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
