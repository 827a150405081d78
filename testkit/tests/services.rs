//! Each service gives a working resource of its own, checked with the servers' own clients, and
//! the `test-services` binary starts them all and leaves nothing behind.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use berth_testkit::services::{
    AzureContainer, S3Bucket, azure_container, mysql_database, postgres_database, s3_bucket, webdav,
};
use berth_testkit::{require_tool, run_output, run_output_with_input, stop_child};

/// `user`, `password`, `host`, `port` and path of `scheme://user:password@host:port/path`.
fn url_parts(url: &str) -> (String, String, String, String, String) {
    let rest = url.split_once("://").expect("a URL").1;
    let (userinfo, rest) = rest.split_once('@').expect("credentials in the URL");
    let (user, password) = userinfo.split_once(':').expect("user:password");
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = hostport.rsplit_once(':').expect("host:port");
    (
        user.into(),
        password.into(),
        host.into(),
        port.into(),
        path.into(),
    )
}

#[test]
fn postgres_databases_are_empty_separate_and_dropped() {
    let psql = |url: &str, sql: &str| {
        let (user, password, host, port, name) = url_parts(url);
        run_output(
            Command::new(require_tool("psql"))
                .env("PGPASSWORD", password)
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .args([
                    "-h", &host, "-p", &port, "-U", &user, "-d", &name, "-c", sql,
                ]),
            Duration::from_secs(30),
        )
    };
    let one = postgres_database();
    let two = postgres_database();
    assert!(one.url.starts_with("postgres://") && one.url.ends_with(&one.name));
    assert_ne!(one.name, two.name);
    let made = psql(&one.url, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
    assert!(made.status.success(), "{made:?}");
    let read = psql(&one.url, "SELECT x FROM t");
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "7");
    let elsewhere = psql(&two.url, "SELECT count(*) FROM t");
    assert!(
        !elsewhere.status.success(),
        "the table leaked into another database"
    );
    let url = one.url.clone();
    drop(one);
    assert!(!psql(&url, "SELECT 1").status.success(), "not dropped");
}

#[test]
fn mysql_databases_are_empty_separate_and_dropped() {
    let mariadb = |url: &str, sql: &str| {
        let (user, password, host, port, name) = url_parts(url);
        run_output(
            Command::new(require_tool("mariadb"))
                .env("MYSQL_PWD", password)
                .args([
                    "--no-defaults",
                    "--protocol=TCP",
                    "-N",
                    "-h",
                    &host,
                    "-P",
                    &port,
                ])
                .args(["-u", &user, "-D", &name, "-e", sql]),
            Duration::from_secs(30),
        )
    };
    let one = mysql_database();
    let two = mysql_database();
    assert!(one.url.starts_with("mysql://") && one.url.ends_with(&one.name));
    let made = mariadb(&one.url, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
    assert!(made.status.success(), "{made:?}");
    let read = mariadb(&one.url, "SELECT x FROM t");
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "7");
    assert!(!mariadb(&two.url, "SELECT count(*) FROM t").status.success());
    let url = one.url.clone();
    drop(one);
    assert!(!mariadb(&url, "SELECT 1").status.success(), "not dropped");
}

#[test]
fn s3_folders_take_signed_objects_and_refuse_a_wrong_key() {
    let bucket = s3_bucket();
    let other = s3_bucket();
    assert_ne!(bucket.prefix, other.prefix);
    let key = Some("blobs/sha256/ab");
    assert_eq!(bucket.request("PUT", key, b"layer bytes").0, 200);
    assert_eq!(
        bucket.request("GET", key, b""),
        (200, "layer bytes".to_owned())
    );
    let (status, listing) = bucket.request("GET", None, b"");
    assert_eq!(status, 200);
    assert!(
        listing.contains(&format!("<Key>{}/blobs/sha256/ab</Key>", bucket.prefix)),
        "{listing}"
    );
    assert_eq!(other.request("GET", key, b"").0, 404);
    let forged = S3Bucket {
        secret_access_key: "wrong".into(),
        ..bucket
    };
    assert_eq!(forged.request("GET", key, b"").0, 403);
}

#[test]
fn azure_containers_take_shared_key_signed_blobs() {
    let container = azure_container();
    let other = azure_container();
    assert_ne!(container.container, other.container);
    assert_eq!(container.request("PUT", Some("a/b"), b"layer bytes").0, 201);
    assert_eq!(
        container.request("GET", Some("a/b"), b""),
        (200, "layer bytes".to_owned())
    );
    let (status, listing) = container.request("GET", None, b"");
    assert_eq!(status, 200);
    assert!(listing.contains("<Name>a/b</Name>"), "{listing}");
    assert_eq!(other.request("GET", Some("a/b"), b"").0, 404);
    let forged = AzureContainer {
        endpoint: container.endpoint.clone(),
        account: container.account.clone(),
        access_key: "d3Jvbmc=".into(),
        container: container.container.clone(),
    };
    assert_eq!(forged.request("GET", Some("a/b"), b"").0, 403);
}

