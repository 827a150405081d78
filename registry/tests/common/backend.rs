//! The backends the registries of a test run use, so that the same suites check each: content on
//! the filesystem under their storage root or, with `BERTH_E2E_CONTENT=s3`, a fresh S3 bucket each
//! (SeaweedFS); metadata in SQLite or, with `BERTH_E2E_METADATA=postgres|mysql`, a fresh database
//! each; all from the test services. A test looking at what is stored asks here, never at paths.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use object_store::ObjectStore;

pub enum Content {
    Filesystem,
    S3 {
        bucket: berth_testkit::services::S3Bucket,
        secret_file: PathBuf,
    },
}

impl Content {
    /// The backend `BERTH_E2E_CONTENT` names, set up for one registry whose scratch directory is
    /// `scratch`.
    pub fn from_env(scratch: &Path) -> Content {
        match std::env::var("BERTH_E2E_CONTENT").as_deref() {
            Err(_) | Ok("") | Ok("filesystem") => Content::Filesystem,
            Ok("s3") => Content::s3(scratch),
            Ok(other) => panic!("BERTH_E2E_CONTENT={other}: expected filesystem or s3"),
        }
    }

    /// A fresh S3 bucket of the test services, its secret written into `scratch`.
    pub fn s3(scratch: &Path) -> Content {
        let bucket = berth_testkit::services::s3_bucket();
        let secret_file = scratch.join("s3-secret");
        std::fs::write(&secret_file, &bucket.secret_access_key).expect("write the S3 secret");
        Content::S3 {
            bucket,
            secret_file,
        }
    }

    /// The `storage.content` section naming this backend; none for the filesystem.
    pub fn section(&self) -> Option<serde_norway::Value> {
        let Content::S3 {
            bucket,
            secret_file,
        } = self
        else {
            return None;
        };
        let section = serde_json::json!({
            "s3": {
                "bucket": bucket.bucket,
                "endpoint": bucket.endpoint,
                "region": bucket.region,
                "path_style": true,
                "prefix": bucket.prefix,
                "access_key_id": bucket.access_key_id,
                "secret_access_key_file": secret_file,
            }
        });
        Some(serde_norway::to_value(section).expect("a YAML value"))
    }

    fn store(
        &self,
    ) -> Option<(
        object_store::aws::AmazonS3,
        &berth_testkit::services::S3Bucket,
    )> {
        let Content::S3 { bucket, .. } = self else {
            return None;
        };
        Some((
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(&bucket.endpoint)
                .with_allow_http(true)
                .with_region(&bucket.region)
                .with_bucket_name(&bucket.bucket)
                .with_access_key_id(&bucket.access_key_id)
                .with_secret_access_key(&bucket.secret_access_key)
                .build()
                .expect("an S3 client for the test bucket"),
            bucket,
        ))
    }

    /// Every file stored under `dir` (`blobs`, `uploads`) of the registry with storage root
    /// `root`, relative to it: files on the filesystem, object keys on S3.
    pub async fn stored(&self, root: &Path, dir: &str) -> BTreeSet<PathBuf> {
        match self.store() {
            None => {
                let dir = root.join(dir);
                tree(&dir)
                    .into_iter()
                    .filter(|path| dir.join(path).is_file())
                    .collect()
            }
            Some((store, bucket)) => {
                let prefix = object_store::path::Path::from(format!("{}/{dir}", bucket.prefix));
                let objects: Vec<_> = store
                    .list(Some(&prefix))
                    .try_collect()
                    .await
                    .expect("list the test bucket");
                objects
                    .into_iter()
                    .map(|meta| {
                        let key = meta.location.to_string();
                        let below = format!("{}/{dir}/", bucket.prefix);
                        PathBuf::from(key.strip_prefix(&below).unwrap_or(&key))
                    })
                    .collect()
            }
        }
    }
}

/// Every file and directory below `dir`, relative to it.
pub fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut paths = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            paths.insert(path.strip_prefix(dir).expect("below dir").to_path_buf());
        }
    }
    paths
}

