//! The garbage collector's statements for the shared databases: finding unreferenced content,
//! queueing it with its rows gone in the same transaction, and the sweep's claim on a queued
//! digest.

use sqlx::any::AnyRow;

use super::db::{Session, args, get};
use super::{delete_manifest_row, now, parse_digest, under};
use crate::metadata::{Garbage, MetadataError, UsageEntry};

/// The condition on blob row `b` of a collectable blob: no manifest of any repository references
/// it and no repository was given it since `$1` (unix seconds).
const UNREFERENCED: &str = "b.last_linked_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM manifest_references mr WHERE mr.child_digest = b.digest) \
     AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest = b.digest)";

fn garbage(rows: Vec<AnyRow>) -> Result<Vec<Garbage>, MetadataError> {
    rows.iter()
        .map(|row| {
            Ok(Garbage {
                digest: parse_digest(get(row, 0)?)?,
                size: get::<i64>(row, 1)? as u64,
            })
        })
        .collect()
}

/// Up to `limit` collectable blobs (see [`UNREFERENCED`]) after `after` in digest order.
pub(super) async fn unreferenced(
    db: &mut Session,
    linked_before: i64,
    after: &str,
    limit: u32,
) -> Result<Vec<Garbage>, MetadataError> {
    let rows = db
        .all(
            &format!(
                "SELECT b.digest, b.size FROM blobs b WHERE b.digest > $2 AND {UNREFERENCED} \
                 ORDER BY b.digest LIMIT $3"
            ),
            args![linked_before, after, limit],
        )
        .await?;
    garbage(rows)
}

/// Queues those of `candidates` still collectable, deciding again in the caller's transaction,
/// and removes each one's row and every repository's link to it in that transaction.
pub(super) async fn queue_unreferenced(
    tx: &mut Session,
    linked_before: i64,
    candidates: &[String],
) -> Result<Vec<Garbage>, MetadataError> {
    let still =
        format!("SELECT b.digest, b.size FROM blobs b WHERE b.digest = $2 AND {UNREFERENCED}");
    let mut found = Vec::new();
    for candidate in candidates {
        found.extend(garbage(
            tx.all(&still, args![linked_before, candidate]).await?,
        )?);
    }
    for item in &found {
        let digest = &item.digest.to_string();
        super::quota::remove_all_links(tx, digest).await?;
        tx.execute(
            "DELETE FROM repository_blobs WHERE digest = $1",
            args![digest],
        )
        .await?;
        tx.execute("DELETE FROM blobs WHERE digest = $1", args![digest])
            .await?;
        queue(tx, digest, item.size).await?;
    }
    Ok(found)
}

async fn queue(db: &mut Session, digest: &str, size: u64) -> Result<(), MetadataError> {
    let insert = db.dialect.insert_new(
        "garbage (digest, size, queued_at) VALUES ($1, $2, $3)",
        "digest",
    );
    db.execute(&insert, args![digest, size as i64, now()])
        .await?;
    Ok(())
}

/// Queues manifest bytes `digest` of `size` bytes if no repository holds that manifest any more
/// and it is no blob either; called where a manifest row was just deleted.
pub(super) async fn queue_if_orphaned(
    db: &mut Session,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    let held = db
        .exists(
            "SELECT 1 FROM manifests WHERE digest = $1 UNION ALL SELECT 1 FROM blobs WHERE digest = $1",
            args![digest],
        )
        .await?;
    if !held {
        queue(db, digest, size).await?;
    }
    Ok(())
}

/// Takes back queued content that is being written again; fails while a sweep is deleting its
/// bytes, since what the writer just stored may be gone the next moment.
pub(super) async fn reclaim(db: &mut Session, digest: &str) -> Result<(), MetadataError> {
    let sweeping = db
        .optional(
            "SELECT sweeping FROM garbage WHERE digest = $1",
            args![digest],
        )
        .await?
        .map(|row| get::<i64>(&row, 0))
        .transpose()?;
    match sweeping {
        Some(0) => {
            db.execute("DELETE FROM garbage WHERE digest = $1", args![digest])
                .await?;
            Ok(())
        }
        Some(_) => Err(MetadataError::BeingCollected(parse_digest(
            digest.to_owned(),
        )?)),
        None => Ok(()),
    }
}

