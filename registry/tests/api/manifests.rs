//! Manifest pushes, pulls and deletes of every kind, content negotiation, referrers.

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

use crate::common::*;
use crate::support::*;

/// The OCI image manifest of an artifact: `artifactType` if given, `config`, one `layer`, and
/// `subject` if given.
fn artifact(
    artifact_type: Option<&str>,
    config: &Blob,
    layer: &Blob,
    subject: Option<&Blob>,
    annotations: Value,
) -> Blob {
    let mut value = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": annotations,
    });
    if let Some(artifact_type) = artifact_type {
        value["artifactType"] = json!(artifact_type);
    }
    if let Some(subject) = subject {
        value["subject"] = subject.descriptor();
    }
    manifest(OCI_MANIFEST, &value)
}

/// The Docker schema 2 manifest of `image`'s config and layers.
fn docker_manifest(image: &Image) -> Blob {
    let layers: Vec<Value> = image
        .layers
        .iter()
        .map(|l| Blob::new(DOCKER_LAYER, l.blob.bytes.clone()).descriptor())
        .collect();
    manifest(
        DOCKER_MANIFEST,
        &json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": Blob::new(DOCKER_CONFIG, image.config.bytes.clone()).descriptor(),
            "layers": layers,
        }),
    )
}

/// An index (OCI or Docker list, by `media_type`) over `children`, one platform each.
fn index_of(media_type: &str, children: &[(&Blob, &str)]) -> Blob {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(child, arch)| {
            let mut descriptor = child.descriptor();
            descriptor["platform"] = json!({ "architecture": arch, "os": "linux" });
            descriptor
        })
        .collect();
    manifest(
        media_type,
        &json!({ "schemaVersion": 2, "mediaType": media_type, "manifests": manifests }),
    )
}

#[tokio::test]
async fn every_manifest_kind_round_trips_by_tag_and_digest() {
    let api = Api::start();
    let repo = "kinds";

    let image = small_image(10);
    api.push_image(repo, "oci", &image).await;

    let multi = MultiArchImage::generate(11);
    for child in &multi.images {
        for blob in child.blobs() {
            api.push_blob(repo, &blob.bytes).await;
        }
        api.push_manifest(repo, &child.manifest.digest, &child.manifest)
            .await;
    }
    api.push_manifest(repo, "index", &multi.index).await;

    let docker = docker_manifest(&image);
    api.push_manifest(repo, "docker", &docker).await;
    let docker_arm = docker_manifest(&multi.images[1]);
    api.push_manifest(repo, &docker_arm.digest, &docker_arm)
        .await;
    let list = index_of(
        DOCKER_MANIFEST_LIST,
        &[(&docker, "amd64"), (&docker_arm, "arm64")],
    );
    api.push_manifest(repo, "docker-list", &list).await;

    // No mediaType field: the Content-Type it was pushed with is the type it is served with.
    let untyped = manifest(
        OCI_MANIFEST,
        &json!({
            "schemaVersion": 2,
            "config": image.config.descriptor(),
            "layers": [image.layers[0].blob.descriptor()],
        }),
    );
    api.push_manifest(repo, "untyped", &untyped).await;

    for (tag, pushed) in [
        ("oci", &image.manifest),
        ("index", &multi.index),
        ("docker", &docker),
        ("docker-list", &list),
        ("untyped", &untyped),
    ] {
        api.expect_manifest(repo, tag, pushed).await;
        api.expect_manifest(repo, &pushed.digest, pushed).await;
        let again = api.push_manifest(repo, &pushed.digest, pushed).await;
        assert_eq!(again.header("oci-subject"), None, "no subject: {again}");
    }
    for child in [&multi.images[0].manifest, &docker_arm] {
        api.expect_manifest(repo, &child.digest, child).await;
    }
    let tags = api.get(&format!("{repo}/tags/list")).await;
    assert_eq!(
        tags.expect(200).list("tags"),
        ["docker", "docker-list", "index", "oci", "untyped"],
        "a push by digest adds no tag"
    );
}

