//! Quotas for the shared databases, kept as the SQLite store keeps them (see its `quota`
//! module): `quota_holdings` counts each scope's holdings of a digest, `quota_scopes` the bytes
//! of the digests each scope holds, both updated by the transactions that link and unlink.

use super::db::{Session, args, get};
use crate::metadata::MetadataError;
use crate::quota::{Quota, QuotaExceeded, QuotaUsage, Rule, ScopeUsage};

async fn rules(db: &mut Session) -> Result<Vec<(Rule, u64)>, MetadataError> {
    db.all("SELECT rule, max_bytes FROM quota_rules", args![])
        .await?
        .iter()
        .map(|row| {
            let text: String = get(row, 0)?;
            Ok((
                text.parse().map_err(MetadataError::Corrupt)?,
                get::<i64>(row, 1)? as u64,
            ))
        })
        .collect()
}

/// Each scope `repo` counts in: its rule, its name and its limit.
async fn scopes(db: &mut Session, repo: &str) -> Result<Vec<(String, String, u64)>, MetadataError> {
    Ok(rules(db)
        .await?
        .into_iter()
        .filter_map(|(rule, max_bytes)| {
            let scope = rule.scope_of(repo)?;
            Some((rule.as_str().to_owned(), scope, max_bytes))
        })
        .collect())
}

/// Refuses giving `repo` the digest `digest` of `size` bytes if a scope it counts in does not
/// hold that digest yet and has no room left for it.
pub(super) async fn check(
    db: &mut Session,
    repo: &str,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    for (quota, scope, max_bytes) in scopes(db, repo).await? {
        let held = db
            .exists(
                "SELECT 1 FROM quota_holdings WHERE rule = $1 AND scope = $2 AND digest = $3",
                args![&quota, &scope, digest],
            )
            .await?;
        if held {
            continue;
        }
        let used = db
            .optional(
                "SELECT bytes FROM quota_scopes WHERE rule = $1 AND scope = $2",
                args![&quota, &scope],
            )
            .await?
            .map(|row| get::<i64>(&row, 0))
            .transpose()?
            .unwrap_or(0) as u64;
        if used.saturating_add(size) > max_bytes {
            return Err(MetadataError::QuotaExceeded(QuotaExceeded {
                quota,
                scope,
                max_bytes,
                used_bytes: used,
                needed_bytes: size,
            }));
        }
    }
    Ok(())
}

async fn add_bytes(
    db: &mut Session,
    rule: &str,
    scope: &str,
    delta: i64,
) -> Result<(), MetadataError> {
    let add = db.dialect.upsert(
        "quota_scopes (rule, scope, bytes) VALUES ($1, $2, $3)",
        "rule, scope",
        "bytes = quota_scopes.bytes + excluded.bytes",
    );
    db.execute(&add, args![rule, scope, delta]).await?;
    Ok(())
}

/// Counts a holding of `digest` (`size` bytes) that `repo` just gained.
pub(super) async fn add_holder(
    db: &mut Session,
    repo: &str,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    let hold = db.dialect.upsert(
        "quota_holdings (rule, scope, digest, size, holders) VALUES ($1, $2, $3, $4, 1)",
        "rule, scope, digest",
        "holders = quota_holdings.holders + 1",
    );
    for (rule, scope, _) in scopes(db, repo).await? {
        db.execute(&hold, args![&rule, &scope, digest, size as i64])
            .await?;
        let holders: i64 = get(
            &db.optional(
                "SELECT holders FROM quota_holdings WHERE rule = $1 AND scope = $2 AND digest = $3",
                args![&rule, &scope, digest],
            )
            .await?
            .ok_or_else(|| MetadataError::Corrupt(format!("holding of {digest} vanished")))?,
            0,
        )?;
        if holders == 1 {
            add_bytes(db, &rule, &scope, size as i64).await?;
        }
    }
    Ok(())
}

/// Counts a holding of `digest` that `repo` just lost; the scope's bytes drop with the last one.
pub(super) async fn remove_holder(
    db: &mut Session,
    repo: &str,
    digest: &str,
) -> Result<(), MetadataError> {
    for (rule, scope, _) in scopes(db, repo).await? {
        let key = args![&rule, &scope, digest];
        db.execute(
            "UPDATE quota_holdings SET holders = holders - 1 WHERE rule = $1 AND scope = $2 AND digest = $3",
            key,
        )
        .await?;
        let Some(row) = db
            .optional(
                "SELECT holders, size FROM quota_holdings WHERE rule = $1 AND scope = $2 AND digest = $3",
                key,
            )
            .await?
        else {
            continue;
        };
        if get::<i64>(&row, 0)? != 0 {
            continue;
        }
        db.execute(
            "DELETE FROM quota_holdings WHERE rule = $1 AND scope = $2 AND digest = $3",
            key,
        )
        .await?;
        add_bytes(db, &rule, &scope, -get::<i64>(&row, 1)?).await?;
        // A scope that holds nothing any more leaves no row (nor a metrics count) behind.
        db.execute(
            "DELETE FROM quota_scopes WHERE rule = $1 AND scope = $2 AND NOT EXISTS \
             (SELECT 1 FROM quota_holdings WHERE rule = $1 AND scope = $2)",
            args![&rule, &scope],
        )
        .await?;
    }
    Ok(())
}

