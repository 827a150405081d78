//! The OCI image manifest and index (and their Docker schema 2 twins) as Berth reads them.
//!
//! Read only, on purpose: a manifest is stored, served and digested exactly as it was pushed, so
//! nothing in Berth serialises one from this model. Every list and most fields are optional here;
//! what a reader requires of a manifest it checks itself.

use serde::Deserialize;

use crate::Digest;
use crate::media_type;

/// A manifest or an index: one shape covers both, as in the JSON, since which one a document is
/// may only be known from its fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestDocument {
    #[serde(default)]
    pub schema_version: Option<i64>,
    #[serde(default)]
    pub media_type: Option<String>,
    /// An image manifest's config.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// An image manifest's layers.
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    /// An index's manifests.
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub subject: Option<Descriptor>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ManifestDocument {
    pub fn parse(bytes: &[u8]) -> Result<ManifestDocument, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The blobs an image manifest needs in its repository: the config, then every layer that is
    /// not foreign.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        let layers = self.layers.iter().flatten().filter(|l| !l.is_foreign());
        self.config.iter().chain(layers)
    }
}

/// A content descriptor: what a manifest says about a blob or another manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub urls: Vec<String>,
    /// What an index entry runs on.
    #[serde(default)]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A foreign layer: of a non-distributable type and with `urls` to fetch it from, so
    /// registries neither hold nor require it, and copies leave it out. A non-distributable
    /// layer without `urls` can only come from the registry, so it counts as an ordinary blob.
    pub fn is_foreign(&self) -> bool {
        self.media_type
            .as_deref()
            .is_some_and(media_type::is_non_distributable)
            && !self.urls.is_empty()
    }
}

/// The platform of an index entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
    const LAYER: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn layer(media_type: &str, urls: &[&str]) -> Descriptor {
        Descriptor {
            media_type: Some(media_type.to_owned()),
            digest: LAYER.parse().unwrap(),
            size: 5,
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            platform: None,
        }
    }

    #[test]
    fn foreign_layers_are_non_distributable_types_with_urls() {
        let urls = ["https://example.com/layer"];
        for kind in [
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        ] {
            assert!(layer(kind, &urls).is_foreign(), "{kind}");
            assert!(!layer(kind, &[]).is_foreign(), "{kind} without urls");
        }
        for kind in [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.example.foreign+json",
            "application/vnd.example.nondistributable",
        ] {
            assert!(!layer(kind, &urls).is_foreign(), "{kind}");
        }
        let untyped = Descriptor {
            media_type: None,
            ..layer("", &urls)
        };
        assert!(!untyped.is_foreign());
    }

    #[test]
    fn an_image_needs_its_config_and_distributable_layers() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CONFIG}","size":7}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{LAYER}","size":0}},{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{LAYER}","size":5,"urls":["https://example.com/l"]}}]}}"#
        );
        let manifest = ManifestDocument::parse(body.as_bytes()).unwrap();
        let blobs: Vec<String> = manifest.blobs().map(|b| b.digest.to_string()).collect();
        assert_eq!(blobs, [CONFIG, LAYER]);
    }

    #[test]
    fn index_entries_carry_platforms() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{CONFIG}","size":7,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        let index = ManifestDocument::parse(body.as_bytes()).unwrap();
        let entries = index.manifests.unwrap();
        assert_eq!(
            entries[0].platform,
            Some(Platform {
                os: "linux".into(),
                architecture: "arm64".into(),
                variant: Some("v8".into()),
            })
        );
    }

    #[test]
    fn bad_descriptors_are_refused() {
        for body in [
            r#"{"config":{"digest":"sha256:nothex","size":1}}"#.to_owned(),
            format!(r#"{{"config":{{"digest":"{CONFIG}","size":-1}}}}"#),
            format!(r#"{{"layers":[{{"digest":"{LAYER}"}}]}}"#),
        ] {
            assert!(ManifestDocument::parse(body.as_bytes()).is_err(), "{body}");
        }
    }
}
