//! Digests whose bytes a push is writing and about to record, kept away from the sweep: the one
//! window the metadata transactions cannot close alone, since bytes are stored before they are
//! recorded and a store finding them present does not write them again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_oci::Digest;

#[derive(Default)]
struct Inner {
    /// Digests pushes hold, with how many hold each.
    held: HashMap<Digest, usize>,
    /// Digests a sweep is deleting: pushes wait for them.
    sweeping: HashSet<Digest>,
}

/// Shared by the request handlers (pushes) and the collector (sweeps) of one process; with the
/// embedded stores one process owns the data directory, so this sees every push and every sweep.
#[derive(Clone, Default)]
pub struct Reservations(Arc<Mutex<Inner>>);

/// A push's hold on a digest, from before its bytes are stored until its metadata is recorded.
pub struct Held {
    reservations: Reservations,
    digest: Digest,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut inner = self.reservations.lock();
        if let Some(count) = inner.held.get_mut(&self.digest) {
            *count -= 1;
            if *count == 0 {
                inner.held.remove(&self.digest);
            }
        }
    }
}

impl Reservations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Counters only: a panic elsewhere leaves nothing half-updated worth distrusting.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `digest` for a push, first waiting out a sweep that is deleting it (a batch takes
    /// well under a second), so that the push then writes the bytes anew.
    pub async fn hold(&self, digest: &Digest) -> Held {
        loop {
            {
                let mut inner = self.lock();
                if !inner.sweeping.contains(digest) {
                    *inner.held.entry(digest.clone()).or_default() += 1;
                    return Held {
                        reservations: self.clone(),
                        digest: digest.clone(),
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Takes for a sweep those of `digests` no push holds; pushes of them wait until
    /// [`Reservations::release`].
    pub fn take_for_sweep(&self, digests: Vec<Digest>) -> Vec<Digest> {
        let mut inner = self.lock();
        let free: Vec<Digest> = digests
            .into_iter()
            .filter(|digest| !inner.held.contains_key(digest))
            .collect();
        inner.sweeping.extend(free.iter().cloned());
        free
    }

    pub fn release(&self, digests: &[Digest]) {
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
        let held = reservations.hold(&a).await;
        assert_eq!(
            reservations.take_for_sweep(vec![a.clone(), b.clone()]),
            vec![b.clone()]
        );
        // A push of b waits for the sweep to finish.
        let waiting = tokio::spawn({
            let reservations = reservations.clone();
            let b = b.clone();
            async move { reservations.hold(&b).await }
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
