//! The registry under test: a berth-registry child process, its storage, configuration and TLS.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Where its blobs and uploads live.
    content: Content,
    /// The database holding its metadata when `BERTH_E2E_METADATA` names one.
    metadata: Option<SharedMetadata>,
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
        registry.config = Some(registry.dir.path().join("config.yml"));
        registry.write_config(yaml);
        registry.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        registry.spawn();
        registry
    }

    fn start_with(tls: Option<Tls>) -> Registry {
        let mut registry = Registry::prepare(tls);
        if registry.metadata.is_some() || !registry.content_is_local() {
            registry.config = Some(registry.dir.path().join("config.yml"));
            registry.write_config("{}");
        }
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
        let content = Content::from_env(dir.path());
        let metadata = SharedMetadata::from_env(dir.path());
        Registry {
            dir,
            addr,
            child: None,
            starts: 0,
            tls,
            config: None,
            env: Vec::new(),
            content,
            metadata,
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

    /// The rows `sql` answers from its metadata database (SQLite under its storage root, or the
    /// shared one `BERTH_E2E_METADATA` gave it), each column as text.
    pub fn metadata_rows(&self, sql: &str) -> Vec<Vec<String>> {
        if let Some(metadata) = &self.metadata {
            return metadata.query(sql);
        }
        let db = rusqlite::Connection::open(self.root().join("metadata.sqlite"))
            .expect("open the metadata database");
        let mut statement = db.prepare(sql).expect("a valid statement");
        let columns = statement.column_count();
        statement
            .query_map([], |row| {
                (0..columns)
                    .map(|i| {
                        Ok(match row.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => String::new(),
                            rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                            rusqlite::types::ValueRef::Real(x) => x.to_string(),
                            rusqlite::types::ValueRef::Text(text)
                            | rusqlite::types::ValueRef::Blob(text) => {
                                String::from_utf8_lossy(text).into_owned()
                            }
                        })
                    })
                    .collect()
            })
            .expect("run the statement")
            .collect::<Result<_, _>>()
            .expect("read the rows")
    }

    /// The configuration file it was started with.
    pub fn config_path(&self) -> &Path {
        self.config
            .as_deref()
            .expect("the registry was started with a configuration file")
    }

    /// Replaces the configuration file (the running process reads it again on SIGHUP).
    /// With the shared backends the environment names added.
    pub fn write_config(&self, yaml: &str) {
        let mut yaml = yaml.to_owned();
        if let Some(metadata) = &self.metadata {
            yaml = with_storage(&yaml, "metadata", metadata.section());
        }
        if let Some(content) = self.content.section() {
            yaml = with_storage(&yaml, "content", &content);
        }
        fs::write(self.config_path(), yaml).expect("write the registry configuration");
    }

    /// Files stored under `dir` (`blobs` or `uploads`), relative to it: files on the filesystem,
    /// object keys on an object store.
    pub async fn stored(&self, dir: &str) -> std::collections::BTreeSet<PathBuf> {
        self.content.stored(&self.root(), dir).await
    }

    /// Whether the content lives under the storage root.
    pub fn content_is_local(&self) -> bool {
        matches!(self.content, Content::Filesystem)
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