#[tokio::test]
async fn content_type_parameters_are_ignored() {
    let api = Api::start();
    let image = small_image(12);
    api.push_blobs("params", &image).await;
    let reply = send(
        api.request(Method::PUT, "params/manifests/v1")
            .header(CONTENT_TYPE, format!("{OCI_MANIFEST}; charset=utf-8"))
            .body(image.manifest.bytes.clone()),
    )
    .await;
    reply.expect(201);
    api.expect_manifest("params", "v1", &image.manifest).await;
}

/// The `Accept` headers real clients send for a manifest, one entry per header line, as captured
/// from each: dockerd (Debian's docker.io 20.10), containerd 1.6, and containers/image, the
/// library of skopeo, podman and Garden's image plugin (grootfs).
const DOCKERD_ACCEPT: &[&str] = &[
    SCHEMA1_SIGNED,
    "application/json",
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
];
const CONTAINERD_ACCEPT: &[&str] = &["application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"];
const CONTAINERS_IMAGE_ACCEPT: &[&str] = &[
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    SCHEMA1_SIGNED,
    "application/vnd.docker.distribution.manifest.v1+json",
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
];

/// What a client gets for a tag, then for that manifest's digest: the manifest served, or `None`
/// for `404 MANIFEST_UNKNOWN`.
type Served<'a> = (Option<&'a Blob>, Option<&'a Blob>);

