//! Retention's statements for the shared databases: recording pulls in batches, listing tags with
//! their push and pull times, and expiring a tag with what it alone kept.

use std::time::{Duration, UNIX_EPOCH};

use super::db::{Session, args, get};
use super::{collect, parse_digest, parse_repo, under, unix};
use crate::metadata::{Expired, MetadataError, Pull, TaggedManifest};

/// The last pull (0 for none) of manifest `{digest}` in repository `{repo}` or of any manifest it
/// lists there: pulling an index's image keeps the index.
fn last_pull(repo: &str, digest: &str) -> String {
    format!(
        "(SELECT COALESCE(MAX(m.last_pulled_at), 0) FROM manifests m \
         WHERE m.repository_id = {repo} AND (m.digest = {digest} OR m.digest IN \
         (SELECT mr.child_digest FROM manifest_references mr \
          WHERE mr.repository_id = {repo} AND mr.manifest_digest = {digest})))"
    )
}

pub(super) async fn record_pulls(tx: &mut Session, pulls: &[Pull]) -> Result<(), MetadataError> {
    for pull in pulls {
        tx.execute(
            "UPDATE manifests SET last_pulled_at = $3 WHERE digest = $2 AND last_pulled_at < $3 \
             AND repository_id = (SELECT id FROM repositories WHERE name = $1)",
            args![pull.repo.as_str(), &pull.digest.to_string(), unix(pull.at)],
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn tags_under(
    db: &mut Session,
    prefix: &str,
) -> Result<Vec<TaggedManifest>, MetadataError> {
    let rows = db
        .all(
            &format!(
                "SELECT r.name, t.name, t.manifest_digest, t.updated_at, {} \
                 FROM tags t JOIN repositories r ON r.id = t.repository_id \
                 WHERE {} ORDER BY r.name, t.updated_at DESC, t.name",
                last_pull("t.repository_id", "t.manifest_digest"),
                under(1)
            ),
            args![prefix],
        )
        .await?;
    let time = |seconds: i64| UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64);
    rows.iter()
        .map(|row| {
            let tag: String = get(row, 1)?;
            let pulled_at: i64 = get(row, 4)?;
            Ok(TaggedManifest {
                repo: parse_repo(get(row, 0)?)?,
                tag: tag
                    .parse()
                    .map_err(|_| MetadataError::Corrupt(format!("tag {tag:?}")))?,
                digest: parse_digest(get(row, 2)?)?,
                tagged_at: time(get(row, 3)?),
                pulled_at: (pulled_at > 0).then(|| time(pulled_at)),
            })
        })
        .collect()
}

/// See [`crate::metadata::MetadataStore::expire_tag`]; times in unix seconds.
pub(super) async fn expire_tag(
    tx: &mut Session,
    repo: &str,
    tag: &str,
    digest: &str,
    tagged_at: i64,
    pulled_before: Option<i64>,
) -> Result<Expired, MetadataError> {
    let mut expired = Expired::default();
    let Some(repo_id) = super::repository_id(tx, repo).await? else {
        return Ok(expired);
    };
    let row = tx
        .optional(
            &format!("SELECT {}", last_pull("$1", "$2")),
            args![repo_id, digest],
        )
        .await?;
    let last_pull: i64 = row.map(|row| get(&row, 0)).transpose()?.unwrap_or(0);
    if pulled_before.is_some_and(|before| last_pull >= before) {
        return Ok(expired);
    }
    expired.tags = tx
        .execute(
            "DELETE FROM tags WHERE repository_id = $1 AND name = $2 AND manifest_digest = $3 \
             AND updated_at <= $4",
            args![repo_id, tag, digest, tagged_at],
        )
        .await?;
    if expired.tags == 0 {
        return Ok(expired);
    }
    let mut candidates = vec![digest.to_owned()];
    while let Some(candidate) = candidates.pop() {
        let kept = tx
            .exists(
                "SELECT 1 FROM tags WHERE repository_id = $1 AND manifest_digest = $2 \
                 UNION ALL SELECT 1 FROM manifest_references WHERE repository_id = $1 AND child_digest = $2",
                args![repo_id, &candidate],
            )
            .await?;
        if kept {
            continue;
        }
        // An index's images become candidates once the index is gone; read them before its
        // references go with it.
        let children = tx
            .all(
                "SELECT mr.child_digest FROM manifest_references mr JOIN manifests m \
                 ON m.repository_id = mr.repository_id AND m.digest = mr.child_digest \
                 WHERE mr.repository_id = $1 AND mr.manifest_digest = $2",
                args![repo_id, &candidate],
            )
            .await?
            .iter()
            .map(|row| get::<String>(row, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(row) = tx
            .optional(
                "SELECT size FROM manifests WHERE repository_id = $1 AND digest = $2",
                args![repo_id, &candidate],
            )
            .await?
        else {
            continue;
        };
        tx.execute(
            "DELETE FROM manifests WHERE repository_id = $1 AND digest = $2",
            args![repo_id, &candidate],
        )
        .await?;
        super::quota::remove_holder(tx, repo, &candidate).await?;
        collect::queue_if_orphaned(tx, &candidate, get::<i64>(&row, 0)? as u64).await?;
        expired.manifests += 1;
        candidates.extend(children);
    }
    Ok(expired)
}
