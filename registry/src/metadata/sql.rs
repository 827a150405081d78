//! Metadata in a shared PostgreSQL or MySQL (MariaDB) database, so that several registry
//! instances can serve the same repositories: one implementation for both, over sqlx's runtime-
//! chosen driver, with the few differences in [`db::Dialect`].
//!
//! Each trait method that changes anything is one `SERIALIZABLE` transaction: the statements are
//! the SQLite store's, which decide ("nothing references this blob", "no tag keeps this
//! manifest") and then act in one transaction on the strength of SQLite admitting one writer at a
//! time. Serializable isolation keeps that reasoning true with many writers (PostgreSQL aborts
//! one of two transactions that could not have run one after the other, InnoDB locks what each
//! reads); the loser is run again from the start by [`db::retried`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use berth_oci::{Digest, Reference, RepoName, Tag};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

use super::batch::{self, Batcher};
use super::{
    Expired, Garbage, ManifestInfo, MetadataError, MetadataStore, NewManifest, Page, PageRequest,
    Pull, Referrer, TaggedManifest, Usage,
};
use crate::content::UploadId;
use crate::quota::{Quota, QuotaUsage};
use db::{Arg, Dialect, Session, args, get, retried};

mod collect;
mod config;
pub(crate) mod db;
mod quota;
mod retention;

pub use config::{DatabaseConfig, DatabaseTls, MetadataConfig, TlsMode};

pub struct SqlMetadataStore {
    pool: AnyPool,
    dialect: Dialect,
    /// The lookups every pull makes (which manifest a tag or digest names in a repository,
    /// whether a repository owns a blob): batched when they come faster than the database
    /// answers.
    by_tag: Lookup<ManifestInfo>,
    by_digest: Lookup<ManifestInfo>,
    owned_blobs: Lookup<u64>,
}

/// One kind of lookup by `(repository, name)`: its batcher and its statement for every batch
/// width, built once.
struct Lookup<V> {
    batcher: Batcher<(String, String), V>,
    /// For `2^i` keys at index `i`: one branch per key, each planned as the lookup of a single
    /// key is (by the unique repository name, then the primary keys), since a list of pairs in
    /// one WHERE spans two tables, which neither database can look up by index. Batches are
    /// padded to a power of two by repeating a key, so that these few texts serve every size,
    /// each prepared once per connection.
    statements: Vec<String>,
    /// Reads what a row found, after the repository and name that start it.
    value: fn(&sqlx::any::AnyRow) -> Result<V, MetadataError>,
}

impl<V: Clone> Lookup<V> {
    fn new(
        select: fn(usize, usize) -> String,
        value: fn(&sqlx::any::AnyRow) -> Result<V, MetadataError>,
    ) -> Self {
        let statements = (0..=batch::MAX_KEYS.trailing_zeros())
            .map(|power| {
                (0..1usize << power)
                    .map(|i| select(2 * i + 1, 2 * i + 2))
                    .collect::<Vec<_>>()
                    .join(" UNION ALL ")
            })
            .collect();
        Lookup {
            batcher: Batcher::new(LOOKUP_SLOTS),
            statements,
            value,
        }
    }
}

/// Lookups of one kind in flight at once: one to keep the database busy while the next batch
/// gathers, and one more so that a slow query delays no one alone. More would mean smaller
/// batches, more round trips and busier databases under a burst, and no gain when it is quiet.
const LOOKUP_SLOTS: usize = 2;

/// The statements of the lookups: each finds what the repository and name in arguments `$repo`
/// and `$name` have, in a row that starts with that repository and name.
fn manifest_by_tag(repo: usize, name: usize) -> String {
    format!(
        "SELECT r.name, t.name, m.digest, m.media_type, m.size FROM tags t \
         JOIN repositories r ON r.id = t.repository_id \
         JOIN manifests m ON m.repository_id = t.repository_id AND m.digest = t.manifest_digest \
         WHERE r.name = ${repo} AND t.name = ${name}"
    )
}

fn manifest_by_digest(repo: usize, name: usize) -> String {
    format!(
        "SELECT r.name, m.digest, m.digest, m.media_type, m.size FROM manifests m \
         JOIN repositories r ON r.id = m.repository_id WHERE r.name = ${repo} AND m.digest = ${name}"
    )
}

fn owned_blob(repo: usize, name: usize) -> String {
    format!(
        "SELECT r.name, rb.digest, b.size FROM repository_blobs rb \
         JOIN repositories r ON r.id = rb.repository_id \
         JOIN blobs b ON b.digest = rb.digest \
         WHERE r.name = ${repo} AND rb.digest = ${name}"
    )
}

fn manifest_info(row: &sqlx::any::AnyRow) -> Result<ManifestInfo, MetadataError> {
    Ok(ManifestInfo {
        digest: parse_digest(get(row, 2)?)?,
        media_type: get(row, 3)?,
        size: get::<i64>(row, 4)? as u64,
    })
}

fn now() -> i64 {
    unix(SystemTime::now())
}

