use berth_oci::Digest;
use bytes::Bytes;

use super::*;
use crate::content::behaviour::{self, once};

fn s3_config(
    bucket: &berth_testkit::services::S3Bucket,
    secret: &std::path::Path,
) -> ObjectStoreConfig {
    std::fs::write(secret, &bucket.secret_access_key).unwrap();
    ObjectStoreConfig::S3(S3Config {
        bucket: bucket.bucket.clone(),
        endpoint: Some(bucket.endpoint.clone()),
        region: bucket.region.clone(),
        path_style: true,
        access_key_id: Some(bucket.access_key_id.clone()),
        secret_access_key_file: Some(secret.to_owned()),
        ca_file: None,
        prefix: bucket.prefix.clone(),
    })
}

/// Two stores over the same bucket, as two registry instances are.
async fn s3_pair() -> (
    ObjectContentStore,
    ObjectContentStore,
    berth_testkit::services::S3Bucket,
) {
    let bucket = berth_testkit::services::s3_bucket();
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(&bucket, &dir.path().join("secret"));
    let a = ObjectContentStore::open(&config).await.unwrap();
    let b = ObjectContentStore::open(&config).await.unwrap();
    (a, b, bucket)
}

#[tokio::test]
async fn s3_passes_the_content_behaviour_suite() {
    let (store, _, _bucket) = s3_pair().await;
    behaviour::run_all(&store).await;
}

#[tokio::test]
async fn s3_uploads_move_between_instances() {
    let (a, b, _bucket) = s3_pair().await;
    uploads_move_between_instances(&a, &b).await;
}

#[tokio::test]
async fn azure_passes_the_content_behaviour_suite() {
    let container = berth_testkit::services::azure_container();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, &container.access_key).unwrap();
    let config = ObjectStoreConfig::Azure(AzureConfig {
        account: container.account.clone(),
        container: container.container.clone(),
        access_key_file: Some(key),
        endpoint: Some(container.endpoint.clone()),
        ca_file: None,
        prefix: String::new(),
    });
    let a = ObjectContentStore::open(&config).await.unwrap();
    let b = ObjectContentStore::open(&config).await.unwrap();
    behaviour::run_all(&a).await;
    uploads_move_between_instances(&a, &b).await;
}

#[tokio::test]
async fn webdav_passes_the_content_behaviour_suite() {
    let dav = berth_testkit::services::webdav();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, &dav.password).unwrap();
    let config = ObjectStoreConfig::Webdav(WebDavConfig {
        url: dav.url.clone(),
        username: Some(dav.username.clone()),
        password_file: Some(password),
        ca_file: None,
    });
    let a = ObjectContentStore::open(&config).await.unwrap();
    let b = ObjectContentStore::open(&config).await.unwrap();
    behaviour::run_all(&a).await;
    uploads_move_between_instances(&a, &b).await;
}

/// A session whose `PATCH`es and `PUT` reach different instances commits the verified bytes; a
/// wrong digest leaves nothing, whichever instance is asked.
async fn uploads_move_between_instances(a: &ObjectContentStore, b: &ObjectContentStore) {
    let first = Bytes::from(vec![1u8; 300_000]);
    let second = Bytes::from(vec![2u8; 5_000]);
    let whole: Vec<u8> = [&first[..], &second[..]].concat();
    let digest = Digest::sha256_of(&whole);

    // Bytes arrive at a, then at b, then b commits: b never saw the first part.
    let id = UploadId::new();
    a.create_upload(id).await.unwrap();
    assert_eq!(b.upload_size(id).await.unwrap(), 0);
    a.append_upload(id, Some(0), once(first.clone()))
        .await
        .unwrap();
    assert_eq!(b.upload_size(id).await.unwrap(), first.len() as u64);
    assert!(matches!(
        b.append_upload(id, Some(1), once(second.clone())).await,
        Err(ContentError::OffsetMismatch {
            actual: 300_000,
            ..
        })
    ));
    b.append_upload(id, Some(first.len() as u64), once(second.clone()))
        .await
        .unwrap();
    assert_eq!(
        b.commit_upload(id, &digest).await.unwrap(),
        whole.len() as u64
    );
    assert_eq!(a.read_all(&digest).await.unwrap(), whole);
    assert!(matches!(
        a.upload_size(id).await,
        Err(ContentError::UploadUnknown)
    ));

    // One PATCH at a, the PUT at b: the digest a wrote into the state verifies it.
    let single = Bytes::from(vec![3u8; 70_000]);
    let single_digest = Digest::sha256_of(&single);
    let id = UploadId::new();
    a.create_upload(id).await.unwrap();
    a.append_upload(id, Some(0), once(single.clone()))
        .await
        .unwrap();
    assert_eq!(
        b.commit_upload(id, &single_digest).await.unwrap(),
        single.len() as u64
    );
    assert_eq!(b.read_all(&single_digest).await.unwrap(), single);

    // A wrong digest at the other instance: nothing visible, the session gone everywhere.
    let id = UploadId::new();
    b.create_upload(id).await.unwrap();
    b.append_upload(
        id,
        Some(0),
        once(Bytes::from_static(b"not what was promised")),
    )
    .await
    .unwrap();
    let promised = Digest::sha256_of(b"promised");
    assert!(matches!(
        a.commit_upload(id, &promised).await,
        Err(ContentError::DigestMismatch { .. })
    ));
    assert_eq!(b.stat(&promised).await.unwrap(), None);
    assert!(matches!(
        b.upload_size(id).await,
        Err(ContentError::UploadUnknown)
    ));
}

