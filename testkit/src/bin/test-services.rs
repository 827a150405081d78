//! Starts every server of `berth_testkit::services` at once for a whole test run, writes the
//! `BERTH_TEST_*=value` lines that hand them to the tests to the file named by its argument
//! (once all are ready), and stops them and removes their directories when its standard input
//! closes. Killed instead (SIGTERM, SIGINT), it leaves that to the servers' watchdogs, which
//! notice within a second that it is gone.

use std::fs;
use std::io::Read;
use std::path::PathBuf;

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: test-services ENV_FILE < (a pipe whose closing stops the servers)");
        std::process::exit(2);
    };
    let servers = berth_testkit::services::start_all();
    let lines: String = servers
        .iter()
        .map(|s| format!("{}={}\n", s.variable, s.value))
        .collect();
    // Written whole under another name first: a reader polling for the file never sees half.
    let partial = out.with_extension("partial");
    fs::write(&partial, lines).expect("write the environment file");
    fs::rename(&partial, &out).expect("move the environment file into place");
    eprintln!("test-services: ready, environment in {}", out.display());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    std::thread::scope(|scope| {
        for server in servers {
            scope.spawn(|| server.stop());
        }
    });
    eprintln!("test-services: stopped");
}
