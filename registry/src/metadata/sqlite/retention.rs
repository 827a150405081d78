//! Retention's statements for SQLite: recording pulls in batches, listing tags with their push
//! and pull times, and expiring a tag with what it alone kept.

use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{collect, parse_digest, unix};
use crate::metadata::{Expired, MetadataError, Pull, TaggedManifest};

/// The last pull (0 for none) of manifest `?2` in repository `?1` or of any manifest it lists
/// there: pulling an index's image keeps the index.
const LAST_PULL: &str = "(SELECT COALESCE(MAX(m.last_pulled_at), 0) FROM manifests m \
     WHERE m.repository_id = ?1 AND (m.digest = ?2 OR m.digest IN \
     (SELECT mr.child_digest FROM manifest_references mr \
      WHERE mr.repository_id = ?1 AND mr.manifest_digest = ?2)))";

pub(super) fn record_pulls(tx: &Transaction<'_>, pulls: &[Pull]) -> rusqlite::Result<()> {
    let mut record = tx.prepare_cached(
        "UPDATE manifests SET last_pulled_at = ?3 WHERE digest = ?2 AND last_pulled_at < ?3 \
         AND repository_id = (SELECT id FROM repositories WHERE name = ?1)",
    )?;
    for pull in pulls {
        record.execute(params![
            pull.repo.as_str(),
            pull.digest.to_string(),
            unix(pull.at)
        ])?;
    }
    Ok(())
}

pub(super) fn tags_under(
    conn: &Connection,
    prefix: &str,
) -> Result<Vec<TaggedManifest>, MetadataError> {
    let last_pull = LAST_PULL
        .replace("?1", "t.repository_id")
        .replace("?2", "t.manifest_digest");
    let mut statement = conn.prepare_cached(&format!(
        "SELECT r.name, t.name, t.manifest_digest, t.updated_at, {last_pull} \
         FROM tags t JOIN repositories r ON r.id = t.repository_id \
         WHERE (?1 = '' OR r.name = ?1 OR substr(r.name, 1, length(?1) + 1) = ?1 || '/') \
         ORDER BY r.name, t.updated_at DESC, t.name"
    ))?;
    let rows = statement.query_map([prefix], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let time = |seconds: i64| UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64);
    rows.map(|row| {
        let (repo, tag, digest, tagged_at, pulled_at) = row?;
        Ok(TaggedManifest {
            repo: repo
                .parse()
                .map_err(|_| MetadataError::Corrupt(format!("repository name {repo:?}")))?,
            tag: tag
                .parse()
                .map_err(|_| MetadataError::Corrupt(format!("tag {tag:?}")))?,
            digest: parse_digest(digest)?,
            tagged_at: time(tagged_at),
            pulled_at: (pulled_at > 0).then(|| time(pulled_at)),
        })
    })
    .collect()
}

/// See [`crate::metadata::MetadataStore::expire_tag`]; times in unix seconds.
pub(super) fn expire_tag(
    tx: &Transaction<'_>,
    repo: &str,
    tag: &str,
    digest: &str,
    tagged_at: i64,
    pulled_before: Option<i64>,
) -> Result<Expired, MetadataError> {
    let mut expired = Expired::default();
    let Some(repo_id) = tx
        .query_row("SELECT id FROM repositories WHERE name = ?1", [repo], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
    else {
        return Ok(expired);
    };
    let last_pull: i64 = tx.query_row(
        &format!("SELECT {LAST_PULL}"),
        params![repo_id, digest],
        |r| r.get(0),
    )?;
    if pulled_before.is_some_and(|before| last_pull >= before) {
        return Ok(expired);
    }
    expired.tags = tx.execute(
        "DELETE FROM tags WHERE repository_id = ?1 AND name = ?2 AND manifest_digest = ?3 \
         AND updated_at <= ?4",
        params![repo_id, tag, digest, tagged_at],
    )? as u64;
    if expired.tags == 0 {
        return Ok(expired);
    }
    let mut candidates = vec![digest.to_owned()];
    while let Some(candidate) = candidates.pop() {
        let kept = tx
            .prepare_cached(
                "SELECT 1 FROM tags WHERE repository_id = ?1 AND manifest_digest = ?2 \
                 UNION ALL SELECT 1 FROM manifest_references WHERE repository_id = ?1 AND child_digest = ?2",
            )?
            .exists(params![repo_id, candidate])?;
        if kept {
            continue;
        }
        // An index's images become candidates once the index is gone; read them before its
        // references go with it.
        let children = tx
            .prepare_cached(
                "SELECT mr.child_digest FROM manifest_references mr JOIN manifests m \
                 ON m.repository_id = mr.repository_id AND m.digest = mr.child_digest \
                 WHERE mr.repository_id = ?1 AND mr.manifest_digest = ?2",
            )?
            .query_map(params![repo_id, candidate], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let size: Option<i64> = tx
            .query_row(
                "DELETE FROM manifests WHERE repository_id = ?1 AND digest = ?2 RETURNING size",
                params![repo_id, candidate],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(size) = size {
            super::quota::remove_holder(tx, repo, &candidate)?;
            collect::queue_if_orphaned(tx, &candidate, size as u64)?;
            expired.manifests += 1;
            candidates.extend(children);
        }
    }
    Ok(expired)
}
