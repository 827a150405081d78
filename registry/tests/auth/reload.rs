//! SIGHUP reloads users and rules without dropping connections; a broken configuration is refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;
use crate::support::*;

/// A persistent HTTP/1.1 connection: requests one after another on the same socket.
struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    host: String,
}

impl KeepAlive {
    fn connect(registry: &Registry) -> KeepAlive {
        let stream = TcpStream::connect(registry.addr()).expect("connect to the registry");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set a timeout");
        KeepAlive {
            reader: BufReader::new(stream.try_clone().expect("clone the stream")),
            writer: stream,
            host: registry.host(),
        }
    }

    /// Sends the head of a request with `Content-Length: length` and `authorization`.
    fn send_head(&mut self, method: &str, target: &str, authorization: &str, length: usize) {
        write!(
            self.writer,
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: {authorization}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n",
            self.host
        )
        .expect("send a request head on the kept-alive connection");
    }

    fn send_body(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .expect("send body bytes on the kept-alive connection");
        self.writer.flush().expect("flush");
    }

    /// Reads one response, framed by its Content-Length.
    fn read_response(&mut self) -> RawResponse {
        let mut status_line = String::new();
        self.reader
            .read_line(&mut status_line)
            .expect("read a status line: the connection must stay open");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("read a header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().expect("a length"))
            .unwrap_or_else(|| panic!("a response without Content-Length: {headers:?}"));
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("read the body");
        assert!(
            !headers
                .iter()
                .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close")),
            "the registry closes the kept-alive connection: {headers:?}"
        );
        RawResponse {
            status,
            headers,
            body,
        }
    }

    /// Reads one response, which must have `status`.
    #[track_caller]
    fn expect_response(&mut self, status: u16) -> RawResponse {
        let response = self.read_response();
        assert_eq!(
            response.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&response.body)
        );
        response
    }

    /// `GET /v2/` as `login`, which must be let in.
    #[track_caller]
    fn expect_logged_in(&mut self, login: (&str, &str)) {
        self.send_head("GET", "/v2/", &basic_authorization(login), 0);
        assert_eq!(self.read_response().status, 200);
    }
}

#[tokio::test]
async fn sighup_reloads_users_and_rules_without_dropping_connections() {
    let material = Material::new(&[ADMIN, ALICE], 4);
    let api = Api::start(&material, Mode::Basic, "");
    let registry = &api.registry;

    // Carol is unknown so far.
    api.get("/v2/", &Cred::basic(CAROL))
        .await
        .expect_basic_challenge();
    let blob = Blob::new(OCI_LAYER_GZIP, Rng::new(91).bytes(256 * 1024));

    // A kept-alive connection with a request in flight across the reload: alice uploads a blob
    // whose body is half sent when the signal arrives.
    let alice = basic_authorization(ALICE);
    let mut connection = KeepAlive::connect(registry);
    connection.expect_logged_in(ALICE);
    connection.send_head("POST", "/v2/public/hup/blobs/uploads/", &alice, 0);
    let started = connection.expect_response(202);
    let location = started.header("location").expect("a Location").to_string();
    let location = location
        .strip_prefix(&registry.url())
        .unwrap_or(&location)
        .to_string();
    let separator = if location.contains('?') { '&' } else { '?' };
    let target = format!("{location}{separator}digest={}", blob.digest);
    connection.send_head("PUT", &target, &alice, blob.size());
    let half = blob.size() / 2;
    connection.send_body(&blob.bytes[..half]);

    // Add carol, with push on public/carol, and reload.
    material.write_users(&[ADMIN, ALICE, CAROL], 4);
    let mut config = material.config(Mode::Basic, "");
    config = config.replace(
        "    - repositories: team-b\n",
        "    - repositories: public/carol\n      grants: { \"user:carol\": [push] }\n    - repositories: team-b\n",
    );
    registry.write_config(&config);
    assert!(registry.reload(), "the reload must succeed");

    // The request in flight completes, and the connection keeps serving.
    connection.send_body(&blob.bytes[half..]);
    connection.expect_response(201);
    connection.expect_logged_in(ALICE);
    // On the old connection too, the new user is known.
    connection.expect_logged_in(CAROL);
    assert!(api.blob_in_repo("public/hup", &blob.digest).await);

    // Carol logs in and pushes where the new rule lets her, and only there.
    let carol = Cred::basic(CAROL);
    api.get("/v2/", &carol).await.expect(200);
    let image = small_image(92);
    api.push_image(&carol, "public/carol", "v1", &image).await;
    api.upload_blob(&carol, "public/other", &image.config)
        .await
        .expect_error(403, "DENIED");

    // A broken configuration is refused and the running one kept.
    registry.write_config("auth:\n  mode: basic\n  htpasswd: /nonexistent/htpasswd\n");
    assert!(!registry.reload(), "a broken configuration must not load");
    api.get("/v2/", &carol).await.expect(200);
    api.get("/v2/", &Cred::Anonymous)
        .await
        .expect_basic_challenge();

    // Removing a user takes effect at once, remembered logins included.
    material.write_users(&[ADMIN, ALICE], 4);
    registry.write_config(&material.config(Mode::Basic, ""));
    assert!(registry.reload());
    api.get("/v2/", &carol).await.expect_basic_challenge();
    connection.expect_logged_in(ALICE);
}
