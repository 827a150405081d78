use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_oci::{Digest, RepoName, Tag};
use serde_json::json;

use super::*;
use crate::metadata::behaviour::{manifest, push_blob};
use crate::metadata::{MetadataStore, SqliteMetadataStore};

const APP_A: &str = "0c8f8c36-6b0e-4d3a-9d5e-5f0f1b9e2a01";
const APP_B: &str = "7a1d2e3f-4b5c-4d6e-8f90-a1b2c3d4e5f6";

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
}

fn tagged(
    repo: &str,
    tag: &str,
    body: &str,
    tagged_at: u64,
    pulled: Option<u64>,
) -> TaggedManifest {
    TaggedManifest {
        repo: repo.parse().unwrap(),
        tag: tag.parse().unwrap(),
        digest: Digest::sha256_of(body.as_bytes()),
        tagged_at: at(tagged_at),
        pulled_at: pulled.map(at),
    }
}

fn expired_tags(plan: &Plan) -> Vec<String> {
    let mut tags: Vec<_> = plan
        .expiries
        .iter()
        .map(|e| format!("{}:{}", e.tag.repo, e.tag.tag))
        .collect();
    tags.sort();
    tags
}

#[test]
fn patterns_match_like_shell_globs() {
    for (pattern, text) in [
        ("*", "anything"),
        ("*", ""),
        ("release-*", "release-1.2"),
        ("v?.*", "v1.0"),
        ("*-rc*", "2.0-rc1"),
        ("a*b*c", "aXXbYYc"),
        ("exact", "exact"),
    ] {
        assert!(glob(pattern, text), "{pattern} should match {text}");
    }
    for (pattern, text) in [
        ("release-*", "pre-release-1"),
        ("v?", "v10"),
        ("a*b*c", "aXXbYY"),
        ("exact", "exact2"),
        ("?", ""),
    ] {
        assert!(!glob(pattern, text), "{pattern} should not match {text}");
    }
}

#[test]
fn droplet_images_are_read_as_docker_reads_references() {
    let mut in_use = InUse::default();
    in_use.add("registry.example.com:8443/cache/guid/abc@sha256:0123");
    in_use.add("localhost/team/app:v2");
    in_use.add("10.0.0.4:5000/plain");
    in_use.add("library/ubuntu");
    in_use.add("host.example/x/y:tag@sha256:4567");
    assert!(in_use.names("cache/guid/abc", "sha256:0123"));
    assert!(
        !in_use.names("cache/guid/abc", "latest"),
        "pinned by digest only"
    );
    assert!(in_use.names("team/app", "v2"));
    assert!(in_use.names("plain", "latest"));
    assert!(in_use.names("library/ubuntu", "latest"));
    assert!(in_use.names("x/y", "tag") && in_use.names("x/y", "sha256:4567"));
    assert!(!in_use.names("registry.example.com:8443/cache/guid/abc", "sha256:0123"));
}

