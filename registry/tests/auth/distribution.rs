//! CNCF distribution trusts the tokens berth issues, and only for what they grant.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use reqwest::Method;
use tempfile::TempDir;

use crate::common::*;
use crate::support::*;

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
