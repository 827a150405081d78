//! What every module shares: users, policy, the registry and its client, tokens, client commands.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::common::*;

/// Distinctive passwords, so that a leak into a log or metrics is found by a plain search.
pub(crate) const ADMIN: (&str, &str) = ("admin", "adm1n-Pw-5e1f0c9b");
pub(crate) const ALICE: (&str, &str) = ("alice", "al1ce-Pw-83b1d2f7");
pub(crate) const BOB: (&str, &str) = ("bob", "b0b-Pw-2c7a44e9");
pub(crate) const ROBOT: (&str, &str) = ("robot$cacher", "r0bot-Pw-9d0e11aa");
/// Added by the SIGHUP test.
pub(crate) const CAROL: (&str, &str) = ("carol", "car0l-Pw-61f2b3c4");
/// Credentials this registry does not know.
pub(crate) const MALLORY: (&str, &str) = ("mallory", "m4llory-Pw-0badc0de");
pub(crate) const SERVICE: &str = "berth-registry";

/// The access rules every test uses, under `auth:`. `admin` may do everything (via the platform
/// group); `alice` pushes to `public` and `team-a`; `bob` pulls `team-a` and pushes `team-b`; the
/// cacher robot pushes to `cache`, which anyone may pull by exact name only, even with credentials
/// this registry does not know; anyone may pull `public`; `private` is the admin's alone.
/// The platform group are `admins`, above every rule.
pub(crate) const POLICY: &str = r#"  groups: { platform: [admin] }
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
pub(crate) enum Mode {
    Basic,
    Token,
}

impl Mode {
    /// As `auth.mode` spells it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Basic => "basic",
            Mode::Token => "token",
        }
    }
}

/// The files the `auth:` section points at: an htpasswd file and the token signing key with its
/// self-signed certificate.
pub(crate) struct Material {
    pub(crate) dir: TempDir,
    pub(crate) htpasswd: PathBuf,
    pub(crate) keys: KeyPair,
}

impl Material {
    /// An htpasswd file with `users` at bcrypt `cost`, and a fresh signing key.
    pub(crate) fn new(users: &[(&str, &str)], cost: u32) -> Material {
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

    pub(crate) fn write_users(&self, users: &[(&str, &str)], cost: u32) {
        let lines: Vec<String> = users
            .iter()
            .map(|(user, password)| htpasswd_line(user, password, cost))
            .collect();
        fs::write(&self.htpasswd, lines.join("\n") + "\n").expect("write htpasswd");
    }

    /// A registry configuration in `mode` with [`POLICY`] and `extra` lines under `auth:`.
    pub(crate) fn config(&self, mode: Mode, extra: &str) -> String {
        format!(
            "auth:\n  mode: {}\n  htpasswd: {}\n{POLICY}  token:\n    signing_key: {}\n{extra}",
            mode.name(),
            self.htpasswd.display(),
            self.keys.key.display(),
        )
    }
}

/// The usual users at bcrypt cost 4 (the cheapest htpasswd makes), for tests not about timing.
pub(crate) fn usual_material() -> Material {
    Material::new(&[ADMIN, ALICE, BOB, ROBOT], 4)
}

/// What a request presents.
#[derive(Clone, Debug)]
pub(crate) enum Cred {
    Anonymous,
    Basic(&'static str, &'static str),
    Bearer(String),
    /// An `Authorization` header sent as is.
    Raw(String),
}

impl Cred {
    pub(crate) fn basic((user, password): (&'static str, &'static str)) -> Cred {
        Cred::Basic(user, password)
    }
}

/// `user:password` as Basic authentication encodes it.
pub(crate) fn basic_encoded((user, password): (&str, &str)) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// The `Authorization` header value of a Basic login.
pub(crate) fn basic_authorization(login: (&str, &str)) -> String {
    format!("Basic {}", basic_encoded(login))
}

/// The challenges and OCI errors access control answers with.
impl Reply {
    /// The first OCI error code of the body, if it has one.
    pub(crate) fn code(&self) -> Option<String> {
        let value: Value = serde_json::from_slice(&self.body).ok()?;
        value["errors"][0]["code"].as_str().map(str::to_string)
    }

    #[track_caller]
    pub(crate) fn expect_error(&self, status: u16, code: &str) -> &Reply {
        self.expect(status);
        assert_eq!(self.code().as_deref(), Some(code), "{self}");
        self
    }

    /// The `WWW-Authenticate` challenge, which every 401 must carry.
    #[track_caller]
    pub(crate) fn challenge(&self) -> &str {
        self.header("www-authenticate")
            .unwrap_or_else(|| panic!("a 401 without WWW-Authenticate: {self}"))
    }

    /// 401 UNAUTHORIZED with a Basic challenge.
    #[track_caller]
    pub(crate) fn expect_basic_challenge(&self) -> &Reply {
        self.expect_error(401, "UNAUTHORIZED");
        assert_eq!(self.challenge(), "Basic realm=\"berth-registry\"", "{self}");
        self
    }

