//! Access control end to end, against the real binary: Basic and token mode with real clients
//! (docker through a private dockerd, skopeo), berth-issued tokens accepted by CNCF distribution,
//! attacks over raw HTTP (forged, expired and misused tokens, wrong passwords, catalog leaks,
//! mounts across repositories, path tricks, oversized headers, failed-login limits, timing of
//! unknown users) and reloading on SIGHUP. Every client must be installed: a missing one fails
//! the test.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Users, policy and configuration
// ---------------------------------------------------------------------------------------------

/// Distinctive passwords, so that a leak into a log or metrics is found by a plain search.
const ADMIN: (&str, &str) = ("admin", "adm1n-Pw-5e1f0c9b");
const ALICE: (&str, &str) = ("alice", "al1ce-Pw-83b1d2f7");
const BOB: (&str, &str) = ("bob", "b0b-Pw-2c7a44e9");
const ROBOT: (&str, &str) = ("robot$cacher", "r0bot-Pw-9d0e11aa");
/// Added by the SIGHUP test.
const CAROL: (&str, &str) = ("carol", "car0l-Pw-61f2b3c4");
/// Credentials this registry does not know.
const MALLORY: (&str, &str) = ("mallory", "m4llory-Pw-0badc0de");
const SERVICE: &str = "berth-registry";

/// The access rules every test uses, under `auth:`. `admin` may do everything (via the platform
/// group); `alice` pushes to `public` and `team-a`; `bob` pulls `team-a` and pushes `team-b`; the
/// cacher robot pushes to `cache`, which anyone may pull by exact name only, even with credentials
/// this registry does not know; anyone may pull `public`; `private` is the admin's alone.
/// The longest matching prefix decides alone, so the platform group is named in every rule.
const POLICY: &str = r#"  groups: { platform: [admin] }
  access:
    - repositories: "*"
      grants: { "group:platform": [admin] }
    - repositories: cache
      anonymous: by-name
      foreign_credentials_as_anonymous: true
      grants: { "robot:cacher": [push], "group:platform": [admin] }
    - repositories: public
      anonymous: pull
      grants: { "user:alice": [push], "group:platform": [admin] }
    - repositories: team-a
      grants: { "user:alice": [push], "user:bob": [pull], "group:platform": [admin] }
    - repositories: team-b
      grants: { "user:bob": [push], "group:platform": [admin] }
"#;

/// The files the `auth:` section points at: an htpasswd file and the token signing key with its
/// self-signed certificate.
struct Material {
    dir: TempDir,
    htpasswd: PathBuf,
    keys: KeyPair,
}

impl Material {
    /// An htpasswd file with `users` at bcrypt `cost`, and a fresh signing key.
    fn new(users: &[(&str, &str)], cost: u32) -> Material {
        let dir = tempfile::Builder::new()
            .prefix("berth-auth-")
            .tempdir()
            .expect("create a temporary directory");
        let htpasswd = dir.path().join("htpasswd");
        let keys = KeyPair::generate(dir.path(), "token");
        let material = Material {
            dir,
            htpasswd,
            keys,
        };
        material.write_users(users, cost);
        material
    }

    fn write_users(&self, users: &[(&str, &str)], cost: u32) {
        let lines: Vec<String> = users
            .iter()
            .map(|(user, password)| htpasswd_line(user, password, cost))
            .collect();
        fs::write(&self.htpasswd, lines.join("\n") + "\n").expect("write htpasswd");
    }

    /// A registry configuration in `mode` with [`POLICY`] and `extra` lines under `auth:`.
    fn config(&self, mode: &str, extra: &str) -> String {
        format!(
            "auth:\n  mode: {mode}\n  htpasswd: {}\n{POLICY}  token:\n    signing_key: {}\n{extra}",
            self.htpasswd.display(),
            self.keys.key.display(),
        )
    }
}

/// The usual users at bcrypt cost 4 (the cheapest htpasswd makes), for tests not about timing.
fn usual_material() -> Material {
    Material::new(&[ADMIN, ALICE, BOB, ROBOT], 4)
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------

/// What a request presents.
#[derive(Clone, Debug)]
enum Cred {
    Anonymous,
    Basic(&'static str, &'static str),
    Bearer(String),
    /// An `Authorization` header sent as is.
    Raw(String),
}

impl Cred {
    fn basic((user, password): (&'static str, &'static str)) -> Cred {
        Cred::Basic(user, password)
    }
}

/// A response read whole.
struct Reply {
    what: String,
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(600)]);
        write!(
            f,
            "{} answered {} {:?} {body}",
            self.what, self.status, self.headers
        )
    }
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self}"))
    }

    /// The first OCI error code of the body, if it has one.
    fn code(&self) -> Option<String> {
        let value: Value = serde_json::from_slice(&self.body).ok()?;
        value["errors"][0]["code"].as_str().map(str::to_string)
    }

    #[track_caller]
    fn expect(&self, status: u16) -> &Reply {
        assert_eq!(self.status, status, "{self}");
        self
    }

    #[track_caller]
    fn expect_error(&self, status: u16, code: &str) -> &Reply {
        self.expect(status);
        assert_eq!(self.code().as_deref(), Some(code), "{self}");
        self
    }

    /// The `WWW-Authenticate` challenge, which every 401 must carry.
    #[track_caller]
    fn challenge(&self) -> &str {
        self.header("www-authenticate")
            .unwrap_or_else(|| panic!("a 401 without WWW-Authenticate: {self}"))
    }

    /// 401 UNAUTHORIZED with a Basic challenge.
    #[track_caller]
    fn expect_basic_challenge(&self) -> &Reply {
        self.expect_error(401, "UNAUTHORIZED");
        assert_eq!(self.challenge(), "Basic realm=\"berth-registry\"", "{self}");
        self
    }

    /// 401 UNAUTHORIZED with a Bearer challenge carrying `error` (none if `None`).
    #[track_caller]
    fn expect_bearer_challenge(&self, error: Option<&str>) -> &Reply {
        self.expect_error(401, "UNAUTHORIZED");
        let challenge = self.challenge();
        assert!(challenge.starts_with("Bearer realm=\""), "{self}");
        assert!(
            challenge.contains(&format!("service=\"{SERVICE}\"")),
            "{self}"
        );
        match error {
            Some(error) => assert!(
                challenge.contains(&format!("error=\"{error}\"")),
                "expected error=\"{error}\": {self}"
            ),
            None => assert!(!challenge.contains("error="), "{self}"),
        }
        self
    }

    #[track_caller]
    fn location(&self) -> String {
        self.header("location")
            .unwrap_or_else(|| panic!("no Location: {self}"))
            .to_string()
    }
}

async fn send(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    cred: &Cred,
    body: Option<(&str, Vec<u8>)>,
) -> Reply {
    // Distribution serves OCI manifests only to clients that say they accept them.
    let mut request = client
        .request(method.clone(), url)
        .header("accept", MANIFEST_ACCEPT);
    request = match cred {
        Cred::Anonymous => request,
        Cred::Basic(user, password) => request.basic_auth(user, Some(password)),
        Cred::Bearer(token) => request.bearer_auth(token),
        Cred::Raw(value) => request.header("authorization", value),
    };
    if let Some((content_type, bytes)) = body {
        request = request.header("content-type", content_type).body(bytes);
    }
    let what = format!("{method} {url} ({})", cred_label(cred));
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    Reply {
        what,
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("reading the body: {e}"))
            .to_vec(),
    }
}

/// How a credential is shown in assertion messages: never the secret.
fn cred_label(cred: &Cred) -> String {
    match cred {
        Cred::Anonymous => "anonymous".into(),
        Cred::Basic(user, _) => format!("Basic {user}"),
        Cred::Bearer(token) => format!("Bearer …{}", &token[token.len().saturating_sub(6)..]),
        Cred::Raw(value) => format!("Authorization of {} bytes", value.len()),
    }
}

async fn get(client: &reqwest::Client, url: &str, cred: &Cred) -> Reply {
    send(client, Method::GET, url, cred, None).await
}

/// `GET /auth/token` with `scope`s, Basic `basic` credentials if given and `service`.
async fn token_reply(
    client: &reqwest::Client,
    registry: &Registry,
    basic: Option<(&'static str, &'static str)>,
    service: &str,
    scopes: &[&str],
) -> Reply {
    let mut url = reqwest::Url::parse(&format!("{}/auth/token", registry.url())).expect("URL");
    url.query_pairs_mut().append_pair("service", service);
    for scope in scopes {
        url.query_pairs_mut().append_pair("scope", scope);
    }
    let cred = basic.map_or(Cred::Anonymous, Cred::basic);
    get(client, url.as_str(), &cred).await
}

/// A token from the registry's token endpoint, which must issue one.
async fn token(
    client: &reqwest::Client,
    registry: &Registry,
    basic: Option<(&'static str, &'static str)>,
    scopes: &[&str],
) -> String {
    let reply = token_reply(client, registry, basic, SERVICE, scopes).await;
    reply.expect(200);
    let body = reply.json();
    let token = body["token"].as_str().expect("a token").to_string();
    assert_eq!(body["access_token"], token.as_str(), "{reply}");
    assert!(
        body["expires_in"].as_u64().is_some_and(|s| s > 0),
        "{reply}"
    );
    assert_eq!(reply.header("cache-control"), Some("no-store"), "{reply}");
    token
}

