//! Collects what clients abandoned: upload sessions whose data has not changed for longer than
//! `limits.upload_max_idle_seconds`, so a client that dies mid-push does not hold disk forever.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::api::AppState;
use crate::error::RegistryError;

/// Purges every upload session idle for longer than `max_idle`; returns how many went.
pub async fn purge_idle_uploads(
    state: &AppState,
    max_idle: Duration,
) -> Result<usize, RegistryError> {
    let idle_since = SystemTime::now() - max_idle;
    let mut purged = 0;
    for (id, started) in state.metadata.uploads().await? {
        // A session started later cannot have been idle that long; skip the file check.
        if started > idle_since {
            continue;
        }
        if state.content.delete_idle_upload(id, idle_since).await?
            && state.metadata.delete_upload(id).await?
        {
            state.metrics.upload_ended();
            purged += 1;
        }
    }
    Ok(purged)
}

/// Runs [`purge_idle_uploads`] periodically, often enough that a session outlives its limit by at
/// most an eighth of it (and at most an hour).
pub async fn purge_idle_uploads_forever(state: Arc<AppState>, max_idle: Duration) {
    let every = (max_idle / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match purge_idle_uploads(&state, max_idle).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "purged abandoned upload sessions"),
            Err(err) => tracing::warn!(error = %err, "purging abandoned upload sessions failed"),
        }
    }
}
