//! OCI vocabulary shared by berth-registry and berth-cacher: digests, names, references, media types.

mod digest;
pub mod media_type;
mod name;

pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use name::{NameError, Reference, RepoName, Tag};
