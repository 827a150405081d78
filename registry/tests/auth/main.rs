//! Access control end to end, against the real binary: Basic and token mode with real clients
//! (docker through a private dockerd, skopeo, podman, containerd's ctr), berth-issued tokens
//! accepted by CNCF distribution, attacks over raw HTTP (forged, expired and misused tokens, wrong
//! passwords, catalog leaks, mounts across repositories, path tricks, oversized headers,
//! failed-login limits, timing of unknown users) and reloading on SIGHUP. Every client must be
//! installed: a missing one fails the test.

#[path = "../common/mod.rs"]
mod common;
mod support;

mod basic;
mod catalog;
mod clients;
mod distribution;
mod logins;
mod paths;
mod reload;
mod token;
