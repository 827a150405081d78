//! What the end-to-end tests of berth-registry and berth-cacher share: running real tools and
//! daemons (`process`), reproducible content (`content`), a private dockerd (`dockerd`) and
//! Cloud Foundry instance identity certificates (`identity`), and the storage and database
//! servers the shared backends run on (`services`), and an upstream registry behind a counting
//! proxy for the pull-through cache (`upstream`).
//! A development dependency only; never published.
//!
//! A missing tool is a test failure, never a skip: see [`require_tool`].

mod content;
mod dockerd;
mod identity;
mod process;
pub mod services;
pub mod upstream;

pub use content::*;
pub use dockerd::{Dockerd, digest_after};
pub use identity::{DiegoCa, InstanceIdentity, Leaf, loopback_server_certificate};
pub use process::*;
