//! Behaviour every metadata store backend must show; each backend's tests call [`run_all`].

use berth_oci::{Digest, Reference, RepoName, Tag};

use super::{MetadataError, MetadataStore, NewManifest, PageRequest};
use crate::content::UploadId;

fn repo(name: &str) -> RepoName {
    name.parse().unwrap()
}

fn tag(name: &str) -> Tag {
    name.parse().unwrap()
}

/// A manifest record of `body` needing `blobs`, as a store is given one.
pub(crate) fn manifest(body: &[u8], blobs: Vec<Digest>) -> NewManifest {
    NewManifest {
        digest: Digest::sha256_of(body),
        media_type: berth_oci::media_type::OCI_MANIFEST.into(),
        size: body.len() as u64,
        artifact_type: None,
        subject: None,
        annotations: None,
        blobs,
        manifests: vec![],
    }
}

fn page(last: Option<&str>, limit: u32) -> PageRequest {
    PageRequest {
        last: last.map(str::to_owned),
        limit,
    }
}

pub(crate) async fn run_all(store: &dyn MetadataStore) {
    blobs_are_owned_per_repository(store).await;
    manifests_need_their_blobs_in_the_repository(store).await;
    tags_move_and_delete(store).await;
    listings_paginate_in_order(store).await;
    referrers_filter_by_artifact_type(store).await;
    uploads_remember_their_repository(store).await;
    completing_an_upload_ends_it_and_links_its_blob(store).await;
    uploads_completed_together_each_end_and_link(store).await;
}

async fn blobs_are_owned_per_repository(store: &dyn MetadataStore) {
    let digest = Digest::sha256_of(b"layer");
    let (a, b) = (repo("own/a"), repo("own/b"));
    store.link_blob(&a, &digest, 5).await.unwrap();
    assert_eq!(store.repository_blob(&a, &digest).await.unwrap(), Some(5));
    assert_eq!(
        store.repository_blob(&b, &digest).await.unwrap(),
        None,
        "b never received it"
    );
    assert_eq!(
        store.blob_owners(&digest, 10).await.unwrap(),
        vec![a.clone()]
    );
    store.link_blob(&b, &digest, 5).await.unwrap();
    assert_eq!(
        store.blob_owners(&digest, 10).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        store.blob_owners(&digest, 1).await.unwrap(),
        vec![a.clone()]
    );
    assert!(store.unlink_blob(&b, &digest).await.unwrap());
    store.link_blob(&a, &digest, 5).await.unwrap();
    assert!(store.unlink_blob(&a, &digest).await.unwrap());
    assert!(!store.unlink_blob(&a, &digest).await.unwrap());
    assert_eq!(store.repository_blob(&a, &digest).await.unwrap(), None);
    assert!(store.blob_owners(&digest, 10).await.unwrap().is_empty());
}

async fn manifests_need_their_blobs_in_the_repository(store: &dyn MetadataStore) {
    let r = repo("refs/app");
    let layer = Digest::sha256_of(b"refs layer");
    let body = b"manifest needing a layer";
    let needy = manifest(body, vec![layer.clone()]);
    assert_eq!(
        store.missing_reference(&r, &needy).await.unwrap(),
        Some(layer.clone()),
        "in a repository that does not exist yet"
    );
    let err = store
        .put_manifest(&r, &manifest(body, vec![layer.clone()]), Some(&tag("v1")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::MissingReference(ref d) if *d == layer),
        "{err:?}"
    );
    let by_tag = Reference::Tag(tag("v1"));
    assert_eq!(
        store.manifest(&r, &by_tag).await.unwrap(),
        None,
        "a refused manifest leaves no tag"
    );

    store.link_blob(&r, &layer, 10).await.unwrap();
    assert_eq!(store.missing_reference(&r, &needy).await.unwrap(), None);
    store
        .put_manifest(&r, &manifest(body, vec![layer]), Some(&tag("v1")))
        .await
        .unwrap();
    let found = store.manifest(&r, &by_tag).await.unwrap().unwrap();
    assert_eq!(found.digest, Digest::sha256_of(body));
    assert_eq!(found.size, body.len() as u64);
    let by_digest = Reference::Digest(found.digest.clone());
    assert_eq!(
        store.manifest(&r, &by_digest).await.unwrap(),
        Some(found.clone())
    );
    assert_eq!(
        store
            .manifest(&repo("refs/other"), &by_digest)
            .await
            .unwrap(),
        None
    );

    let mut index = manifest(b"an index", vec![]);
    index.manifests = vec![found.digest.clone()];
    store.put_manifest(&r, &index, None).await.unwrap();
    let mut dangling = manifest(b"a dangling index", vec![]);
    dangling.manifests = vec![Digest::sha256_of(b"nowhere")];
    assert_eq!(
        store.missing_reference(&r, &dangling).await.unwrap(),
        Some(Digest::sha256_of(b"nowhere"))
    );
    assert!(store.put_manifest(&r, &dangling, None).await.is_err());
}

