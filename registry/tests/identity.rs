//! Cloud Foundry instance identity certificates as TLS client credentials, against the real
//! binary in Basic and token mode: an app pushes and pulls under `cache/<its guid>/` only; a
//! certificate that does not identify an app (expired, not yet valid, another CA, no `app:` OU,
//! no client-auth usage) gets `401` with the OCI error JSON, never anonymous access; clients
//! without a certificate are served as before; the CA bundle reloads on SIGHUP.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::*;
use reqwest::Method;
use serde_json::Value;

const ORG: &str = "0c1d2e3f-0000-4000-8000-00000000000a";
const SPACE: &str = "5a6b7c8d-0000-4000-8000-00000000000b";
const APP_A: &str = "a1a1a1a1-0000-4000-8000-00000000000a";
const APP_B: &str = "b2b2b2b2-0000-4000-8000-00000000000b";
const ALICE: (&str, &str) = ("alice", "al1ce-Pw-83b1d2f7");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Basic,
    Token,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Basic => "basic",
            Mode::Token => "token",
        }
    }

    /// The status a refusal of a caller who is known but lacks the right gets.
    fn refused(self) -> u16 {
        match self {
            Mode::Basic => 403,
            Mode::Token => 401,
        }
    }
}

/// A TLS registry in `mode` trusting `ca`'s bundle for instance identities, with the rule the
/// BOSH job generates for the cache and a user who pushes under `team`.
fn start(dir: &Path, mode: Mode, bundle: &Path) -> (Registry, Tls) {
    let tls = Tls::generate(dir);
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, htpasswd_line(ALICE.0, ALICE.1, 4) + "\n").unwrap();
    let yaml = format!(
        r#"auth:
  mode: {mode}
  htpasswd: {htpasswd}
  instance_identity:
    ca_file: {bundle}
  access:
    - repositories: cache/{{app}}
      anonymous: by-name
      foreign_credentials_as_anonymous: true
      grants: {{ "app:{{app}}": [push-by-name] }}
    - repositories: team
      grants: {{ "user:alice": [push] }}
"#,
        mode = mode.name(),
        htpasswd = htpasswd.display(),
        bundle = bundle.display(),
    );
    let registry = Registry::start_tls_configured(tls.clone(), &yaml);
    (registry, tls)
}

/// A client trusting the registry's certificate, presenting `identity` if given.
fn client(tls: &Tls, identity: Option<&InstanceIdentity>) -> reqwest::Client {
    let pem = std::fs::read(&tls.certificate).unwrap();
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    if let Some(identity) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(&identity.pem()).unwrap());
    }
    builder.build().unwrap()
}

async fn send(
    client: &reqwest::Client,
    method: Method,
    url: String,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    // Manifests in OCI form are served only to clients that say they accept them.
    let mut request = client
        .request(method, url)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    send_request(request).await
}

/// Pushes `image` as `repo:tag` over the API (monolithic blob uploads, then the manifest) and
/// returns the status of the first request that did not succeed, or of the manifest PUT.
async fn push(client: &reqwest::Client, base: &str, repo: &str, image: &Image) -> u16 {
    for blob in image.blobs() {
        let url = format!("{base}/v2/{repo}/blobs/uploads/?digest={}", blob.digest);
        let reply = send(client, Method::POST, url, None, blob.bytes.clone()).await;
        if reply.status != 201 {
            return reply.status;
        }
    }
    let url = format!("{base}/v2/{repo}/manifests/v1");
    let manifest = image.manifest.bytes.clone();
    send(client, Method::PUT, url, Some(OCI_MANIFEST), manifest)
        .await
        .status
}

#[track_caller]
fn assert_unauthorized_json(reply: &Reply) {
    reply.expect(401);
    assert_eq!(reply.json()["errors"][0]["code"], "UNAUTHORIZED", "{reply}");
    assert!(reply.header("www-authenticate").is_some(), "{reply}");
}

/// The `access` claim of a token, without checking its signature (the registry does that).
fn access_claim(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice::<Value>(&bytes).expect("JSON claims")["access"].clone()
}

