//! Private instances of the clients' daemons (containerd) and stores (podman).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;

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