/// curl with the blobstore's basic auth (or none); the HTTP status, the body in `out`.
fn dav_curl(user: Option<(&str, &str)>, args: &[&str], out: &Path) -> String {
    let config = user
        .map(|(u, p)| format!("user = \"{u}:{p}\"\n"))
        .unwrap_or_default();
    let output = run_output_with_input(
        Command::new(require_tool("curl"))
            .args(["-sS", "-K", "-", "-w", "%{http_code}", "-o"])
            .arg(out)
            .args(args),
        config.as_bytes(),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn webdav_allows_what_the_capi_blobstore_allows() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = (dir.path().join("in"), dir.path().join("out"));
    fs::write(&file, b"layer bytes").unwrap();
    let dav = webdav();
    let other = webdav();
    assert!(dav.url.ends_with('/') && dav.url != other.url);
    let (user, password) = (dav.username.clone(), dav.password.clone());
    let auth = Some((user.as_str(), password.as_str()));
    let blob = format!("{}ab/cd/blob", dav.url);
    let f = file.to_str().unwrap();
    assert_eq!(dav_curl(None, &["-T", f, &blob], &out), "401");
    // Missing parent directories are created (create_full_put_path).
    assert_eq!(dav_curl(auth, &["-T", f, &blob], &out), "201");
    assert_eq!(dav_curl(auth, &[&blob], &out), "200");
    assert_eq!(fs::read(&out).unwrap(), b"layer bytes");
    let copy = format!("{}ab/copy", dav.url);
    let destination = format!("Destination: {copy}");
    assert_eq!(
        dav_curl(auth, &["-X", "COPY", "-H", &destination, &blob], &out),
        "204"
    );
    assert_eq!(dav_curl(auth, &[&copy], &out), "200");
    let propfind = dav_curl(auth, &["-X", "PROPFIND", "-H", "Depth: 1", &dav.url], &out);
    assert_eq!(propfind, "207");
    let moved = format!("Destination: {}moved", dav.url);
    assert_eq!(
        dav_curl(auth, &["-X", "MOVE", "-H", &moved, &blob], &out),
        "405"
    );
    let collection = format!("{}new/", dav.url);
    assert_eq!(dav_curl(auth, &["-X", "MKCOL", &collection], &out), "405");
    assert_eq!(dav_curl(auth, &["-X", "DELETE", &blob], &out), "204");
    assert_eq!(dav_curl(auth, &[&blob], &out), "404");
    let url = dav.url.clone();
    drop(dav);
    assert_eq!(dav_curl(auth, &[&copy], &out), "404", "{url} not deleted");
}

/// Whether something accepts connections on `addr`.
fn listening(addr: &str) -> bool {
    TcpStream::connect(addr).is_ok()
}

/// Starts `test-services`, waits for its environment file, and returns it with the addresses
/// its servers listen on.
fn start_services(env: &Path) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_test-services"))
        .arg(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start test-services");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !env.exists() {
        assert!(child.try_wait().unwrap().is_none(), "test-services exited");
        assert!(Instant::now() < deadline, "test-services not ready");
        thread::sleep(Duration::from_millis(100));
    }
    let lines = fs::read_to_string(env).unwrap();
    let mut addresses = Vec::new();
    for name in [
        "BERTH_TEST_POSTGRES",
        "BERTH_TEST_MYSQL",
        "BERTH_TEST_S3",
        "BERTH_TEST_AZURE",
        "BERTH_TEST_WEBDAV",
    ] {
        let value = lines
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing from {lines}"));
        let authority = value
            .split_once("://")
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap();
        let address = authority.rsplit('@').next().unwrap().to_owned();
        assert!(listening(&address), "{name}={value} does not listen");
        addresses.push(address);
    }
    (child, addresses)
}

fn assert_all_gone(addresses: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while addresses.iter().any(|a| listening(a)) {
        assert!(
            Instant::now() < deadline,
            "still listening: {:?}",
            addresses
                .iter()
                .filter(|a| listening(a))
                .collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn test_services_stops_every_server_when_its_input_closes_or_it_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("first.env");
    let (mut services, addresses) = start_services(&env);
    services.stdin.take().unwrap().flush().unwrap();
    let status = services.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_all_gone(&addresses);

    let env = dir.path().join("second.env");
    let (mut services, addresses) = start_services(&env);
    stop_child(&mut services, Duration::from_secs(1));
    assert_all_gone(&addresses);
}