async fn app_confined_to_its_own_cache(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let ca = DiegoCa::generate(dir.path(), "diego");
    let (registry, tls) = start(dir.path(), mode, &ca.bundle);
    let a = client(
        &tls,
        Some(&ca.issue("a", &Leaf::for_app(ORG, SPACE, APP_A))),
    );
    let b = client(
        &tls,
        Some(&ca.issue("b", &Leaf::for_app(ORG, SPACE, APP_B))),
    );
    let base = registry.url();
    let image_a = Image::generate(181, "amd64", &[4096]);
    let image_b = Image::generate(182, "amd64", &[4096]);
    let repo_a = format!("cache/{APP_A}/x1");
    let repo_b = format!("cache/{APP_B}/x2");

    // Each app pushes and pulls its own cache with nothing but its certificate.
    assert_eq!(push(&a, &base, &repo_a, &image_a).await, 201);
    assert_eq!(push(&b, &base, &repo_b, &image_b).await, 201);
    assert_manifest_served(
        &a,
        &registry,
        &repo_a,
        "v1",
        &image_a.manifest.digest,
        OCI_MANIFEST,
    )
    .await;
    send(&a, Method::GET, format!("{base}/v2/"), None, vec![])
        .await
        .expect(200);

    // Another app's cache: no push, no delete.
    assert_eq!(
        push(&a, &base, &repo_b, &image_a).await,
        mode.refused(),
        "A pushed into B's cache"
    );
    let b_manifest = format!("{base}/v2/{repo_b}/manifests/{}", image_b.manifest.digest);
    send(&a, Method::DELETE, b_manifest.clone(), None, vec![])
        .await
        .expect(mode.refused());
    // Its own: still no delete, no tag list, and no catalog anywhere.
    let a_manifest = format!("{base}/v2/{repo_a}/manifests/{}", image_a.manifest.digest);
    send(&a, Method::DELETE, a_manifest, None, vec![])
        .await
        .expect(mode.refused());
    for listing in [
        format!("{base}/v2/{repo_a}/tags/list"),
        format!("{base}/v2/{repo_b}/tags/list"),
        format!("{base}/v2/_catalog"),
    ] {
        send(&a, Method::GET, listing, None, vec![])
            .await
            .expect(mode.refused());
    }
    // A mount of B's layer into A's cache, naming B's repository or not, only opens an upload
    // session: the layer does not appear in A's repository.
    let b_layer = &image_b.layers[0].blob.digest;
    for from in [format!("&from={repo_b}"), String::new()] {
        let url = format!("{base}/v2/{repo_a}/blobs/uploads/?mount={b_layer}{from}");
        send(&a, Method::POST, url, None, vec![]).await.expect(202);
        let url = format!("{base}/v2/{repo_a}/blobs/{b_layer}");
        send(&a, Method::HEAD, url, None, vec![]).await.expect(404);
    }
    // B's own image is untouched, and anyone may still pull it by name, without a certificate.
    let anonymous = client(&tls, None);
    send(&anonymous, Method::GET, b_manifest, None, vec![])
        .await
        .expect(200);

    if mode == Mode::Token {
        // The token endpoint takes the certificate as credentials and grants only what the
        // policy gives the app, whatever it asks for.
        let url = format!(
            "{base}/auth/token?service=berth-registry\
             &scope=repository:{repo_a}:pull,push,delete&scope=repository:{repo_b}:pull,push\
             &scope=registry:catalog:*"
        );
        let reply = send(&a, Method::GET, url, None, vec![]).await;
        reply.expect(200);
        let token = reply.json()["token"].as_str().unwrap().to_owned();
        assert_eq!(
            access_claim(&token),
            serde_json::json!([
                {"type": "repository", "name": repo_a, "actions": ["pull", "push"]},
                {"type": "repository", "name": repo_b, "actions": ["pull"]},
            ])
        );
        // That token works without the certificate, for what it grants.
        let image_c = Image::generate(183, "amd64", &[2048]);
        let bearer = |request: reqwest::RequestBuilder| {
            request.header("Authorization", format!("Bearer {token}"))
        };
        let layer = &image_c.layers[0].blob;
        let url = format!("{base}/v2/{repo_a}/blobs/uploads/?digest={}", layer.digest);
        send_request(bearer(anonymous.post(&url)).body(layer.bytes.clone()))
            .await
            .expect(201);
        let url = format!("{base}/v2/{repo_b}/blobs/uploads/?digest={}", layer.digest);
        send_request(bearer(anonymous.post(&url)).body(layer.bytes.clone()))
            .await
            .expect(401);
    }
}

#[tokio::test]
async fn an_app_is_confined_to_its_own_cache_basic() {
    app_confined_to_its_own_cache(Mode::Basic).await;
}

#[tokio::test]
async fn an_app_is_confined_to_its_own_cache_token() {
    app_confined_to_its_own_cache(Mode::Token).await;
}