/// Counts the loss of every repository's link to blob `digest`; called before they are deleted.
pub(super) async fn remove_all_links(db: &mut Session, digest: &str) -> Result<(), MetadataError> {
    if rules(db).await?.is_empty() {
        return Ok(());
    }
    let holders = db
        .all(
            "SELECT r.name FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id \
             WHERE rb.digest = $1",
            args![digest],
        )
        .await?
        .iter()
        .map(|row| get::<String>(row, 0))
        .collect::<Result<Vec<_>, _>>()?;
    for repo in holders {
        remove_holder(db, &repo, digest).await?;
    }
    Ok(())
}

/// Makes `quotas` the rules in force: rules no longer configured are dropped with their figures,
/// limits are updated, and a new rule's scopes are counted from what the repositories hold.
pub(super) async fn configure(db: &mut Session, quotas: &[Quota]) -> Result<(), MetadataError> {
    let current = rules(db).await?;
    for (rule, _) in &current {
        if !quotas.iter().any(|quota| quota.repositories == *rule) {
            for table in ["quota_holdings", "quota_scopes", "quota_rules"] {
                db.execute(
                    &format!("DELETE FROM {table} WHERE rule = $1"),
                    args![rule.as_str()],
                )
                .await?;
            }
        }
    }
    let set = db.dialect.upsert(
        "quota_rules (rule, max_bytes) VALUES ($1, $2)",
        "rule",
        "max_bytes = excluded.max_bytes",
    );
    for quota in quotas {
        let rule = &quota.repositories;
        db.execute(&set, args![rule.as_str(), quota.max_bytes.0 as i64])
            .await?;
        if !current.iter().any(|(known, _)| known == rule) {
            count(db, rule).await?;
        }
    }
    Ok(())
}

/// Counts `rule`'s holdings and bytes from the repositories' blob links and manifests.
async fn count(db: &mut Session, rule: &Rule) -> Result<(), MetadataError> {
    let repositories = db
        .all("SELECT id, name FROM repositories", args![])
        .await?
        .iter()
        .map(|row| Ok((get::<i64>(row, 0)?, get::<String>(row, 1)?)))
        .collect::<Result<Vec<_>, MetadataError>>()?;
    // A digest may be both a blob link and a manifest of one repository: one row per digest,
    // since a statement may not update the row it inserted.
    let holdings = db.dialect.upsert(
        "quota_holdings (rule, scope, digest, size, holders) \
         SELECT $1, $2, digest, MAX(size), COUNT(*) FROM ( \
           SELECT rb.digest AS digest, b.size AS size FROM repository_blobs rb \
           JOIN blobs b ON b.digest = rb.digest WHERE rb.repository_id = $3 \
           UNION ALL SELECT digest, size FROM manifests WHERE repository_id = $3) held \
         GROUP BY digest",
        "rule, scope, digest",
        "holders = quota_holdings.holders + excluded.holders",
    );
    for (id, name) in repositories {
        if let Some(scope) = rule.scope_of(&name) {
            db.execute(&holdings, args![rule.as_str(), &scope, id])
                .await?;
        }
    }
    let bigint = db.dialect.bigint();
    db.execute(
        &format!(
            "INSERT INTO quota_scopes (rule, scope, bytes) \
             SELECT rule, scope, CAST(SUM(size) AS {bigint}) FROM quota_holdings WHERE rule = $1 GROUP BY rule, scope"
        ),
        args![rule.as_str()],
    )
    .await?;
    Ok(())
}

/// Use against each rule, in rule order.
pub(super) async fn usage(db: &mut Session) -> Result<Vec<QuotaUsage>, MetadataError> {
    db.all(
        "SELECT q.rule, q.max_bytes, COUNT(s.scope), COALESCE(MAX(s.bytes), 0) \
         FROM quota_rules q LEFT JOIN quota_scopes s ON s.rule = q.rule \
         GROUP BY q.rule, q.max_bytes ORDER BY q.rule",
        args![],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(QuotaUsage {
            quota: get(row, 0)?,
            max_bytes: get::<i64>(row, 1)? as u64,
            scopes: get::<i64>(row, 2)? as u64,
            max_used_bytes: get::<i64>(row, 3)? as u64,
        })
    })
    .collect()
}

/// Every scope holding anything, fullest (by share of its limit) first.
pub(super) async fn scopes_by_use(db: &mut Session) -> Result<Vec<ScopeUsage>, MetadataError> {
    db.all(
        "SELECT s.rule, s.scope, s.bytes, q.max_bytes FROM quota_scopes s \
         JOIN quota_rules q ON q.rule = s.rule \
         ORDER BY s.bytes * 1.0 / q.max_bytes DESC, s.rule, s.scope",
        args![],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(ScopeUsage {
            quota: get(row, 0)?,
            scope: get(row, 1)?,
            bytes: get::<i64>(row, 2)? as u64,
            max_bytes: get::<i64>(row, 3)? as u64,
        })
    })
    .collect()
}
