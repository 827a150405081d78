//! `storage.metadata`: which shared database holds the metadata and how to reach it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::db::Dialect;

/// A shared metadata database; absent from the configuration, metadata stays in SQLite under
/// `storage.root`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Section")]
pub enum MetadataConfig {
    Postgres(DatabaseConfig),
    /// MySQL 8 or MariaDB.
    Mysql(DatabaseConfig),
}

/// `storage.metadata` as written: a map with one key naming the database.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    postgres: Option<DatabaseConfig>,
    mysql: Option<DatabaseConfig>,
}

impl TryFrom<Section> for MetadataConfig {
    type Error = String;

    fn try_from(section: Section) -> Result<Self, Self::Error> {
        match (section.postgres, section.mysql) {
            (Some(database), None) => Ok(MetadataConfig::Postgres(database)),
            (None, Some(database)) => Ok(MetadataConfig::Mysql(database)),
            _ => Err("storage.metadata names exactly one of postgres or mysql".into()),
        }
    }
}

/// Where the database is and how to connect to it. The password is read from a file, so that
/// it is never part of the configuration (nor of anything that prints it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub host: String,
    /// 5432 for PostgreSQL, 3306 for MySQL unless set.
    #[serde(default)]
    pub port: Option<u16>,
    pub database: String,
    pub username: String,
    /// A file holding the password (one trailing newline is ignored); none to connect without.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: DatabaseTls,
    /// Connections each instance keeps at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Longest a statement (or its wait for a lock) may run before the database cancels it.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_seconds: u64,
    /// Longest a request waits for a connection while the database is unreachable before it
    /// fails with 503.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: u64,
}

fn default_pool_size() -> u32 {
    10
}

fn default_statement_timeout() -> u64 {
    30
}