async fn certificates_that_identify_no_app_get_401(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let ca = DiegoCa::generate(dir.path(), "diego");
    let other = DiegoCa::generate(dir.path(), "other");
    let (registry, tls) = start(dir.path(), mode, &ca.bundle);
    let base = registry.url();
    let good = Leaf::for_app(ORG, SPACE, APP_A);
    let image = Image::generate(184, "amd64", &[1024]);
    let repo = format!("cache/{APP_A}/x1");
    let owner = client(&tls, Some(&ca.issue("good", &good)));
    assert_eq!(push(&owner, &base, &repo, &image).await, 201);

    let cases = [
        (
            "expired",
            "CertExpired",
            &ca,
            Leaf {
                not_before: -7200,
                not_after: -1,
                ..good.clone()
            },
        ),
        (
            "not-yet-valid",
            "CertNotValidYet",
            &ca,
            Leaf {
                not_before: 3600,
                not_after: 7200,
                ..good.clone()
            },
        ),
        ("other-ca", "UnknownIssuer", &other, good.clone()),
        (
            "no-app",
            "no OU app:",
            &ca,
            Leaf {
                organizational_units: vec![format!("organization:{ORG}"), format!("space:{SPACE}")],
                ..good.clone()
            },
        ),
        (
            "server-auth-only",
            "RequiredEku",
            &ca,
            Leaf {
                extended_key_usage: "serverAuth",
                ..good.clone()
            },
        ),
        (
            "no-digital-signature",
            "key usage does not allow",
            &ca,
            Leaf {
                key_usage: "critical,keyEncipherment",
                ..good.clone()
            },
        ),
    ];
    let manifest = format!("{base}/v2/{repo}/manifests/v1");
    for (name, reason, issuer, leaf) in cases {
        let holder = client(&tls, Some(&issuer.issue(name, &leaf)));
        // Not even what anyone may do without credentials: a certificate that does not
        // identify an app is refused, never taken as anonymous.
        let mut urls = vec![format!("{base}/v2/"), manifest.clone()];
        if mode == Mode::Token {
            urls.push(format!(
                "{base}/auth/token?service=berth-registry&scope=repository:{repo}:pull"
            ));
        }
        for url in urls {
            let reply = send(&holder, Method::GET, url, None, vec![]).await;
            assert_unauthorized_json(&reply);
        }
        assert_eq!(push(&holder, &base, &repo, &image).await, 401, "{name}");
        // Refused for the reason the case is about, not for some other flaw of the test's own.
        let log = registry.log();
        let last = log
            .lines()
            .rfind(|l| l.contains("client certificate refused"));
        assert!(last.is_some_and(|l| l.contains(reason)), "{name}: {last:?}");
    }
    // The owner's certificate still works on the same registry.
    send(&owner, Method::GET, manifest, None, vec![])
        .await
        .expect(200);
}

#[tokio::test]
async fn certificates_that_identify_no_app_get_401_basic() {
    certificates_that_identify_no_app_get_401(Mode::Basic).await;
}

#[tokio::test]
async fn certificates_that_identify_no_app_get_401_token() {
    certificates_that_identify_no_app_get_401(Mode::Token).await;
}

/// skopeo and docker, which present no certificate, push with a password and pull a cached image
/// by name anonymously, as the cells do, from a registry that asks for client certificates.
#[tokio::test]
async fn clients_without_a_certificate_work_as_before() {
    for mode in [Mode::Basic, Mode::Token] {
        let dir = tempfile::tempdir().unwrap();
        let ca = DiegoCa::generate(dir.path(), "diego");
        let (registry, tls) = start(dir.path(), mode, &ca.bundle);
        let image = Image::generate(185, "amd64", &[2048]);
        let layout = dir.path().join("layout");
        write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
        let host = registry.host();
        run(skopeo()
            .args(["copy", "--dest-tls-verify=false", "--dest-creds"])
            .arg(format!("{}:{}", ALICE.0, ALICE.1))
            .arg(oci_ref(&layout, "v1"))
            .arg(format!("docker://{host}/team/app:v1")));
        let app = client(
            &tls,
            Some(&ca.issue("a", &Leaf::for_app(ORG, SPACE, APP_A))),
        );
        let repo = format!("cache/{APP_A}/x1");
        assert_eq!(push(&app, &registry.url(), &repo, &image).await, 201);
        let pulled = dir.path().join("pulled");
        run(skopeo()
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{host}/{repo}@{}", image.manifest.digest))
            .arg(oci_ref(&pulled, "v1")));
        // So does docker (127.0.0.1 is insecure-allowed: it speaks TLS without verifying), in
        // token mode, the foundation's: a Basic challenge it answers only with credentials.
        if mode == Mode::Token {
            let dockerd = Dockerd::start(&host);
            let pinned = format!("{host}/{repo}@{}", image.manifest.digest);
            dockerd.pull_expecting(&pinned, &image.manifest.digest);
        }
        // Foreign credentials count as anonymous for those pulls, as before.
        run(skopeo()
            .args(["inspect", "--raw", "--tls-verify=false", "--creds"])
            .arg("someone:elsewhere")
            .arg(format!("docker://{host}/{repo}@{}", image.manifest.digest)));
        // And without credentials nothing else is open.
        let anonymous = client(&tls, None);
        let reply = send(
            &anonymous,
            Method::GET,
            format!("{}/v2/team/app/manifests/v1", registry.url()),
            None,
            vec![],
        )
        .await;
        assert_unauthorized_json(&reply);
    }
}