/// A database of a shared PostgreSQL or MariaDB server holding a registry's metadata: with
/// `BERTH_E2E_METADATA=postgres` (or `mysql`) every registry a test starts keeps its metadata in a
/// fresh one instead of SQLite, so that the same tests check that backend.
pub struct SharedMetadata {
    /// The `storage.metadata` section naming it.
    section: serde_norway::Value,
    /// `postgres://` or `mysql://` with user, password, address and database.
    url: reqwest::Url,
    /// Dropping it drops the database.
    _database: Box<dyn std::any::Any + Send + Sync>,
}

impl SharedMetadata {
    /// The database `BERTH_E2E_METADATA` names, if any, its password written into `dir`.
    pub fn from_env(dir: &Path) -> Option<SharedMetadata> {
        match std::env::var("BERTH_E2E_METADATA").as_deref() {
            Err(_) | Ok("") | Ok("sqlite") => None,
            Ok(kind) => Some(SharedMetadata::new(kind, dir)),
        }
    }

    /// A fresh database of the `kind` (`postgres` or `mysql`) test server.
    pub fn new(kind: &str, dir: &Path) -> SharedMetadata {
        let (url, database) = match kind {
            "postgres" => {
                let database = berth_testkit::services::postgres_database();
                (
                    database.url.clone(),
                    Box::new(database) as Box<dyn std::any::Any + Send + Sync>,
                )
            }
            "mysql" => {
                let database = berth_testkit::services::mysql_database();
                (
                    database.url.clone(),
                    Box::new(database) as Box<dyn std::any::Any + Send + Sync>,
                )
            }
            other => panic!("BERTH_E2E_METADATA={other}: expected sqlite, postgres or mysql"),
        };
        let url = reqwest::Url::parse(&url).expect("a database URL");
        let password_file = dir.join("database-password");
        std::fs::write(&password_file, url.password().unwrap_or_default())
            .expect("write the database password");
        let section = serde_norway::from_str(&format!(
            "{kind}: {{host: {}, port: {}, database: {}, username: {}, password_file: {}}}",
            url.host_str().expect("a database host"),
            url.port().expect("a database port"),
            url.path().trim_start_matches('/'),
            url.username(),
            password_file.display()
        ))
        .expect("a storage.metadata section");
        SharedMetadata {
            section,
            url,
            _database: database,
        }
    }

    /// The rows `sql` answers, each column as text, read with the server's own client.
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        let url = &self.url;
        let password = url.password().unwrap_or_default();
        let database = url.path().trim_start_matches('/');
        let host = url.host_str().expect("a database host");
        let port = url.port().expect("a database port").to_string();
        let mut command = if url.scheme() == "postgres" {
            let mut command = std::process::Command::new(berth_testkit::require_tool("psql"));
            command.env("PGPASSWORD", password).args([
                "-X",
                "-A",
                "-t",
                "-F",
                "\t",
                "-h",
                host,
                "-p",
                &port,
                "-U",
                url.username(),
                "-d",
                database,
                "-c",
                sql,
            ]);
            command
        } else {
            let mut command = std::process::Command::new(berth_testkit::require_tool("mariadb"));
            command.env("MYSQL_PWD", password).args([
                "--no-defaults",
                "--protocol=TCP",
                "-N",
                "-B",
                "-h",
                host,
                "-P",
                &port,
                "-u",
                url.username(),
                "-D",
                database,
                "-e",
                sql,
            ]);
            command
        };
        berth_testkit::run(&mut command)
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| line.split('\t').map(str::to_owned).collect())
            .collect()
    }

    /// The `storage.metadata` section naming this database.
    pub fn section(&self) -> &serde_norway::Value {
        &self.section
    }
}

/// `yaml` with `storage.<key>` set to `section`, unless the test's configuration sets it itself.
pub fn with_storage(yaml: &str, key: &str, section: &serde_norway::Value) -> String {
    let mut config: serde_norway::Value =
        serde_norway::from_str(yaml).expect("the test's configuration parses");
    if config.is_null() {
        config = serde_norway::Value::Mapping(Default::default());
    }
    let root = config.as_mapping_mut().expect("a configuration mapping");
    let storage = root
        .entry("storage".into())
        .or_insert_with(|| serde_norway::Value::Mapping(Default::default()));
    storage
        .as_mapping_mut()
        .expect("storage is a mapping")
        .entry(key.into())
        .or_insert_with(|| section.clone());
    serde_norway::to_string(&config).expect("serialise the configuration")
}
