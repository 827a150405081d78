//! Reads of a shared database that arrive while its queries are busy go out together as one query, and each reader's answer still comes from a query sent after it asked.
//!
//! Every start and `cf scale` of a cached app resolves its image's tag; with many instances over
//! one database, each of those reads is a round trip, and a burst of them (a hundred cells
//! starting the same app, a cell evacuation restarting many apps) queues on the database. Here at
//! most `slots` queries run at once; readers arriving while all are busy gather into one waiting
//! batch, sent as one query for all their keys (the same key once) when a slot frees. The batch
//! is closed just before its query is sent, so a tag moved through another instance before a
//! reader arrived is what that reader sees: no answer is older than the request it serves. A
//! reader that finds a slot free waits for nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Semaphore, watch};

/// Keys per query, at most; a larger batch is sent as several queries in turn.
pub(super) const MAX_KEYS: usize = 64;

type Answers<K, V> = Arc<HashMap<K, V>>;

/// The batch waiting for a slot: its keys and where its answers will appear.
struct Waiting<K, V> {
    keys: HashSet<K>,
    answers: watch::Receiver<Option<Answers<K, V>>>,
}

pub(super) struct Batcher<K, V> {
    slots: Semaphore,
    waiting: Mutex<Option<Waiting<K, V>>>,
}

enum Role<K, V> {
    /// Opened the waiting batch: sends its query and publishes the answers.
    Leader(watch::Sender<Option<Answers<K, V>>>),
    Follower(watch::Receiver<Option<Answers<K, V>>>),
}

impl<K: Hash + Eq + Clone, V: Clone> Batcher<K, V> {
    /// At most `slots` queries in flight at once.
    pub(super) fn new(slots: usize) -> Self {
        Batcher {
            slots: Semaphore::new(slots.max(1)),
            waiting: Mutex::new(None),
        }
    }

    /// The value of `key`, `None` if it has none, from `query` (which answers the keys it is
    /// given that have a value, at most [`MAX_KEYS`] of them) sent by this reader or by another
    /// after this one asked. A failed or abandoned shared query is not shared: each of its
    /// readers then asks alone.
    pub(super) async fn read<E, F, Fut>(&self, key: &K, query: F) -> Result<Option<V>, E>
    where
        F: Fn(Vec<K>) -> Fut,
        Fut: Future<Output = Result<HashMap<K, V>, E>>,
    {
        match self.join(key) {
            Role::Leader(publish) => {
                let _slot = self
                    .slots
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                // Closed before the query is sent: whoever comes now forms the next batch.
                let keys: Vec<K> = lock(&self.waiting)
                    .take()
                    .map_or_else(|| vec![key.clone()], |w| w.keys.into_iter().collect());
                let mut answers = HashMap::with_capacity(keys.len());
                for chunk in keys.chunks(MAX_KEYS) {
                    answers.extend(query(chunk.to_vec()).await?);
                }
                let value = answers.get(key).cloned();
                publish.send_replace(Some(Arc::new(answers)));
                Ok(value)
            }
            Role::Follower(mut answers) => {
                let shared = answers
                    .wait_for(Option::is_some)
                    .await
                    .map(|answers| answers.clone());
                match shared {
                    Ok(Some(answers)) => Ok(answers.get(key).cloned()),
                    _ => Ok(query(vec![key.clone()]).await?.remove(key)),
                }
            }
        }
    }