/// A connection may outlive its certificate: validity is checked on every request.
#[tokio::test]
async fn a_certificate_expires_on_a_connection_kept_open() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DiegoCa::generate(dir.path(), "diego");
    let (registry, tls) = start(dir.path(), Mode::Basic, &ca.bundle);
    let short = Leaf {
        not_after: 4,
        ..Leaf::for_app(ORG, SPACE, APP_A)
    };
    let app = client(&tls, Some(&ca.issue("short", &short)));
    let url = format!("{}/v2/", registry.url());
    send(&app, Method::GET, url.clone(), None, vec![])
        .await
        .expect(200);
    // reqwest keeps the connection in its pool, and the registry keeps an idle one for 90 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_unauthorized_json(&send(&app, Method::GET, url, None, vec![]).await);
}

/// The CA bundle is read again on SIGHUP: a certificate of a newly trusted CA works at once.
#[tokio::test]
async fn the_instance_identity_bundle_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let old = DiegoCa::generate(dir.path(), "old");
    let new = DiegoCa::generate(dir.path(), "new");
    let bundle = dir.path().join("bundle.pem");
    std::fs::copy(&old.bundle, &bundle).unwrap();
    let (registry, tls) = start(dir.path(), Mode::Basic, &bundle);
    let app = client(
        &tls,
        Some(&new.issue("a", &Leaf::for_app(ORG, SPACE, APP_A))),
    );
    let url = format!("{}/v2/", registry.url());
    assert_unauthorized_json(&send(&app, Method::GET, url.clone(), None, vec![]).await);
    std::fs::copy(&new.bundle, &bundle).unwrap();
    assert!(registry.reload(), "the reload failed:\n{}", registry.log());
    send(&app, Method::GET, url, None, vec![]).await.expect(200);
}

/// `config check` knows the new settings: a placeholder grant without the placeholder, an
/// identity bundle without TLS or access control, and a trusted issuer taking a reserved name.
#[test]
fn config_check_validates_instance_identity_settings() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DiegoCa::generate(dir.path(), "diego");
    let tls = Tls::generate(dir.path());
    let head = format!(
        "tls: {{certificate: {}, private_key: {}}}\n",
        tls.certificate.display(),
        tls.private_key.display()
    );
    let identity = format!(
        "  instance_identity: {{ca_file: {}}}\n",
        ca.bundle.display()
    );
    let check = |yaml: &str| {
        let path = dir.path().join("check.yml");
        std::fs::write(&path, yaml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_berth-registry"))
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let good = format!(
        "{head}auth:\n  mode: token\n{identity}  access:\n    - repositories: cache/{{app}}\n      \
         grants: {{'app:{{app}}': [push-by-name], 'space:{SPACE}': [pull]}}\n"
    );
    let out = check(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (bad, wanted) in [
        (
            format!(
                "{head}auth:\n  mode: token\n  access: [{{repositories: cache, grants: {{'app:{{app}}': [push]}}}}]\n"
            ),
            "needs {app}",
        ),
        (format!("auth:\n  mode: token\n{identity}"), "needs tls"),
        (format!("{head}auth:\n{identity}"), "auth.mode"),
        (
            format!(
                "{head}auth:\n  mode: token\n  token: {{trusted_issuers: [{{name: app, issuer: x}}]}}\n"
            ),
            "kept for Cloud Foundry",
        ),
        (
            format!(
                "{head}auth:\n  mode: token\n  access: [{{repositories: 'cache/{{app}}/{{app}}'}}]\n"
            ),
            "one whole path component",
        ),
        (
            format!(
                "{head}auth:\n  mode: token\n  access: [{{repositories: a, grants: {{'app:Not_A_Guid': [pull]}}}}]\n"
            ),
            "not a GUID",
        ),
    ] {
        let out = check(&bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} passed");
        assert!(stderr.contains(wanted), "{bad}: {stderr}");
    }
}
