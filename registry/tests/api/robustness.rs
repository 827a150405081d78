//! Concurrent writers, broken connections, a full disk.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::json;

use crate::common::*;
use crate::support::*;

/// Opens a connection and sends `head` (the request line, and any headers of its own) for a body
/// of `declared` bytes, of which it sends only `sent`.
fn partial_request(addr: SocketAddr, head: &str, declared: usize, sent: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to the registry");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    write!(
        stream,
        "{head}\r\nHost: {addr}\r\nContent-Type: {OCTET_STREAM}\r\n\
         Content-Length: {declared}\r\n\r\n"
    )
    .expect("write the request head");
    stream.write_all(sent).expect("write part of the body");
    stream.flush().expect("flush");
    stream
}

/// Reads a response's status line and headers off `stream`.
fn read_response_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("read a response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_to_one_tag_leave_one_whole_manifest() {
    let api = Api::start();
    let image = small_image(24);
    api.push_blobs("race", &image).await;
    let manifests: Vec<Blob> = (0..16)
        .map(|i| {
            manifest(
                OCI_MANIFEST,
                &json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": image.config.descriptor(),
                    "layers": [image.layers[0].blob.descriptor()],
                    "annotations": { "writer": i.to_string() },
                }),
            )
        })
        .collect();

    let pushes: Vec<_> = manifests
        .iter()
        .map(|m| {
            let request = api
                .request(Method::PUT, "race/manifests/latest")
                .header(CONTENT_TYPE, OCI_MANIFEST)
                .body(m.bytes.clone());
            tokio::spawn(send(request))
        })
        .collect();
    for push in pushes {
        push.await.expect("the push task").expect(201);
    }

    let latest = api.get("race/manifests/latest").await;
    latest.expect(200);
    let winner = manifests
        .iter()
        .find(|m| latest.header("docker-content-digest") == Some(m.digest.as_str()))
        .unwrap_or_else(|| panic!("the tag points at none of the pushes: {latest}"));
    assert!(latest.body == winner.bytes, "{latest}");
    for pushed in &manifests {
        api.expect_manifest("race", &pushed.digest, pushed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_of_one_blob_store_it_once() {
    let api = Api::start();
    let bytes = Rng::new(25).bytes(1 << 20);
    let digest = sha256(&bytes);

    let mut uploads = Vec::new();
    for i in 0..8 {
        let repo = format!("dedupe/r{}", i % 2);
        let location = api.start_upload(&repo).await;
        let request = api
            .request(Method::PUT, &with_query(&location, "digest", &digest))
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(bytes.clone());
        uploads.push((repo, tokio::spawn(send(request))));
    }
    for i in 0..4 {
        let target = format!("dedupe/m{i}/blobs/uploads/?digest={digest}");
        let request = api.request(Method::POST, &target).body(bytes.clone());
        uploads.push((format!("dedupe/m{i}"), tokio::spawn(send(request))));
    }
    for (repo, upload) in uploads {
        expect_blob_created(&upload.await.expect("the upload task"), &repo, &digest);
        api.expect_blob(&repo, &digest, &bytes).await;
    }

    let stored = api.registry.stored("blobs").await;
    assert_eq!(stored.len(), 1, "one copy of the blob: {stored:?}");
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn errors_decided_before_the_body_reach_a_client_still_sending_it() {
    let api = Api::start();
    // Far more than the socket buffers hold, so the client is still writing when the answer comes.
    let big = Rng::new(27).bytes(16 << 20);
    let location = api.start_upload("early").await;
    api.patch(&location, Some("0-9"), &big[..10])
        .await
        .expect(202);

    // Whether a client sees the reset is a race, so each is tried a few times.
    for _ in 0..3 {
        let gap = format!("20-{}", 20 + big.len() - 1);
        api.patch(&location, Some(&gap), &big)
            .await
            .expect_error(416, "BLOB_UPLOAD_INVALID");
        api.finish(&location, "sha256:bad", &big)
            .await
            .expect_error(400, "DIGEST_INVALID");
        let unknown = "early/blobs/uploads/00000000-0000-4000-8000-000000000000";
        api.patch(unknown, None, &big)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        let target = format!("Early/blobs/uploads/?digest={}", sha256(&big));
        send(api.request(Method::POST, &target).body(big.clone()))
            .await
            .expect_error(400, "NAME_INVALID");
    }

    // A client waiting for 100 Continue gets the answer without being asked for the body.
    let head = "PATCH /v2/early/blobs/uploads/00000000-0000-4000-8000-000000000000 HTTP/1.1\r\n\
        Expect: 100-continue";
    let mut stream = partial_request(api.registry.addr(), head, big.len(), b"");
    let answer = read_response_head(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");

    let status = api.get(&location).await;
    expect_session(status.expect(204), "early", 10);
}

#[tokio::test]
async fn a_full_disk_is_507_leaves_nothing_partial_and_the_server_keeps_serving() {
    let disk = SmallDisk::mount(24);
    let api = Api::start_on(&disk.root);
    let small = Rng::new(31).bytes(1 << 20);
    let small_digest = api.push_blob("full/app", &small).await;
    let big = Rng::new(32).bytes(32 << 20);
    let big_digest = sha256(&big);

    let target = format!("full/app/blobs/uploads/?digest={big_digest}");
    let reply = send(
        api.request(Method::POST, &target)
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(big.clone()),
    )
    .await;
    reply.expect_error(507, "UNKNOWN");
    let message = reply.json()["errors"][0]["message"].clone();
    assert_eq!(message, "the registry's storage is full", "{reply}");
    api.head(&format!("full/app/blobs/{big_digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    for dir in ["uploads", "tmp"] {
        assert_eq!(
            tree(&disk.root.join(dir)),
            BTreeSet::new(),
            "{dir}/ after the failed POST"
        );
    }

    // A session keeps the whole pieces that fit, so a client can resume once there is room.
    let location = api.start_upload("full/app").await;
    api.patch(&location, None, &big)
        .await
        .expect_error(507, "UNKNOWN");
    let status = api.get(&location).await;
    let range = status
        .expect(204)
        .header("range")
        .expect("a Range header")
        .to_owned();
    let kept: usize = range
        .strip_prefix("0-")
        .and_then(|end| end.parse::<usize>().ok())
        .map(|end| end + 1)
        .unwrap_or_else(|| panic!("range {range}"));
    assert!(kept > 0 && kept < big.len(), "kept {kept} bytes");
    let on_disk = std::fs::metadata(
        disk.root
            .join("uploads")
            .join(location.rsplit('/').next().unwrap()),
    )
    .expect("the session's file")
    .len();
    assert_eq!(
        on_disk, kept as u64,
        "the session reports what its file holds"
    );

    // The server kept serving; cancelling the session frees its space for the next push.
    let served = api.get(&format!("full/app/blobs/{small_digest}")).await;
    assert_eq!(served.expect(200).body, small);
    api.delete(&location).await.expect(204);
    assert_eq!(tree(&disk.root.join("uploads")), BTreeSet::new());
    api.push_blob("full/app", &Rng::new(33).bytes(4 << 20))
        .await;
}

#[tokio::test]
async fn a_truncated_upload_body_leaves_nothing_visible() {
    let api = Api::start();
    let bytes = Rng::new(26).bytes(200_000);
    let digest = sha256(&bytes);
    let sent = 70_000;

    // Each request is dropped half way, as by a client that died. A monolithic POST has no
    // session to resume: it must leave nothing behind.
    let head = format!("POST /v2/trunc/post/blobs/uploads/?digest={digest} HTTP/1.1");
    drop(partial_request(
        api.registry.addr(),
        &head,
        bytes.len(),
        &bytes[..sent],
    ));
    let failed = r#"berth_registry_http_requests_total{route="upload",method="POST",status="400"}"#;
    eventually("the truncated POST to be answered", async || {
        api.metric(failed).await
    })
    .await;
    api.head(&format!("trunc/post/blobs/{digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    assert_eq!(
        api.metric("berth_registry_upload_sessions").await,
        Some(0.0)
    );

    // A session keeps what arrived, so the client can resume from the reported offset.
    let location = api.start_upload("trunc/put").await;
    let head = format!("PUT {} HTTP/1.1", with_query(&location, "digest", &digest));
    drop(partial_request(
        api.registry.addr(),
        &head,
        bytes.len(),
        &bytes[..sent],
    ));
    let expected_range = format!("0-{}", sent - 1);
    eventually("the truncated PUT to be stored", async || {
        let status = api.get(&location).await;
        (status.header("range") == Some(expected_range.as_str())).then_some(())
    })
    .await;
    api.head(&format!("trunc/put/blobs/{digest}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    let range = format!("{sent}-{}", bytes.len() - 1);
    api.patch(&location, Some(&range), &bytes[sent..])
        .await
        .expect(202);
    expect_blob_created(
        &api.finish(&location, &digest, b"").await,
        "trunc/put",
        &digest,
    );
    api.expect_blob("trunc/put", &digest, &bytes).await;

    api.get("").await.expect(200);
    let catalog = api.get("_catalog").await;
    assert_eq!(catalog.expect(200).list("repositories"), ["trunc/put"]);
}
