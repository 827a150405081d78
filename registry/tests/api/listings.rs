//! Tag lists and the catalog, paginated.

use serde_json::json;

use crate::common::*;
use crate::support::*;

#[tokio::test]
async fn tags_paginate_with_n_last_and_link() {
    let api = Api::start();
    let image = small_image(21);
    let pushed = ["v2", "latest", "v10", "alpha", "1.0", "v1", "beta"];
    api.push_image("paged", pushed[0], &image).await;
    for tag in &pushed[1..] {
        api.push_manifest("paged", tag, &image.manifest).await;
    }
    let mut all: Vec<String> = pushed.iter().map(|t| t.to_string()).collect();
    all.sort();

    let whole = api.get("paged/tags/list").await;
    assert_eq!(whole.expect(200).json()["name"], "paged");
    assert_eq!(whole.list("tags"), all);
    assert_eq!(whole.header("link"), None, "{whole}");

    let pages = api.pages("paged/tags/list?n=3", "tags").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), all);

    let first = api.get("paged/tags/list?n=3").await;
    let expected = format!("/v2/paged/tags/list?n=3&last={}", all[2]);
    assert_eq!(first.next_link(), Some(expected));

    let after = api.get(&format!("paged/tags/list?last={}", all[4])).await;
    assert_eq!(after.expect(200).list("tags"), all[5..]);

    // n=0 must give an empty list and no Link.
    let none = api.get("paged/tags/list?n=0").await;
    assert!(none.expect(200).list("tags").is_empty());
    assert_eq!(none.header("link"), None, "{none}");

    let beyond = api.get("paged/tags/list?n=100").await;
    assert_eq!(beyond.expect(200).list("tags"), all);
    assert_eq!(beyond.header("link"), None, "{beyond}");
}

#[tokio::test]
async fn the_catalog_paginates_with_n_last_and_link() {
    let api = Api::start();
    let repos = ["cat/e", "cat/a", "cat/d", "b", "cat/c"];
    for repo in repos {
        api.push_blob(repo, repo.as_bytes()).await;
    }
    let mut all: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
    all.sort();

    let whole = api.get("_catalog").await;
    assert_eq!(whole.expect(200).list("repositories"), all);
    assert_eq!(whole.header("link"), None, "{whole}");

    let pages = api.pages("_catalog?n=2", "repositories").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(pages.concat(), all);

    let none = api.get("_catalog?n=0").await;
    assert!(none.expect(200).list("repositories").is_empty());
    assert_eq!(none.header("link"), None, "{none}");
}

#[tokio::test]
async fn an_unknown_repository_is_404_but_has_no_referrers() {
    let api = Api::start();
    api.get("nobody/tags/list")
        .await
        .expect_error(404, "NAME_UNKNOWN");
    api.get("nobody/manifests/latest")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    // The referrers API must never answer 404: clients take that as "unsupported".
    let reply = api.get(&format!("nobody/referrers/{}", sha256(b"x"))).await;
    reply.expect(200).expect_header("content-type", OCI_INDEX);
    assert_eq!(reply.json()["manifests"], json!([]));
}