fn b64url() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// The header and claims of a JWT (unverified).
fn jwt_parts(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts");
    let decode = |part: &str| -> Value {
        serde_json::from_slice(&b64url().decode(part).expect("base64url")).expect("JSON")
    };
    (decode(parts[0]), decode(parts[1]))
}

/// The `access` claim of a token as (type, name, sorted actions).
fn access_of(token: &str) -> Vec<(String, String, Vec<String>)> {
    let (_, claims) = jwt_parts(token);
    let mut entries: Vec<(String, String, Vec<String>)> = claims["access"]
        .as_array()
        .expect("an access claim")
        .iter()
        .map(|e| {
            let mut actions: Vec<String> = e["actions"]
                .as_array()
                .expect("actions")
                .iter()
                .map(|a| a.as_str().expect("an action").to_string())
                .collect();
            actions.sort();
            (
                e["type"].as_str().expect("type").to_string(),
                e["name"].as_str().expect("name").to_string(),
                actions,
            )
        })
        .collect();
    entries.sort();
    entries
}

fn repo_access(name: &str, actions: &[&str]) -> (String, String, Vec<String>) {
    let mut actions: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
    actions.sort();
    ("repository".into(), name.into(), actions)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// Which mode a registry runs in, to get an administrator's credentials for checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Basic,
    Token,
}

/// Credentials the administrator uses on `repo` (all actions): Basic, or a token for them.
async fn admin_on(client: &reqwest::Client, registry: &Registry, mode: Mode, repo: &str) -> Cred {
    match mode {
        Mode::Basic => Cred::basic(ADMIN),
        Mode::Token => Cred::Bearer(
            token(
                client,
                registry,
                Some(ADMIN),
                &[&format!("repository:{repo}:pull,push,delete")],
            )
            .await,
        ),
    }
}

/// Uploads `blob` to `repo` (POST, then PUT with the bytes); returns the first reply that is not
/// the expected 202 or the final one.
async fn upload_blob(
    client: &reqwest::Client,
    registry: &Registry,
    cred: &Cred,
    repo: &str,
    blob: &Blob,
) -> Reply {
    let url = format!("{}/v2/{repo}/blobs/uploads/", registry.url());
    let started = send(client, Method::POST, &url, cred, None).await;
    if started.status != 202 {
        return started;
    }
    let location = absolute(registry, &started.location());
    let separator = if location.contains('?') { '&' } else { '?' };
    let url = format!("{location}{separator}digest={}", blob.digest);
    send(
        client,
        Method::PUT,
        &url,
        cred,
        Some(("application/octet-stream", blob.bytes.clone())),
    )
    .await
}

/// Pushes `image` as `repo:tag` over HTTP with `cred`, which must be allowed to.
async fn push_image(
    client: &reqwest::Client,
    registry: &Registry,
    cred: &Cred,
    repo: &str,
    tag: &str,
    image: &Image,
) {
    for blob in image.blobs() {
        upload_blob(client, registry, cred, repo, blob)
            .await
            .expect(201);
    }
    let url = format!("{}/v2/{repo}/manifests/{tag}", registry.url());
    send(
        client,
        Method::PUT,
        &url,
        cred,
        Some((OCI_MANIFEST, image.manifest.bytes.clone())),
    )
    .await
    .expect(201);
}

/// The tags of `repo` as the administrator sees them; `None` if the repository does not exist.
async fn tags_as_admin(
    client: &reqwest::Client,
    registry: &Registry,
    mode: Mode,
    repo: &str,
) -> Option<Vec<String>> {
    let cred = admin_on(client, registry, mode, repo).await;
    let reply = get(
        client,
        &format!("{}/v2/{repo}/tags/list", registry.url()),
        &cred,
    )
    .await;
    if reply.status == 404 {
        reply.expect_error(404, "NAME_UNKNOWN");
        return None;
    }
    reply.expect(200);
    let mut tags: Vec<String> = reply.json()["tags"]
        .as_array()
        .map(|tags| {
            tags.iter()
                .map(|t| t.as_str().expect("a tag").to_string())
                .collect()
        })
        .unwrap_or_default();
    tags.sort();
    Some(tags)
}

/// Whether the administrator finds `digest` in `repo`.
async fn blob_in_repo(
    client: &reqwest::Client,
    registry: &Registry,
    mode: Mode,
    repo: &str,
    digest: &str,
) -> bool {
    let cred = admin_on(client, registry, mode, repo).await;
    let url = format!("{}/v2/{repo}/blobs/{digest}", registry.url());
    let reply = send(client, Method::HEAD, &url, &cred, None).await;
    assert!(matches!(reply.status, 200 | 404), "{reply}");
    reply.status == 200
}

/// Every repository of the catalog `cred` sees, following `Link` pages of `page_size`.
async fn catalog(
    client: &reqwest::Client,
    registry: &Registry,
    cred: &Cred,
    page_size: u32,
) -> Reply {
    let mut url = format!("{}/v2/_catalog?n={page_size}", registry.url());
    let mut all = Vec::new();
    let mut last;
    loop {
        last = get(client, &url, cred).await;
        if last.status != 200 {
            return last;
        }
        let page = last.json()["repositories"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(page.len() <= page_size as usize, "page too long: {last}");
        all.extend(page);
        match last.header("link") {
            Some(link) => {
                let target = link
                    .strip_prefix('<')
                    .and_then(|l| l.split_once('>'))
                    .map(|(t, _)| t.to_string())
                    .unwrap_or_else(|| panic!("bad Link: {last}"));
                url = absolute(registry, &target);
            }
            None => break,
        }
    }
    last.body = serde_json::to_vec(&json!({ "repositories": all })).expect("JSON");
    last
}

fn repositories(reply: &Reply) -> Vec<String> {
    let mut names: Vec<String> = reply.json()["repositories"]
        .as_array()
        .unwrap_or_else(|| panic!("no repositories: {reply}"))
        .iter()
        .map(|r| r.as_str().expect("a name").to_string())
        .collect();
    names.sort();
    names
}

/// The catalog the administrator sees.
async fn admin_catalog(client: &reqwest::Client, registry: &Registry, mode: Mode) -> Vec<String> {
    let cred = match mode {
        Mode::Basic => Cred::basic(ADMIN),
        Mode::Token => {
            Cred::Bearer(token(client, registry, Some(ADMIN), &["registry:catalog:*"]).await)
        }
    };
    let reply = catalog(client, registry, &cred, 100).await;
    reply.expect(200);
    repositories(&reply)
}

/// A small image of one layer.
fn small_image(seed: u64) -> Image {
    Image::generate(seed, "amd64", &[3 * 1024])
}

/// Asserts that none of `secrets` appears in the server log or in `/metrics`.
async fn assert_no_secrets(client: &reqwest::Client, registry: &Registry, secrets: &[String]) {
    let metrics = get(
        client,
        &format!("{}/metrics", registry.url()),
        &Cred::Anonymous,
    )
    .await;
    metrics.expect(200);
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let log = registry.log();
    assert!(
        log.lines().count() > 20,
        "the server log is suspiciously short:\n{log}"
    );
    for secret in secrets {
        assert!(secret.len() >= 8, "a secret too short to search for");
        assert!(
            !log.contains(secret.as_str()),
            "a secret ({}…) appears in the server log",
            &secret[..4]
        );
        assert!(
            !metrics.contains(secret.as_str()),
            "a secret ({}…) appears in /metrics",
            &secret[..4]
        );
    }
}

/// The secrets a Basic login exposes: the password and the header value carrying it.
fn basic_secrets((user, password): (&str, &str)) -> Vec<String> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    vec![password.to_string(), encoded]
}

/// The secrets in a token: all of it, and its signature alone.
fn token_secrets(token: &str) -> Vec<String> {
    let signature = token.rsplit('.').next().expect("a signature").to_string();
    vec![token.to_string(), signature]
}

fn output_text(output: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Whether a client's output says the registry refused it (401 or 403, in any client's words).
fn is_refusal(output: &str) -> bool {
    [
        "unauthorized",
        "authentication required",
        "denied",
        "forbidden",
        "401",
        "403",
    ]
    .iter()
    .any(|word| output.contains(word))
}

/// Runs a client command that must fail, and returns everything it printed, lowercased.
#[track_caller]
fn run_failing(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let output = run_output(cmd, Duration::from_secs(300));
    assert!(
        !output.status.success(),
        "{shown} succeeded but must fail\n{}",
        output_text(&output)
    );
    let text = output_text(&output);
    eprintln!("$ {shown} (failed, as it must)\n{text}");
    text.to_lowercase()
}

fn skopeo_copy_to(
    layout: &Path,
    host: &str,
    repo_tag: &str,
    creds: Option<(&str, &str)>,
) -> Command {
    let mut cmd = skopeo();
    cmd.args(["copy", "--dest-tls-verify=false"]);
    if let Some((user, password)) = creds {
        cmd.arg(format!("--dest-creds={user}:{password}"));
    }
    cmd.arg(oci_ref(layout, "v1"))
        .arg(format!("docker://{host}/{repo_tag}"));
    cmd
}

