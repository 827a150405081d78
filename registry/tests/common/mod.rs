//! Shared harness for the end-to-end tests: a berth-registry child process on a free loopback port
//! with its own storage root, generated OCI images written as OCI image layouts, and private
//! instances of the real clients' daemons (dockerd, containerd) and stores (podman).
//!
//! A missing tool is a test failure, never a skip: see [`require_tool`].
//!
//! Set `BERTH_E2E_REGISTRY_BIN` to run the tests against another executable that honours the same
//! environment contract (`BERTH_LISTEN`, `BERTH_STORAGE_ROOT`, ...) instead of the binary Cargo
//! built; useful to check the tests themselves against a reference registry.

#![allow(dead_code, unreachable_pub)]

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use tempfile::TempDir;

pub use berth_testkit::*;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Tools and processes
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Minimal blocking HTTP, for the readiness probe (no async runtime needed)
// ---------------------------------------------------------------------------------------------

/// A raw HTTP/1.1 response: status, lowercased header names, body (whatever arrived before close).
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` with `Connection: close`, reading until the server closes.
pub fn blocking_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<RawResponse> {
    blocking_request(addr, "GET", path, &[], timeout)
}

/// `method target` with `body` on `addr` with `Connection: close`, reading until the server
/// closes. `target` is sent exactly as given, so it can hold what an HTTP client would normalise
/// away (`..` segments, encoded dots).
pub fn blocking_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<RawResponse> {
    blocking_request_with(addr, method, target, &[("Accept", "*/*")], body, timeout)
}

/// Like [`blocking_request`], with `headers` (after `Host`, `Connection` and `Content-Length`)
/// in place of the `Accept: */*` it sends.
pub fn blocking_request_with(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers in the response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(RawResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// The registry under test
// ---------------------------------------------------------------------------------------------

/// A running berth-registry child: its own storage root in a temporary directory, a fixed port on
/// 127.0.0.1 kept across restarts, stdout and stderr appended to `server.log` in the temporary
/// directory. Dropping it kills the process and removes the directory; if the test is panicking the
/// tail of the log is printed first.
pub struct Registry {
    dir: TempDir,
    addr: SocketAddr,
    child: Option<Child>,
    starts: u32,
    tls: Option<Tls>,
    /// The configuration file passed with `--config`, if any.
    config: Option<PathBuf>,
    /// Extra environment, applied after the defaults (so it can override `BERTH_LOG`).
    env: Vec<(String, String)>,
}

/// The PEM certificate chain and private key a registry serves HTTPS with.
#[derive(Clone, Debug)]
pub struct Tls {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl Tls {
    /// A self-signed leaf for 127.0.0.1 in `dir`, its own trust anchor (CA:FALSE, or rustls
    /// refuses it as a leaf).
    pub fn generate(dir: &Path) -> Tls {
        let (certificate, private_key) = loopback_server_certificate(dir);
        Tls {
            certificate,
            private_key,
        }
    }

    /// A client that trusts this certificate and nothing else.
    pub fn client(&self) -> reqwest::Client {
        let pem = fs::read(&self.certificate).expect("read the certificate");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM certificate"))
            .build()
            .expect("an HTTPS client")
    }
}

impl Registry {
    fn binary() -> PathBuf {
        std::env::var_os("BERTH_E2E_REGISTRY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_berth-registry")))
    }

    /// Starts a registry on a free port with an empty storage root and waits until `GET /v2/`
    /// answers 200.
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// Like [`Registry::start`], serving HTTPS with `tls`; ready once it accepts connections, as
    /// the plain-HTTP probe cannot speak TLS.
    pub fn start_tls(tls: Tls) -> Registry {
        Registry::start_with(Some(tls))
    }

    /// Starts a registry with `yaml` as its configuration file (`--config`, kept in its temporary
    /// directory as `config.yml`); ready once `GET /v2/` answers 200 or, as it does when access
    /// control is on, 401.
    pub fn start_with_config(yaml: &str) -> Registry {
        Registry::start_configured(yaml, &[])
    }

    /// Like [`Registry::start_with_config`], with extra environment variables for the process
    /// (`BERTH_LOG` among them overrides the default level).
    pub fn start_configured(yaml: &str, env: &[(&str, &str)]) -> Registry {
        Registry::start_configured_with(None, yaml, env)
    }

    /// Like [`Registry::start_with_config`], serving HTTPS with `tls`.
    pub fn start_tls_configured(tls: Tls, yaml: &str) -> Registry {
        Registry::start_configured_with(Some(tls), yaml, &[])
    }

    fn start_configured_with(tls: Option<Tls>, yaml: &str, env: &[(&str, &str)]) -> Registry {
        let mut registry = Registry::prepare(tls);
        let path = registry.dir.path().join("config.yml");
        fs::write(&path, yaml).expect("write the registry configuration");
        registry.config = Some(path);
        registry.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        registry.spawn();
        registry
    }

    fn start_with(tls: Option<Tls>) -> Registry {
        let mut registry = Registry::prepare(tls);
        registry.spawn();
        registry
    }

    fn prepare(tls: Option<Tls>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        fs::create_dir_all(dir.path().join("root")).expect("create the storage root");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Registry {
            dir,
            addr,
            child: None,
            starts: 0,
            tls,
            config: None,
            env: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the registry is already running");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the server log");
        writeln!(
            log,
            "===== berth-e2e: start #{} on {} =====",
            self.starts, self.addr
        )
        .expect("write the server log");
        let stderr = log.try_clone().expect("clone the log handle");
        let level = std::env::var("BERTH_LOG").unwrap_or_else(|_| "info".to_string());
        let binary = Self::binary();
        let mut command = Command::new(&binary);
        command
            .arg("serve")
            .env("BERTH_LISTEN", self.addr.to_string())
            .env("BERTH_STORAGE_ROOT", self.root())
            .env("BERTH_LOG_FORMAT", "plain")
            .env("BERTH_LOG", level)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        if let Some(tls) = &self.tls {
            command
                .env("BERTH_TLS_CERTIFICATE", &tls.certificate)
                .env("BERTH_TLS_PRIVATE_KEY", &tls.private_key);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("a running child");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!(
                    "berth-registry exited with {status} before answering GET /v2/ on {}\n--- server log ---\n{}",
                    self.addr,
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            let Err(last) = self.probe() else { return };
            if Instant::now() >= deadline {
                self.kill_hard();
                panic!(
                    "berth-registry was not ready on {} within {READY_TIMEOUT:?} (last: {last})\n--- server log ---\n{}",
                    self.addr,
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the registry serves yet: `GET /v2/` answers 200 (or 401 when it has a
    /// configuration file, which may turn access control on), or over TLS, which this probe cannot
    /// speak, it accepts connections (it listens only once fully set up).
    fn probe(&self) -> Result<(), String> {
        let timeout = Duration::from_secs(1);
        if self.tls.is_some() {
            return TcpStream::connect_timeout(&self.addr, timeout)
                .map(drop)
                .map_err(|e| e.to_string());
        }
        match blocking_get(self.addr, "/v2/", timeout) {
            Ok(resp) if resp.status == 200 => Ok(()),
            Ok(resp) if resp.status == 401 && self.config.is_some() => Ok(()),
            Ok(resp) => Err(format!("status {}", resp.status)),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry host as image references spell it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`, or `https://` when serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The storage root (`BERTH_STORAGE_ROOT`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A scratch directory that lives as long as the registry.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit status. `None` if it did not exit (it is
    /// then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        send_signal(self.pid()?, "TERM");
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the process to exit by itself, as after a signal sent with
    /// [`Registry::signal`]. `None` if it did not (it is then killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let status = wait_timeout(&mut child, timeout);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// Starts the registry again on the same storage root and port (killing it first if it runs).
    pub fn restart(&mut self) {
        self.kill_hard();
        self.spawn();
    }

    /// The configuration file it was started with.
    pub fn config_path(&self) -> &Path {
        self.config
            .as_deref()
            .expect("the registry was started with a configuration file")
    }

    /// Replaces the configuration file (the running process reads it again on SIGHUP).
    pub fn write_config(&self, yaml: &str) {
        fs::write(self.config_path(), yaml).expect("write the registry configuration");
    }

    /// Sends `signal` (a name such as `HUP`) to the running process.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid().expect("the registry is running"), signal);
    }

    /// Sends SIGHUP and waits until the log reports the outcome of the reload it triggers: `true`
    /// if the access control was reloaded, `false` if the reload failed (the running configuration
    /// is then kept).
    pub fn reload(&self) -> bool {
        const DONE: &str = "access control reloaded";
        const FAILED: &str = "reload failed";
        let count = |log: &str| (log.matches(DONE).count(), log.matches(FAILED).count());
        let before = count(&self.log());
        self.signal("HUP");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let now = count(&self.log());
            if now.0 > before.0 {
                return true;
            }
            if now.1 > before.1 {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "berth-registry logged no reload within {READY_TIMEOUT:?} of SIGHUP\n--- server log ---\n{}",
                tail_file(&self.log_path(), LOG_TAIL_LINES)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill_hard();
        print_log_on_panic("berth-registry", &self.log_path());
    }
}

// ---------------------------------------------------------------------------------------------
// Generated content
// ---------------------------------------------------------------------------------------------

/// A gzipped tar layer and the digest of its uncompressed tar (the config's diff_id).
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// A tar archive holding a directory `layer-<tag>/` with three files of random bytes adding up to
/// about `size` bytes and a small text file; deterministic for a given `rng` state.
pub fn layer_tar(rng: &mut Rng, tag: &str, size: usize) -> Vec<u8> {
    const MTIME: u64 = 1_700_000_000;
    let mut builder = tar::Builder::new(Vec::new());
    let dir = format!("layer-{tag}/");
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header.set_size(0);
    builder
        .append_data(&mut header, &dir, std::io::empty())
        .expect("append a directory to the tar");
    let mut file = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, format!("{dir}{name}"), data)
            .expect("append a file to the tar");
    };
    let part = size / 3;
    for k in 0..3 {
        let len = if k == 2 { size - 2 * part } else { part };
        file(&format!("random-{k}.bin"), &rng.bytes(len));
    }
    file(
        "README",
        format!("berth end-to-end test layer {tag}\n").as_bytes(),
    );
    builder.into_inner().expect("finish the tar")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

pub fn make_layer(rng: &mut Rng, tag: &str, size: usize) -> Layer {
    let tar = layer_tar(rng, tag, size);
    Layer {
        diff_id: sha256(&tar),
        blob: Blob::new(OCI_LAYER_GZIP, gzip(&tar)),
    }
}

/// A single-platform OCI image: layers, config and manifest.
#[derive(Clone, Debug)]
pub struct Image {
    pub architecture: String,
    pub os: String,
    pub layers: Vec<Layer>,
    pub config: Blob,
    pub manifest: Blob,
}

impl Image {
    /// An image for linux/`architecture` with one layer per entry of `layer_sizes` (approximate
    /// uncompressed sizes), all content derived from `seed`.
    pub fn generate(seed: u64, architecture: &str, layer_sizes: &[usize]) -> Image {
        let mut rng = Rng::new(seed);
        let layers = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| make_layer(&mut rng, &format!("{seed}-{architecture}-{i}"), size))
            .collect();
        Image::from_layers(seed, architecture, layers)
    }

    /// An image for linux/`architecture` over the given layers.
    pub fn from_layers(seed: u64, architecture: &str, layers: Vec<Layer>) -> Image {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let history: Vec<Value> =
            (0..layers.len()).map(|i| json!({ "created": "2024-01-01T00:00:00Z", "created_by": format!("berth e2e layer {i}") })).collect();
        let config = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "Labels": { "org.berth.e2e.seed": seed.to_string() }
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        let config = Blob::new(
            OCI_CONFIG,
            serde_json::to_vec(&config).expect("serialize the config"),
        );
        let layer_descriptors: Vec<Value> = layers.iter().map(|l| l.blob.descriptor()).collect();
        // Pretty-printed on purpose: a registry that re-serialises manifests would change the bytes.
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layer_descriptors,
            "annotations": { "org.opencontainers.image.description": format!("berth e2e image {seed} {architecture}") }
        });
        let manifest = Blob::new(
            OCI_MANIFEST,
            serde_json::to_vec_pretty(&manifest).expect("serialize the manifest"),
        );
        Image {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            layers,
            config,
            manifest,
        }
    }

    /// Config and layers: every blob the manifest references.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut blobs = vec![&self.config];
        blobs.extend(self.layers.iter().map(|l| &l.blob));
        blobs
    }

    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.blob.digest.clone()).collect()
    }
}

/// A multi-platform image: an OCI index over single-platform images.
#[derive(Clone, Debug)]
pub struct MultiArchImage {
    pub index: Blob,
    pub images: Vec<Image>,
}

impl MultiArchImage {
    /// linux/amd64 and linux/arm64 images that share their first (base) layer, and the index over
    /// them.
    pub fn generate(seed: u64) -> MultiArchImage {
        let mut rng = Rng::new(seed);
        let base = make_layer(&mut rng, &format!("{seed}-base"), 200 * 1024);
        let images: Vec<Image> = ["amd64", "arm64"]
            .iter()
            .enumerate()
            .map(|(i, arch)| {
                let own = make_layer(
                    &mut rng,
                    &format!("{seed}-{arch}"),
                    100 * 1024 + i * 37 * 1024,
                );
                Image::from_layers(seed, arch, vec![base.clone(), own])
            })
            .collect();
        let manifests: Vec<Value> = images
            .iter()
            .map(|img| {
                let mut d = img.manifest.descriptor();
                d["platform"] = json!({ "architecture": img.architecture, "os": img.os });
                d
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        let index = Blob::new(
            OCI_INDEX,
            serde_json::to_vec_pretty(&index).expect("serialize the index"),
        );
        MultiArchImage { index, images }
    }

    /// Every blob below the index: manifests, configs, layers (deduplicated later by the writer).
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut blobs = Vec::new();
        for img in &self.images {
            blobs.push(&img.manifest);
            blobs.extend(img.blobs());
        }
        blobs
    }
}

// ---------------------------------------------------------------------------------------------
// OCI image layouts on disk
// ---------------------------------------------------------------------------------------------

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("not a digest: {digest}"));
    layout.join("blobs").join(algorithm).join(hex)
}

/// Writes an OCI image layout at `layout`: `oci-layout`, the blobs (including `top`), and an
/// `index.json` whose only entry points at `top` (a manifest or an index) under the name `tag`.
pub fn write_oci_layout(layout: &Path, tag: &str, top: &Blob, blobs: &[&Blob]) {
    fs::create_dir_all(layout.join("blobs/sha256")).expect("create blobs/sha256");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write oci-layout");
    for blob in blobs.iter().copied().chain(std::iter::once(top)) {
        fs::write(blob_path(layout, &blob.digest), &blob.bytes).expect("write a blob");
    }
    let mut descriptor = top.descriptor();
    descriptor["annotations"] = json!({ REF_NAME: tag });
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor] });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec_pretty(&index).expect("serialize index.json"),
    )
    .expect("write index.json");
}

/// The descriptor named `tag` in the layout's `index.json`: (mediaType, digest, size).
pub fn read_layout_ref(layout: &Path, tag: &str) -> (String, String, u64) {
    let text = fs::read_to_string(layout.join("index.json")).expect("read index.json");
    let index: Value = serde_json::from_str(&text).expect("index.json is JSON");
    let found = index["manifests"]
        .as_array()
        .expect("index.json has manifests")
        .iter()
        .find(|d| d["annotations"][REF_NAME] == tag)
        .unwrap_or_else(|| panic!("no entry named {tag:?} in index.json: {text}"));
    (
        found["mediaType"].as_str().unwrap_or_default().to_string(),
        found["digest"]
            .as_str()
            .expect("descriptor digest")
            .to_string(),
        found["size"].as_u64().expect("descriptor size"),
    )
}

/// A blob of the layout, checked to hash to its name.
pub fn read_layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let path = blob_path(layout, digest);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        sha256(&bytes),
        digest,
        "layout blob {} does not hash to its name",
        path.display()
    );
    bytes
}

// ---------------------------------------------------------------------------------------------
// Registry API helpers (async, reqwest)
// ---------------------------------------------------------------------------------------------

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .expect("build an HTTP client")
}

/// A response read whole, and the request that got it, for assertion messages.
pub struct Reply {
    /// The request as messages show it: method and URL, and more if the caller likes.
    pub what: String,
    pub method: reqwest::Method,
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(800)]);
        write!(
            f,
            "{} answered {} {:?} {body}",
            self.what, self.status, self.headers
        )
    }
}

impl Reply {
    /// Reads `response` (to a `method` request described as `what`) to its end.
    pub async fn read(method: reqwest::Method, what: String, response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"))
            .to_vec();
        Reply {
            what,
            method,
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self}"))
    }

    #[track_caller]
    pub fn expect(&self, status: u16) -> &Reply {
        assert_eq!(self.status, status, "{self}");
        self
    }

    #[track_caller]
    pub fn location(&self) -> String {
        self.header("location")
            .unwrap_or_else(|| panic!("no Location: {self}"))
            .to_string()
    }
}

/// Sends `request` and reads the reply whole; messages name it by method and URL.
pub async fn send_request(request: reqwest::RequestBuilder) -> Reply {
    let (client, request) = request.build_split();
    let request = request.expect("a well-formed request");
    let method = request.method().clone();
    let what = format!("{method} {}", request.url());
    let response = client
        .execute(request)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    Reply::read(method, what, response).await
}

/// A fetched manifest: status, Content-Type, Docker-Content-Digest, body.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub content_type: Option<String>,
    pub digest: Option<String>,
    pub body: Vec<u8>,
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub async fn get_manifest(
    client: &reqwest::Client,
    registry: &Registry,
    repo: &str,
    reference: &str,
) -> Fetched {
    let url = format!("{}/v2/{repo}/manifests/{reference}", registry.url());
    let resp = client
        .get(&url)
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Fetched {
        status: resp.status().as_u16(),
        content_type: header(&resp, "content-type"),
        digest: header(&resp, "docker-content-digest"),
        body: resp.bytes().await.expect("read the manifest body").to_vec(),
    }
}

/// GETs blob `digest` of `repo` and checks status 200 and that the bytes hash to the digest.
pub async fn get_blob_checked(
    client: &reqwest::Client,
    registry: &Registry,
    repo: &str,
    digest: &str,
) -> Vec<u8> {
    let url = format!("{}/v2/{repo}/blobs/{digest}", registry.url());
    let reply = send_request(client.get(&url)).await;
    reply.expect(200);
    assert_eq!(
        sha256(&reply.body),
        digest,
        "GET {url} returned bytes that hash to something else"
    );
    reply.body
}

pub async fn head_status(client: &reqwest::Client, url: &str) -> u16 {
    client
        .head(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("HEAD {url}: {e}"))
        .status()
        .as_u16()
}

/// Resolves a `Location` header against the registry's base URL.
pub fn absolute(registry: &Registry, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", registry.url())
    } else {
        format!("{}/{location}", registry.url())
    }
}

/// Asserts a pushed manifest is served back byte for byte under `reference` with the digest
/// header and the expected media type, and that every blob it references is there.
pub async fn assert_manifest_served(
    client: &reqwest::Client,
    registry: &Registry,
    repo: &str,
    reference: &str,
    expected_digest: &str,
    expected_type: &str,
) -> Value {
    let fetched = get_manifest(client, registry, repo, reference).await;
    assert_eq!(
        fetched.status, 200,
        "GET manifest {repo}:{reference}: {fetched:?}"
    );
    assert_eq!(
        sha256(&fetched.body),
        expected_digest,
        "manifest {repo}:{reference} bytes hash to another digest"
    );
    assert_eq!(
        fetched.digest.as_deref(),
        Some(expected_digest),
        "Docker-Content-Digest of {repo}:{reference}"
    );
    assert_eq!(
        fetched.content_type.as_deref(),
        Some(expected_type),
        "Content-Type of {repo}:{reference}"
    );
    let manifest: Value = serde_json::from_slice(&fetched.body).expect("the manifest is JSON");
    let mut referenced = Vec::new();
    if let Some(config) = manifest["config"]["digest"].as_str() {
        referenced.push(config.to_string());
    }
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        referenced.push(layer["digest"].as_str().expect("layer digest").to_string());
    }
    for digest in referenced {
        get_blob_checked(client, registry, repo, &digest).await;
    }
    manifest
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// A `skopeo` command that ignores the host's signature policy (not what is under test).
pub fn skopeo() -> Command {
    let mut cmd = Command::new(require_tool("skopeo"));
    cmd.arg("--insecure-policy");
    cmd
}

/// The skopeo reference of image `tag` in the OCI layout at `layout`.
pub fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

/// Builds a `docker save`-style archive of `image` named `name` (via skopeo's docker-archive) in
/// the registry's scratch directory.
pub fn docker_archive(registry: &Registry, image: &Image, name: &str) -> PathBuf {
    let layout = registry.scratch().join("archive-src");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
    let archive = registry.scratch().join("image.tar");
    run(skopeo()
        .arg("copy")
        .arg(oci_ref(&layout, "v1"))
        .arg(format!("docker-archive:{}:{name}", archive.display())));
    archive
}

// ---------------------------------------------------------------------------------------------
// Private client daemons
// ---------------------------------------------------------------------------------------------

/// A private containerd with its own root, state, gRPC socket and config in a short temporary
/// directory (CRI plugin disabled); `ctr()` is aimed at it. Dropping it stops it and removes the
/// directory.
pub struct Containerd {
    dir: TempDir,
    child: Option<Child>,
    ctr: PathBuf,
}

impl Containerd {
    pub fn start() -> Containerd {
        let containerd = require_tool("containerd");
        let ctr = require_tool("ctr");
        let dir = short_tempdir("cd");
        let d = dir.path();
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
        );
        fs::write(d.join("config.toml"), config).expect("write the containerd config");
        let child = spawn_logged(
            Command::new(&containerd)
                .arg("--config")
                .arg(d.join("config.toml")),
            &d.join("containerd.log"),
        );
        let mut daemon = Containerd {
            dir,
            child: Some(child),
            ctr,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "containerd exited with {status} while starting\n--- containerd log ---\n{}",
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            let out = run_output(self.ctr().arg("version"), Duration::from_secs(10));
            if out.status.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "containerd did not answer `ctr version` within 30 s: {}\n--- containerd log ---\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// A `ctr` command aimed at this containerd.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address").arg(self.sock());
        cmd
    }

    /// `ctr images pull` of `reference` over plain HTTP into the native snapshotter (it needs no
    /// overlay support from the test's filesystem), with `options` such as `--user`.
    pub fn pull(&self, reference: &str, options: &[&str]) -> Command {
        let mut cmd = self.ctr();
        cmd.args(["images", "pull", "--plain-http", "--snapshotter", "native"])
            .args(options)
            .arg(reference);
        cmd
    }
}

/// The digest `ctr images ls` lists for `reference`.
pub fn ctr_image_digest(containerd: &Containerd, reference: &str) -> String {
    let listing = run(containerd.ctr().args(["images", "ls"]));
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{listing}"))
        .to_string()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        print_log_on_panic("containerd", &self.log_path());
        if let Some(child) = self.child.as_mut() {
            stop_child(child, Duration::from_secs(15));
        }
    }
}

/// Podman with a private store (`--root`, `--runroot`, vfs) and temporary directory, so it never
/// touches the host's images. No daemon: each command is a process of its own.
pub struct Podman {
    dir: TempDir,
    podman: PathBuf,
}

impl Podman {
    pub fn new() -> Podman {
        let podman = require_tool("podman");
        let dir = short_tempdir("pm");
        fs::create_dir_all(dir.path().join("tmp")).expect("create podman's tmpdir");
        Podman { dir, podman }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Loads a `docker save` archive into the private store and returns the name podman gave
    /// the image (it qualifies short names itself, e.g. `docker.io/e2e/local:v1`).
    pub fn load(&self, archive: &Path) -> String {
        let loaded = run(self.podman().arg("load").arg("-i").arg(archive));
        loaded
            .lines()
            .find_map(|l| l.strip_prefix("Loaded image: "))
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|| panic!("no `Loaded image:` in podman load output: {loaded}"))
    }

    /// A `podman` command using the private store.
    pub fn podman(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.podman);
        cmd.env("TMPDIR", d.join("tmp"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("libpod-tmp"))
            .arg("--storage-driver")
            .arg("vfs")
            .arg("--cgroup-manager")
            .arg("cgroupfs")
            .arg("--events-backend")
            .arg("file");
        cmd
    }
}

// ---------------------------------------------------------------------------------------------
// Access control material
// ---------------------------------------------------------------------------------------------

/// One htpasswd line for `user` with a bcrypt hash of `password` at `cost`, made by Apache's
/// `htpasswd -nbB -C cost`.
pub fn htpasswd_line(user: &str, password: &str, cost: u32) -> String {
    let line = run_bytes(
        Command::new(require_tool("htpasswd"))
            .arg("-nbB")
            .arg("-C")
            .arg(cost.to_string())
            .arg(user)
            .arg(password),
    );
    let line = String::from_utf8(line).expect("htpasswd prints text");
    let line = line.trim();
    assert!(
        line.starts_with(&format!("{user}:$2")),
        "htpasswd did not print a bcrypt entry for {user}"
    );
    line.to_string()
}

/// An EC P-256 key pair as PEM files: the PKCS#8 private key and a self-signed certificate of
/// its public key (CN=berth-token, two days), made with openssl.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub key: PathBuf,
    pub certificate: PathBuf,
}

impl KeyPair {
    /// Generates `NAME.key.pem` and `NAME.cert.pem` in `dir`.
    pub fn generate(dir: &Path, name: &str) -> KeyPair {
        let openssl = require_tool("openssl");
        let key = dir.join(format!("{name}.key.pem"));
        let certificate = dir.join(format!("{name}.cert.pem"));
        run_bytes(
            Command::new(&openssl)
                .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
                .arg("ec_paramgen_curve:P-256")
                .arg("-out")
                .arg(&key),
        );
        run_bytes(
            Command::new(&openssl)
                .args(["req", "-new", "-x509", "-key"])
                .arg(&key)
                .args(["-subj", "/CN=berth-token", "-days", "2", "-out"])
                .arg(&certificate),
        );
        KeyPair { key, certificate }
    }
}
