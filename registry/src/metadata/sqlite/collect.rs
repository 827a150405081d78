//! The garbage collector's statements for SQLite: finding unreferenced content, queueing it with
//! its rows gone in the same transaction, and the sweep's claim on a queued digest.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{now, parse_digest};
use crate::metadata::{Garbage, MetadataError, UsageEntry};

/// The condition on blob row `b` of a collectable blob: no manifest of any repository references
/// it and no repository was given it since `?1` (unix seconds).
const UNREFERENCED: &str = "b.last_linked_at < ?1 \
     AND NOT EXISTS (SELECT 1 FROM manifest_references mr WHERE mr.child_digest = b.digest) \
     AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest = b.digest)";

fn garbage_rows(
    statement: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<Garbage>, MetadataError> {
    let rows = statement.query_map(params, |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    rows.map(|row| {
        let (digest, size) = row?;
        Ok(Garbage {
            digest: parse_digest(digest)?,
            size: size as u64,
        })
    })
    .collect()
}

/// Up to `limit` collectable blobs (see [`UNREFERENCED`]) after `after` in digest order: a
/// collection pages through them once instead of rescanning what it already passed.
pub(super) fn unreferenced(
    conn: &Connection,
    linked_before: i64,
    after: &str,
    limit: u32,
) -> Result<Vec<Garbage>, MetadataError> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT b.digest, b.size FROM blobs b WHERE b.digest > ?2 AND {UNREFERENCED} \
         ORDER BY b.digest LIMIT ?3"
    ))?;
    garbage_rows(&mut statement, params![linked_before, after, limit])
}

/// Queues those of `candidates` still collectable, deciding again in the caller's transaction,
/// and removes each one's row and every repository's link to it in that transaction, so from its
/// commit on no pull, mount or manifest can reach it.
pub(super) fn queue_unreferenced(
    tx: &Transaction<'_>,
    linked_before: i64,
    candidates: &[String],
) -> Result<Vec<Garbage>, MetadataError> {
    let mut still = tx.prepare_cached(&format!(
        "SELECT b.digest, b.size FROM blobs b WHERE b.digest = ?2 AND {UNREFERENCED}"
    ))?;
    let mut found = Vec::new();
    for candidate in candidates {
        found.extend(garbage_rows(&mut still, params![linked_before, candidate])?);
    }
    let mut unlink = tx.prepare_cached("DELETE FROM repository_blobs WHERE digest = ?1")?;
    let mut forget = tx.prepare_cached("DELETE FROM blobs WHERE digest = ?1")?;
    for garbage in &found {
        let digest = garbage.digest.to_string();
        super::quota::remove_all_links(tx, &digest)?;
        unlink.execute([&digest])?;
        forget.execute([&digest])?;
        queue(tx, &digest, garbage.size)?;
    }
    Ok(found)
}

fn queue(conn: &Connection, digest: &str, size: u64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO garbage (digest, size, queued_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (digest) DO NOTHING",
        params![digest, size as i64, now()],
    )?;
    Ok(())
}

/// Queues manifest bytes `digest` of `size` bytes if no repository holds that manifest any more
/// and it is no blob either; called where a manifest row was just deleted.
pub(super) fn queue_if_orphaned(
    conn: &Connection,
    digest: &str,
    size: u64,
) -> rusqlite::Result<()> {
    let held = conn
        .prepare_cached(
            "SELECT 1 FROM manifests WHERE digest = ?1 UNION ALL SELECT 1 FROM blobs WHERE digest = ?1",
        )?
        .exists([digest])?;
    if !held {
        queue(conn, digest, size)?;
    }
    Ok(())
}

/// Takes back queued content that is being written again (an upload of the same bytes, the same
/// manifest pushed again): its deletion is cancelled. Fails while a sweep is deleting its bytes,
/// since what the writer just stored may be gone the next moment; the writer retries.
pub(super) fn reclaim(conn: &Connection, digest: &str) -> Result<(), MetadataError> {
    let sweeping: Option<bool> = conn
        .prepare_cached("SELECT sweeping FROM garbage WHERE digest = ?1")?
        .query_row([digest], |r| r.get(0))
        .optional()?;
    match sweeping {
        Some(true) => Err(MetadataError::BeingCollected(parse_digest(
            digest.to_owned(),
        )?)),
        Some(false) => {
            conn.execute("DELETE FROM garbage WHERE digest = ?1", [digest])?;
            Ok(())
        }
        None => Ok(()),
    }
}

