//! Running the real tools and daemons the tests drive: finding them, running them with a time
//! limit, logging their output, stopping them, and the ports and directories they need.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How much of a daemon's log a failing test prints.
pub const LOG_TAIL_LINES: usize = 150;

/// The absolute path of `tool` found on `PATH`. Panics if it is missing: a test that cannot run
/// its client fails, it never skips.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Daemons live in sbin, which a non-login PATH may lack.
    let fallback = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    for dir in std::env::split_paths(&path).chain(fallback) {
        let candidate = dir.join(tool);
        if let Ok(meta) = fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return candidate;
            }
        }
    }
    panic!(
        "required tool `{tool}` was not found on PATH. These end-to-end tests drive real clients \
         and never skip: install it (Debian: apt-get install -y skopeo docker.io containerd podman) \
         and run again."
    );
}

/// Runs `cmd` to completion within `timeout`, returning its output whatever its exit status.
/// Standard input is closed. Panics only if it cannot be started or overruns the timeout.
pub fn run_output(cmd: &mut Command, timeout: Duration) -> Output {
    run_output_fed(cmd, None, timeout)
}

/// Like [`run_output`], with `input` on standard input: how a secret reaches a command without
/// appearing in its arguments.
pub fn run_output_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Output {
    run_output_fed(cmd, Some(input), timeout)
}

fn run_output_fed(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    if let Some(input) = input {
        // Dropped at the end of the statement: the command sees end of input.
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input)
            .unwrap_or_else(|e| panic!("writing to {shown}: {e}"));
    }
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(25)),
            Err(e) => panic!("waiting for {shown}: {e}"),
        }
    };
    let status = match status {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "{shown} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Runs `cmd` (5 minute limit) and panics with everything it printed unless it exits 0.
/// Returns its standard output as bytes.
pub fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let shown = format!("{cmd:?}");
    let output = run_output(cmd, Duration::from_secs(300));
    if !output.status.success() {
        panic!(
            "{shown} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output.stdout
}

/// Like [`run_bytes`], as text (standard output only); also echoes the command and all it printed
/// to the test's log.
pub fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let output = run_output(cmd, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "{shown} failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            output.status
        );
    }
    eprintln!(
        "$ {shown}\n{}{}",
        stdout.trim_end(),
        if stderr.trim().is_empty() {
            String::new()
        } else {
            format!("\n[stderr] {}", stderr.trim_end())
        }
    );
    stdout
}

/// Starts `cmd` with standard input closed and all it prints written to a new file at `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let file = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone the log handle"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

/// Sends `signal` (a name such as `TERM`) to `pid` with the system's `kill`.
pub fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(25)),
            _ => return None,
        }
    }
}

/// Stops `child` with SIGTERM, then SIGKILL if it has not exited within `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    send_signal(child.id(), "TERM");
    if wait_timeout(child, grace).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `lines` lines of the file at `path`, or a note that it cannot be read.
pub fn tail_file(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Prints the tail of the `what` log at `path` if the test is failing.
pub fn print_log_on_panic(what: &str, path: &Path) {
    if thread::panicking() {
        eprintln!(
            "===== last {LOG_TAIL_LINES} lines of the {what} log ({}) =====\n{}\n===== end of the {what} log =====",
            path.display(),
            tail_file(path, LOG_TAIL_LINES)
        );
    }
}

/// A free TCP port on 127.0.0.1 (free when this returns; the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A temporary directory with a short path under `/tmp`, for daemons whose unix socket paths must
/// fit in `sun_path` (108 bytes).
pub fn short_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create a temporary directory under /tmp")
}

/// A directory on a tmpfs of a few MiB: a full disk a test can cause and relieve. Mounting needs
/// root, as the suites' dockerd tests do; without it the test fails.
pub struct SmallDisk {
    _dir: TempDir,
    pub root: PathBuf,
}

impl SmallDisk {
    pub fn mount(mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().join("root");
        fs::create_dir(&root).expect("create the mount point");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&root));
        SmallDisk { _dir: dir, root }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.root).status();
    }
}