fn skopeo_copy_from(
    host: &str,
    repo_tag: &str,
    creds: Option<(&str, &str)>,
    out: &Path,
) -> Command {
    let mut cmd = skopeo();
    cmd.args(["copy", "--src-tls-verify=false"]);
    if let Some((user, password)) = creds {
        cmd.arg(format!("--src-creds={user}:{password}"));
    }
    cmd.arg(format!("docker://{host}/{repo_tag}"))
        .arg(oci_ref(out, "v1"));
    cmd
}

/// Pulls `repo_tag` with skopeo into a fresh layout under `scratch` and returns the digest of the
/// manifest it got.
fn skopeo_pull_digest(
    scratch: &Path,
    host: &str,
    repo_tag: &str,
    creds: Option<(&str, &str)>,
) -> String {
    let out = scratch.join(format!("pulled-{}", uuid::Uuid::new_v4().simple()));
    run(&mut skopeo_copy_from(host, repo_tag, creds, &out));
    read_layout_ref(&out, "v1").1
}

// ---------------------------------------------------------------------------------------------
// 1 and 2: real clients in Basic and token mode
// ---------------------------------------------------------------------------------------------

/// skopeo with credentials both ways, anonymous pulls of `public`, refused anonymous pushes and
/// pushes outside a user's grants; then docker login, push and pull through a private dockerd.
async fn clients_round_trip(mode: Mode) {
    let material = usual_material();
    let mode_name = if mode == Mode::Basic {
        "basic"
    } else {
        "token"
    };
    let registry = Registry::start_with_config(&material.config(mode_name, ""));
    let client = http_client();
    let host = registry.host();
    let image = Image::generate(31, "amd64", &[300 * 1024, 60 * 1024]);
    let layout = registry.scratch().join("layout");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());

    // skopeo with credentials, both ways.
    run(&mut skopeo_copy_to(
        &layout,
        &host,
        "public/app:v1",
        Some(ALICE),
    ));
    assert_eq!(
        skopeo_pull_digest(registry.scratch(), &host, "public/app:v1", Some(ALICE)),
        image.manifest.digest
    );
    run(&mut skopeo_copy_to(
        &layout,
        &host,
        "team-a/app:v1",
        Some(ALICE),
    ));
    assert_eq!(
        skopeo_pull_digest(registry.scratch(), &host, "team-a/app:v1", Some(BOB)),
        image.manifest.digest,
        "bob may pull team-a"
    );

    // Anyone may pull public content, without credentials.
    assert_eq!(
        skopeo_pull_digest(registry.scratch(), &host, "public/app:v1", None),
        image.manifest.digest
    );
    // But not team-a.
    let out = registry.scratch().join("anonymous-team-a");
    let refused = run_failing(&mut skopeo_copy_from(&host, "team-a/app:v1", None, &out));
    assert!(is_refusal(&refused), "anonymous pull of team-a: {refused}");

    // An anonymous push is refused and writes nothing.
    let refused = run_failing(&mut skopeo_copy_to(&layout, &host, "public/anon:v1", None));
    assert!(is_refusal(&refused), "anonymous push: {refused}");
    // A push outside alice's grants is denied and writes nothing.
    let refused = run_failing(&mut skopeo_copy_to(
        &layout,
        &host,
        "team-b/app:v1",
        Some(ALICE),
    ));
    assert!(is_refusal(&refused), "alice pushing to team-b: {refused}");
    // Bob may pull team-a but not push there.
    let refused = run_failing(&mut skopeo_copy_to(
        &layout,
        &host,
        "team-a/app:bob",
        Some(BOB),
    ));
    assert!(is_refusal(&refused), "bob pushing to team-a: {refused}");
    for repo in ["public/anon", "team-b/app"] {
        assert_eq!(
            tags_as_admin(&client, &registry, mode, repo).await,
            None,
            "{repo} must not exist after a refused push"
        );
        for blob in image.blobs() {
            assert!(
                !blob_in_repo(&client, &registry, mode, repo, &blob.digest).await,
                "a blob reached {repo} in a refused push"
            );
        }
    }
    assert_eq!(
        tags_as_admin(&client, &registry, mode, "team-a/app").await,
        Some(vec!["v1".to_string()]),
        "bob's refused push must not tag team-a/app"
    );
    if mode == Mode::Basic {
        assert_eq!(
            admin_catalog(&client, &registry, mode).await,
            vec!["public/app".to_string(), "team-a/app".to_string()]
        );
    }

    // The same refusals over HTTP, with the status codes the modes promise.
    let upload = |repo: &str| format!("{}/v2/{repo}/blobs/uploads/", registry.url());
    let anonymous = send(
        &client,
        Method::POST,
        &upload("public/anon"),
        &Cred::Anonymous,
        None,
    )
    .await;
    match mode {
        Mode::Basic => {
            anonymous.expect_basic_challenge();
            send(
                &client,
                Method::POST,
                &upload("team-b/app"),
                &Cred::basic(ALICE),
                None,
            )
            .await
            .expect_error(403, "DENIED");
        }
        Mode::Token => {
            anonymous.expect_bearer_challenge(None);
            let challenge = anonymous.challenge();
            assert_eq!(
                challenge,
                format!(
                    "Bearer realm=\"{}/auth/token\",service=\"{SERVICE}\",scope=\"repository:public/anon:pull,push\"",
                    registry.url()
                ),
                "{anonymous}"
            );
            let alice = token(
                &client,
                &registry,
                Some(ALICE),
                &["repository:team-b/app:pull,push"],
            )
            .await;
            assert!(access_of(&alice).is_empty(), "alice got access to team-b");
            send(
                &client,
                Method::POST,
                &upload("team-b/app"),
                &Cred::Bearer(alice),
                None,
            )
            .await
            .expect_bearer_challenge(Some("insufficient_scope"));
        }
    }

    // docker: login, push, pull.
    let archive = docker_archive(&registry, &image, "e2e/local:v1");
    let dockerd = Dockerd::start(&host);
    run(dockerd.docker().arg("load").arg("-i").arg(&archive));
    let login = run(dockerd
        .docker()
        .args(["login", "-u", ALICE.0, "-p", ALICE.1])
        .arg(&host));
    assert!(login.contains("Login Succeeded"), "docker login: {login}");
    let failed_login = run_failing(
        dockerd
            .docker()
            .args(["login", "-u", ALICE.0, "-p", MALLORY.1])
            .arg(&host),
    );
    assert!(
        failed_login.contains("unauthorized") || failed_login.contains("401"),
        "docker login with a wrong password: {failed_login}"
    );
    // The failed attempt must not have replaced the stored credentials.
    let login = run(dockerd
        .docker()
        .args(["login", "-u", ALICE.0, "-p", ALICE.1])
        .arg(&host));
    assert!(login.contains("Login Succeeded"), "docker login: {login}");

    let remote = format!("{host}/public/docker");
    run(dockerd
        .docker()
        .args(["tag", "e2e/local:v1", &format!("{remote}:v1")]));
    let pushed = run(dockerd.docker().args(["push", &format!("{remote}:v1")]));
    let pushed_digest = digest_after(&pushed, "digest:")
        .unwrap_or_else(|| panic!("no digest in docker push output: {pushed}"));
    assert_eq!(
        tags_as_admin(&client, &registry, mode, "public/docker").await,
        Some(vec!["v1".to_string()])
    );
    let private_remote = format!("{host}/team-a/docker");
    run(dockerd
        .docker()
        .args(["tag", "e2e/local:v1", &format!("{private_remote}:v1")]));
    run(dockerd
        .docker()
        .args(["push", &format!("{private_remote}:v1")]));

    // Outside alice's grants, docker push is refused.
    let denied_remote = format!("{host}/team-b/docker");
    run(dockerd
        .docker()
        .args(["tag", "e2e/local:v1", &format!("{denied_remote}:v1")]));
    let refused = run_failing(
        dockerd
            .docker()
            .args(["push", &format!("{denied_remote}:v1")]),
    );
    assert!(is_refusal(&refused), "docker push to team-b: {refused}");
    assert_eq!(
        tags_as_admin(&client, &registry, mode, "team-b/docker").await,
        None
    );

    run(dockerd.docker().args([
        "rmi",
        "e2e/local:v1",
        &format!("{remote}:v1"),
        &format!("{private_remote}:v1"),
        &format!("{denied_remote}:v1"),
    ]));
    let left = run(dockerd.docker().args(["images", "-q", "--no-trunc"]));
    assert_eq!(left.trim(), "", "the image must be gone before pulling");

    let pulled = run(dockerd
        .docker()
        .args(["pull", &format!("{private_remote}:v1")]));
    assert_eq!(
        digest_after(&pulled, "Digest:").as_deref(),
        Some(pushed_digest.as_str()),
        "docker pull output: {pulled}"
    );
    let id = run(dockerd.docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &format!("{private_remote}:v1"),
    ]));
    assert_eq!(id.trim(), image.config.digest, "image id after pull");
    run(dockerd
        .docker()
        .args(["rmi", &format!("{private_remote}:v1")]));

    // Logged out, in token mode: public content pulls, team-a does not. (In Basic mode `GET /v2/`
    // challenges for Basic credentials, and docker then sends no request at all without them:
    // anonymous docker pulls need token mode, as with other registries. skopeo's anonymous
    // pulls were checked above.)
    if mode == Mode::Token {
        run(dockerd.docker().arg("logout").arg(&host));
        let pulled = run(dockerd.docker().args(["pull", &format!("{remote}:v1")]));
        assert_eq!(
            digest_after(&pulled, "Digest:").as_deref(),
            Some(pushed_digest.as_str()),
            "anonymous docker pull of public content: {pulled}"
        );
        let refused = run_failing(
            dockerd
                .docker()
                .args(["pull", &format!("{private_remote}:v1")]),
        );
        assert!(
            is_refusal(&refused),
            "anonymous docker pull of team-a: {refused}"
        );
    }

    let mut secrets = Vec::new();
    for user in [ALICE, BOB] {
        secrets.extend(basic_secrets(user));
    }
    secrets.extend(basic_secrets(ADMIN));
    assert_no_secrets(&client, &registry, &secrets).await;
}

