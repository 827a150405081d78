//! OCI image layouts on disk.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("not a digest: {digest}"));
    layout.join("blobs").join(algorithm).join(hex)
}

/// Writes an OCI image layout at `layout`: `oci-layout`, the blobs (including `top`), and an
/// `index.json` whose only entry points at `top` (a manifest or an index) under the name `tag`.
pub fn write_oci_layout(layout: &Path, tag: &str, top: &Blob, blobs: &[&Blob]) {
    fs::create_dir_all(layout.join("blobs/sha256")).expect("create blobs/sha256");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write oci-layout");
    for blob in blobs.iter().copied().chain(std::iter::once(top)) {
        fs::write(blob_path(layout, &blob.digest), &blob.bytes).expect("write a blob");
    }
    let mut descriptor = top.descriptor();
    descriptor["annotations"] = json!({ REF_NAME: tag });
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor] });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec_pretty(&index).expect("serialize index.json"),
    )
    .expect("write index.json");
}

/// The descriptor named `tag` in the layout's `index.json`: (mediaType, digest, size).
pub fn read_layout_ref(layout: &Path, tag: &str) -> (String, String, u64) {
    let text = fs::read_to_string(layout.join("index.json")).expect("read index.json");
    let index: Value = serde_json::from_str(&text).expect("index.json is JSON");
    let found = index["manifests"]
        .as_array()
        .expect("index.json has manifests")
        .iter()
        .find(|d| d["annotations"][REF_NAME] == tag)
        .unwrap_or_else(|| panic!("no entry named {tag:?} in index.json: {text}"));
    (
        found["mediaType"].as_str().unwrap_or_default().to_string(),
        found["digest"]
            .as_str()
            .expect("descriptor digest")
            .to_string(),
        found["size"].as_u64().expect("descriptor size"),
    )
}

/// A blob of the layout, checked to hash to its name.
pub fn read_layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let path = blob_path(layout, digest);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        sha256(&bytes),
        digest,
        "layout blob {} does not hash to its name",
        path.display()
    );
    bytes
}
