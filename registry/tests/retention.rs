//! Last-pull tracking against the real binary: a manifest GET is a pull, a HEAD is not, and the
//! pulls noted in memory reach the database at shutdown even when no periodic write came first.

mod common;

use std::time::Duration;

use common::*;

const ACCEPT: (&str, &str) = ("Accept", "application/vnd.oci.image.manifest.v1+json");

fn last_pulls(registry: &Registry) -> Vec<(String, i64)> {
    registry
        .metadata_rows(
            "SELECT r.name, m.last_pulled_at FROM manifests m \
             JOIN repositories r ON r.id = m.repository_id ORDER BY r.name",
        )
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().expect("a number")))
        .collect()
}

#[test]
fn gets_are_pulls_heads_are_not_and_shutdown_writes_them() {
    let mut registry = Registry::start_with_config("retention:\n  pull_flush_seconds: 3600\n");
    let image = Image::generate(7, "amd64", &[1024]);
    for repo in ["pulled/app", "checked/app"] {
        for blob in [&image.config]
            .into_iter()
            .chain(image.layers.iter().map(|l| &l.blob))
        {
            let target = format!("/v2/{repo}/blobs/uploads/?digest={}", blob.digest);
            let octets = [("Content-Type", "application/octet-stream")];
            let sent = blocking_request_with(
                registry.addr(),
                "POST",
                &target,
                &octets,
                &blob.bytes,
                Duration::from_secs(30),
            )
            .unwrap();
            assert_eq!(sent.status, 201);
        }
        let target = format!("/v2/{repo}/manifests/v1");
        let put = blocking_request_with(
            registry.addr(),
            "PUT",
            &target,
            &[("Content-Type", image.manifest.media_type.as_str())],
            &image.manifest.bytes,
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(put.status, 201);
    }
    for _ in 0..3 {
        let head = blocking_request_with(
            registry.addr(),
            "HEAD",
            "/v2/checked/app/manifests/v1",
            &[ACCEPT],
            b"",
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(head.status, 200);
        let get = blocking_request_with(
            registry.addr(),
            "GET",
            "/v2/pulled/app/manifests/v1",
            &[ACCEPT],
            b"",
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(get.status, 200);
    }
    let before = last_pulls(&registry);
    assert!(
        before.iter().all(|(_, at)| *at == 0),
        "written only later: {before:?}"
    );
    assert!(
        registry
            .terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    let after = last_pulls(&registry);
    assert_eq!(after[0].0, "checked/app");
    assert_eq!(after[0].1, 0, "a HEAD is no pull");
    assert_eq!(after[1].0, "pulled/app");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - 60..=now).contains(&after[1].1), "{after:?}");
}