#[tokio::test]
async fn basic_mode_with_docker_and_skopeo() {
    clients_round_trip(Mode::Basic).await;
}

#[tokio::test]
async fn token_mode_with_docker_and_skopeo() {
    clients_round_trip(Mode::Token).await;
}

// ---------------------------------------------------------------------------------------------
// 3: CNCF distribution trusts berth's tokens
// ---------------------------------------------------------------------------------------------

/// CNCF distribution (Debian's `docker-registry`) with token authentication against `realm`,
/// trusting tokens of `issuer` for `service` signed by the keys of `rootcertbundle`.
struct Distribution {
    dir: TempDir,
    addr: std::net::SocketAddr,
    child: Option<Child>,
}

impl Distribution {
    fn start(realm: &str, rootcertbundle: &Path) -> Distribution {
        let binary = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("berth-distribution-")
            .tempdir()
            .expect("create a temporary directory");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: debug\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: berth-e2e\n\
                 auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {SERVICE}\n    \
                 rootcertbundle: {}\n",
                dir.path().join("data").display(),
                rootcertbundle.display(),
            ),
        )
        .expect("write the distribution config");
        let log = fs::File::create(dir.path().join("log")).expect("create the distribution log");
        let child = Command::new(&binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut distribution = Distribution {
            dir,
            addr,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(Ok(Some(status))) = distribution.child.as_mut().map(Child::try_wait) {
                panic!(
                    "docker-registry exited with {status}\n{}",
                    distribution.log()
                );
            }
            if let Ok(reply) = blocking_get(addr, "/v2/", Duration::from_secs(1))
                && reply.status == 401
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {addr}\n{}",
                distribution.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        distribution
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "===== docker-registry log =====\n{}\n===== end of the docker-registry log =====",
                lines[lines.len().saturating_sub(150)..].join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn distribution_accepts_berth_tokens() {
    let material = usual_material();
    let berth = Registry::start_with_config(&material.config("token", ""));
    let distribution = Distribution::start(
        &format!("{}/auth/token", berth.url()),
        &material.keys.certificate,
    );
    let client = http_client();
    let host = distribution.host();

    // distribution challenges for a token from berth.
    let challenge = get(
        &client,
        &format!("{}/v2/public/app/tags/list", distribution.url()),
        &Cred::Anonymous,
    )
    .await;
    challenge.expect(401);
    assert!(
        challenge
            .challenge()
            .starts_with(&format!("Bearer realm=\"{}/auth/token\"", berth.url())),
        "{challenge}"
    );

    let image = Image::generate(41, "amd64", &[200 * 1024]);
    let layout = berth.scratch().join("layout");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
    let issued = || {
        berth
            .log()
            .matches("path=\"/auth/token\" status=200")
            .count()
    };
    let tokens_before = issued();
    run(&mut skopeo_copy_to(
        &layout,
        &host,
        "public/app:v1",
        Some(ALICE),
    ));
    assert_eq!(
        skopeo_pull_digest(berth.scratch(), &host, "public/app:v1", Some(ALICE)),
        image.manifest.digest
    );
    assert_eq!(
        skopeo_pull_digest(berth.scratch(), &host, "public/app:v1", None),
        image.manifest.digest,
        "an anonymous berth token pulls public content from distribution"
    );
    let tokens_after = issued();
    assert!(
        tokens_after >= tokens_before + 3,
        "skopeo must have fetched its tokens from berth (token requests logged: {tokens_before} then {tokens_after})"
    );

    // berth grants alice nothing in team-b, so distribution refuses her push there.
    let refused = run_failing(&mut skopeo_copy_to(
        &layout,
        &host,
        "team-b/app:v1",
        Some(ALICE),
    ));
    assert!(
        is_refusal(&refused),
        "alice pushing to team-b on distribution: {refused}"
    );

    // A token for public/app works there, and nowhere else.
    let pull_app = token(
        &client,
        &berth,
        Some(ALICE),
        &["repository:public/app:pull"],
    )
    .await;
    let (header, _) = jwt_parts(&pull_app);
    assert_eq!(header["alg"], "ES256");
    let manifest_url = |repo: &str| format!("{}/v2/{repo}/manifests/v1", distribution.url());
    let ok = get(
        &client,
        &manifest_url("public/app"),
        &Cred::Bearer(pull_app.clone()),
    )
    .await;
    ok.expect(200);
    assert_eq!(sha256(&ok.body), image.manifest.digest);
    // Another repository, even one alice may pull from berth and that exists on distribution.
    run(&mut skopeo_copy_to(
        &layout,
        &host,
        "public/other:v1",
        Some(ALICE),
    ));
    for repo in ["public/other", "team-a/app", "team-b/app"] {
        let refused = get(
            &client,
            &manifest_url(repo),
            &Cred::Bearer(pull_app.clone()),
        )
        .await;
        refused.expect(401);
        assert!(
            refused.challenge().contains("insufficient_scope")
                || refused
                    .challenge()
                    .contains(&format!("repository:{repo}:pull")),
            "{refused}"
        );
    }
    // And a pull token does not push.
    let post = send(
        &client,
        Method::POST,
        &format!("{}/v2/public/app/blobs/uploads/", distribution.url()),
        &Cred::Bearer(pull_app),
        None,
    )
    .await;
    post.expect(401);
}

// ---------------------------------------------------------------------------------------------
// 4: attacks over HTTP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn basic_mode_refuses_bad_credentials_and_writes_nothing() {
    let material = usual_material();
    let registry =
        Registry::start_configured(&material.config("basic", ""), &[("BERTH_LOG", "trace")]);
    let client = http_client();
    let url = |path: &str| format!("{}{path}", registry.url());
    let image = small_image(51);
    push_image(
        &client,
        &registry,
        &Cred::basic(ALICE),
        "team-a/app",
        "v1",
        &image,
    )
    .await;

    // GET /v2/: a login is needed, and checked.
    get(&client, &url("/v2/"), &Cred::Anonymous)
        .await
        .expect_basic_challenge();
    get(&client, &url("/v2/"), &Cred::basic(ALICE))
        .await
        .expect(200);
    for cred in [
        Cred::Basic(ALICE.0, MALLORY.1),
        Cred::basic(MALLORY),
        Cred::Basic(ALICE.0, ""),
        Cred::Basic("", ALICE.1),
        Cred::Raw("Basic not-base64!".into()),
        Cred::Raw(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("no-colon")
        )),
        Cred::Raw("Digest username=\"alice\"".into()),
        Cred::Bearer("eyJhbGciOiJub25lIn0.e30.".into()),
    ] {
        get(&client, &url("/v2/"), &cred)
            .await
            .expect_basic_challenge();
        get(&client, &url("/v2/team-a/app/manifests/v1"), &cred)
            .await
            .expect_basic_challenge();
    }

    // Wrong password, unknown user, anonymous: no upload starts, nothing is written.
    let other = small_image(52);
    for cred in [
        Cred::Basic(ALICE.0, MALLORY.1),
        Cred::basic(MALLORY),
        Cred::Anonymous,
    ] {
        upload_blob(
            &client,
            &registry,
            &cred,
            "team-a/app",
            &other.layers[0].blob,
        )
        .await
        .expect_basic_challenge();
        let put = send(
            &client,
            Method::PUT,
            &url("/v2/team-a/app/manifests/v2"),
            &cred,
            Some((OCI_MANIFEST, image.manifest.bytes.clone())),
        )
        .await;
        put.expect_basic_challenge();
        let delete = send(
            &client,
            Method::DELETE,
            &url(&format!(
                "/v2/team-a/app/manifests/{}",
                image.manifest.digest
            )),
            &cred,
            None,
        )
        .await;
        delete.expect_basic_challenge();
    }
    // Known users outside their grants: 403 DENIED.
    send(
        &client,
        Method::PUT,
        &url("/v2/team-a/app/manifests/v2"),
        &Cred::basic(BOB),
        Some((OCI_MANIFEST, image.manifest.bytes.clone())),
    )
    .await
    .expect_error(403, "DENIED");
    send(
        &client,
        Method::DELETE,
        &url(&format!(
            "/v2/team-a/app/manifests/{}",
            image.manifest.digest
        )),
        &Cred::basic(ALICE),
        None,
    )
    .await
    .expect_error(403, "DENIED");
    upload_blob(
        &client,
        &registry,
        &Cred::basic(ALICE),
        "team-b/app",
        &other.layers[0].blob,
    )
    .await
    .expect_error(403, "DENIED");
    get(
        &client,
        &url("/v2/team-b/app/tags/list"),
        &Cred::basic(ALICE),
    )
    .await
    .expect_error(403, "DENIED");
    assert_eq!(
        tags_as_admin(&client, &registry, Mode::Basic, "team-a/app").await,
        Some(vec!["v1".to_string()])
    );
    assert_eq!(
        tags_as_admin(&client, &registry, Mode::Basic, "team-b/app").await,
        None
    );
    assert!(
        !blob_in_repo(
            &client,
            &registry,
            Mode::Basic,
            "team-a/app",
            &other.layers[0].blob.digest
        )
        .await
    );
    assert_eq!(
        admin_catalog(&client, &registry, Mode::Basic).await,
        vec!["team-a/app".to_string()]
    );
    // The manifest was not deleted.
    get(
        &client,
        &url("/v2/team-a/app/manifests/v1"),
        &Cred::basic(BOB),
    )
    .await
    .expect(200);

    // Mounts: bob may push team-b but not read private; neither naming the source nor leaving
    // it out brings the blob over.
    let secret = small_image(53);
    push_image(
        &client,
        &registry,
        &Cred::basic(ADMIN),
        "private/secret",
        "v1",
        &secret,
    )
    .await;
    let secret_layer = &secret.layers[0].blob.digest;
    let mount = |query: &str| url(&format!("/v2/team-b/app/blobs/uploads/?{query}"));
    send(
        &client,
        Method::POST,
        &mount(&format!("mount={secret_layer}&from=private/secret")),
        &Cred::basic(BOB),
        None,
    )
    .await
    .expect_error(403, "DENIED");
    send(
        &client,
        Method::POST,
        &mount(&format!("mount={secret_layer}")),
        &Cred::basic(BOB),
        None,
    )
    .await
    .expect(202);
    assert!(
        !blob_in_repo(&client, &registry, Mode::Basic, "team-b/app", secret_layer).await,
        "a mount brought a blob bob may not pull into team-b"
    );
    get(
        &client,
        &url(&format!("/v2/team-b/app/blobs/{secret_layer}")),
        &Cred::basic(BOB),
    )
    .await
    .expect_error(404, "BLOB_UNKNOWN");
    // A blob bob may pull (from team-a) does mount, with or without naming the source.
    let shared = &image.layers[0].blob.digest;
    send(
        &client,
        Method::POST,
        &mount(&format!("mount={shared}&from=team-a/app")),
        &Cred::basic(BOB),
        None,
    )
    .await
    .expect(201);
    assert!(blob_in_repo(&client, &registry, Mode::Basic, "team-b/app", shared).await);

    // An oversized Authorization header is refused without harm.
    let huge = Cred::Raw(format!("Basic {}", "QUFB".repeat(16 * 1024)));
    let reply = get(&client, &url("/v2/team-a/app/manifests/v1"), &huge).await;
    assert!(
        reply.status == 401 || reply.status == 431,
        "64 KiB Authorization: {reply}"
    );
    if reply.status == 401 {
        reply.expect_basic_challenge();
    }
    get(&client, &url("/v2/"), &Cred::basic(ALICE))
        .await
        .expect(200);

    let mut secrets = Vec::new();
    for user in [ADMIN, ALICE, BOB] {
        secrets.extend(basic_secrets(user));
    }
    secrets.extend(basic_secrets((ALICE.0, MALLORY.1)));
    secrets.extend(basic_secrets(MALLORY));
    assert_no_secrets(&client, &registry, &secrets).await;
}

