//! skopeo pulling from and pushing to the registries under test.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::*;

pub fn skopeo() -> Command {
    let mut cmd = Command::new(require_tool("skopeo"));
    // The host's signature policy is not under test.
    cmd.arg("--insecure-policy");
    cmd
}

/// Pulls `reference` from an insecure registry with skopeo, which verifies every blob, into a
/// `dir:` copy under `dir` (blobs and manifest kept byte for byte); returns the manifest's digest
/// and the manifest.
pub fn skopeo_pull(reference: &str, dir: &Path) -> (String, Value) {
    skopeo_pull_as(reference, dir, None)
}

/// Like [`skopeo_pull`], presenting `credentials`.
pub fn skopeo_pull_as(
    reference: &str,
    dir: &Path,
    credentials: Option<(&str, &str)>,
) -> (String, Value) {
    let out = dir.join(format!("pulled-{}", uuid::Uuid::new_v4().simple()));
    let mut cmd = skopeo();
    cmd.args(["copy", "--src-tls-verify=false"]);
    if let Some((user, password)) = credentials {
        cmd.arg(format!("--src-creds={user}:{password}"));
    }
    run(cmd
        .arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", out.display())));
    let bytes = fs::read(out.join("manifest.json")).expect("the pulled manifest");
    let manifest = serde_json::from_slice(&bytes).expect("manifest JSON");
    (sha256(&bytes), manifest)
}

/// Pushes `top` (an image manifest or an index) and `blobs` below it to `destination`
/// (`host/repo:tag`) with skopeo, as a developer would push their app's image, from an OCI layout
/// written under `dir`.
pub(super) fn skopeo_push(
    dir: &Path,
    destination: &str,
    top: &Blob,
    blobs: &[&Blob],
    credentials: Option<(&str, &str)>,
) {
    let (_, tag) = destination.rsplit_once(':').expect("host/repo:tag");
    let layout = dir.join(format!("layout-{}", uuid::Uuid::new_v4().simple()));
    write_oci_layout(&layout, tag, top, blobs);
    let mut cmd = skopeo();
    cmd.args(["copy", "--dest-tls-verify=false"]);
    if top.media_type == OCI_INDEX {
        cmd.arg("--all");
    }
    if let Some((user, password)) = credentials {
        cmd.arg(format!("--dest-creds={user}:{password}"));
    }
    run(cmd
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{destination}")));
}
