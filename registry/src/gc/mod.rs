//! Garbage collection while serving, driven by the metadata index (storage is never walked), and
//! the purge of upload sessions clients abandoned.
//!
//! The invariant: content bytes are deleted only after the metadata says nothing can reach them.
//! A blob is live while a manifest of any repository references it, or while it was pushed or
//! mounted within the grace period; manifest bytes are live while any repository holds that
//! manifest. The transactions that keep it:
//! - *queue*: one transaction finds unreferenced blobs older than the grace period and, for each,
//!   deletes its row and every repository's link to it and queues its digest. From its commit on,
//!   a pull or mount finds no link and a manifest naming it gets `MANIFEST_BLOB_UNKNOWN` (the
//!   manifest push checks links in its own transaction, so it either commits first and the blob
//!   is referenced, or after, and is refused). Deleting the last manifest row of a digest queues
//!   its bytes in that same transaction.
//! - *take back*: recording pushed bytes again (an upload completing, a manifest stored) removes a
//!   queued digest in the recording transaction, unless a sweep has claimed it.
//! - *sweep*: a transaction claims a queued digest, then its bytes are deleted, then it leaves the
//!   queue. While claimed, recording those bytes fails (the client's retry writes them anew).
//! - *hold*: a push stores its bytes before it records them, and a store that finds the bytes
//!   present does not write them again; so between the two a push holds the digest
//!   ([`Reservations`]: in memory with the embedded store, in the database when instances share
//!   one): a sweep leaves held digests queued, and a push waits out a sweep of its digest before
//!   storing.
//!
//! With several instances, one collects at a time (a lease in the database); pushes on the
//! others hold their digests in the database, where the sweep's claim sees them. Without the hold, a sweep between a push's store and its record would
//!   leave a recorded blob or manifest with no bytes.
//!
//! A crash at any point leaves a state the next run finishes: queued digests stay queued (claimed
//! or not) until swept, and deleting bytes that are already gone is no error.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::config::GcConfig;
use crate::error::RegistryError;
use crate::lease::Lease;
use crate::metadata::Usage;
use crate::retention::Retention;

mod reservations;

pub use reservations::{Held, Reservations};

/// Rows taken per metadata call, so one transaction stays short while the registry serves.
const BATCH: u32 = 500;
/// Digests swept at once: one claim, one deletion (a directory sync per shard touched) and one
/// release per batch rather than per digest.
const SWEEP_BATCH: u32 = 2000;

/// What one collection did or, dry, would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Cache stagings retention expired (their tags are counted in `expired_tags`).
    #[serde(default)]
    pub expired_stagings: u64,
    /// Tags retention deleted: the stagings' and those of rules.
    #[serde(default)]
    pub expired_tags: u64,
    /// Manifests that went with their last tag (a dry run leaves out the images of indexes).
    #[serde(default)]
    pub expired_manifests: u64,
    /// Why retention deleted nothing this run, if it could not ask Cloud Controller.
    #[serde(default)]
    pub retention_skipped: Option<String>,
    /// Untagged manifests deleted under `gc.untagged`.
    pub manifests_deleted: u64,
    /// Blobs and manifest bytes whose storage was deleted.
    pub objects_deleted: u64,
    pub bytes_freed: u64,
    pub duration_ms: u64,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        write!(
            f,
            "{verb} {} untagged manifests and {} objects, {} bytes, in {} ms; retention: {} \
             stagings, {} tags, {} manifests",
            self.manifests_deleted,
            self.objects_deleted,
            self.bytes_freed,
            self.duration_ms,
            self.expired_stagings,
            self.expired_tags,
            self.expired_manifests
        )?;
        if let Some(reason) = &self.retention_skipped {
            write!(f, " (skipped: {reason})")?;
        }
        Ok(())
    }
}

/// Runs collections one at a time, whoever asks (the schedule, `berth-registry gc`).
pub struct Collector {
    state: Arc<AppState>,
    config: GcConfig,
    retention: Option<Retention>,
    running: tokio::sync::Mutex<()>,
}