fn unix(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn parse_digest(text: String) -> Result<Digest, MetadataError> {
    text.parse().map_err(|_| MetadataError::Corrupt(text))
}

fn parse_repo(text: String) -> Result<RepoName, MetadataError> {
    text.parse()
        .map_err(|_| MetadataError::Corrupt(format!("repository name {text:?}")))
}

fn page_of(mut entries: Vec<String>, limit: u32) -> Page {
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    Page { entries, more }
}

/// The condition on a repository name `r.name` of being `$n` or below it (all if `$n` is empty).
fn under(n: u32) -> String {
    format!(
        "(${n} = '' OR r.name = ${n} OR SUBSTR(r.name, 1, CHAR_LENGTH(${n}) + 1) = CONCAT(${n}, '/'))"
    )
}

/// How long a migration statement (or its wait for the migration lock) may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Statements making a new connection behave as every transaction here expects.
async fn configure_session(
    conn: &mut sqlx::AnyConnection,
    dialect: Dialect,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    let seconds = timeout.as_secs().max(1);
    match dialect {
        Dialect::Postgres => {
            conn.execute(sqlx::AssertSqlSafe(format!(
                "SET statement_timeout = '{seconds}s'"
            )))
            .await?;
        }
        Dialect::Mysql => {
            let version: String = sqlx::query_scalar("SELECT VERSION()")
                .fetch_one(&mut *conn)
                .await?;
            // MariaDB names MySQL's max_execution_time (milliseconds, SELECTs only)
            // max_statement_time (seconds, every statement).
            let limit = if version.contains("MariaDB") {
                format!("max_statement_time = {seconds}")
            } else {
                format!("max_execution_time = {}", seconds * 1000)
            };
            conn.execute(sqlx::AssertSqlSafe(format!(
                "SET SESSION innodb_lock_wait_timeout = {seconds}, {limit}"
            )))
            .await?;
            conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                .await?;
        }
    }
    Ok(())
}

/// Applies each migration not applied yet, holding the database's migration lock so that
/// instances starting together do not race. A PostgreSQL migration commits with its record; a
/// MySQL one cannot (its schema changes commit on their own).
async fn migrate(session: &mut Session) -> Result<(), MetadataError> {
    let dialect = session.dialect;
    let (lock, unlock) = dialect.migration_lock();
    session.raw(lock).await?;
    let result = async {
        session
            .raw("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .await?;
        let applied = session
            .all("SELECT version FROM schema_migrations", args![])
            .await?
            .iter()
            .map(|row| get::<i64>(row, 0))
            .collect::<Result<std::collections::HashSet<_>, _>>()?;
        for (version, sql) in dialect.migrations() {
            if applied.contains(version) {
                continue;
            }
            let record = format!(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ({version}, {})",
                now()
            );
            match dialect {
                // One simple query is one implicit transaction.
                Dialect::Postgres => session.raw(&format!("{sql};\n{record}")).await?,
                Dialect::Mysql => {
                    for statement in sql.split(";\n").filter(|s| !s.trim().is_empty()) {
                        session.raw(statement).await?;
                    }
                    session.raw(&record).await?;
                }
            }
        }
        Ok::<_, MetadataError>(())
    }
    .await;
    session.raw(unlock).await?;
    result
}

impl SqlMetadataStore {
    /// What `key` has, read by `lookup` in one statement with the other keys asked meanwhile.
    async fn look_up<V: Clone>(
        &self,
        lookup: &Lookup<V>,
        key: (String, String),
    ) -> Result<Option<V>, MetadataError> {
        lookup
            .batcher
            .read(&key, |keys| async move {
                let width = keys.len().next_power_of_two();
                let sql = &lookup.statements[width.trailing_zeros() as usize];
                let args: Vec<Arg> = (0..width)
                    .flat_map(|i| {
                        let (repo, name) = &keys[i.min(keys.len() - 1)];
                        [Arg::from(repo), Arg::from(name)]
                    })
                    .collect();
                let args = &args;
                retried(move || async move {
                    let rows = self.plain().await?.all(sql, args).await?;
                    rows.iter()
                        .map(|row| Ok(((get(row, 0)?, get(row, 1)?), (lookup.value)(row)?)))
                        .collect()
                })
                .await
            })
            .await
    }

    /// Connects to the database `config` names, creating and migrating its tables if needed.
    /// A database that cannot be reached within the connect timeout fails with
    /// [`MetadataError::is_unavailable`].
    pub async fn open(config: &MetadataConfig) -> Result<Self, MetadataError> {
        sqlx::any::install_default_drivers();
        config.validate().map_err(MetadataError::Setup)?;
        let dialect = config.dialect();
        let url = config.url().map_err(MetadataError::Setup)?;
        let options: sqlx::any::AnyConnectOptions = sqlx::ConnectOptions::from_url(&url)?;
        let timeout = config.statement_timeout();
        let pool = AnyPoolOptions::new()
            .max_connections(config.database().pool_size)
            .min_connections(0)
            .acquire_timeout(config.connect_timeout())
            // No round trip to check a pooled connection before each use (it would double the
            // cost of a manifest lookup): one the database dropped fails its statement as
            // unavailable, and `retried` runs the operation again on a fresh connection.
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move { configure_session(conn, dialect, timeout).await })
            })
            .connect_lazy_with(options);
        let store = SqlMetadataStore {
            pool,
            dialect,
            by_tag: Lookup::new(manifest_by_tag, manifest_info),
            by_digest: Lookup::new(manifest_by_digest, manifest_info),
            owned_blobs: Lookup::new(owned_blob, |row| Ok(get::<i64>(row, 2)? as u64)),
        };
        retried(|| async {
            // A connection of its own without the statement timeout, since migrating a large
            // table may take longer than any request should; from the pool, so that it waits for
            // the database as requests do, but never returned to it.
            let mut conn = store.pool.acquire().await?.detach();
            configure_session(&mut conn, dialect, MIGRATION_TIMEOUT).await?;
            migrate(&mut Session::detached(conn, dialect)).await
        })
        .await?;
        Ok(store)
    }

    async fn plain(&self) -> Result<Session, MetadataError> {
        Ok(Session::plain(self.pool.acquire().await?, self.dialect))
    }

    /// A `SERIALIZABLE` transaction. PostgreSQL's single statements outside one stay at its
    /// default: tracking their reads for serializability would only abort writers more often.
    async fn begin(&self) -> Result<Session, MetadataError> {
        let tx = match self.dialect {
            Dialect::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL SERIALIZABLE")
                    .await?
            }
            // The session's level (a MySQL autocommit read is a plain consistent read either way).
            Dialect::Mysql => self.pool.begin().await?,
        };
        Ok(Session::transaction(tx, self.dialect))
    }
}

async fn repository_id(db: &mut Session, repo: &str) -> Result<Option<i64>, MetadataError> {
    db.optional("SELECT id FROM repositories WHERE name = $1", args![repo])
        .await?
        .map(|row| get(&row, 0))
        .transpose()
}

async fn ensure_repository(db: &mut Session, repo: &str) -> Result<i64, MetadataError> {
    if let Some(id) = repository_id(db, repo).await? {
        return Ok(id);
    }
    let insert = db
        .dialect
        .insert_new("repositories (name, created_at) VALUES ($1, $2)", "name");
    db.execute(&insert, args![repo, now()]).await?;
    repository_id(db, repo)
        .await?
        .ok_or_else(|| MetadataError::Corrupt(format!("repository {repo:?} vanished")))
}

/// The first blob or child manifest `manifest` references that repository `repo_id` (`None`: a
/// repository that does not exist yet) does not hold.
async fn first_missing(
    db: &mut Session,
    repo_id: Option<i64>,
    manifest: &NewManifest,
) -> Result<Option<Digest>, MetadataError> {
    let Some(repo_id) = repo_id else {
        return Ok(manifest
            .blobs
            .iter()
            .chain(&manifest.manifests)
            .next()
            .cloned());
    };
    for digest in &manifest.blobs {
        let held = db
            .exists(
                "SELECT 1 FROM repository_blobs WHERE repository_id = $1 AND digest = $2",
                args![repo_id, &digest.to_string()],
            )
            .await?;
        if !held {
            return Ok(Some(digest.clone()));
        }
    }
    for digest in &manifest.manifests {
        let held = db
            .exists(
                "SELECT 1 FROM manifests WHERE repository_id = $1 AND digest = $2",
                args![repo_id, &digest.to_string()],
            )
            .await?;
        if !held {
            return Ok(Some(digest.clone()));
        }
    }
    Ok(None)
}

