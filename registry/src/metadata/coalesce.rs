//! Concurrent identical reads of a shared database share one query, and each reader's answer still comes from a query sent after it asked.
//!
//! When a hundred cells start the same app they all resolve the same tag at once; each read is one
//! round trip to a database shared by every instance, so the same question would be asked a
//! hundred times. Here readers of one key gather into a batch while the previous query for that
//! key runs; the batch is closed just before its own query is sent, so a tag moved through
//! another instance before a reader arrived is what that reader sees — no answer is older than
//! the request it serves. At most one query per key is in flight; a reader alone waits for
//! nothing.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// Readers of one key: the turn taken by each query, and the batch waiting for the next one.
struct Key<V> {
    turn: tokio::sync::Mutex<()>,
    waiting: Mutex<Option<watch::Receiver<Option<V>>>>,
}

impl<V> Default for Key<V> {
    fn default() -> Self {
        Key {
            turn: tokio::sync::Mutex::new(()),
            waiting: Mutex::new(None),
        }
    }
}

pub(super) struct Coalescer<K, V> {
    keys: Mutex<HashMap<K, Arc<Key<V>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            keys: Mutex::new(HashMap::new()),
        }
    }
}

enum Role<V> {
    /// Sends the query for the batch it opened and publishes the answer.
    Leader(watch::Sender<Option<V>>),
    Follower(watch::Receiver<Option<V>>),
}

impl<K: Hash + Eq + Clone, V: Clone> Coalescer<K, V> {
    /// Answers `key` with `query`, or with the answer of a query another reader of `key` sends
    /// after this one asked. A failed or abandoned shared query is not shared: each of its
    /// readers then sends its own.
    pub(super) async fn read<E, F, Fut>(&self, key: &K, query: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let (entry, role) = self.join(key);
        let leave = Leave {
            coalescer: self,
            key,
            entry,
        };
        let entry = &leave.entry;
        match role {
            Role::Leader(answer) => {
                let _turn = entry.turn.lock().await;
                // Closed before the query is sent: whoever comes now forms the next batch.
                lock(&entry.waiting).take();
                let result = query().await;
                if let Ok(value) = &result {
                    answer.send_replace(Some(value.clone()));
                }
                result
            }
            Role::Follower(mut answer) => {
                let shared = answer
                    .wait_for(Option::is_some)
                    .await
                    .map(|value| value.clone());
                match shared {
                    Ok(Some(value)) => Ok(value),
                    _ => query().await,
                }
            }
        }
    }

    fn join(&self, key: &K) -> (Arc<Key<V>>, Role<V>) {
        let mut keys = lock(&self.keys);
        let entry = keys.entry(key.clone()).or_default().clone();
        let role = {
            let mut waiting = lock(&entry.waiting);
            match &*waiting {
                // A batch whose leader went away before its query is not joined but replaced.
                Some(answer) if answer.has_changed().is_ok() => Role::Follower(answer.clone()),
                _ => {
                    let (sender, answer) = watch::channel(None);
                    *waiting = Some(answer);
                    Role::Leader(sender)
                }
            }
        };
        (entry, role)
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        lock(&self.keys).len()
    }
}

/// Forgets a key when its last reader is done, however that reader's future ends.
struct Leave<'a, K: Hash + Eq, V> {
    coalescer: &'a Coalescer<K, V>,
    key: &'a K,
    entry: Arc<Key<V>>,
}

