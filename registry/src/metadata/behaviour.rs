//! Behaviour every metadata store backend must show; each backend's tests call [`run_all`].

use std::time::{Duration, SystemTime};

use berth_oci::{Digest, Reference, RepoName, Tag};

use super::{Garbage, MetadataError, MetadataStore, NewManifest, PageRequest, UsageEntry};
use crate::content::UploadId;

mod quota;
mod retention;

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
        upstream_sizes: None,
    }
}

/// Records a finished upload of blob `digest` into `repo`, as a push does.
pub(crate) async fn push_blob(
    store: &dyn MetadataStore,
    repo: &RepoName,
    digest: &Digest,
    size: u64,
) {
    let id = UploadId::new();
    store.create_upload(repo, id).await.unwrap();
    store.complete_upload(id, repo, digest, size).await.unwrap();
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
    leases_have_one_holder_until_they_expire(store).await;
    a_held_digest_is_not_swept_and_a_claimed_one_is_not_held(store).await;
    completing_an_upload_ends_it_and_links_its_blob(store).await;
    uploads_completed_together_each_end_and_link(store).await;
    collection_takes_only_what_nothing_references(store).await;
    a_candidate_referenced_since_it_was_read_is_not_queued(store).await;
    a_collected_digest_can_be_pushed_again(store).await;
    deleted_manifests_free_their_bytes_and_references(store).await;
    upstream_manifests_link_their_blobs_and_free_them_when_deleted(store).await;
    untagged_manifests_are_found_per_prefix(store).await;
    usage_counts_each_digest_once_per_scope(store).await;
    retention::run_all(store).await;
    // Last: they collect every unreferenced blob, and they leave no quota in force.
    quota::quotas_refuse_what_passes_them_and_count_each_digest_once(store).await;
    quota::running_figures_match_a_count_from_scratch(store).await;
}

/// Queues everything collectable before `cutoff`, as a collection does: candidates read a page
/// at a time, then decided again where they are queued.
pub(crate) async fn queue_all(store: &dyn MetadataStore, cutoff: SystemTime) -> Vec<Garbage> {
    let mut queued = Vec::new();
    let mut after = None;
    loop {
        let page = store.unreferenced(cutoff, after.as_ref(), 2).await.unwrap();
        let Some(last) = page.last() else {
            return queued;
        };
        after = Some(last.digest.clone());
        let candidates: Vec<_> = page.into_iter().map(|g| g.digest).collect();
        queued.extend(store.queue_unreferenced(cutoff, &candidates).await.unwrap());
    }
}

/// A cutoff after everything recorded so far, and one before all of it.
fn after_now() -> SystemTime {
    SystemTime::now() + Duration::from_secs(2)
}

fn an_hour_ago() -> SystemTime {
    SystemTime::now() - Duration::from_secs(3600)
}

async fn queued(store: &dyn MetadataStore) -> Vec<Digest> {
    let queued = store.queued_garbage(10_000).await.unwrap();
    queued.into_iter().map(|g| g.digest).collect()
}

