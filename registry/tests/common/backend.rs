//! The content backend the registries of a test run use: the filesystem under their storage root,
//! or with `BERTH_E2E_CONTENT=s3` a fresh S3 bucket each (SeaweedFS, from the test services), so
//! the same API suite checks both. A test looking at what is stored asks here, never at paths.

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
            Ok("s3") => {
                let bucket = berth_testkit::services::s3_bucket();
                let secret_file = scratch.join("s3-secret");
                std::fs::write(&secret_file, &bucket.secret_access_key)
                    .expect("write the S3 secret");
                Content::S3 {
                    bucket,
                    secret_file,
                }
            }
            Ok(other) => panic!("BERTH_E2E_CONTENT={other}: expected filesystem or s3"),
        }
    }

    /// The configuration `yaml` with this backend's `storage.content` added, unless it names one.
    pub fn add_to(&self, yaml: &str) -> String {
        let Content::S3 {
            bucket,
            secret_file,
        } = self
        else {
            return yaml.to_owned();
        };
        let mut config: serde_norway::Value =
            serde_norway::from_str(yaml).expect("the test's configuration parses");
        if config.is_null() {
            config = serde_norway::Value::Mapping(Default::default());
        }
        let content = serde_norway::to_value(serde_json::json!({
            "s3": {
                "bucket": bucket.bucket,
                "endpoint": bucket.endpoint,
                "region": bucket.region,
                "path_style": true,
                "access_key_id": bucket.access_key_id,
                "secret_access_key_file": secret_file,
            }
        }))
        .expect("a YAML value");
        let root = config.as_mapping_mut().expect("a configuration mapping");
        let storage = root
            .entry("storage".into())
            .or_insert_with(|| serde_norway::Value::Mapping(Default::default()));
        storage
            .as_mapping_mut()
            .expect("storage is a mapping")
            .entry("content".into())
            .or_insert(content);
        serde_norway::to_string(&config).expect("serialise the configuration")
    }

    fn store(&self) -> Option<object_store::aws::AmazonS3> {
        let Content::S3 { bucket, .. } = self else {
            return None;
        };
        Some(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(&bucket.endpoint)
                .with_allow_http(true)
                .with_region(&bucket.region)
                .with_bucket_name(&bucket.bucket)
                .with_access_key_id(&bucket.access_key_id)
                .with_secret_access_key(&bucket.secret_access_key)
                .build()
                .expect("an S3 client for the test bucket"),
        )
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
            Some(store) => {
                let prefix = object_store::path::Path::from(dir);
                let objects: Vec<_> = store
                    .list(Some(&prefix))
                    .try_collect()
                    .await
                    .expect("list the test bucket");
                objects
                    .into_iter()
                    .map(|meta| {
                        let key = meta.location.to_string();
                        PathBuf::from(key.strip_prefix(&format!("{dir}/")).unwrap_or(&key))
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
