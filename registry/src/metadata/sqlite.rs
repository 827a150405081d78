//! SQLite metadata store: one database file in the data directory, WAL mode, versioned migrations.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use berth_oci::{Digest, Reference, RepoName, Tag};
use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    Expired, Garbage, ManifestInfo, MetadataError, MetadataStore, NewManifest, Page, PageRequest,
    Pull, Referrer, TaggedManifest, Usage,
};
use crate::content::UploadId;
use crate::quota::{Quota, QuotaUsage};

mod collect;
mod quota;
mod retention;

/// Versioned schema changes, applied in order at start-up; never edit a released one.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_initial.sql")),
    (2, include_str!("../../migrations/0002_collection.sql")),
    (3, include_str!("../../migrations/0003_retention.sql")),
    (4, include_str!("../../migrations/0004_quotas.sql")),
    (5, include_str!("../../migrations/0005_leases.sql")),
];

/// A finished upload waiting to be recorded by the next group commit.
struct Completion {
    id: UploadId,
    repo: RepoName,
    digest: String,
    size: u64,
    done: tokio::sync::oneshot::Sender<Result<bool, MetadataError>>,
}

pub struct SqliteMetadataStore {
    pool: Pool<SqliteConnectionManager>,
    /// Upload completions queued for the writer: whoever gets the write turn records all that
    /// are waiting in one transaction, one fsync for a burst of blobs finishing together.
    completions: Arc<Mutex<Vec<Completion>>>,
    /// Held across every write. SQLite admits one writer at a time and makes the others poll with
    /// sleeps (its busy handler), which add up when many blob pushes finish together. Queued
    /// here, the next writer starts the moment the previous one commits.
    writer: Arc<Mutex<()>>,
    /// Whether any quota is in force, so that a push where none is spares the pre-check's read.
    quotas: Arc<std::sync::atomic::AtomicBool>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unix(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn parse_digest(text: String) -> Result<Digest, MetadataError> {
    text.parse().map_err(|_| MetadataError::Corrupt(text))
}

fn migrate(conn: &mut Connection, migrations: &[(i64, &str)]) -> Result<(), MetadataError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Each version not applied yet, not only those above the highest applied: migrations written
    // side by side on branches may land in either order.
    let applied = tx
        .prepare("SELECT version FROM schema_migrations")?
        .query_map([], |r| r.get::<_, i64>(0))?
        .collect::<Result<std::collections::HashSet<_>, _>>()?;
    for (version, sql) in migrations.iter().filter(|(v, _)| !applied.contains(v)) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn repository_id(conn: &Connection, repo: &RepoName) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT id FROM repositories WHERE name = ?1",
        [repo.as_str()],
        |r| r.get(0),
    )
    .optional()
}

fn ensure_repository(conn: &Connection, repo: &RepoName) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO repositories (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        params![repo.as_str(), now()],
    )?;
    conn.query_row(
        "SELECT id FROM repositories WHERE name = ?1",
        [repo.as_str()],
        |r| r.get(0),
    )
}

/// The first blob or child manifest `manifest` references that repository `repo_id` (`None`: a
/// repository that does not exist yet) does not hold.
fn first_missing(
    conn: &Connection,
    repo_id: Option<i64>,
    manifest: &NewManifest,
) -> rusqlite::Result<Option<Digest>> {
    let Some(repo_id) = repo_id else {
        return Ok(manifest
            .blobs
            .iter()
            .chain(&manifest.manifests)
            .next()
            .cloned());
    };
    let mut has_blob = conn.prepare_cached(
        "SELECT 1 FROM repository_blobs WHERE repository_id = ?1 AND digest = ?2",
    )?;
    for digest in &manifest.blobs {
        if !has_blob.exists(params![repo_id, digest.to_string()])? {
            return Ok(Some(digest.clone()));
        }
    }
    let mut has_manifest =
        conn.prepare_cached("SELECT 1 FROM manifests WHERE repository_id = ?1 AND digest = ?2")?;
    for digest in &manifest.manifests {
        if !has_manifest.exists(params![repo_id, digest.to_string()])? {
            return Ok(Some(digest.clone()));
        }
    }
    Ok(None)
}