impl<K: Hash + Eq, V> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        let mut keys = lock(&self.coalescer.keys);
        // Clones are made only under this lock, and each reader holds exactly one: the map's and
        // this one mean nobody else reads.
        if Arc::strong_count(&self.entry) == 2 {
            keys.remove(self.key);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;

    /// A database stand-in: each query answers the number of queries sent before it finished,
    /// and holds its answer until `release` lets it go.
    #[derive(Default)]
    struct Database {
        sent: AtomicU32,
        release: Notify,
    }

    impl Database {
        async fn query(&self) -> Result<u32, String> {
            let number = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
            self.release.notified().await;
            Ok(number)
        }

        fn sent(&self) -> u32 {
            self.sent.load(Ordering::SeqCst)
        }
    }

    async fn until(condition: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !condition() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition reached");
    }

    #[tokio::test]
    async fn a_reader_arriving_during_a_query_gets_a_later_one_shared_with_its_batch() {
        let coalescer = Arc::new(Coalescer::<&str, u32>::default());
        let db = Arc::new(Database::default());
        let read = |c: &Arc<Coalescer<&'static str, u32>>, db: &Arc<Database>| {
            let (c, db) = (c.clone(), db.clone());
            tokio::spawn(async move { c.read(&"tag", || db.query()).await })
        };
        let first = read(&coalescer, &db);
        until(|| db.sent() == 1).await;
        // These arrive while query 1 runs: it may predate what they must see.
        let batch: Vec<_> = (0..10).map(|_| read(&coalescer, &db)).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(db.sent(), 1, "one query per key in flight");
        db.release.notify_one();
        assert_eq!(first.await.unwrap(), Ok(1));
        until(|| db.sent() == 2).await;
        db.release.notify_one();
        for reader in batch {
            assert_eq!(reader.await.unwrap(), Ok(2));
        }
        assert_eq!(db.sent(), 2, "the batch shared one query");
        assert_eq!(
            coalescer.keys(),
            0,
            "nothing kept once every reader is done"
        );
    }

    #[tokio::test]
    async fn other_keys_do_not_wait() {
        let coalescer = Coalescer::<&str, u32>::default();
        let db = Database::default();
        let blocked = coalescer.read(&"a", || db.query());
        let other = coalescer.read(&"b", || async { Ok::<_, String>(7) });
        tokio::select! {
            _ = blocked => panic!("query a was never released"),
            answer = other => assert_eq!(answer, Ok(7)),
        }
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_query_leaves_each_waiting_reader_to_ask_itself() {
        let coalescer = Arc::new(Coalescer::<&str, u32>::default());
        let db = Arc::new(Database::default());
        let running = {
            let (c, db) = (coalescer.clone(), db.clone());
            tokio::spawn(async move { c.read(&"tag", || db.query()).await })
        };
        until(|| db.sent() == 1).await;
        let failing = {
            let c = coalescer.clone();
            tokio::spawn(async move {
                c.read(&"tag", || async {
                    Err::<u32, _>("connection reset".to_string())
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let asked = Arc::new(AtomicU32::new(10));
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let (c, asked) = (coalescer.clone(), asked.clone());
                tokio::spawn(async move {
                    c.read(&"tag", || async move {
                        Ok::<_, String>(asked.fetch_add(1, Ordering::SeqCst))
                    })
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        db.release.notify_one();
        assert_eq!(running.await.unwrap(), Ok(1));
        assert_eq!(failing.await.unwrap(), Err("connection reset".into()));
        let mut answers = Vec::new();
        for reader in waiting {
            answers.push(reader.await.unwrap().unwrap());
        }
        answers.sort();
        assert_eq!(answers, vec![10, 11], "each asked for itself");

        // A leader dropped while its batch waits for the turn: the batch is not stranded.
        let running = {
            let (c, db) = (coalescer.clone(), db.clone());
            tokio::spawn(async move { c.read(&"tag", || db.query()).await })
        };
        until(|| db.sent() == 2).await;
        let abandoned = {
            let c = coalescer.clone();
            tokio::spawn(async move { c.read(&"tag", || async { Ok::<_, String>(200) }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = {
            let c = coalescer.clone();
            tokio::spawn(async move { c.read(&"tag", || async { Ok::<_, String>(300) }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        abandoned.abort();
        assert_eq!(follower.await.unwrap(), Ok(300), "asked itself");
        db.release.notify_one();
        assert_eq!(running.await.unwrap(), Ok(2));
        assert_eq!(coalescer.keys(), 0);
    }
}
