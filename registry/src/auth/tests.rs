//! Authorization decisions end to end: modes, challenges, tokens and the policy together.

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    auth: Auth,
}

async fn fixture(mode: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let entries: String = [
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("robot$cacher", "robot-pw"),
    ]
    .iter()
    .map(|(user, password)| format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap()))
    .collect();
    std::fs::write(&htpasswd, entries).unwrap();
    let yaml = format!(
        r#"
mode: {mode}
htpasswd: {htpasswd}
max_failures_per_minute: 3
access:
  - repositories: team
    grants: {{ "user:alice": [push], "user:bob": [pull] }}
  - repositories: cache
    anonymous: by-name
    foreign_credentials_as_anonymous: true
    grants: {{ "robot:cacher": [push] }}
  - repositories: public
    anonymous: pull
"#,
        htpasswd = htpasswd.display()
    );
    let config: AuthConfig = serde_norway::from_str(&yaml).unwrap();
    Fixture {
        _dir: dir,
        auth: Auth::load(&config).await.unwrap(),
    }
}

fn basic(user: &str, password: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    headers.insert(
        header::AUTHORIZATION,
        format!("Basic {value}").parse().unwrap(),
    );
    headers
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    headers
}

fn info(headers: &HeaderMap) -> RequestInfo<'_> {
    RequestInfo {
        headers,
        host: Some("registry.test:5000"),
        peer: Some(IpAddr::from([192, 0, 2, 1])),
        secure: true,
        client_certificates: None,
    }
}

fn repo(name: &str) -> RepoName {
    name.parse().unwrap()
}

fn challenge(err: &RegistryError) -> String {
    match err {
        RegistryError::Unauthorized { challenge, .. } => challenge.to_str().unwrap().to_owned(),
        other => panic!("expected UNAUTHORIZED, got {other:?}"),
    }
}