async fn tags_move_and_delete(store: &dyn MetadataStore) {
    let r = repo("tags/app");
    let (one, two) = (manifest(b"one", vec![]), manifest(b"two", vec![]));
    store
        .put_manifest(&r, &one, Some(&tag("latest")))
        .await
        .unwrap();
    store
        .put_manifest(&r, &one, Some(&tag("stable")))
        .await
        .unwrap();
    store
        .put_manifest(&r, &two, Some(&tag("latest")))
        .await
        .unwrap();
    let latest = Reference::Tag(tag("latest"));
    assert_eq!(
        store.manifest(&r, &latest).await.unwrap().unwrap().digest,
        two.digest
    );

    assert!(store.delete_tag(&r, &tag("latest")).await.unwrap());
    assert_eq!(store.manifest(&r, &latest).await.unwrap(), None);
    assert!(
        store
            .manifest(&r, &Reference::Digest(two.digest.clone()))
            .await
            .unwrap()
            .is_some()
    );

    assert!(store.delete_manifest(&r, &one.digest).await.unwrap());
    assert_eq!(
        store
            .manifest(&r, &Reference::Tag(tag("stable")))
            .await
            .unwrap(),
        None,
        "its tags go with it"
    );
    assert!(!store.delete_manifest(&r, &one.digest).await.unwrap());
}

async fn listings_paginate_in_order(store: &dyn MetadataStore) {
    let r = repo("list/app");
    let m = manifest(b"listed", vec![]);
    for name in ["c", "a", "b", "d"] {
        store.put_manifest(&r, &m, Some(&tag(name))).await.unwrap();
    }
    let first = store.tags(&r, &page(None, 2)).await.unwrap().unwrap();
    assert_eq!(
        (first.entries.as_slice(), first.more),
        (&["a".to_owned(), "b".to_owned()][..], true)
    );
    let rest = store.tags(&r, &page(Some("b"), 10)).await.unwrap().unwrap();
    assert_eq!(
        (rest.entries.as_slice(), rest.more),
        (&["c".to_owned(), "d".to_owned()][..], false)
    );
    assert!(
        store
            .tags(&repo("list/unknown"), &page(None, 10))
            .await
            .unwrap()
            .is_none()
    );

    let all = store.repositories(&page(None, 1000)).await.unwrap();
    assert!(
        all.entries.windows(2).all(|w| w[0] < w[1]),
        "sorted: {:?}",
        all.entries
    );
    assert!(all.entries.contains(&"list/app".to_owned()));
    let after = store
        .repositories(&page(Some("list/app"), 1000))
        .await
        .unwrap();
    assert!(after.entries.iter().all(|n| n.as_str() > "list/app"));
}

