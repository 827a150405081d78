//! Real clients in Basic and token mode: docker, skopeo, podman, containerd's ctr, curl over TLS.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::common::*;
use crate::support::*;

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