#[test]
fn each_app_keeps_its_newest_stagings_and_those_pulled_lately() {
    let (a, b) = (format!("cache/{APP_A}/r1"), format!("cache/{APP_B}/r2"));
    let a_other = format!("cache/{APP_A}/r9");
    let tags = vec![
        // App A: five stagings over two repositories, one of them tagged twice.
        tagged(&a, "s5", "a5", 500, None),
        tagged(&a, "s4", "a4", 400, None),
        tagged(&a_other, "s3", "a3", 300, None),
        tagged(&a, "s2", "a2", 200, Some(86_400 * 40)),
        tagged(&a, "s1", "a1", 100, None),
        tagged(&a, "s1-again", "a1", 90, None),
        tagged(&a, "s0", "a0", 50, Some(10)),
        // App B: two stagings, both within the newest three.
        tagged(&b, "s2", "b2", 600, None),
        tagged(&b, "s1", "b1", 100, None),
        // Not an app's staging repository.
        tagged("cache/loose", "x", "loose", 1, None),
        tagged("other/app", "x", "other", 1, None),
    ];
    let cache = CacheRetention::default();
    // Forty-five days in: a2's pull (day 40) is within 30 days, a0's is not.
    let now = at(86_400 * 45);
    let plan = plan_cache(&tags, &cache, now, at(1000), &InUse::default());
    assert_eq!(plan.stagings, 2, "{:?}", expired_tags(&plan));
    assert_eq!(
        expired_tags(&plan),
        [
            format!("{a}:s0"),
            format!("{a}:s1"),
            format!("{a}:s1-again")
        ]
    );
    assert!(
        plan.expiries
            .iter()
            .all(|e| e.pulled_before == Some(now - DAY * 30))
    );

    // Pushed within the grace period: kept, however many are newer.
    let young = plan_cache(&tags, &cache, now, at(0), &InUse::default());
    assert_eq!(young.stagings, 0);

    // A droplet naming a staging by digest keeps it.
    let mut in_use = InUse::default();
    in_use.add(&format!(
        "berth.internal:443/{a}@{}",
        Digest::sha256_of(b"a1")
    ));
    let plan = plan_cache(&tags, &cache, now, at(1000), &in_use);
    assert_eq!(expired_tags(&plan), [format!("{a}:s0")]);

    // Fewer to keep.
    let one = CacheRetention {
        keep_stagings: 1,
        ..CacheRetention::default()
    };
    let plan = plan_cache(&tags, &one, now, at(1000), &InUse::default());
    assert_eq!(plan.stagings, 5, "{:?}", expired_tags(&plan));
    assert!(expired_tags(&plan).contains(&format!("{b}:s1")));
}

#[test]
fn rules_expire_what_no_rule_keeps_and_leave_the_cache_alone() {
    let tags = vec![
        tagged("team/web", "release-4", "w4", 400, None),
        tagged("team/web", "release-3", "w3", 300, None),
        tagged("team/web", "dev", "wd", 250, None),
        tagged("team/web", "release-2", "w2", 200, Some(86_400 * 9)),
        tagged("team/web", "release-1", "w1", 100, None),
        tagged("team/api", "release-1", "a1", 100, None),
        tagged("teamster/x", "release-1", "t1", 100, None),
        tagged(&format!("cache/{APP_A}/r"), "release-1", "c1", 100, None),
    ];
    let now = at(86_400 * 10);
    let rules = [RetentionRule {
        repositories: "team".into(),
        tags: "release-*".into(),
        keep_last: Some(1),
        pulled_within_days: None,
    }];
    let plan = plan_rules(&tags, &rules, None, now, at(1000), &InUse::default());
    assert_eq!(
        expired_tags(&plan),
        [
            "team/web:release-1",
            "team/web:release-2",
            "team/web:release-3"
        ]
    );
    assert!(plan.expiries.iter().all(|e| e.pulled_before.is_none()));

    // A second rule keeping what was pulled within two days saves release-2 (pulled on day 9);
    // what it covers and no rule keeps goes too (team/api's only release stays by the first).
    let both = [
        rules[0].clone(),
        RetentionRule {
            repositories: "*".into(),
            tags: "*".into(),
            keep_last: None,
            pulled_within_days: Some(2),
        },
    ];
    let cache = "cache".to_owned();
    let plan = plan_rules(&tags, &both, Some(&cache), now, at(1000), &InUse::default());
    assert_eq!(
        expired_tags(&plan),
        [
            "team/web:dev",
            "team/web:release-1",
            "team/web:release-3",
            "teamster/x:release-1",
        ]
    );
    let release_3 = plan
        .expiries
        .iter()
        .find(|e| e.tag.tag.as_str() == "release-3")
        .unwrap();
    assert_eq!(release_3.pulled_before, Some(now - DAY * 2));
}

