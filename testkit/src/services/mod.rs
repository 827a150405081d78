//! The storage and database servers the shared backends are tested against, each giving a test
//! a resource of its own (a database, a bucket, a container, a directory) on a server shared by
//! many tests.
//!
//! Each service reads its server from an environment variable when it is set, so that one set
//! of servers (started by the `test-services` binary, as `ci/test` does) serves every test
//! process of a run:
//!
//! | variable | value |
//! |---|---|
//! | `BERTH_TEST_POSTGRES` | `postgres://USER:PASSWORD@127.0.0.1:PORT/postgres`, a superuser |
//! | `BERTH_TEST_MYSQL` | `mysql://USER:PASSWORD@127.0.0.1:PORT`, a user with all privileges and the grant option |
//! | `BERTH_TEST_S3` | `http://ACCESS_KEY_ID:SECRET_ACCESS_KEY@127.0.0.1:PORT`, an S3 endpoint (path-style, region `us-east-1`) whose key may create buckets |
//! | `BERTH_TEST_AZURE` | `http://127.0.0.1:PORT/devstoreaccount1`, an Azurite blob endpoint with the well-known development account and key |
//! | `BERTH_TEST_WEBDAV` | `http://USER:PASSWORD@127.0.0.1:PORT/admin/`, the writable WebDAV root |
//!
//! Without it, the first use in a test process starts a private server in a temporary
//! directory. Every server runs under a small shell watchdog that stops it and removes its
//! directory once the process that started it is gone, since a server kept in a `static` is
//! never dropped and nextest ends each test process without unwinding it. User names and
//! passwords are plain words: the URLs carry them without percent-encoding.

mod azure;
mod mysql;
mod postgres;
mod s3;
mod webdav;

pub use azure::{AZURITE_ACCOUNT, AZURITE_KEY, AzureContainer, azure_container};
pub use mysql::{MysqlDatabase, mysql_database};
pub use postgres::{PgDatabase, postgres_database};
pub use s3::{S3_REGION, S3Bucket, s3_bucket};
pub use webdav::{WebDav, webdav};

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::process::{require_tool, short_tempdir, spawn_logged, tail_file, wait_timeout};

/// How long a server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The user name and password of the private servers.
const USER: &str = "berth";
const PASSWORD: &str = "berth-test-password";

/// A server started by this process, with the environment variable that hands it to others.
pub struct PrivateServer {
    /// The environment variable, such as `BERTH_TEST_POSTGRES`.
    pub variable: &'static str,
    /// Its value, in the format the module documentation gives.
    pub value: String,
    watchdog: Child,
    log: PathBuf,
}

impl PrivateServer {
    /// Stops the server and removes its directory, waiting for both.
    pub fn stop(mut self) {
        crate::process::send_signal(self.watchdog.id(), "TERM");
        if wait_timeout(&mut self.watchdog, Duration::from_secs(30)).is_none() {
            let _ = self.watchdog.kill();
            let _ = self.watchdog.wait();
        }
    }

    /// The tail of the server's log.
    pub fn log_tail(&self) -> String {
        tail_file(&self.log, crate::process::LOG_TAIL_LINES)
    }
}

/// Starts every service's server at once, as the `test-services` binary does.
pub fn start_all() -> Vec<PrivateServer> {
    let starts: [fn() -> PrivateServer; 5] = [
        postgres::start,
        mysql::start,
        s3::start,
        azure::start,
        webdav::start,
    ];
    thread::scope(|scope| {
        let handles: Vec<_> = starts.iter().map(|start| scope.spawn(start)).collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        if results.iter().any(Result::is_err) {
            for server in results.into_iter().flatten() {
                server.stop();
            }
            panic!("a service did not start (its error is above)");
        }
        results.into_iter().flatten().collect()
    })
}

/// A service's server: the one `variable` names, or a private one.
type ServerCell = std::sync::OnceLock<(String, Option<PrivateServer>)>;

/// The value of `variable`, or that of a private server started (once per process) by `start`.
fn server_value(
    variable: &'static str,
    cell: &'static ServerCell,
    start: fn() -> PrivateServer,
) -> &'static str {
    &cell
        .get_or_init(|| match std::env::var(variable) {
            Ok(value) if !value.is_empty() => (value, None),
            _ => {
                let server = start();
                (server.value.clone(), Some(server))
            }
        })
        .0
}

