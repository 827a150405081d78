//! Quotas for SQLite: the configured rules, each scope's holdings and bytes, kept up to date by
//! the same transactions that link and unlink content, and the check a write passes before it
//! adds bytes to a scope.
//!
//! A holding is one row that lets a repository read a digest: a blob link or a manifest row.
//! `quota_holdings` counts them per scope and digest; a digest adds its size to its scope's bytes
//! when its first holding there appears and takes it away when its last one goes, so each digest
//! counts once per scope.

use rusqlite::{Connection, OptionalExtension, params};

use crate::metadata::MetadataError;
use crate::quota::{Quota, QuotaExceeded, QuotaUsage, Rule, ScopeUsage};

/// The configured rules and their limits.
/// Whether any quota is in force.
pub(super) fn any(conn: &Connection) -> Result<bool, MetadataError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM quota_rules LIMIT 1")?
        .exists([])?)
}

fn rules(conn: &Connection) -> Result<Vec<(Rule, u64)>, MetadataError> {
    let mut statement = conn.prepare_cached("SELECT rule, max_bytes FROM quota_rules")?;
    let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    rows.map(|row| {
        let (text, max_bytes) = row?;
        Ok((
            text.parse().map_err(MetadataError::Corrupt)?,
            max_bytes as u64,
        ))
    })
    .collect()
}

/// Each scope `repo` counts in: its rule, its name and its limit.
fn scopes(conn: &Connection, repo: &str) -> Result<Vec<(String, String, u64)>, MetadataError> {
    Ok(rules(conn)?
        .into_iter()
        .filter_map(|(rule, max_bytes)| {
            let scope = rule.scope_of(repo)?;
            Some((rule.as_str().to_owned(), scope, max_bytes))
        })
        .collect())
}