#[tokio::test]
async fn basic_mode_challenges_denies_and_lets_foreign_credentials_pull_the_cache() {
    let f = fixture("basic").await;
    let team = repo("team/app");
    let push = [Need::Repository(&team, Actions::PUSH)];
    let none = HeaderMap::new();
    let err = f.auth.authorize(&info(&none), &push).await.err().unwrap();
    assert_eq!(challenge(&err), r#"Basic realm="berth-registry""#);
    assert!(
        f.auth
            .authorize(&info(&basic("alice", "alice-pw")), &push)
            .await
            .is_ok()
    );
    let bob = f
        .auth
        .authorize(&info(&basic("bob", "bob-pw")), &push)
        .await;
    assert!(matches!(bob, Err(RegistryError::Denied)));
    assert!(matches!(
        f.auth
            .authorize(&info(&basic("alice", "wrong")), &push)
            .await,
        Err(RegistryError::Unauthorized { .. })
    ));

    let cached = repo("cache/app/0123abcd");
    let pull = [Need::Repository(&cached, Actions::PULL)];
    let origin = basic("dockerhub-user", "dockerhub-pw");
    let grant = f.auth.authorize(&info(&origin), &pull).await.unwrap();
    assert!(
        !grant.allows(&cached, Actions::LIST),
        "by-name repositories are never listed"
    );
    let cache_push = [Need::Repository(&cached, Actions::PUSH)];
    assert!(f.auth.authorize(&info(&origin), &cache_push).await.is_err());
    assert!(
        f.auth
            .authorize(&info(&basic("robot$cacher", "robot-pw")), &cache_push)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn basic_mode_turns_away_a_user_at_an_address_after_too_many_failures() {
    let f = fixture("basic").await;
    let team = repo("team/app");
    let pull = [Need::Repository(&team, Actions::PULL)];
    assert!(
        f.auth
            .authorize(&info(&basic("alice", "alice-pw")), &pull)
            .await
            .is_ok()
    );
    for _ in 0..3 {
        assert!(matches!(
            f.auth
                .authorize(&info(&basic("alice", "guess")), &pull)
                .await,
            Err(RegistryError::Unauthorized { .. })
        ));
    }
    assert!(matches!(
        f.auth
            .authorize(&info(&basic("alice", "guess")), &pull)
            .await,
        Err(RegistryError::TooManyRequests)
    ));
    // Her password, in use, is never refused; nor is anyone else at the same address.
    for (user, password) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
        assert!(
            f.auth
                .authorize(&info(&basic(user, password)), &pull)
                .await
                .is_ok(),
            "{user}"
        );
    }
}

#[tokio::test]
async fn token_mode_issues_only_what_the_policy_allows() {
    let f = fixture("token").await;
    let team = repo("team/app");
    let none = HeaderMap::new();
    let push = [Need::Repository(&team, Actions::PUSH)];
    let err = f.auth.authorize(&info(&none), &push).await.err().unwrap();
    assert_eq!(
        challenge(&err),
        r#"Bearer realm="https://registry.test:5000/auth/token",service="berth-registry",scope="repository:team/app:pull,push""#
    );

    let scope = vec!["repository:team/app:pull,push".to_owned()];
    let issued = f
        .auth
        .issue_token(
            &info(&none),
            TokenCredentials::Password {
                user: "bob".into(),
                password: "bob-pw".into(),
            },
            Some("berth-registry"),
            &scope,
        )
        .await
        .unwrap();
    let bob = bearer(&issued.token);
    let pull = [Need::Repository(&team, Actions::PULL)];
    assert!(f.auth.authorize(&info(&bob), &pull).await.is_ok());
    let err = f.auth.authorize(&info(&bob), &push).await.err().unwrap();
    assert!(challenge(&err).ends_with(r#",error="insufficient_scope""#));
    let public = repo("public/tool");
    let public_pull = [Need::Repository(
        &public,
        Actions::PULL.union(Actions::LIST),
    )];
    assert!(
        f.auth.authorize(&info(&bob), &public_pull).await.is_ok(),
        "a token for one repository still reads what anyone may read"
    );
    let other = repo("team/other");
    assert!(
        f.auth
            .authorize(&info(&bob), &[Need::Repository(&other, Actions::PULL)])
            .await
            .is_err()
    );

    // Wrong credentials get nothing, unless all they ask is a pull from the lenient cache.
    assert!(
        f.auth
            .issue_token(
                &info(&none),
                TokenCredentials::from_headers(&basic("bob", "nope")),
                None,
                &scope
            )
            .await
            .is_err()
    );
    let cache_scope = vec!["repository:cache/app/0123abcd:pull".to_owned()];
    let anonymous = f
        .auth
        .issue_token(
            &info(&none),
            TokenCredentials::from_headers(&basic("bob", "nope")),
            None,
            &cache_scope,
        )
        .await
        .unwrap();
    let cached = repo("cache/app/0123abcd");
    let grant = f
        .auth
        .authorize(
            &info(&bearer(&anonymous.token)),
            &[Need::Repository(&cached, Actions::PULL)],
        )
        .await
        .unwrap();
    assert!(!grant.allows(&cached, Actions::LIST));
    assert!(
        f.auth
            .issue_token(
                &info(&none),
                TokenCredentials::from_headers(&none),
                Some("elsewhere"),
                &scope
            )
            .await
            .is_err()
    );
}

#[tokio::test]
async fn broken_tokens_are_invalid_not_insufficient() {
    let f = fixture("token").await;
    let team = repo("team/app");
    let err = f
        .auth
        .authorize(
            &info(&bearer("not.a.jwt")),
            &[Need::Repository(&team, Actions::PULL)],
        )
        .await
        .err()
        .unwrap();
    assert!(challenge(&err).ends_with(r#",error="invalid_token""#));
    let mut huge = HeaderMap::new();
    huge.insert(
        header::AUTHORIZATION,
        format!("Bearer {}", "a".repeat(20_000)).parse().unwrap(),
    );
    assert!(matches!(
        f.auth.authorize(&info(&huge), &[Need::Login]).await,
        Err(RegistryError::Unauthorized { .. })
    ));
}

/// The parsers of what any client may send to access control: never a panic, and only what the
/// input spells.
mod properties {
    use proptest::prelude::*;

    use super::super::token::{SigningKey, TokenVerifier};
    use super::super::{Presented, TokenConfig, parse_scopes, presented};
    use axum::http::{HeaderMap, HeaderValue, header};
    use base64::Engine;

    const CASES: u32 = 100_000;

    fn scope() -> impl Strategy<Value = String> {
        prop_oneof![
            "(repository|registry|plugin):[a-z0-9/:._-]{0,24}:[a-z*,]{0,16}",
            "[ -~]{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn any_scope_list_yields_only_what_it_spells(
            scopes in prop::collection::vec(scope(), 0..4),
        ) {
            for parsed in parse_scopes(&scopes) {
                let spelled = format!("{}:{}:{}", parsed.kind, parsed.name, parsed.actions.join(","));
                prop_assert!(
                    scopes.iter().any(|s| s.split_whitespace().any(|w| w == spelled)),
                    "{spelled:?} from {scopes:?}"
                );
            }
        }

        #[test]
        fn any_authorization_header_is_nothing_basic_bearer_or_malformed(
            value in prop_oneof![
                "(Basic|basic|Bearer|bearer|Digest|) {0,2}[ -~]{0,80}",
                ".{0,40}".prop_map(|pair| format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )),
            ],
        ) {
            let Ok(value) = HeaderValue::from_str(&value) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.clone());
            match presented(&headers) {
                Presented::Basic { user, password } => {
                    let text = value.to_str().unwrap();
                    prop_assert!(text[..5].eq_ignore_ascii_case("basic"));
                    prop_assert!(!(user.is_empty() && password.is_empty()));
                }
                Presented::Bearer(token) => prop_assert!(!token.is_empty()),
                Presented::Nothing | Presented::Malformed => {}
            }
        }
    }

    #[test]
    fn any_bearer_token_from_nowhere_is_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let verifier = TokenVerifier::new(
            std::sync::Arc::new(SigningKey::generate()),
            &TokenConfig::default(),
        )
        .unwrap();
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        let token = prop_oneof![
            "[A-Za-z0-9_.=-]{0,120}",
            ("[ -~]{0,40}", "[ -~]{0,60}", "[A-Za-z0-9_-]{0,40}")
                .prop_map(move |(h, p, s)| format!("{}.{}.{s}", b64(&h), b64(&p))),
            ("(ES256|RS256|none|HS256)", "[ -~]{0,20}").prop_map(move |(alg, iss)| {
                let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
                let claims = format!(r#"{{"iss":"{iss}","sub":"x","exp":9999999999}}"#);
                format!("{}.{}.c2ln", b64(&header), b64(&claims))
            }),
        ];
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(CASES));
        runner
            .run(&token, |token| {
                prop_assert!(
                    runtime.block_on(verifier.verify(&token)).is_err(),
                    "{token}"
                );
                Ok(())
            })
            .unwrap();
    }
}
