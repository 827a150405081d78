//! Limits on failed logins, and unknown users refused as slowly as wrong passwords.

use std::time::Instant;

use crate::support::*;

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
