//! What the end-to-end tests of berth-registry and berth-cacher share: running real tools and
//! daemons (`process`), reproducible content (`content`) and a private dockerd (`dockerd`).
//! A development dependency only; never published.
//!
//! A missing tool is a test failure, never a skip: see [`require_tool`].

mod content;
mod dockerd;
mod process;

pub use content::*;
pub use dockerd::{Dockerd, digest_after};
pub use process::*;