fn insert_blob_link(
    tx: &Connection,
    repo: &RepoName,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    // Before taking queued bytes back: refused bytes stay queued for the collector.
    quota::check(tx, repo.as_str(), digest, size)?;
    collect::reclaim(tx, digest)?;
    let repo_id = ensure_repository(tx, repo)?;
    tx.execute(
        "INSERT INTO blobs (digest, size, created_at, last_linked_at) VALUES (?1, ?2, ?3, ?3) \
         ON CONFLICT (digest) DO UPDATE SET last_linked_at = excluded.last_linked_at",
        params![digest, size as i64, now()],
    )?;
    let linked = tx.execute(
        "INSERT INTO repository_blobs (repository_id, digest, created_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (repository_id, digest) DO NOTHING",
        params![repo_id, digest, now()],
    )?;
    if linked == 1 {
        quota::add_holder(tx, repo.as_str(), digest, size)?;
    }
    Ok(())
}

/// Deletes manifest `digest` of `repo` (its tags and references go with it), gives back its
/// quota, and queues its bytes if no repository holds them any more; false if there was none.
fn delete_manifest_row(tx: &Connection, repo: &str, digest: &str) -> Result<bool, MetadataError> {
    let size: Option<i64> = tx
        .query_row(
            "DELETE FROM manifests WHERE digest = ?2 \
             AND repository_id = (SELECT id FROM repositories WHERE name = ?1) RETURNING size",
            params![repo, digest],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(size) = size {
        quota::remove_holder(tx, repo, digest)?;
        collect::queue_if_orphaned(tx, digest, size as u64)?;
    }
    Ok(size.is_some())
}

/// Records `batch` in one transaction, each completion in a savepoint of its own so that one
/// that fails leaves the others to commit, and answers every one.
fn record_completions(conn: &mut Connection, batch: Vec<Completion>) {
    let recorded = (|| {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batch.len());
        for completion in &batch {
            let savepoint = tx.savepoint()?;
            let result = (|| {
                let ended = savepoint.execute(
                    "DELETE FROM uploads WHERE id = ?1",
                    [completion.id.to_string()],
                )?;
                insert_blob_link(
                    &savepoint,
                    &completion.repo,
                    &completion.digest,
                    completion.size,
                )?;
                Ok(ended == 1)
            })();
            if result.is_ok() {
                savepoint.commit()?;
            } else if matches!(result, Err(MetadataError::QuotaExceeded(_))) {
                // The bytes were published for this upload; unless someone holds them, the
                // collector deletes them.
                drop(savepoint);
                collect::queue_if_orphaned(&tx, &completion.digest, completion.size)?;
            }
            results.push(result);
        }
        tx.commit()?;
        Ok::<_, MetadataError>(results)
    })();
    match recorded {
        Ok(results) => {
            for (completion, result) in batch.into_iter().zip(results) {
                let _ = completion.done.send(result);
            }
        }
        Err(err) => {
            for completion in batch {
                let _ = completion.done.send(Err(err.replicate()));
            }
        }
    }
}

fn parse_manifest_names(
    rows: Vec<(String, String)>,
) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
    rows.into_iter()
        .map(|(repo, digest)| {
            let repo = repo
                .parse()
                .map_err(|_| MetadataError::Corrupt(format!("repository name {repo:?}")))?;
            Ok((repo, parse_digest(digest)?))
        })
        .collect()
}

fn page_of(mut entries: Vec<String>, limit: u32) -> Page {
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    Page { entries, more }
}

impl SqliteMetadataStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, MetadataError> {
        // WAL is a property of the file: switch it once, before the pool opens connections that
        // would otherwise race for the exclusive lock the switch needs and back off.
        Connection::open(path)?.execute_batch("PRAGMA journal_mode = WAL;")?;
        let manager = SqliteConnectionManager::file(path).with_init(|conn| {
            // FULL: an acknowledged tag move survives power loss, matching the fsync'd blobs.
            conn.execute_batch(
                "PRAGMA busy_timeout = 10000; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
        });
        let pool = Pool::builder()
            .max_size(8)
            .min_idle(Some(1))
            .build(manager)?;
        migrate(&mut *pool.get()?, MIGRATIONS)?;
        let quotas = quota::any(&*pool.get()?)?;
        Ok(SqliteMetadataStore {
            pool,
            completions: Arc::default(),
            writer: Arc::default(),
            quotas: Arc::new(quotas.into()),
        })
    }

    /// Runs the read `f` with a pooled connection on a blocking thread (WAL readers never wait).
    async fn with<T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, MetadataError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || f(&mut *pool.get()?)).await?
    }

    /// Like [`Self::with`] for a write, in turn with the other writes.
    async fn write<T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, MetadataError> + Send + 'static,
    {
        let (pool, writer) = (self.pool.clone(), self.writer.clone());
        tokio::task::spawn_blocking(move || {
            // The lock guards no data, so a write that panicked leaves nothing to distrust.
            let _turn = writer.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut *pool.get()?)
        })
        .await?
    }
}

