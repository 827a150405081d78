//! The catalog lists only what the caller may list; the by-name namespace is pulled, never listed.

use crate::common::*;
use crate::support::*;

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