async fn referrers_filter_by_artifact_type(store: &dyn MetadataStore) {
    let r = repo("referrers/app");
    let subject = manifest(b"subject", vec![]);
    store.put_manifest(&r, &subject, None).await.unwrap();
    for (body, kind) in [
        (&b"sig"[..], "application/vnd.example.sig"),
        (b"sbom", "application/spdx+json"),
    ] {
        let mut referrer = manifest(body, vec![]);
        referrer.subject = Some(subject.digest.clone());
        referrer.artifact_type = Some(kind.into());
        referrer.annotations = Some(r#"{"org.example":"yes"}"#.into());
        store.put_manifest(&r, &referrer, None).await.unwrap();
    }
    let all = store.referrers(&r, &subject.digest, None).await.unwrap();
    assert_eq!(all.len(), 2);
    let sboms = store
        .referrers(&r, &subject.digest, Some("application/spdx+json"))
        .await
        .unwrap();
    assert_eq!(sboms.len(), 1);
    assert_eq!(sboms[0].digest, Digest::sha256_of(b"sbom"));
    assert_eq!(sboms[0].annotations.as_ref().unwrap()["org.example"], "yes");
    assert!(
        store
            .referrers(&repo("referrers/other"), &subject.digest, None)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn uploads_remember_their_repository(store: &dyn MetadataStore) {
    let id = UploadId::new();
    let r = repo("uploads/app");
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
    store.create_upload(&r, id).await.unwrap();
    assert_eq!(store.upload_repository(id).await.unwrap(), Some(r));
    let listed = store.uploads().await.unwrap();
    let started = listed.iter().find(|(u, _)| *u == id).expect("listed").1;
    assert!(started >= before, "started {started:?}, before {before:?}");
    assert!(store.delete_upload(id).await.unwrap());
    assert!(
        !store.delete_upload(id).await.unwrap(),
        "it had ended already"
    );
    assert_eq!(store.upload_repository(id).await.unwrap(), None);
    assert!(!store.uploads().await.unwrap().iter().any(|(u, _)| *u == id));
}

async fn completing_an_upload_ends_it_and_links_its_blob(store: &dyn MetadataStore) {
    let id = UploadId::new();
    let r = repo("uploads/complete");
    let digest = Digest::sha256_of(b"completed");
    store.create_upload(&r, id).await.unwrap();
    assert!(store.complete_upload(id, &r, &digest, 9).await.unwrap());
    assert_eq!(store.upload_repository(id).await.unwrap(), None);
    assert!(!store.uploads().await.unwrap().iter().any(|(u, _)| *u == id));
    assert_eq!(store.repository_blob(&r, &digest).await.unwrap(), Some(9));
    assert_eq!(
        store
            .repository_blob(&repo("uploads/other"), &digest)
            .await
            .unwrap(),
        None
    );
    // A session purged meanwhile: the blob is still linked, and the caller hears it had ended.
    let other = repo("uploads/late");
    assert!(
        !store
            .complete_upload(UploadId::new(), &other, &digest, 9)
            .await
            .unwrap()
    );
    assert_eq!(
        store.repository_blob(&other, &digest).await.unwrap(),
        Some(9)
    );
}

/// Many blobs finishing at once (a store may record them in one commit): each caller hears about
/// its own session, and every blob is linked to its own repository only.
async fn uploads_completed_together_each_end_and_link(store: &dyn MetadataStore) {
    let uploads: Vec<(UploadId, RepoName, Digest)> = (0..24)
        .map(|i| {
            let r = repo(&format!("together/r{}", i % 3));
            (
                UploadId::new(),
                r,
                Digest::sha256_of(format!("blob {i}").as_bytes()),
            )
        })
        .collect();
    // Every third upload was purged before its completion arrived.
    for (i, (id, r, _)) in uploads.iter().enumerate() {
        if i % 3 != 0 {
            store.create_upload(r, *id).await.unwrap();
        }
    }
    let ended = futures_util::future::join_all(
        uploads
            .iter()
            .map(|(id, r, digest)| store.complete_upload(*id, r, digest, 7)),
    )
    .await;
    for (i, ((id, r, digest), ended)) in uploads.iter().zip(ended).enumerate() {
        assert_eq!(ended.unwrap(), i % 3 != 0, "upload {i}");
        assert_eq!(store.upload_repository(*id).await.unwrap(), None);
        assert_eq!(store.repository_blob(r, digest).await.unwrap(), Some(7));
        let elsewhere = repo(&format!("together/r{}", (i + 1) % 3));
        assert_eq!(
            store.repository_blob(&elsewhere, digest).await.unwrap(),
            None
        );
    }
}
