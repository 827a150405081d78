//! End-to-end staging runs of the berth-cacher binary as Cloud Controller starts it: CNCF
//! distribution, or berth-registry in token mode, as the upstream (behind a counting,
//! fault-injecting proxy where a test needs one), berth-registry as the internal registry, and
//! skopeo and dockerd pulling the cached copy.

#[path = "../common/mod.rs"]
mod common;
mod support;

mod caching;
mod credentials;
mod faults;
mod flags;
mod foundation;
mod progress;
mod proxy;
mod restage;
mod unavailable;
