//! Retention's part of the behaviour suite: recorded pulls, tags by prefix, expiring a tag.

use std::time::{Duration, SystemTime};

use berth_oci::Digest;

use super::{after_now, manifest, push_blob, queued, repo, tag};
use crate::metadata::{Expired, MetadataStore, Pull};

pub(super) async fn run_all(store: &dyn MetadataStore) {
    pulls_are_recorded_per_repository_and_only_forward(store).await;
    tags_are_listed_under_a_prefix_newest_first(store).await;
    expiring_a_tag_takes_what_only_it_kept(store).await;
    expiring_a_tag_moved_or_pulled_meanwhile_changes_nothing(store).await;
}

async fn pulls_are_recorded_per_repository_and_only_forward(store: &dyn MetadataStore) {
    let (a, b) = (repo("ret-pull/a"), repo("ret-pull/b"));
    let image = manifest(b"ret pulled", vec![]);
    for r in [&a, &b] {
        store
            .put_manifest(r, &image, Some(&tag("v1")))
            .await
            .unwrap();
    }
    let day = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let pull = |at| Pull {
        repo: a.clone(),
        digest: image.digest.clone(),
        at,
    };
    let gone = Pull {
        repo: repo("ret-pull/never"),
        digest: Digest::sha256_of(b"ret nothing"),
        at: day,
    };
    store
        .record_pulls(&[pull(day), gone, pull(day - Duration::from_secs(60))])
        .await
        .unwrap();
    let listed = store.tags_under("ret-pull").await.unwrap();
    let pulled = |name: &str| {
        listed
            .iter()
            .find(|t| t.repo.as_str() == name)
            .unwrap()
            .pulled_at
    };
    assert_eq!(pulled("ret-pull/a"), Some(day));
    assert_eq!(
        pulled("ret-pull/b"),
        None,
        "a pull counts in its repository only"
    );
}

async fn tags_are_listed_under_a_prefix_newest_first(store: &dyn MetadataStore) {
    let (r, other) = (repo("ret-list/app/one"), repo("ret-listing"));
    store
        .put_manifest(&r, &manifest(b"ret old", vec![]), Some(&tag("old")))
        .await
        .unwrap();
    store
        .put_manifest(&other, &manifest(b"ret other", vec![]), Some(&tag("x")))
        .await
        .unwrap();
    // Tag times are in seconds: the next tag is a second newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let child = manifest(b"ret child", vec![]);
    store.put_manifest(&r, &child, None).await.unwrap();
    let mut index = manifest(b"ret index", vec![]);
    index.manifests = vec![child.digest.clone()];
    store
        .put_manifest(&r, &index, Some(&tag("new")))
        .await
        .unwrap();
    // Pulling an index's image counts for the index.
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    store
        .record_pulls(&[Pull {
            repo: r.clone(),
            digest: child.digest.clone(),
            at,
        }])
        .await
        .unwrap();
    let listed = store.tags_under("ret-list").await.unwrap();
    let names: Vec<_> = listed.iter().map(|t| t.tag.as_str()).collect();
    assert_eq!(names, ["new", "old"], "not ret-listing; newest first");
    assert_eq!(listed[0].digest, index.digest);
    assert!(listed[0].tagged_at > listed[1].tagged_at);
    assert_eq!(listed[0].pulled_at, Some(at));
    assert_eq!(listed[1].pulled_at, None);
    assert_eq!(store.tags_under("ret-list/app/one").await.unwrap().len(), 2);
    assert!(store.tags_under("").await.unwrap().len() >= 3, "everything");
}

async fn expiring_a_tag_takes_what_only_it_kept(store: &dyn MetadataStore) {
    let r = repo("ret-expire/app");
    let layer = Digest::sha256_of(b"ret layer");
    push_blob(store, &r, &layer, 4).await;
    let image = manifest(b"ret image", vec![layer.clone()]);
    store.put_manifest(&r, &image, None).await.unwrap();
    let mut index = manifest(b"ret expiring index", vec![]);
    index.manifests = vec![image.digest.clone()];
    store
        .put_manifest(&r, &index, Some(&tag("a")))
        .await
        .unwrap();
    store
        .put_manifest(&r, &index, Some(&tag("b")))
        .await
        .unwrap();
    let listed = store.tags_under("ret-expire").await.unwrap();
    let when = listed[0].tagged_at;

    // Another tag still keeps the index.
    let expired = store
        .expire_tag(&r, &tag("a"), &index.digest, when, None)
        .await
        .unwrap();
    assert_eq!(
        expired,
        Expired {
            tags: 1,
            manifests: 0
        }
    );
    // The last tag takes the index, and the index its image; their bytes are queued.
    let expired = store
        .expire_tag(&r, &tag("b"), &index.digest, when, Some(after_now()))
        .await
        .unwrap();
    assert_eq!(
        expired,
        Expired {
            tags: 1,
            manifests: 2
        }
    );
    assert!(store.tags_under("ret-expire").await.unwrap().is_empty());
    let by_digest = |d: &Digest| berth_oci::Reference::Digest(d.clone());
    assert_eq!(
        store.manifest(&r, &by_digest(&index.digest)).await.unwrap(),
        None
    );
    assert_eq!(
        store.manifest(&r, &by_digest(&image.digest)).await.unwrap(),
        None
    );
    let queued = queued(store).await;
    assert!(queued.contains(&index.digest) && queued.contains(&image.digest));
    let free = store.unreferenced(after_now(), None, 10_000).await.unwrap();
    assert!(free.iter().any(|g| g.digest == layer), "the layer is free");
    // Gone already: nothing to do.
    let again = store
        .expire_tag(&r, &tag("b"), &index.digest, when, None)
        .await
        .unwrap();
    assert_eq!(again, Expired::default());
}

async fn expiring_a_tag_moved_or_pulled_meanwhile_changes_nothing(store: &dyn MetadataStore) {
    let r = repo("ret-race/app");
    let (old, new) = (
        manifest(b"ret race old", vec![]),
        manifest(b"ret race new", vec![]),
    );
    store.put_manifest(&r, &old, Some(&tag("t"))).await.unwrap();
    let seen = store.tags_under("ret-race").await.unwrap()[0].tagged_at;
    // Moved to another manifest since the plan was made.
    store.put_manifest(&r, &new, Some(&tag("t"))).await.unwrap();
    let expired = store
        .expire_tag(&r, &tag("t"), &old.digest, seen, None)
        .await
        .unwrap();
    assert_eq!(expired, Expired::default());
    // Pushed again (tagged later than the plan saw).
    let listed = store.tags_under("ret-race").await.unwrap();
    let earlier = listed[0].tagged_at - Duration::from_secs(1);
    let expired = store
        .expire_tag(&r, &tag("t"), &new.digest, earlier, None)
        .await
        .unwrap();
    assert_eq!(expired, Expired::default());
    // Pulled since the cutoff.
    let now = SystemTime::now();
    store
        .record_pulls(&[Pull {
            repo: r.clone(),
            digest: new.digest.clone(),
            at: now,
        }])
        .await
        .unwrap();
    let cutoff = now - Duration::from_secs(3600);
    let expired = store
        .expire_tag(
            &r,
            &tag("t"),
            &new.digest,
            listed[0].tagged_at,
            Some(cutoff),
        )
        .await
        .unwrap();
    assert_eq!(expired, Expired::default());
    assert_eq!(store.tags_under("ret-race").await.unwrap().len(), 1);
}
