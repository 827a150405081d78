//! Generated content: layers, single-platform images, indexes, and OCI image layouts.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};

use super::*;

/// A gzipped layer tar and the digest of the tar itself (its diff_id).
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

impl Layer {
    /// One file of `size` random bytes derived from `seed`, under `layer-<seed>/`.
    pub fn generate(seed: u64, size: usize) -> Layer {
        let data = Rng::new(seed).bytes(size);
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_size(size as u64);
        tar.append_data(&mut header, format!("layer-{seed}/data.bin"), &data[..])
            .expect("append to a tar");
        let tar = tar.into_inner().expect("finish a tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        Layer {
            diff_id: sha256(&tar),
            blob: Blob::new(OCI_LAYER_GZIP, gz.finish().expect("gzip")),
        }
    }
}

/// A single-platform OCI image.
#[derive(Clone, Debug)]
pub struct Image {
    pub architecture: String,
    pub layers: Vec<Layer>,
    pub config: Blob,
    pub manifest: Blob,
}

impl Image {
    /// An image for linux/`architecture` whose config's `config` object is `runtime`
    /// (`Entrypoint`, `Cmd`, `ExposedPorts`, ...).
    pub fn new(architecture: &str, layers: Vec<Layer>, runtime: Value) -> Image {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": runtime,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = Blob::new(
            OCI_CONFIG,
            serde_json::to_vec(&config).expect("config JSON"),
        );
        let layer_descriptors: Vec<Value> = layers.iter().map(|l| l.blob.descriptor()).collect();
        // Pretty-printed: a copy that re-serialised the manifest would change its digest.
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layer_descriptors,
        });
        let manifest = Blob::new(
            OCI_MANIFEST,
            serde_json::to_vec_pretty(&manifest).expect("manifest JSON"),
        );
        Image {
            architecture: architecture.into(),
            layers,
            config,
            manifest,
        }
    }

    /// Config and layers.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config)
            .chain(self.layers.iter().map(|l| &l.blob))
            .collect()
    }

    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.blob.digest.clone()).collect()
    }
}

/// An OCI index over single-platform (linux) images.
pub fn index_of(images: &[&Image]) -> Blob {
    let manifests: Vec<Value> = images
        .iter()
        .map(|image| {
            let mut descriptor = image.manifest.descriptor();
            descriptor["platform"] = json!({ "architecture": image.architecture, "os": "linux" });
            descriptor
        })
        .collect();
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    Blob::new(
        OCI_INDEX,
        serde_json::to_vec_pretty(&index).expect("index JSON"),
    )
}

/// Writes an OCI image layout at `layout` whose `index.json` names `top` as `tag`.
pub fn write_oci_layout(layout: &Path, tag: &str, top: &Blob, blobs: &[&Blob]) {
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).expect("create blobs/sha256");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write oci-layout");
    for blob in blobs.iter().copied().chain([top]) {
        let hex = blob
            .digest
            .strip_prefix("sha256:")
            .expect("a sha256 digest");
        fs::write(dir.join(hex), &blob.bytes).expect("write a blob");
    }
    let mut descriptor = top.descriptor();
    descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor] });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("index.json"),
    )
    .expect("write index.json");
}

/// The digests a manifest lists as layers.
pub fn manifest_layers(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("a manifest with layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("a layer digest").to_owned())
        .collect()
}
