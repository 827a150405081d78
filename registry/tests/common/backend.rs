//! The backends the registries of a test run use, so that the same suites check each: content on
//! the filesystem under their storage root or, with `BERTH_E2E_CONTENT=s3|azure|webdav`, a fresh
//! folder, container or directory each (SeaweedFS, Azurite, the nginx blobstore); metadata in
//! SQLite or, with `BERTH_E2E_METADATA=postgres|mysql`, a fresh database each; all from the test
//! services. A test looking at what is stored asks here, never at paths.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

pub enum Content {
    Filesystem,
    S3 {
        bucket: berth_testkit::services::S3Bucket,
        secret_file: PathBuf,
    },
    Azure {
        container: berth_testkit::services::AzureContainer,
        key_file: PathBuf,
    },
    WebDav {
        dav: berth_testkit::services::WebDav,
        password_file: PathBuf,
    },
}

impl Content {
    /// The backend `BERTH_E2E_CONTENT` names, set up for one registry whose scratch directory is
    /// `scratch`.
    pub fn from_env(scratch: &Path) -> Content {
        match std::env::var("BERTH_E2E_CONTENT").as_deref() {
            Err(_) | Ok("") | Ok("filesystem") => Content::Filesystem,
            Ok("s3") => Content::s3(scratch),
            Ok("azure") => {
                let container = berth_testkit::services::azure_container();
                let key_file = secret(scratch, "azure-key", &container.access_key);
                Content::Azure {
                    container,
                    key_file,
                }
            }
            Ok("webdav") => {
                let dav = berth_testkit::services::webdav();
                let password_file = secret(scratch, "webdav-password", &dav.password);
                Content::WebDav { dav, password_file }
            }
            Ok(other) => {
                panic!("BERTH_E2E_CONTENT={other}: expected filesystem, s3, azure or webdav")
            }
        }
    }

    /// A fresh S3 folder of the test services, its secret written into `scratch`.
    pub fn s3(scratch: &Path) -> Content {
        let bucket = berth_testkit::services::s3_bucket();
        let secret_file = secret(scratch, "s3-secret", &bucket.secret_access_key);
        Content::S3 {
            bucket,
            secret_file,
        }
    }

    /// The `storage.content` section naming this backend; none for the filesystem.
    pub fn section(&self) -> Option<serde_norway::Value> {
        let section = match self {
            Content::Filesystem => return None,
            Content::S3 {
                bucket,
                secret_file,
            } => serde_json::json!({"s3": {
                "bucket": bucket.bucket,
                "endpoint": bucket.endpoint,
                "region": bucket.region,
                "path_style": true,
                "prefix": bucket.prefix,
                "access_key_id": bucket.access_key_id,
                "secret_access_key_file": secret_file,
            }}),
            Content::Azure {
                container,
                key_file,
            } => serde_json::json!({"azure": {
                "account": container.account,
                "container": container.container,
                "endpoint": container.endpoint,
                "access_key_file": key_file,
            }}),
            Content::WebDav { dav, password_file } => serde_json::json!({"webdav": {
                "url": dav.url,
                "username": dav.username,
                "password_file": password_file,
            }}),
        };
        Some(serde_norway::to_value(section).expect("a YAML value"))
    }

    /// Every file stored under `dir` (`blobs`, `uploads`) of the registry with storage root
    /// `root`, relative to it: files on the filesystem, object names on an object store (listed
    /// here with the store's own listing, which the registry never uses).
    pub async fn stored(&self, root: &Path, dir: &str) -> BTreeSet<PathBuf> {
        let (names, below) = match self {
            Content::Filesystem => {
                let dir = root.join(dir);
                return tree(&dir)
                    .into_iter()
                    .filter(|path| dir.join(path).is_file())
                    .collect();
            }
            Content::S3 { bucket, .. } => {
                let (status, listing) = bucket.request("GET", None, b"");
                assert_eq!(status, 200, "listing the test folder: {listing}");
                (
                    elements(&listing, "Key"),
                    format!("{}/{dir}/", bucket.prefix),
                )
            }
            Content::Azure { container, .. } => {
                let (status, listing) = container.request("GET", None, b"");
                assert_eq!(status, 200, "listing the test container: {listing}");
                (elements(&listing, "Name"), format!("{dir}/"))
            }
            Content::WebDav { dav, .. } => {
                let start = reqwest::Url::parse(&dav.url)
                    .expect("a WebDAV URL")
                    .join(&format!("{dir}/"))
                    .expect("a folder URL");
                (
                    webdav_files(dav, start.clone()).await,
                    start.path().to_owned(),
                )
            }
        };
        names
            .into_iter()
            .filter_map(|name| name.strip_prefix(&below).map(PathBuf::from))
            .collect()
    }
}

fn secret(scratch: &Path, name: &str, value: &str) -> PathBuf {
    let file = scratch.join(name);
    std::fs::write(&file, value).expect("write a secret file");
    file
}

/// The text of every `<…tag>` element of an XML listing, namespace prefixes aside.
fn elements(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("{tag}>");
    xml.split('<')
        .filter_map(|piece| {
            let name_end = piece.find('>')?;
            let name = &piece[..=name_end];
            let local = name.rsplit(':').next().unwrap_or(name);
            (local == open && !name.starts_with('/')).then(|| piece[name_end + 1..].to_owned())
        })
        .collect()
}

/// The paths of every file below the folder `url`, walked one `PROPFIND` level at a time (the
/// test server allows no `Depth: infinity`).
async fn webdav_files(dav: &berth_testkit::services::WebDav, url: reqwest::Url) -> Vec<String> {
    let client = http_client();
    let propfind = reqwest::Method::from_bytes(b"PROPFIND").expect("a method name");
    let mut files = Vec::new();
    let mut pending = vec![url];
    while let Some(folder) = pending.pop() {
        let answer = client
            .request(propfind.clone(), folder.clone())
            .basic_auth(&dav.username, Some(&dav.password))
            .header("Depth", "1")
            .send()
            .await
            .expect("PROPFIND");
        if answer.status() == 404 {
            continue;
        }
        assert_eq!(answer.status(), 207, "PROPFIND {folder}");
        let listing = answer.text().await.expect("a PROPFIND answer");
        for href in elements(&listing, "href") {
            if href == folder.path() {
                continue;
            }
            if href.ends_with('/') {
                pending.push(folder.join(&href).expect("a folder URL"));
            } else {
                files.push(href);
            }
        }
    }
    files
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
        match std::env::var("BERTH_E2E_METADATA").ok()?.as_str() {
            "" | "sqlite" => None,
            kind => Some(SharedMetadata::new(kind, dir)),
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
        let mut command = if url.scheme() == "postgres" {
            let mut command = Command::new(require_tool("psql"));
            command.env("PGPASSWORD", password).args([
                "-X",
                "-A",
                "-t",
                "-F",
                "\t",
                "-h",
                url.host_str().expect("a database host"),
                "-p",
                &url.port().expect("a database port").to_string(),
                "-U",
                url.username(),
                "-d",
                database,
                "-c",
                sql,
            ]);
            command
        } else {
            let mut command = Command::new(require_tool("mariadb"));
            command.env("MYSQL_PWD", password).args([
                "--no-defaults",
                "--protocol=TCP",
                "-N",
                "-B",
                "-h",
                url.host_str().expect("a database host"),
                "-P",
                &url.port().expect("a database port").to_string(),
                "-u",
                url.username(),
                "-D",
                database,
                "-e",
                sql,
            ]);
            command
        };
        run(&mut command)
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
