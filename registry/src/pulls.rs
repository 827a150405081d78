//! The last pull of each manifest, for retention, at no cost to pulls: a manifest GET notes
//! (repository, digest, time) in memory, and a background task writes what accumulated in one
//! transaction every few seconds, each manifest once however often it was pulled, and once more
//! at shutdown.
//!
//! A pull is a manifest GET, by tag or digest, as Docker Hub counts them. A HEAD is not: clients
//! send it to check whether what they hold is current (Docker before every pull, a restage
//! re-resolving a tag), which says nothing about anyone still using the image.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_oci::{Digest, RepoName};
use rustc_hash::FxHashMap;

use crate::metadata::{MetadataError, MetadataStore, Pull};

// FxHash: every key is a name or digest the registry already holds, so flooding a bucket takes
// pushing that many repositories or manifests, and SipHash's resistance would only slow pulls.
type Notes = FxHashMap<RepoName, FxHashMap<Digest, u64>>;

/// Pulls noted since the last write, per repository and manifest, in unix seconds.
pub struct PullNotes {
    enabled: bool,
    notes: Mutex<Notes>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PullNotes {
    /// Noting nothing unless `enabled`.
    pub fn new(enabled: bool) -> PullNotes {
        PullNotes {
            enabled,
            notes: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Notes> {
        // Every update leaves the map whole, so one that panicked leaves nothing to distrust.
        self.notes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that `repo` served manifest `digest` now. Allocates only for a manifest not pulled
    /// since the last write.
    pub fn note(&self, repo: &RepoName, digest: &Digest) {
        if !self.enabled {
            return;
        }
        let now = unix_now();
        let mut notes = self.lock();
        match notes.get_mut(repo) {
            Some(digests) => match digests.get_mut(digest) {
                Some(at) => *at = now,
                None => {
                    digests.insert(digest.clone(), now);
                }
            },
            None => {
                let mut digests = FxHashMap::default();
                digests.insert(digest.clone(), now);
                notes.insert(repo.clone(), digests);
            }
        }
    }

    /// Writes every pull noted so far in one transaction; returns how many manifests it covered.
    /// If the write fails the notes are kept for the next one.
    pub async fn flush(&self, metadata: &dyn MetadataStore) -> Result<usize, MetadataError> {
        let taken = std::mem::take(&mut *self.lock());
        let pulls: Vec<Pull> = taken
            .iter()
            .flat_map(|(repo, digests)| {
                digests.iter().map(|(digest, at)| Pull {
                    repo: repo.clone(),
                    digest: digest.clone(),
                    at: UNIX_EPOCH + Duration::from_secs(*at),
                })
            })
            .collect();
        if pulls.is_empty() {
            return Ok(0);
        }
        if let Err(err) = metadata.record_pulls(&pulls).await {
            let mut notes = self.lock();
            for (repo, digests) in taken {
                let kept = notes.entry(repo).or_default();
                for (digest, at) in digests {
                    let newest = kept.entry(digest).or_default();
                    *newest = (*newest).max(at);
                }
            }
            return Err(err);
        }
        Ok(pulls.len())
    }

    /// Flushes every `every` until the process ends.
    pub async fn flush_forever(self: Arc<Self>, metadata: Arc<dyn MetadataStore>, every: Duration) {
        if !self.enabled {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(err) = self.flush(metadata.as_ref()).await {
                tracing::warn!(error = %err, "recording manifest pulls failed; retrying with the next batch");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{SqliteMetadataStore, TaggedManifest};

    async fn tagged(store: &SqliteMetadataStore, repo: &RepoName) -> Vec<TaggedManifest> {
        store.tags_under(repo.as_str()).await.unwrap()
    }

    #[tokio::test]
    async fn many_pulls_make_one_write_per_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetadataStore::open(&dir.path().join("m.sqlite")).unwrap();
        let repo: RepoName = "pulls/app".parse().unwrap();
        let tag = "v1".parse().unwrap();
        let manifest = crate::metadata::behaviour::manifest(b"pulled", vec![]);
        store
            .put_manifest(&repo, &manifest, Some(&tag))
            .await
            .unwrap();
        let notes = PullNotes::new(true);
        for _ in 0..1000 {
            notes.note(&repo, &manifest.digest);
        }
        assert_eq!(tagged(&store, &repo).await[0].pulled_at, None);
        assert_eq!(notes.flush(&store).await.unwrap(), 1, "coalesced");
        let pulled = tagged(&store, &repo).await[0].pulled_at.unwrap();
        assert!(pulled <= SystemTime::now() && pulled + Duration::from_secs(5) > SystemTime::now());
        assert_eq!(notes.flush(&store).await.unwrap(), 0, "nothing new");

        // A later pull moves the time forward; an older one (a late batch) never moves it back.
        let earlier = Pull {
            repo: repo.clone(),
            digest: manifest.digest.clone(),
            at: pulled - Duration::from_secs(3600),
        };
        store.record_pulls(&[earlier]).await.unwrap();
        assert_eq!(tagged(&store, &repo).await[0].pulled_at, Some(pulled));
    }

    #[test]
    fn nothing_is_noted_when_disabled() {
        let notes = PullNotes::new(false);
        notes.note(&"a/b".parse().unwrap(), &Digest::sha256_of(b"x"));
        assert!(notes.lock().is_empty());
    }
}