/// Signs `claims` with the PEM key at `key` as ES256 with `kid`.
fn sign_es256(key: &Path, kid: Option<&str>, claims: &Value) -> String {
    let pem = fs::read(key).expect("read the key");
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).expect("an EC PKCS#8 key");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.typ = Some("JWT".into());
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

fn claims_for(user: &str, audience: &str, exp: u64, access: Value) -> Value {
    let now = unix_now();
    json!({
        "iss": SERVICE, "sub": user, "aud": audience,
        "exp": exp, "nbf": now.saturating_sub(600).min(exp), "iat": now.saturating_sub(600).min(exp),
        "jti": uuid::Uuid::new_v4().to_string(), "access": access,
    })
}

#[tokio::test]
async fn token_mode_refuses_forged_expired_and_misused_tokens() {
    let material = usual_material();
    let registry =
        Registry::start_configured(&material.config("token", ""), &[("BERTH_LOG", "trace")]);
    let client = http_client();
    let url = |path: &str| format!("{}{path}", registry.url());
    let image = small_image(61);
    let admin_a = admin_on(&client, &registry, Mode::Token, "team-a/app").await;
    push_image(&client, &registry, &admin_a, "team-a/app", "v1", &image).await;
    let manifest_a = url("/v2/team-a/app/manifests/v1");

    // A genuine token works, and tells the key id berth signs with.
    let genuine = token(
        &client,
        &registry,
        Some(ALICE),
        &["repository:team-a/app:pull,push"],
    )
    .await;
    assert_eq!(
        access_of(&genuine),
        vec![repo_access("team-a/app", &["pull", "push"])]
    );
    get(&client, &manifest_a, &Cred::Bearer(genuine.clone()))
        .await
        .expect(200);
    let (header, claims) = jwt_parts(&genuine);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(claims["iss"], SERVICE);
    assert_eq!(claims["aud"], SERVICE);
    assert_eq!(claims["sub"], ALICE.0);
    let kid = header["kid"].as_str().expect("a kid").to_string();
    // A token crafted like berth's own is accepted: the refusals below are about what changed.
    let all_on_a =
        json!([{ "type": "repository", "name": "team-a/app", "actions": ["pull", "push"] }]);
    let crafted = sign_es256(
        &material.keys.key,
        Some(&kid),
        &claims_for(ALICE.0, SERVICE, unix_now() + 300, all_on_a.clone()),
    );
    get(&client, &manifest_a, &Cred::Bearer(crafted))
        .await
        .expect(200);

    let stranger = KeyPair::generate(material.dir.path(), "stranger");
    let valid_claims = claims_for(ALICE.0, SERVICE, unix_now() + 300, all_on_a.clone());
    let expired = sign_es256(
        &material.keys.key,
        Some(&kid),
        &claims_for(ALICE.0, SERVICE, unix_now() - 3600, all_on_a.clone()),
    );
    let other_audience = sign_es256(
        &material.keys.key,
        Some(&kid),
        &claims_for(
            ALICE.0,
            "another-registry",
            unix_now() + 300,
            all_on_a.clone(),
        ),
    );
    let mut other_issuer_claims = valid_claims.clone();
    other_issuer_claims["iss"] = json!("someone-else");
    let other_issuer = sign_es256(&material.keys.key, Some(&kid), &other_issuer_claims);
    let unknown_key_same_kid = sign_es256(&stranger.key, Some(&kid), &valid_claims);
    let unknown_key_no_kid = sign_es256(&stranger.key, None, &valid_claims);
    let unknown_kid = sign_es256(
        &material.keys.key,
        Some("ABCD:EFGH:IJKL:MNOP:QRST:UVWX:YZ23:4567:ABCD:EFGH:IJKL:MNOP"),
        &valid_claims,
    );
    let claims_b64 = b64url().encode(valid_claims.to_string());
    let alg_none = format!(
        "{}.{claims_b64}.",
        b64url().encode(json!({ "alg": "none", "typ": "JWT", "kid": kid }).to_string())
    );
    let alg_none_upper = format!(
        "{}.{claims_b64}.",
        b64url().encode(json!({ "alg": "NONE", "typ": "JWT" }).to_string())
    );
    // HS256 with the public certificate as the shared secret: the classic algorithm confusion.
    let certificate = fs::read(&material.keys.certificate).expect("read the certificate");
    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = Some(kid.clone());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &valid_claims,
        &jsonwebtoken::EncodingKey::from_secret(&certificate),
    )
    .expect("sign HS256");
    // A genuine token whose claims were edited after signing.
    let genuine_pull = token(
        &client,
        &registry,
        Some(BOB),
        &["repository:team-a/app:pull"],
    )
    .await;
    let parts: Vec<&str> = genuine_pull.split('.').collect();
    let mut edited: Value = serde_json::from_slice(&b64url().decode(parts[1]).unwrap()).unwrap();
    edited["access"][0]["actions"] = json!(["pull", "push"]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64url().encode(edited.to_string()),
        parts[2]
    );
    let forged = [
        ("expired", expired),
        ("another audience", other_audience),
        ("another issuer", other_issuer),
        ("an unknown key with berth's kid", unknown_key_same_kid),
        ("an unknown key without kid", unknown_key_no_kid),
        ("an unknown kid", unknown_kid),
        ("alg none", alg_none),
        ("alg NONE", alg_none_upper),
        ("HS256 keyed with the certificate", hs256),
        ("edited claims", tampered),
        ("not a JWT", "definitely-not-a-jwt".to_string()),
    ];
    let push_blob = &small_image(62).layers[0].blob;
    for (what, forged) in &forged {
        let cred = Cred::Bearer(forged.clone());
        let reply = get(&client, &manifest_a, &cred).await;
        assert_eq!(reply.status, 401, "{what}: {reply}");
        reply.expect_bearer_challenge(Some("invalid_token"));
        let reply = upload_blob(&client, &registry, &cred, "team-a/app", push_blob).await;
        assert_eq!(reply.status, 401, "{what}: {reply}");
        reply.expect_bearer_challenge(Some("invalid_token"));
        let reply = get(&client, &url("/v2/"), &cred).await;
        assert_eq!(reply.status, 401, "{what}: {reply}");
    }
    assert!(
        !blob_in_repo(
            &client,
            &registry,
            Mode::Token,
            "team-a/app",
            &push_blob.digest
        )
        .await,
        "a forged token wrote a blob"
    );

    // The token endpoint: other services, wrong and unknown credentials.
    token_reply(
        &client,
        &registry,
        Some(ALICE),
        "another-registry",
        &["repository:team-a/app:pull"],
    )
    .await
    .expect(400);
    for basic in [(ALICE.0, MALLORY.1), MALLORY] {
        let reply = token_reply(
            &client,
            &registry,
            Some(basic),
            SERVICE,
            &["repository:team-a/app:pull"],
        )
        .await;
        reply.expect_error(401, "UNAUTHORIZED");
        assert!(reply.header("www-authenticate").is_some(), "{reply}");
        assert!(
            !String::from_utf8_lossy(&reply.body).contains("eyJ"),
            "{reply}"
        );
    }
    // Asking for more than the policy allows gets only what it allows.
    let bob = token(
        &client,
        &registry,
        Some(BOB),
        &[
            "repository:team-a/app:pull,push,delete",
            "repository:team-b/app:pull,push",
            "repository:private/secret:pull",
            "repository:../etc:pull",
        ],
    )
    .await;
    assert_eq!(
        access_of(&bob),
        vec![
            repo_access("team-a/app", &["pull"]),
            repo_access("team-b/app", &["pull", "push"]),
        ]
    );
    let anonymous = token(
        &client,
        &registry,
        None,
        &[
            "repository:team-a/app:pull",
            "repository:public/x:pull,push",
        ],
    )
    .await;
    assert_eq!(
        access_of(&anonymous),
        vec![repo_access("public/x", &["pull"])]
    );
    get(&client, &manifest_a, &Cred::Bearer(anonymous))
        .await
        .expect_bearer_challenge(Some("insufficient_scope"));

    // Basic credentials on the API count as none in token mode, even right ones.
    let reply = upload_blob(
        &client,
        &registry,
        &Cred::basic(ADMIN),
        "team-a/app",
        push_blob,
    )
    .await;
    reply.expect_bearer_challenge(None);
    get(&client, &manifest_a, &Cred::basic(ALICE))
        .await
        .expect_bearer_challenge(None);

    // A pull token does not push.
    let pull_only = token(
        &client,
        &registry,
        Some(ALICE),
        &["repository:team-a/app:pull"],
    )
    .await;
    assert_eq!(
        access_of(&pull_only),
        vec![repo_access("team-a/app", &["pull"])]
    );
    let pull_cred = Cred::Bearer(pull_only.clone());
    get(&client, &manifest_a, &pull_cred).await.expect(200);
    upload_blob(&client, &registry, &pull_cred, "team-a/app", push_blob)
        .await
        .expect_bearer_challenge(Some("insufficient_scope"));
    send(
        &client,
        Method::PUT,
        &url("/v2/team-a/app/manifests/v2"),
        &pull_cred,
        Some((OCI_MANIFEST, image.manifest.bytes.clone())),
    )
    .await
    .expect_bearer_challenge(Some("insufficient_scope"));
    send(
        &client,
        Method::DELETE,
        &url(&format!(
            "/v2/team-a/app/manifests/{}",
            image.manifest.digest
        )),
        &Cred::Bearer(genuine.clone()),
        None,
    )
    .await
    .expect_bearer_challenge(Some("insufficient_scope"));

    // A token for one repository is worth nothing in another, even one the user may use.
    let admin_pub = admin_on(&client, &registry, Mode::Token, "public/app").await;
    push_image(&client, &registry, &admin_pub, "public/app", "v1", &image).await;
    let genuine_cred = Cred::Bearer(genuine.clone());
    for repo in ["team-a/app2", "team-a", "team-a/app/sub", "public/app"] {
        upload_blob(&client, &registry, &genuine_cred, repo, push_blob)
            .await
            .expect_bearer_challenge(Some("insufficient_scope"));
    }
    assert_eq!(
        tags_as_admin(&client, &registry, Mode::Token, "team-a/app").await,
        Some(vec!["v1".to_string()])
    );
    for repo in ["team-a/app2", "team-a", "team-a/app/sub"] {
        assert_eq!(
            tags_as_admin(&client, &registry, Mode::Token, repo).await,
            None
        );
    }
    assert!(
        !blob_in_repo(
            &client,
            &registry,
            Mode::Token,
            "public/app",
            &push_blob.digest
        )
        .await
    );

    // Mounts. A blob only the admin may read, in private/secret.
    let secret = small_image(63);
    let admin_secret = admin_on(&client, &registry, Mode::Token, "private/secret").await;
    push_image(
        &client,
        &registry,
        &admin_secret,
        "private/secret",
        "v1",
        &secret,
    )
    .await;
    let secret_layer = secret.layers[0].blob.digest.clone();
    let mount = |repo: &str, query: &str| url(&format!("/v2/{repo}/blobs/uploads/?{query}"));
    // Pull on team-a (alice's pull token) used to mount into public/app, where the token has
    // no push: refused, even though alice may push there.
    let a_layer = image.layers[0].blob.digest.clone();
    send(
        &client,
        Method::POST,
        &mount(
            "public/mounted",
            &format!("mount={a_layer}&from=team-a/app"),
        ),
        &pull_cred,
        None,
    )
    .await
    .expect_bearer_challenge(Some("insufficient_scope"));
    assert_eq!(
        tags_as_admin(&client, &registry, Mode::Token, "public/mounted").await,
        None
    );
    assert!(!blob_in_repo(&client, &registry, Mode::Token, "public/mounted", &a_layer).await);
    // Bob's token: push on team-b, nothing on private/secret.
    let bob_cred = Cred::Bearer(bob.clone());
    send(
        &client,
        Method::POST,
        &mount(
            "team-b/app",
            &format!("mount={secret_layer}&from=private/secret"),
        ),
        &bob_cred,
        None,
    )
    .await
    .expect_bearer_challenge(Some("insufficient_scope"));
    send(
        &client,
        Method::POST,
        &mount("team-b/app", &format!("mount={secret_layer}")),
        &bob_cred,
        None,
    )
    .await
    .expect(202);
    assert!(
        !blob_in_repo(&client, &registry, Mode::Token, "team-b/app", &secret_layer).await,
        "a mount brought a blob bob may not pull into team-b"
    );
    // With pull on the source in the token, the same kind of mount works: the refusals above
    // are about access, not about mounting.
    send(
        &client,
        Method::POST,
        &mount("team-b/app", &format!("mount={a_layer}&from=team-a/app")),
        &bob_cred,
        None,
    )
    .await
    .expect(201);
    assert!(blob_in_repo(&client, &registry, Mode::Token, "team-b/app", &a_layer).await);

    // An oversized bearer token is refused without harm.
    let huge = Cred::Raw(format!("Bearer {}", "A".repeat(64 * 1024)));
    let reply = get(&client, &manifest_a, &huge).await;
    assert!(
        reply.status == 401 || reply.status == 431,
        "64 KiB Authorization: {reply}"
    );
    get(&client, &manifest_a, &pull_cred).await.expect(200);

    let mut secrets = Vec::new();
    for t in [&genuine, &genuine_pull, &bob, &pull_only] {
        secrets.extend(token_secrets(t));
    }
    for user in [ADMIN, ALICE, BOB, MALLORY] {
        secrets.extend(basic_secrets(user));
    }
    secrets.extend(basic_secrets((ALICE.0, MALLORY.1)));
    assert_no_secrets(&client, &registry, &secrets).await;
}

