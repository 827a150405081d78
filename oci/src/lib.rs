//! OCI vocabulary shared by berth-registry and berth-cacher: digests, names, references, media
//! types, and the manifest model.

mod digest;
pub mod manifest;
pub mod media_type;
mod name;

pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use name::{NameError, Reference, RepoName, Tag, is_app_guid};