#[test]
fn configuration_is_checked() {
    let parse = |yaml: &str| {
        serde_norway::from_str::<RetentionConfig>(yaml)
            .unwrap()
            .check()
    };
    assert!(parse("{}").is_ok());
    assert!(parse("cache:\n  keep_stagings: 0\n").is_err());
    assert!(parse("cache:\n  namespace: 'Bad Name'\n").is_err());
    assert!(parse("pull_flush_seconds: 0\n").is_err());
    assert!(
        parse("rules:\n- repositories: team\n").is_err(),
        "keeps nothing"
    );
    assert!(parse("rules:\n- repositories: team\n  keep_last: 2\n").is_ok());
    assert!(parse("rules:\n- repositories: '/x'\n  keep_last: 2\n").is_err());
    let err = parse(
        "cloud_controller:\n  api_url: https://api.example\n  uaa_url: https://uaa.example\n  client_id: berth\n  client_secret_file: /nonexistent/secret\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/secret"), "{err}");
    assert!(
        serde_norway::from_str::<RetentionConfig>("rules:\n- repositories: x\n  keep: 1\n")
            .is_err()
    );
}

// ---------------------------------------------------------------------------------------------
// Cloud Controller and UAA stand-ins answering the documented v3 and token shapes.
// ---------------------------------------------------------------------------------------------

const TOKEN: &str = "stand-in-access-token";

#[derive(Default)]
struct StandIn {
    /// Pages of droplet images, served in order.
    pages: Vec<Vec<Option<&'static str>>>,
    /// Where the last page's `next` points instead of nowhere.
    next_elsewhere: Option<String>,
    /// Answer droplet listings with this status instead.
    failing: Option<StatusCode>,
    base: String,
    requests: Mutex<Vec<String>>,
}

async fn token(State(stand_in): State<Arc<StandIn>>, headers: HeaderMap, body: String) -> Response {
    stand_in
        .requests
        .lock()
        .unwrap()
        .push(format!("token {body}"));
    // berth:secret
    let expected = "Basic YmVydGg6c2VjcmV0";
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected)
        || body != "grant_type=client_credentials"
    {
        return (StatusCode::UNAUTHORIZED, "{\"error\":\"unauthorized\"}").into_response();
    }
    axum::Json(json!({
        "access_token": TOKEN,
        "token_type": "bearer",
        "expires_in": 43199,
        "scope": "cloud_controller.global_auditor",
        "jti": "f1e2d3"
    }))
    .into_response()
}