async fn collection_takes_only_what_nothing_references(store: &dyn MetadataStore) {
    let r = repo("gc/a");
    let (layer, config, loose) = (
        Digest::sha256_of(b"gc layer"),
        Digest::sha256_of(b"gc config"),
        Digest::sha256_of(b"gc loose"),
    );
    for digest in [&layer, &config, &loose] {
        push_blob(store, &r, digest, 7).await;
    }
    store
        .put_manifest(
            &r,
            &manifest(b"gc image", vec![layer.clone(), config.clone()]),
            Some(&tag("v1")),
        )
        .await
        .unwrap();
    // Within the grace period nothing is taken, however unreferenced.
    let young = store
        .unreferenced(an_hour_ago(), None, 10_000)
        .await
        .unwrap();
    assert!(!young.iter().any(|g| g.digest == loose), "{young:?}");
    let found = store.unreferenced(after_now(), None, 10_000).await.unwrap();
    assert!(
        found.contains(&Garbage {
            digest: loose.clone(),
            size: 7
        }),
        "{found:?}"
    );
    assert!(
        !found
            .iter()
            .any(|g| g.digest == layer || g.digest == config)
    );
    assert!(
        !queued(store).await.contains(&loose),
        "finding changes nothing"
    );

    let taken = queue_all(store, after_now()).await;
    assert!(taken.iter().any(|g| g.digest == loose));
    assert!(queued(store).await.contains(&loose));
    // From the queue on, nothing reaches it: no pull, no mount, no manifest naming it.
    assert_eq!(store.repository_blob(&r, &loose).await.unwrap(), None);
    assert!(!store.link_blob(&repo("gc/b"), &loose).await.unwrap());
    let err = store
        .put_manifest(&r, &manifest(b"gc late", vec![loose.clone()]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::MissingReference(ref d) if *d == loose),
        "{err:?}"
    );
    // What is referenced stays, and stays reachable.
    assert_eq!(store.repository_blob(&r, &layer).await.unwrap(), Some(7));
    assert!(store.link_blob(&repo("gc/b"), &layer).await.unwrap());

    let loose_only = std::slice::from_ref(&loose);
    assert_eq!(store.begin_sweep(loose_only).await.unwrap(), loose_only);
    store.end_sweep(loose_only).await.unwrap();
    assert!(!queued(store).await.contains(&loose));
}

async fn a_candidate_referenced_since_it_was_read_is_not_queued(store: &dyn MetadataStore) {
    let r = repo("gc/late-ref");
    let (layer, spare) = (
        Digest::sha256_of(b"gc late ref"),
        Digest::sha256_of(b"gc late spare"),
    );
    push_blob(store, &r, &layer, 4).await;
    push_blob(store, &r, &spare, 4).await;
    let candidates: Vec<Digest> = store
        .unreferenced(after_now(), None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.digest)
        .filter(|d| *d == layer || *d == spare)
        .collect();
    assert_eq!(candidates.len(), 2);
    // A manifest naming the layer lands between the read and the queueing.
    store
        .put_manifest(
            &r,
            &manifest(b"gc late image", vec![layer.clone()]),
            Some(&tag("v1")),
        )
        .await
        .unwrap();
    let queued = store
        .queue_unreferenced(after_now(), &candidates)
        .await
        .unwrap();
    assert_eq!(
        queued,
        vec![Garbage {
            digest: spare,
            size: 4
        }]
    );
    assert_eq!(store.repository_blob(&r, &layer).await.unwrap(), Some(4));
}

async fn a_collected_digest_can_be_pushed_again(store: &dyn MetadataStore) {
    let r = repo("gc/again");
    let digest = Digest::sha256_of(b"gc pushed again");
    push_blob(store, &r, &digest, 3).await;
    queue_all(store, after_now()).await;
    assert!(queued(store).await.contains(&digest));
    // Pushed again before the sweep: the deletion is cancelled.
    push_blob(store, &r, &digest, 3).await;
    assert!(!queued(store).await.contains(&digest));
    assert!(
        store
            .begin_sweep(std::slice::from_ref(&digest))
            .await
            .unwrap()
            .is_empty(),
        "nothing left to sweep"
    );
    assert_eq!(store.repository_blob(&r, &digest).await.unwrap(), Some(3));

    // Pushed while the sweep deletes the bytes: refused, to be retried after it.
    queue_all(store, after_now()).await;
    let only = std::slice::from_ref(&digest);
    assert_eq!(store.begin_sweep(only).await.unwrap(), only);
    let id = UploadId::new();
    store.create_upload(&r, id).await.unwrap();
    let err = store.complete_upload(id, &r, &digest, 3).await.unwrap_err();
    assert!(
        matches!(err, MetadataError::BeingCollected(ref d) if *d == digest),
        "{err:?}"
    );
    assert_eq!(store.repository_blob(&r, &digest).await.unwrap(), None);
    store.end_sweep(only).await.unwrap();
    assert!(
        store.complete_upload(id, &r, &digest, 3).await.unwrap(),
        "the session survived"
    );
    assert_eq!(store.repository_blob(&r, &digest).await.unwrap(), Some(3));
}

