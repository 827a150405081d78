//! Slow, stalled and too many clients: the connection limits and timeouts of `limits:` against
//! the real binary, over raw sockets, while a well-behaved client keeps being served.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The configuration of a registry under test: `limits` lines (indented two spaces) on top of a
/// short shutdown grace.
fn with_limits(lines: &str) -> String {
    format!("limits:\n  shutdown_grace_seconds: 1\n{lines}")
}

async fn start(config: String) -> Registry {
    tokio::task::spawn_blocking(move || Registry::start_with_config(&config))
        .await
        .unwrap()
}

/// Reads (and discards) until the server closes the connection or resets it.
async fn until_closed(mut reader: impl AsyncRead + Unpin) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// How long after `since` the connection was closed by the server, or `None` if it was still
/// open after `patience`.
async fn closed_after(
    reader: impl AsyncRead + Unpin,
    since: Instant,
    patience: Duration,
) -> Option<Duration> {
    tokio::time::timeout(patience, until_closed(reader))
        .await
        .ok()
        .map(|()| since.elapsed())
}

/// The status `GET /v2/` gets from `client` at `url`.
async fn base_status(client: &reqwest::Client, url: &str) -> reqwest::StatusCode {
    client
        .get(format!("{url}/v2/"))
        .send()
        .await
        .expect("GET /v2/")
        .status()
}

/// Pushes `blob` into `repo` in one request; its digest.
async fn push_blob(registry: &Registry, repo: &str, blob: &[u8]) -> String {
    let digest = format!("sha256:{:x}", Sha256::digest(blob));
    let url = format!(
        "{}/v2/{repo}/blobs/uploads/?digest={digest}",
        registry.url()
    );
    let pushed = reqwest::Client::new()
        .post(url)
        .body(blob.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 201);
    digest
}

