//! Quotas: refusals as content is linked, mounted or recorded, usage counted once per scope, and
//! lowered by deletes and collection.

use berth_oci::{Digest, Reference};

use super::{after_now, manifest, push_blob, queued, repo, tag};
use crate::content::UploadId;
use crate::metadata::{MetadataError, MetadataStore};
use crate::quota::{Quota, QuotaExceeded, ScopeUsage};

fn quota_refusal(err: MetadataError) -> QuotaExceeded {
    match err {
        MetadataError::QuotaExceeded(refusal) => refusal,
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

async fn quota_figures(store: &dyn MetadataStore) -> Vec<(String, u64, u64)> {
    let usage = store.quota_usage().await.unwrap();
    usage
        .into_iter()
        .map(|u| (u.quota, u.scopes, u.max_used_bytes))
        .collect()
}

pub(super) async fn quotas_refuse_what_passes_them_and_count_each_digest_once(
    store: &dyn MetadataStore,
) {
    let blob = |name: &str| Digest::sha256_of(format!("quota {name}").as_bytes());
    let (a, b, c, d) = (blob("a"), blob("b"), blob("c"), blob("d"));
    let (app1, app1_other, app2, app3) = (
        repo("quota-ns/app1/r1"),
        repo("quota-ns/app1/r2"),
        repo("quota-ns/app2"),
        repo("quota-ns/app3/r"),
    );
    // Stored before the quotas come into force: counted when they do.
    push_blob(store, &repo("quota-ns/app1/r0"), &d, 100).await;
    let quotas: Vec<Quota> = serde_norway::from_str(
        "- {repositories: quota-ns, max_bytes: 1000}\n- {repositories: quota-ns/*, max_bytes: 600}\n",
    )
    .unwrap();
    store.set_quotas(&quotas).await.unwrap();
    assert_eq!(
        quota_figures(store).await,
        vec![("quota-ns".into(), 1, 100), ("quota-ns/*".into(), 1, 100)]
    );

    push_blob(store, &app1, &a, 300).await;
    assert!(store.link_blob(&app1_other, &a).await.unwrap());
    // Held in the scope already: another repository of it adds nothing.
    store
        .check_quotas(&repo("quota-ns/app1/r3"), &a, 300)
        .await
        .unwrap();
    assert_eq!(
        quota_figures(store).await,
        vec![("quota-ns".into(), 1, 400), ("quota-ns/*".into(), 1, 400)]
    );

    // app1 holds 400 of 600: 400 more is refused, before and as it is recorded.
    let refusal = quota_refusal(store.check_quotas(&app1, &b, 400).await.unwrap_err());
    assert_eq!(
        refusal,
        QuotaExceeded {
            quota: "quota-ns/*".into(),
            scope: "quota-ns/app1".into(),
            max_bytes: 600,
            used_bytes: 400,
            needed_bytes: 400,
        }
    );
    let id = UploadId::new();
    store.create_upload(&app1, id).await.unwrap();
    let refused = store.complete_upload(id, &app1, &b, 400).await.unwrap_err();
    assert_eq!(quota_refusal(refused), refusal);
    assert_eq!(store.repository_blob(&app1, &b).await.unwrap(), None);
    assert!(
        queued(store).await.contains(&b),
        "bytes published for a refused upload are left to the collector"
    );

    // Another app has room of its own, and taking the bytes back there takes them off the queue.
    push_blob(store, &app2, &b, 400).await;
    assert!(!queued(store).await.contains(&b));
    // A mount counts like a push.
    let refused = store.link_blob(&app1_other, &b).await.unwrap_err();
    assert_eq!(quota_refusal(refused).scope, "quota-ns/app1");
    assert_eq!(store.repository_blob(&app1_other, &b).await.unwrap(), None);
    // The namespace as a whole holds 800 of 1000.
    let id = UploadId::new();
    store.create_upload(&app3, id).await.unwrap();
    let refused = quota_refusal(store.complete_upload(id, &app3, &c, 250).await.unwrap_err());
    assert_eq!(
        (
            refused.quota.as_str(),
            refused.scope.as_str(),
            refused.used_bytes
        ),
        ("quota-ns", "quota-ns", 800)
    );

    // Manifests count too, and a refused one is recorded nowhere.
    let mut big = manifest(b"quota big manifest", vec![a.clone()]);
    big.size = 250;
    let refused = store
        .put_manifest(&app1, &big, Some(&tag("v1")))
        .await
        .unwrap_err();
    assert_eq!(quota_refusal(refused).needed_bytes, 250);
    assert_eq!(
        store
            .manifest(&app1, &Reference::Tag(tag("v1")))
            .await
            .unwrap(),
        None
    );
    assert!(queued(store).await.contains(&big.digest));
    let small = manifest(b"quota small manifest", vec![a.clone()]);
    store
        .put_manifest(&app1, &small, Some(&tag("v1")))
        .await
        .unwrap();
    let small_size = small.size;
    assert_eq!(
        quota_figures(store).await,
        vec![
            ("quota-ns".into(), 1, 800 + small_size),
            ("quota-ns/*".into(), 2, 400 + small_size)
        ]
    );
    let scope = |quota: &str, scope: &str, bytes, max_bytes| ScopeUsage {
        quota: quota.into(),
        scope: scope.into(),
        bytes,
        max_bytes,
    };
    assert_eq!(
        store.usage().await.unwrap().quota_scopes,
        vec![
            scope("quota-ns", "quota-ns", 800 + small_size, 1000),
            scope("quota-ns/*", "quota-ns/app1", 400 + small_size, 600),
            scope("quota-ns/*", "quota-ns/app2", 400, 600),
        ],
        "fullest first"
    );

    // Deleting lowers the usage once no repository of the scope holds the digest any more.
    assert!(store.unlink_blob(&app1_other, &a).await.unwrap());
    assert_eq!(quota_figures(store).await[1].2, 400 + small_size);
    assert!(store.unlink_blob(&app1, &a).await.unwrap());
    assert!(store.delete_manifest(&app1, &small.digest).await.unwrap());
    assert_eq!(
        quota_figures(store).await,
        vec![("quota-ns".into(), 1, 500), ("quota-ns/*".into(), 2, 400)]
    );
    // So does collection: nothing references b in app2, nor d.
    super::queue_all(store, after_now()).await;
    assert_eq!(
        quota_figures(store).await,
        vec![("quota-ns".into(), 0, 0), ("quota-ns/*".into(), 0, 0)]
    );
    store.check_quotas(&app1, &c, 600).await.unwrap();

    store.set_quotas(&[]).await.unwrap();
    assert!(store.quota_usage().await.unwrap().is_empty());
}

/// Every scope's bytes as the store keeps them.
async fn scope_bytes(store: &dyn MetadataStore) -> Vec<(String, String, u64)> {
    let mut scopes: Vec<_> = store
        .usage()
        .await
        .unwrap()
        .quota_scopes
        .into_iter()
        .map(|s| (s.quota, s.scope, s.bytes))
        .collect();
    scopes.sort();
    scopes
}

/// The figures each write keeps up to date are those a count of the stored content gives when a
/// rule is put in force afresh.
pub(super) async fn running_figures_match_a_count_from_scratch(store: &dyn MetadataStore) {
    let quotas: Vec<Quota> = serde_norway::from_str(
        "- {repositories: q, max_bytes: 1000000}\n- {repositories: q/*, max_bytes: 1000000}\n",
    )
    .unwrap();
    store.set_quotas(&quotas).await.unwrap();
    let (a1, a2, b) = (repo("q/a/one"), repo("q/a/two"), repo("q/b"));
    let digests: Vec<Digest> = (0..6)
        .map(|i| Digest::sha256_of(format!("q blob {i}").as_bytes()))
        .collect();
    for (i, digest) in digests.iter().enumerate() {
        push_blob(store, [&a1, &a2, &b][i % 3], digest, 100 + i as u64).await;
    }
    assert!(store.link_blob(&a2, &digests[0]).await.unwrap());
    assert!(store.link_blob(&b, &digests[0]).await.unwrap());
    let image = manifest(b"q image", vec![digests[0].clone(), digests[3].clone()]);
    store.put_manifest(&a1, &image, None).await.unwrap();
    store
        .put_manifest(&a2, &manifest(b"q other", vec![]), None)
        .await
        .unwrap();
    assert!(store.unlink_blob(&b, &digests[2]).await.unwrap());
    assert!(
        store
            .delete_manifest(&a2, &Digest::sha256_of(b"q other"))
            .await
            .unwrap()
    );
    // Garbage collection's deletion of untagged manifests gives their quota back too.
    store
        .put_manifest(&b, &manifest(b"q untagged", vec![]), None)
        .await
        .unwrap();
    assert_eq!(
        store
            .delete_untagged_manifests("q/b", after_now(), 100)
            .await
            .unwrap()
            .len(),
        1
    );
    // So does retention's expiry of a tag and the manifest only it kept.
    let expiring = manifest(b"q expiring", vec![]);
    store
        .put_manifest(&a1, &expiring, Some(&tag("old")))
        .await
        .unwrap();
    let tagged = store.tags_under("q/a/one").await.unwrap();
    let old = tagged.iter().find(|t| t.tag.as_str() == "old").unwrap();
    let expired = store
        .expire_tag(&a1, &old.tag, &expiring.digest, old.tagged_at, None)
        .await
        .unwrap();
    assert_eq!(expired.manifests, 1);
    super::queue_all(store, after_now()).await;

    let running = scope_bytes(store).await;
    assert!(!running.is_empty());
    store.set_quotas(&[]).await.unwrap();
    store.set_quotas(&quotas).await.unwrap();
    assert_eq!(scope_bytes(store).await, running);
    store.set_quotas(&[]).await.unwrap();
}