async fn droplets(
    State(stand_in): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let value = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    stand_in
        .requests
        .lock()
        .unwrap()
        .push(format!("droplets page={:?}", value("page")));
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(format!("Bearer {TOKEN}").as_str())
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(status) = stand_in.failing {
        return status.into_response();
    }
    assert_eq!(value("states").as_deref(), Some("STAGED"));
    let page: usize = value("page").map_or(1, |p| p.parse().unwrap());
    let images = &stand_in.pages[page - 1];
    let link = |page: usize| json!({"href": format!("{}/v3/droplets?page={page}&per_page=5000&states=STAGED", stand_in.base)});
    let next = if page < stand_in.pages.len() {
        link(page + 1)
    } else if let Some(elsewhere) = &stand_in.next_elsewhere {
        json!({ "href": elsewhere })
    } else {
        serde_json::Value::Null
    };
    axum::Json(json!({
        "pagination": {
            "total_results": stand_in.pages.iter().map(Vec::len).sum::<usize>(),
            "total_pages": stand_in.pages.len(),
            "first": link(1),
            "last": link(stand_in.pages.len()),
            "next": next,
            "previous": if page > 1 { link(page - 1) } else { serde_json::Value::Null },
        },
        "resources": images.iter().enumerate().map(|(i, image)| json!({
            "guid": format!("droplet-{page}-{i}"),
            "state": "STAGED",
            "error": null,
            "lifecycle": {"type": "docker", "data": {}},
            "image": image,
            "checksum": null,
            "buildpacks": null,
            "stack": null,
            "execution_metadata": "",
            "process_types": {"web": "run"},
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "relationships": {"app": {"data": {"guid": "app"}}},
            "metadata": {"labels": {}, "annotations": {}},
            "links": {}
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// Serves the stand-in on a free port; returns its address and the running server.
async fn serve(mut stand_in: StandIn) -> (Arc<StandIn>, tokio::task::JoinHandle<()>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    stand_in.base = format!("http://{addr}");
    let stand_in = Arc::new(stand_in);
    let app = Router::new()
        .route("/oauth/token", post(token))
        .route("/v3/droplets", get(droplets))
        .with_state(stand_in.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (stand_in, server, addr)
}

fn cc_config(dir: &tempfile::TempDir, addr: SocketAddr, secret: &str) -> CloudControllerConfig {
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    CloudControllerConfig {
        api_url: format!("http://{addr}"),
        uaa_url: format!("http://{addr}/"),
        client_id: "berth".into(),
        client_secret_file: secret_file,
        ca_file: None,
        timeout_seconds: 5,
    }
}

#[tokio::test]
async fn droplet_images_are_read_from_every_page() {
    let (stand_in, server, addr) = serve(StandIn {
        pages: vec![
            vec![Some("berth.internal/cache/g/r@sha256:aa"), None],
            vec![Some("docker.io/library/nginx:1.27")],
            vec![Some("berth.internal/cache/g/r@sha256:bb")],
        ],
        ..StandIn::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cc = CloudController::new(&cc_config(&dir, addr, "secret")).unwrap();
    let in_use = cc.in_use().await.unwrap();
    assert!(in_use.names("cache/g/r", "sha256:aa"));
    assert!(in_use.names("cache/g/r", "sha256:bb"));
    assert!(in_use.names("library/nginx", "1.27"));
    assert_eq!(
        *stand_in.requests.lock().unwrap(),
        [
            "token grant_type=client_credentials",
            "droplets page=None",
            "droplets page=Some(\"2\")",
            "droplets page=Some(\"3\")",
        ]
    );
    server.abort();
}

#[tokio::test]
async fn a_cloud_controller_that_refuses_or_strays_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // A wrong secret: UAA refuses.
    let (_, server, addr) = serve(StandIn {
        pages: vec![vec![]],
        ..StandIn::default()
    })
    .await;
    let cc = CloudController::new(&cc_config(&dir, addr, "wrong")).unwrap();
    let err = cc.in_use().await.unwrap_err();
    assert!(
        matches!(err, CloudControllerError::Status { status, .. } if status == 401),
        "{err}"
    );
    server.abort();

    let (_, server, addr) = serve(StandIn {
        pages: vec![vec![]],
        failing: Some(StatusCode::SERVICE_UNAVAILABLE),
        ..StandIn::default()
    })
    .await;
    let cc = CloudController::new(&cc_config(&dir, addr, "secret")).unwrap();
    let err = cc.in_use().await.unwrap_err();
    assert!(
        matches!(err, CloudControllerError::Status { status, .. } if status == 503),
        "{err}"
    );
    server.abort();

    // A next page on another host would get the token: refused.
    let (_, server, addr) = serve(StandIn {
        pages: vec![vec![]],
        next_elsewhere: Some("http://203.0.113.9/v3/droplets?page=2".into()),
        ..StandIn::default()
    })
    .await;
    let cc = CloudController::new(&cc_config(&dir, addr, "secret")).unwrap();
    let err = cc.in_use().await.unwrap_err();
    assert!(
        matches!(err, CloudControllerError::ForeignPage { .. }),
        "{err}"
    );
    server.abort();

    // Nobody listening.
    let cc = CloudController::new(&cc_config(&dir, addr, "secret")).unwrap();
    assert!(matches!(
        cc.in_use().await.unwrap_err(),
        CloudControllerError::Request { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// A whole run against a real store.
// ---------------------------------------------------------------------------------------------

async fn push_staging(store: &dyn MetadataStore, repo: &RepoName, body: &str, tag: &str) -> Digest {
    let layer = Digest::sha256_of(format!("layer of {body}").as_bytes());
    push_blob(store, repo, &layer, 10).await;
    let manifest = manifest(body.as_bytes(), vec![layer]);
    let tag: Tag = tag.parse().unwrap();
    store
        .put_manifest(repo, &manifest, Some(&tag))
        .await
        .unwrap();
    manifest.digest
}

#[tokio::test]
async fn nothing_is_expired_while_cloud_controller_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteMetadataStore::open(&dir.path().join("m.sqlite")).unwrap();
    let repo: RepoName = format!("cache/{APP_A}/r").parse().unwrap();
    for i in 0..3 {
        push_staging(&store, &repo, &format!("staging {i}"), &format!("s{i}")).await;
    }
    let content = crate::content::FsContentStore::open(dir.path().join("content")).unwrap();
    let state = crate::api::AppState::new(
        Arc::new(content),
        Arc::new(store),
        crate::config::Limits::default(),
    );
    let keep_one = |cloud_controller| RetentionConfig {
        cache: CacheRetention {
            keep_stagings: 1,
            ..CacheRetention::default()
        },
        cloud_controller,
        ..RetentionConfig::default()
    };
    // Nothing listens where Cloud Controller should be.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap();
    drop(unused);
    let config = keep_one(Some(cc_config(&dir, addr, "secret")));
    let retention = Retention::new(config).unwrap();
    let everything_young_is_old = SystemTime::now() + Duration::from_secs(60);
    let mut report = GcReport::default();
    retention
        .run(&state, everything_young_is_old, &mut report)
        .await
        .unwrap();
    assert!(report.retention_skipped.is_some(), "{report:?}");
    assert_eq!(report.expired_tags, 0);
    assert_eq!(state.metadata.tags_under("cache").await.unwrap().len(), 3);
    assert!(
        state
            .metrics
            .render()
            .contains("berth_registry_retention_skipped_total 1")
    );

    // Without the check the two older stagings go, tags and manifests.
    let retention = Retention::new(keep_one(None)).unwrap();
    let mut report = GcReport::default();
    retention
        .run(&state, everything_young_is_old, &mut report)
        .await
        .unwrap();
    assert_eq!(
        (
            report.expired_stagings,
            report.expired_tags,
            report.expired_manifests
        ),
        (2, 2, 2),
        "{report:?}"
    );
    assert_eq!(state.metadata.tags_under("cache").await.unwrap().len(), 1);
}

#[tokio::test]
async fn rules_expire_tags_and_the_manifests_they_alone_kept_in_a_real_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteMetadataStore::open(&dir.path().join("m.sqlite")).unwrap();
    let (web, cached) = (
        "team/web".parse::<RepoName>().unwrap(),
        format!("cache/{APP_A}/r").parse::<RepoName>().unwrap(),
    );
    for (i, name) in ["release-1", "release-2", "dev"].into_iter().enumerate() {
        push_staging(&store, &web, &format!("web {i}"), name).await;
        // Tag times are in seconds: the next tag is a second newer.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // A second tag on release-1's manifest, outside the rule's pattern, keeps the manifest.
    let kept_by_other = manifest(b"web 0", vec![Digest::sha256_of(b"layer of web 0")]);
    store
        .put_manifest(&web, &kept_by_other, Some(&"stable".parse().unwrap()))
        .await
        .unwrap();
    push_staging(&store, &cached, "cached", "release-0").await;
    let content = crate::content::FsContentStore::open(dir.path().join("content")).unwrap();
    let state = crate::api::AppState::new(
        Arc::new(content),
        Arc::new(store),
        crate::config::Limits::default(),
    );
    let config = RetentionConfig {
        rules: vec![RetentionRule {
            repositories: "*".into(),
            tags: "release-*".into(),
            keep_last: Some(0),
            pulled_within_days: None,
        }],
        ..RetentionConfig::default()
    };
    let retention = Retention::new(config).unwrap();
    let mut report = GcReport::default();
    let later = SystemTime::now() + Duration::from_secs(60);
    retention.run(&state, later, &mut report).await.unwrap();
    assert_eq!(
        (
            report.expired_stagings,
            report.expired_tags,
            report.expired_manifests
        ),
        (0, 2, 1),
        "{report:?}"
    );
    let mut left: Vec<String> = state
        .metadata
        .tags_under("")
        .await
        .unwrap()
        .iter()
        .map(|t| format!("{}:{}", t.repo, t.tag))
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            format!("{cached}:release-0"),
            "team/web:dev".to_owned(),
            "team/web:stable".to_owned()
        ],
        "the cache is cache retention's"
    );
}
