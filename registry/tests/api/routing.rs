//! The base endpoint, unknown paths and methods.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::json;

use crate::common::*;
use crate::support::*;

#[tokio::test]
async fn base_endpoint_answers_200_with_the_api_version() {
    let api = Api::start();
    for reply in [api.get("").await, api.head("").await] {
        reply
            .expect(200)
            .expect_header("content-type", "application/json");
    }
    assert_eq!(api.get("").await.json(), json!({}));
}

#[tokio::test]
async fn unknown_paths_and_methods_get_oci_errors() {
    let api = Api::start();
    for target in ["repo/unknown/thing", "repo/manifests", "/v3/", "/nothing"] {
        api.get(target).await.expect_error(404, "UNSUPPORTED");
    }
    let digest = sha256(b"x");
    let session = "0b3ad7c4-6c2e-4a4f-9d51-1f2a3b4c5d6e";
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ];
    for (target, allow) in [
        (
            "repo/manifests/latest".to_string(),
            "GET, HEAD, PUT, DELETE",
        ),
        (format!("repo/blobs/{digest}"), "GET, HEAD, DELETE"),
        ("repo/blobs/uploads/".to_string(), "POST"),
        (
            format!("repo/blobs/uploads/{session}"),
            "GET, PATCH, PUT, DELETE",
        ),
        ("repo/tags/list".to_string(), "GET"),
        ("_catalog".to_string(), "GET"),
        (format!("repo/referrers/{digest}"), "GET"),
    ] {
        for method in &methods {
            let reply = send(api.request(method.clone(), &target)).await;
            if allow.split(", ").any(|m| m == method.as_str()) {
                assert_ne!(reply.status, 405, "{method} {target} is allowed: {reply}");
            } else {
                reply.expect_error(405, "UNSUPPORTED");
                assert_eq!(
                    reply.header("allow"),
                    Some(allow),
                    "{method} {target}: {reply}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_wrong_method_outside_the_repository_api_is_an_oci_405_with_allow() {
    let api = Api::start();
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    // Every route the server has besides `/v2/{name}/...`.
    for (target, allow) in [
        ("/v2/", ["GET", "HEAD"].as_slice()),
        ("/healthz", &["GET", "HEAD"]),
        ("/metrics", &["GET", "HEAD"]),
        ("/auth/token", &["GET", "HEAD", "POST"]),
    ] {
        for method in &methods {
            let reply = send(api.request(method.clone(), target)).await;
            if allow.contains(&method.as_str()) {
                assert_ne!(reply.status, 405, "{method} {target} is allowed: {reply}");
                continue;
            }
            reply.expect_error(405, "UNSUPPORTED");
            let listed: BTreeSet<&str> = reply
                .header("allow")
                .unwrap_or_else(|| panic!("no Allow: {reply}"))
                .split(',')
                .map(str::trim)
                .collect();
            assert_eq!(listed, allow.iter().copied().collect(), "{reply}");
        }
    }
}