fn default_connect_timeout() -> u64 {
    5
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseTls {
    pub mode: TlsMode,
    /// CA certificates (PEM) the server's certificate must chain to, for `verify-full`; the
    /// webpki roots if unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// Encrypted, the server's certificate not checked.
    Require,
    /// Encrypted, the certificate checked against the CA and the host name.
    VerifyFull,
}

impl MetadataConfig {
    pub(super) fn dialect(&self) -> Dialect {
        match self {
            MetadataConfig::Postgres(_) => Dialect::Postgres,
            MetadataConfig::Mysql(_) => Dialect::Mysql,
        }
    }

    pub(super) fn database(&self) -> &DatabaseConfig {
        match self {
            MetadataConfig::Postgres(database) | MetadataConfig::Mysql(database) => database,
        }
    }

    fn key(&self) -> &'static str {
        match self {
            MetadataConfig::Postgres(_) => "storage.metadata.postgres",
            MetadataConfig::Mysql(_) => "storage.metadata.mysql",
        }
    }

    /// The database for messages: engine, name, host and port (never the user or password).
    pub fn describe(&self) -> String {
        let database = self.database();
        let (engine, port) = match self.dialect() {
            Dialect::Postgres => ("PostgreSQL", 5432),
            Dialect::Mysql => ("MySQL", 3306),
        };
        format!(
            "{engine} database {} on {}:{}",
            database.database,
            database.host,
            database.port.unwrap_or(port)
        )
    }

    /// Refuses settings no connection could be made with, naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let (key, database) = (self.key(), self.database());
        for (field, value) in [
            ("host", &database.host),
            ("database", &database.database),
            ("username", &database.username),
        ] {
            if value.trim().is_empty() {
                return Err(format!("{key}.{field} must not be empty"));
            }
        }
        if database.port == Some(0) {
            return Err(format!("{key}.port must not be 0"));
        }
        if database.pool_size == 0 {
            return Err(format!("{key}.pool_size must be at least 1"));
        }
        if database.statement_timeout_seconds == 0 || database.connect_timeout_seconds == 0 {
            return Err(format!(
                "{key}.statement_timeout_seconds and connect_timeout_seconds must be greater than zero"
            ));
        }
        if database.tls.ca_file.is_some() && database.tls.mode != TlsMode::VerifyFull {
            return Err(format!(
                "{key}.tls.ca_file is used only with tls.mode verify-full"
            ));
        }
        Ok(())
    }

    /// The connection URL, with the password read from its file.
    pub(super) fn url(&self) -> Result<url::Url, String> {
        let (key, database) = (self.key(), self.database());
        let (scheme, port) = match self.dialect() {
            Dialect::Postgres => ("postgres", 5432),
            Dialect::Mysql => ("mysql", 3306),
        };
        let mut url =
            url::Url::parse(&format!("{scheme}://localhost")).map_err(|e| format!("{key}: {e}"))?;
        url.set_host(Some(&database.host))
            .map_err(|e| format!("{key}.host {:?}: {e}", database.host))?;
        let _ = url.set_port(Some(database.port.unwrap_or(port)));
        url.set_path(&database.database);
        let _ = url.set_username(&database.username);
        if let Some(file) = &database.password_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("{key}.password_file {}: {e}", file.display()))?;
            let password = text.strip_suffix('\n').unwrap_or(&text);
            let password = password.strip_suffix('\r').unwrap_or(password);
            let _ = url.set_password(Some(password));
        }
        let mode = database.tls.mode;
        {
            let mut query = url.query_pairs_mut();
            match self.dialect() {
                Dialect::Postgres => {
                    query.append_pair(
                        "sslmode",
                        match mode {
                            TlsMode::Disable => "disable",
                            TlsMode::Require => "require",
                            TlsMode::VerifyFull => "verify-full",
                        },
                    );
                    if let Some(ca) = &database.tls.ca_file {
                        query.append_pair("sslrootcert", &ca.to_string_lossy());
                    }
                    query.append_pair("application_name", "berth-registry");
                }
                Dialect::Mysql => {
                    query.append_pair(
                        "ssl-mode",
                        match mode {
                            TlsMode::Disable => "DISABLED",
                            TlsMode::Require => "REQUIRED",
                            TlsMode::VerifyFull => "VERIFY_IDENTITY",
                        },
                    );
                    if let Some(ca) = &database.tls.ca_file {
                        query.append_pair("ssl-ca", &ca.to_string_lossy());
                    }
                    query.append_pair("charset", "utf8mb4");
                }
            }
        }
        if let Some(ca) = &database.tls.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            return Err(format!("{key}.tls.ca_file {}: {e}", ca.display()));
        }
        Ok(url)
    }

    pub(super) fn statement_timeout(&self) -> Duration {
        Duration::from_secs(self.database().statement_timeout_seconds)
    }

    pub(super) fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.database().connect_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> MetadataConfig {
        serde_norway::from_str(text).unwrap()
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = parse("postgres: {host: db, database: berth, username: berth}");
        assert_eq!(config.validate(), Ok(()));
        let database = config.database();
        assert_eq!(
            (database.pool_size, database.statement_timeout_seconds),
            (10, 30)
        );
        assert_eq!(database.tls.mode, TlsMode::Disable);
        let url = config.url().unwrap();
        assert_eq!(
            url.as_str(),
            "postgres://berth@db:5432/berth?sslmode=disable&application_name=berth-registry"
        );
        assert_eq!(config.describe(), "PostgreSQL database berth on db:5432");
    }

    #[test]
    fn the_password_comes_from_its_file_and_never_from_debug() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "p@ss/word:1\n").unwrap();
        let config = parse(&format!(
            "mysql: {{host: db, port: 3307, database: berth, username: berth, password_file: {}, \
             tls: {{mode: verify-full, ca_file: {}}}}}",
            file.display(),
            file.display()
        ));
        assert_eq!(config.validate(), Ok(()));
        let url = config.url().unwrap();
        assert_eq!(url.password(), Some("p%40ss%2Fword%3A1"));
        assert!(url.as_str().contains("ssl-mode=VERIFY_IDENTITY"), "{url}");
        assert!(!format!("{config:?}").contains("p@ss"));
    }

    #[test]
    fn validation_names_the_offending_key() {
        let cases = [
            (
                "postgres: {host: '', database: b, username: u}",
                "storage.metadata.postgres.host",
            ),
            (
                "mysql: {host: h, database: b, username: u, pool_size: 0}",
                "storage.metadata.mysql.pool_size",
            ),
            (
                "postgres: {host: h, database: b, username: u, statement_timeout_seconds: 0}",
                "statement_timeout_seconds",
            ),
            (
                "postgres: {host: h, database: b, username: u, tls: {mode: require, ca_file: /ca.pem}}",
                "tls.ca_file",
            ),
            (
                "postgres: {host: h, database: b, username: u, port: 0}",
                "port",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).validate().unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert!(serde_norway::from_str::<MetadataConfig>("sqlite: {}").is_err());
        let both = "postgres: {host: h, database: b, username: u}\nmysql: {host: h, database: b, username: u}";
        let err = serde_norway::from_str::<MetadataConfig>(both).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
        assert!(
            serde_norway::from_str::<MetadataConfig>(
                "postgres: {host: h, database: b, username: u, password: x}"
            )
            .is_err(),
            "a password in the configuration itself is refused"
        );
    }

    #[test]
    fn an_unreadable_password_file_is_named() {
        let config = parse(
            "postgres: {host: h, database: b, username: u, password_file: /nonexistent/password}",
        );
        let err = config.url().unwrap_err();
        assert!(err.contains("password_file /nonexistent/password"), "{err}");
    }
}
