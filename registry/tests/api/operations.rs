//! What an operator relies on: the request log and TLS.

use reqwest::Method;
use serde_json::Value;

use crate::common::*;
use crate::support::*;

/// The JSON request log lines of `registry`'s log whose path starts with `prefix`.
fn request_log(registry: &Registry, prefix: &str) -> Vec<Value> {
    let log = std::fs::read_to_string(registry.log_path()).expect("read the server log");
    let mut lines = Vec::new();
    for line in log.lines().filter(|l| !l.starts_with("===== berth-e2e")) {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(entry["timestamp"].is_string(), "{line}");
        assert!(entry["level"].is_string(), "{line}");
        let is_request = entry["target"] == "berth_registry::request";
        if is_request
            && entry["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(prefix))
        {
            lines.push(entry);
        }
    }
    lines
}

#[tokio::test]
async fn the_json_request_log_has_one_line_per_request_with_its_fields() {
    let api = Api {
        registry: Registry::start_configured("{}", &[("BERTH_LOG_FORMAT", "json")]),
        client: http_client(),
    };
    let bytes = Rng::new(9).bytes(5000);
    let digest = api.push_blob("logged/app", &bytes).await;
    let blob = format!("logged/app/blobs/{digest}");
    api.expect_blob("logged/app", &digest, &bytes).await;
    let sent = "berth_registry_sent_bytes_total";
    let (before, page) = api.metric_and_page_size(sent).await;
    api.head(&blob).await.expect(200);
    assert_eq!(
        api.metric(sent).await,
        before.map(|before| before + page as f64),
        "only the metrics page counts: a HEAD sends no body"
    );
    api.get("logged/app/manifests/nothing?n=1")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    send(api.request(Method::POST, "logged/app/tags/list"))
        .await
        .expect_error(405, "UNSUPPORTED");

    let expected = [
        ("POST", "/v2/logged/app/blobs/uploads/", 201, Some(0)),
        ("GET", blob.as_str(), 200, Some(bytes.len())),
        ("HEAD", blob.as_str(), 200, Some(0)),
        ("GET", "/v2/logged/app/manifests/nothing", 404, None),
        ("POST", "logged/app/tags/list", 405, None),
    ];
    let lines = eventually("the request log lines", async || {
        let lines = request_log(&api.registry, "/v2/logged");
        (lines.len() >= expected.len()).then_some(lines)
    })
    .await;
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per request: {lines:#?}"
    );
    for (line, (method, path, status, body)) in lines.iter().zip(expected) {
        let path = path
            .strip_prefix('/')
            .map_or(format!("/v2/{path}"), |p| format!("/{p}"));
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["path"], path, "the path, without its query: {line}");
        assert_eq!(line["version"], "HTTP/1.1", "{line}");
        assert_eq!(line["status"], status, "{line}");
        let logged = line["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("bytes: {line}"));
        match body {
            Some(body) => assert_eq!(logged, body as u64, "bytes of the response body: {line}"),
            None => assert!(logged > 0, "an error's JSON body is counted: {line}"),
        }
        let duration = line["duration_ms"].as_f64();
        assert!(duration.is_some_and(|d| d >= 0.0), "duration_ms: {line}");
    }
}

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tls = Tls::generate(dir.path());
    let registry = Registry::start_tls(tls.clone());
    assert!(registry.url().starts_with("https://"), "{}", registry.url());

    let trusting = tls.client();
    let reply = send(trusting.get(format!("{}/v2/", registry.url()))).await;
    reply.expect(200);

    // The certificate is really checked, and plain HTTP gets no API.
    let untrusting = http_client();
    let refused = untrusting
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "an unknown certificate was accepted: {refused:?}"
    );
    let plain = format!("http://{}/v2/", registry.addr());
    let plain = untrusting.get(&plain).send().await;
    assert!(
        !matches!(plain, Ok(ref r) if r.status() == 200),
        "plain HTTP was served: {plain:?}"
    );
}
