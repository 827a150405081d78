//! What PostgreSQL and MySQL differ in, and running statements written once for both.
//!
//! Statements are written in PostgreSQL's form with `$n` placeholders; for MySQL each `$n`
//! becomes a `?` bound with the n-th argument, so an argument used twice is bound twice.

use std::time::{Duration, SystemTime};

use sqlx::any::{Any, AnyArguments, AnyRow};
use sqlx::pool::PoolConnection;
use sqlx::query::Query;
use sqlx::{AnyConnection, AssertSqlSafe, Transaction};

use crate::metadata::MetadataError;

/// The database a shared store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Mysql,
}

impl Dialect {
    /// `INSERT INTO {into}` that skips a row whose key (`key`, its columns) exists already; its
    /// rows-affected count says whether the row was new.
    pub(super) fn insert_new(self, into: &str, key: &str) -> String {
        match self {
            Dialect::Postgres => format!("INSERT INTO {into} ON CONFLICT ({key}) DO NOTHING"),
            // `ON DUPLICATE KEY UPDATE k = k` would count an existing row as affected (the driver
            // asks for found rows). IGNORE also demotes other errors to warnings; every such
            // insert here writes validated values under keys checked or created just before.
            Dialect::Mysql => format!("INSERT IGNORE INTO {into}"),
        }
    }

    /// `INSERT INTO {into}` that, where the key `key` exists, applies `set` instead; `set` names
    /// the value the insert proposed for a column as `excluded.column`.
    pub(super) fn upsert(self, into: &str, key: &str, set: &str) -> String {
        match self {
            Dialect::Postgres => {
                format!("INSERT INTO {into} ON CONFLICT ({key}) DO UPDATE SET {set}")
            }
            // MariaDB lacks MySQL 8's `AS new` row alias; both still take VALUES().
            Dialect::Mysql => {
                let mut set = set.to_owned();
                while let Some(at) = set.find("excluded.") {
                    let rest = &set[at + "excluded.".len()..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    let column = rest[..end].to_owned();
                    set.replace_range(
                        at..at + "excluded.".len() + end,
                        &format!("VALUES({column})"),
                    );
                }
                format!("INSERT INTO {into} ON DUPLICATE KEY UPDATE {set}")
            }
        }
    }

    /// The database's clock in milliseconds since the epoch, so that instances with skewed clocks
    /// agree on when a lease or hold expires.
    pub(super) fn now_ms(self) -> &'static str {
        match self {
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Dialect::Mysql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
        }
    }

    /// The type a `CAST` turns an integer sum (a decimal in both) back into a 64-bit integer.
    pub(super) fn bigint(self) -> &'static str {
        match self {
            Dialect::Postgres => "BIGINT",
            Dialect::Mysql => "SIGNED",
        }
    }

    /// `sql` with its `$n` placeholders as this database writes them, and for each placeholder in
    /// order the index of the argument it takes.
    fn placeholders(self, sql: &str) -> (String, Vec<usize>) {
        let mut order = Vec::new();
        let mut out = String::with_capacity(sql.len());
        let mut chars = sql.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            if c != '$' {
                out.push(c);
                continue;
            }
            let digits: String =
                std::iter::from_fn(|| chars.next_if(|(_, d)| d.is_ascii_digit()).map(|(_, d)| d))
                    .collect();
            let n: usize = digits
                .parse()
                .unwrap_or_else(|_| panic!("a `$` without a number at {at} of {sql}"));
            order.push(n - 1);
            match self {
                Dialect::Postgres => {
                    out.push('$');
                    out.push_str(&digits);
                }
                Dialect::Mysql => out.push('?'),
            }
        }
        if self == Dialect::Postgres {
            // Bound once each, in number order, however often the statement uses them.
            let count = order.iter().max().map_or(0, |n| n + 1);
            order = (0..count).collect();
        }
        (out, order)
    }

    /// Migration files of this dialect, by version.
    pub(super) fn migrations(self) -> &'static [(i64, &'static str)] {
        match self {
            Dialect::Postgres => &[
                (
                    1,
                    include_str!("../../../migrations/postgres/0001_initial.sql"),
                ),
                (
                    2,
                    include_str!("../../../migrations/postgres/0002_collection.sql"),
                ),
                (
                    3,
                    include_str!("../../../migrations/postgres/0003_retention.sql"),
                ),
                (
                    4,
                    include_str!("../../../migrations/postgres/0004_quotas.sql"),
                ),
                (
                    5,
                    include_str!("../../../migrations/postgres/0005_leases.sql"),
                ),
            ],
            Dialect::Mysql => &[
                (
                    1,
                    include_str!("../../../migrations/mysql/0001_initial.sql"),
                ),
                (
                    2,
                    include_str!("../../../migrations/mysql/0002_collection.sql"),
                ),
                (
                    3,
                    include_str!("../../../migrations/mysql/0003_retention.sql"),
                ),
                (4, include_str!("../../../migrations/mysql/0004_quotas.sql")),
                (5, include_str!("../../../migrations/mysql/0005_leases.sql")),
            ],
        }
    }

    /// Statements that make migrating a critical section across every instance sharing the
    /// database (taken on one connection, released on it after).
    pub(super) fn migration_lock(self) -> (&'static str, &'static str) {
        match self {
            Dialect::Postgres => (
                "SELECT pg_advisory_lock(7239117115)",
                "SELECT pg_advisory_unlock(7239117115)",
            ),
            Dialect::Mysql => (
                "SELECT GET_LOCK('berth_registry_schema', 86400)",
                "SELECT RELEASE_LOCK('berth_registry_schema')",
            ),
        }
    }
}