#[async_trait]
impl MetadataStore for SqliteMetadataStore {
    async fn repository_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_string());
        self.with(move |conn| {
            let size = conn
                .prepare_cached(
                    "SELECT b.size FROM repository_blobs rb \
                     JOIN repositories r ON r.id = rb.repository_id \
                     JOIN blobs b ON b.digest = rb.digest \
                     WHERE r.name = ?1 AND rb.digest = ?2",
                )?
                .query_row(params![repo.as_str(), digest], |r| r.get::<_, i64>(0))
                .optional()?;
            Ok(size.map(|s| s as u64))
        })
        .await
    }

    async fn blob_owners(
        &self,
        digest: &Digest,
        limit: u32,
    ) -> Result<Vec<RepoName>, MetadataError> {
        let digest = digest.to_string();
        self.with(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT r.name FROM repository_blobs rb \
                 JOIN repositories r ON r.id = rb.repository_id \
                 WHERE rb.digest = ?1 ORDER BY r.name LIMIT ?2",
            )?;
            let names = statement
                .query_map(params![digest, limit], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            names
                .into_iter()
                .map(|name| {
                    name.parse()
                        .map_err(|_| MetadataError::Corrupt(format!("repository name {name:?}")))
                })
                .collect()
        })
        .await
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_string());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let size: Option<i64> = tx
                .query_row("SELECT size FROM blobs WHERE digest = ?1", [&digest], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(size) = size else {
                return Ok(false);
            };
            insert_blob_link(&tx, &repo, &digest, size as u64)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_string());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let removed = tx.execute(
                "DELETE FROM repository_blobs WHERE digest = ?2 \
                 AND repository_id = (SELECT id FROM repositories WHERE name = ?1)",
                params![repo.as_str(), digest],
            )?;
            if removed > 0 {
                quota::remove_holder(&tx, repo.as_str(), &digest)?;
            }
            tx.commit()?;
            Ok(removed > 0)
        })
        .await
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetadataError> {
        let (repo, manifest, tag) = (repo.clone(), manifest.clone(), tag.cloned());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let digest = manifest.digest.to_string();
            match quota::check(&tx, repo.as_str(), &digest, manifest.size) {
                Err(refused @ MetadataError::QuotaExceeded(_)) => {
                    // Its bytes were stored for this push; unless someone holds them, the
                    // collector deletes them.
                    collect::queue_if_orphaned(&tx, &digest, manifest.size)?;
                    tx.commit()?;
                    return Err(refused);
                }
                checked => checked?,
            }
            let repo_id = ensure_repository(&tx, &repo)?;
            match &manifest.upstream_sizes {
                None => {
                    if let Some(missing) = first_missing(&tx, Some(repo_id), &manifest)? {
                        return Err(MetadataError::MissingReference(missing));
                    }
                }
                Some(sizes) => {
                    for (blob, size) in manifest.blobs.iter().zip(sizes) {
                        insert_blob_link(&tx, &repo, &blob.to_string(), *size)?;
                    }
                }
            }
            collect::reclaim(&tx, &digest)?;
            let recorded = tx.execute(
                "INSERT INTO manifests (repository_id, digest, media_type, size, artifact_type, subject, annotations, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (repository_id, digest) DO NOTHING",
                params![
                    repo_id,
                    digest,
                    manifest.media_type,
                    manifest.size as i64,
                    manifest.artifact_type,
                    manifest.subject.as_ref().map(ToString::to_string),
                    manifest.annotations,
                    now()
                ],
            )?;
            if recorded == 1 {
                quota::add_holder(&tx, repo.as_str(), &digest, manifest.size)?;
            }
            {
                let mut reference = tx.prepare_cached(
                    "INSERT INTO manifest_references (repository_id, manifest_digest, child_digest) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                )?;
                for child in manifest.blobs.iter().chain(&manifest.manifests) {
                    reference.execute(params![repo_id, digest, child.to_string()])?;
                }
            }
            if let Some(tag) = tag {
                tx.execute(
                    "INSERT INTO tags (repository_id, name, manifest_digest, updated_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (repository_id, name) DO UPDATE SET manifest_digest = excluded.manifest_digest, \
                     updated_at = excluded.updated_at",
                    params![repo_id, tag.as_str(), digest, now()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn missing_reference(
        &self,
        repo: &RepoName,
        manifest: &NewManifest,
    ) -> Result<Option<Digest>, MetadataError> {
        let (repo, manifest) = (repo.clone(), manifest.clone());
        self.with(move |conn| Ok(first_missing(conn, repository_id(conn, &repo)?, &manifest)?))
            .await
    }

    async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<ManifestInfo>, MetadataError> {
        let (repo, reference) = (repo.clone(), reference.clone());
        self.with(move |conn| {
            let (sql, key) = match &reference {
                Reference::Tag(tag) => (
                    "SELECT m.digest, m.media_type, m.size FROM tags t \
                     JOIN repositories r ON r.id = t.repository_id \
                     JOIN manifests m ON m.repository_id = t.repository_id AND m.digest = t.manifest_digest \
                     WHERE r.name = ?1 AND t.name = ?2",
                    tag.to_string(),
                ),
                Reference::Digest(digest) => (
                    "SELECT m.digest, m.media_type, m.size FROM manifests m \
                     JOIN repositories r ON r.id = m.repository_id WHERE r.name = ?1 AND m.digest = ?2",
                    digest.to_string(),
                ),
            };
            let row = conn
                .prepare_cached(sql)?
                .query_row(params![repo.as_str(), key], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
                })
                .optional()?;
            row.map(|(digest, media_type, size)| {
                Ok(ManifestInfo { digest: parse_digest(digest)?, media_type, size: size as u64 })
            })
            .transpose()
        })
        .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_string());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let deleted = delete_manifest_row(&tx, repo.as_str(), &digest)?;
            tx.commit()?;
            Ok(deleted)
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetadataError> {
        let (repo, tag) = (repo.clone(), tag.clone());
        self.write(move |conn| {
            let removed = conn.execute(
                "DELETE FROM tags WHERE name = ?2 \
                 AND repository_id = (SELECT id FROM repositories WHERE name = ?1)",
                params![repo.as_str(), tag.as_str()],
            )?;
            Ok(removed > 0)
        })
        .await
    }

    async fn tags(
        &self,
        repo: &RepoName,
        page: &PageRequest,
    ) -> Result<Option<Page>, MetadataError> {
        let (repo, page) = (repo.clone(), page.clone());
        self.with(move |conn| {
            let Some(repo_id) = repository_id(conn, &repo)? else {
                return Ok(None);
            };
            let names = conn
                .prepare_cached(
                    "SELECT name FROM tags WHERE repository_id = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
                )?
                .query_map(params![repo_id, page.last.unwrap_or_default(), page.limit as i64 + 1], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(Some(page_of(names, page.limit)))
        })
        .await
    }

    async fn repositories(&self, page: &PageRequest) -> Result<Page, MetadataError> {
        let page = page.clone();
        self.with(move |conn| {
            let names = conn
                .prepare_cached(
                    "SELECT name FROM repositories WHERE name > ?1 ORDER BY name LIMIT ?2",
                )?
                .query_map(
                    params![page.last.unwrap_or_default(), page.limit as i64 + 1],
                    |r| r.get(0),
                )?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(page_of(names, page.limit))
        })
        .await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, MetadataError> {
        let (repo, subject, artifact_type) = (
            repo.clone(),
            subject.to_string(),
            artifact_type.map(str::to_owned),
        );
        self.with(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations FROM manifests m \
                 JOIN repositories r ON r.id = m.repository_id \
                 WHERE r.name = ?1 AND m.subject = ?2 AND (?3 IS NULL OR m.artifact_type = ?3) \
                 ORDER BY m.digest",
            )?;
            let rows = statement.query_map(params![repo.as_str(), subject, artifact_type], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?;
            rows.map(|row| {
                let (digest, media_type, size, artifact_type, annotations) = row?;
                let annotations = annotations
                    .map(|text| serde_json::from_str(&text).map_err(|e| MetadataError::Corrupt(e.to_string())))
                    .transpose()?;
                Ok(Referrer { media_type, digest: parse_digest(digest)?, size: size as u64, artifact_type, annotations })
            })
            .collect()
        })
        .await
    }

    async fn create_upload(&self, repo: &RepoName, id: UploadId) -> Result<(), MetadataError> {
        let repo = repo.clone();
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO uploads (id, repository, created_at) VALUES (?1, ?2, ?3)",
                params![id.to_string(), repo.as_str(), now()],
            )?;
            Ok(())
        })
        .await
    }

    async fn upload_repository(&self, id: UploadId) -> Result<Option<RepoName>, MetadataError> {
        self.with(move |conn| {
            let name: Option<String> = conn
                .prepare_cached("SELECT repository FROM uploads WHERE id = ?1")?
                .query_row([id.to_string()], |r| r.get(0))
                .optional()?;
            name.map(|n| n.parse().map_err(|_| MetadataError::Corrupt(n)))
                .transpose()
        })
        .await
    }

    async fn delete_upload(&self, id: UploadId) -> Result<bool, MetadataError> {
        self.write(move |conn| {
            let deleted = conn.execute("DELETE FROM uploads WHERE id = ?1", [id.to_string()])?;
            Ok(deleted == 1)
        })
        .await
    }

    async fn complete_upload(
        &self,
        id: UploadId,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, MetadataError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.completions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Completion {
                id,
                repo: repo.clone(),
                digest: digest.to_string(),
                size,
                done,
            });
        let completions = self.completions.clone();
        // An earlier writer may take this completion along; then this turn finds nothing to do.
        self.write(move |conn| {
            let batch =
                std::mem::take(&mut *completions.lock().unwrap_or_else(PoisonError::into_inner));
            if !batch.is_empty() {
                record_completions(conn, batch);
            }
            Ok(())
        })
        .await?;
        answer
            .await
            .unwrap_or_else(|_| Err(MetadataError::GroupCommit("no answer".into())))
    }

    async fn uploads(&self) -> Result<Vec<(UploadId, SystemTime)>, MetadataError> {
        self.with(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT id, created_at FROM uploads ORDER BY created_at")?;
            let rows =
                statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            rows.map(|row| {
                let (id, created) = row?;
                let id = id.parse().map_err(|_| MetadataError::Corrupt(id))?;
                let created = UNIX_EPOCH + Duration::from_secs(created.max(0) as u64);
                Ok((id, created))
            })
            .collect()
        })
        .await
    }

    async fn unreferenced(
        &self,
        linked_before: SystemTime,
        after: Option<&Digest>,
        limit: u32,
    ) -> Result<Vec<Garbage>, MetadataError> {
        let (linked_before, after) = (
            unix(linked_before),
            after.map(ToString::to_string).unwrap_or_default(),
        );
        self.with(move |conn| collect::unreferenced(conn, linked_before, &after, limit))
            .await
    }

    async fn queue_unreferenced(
        &self,
        linked_before: SystemTime,
        candidates: &[Digest],
    ) -> Result<Vec<Garbage>, MetadataError> {
        let linked_before = unix(linked_before);
        let candidates: Vec<String> = candidates.iter().map(ToString::to_string).collect();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let queued = collect::queue_unreferenced(&tx, linked_before, &candidates)?;
            tx.commit()?;
            Ok(queued)
        })
        .await
    }

    async fn queued_garbage(&self, limit: u32) -> Result<Vec<Garbage>, MetadataError> {
        self.with(move |conn| collect::queued(conn, limit)).await
    }

    async fn begin_sweep(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetadataError> {
        let digests = digests.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut claimed = Vec::with_capacity(digests.len());
            let now_ms = now_ms();
            for digest in digests {
                if collect::begin_sweep(&tx, &digest.to_string(), now_ms)? {
                    claimed.push(digest);
                }
            }
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    async fn end_sweep(&self, digests: &[Digest]) -> Result<(), MetadataError> {
        let digests = digests.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for digest in digests {
                collect::end_sweep(&tx, &digest.to_string())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
        let (prefix, created_before) = (prefix.to_owned(), unix(created_before));
        self.with(move |conn| {
            parse_manifest_names(collect::untagged(conn, &prefix, created_before, limit)?)
        })
        .await
    }

    async fn delete_untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
        let (prefix, created_before) = (prefix.to_owned(), unix(created_before));
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let deleted = collect::delete_untagged(&tx, &prefix, created_before, limit)?;
            tx.commit()?;
            parse_manifest_names(deleted)
        })
        .await
    }

    async fn usage(&self) -> Result<Usage, MetadataError> {
        self.with(|conn| {
            let (namespaces, repositories) = collect::usage(conn)?;
            Ok(Usage {
                namespaces,
                repositories,
                quota_scopes: quota::scopes_by_use(conn)?,
            })
        })
        .await
    }

    async fn record_pulls(&self, pulls: &[Pull]) -> Result<(), MetadataError> {
        let pulls = pulls.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            retention::record_pulls(&tx, &pulls)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn set_quotas(&self, quotas: &[Quota]) -> Result<(), MetadataError> {
        let quotas = quotas.to_vec();
        let any = !quotas.is_empty();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            quota::configure(&tx, &quotas)?;
            tx.commit()?;
            Ok(())
        })
        .await?;
        self.quotas.store(any, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn tags_under(&self, prefix: &str) -> Result<Vec<TaggedManifest>, MetadataError> {
        let prefix = prefix.to_owned();
        self.with(move |conn| retention::tags_under(conn, &prefix))
            .await
    }

    async fn expire_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        tagged_at: SystemTime,
        pulled_before: Option<SystemTime>,
    ) -> Result<Expired, MetadataError> {
        let (repo, tag, digest) = (repo.clone(), tag.clone(), digest.to_string());
        let (tagged_at, pulled_before) = (unix(tagged_at), pulled_before.map(unix));
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let expired = retention::expire_tag(
                &tx,
                repo.as_str(),
                tag.as_str(),
                &digest,
                tagged_at,
                pulled_before,
            )?;
            tx.commit()?;
            Ok(expired)
        })
        .await
    }

    async fn check_quotas(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError> {
        // The linking transaction checks again whatever this says.
        if !self.quotas.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let (repo, digest) = (repo.clone(), digest.to_string());
        self.with(move |conn| quota::check(conn, repo.as_str(), &digest, size))
            .await
    }

    async fn quota_usage(&self) -> Result<Vec<QuotaUsage>, MetadataError> {
        self.with(|conn| quota::usage(conn)).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        let now_ms = now_ms();
        let expires = now_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        self.write(move |conn| {
            let taken = conn.execute(
                "INSERT INTO leases (name, holder, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                     expires_at_ms = excluded.expires_at_ms
                 WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= ?4",
                rusqlite::params![name, holder, expires, now_ms],
            )?;
            Ok(taken == 1)
        })
        .await
    }

    async fn hold(
        &self,
        digest: &Digest,
        hold: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError> {
        let (digest, hold) = (digest.to_string(), hold.to_owned());
        let expires = now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let sweeping: bool = tx
                .query_row(
                    "SELECT sweeping FROM garbage WHERE digest = ?1",
                    [&digest],
                    |row| row.get(0),
                )
                .optional()?
                .unwrap_or(false);
            if !sweeping {
                tx.execute(
                    "INSERT INTO holds (id, digest, expires_at_ms) VALUES (?1, ?2, ?3)",
                    params![hold, digest, expires],
                )?;
            }
            tx.commit()?;
            Ok(!sweeping)
        })
        .await
    }

    async fn release(&self, hold: &str) -> Result<(), MetadataError> {
        let hold = hold.to_owned();
        let now_ms = now_ms();
        self.write(move |conn| {
            // Expired holds of pushes that died go with it.
            conn.execute(
                "DELETE FROM holds WHERE id = ?1 OR expires_at_ms <= ?2",
                params![hold, now_ms],
            )?;
            Ok(())
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetadataError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                [name, holder],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_metadata_behaviour_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetadataStore::open(&dir.path().join("metadata.sqlite")).unwrap();
        crate::metadata::behaviour::run_all(&store).await;
    }

    #[test]
    fn a_migration_that_lands_after_a_higher_one_is_still_applied() {
        let mut conn = Connection::open_in_memory().unwrap();
        let (one, three, four) = (
            (1, "CREATE TABLE one (x INTEGER);"),
            (3, "CREATE TABLE three (x INTEGER);"),
            (4, "CREATE TABLE four (x INTEGER);"),
        );
        migrate(&mut conn, &[one, four]).unwrap();
        // Re-running 1 or 4 would fail: their tables exist.
        migrate(&mut conn, &[one, three, four]).unwrap();
        let versions: Vec<i64> = conn
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, [1, 3, 4]);
        conn.execute("INSERT INTO three (x) VALUES (1)", [])
            .unwrap();
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.sqlite");
        let repo: RepoName = "keep/me".parse().unwrap();
        let digest = Digest::sha256_of(b"kept");
        let first = SqliteMetadataStore::open(&path).unwrap();
        let id = UploadId::new();
        first.create_upload(&repo, id).await.unwrap();
        first.complete_upload(id, &repo, &digest, 4).await.unwrap();
        drop(first);
        let store = SqliteMetadataStore::open(&path).unwrap();
        assert_eq!(
            store.repository_blob(&repo, &digest).await.unwrap(),
            Some(4)
        );
    }
}