/// Pushes the repositories the catalog tests look at, as the administrator.
async fn populate(client: &reqwest::Client, registry: &Registry, mode: Mode) -> Image {
    let image = small_image(71);
    for repo in [
        "public/app",
        "team-a/app",
        "team-b/app",
        "cache/app/abc",
        "private/secret",
    ] {
        let cred = admin_on(client, registry, mode, repo).await;
        push_image(client, registry, &cred, repo, "v1", &image).await;
    }
    image
}

const EVERY_REPOSITORY: [&str; 5] = [
    "cache/app/abc",
    "private/secret",
    "public/app",
    "team-a/app",
    "team-b/app",
];

/// An anonymous catalog is refused, or shows only what anyone may list.
#[track_caller]
fn assert_anonymous_catalog(reply: &Reply, challenge: Mode) {
    if reply.status == 200 {
        let listed = repositories(reply);
        assert!(
            listed.iter().all(|r| r == "public/app"),
            "an anonymous catalog lists more than public content: {listed:?}"
        );
    } else {
        match challenge {
            Mode::Basic => reply.expect_basic_challenge(),
            Mode::Token => reply.expect_error(401, "UNAUTHORIZED"),
        };
    }
}

#[tokio::test]
async fn basic_mode_catalog_shows_only_what_the_caller_may_list() {
    let material = usual_material();
    let registry = Registry::start_with_config(&material.config("basic", ""));
    let client = http_client();
    let url = |path: &str| format!("{}{path}", registry.url());
    let image = populate(&client, &registry, Mode::Basic).await;

    let anonymous = catalog(&client, &registry, &Cred::Anonymous, 100).await;
    assert_anonymous_catalog(&anonymous, Mode::Basic);
    // Unknown credentials are no way into the catalog either.
    get(&client, &url("/v2/_catalog"), &Cred::basic(MALLORY))
        .await
        .expect_basic_challenge();

    let expected: [(&str, (&'static str, &'static str), Vec<&str>); 4] = [
        ("admin", ADMIN, EVERY_REPOSITORY.to_vec()),
        ("alice", ALICE, vec!["public/app", "team-a/app"]),
        ("bob", BOB, vec!["public/app", "team-a/app", "team-b/app"]),
        ("robot", ROBOT, vec!["cache/app/abc", "public/app"]),
    ];
    for (who, user, repos) in expected {
        for page in [1, 2, 100] {
            let reply = catalog(&client, &registry, &Cred::basic(user), page).await;
            reply.expect(200);
            assert_eq!(
                repositories(&reply),
                repos,
                "{who}'s catalog in pages of {page}"
            );
        }
    }

    // The by-name namespace: pullable by exact name, never listed, also with credentials this
    // registry does not know or a wrong password.
    let manifest = url("/v2/cache/app/abc/manifests/v1");
    let layer = url(&format!(
        "/v2/cache/app/abc/blobs/{}",
        image.layers[0].blob.digest
    ));
    for cred in [
        Cred::Anonymous,
        Cred::basic(MALLORY),
        Cred::Basic(ALICE.0, MALLORY.1),
        Cred::basic(BOB),
    ] {
        let reply = get(&client, &manifest, &cred).await;
        reply.expect(200);
        assert_eq!(sha256(&reply.body), image.manifest.digest);
        get(&client, &layer, &cred).await.expect(200);
        let tags = get(&client, &url("/v2/cache/app/abc/tags/list"), &cred).await;
        match cred {
            Cred::Basic("bob", _) => tags.expect_error(403, "DENIED"),
            _ => tags.expect_basic_challenge(),
        };
    }
    // A name that is not there is just unknown, not a hint.
    get(
        &client,
        &url("/v2/cache/app/nope/manifests/v1"),
        &Cred::Anonymous,
    )
    .await
    .expect_error(404, "MANIFEST_UNKNOWN");
    // Unknown credentials are no way into anything else, nor into pushing to the cache.
    get(
        &client,
        &url("/v2/team-a/app/manifests/v1"),
        &Cred::basic(MALLORY),
    )
    .await
    .expect_basic_challenge();
    get(
        &client,
        &url("/v2/public/app/manifests/v1"),
        &Cred::basic(MALLORY),
    )
    .await
    .expect_basic_challenge();
    let other = small_image(72);
    upload_blob(
        &client,
        &registry,
        &Cred::basic(MALLORY),
        "cache/app/abc",
        &other.config,
    )
    .await
    .expect_basic_challenge();
    upload_blob(
        &client,
        &registry,
        &Cred::Anonymous,
        "cache/app/abc",
        &other.config,
    )
    .await
    .expect_basic_challenge();
    assert!(
        !blob_in_repo(
            &client,
            &registry,
            Mode::Basic,
            "cache/app/abc",
            &other.config.digest
        )
        .await
    );
    // The public namespace lists for everyone.
    get(&client, &url("/v2/public/app/tags/list"), &Cred::Anonymous)
        .await
        .expect(200);
}