/// Refuses giving `repo` the digest `digest` of `size` bytes if a scope it counts in does not
/// hold that digest yet and has no room left for it.
pub(super) fn check(
    conn: &Connection,
    repo: &str,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    for (quota, scope, max_bytes) in scopes(conn, repo)? {
        let held = conn
            .prepare_cached(
                "SELECT 1 FROM quota_holdings WHERE rule = ?1 AND scope = ?2 AND digest = ?3",
            )?
            .exists(params![quota, scope, digest])?;
        if held {
            continue;
        }
        let used = conn
            .prepare_cached("SELECT bytes FROM quota_scopes WHERE rule = ?1 AND scope = ?2")?
            .query_row(params![quota, scope], |r| r.get::<_, i64>(0))
            .optional()?
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

fn add_bytes(conn: &Connection, rule: &str, scope: &str, delta: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO quota_scopes (rule, scope, bytes) VALUES (?1, ?2, ?3) \
         ON CONFLICT (rule, scope) DO UPDATE SET bytes = bytes + excluded.bytes",
    )?
    .execute(params![rule, scope, delta])?;
    Ok(())
}

/// Counts a holding of `digest` (`size` bytes) that `repo` just gained.
pub(super) fn add_holder(
    conn: &Connection,
    repo: &str,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    for (rule, scope, _) in scopes(conn, repo)? {
        let holders: i64 = conn
            .prepare_cached(
                "INSERT INTO quota_holdings (rule, scope, digest, size, holders) \
                 VALUES (?1, ?2, ?3, ?4, 1) \
                 ON CONFLICT (rule, scope, digest) DO UPDATE SET holders = holders + 1 \
                 RETURNING holders",
            )?
            .query_row(params![rule, scope, digest, size as i64], |r| r.get(0))?;
        if holders == 1 {
            add_bytes(conn, &rule, &scope, size as i64)?;
        }
    }
    Ok(())
}

/// Counts a holding of `digest` that `repo` just lost; the scope's bytes drop with the last one.
pub(super) fn remove_holder(
    conn: &Connection,
    repo: &str,
    digest: &str,
) -> Result<(), MetadataError> {
    for (rule, scope, _) in scopes(conn, repo)? {
        let left: Option<(i64, i64)> = conn
            .prepare_cached(
                "UPDATE quota_holdings SET holders = holders - 1 \
                 WHERE rule = ?1 AND scope = ?2 AND digest = ?3 RETURNING holders, size",
            )?
            .query_row(params![rule, scope, digest], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((0, size)) = left {
            conn.prepare_cached(
                "DELETE FROM quota_holdings WHERE rule = ?1 AND scope = ?2 AND digest = ?3",
            )?
            .execute(params![rule, scope, digest])?;
            add_bytes(conn, &rule, &scope, -size)?;
            // A scope that holds nothing any more leaves no row (nor a metrics count) behind.
            conn.prepare_cached(
                "DELETE FROM quota_scopes WHERE rule = ?1 AND scope = ?2 AND NOT EXISTS \
                 (SELECT 1 FROM quota_holdings WHERE rule = ?1 AND scope = ?2)",
            )?
            .execute(params![rule, scope])?;
        }
    }
    Ok(())
}

/// Counts the loss of every repository's link to blob `digest`; called before they are deleted.
pub(super) fn remove_all_links(conn: &Connection, digest: &str) -> Result<(), MetadataError> {
    if rules(conn)?.is_empty() {
        return Ok(());
    }
    let holders = conn
        .prepare_cached(
            "SELECT r.name FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id \
             WHERE rb.digest = ?1",
        )?
        .query_map([digest], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for repo in holders {
        remove_holder(conn, &repo, digest)?;
    }
    Ok(())
}

/// Makes `quotas` the rules in force: rules no longer configured are dropped with their figures,
/// limits are updated, and a new rule's scopes are counted from what the repositories hold.
pub(super) fn configure(conn: &Connection, quotas: &[Quota]) -> Result<(), MetadataError> {
    let current = rules(conn)?;
    for (rule, _) in &current {
        if !quotas.iter().any(|quota| quota.repositories == *rule) {
            for table in ["quota_holdings", "quota_scopes", "quota_rules"] {
                conn.execute(
                    &format!("DELETE FROM {table} WHERE rule = ?1"),
                    [rule.as_str()],
                )?;
            }
        }
    }
    for quota in quotas {
        let rule = &quota.repositories;
        conn.execute(
            "INSERT INTO quota_rules (rule, max_bytes) VALUES (?1, ?2) \
             ON CONFLICT (rule) DO UPDATE SET max_bytes = excluded.max_bytes",
            params![rule.as_str(), quota.max_bytes.0 as i64],
        )?;
        if !current.iter().any(|(known, _)| known == rule) {
            count(conn, rule)?;
        }
    }
    Ok(())
}

/// Counts `rule`'s holdings and bytes from the repositories' blob links and manifests.
fn count(conn: &Connection, rule: &Rule) -> Result<(), MetadataError> {
    let repositories = conn
        .prepare("SELECT id, name FROM repositories")?
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut holdings = conn.prepare(
        "INSERT INTO quota_holdings (rule, scope, digest, size, holders) \
         SELECT ?1, ?2, digest, size, 1 FROM ( \
           SELECT rb.digest AS digest, b.size AS size FROM repository_blobs rb \
           JOIN blobs b ON b.digest = rb.digest WHERE rb.repository_id = ?3 \
           UNION ALL SELECT digest, size FROM manifests WHERE repository_id = ?3) \
         WHERE true ON CONFLICT (rule, scope, digest) DO UPDATE SET holders = holders + 1",
    )?;
    for (id, name) in repositories {
        if let Some(scope) = rule.scope_of(&name) {
            holdings.execute(params![rule.as_str(), scope, id])?;
        }
    }
    conn.execute(
        "INSERT INTO quota_scopes (rule, scope, bytes) \
         SELECT rule, scope, SUM(size) FROM quota_holdings WHERE rule = ?1 GROUP BY rule, scope",
        [rule.as_str()],
    )?;
    Ok(())
}

/// Use against each rule, in rule order.
pub(super) fn usage(conn: &Connection) -> Result<Vec<QuotaUsage>, MetadataError> {
    let mut statement = conn.prepare_cached(
        "SELECT q.rule, q.max_bytes, COUNT(s.scope), COALESCE(MAX(s.bytes), 0) \
         FROM quota_rules q LEFT JOIN quota_scopes s ON s.rule = q.rule \
         GROUP BY q.rule, q.max_bytes ORDER BY q.rule",
    )?;
    let rows = statement.query_map([], |r| {
        Ok(QuotaUsage {
            quota: r.get(0)?,
            max_bytes: r.get::<_, i64>(1)? as u64,
            scopes: r.get::<_, i64>(2)? as u64,
            max_used_bytes: r.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every scope holding anything, fullest (by share of its limit) first.
pub(super) fn scopes_by_use(conn: &Connection) -> Result<Vec<ScopeUsage>, MetadataError> {
    let mut statement = conn.prepare_cached(
        "SELECT s.rule, s.scope, s.bytes, q.max_bytes FROM quota_scopes s \
         JOIN quota_rules q ON q.rule = s.rule \
         ORDER BY CAST(s.bytes AS REAL) / q.max_bytes DESC, s.rule, s.scope",
    )?;
    let rows = statement.query_map([], |r| {
        Ok(ScopeUsage {
            quota: r.get(0)?,
            scope: r.get(1)?,
            bytes: r.get::<_, i64>(2)? as u64,
            max_bytes: r.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
