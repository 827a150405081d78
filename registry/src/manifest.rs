//! Reads a pushed manifest just far enough to validate it and index what it references.

use berth_oci::manifest::ManifestDocument;
use berth_oci::{Digest, media_type};

use crate::error::RegistryError;
use crate::metadata::NewManifest;

fn invalid(message: impl Into<String>) -> RegistryError {
    RegistryError::ManifestInvalid(message.into())
}

/// Strips parameters such as `; charset=utf-8` from a Content-Type.
fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

const SCHEMA1_ADVICE: &str = "Docker schema 1 manifests are not supported; push with a current docker, \
    podman or skopeo, or convert the image with `skopeo copy --format v2s2`";

/// Validates `body`, pushed with `content_type`, whose digest is `digest`, and describes it for the
/// metadata store. The body itself is never rewritten.
pub fn parse(
    content_type: Option<&str>,
    body: &[u8],
    digest: Digest,
) -> Result<NewManifest, RegistryError> {
    let declared = content_type.map(essence).filter(|t| !t.is_empty());
    if declared.is_some_and(media_type::is_schema1) && declared != Some("application/json") {
        return Err(invalid(SCHEMA1_ADVICE));
    }
    let raw = ManifestDocument::parse(body).map_err(|e| invalid(format!("not a manifest: {e}")))?;
    if raw.schema_version == Some(1) {
        return Err(invalid(SCHEMA1_ADVICE));
    }
    if raw.schema_version != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    let media_type = match (declared, raw.media_type.as_deref()) {
        (Some(header), Some(field)) if header != field && header != "application/json" => {
            return Err(invalid(format!(
                "Content-Type {header} does not match the manifest's mediaType {field}"
            )));
        }
        (_, Some(field)) => field.to_owned(),
        (Some(header), None) if header != "application/json" => header.to_owned(),
        (_, None) if raw.manifests.is_some() => media_type::OCI_INDEX.to_owned(),
        (_, None) => media_type::OCI_MANIFEST.to_owned(),
    };
    if !media_type::is_supported_manifest(&media_type) {
        return Err(invalid(format!(
            "unsupported manifest media type {media_type}"
        )));
    }

    let (blobs, manifests, artifact_type) = if media_type::is_index(&media_type) {
        let children = raw
            .manifests
            .as_ref()
            .ok_or_else(|| invalid("an index needs a manifests list"))?;
        let children = children.iter().map(|child| child.digest.clone()).collect();
        (vec![], children, raw.artifact_type.clone())
    } else {
        let config = raw
            .config
            .as_ref()
            .ok_or_else(|| invalid("an image manifest needs a config"))?;
        if raw.layers.is_none() {
            return Err(invalid("an image manifest needs a layers list"));
        }
        let blobs = raw.blobs().map(|blob| blob.digest.clone()).collect();
        // The referrers API reports an image's config type when it declares no artifactType.
        let artifact_type = raw
            .artifact_type
            .clone()
            .or_else(|| config.media_type.clone());
        (blobs, vec![], artifact_type)
    };
    let subject = raw.subject.as_ref().map(|subject| subject.digest.clone());
    let annotations = raw
        .annotations
        .as_ref()
        .map(|a| serde_json::Value::Object(a.clone()).to_string());
    Ok(NewManifest {
        digest,
        media_type,
        size: body.len() as u64,
        artifact_type,
        subject,
        annotations,
        blobs,
        manifests,
        upstream_sizes: None,
    })
}