    /// 401 UNAUTHORIZED with a Bearer challenge carrying `error` (none if `None`).
    #[track_caller]
    pub(crate) fn expect_bearer_challenge(&self, error: Option<&str>) -> &Reply {
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

pub(crate) async fn send(
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
pub(crate) fn cred_label(cred: &Cred) -> String {
    match cred {
        Cred::Anonymous => "anonymous".into(),
        Cred::Basic(user, _) => format!("Basic {user}"),
        Cred::Bearer(token) => format!("Bearer …{}", &token[token.len().saturating_sub(6)..]),
        Cred::Raw(value) => format!("Authorization of {} bytes", value.len()),
    }
}

pub(crate) async fn get(client: &reqwest::Client, url: &str, cred: &Cred) -> Reply {
    send(client, Method::GET, url, cred, None).await
}

pub(crate) fn b64url() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// The header and claims of a JWT (unverified).
pub(crate) fn jwt_parts(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts");
    let decode = |part: &str| -> Value {
        serde_json::from_slice(&b64url().decode(part).expect("base64url")).expect("JSON")
    };
    (decode(parts[0]), decode(parts[1]))
}

/// The `access` claim of a token as (type, name, sorted actions).
pub(crate) fn access_of(token: &str) -> Vec<(String, String, Vec<String>)> {
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

pub(crate) fn repo_access(name: &str, actions: &[&str]) -> (String, String, Vec<String>) {
    let mut actions: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
    actions.sort();
    ("repository".into(), name.into(), actions)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

pub(crate) fn repositories(reply: &Reply) -> Vec<String> {
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
pub(crate) fn tag_list(tags: &[&str]) -> Option<Vec<String>> {
    Some(tags.iter().map(|t| t.to_string()).collect())
}

/// A small image of one layer.
pub(crate) fn small_image(seed: u64) -> Image {
    Image::generate(seed, "amd64", &[3 * 1024])
}

/// A registry with access control, the mode it runs in, and a client for it.
pub(crate) struct Api {
    pub(crate) registry: Registry,
    pub(crate) client: reqwest::Client,
    mode: Mode,
}

impl Api {
    /// A registry in `mode` with `material`'s files, [`POLICY`] and `extra` lines under `auth:`.
    pub(crate) fn start(material: &Material, mode: Mode, extra: &str) -> Api {
        let registry = Registry::start_with_config(&material.config(mode, extra));
        Api::serving(registry, mode)
    }

    /// Like [`Api::start`], logging at trace level, where a leaked secret would show first.
    pub(crate) fn start_traced(material: &Material, mode: Mode) -> Api {
        let config = material.config(mode, "");
        let registry = Registry::start_configured(&config, &[("BERTH_LOG", "trace")]);
        Api::serving(registry, mode)
    }

    pub(crate) fn serving(registry: Registry, mode: Mode) -> Api {
        Api {
            registry,
            client: http_client(),
            mode,
        }
    }

    /// `method target`, `target` being a path of the registry such as `/v2/`.
    pub(crate) async fn send(
        &self,
        method: Method,
        target: &str,
        cred: &Cred,
        body: Option<(&str, Vec<u8>)>,
    ) -> Reply {
        let url = absolute(&self.registry, target);
        send(&self.client, method, &url, cred, body).await
    }

    pub(crate) async fn get(&self, target: &str, cred: &Cred) -> Reply {
        self.send(Method::GET, target, cred, None).await
    }

    /// A POST without a body: it starts an upload, or mounts a blob.
    pub(crate) async fn post(&self, target: &str, cred: &Cred) -> Reply {
        self.send(Method::POST, target, cred, None).await
    }

    /// Asks to mount blob `digest` into `repo`, naming the repository it comes `from` if given.
    pub(crate) async fn mount(
        &self,
        cred: &Cred,
        repo: &str,
        digest: &str,
        from: Option<&str>,
    ) -> Reply {
        let mut target = format!("/v2/{repo}/blobs/uploads/?mount={digest}");
        if let Some(from) = from {
            target.push_str(&format!("&from={from}"));
        }
        self.post(&target, cred).await
    }

    /// Mounts blob `digest` into `repo` from `from`, which `cred` may pull: it is there at once.
    pub(crate) async fn expect_mounted(&self, cred: &Cred, repo: &str, digest: &str, from: &str) {
        self.mount(cred, repo, digest, Some(from)).await.expect(201);
        assert!(self.blob_in_repo(repo, digest).await, "{digest} in {repo}");
    }

    /// Asks to mount blob `digest` into `repo` without naming a source, where `cred` may not
    /// pull it: an upload session is offered instead, and the blob stays out.
    pub(crate) async fn expect_not_mounted(&self, cred: &Cred, repo: &str, digest: &str) {
        self.mount(cred, repo, digest, None).await.expect(202);
        assert!(
            !self.blob_in_repo(repo, digest).await,
            "a mount brought a blob the caller may not pull into {repo}"
        );
    }

    /// `GET target` with `huge`, a 64 KiB `Authorization` header: refused without harm, as
    /// unauthorized or as too large.
    pub(crate) async fn oversized_authorization(&self, target: &str, huge: &Cred) -> Reply {
        let reply = self.get(target, huge).await;
        assert!(
            reply.status == 401 || reply.status == 431,
            "64 KiB Authorization: {reply}"
        );
        reply
    }

    pub(crate) async fn put_manifest(
        &self,
        cred: &Cred,
        repo: &str,
        tag: &str,
        manifest: &Blob,
    ) -> Reply {
        let target = format!("/v2/{repo}/manifests/{tag}");
        let body = Some((OCI_MANIFEST, manifest.bytes.clone()));
        self.send(Method::PUT, &target, cred, body).await
    }

    pub(crate) async fn delete_manifest(&self, cred: &Cred, repo: &str, digest: &str) -> Reply {
        let target = format!("/v2/{repo}/manifests/{digest}");
        self.send(Method::DELETE, &target, cred, None).await
    }

    /// `GET /auth/token` with `scope`s, Basic `basic` credentials if given and `service`.
    pub(crate) async fn token_reply(
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
    pub(crate) async fn token(
        &self,
        basic: Option<(&'static str, &'static str)>,
        scopes: &[&str],
    ) -> String {
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
    pub(crate) async fn admin_on(&self, repo: &str) -> Cred {
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
    pub(crate) async fn upload_blob(&self, cred: &Cred, repo: &str, blob: &Blob) -> Reply {
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
    pub(crate) async fn push_image(&self, cred: &Cred, repo: &str, tag: &str, image: &Image) {
        for blob in image.blobs() {
            self.upload_blob(cred, repo, blob).await.expect(201);
        }
        self.put_manifest(cred, repo, tag, &image.manifest)
            .await
            .expect(201);
    }

    /// Pushes `image` as `repo:tag` as the administrator.
    pub(crate) async fn push_as_admin(&self, repo: &str, tag: &str, image: &Image) {
        let cred = self.admin_on(repo).await;
        self.push_image(&cred, repo, tag, image).await;
    }

    /// The tags of `repo` as the administrator sees them; `None` if the repository does not exist.
    pub(crate) async fn tags_as_admin(&self, repo: &str) -> Option<Vec<String>> {
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
    pub(crate) async fn blob_in_repo(&self, repo: &str, digest: &str) -> bool {
        let cred = self.admin_on(repo).await;
        let target = format!("/v2/{repo}/blobs/{digest}");
        let reply = self.send(Method::HEAD, &target, &cred, None).await;
        assert!(matches!(reply.status, 200 | 404), "{reply}");
        reply.status == 200
    }

    /// Every repository of the catalog `cred` sees, following `Link` pages of `page_size`.
    pub(crate) async fn catalog(&self, cred: &Cred, page_size: u32) -> Reply {
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
    pub(crate) async fn admin_catalog(&self) -> Vec<String> {
        let cred = match self.mode {
            Mode::Basic => Cred::basic(ADMIN),
            Mode::Token => Cred::Bearer(self.token(Some(ADMIN), &["registry:catalog:*"]).await),
        };
        let reply = self.catalog(&cred, 100).await;
        reply.expect(200);
        repositories(&reply)
    }

    /// Asserts that none of `secrets` appears in the server log or in `/metrics`.
    pub(crate) async fn assert_no_secrets(&self, secrets: &[String]) {
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
pub(crate) fn basic_secrets(logins: &[(&str, &str)]) -> Vec<String> {
    logins
        .iter()
        .flat_map(|&(user, password)| [password.to_string(), basic_encoded((user, password))])
        .collect()
}

/// The secrets in a token: all of it, and its signature alone.
pub(crate) fn token_secrets(token: &str) -> Vec<String> {
    let signature = token.rsplit('.').next().expect("a signature").to_string();
    vec![token.to_string(), signature]
}

pub(crate) fn output_text(output: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Whether a client's output says the registry refused it (401 or 403, in any client's words).
pub(crate) fn is_refusal(output: &str) -> bool {
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
pub(crate) fn run_failing(cmd: &mut Command) -> String {
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
pub(crate) fn assert_refused(cmd: &mut Command, what: &str) {
    let refused = run_failing(cmd);
    assert!(is_refusal(&refused), "{what}: {refused}");
}

pub(crate) fn skopeo_copy_to(
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
pub(crate) fn skopeo_push(layout: &Path, host: &str, repo_tag: &str, creds: Option<(&str, &str)>) {
    run(&mut skopeo_copy_to(layout, host, repo_tag, creds));
}

pub(crate) fn skopeo_copy_from(
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
pub(crate) fn skopeo_pull_digest(
    scratch: &Path,
    host: &str,
    repo_tag: &str,
    creds: Option<(&str, &str)>,
) -> String {
    let out = scratch.join(format!("pulled-{}", uuid::Uuid::new_v4().simple()));
    run(&mut skopeo_copy_from(host, repo_tag, creds, &out));
    read_layout_ref(&out, "v1").1
}

impl Api {
    /// Pushes the repositories the catalog tests look at, as the administrator.
    pub(crate) async fn populate(&self) -> Image {
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

pub(crate) const EVERY_REPOSITORY: [&str; 5] = [
    "cache/app/abc",
    "private/secret",
    "public/app",
    "team-a/app",
    "team-b/app",
];
