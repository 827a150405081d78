//! Leases in the metadata store that keep background work (collection, retention, the purge of
//! idle uploads) to one registry instance at a time when several share the stores.

use std::sync::Arc;
use std::time::Duration;

use crate::metadata::{MetadataError, MetadataStore};

/// How long a lease lasts unless renewed; the holder renews it every third of this while it works,
/// so an instance that dies holds up the others' work at most this long.
const TTL: Duration = Duration::from_secs(60);

/// One named lease, taken for `holder` (this instance).
pub struct Lease {
    metadata: Arc<dyn MetadataStore>,
    name: String,
    holder: String,
}

/// A lease this instance holds, renewed in the background until [`Held::release`]. Dropped
/// without a release, it stops being renewed and expires.
pub struct Held {
    metadata: Arc<dyn MetadataStore>,
    name: String,
    holder: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub fn new(metadata: Arc<dyn MetadataStore>, name: impl Into<String>, holder: &str) -> Self {
        Lease {
            metadata,
            name: name.into(),
            holder: holder.to_owned(),
        }
    }

    /// Takes the lease and keeps renewing it; `None` if another instance holds it.
    pub async fn hold(&self) -> Result<Option<Held>, MetadataError> {
        if !self
            .metadata
            .acquire_lease(&self.name, &self.holder, TTL)
            .await?
        {
            return Ok(None);
        }
        let renewal = {
            let (metadata, name, holder) = (
                self.metadata.clone(),
                self.name.clone(),
                self.holder.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(TTL / 3).await;
                    match metadata.acquire_lease(&name, &holder, TTL).await {
                        Ok(true) => {}
                        // Another instance may start the same work; the work itself stays
                        // correct (its transactions decide), only duplicated.
                        Ok(false) => tracing::warn!(lease = name, "lease lost to another instance"),
                        Err(err) => {
                            tracing::warn!(lease = name, error = %err, "renewing a lease failed")
                        }
                    }
                }
            })
        };
        Ok(Some(Held {
            metadata: self.metadata.clone(),
            name: self.name.clone(),
            holder: self.holder.clone(),
            renewal,
        }))
    }

    /// Runs `work` while holding the lease, renewing it meanwhile; `None` (without running it) if
    /// another instance holds it.
    pub async fn run<T>(&self, work: impl Future<Output = T>) -> Result<Option<T>, MetadataError> {
        let Some(held) = self.hold().await? else {
            return Ok(None);
        };
        let outcome = work.await;
        held.release().await;
        Ok(Some(outcome))
    }
}

impl Held {
    /// Gives the lease up, so another instance may take it at once.
    pub async fn release(self) {
        self.renewal.abort();
        if let Err(err) = self.metadata.release_lease(&self.name, &self.holder).await {
            tracing::warn!(lease = self.name, error = %err, "releasing a lease failed; it expires on its own");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}