/// The slowest of `count` `GET /v2/` requests, each on a new connection.
async fn slowest_get(url: &str, count: usize) -> Duration {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..count {
        let started = Instant::now();
        let status = client
            .get(format!("{url}/v2/"))
            .send()
            .await
            .expect("GET /v2/")
            .status();
        assert_eq!(status, 200);
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_at_the_header_timeout_without_delaying_anyone() {
    const SLOW: usize = 500;
    let registry = start(with_limits(
        "  header_read_timeout_seconds: 3\n  idle_timeout_seconds: 60\n",
    ))
    .await;
    let addr = registry.addr();
    // Each sends one byte of an endless request head per second, as a slowloris does. Every
    // 50th sends a whole request first, so it is its second head that trickles.
    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await.expect("connect");
                let (reader, mut writer) = stream.into_split();
                if i % 50 == 0 {
                    writer
                        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await
                        .unwrap();
                }
                let since = Instant::now();
                let trickle = async move {
                    let head = b"GET /v2/ HTTP/1.1\r\nX-Slow: ".iter().copied();
                    for byte in head.chain(std::iter::repeat(b'a')) {
                        if writer.write_all(&[byte]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                };
                tokio::select! {
                    closed = closed_after(reader, since, Duration::from_secs(15)) => closed,
                    () = trickle => Some(since.elapsed()),
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let slowest = slowest_get(&registry.url(), 20).await;
    assert!(
        slowest < Duration::from_millis(500),
        "GET /v2/ took {slowest:?} beside {SLOW} slow connections"
    );
    for (i, task) in slow.into_iter().enumerate() {
        let closed = task.await.unwrap();
        let closed = closed.unwrap_or_else(|| panic!("slow connection {i} still open after 15 s"));
        assert!(
            closed >= Duration::from_millis(2500) && closed <= Duration::from_secs(8),
            "slow connection {i} closed after {closed:?} (header timeout 3 s)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let registry = start(with_limits(
        "  header_read_timeout_seconds: 30\n  idle_timeout_seconds: 2\n",
    ))
    .await;
    let mut stream = TcpStream::connect(registry.addr()).await.unwrap();
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = stream.read(&mut answer).await.unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    let since = Instant::now();
    let closed = closed_after(stream, since, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    assert!(
        closed >= Duration::from_millis(1500) && closed <= Duration::from_secs(4),
        "idle connection closed after {closed:?} (idle timeout 2 s)"
    );
    // A download that keeps moving bytes for longer than the idle timeout is not cut.
    let blob = vec![7u8; 64 << 20];
    let digest = push_blob(&registry, "big", &blob).await;
    let client = reqwest::Client::new();
    let mut response = client
        .get(format!("{}/v2/big/blobs/{digest}", registry.url()))
        .send()
        .await
        .unwrap();
    let mut received = 0usize;
    let read_started = Instant::now();
    while let Some(chunk) = response.chunk().await.expect("the download is not cut") {
        received += chunk.len();
        // Read slowly: ~4 s in all, twice the idle timeout.
        tokio::time::sleep(Duration::from_millis(
            4000 * chunk.len() as u64 / blob.len() as u64,
        ))
        .await;
    }
    assert_eq!(received, blob.len());
    assert!(read_started.elapsed() > Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_body_is_cut_and_the_upload_resumes_where_it_stopped() {
    let registry = start(with_limits("  body_timeout_seconds: 2\n")).await;
    let url = registry.url();
    let client = reqwest::Client::new();
    let blob: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let digest = format!("sha256:{:x}", Sha256::digest(&blob));
    let started = client
        .post(format!("{url}/v2/stall/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_owned();
    // A PATCH that promises the whole blob, sends a third of it and goes quiet.
    let mut stream = TcpStream::connect(registry.addr()).await.unwrap();
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        blob.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let sent = (1 << 20) + 1000;
    stream.write_all(&blob[..sent]).await.unwrap();
    let since = Instant::now();
    let (reader, _writer) = stream.into_split();
    let cut = closed_after(reader, since, Duration::from_secs(10))
        .await
        .expect("the stalled request is cut");
    assert!(
        cut <= Duration::from_secs(5),
        "cut after {cut:?} (body timeout 2 s)"
    );
    // The session is free again and holds what arrived, in whole pieces.
    let status = client.get(format!("{url}{location}")).send().await.unwrap();
    assert_eq!(status.status(), 204);
    let range = status.headers()["range"].to_str().unwrap().to_owned();
    let kept: usize = range
        .strip_prefix("0-")
        .and_then(|end| end.parse::<usize>().ok())
        .map(|end| end + 1)
        .unwrap_or_else(|| panic!("Range {range:?}"));
    assert!(
        kept > 0 && kept <= sent,
        "kept {kept} of the {sent} bytes sent"
    );
    let finished = client
        .put(format!("{url}{location}?digest={digest}"))
        .header("Content-Range", format!("{kept}-{}", blob.len() - 1))
        .body(blob[kept..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(finished.status(), 201, "{:?}", finished.text().await);
    let served = client
        .get(format!("{url}/v2/stall/blobs/{digest}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(served[..] == blob[..], "the resumed blob is the one sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_new_connections_are_refused_and_the_rest_served() {
    const LIMIT: usize = 40;
    let registry = start(with_limits(&format!(
        "  max_connections: {LIMIT}\n  header_read_timeout_seconds: 30\n"
    )))
    .await;
    let addr = registry.addr();
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Give the server time to accept all of them before the one too many.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = TcpStream::connect(addr).await.unwrap();
    let since = Instant::now();
    let refused = closed_after(extra, since, Duration::from_secs(5))
        .await
        .expect("the connection over the limit is closed");
    assert!(
        refused < Duration::from_secs(1),
        "refused after {refused:?}"
    );
    // Those already accepted are served.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    first.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(first);
    // A freed slot takes a new connection again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        if let Ok(response) = client.get(format!("{}/v2/", registry.url())).send().await {
            assert_eq!(response.status(), 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection served after a slot was freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        registry.log().contains("refusing new connections"),
        "the refusal is logged:\n{}",
        registry.log()
    );
}

/// Sends SIGHUP and waits for the reload it triggers to finish (the configuration's outcome is
/// the last line it logs).
fn hang_up(registry: &Registry) {
    let outcomes = || {
        let log = registry.log();
        log.matches("access control reloaded").count()
            + log.matches("keeping the running configuration").count()
    };
    let before = outcomes();
    registry.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while outcomes() == before {
        assert!(
            Instant::now() < deadline,
            "no reload logged:\n{}",
            registry.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_tls_handshake_is_cut_and_the_certificate_reloads_on_hangup() {
    let keys = tempfile::tempdir().unwrap();
    let first = Tls::generate(keys.path());
    let second_dir = keys.path().join("second");
    std::fs::create_dir(&second_dir).unwrap();
    let second = Tls::generate(&second_dir);
    let served = Tls {
        certificate: keys.path().join("served.crt"),
        private_key: keys.path().join("served.key"),
    };
    std::fs::copy(&first.certificate, &served.certificate).unwrap();
    std::fs::copy(&first.private_key, &served.private_key).unwrap();
    let config = with_limits(
        "  tls_handshake_timeout_seconds: 2
",
    );
    let tls = served.clone();
    let registry =
        tokio::task::spawn_blocking(move || Registry::start_tls_configured(tls, &config))
            .await
            .unwrap();
    let url = registry.url();
    assert!(url.starts_with("https://"), "{url}");

    // One connection says nothing, one sends half a ClientHello: both are cut at the deadline
    // while HTTPS clients are served.
    let silent = TcpStream::connect(registry.addr()).await.unwrap();
    let mut partial = TcpStream::connect(registry.addr()).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let since = Instant::now();
    let old_client = first.client();
    let started = Instant::now();
    let status = base_status(&old_client, &url).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_millis(500));
    for (name, stream) in [("silent", silent), ("partial", partial)] {
        let closed = closed_after(stream, since, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{name} handshake still open after 10 s"));
        assert!(
            closed >= Duration::from_millis(1500) && closed <= Duration::from_secs(4),
            "{name} handshake cut after {closed:?} (timeout 2 s)"
        );
    }

    // A rotated certificate is served from the next handshake on; the open connection stays.
    std::fs::copy(&second.certificate, &served.certificate).unwrap();
    std::fs::copy(&second.private_key, &served.private_key).unwrap();
    hang_up(&registry);
    assert!(registry.log().contains("TLS certificate reloaded"));
    let new_client = second.client();
    let status = base_status(&new_client, &url).await;
    assert_eq!(status, 200, "a new handshake gets the new certificate");
    let status = base_status(&old_client, &url).await;
    assert_eq!(
        status, 200,
        "the connection made before the reload is still served"
    );
    let fresh_old = Tls {
        certificate: first.certificate.clone(),
        private_key: first.private_key.clone(),
    }
    .client();
    assert!(
        fresh_old.get(format!("{url}/v2/")).send().await.is_err(),
        "a new handshake no longer gets the old certificate"
    );

    // A certificate with the wrong key is reported and the running pair kept.
    std::fs::copy(&first.certificate, &served.certificate).unwrap();
    hang_up(&registry);
    assert!(
        registry.log().contains("TLS reload failed"),
        "{}",
        registry.log()
    );
    let status = base_status(&second.client(), &url).await;
    assert_eq!(status, 200, "the running certificate is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_the_metrics() {
    let registry = start(with_limits("")).await;
    let send = |method: String| {
        let addr = registry.addr();
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = format!("{method} /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
        }
    };
    let series = || async {
        let text = reqwest::get(format!("{}/metrics", registry.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("berth_registry_http_requests_total"))
            .count()
    };
    send("INVENTED0".into()).await;
    let before = series().await;
    for i in 1..300 {
        send(format!("INVENTED{i}")).await;
    }
    assert_eq!(series().await, before, "300 invented methods added series");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http2_download_outlasts_the_header_timeout() {
    let registry = start(with_limits(
        "  header_read_timeout_seconds: 2\n  idle_timeout_seconds: 60\n",
    ))
    .await;
    let blob = vec![5u8; 48 << 20];
    let digest = push_blob(&registry, "h2", &blob).await;
    // HTTP/2 (curl, prior knowledge), read at 12 MB/s: about 4 s, twice the header timeout.
    // While the body streams the client's window updates arrive as reads, which must not count
    // as a request head that never completes.
    let url = format!("{}/v2/h2/blobs/{digest}", registry.url());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        run(std::process::Command::new(require_tool("curl"))
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "--limit-rate",
                "12M",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code} %{http_version} %{size_download}"])
            .arg(url))
    })
    .await
    .unwrap();
    assert_eq!(out.trim(), format!("200 2 {}", blob.len()), "curl: {out}");
    assert!(started.elapsed() > Duration::from_secs(2));
}