/// A statement argument.
#[derive(Debug, Clone, Copy)]
pub(super) enum Arg<'a> {
    Int(i64),
    Text(&'a str),
    OptText(Option<&'a str>),
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Arg::Int(value)
    }
}

impl From<u32> for Arg<'_> {
    fn from(value: u32) -> Self {
        Arg::Int(value.into())
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(value: &'a str) -> Self {
        Arg::Text(value)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(value: &'a String) -> Self {
        Arg::Text(value)
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Arg::OptText(value)
    }
}

/// The arguments of a statement, each converted to an [`Arg`].
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        &[$($crate::metadata::sql::db::Arg::from($arg)),*]
    };
}
pub(super) use args;

/// A connection from the pool, in a transaction or not.
pub(super) struct Session {
    conn: Conn,
    pub(super) dialect: Dialect,
}

enum Conn {
    Plain(PoolConnection<Any>),
    Transaction(Transaction<'static, Any>),
    /// Taken out of the pool for good (closed when dropped).
    Detached(AnyConnection),
}

impl Session {
    pub(super) fn plain(conn: PoolConnection<Any>, dialect: Dialect) -> Self {
        Session {
            conn: Conn::Plain(conn),
            dialect,
        }
    }

    pub(super) fn detached(conn: AnyConnection, dialect: Dialect) -> Self {
        Session {
            conn: Conn::Detached(conn),
            dialect,
        }
    }

    pub(super) fn transaction(tx: Transaction<'static, Any>, dialect: Dialect) -> Self {
        Session {
            conn: Conn::Transaction(tx),
            dialect,
        }
    }

    fn connection(&mut self) -> &mut AnyConnection {
        match &mut self.conn {
            Conn::Plain(conn) => conn,
            Conn::Transaction(tx) => tx,
            Conn::Detached(conn) => conn,
        }
    }

    fn query<'q>(&self, sql: &str, args: &[Arg<'_>]) -> Query<'q, Any, AnyArguments> {
        let (sql, order) = self.dialect.placeholders(sql);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for index in order {
            query = match args[index] {
                Arg::Int(value) => query.bind(value),
                Arg::Text(value) => query.bind(value),
                Arg::OptText(value) => query.bind(value),
            };
        }
        query
    }

    /// Runs `sql`; returns how many rows it changed.
    pub(super) async fn execute(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<u64, MetadataError> {
        let query = self.query(sql, args);
        Ok(query.execute(self.connection()).await?.rows_affected())
    }

    pub(super) async fn optional(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<AnyRow>, MetadataError> {
        let query = self.query(sql, args);
        Ok(query.fetch_optional(self.connection()).await?)
    }

    pub(super) async fn all(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<AnyRow>, MetadataError> {
        let query = self.query(sql, args);
        Ok(query.fetch_all(self.connection()).await?)
    }

    pub(super) async fn exists(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<bool, MetadataError> {
        Ok(self.optional(sql, args).await?.is_some())
    }

    /// Runs `sql` without arguments or preparing it (session settings, schema changes).
    pub(super) async fn raw(&mut self, sql: &str) -> Result<(), MetadataError> {
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(self.connection())
            .await?;
        Ok(())
    }

    pub(super) async fn commit(self) -> Result<(), MetadataError> {
        if let Conn::Transaction(tx) = self.conn {
            tx.commit().await?;
        }
        Ok(())
    }
}

/// Reads column `index` of `row`.
pub(super) fn get<'r, T>(row: &'r AnyRow, index: usize) -> Result<T, MetadataError>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    Ok(sqlx::Row::try_get(row, index)?)
}

/// How a failed statement should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The database could not be reached or dropped the connection: it is down, restarting,
    /// or out of connections.
    Unavailable,
    /// The transaction lost a race with another (serialization failure, deadlock); run again,
    /// it sees the other's outcome.
    Conflict,
    /// The disk under the database is full.
    StorageFull,
    /// Anything else (a constraint, a bug): running it again gives the same answer.
    Permanent,
}