#[tokio::test]
async fn token_mode_catalog_and_by_name_pulls() {
    let material = usual_material();
    let registry = Registry::start_with_config(&material.config("token", ""));
    let client = http_client();
    let url = |path: &str| format!("{}{path}", registry.url());
    let image = populate(&client, &registry, Mode::Token).await;

    // Anonymous: no catalog, with or without an (anonymous) token.
    let anonymous_token = token(&client, &registry, None, &["registry:catalog:*"]).await;
    for cred in [Cred::Anonymous, Cred::Bearer(anonymous_token)] {
        let reply = catalog(&client, &registry, &cred, 100).await;
        assert_anonymous_catalog(&reply, Mode::Token);
    }
    token_reply(
        &client,
        &registry,
        Some(MALLORY),
        SERVICE,
        &["registry:catalog:*"],
    )
    .await
    .expect_error(401, "UNAUTHORIZED");

    let expected: [(&str, (&'static str, &'static str), Vec<&str>); 4] = [
        ("admin", ADMIN, EVERY_REPOSITORY.to_vec()),
        ("alice", ALICE, vec!["public/app", "team-a/app"]),
        ("bob", BOB, vec!["public/app", "team-a/app", "team-b/app"]),
        ("robot", ROBOT, vec!["cache/app/abc", "public/app"]),
    ];
    for (who, user, repos) in expected {
        let catalog_token = token(&client, &registry, Some(user), &["registry:catalog:*"]).await;
        for page in [1, 100] {
            let reply = catalog(
                &client,
                &registry,
                &Cred::Bearer(catalog_token.clone()),
                page,
            )
            .await;
            reply.expect(200);
            assert_eq!(
                repositories(&reply),
                repos,
                "{who}'s catalog in pages of {page}"
            );
        }
    }

    // The by-name namespace, through the token endpoint: anonymous, unknown credentials and a
    // wrong password all get a pull token for an exact cache repository.
    let scope = "repository:cache/app/abc:pull";
    let manifest = url("/v2/cache/app/abc/manifests/v1");
    for basic in [None, Some(MALLORY), Some((ALICE.0, MALLORY.1))] {
        let pull = token(&client, &registry, basic, &[scope]).await;
        assert_eq!(
            access_of(&pull),
            vec![repo_access("cache/app/abc", &["pull"])]
        );
        let (_, claims) = jwt_parts(&pull);
        assert_eq!(claims["sub"], "", "a lenient token is anonymous");
        let cred = Cred::Bearer(pull);
        let reply = get(&client, &manifest, &cred).await;
        reply.expect(200);
        assert_eq!(sha256(&reply.body), image.manifest.digest);
        get(&client, &url("/v2/cache/app/abc/tags/list"), &cred)
            .await
            .expect_bearer_challenge(Some("insufficient_scope"));
        // Push is never granted that way.
        let push = token_reply(
            &client,
            &registry,
            basic,
            SERVICE,
            &["repository:cache/app/abc:pull,push"],
        )
        .await;
        match basic {
            None => {
                push.expect(200);
                assert_eq!(
                    access_of(push.json()["token"].as_str().expect("a token")),
                    vec![repo_access("cache/app/abc", &["pull"])]
                );
            }
            Some(_) => {
                push.expect_error(401, "UNAUTHORIZED");
            }
        }
        // Nor does it reach beyond the cache.
        if basic.is_some() {
            token_reply(
                &client,
                &registry,
                basic,
                SERVICE,
                &[scope, "repository:team-a/app:pull"],
            )
            .await
            .expect_error(401, "UNAUTHORIZED");
        }
    }
    // Without any token, the by-name pull works too (the policy allows it), listing does not.
    get(&client, &manifest, &Cred::Anonymous).await.expect(200);
    get(
        &client,
        &url("/v2/cache/app/abc/tags/list"),
        &Cred::Anonymous,
    )
    .await
    .expect_bearer_challenge(None);
    get(
        &client,
        &url("/v2/team-a/app/manifests/v1"),
        &Cred::Anonymous,
    )
    .await
    .expect_bearer_challenge(None);
}

#[tokio::test]
async fn dot_dot_names_are_refused_before_anything_else() {
    for mode in [Mode::Basic, Mode::Token] {
        dot_dot_names(mode).await;
    }
}

