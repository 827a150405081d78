//! skopeo, aimed at OCI layouts and archives.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A `skopeo` command that ignores the host's signature policy (not what is under test).
pub fn skopeo() -> Command {
    let mut cmd = Command::new(require_tool("skopeo"));
    cmd.arg("--insecure-policy");
    cmd
}

/// The skopeo reference of image `tag` in the OCI layout at `layout`.
pub fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

/// Builds a `docker save`-style archive of `image` named `name` (via skopeo's docker-archive) in
/// the registry's scratch directory.
pub fn docker_archive(registry: &Registry, image: &Image, name: &str) -> PathBuf {
    let layout = registry.scratch().join("archive-src");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
    let archive = registry.scratch().join("image.tar");
    run(skopeo()
        .arg("copy")
        .arg(oci_ref(&layout, "v1"))
        .arg(format!("docker-archive:{}:{name}", archive.display())));
    archive
}
