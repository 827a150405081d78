//! Configuration: YAML file, then environment overrides, validated once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::AuthConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to serve the API on.
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    pub tls: Option<TlsConfig>,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub limits: Limits,
    /// Who may do what; open to everyone unless set.
    pub auth: AuthConfig,
    pub gc: GcConfig,
    pub retention: crate::retention::RetentionConfig,
    /// Byte quotas per repository prefix; none by default.
    pub quotas: Vec<crate::quota::Quota>,
    /// Upstream registries mirrored under local prefixes (the pull-through cache); none by
    /// default.
    pub proxy: Vec<crate::proxy::UpstreamConfig>,
}

/// Garbage collection: what is deleted, and how often the server collects on its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Seconds between collections the server runs; 0 for none (`berth-registry gc` still works).
    pub interval_seconds: u64,
    /// A blob no manifest references is kept this many seconds after it was last pushed or
    /// mounted, so a client that pushed its layers has time to push the manifest naming them.
    pub grace_seconds: u64,
    /// Repository prefixes (`*` for all) whose untagged manifests are deleted once older than the
    /// grace period; none by default.
    pub untagged: Vec<String>,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval_seconds: 3600,
            grace_seconds: 7200,
            untagged: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory holding blobs and uploads (unless `content` names an object store), the metadata
    /// database and the maintenance socket.
    pub root: PathBuf,
    /// Blobs and uploads on an object store (`s3`, `azure`, `gcs` or `webdav`) instead of under
    /// `root`.
    #[serde(with = "serde_norway::with::singleton_map")]
    pub content: Option<crate::content::ObjectStoreConfig>,
    /// Seconds a signed blob URL stays valid; when set, blob `GET`s redirect to the object store
    /// (S3, Azure, GCS) so the bytes do not flow through the registry. Off (0) by default.
    pub redirect_seconds: u64,
    /// How much of the blobs read from the object store this instance keeps a copy of under
    /// `root/blob-cache` (least recently used evicted first, emptied at every start), so repeated
    /// pulls through it skip the store: bytes, or with a unit (`10GiB`). Off unless set.
    pub blob_cache: Option<crate::quota::ByteSize>,
    /// A shared PostgreSQL or MySQL database for the metadata instead of SQLite under `root`.
    pub metadata: Option<crate::metadata::MetadataConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `warn,berth_registry=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest manifest accepted; larger pushes get 413.
    pub max_manifest_bytes: usize,
    /// Most entries in one page of a tag or catalog listing.
    pub max_page_entries: u32,
    /// Memory for caching manifest bytes.
    pub manifest_cache_bytes: u64,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace_seconds: u64,
    /// An upload session whose data has not changed for this long is abandoned and purged.
    pub upload_max_idle_seconds: u64,
    /// A request head must arrive whole within this time: from the connection opening for the
    /// first request, from its first byte for the others.
    pub header_read_timeout_seconds: u64,
    /// A TLS handshake must be done within this time of the connection opening.
    pub tls_handshake_timeout_seconds: u64,
    /// A connection with no request in flight and no byte moving either way is closed after this.
    pub idle_timeout_seconds: u64,
    /// A request body that delivers nothing for this long is cut; an upload keeps the whole pieces
    /// that arrived and can be resumed.
    pub body_timeout_seconds: u64,
    /// Connections served at once; beyond it new ones are closed at once (and logged).
    pub max_connections: usize,
}

/// An HTTPS client for a service the configuration names (a JWKS document, Cloud Controller):
/// the system roots plus the PEM certificates in `ca_file`, and a deadline per request.
pub(crate) fn outbound_client(
    ca_file: Option<&Path>,
    timeout: std::time::Duration,
    what: &str,
) -> Result<reqwest::Client, ConfigError> {
    outbound_client_builder(ca_file)?
        .timeout(timeout)
        .build()
        .map_err(|e| ConfigError::Invalid(format!("{what} client: {e}")))
}

/// A client builder trusting the system's roots and, if given, the PEM bundle `ca_file`.
pub(crate) fn outbound_client_builder(
    ca_file: Option<&Path>,
) -> Result<reqwest::ClientBuilder, ConfigError> {
    let mut client = reqwest::Client::builder();
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|source| ConfigError::Read {
            path: ca.into(),
            source,
        })?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| ConfigError::Invalid(format!("{}: {e}", ca.display())))?
        {
            client = client.add_root_certificate(cert);
        }
    }
    Ok(client)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            tls: None,
            storage: StorageConfig::default(),
            log: LogConfig::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            gc: GcConfig::default(),
            retention: Default::default(),
            quotas: Vec::new(),
            proxy: Vec::new(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            root: PathBuf::from("data"),
            content: None,
            redirect_seconds: 0,
            blob_cache: None,
            metadata: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 4 << 20,
            max_page_entries: 10_000,
            manifest_cache_bytes: 64 << 20,
            shutdown_grace_seconds: 30,
            upload_max_idle_seconds: 24 * 60 * 60,
            header_read_timeout_seconds: 30,
            tls_handshake_timeout_seconds: 10,
            idle_timeout_seconds: 90,
            body_timeout_seconds: 60,
            max_connections: 8192,
        }
    }
}

impl Config {
    /// Reads `file` (or starts from defaults), applies `BERTH_*` overrides from the process
    /// environment and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, |name| std::env::var(name).ok())
    }

    fn load_with_env(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                if text.trim().is_empty() {
                    Config::default()
                } else {
                    serde_norway::from_str(&text).map_err(|source| ConfigError::Parse {
                        path: path.into(),
                        source,
                    })?
                }
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(listen) = env("BERTH_LISTEN") {
            self.listen = listen.parse().map_err(|e| ConfigError::Env {
                name: "BERTH_LISTEN",
                message: format!("{listen:?}: {e}"),
            })?;
        }
        if let Some(root) = env("BERTH_STORAGE_ROOT") {
            self.storage.root = root.into();
        }
        if let Some(format) = env("BERTH_LOG_FORMAT") {
            self.log.format = match format.as_str() {
                "plain" => LogFormat::Plain,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "BERTH_LOG_FORMAT",
                        message: "must be plain or json".into(),
                    });
                }
            };
        }
        if let Some(level) = env("BERTH_LOG") {
            self.log.level = level;
        }
        match (env("BERTH_TLS_CERTIFICATE"), env("BERTH_TLS_PRIVATE_KEY")) {
            (Some(certificate), Some(private_key)) => {
                self.tls = Some(TlsConfig {
                    certificate: certificate.into(),
                    private_key: private_key.into(),
                });
            }
            (None, None) => {}
            _ => {
                return Err(ConfigError::Env {
                    name: "BERTH_TLS_CERTIFICATE",
                    message: "set together with BERTH_TLS_PRIVATE_KEY".into(),
                });
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        if limits.max_manifest_bytes == 0
            || limits.max_page_entries == 0
            || limits.upload_max_idle_seconds == 0
            || limits.header_read_timeout_seconds == 0
            || limits.tls_handshake_timeout_seconds == 0
            || limits.idle_timeout_seconds == 0
            || limits.body_timeout_seconds == 0
            || limits.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "limits must be greater than zero".into(),
            ));
        }
        for prefix in &self.gc.untagged {
            if prefix != "*" && prefix.parse::<berth_oci::RepoName>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "gc.untagged {prefix:?}: expected * or a repository name prefix"
                )));
            }
        }
        self.retention.check()?;
        crate::quota::validate(&self.quotas).map_err(ConfigError::Invalid)?;
        // Builds the clients, so an unreadable password or CA file fails the check too.
        crate::proxy::Proxy::new(&self.proxy)?;
        if self.storage.root.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "storage.root must not be empty".into(),
            ));
        }
        if self.storage.redirect_seconds > 0
            && !self
                .storage
                .content
                .as_ref()
                .is_some_and(|c| c.signs_urls())
        {
            return Err(ConfigError::Invalid(
                "storage.redirect_seconds needs storage.content on s3, azure or gcs, which sign URLs"
                    .into(),
            ));
        }
        if self.storage.blob_cache.is_some() {
            if self.storage.content.is_none() {
                return Err(ConfigError::Invalid(
                    "storage.blob_cache needs storage.content on an object store; blobs on \
                     the filesystem are served from their own files"
                        .into(),
                ));
            }
            if self.storage.redirect_seconds > 0 {
                return Err(ConfigError::Invalid(
                    "storage.blob_cache and storage.redirect_seconds exclude each other: \
                     redirected blob GETs are served by the store, never from the local copy"
                        .into(),
                ));
            }
        }
        if let Some(metadata) = &self.storage.metadata {
            metadata.validate().map_err(ConfigError::Invalid)?;
            if self.auth.mode == crate::auth::AuthMode::Token
                && self.auth.token.signing_key.is_none()
            {
                return Err(ConfigError::Invalid(
                    "storage.metadata is shared by several instances, and a token one issues must \
                     verify at the others: give them all the same auth.token.signing_key"
                        .into(),
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::Invalid(format!("log.level {:?}: {e}", self.log.level)))?;
        if let Some(tls) = &self.tls {
            crate::server::ServerTls::load(tls)?;
        } else if self.auth.instance_identity.is_some() {
            return Err(ConfigError::Invalid(
                "auth.instance_identity needs tls: client certificates come with the TLS handshake"
                    .into(),
            ));
        }
        crate::auth::Auth::check(&self.auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yml");
        std::fs::write(&path, text).unwrap();
        Config::load_with_env(Some(&path), |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_match_a_stock_registry() {
        let config = Config::load_with_env(None, |_| None).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(config.storage.root, PathBuf::from("data"));
        assert_eq!(config.limits.max_manifest_bytes, 4 << 20);
    }

    #[test]
    fn storage_metadata_names_a_shared_database_and_is_checked_at_load() {
        assert!(
            Config::load_with_env(None, |_| None)
                .unwrap()
                .storage
                .metadata
                .is_none(),
            "SQLite under storage.root unless set"
        );
        let config = load_text(
            "storage:\n  root: /srv/berth\n  metadata:\n    postgres:\n      host: db.internal\n      \
             database: berth\n      username: berth\n      password_file: /run/secrets/db\n      \
             tls: {mode: verify-full, ca_file: /etc/ssl/db-ca.pem}\n      pool_size: 20\n",
            &[],
        )
        .unwrap();
        let Some(crate::metadata::MetadataConfig::Postgres(database)) = config.storage.metadata
        else {
            panic!("{:?}", config.storage.metadata)
        };
        assert_eq!(
            (database.host.as_str(), database.pool_size),
            ("db.internal", 20)
        );
        let err = load_text(
            "storage:\n  metadata:\n    mysql: {host: db, database: berth, username: '', pool_size: 4}\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("storage.metadata.mysql.username"),
            "{err}"
        );
    }

    #[test]
    fn a_blob_cache_is_for_an_object_store_that_does_not_redirect() {
        let s3 = "storage:\n  blob_cache: 2GiB\n  content:\n    s3: {bucket: b, endpoint: 'http://s3:9000', \
                  access_key_id: k, secret_access_key_file: /run/s3}\n";
        let config = load_text(s3, &[]).unwrap();
        assert_eq!(
            config.storage.blob_cache,
            Some(crate::quota::ByteSize(2 << 30))
        );
        let err = load_text("storage:\n  blob_cache: 2GiB\n", &[]).unwrap_err();
        assert!(err.to_string().contains("needs storage.content"), "{err}");
        let err = load_text(&format!("{s3}  redirect_seconds: 60\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("exclude each other"), "{err}");
    }

    #[test]
    fn instances_sharing_a_database_need_one_signing_key() {
        let shared = "storage:\n  metadata:\n    postgres: {host: db, database: berth, username: berth}\n\
                      auth:\n  mode: token\n";
        let err = load_text(shared, &[]).unwrap_err();
        assert!(err.to_string().contains("auth.token.signing_key"), "{err}");
    }

    #[test]
    fn file_then_environment() {
        let config = load_text(
            "listen: 127.0.0.1:6000\nstorage:\n  root: /srv/berth\nlog:\n  format: json\n",
            &[("BERTH_LISTEN", "127.0.0.1:7000")],
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(config.storage.root, PathBuf::from("/srv/berth"));
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = load_text("listen: 127.0.0.1:6000\nstorage:\n  rot: /typo\n", &[]).unwrap_err();
        assert!(err.to_string().contains("unknown field `rot`"), "{err}");
        assert!(load_text("colour: blue\n", &[]).is_err());
    }

    #[test]
    fn quotas_are_checked() {
        let config = load_text(
            "quotas:\n  - {repositories: cache, max_bytes: 100GiB}\n  - {repositories: \"cache/*\", max_bytes: 2GiB}\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.quotas.len(), 2);
        for (yaml, expected) in [
            (
                "quotas:\n  - {repositories: cache/*/x, max_bytes: 1}\n",
                "cache/*/x",
            ),
            (
                "quotas:\n  - {repositories: cache, max_bytes: 0}\n",
                "above zero",
            ),
            (
                "quotas:\n  - {repositories: cache, max_bytes: 1}\n  - {repositories: cache, max_bytes: 2}\n",
                "more than once",
            ),
            (
                "quotas:\n  - {repositories: cache, max_bytes: 1TB}\n",
                "KiB",
            ),
            (
                "quotas:\n  - {repositories: cache, bytes: 1}\n",
                "unknown field",
            ),
        ] {
            let err = load_text(yaml, &[]).unwrap_err().to_string();
            assert!(err.contains(expected), "{yaml}: {err}");
        }
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(load_text("listen: nowhere\n", &[]).is_err());
        assert!(load_text("", &[("BERTH_LOG_FORMAT", "xml")]).is_err());
        assert!(load_text("", &[("BERTH_TLS_CERTIFICATE", "/cert.pem")]).is_err());
        let err = load_text(
            "tls:\n  certificate: /missing/cert.pem\n  private_key: /missing/key.pem\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("/missing/cert.pem"), "{err}");
        let err = load_text("retention:\n  cache:\n    keep_stagings: 0\n", &[]).unwrap_err();
        assert!(err.to_string().contains("keep_stagings"), "{err}");
    }
}