/// PostgreSQL SQLSTATEs and MySQL error numbers of each kind of failure.
pub(crate) fn classify(err: &sqlx::Error) -> Failure {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => {
            Failure::Unavailable
        }
        sqlx::Error::Database(db) => {
            if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                return match mysql.number() {
                    // Deadlock found (Galera's certification failure comes as one too). A lock
                    // wait timeout is not retried: it already waited the statement timeout.
                    1213 => Failure::Conflict,
                    // Too many connections, server shutdown in progress, query interrupted by
                    // shutdown, connection killed.
                    1040 | 1053 | 1927 | 1317 => Failure::Unavailable,
                    // The table is full, disk full.
                    1114 | 1021 => Failure::StorageFull,
                    _ => Failure::Permanent,
                };
            }
            match db.code().as_deref() {
                Some("40001" | "40P01") => Failure::Conflict,
                // Connection exceptions; the server shutting down or starting; too many
                // connections.
                Some(code)
                    if code.starts_with("08")
                        || matches!(code, "57P01" | "57P02" | "57P03" | "53300") =>
                {
                    Failure::Unavailable
                }
                Some("53100") => Failure::StorageFull,
                _ => Failure::Permanent,
            }
        }
        _ => Failure::Permanent,
    }
}

/// How often a transaction that lost a race or its connection runs again; together with the
/// pool's own wait for a connection this bounds how long a request waits on a database that
/// is briefly gone.
const ATTEMPTS: u32 = 8;

/// Runs `attempt` until it succeeds, fails for good, or has run [`ATTEMPTS`] times; waits between
/// runs, doubling the wait and spreading concurrent retries apart.
pub(super) async fn retried<T, F, Fut>(mut attempt: F) -> Result<T, MetadataError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MetadataError>>,
{
    let mut wait = Duration::from_millis(5);
    for run in 1.. {
        match attempt().await {
            Err(MetadataError::Sql(err)) if run < ATTEMPTS && retryable(&err) => {
                tracing::debug!(error = %err, run, "database transaction retried");
                let jitter = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
                    % (wait.as_micros() as u32 + 1);
                tokio::time::sleep(wait + Duration::from_micros(jitter.into())).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
            result => return result,
        }
    }
    unreachable!("the loop returns on its last run")
}

/// Whether running a failed transaction again may succeed: a lost race, or a connection that
/// broke under it. Waiting for a connection that could not be had is not retried here; the pool
/// already waited for one as long as it is configured to.
fn retryable(err: &sqlx::Error) -> bool {
    match classify(err) {
        Failure::Conflict => true,
        Failure::Unavailable => !matches!(err, sqlx::Error::PoolTimedOut),
        Failure::StorageFull | Failure::Permanent => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_placeholders_repeat_their_argument() {
        let (sql, order) = Dialect::Mysql.placeholders("SELECT $2, $1 WHERE x = $2");
        assert_eq!(sql, "SELECT ?, ? WHERE x = ?");
        assert_eq!(order, [1, 0, 1]);
        let (sql, order) = Dialect::Postgres.placeholders("SELECT $2, $1 WHERE x = $2");
        assert_eq!(sql, "SELECT $2, $1 WHERE x = $2");
        assert_eq!(order, [0, 1]);
    }

    #[test]
    fn upserts_name_the_proposed_row_as_each_dialect_does() {
        let into = "t (k, n) VALUES ($1, $2)";
        assert_eq!(
            Dialect::Postgres.upsert(into, "k", "n = t.n + excluded.n"),
            "INSERT INTO t (k, n) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET n = t.n + excluded.n"
        );
        assert_eq!(
            Dialect::Mysql.upsert(into, "k", "n = t.n + excluded.n, m = excluded.m"),
            "INSERT INTO t (k, n) VALUES ($1, $2) ON DUPLICATE KEY UPDATE n = t.n + VALUES(n), m = VALUES(m)"
        );
    }

    #[test]
    fn a_lost_connection_is_retried_and_an_exhausted_pool_is_not() {
        let refused = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(classify(&refused), Failure::Unavailable);
        assert!(retryable(&refused));
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Failure::Unavailable);
        assert!(!retryable(&sqlx::Error::PoolTimedOut));
        assert_eq!(classify(&sqlx::Error::RowNotFound), Failure::Permanent);
    }
}
