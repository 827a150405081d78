//! The upstream side of the pull-through cache tests, for the registry's and the cacher's: CNCF
//! distribution playing Docker Hub, and a counting proxy in front of it that can answer 429 like
//! Docker Hub, corrupt blobs, or stop.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use tempfile::TempDir;

use crate::{
    free_port, print_log_on_panic, require_tool, run, spawn_logged, stop_child, tail_file,
};

/// Debian's `docker-registry` (CNCF distribution 2.8), with htpasswd Basic authentication when
/// given a login. Dropping it stops it.
pub struct Distribution {
    dir: TempDir,
    addr: SocketAddr,
    login: Option<(String, String)>,
    child: Option<Child>,
}

impl Distribution {
    pub fn start(login: Option<(&str, &str)>) -> Distribution {
        let binary = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("berth-upstream-")
            .tempdir()
            .expect("a temporary directory");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let auth = match login {
            Some((user, password)) => {
                let htpasswd = dir.path().join("htpasswd");
                let line = run(Command::new(require_tool("htpasswd"))
                    .args(["-nbB", "-C", "4", user, password]));
                fs::write(&htpasswd, line.trim().to_owned() + "\n").expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: upstream\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: berth-e2e\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .expect("write the distribution config");
        let child = spawn_logged(
            Command::new(&binary).arg("serve").arg(&config),
            &dir.path().join("log"),
        );
        let distribution = Distribution {
            dir,
            addr,
            login: login.map(|(u, p)| (u.into(), p.into())),
            child: Some(child),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not start\n{}",
                tail_file(&distribution.dir.path().join("log"), 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        distribution
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as image references spell it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Copies image `tag` of the OCI layout at `layout` to `repo_tag` here with skopeo, as its
    /// publisher would, with more `skopeo copy` options (`--all`, `--format v2s2`).
    pub fn push_layout(&self, layout: &Path, tag: &str, repo_tag: &str, options: &[&str]) {
        let mut copy = Command::new(require_tool("skopeo"));
        // The host's signature policy is not under test.
        copy.args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
            .args(options);
        if let Some((user, password)) = &self.login {
            copy.arg("--dest-creds").arg(format!("{user}:{password}"));
        }
        run(copy
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr)));
    }

    /// A scratch directory that lives as long as the upstream.
    pub fn scratch(&self) -> std::path::PathBuf {
        self.dir.path().join("scratch")
    }
}

impl Distribution {
    /// Stops serving, as a registry that went down; the storage stays until the value is dropped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        print_log_on_panic("docker-registry", &self.dir.path().join("log"));
        self.stop();
    }
}

/// What the counting proxy does besides relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Relay,
    /// Docker Hub with the pull limit spent: 429 with its `ratelimit-*` and `retry-after`.
    RateLimited,
    /// Manifest and blob bodies arrive with their first byte flipped, their length kept.
    Corrupt,
    /// Manifest and blob GETs are answered a second late, so clients asking at once overlap.
    Slow,
}

struct Shared {
    upstream: SocketAddr,
    client: reqwest::Client,
    mode: Mutex<Mode>,
    log: Mutex<Vec<(String, String)>>,
    /// Manifest GETs left, as Docker Hub counts pulls, reported in `ratelimit-remaining`.
    remaining: AtomicU64,
}

/// PULL_LIMIT pulls per window, as the counting proxy reports them.
pub const PULL_LIMIT: u64 = 100;

/// A relaying HTTP proxy in front of the upstream that logs every request's method and path and
/// reports Docker Hub's `ratelimit-*` headers on manifest GETs. Dropping it stops it.
pub struct CountingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CountingProxy {
    pub fn start(upstream: SocketAddr) -> CountingProxy {
        let shared = Arc::new(Shared {
            upstream,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client"),
            mode: Mutex::new(Mode::Relay),
            log: Mutex::default(),
            remaining: AtomicU64::new(PULL_LIMIT),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("a local address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a proxy runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                let router = axum::Router::new().fallback(relay).with_state(state);
                tokio::spawn(async move { axum::serve(listener, router).await });
                let _ = stopped.await;
            });
            // Dropping the runtime closes the listener and every connection at once: the
            // upstream is gone as if its host went down.
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        CountingProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Requests whose method is `method` and whose path contains `needle`.
    pub fn count(&self, method: &str, needle: &str) -> usize {
        let log = self.shared.log.lock().unwrap();
        log.iter()
            .filter(|(m, path)| m == method && path.contains(needle))
            .count()
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Stops answering: connections are refused from now on.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn relay(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    shared
        .log
        .lock()
        .unwrap()
        .push((method.to_string(), path.clone()));
    let mode = *shared.mode.lock().unwrap();
    if mode == Mode::RateLimited && path != "/v2/" {
        let mut response = Response::new(Body::from(
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#,
        ));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let headers = response.headers_mut();
        headers.insert("ratelimit-limit", rate_limit(PULL_LIMIT));
        headers.insert("ratelimit-remaining", rate_limit(0));
        headers.insert("retry-after", HeaderValue::from_static("60"));
        return response;
    }
    let content = path.contains("/manifests/") || path.contains("/blobs/");
    if mode == Mode::Slow && method == "GET" && content {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut upstream = shared
        .client
        .request(method.clone(), format!("http://{}{path}", shared.upstream));
    for (name, value) in request.headers() {
        if name != "host" {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(err) => {
            let mut response = Response::new(Body::from(err.to_string()));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            return response;
        }
    };
    let status = answer.status();
    let mut response = Response::builder().status(status.as_u16());
    for (name, value) in answer.headers() {
        response = response.header(name, value);
    }
    if method == "GET" && path.contains("/manifests/") && status.is_success() {
        let left = shared.remaining.fetch_sub(1, Ordering::SeqCst) - 1;
        response = response
            .header("ratelimit-limit", rate_limit(PULL_LIMIT))
            .header("ratelimit-remaining", rate_limit(left));
    }
    let corrupt = mode == Mode::Corrupt
        && (path.contains("/blobs/") || path.contains("/manifests/"))
        && method == "GET";
    let mut first = true;
    let body = answer.bytes_stream().map(move |chunk| {
        chunk.map(|chunk| {
            if corrupt && first && !chunk.is_empty() {
                first = false;
                let mut flipped = chunk.to_vec();
                flipped[0] ^= 0xff;
                return flipped.into();
            }
            chunk
        })
    });
    response
        .body(Body::from_stream(body))
        .expect("a relayed response")
}

fn rate_limit(count: u64) -> HeaderValue {
    HeaderValue::try_from(format!("{count};w=21600")).expect("a header value")
}

/// A password file for the registry's upstream login.
pub fn password_file(dir: &Path, password: &str) -> std::path::PathBuf {
    let file = dir.join("upstream-password");
    fs::write(&file, format!("{password}\n")).expect("write the password file");
    file
}