pub(super) async fn queued(db: &mut Session, limit: u32) -> Result<Vec<Garbage>, MetadataError> {
    let rows = db
        .all(
            "SELECT digest, size FROM garbage ORDER BY digest LIMIT $1",
            args![limit],
        )
        .await?;
    garbage(rows)
}

/// Claims queued `digest` for deletion; false if a writer took it back meanwhile. A claim left by
/// a sweep that died is taken over.
pub(super) async fn begin_sweep(db: &mut Session, digest: &str) -> Result<bool, MetadataError> {
    // A claim already marked counts too: MySQL connections report rows matched, not changed.
    let now = db.dialect.now_ms();
    Ok(db
        .execute(
            &format!(
                "UPDATE garbage SET sweeping = 1 WHERE digest = $1 \
                 AND NOT EXISTS (SELECT 1 FROM holds WHERE digest = $1 AND expires_at_ms > {now})"
            ),
            args![digest],
        )
        .await?
        == 1)
}

pub(super) async fn end_sweep(db: &mut Session, digest: &str) -> Result<(), MetadataError> {
    db.execute("DELETE FROM garbage WHERE digest = $1", args![digest])
        .await?;
    Ok(())
}

/// Untagged manifests of repositories under `prefix` created before `created_before`: no tag
/// points at them, no index in their repository lists them, and they refer to no subject that
/// still exists there.
pub(super) async fn untagged(
    db: &mut Session,
    prefix: &str,
    created_before: i64,
    limit: u32,
) -> Result<Vec<(String, String)>, MetadataError> {
    let rows = db
        .all(
            &format!(
                "SELECT r.name, m.digest FROM manifests m JOIN repositories r ON r.id = m.repository_id \
                 WHERE {} AND m.created_at < $2 \
                 AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository_id = m.repository_id AND t.manifest_digest = m.digest) \
                 AND NOT EXISTS (SELECT 1 FROM manifest_references mr WHERE mr.repository_id = m.repository_id AND mr.child_digest = m.digest) \
                 AND (m.subject IS NULL OR NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repository_id = m.repository_id AND s.digest = m.subject)) \
                 ORDER BY r.name, m.digest LIMIT $3",
                under(1)
            ),
            args![prefix, created_before, limit],
        )
        .await?;
    rows.iter()
        .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
        .collect()
}

/// Deletes what [`untagged`] finds, deciding and deleting in the caller's transaction.
pub(super) async fn delete_untagged(
    tx: &mut Session,
    prefix: &str,
    created_before: i64,
    limit: u32,
) -> Result<Vec<(String, String)>, MetadataError> {
    let found = untagged(tx, prefix, created_before, limit).await?;
    for (repo, digest) in &found {
        delete_manifest_row(tx, repo, digest).await?;
    }
    Ok(found)
}

/// Bytes each repository and each top-level namespace can read: its blobs and manifests, each
/// digest counted once per repository and once per namespace. Largest first.
pub(super) async fn usage(
    db: &mut Session,
) -> Result<(Vec<UsageEntry>, Vec<UsageEntry>), MetadataError> {
    const HELD: &str = "SELECT r.name AS repository, rb.digest AS digest, b.size AS size \
         FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id \
         JOIN blobs b ON b.digest = rb.digest \
         UNION SELECT r.name, m.digest, m.size FROM manifests m JOIN repositories r ON r.id = m.repository_id";
    let bigint = db.dialect.bigint();
    let repositories = format!(
        "SELECT repository, CAST(SUM(size) AS {bigint}) FROM ({HELD}) held \
         GROUP BY repository ORDER BY SUM(size) DESC, repository"
    );
    let namespaces = format!(
        "SELECT namespace, CAST(SUM(size) AS {bigint}) FROM (SELECT DISTINCT \
         CASE WHEN POSITION('/' IN repository) > 0 \
         THEN SUBSTR(repository, 1, POSITION('/' IN repository) - 1) ELSE repository END AS namespace, \
         digest, size FROM ({HELD}) held) spaces GROUP BY namespace ORDER BY SUM(size) DESC, namespace"
    );
    let mut read = async |sql: &str| -> Result<Vec<UsageEntry>, MetadataError> {
        db.all(sql, args![])
            .await?
            .iter()
            .map(|row| {
                Ok(UsageEntry {
                    name: get(row, 0)?,
                    bytes: get::<i64>(row, 1)? as u64,
                })
            })
            .collect()
    };
    let repositories = read(&repositories).await?;
    let namespaces = read(&namespaces).await?;
    Ok((namespaces, repositories))
}
