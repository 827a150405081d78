//! Access control end to end, against the real binary: Basic and token mode with real clients
//! (docker through a private dockerd, skopeo, podman, containerd's ctr), berth-issued tokens
//! accepted by CNCF distribution, attacks over raw HTTP (forged, expired and misused tokens, wrong
//! passwords, catalog leaks, mounts across repositories, path tricks, oversized headers,
//! failed-login limits, timing of unknown users) and reloading on SIGHUP. Every client must be
//! installed: a missing one fails the test.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use reqwest::Method;
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
/// The platform group are `admins`, above every rule.
const POLICY: &str = r#"  groups: { platform: [admin] }
  admins: ["group:platform"]
  access:
    - repositories: cache
      anonymous: by-name
      foreign_credentials_as_anonymous: true
      grants: { "robot:cacher": [push] }
    - repositories: public
      anonymous: pull
      grants: { "user:alice": [push] }
    - repositories: team-a
      grants: { "user:alice": [push], "user:bob": [pull] }
    - repositories: team-b
      grants: { "user:bob": [push] }
"#;

/// Which mode a registry runs in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Basic,
    Token,
}

impl Mode {
    /// As `auth.mode` spells it.
    fn name(self) -> &'static str {
        match self {
            Mode::Basic => "basic",
            Mode::Token => "token",
        }
    }
}

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
    fn config(&self, mode: Mode, extra: &str) -> String {
        format!(
            "auth:\n  mode: {}\n  htpasswd: {}\n{POLICY}  token:\n    signing_key: {}\n{extra}",
            mode.name(),
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

/// `user:password` as Basic authentication encodes it.
fn basic_encoded((user, password): (&str, &str)) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// The `Authorization` header value of a Basic login.
fn basic_authorization(login: (&str, &str)) -> String {
    format!("Basic {}", basic_encoded(login))
}

/// The challenges and OCI errors access control answers with.
impl Reply {
    /// The first OCI error code of the body, if it has one.
    fn code(&self) -> Option<String> {
        let value: Value = serde_json::from_slice(&self.body).ok()?;
        value["errors"][0]["code"].as_str().map(str::to_string)
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
    Reply::read(method, what, response).await
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

/// What [`Api::tags_as_admin`] finds in a repository that holds `tags` (sorted).
fn tag_list(tags: &[&str]) -> Option<Vec<String>> {
    Some(tags.iter().map(|t| t.to_string()).collect())
}

/// A small image of one layer.
fn small_image(seed: u64) -> Image {
    Image::generate(seed, "amd64", &[3 * 1024])
}

// ---------------------------------------------------------------------------------------------
// The registry under test
// ---------------------------------------------------------------------------------------------

/// A registry with access control, the mode it runs in, and a client for it.
struct Api {
    registry: Registry,
    client: reqwest::Client,
    mode: Mode,
}

impl Api {
    /// A registry in `mode` with `material`'s files, [`POLICY`] and `extra` lines under `auth:`.
    fn start(material: &Material, mode: Mode, extra: &str) -> Api {
        let registry = Registry::start_with_config(&material.config(mode, extra));
        Api::serving(registry, mode)
    }

    /// Like [`Api::start`], logging at trace level, where a leaked secret would show first.
    fn start_traced(material: &Material, mode: Mode) -> Api {
        let config = material.config(mode, "");
        let registry = Registry::start_configured(&config, &[("BERTH_LOG", "trace")]);
        Api::serving(registry, mode)
    }

    fn serving(registry: Registry, mode: Mode) -> Api {
        Api {
            registry,
            client: http_client(),
            mode,
        }
    }

    /// `method target`, `target` being a path of the registry such as `/v2/`.
    async fn send(
        &self,
        method: Method,
        target: &str,
        cred: &Cred,
        body: Option<(&str, Vec<u8>)>,
    ) -> Reply {
        let url = absolute(&self.registry, target);
        send(&self.client, method, &url, cred, body).await
    }

    async fn get(&self, target: &str, cred: &Cred) -> Reply {
        self.send(Method::GET, target, cred, None).await
    }

    /// A POST without a body: it starts an upload, or mounts a blob.
    async fn post(&self, target: &str, cred: &Cred) -> Reply {
        self.send(Method::POST, target, cred, None).await
    }

    /// Asks to mount blob `digest` into `repo`, naming the repository it comes `from` if given.
    async fn mount(&self, cred: &Cred, repo: &str, digest: &str, from: Option<&str>) -> Reply {
        let mut target = format!("/v2/{repo}/blobs/uploads/?mount={digest}");
        if let Some(from) = from {
            target.push_str(&format!("&from={from}"));
        }
        self.post(&target, cred).await
    }

    /// Mounts blob `digest` into `repo` from `from`, which `cred` may pull: it is there at once.
    async fn expect_mounted(&self, cred: &Cred, repo: &str, digest: &str, from: &str) {
        self.mount(cred, repo, digest, Some(from)).await.expect(201);
        assert!(self.blob_in_repo(repo, digest).await, "{digest} in {repo}");
    }

    /// Asks to mount blob `digest` into `repo` without naming a source, where `cred` may not
    /// pull it: an upload session is offered instead, and the blob stays out.
    async fn expect_not_mounted(&self, cred: &Cred, repo: &str, digest: &str) {
        self.mount(cred, repo, digest, None).await.expect(202);
        assert!(
            !self.blob_in_repo(repo, digest).await,
            "a mount brought a blob the caller may not pull into {repo}"
        );
    }

    /// `GET target` with `huge`, a 64 KiB `Authorization` header: refused without harm, as
    /// unauthorized or as too large.
    async fn oversized_authorization(&self, target: &str, huge: &Cred) -> Reply {
        let reply = self.get(target, huge).await;
        assert!(
            reply.status == 401 || reply.status == 431,
            "64 KiB Authorization: {reply}"
        );
        reply
    }

    async fn put_manifest(&self, cred: &Cred, repo: &str, tag: &str, manifest: &Blob) -> Reply {
        let target = format!("/v2/{repo}/manifests/{tag}");
        let body = Some((OCI_MANIFEST, manifest.bytes.clone()));
        self.send(Method::PUT, &target, cred, body).await
    }

    async fn delete_manifest(&self, cred: &Cred, repo: &str, digest: &str) -> Reply {
        let target = format!("/v2/{repo}/manifests/{digest}");
        self.send(Method::DELETE, &target, cred, None).await
    }

    /// `GET /auth/token` with `scope`s, Basic `basic` credentials if given and `service`.
    async fn token_reply(
        &self,
        basic: Option<(&'static str, &'static str)>,
        service: &str,
        scopes: &[&str],
    ) -> Reply {
        let mut url =
            reqwest::Url::parse(&format!("{}/auth/token", self.registry.url())).expect("URL");
        url.query_pairs_mut().append_pair("service", service);
        for scope in scopes {
            url.query_pairs_mut().append_pair("scope", scope);
        }
        let cred = basic.map_or(Cred::Anonymous, Cred::basic);
        get(&self.client, url.as_str(), &cred).await
    }

    /// A token from the registry's token endpoint, which must issue one.
    async fn token(&self, basic: Option<(&'static str, &'static str)>, scopes: &[&str]) -> String {
        let reply = self.token_reply(basic, SERVICE, scopes).await;
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

    /// Credentials the administrator uses on `repo` (all actions): Basic, or a token for them.
    async fn admin_on(&self, repo: &str) -> Cred {
        match self.mode {
            Mode::Basic => Cred::basic(ADMIN),
            Mode::Token => {
                let scope = format!("repository:{repo}:pull,push,delete");
                Cred::Bearer(self.token(Some(ADMIN), &[&scope]).await)
            }
        }
    }

    /// Uploads `blob` to `repo` (POST, then PUT with the bytes); returns the first reply that is
    /// not the expected 202 or the final one.
    async fn upload_blob(&self, cred: &Cred, repo: &str, blob: &Blob) -> Reply {
        let started = self.post(&format!("/v2/{repo}/blobs/uploads/"), cred).await;
        if started.status != 202 {
            return started;
        }
        let location = started.location();
        let separator = if location.contains('?') { '&' } else { '?' };
        let target = format!("{location}{separator}digest={}", blob.digest);
        let body = Some(("application/octet-stream", blob.bytes.clone()));
        self.send(Method::PUT, &target, cred, body).await
    }

    /// Pushes `image` as `repo:tag` over HTTP with `cred`, which must be allowed to.
    async fn push_image(&self, cred: &Cred, repo: &str, tag: &str, image: &Image) {
        for blob in image.blobs() {
            self.upload_blob(cred, repo, blob).await.expect(201);
        }
        self.put_manifest(cred, repo, tag, &image.manifest)
            .await
            .expect(201);
    }

    /// Pushes `image` as `repo:tag` as the administrator.
    async fn push_as_admin(&self, repo: &str, tag: &str, image: &Image) {
        let cred = self.admin_on(repo).await;
        self.push_image(&cred, repo, tag, image).await;
    }

    /// The tags of `repo` as the administrator sees them; `None` if the repository does not exist.
    async fn tags_as_admin(&self, repo: &str) -> Option<Vec<String>> {
        let cred = self.admin_on(repo).await;
        let reply = self.get(&format!("/v2/{repo}/tags/list"), &cred).await;
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
    async fn blob_in_repo(&self, repo: &str, digest: &str) -> bool {
        let cred = self.admin_on(repo).await;
        let target = format!("/v2/{repo}/blobs/{digest}");
        let reply = self.send(Method::HEAD, &target, &cred, None).await;
        assert!(matches!(reply.status, 200 | 404), "{reply}");
        reply.status == 200
    }

    /// Every repository of the catalog `cred` sees, following `Link` pages of `page_size`.
    async fn catalog(&self, cred: &Cred, page_size: u32) -> Reply {
        let mut target = format!("/v2/_catalog?n={page_size}");
        let mut all = Vec::new();
        let mut last;
        loop {
            last = self.get(&target, cred).await;
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
                    target = link
                        .strip_prefix('<')
                        .and_then(|l| l.split_once('>'))
                        .map(|(t, _)| t.to_string())
                        .unwrap_or_else(|| panic!("bad Link: {last}"));
                }
                None => break,
            }
        }
        last.body = serde_json::to_vec(&json!({ "repositories": all })).expect("JSON");
        last
    }

    /// The catalog the administrator sees.
    async fn admin_catalog(&self) -> Vec<String> {
        let cred = match self.mode {
            Mode::Basic => Cred::basic(ADMIN),
            Mode::Token => Cred::Bearer(self.token(Some(ADMIN), &["registry:catalog:*"]).await),
        };
        let reply = self.catalog(&cred, 100).await;
        reply.expect(200);
        repositories(&reply)
    }

    /// Asserts that none of `secrets` appears in the server log or in `/metrics`.
    async fn assert_no_secrets(&self, secrets: &[String]) {
        let metrics = self.get("/metrics", &Cred::Anonymous).await;
        metrics.expect(200);
        let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
        let log = self.registry.log();
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
}

/// The secrets Basic logins expose: each password and the header value carrying it.
fn basic_secrets(logins: &[(&str, &str)]) -> Vec<String> {
    logins
        .iter()
        .flat_map(|&(user, password)| [password.to_string(), basic_encoded((user, password))])
        .collect()
}

/// The secrets in a token: all of it, and its signature alone.
fn token_secrets(token: &str) -> Vec<String> {
    let signature = token.rsplit('.').next().expect("a signature").to_string();
    vec![token.to_string(), signature]
}

// ---------------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------------

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

/// Runs a client command that the registry must refuse; `what` names it in the message.
#[track_caller]
fn assert_refused(cmd: &mut Command, what: &str) {
    let refused = run_failing(cmd);
    assert!(is_refusal(&refused), "{what}: {refused}");
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

/// Pushes the image in `layout` to `host` as `repo_tag` with skopeo, which must succeed.
fn skopeo_push(layout: &Path, host: &str, repo_tag: &str, creds: Option<(&str, &str)>) {
    run(&mut skopeo_copy_to(layout, host, repo_tag, creds));
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
    let api = Api::start(&material, mode, "");
    let registry = &api.registry;
    let host = registry.host();
    let image = Image::generate(31, "amd64", &[300 * 1024, 60 * 1024]);
    let layout = registry.scratch().join("layout");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());

    // skopeo with credentials, both ways.
    skopeo_push(&layout, &host, "public/app:v1", Some(ALICE));
    assert_eq!(
        skopeo_pull_digest(registry.scratch(), &host, "public/app:v1", Some(ALICE)),
        image.manifest.digest
    );
    skopeo_push(&layout, &host, "team-a/app:v1", Some(ALICE));
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
    assert_refused(
        &mut skopeo_copy_from(&host, "team-a/app:v1", None, &out),
        "anonymous pull of team-a",
    );

    // An anonymous push is refused and writes nothing.
    assert_refused(
        &mut skopeo_copy_to(&layout, &host, "public/anon:v1", None),
        "anonymous push",
    );
    // A push outside alice's grants is denied and writes nothing.
    assert_refused(
        &mut skopeo_copy_to(&layout, &host, "team-b/app:v1", Some(ALICE)),
        "alice pushing to team-b",
    );
    // Bob may pull team-a but not push there.
    assert_refused(
        &mut skopeo_copy_to(&layout, &host, "team-a/app:bob", Some(BOB)),
        "bob pushing to team-a",
    );
    for repo in ["public/anon", "team-b/app"] {
        assert_eq!(
            api.tags_as_admin(repo).await,
            None,
            "{repo} must not exist after a refused push"
        );
        for blob in image.blobs() {
            assert!(
                !api.blob_in_repo(repo, &blob.digest).await,
                "a blob reached {repo} in a refused push"
            );
        }
    }
    assert_eq!(
        api.tags_as_admin("team-a/app").await,
        tag_list(&["v1"]),
        "bob's refused push must not tag team-a/app"
    );
    if mode == Mode::Basic {
        assert_eq!(
            api.admin_catalog().await,
            vec!["public/app".to_string(), "team-a/app".to_string()]
        );
    }

    // The same refusals over HTTP, with the status codes the modes promise.
    let upload = |repo: &str| format!("/v2/{repo}/blobs/uploads/");
    let anonymous = api.post(&upload("public/anon"), &Cred::Anonymous).await;
    match mode {
        Mode::Basic => {
            anonymous.expect_basic_challenge();
            api.post(&upload("team-b/app"), &Cred::basic(ALICE))
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
            let alice = api
                .token(Some(ALICE), &["repository:team-b/app:pull,push"])
                .await;
            assert!(access_of(&alice).is_empty(), "alice got access to team-b");
            api.post(&upload("team-b/app"), &Cred::Bearer(alice))
                .await
                .expect_bearer_challenge(Some("insufficient_scope"));
        }
    }

    // docker: login, push, pull.
    let archive = docker_archive(registry, &image, "e2e/local:v1");
    let dockerd = Dockerd::start(&host);
    run(dockerd.docker().arg("load").arg("-i").arg(&archive));
    let login = |password: &str| {
        let mut cmd = dockerd.docker();
        cmd.args(["login", "-u", ALICE.0, "-p", password])
            .arg(&host);
        cmd
    };
    let logged_in = run(&mut login(ALICE.1));
    assert!(
        logged_in.contains("Login Succeeded"),
        "docker login: {logged_in}"
    );
    let failed_login = run_failing(&mut login(MALLORY.1));
    assert!(
        failed_login.contains("unauthorized") || failed_login.contains("401"),
        "docker login with a wrong password: {failed_login}"
    );
    // The failed attempt must not have replaced the stored credentials.
    let logged_in = run(&mut login(ALICE.1));
    assert!(
        logged_in.contains("Login Succeeded"),
        "docker login: {logged_in}"
    );

    let remote = format!("{host}/public/docker:v1");
    let pushed = dockerd.tag_and_push("e2e/local:v1", &remote);
    let pushed_digest = digest_after(&pushed, "digest:")
        .unwrap_or_else(|| panic!("no digest in docker push output: {pushed}"));
    assert_eq!(api.tags_as_admin("public/docker").await, tag_list(&["v1"]));
    let private_remote = format!("{host}/team-a/docker:v1");
    dockerd.tag_and_push("e2e/local:v1", &private_remote);

    // Outside alice's grants, docker push is refused.
    let denied_remote = format!("{host}/team-b/docker:v1");
    run(dockerd
        .docker()
        .args(["tag", "e2e/local:v1", &denied_remote]));
    assert_refused(
        dockerd.docker().args(["push", &denied_remote]),
        "docker push to team-b",
    );
    assert_eq!(api.tags_as_admin("team-b/docker").await, None);

    dockerd.remove_all_images(&["e2e/local:v1", &remote, &private_remote, &denied_remote]);
    dockerd.pull_expecting(&private_remote, &pushed_digest);
    assert_eq!(
        dockerd.image_id(&private_remote),
        image.config.digest,
        "image id after pull"
    );
    run(dockerd.docker().args(["rmi", &private_remote]));

    // Logged out, in token mode: public content pulls, team-a does not. (In Basic mode `GET /v2/`
    // challenges for Basic credentials, and docker then sends no request at all without them:
    // anonymous docker pulls need token mode, as with other registries. skopeo's anonymous
    // pulls were checked above.)
    if mode == Mode::Token {
        run(dockerd.docker().arg("logout").arg(&host));
        dockerd.pull_expecting(&remote, &pushed_digest);
        assert_refused(
            dockerd.docker().args(["pull", &private_remote]),
            "anonymous docker pull of team-a",
        );
    }

    api.assert_no_secrets(&basic_secrets(&[ALICE, BOB, ADMIN]))
        .await;
}

#[tokio::test]
async fn basic_mode_with_docker_and_skopeo() {
    clients_round_trip(Mode::Basic).await;
}

#[tokio::test]
async fn token_mode_with_docker_and_skopeo() {
    clients_round_trip(Mode::Token).await;
}

/// `podman login` to `host` as `login`, the password on stdin so it never reaches an argv.
fn podman_login(
    podman: &Podman,
    authfile: &Path,
    host: &str,
    (user, password): (&str, &str),
) -> Output {
    run_output_with_input(
        podman
            .podman()
            .args([
                "login",
                "--tls-verify=false",
                "--password-stdin",
                "--authfile",
            ])
            .arg(authfile)
            .args(["-u", user, host]),
        password.as_bytes(),
        Duration::from_secs(60),
    )
}

#[tokio::test]
async fn token_mode_with_podman() {
    let material = usual_material();
    let api = Api::start(&material, Mode::Token, "");
    let registry = &api.registry;
    let host = registry.host();
    let image = Image::generate(37, "amd64", &[200 * 1024]);
    let archive = docker_archive(registry, &image, "e2e/local:v1");
    let podman = Podman::new();
    let authfile = podman.dir().join("auth.json");
    let with_auth = |args: &[&str]| {
        let mut cmd = podman.podman();
        cmd.args(args).arg("--authfile").arg(&authfile);
        cmd
    };
    let local = podman.load(&archive);

    let failed = podman_login(&podman, &authfile, &host, MALLORY);
    assert!(
        !failed.status.success(),
        "podman login with a wrong password succeeded"
    );
    let logged_in = podman_login(&podman, &authfile, &host, ALICE);
    assert!(
        logged_in.status.success(),
        "podman login: {}",
        output_text(&logged_in)
    );

    let public = format!("{host}/public/podman:v1");
    let private = format!("{host}/team-a/podman:v1");
    for remote in [&public, &private] {
        run(with_auth(&["push", "--tls-verify=false", &local]).arg(format!("docker://{remote}")));
    }
    assert_refused(
        with_auth(&["push", "--tls-verify=false", &local])
            .arg(format!("docker://{host}/team-b/podman:v1")),
        "alice pushing to team-b with podman",
    );
    assert_eq!(api.tags_as_admin("team-b/podman").await, None);

    run(podman.podman().args(["rmi", "--all", "--force"]));
    run(&mut with_auth(&["logout", &host]));
    // Logged out: public content pulls, team-a does not.
    run(&mut with_auth(&["pull", "--tls-verify=false", &public]));
    assert_refused(
        &mut with_auth(&["pull", "--tls-verify=false", &private]),
        "anonymous podman pull of team-a",
    );
    // Bob may pull team-a.
    let bob = podman_login(&podman, &authfile, &host, BOB);
    assert!(
        bob.status.success(),
        "podman login as bob: {}",
        output_text(&bob)
    );
    run(&mut with_auth(&["pull", "--tls-verify=false", &private]));
    let id = run(podman
        .podman()
        .args(["image", "inspect", "--format", "{{.Id}}", &private]));
    assert_eq!(format!("sha256:{}", id.trim()), image.config.digest);

    api.assert_no_secrets(&basic_secrets(&[ALICE, BOB, MALLORY]))
        .await;
}

// ---------------------------------------------------------------------------------------------
// containerd: the OAuth2 password form of the token endpoint
// ---------------------------------------------------------------------------------------------

/// `POST /auth/token` with an OAuth2 form, as containerd sends it.
async fn oauth_token_reply(api: &Api, fields: &[(&str, &str)]) -> Reply {
    let response = api
        .client
        .post(format!("{}/auth/token", api.registry.url()))
        .form(fields)
        .send()
        .await
        .expect("POST /auth/token");
    Reply::read(Method::POST, "POST /auth/token (form)".into(), response).await
}

/// containerd with credentials asks for tokens with the OAuth2 password grant (`POST`), and
/// falls back to `GET` only for a few known registries: berth must answer the form.
#[tokio::test]
async fn containerd_uses_the_oauth_form_in_token_mode() {
    let material = usual_material();
    let api = Api::start(&material, Mode::Token, "");
    let image = small_image(71);
    api.push_as_admin("team-a/app", "v1", &image).await;

    let granted = oauth_token_reply(
        &api,
        &[
            ("grant_type", "password"),
            ("username", ALICE.0),
            ("password", ALICE.1),
            ("service", SERVICE),
            ("client_id", "containerd-client"),
            (
                "scope",
                "repository:team-a/app:pull,push repository:team-b/app:pull",
            ),
        ],
    )
    .await;
    granted.expect(200);
    let token = granted.json()["access_token"]
        .as_str()
        .expect("an access token")
        .to_string();
    assert_eq!(
        access_of(&token),
        [repo_access("team-a/app", &["pull", "push"])],
        "alice gets team-a, not team-b"
    );
    let wrong = [
        ("grant_type", "password"),
        ("username", ALICE.0),
        ("password", "not-her-password"),
        ("service", SERVICE),
        ("scope", "repository:team-a/app:pull"),
    ];
    oauth_token_reply(&api, &wrong)
        .await
        .expect_error(401, "UNAUTHORIZED");
    let refresh = [("grant_type", "refresh_token"), ("refresh_token", "x")];
    oauth_token_reply(&api, &refresh)
        .await
        .expect_error(400, "UNSUPPORTED");

    let containerd = Containerd::start();
    let host = api.registry.host();
    let app = format!("{host}/team-a/app:v1");
    let alice = format!("{}:{}", ALICE.0, ALICE.1);
    run(&mut containerd.pull(&app, &["--user", &alice]));
    assert_eq!(ctr_image_digest(&containerd, &app), image.manifest.digest);
    let copy = format!("{host}/team-a/ctr:v1");
    run(containerd.ctr().args(["images", "tag", &app, &copy]));
    run(containerd
        .ctr()
        .args(["images", "push", "--plain-http", "--user", &alice, &copy]));
    assert_eq!(api.tags_as_admin("team-a/ctr").await, tag_list(&["v1"]));
    let used_the_form = api.registry.log().lines().any(|line| {
        line.contains("method=POST") && line.contains("/auth/token") && line.contains("status=200")
    });
    assert!(
        used_the_form,
        "containerd should have used POST /auth/token:\n{}",
        api.registry.log()
    );

    let refused = format!("{host}/team-a/refused:v1");
    run(containerd.ctr().args(["images", "tag", &app, &refused]));
    let bad = format!("{}:not-her-password", ALICE.0);
    assert_refused(
        containerd
            .ctr()
            .args(["images", "push", "--plain-http", "--user", &bad, &refused]),
        "ctr push with a wrong password",
    );
    assert_eq!(api.tags_as_admin("team-a/refused").await, None);
}

/// Token mode over TLS: the challenge names an https realm on the host the client addressed;
/// skopeo logs in, pushes and pulls through it; curl fetches a token and the manifest over HTTP/2,
/// where the host comes from the `:authority` pseudo-header instead of `Host`.
#[tokio::test]
async fn token_mode_over_tls_and_http2() {
    let material = usual_material();
    let tls = Tls::generate(material.dir.path());
    let registry = Registry::start_tls_configured(tls.clone(), &material.config(Mode::Token, ""));
    let url = format!("{}/v2/team-a/app/manifests/v1", registry.url());
    let reply = send(&tls.client(), Method::GET, &url, &Cred::Anonymous, None).await;
    reply.expect(401);
    let realm = format!("https://{}/auth/token", registry.host());
    assert_eq!(
        reply.challenge(),
        format!(
            "Bearer realm=\"{realm}\",service=\"{SERVICE}\",scope=\"repository:team-a/app:pull\""
        )
    );

    let image = small_image(72);
    let layout = registry.scratch().join("tls-layout");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
    skopeo_push(&layout, &registry.host(), "team-a/app:v1", Some(ALICE));
    let pulled = skopeo_pull_digest(
        registry.scratch(),
        &registry.host(),
        "team-a/app:v1",
        Some(BOB),
    );
    assert_eq!(pulled, image.manifest.digest);

    let curl = |args: &[&str]| {
        run(Command::new(require_tool("curl"))
            .args(["-sS", "--fail", "--http2", "--cacert"])
            .arg(&tls.certificate)
            .args(args))
    };
    let token_url = format!("{realm}?service={SERVICE}&scope=repository:team-a/app:pull");
    let login = format!("{}:{}", BOB.0, BOB.1);
    let answer: Value =
        serde_json::from_str(&curl(&["-u", &login, &token_url])).expect("a token response");
    let bearer = format!(
        "Authorization: Bearer {}",
        answer["token"].as_str().expect("a token")
    );
    let served = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        "-H",
        &bearer,
        "-H",
        &format!("Accept: {OCI_MANIFEST}"),
        &url,
    ]);
    assert_eq!(served.trim(), "2 200");
    let log = registry.log();
    let over_http2 = |path: &str| {
        log.lines()
            .any(|l| l.contains("version=HTTP/2.0") && l.contains(path) && l.contains("status=200"))
    };
    assert!(over_http2("/auth/token"), "a token over HTTP/2:\n{log}");
    assert!(
        over_http2("/v2/team-a/app/manifests/v1"),
        "a manifest over HTTP/2:\n{log}"
    );
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
        let child = spawn_logged(
            Command::new(&binary).arg("serve").arg(&config),
            &dir.path().join("log"),
        );
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

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        print_log_on_panic("docker-registry", &self.log_path());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn distribution_accepts_berth_tokens() {
    let material = usual_material();
    let berth = Api::start(&material, Mode::Token, "");
    let distribution = Distribution::start(
        &format!("{}/auth/token", berth.registry.url()),
        &material.keys.certificate,
    );
    let client = &berth.client;
    let host = distribution.host();

    // distribution challenges for a token from berth.
    let challenge = get(
        client,
        &format!("{}/v2/public/app/tags/list", distribution.url()),
        &Cred::Anonymous,
    )
    .await;
    challenge.expect(401);
    assert!(
        challenge.challenge().starts_with(&format!(
            "Bearer realm=\"{}/auth/token\"",
            berth.registry.url()
        )),
        "{challenge}"
    );

    let image = Image::generate(41, "amd64", &[200 * 1024]);
    let scratch = berth.registry.scratch();
    let layout = scratch.join("layout");
    write_oci_layout(&layout, "v1", &image.manifest, &image.blobs());
    let issued = || {
        berth
            .registry
            .log()
            .lines()
            .filter(|l| l.contains("path=\"/auth/token\"") && l.contains("status=200"))
            .count()
    };
    let tokens_before = issued();
    skopeo_push(&layout, &host, "public/app:v1", Some(ALICE));
    assert_eq!(
        skopeo_pull_digest(scratch, &host, "public/app:v1", Some(ALICE)),
        image.manifest.digest
    );
    assert_eq!(
        skopeo_pull_digest(scratch, &host, "public/app:v1", None),
        image.manifest.digest,
        "an anonymous berth token pulls public content from distribution"
    );
    let tokens_after = issued();
    assert!(
        tokens_after >= tokens_before + 3,
        "skopeo must have fetched its tokens from berth (token requests logged: {tokens_before} then {tokens_after})"
    );

    // berth grants alice nothing in team-b, so distribution refuses her push there.
    assert_refused(
        &mut skopeo_copy_to(&layout, &host, "team-b/app:v1", Some(ALICE)),
        "alice pushing to team-b on distribution",
    );

    // A token for public/app works there, and nowhere else.
    let pull_app = berth
        .token(Some(ALICE), &["repository:public/app:pull"])
        .await;
    let (header, _) = jwt_parts(&pull_app);
    assert_eq!(header["alg"], "ES256");
    let manifest_url = |repo: &str| format!("{}/v2/{repo}/manifests/v1", distribution.url());
    let ok = get(
        client,
        &manifest_url("public/app"),
        &Cred::Bearer(pull_app.clone()),
    )
    .await;
    ok.expect(200);
    assert_eq!(sha256(&ok.body), image.manifest.digest);
    // Another repository, even one alice may pull from berth and that exists on distribution.
    skopeo_push(&layout, &host, "public/other:v1", Some(ALICE));
    for repo in ["public/other", "team-a/app", "team-b/app"] {
        let refused = get(client, &manifest_url(repo), &Cred::Bearer(pull_app.clone())).await;
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
        client,
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

/// `berth-registry htpasswd USER` is how provisioning (the BOSH job) writes logins: the password
/// comes on standard input, never in argv, and the line it prints is one the server accepts.
#[tokio::test]
async fn htpasswd_command_writes_a_login_the_server_accepts() {
    let material = Material::new(&[ADMIN], 4);
    let output = run_output_with_input(
        Command::new(env!("CARGO_BIN_EXE_berth-registry")).args(["htpasswd", ROBOT.0]),
        format!("{}\n", ROBOT.1).as_bytes(),
        Duration::from_secs(30),
    );
    assert!(output.status.success(), "{}", output_text(&output));
    let line = String::from_utf8(output.stdout).expect("text");
    assert!(line.starts_with(&format!("{}:$2b$", ROBOT.0)), "{line}");
    assert!(!line.contains(ROBOT.1), "the password itself was printed");
    let mut users = fs::read_to_string(&material.htpasswd).expect("read htpasswd");
    users.push_str(&line);
    fs::write(&material.htpasswd, users).expect("write htpasswd");

    let api = Api::start(&material, Mode::Basic, "");
    api.get("/v2/", &Cred::basic(ROBOT)).await.expect(200);
    api.get("/v2/", &Cred::Basic(ROBOT.0, MALLORY.1))
        .await
        .expect_basic_challenge();

    let refused = run_output_with_input(
        Command::new(env!("CARGO_BIN_EXE_berth-registry")).args(["htpasswd", "bad:name"]),
        b"a-password\n",
        Duration::from_secs(30),
    );
    assert!(!refused.status.success(), "a name with ':' was accepted");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("without ':'"),
        "{}",
        output_text(&refused)
    );
}

#[tokio::test]
async fn basic_mode_refuses_bad_credentials_and_writes_nothing() {
    let material = usual_material();
    let api = Api::start_traced(&material, Mode::Basic);
    let image = small_image(51);
    api.push_image(&Cred::basic(ALICE), "team-a/app", "v1", &image)
        .await;
    let manifest_v1 = "/v2/team-a/app/manifests/v1";

    // GET /v2/: a login is needed, and checked.
    api.get("/v2/", &Cred::Anonymous)
        .await
        .expect_basic_challenge();
    api.get("/v2/", &Cred::basic(ALICE)).await.expect(200);
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
        api.get("/v2/", &cred).await.expect_basic_challenge();
        api.get(manifest_v1, &cred).await.expect_basic_challenge();
    }

    // Wrong password, unknown user, anonymous: no upload starts, nothing is written.
    let other = small_image(52);
    let other_layer = &other.layers[0].blob;
    let digest = &image.manifest.digest;
    for cred in [
        Cred::Basic(ALICE.0, MALLORY.1),
        Cred::basic(MALLORY),
        Cred::Anonymous,
    ] {
        api.upload_blob(&cred, "team-a/app", other_layer)
            .await
            .expect_basic_challenge();
        api.put_manifest(&cred, "team-a/app", "v2", &image.manifest)
            .await
            .expect_basic_challenge();
        api.delete_manifest(&cred, "team-a/app", digest)
            .await
            .expect_basic_challenge();
    }
    // Known users outside their grants: 403 DENIED.
    api.put_manifest(&Cred::basic(BOB), "team-a/app", "v2", &image.manifest)
        .await
        .expect_error(403, "DENIED");
    api.delete_manifest(&Cred::basic(ALICE), "team-a/app", digest)
        .await
        .expect_error(403, "DENIED");
    api.upload_blob(&Cred::basic(ALICE), "team-b/app", other_layer)
        .await
        .expect_error(403, "DENIED");
    api.get("/v2/team-b/app/tags/list", &Cred::basic(ALICE))
        .await
        .expect_error(403, "DENIED");
    assert_eq!(api.tags_as_admin("team-a/app").await, tag_list(&["v1"]));
    assert_eq!(api.tags_as_admin("team-b/app").await, None);
    assert!(!api.blob_in_repo("team-a/app", &other_layer.digest).await);
    assert_eq!(api.admin_catalog().await, vec!["team-a/app".to_string()]);
    // The manifest was not deleted.
    api.get(manifest_v1, &Cred::basic(BOB)).await.expect(200);

    // Mounts: bob may push team-b but not read private; neither naming the source nor leaving
    // it out brings the blob over.
    let secret = small_image(53);
    api.push_as_admin("private/secret", "v1", &secret).await;
    let secret_layer = &secret.layers[0].blob.digest;
    let bob = Cred::basic(BOB);
    api.mount(&bob, "team-b/app", secret_layer, Some("private/secret"))
        .await
        .expect_error(403, "DENIED");
    api.expect_not_mounted(&bob, "team-b/app", secret_layer)
        .await;
    api.get(&format!("/v2/team-b/app/blobs/{secret_layer}"), &bob)
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    // A blob bob may pull (from team-a) does mount, with or without naming the source.
    let shared = &image.layers[0].blob.digest;
    api.expect_mounted(&bob, "team-b/app", shared, "team-a/app")
        .await;

    // An oversized Authorization header is refused without harm.
    let huge = Cred::Raw(format!("Basic {}", "QUFB".repeat(16 * 1024)));
    let reply = api.oversized_authorization(manifest_v1, &huge).await;
    if reply.status == 401 {
        reply.expect_basic_challenge();
    }
    api.get("/v2/", &Cred::basic(ALICE)).await.expect(200);

    let secrets = basic_secrets(&[ADMIN, ALICE, BOB, (ALICE.0, MALLORY.1), MALLORY]);
    api.assert_no_secrets(&secrets).await;
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
    let api = Api::start_traced(&material, Mode::Token);
    let image = small_image(61);
    api.push_as_admin("team-a/app", "v1", &image).await;
    let manifest_a = "/v2/team-a/app/manifests/v1";

    // A genuine token works, and tells the key id berth signs with.
    let genuine = api
        .token(Some(ALICE), &["repository:team-a/app:pull,push"])
        .await;
    assert_eq!(
        access_of(&genuine),
        vec![repo_access("team-a/app", &["pull", "push"])]
    );
    api.get(manifest_a, &Cred::Bearer(genuine.clone()))
        .await
        .expect(200);
    let (header, claims) = jwt_parts(&genuine);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(claims["iss"], SERVICE);
    assert_eq!(claims["aud"], SERVICE);
    assert_eq!(claims["sub"], ALICE.0);
    let kid = header["kid"].as_str().expect("a kid").to_string();
    // Claims of alice's on team-a, and berth's key with its kid to sign them.
    let all_on_a =
        json!([{ "type": "repository", "name": "team-a/app", "actions": ["pull", "push"] }]);
    let alice_claims =
        |audience: &str, exp: u64| claims_for(ALICE.0, audience, exp, all_on_a.clone());
    let sign = |claims: &Value| sign_es256(&material.keys.key, Some(&kid), claims);
    // A token crafted like berth's own is accepted: the refusals below are about what changed.
    let crafted = sign(&alice_claims(SERVICE, unix_now() + 300));
    api.get(manifest_a, &Cred::Bearer(crafted))
        .await
        .expect(200);

    let stranger = KeyPair::generate(material.dir.path(), "stranger");
    let valid_claims = alice_claims(SERVICE, unix_now() + 300);
    let expired = sign(&alice_claims(SERVICE, unix_now() - 3600));
    let other_audience = sign(&alice_claims("another-registry", unix_now() + 300));
    let mut other_issuer_claims = valid_claims.clone();
    other_issuer_claims["iss"] = json!("someone-else");
    let other_issuer = sign(&other_issuer_claims);
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
    let genuine_pull = api.token(Some(BOB), &["repository:team-a/app:pull"]).await;
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
        let reply = api.get(manifest_a, &cred).await;
        assert_eq!(reply.status, 401, "{what}: {reply}");
        reply.expect_bearer_challenge(Some("invalid_token"));
        let reply = api.upload_blob(&cred, "team-a/app", push_blob).await;
        assert_eq!(reply.status, 401, "{what}: {reply}");
        reply.expect_bearer_challenge(Some("invalid_token"));
        let reply = api.get("/v2/", &cred).await;
        assert_eq!(reply.status, 401, "{what}: {reply}");
    }
    assert!(
        !api.blob_in_repo("team-a/app", &push_blob.digest).await,
        "a forged token wrote a blob"
    );

    // The token endpoint: other services, wrong and unknown credentials.
    let pull_a = ["repository:team-a/app:pull"];
    api.token_reply(Some(ALICE), "another-registry", &pull_a)
        .await
        .expect(400);
    for basic in [(ALICE.0, MALLORY.1), MALLORY] {
        let reply = api.token_reply(Some(basic), SERVICE, &pull_a).await;
        reply.expect_error(401, "UNAUTHORIZED");
        assert!(reply.header("www-authenticate").is_some(), "{reply}");
        assert!(
            !String::from_utf8_lossy(&reply.body).contains("eyJ"),
            "{reply}"
        );
    }
    // Asking for more than the policy allows gets only what it allows.
    let bob = api
        .token(
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
    let anonymous = api
        .token(
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
    api.get(manifest_a, &Cred::Bearer(anonymous))
        .await
        .expect_bearer_challenge(Some("insufficient_scope"));

    // Basic credentials on the API count as none in token mode, even right ones.
    api.upload_blob(&Cred::basic(ADMIN), "team-a/app", push_blob)
        .await
        .expect_bearer_challenge(None);
    api.get(manifest_a, &Cred::basic(ALICE))
        .await
        .expect_bearer_challenge(None);

    // A pull token does not push.
    let pull_only = api.token(Some(ALICE), &pull_a).await;
    assert_eq!(
        access_of(&pull_only),
        vec![repo_access("team-a/app", &["pull"])]
    );
    let pull_cred = Cred::Bearer(pull_only.clone());
    api.get(manifest_a, &pull_cred).await.expect(200);
    api.upload_blob(&pull_cred, "team-a/app", push_blob)
        .await
        .expect_bearer_challenge(Some("insufficient_scope"));
    api.put_manifest(&pull_cred, "team-a/app", "v2", &image.manifest)
        .await
        .expect_bearer_challenge(Some("insufficient_scope"));
    let genuine_cred = Cred::Bearer(genuine.clone());
    api.delete_manifest(&genuine_cred, "team-a/app", &image.manifest.digest)
        .await
        .expect_bearer_challenge(Some("insufficient_scope"));

    // A token for one repository is worth nothing in another, even one the user may use.
    api.push_as_admin("public/app", "v1", &image).await;
    for repo in ["team-a/app2", "team-a", "team-a/app/sub", "public/app"] {
        api.upload_blob(&genuine_cred, repo, push_blob)
            .await
            .expect_bearer_challenge(Some("insufficient_scope"));
    }
    assert_eq!(api.tags_as_admin("team-a/app").await, tag_list(&["v1"]));
    for repo in ["team-a/app2", "team-a", "team-a/app/sub"] {
        assert_eq!(api.tags_as_admin(repo).await, None);
    }
    assert!(!api.blob_in_repo("public/app", &push_blob.digest).await);

    // Mounts. A blob only the admin may read, in private/secret.
    let secret = small_image(63);
    api.push_as_admin("private/secret", "v1", &secret).await;
    let secret_layer = &secret.layers[0].blob.digest;
    // Pull on team-a (alice's pull token) used to mount into public/app, where the token has
    // no push: refused, even though alice may push there.
    let a_layer = &image.layers[0].blob.digest;
    api.mount(&pull_cred, "public/mounted", a_layer, Some("team-a/app"))
        .await
        .expect_bearer_challenge(Some("insufficient_scope"));
    assert_eq!(api.tags_as_admin("public/mounted").await, None);
    assert!(!api.blob_in_repo("public/mounted", a_layer).await);
    // Bob's token: push on team-b, nothing on private/secret.
    let bob_cred = Cred::Bearer(bob.clone());
    api.mount(
        &bob_cred,
        "team-b/app",
        secret_layer,
        Some("private/secret"),
    )
    .await
    .expect_bearer_challenge(Some("insufficient_scope"));
    api.expect_not_mounted(&bob_cred, "team-b/app", secret_layer)
        .await;
    // With pull on the source in the token, the same kind of mount works: the refusals above
    // are about access, not about mounting.
    api.expect_mounted(&bob_cred, "team-b/app", a_layer, "team-a/app")
        .await;

    // An oversized bearer token is refused without harm.
    let huge = Cred::Raw(format!("Bearer {}", "A".repeat(64 * 1024)));
    api.oversized_authorization(manifest_a, &huge).await;
    api.get(manifest_a, &pull_cred).await.expect(200);

    let mut secrets = basic_secrets(&[ADMIN, ALICE, BOB, MALLORY, (ALICE.0, MALLORY.1)]);
    for t in [&genuine, &genuine_pull, &bob, &pull_only] {
        secrets.extend(token_secrets(t));
    }
    api.assert_no_secrets(&secrets).await;
}

impl Api {
    /// Pushes the repositories the catalog tests look at, as the administrator.
    async fn populate(&self) -> Image {
        let image = small_image(71);
        for repo in [
            "public/app",
            "team-a/app",
            "team-b/app",
            "cache/app/abc",
            "private/secret",
        ] {
            self.push_as_admin(repo, "v1", &image).await;
        }
        image
    }
}

const EVERY_REPOSITORY: [&str; 5] = [
    "cache/app/abc",
    "private/secret",
    "public/app",
    "team-a/app",
    "team-b/app",
];

/// Who sees what in the catalog of a [populated](Api::populate) registry: a name for messages,
/// the login, and the repositories listed.
const CATALOG_VIEWS: [(&str, (&str, &str), &[&str]); 4] = [
    ("admin", ADMIN, &EVERY_REPOSITORY),
    ("alice", ALICE, &["public/app", "team-a/app"]),
    ("bob", BOB, &["public/app", "team-a/app", "team-b/app"]),
    ("robot", ROBOT, &["cache/app/abc", "public/app"]),
];

/// The catalog needs a login: an anonymous caller is challenged, even where it may pull and list
/// tags, as in distribution, whose tokens grant `registry:catalog:*` to no anonymous caller.
#[track_caller]
fn assert_anonymous_catalog(reply: &Reply, challenge: Mode) {
    match challenge {
        Mode::Basic => {
            reply.expect_basic_challenge();
        }
        Mode::Token => {
            // Without a token, or with an anonymous one (then `error="insufficient_scope"`).
            reply.expect_error(401, "UNAUTHORIZED");
            let challenge = reply.challenge();
            assert!(challenge.starts_with("Bearer realm="), "{reply}");
            assert!(
                challenge.contains("scope=\"registry:catalog:*\""),
                "{reply}"
            );
        }
    }
}

#[tokio::test]
async fn basic_mode_catalog_shows_only_what_the_caller_may_list() {
    let material = usual_material();
    let api = Api::start(&material, Mode::Basic, "");
    let image = api.populate().await;

    let anonymous = api.catalog(&Cred::Anonymous, 100).await;
    assert_anonymous_catalog(&anonymous, Mode::Basic);
    // Unknown credentials are no way into the catalog either.
    api.get("/v2/_catalog", &Cred::basic(MALLORY))
        .await
        .expect_basic_challenge();

    for (who, user, repos) in CATALOG_VIEWS {
        for page in [1, 2, 100] {
            let reply = api.catalog(&Cred::basic(user), page).await;
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
    let manifest = "/v2/cache/app/abc/manifests/v1";
    let layer = format!("/v2/cache/app/abc/blobs/{}", image.layers[0].blob.digest);
    for cred in [
        Cred::Anonymous,
        Cred::basic(MALLORY),
        Cred::Basic(ALICE.0, MALLORY.1),
        Cred::basic(BOB),
    ] {
        let reply = api.get(manifest, &cred).await;
        reply.expect(200);
        assert_eq!(sha256(&reply.body), image.manifest.digest);
        api.get(&layer, &cred).await.expect(200);
        let tags = api.get("/v2/cache/app/abc/tags/list", &cred).await;
        match cred {
            Cred::Basic("bob", _) => tags.expect_error(403, "DENIED"),
            _ => tags.expect_basic_challenge(),
        };
    }
    // A name that is not there is just unknown, not a hint.
    api.get("/v2/cache/app/nope/manifests/v1", &Cred::Anonymous)
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    // Unknown credentials are no way into anything else, nor into pushing to the cache.
    for target in ["/v2/team-a/app/manifests/v1", "/v2/public/app/manifests/v1"] {
        api.get(target, &Cred::basic(MALLORY))
            .await
            .expect_basic_challenge();
    }
    let other = small_image(72);
    for cred in [Cred::basic(MALLORY), Cred::Anonymous] {
        api.upload_blob(&cred, "cache/app/abc", &other.config)
            .await
            .expect_basic_challenge();
    }
    assert!(
        !api.blob_in_repo("cache/app/abc", &other.config.digest)
            .await
    );
    // The public namespace lists for everyone.
    api.get("/v2/public/app/tags/list", &Cred::Anonymous)
        .await
        .expect(200);
}

#[tokio::test]
async fn token_mode_catalog_and_by_name_pulls() {
    let material = usual_material();
    let api = Api::start(&material, Mode::Token, "");
    let image = api.populate().await;

    // Anonymous: no catalog, with or without an (anonymous) token.
    let anonymous_token = api.token(None, &["registry:catalog:*"]).await;
    for cred in [Cred::Anonymous, Cred::Bearer(anonymous_token)] {
        let reply = api.catalog(&cred, 100).await;
        assert_anonymous_catalog(&reply, Mode::Token);
    }
    api.token_reply(Some(MALLORY), SERVICE, &["registry:catalog:*"])
        .await
        .expect_error(401, "UNAUTHORIZED");

    for (who, user, repos) in CATALOG_VIEWS {
        let catalog_token = api.token(Some(user), &["registry:catalog:*"]).await;
        for page in [1, 100] {
            let reply = api
                .catalog(&Cred::Bearer(catalog_token.clone()), page)
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
    let manifest = "/v2/cache/app/abc/manifests/v1";
    for basic in [None, Some(MALLORY), Some((ALICE.0, MALLORY.1))] {
        let pull = api.token(basic, &[scope]).await;
        assert_eq!(
            access_of(&pull),
            vec![repo_access("cache/app/abc", &["pull"])]
        );
        let (_, claims) = jwt_parts(&pull);
        assert_eq!(claims["sub"], "", "a lenient token is anonymous");
        let cred = Cred::Bearer(pull);
        let reply = api.get(manifest, &cred).await;
        reply.expect(200);
        assert_eq!(sha256(&reply.body), image.manifest.digest);
        api.get("/v2/cache/app/abc/tags/list", &cred)
            .await
            .expect_bearer_challenge(Some("insufficient_scope"));
        // Push is never granted that way.
        let push = api
            .token_reply(basic, SERVICE, &["repository:cache/app/abc:pull,push"])
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
            api.token_reply(basic, SERVICE, &[scope, "repository:team-a/app:pull"])
                .await
                .expect_error(401, "UNAUTHORIZED");
        }
    }
    // The right password gets the very same token there: nothing tells a right guess from a
    // wrong one, however often it is tried.
    let right = api.token(Some(ALICE), &[scope]).await;
    let wrong = api.token(Some((ALICE.0, MALLORY.1)), &[scope]).await;
    let (_, right) = jwt_parts(&right);
    let (_, wrong) = jwt_parts(&wrong);
    for claim in ["sub", "access", "aud", "iss"] {
        assert_eq!(right[claim], wrong[claim], "claim {claim}");
    }
    // Without any token, the by-name pull works too (the policy allows it), listing does not.
    api.get(manifest, &Cred::Anonymous).await.expect(200);
    for target in ["/v2/cache/app/abc/tags/list", "/v2/team-a/app/manifests/v1"] {
        api.get(target, &Cred::Anonymous)
            .await
            .expect_bearer_challenge(None);
    }
}

#[tokio::test]
async fn a_mount_without_from_takes_nothing_out_of_a_by_name_namespace() {
    for mode in [Mode::Basic, Mode::Token] {
        let material = usual_material();
        let api = Api::start(&material, mode, "");
        let cached = small_image(91);
        let public = small_image(92);
        api.push_as_admin("cache/app/abc", "v1", &cached).await;
        api.push_as_admin("public/base", "v1", &public).await;
        // Bob may push team-b; the cached layer's digest is all he knows of cache/app/abc.
        let bob = match mode {
            Mode::Basic => Cred::basic(BOB),
            Mode::Token => Cred::Bearer(
                api.token(Some(BOB), &["repository:team-b/app:pull,push"])
                    .await,
            ),
        };
        let cached_layer = &cached.layers[0].blob.digest;
        api.get(
            &format!("/v2/cache/app/abc/blobs/{cached_layer}"),
            &Cred::Anonymous,
        )
        .await
        .expect(200);
        api.expect_not_mounted(&bob, "team-b/app", cached_layer)
            .await;
        // A public (listed) repository's layers, and his own grants', do mount.
        let public_layer = &public.layers[0].blob.digest;
        api.mount(&bob, "team-b/app", public_layer, None)
            .await
            .expect(201);
        assert!(
            api.blob_in_repo("team-b/app", public_layer).await,
            "{mode:?}"
        );
    }
}

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

#[tokio::test]
async fn failed_logins_are_limited_per_user_and_address() {
    let material = usual_material();
    let extra = "  max_failures_per_minute: 5\n";
    let image = small_image(81);

    // Basic mode.
    let api = Api::start(&material, Mode::Basic, extra);
    api.push_image(&Cred::basic(ALICE), "public/app", "v1", &image)
        .await;
    for _ in 0..5 {
        api.get("/v2/", &Cred::Basic(ALICE.0, MALLORY.1))
            .await
            .expect_basic_challenge();
        api.get("/v2/", &Cred::basic(MALLORY))
            .await
            .expect_basic_challenge();
    }
    // Guessing stops for the names guessed at, from this address.
    for cred in [Cred::Basic(ALICE.0, MALLORY.1), Cred::basic(MALLORY)] {
        api.get("/v2/", &cred)
            .await
            .expect_error(429, "TOOMANYREQUESTS");
    }
    // Alice's own password, in use, still works; so does everyone else behind the same address.
    api.get("/v2/", &Cred::basic(ALICE)).await.expect(200);
    api.upload_blob(&Cred::basic(ALICE), "public/app", &small_image(82).config)
        .await
        .expect(201);
    api.get("/v2/", &Cred::basic(ADMIN)).await.expect(200);
    // Pulls that need no login are not held up.
    api.get("/v2/public/app/manifests/v1", &Cred::Anonymous)
        .await
        .expect(200);

    // Token mode: the token endpoint counts failures the same way.
    let api = Api::start(&material, Mode::Token, extra);
    let scope = ["repository:public/app:pull"];
    api.token(Some(ALICE), &scope).await;
    for _ in 0..5 {
        api.token_reply(Some((ALICE.0, MALLORY.1)), SERVICE, &scope)
            .await
            .expect_error(401, "UNAUTHORIZED");
    }
    api.token_reply(Some((ALICE.0, MALLORY.1)), SERVICE, &scope)
        .await
        .expect_error(429, "TOOMANYREQUESTS");
    api.token(Some(ALICE), &scope).await;
    api.token(Some(ADMIN), &scope).await;
    // Anonymous tokens still come.
    api.token(None, &scope).await;
}

#[tokio::test]
async fn unknown_users_take_as_long_to_refuse_as_wrong_passwords() {
    // The cost htpasswd uses by default and operators keep.
    let material = Material::new(&[ADMIN, ALICE], 10);
    let api = Api::start(&material, Mode::Basic, "");
    // Warm the connection pool up.
    api.get("/v2/", &Cred::Anonymous).await.expect(401);
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..10 {
        for (times, cred) in [
            (&mut known, Cred::Basic(ALICE.0, MALLORY.1)),
            (&mut unknown, Cred::basic(MALLORY)),
        ] {
            let started = Instant::now();
            api.get("/v2/", &cred).await.expect_basic_challenge();
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

    /// Reads one response, which must have `status`.
    #[track_caller]
    fn expect_response(&mut self, status: u16) -> RawResponse {
        let response = self.read_response();
        assert_eq!(
            response.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&response.body)
        );
        response
    }

    /// `GET /v2/` as `login`, which must be let in.
    #[track_caller]
    fn expect_logged_in(&mut self, login: (&str, &str)) {
        self.send_head("GET", "/v2/", &basic_authorization(login), 0);
        assert_eq!(self.read_response().status, 200);
    }
}

#[tokio::test]
async fn sighup_reloads_users_and_rules_without_dropping_connections() {
    let material = Material::new(&[ADMIN, ALICE], 4);
    let api = Api::start(&material, Mode::Basic, "");
    let registry = &api.registry;

    // Carol is unknown so far.
    api.get("/v2/", &Cred::basic(CAROL))
        .await
        .expect_basic_challenge();
    let blob = Blob::new(OCI_LAYER_GZIP, Rng::new(91).bytes(256 * 1024));

    // A kept-alive connection with a request in flight across the reload: alice uploads a blob
    // whose body is half sent when the signal arrives.
    let alice = basic_authorization(ALICE);
    let mut connection = KeepAlive::connect(registry);
    connection.expect_logged_in(ALICE);
    connection.send_head("POST", "/v2/public/hup/blobs/uploads/", &alice, 0);
    let started = connection.expect_response(202);
    let location = started.header("location").expect("a Location").to_string();
    let location = location
        .strip_prefix(&registry.url())
        .unwrap_or(&location)
        .to_string();
    let separator = if location.contains('?') { '&' } else { '?' };
    let target = format!("{location}{separator}digest={}", blob.digest);
    connection.send_head("PUT", &target, &alice, blob.size());
    let half = blob.size() / 2;
    connection.send_body(&blob.bytes[..half]);

    // Add carol, with push on public/carol, and reload.
    material.write_users(&[ADMIN, ALICE, CAROL], 4);
    let mut config = material.config(Mode::Basic, "");
    config = config.replace(
        "    - repositories: team-b\n",
        "    - repositories: public/carol\n      grants: { \"user:carol\": [push] }\n    - repositories: team-b\n",
    );
    registry.write_config(&config);
    assert!(registry.reload(), "the reload must succeed");

    // The request in flight completes, and the connection keeps serving.
    connection.send_body(&blob.bytes[half..]);
    connection.expect_response(201);
    connection.expect_logged_in(ALICE);
    // On the old connection too, the new user is known.
    connection.expect_logged_in(CAROL);
    assert!(api.blob_in_repo("public/hup", &blob.digest).await);

    // Carol logs in and pushes where the new rule lets her, and only there.
    let carol = Cred::basic(CAROL);
    api.get("/v2/", &carol).await.expect(200);
    let image = small_image(92);
    api.push_image(&carol, "public/carol", "v1", &image).await;
    api.upload_blob(&carol, "public/other", &image.config)
        .await
        .expect_error(403, "DENIED");

    // A broken configuration is refused and the running one kept.
    registry.write_config("auth:\n  mode: basic\n  htpasswd: /nonexistent/htpasswd\n");
    assert!(!registry.reload(), "a broken configuration must not load");
    api.get("/v2/", &carol).await.expect(200);
    api.get("/v2/", &Cred::Anonymous)
        .await
        .expect_basic_challenge();

    // Removing a user takes effect at once, remembered logins included.
    material.write_users(&[ADMIN, ALICE], 4);
    registry.write_config(&material.config(Mode::Basic, ""));
    assert!(registry.reload());
    api.get("/v2/", &carol).await.expect_basic_challenge();
    connection.expect_logged_in(ALICE);
}
