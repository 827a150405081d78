//! The manifest media types the registry understands.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
/// Docker's foreign layer, such as a Windows base layer fetched from its vendor.
pub const DOCKER_FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// OCI's non-distributable layers: `v1.tar`, `v1.tar+gzip` and `v1.tar+zstd` after this.
const OCI_NON_DISTRIBUTABLE_PREFIX: &str = "application/vnd.oci.image.layer.nondistributable.";

/// Whether `media_type` lists other manifests (an index) rather than blobs.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Whether `media_type` is one the registry accepts as a manifest.
pub fn is_supported_manifest(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

/// Whether `media_type` is the long-deprecated Docker schema 1.
pub fn is_schema1(media_type: &str) -> bool {
    matches!(
        media_type,
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED | "application/json"
    )
}

/// Whether layers of `media_type` may be kept out of registries: Docker's foreign layers and OCI's
/// non-distributable ones (deprecated by OCI 1.1, still found in Windows images).
pub fn is_non_distributable(media_type: &str) -> bool {
    media_type == DOCKER_FOREIGN_LAYER || media_type.starts_with(OCI_NON_DISTRIBUTABLE_PREFIX)
}
