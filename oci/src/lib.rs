//! OCI vocabulary shared by berth-registry and berth-cacher: digests, names, references, media
//! types, the manifest model, and registries' authentication challenges.

mod challenge;
mod digest;
pub mod manifest;
pub mod media_type;
mod name;

pub use challenge::Challenge;
pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use name::{NameError, Reference, RepoName, Tag, is_app_guid};
