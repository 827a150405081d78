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
    name: &'static str,
    holder: String,
}

impl Lease {
    pub fn new(metadata: Arc<dyn MetadataStore>, name: &'static str, holder: &str) -> Self {
        Lease {
            metadata,
            name,
            holder: holder.to_owned(),
        }
    }

    /// Runs `work` while holding the lease, renewing it meanwhile; `None` (without running it) if
    /// another instance holds it.
    pub async fn run<T>(&self, work: impl Future<Output = T>) -> Result<Option<T>, MetadataError> {
        if !self
            .metadata
            .acquire_lease(self.name, &self.holder, TTL)
            .await?
        {
            return Ok(None);
        }
        let renewal = {
            let (metadata, name, holder) = (self.metadata.clone(), self.name, self.holder.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(TTL / 3).await;
                    match metadata.acquire_lease(name, &holder, TTL).await {
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
        let outcome = work.await;
        renewal.abort();
        if let Err(err) = self.metadata.release_lease(self.name, &self.holder).await {
            tracing::warn!(lease = self.name, error = %err, "releasing a lease failed; it expires on its own");
        }
        Ok(Some(outcome))
    }
}
