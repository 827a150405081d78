//! berth-registry: an OCI Distribution v1.1 registry with content on the filesystem or an object
//! store and metadata in SQLite, PostgreSQL or MySQL. `api` is the HTTP surface; it reaches storage only through the `content` and `metadata`
//! traits.

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod content;
pub mod error;
pub mod gc;
pub mod lease;
pub mod manifest;
pub mod metadata;
pub mod metrics;
pub mod proxy;
pub mod pulls;
pub mod quota;
pub mod retention;
pub mod server;
