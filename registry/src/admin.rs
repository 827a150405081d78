//! The local maintenance socket: `berth-registry gc` and `usage` reach a running server through
//! it, since with the embedded stores the server owns the data directory alone. It lives in a
//! directory only the owner may enter, which is its access control. One JSON request line in
//! (at most 4 KiB), one JSON answer line out.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::error::RegistryError;
use crate::gc::{Collector, GcReport};
use crate::metadata::Usage;

/// Where the socket lives in a storage root.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("admin").join("socket")
}

/// Longest request line read.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Gc { dry_run: bool },
    Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Gc(GcReport),
    Usage(Usage),
    /// Another instance sharing the stores is collecting right now: nothing for this one to do.
    Busy(String),
    Error(String),
}

/// What `collector` answers `request`.
pub async fn answer(collector: &Collector, request: Request) -> Answer {
    match request {
        Request::Gc { dry_run } => match collector.run(dry_run).await {
            Ok(report) => Answer::Gc(report),
            Err(RegistryError::Busy(message)) => Answer::Busy(message.to_owned()),
            Err(err) => Answer::Error(err.to_string()),
        },
        Request::Usage => match collector.usage().await {
            Ok(usage) => Answer::Usage(usage),
            Err(err) => Answer::Error(err.to_string()),
        },
    }
}

/// Serves requests on `path` until the process ends. A socket file left by a process that died
/// is replaced.
pub async fn serve(path: PathBuf, collector: Arc<Collector>) -> std::io::Result<()> {
    // The directory, not the socket's own mode, keeps others out: a socket exists with the
    // umask's mode from bind until a chmod could narrow it.
    let dir = path.parent().expect("the socket path has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let collector = collector.clone();
        tokio::spawn(async move {
            let (reader, mut writer) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(reader.take(MAX_REQUEST));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match serde_json::from_str::<Request>(&line) {
                Ok(request) => answer(&collector, request).await,
                Err(err) => Answer::Error(format!("bad request: {err}")),
            };
            let mut text = serde_json::to_string(&answer).expect("answers serialize");
            text.push('\n');
            let _ = writer.write_all(text.as_bytes()).await;
        });
    }
}

/// Sends `request` to the server listening on `path` and waits for its answer.
pub fn ask(path: &Path, request: Request) -> std::io::Result<Answer> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    let mut line = serde_json::to_string(&request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AppState;
    use crate::content::FsContentStore;
    use crate::metadata::{MetadataStore, SqliteMetadataStore};

    #[tokio::test]
    async fn a_collection_another_instance_holds_is_busy_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let metadata: Arc<dyn MetadataStore> =
            Arc::new(SqliteMetadataStore::open(&dir.path().join("metadata.sqlite")).unwrap());
        let content = Arc::new(FsContentStore::open(dir.path()).unwrap());
        let state = Arc::new(AppState::new(
            content,
            metadata.clone(),
            crate::config::Limits::default(),
        ));
        let collector = Collector::new(state, Default::default());
        let ttl = std::time::Duration::from_secs(60);
        assert!(
            metadata
                .acquire_lease("collection", "another instance", ttl)
                .await
                .unwrap()
        );
        let busy = answer(&collector, Request::Gc { dry_run: false }).await;
        assert!(matches!(busy, Answer::Busy(_)), "{busy:?}");
        // A dry run changes nothing and needs no lease.
        let dry = answer(&collector, Request::Gc { dry_run: true }).await;
        assert!(matches!(dry, Answer::Gc(_)), "{dry:?}");
        metadata
            .release_lease("collection", "another instance")
            .await
            .unwrap();
        let done = answer(&collector, Request::Gc { dry_run: false }).await;
        assert!(matches!(done, Answer::Gc(_)), "{done:?}");
    }
}
