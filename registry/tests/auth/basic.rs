//! Basic mode: `berth-registry htpasswd` logins; bad credentials and denied grants write nothing.

use std::fs;
use std::process::Command;
use std::time::Duration;

use base64::Engine;

use crate::common::*;
use crate::support::*;

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