/// Without a recorded digest (parts from several instances, so no one instance hashed them all)
/// the commit re-hashes what is stored, and a wrong digest is still caught.
#[tokio::test]
async fn a_commit_without_a_recorded_digest_rehashes_the_parts() {
    let (a, b, _bucket) = s3_pair().await;
    let data = Bytes::from(vec![9u8; 1 << 20]);
    let digest = Digest::sha256_of(&data);
    for (claimed, accepted) in [(Digest::sha256_of(b"other"), false), (digest.clone(), true)] {
        let id = UploadId::new();
        a.create_upload(id).await.unwrap();
        a.append_upload(id, Some(0), once(data.clone()))
            .await
            .unwrap();
        let mut state = a.state(id).await.unwrap();
        assert_eq!(state.digest.as_ref(), Some(&digest), "a saw every byte");
        state.digest = None;
        a.write_state(id, &state).await.unwrap();
        let committed = b.commit_upload(id, &claimed).await;
        if accepted {
            assert_eq!(committed.unwrap(), data.len() as u64);
            assert_eq!(a.read_all(&digest).await.unwrap(), data);
        } else {
            assert!(matches!(
                committed,
                Err(ContentError::DigestMismatch { .. })
            ));
            assert_eq!(a.stat(&claimed).await.unwrap(), None);
        }
    }
}

#[tokio::test]
async fn an_unreachable_store_is_an_error_that_asks_for_a_retry() {
    let config = ObjectStoreConfig::S3(S3Config {
        bucket: "nowhere".into(),
        endpoint: Some(format!("http://127.0.0.1:{}", berth_testkit::free_port())),
        region: "us-east-1".into(),
        path_style: true,
        access_key_id: None,
        secret_access_key_file: None,
        ca_file: None,
        prefix: String::new(),
    });
    let err = match ObjectContentStore::open(&config).await {
        Ok(_) => panic!("nothing listens there"),
        Err(err) => err,
    };
    assert!(matches!(err, ContentError::Store(_)), "{err:?}");
    let response =
        axum::response::IntoResponse::into_response(crate::error::RegistryError::Content(err));
    assert_eq!(response.status(), 503);
}

#[test]
fn credentials_never_reach_debug_output() {
    let config = ObjectStoreConfig::S3(S3Config {
        bucket: "b".into(),
        endpoint: None,
        region: "r".into(),
        path_style: false,
        access_key_id: Some("AKIAEXAMPLEKEYID".into()),
        secret_access_key_file: Some("/secret/path".into()),
        ca_file: None,
        prefix: String::new(),
    });
    let printed = format!("{config:?}");
    assert!(!printed.contains("AKIAEXAMPLEKEYID"), "{printed}");
    let parsed: crate::config::StorageConfig = serde_norway::from_str(
        "content:\n  webdav:\n    url: https://blobstore.example:4443/admin/berth\n    username: blobstore-user\n    password_file: /p\n",
    )
    .unwrap();
    assert!(matches!(parsed.content, Some(ObjectStoreConfig::Webdav(_))));
}
