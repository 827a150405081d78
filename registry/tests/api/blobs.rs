//! Blob pulls, whole and by range, and deletes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::RANGE;

use crate::common::*;
use crate::support::*;

#[tokio::test]
async fn blobs_are_served_whole_with_digest_length_and_type() {
    let api = Api::start();
    let bytes = Rng::new(1).bytes(70_000);
    let digest = api.push_blob("pull/blob", &bytes).await;
    let target = format!("pull/blob/blobs/{digest}");

    for reply in [api.get(&target).await, api.head(&target).await] {
        reply
            .expect(200)
            .expect_header("content-length", "70000")
            .expect_header("docker-content-digest", &digest)
            .expect_header("content-type", OCTET_STREAM);
    }
    assert!(api.get(&target).await.body == bytes);

    let empty = api.push_blob("pull/blob", b"").await;
    let reply = api.get(&format!("pull/blob/blobs/{empty}")).await;
    reply
        .expect(200)
        .expect_header("docker-content-digest", &empty);

    let unknown = format!("pull/blob/blobs/{}", sha256(b"never pushed"));
    api.get(&unknown).await.expect_error(404, "BLOB_UNKNOWN");
    api.head(&unknown).await.expect_error(404, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn blob_ranges_give_206_or_416() {
    let api = Api::start();
    let bytes = Rng::new(2).bytes(1000);
    let digest = api.push_blob("pull/range", &bytes).await;
    let target = format!("pull/range/blobs/{digest}");
    let ranged =
        async |range: &str| send(api.request(Method::GET, &target).header(RANGE, range)).await;

    for (range, span, content_range) in [
        ("bytes=10-19", 10..20, "bytes 10-19/1000"),
        ("bytes=990-", 990..1000, "bytes 990-999/1000"),
        ("bytes=-5", 995..1000, "bytes 995-999/1000"),
        ("bytes=900-5000", 900..1000, "bytes 900-999/1000"),
    ] {
        let reply = ranged(range).await;
        reply
            .expect(206)
            .expect_header("content-range", content_range)
            .expect_header("docker-content-digest", &digest);
        assert!(reply.body == bytes[span], "{range}: {reply}");
    }

    for range in ["bytes=1000-", "bytes=5-2", "bytes=-0"] {
        ranged(range)
            .await
            .expect_error(416, "UNSUPPORTED")
            .expect_header("content-range", "bytes */1000");
    }
}

/// Large blob bodies leave through the kernel (sendfile) on plain HTTP/1 and through user space on
/// HTTP/2; both must carry exactly the stored bytes, whole and in ranges that cross the server's
/// internal frame boundaries, back to back on reused and concurrent connections.
#[tokio::test]
async fn large_blobs_arrive_intact_whole_and_in_ranges() {
    let api = Api::start();
    let bytes = Rng::new(3).bytes((5 << 20) + 12345);
    let digest = api.push_blob("pull/large", &bytes).await;
    let small = Rng::new(4).bytes(100);
    let small_digest = api.push_blob("pull/large", &small).await;
    let target = format!("pull/large/blobs/{digest}");
    let (len, frame) = (bytes.len(), 2 << 20);
    let spans = [
        0..len,
        1..len - 1,
        frame - 70_000..frame + 70_000,
        frame - 100_000..2 * frame + 100_000,
        70_000..len,
        len - 65_536..len,
    ];
    let from_file = "berth_registry_sent_from_file_bytes_total";
    let sent_from_file_before = api.metric(from_file).await.expect("the sendfile counter");
    for span in &spans {
        let range = format!("bytes={}-{}", span.start, span.end - 1);
        let reply = send(api.request(Method::GET, &target).header(RANGE, &range)).await;
        reply.expect(206);
        assert!(reply.body == bytes[span.clone()], "{range}: {reply}");
        api.expect_blob("pull/large", &small_digest, &small).await;
    }
    let downloads: Vec<_> = (0..8)
        .map(|_| tokio::spawn(send(api.request(Method::GET, &target))))
        .collect();
    for download in downloads {
        let reply = download.await.expect("a download task");
        assert!(
            reply.expect(200).body == bytes,
            "concurrent download: {reply}"
        );
    }
    let path = format!("/v2/{target}");
    let http10 = raw_bodies(api.registry.addr(), &format!("GET {path} HTTP/1.0\r\n\r\n"));
    assert!(http10.len() == 1 && http10[0] == bytes, "HTTP/1.0");
    let pipelined = raw_bodies(
        api.registry.addr(),
        &format!(
            "GET {path} HTTP/1.1\r\nHost: berth\r\nRange: bytes=100-199999\r\n\r\n\
             GET {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(pipelined.len() == 2, "two pipelined responses");
    assert!(
        pipelined[0] == bytes[100..200_000] && pipelined[1] == bytes,
        "pipelined bodies"
    );
    // Every HTTP/1 body above but the small blob's went out with sendfile, when blobs are files.
    let sent_from_file = if api.registry.content_is_local() {
        (spans.iter().map(|s| s.len()).sum::<usize>() + 10 * len + 199_900) as f64
    } else {
        0.0
    };
    let sent_from_file_after = api.metric(from_file).await.expect("the sendfile counter");
    assert_eq!(sent_from_file_after - sent_from_file_before, sent_from_file);

    let curl = require_tool("curl");
    let scratch = api.registry.scratch().join("h2c");
    let url = format!("{}/v2/{target}", api.registry.url());
    for range in [None, Some(1..len - 1)] {
        let mut command = Command::new(&curl);
        command.args([
            "-sS",
            "--fail",
            "--http2-prior-knowledge",
            "-w",
            "%{http_version}",
            "-o",
        ]);
        command.arg(&scratch).arg(&url);
        if let Some(range) = &range {
            command.args(["-r", &format!("{}-{}", range.start, range.end - 1)]);
        }
        assert_eq!(run(&mut command), "2", "curl spoke HTTP/2");
        let got = std::fs::read(&scratch).expect("read the HTTP/2 download");
        assert!(got == bytes[range.unwrap_or(0..len)], "HTTP/2 body");
    }
    assert_eq!(
        api.metric(from_file).await,
        Some(sent_from_file_after),
        "HTTP/2 bodies are copied, not sent from the file"
    );
}

/// Sends `requests` (raw HTTP/1, possibly several) on one connection at once and returns the
/// bodies of the responses, split by their `Content-Length`; the last request must close.
fn raw_bodies(addr: SocketAddr, requests: &str) -> Vec<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).expect("connect to the registry");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a read timeout");
    stream
        .write_all(requests.as_bytes())
        .expect("send the requests");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the responses");
    let mut bodies = Vec::new();
    let mut rest = &raw[..];
    while !rest.is_empty() {
        let head_end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head")
            + 4;
        let head = String::from_utf8_lossy(&rest[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .expect("a Content-Length")
            .trim()
            .parse()
            .expect("a length");
        bodies.push(rest[head_end..head_end + len].to_vec());
        rest = &rest[head_end + len..];
    }
    bodies
}

#[tokio::test]
async fn a_repository_reads_only_its_own_blobs() {
    let api = Api::start();
    let image = small_image(3);
    api.push_image("tenant/a", "v1", &image).await;
    api.push_blob("tenant/b", b"b's own blob").await;

    for blob in image.blobs() {
        let target = format!("tenant/b/blobs/{}", blob.digest);
        api.get(&target).await.expect_error(404, "BLOB_UNKNOWN");
        api.head(&target).await.expect_error(404, "BLOB_UNKNOWN");
    }
    let manifest = format!("tenant/b/manifests/{}", image.manifest.digest);
    api.get(&manifest)
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    // Knowing the digests is not enough to make another repository's blobs one's own.
    api.put_manifest("tenant/b", "stolen", &image.manifest)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
}

#[tokio::test]
async fn deleting_a_blob_unlinks_it_from_that_repository_only() {
    let api = Api::start();
    let bytes = b"shared by two repositories";
    let digest = api.push_blob("del/a", bytes).await;
    api.push_blob("del/b", bytes).await;

    let target = format!("del/a/blobs/{digest}");
    api.delete(&target).await.expect(202);
    api.get(&target).await.expect_error(404, "BLOB_UNKNOWN");
    api.head(&target).await.expect_error(404, "BLOB_UNKNOWN");
    api.delete(&target).await.expect_error(404, "BLOB_UNKNOWN");
    let other = api.get(&format!("del/b/blobs/{digest}")).await;
    assert!(other.expect(200).body == bytes);
}
