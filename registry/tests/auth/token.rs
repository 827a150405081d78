//! Token mode: forged, expired and misused tokens are refused; tokens grant only what policy does.

use std::fs;
use std::path::Path;

use base64::Engine;
use serde_json::{Value, json};

use crate::common::*;
use crate::support::*;

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
