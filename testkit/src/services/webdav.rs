//! Debian's nginx as the WebDAV blobstore of Cloud Foundry's capi `blobstore` job: a fresh
//! directory per test.
//!
//! The job's internal server (`blobstore.service.cf.internal`, TLS) is the one Cloud Controller
//! writes through. Its writable location `/admin/`, mapped onto the store's root, has HTTP basic
//! auth (`write_users`) and allows exactly:
//! - `GET` and `HEAD` (nginx's static files; a directory answers 403 or 404, never a listing:
//!   there is no `autoindex`),
//! - `PUT` with `create_full_put_path on` (missing parent directories are created), `DELETE`
//!   (a directory only with a trailing slash, then recursively) and `COPY` (`dav_methods DELETE
//!   PUT COPY`; no `MKCOL`, no `MOVE`),
//! - `PROPFIND` (`dav_ext_methods PROPFIND`, from nginx-dav-ext-module; no `OPTIONS`, no locks).
//!
//! Its other locations (`/read/`, `/write/`, `/signed/`) take secure-link signed URLs, and
//! `client_max_body_size` is `blobstore.max_upload_size` (default `5000m`). This server keeps
//! `/admin/` as the job writes it, over plain HTTP on loopback; everything else answers 404.
//! Although `PROPFIND` is there, a backend must not rely on listing: a WebDAV store behind
//! another server may not offer it.

use std::fs;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{
    PASSWORD, PrivateServer, ServerCell, ServerUrl, Started, USER, http, server_dir, server_value,
    spawn_supervised, start_retrying, unique_name, wait_ready,
};
use crate::process::{free_port, require_tool};

const VARIABLE: &str = "BERTH_TEST_WEBDAV";

/// The module Debian's `libnginx-mod-http-dav-ext` installs, which gives `PROPFIND`.
const DAV_EXT_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so";

/// A directory of its own under the blobstore's `/admin/` root (not yet created: the first
/// `PUT` creates it), deleted with this value.
pub struct WebDav {
    /// `http://127.0.0.1:PORT/admin/NAME/`, ending in `/`.
    pub url: String,
    pub username: String,
    pub password: String,
}

/// A new directory on the shared WebDAV blobstore.
pub fn webdav() -> WebDav {
    static SERVER: ServerCell = ServerCell::new();
    let server = ServerUrl::parse(VARIABLE, server_value(VARIABLE, &SERVER, start));
    let root = server.path.trim_end_matches('/');
    WebDav {
        url: format!("{}{root}/{}/", server.origin(), unique_name('-')),
        username: server.user,
        password: server.password,
    }
}

impl Drop for WebDav {
    fn drop(&mut self) {
        let server = ServerUrl::parse(VARIABLE, &self.url);
        let credentials = STANDARD.encode(format!("{}:{}", self.username, self.password));
        let _ = http(
            &server.host,
            server.port,
            "DELETE",
            &server.path,
            &[("Authorization", format!("Basic {credentials}"))],
            b"",
        );
    }
}

pub(super) fn start() -> PrivateServer {
    start_retrying("nginx", attempt)
}

fn attempt() -> Started {
    let dir = server_dir("berth-dav");
    let log = dir.path.join("nginx.log");
    let store = dir.path.join("store");
    let body_temp = dir.path.join("body");
    for d in [&store, &body_temp] {
        fs::create_dir(d).expect("create a blobstore directory");
    }
    let users = dir.path.join("write_users");
    fs::write(&users, format!("{USER}:{{PLAIN}}{PASSWORD}\n")).expect("write write_users");
    let port = free_port();
    let d = dir.path.display();
    let config = format!(
        r#"load_module {DAV_EXT_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 512; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {body};
  server {{
    listen 127.0.0.1:{port};
    root {store};
    client_max_body_size 5000m;
    location /admin/ {{
      auth_basic "Blobstore Admin";
      auth_basic_user_file {users};
      dav_methods DELETE PUT COPY;
      dav_ext_methods PROPFIND;
      create_full_put_path on;
      alias {store}/;
    }}
    location / {{
      return 404;
    }}
  }}
}}
"#,
        body = body_temp.display(),
        store = store.display(),
        users = users.display(),
    );
    let conf = dir.path.join("nginx.conf");
    fs::write(&conf, config).expect("write nginx.conf");
    let args = [
        "-p".to_owned(),
        format!("{d}/"),
        "-c".into(),
        conf.display().to_string(),
        // Debian's nginx opens its default error log before reading the configuration.
        "-e".into(),
        "stderr".into(),
    ];
    let mut watchdog = spawn_supervised(&dir.path, &log, "TERM", &require_tool("nginx"), &args);
    wait_ready(&dir.path, &mut watchdog, &log, || {
        http("127.0.0.1", port, "GET", "/", &[], b"").is_some()
    })?;
    Ok(PrivateServer {
        variable: VARIABLE,
        value: format!("http://{USER}:{PASSWORD}@127.0.0.1:{port}/admin/"),
        watchdog,
        log,
    })
}
