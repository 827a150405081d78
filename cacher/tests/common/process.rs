//! Child processes and their output, readiness polling, temporary directories, htpasswd files.

use std::fs;
use std::future::Future;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;

/// Collects a spawned child's piped output, killing it if it outlives `timeout`.
pub fn wait_output(mut child: Child, timeout: Duration, shown: &str) -> Output {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let finished = wait_timeout(&mut child, timeout).is_some();
    if !finished {
        let _ = child.kill();
    }
    let output = Output {
        status: child.wait().expect("reap the child"),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    assert!(
        finished,
        "{shown} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Reads a pipe to its end on a thread of its own, so a chatty child never blocks on a full pipe.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Polls `ready` until it holds, panicking with `what` and the log at `log` after `timeout`.
pub(super) fn wait_until(
    what: &str,
    timeout: Duration,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} was not ready within {timeout:?}\n--- log ---\n{}",
            tail_file(log, LOG_TAIL_LINES)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Writes an htpasswd file at `path` with a bcrypt entry for each of `users` (user, password),
/// made by Apache's `htpasswd`.
pub(super) fn write_htpasswd(path: &Path, users: &[(&str, &str)]) {
    let lines: Vec<String> = users
        .iter()
        .map(|(user, password)| {
            run(Command::new(require_tool("htpasswd")).args(["-Bbn", user, password]))
                .trim()
                .to_owned()
        })
        .collect();
    fs::write(path, lines.join("\n") + "\n").expect("write htpasswd");
}

pub(super) fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temporary directory")
}

pub(super) fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}
