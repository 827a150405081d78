//! Shared harness for the end-to-end tests: a berth-registry child process on a free loopback port
//! with its own storage root, generated OCI images written as OCI image layouts, and private
//! instances of the real clients' daemons (dockerd, containerd) and stores (podman).
//!
//! A missing tool is a test failure, never a skip: see [`require_tool`].
//!
//! Set `BERTH_E2E_REGISTRY_BIN` to run the tests against another executable that honours the same
//! environment contract (`BERTH_LISTEN`, `BERTH_STORAGE_ROOT`, ...) instead of the binary Cargo
//! built; useful to check the tests themselves against a reference registry.

#![allow(dead_code, unreachable_pub)]

mod access;
mod client;
mod daemons;
mod images;
mod layout;
mod raw_http;
mod registry;
mod skopeo;

// Each test target uses its own part of the harness.
#[allow(unused_imports)]
pub use {
    access::*, berth_testkit::*, client::*, daemons::*, images::*, layout::*, raw_http::*,
    registry::*, skopeo::*,
};

/// Stand-in for the testkit's database services until they land (same names and shape).
pub mod services {
    pub struct Database {
        pub url: String,
    }

    fn create(var: &str, scheme: &str) -> Database {
        let server = std::env::var(var).unwrap();
        let name = format!("berth_{}", std::process::id()) + &format!("_{}", super::free_port());
        let url = reqwest::Url::parse(&server).unwrap();
        let status = if scheme == "postgres" {
            std::process::Command::new("psql")
                .args([
                    &format!("{server}/postgres"),
                    "-c",
                    &format!("CREATE DATABASE {name}"),
                ])
                .status()
        } else {
            std::process::Command::new("mariadb")
                .args([
                    "-h",
                    url.host_str().unwrap(),
                    "-P",
                    &url.port().unwrap().to_string(),
                    "-u",
                    url.username(),
                    "-e",
                    &format!("CREATE DATABASE {name}"),
                ])
                .status()
        };
        assert!(status.unwrap().success());
        Database {
            url: format!("{server}/{name}"),
        }
    }

    pub fn postgres_database() -> Database {
        create("BERTH_TEST_POSTGRES", "postgres")
    }

    pub fn mysql_database() -> Database {
        create("BERTH_TEST_MYSQL", "mysql")
    }
}
