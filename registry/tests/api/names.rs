//! The grammar of repository names and tags.

use crate::common::tree;
use crate::support::*;

#[tokio::test]
async fn invalid_names_are_rejected_and_create_nothing() {
    let api = Api::start();
    let root = api.registry.root();
    let stored = async || {
        (
            tree(&root),
            api.registry.stored("blobs").await,
            api.registry.stored("uploads").await,
        )
    };
    let before = stored().await;
    let image = small_image(22);
    let blob = &image.layers[0].blob;
    let long = format!("{}/{}", "a".repeat(200), "b".repeat(55));
    assert_eq!(long.len(), 256);

    let targets = [
        "/v2/Upper/blobs/uploads/".to_string(),
        "/v2/../blobs/uploads/".to_string(),
        "/v2/a/../b/blobs/uploads/".to_string(),
        "/v2/%2e%2e/blobs/uploads/".to_string(),
        "/v2/a/%2E%2E/blobs/uploads/".to_string(),
        "/v2//abs/blobs/uploads/".to_string(),
        "/v2/a%00b/blobs/uploads/".to_string(),
        "/v2/a%2fb/blobs/uploads/".to_string(),
        "/v2/trailing//blobs/uploads/".to_string(),
        format!("/v2/{long}/blobs/uploads/"),
    ];
    for target in &targets {
        let upload = with_query(target, "digest", &blob.digest);
        api.raw("POST", &upload, &blob.bytes)
            .expect_error(400, "NAME_INVALID");
        api.raw("POST", target, b"")
            .expect_error(400, "NAME_INVALID");
        let manifests = target.replace("/blobs/uploads/", "/manifests/latest");
        api.raw("PUT", &manifests, &image.manifest.bytes)
            .expect_error(400, "NAME_INVALID");
        api.raw("GET", &manifests, b"")
            .expect_error(400, "NAME_INVALID");
        let tags = target.replace("/blobs/uploads/", "/tags/list");
        api.raw("GET", &tags, b"").expect_error(400, "NAME_INVALID");
        let blobs = target.replace("/blobs/uploads/", &format!("/blobs/{}", blob.digest));
        api.raw("DELETE", &blobs, b"")
            .expect_error(400, "NAME_INVALID");
    }
    // With no resource word left there is no route at all.
    api.raw("GET", "/v2/../../etc/passwd", b"")
        .expect_error(404, "UNSUPPORTED");

    assert_eq!(
        stored().await,
        before,
        "a rejected request changed the storage"
    );
    let catalog = api.get("_catalog").await;
    assert!(catalog.expect(200).list("repositories").is_empty());

    // The longest valid name works.
    let longest = &long[..255];
    api.push_blob(longest, &blob.bytes).await;
}

#[tokio::test]
async fn invalid_tags_are_rejected() {
    let api = Api::start();
    let image = small_image(23);
    api.push_blobs("tagged", &image).await;
    let too_long = "t".repeat(129);
    for tag in [
        too_long.as_str(),
        ".hidden",
        "-dash",
        "a%2Fb",
        "a%3Ab",
        "caf%C3%A9",
    ] {
        api.put_manifest("tagged", tag, &image.manifest)
            .await
            .expect_error(400, "MANIFEST_INVALID");
        api.delete(&format!("tagged/manifests/{tag}"))
            .await
            .expect_error(400, "MANIFEST_INVALID");
        // No manifest can have such a tag: reading it is unknown, as in distribution.
        let target = format!("tagged/manifests/{tag}");
        for reply in [api.get(&target).await, api.head(&target).await] {
            reply.expect_error(404, "MANIFEST_UNKNOWN");
        }
        let error = api.get(&target).await.json()["errors"][0].clone();
        assert_eq!(error["detail"]["reference"], tag);
    }
    api.get(&format!("tagged/manifests/{}", image.manifest.digest))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");

    let longest = "t".repeat(128);
    api.push_manifest("tagged", &longest, &image.manifest).await;
    api.push_manifest("tagged", "_Under.score-1", &image.manifest)
        .await;
    let tags = api.get("tagged/tags/list").await;
    assert_eq!(
        tags.expect(200).list("tags"),
        ["_Under.score-1", longest.as_str()]
    );
}
