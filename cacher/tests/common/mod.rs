//! Harness for the cacher's end-to-end tests: berth-registry in-process as the internal registry,
//! CNCF distribution (`docker-registry`) as the upstream, a counting and fault-injecting proxy in
//! front of it, generated images, the cacher binary, and a private dockerd.
//!
//! A missing tool is a test failure, never a skip: see [`require_tool`].

#![allow(dead_code, unreachable_pub)]

mod berth;
mod cacher;
mod files;
mod http;
mod images;
mod process;
mod proxy;
mod server;
mod skopeo;
mod upstream;

// Each test target uses its own part of the harness.
#[allow(unused_imports)]
pub use {
    berth::*, berth_testkit::*, cacher::*, files::*, http::*, images::*, process::*, proxy::*,
    server::*, skopeo::*, upstream::*,
};