impl Collector {
    pub fn new(state: Arc<AppState>, config: GcConfig) -> Collector {
        Collector {
            state,
            config,
            retention: None,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs `retention` first in every collection.
    pub fn with_retention(mut self, retention: Retention) -> Collector {
        self.retention = Some(retention);
        self
    }

    /// One collection: retention, then untagged manifests where configured, then every blob
    /// nothing references and no one pushed or mounted within the grace period. Dry, it only
    /// counts (and what retention would expire frees its bytes only in a real run).
    pub async fn run(&self, dry_run: bool) -> Result<GcReport, RegistryError> {
        let _one_at_a_time = self.running.lock().await;
        let started = Instant::now();
        let cutoff = SystemTime::now() - Duration::from_secs(self.config.grace_seconds);
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        let result = if dry_run {
            self.collect(cutoff, &mut report).await
        } else {
            let lease = Lease::new(
                self.state.metadata.clone(),
                "collection",
                &self.state.instance,
            );
            match lease.run(self.collect(cutoff, &mut report)).await? {
                Some(result) => result,
                None => return Err(RegistryError::Busy("another instance is collecting now")),
            }
        };
        report.duration_ms = started.elapsed().as_millis() as u64;
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match &result {
            Ok(()) => tracing::info!(
                dry_run,
                expired_stagings = report.expired_stagings,
                expired_tags = report.expired_tags,
                expired_manifests = report.expired_manifests,
                manifests_deleted = report.manifests_deleted,
                objects_deleted = report.objects_deleted,
                bytes_freed = report.bytes_freed,
                duration_ms = report.duration_ms,
                "garbage collection done"
            ),
            Err(err) => tracing::error!(error = %err, "garbage collection failed"),
        }
        if !dry_run {
            self.state
                .metrics
                .gc_finished(unix_now, &report, result.is_ok());
            if let Ok(usage) = self.state.metadata.usage().await {
                self.state.metrics.set_usage(&usage);
            }
        }
        result.map(|()| report)
    }

    async fn collect(
        &self,
        cutoff: SystemTime,
        report: &mut GcReport,
    ) -> Result<(), RegistryError> {
        let metadata = &self.state.metadata;
        if let Some(retention) = &self.retention {
            retention.run(&self.state, cutoff, report).await?;
        }
        for prefix in &self.config.untagged {
            let prefix = if prefix == "*" { "" } else { prefix.as_str() };
            if report.dry_run {
                let found = metadata
                    .untagged_manifests(prefix, cutoff, u32::MAX)
                    .await?;
                report.manifests_deleted += found.len() as u64;
                continue;
            }
            // An index deleted here leaves its children untagged: the next batch takes them.
            loop {
                let deleted = metadata
                    .delete_untagged_manifests(prefix, cutoff, BATCH)
                    .await?;
                if deleted.is_empty() {
                    break;
                }
                report.manifests_deleted += deleted.len() as u64;
            }
        }
        if report.dry_run {
            for garbage in metadata
                .unreferenced(cutoff, None, u32::MAX)
                .await?
                .into_iter()
                .chain(metadata.queued_garbage(u32::MAX).await?)
            {
                report.objects_deleted += 1;
                report.bytes_freed += garbage.size;
            }
            return Ok(());
        }
        // Candidates are read without holding up the registry's writes, a page at a time, and
        // decided again where they are queued.
        let mut after = None;
        loop {
            let page = metadata.unreferenced(cutoff, after.as_ref(), BATCH).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.digest.clone());
            let candidates: Vec<_> = page.into_iter().map(|g| g.digest).collect();
            metadata.queue_unreferenced(cutoff, &candidates).await?;
        }
        loop {
            let queued = metadata.queued_garbage(SWEEP_BATCH).await?;
            if queued.is_empty() {
                return Ok(());
            }
            let digests = self
                .state
                .reservations
                .take_for_sweep(queued.iter().map(|g| g.digest.clone()).collect());
            if digests.is_empty() {
                // Everything left is held by pushes that will record it: their business now.
                return Ok(());
            }
            let swept = async {
                let claimed = metadata.begin_sweep(&digests).await?;
                self.state.content.delete(&claimed).await?;
                metadata.end_sweep(&claimed).await?;
                Ok::<_, RegistryError>(claimed)
            }
            .await;
            self.state.reservations.release(&digests);
            let claimed = swept?;
            let claimed: std::collections::HashSet<_> = claimed.iter().collect();
            for garbage in queued.iter().filter(|g| claimed.contains(&g.digest)) {
                report.objects_deleted += 1;
                report.bytes_freed += garbage.size;
            }
        }
    }

    /// Storage in use per namespace and repository.
    pub async fn usage(&self) -> Result<Usage, RegistryError> {
        Ok(self.state.metadata.usage().await?)
    }

    /// Collects every `gc.interval_seconds`, first after one interval; never if it is 0.
    pub async fn run_forever(self: Arc<Self>) {
        if self.config.interval_seconds == 0 {
            return;
        }
        let every = Duration::from_secs(self.config.interval_seconds);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // The outcome is logged and counted by `run`; another instance collecting is no news.
            if let Err(RegistryError::Busy(_)) = self.run(false).await {
                tracing::debug!("another instance holds the collection lease");
            }
        }
    }
}

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
    let lease = Lease::new(state.metadata.clone(), "upload-purge", &state.instance);
    loop {
        ticks.tick().await;
        match lease.run(purge_idle_uploads(&state, max_idle)).await {
            Ok(None) | Ok(Some(Ok(0))) => {}
            Ok(Some(Ok(purged))) => tracing::info!(purged, "purged abandoned upload sessions"),
            Ok(Some(Err(err))) => {
                tracing::warn!(error = %err, "purging abandoned upload sessions failed")
            }
            Err(err) => tracing::warn!(error = %err, "taking the upload purge lease failed"),
        }
    }
}