/// The first image the index `body` lists for `os` and `architecture`, ignoring variants, as
/// distribution chooses the image it serves to a client that cannot read an index.
pub fn platform_image(body: &[u8], os: &str, architecture: &str) -> Option<Digest> {
    ManifestDocument::parse(body)
        .ok()?
        .manifests?
        .into_iter()
        .find(|child| {
            child
                .platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
        .map(|child| child.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
    const LAYER: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CONFIG}","size":7}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{LAYER}","size":0}}]{extra}}}"#,
            media_type::OCI_MANIFEST
        )
    }

    fn parse_str(content_type: Option<&str>, body: &str) -> Result<NewManifest, RegistryError> {
        parse(
            content_type,
            body.as_bytes(),
            Digest::sha256_of(body.as_bytes()),
        )
    }

    #[test]
    fn image_manifest_references_config_and_layers() {
        let parsed = parse_str(Some(media_type::OCI_MANIFEST), &image("")).unwrap();
        assert_eq!(parsed.blobs.len(), 2);
        assert_eq!(parsed.blobs[0].to_string(), CONFIG);
        assert_eq!(
            parsed.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert!(parsed.subject.is_none());
    }

    #[test]
    fn subject_and_artifact_type_are_indexed() {
        let body = image(&format!(
            r#","artifactType":"application/vnd.example.sig","subject":{{"mediaType":"{}","digest":"{LAYER}","size":1}},"annotations":{{"a":"b"}}"#,
            media_type::OCI_MANIFEST
        ));
        let parsed = parse_str(None, &body).unwrap();
        assert_eq!(
            parsed.artifact_type.as_deref(),
            Some("application/vnd.example.sig")
        );
        assert_eq!(parsed.subject.unwrap().to_string(), LAYER);
        assert_eq!(parsed.annotations.as_deref(), Some(r#"{"a":"b"}"#));
    }

    #[test]
    fn mismatched_content_type_is_refused() {
        let err = parse_str(Some(media_type::DOCKER_MANIFEST), &image("")).unwrap_err();
        assert!(matches!(err, RegistryError::ManifestInvalid(_)), "{err:?}");
    }

    #[test]
    fn schema1_gets_advice() {
        let err = parse_str(
            Some(media_type::DOCKER_SCHEMA1_SIGNED),
            r#"{"schemaVersion":1}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("skopeo copy --format v2s2"),
            "{err}"
        );
        let err = parse_str(
            None,
            r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("schema 1"), "{err}");
    }

    #[test]
    fn index_references_child_manifests() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{CONFIG}","size":7,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            media_type::OCI_INDEX,
            media_type::OCI_MANIFEST
        );
        let parsed = parse_str(Some(media_type::OCI_INDEX), &body).unwrap();
        assert!(parsed.blobs.is_empty());
        assert_eq!(parsed.manifests[0].to_string(), CONFIG);
    }

    #[test]
    fn foreign_layers_need_not_be_present() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{CONFIG}","size":7}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{LAYER}","size":5,"urls":["https://example.com/layer"]}}]}}"#,
            media_type::DOCKER_MANIFEST
        );
        let parsed = parse_str(Some(media_type::DOCKER_MANIFEST), &body).unwrap();
        assert_eq!(
            parsed.blobs.len(),
            1,
            "only the config must be in the repository"
        );
    }

    #[test]
    fn garbage_and_bad_descriptors_are_invalid() {
        for body in [
            "not json".to_owned(),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#
                .to_owned(),
            image("").replace(LAYER, "sha256:nothex"),
            image("").replace("\"size\":0", "\"size\":-1"),
            r#"{"schemaVersion":2,"mediaType":"text/plain","manifests":[]}"#.to_owned(),
        ] {
            assert!(
                matches!(
                    parse_str(None, &body),
                    Err(RegistryError::ManifestInvalid(_))
                ),
                "{body}"
            );
        }
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        const KEYS: &[&str] = &[
            "schemaVersion",
            "mediaType",
            "config",
            "layers",
            "manifests",
            "subject",
            "artifactType",
            "annotations",
            "digest",
            "size",
            "urls",
            "platform",
            "os",
            "architecture",
        ];

        fn media_types() -> Vec<&'static str> {
            vec![
                media_type::OCI_MANIFEST,
                media_type::OCI_INDEX,
                media_type::DOCKER_MANIFEST,
                media_type::DOCKER_MANIFEST_LIST,
                media_type::DOCKER_SCHEMA1_SIGNED,
                "application/json",
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            ]
        }

        /// JSON shaped like manifests: their keys, media types, digests, sizes and platforms,
        /// nested in every wrong way too.
        fn manifest_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                (-2i64..3).prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                prop::sample::select(media_types()).prop_map(Value::from),
                prop::sample::select(vec![CONFIG, LAYER, "sha256:12", "linux", "amd64", ""])
                    .prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(
                        |fields| {
                            Value::Object(
                                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                            )
                        }
                    ),
                ]
            })
        }

        fn body() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                4 => manifest_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                1 => (manifest_json(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
                    let mut bytes = serde_json::to_vec(&v).unwrap();
                    bytes.truncate(cut.index(bytes.len() + 1));
                    bytes
                }),
                1 => prop::collection::vec(any::<u8>(), 0..64),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(100_000))]

            #[test]
            fn any_body_is_a_valid_manifest_or_manifest_invalid(
                content_type in prop::option::of(prop_oneof![
                    prop::sample::select(media_types()).prop_map(str::to_owned),
                    ".{0,30}",
                ]),
                body in body(),
            ) {
                let digest = Digest::sha256_of(&body);
                match parse(content_type.as_deref(), &body, digest.clone()) {
                    Ok(manifest) => {
                        prop_assert_eq!(manifest.size, body.len() as u64);
                        prop_assert_eq!(manifest.digest, digest);
                        prop_assert!(media_type::is_supported_manifest(&manifest.media_type));
                    }
                    Err(err) => prop_assert!(matches!(err, RegistryError::ManifestInvalid(_))),
                }
                let _ = platform_image(&body, "linux", "amd64");
            }
        }
    }
}
