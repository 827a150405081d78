//! PostgreSQL (Debian's, from `/usr/lib/postgresql/*/bin`): a fresh database per test.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{
    PASSWORD, PrivateServer, ServerCell, ServerUrl, Started, USER, server_dir, server_value,
    spawn_supervised, start_retrying, unique_name, wait_ready,
};
use crate::process::{free_port, require_tool, run, run_output};

const VARIABLE: &str = "BERTH_TEST_POSTGRES";

/// An empty database of its own, dropped with this value.
pub struct PgDatabase {
    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/NAME`; the user owns the database.
    pub url: String,
    /// The database's name.
    pub name: String,
    admin: &'static str,
}

/// A new empty database on the shared PostgreSQL server.
pub fn postgres_database() -> PgDatabase {
    static SERVER: ServerCell = ServerCell::new();
    let admin = server_value(VARIABLE, &SERVER, start);
    let server = ServerUrl::parse(VARIABLE, admin);
    let name = unique_name('_');
    run(&mut psql(admin, &format!("CREATE DATABASE {name}")));
    PgDatabase {
        url: format!(
            "postgres://{}:{}@{}:{}/{name}",
            server.user, server.password, server.host, server.port
        ),
        name,
        admin,
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = run_output(&mut psql(self.admin, &sql), Duration::from_secs(30));
    }
}

/// `psql` running `sql` as `admin` (a URL with a password), the password in its environment.
fn psql(admin: &str, sql: &str) -> Command {
    let (url, password) = without_password(admin);
    let mut cmd = Command::new(require_tool("psql"));
    cmd.env("PGPASSWORD", password)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &url, "-c", sql]);
    cmd
}

/// `url` without its password, and the password: how it reaches `psql` outside its arguments.
fn without_password(url: &str) -> (String, String) {
    let parts = ServerUrl::parse(VARIABLE, url);
    (
        format!(
            "postgres://{}@{}:{}{}",
            parts.user, parts.host, parts.port, parts.path
        ),
        parts.password,
    )
}

/// Debian installs the server programs outside `PATH`, one directory per major version.
fn server_program(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|version| version.path().join("bin").join(name))
        .filter(|path| path.is_file())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| require_tool(name))
}

pub(super) fn start() -> PrivateServer {
    start_retrying("PostgreSQL", attempt)
}

fn attempt() -> Started {
    let dir = server_dir("berth-pg");
    let data = dir.path.join("data");
    let log = dir.path.join("postgres.log");
    let pwfile = dir.path.join("password");
    fs::write(&pwfile, PASSWORD).expect("write the password file");
    // PostgreSQL refuses to run as root: as root, the server runs as Debian's `postgres` user.
    if dir.root {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o755))
            .expect("open the server directory");
        fs::create_dir(&data).expect("create the data directory");
        run(Command::new(require_tool("chown"))
            .arg("postgres:postgres")
            .arg(&data)
            .arg(&pwfile));
    }
    let as_server_user = |program: PathBuf| -> (PathBuf, Vec<String>) {
        if dir.root {
            let prefix = [
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ];
            let mut args: Vec<String> = prefix.map(String::from).to_vec();
            args.push(program.display().to_string());
            (require_tool("setpriv"), args)
        } else {
            (program, Vec::new())
        }
    };
    let (initdb, mut args) = as_server_user(server_program("initdb"));
    args.extend(
        [
            "-D",
            &data.display().to_string(),
            "-U",
            USER,
            "-A",
            "scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
            &format!("--pwfile={}", pwfile.display()),
        ]
        .map(String::from),
    );
    run(Command::new(initdb).args(&args));
    let port = free_port();
    let (program, mut args) = as_server_user(server_program("postgres"));
    args.extend(
        [
            "-D",
            &data.display().to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            // The server's own socket directory: the only one its user may write as root.
            "-k",
            &data.display().to_string(),
            // Test data need not survive a crash.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=500",
        ]
        .map(String::from),
    );
    // SIGINT is PostgreSQL's fast shutdown: SIGTERM would wait for every client to leave.
    let mut watchdog = spawn_supervised(&dir.path, &log, "INT", &program, &args);
    let value = format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/postgres");
    wait_ready(&dir.path, &mut watchdog, &log, || {
        run_output(&mut psql(&value, "SELECT 1"), Duration::from_secs(10))
            .status
            .success()
    })?;
    Ok(PrivateServer {
        variable: VARIABLE,
        value,
        watchdog,
        log,
    })
}
