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
mod backend;
mod balancer;
mod client;
mod daemons;
mod images;
mod layout;
mod outage;
mod raw_http;
mod registry;
mod skopeo;

// Each test target uses its own part of the harness.
#[allow(unused_imports)]
pub use {
    access::*, backend::*, balancer::*, berth_testkit::*, client::*, daemons::*, images::*,
    layout::*, outage::*, raw_http::*, registry::*, skopeo::*,
};
