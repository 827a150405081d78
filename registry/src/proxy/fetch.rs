//! Blob bytes of proxied repositories: one upstream download per digest in this process, streamed to the client that asked first and stored through the upload path, visible only once verified.
//!
//! Clients that ask while a download runs wait for it to be committed and then read the stored
//! blob. Streaming to them from the download as well would need either the whole blob in memory
//! or reading a file still being written; waiting keeps memory per download at a few chunks and
//! gives them only verified bytes, at the cost of their first byte coming when the download ends.
//! Instances sharing the stores take turns through a lease per digest: one that finds another
//! downloading the blob waits for its bytes to be stored the same way.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use berth_oci::{Digest, RepoName};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Mirror, Turn, UpstreamError};
use crate::api::AppState;
use crate::content::{ByteStream, UploadId};
use crate::error::RegistryError;

/// Chunks queued between the upstream, the store and the first client.
const CHUNKS_AHEAD: usize = 8;

/// A first client that takes no chunk for this long is left behind: the download goes on for
/// the clients waiting on it.
const CLIENT_STALL: Duration = Duration::from_secs(30);

/// What a finished download tells the clients that waited on it.
type Outcome = Result<(), String>;

/// Downloads running in this process, by digest.
#[derive(Debug, Default)]
pub struct BlobFetches {
    running: Mutex<HashMap<Digest, watch::Receiver<Option<Outcome>>>>,
}

/// How to answer a pull of a blob whose bytes were not here.
pub enum Served {
    /// This client started the download: its body, which fails if the bytes prove wrong.
    Streaming(Body),
    /// The bytes are stored now: serve them as any blob.
    Stored,
}

/// Gets blob `digest` (of `size` bytes, as its manifest says) of the mirrored `repo` from the
/// upstream, or waits for the download another client started.
pub async fn fetch_blob(
    state: &Arc<AppState>,
    mirror: Mirror,
    repo: &RepoName,
    digest: &Digest,
    size: u64,
) -> Result<Served, RegistryError> {
    let (started, mut done) = {
        let mut running = state
            .proxy
            .blobs
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match running.get(digest) {
            Some(done) => (None, done.clone()),
            None => {
                let (report, done) = watch::channel(None);
                running.insert(digest.clone(), done.clone());
                let (started, start) = oneshot::channel();
                let (chunks, body) = mpsc::channel(CHUNKS_AHEAD);
                let download = Download {
                    state: state.clone(),
                    mirror,
                    repo: repo.clone(),
                    digest: digest.clone(),
                    size,
                };
                // Its own task: the download must go on if this client goes away.
                tokio::spawn(download.run(started, chunks, report));
                (Some((start, body)), done)
            }
        }
    };
    if let Some((start, body)) = started {
        return match start.await {
            Ok(Ok(true)) => Ok(Served::Streaming(Body::from_stream(receiver_stream(body)))),
            Ok(Ok(false)) => Ok(Served::Stored),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(RegistryError::BlobFetchFailed(
                "the download stopped".into(),
            )),
        };
    }
    let outcome = done
        .wait_for(Option::is_some)
        .await
        .map(|outcome| outcome.clone().unwrap_or(Ok(())));
    match outcome {
        Ok(Ok(())) => Ok(Served::Stored),
        Ok(Err(message)) => Err(RegistryError::BlobFetchFailed(message)),
        Err(_) => Err(RegistryError::BlobFetchFailed(
            "the download stopped".into(),
        )),
    }
}

fn receiver_stream(receiver: mpsc::Receiver<io::Result<Bytes>>) -> ByteStream {
    Box::pin(futures_util::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
    ))
}

struct Download {
    state: Arc<AppState>,
    mirror: Mirror,
    repo: RepoName,
    digest: Digest,
    size: u64,
}

impl Drop for Download {
    /// Ends the flight however the task ends (a panic included), after its outcome was reported,
    /// so a later pull starts afresh or finds the bytes stored.
    fn drop(&mut self) {
        self.state
            .proxy
            .blobs
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.digest);
    }
}

impl Download {
    async fn run(
        self,
        started: oneshot::Sender<Result<bool, RegistryError>>,
        chunks: mpsc::Sender<io::Result<Bytes>>,
        report: watch::Sender<Option<Outcome>>,
    ) {
        let outcome = self.fetch(started, chunks).await;
        if let Err(message) = &outcome {
            tracing::warn!(
                upstream = %self.mirror.upstream.prefix,
                repository = %self.repo,
                digest = %self.digest,
                error = %message,
                "blob download from the upstream failed; nothing was stored"
            );
        }
        let _ = report.send(Some(outcome));
    }