async fn deleted_manifests_free_their_bytes_and_references(store: &dyn MetadataStore) {
    let (a, b) = (repo("gc/del-a"), repo("gc/del-b"));
    let layer = Digest::sha256_of(b"gc del layer");
    let body = b"gc del manifest";
    let digest = Digest::sha256_of(body);
    for r in [&a, &b] {
        push_blob(store, r, &layer, 9).await;
        store
            .put_manifest(r, &manifest(body, vec![layer.clone()]), Some(&tag("v1")))
            .await
            .unwrap();
    }
    assert!(store.delete_manifest(&a, &digest).await.unwrap());
    assert!(
        !queued(store).await.contains(&digest),
        "b still holds the manifest"
    );
    let found = store.unreferenced(after_now(), None, 10_000).await.unwrap();
    assert!(
        !found.iter().any(|g| g.digest == layer),
        "b's manifest still needs the layer"
    );
    assert!(store.delete_manifest(&b, &digest).await.unwrap());
    assert!(
        queued(store).await.contains(&digest),
        "no repository holds the manifest"
    );
    let found = store.unreferenced(after_now(), None, 10_000).await.unwrap();
    assert!(
        found.iter().any(|g| g.digest == layer),
        "nothing references the layer"
    );
    // The same manifest pushed again takes its bytes back.
    push_blob(store, &a, &layer, 9).await;
    store
        .put_manifest(&a, &manifest(body, vec![layer.clone()]), None)
        .await
        .unwrap();
    assert!(!queued(store).await.contains(&digest));
}

/// A pull-through cache records a manifest before any of its blobs' bytes are here: its blobs are
/// linked with the descriptors' sizes, its children may come later, and once unreferenced the
/// blobs are collected like pushed ones.
async fn upstream_manifests_link_their_blobs_and_free_them_when_deleted(store: &dyn MetadataStore) {
    let (cache, other) = (repo("gc-hub/library/alpine"), repo("gc-hub-other/app"));
    let (layer, config) = (
        Digest::sha256_of(b"upstream layer"),
        Digest::sha256_of(b"upstream config"),
    );
    let mut image = manifest(b"upstream image", vec![config.clone(), layer.clone()]);
    image.upstream_sizes = Some(vec![11, 4096]);
    store
        .put_manifest(&cache, &image, Some(&tag("3.20")))
        .await
        .unwrap();
    assert_eq!(
        store.repository_blob(&cache, &config).await.unwrap(),
        Some(11)
    );
    assert_eq!(
        store.repository_blob(&cache, &layer).await.unwrap(),
        Some(4096)
    );
    assert_eq!(store.repository_blob(&other, &layer).await.unwrap(), None);
    let mut index = manifest(b"upstream index", vec![]);
    index.media_type = berth_oci::media_type::OCI_INDEX.into();
    index.manifests = vec![Digest::sha256_of(b"upstream child not fetched yet")];
    index.upstream_sizes = Some(vec![]);
    store
        .put_manifest(&cache, &index, Some(&tag("multi")))
        .await
        .unwrap();
    assert!(
        store
            .manifest(&cache, &Reference::Tag(tag("multi")))
            .await
            .unwrap()
            .is_some()
    );
    // A push into another repository still needs the blobs there.
    assert!(matches!(
        store
            .put_manifest(
                &other,
                &manifest(b"upstream image", vec![layer.clone()]),
                None
            )
            .await,
        Err(MetadataError::MissingReference(_))
    ));
    let found = store.unreferenced(after_now(), None, 10_000).await.unwrap();
    assert!(!found.iter().any(|g| g.digest == layer), "{found:?}");
    assert!(store.delete_manifest(&cache, &image.digest).await.unwrap());
    let found = store.unreferenced(after_now(), None, 10_000).await.unwrap();
    assert!(
        found.contains(&Garbage {
            digest: layer,
            size: 4096
        }) && found.iter().any(|g| g.digest == config),
        "{found:?}"
    );
}