pub(super) fn queued(conn: &Connection, limit: u32) -> Result<Vec<Garbage>, MetadataError> {
    let mut statement =
        conn.prepare_cached("SELECT digest, size FROM garbage ORDER BY digest LIMIT ?1")?;
    garbage_rows(&mut statement, [limit])
}

/// Claims queued `digest` for deletion; false if a writer took it back meanwhile or a push holds
/// it. A claim left by a sweep that died is taken over.
pub(super) fn begin_sweep(conn: &Connection, digest: &str, now_ms: i64) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "UPDATE garbage SET sweeping = 1 WHERE digest = ?1 \
         AND NOT EXISTS (SELECT 1 FROM holds WHERE digest = ?1 AND expires_at_ms > ?2)",
        params![digest, now_ms],
    )? == 1)
}

pub(super) fn end_sweep(conn: &Connection, digest: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM garbage WHERE digest = ?1", [digest])?;
    Ok(())
}

/// Untagged manifests of repositories under `prefix` created before `created_before`: no tag
/// points at them, no index in their repository lists them, and they refer to no subject that
/// still exists there (a signature or SBOM stays while what it describes stays).
pub(super) fn untagged(
    conn: &Connection,
    prefix: &str,
    created_before: i64,
    limit: u32,
) -> Result<Vec<(String, String)>, MetadataError> {
    let mut statement = conn.prepare_cached(
        "SELECT r.name, m.digest FROM manifests m JOIN repositories r ON r.id = m.repository_id \
         WHERE (?1 = '' OR r.name = ?1 OR substr(r.name, 1, length(?1) + 1) = ?1 || '/') \
         AND m.created_at < ?2 \
         AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository_id = m.repository_id AND t.manifest_digest = m.digest) \
         AND NOT EXISTS (SELECT 1 FROM manifest_references mr WHERE mr.repository_id = m.repository_id AND mr.child_digest = m.digest) \
         AND (m.subject IS NULL OR NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repository_id = m.repository_id AND s.digest = m.subject)) \
         ORDER BY r.name, m.digest LIMIT ?3",
    )?;
    let rows = statement.query_map(params![prefix, created_before, limit], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes what [`untagged`] finds, deciding and deleting in the caller's transaction so that a
/// tag or an index pushed meanwhile keeps its manifest; queues bytes no repository holds any more.
pub(super) fn delete_untagged(
    tx: &Transaction<'_>,
    prefix: &str,
    created_before: i64,
    limit: u32,
) -> Result<Vec<(String, String)>, MetadataError> {
    let found = untagged(tx, prefix, created_before, limit)?;
    for (repo, digest) in &found {
        super::delete_manifest_row(tx, repo, digest)?;
    }
    Ok(found)
}

/// Bytes each repository and each top-level namespace can read: its blobs and manifests, each
/// digest counted once per repository and once per namespace. Largest first.
pub(super) fn usage(
    conn: &Connection,
) -> Result<(Vec<UsageEntry>, Vec<UsageEntry>), MetadataError> {
    const HELD: &str = "SELECT r.name AS repository, rb.digest AS digest, b.size AS size \
         FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id \
         JOIN blobs b ON b.digest = rb.digest \
         UNION SELECT r.name, m.digest, m.size FROM manifests m JOIN repositories r ON r.id = m.repository_id";
    let read = |sql: &str| -> Result<Vec<UsageEntry>, MetadataError> {
        let mut statement = conn.prepare(sql)?;
        let rows = statement.query_map([], |r| {
            Ok(UsageEntry {
                name: r.get(0)?,
                bytes: r.get::<_, i64>(1)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    let repositories = read(&format!(
        "SELECT repository, SUM(size) FROM ({HELD}) GROUP BY repository ORDER BY SUM(size) DESC, repository"
    ))?;
    let namespaces = read(&format!(
        "SELECT namespace, SUM(size) FROM (SELECT DISTINCT \
         CASE WHEN instr(repository, '/') > 0 THEN substr(repository, 1, instr(repository, '/') - 1) ELSE repository END AS namespace, \
         digest, size FROM ({HELD})) GROUP BY namespace ORDER BY SUM(size) DESC, namespace"
    ))?;
    Ok((namespaces, repositories))
}
