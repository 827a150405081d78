//! A private dockerd for tests: its own data root, socket and configuration, stopped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{
    LOG_TAIL_LINES, print_log_on_panic, require_tool, run, run_output, send_signal, short_tempdir,
    spawn_logged, stop_child, tail_file,
};

/// A private dockerd (vfs storage, no iptables, no bridge) with its own data root, exec root and
/// socket in a short temporary directory; it starts its own managed containerd. The `docker` CLI
/// talks to it through `-H unix://…` with a private `DOCKER_CONFIG`. Dropping it stops dockerd
/// (SIGTERM, then SIGKILL), kills its containerd if it outlived it, and removes the directory.
pub struct Dockerd {
    dir: TempDir,
    child: Option<Child>,
    docker: PathBuf,
}

impl Dockerd {
    pub fn start(insecure_registry: &str) -> Dockerd {
        let dockerd = require_tool("dockerd");
        let docker = require_tool("docker");
        let dir = short_tempdir("bd");
        let d = dir.path();
        fs::create_dir_all(d.join("cfg")).expect("create the docker config dir");
        let child = spawn_logged(
            Command::new(&dockerd)
                .arg("--storage-driver")
                .arg("vfs")
                .arg("--iptables=false")
                .arg("--ip6tables=false")
                .arg("--bridge=none")
                .arg("--data-root")
                .arg(d.join("data"))
                .arg("--exec-root")
                .arg(d.join("exec"))
                .arg("--pidfile")
                .arg(d.join("pid"))
                .arg("-H")
                .arg(format!("unix://{}", d.join("d.sock").display()))
                .arg("--insecure-registry")
                .arg(insecure_registry),
            &d.join("dockerd.log"),
        );
        let mut daemon = Dockerd {
            dir,
            child: Some(child),
            docker,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "dockerd exited with {status} while starting\n--- dockerd log ---\n{}",
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            let out = run_output(
                self.docker()
                    .args(["info", "--format", "{{.ServerVersion}}"]),
                Duration::from_secs(20),
            );
            if out.status.success() {
                eprintln!(
                    "private dockerd {} ready at {}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    self.sock().display()
                );
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "dockerd did not answer `docker info` within 60 s: {}\n--- dockerd log ---\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("d.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dockerd.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `docker` command aimed at this daemon.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new(&self.docker);
        cmd.env("DOCKER_CONFIG", self.dir.path().join("cfg"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock().display()));
        cmd
    }

    /// Tags local image `local` as `remote` and pushes it; returns what docker printed.
    pub fn tag_and_push(&self, local: &str, remote: &str) -> String {
        run(self.docker().args(["tag", local, remote]));
        run(self.docker().args(["push", remote]))
    }

    /// Removes `images` and checks that none is left, so that a pull that follows must fetch
    /// everything from the registry.
    pub fn remove_all_images(&self, images: &[&str]) {
        run(self.docker().arg("rmi").args(images));
        let left = run(self.docker().args(["images", "-q", "--no-trunc"]));
        assert_eq!(left.trim(), "", "the image must be gone before pulling");
    }

    /// Pulls `reference` and asserts docker reports the manifest (or index) `digest` for it.
    #[track_caller]
    pub fn pull_expecting(&self, reference: &str, digest: &str) {
        let pulled = run(self.docker().args(["pull", reference]));
        assert_eq!(
            digest_after(&pulled, "Digest:").as_deref(),
            Some(digest),
            "docker pull {reference}: {pulled}"
        );
    }

    /// The id of the local image `reference`: the digest of its config.
    pub fn image_id(&self, reference: &str) -> String {
        let id = run(self
            .docker()
            .args(["image", "inspect", "--format", "{{.Id}}", reference]));
        id.trim().to_string()
    }

    /// The pid of the containerd that dockerd started for itself, if it wrote one.
    fn managed_containerd_pid(&self) -> Option<u32> {
        let text =
            fs::read_to_string(self.dir.path().join("exec/containerd/containerd.pid")).ok()?;
        text.trim().parse().ok()
    }
}

/// Whether `pid` is alive and its command line mentions `marker` (so we only ever kill our own).
fn process_mentions(pid: u32, marker: &Path) -> bool {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains(&*marker.to_string_lossy()),
        Err(_) => false,
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        print_log_on_panic("dockerd", &self.log_path());
        let containerd = self.managed_containerd_pid();
        if let Some(child) = self.child.as_mut() {
            stop_child(child, Duration::from_secs(20));
        }
        if let Some(pid) = containerd {
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_mentions(pid, self.dir.path()) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
            if process_mentions(pid, self.dir.path()) {
                send_signal(pid, "KILL");
            }
        }
    }
}

/// The first `sha256:<64 hex>` that follows `marker` in `text`.
pub fn digest_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let rest = text[start..].trim_start();
    let candidate: String = rest.chars().take(71).collect();
    let valid = candidate.len() == 71
        && candidate.starts_with("sha256:")
        && candidate[7..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    valid.then_some(candidate)
}
