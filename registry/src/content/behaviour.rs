//! Behaviour every content store backend must show; each backend's tests call [`run_all`].

use berth_oci::Digest;
use bytes::Bytes;
use futures_util::{StreamExt, stream};

use super::{ByteStream, ContentError, ContentStore, UploadId};

pub(crate) fn once(bytes: Bytes) -> ByteStream {
    Box::pin(stream::iter([Ok(bytes)]))
}

async fn collect(mut stream: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

pub(crate) async fn run_all(store: &dyn ContentStore) {
    chunked_upload_commits_verified_bytes(store).await;
    wrong_digest_leaves_nothing_visible(store).await;
    out_of_order_append_is_refused(store).await;
    interrupted_body_keeps_what_arrived(store).await;
    put_verifies_and_is_idempotent(store).await;
    the_empty_blob_is_a_blob(store).await;
    ranges_are_served_exactly(store).await;
    deleted_upload_is_unknown(store).await;
    only_idle_uploads_are_purged(store).await;
    deleted_objects_are_gone_and_deleting_twice_is_fine(store).await;
}

async fn deleted_objects_are_gone_and_deleting_twice_is_fine(store: &dyn ContentStore) {
    let bytes = Bytes::from_static(b"collected");
    let digest = Digest::sha256_of(&bytes);
    store.put(&digest, bytes.clone()).await.unwrap();
    let other = Bytes::from_static(b"collected too");
    let other_digest = Digest::sha256_of(&other);
    store.put(&other_digest, other).await.unwrap();
    store
        .delete(&[digest.clone(), other_digest.clone()])
        .await
        .unwrap();
    assert_eq!(store.stat(&digest).await.unwrap(), None);
    assert_eq!(store.stat(&other_digest).await.unwrap(), None);
    assert!(matches!(
        store.read(&digest, 0..1).await,
        Err(ContentError::BlobUnknown)
    ));
    store.delete(std::slice::from_ref(&digest)).await.unwrap();
    // Written again after its deletion, it is whole again.
    store.put(&digest, bytes.clone()).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
}

async fn only_idle_uploads_are_purged(store: &dyn ContentStore) {
    use std::time::{Duration, SystemTime};
    let id = UploadId::new();
    store.create_upload(id).await.unwrap();
    store
        .append_upload(id, Some(0), once(Bytes::from_static(b"recent")))
        .await
        .unwrap();
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    assert!(!store.delete_idle_upload(id, an_hour_ago).await.unwrap());
    assert_eq!(
        store.upload_size(id).await.unwrap(),
        6,
        "an active upload is kept"
    );
    let later = SystemTime::now() + Duration::from_secs(1);
    assert!(store.delete_idle_upload(id, later).await.unwrap());
    assert!(matches!(
        store.upload_size(id).await,
        Err(ContentError::UploadUnknown)
    ));
    assert!(
        store.delete_idle_upload(id, later).await.unwrap(),
        "an upload already gone counts as purged"
    );
}

async fn chunked_upload_commits_verified_bytes(store: &dyn ContentStore) {
    let id = UploadId::new();
    store.create_upload(id).await.unwrap();
    let size = store
        .append_upload(id, Some(0), once(Bytes::from_static(b"hello ")))
        .await
        .unwrap();
    assert_eq!(size, 6);
    let size = store
        .append_upload(id, None, once(Bytes::from_static(b"world")))
        .await
        .unwrap();
    assert_eq!(size, 11);
    assert_eq!(store.upload_size(id).await.unwrap(), 11);
    let digest = Digest::sha256_of(b"hello world");
    assert_eq!(
        store.stat(&digest).await.unwrap(),
        None,
        "nothing is visible before commit"
    );
    assert_eq!(store.commit_upload(id, &digest).await.unwrap(), 11);
    assert_eq!(store.stat(&digest).await.unwrap(), Some(11));
    assert_eq!(
        store.read_all(&digest).await.unwrap(),
        Bytes::from_static(b"hello world")
    );
    assert!(matches!(
        store.upload_size(id).await,
        Err(ContentError::UploadUnknown)
    ));
}

async fn wrong_digest_leaves_nothing_visible(store: &dyn ContentStore) {
    let id = UploadId::new();
    store.create_upload(id).await.unwrap();
    store
        .append_upload(id, Some(0), once(Bytes::from_static(b"tampered")))
        .await
        .unwrap();
    let claimed = Digest::sha256_of(b"original");
    let err = store.commit_upload(id, &claimed).await.unwrap_err();
    assert!(
        matches!(err, ContentError::DigestMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(store.stat(&claimed).await.unwrap(), None);
    assert_eq!(
        store.stat(&Digest::sha256_of(b"tampered")).await.unwrap(),
        None
    );
}

async fn out_of_order_append_is_refused(store: &dyn ContentStore) {
    let id = UploadId::new();
    store.create_upload(id).await.unwrap();
    store
        .append_upload(id, Some(0), once(Bytes::from_static(b"abc")))
        .await
        .unwrap();
    let err = store
        .append_upload(id, Some(10), once(Bytes::from_static(b"x")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ContentError::OffsetMismatch {
                actual: 3,
                requested: 10
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        store.upload_size(id).await.unwrap(),
        3,
        "a refused chunk writes nothing"
    );
    store.delete_upload(id).await.unwrap();
}

async fn interrupted_body_keeps_what_arrived(store: &dyn ContentStore) {
    let id = UploadId::new();
    store.create_upload(id).await.unwrap();
    let body: ByteStream = Box::pin(stream::iter([
        Ok(Bytes::from_static(b"first")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ]));
    let err = store.append_upload(id, Some(0), body).await.unwrap_err();
    assert!(matches!(err, ContentError::BodyInterrupted(_)), "{err:?}");
    assert_eq!(store.upload_size(id).await.unwrap(), 5);
    store
        .append_upload(id, Some(5), once(Bytes::from_static(b" second")))
        .await
        .unwrap();
    let digest = Digest::sha256_of(b"first second");
    assert_eq!(store.commit_upload(id, &digest).await.unwrap(), 12);
}

async fn put_verifies_and_is_idempotent(store: &dyn ContentStore) {
    let bytes = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let digest = Digest::sha256_of(&bytes);
    store.put(&digest, bytes.clone()).await.unwrap();
    store.put(&digest, bytes.clone()).await.unwrap();
    assert_eq!(store.read_all(&digest).await.unwrap(), bytes);
    let wrong = Digest::sha256_of(b"other");
    assert!(matches!(
        store.put(&wrong, bytes).await,
        Err(ContentError::DigestMismatch { .. })
    ));
    assert_eq!(store.stat(&wrong).await.unwrap(), None);
}

async fn ranges_are_served_exactly(store: &dyn ContentStore) {
    let bytes = Bytes::from((0..=255u8).cycle().take(700_000).collect::<Vec<_>>());
    let digest = Digest::sha256_of(&bytes);
    store.put(&digest, bytes.clone()).await.unwrap();
    assert_eq!(
        collect(store.read(&digest, 0..700_000).await.unwrap()).await,
        bytes
    );
    assert_eq!(
        collect(store.read(&digest, 100..300_000).await.unwrap()).await,
        bytes[100..300_000]
    );
    let missing = Digest::sha256_of(b"missing");
    assert!(matches!(
        store.read(&missing, 0..1).await,
        Err(ContentError::BlobUnknown)
    ));
}

async fn deleted_upload_is_unknown(store: &dyn ContentStore) {
    let id = UploadId::new();
    store.create_upload(id).await.unwrap();
    store.delete_upload(id).await.unwrap();
    assert!(matches!(
        store.upload_size(id).await,
        Err(ContentError::UploadUnknown)
    ));
    let err = store
        .append_upload(id, None, once(Bytes::from_static(b"x")))
        .await
        .unwrap_err();
    assert!(matches!(err, ContentError::UploadUnknown), "{err:?}");
}

async fn the_empty_blob_is_a_blob(store: &dyn ContentStore) {
    let empty = Digest::sha256_of(b"");
    let id = UploadId::new();
    store.create_upload(id).await.unwrap();
    assert_eq!(store.commit_upload(id, &empty).await.unwrap(), 0);
    assert_eq!(store.stat(&empty).await.unwrap(), Some(0));
    assert!(store.read_all(&empty).await.unwrap().is_empty());
    store.delete(std::slice::from_ref(&empty)).await.unwrap();
    store.put(&empty, Bytes::new()).await.unwrap();
    assert_eq!(store.stat(&empty).await.unwrap(), Some(0));
}
