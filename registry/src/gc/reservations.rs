//! Digests whose bytes a push is writing and about to record, kept away from the sweep: the one
//! window the metadata transactions cannot close alone, since bytes are stored before they are
//! recorded and a store finding them present does not write them again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_oci::Digest;

use crate::metadata::{MetadataError, MetadataStore};

/// Longest a push holds a digest if it never lets go (it died): a sweep leaves the digest alone
/// that long. Far beyond the store-to-record time of any push, a multipart commit included.
const SHARED_HOLD: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Inner {
    /// Digests pushes hold, with how many hold each.
    held: HashMap<Digest, usize>,
    /// Digests a sweep is deleting: pushes wait for them.
    sweeping: HashSet<Digest>,
}

/// Shared by the request handlers (pushes) and the collector (sweeps). With the embedded stores
/// one process owns the data directory, so holds in its memory see every push and every sweep;
/// with a shared database, pushes and sweeps of every instance meet in it.
#[derive(Clone)]
pub struct Reservations(Kind);

#[derive(Clone)]
enum Kind {
    Local(Arc<Mutex<Inner>>),
    Shared(Arc<dyn MetadataStore>),
}

impl Default for Reservations {
    fn default() -> Self {
        Reservations(Kind::Local(Arc::default()))
    }
}

/// A push's hold on a digest, from before its bytes are stored until its metadata is recorded.
pub struct Held {
    reservations: Reservations,
    digest: Digest,
    /// The hold's row in a shared database.
    id: Option<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        match &self.reservations.0 {
            Kind::Local(_) => {
                let mut inner = self.reservations.lock();
                if let Some(count) = inner.held.get_mut(&self.digest) {
                    *count -= 1;
                    if *count == 0 {
                        inner.held.remove(&self.digest);
                    }
                }
            }
            Kind::Shared(metadata) => {
                if let Some(id) = self.id.take() {
                    let metadata = metadata.clone();
                    // A release that fails leaves the hold to expire: the digest is swept later.
                    tokio::spawn(async move {
                        if let Err(err) = metadata.release(&id).await {
                            tracing::warn!(error = %err, "releasing a push's hold failed; it expires");
                        }
                    });
                }
            }
        }
    }
}

impl Reservations {
    /// Holds in the database of `metadata` when several instances share it, else in memory.
    pub fn for_store(metadata: &Arc<dyn MetadataStore>) -> Reservations {
        if metadata.is_shared() {
            Reservations(Kind::Shared(metadata.clone()))
        } else {
            Reservations::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let Kind::Local(inner) = &self.0 else {
            unreachable!("only local reservations keep holds in memory");
        };
        // Counters only: a panic elsewhere leaves nothing half-updated worth distrusting.
        inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `digest` for a push, first waiting out a sweep that is deleting it (a batch takes
    /// well under a second), so that the push then writes the bytes anew.
    pub async fn hold(&self, digest: &Digest) -> Result<Held, MetadataError> {
        loop {
            match &self.0 {
                Kind::Local(_) => {
                    let mut inner = self.lock();
                    if !inner.sweeping.contains(digest) {
                        *inner.held.entry(digest.clone()).or_default() += 1;
                        return Ok(Held {
                            reservations: self.clone(),
                            digest: digest.clone(),
                            id: None,
                        });
                    }
                }
                Kind::Shared(metadata) => {
                    let id = uuid::Uuid::new_v4().to_string();
                    if metadata.hold(digest, &id, SHARED_HOLD).await? {
                        return Ok(Held {
                            reservations: self.clone(),
                            digest: digest.clone(),
                            id: Some(id),
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Takes for a sweep those of `digests` no push holds; pushes of them wait until
    /// [`Reservations::release`]. A shared database decides that itself as the sweep claims them.
    pub fn take_for_sweep(&self, digests: Vec<Digest>) -> Vec<Digest> {
        if let Kind::Shared(_) = self.0 {
            return digests;
        }
        let mut inner = self.lock();
        let free: Vec<Digest> = digests
            .into_iter()
            .filter(|digest| !inner.held.contains_key(digest))
            .collect();
        inner.sweeping.extend(free.iter().cloned());
        free
    }

    pub fn release(&self, digests: &[Digest]) {
        if let Kind::Shared(_) = self.0 {
            return;
        }
        let mut inner = self.lock();
        for digest in digests {
            inner.sweeping.remove(digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_digest_is_not_swept_and_a_swept_one_is_not_held() {
        let reservations = Reservations::default();
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        let held = reservations.hold(&a).await.unwrap();
        assert_eq!(
            reservations.take_for_sweep(vec![a.clone(), b.clone()]),
            vec![b.clone()]
        );
        // A push of b waits for the sweep to finish.
        let waiting = tokio::spawn({
            let reservations = reservations.clone();
            let b = b.clone();
            async move { reservations.hold(&b).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        reservations.release(std::slice::from_ref(&b));
        let held_b = waiting.await.unwrap();
        drop(held);
        assert_eq!(reservations.take_for_sweep(vec![a.clone(), b]), vec![a]);
        drop(held_b);
    }
}
