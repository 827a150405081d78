//! MariaDB (Debian's, speaking the MySQL protocol): a fresh database per test.

use std::process::Command;
use std::time::Duration;

use super::{
    PASSWORD, PrivateServer, ServerCell, ServerUrl, Started, USER, server_dir, server_value,
    spawn_supervised, start_retrying, unique_name, wait_ready,
};
use crate::process::{free_port, require_tool, run, run_output};

const VARIABLE: &str = "BERTH_TEST_MYSQL";

/// An empty database of its own, dropped with this value.
pub struct MysqlDatabase {
    /// `mysql://USER:PASSWORD@127.0.0.1:PORT/NAME`; the user has all privileges on it.
    pub url: String,
    /// The database's name.
    pub name: String,
    admin: &'static str,
}

/// A new empty database on the shared MariaDB server.
pub fn mysql_database() -> MysqlDatabase {
    static SERVER: ServerCell = ServerCell::new();
    let admin = server_value(VARIABLE, &SERVER, start);
    let server = ServerUrl::parse(VARIABLE, admin);
    let name = unique_name('_');
    run(&mut client(&server, &format!("CREATE DATABASE {name}")));
    MysqlDatabase {
        url: format!(
            "mysql://{}:{}@{}:{}/{name}",
            server.user, server.password, server.host, server.port
        ),
        name,
        admin,
    }
}

impl Drop for MysqlDatabase {
    fn drop(&mut self) {
        let server = ServerUrl::parse(VARIABLE, self.admin);
        let sql = format!("DROP DATABASE IF EXISTS {}", self.name);
        let _ = run_output(&mut client(&server, &sql), Duration::from_secs(30));
    }
}

/// The `mariadb` client running `sql` over TCP; the password goes in the environment.
fn client(server: &ServerUrl, sql: &str) -> Command {
    let mut cmd = Command::new(require_tool("mariadb"));
    cmd.env("MYSQL_PWD", &server.password)
        .args(["--no-defaults", "--protocol=TCP", "-h", &server.host])
        .args([
            "-P",
            &server.port.to_string(),
            "-u",
            &server.user,
            "-e",
            sql,
        ]);
    cmd
}

pub(super) fn start() -> PrivateServer {
    start_retrying("MariaDB", attempt)
}

fn attempt() -> Started {
    let dir = server_dir("berth-my");
    let data = dir.path.join("data");
    let socket = dir.path.join("mysqld.sock");
    let log = dir.path.join("mariadb.log");
    // mariadbd runs as root only when told to.
    let user: Vec<String> = if dir.root {
        vec!["--user=root".into()]
    } else {
        Vec::new()
    };
    run(Command::new(require_tool("mariadb-install-db"))
        .args(["--no-defaults", "--auth-root-authentication-method=normal"])
        .args(["--skip-test-db", "--skip-name-resolve"])
        .arg(format!("--datadir={}", data.display()))
        .args(&user));
    let port = free_port();
    let mut args = vec![
        "--no-defaults".to_owned(),
        format!("--datadir={}", data.display()),
        format!("--socket={}", socket.display()),
        format!("--pid-file={}", dir.path.join("mariadbd.pid").display()),
        format!("--port={port}"),
        "--bind-address=127.0.0.1".into(),
        "--skip-name-resolve".into(),
        "--max-connections=500".into(),
        "--innodb-buffer-pool-size=64M".into(),
        // Test data need not survive a crash.
        "--innodb-flush-log-at-trx-commit=0".into(),
        "--innodb-doublewrite=0".into(),
        "--sync-binlog=0".into(),
    ];
    args.extend(user);
    let mut watchdog = spawn_supervised(&dir.path, &log, "TERM", &require_tool("mariadbd"), &args);
    let root = |sql: &str| {
        let mut cmd = Command::new(require_tool("mariadb"));
        cmd.args(["--no-defaults", "-u", "root", "-S"])
            .arg(&socket)
            .args(["-e", sql]);
        cmd
    };
    wait_ready(&dir.path, &mut watchdog, &log, || {
        run_output(&mut root("SELECT 1"), Duration::from_secs(10))
            .status
            .success()
    })?;
    run(&mut root(&format!(
        "CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; \
         GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%' WITH GRANT OPTION"
    )));
    Ok(PrivateServer {
        variable: VARIABLE,
        value: format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{port}"),
        watchdog,
        log,
    })
}