/// A name no other test, process or run has used: `t` and hex parts joined by `separator`.
fn unique_name(separator: char) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    format!(
        "t{separator}{nanos:x}{separator}{:x}{separator}{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A server's directory, kept after this function returns: the watchdog removes it.
struct ServerDir {
    path: PathBuf,
    /// Whether this process runs as root, so servers that refuse root need another user.
    root: bool,
}

fn server_dir(prefix: &str) -> ServerDir {
    let path = short_tempdir(prefix).keep();
    let root = fs::metadata(&path)
        .expect("stat the server directory")
        .uid()
        == 0;
    ServerDir { path, root }
}

/// The parts of `scheme://user:password@host:port/path`.
struct ServerUrl {
    scheme: String,
    user: String,
    password: String,
    host: String,
    port: u16,
    path: String,
}

impl ServerUrl {
    fn parse(variable: &str, url: &str) -> ServerUrl {
        let bad = || -> ServerUrl {
            panic!("{variable}={url:?} is not scheme://[user:password@]host:port[/path]")
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return bad();
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (u, h),
            None => ("", authority),
        };
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return bad();
        };
        let Ok(port) = port.parse() else {
            return bad();
        };
        ServerUrl {
            scheme: scheme.to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        }
    }

    /// `scheme://host:port`, without credentials or path.
    fn origin(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Starts `program args` under a watchdog, all output to `log`. The watchdog sends `signal` to
/// the server (then SIGKILL after ten seconds) and removes `dir` when this process is gone or
/// when the watchdog itself receives SIGTERM. A server that exits on its own leaves the file
/// `exited` in `dir`, which stays until then so that its log can be shown.
fn spawn_supervised(
    dir: &Path,
    log: &Path,
    signal: &str,
    program: &Path,
    args: &[String],
) -> Child {
    const WATCHDOG: &str = r#"parent=$1 dir=$2 sig=$3
shift 3
"$@" &
server=$!
stop=
trap 'stop=1' TERM INT HUP
while [ -z "$stop" ] && kill -0 "$parent" 2>/dev/null && kill -0 "$server" 2>/dev/null; do
  sleep 0.2
done
if [ -z "$stop" ] && ! kill -0 "$server" 2>/dev/null; then
  : >"$dir/exited"
  while [ -z "$stop" ] && kill -0 "$parent" 2>/dev/null; do sleep 0.2; done
fi
kill -s "$sig" "$server" 2>/dev/null
i=0
while kill -0 "$server" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
kill -s KILL "$server" 2>/dev/null
wait "$server"
rm -rf "$dir"
"#;
    let mut cmd = Command::new(require_tool("sh"));
    cmd.arg("-c")
        .arg(WATCHDOG)
        .arg("watchdog")
        .arg(std::process::id().to_string())
        .arg(dir)
        .arg(signal)
        .arg(program)
        .args(args);
    spawn_logged(&mut cmd, log)
}

/// A server's start: its server, or why it did not start.
type Started = Result<PrivateServer, String>;

/// Runs `attempt` until it starts the server, three times at most: a port found free may be
/// taken (often as the source port of an outgoing connection) before the server binds it.
fn start_retrying(what: &str, attempt: fn() -> Started) -> PrivateServer {
    let mut failures = Vec::new();
    for _ in 0..3 {
        match attempt() {
            Ok(server) => return server,
            Err(e) => failures.push(e),
        }
    }
    panic!(
        "{what} did not start:\n{}",
        failures.join("\n---- next attempt ----\n")
    );
}

/// Waits until `ready` holds. If the server exits or `START_TIMEOUT` passes first, stops it and
/// returns the tail of its log.
fn wait_ready(
    dir: &Path,
    watchdog: &mut Child,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        let exited = dir.join("exited").exists();
        if exited || Instant::now() >= deadline {
            let tail = tail_file(log, crate::process::LOG_TAIL_LINES);
            crate::process::send_signal(watchdog.id(), "TERM");
            let _ = wait_timeout(watchdog, Duration::from_secs(15));
            return Err(format!(
                "{} within {START_TIMEOUT:?}; the end of its log:\n{tail}",
                if exited { "exited" } else { "not ready" }
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.1 request over a new connection; the status and body of the answer, or `None` if
/// the server cannot be reached.
fn http(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect((host, port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_split_into_their_parts() {
        let url = ServerUrl::parse("V", "postgres://berth:pw@127.0.0.1:5432/postgres");
        assert_eq!(
            (
                url.scheme.as_str(),
                url.user.as_str(),
                url.password.as_str()
            ),
            ("postgres", "berth", "pw")
        );
        assert_eq!((url.host.as_str(), url.port), ("127.0.0.1", 5432));
        assert_eq!(url.path, "/postgres");
        assert_eq!(url.origin(), "postgres://127.0.0.1:5432");
        let bare = ServerUrl::parse("V", "http://127.0.0.1:10000");
        assert_eq!((bare.user.as_str(), bare.path.as_str()), ("", ""));
    }

    #[test]
    fn unique_names_differ_within_a_process() {
        assert_ne!(unique_name('_'), unique_name('_'));
    }
}