async fn dot_dot_names(mode: Mode) {
    let material = usual_material();
    let mode_name = if mode == Mode::Basic {
        "basic"
    } else {
        "token"
    };
    let registry = Registry::start_with_config(&material.config(mode_name, ""));
    let client = http_client();
    let image = populate(&client, &registry, mode).await;
    let digest = &image.layers[0].blob.digest;
    // Alice's credentials, with push on public/app in token mode.
    let alice = match mode {
        Mode::Basic => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ALICE.0, ALICE.1))
        ),
        Mode::Token => format!(
            "Bearer {}",
            token(
                &client,
                &registry,
                Some(ALICE),
                &["repository:public/app:pull,push"]
            )
            .await
        ),
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
                let reply = raw_request(&registry, method, target, authorization, body);
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
    assert_eq!(
        admin_catalog(&client, &registry, mode).await,
        EVERY_REPOSITORY.to_vec()
    );
    for repo in EVERY_REPOSITORY {
        assert_eq!(
            tags_as_admin(&client, &registry, mode, repo).await,
            Some(vec!["v1".to_string()])
        );
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
    let mut stream = TcpStream::connect(registry.addr()).expect("connect to the registry");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a timeout");
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n\
         Content-Type: {OCI_MANIFEST}\r\n",
        registry.host(),
        body.len()
    );
    if let Some(value) = authorization {
        head.push_str(&format!("Authorization: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send the head");
    stream.write_all(body).expect("send the body");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "{method} {target}: not an HTTP response: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<RawResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(RawResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

#[tokio::test]
async fn failed_logins_are_limited_per_client() {
    let material = usual_material();
    let extra = "  max_failures_per_minute: 5\n";
    let client = http_client();
    let image = small_image(81);

    // Basic mode.
    let registry = Registry::start_with_config(&material.config("basic", extra));
    push_image(
        &client,
        &registry,
        &Cred::basic(ALICE),
        "public/app",
        "v1",
        &image,
    )
    .await;
    let base = format!("{}/v2/", registry.url());
    for attempt in 0..5 {
        let cred = if attempt % 2 == 0 {
            Cred::Basic(ALICE.0, MALLORY.1)
        } else {
            Cred::basic(MALLORY)
        };
        get(&client, &base, &cred).await.expect_basic_challenge();
    }
    for cred in [
        Cred::Basic(ALICE.0, MALLORY.1),
        Cred::basic(ALICE),
        Cred::basic(ADMIN),
    ] {
        get(&client, &base, &cred)
            .await
            .expect_error(429, "TOOMANYREQUESTS");
    }
    upload_blob(
        &client,
        &registry,
        &Cred::basic(ALICE),
        "public/app",
        &small_image(82).config,
    )
    .await
    .expect_error(429, "TOOMANYREQUESTS");
    // Pulls that need no login are not held up.
    get(
        &client,
        &format!("{}/v2/public/app/manifests/v1", registry.url()),
        &Cred::Anonymous,
    )
    .await
    .expect(200);

    // Token mode: the token endpoint counts failures the same way.
    let registry = Registry::start_with_config(&material.config("token", extra));
    let scope = ["repository:public/app:pull"];
    for _ in 0..5 {
        token_reply(
            &client,
            &registry,
            Some((ALICE.0, MALLORY.1)),
            SERVICE,
            &scope,
        )
        .await
        .expect_error(401, "UNAUTHORIZED");
    }
    token_reply(&client, &registry, Some(ALICE), SERVICE, &scope)
        .await
        .expect_error(429, "TOOMANYREQUESTS");
    // Anonymous tokens still come.
    token(&client, &registry, None, &scope).await;
}

#[tokio::test]
async fn unknown_users_take_as_long_to_refuse_as_wrong_passwords() {
    // The cost htpasswd uses by default and operators keep.
    let material = Material::new(&[ADMIN, ALICE], 10);
    let registry = Registry::start_with_config(&material.config("basic", ""));
    let client = http_client();
    let base = format!("{}/v2/", registry.url());
    // Warm the connection pool up.
    get(&client, &base, &Cred::Anonymous).await.expect(401);
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..10 {
        for (times, cred) in [
            (&mut known, Cred::Basic(ALICE.0, MALLORY.1)),
            (&mut unknown, Cred::basic(MALLORY)),
        ] {
            let started = Instant::now();
            get(&client, &base, &cred).await.expect_basic_challenge();
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let mean = |times: &[f64]| times.iter().sum::<f64>() / times.len() as f64;
    let (known, unknown) = (mean(&known), mean(&unknown));
    eprintln!("mean refusal: wrong password {known:.4} s, unknown user {unknown:.4} s");
    assert!(
        known / unknown < 2.0 && unknown / known < 2.0,
        "refusing an unknown user ({unknown:.4} s) and a wrong password ({known:.4} s) must take \
         about as long, or user names can be probed"
    );
    // Sanity: a bcrypt check of cost 10 did happen for both.
    assert!(known > 0.01 && unknown > 0.01, "no bcrypt work measured");
}

// ---------------------------------------------------------------------------------------------
// 5: SIGHUP
// ---------------------------------------------------------------------------------------------

/// A persistent HTTP/1.1 connection: requests one after another on the same socket.
struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    host: String,
}

impl KeepAlive {
    fn connect(registry: &Registry) -> KeepAlive {
        let stream = TcpStream::connect(registry.addr()).expect("connect to the registry");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set a timeout");
        KeepAlive {
            reader: BufReader::new(stream.try_clone().expect("clone the stream")),
            writer: stream,
            host: registry.host(),
        }
    }

    /// Sends the head of a request with `Content-Length: length` and `authorization`.
    fn send_head(&mut self, method: &str, target: &str, authorization: &str, length: usize) {
        write!(
            self.writer,
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: {authorization}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n",
            self.host
        )
        .expect("send a request head on the kept-alive connection");
    }

    fn send_body(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .expect("send body bytes on the kept-alive connection");
        self.writer.flush().expect("flush");
    }

    /// Reads one response, framed by its Content-Length.
    fn read_response(&mut self) -> RawResponse {
        let mut status_line = String::new();
        self.reader
            .read_line(&mut status_line)
            .expect("read a status line: the connection must stay open");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("read a header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().expect("a length"))
            .unwrap_or_else(|| panic!("a response without Content-Length: {headers:?}"));
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("read the body");
        assert!(
            !headers
                .iter()
                .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close")),
            "the registry closes the kept-alive connection: {headers:?}"
        );
        RawResponse {
            status,
            headers,
            body,
        }
    }
}

#[tokio::test]
async fn sighup_reloads_users_and_rules_without_dropping_connections() {
    let material = Material::new(&[ADMIN, ALICE], 4);
    let registry = Registry::start_with_config(&material.config("basic", ""));
    let client = http_client();
    let url = |path: &str| format!("{}{path}", registry.url());
    let basic = |(user, password): (&str, &str)| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    };

    // Carol is unknown so far.
    get(&client, &url("/v2/"), &Cred::basic(CAROL))
        .await
        .expect_basic_challenge();
    let blob = Blob::new(OCI_LAYER_GZIP, Rng::new(91).bytes(256 * 1024));

    // A kept-alive connection with a request in flight across the reload: alice uploads a blob
    // whose body is half sent when the signal arrives.
    let mut connection = KeepAlive::connect(&registry);
    connection.send_head("GET", "/v2/", &basic(ALICE), 0);
    assert_eq!(connection.read_response().status, 200);
    connection.send_head("POST", "/v2/public/hup/blobs/uploads/", &basic(ALICE), 0);
    let started = connection.read_response();
    assert_eq!(
        started.status,
        202,
        "{:?}",
        String::from_utf8_lossy(&started.body)
    );
    let location = started.header("location").expect("a Location").to_string();
    let location = location
        .strip_prefix(&registry.url())
        .unwrap_or(&location)
        .to_string();
    let separator = if location.contains('?') { '&' } else { '?' };
    let target = format!("{location}{separator}digest={}", blob.digest);
    connection.send_head("PUT", &target, &basic(ALICE), blob.size());
    let half = blob.size() / 2;
    connection.send_body(&blob.bytes[..half]);

    // Add carol, with push on public/carol, and reload.
    material.write_users(&[ADMIN, ALICE, CAROL], 4);
    let mut config = material.config("basic", "");
    config = config.replace(
        "    - repositories: team-b\n",
        "    - repositories: public/carol\n      grants: { \"user:carol\": [push] }\n    - repositories: team-b\n",
    );
    registry.write_config(&config);
    assert!(registry.reload(), "the reload must succeed");

    // The request in flight completes, and the connection keeps serving.
    connection.send_body(&blob.bytes[half..]);
    let finished = connection.read_response();
    assert_eq!(
        finished.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&finished.body)
    );
    connection.send_head("GET", "/v2/", &basic(ALICE), 0);
    assert_eq!(connection.read_response().status, 200);
    // On the old connection too, the new user is known.
    connection.send_head("GET", "/v2/", &basic(CAROL), 0);
    assert_eq!(connection.read_response().status, 200);
    assert!(blob_in_repo(&client, &registry, Mode::Basic, "public/hup", &blob.digest).await);

    // Carol logs in and pushes where the new rule lets her, and only there.
    get(&client, &url("/v2/"), &Cred::basic(CAROL))
        .await
        .expect(200);
    let image = small_image(92);
    push_image(
        &client,
        &registry,
        &Cred::basic(CAROL),
        "public/carol",
        "v1",
        &image,
    )
    .await;
    upload_blob(
        &client,
        &registry,
        &Cred::basic(CAROL),
        "public/other",
        &image.config,
    )
    .await
    .expect_error(403, "DENIED");

    // A broken configuration is refused and the running one kept.
    registry.write_config("auth:\n  mode: basic\n  htpasswd: /nonexistent/htpasswd\n");
    assert!(!registry.reload(), "a broken configuration must not load");
    get(&client, &url("/v2/"), &Cred::basic(CAROL))
        .await
        .expect(200);
    get(&client, &url("/v2/"), &Cred::Anonymous)
        .await
        .expect_basic_challenge();

    // Removing a user takes effect at once, remembered logins included.
    material.write_users(&[ADMIN, ALICE], 4);
    registry.write_config(&material.config("basic", ""));
    assert!(registry.reload());
    get(&client, &url("/v2/"), &Cred::basic(CAROL))
        .await
        .expect_basic_challenge();
    connection.send_head("GET", "/v2/", &basic(ALICE), 0);
    assert_eq!(connection.read_response().status, 200);
}
