//! Generated content: layers, single- and multi-platform images.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

use super::*;

/// A gzipped tar layer and the digest of its uncompressed tar (the config's diff_id).
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// A tar archive holding a directory `layer-<tag>/` with three files of random bytes adding up to
/// about `size` bytes and a small text file; deterministic for a given `rng` state.
pub fn layer_tar(rng: &mut Rng, tag: &str, size: usize) -> Vec<u8> {
    const MTIME: u64 = 1_700_000_000;
    let mut builder = tar::Builder::new(Vec::new());
    let dir = format!("layer-{tag}/");
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header.set_size(0);
    builder
        .append_data(&mut header, &dir, std::io::empty())
        .expect("append a directory to the tar");
    let mut file = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, format!("{dir}{name}"), data)
            .expect("append a file to the tar");
    };
    let part = size / 3;
    for k in 0..3 {
        let len = if k == 2 { size - 2 * part } else { part };
        file(&format!("random-{k}.bin"), &rng.bytes(len));
    }
    file(
        "README",
        format!("berth end-to-end test layer {tag}\n").as_bytes(),
    );
    builder.into_inner().expect("finish the tar")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

pub fn make_layer(rng: &mut Rng, tag: &str, size: usize) -> Layer {
    let tar = layer_tar(rng, tag, size);
    Layer {
        diff_id: sha256(&tar),
        blob: Blob::new(OCI_LAYER_GZIP, gzip(&tar)),
    }
}

/// A single-platform OCI image: layers, config and manifest.
#[derive(Clone, Debug)]
pub struct Image {
    pub architecture: String,
    pub os: String,
    pub layers: Vec<Layer>,
    pub config: Blob,
    pub manifest: Blob,
}

impl Image {
    /// An image for linux/`architecture` with one layer per entry of `layer_sizes` (approximate
    /// uncompressed sizes), all content derived from `seed`.
    pub fn generate(seed: u64, architecture: &str, layer_sizes: &[usize]) -> Image {
        let mut rng = Rng::new(seed);
        let layers = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| make_layer(&mut rng, &format!("{seed}-{architecture}-{i}"), size))
            .collect();
        Image::from_layers(seed, architecture, layers)
    }

    /// An image for linux/`architecture` over the given layers.
    pub fn from_layers(seed: u64, architecture: &str, layers: Vec<Layer>) -> Image {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let history: Vec<Value> =
            (0..layers.len()).map(|i| json!({ "created": "2024-01-01T00:00:00Z", "created_by": format!("berth e2e layer {i}") })).collect();
        let config = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "Labels": { "org.berth.e2e.seed": seed.to_string() }
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        let config = Blob::new(
            OCI_CONFIG,
            serde_json::to_vec(&config).expect("serialize the config"),
        );
        let layer_descriptors: Vec<Value> = layers.iter().map(|l| l.blob.descriptor()).collect();
        // Pretty-printed on purpose: a registry that re-serialises manifests would change the bytes.
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layer_descriptors,
            "annotations": { "org.opencontainers.image.description": format!("berth e2e image {seed} {architecture}") }
        });
        let manifest = Blob::new(
            OCI_MANIFEST,
            serde_json::to_vec_pretty(&manifest).expect("serialize the manifest"),
        );
        Image {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            layers,
            config,
            manifest,
        }
    }

    /// Config and layers: every blob the manifest references.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut blobs = vec![&self.config];
        blobs.extend(self.layers.iter().map(|l| &l.blob));
        blobs
    }

    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.blob.digest.clone()).collect()
    }
}

/// A multi-platform image: an OCI index over single-platform images.
#[derive(Clone, Debug)]
pub struct MultiArchImage {
    pub index: Blob,
    pub images: Vec<Image>,
}

impl MultiArchImage {
    /// linux/amd64 and linux/arm64 images that share their first (base) layer, and the index over
    /// them.
    pub fn generate(seed: u64) -> MultiArchImage {
        let mut rng = Rng::new(seed);
        let base = make_layer(&mut rng, &format!("{seed}-base"), 200 * 1024);
        let images: Vec<Image> = ["amd64", "arm64"]
            .iter()
            .enumerate()
            .map(|(i, arch)| {
                let own = make_layer(
                    &mut rng,
                    &format!("{seed}-{arch}"),
                    100 * 1024 + i * 37 * 1024,
                );
                Image::from_layers(seed, arch, vec![base.clone(), own])
            })
            .collect();
        let manifests: Vec<Value> = images
            .iter()
            .map(|img| {
                let mut d = img.manifest.descriptor();
                d["platform"] = json!({ "architecture": img.architecture, "os": img.os });
                d
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        let index = Blob::new(
            OCI_INDEX,
            serde_json::to_vec_pretty(&index).expect("serialize the index"),
        );
        MultiArchImage { index, images }
    }

    /// Every blob below the index: manifests, configs, layers (deduplicated later by the writer).
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut blobs = Vec::new();
        for img in &self.images {
            blobs.push(&img.manifest);
            blobs.extend(img.blobs());
        }
        blobs
    }
}
