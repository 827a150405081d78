//! CNCF distribution (`docker-registry`) as the upstream registry an app's image lives in.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use super::*;

/// CNCF distribution as the registry an app's image lives in, with Basic authentication
/// (htpasswd) when given credentials. Dropping it stops it.
pub struct Upstream {
    dir: TempDir,
    addr: SocketAddr,
    credentials: Option<(String, String)>,
    child: Option<Child>,
}

impl Upstream {
    pub fn start(credentials: Option<(&str, &str)>) -> Upstream {
        let binary = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("upstream-")
            .tempdir()
            .expect("a temporary directory");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let auth = match credentials {
            Some(login) => {
                let htpasswd = dir.path().join("htpasswd");
                write_htpasswd(&htpasswd, &[login]);
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
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: berth-e2e\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .expect("write the upstream config");
        let child = spawn_logged(
            Command::new(&binary).arg("serve").arg(&config),
            &dir.path().join("log"),
        );
        let upstream = Upstream {
            dir,
            addr,
            credentials: credentials.map(|(u, p)| (u.into(), p.into())),
            child: Some(child),
        };
        wait_until(
            "docker-registry",
            Duration::from_secs(15),
            &upstream.log_path(),
            || std::net::TcpStream::connect(addr).is_ok(),
        );
        upstream
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Pushes `top` (an image manifest or an index) and `blobs` below it as `repo_tag` with
    /// skopeo, as a developer would push their app's image.
    pub fn push(&self, repo_tag: &str, top: &Blob, blobs: &[&Blob]) {
        let destination = format!("{}/{repo_tag}", self.host());
        let credentials = self
            .credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()));
        skopeo_push(self.dir.path(), &destination, top, blobs, credentials);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        print_log_on_panic("docker-registry", &self.log_path());
        self.stop();
    }
}
