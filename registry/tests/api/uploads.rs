//! Upload sessions: monolithic, chunked and streamed, status, cancel, mounts, digest checks.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE};

use crate::common::*;
use crate::support::*;

#[tokio::test]
async fn post_then_put_uploads_a_blob_and_ends_the_session() {
    let api = Api::start();
    let bytes = Rng::new(4).bytes(50_000);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/put").await;

    let reply = api.finish(&location, &digest, &bytes).await;
    expect_blob_created(&reply, "push/put", &digest);
    api.expect_blob("push/put", &digest, &bytes).await;
    api.get(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn chunks_in_order_then_put_without_body() {
    let api = Api::start();
    let bytes = Rng::new(5).bytes(100_000);
    let digest = sha256(&bytes);
    let mut location = api.start_upload("push/chunked").await;

    for (start, end) in [(0, 40_000), (40_000, 75_000), (75_000, 100_000)] {
        let range = format!("{start}-{}", end - 1);
        let reply = api.patch(&location, Some(&range), &bytes[start..end]).await;
        reply.expect(202);
        location = expect_session(&reply, "push/chunked", end as u64);
    }
    let reply = api.finish(&location, &digest, b"").await;
    expect_blob_created(&reply, "push/chunked", &digest);
    api.expect_blob("push/chunked", &digest, &bytes).await;
}

#[tokio::test]
async fn an_out_of_order_chunk_is_416_and_the_upload_resumes_where_it_was() {
    let api = Api::start();
    let bytes = Rng::new(6).bytes(300);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/order").await;
    api.patch(&location, Some("0-99"), &bytes[..100])
        .await
        .expect(202);

    // A gap, an overlap, and a range that disagrees with the body's length.
    for (range, chunk) in [
        ("200-299", &bytes[200..]),
        ("50-149", &bytes[50..150]),
        ("100-199", &bytes[100..150]),
    ] {
        api.patch(&location, Some(range), chunk)
            .await
            .expect_error(416, "BLOB_UPLOAD_INVALID");
        let status = api.get(&location).await;
        status.expect(204);
        expect_session(&status, "push/order", 100);
    }

    let reply = api
        .patch(&location, Some("100-199"), &bytes[100..200])
        .await;
    expect_session(reply.expect(202), "push/order", 200);
    let reply = api.patch(&location, Some("200-299"), &bytes[200..]).await;
    expect_session(reply.expect(202), "push/order", 300);
    expect_blob_created(
        &api.finish(&location, &digest, b"").await,
        "push/order",
        &digest,
    );
    api.expect_blob("push/order", &digest, &bytes).await;
}

#[tokio::test]
async fn content_ranges_at_the_limits_of_u64_are_416_and_the_upload_resumes() {
    let api = Api::start();
    let bytes = Rng::new(8).bytes(100);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/huge").await;
    let max = u64::MAX;
    for range in [
        format!("0-{max}"),
        format!("bytes=0-{max}"),
        format!("0-{max}/*"),
        format!("1-{max}"),
        format!("{max}-{max}"),
        format!("{max}-0"),
        "0-18446744073709551616".to_string(),
        "18446744073709551616-18446744073709551616".to_string(),
        "-1-0".to_string(),
    ] {
        for method in [Method::PATCH, Method::PUT] {
            let target = match method {
                Method::PUT => with_query(&location, "digest", &digest),
                _ => location.clone(),
            };
            send(
                api.request(method, &target)
                    .header(CONTENT_TYPE, OCTET_STREAM)
                    .header(CONTENT_RANGE, &range)
                    .body(bytes.clone()),
            )
            .await
            .expect_error(416, "BLOB_UPLOAD_INVALID");
        }
        let status = api.get(&location).await;
        expect_session(status.expect(204), "push/huge", 0);
    }
    expect_blob_created(
        &api.finish(&location, &digest, &bytes).await,
        "push/huge",
        &digest,
    );
}

#[tokio::test]
async fn patches_without_content_range_stream_onto_the_end() {
    let api = Api::start();
    let bytes = Rng::new(7).bytes(90_000);
    let digest = sha256(&bytes);
    let location = api.start_upload("push/stream").await;

    let reply = api.patch(&location, None, &bytes[..30_000]).await;
    expect_session(reply.expect(202), "push/stream", 30_000);
    // A body of unknown length, sent chunked, as docker streams a layer.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = bytes[30_000..60_000]
        .chunks(7_000)
        .map(|piece| Ok(piece.to_vec()))
        .collect();
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let reply = send(
        api.request(Method::PATCH, &location)
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(streamed),
    )
    .await;
    expect_session(reply.expect(202), "push/stream", 60_000);

    // The last chunk rides on the closing PUT.
    let reply = api.finish(&location, &digest, &bytes[60_000..]).await;
    expect_blob_created(&reply, "push/stream", &digest);
    api.expect_blob("push/stream", &digest, &bytes).await;
}

#[tokio::test]
async fn abandoned_upload_sessions_are_purged_and_active_ones_kept() {
    let api = Api::start_with_config("limits:\n  upload_max_idle_seconds: 2\n");
    let abandoned = api.start_upload("purge/app").await;
    api.patch(&abandoned, None, b"left behind")
        .await
        .expect(202);

    // The other session gets a piece every half second for four seconds: never idle for two.
    let active = api.start_upload("purge/app").await;
    let bytes = Rng::new(51).bytes(8 * 1000);
    for piece in bytes.chunks(1000) {
        api.patch(&active, None, piece).await.expect(202);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eventually("the abandoned session to be purged", async || {
        (api.get(&abandoned).await.status == 404).then_some(())
    })
    .await;
    api.get(&abandoned)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    // A session is one file, or a folder of objects (its state and parts).
    let left: BTreeSet<PathBuf> = api
        .registry
        .stored("uploads")
        .await
        .iter()
        .filter_map(|path| path.components().next())
        .map(|first| PathBuf::from(first.as_os_str()))
        .collect();
    let active_id = active.rsplit('/').next().expect("an upload id");
    assert_eq!(
        left,
        BTreeSet::from([PathBuf::from(active_id)]),
        "only the active session's data is left"
    );
    api.finish(&active, &sha256(&bytes), &[]).await.expect(201);
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn upload_status_is_204_with_range_and_uuid() {
    let api = Api::start();
    let location = api.start_upload("push/status").await;
    let status = api.get(&location).await;
    assert_eq!(
        expect_session(status.expect(204), "push/status", 0),
        location
    );

    api.patch(&location, None, &[7; 10]).await.expect(202);
    let status = api.get(&location).await;
    assert_eq!(
        expect_session(status.expect(204), "push/status", 10),
        location
    );
}

#[tokio::test]
async fn a_cancelled_upload_is_gone() {
    let api = Api::start();
    let bytes = b"abandoned half way";
    let location = api.start_upload("push/cancel").await;
    api.patch(&location, None, &bytes[..8]).await.expect(202);

    api.delete(&location).await.expect(204);
    api.get(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.patch(&location, None, &bytes[8..])
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.finish(&location, &sha256(bytes), b"")
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.delete(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn an_upload_is_reachable_only_through_its_own_repository() {
    let api = Api::start();
    let location = api.start_upload("owner/a").await;
    let id = location.rsplit('/').next().expect("an id");

    let foreign = format!("owner/b/blobs/uploads/{id}");
    api.get(&foreign)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.patch(&foreign, None, b"intruder")
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    api.delete(&foreign)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    for id in ["00000000-0000-4000-8000-000000000000", "not-a-uuid"] {
        api.get(&format!("owner/a/blobs/uploads/{id}"))
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    }
    // The intruder's bytes did not land in the session.
    let status = api.get(&location).await;
    expect_session(status.expect(204), "owner/a", 0);
}

#[tokio::test]
async fn a_digest_mismatch_is_400_and_stores_nothing() {
    let api = Api::start();
    let bytes = Rng::new(8).bytes(20_000);
    let claimed = sha256(b"something else");
    let actual = sha256(&bytes);

    let target = format!("push/mismatch/blobs/uploads/?digest={claimed}");
    send(api.request(Method::POST, &target).body(bytes.clone()))
        .await
        .expect_error(400, "DIGEST_INVALID");

    let location = api.start_upload("push/mismatch").await;
    api.patch(&location, None, &bytes).await.expect(202);
    api.finish(&location, &claimed, b"")
        .await
        .expect_error(400, "DIGEST_INVALID");
    // The data is discarded with the session: the client must start over.
    api.get(&location)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");

    for digest in [&claimed, &actual] {
        api.head(&format!("push/mismatch/blobs/{digest}"))
            .await
            .expect_error(404, "BLOB_UNKNOWN");
    }
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn malformed_digests_are_digest_invalid() {
    let api = Api::start();
    let bytes = b"a blob";
    let digest = sha256(bytes);
    let uppercase = format!("sha256:{}", digest["sha256:".len()..].to_uppercase());
    for bad in [
        "sha256:123",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        uppercase.as_str(),
        "nocolon",
    ] {
        api.get(&format!("r/blobs/{bad}"))
            .await
            .expect_error(400, "DIGEST_INVALID");
        // Without a colon it would be a tag. No manifest can have such a reference: reading one
        // is unknown, as in distribution, writing one invalid.
        if bad.contains(':') {
            let target = format!("r/manifests/{bad}");
            for reply in [api.get(&target).await, api.head(&target).await] {
                reply.expect_error(404, "MANIFEST_UNKNOWN");
            }
            for method in [Method::PUT, Method::DELETE] {
                send(api.request(method, &target).body(r#"{"schemaVersion":2}"#))
                    .await
                    .expect_error(400, "DIGEST_INVALID");
            }
        }
        api.get(&format!("r/referrers/{bad}"))
            .await
            .expect_error(400, "DIGEST_INVALID");
        send(
            api.request(Method::POST, &format!("r/blobs/uploads/?digest={bad}"))
                .body(bytes.to_vec()),
        )
        .await
        .expect_error(400, "DIGEST_INVALID");
        send(api.request(
            Method::POST,
            &format!("r/blobs/uploads/?mount={bad}&from=s"),
        ))
        .await
        .expect_error(400, "DIGEST_INVALID");
    }

    // Neither a malformed nor a missing digest costs the session its data.
    let location = api.start_upload("r").await;
    api.patch(&location, None, bytes).await.expect(202);
    api.finish(&location, "sha256:zz", b"")
        .await
        .expect_error(400, "DIGEST_INVALID");
    send(api.request(Method::PUT, &location))
        .await
        .expect_error(400, "DIGEST_INVALID");
    expect_blob_created(&api.finish(&location, &digest, b"").await, "r", &digest);
}

#[tokio::test]
async fn mounting_needs_a_source_that_owns_the_blob() {
    let api = Api::start();
    let bytes = b"a base layer";
    let digest = api.push_blob("mount/src", bytes).await;
    let elsewhere = api.push_blob("mount/third", b"owned by a third").await;
    let mount = async |repo: &str, digest: &str, from: Option<&str>| {
        let mut target = format!("{repo}/blobs/uploads/?mount={digest}");
        if let Some(from) = from {
            target = with_query(&target, "from", from);
        }
        send(api.request(Method::POST, &target)).await
    };

    expect_blob_created(
        &mount("mount/dst", &digest, Some("mount/src")).await,
        "mount/dst",
        &digest,
    );
    api.expect_blob("mount/dst", &digest, bytes).await;

    // A source that does not own the blob, or is no repository at all: an upload session instead.
    for from in ["mount/src", "Not/A/Name", "mount/none"] {
        let reply = mount("mount/other", &elsewhere, Some(from)).await;
        let location = expect_session(reply.expect(202), "mount/other", 0);
        api.delete(&location).await.expect(204);
        api.head(&format!("mount/other/blobs/{elsewhere}"))
            .await
            .expect_error(404, "BLOB_UNKNOWN");
    }
    // The session offered instead of a mount takes the upload.
    let reply = mount("mount/other", &elsewhere, Some("mount/src")).await;
    let location = expect_session(reply.expect(202), "mount/other", 0);
    let reply = api.finish(&location, &elsewhere, b"owned by a third").await;
    expect_blob_created(&reply, "mount/other", &elsewhere);

    // Without `from` the registry mounts from whichever repository holds the blob (the spec
    // allows it; the cacher relies on it), and offers a session when none does.
    expect_blob_created(
        &mount("mount/anon", &digest, None).await,
        "mount/anon",
        &digest,
    );
    let never = sha256(b"nobody has this");
    let reply = mount("mount/anon", &never, None).await;
    expect_session(reply.expect(202), "mount/anon", 0);
}