    async fn fetch(
        &self,
        started: oneshot::Sender<Result<bool, RegistryError>>,
        chunks: mpsc::Sender<io::Result<Bytes>>,
    ) -> Outcome {
        let (response, id, turn) = match self.prepare().await {
            Ok(Some(prepared)) => prepared,
            Ok(None) => {
                let _ = started.send(Ok(false));
                return Ok(());
            }
            Err(err) => {
                let message = err.to_string();
                let _ = started.send(Err(err));
                return Err(message);
            }
        };
        let _ = started.send(Ok(true));
        let outcome = match self.transfer(id, response, chunks).await {
            Ok(()) => Ok(()),
            Err(err) => {
                let _ = crate::api::discard_upload(&self.state, id).await;
                Err(err.to_string())
            }
        };
        turn.done().await;
        outcome
    }

    /// The upstream's answer, an upload session to store it in and this instance's turn to
    /// fetch; `None` if the bytes are here already (a download, here or on another instance, that
    /// ended before this one began).
    async fn prepare(&self) -> Result<Option<(reqwest::Response, UploadId, Turn)>, RegistryError> {
        let state = &self.state;
        let stored = || async { Ok(state.content.stat(&self.digest).await?.is_some()) };
        if stored().await? {
            return Ok(None);
        }
        let name = super::lease_name("blob", &self.digest.to_string());
        let turn = match Turn::take(state, name, stored).await? {
            Turn::Stored => return Ok(None),
            turn => turn,
        };
        let upstream = &self.mirror.upstream;
        let checked = async {
            let response = upstream
                .get_blob(&state.metrics, &self.mirror.remote, &self.digest)
                .await
                .map_err(|err| match err {
                    UpstreamError::NotFound { .. } => {
                        RegistryError::BlobUnknown(Some(self.digest.clone()))
                    }
                    other => other.into(),
                })?;
            if let Some(length) = response.content_length()
                && length != self.size
            {
                return Err(UpstreamError::Invalid {
                    upstream: upstream.prefix.clone(),
                    reason: format!(
                        "{} is {length} bytes there, {} by its manifest",
                        self.digest, self.size
                    ),
                }
                .into());
            }
            Ok(response)
        };
        // The session is opened while the upstream answers: its bookkeeping (a row and a
        // directory, each made durable) stays out of the client's wait for the first byte.
        let (response, id) = tokio::join!(checked, crate::api::start_upload(state, &self.repo));
        match (response, id) {
            (Ok(response), Ok(id)) => Ok(Some((response, id, turn))),
            (Err(err), Ok(id)) => {
                let _ = crate::api::discard_upload(state, id).await;
                turn.done().await;
                Err(err)
            }
            (_, Err(err)) => {
                turn.done().await;
                Err(err)
            }
        }
    }

    /// Streams the body into upload `id` and to the first client, then commits it, which checks
    /// the digest. The client gets the last chunk only after that check, so a blob that proves
    /// wrong never reaches it whole.
    async fn transfer(
        &self,
        id: UploadId,
        response: reqwest::Response,
        chunks: mpsc::Sender<io::Result<Bytes>>,
    ) -> Result<(), RegistryError> {
        let state = &self.state;
        let prefix = &self.mirror.upstream.prefix;
        let (to_store, stored) = mpsc::channel(CHUNKS_AHEAD);
        let append = state
            .content
            .append_upload(id, Some(0), receiver_stream(stored));
        let pump = async move {
            let mut client = Some(chunks);
            let mut held = None;
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(err) => {
                        // The store sees the body end early and keeps nothing.
                        let _ = to_store.send(Err(io::Error::other(err))).await;
                        break;
                    }
                };
                state.metrics.proxy_blob_bytes(prefix, chunk.len() as u64);
                if to_store.send(Ok(chunk.clone())).await.is_err() {
                    break;
                }
                if let Some(previous) = held.replace(chunk) {
                    forward(&mut client, previous).await;
                }
            }
            (held, client)
        };
        let (appended, (held, mut client)) = tokio::join!(append, pump);
        let result = async {
            appended?;
            crate::api::commit_upload(state, &self.repo, id, &self.digest).await
        }
        .await;
        match &result {
            Ok(()) => {
                if let Some(last) = held {
                    forward(&mut client, last).await;
                }
            }
            Err(err) => {
                if let Some(client) = client {
                    let _ = client.try_send(Err(io::Error::other(err.to_string())));
                }
            }
        }
        result
    }
}

/// Hands `chunk` to the first client, unless it is gone or stalled (then it is let go).
async fn forward(client: &mut Option<mpsc::Sender<io::Result<Bytes>>>, chunk: Bytes) {
    if let Some(sender) = client {
        let sent = tokio::time::timeout(CLIENT_STALL, sender.send(Ok(chunk))).await;
        if !matches!(sent, Ok(Ok(()))) {
            *client = None;
        }
    }
}