#[tokio::test]
async fn manifests_are_negotiated_on_accept_as_distribution_does() {
    let api = Api::start();
    let repo = "negotiated";
    let image = small_image(40);
    api.push_image(repo, "oci", &image).await;
    let multi = MultiArchImage::generate(41);
    for child in &multi.images {
        api.push_image(repo, &child.manifest.digest, child).await;
    }
    api.push_manifest(repo, "index", &multi.index).await;
    let docker = docker_manifest(&image);
    api.push_manifest(repo, "docker", &docker).await;
    let docker_arm = docker_manifest(&multi.images[1]);
    api.push_manifest(repo, &docker_arm.digest, &docker_arm)
        .await;
    let list = index_of(
        DOCKER_MANIFEST_LIST,
        &[(&docker_arm, "arm64"), (&docker, "amd64")],
    );
    api.push_manifest(repo, "list", &list).await;
    let arm_only = index_of(DOCKER_MANIFEST_LIST, &[(&docker_arm, "arm64")]);
    api.push_manifest(repo, "arm-only", &arm_only).await;
    // A list whose linux/amd64 image is an OCI manifest.
    let oci_list = index_of(DOCKER_MANIFEST_LIST, &[(&image.manifest, "amd64")]);
    api.push_manifest(repo, "oci-list", &oci_list).await;

    let everything = [
        ("oci", &image.manifest),
        ("index", &multi.index),
        ("docker", &docker),
        ("list", &list),
        ("arm-only", &arm_only),
        ("oci-list", &oci_list),
    ];
    let all = everything.map(|(_, m)| (Some(m), Some(m)));
    let legacy = [
        (None, None),
        (None, None),
        (Some(&docker), Some(&docker)),
        (Some(&docker), Some(&list)),
        (None, Some(&arm_only)),
        (None, Some(&oci_list)),
    ];
    let mut oci_only = legacy;
    oci_only[0] = (Some(&image.manifest), Some(&image.manifest));
    oci_only[5] = (Some(&image.manifest), Some(&oci_list));
    let none: &[&str] = &[];
    let clients: [(&str, &[&str], [Served<'_>; 6]); 7] = [
        ("dockerd", DOCKERD_ACCEPT, all),
        ("containerd", CONTAINERD_ACCEPT, all),
        ("containers/image", CONTAINERS_IMAGE_ACCEPT, all),
        ("no Accept", none, legacy),
        ("curl's */*", &["*/*"], legacy),
        (
            "a Docker schema 2 client",
            &[DOCKER_MANIFEST, SCHEMA1_SIGNED, "application/json"],
            legacy,
        ),
        (
            "an OCI image manifest client",
            &["application/vnd.oci.image.manifest.v1+json; q=0.9"],
            oci_only,
        ),
    ];
    for (client, accept, expected) in clients {
        let headers: Vec<(&str, &str)> = accept.iter().map(|value| ("Accept", *value)).collect();
        for ((tag, pushed), (by_tag, by_digest)) in everything.iter().zip(expected) {
            for (reference, served) in [(*tag, by_tag), (pushed.digest.as_str(), by_digest)] {
                let target = format!("/v2/{repo}/manifests/{reference}");
                for method in ["GET", "HEAD"] {
                    let reply = api.raw_with(method, &target, &headers, b"");
                    let what = format!("{client}, {method} {reference} ({tag})");
                    let Some(served) = served else {
                        reply.expect_error(404, "MANIFEST_UNKNOWN");
                        if method == "GET" {
                            let error = &reply.json()["errors"][0];
                            assert_eq!(error["detail"]["reference"], reference, "{what}: {reply}");
                            assert!(
                                error["message"].as_str().unwrap().contains("Accept header"),
                                "{what}: {reply}"
                            );
                        }
                        continue;
                    };
                    reply.expect(200);
                    assert_eq!(
                        reply.header("content-type"),
                        Some(served.media_type.as_str()),
                        "{what}: {reply}"
                    );
                    assert_eq!(
                        reply.header("docker-content-digest"),
                        Some(served.digest.as_str()),
                        "{what}: {reply}"
                    );
                    assert_eq!(
                        reply.header("content-length"),
                        Some(served.size().to_string().as_str()),
                        "{what}: {reply}"
                    );
                    if method == "GET" {
                        assert!(reply.body == served.bytes, "{what}: {reply}");
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn artifacts_with_a_subject_are_listed_as_its_referrers() {
    let api = Api::start();
    let repo = "refs";
    let image = small_image(13);
    let empty = Blob::new(OCI_EMPTY, b"{}".to_vec());
    let sbom_layer = Blob::new(
        "application/spdx+json",
        br#"{"spdxVersion":"SPDX-2.3"}"#.to_vec(),
    );
    let sig_config = Blob::new(
        "application/vnd.example.signature.config.v1+json",
        br#"{"signer":"ci"}"#.to_vec(),
    );
    let sig_layer = Blob::new("application/vnd.example.signature.v1", b"signed".to_vec());
    for blob in [&empty, &sbom_layer, &sig_config, &sig_layer] {
        api.push_blob(repo, &blob.bytes).await;
    }

    let sbom = artifact(
        Some("application/vnd.example.sbom.v1"),
        &empty,
        &sbom_layer,
        Some(&image.manifest),
        json!({ "org.example.kind": "sbom" }),
    );
    let signature = artifact(
        None,
        &sig_config,
        &sig_layer,
        Some(&image.manifest),
        json!({ "org.example.kind": "signature" }),
    );
    let referring_index = manifest(
        OCI_INDEX,
        &json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [],
            "subject": image.manifest.descriptor(),
            "annotations": { "org.example.kind": "index" },
        }),
    );

    // The spec requires accepting referrers before their subject exists.
    for (reference, pushed) in [
        ("sbom", &sbom),
        (signature.digest.as_str(), &signature),
        ("index", &referring_index),
    ] {
        let reply = api.push_manifest(repo, reference, pushed).await;
        reply.expect_header("oci-subject", &image.manifest.digest);
        api.expect_manifest(repo, &pushed.digest, pushed).await;
    }
    api.push_image(repo, "v1", &image).await;

    let target = format!("{repo}/referrers/{}", image.manifest.digest);
    let reply = api.get(&target).await;
    reply.expect(200).expect_header("content-type", OCI_INDEX);
    assert_eq!(reply.header("oci-filters-applied"), None, "{reply}");
    let descriptor = |pushed: &Blob, artifact_type: Option<&str>, kind: &str| {
        let mut d = pushed.descriptor();
        if let Some(artifact_type) = artifact_type {
            d["artifactType"] = json!(artifact_type);
        }
        d["annotations"] = json!({ "org.example.kind": kind });
        d
    };
    let sbom_descriptor = descriptor(&sbom, Some("application/vnd.example.sbom.v1"), "sbom");
    let mut expected = vec![
        sbom_descriptor.clone(),
        // Without artifactType an image manifest is listed under its config's media type, an
        // index under none.
        descriptor(&signature, Some(&sig_config.media_type), "signature"),
        descriptor(&referring_index, None, "index"),
    ];
    let by_digest = |a: &Value, b: &Value| a["digest"].as_str().cmp(&b["digest"].as_str());
    expected.sort_by(by_digest);
    let listed = |reply: &Reply| {
        let index = reply.json();
        assert_eq!(index["schemaVersion"], 2, "{reply}");
        assert_eq!(index["mediaType"], OCI_INDEX, "{reply}");
        let mut manifests = index["manifests"].as_array().expect("manifests").clone();
        manifests.sort_by(by_digest);
        manifests
    };
    assert_eq!(listed(&reply), expected);

    let filtered = api
        .get(&with_query(
            &target,
            "artifactType",
            "application/vnd.example.sbom.v1",
        ))
        .await;
    filtered
        .expect(200)
        .expect_header("oci-filters-applied", "artifactType")
        .expect_header("content-type", OCI_INDEX);
    assert_eq!(filtered.json()["manifests"], json!([sbom_descriptor]));

    // Nothing refers to the artifact, and nothing in another repository refers to the image.
    for target in [
        format!("{repo}/referrers/{}", sbom.digest),
        format!("elsewhere/referrers/{}", image.manifest.digest),
    ] {
        let reply = api.get(&target).await;
        reply.expect(200).expect_header("content-type", OCI_INDEX);
        assert_eq!(
            reply.json(),
            json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] })
        );
    }

    api.delete(&format!("{repo}/manifests/{}", sbom.digest))
        .await
        .expect(202);
    expected.retain(|d| *d != sbom_descriptor);
    assert_eq!(listed(&api.get(&target).await), expected);
}

#[tokio::test]
async fn a_manifest_referencing_a_missing_blob_or_child_is_rejected_and_not_stored() {
    let api = Api::start();
    let repo = "missing";
    let image = small_image(14);
    api.push_blob(repo, &image.config.bytes).await;

    let reply = api.put_manifest(repo, "v1", &image.manifest).await;
    reply.expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(
        reply.json()["errors"][0]["detail"]["digest"],
        image.layers[0].blob.digest
    );

    let index = index_of(OCI_INDEX, &[(&image.manifest, "amd64")]);
    api.put_manifest(repo, "index", &index)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");

    for reference in ["v1", "index", &image.manifest.digest, &index.digest] {
        let target = format!("{repo}/manifests/{reference}");
        api.get(&target).await.expect_error(404, "MANIFEST_UNKNOWN");
        api.head(&target)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
    let tags = api.get(&format!("{repo}/tags/list")).await;
    assert!(tags.expect(200).list("tags").is_empty());
    let stored = api.registry.stored("blobs").await;
    for refused in [&image.manifest.digest, &index.digest] {
        let hex = refused.strip_prefix("sha256:").expect("a sha256 digest");
        assert!(
            !stored.iter().any(|path| path.ends_with(hex)),
            "the bytes of refused manifest {refused} were stored"
        );
    }
}

#[tokio::test]
async fn a_manifest_whose_digest_differs_from_the_url_is_digest_invalid() {
    let api = Api::start();
    let image = small_image(15);
    api.push_blobs("mismatch", &image).await;
    let claimed = sha256(b"another manifest");
    api.put_manifest("mismatch", &claimed, &image.manifest)
        .await
        .expect_error(400, "DIGEST_INVALID");
    for digest in [&claimed, &image.manifest.digest] {
        api.get(&format!("mismatch/manifests/{digest}"))
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
}

#[tokio::test]
async fn manifests_up_to_4_mib_are_accepted_and_larger_ones_get_413() {
    let api = Api::start();
    let image = small_image(16);
    api.push_blobs("big", &image).await;
    // An annotation pads the manifest to exactly `size` bytes.
    let padded = |size: usize| {
        let value = |pad: usize| {
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": image.config.descriptor(),
                "layers": [image.layers[0].blob.descriptor()],
                "annotations": { "pad": "x".repeat(pad) },
            })
        };
        let overhead = serde_json::to_vec(&value(0)).expect("serialize").len();
        let bytes = serde_json::to_vec(&value(size - overhead)).expect("serialize");
        assert_eq!(bytes.len(), size);
        Blob::new(OCI_MANIFEST, bytes)
    };

    let largest = padded(MANIFEST_LIMIT);
    api.push_manifest("big", "largest", &largest).await;
    api.expect_manifest("big", "largest", &largest).await;

    let too_large = padded(MANIFEST_LIMIT + 1);
    api.put_manifest("big", "too-large", &too_large)
        .await
        .expect_error(413, "SIZE_INVALID");
    // Without a Content-Length the limit is found while reading.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = too_large
        .bytes
        .chunks(64 * 1024)
        .map(|piece| Ok(piece.to_vec()))
        .collect();
    send(
        api.request(Method::PUT, "big/manifests/too-large")
            .header(CONTENT_TYPE, OCI_MANIFEST)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            ))),
    )
    .await
    .expect_error(413, "SIZE_INVALID");
    api.get(&format!("big/manifests/{}", too_large.digest))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    api.get("big/manifests/too-large")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn invalid_manifests_are_manifest_invalid() {
    let api = Api::start();
    let image = small_image(17);
    let json_bytes = |value: Value| serde_json::to_vec(&value).expect("serialize");
    let schema1 = json_bytes(json!({
        "schemaVersion": 1, "name": "invalid", "tag": "v1", "architecture": "amd64",
        "fsLayers": [], "history": [], "signatures": [],
    }));
    // A null field is as good as a missing one to a JSON reader.
    let image_manifest = |schema_version: Value, config: Value| {
        json_bytes(json!({
            "schemaVersion": schema_version,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [],
        }))
    };
    let config = image.config.descriptor();
    let text =
        json_bytes(json!({ "schemaVersion": 2, "mediaType": "text/plain", "manifests": [] }));
    let cases = [
        (OCI_MANIFEST, b"not json at all".to_vec(), None),
        (OCI_MANIFEST, image_manifest(json!(2), Value::Null), None),
        (
            OCI_MANIFEST,
            image_manifest(Value::Null, config.clone()),
            None,
        ),
        (OCI_MANIFEST, image_manifest(json!(3), config), None),
        ("text/plain", text, None),
        // The Content-Type contradicts the mediaType field.
        (DOCKER_MANIFEST, image.manifest.bytes.clone(), None),
        // Schema 1 is refused with advice, whichever way it is labelled.
        (SCHEMA1_SIGNED, schema1.clone(), Some("schema 1")),
        ("application/json", schema1, Some("schema 1")),
    ];
    for (content_type, body, message) in cases {
        let reply = send(
            api.request(Method::PUT, "invalid/manifests/v1")
                .header(CONTENT_TYPE, content_type)
                .body(body),
        )
        .await;
        reply.expect_error(400, "MANIFEST_INVALID");
        if let Some(message) = message {
            let text = reply.json()["errors"][0]["message"].to_string();
            assert!(text.contains(message), "{reply}");
        }
    }
    // Nothing was recorded, not even the repository.
    api.get("invalid/tags/list")
        .await
        .expect_error(404, "NAME_UNKNOWN");
}

#[tokio::test]
async fn deleting_a_manifest_by_digest_removes_its_tags() {
    let api = Api::start();
    let image = small_image(18);
    api.push_image("delm", "a", &image).await;
    api.push_manifest("delm", "b", &image.manifest).await;
    let other = small_image(19);
    api.push_image("delm", "other", &other).await;

    let target = format!("delm/manifests/{}", image.manifest.digest);
    api.delete(&target).await.expect(202);
    for reference in [image.manifest.digest.as_str(), "a", "b"] {
        let target = format!("delm/manifests/{reference}");
        api.get(&target).await.expect_error(404, "MANIFEST_UNKNOWN");
        api.head(&target)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
    }
    api.delete(&target)
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    let tags = api.get("delm/tags/list").await;
    assert_eq!(tags.expect(200).list("tags"), ["other"]);
    api.expect_manifest("delm", "other", &other.manifest).await;
}

#[tokio::test]
async fn deleting_a_tag_keeps_the_manifest() {
    let api = Api::start();
    let image = small_image(20);
    api.push_image("delt", "keep", &image).await;
    api.push_manifest("delt", "drop", &image.manifest).await;

    api.delete("delt/manifests/drop").await.expect(202);
    api.get("delt/manifests/drop")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    api.delete("delt/manifests/drop")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    api.expect_manifest("delt", "keep", &image.manifest).await;
    api.expect_manifest("delt", &image.manifest.digest, &image.manifest)
        .await;
    let tags = api.get("delt/tags/list").await;
    assert_eq!(tags.expect(200).list("tags"), ["keep"]);
}