async fn insert_blob_link(
    db: &mut Session,
    repo: &str,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    // Before taking queued bytes back: refused bytes stay queued for the collector.
    quota::check(db, repo, digest, size).await?;
    collect::reclaim(db, digest).await?;
    let repo_id = ensure_repository(db, repo).await?;
    let blob = db.dialect.upsert(
        "blobs (digest, size, created_at, last_linked_at) VALUES ($1, $2, $3, $3)",
        "digest",
        "last_linked_at = excluded.last_linked_at",
    );
    db.execute(&blob, args![digest, size as i64, now()]).await?;
    let link = db.dialect.insert_new(
        "repository_blobs (repository_id, digest, created_at) VALUES ($1, $2, $3)",
        "repository_id, digest",
    );
    if db.execute(&link, args![repo_id, digest, now()]).await? == 1 {
        quota::add_holder(db, repo, digest, size).await?;
    }
    Ok(())
}

/// Deletes manifest `digest` of `repo` (its tags and references go with it), gives back its
/// quota, and queues its bytes if no repository holds them any more; false if there was none.
async fn delete_manifest_row(
    db: &mut Session,
    repo: &str,
    digest: &str,
) -> Result<bool, MetadataError> {
    let Some(repo_id) = repository_id(db, repo).await? else {
        return Ok(false);
    };
    let Some(row) = db
        .optional(
            "SELECT size FROM manifests WHERE repository_id = $1 AND digest = $2",
            args![repo_id, digest],
        )
        .await?
    else {
        return Ok(false);
    };
    let size: i64 = get(&row, 0)?;
    db.execute(
        "DELETE FROM manifests WHERE repository_id = $1 AND digest = $2",
        args![repo_id, digest],
    )
    .await?;
    quota::remove_holder(db, repo, digest).await?;
    collect::queue_if_orphaned(db, digest, size as u64).await?;
    Ok(true)
}

fn parse_manifest_names(
    rows: Vec<(String, String)>,
) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
    rows.into_iter()
        .map(|(repo, digest)| Ok((parse_repo(repo)?, parse_digest(digest)?)))
        .collect()
}

#[async_trait]
impl MetadataStore for SqlMetadataStore {
    async fn repository_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError> {
        self.look_up(&self.owned_blobs, (repo.to_string(), digest.to_string()))
            .await
    }

