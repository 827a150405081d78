//! The HTTP API against the OCI Distribution Specification v1.1 (and the Docker Registry v2
//! behaviour clients rely on), endpoint by endpoint and error by error, over real HTTP to the real
//! binary. Every check is on what a client sees: status, headers, the OCI error code, bytes.

#[path = "../common/mod.rs"]
mod common;
mod support;

mod blobs;
mod listings;
mod manifests;
mod names;
mod operations;
mod robustness;
mod routing;
mod uploads;
