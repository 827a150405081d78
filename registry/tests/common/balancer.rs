//! Debian's nginx as the load balancer in front of several registry instances, as a foundation's
//! router is: round robin with no affinity, request and response bodies streamed, nothing
//! retried that is not idempotent.

use std::fs;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;

pub struct Balancer {
    dir: TempDir,
    child: Option<Child>,
    addr: SocketAddr,
}

impl Balancer {
    /// Starts nginx on a free port balancing over `backends`, ready once `GET /v2/` answers.
    pub fn start(backends: &[SocketAddr]) -> Balancer {
        let nginx = require_tool("nginx");
        let dir = short_tempdir("lb");
        let d = dir.path().display();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let servers: String = backends
            .iter()
            .map(|backend| format!("    server {backend} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let config = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 1024; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  upstream registries {{
{servers}  }}
  server {{
    listen {addr};
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    location / {{
      proxy_pass http://registries;
      proxy_set_header Host $http_host;
      proxy_set_header Connection "";
      proxy_connect_timeout 2s;
      proxy_read_timeout 120s;
      proxy_send_timeout 120s;
    }}
  }}
}}
"#
        );
        let conf = dir.path().join("nginx.conf");
        fs::write(&conf, config).expect("write nginx.conf");
        let child = spawn_logged(
            Command::new(nginx)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                .args(["-e", "stderr"]),
            &dir.path().join("nginx.log"),
        );
        let mut balancer = Balancer {
            dir,
            child: Some(child),
            addr,
        };
        balancer.wait_ready();
        balancer
    }

    /// Waits until requests pass again: once every backend failed, nginx rests them all for
    /// `fail_timeout` and answers 502 meanwhile, however soon they are back.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(resp) = blocking_get(self.addr, "/v2/", Duration::from_secs(1))
                && resp.status == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not balance within 10 s\n{}",
                tail_file(&self.dir.path().join("nginx.log"), 20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`, the registry host as image references spell it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        print_log_on_panic("nginx", &self.dir.path().join("error.log"));
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }
}