    async fn blob_owners(
        &self,
        digest: &Digest,
        limit: u32,
    ) -> Result<Vec<RepoName>, MetadataError> {
        let digest = &digest.to_string();
        retried(move || async move {
            let rows = self
                .plain()
                .await?
                .all(
                    "SELECT r.name FROM repository_blobs rb \
                     JOIN repositories r ON r.id = rb.repository_id \
                     WHERE rb.digest = $1 ORDER BY r.name LIMIT $2",
                    args![digest, limit],
                )
                .await?;
            rows.iter().map(|row| parse_repo(get(row, 0)?)).collect()
        })
        .await
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError> {
        let digest = &digest.to_string();
        retried(move || async move {
            let mut tx = self.begin().await?;
            let Some(row) = tx
                .optional("SELECT size FROM blobs WHERE digest = $1", args![digest])
                .await?
            else {
                return Ok(false);
            };
            let size: i64 = get(&row, 0)?;
            insert_blob_link(&mut tx, repo.as_str(), digest, size as u64).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetadataError> {
        let digest = &digest.to_string();
        retried(move || async move {
            let mut tx = self.begin().await?;
            let removed = tx
                .execute(
                    "DELETE FROM repository_blobs WHERE digest = $2 \
                     AND repository_id = (SELECT id FROM repositories WHERE name = $1)",
                    args![repo.as_str(), digest],
                )
                .await?;
            if removed > 0 {
                quota::remove_holder(&mut tx, repo.as_str(), digest).await?;
            }
            tx.commit().await?;
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
        let digest = &manifest.digest.to_string();
        let subject = &manifest.subject.as_ref().map(ToString::to_string);
        retried(move || async move {
            let mut tx = self.begin().await?;
            match quota::check(&mut tx, repo.as_str(), digest, manifest.size).await {
                Err(refused @ MetadataError::QuotaExceeded(_)) => {
                    // Its bytes were stored for this push; unless someone holds them, the
                    // collector deletes them.
                    collect::queue_if_orphaned(&mut tx, digest, manifest.size).await?;
                    tx.commit().await?;
                    return Err(refused);
                }
                checked => checked?,
            }
            let repo_id = ensure_repository(&mut tx, repo.as_str()).await?;
            match &manifest.upstream_sizes {
                None => {
                    if let Some(missing) = first_missing(&mut tx, Some(repo_id), manifest).await? {
                        return Err(MetadataError::MissingReference(missing));
                    }
                }
                Some(sizes) => {
                    for (blob, size) in manifest.blobs.iter().zip(sizes) {
                        insert_blob_link(&mut tx, repo.as_str(), &blob.to_string(), *size).await?;
                    }
                }
            }
            collect::reclaim(&mut tx, digest).await?;
            let insert = tx.dialect.insert_new(
                "manifests (repository_id, digest, media_type, size, artifact_type, subject, annotations, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                "repository_id, digest",
            );
            let recorded = tx
                .execute(
                    &insert,
                    args![
                        repo_id,
                        digest,
                        manifest.media_type.as_str(),
                        manifest.size as i64,
                        manifest.artifact_type.as_deref(),
                        subject.as_deref(),
                        manifest.annotations.as_deref(),
                        now()
                    ],
                )
                .await?;
            if recorded == 1 {
                quota::add_holder(&mut tx, repo.as_str(), digest, manifest.size).await?;
            }
            let reference = tx.dialect.insert_new(
                "manifest_references (repository_id, manifest_digest, child_digest) VALUES ($1, $2, $3)",
                "repository_id, manifest_digest, child_digest",
            );
            for child in manifest.blobs.iter().chain(&manifest.manifests) {
                tx.execute(&reference, args![repo_id, digest, &child.to_string()])
                    .await?;
            }
            if let Some(tag) = tag {
                let point = tx.dialect.upsert(
                    "tags (repository_id, name, manifest_digest, updated_at) VALUES ($1, $2, $3, $4)",
                    "repository_id, name",
                    "manifest_digest = excluded.manifest_digest, updated_at = excluded.updated_at",
                );
                tx.execute(&point, args![repo_id, tag.as_str(), digest, now()])
                    .await?;
            }
            tx.commit().await
        })
        .await
    }

    async fn missing_reference(
        &self,
        repo: &RepoName,
        manifest: &NewManifest,
    ) -> Result<Option<Digest>, MetadataError> {
        retried(move || async move {
            let mut db = self.plain().await?;
            let repo_id = repository_id(&mut db, repo.as_str()).await?;
            first_missing(&mut db, repo_id, manifest).await
        })
        .await
    }

    async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<ManifestInfo>, MetadataError> {
        let (lookup, name) = match reference {
            Reference::Tag(tag) => (&self.by_tag, tag.to_string()),
            Reference::Digest(digest) => (&self.by_digest, digest.to_string()),
        };
        self.look_up(lookup, (repo.to_string(), name)).await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        let digest = &digest.to_string();
        retried(move || async move {
            let mut tx = self.begin().await?;
            let deleted = delete_manifest_row(&mut tx, repo.as_str(), digest).await?;
            tx.commit().await?;
            Ok(deleted)
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetadataError> {
        retried(move || async move {
            let removed = self
                .plain()
                .await?
                .execute(
                    "DELETE FROM tags WHERE name = $2 \
                     AND repository_id = (SELECT id FROM repositories WHERE name = $1)",
                    args![repo.as_str(), tag.as_str()],
                )
                .await?;
            Ok(removed > 0)
        })
        .await
    }

    async fn tags(
        &self,
        repo: &RepoName,
        page: &PageRequest,
    ) -> Result<Option<Page>, MetadataError> {
        let last = page.last.as_deref().unwrap_or_default();
        retried(move || async move {
            let mut db = self.plain().await?;
            let Some(repo_id) = repository_id(&mut db, repo.as_str()).await? else {
                return Ok(None);
            };
            let names = db
                .all(
                    "SELECT name FROM tags WHERE repository_id = $1 AND name > $2 ORDER BY name LIMIT $3",
                    args![repo_id, last, i64::from(page.limit) + 1],
                )
                .await?
                .iter()
                .map(|row| get(row, 0))
                .collect::<Result<Vec<String>, _>>()?;
            Ok(Some(page_of(names, page.limit)))
        })
        .await
    }

    async fn repositories(&self, page: &PageRequest) -> Result<Page, MetadataError> {
        let last = page.last.as_deref().unwrap_or_default();
        retried(move || async move {
            let names = self
                .plain()
                .await?
                .all(
                    "SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2",
                    args![last, i64::from(page.limit) + 1],
                )
                .await?
                .iter()
                .map(|row| get(row, 0))
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
        let subject = &subject.to_string();
        retried(move || async move {
            let rows = self
                .plain()
                .await?
                .all(
                    "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations FROM manifests m \
                     JOIN repositories r ON r.id = m.repository_id \
                     WHERE r.name = $1 AND m.subject = $2 AND ($3 IS NULL OR m.artifact_type = $3) \
                     ORDER BY m.digest",
                    args![repo.as_str(), subject, artifact_type],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let annotations = get::<Option<String>>(row, 4)?
                        .map(|text| {
                            serde_json::from_str(&text)
                                .map_err(|e| MetadataError::Corrupt(e.to_string()))
                        })
                        .transpose()?;
                    Ok(Referrer {
                        digest: parse_digest(get(row, 0)?)?,
                        media_type: get(row, 1)?,
                        size: get::<i64>(row, 2)? as u64,
                        artifact_type: get(row, 3)?,
                        annotations,
                    })
                })
                .collect()
        })
        .await
    }

    async fn create_upload(&self, repo: &RepoName, id: UploadId) -> Result<(), MetadataError> {
        let id = &id.to_string();
        retried(move || async move {
            self.plain()
                .await?
                .execute(
                    "INSERT INTO uploads (id, repository, created_at) VALUES ($1, $2, $3)",
                    args![id, repo.as_str(), now()],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn upload_repository(&self, id: UploadId) -> Result<Option<RepoName>, MetadataError> {
        let id = &id.to_string();
        retried(move || async move {
            let row = self
                .plain()
                .await?
                .optional("SELECT repository FROM uploads WHERE id = $1", args![id])
                .await?;
            row.map(|row| parse_repo(get(&row, 0)?)).transpose()
        })
        .await
    }

    async fn delete_upload(&self, id: UploadId) -> Result<bool, MetadataError> {
        let id = &id.to_string();
        retried(move || async move {
            let deleted = self
                .plain()
                .await?
                .execute("DELETE FROM uploads WHERE id = $1", args![id])
                .await?;
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
        let (id, digest) = (&id.to_string(), &digest.to_string());
        retried(move || async move {
            let mut tx = self.begin().await?;
            match insert_blob_link(&mut tx, repo.as_str(), digest, size).await {
                Err(refused @ MetadataError::QuotaExceeded(_)) => {
                    // The bytes were published for this upload, which stays open; unless
                    // someone holds them, the collector deletes them.
                    collect::queue_if_orphaned(&mut tx, digest, size).await?;
                    tx.commit().await?;
                    return Err(refused);
                }
                linked => linked?,
            }
            let ended = tx
                .execute("DELETE FROM uploads WHERE id = $1", args![id])
                .await?;
            tx.commit().await?;
            Ok(ended == 1)
        })
        .await
    }

    async fn uploads(&self) -> Result<Vec<(UploadId, SystemTime)>, MetadataError> {
        retried(move || async move {
            let rows = self
                .plain()
                .await?
                .all(
                    "SELECT id, created_at FROM uploads ORDER BY created_at",
                    args![],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let id: String = get(row, 0)?;
                    let id = id.parse().map_err(|_| MetadataError::Corrupt(id))?;
                    let created = get::<i64>(row, 1)?;
                    Ok((id, UNIX_EPOCH + Duration::from_secs(created.max(0) as u64)))
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
        let after = &after.map(ToString::to_string).unwrap_or_default();
        let linked_before = unix(linked_before);
        retried(move || async move {
            let mut db = self.plain().await?;
            collect::unreferenced(&mut db, linked_before, after, limit).await
        })
        .await
    }

    async fn queue_unreferenced(
        &self,
        linked_before: SystemTime,
        candidates: &[Digest],
    ) -> Result<Vec<Garbage>, MetadataError> {
        let linked_before = unix(linked_before);
        let candidates = &candidates
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>();
        retried(move || async move {
            let mut tx = self.begin().await?;
            let queued = collect::queue_unreferenced(&mut tx, linked_before, candidates).await?;
            tx.commit().await?;
            Ok(queued)
        })
        .await
    }

    async fn queued_garbage(&self, limit: u32) -> Result<Vec<Garbage>, MetadataError> {
        retried(move || async move { collect::queued(&mut self.plain().await?, limit).await }).await
    }

    async fn begin_sweep(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetadataError> {
        retried(move || async move {
            let mut tx = self.begin().await?;
            let mut claimed = Vec::with_capacity(digests.len());
            for digest in digests {
                if collect::begin_sweep(&mut tx, &digest.to_string()).await? {
                    claimed.push(digest.clone());
                }
            }
            tx.commit().await?;
            Ok(claimed)
        })
        .await
    }

    async fn end_sweep(&self, digests: &[Digest]) -> Result<(), MetadataError> {
        retried(move || async move {
            let mut tx = self.begin().await?;
            for digest in digests {
                collect::end_sweep(&mut tx, &digest.to_string()).await?;
            }
            tx.commit().await
        })
        .await
    }

    async fn untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
        let created_before = unix(created_before);
        retried(move || async move {
            let mut db = self.plain().await?;
            parse_manifest_names(collect::untagged(&mut db, prefix, created_before, limit).await?)
        })
        .await
    }

    async fn delete_untagged_manifests(
        &self,
        prefix: &str,
        created_before: SystemTime,
        limit: u32,
    ) -> Result<Vec<(RepoName, Digest)>, MetadataError> {
        let created_before = unix(created_before);
        retried(move || async move {
            let mut tx = self.begin().await?;
            let deleted = collect::delete_untagged(&mut tx, prefix, created_before, limit).await?;
            tx.commit().await?;
            parse_manifest_names(deleted)
        })
        .await
    }

    async fn usage(&self) -> Result<Usage, MetadataError> {
        retried(move || async move {
            let mut tx = self.begin().await?;
            let (namespaces, repositories) = collect::usage(&mut tx).await?;
            let quota_scopes = quota::scopes_by_use(&mut tx).await?;
            tx.commit().await?;
            Ok(Usage {
                namespaces,
                repositories,
                quota_scopes,
            })
        })
        .await
    }

    async fn record_pulls(&self, pulls: &[Pull]) -> Result<(), MetadataError> {
        retried(move || async move {
            let mut tx = self.begin().await?;
            retention::record_pulls(&mut tx, pulls).await?;
            tx.commit().await
        })
        .await
    }

    async fn tags_under(&self, prefix: &str) -> Result<Vec<TaggedManifest>, MetadataError> {
        retried(
            move || async move { retention::tags_under(&mut self.plain().await?, prefix).await },
        )
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
        let digest = &digest.to_string();
        let (tagged_at, pulled_before) = (unix(tagged_at), pulled_before.map(unix));
        retried(move || async move {
            let mut tx = self.begin().await?;
            let expired = retention::expire_tag(
                &mut tx,
                repo.as_str(),
                tag.as_str(),
                digest,
                tagged_at,
                pulled_before,
            )
            .await?;
            tx.commit().await?;
            Ok(expired)
        })
        .await
    }

    async fn set_quotas(&self, quotas: &[Quota]) -> Result<(), MetadataError> {
        retried(move || async move {
            let mut tx = self.begin().await?;
            quota::configure(&mut tx, quotas).await?;
            tx.commit().await
        })
        .await
    }

    async fn check_quotas(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError> {
        let digest = &digest.to_string();
        retried(move || async move {
            quota::check(&mut self.plain().await?, repo.as_str(), digest, size).await
        })
        .await
    }

    async fn quota_usage(&self) -> Result<Vec<QuotaUsage>, MetadataError> {
        retried(move || async move { quota::usage(&mut self.plain().await?).await }).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let now = self.dialect.now_ms();
        retried(move || async move {
            let mut tx = self.begin().await?;
            let current = tx
                .optional(
                    &format!(
                        "SELECT holder, CASE WHEN expires_at_ms <= {now} THEN 1 ELSE 0 END \
                         FROM leases WHERE name = $1 FOR UPDATE"
                    ),
                    args![name],
                )
                .await?;
            let taken = match current {
                None => {
                    let insert = self.dialect.insert_new(
                        &format!(
                            "leases (name, holder, expires_at_ms) VALUES ($1, $2, {now} + $3)"
                        ),
                        "name",
                    );
                    tx.execute(&insert, args![name, holder, ttl_ms]).await? == 1
                }
                Some(row) => {
                    let (current, expired): (String, i64) = (get(&row, 0)?, get(&row, 1)?);
                    if current == holder || expired == 1 {
                        tx.execute(
                            &format!(
                                "UPDATE leases SET holder = $2, expires_at_ms = {now} + $3 \
                                 WHERE name = $1"
                            ),
                            args![name, holder, ttl_ms],
                        )
                        .await?;
                        true
                    } else {
                        false
                    }
                }
            };
            tx.commit().await?;
            Ok(taken)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetadataError> {
        retried(move || async move {
            self.plain()
                .await?
                .execute(
                    "DELETE FROM leases WHERE name = $1 AND holder = $2",
                    args![name, holder],
                )
                .await?;
            Ok(())
        })
        .await
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn hold(
        &self,
        digest: &Digest,
        hold: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError> {
        let digest = &digest.to_string();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let now = self.dialect.now_ms();
        retried(move || async move {
            let mut tx = self.begin().await?;
            // Read in the transaction that inserts the hold: a sweep claiming the digest at the
            // same time conflicts with it, and one of the two is retried after the other.
            let sweeping = tx
                .exists(
                    "SELECT 1 FROM garbage WHERE digest = $1 AND sweeping = 1",
                    args![digest],
                )
                .await?;
            if !sweeping {
                tx.execute(
                    &format!(
                        "INSERT INTO holds (id, digest, expires_at_ms) VALUES ($1, $2, {now} + $3)"
                    ),
                    args![hold, digest, ttl_ms],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(!sweeping)
        })
        .await
    }

    async fn release(&self, hold: &str) -> Result<(), MetadataError> {
        let now = self.dialect.now_ms();
        retried(move || async move {
            // Expired holds of pushes that died go with it.
            self.plain()
                .await?
                .execute(
                    &format!("DELETE FROM holds WHERE id = $1 OR expires_at_ms <= {now}"),
                    args![hold],
                )
                .await?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty database on the test server of `dialect`, dropped with the guard.
    fn database(dialect: Dialect) -> (String, Box<dyn std::any::Any>) {
        match dialect {
            Dialect::Postgres => {
                let database = berth_testkit::services::postgres_database();
                (database.url.clone(), Box::new(database))
            }
            Dialect::Mysql => {
                let database = berth_testkit::services::mysql_database();
                (database.url.clone(), Box::new(database))
            }
        }
    }

    /// The configuration reaching the database at `url`, its password in a file in `dir`.
    fn config_for(url: &str, dir: &std::path::Path) -> MetadataConfig {
        let url = url::Url::parse(url).unwrap();
        // The test servers' passwords are plain words, the same percent-encoded or not.
        let password_file = url.password().map(|password| {
            let file = dir.join("password");
            std::fs::write(&file, format!("{password}\n")).unwrap();
            file
        });
        let database = DatabaseConfig {
            host: url.host_str().unwrap().to_owned(),
            port: url.port(),
            database: url.path().trim_start_matches('/').to_owned(),
            username: url.username().to_owned(),
            password_file,
            tls: DatabaseTls::default(),
            pool_size: 4,
            statement_timeout_seconds: 30,
            connect_timeout_seconds: 5,
        };
        match url.scheme() {
            "postgres" | "postgresql" => MetadataConfig::Postgres(database),
            "mysql" | "mariadb" => MetadataConfig::Mysql(database),
            other => panic!("no metadata store for {other} URLs"),
        }
    }

    /// A store on a fresh database, its configuration, and what keeps the database and the
    /// password file until the test ends.
    #[allow(clippy::type_complexity)]
    async fn open(
        dialect: Dialect,
    ) -> (
        SqlMetadataStore,
        MetadataConfig,
        (tempfile::TempDir, Box<dyn std::any::Any>),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (url, database) = database(dialect);
        let config = config_for(&url, dir.path());
        let store = SqlMetadataStore::open(&config).await.unwrap();
        (store, config, (dir, database))
    }

    /// One test per dialect of each behaviour below, named after the dialect so that either
    /// server's tests can be run alone.
    macro_rules! on_both {
        ($($behaviour:ident => $postgres:ident, $mysql:ident;)*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $postgres() {
                $behaviour(Dialect::Postgres).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $mysql() {
                $behaviour(Dialect::Mysql).await;
            }
        )*};
    }

    on_both! {
        behaviour_suite => postgres_passes_the_metadata_behaviour_suite, mysql_passes_the_metadata_behaviour_suite;
        reopening => postgres_reopening_keeps_data_and_instances_migrate_once, mysql_reopening_keeps_data_and_instances_migrate_once;
        concurrent_pushes => postgres_concurrent_pushes_into_one_repository_all_commit, mysql_concurrent_pushes_into_one_repository_all_commit;
        concurrent_lookups => postgres_concurrent_lookups_are_answered_as_alone_and_see_a_moved_tag, mysql_concurrent_lookups_are_answered_as_alone_and_see_a_moved_tag;
        sessions => postgres_connections_are_serializable_with_the_statement_timeout, mysql_connections_are_serializable_with_the_statement_timeout;
        constraint => postgres_a_refused_statement_is_not_retried, mysql_a_refused_statement_is_not_retried;
        unreachable => postgres_an_unreachable_database_fails_as_unavailable_within_the_timeout, mysql_an_unreachable_database_fails_as_unavailable_within_the_timeout;
        outage => postgres_a_store_fails_503_while_its_database_is_cut_off_and_recovers_by_itself, mysql_a_store_fails_503_while_its_database_is_cut_off_and_recovers_by_itself;
        tls_required => postgres_tls_required_of_a_server_without_it_fails_at_once, mysql_tls_required_of_a_server_without_it_fails_at_once;
        wrong_password => postgres_a_refused_password_is_reported_without_it, mysql_a_refused_password_is_reported_without_it;
        deadlock => postgres_transactions_that_deadlock_are_run_again_whole, mysql_transactions_that_deadlock_are_run_again_whole;
        slow_migration => postgres_migrating_is_not_cut_by_the_statement_timeout, mysql_migrating_is_not_cut_by_the_statement_timeout;
    }

    /// A TCP forwarder from a loopback port to a database server, which the test can cut off
    /// (new connections refused, open ones dropped) and restore on the same port.
    struct Link {
        port: u16,
        target: std::net::SocketAddr,
        forwarding: Option<tokio::task::JoinHandle<()>>,
    }

    impl Link {
        async fn to(target: std::net::SocketAddr) -> Link {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let mut link = Link {
                port,
                target,
                forwarding: None,
            };
            link.forward(listener);
            link
        }

        fn forward(&mut self, listener: tokio::net::TcpListener) {
            let target = self.target;
            self.forwarding = Some(tokio::spawn(async move {
                // Dropped with this task when the link is cut, ending every connection.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((mut client, _)) = listener.accept().await {
                    connections.spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            }));
        }

        async fn cut(&mut self) {
            if let Some(forwarding) = self.forwarding.take() {
                forwarding.abort();
                let _ = forwarding.await;
            }
        }

        async fn restore(&mut self) {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
                .await
                .unwrap();
            self.forward(listener);
        }
    }

    async fn behaviour_suite(dialect: Dialect) {
        let (store, _, _dir) = open(dialect).await;
        crate::metadata::behaviour::run_all(&store).await;
    }

    async fn reopening(dialect: Dialect) {
        let (first, config, _dir) = open(dialect).await;
        let repo: RepoName = "keep/me".parse().unwrap();
        let digest = Digest::sha256_of(b"kept");
        crate::metadata::behaviour::push_blob(&first, &repo, &digest, 4).await;
        drop(first);
        // Instances starting together: the migration lock lets one migrate, the others find
        // every version applied.
        let (a, b) = tokio::join!(
            SqlMetadataStore::open(&config),
            SqlMetadataStore::open(&config)
        );
        let (a, _b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.repository_blob(&repo, &digest).await.unwrap(), Some(4));
        let versions = a
            .plain()
            .await
            .unwrap()
            .all(
                "SELECT version FROM schema_migrations ORDER BY version",
                args![],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| get::<i64>(row, 0).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(versions, [1, 2, 3, 4, 5]);
    }

    async fn concurrent_pushes(dialect: Dialect) {
        let (store, _, _dir) = open(dialect).await;
        let store = std::sync::Arc::new(store);
        let repo: RepoName = "busy/repo".parse().unwrap();
        let shared = Digest::sha256_of(b"shared base layer");
        let pushes = (0..16).map(|i| {
            let (store, repo, shared) = (store.clone(), repo.clone(), shared.clone());
            tokio::spawn(async move {
                let own = Digest::sha256_of(format!("layer {i}").as_bytes());
                for digest in [&shared, &own] {
                    crate::metadata::behaviour::push_blob(&*store, &repo, digest, 10).await;
                }
                let image = crate::metadata::behaviour::manifest(
                    format!("image {i}").as_bytes(),
                    vec![shared.clone(), own.clone()],
                );
                let tag: Tag = format!("v{i}").parse().unwrap();
                store.put_manifest(&repo, &image, Some(&tag)).await.unwrap();
            })
        });
        for push in pushes.collect::<Vec<_>>() {
            push.await.unwrap();
        }
        let page = PageRequest {
            last: None,
            limit: 100,
        };
        let tags = store.tags(&repo, &page).await.unwrap().unwrap();
        assert_eq!(tags.entries.len(), 16);
        let usage = store.usage().await.unwrap();
        let images: u64 = (0..16).map(|i| format!("image {i}").len() as u64).sum();
        assert_eq!(usage.repositories[0].bytes, 17 * 10 + images);
    }

    /// Lookups gathered into batches: found and missing keys of several repositories mixed, by
    /// tag, by digest and of blobs, each answered as it would be alone; and a tag moved while readers keep
    /// asking is what every lookup starting after the move sees.
    async fn concurrent_lookups(dialect: Dialect) {
        use crate::metadata::behaviour::{manifest, push_blob};
        let (store, _, _dir) = open(dialect).await;
        let store = std::sync::Arc::new(store);
        let repos: Vec<RepoName> = ["apps/one", "apps/two"]
            .iter()
            .map(|name| name.parse().unwrap())
            .collect();
        let mut expected = Vec::new();
        let mut owned = Vec::new();
        for (r, repo) in repos.iter().enumerate() {
            for i in 0..8 {
                let layer = Digest::sha256_of(format!("layer {r} {i}").as_bytes());
                push_blob(&*store, repo, &layer, 10 + i).await;
                owned.push((repo.clone(), layer.clone(), Some(10 + i)));
                owned.push((repos[1 - r].clone(), layer.clone(), None));
                let image = manifest(format!("image {r} {i}").as_bytes(), vec![layer]);
                let tag: Tag = format!("v{i}").parse().unwrap();
                store.put_manifest(repo, &image, Some(&tag)).await.unwrap();
                let found = Some(image.digest.clone());
                expected.push((repo.clone(), Reference::Tag(tag), found.clone()));
                expected.push((repo.clone(), Reference::Digest(image.digest.clone()), found));
                expected.push((repos[1 - r].clone(), Reference::Digest(image.digest), None));
                let missing: Tag = format!("missing{i}").parse().unwrap();
                expected.push((repo.clone(), Reference::Tag(missing), None));
            }
        }
        let lookups: Vec<_> = expected
            .iter()
            .cycle()
            .take(expected.len() * 4)
            .map(|(repo, reference, digest)| {
                let (store, repo, reference) = (store.clone(), repo.clone(), reference.clone());
                let digest = digest.clone();
                tokio::spawn(async move {
                    let info = store.manifest(&repo, &reference).await.unwrap();
                    assert_eq!(info.map(|info| info.digest), digest, "{repo} {reference}");
                })
            })
            .collect();
        let blob_lookups: Vec<_> = owned
            .iter()
            .cycle()
            .take(owned.len() * 4)
            .map(|(repo, digest, size)| {
                let (store, repo, digest, size) =
                    (store.clone(), repo.clone(), digest.clone(), *size);
                tokio::spawn(async move {
                    let found = store.repository_blob(&repo, &digest).await.unwrap();
                    assert_eq!(found, size, "{repo} {digest}");
                })
            })
            .collect();
        for lookup in lookups.into_iter().chain(blob_lookups) {
            lookup.await.unwrap();
        }

        let repo = &repos[0];
        let tag: Tag = "v0".parse().unwrap();
        let asking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let (store, repo, asking) = (store.clone(), repo.clone(), asking.clone());
                let reference = Reference::Tag(tag.clone());
                tokio::spawn(async move {
                    while asking.load(std::sync::atomic::Ordering::Relaxed) {
                        store.manifest(&repo, &reference).await.unwrap().unwrap();
                    }
                })
            })
            .collect();
        for round in 0..20 {
            let image = manifest(format!("moved {round}").as_bytes(), vec![]);
            store.put_manifest(repo, &image, Some(&tag)).await.unwrap();
            let after: Vec<_> = (0..8)
                .map(|_| {
                    let (store, repo) = (store.clone(), repo.clone());
                    let reference = Reference::Tag(tag.clone());
                    tokio::spawn(async move { store.manifest(&repo, &reference).await.unwrap() })
                })
                .collect();
            for lookup in after {
                let info = lookup.await.unwrap().unwrap();
                assert_eq!(
                    info.digest, image.digest,
                    "round {round}: a lookup after the move"
                );
            }
        }
        asking.store(false, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            reader.await.unwrap();
        }
    }

    async fn sessions(dialect: Dialect) {
        let dir = tempfile::tempdir().unwrap();
        let (url, _database) = database(dialect);
        let mut config = config_for(&url, dir.path());
        match &mut config {
            MetadataConfig::Postgres(database) | MetadataConfig::Mysql(database) => {
                database.statement_timeout_seconds = 1;
            }
        }
        let store = SqlMetadataStore::open(&config).await.unwrap();
        let (isolation, sleep) = match dialect {
            Dialect::Postgres => ("SHOW transaction_isolation", "SELECT pg_sleep(3)"),
            Dialect::Mysql => ("SELECT @@SESSION.tx_isolation", "SELECT SLEEP(3)"),
        };
        let mut tx = store.begin().await.unwrap();
        let row = tx.optional(isolation, args![]).await.unwrap().unwrap();
        drop(tx);
        let mut db = store.plain().await.unwrap();
        let isolation: String = get(&row, 0).unwrap();
        assert!(
            isolation.eq_ignore_ascii_case("serializable"),
            "{isolation}"
        );
        let started = std::time::Instant::now();
        let slept = db.optional(sleep, args![]).await;
        // MySQL's SLEEP answers 1 when interrupted instead of failing.
        let interrupted = match slept {
            Err(_) => true,
            Ok(row) => get::<i64>(&row.unwrap(), 0).unwrap() == 1,
        };
        assert!(interrupted);
        assert!(started.elapsed() < Duration::from_millis(2500));
    }

    async fn constraint(dialect: Dialect) {
        let (store, _, _dir) = open(dialect).await;
        let (repo, id) = ("a/b".parse::<RepoName>().unwrap(), UploadId::new());
        store.create_upload(&repo, id).await.unwrap();
        let started = std::time::Instant::now();
        let err = store.create_upload(&repo, id).await.unwrap_err();
        let MetadataError::Sql(sql) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(db::classify(sql), db::Failure::Permanent, "{sql}");
        assert!(!err.is_unavailable());
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    async fn unreachable(dialect: Dialect) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let database = DatabaseConfig {
            host: "127.0.0.1".into(),
            port: Some(port),
            database: "berth".into(),
            username: "berth".into(),
            password_file: None,
            tls: DatabaseTls::default(),
            pool_size: 2,
            statement_timeout_seconds: 5,
            connect_timeout_seconds: 2,
        };
        let config = match dialect {
            Dialect::Postgres => MetadataConfig::Postgres(database),
            Dialect::Mysql => MetadataConfig::Mysql(database),
        };
        let started = std::time::Instant::now();
        let err = SqlMetadataStore::open(&config).await.err().unwrap();
        assert!(err.is_unavailable(), "{err:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
    }

    async fn outage(dialect: Dialect) {
        let dir = tempfile::tempdir().unwrap();
        let (url, _database) = database(dialect);
        let mut config = config_for(&url, dir.path());
        let (MetadataConfig::Postgres(database) | MetadataConfig::Mysql(database)) = &mut config;
        let server = (database.host.as_str(), database.port.unwrap());
        let server = std::net::ToSocketAddrs::to_socket_addrs(&server)
            .unwrap()
            .next()
            .unwrap();
        let mut link = Link::to(server).await;
        database.port = Some(link.port);
        database.connect_timeout_seconds = 2;
        let store = SqlMetadataStore::open(&config).await.unwrap();
        let repo: RepoName = "outage/app".parse().unwrap();
        let digest = Digest::sha256_of(b"before the outage");
        crate::metadata::behaviour::push_blob(&store, &repo, &digest, 6).await;

        link.cut().await;
        let started = std::time::Instant::now();
        let err = store.repository_blob(&repo, &digest).await.unwrap_err();
        let waited = started.elapsed();
        assert!(err.is_unavailable(), "{err:?}");
        assert!(waited < Duration::from_secs(4), "{waited:?}");
        let response =
            axum::response::IntoResponse::into_response(crate::error::RegistryError::from(err));
        assert_eq!(
            response.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );

        link.restore().await;
        assert_eq!(
            store.repository_blob(&repo, &digest).await.unwrap(),
            Some(6)
        );
        let later = Digest::sha256_of(b"after the outage");
        crate::metadata::behaviour::push_blob(&store, &repo, &later, 5).await;
    }

    async fn tls_required(dialect: Dialect) {
        let dir = tempfile::tempdir().unwrap();
        let (url, _database) = database(dialect);
        let mut config = config_for(&url, dir.path());
        let (MetadataConfig::Postgres(database) | MetadataConfig::Mysql(database)) = &mut config;
        // The test servers speak plain TCP only: asked for TLS, the store must refuse to go on
        // without it rather than fall back.
        database.tls.mode = TlsMode::Require;
        let started = std::time::Instant::now();
        let err = SqlMetadataStore::open(&config).await.err().unwrap();
        assert!(!err.is_unavailable(), "{err:?}");
        assert!(
            matches!(err, MetadataError::Sql(sqlx::Error::Tls(_))),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// MySQL's "table is full" (what InnoDB answers when its disk is) is storage full, answered
    /// 507: here from a MEMORY table at its size limit, the one way to meet it without filling a
    /// disk.
    #[tokio::test]
    async fn mysql_a_full_table_is_storage_full() {
        let (store, _, _guard) = open(Dialect::Mysql).await;
        let mut db = store.plain().await.unwrap();
        db.raw("SET SESSION max_heap_table_size = 16384")
            .await
            .unwrap();
        db.raw("CREATE TEMPORARY TABLE filler (x CHAR(255) NOT NULL) ENGINE = MEMORY")
            .await
            .unwrap();
        let full = loop {
            match db
                .execute("INSERT INTO filler (x) VALUES ($1)", args!["x"])
                .await
            {
                Ok(_) => continue,
                Err(err) => break err,
            }
        };
        assert!(full.is_storage_full(), "{full:?}");
        let response =
            axum::response::IntoResponse::into_response(crate::error::RegistryError::from(full));
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INSUFFICIENT_STORAGE
        );
    }

    async fn wrong_password(dialect: Dialect) {
        let dir = tempfile::tempdir().unwrap();
        let (url, _database) = database(dialect);
        let config = config_for(&url, dir.path());
        let (MetadataConfig::Postgres(database) | MetadataConfig::Mysql(database)) = &config;
        let password = "not-the-Password-7Qx";
        std::fs::write(database.password_file.as_ref().unwrap(), password).unwrap();
        let err = SqlMetadataStore::open(&config).await.err().unwrap();
        assert!(!err.is_unavailable(), "{err:?}");
        for shown in [err.to_string(), format!("{err:?}"), format!("{config:?}")] {
            assert!(!shown.contains(password), "{shown}");
        }
    }

    async fn deadlock(dialect: Dialect) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};

        let (store, _, _guard) = open(dialect).await;
        let store = Arc::new(store);
        let mut db = store.plain().await.unwrap();
        for rule in ["a", "b"] {
            db.execute(
                "INSERT INTO quota_rules (rule, max_bytes) VALUES ($1, 0)",
                args![rule],
            )
            .await
            .unwrap();
        }
        // Each first run takes one row, waits until the other has taken the other row, then
        // wants it too: the database must end one of them, and that one runs again whole.
        let both_hold = Arc::new(tokio::sync::Barrier::new(2));
        let runs = Arc::new(AtomicU32::new(0));
        let tasks = [("a", "b"), ("b", "a")].map(|(first, second)| {
            let (store, both_hold, runs) = (store.clone(), both_hold.clone(), runs.clone());
            tokio::spawn(async move {
                let mut first_run = true;
                let store = &*store;
                db::retried(|| {
                    let wait = std::mem::take(&mut first_run).then(|| both_hold.clone());
                    let runs = runs.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let mut tx = store.begin().await?;
                        let add =
                            "UPDATE quota_rules SET max_bytes = max_bytes + 1 WHERE rule = $1";
                        tx.execute(add, args![first]).await?;
                        if let Some(wait) = wait {
                            wait.wait().await;
                        }
                        tx.execute(add, args![second]).await?;
                        tx.commit().await
                    }
                })
                .await
            })
        });
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert!(
            runs.load(Ordering::SeqCst) > 2,
            "no transaction was run again"
        );
        let rows = db
            .all("SELECT max_bytes FROM quota_rules ORDER BY rule", args![])
            .await
            .unwrap();
        let totals: Vec<i64> = rows.iter().map(|row| get(row, 0).unwrap()).collect();
        assert_eq!(totals, [2, 2]);
    }

    async fn slow_migration(dialect: Dialect) {
        let dir = tempfile::tempdir().unwrap();
        let (url, _database) = database(dialect);
        let mut config = config_for(&url, dir.path());
        let (MetadataConfig::Postgres(database) | MetadataConfig::Mysql(database)) = &mut config;
        database.statement_timeout_seconds = 1;
        // Another instance holds the migration lock for longer than the statement timeout, as
        // one migrating a large table would.
        sqlx::any::install_default_drivers();
        let mut other = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let (lock, unlock) = dialect.migration_lock();
        other.execute(lock).await.unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            other.execute(unlock).await.unwrap();
            other
        });
        let started = std::time::Instant::now();
        let store = SqlMetadataStore::open(&config).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(2));
        release.await.unwrap();
        let repo: RepoName = "after/migration".parse().unwrap();
        let digest = Digest::sha256_of(b"migrated");
        crate::metadata::behaviour::push_blob(&store, &repo, &digest, 8).await;
    }
}