async fn untagged_manifests_are_found_per_prefix(store: &dyn MetadataStore) {
    let (kept, scratch) = (repo("gc-untagged/keep"), repo("gc-scratch/app"));
    for r in [&kept, &scratch] {
        store
            .put_manifest(r, &manifest(b"gc tagged", vec![]), Some(&tag("v1")))
            .await
            .unwrap();
        store
            .put_manifest(r, &manifest(b"gc untagged", vec![]), None)
            .await
            .unwrap();
    }
    let child = manifest(b"gc child", vec![]);
    store.put_manifest(&scratch, &child, None).await.unwrap();
    let mut index = manifest(b"gc index", vec![]);
    index.manifests = vec![child.digest.clone()];
    store
        .put_manifest(&scratch, &index, Some(&tag("multi")))
        .await
        .unwrap();
    let mut signature = manifest(b"gc signature", vec![]);
    signature.subject = Some(Digest::sha256_of(b"gc tagged"));
    store
        .put_manifest(&scratch, &signature, None)
        .await
        .unwrap();
    let mut orphan = manifest(b"gc orphan signature", vec![]);
    orphan.subject = Some(Digest::sha256_of(b"gc gone"));
    store.put_manifest(&scratch, &orphan, None).await.unwrap();

    let found = store
        .untagged_manifests("gc-scratch", after_now(), 100)
        .await
        .unwrap();
    let digests: Vec<_> = found
        .iter()
        .map(|(r, d)| {
            assert_eq!(r, &scratch);
            d.clone()
        })
        .collect();
    let mut expected = vec![Digest::sha256_of(b"gc untagged"), orphan.digest.clone()];
    expected.sort_by_key(ToString::to_string);
    assert_eq!(
        digests, expected,
        "not the tagged one, the index's child or a live subject's signature"
    );
    assert!(
        store
            .untagged_manifests("gc-scratch", an_hour_ago(), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .untagged_manifests("gc-scr", after_now(), 100)
            .await
            .unwrap()
            .is_empty()
    );
    // Deleting decides again in its own transaction: a tag given meanwhile keeps its manifest.
    store
        .put_manifest(
            &scratch,
            &manifest(b"gc untagged", vec![]),
            Some(&tag("late")),
        )
        .await
        .unwrap();
    let deleted = store
        .delete_untagged_manifests("gc-scratch", after_now(), 100)
        .await
        .unwrap();
    assert_eq!(deleted, vec![(scratch.clone(), orphan.digest.clone())]);
    assert!(
        queued(store).await.contains(&orphan.digest),
        "its bytes are queued"
    );
    assert!(
        store
            .untagged_manifests("gc-scratch", after_now(), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn usage_counts_each_digest_once_per_scope(store: &dyn MetadataStore) {
    let (one, two) = (repo("usage-ns/one"), repo("usage-ns/two"));
    let shared = Digest::sha256_of(b"usage shared");
    push_blob(store, &one, &shared, 1000).await;
    assert!(store.link_blob(&two, &shared).await.unwrap());
    push_blob(store, &two, &Digest::sha256_of(b"usage own"), 24).await;
    let body = b"usage manifest";
    store
        .put_manifest(
            &one,
            &manifest(body, vec![shared.clone()]),
            Some(&tag("v1")),
        )
        .await
        .unwrap();
    let usage = store.usage().await.unwrap();
    let bytes = |entries: &[UsageEntry], name: &str| {
        entries.iter().find(|e| e.name == name).map(|e| e.bytes)
    };
    let manifest_size = body.len() as u64;
    assert_eq!(
        bytes(&usage.repositories, "usage-ns/one"),
        Some(1000 + manifest_size)
    );
    assert_eq!(bytes(&usage.repositories, "usage-ns/two"), Some(1024));
    assert_eq!(
        bytes(&usage.namespaces, "usage-ns"),
        Some(1024 + manifest_size)
    );
    assert!(
        usage
            .repositories
            .windows(2)
            .all(|w| w[0].bytes >= w[1].bytes),
        "largest first"
    );
}

async fn blobs_are_owned_per_repository(store: &dyn MetadataStore) {
    let digest = Digest::sha256_of(b"layer");
    let (a, b) = (repo("own/a"), repo("own/b"));
    push_blob(store, &a, &digest, 5).await;
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
    assert!(store.link_blob(&b, &digest).await.unwrap(), "a mount");
    assert_eq!(
        store.blob_owners(&digest, 10).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        store.blob_owners(&digest, 1).await.unwrap(),
        vec![a.clone()]
    );
    assert!(store.unlink_blob(&b, &digest).await.unwrap());
    push_blob(store, &a, &digest, 5).await;
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

    push_blob(store, &r, &layer, 10).await;
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

async fn leases_have_one_holder_until_they_expire(store: &dyn MetadataStore) {
    let ttl = Duration::from_millis(1500);
    assert!(store.acquire_lease("gc", "a", ttl).await.unwrap());
    assert!(
        !store.acquire_lease("gc", "b", ttl).await.unwrap(),
        "held by a"
    );
    assert!(
        store.acquire_lease("other", "b", ttl).await.unwrap(),
        "leases are per name"
    );
    assert!(
        store.acquire_lease("gc", "a", ttl).await.unwrap(),
        "the holder renews"
    );
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        store.acquire_lease("gc", "b", ttl).await.unwrap(),
        "expired, b takes it"
    );
    assert!(!store.acquire_lease("gc", "a", ttl).await.unwrap());
    store.release_lease("gc", "a").await.unwrap();
    assert!(
        !store.acquire_lease("gc", "a", ttl).await.unwrap(),
        "only the holder releases"
    );
    store.release_lease("gc", "b").await.unwrap();
    assert!(
        store.acquire_lease("gc", "a", ttl).await.unwrap(),
        "released, a takes it"
    );
    store.release_lease("gc", "a").await.unwrap();
    store.release_lease("other", "b").await.unwrap();
}

async fn a_held_digest_is_not_swept_and_a_claimed_one_is_not_held(store: &dyn MetadataStore) {
    let r = repo("gc/held");
    let (held, other) = (
        Digest::sha256_of(b"gc held by a push"),
        Digest::sha256_of(b"gc held by nobody"),
    );
    push_blob(store, &r, &held, 4).await;
    push_blob(store, &r, &other, 4).await;
    queue_all(store, after_now()).await;
    let hour = Duration::from_secs(3600);
    assert!(store.hold(&held, "push-1", hour).await.unwrap());
    let both = [held.clone(), other.clone()];
    assert_eq!(
        store.begin_sweep(&both).await.unwrap(),
        std::slice::from_ref(&other),
        "the held digest stays queued"
    );
    assert!(
        !store.hold(&other, "push-2", hour).await.unwrap(),
        "a claimed digest cannot be held"
    );
    store.end_sweep(std::slice::from_ref(&other)).await.unwrap();
    assert!(
        store.hold(&other, "push-2", hour).await.unwrap(),
        "swept: held again"
    );
    store.release("push-2").await.unwrap();

    store.release("push-1").await.unwrap();
    assert_eq!(
        store
            .begin_sweep(std::slice::from_ref(&held))
            .await
            .unwrap(),
        std::slice::from_ref(&held),
        "released: swept"
    );
    store.end_sweep(std::slice::from_ref(&held)).await.unwrap();

    // A hold whose push died expires.
    push_blob(store, &r, &held, 4).await;
    queue_all(store, after_now()).await;
    assert!(
        store
            .hold(&held, "push-3", Duration::from_millis(300))
            .await
            .unwrap()
    );
    assert!(
        store
            .begin_sweep(std::slice::from_ref(&held))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store
            .begin_sweep(std::slice::from_ref(&held))
            .await
            .unwrap(),
        std::slice::from_ref(&held)
    );
    store.end_sweep(std::slice::from_ref(&held)).await.unwrap();
}
