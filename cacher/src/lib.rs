//! berth-cacher: copies `cf push -o` images into Berth's internal registry at staging time and
//! writes the staging result Cloud Controller reads, pinned to the cached copy.

pub mod client;
pub mod config;
pub mod copy;
pub mod flags;
#[cfg(test)]
mod generated;
pub mod identity;
pub mod import;
pub mod progress;
pub mod reference;
pub mod result;
pub mod secret;
pub mod stage;
