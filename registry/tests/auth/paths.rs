//! Names with `..` and other path tricks are refused in both modes, and nothing is written.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;
use crate::support::*;

#[tokio::test]
async fn dot_dot_names_are_refused_before_anything_else() {
    for mode in [Mode::Basic, Mode::Token] {
        dot_dot_names(mode).await;
    }
}

async fn dot_dot_names(mode: Mode) {
    let material = usual_material();
    let api = Api::start(&material, mode, "");
    let image = api.populate().await;
    let digest = &image.layers[0].blob.digest;
    // Alice's credentials, with push on public/app in token mode.
    let alice = match mode {
        Mode::Basic => basic_authorization(ALICE),
        Mode::Token => {
            let scopes = ["repository:public/app:pull,push"];
            format!("Bearer {}", api.token(Some(ALICE), &scopes).await)
        }
    };
    let targets = [
        "/v2/../private/secret/manifests/v1".to_string(),
        "/v2/public/../private/secret/manifests/v1".to_string(),
        "/v2/public/app/../../private/secret/manifests/v1".to_string(),
        "/v2/public/../private/secret/tags/list".to_string(),
        format!("/v2/public/../private/secret/blobs/{digest}"),
        "/v2/%2e%2e/private/secret/manifests/v1".to_string(),
        "/v2/public/%2e%2e/private/secret/manifests/v1".to_string(),
        "/v2/public/..%2fprivate%2fsecret/manifests/v1".to_string(),
        "/v2/public%2f..%2fprivate%2fsecret/manifests/v1".to_string(),
        "/v2/public/./app/manifests/v1".to_string(),
        "/v2//private/secret/manifests/v1".to_string(),
        "/v2/public/app/manifests/../../../private/secret/manifests/v1".to_string(),
        "/v2/public/app/blobs/uploads/../../../../private/secret/blobs/uploads/".to_string(),
        "/v2/..%00/private/secret/manifests/v1".to_string(),
    ];
    for target in &targets {
        for (method, body) in [
            ("GET", &b""[..]),
            ("PUT", &image.manifest.bytes[..]),
            ("POST", &b""[..]),
        ] {
            for authorization in [None, Some(alice.as_str())] {
                let reply = raw_request(&api.registry, method, target, authorization, body);
                let code = serde_json::from_slice::<Value>(&reply.body)
                    .ok()
                    .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string));
                let shown = format!(
                    "{mode:?} mode: {method} {target} ({}) answered {} {:?}",
                    if authorization.is_some() {
                        "alice"
                    } else {
                        "anonymous"
                    },
                    reply.status,
                    String::from_utf8_lossy(&reply.body)
                );
                // The name is refused as such, or an anonymous caller is asked to log in first.
                let acceptable = match reply.status {
                    400 => code.as_deref() == Some("NAME_INVALID"),
                    401 => authorization.is_none() && code.as_deref() == Some("UNAUTHORIZED"),
                    _ => false,
                };
                assert!(acceptable, "{shown}");
            }
        }
    }
    // Nothing was written anywhere, and the server still serves.
    assert_eq!(api.admin_catalog().await, EVERY_REPOSITORY.to_vec());
    for repo in EVERY_REPOSITORY {
        assert_eq!(api.tags_as_admin(repo).await, tag_list(&["v1"]));
    }
}

/// `method target` with an optional `Authorization` header, the target sent exactly as given.
fn raw_request(
    registry: &Registry,
    method: &str,
    target: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> RawResponse {
    let mut headers = vec![("Content-Type", OCI_MANIFEST)];
    if let Some(value) = authorization {
        headers.push(("Authorization", value));
    }
    let timeout = Duration::from_secs(30);
    blocking_request_with(registry.addr(), method, target, &headers, body, timeout)
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}