    fn join(&self, key: &K) -> Role<K, V> {
        let mut waiting = lock(&self.waiting);
        match &mut *waiting {
            // A batch whose leader went away before its query is not joined but replaced.
            Some(batch) if batch.answers.has_changed().is_ok() => {
                batch.keys.insert(key.clone());
                Role::Follower(batch.answers.clone())
            }
            _ => {
                let (publish, answers) = watch::channel(None);
                *waiting = Some(Waiting {
                    keys: HashSet::from([key.clone()]),
                    answers,
                });
                Role::Leader(publish)
            }
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

    /// A database stand-in: every key's value is the number of the query that answered it
    /// (queries are numbered as sent); keys starting with `-` have none. Each query holds its
    /// answer until `release` lets it go, and records the keys it was asked.
    #[derive(Default)]
    struct Database {
        sent: AtomicU32,
        release: Notify,
        asked: Mutex<Vec<Vec<String>>>,
    }

    impl Database {
        async fn query(&self, keys: Vec<String>) -> Result<HashMap<String, u32>, String> {
            let number = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
            lock(&self.asked).push(keys.clone());
            self.release.notified().await;
            Ok(keys
                .into_iter()
                .filter(|key| !key.starts_with('-'))
                .map(|key| (key, number))
                .collect())
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

    type Shared = (Arc<Batcher<String, u32>>, Arc<Database>);

    fn read(
        (batcher, db): &Shared,
        key: &str,
    ) -> tokio::task::JoinHandle<Result<Option<u32>, String>> {
        let (batcher, db, key) = (batcher.clone(), db.clone(), key.to_owned());
        tokio::spawn(async move { batcher.read(&key, |keys| db.query(keys)).await })
    }

    #[tokio::test]
    async fn readers_arriving_while_the_slots_are_busy_share_one_later_query() {
        let shared: Shared = (Arc::new(Batcher::new(1)), Arc::default());
        let db = shared.1.clone();
        let first = read(&shared, "app/a:v1");
        until(|| db.sent() == 1).await;
        // These arrive while query 1 runs: it may predate what they must see.
        let batch: Vec<_> = ["app/a:v1", "app/b:v1", "app/a:v1", "-gone"]
            .into_iter()
            .map(|key| read(&shared, key))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(db.sent(), 1, "no more queries in flight than slots");
        db.release.notify_one();
        assert_eq!(first.await.unwrap(), Ok(Some(1)));
        until(|| db.sent() == 2).await;
        db.release.notify_one();
        let answers: Vec<_> = futures_util::future::join_all(batch).await;
        let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, [Ok(Some(2)), Ok(Some(2)), Ok(Some(2)), Ok(None)]);
        let mut second = lock(&db.asked)[1].clone();
        second.sort();
        assert_eq!(
            second,
            ["-gone", "app/a:v1", "app/b:v1"],
            "each key asked once"
        );
    }

    #[tokio::test]
    async fn a_free_slot_is_used_at_once() {
        let shared: Shared = (Arc::new(Batcher::new(2)), Arc::default());
        let db = shared.1.clone();
        let _blocked = read(&shared, "a");
        until(|| db.sent() == 1).await;
        let other = read(&shared, "b");
        until(|| db.sent() == 2).await;
        db.release.notify_waiters();
        assert_eq!(other.await.unwrap(), Ok(Some(2)));
    }

    #[tokio::test]
    async fn a_large_batch_goes_out_in_several_queries() {
        let shared: Shared = (Arc::new(Batcher::new(1)), Arc::default());
        let db = shared.1.clone();
        let first = read(&shared, "first");
        until(|| db.sent() == 1).await;
        let keys: Vec<String> = (0..MAX_KEYS + 1).map(|i| format!("k{i}")).collect();
        let batch: Vec<_> = keys.iter().map(|key| read(&shared, key)).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        db.release.notify_one();
        assert_eq!(first.await.unwrap(), Ok(Some(1)));
        until(|| db.sent() == 2).await;
        db.release.notify_one();
        until(|| db.sent() == 3).await;
        db.release.notify_one();
        for reader in batch {
            assert!(matches!(reader.await.unwrap(), Ok(Some(2 | 3))));
        }
        let asked = lock(&db.asked);
        assert_eq!((asked[1].len(), asked[2].len()), (MAX_KEYS, 1));
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_query_leaves_each_waiting_reader_to_ask_alone() {
        let batcher = Arc::new(Batcher::<String, u32>::new(1));
        let db = Arc::new(Database::default());
        let shared: Shared = (batcher.clone(), db.clone());
        let running = read(&shared, "tag");
        until(|| db.sent() == 1).await;
        let failing = {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                batcher
                    .read(&"tag".to_owned(), |_| async {
                        Err::<HashMap<String, u32>, _>("connection reset".to_owned())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let asked = Arc::new(AtomicU32::new(10));
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let (batcher, asked) = (batcher.clone(), asked.clone());
                tokio::spawn(async move {
                    let key = "tag".to_owned();
                    batcher
                        .read(&key, |keys| {
                            let value = asked.fetch_add(1, Ordering::SeqCst);
                            async move {
                                Ok::<_, String>(keys.into_iter().map(|k| (k, value)).collect())
                            }
                        })
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        db.release.notify_one();
        assert_eq!(running.await.unwrap(), Ok(Some(1)));
        assert_eq!(failing.await.unwrap(), Err("connection reset".into()));
        let mut answers = Vec::new();
        for reader in waiting {
            answers.push(reader.await.unwrap().unwrap().unwrap());
        }
        answers.sort();
        assert_eq!(answers, [10, 11], "each asked alone");

        // A leader dropped while its batch waits for a slot: the batch is not stranded.
        let running = read(&shared, "tag");
        until(|| db.sent() == 2).await;
        let abandoned = read(&shared, "tag");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                batcher
                    .read(&"tag".to_owned(), |keys| async move {
                        Ok::<_, String>(keys.into_iter().map(|k| (k, 300)).collect())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        abandoned.abort();
        assert_eq!(follower.await.unwrap(), Ok(Some(300)), "asked alone");
        let next = read(&shared, "tag");
        tokio::time::sleep(Duration::from_millis(20)).await;
        db.release.notify_one();
        assert_eq!(running.await.unwrap(), Ok(Some(2)));
        until(|| db.sent() == 3).await;
        db.release.notify_one();
        assert_eq!(
            next.await.unwrap(),
            Ok(Some(3)),
            "a new batch took its place"
        );
    }
}
