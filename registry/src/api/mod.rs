//! HTTP surface: the `/v2/` API, health and metrics, and the per-request logging around them.

mod blobs;
mod listing;
mod manifests;
mod referrers;
mod route;
#[cfg(test)]
mod strategies;
mod token;
mod uploads;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use berth_oci::{Digest, RepoName};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::auth::{Actions, Auth, Need, RequestInfo};
use crate::config::Limits;
use crate::content::ContentStore;
use crate::error::{RegistryError, Result, StorageFailure};
use crate::metadata::MetadataStore;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::pulls::PullNotes;
use crate::server::FileSender;
use route::Route;

pub(crate) use manifests::store as store_manifest;
pub(crate) use uploads::{
    commit as commit_upload, discard_session as discard_upload, new_session as start_upload,
};

/// Everything a handler can reach. Handlers talk to the two stores, never to paths or SQL.
pub struct AppState {
    pub content: Arc<dyn ContentStore>,
    pub metadata: Arc<dyn MetadataStore>,
    pub limits: Limits,
    pub metrics: Metrics,
    pub auth: Auth,
    /// Digests pushes are storing, kept away from the garbage collector's sweep.
    pub reservations: crate::gc::Reservations,
    /// Manifest pulls waiting to be written for retention.
    pub pulls: Arc<PullNotes>,
    /// This process among the instances sharing the stores, as lease holder.
    pub instance: String,
    /// Manifest bytes by digest. Content-addressed bytes never change, so entries never go stale;
    /// whether a repository may see a digest is still asked of the metadata store every time.
    manifest_bytes: quick_cache::sync::Cache<Digest, Bytes, ByteWeighter>,
    /// The upstreams mirrored under proxied prefixes (none by default).
    pub proxy: Arc<Proxy>,
}

#[derive(Clone)]
struct ByteWeighter;

impl quick_cache::Weighter<Digest, Bytes> for ByteWeighter {
    fn weight(&self, _: &Digest, bytes: &Bytes) -> u64 {
        bytes.len() as u64 + 64
    }
}

impl AppState {
    pub fn new(
        content: Arc<dyn ContentStore>,
        metadata: Arc<dyn MetadataStore>,
        limits: Limits,
    ) -> Self {
        let reservations = crate::gc::Reservations::for_store(&metadata);
        let manifest_bytes = quick_cache::sync::Cache::with_weighter(
            (limits.manifest_cache_bytes / 2048).max(16) as usize,
            limits.manifest_cache_bytes,
            ByteWeighter,
        );
        AppState {
            content,
            metadata,
            limits,
            metrics: Metrics::default(),
            auth: Auth::open(),
            reservations,
            pulls: Arc::new(PullNotes::new(false)),
            instance: uuid::Uuid::new_v4().to_string(),
            manifest_bytes,
            proxy: Arc::default(),
        }
    }

    /// Reports to `metrics`, which parts built before the state (a content store) may share.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Mirrors the upstreams of `proxy` under their prefixes.
    pub fn with_proxy(mut self, proxy: Proxy) -> Self {
        self.proxy = Arc::new(proxy);
        self
    }

    /// Notes manifest pulls for retention (off by default); whoever turns it on writes them with
    /// [`PullNotes::flush_forever`].
    pub fn with_pull_tracking(mut self, enabled: bool) -> Self {
        self.pulls = Arc::new(PullNotes::new(enabled));
        self
    }

    /// Puts `auth` in charge of who may do what (the default lets everyone do everything).
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }
}

/// The route label a handler ran under, for the request log and metrics.
#[derive(Clone, Copy)]
struct RouteLabel(&'static str);

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/", get(base))
        .route("/v2/{*path}", any(dispatch))
        .route(
            crate::auth::TOKEN_PATH,
            get(token::issue).post(token::issue_oauth),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { RegistryError::NotFound })
        // Every route above but `/v2/{*path}`, which answers every method itself; the router adds
        // the `Allow` header.
        .method_not_allowed_fallback(|| async { RegistryError::MethodNotAllowed { allow: None } })
        .layer(middleware::from_fn(drain_request_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn base(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(err) = state
        .auth
        .authorize(&request_info(&parts), &[Need::Login])
        .await
    {
        return err.into_response();
    }
    ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
}

/// What authorization needs to know about a request.
fn request_info(parts: &axum::http::request::Parts) -> RequestInfo<'_> {
    let connection = parts.extensions.get::<crate::server::ConnectionInfo>();
    RequestInfo {
        headers: &parts.headers,
        host: parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(header::HOST)?.to_str().ok()),
        peer: connection.map(|c| c.peer.ip()),
        secure: connection.is_some_and(|c| c.tls),
        client_certificates: connection.and_then(|c| c.client_certificates.as_deref()),
    }
}

/// What a request on `route` with `method` must be allowed to do.
fn needs<'a>(route: &'a Route, method: &Method, mount_from: Option<&'a RepoName>) -> Vec<Need<'a>> {
    let on = |repo, actions| vec![Need::Repository(repo, actions)];
    match (route, method) {
        (Route::Catalog, _) => vec![Need::Catalog],
        (Route::Manifest(repo, _) | Route::Blob(repo, _), &Method::DELETE) => {
            on(repo, Actions::DELETE)
        }
        (Route::Manifest(repo, _), &Method::PUT) => on(repo, Actions::PUSH),
        (Route::Manifest(repo, _) | Route::Blob(repo, _) | Route::Referrers(repo, _), _) => {
            on(repo, Actions::PULL)
        }
        (Route::Tags(repo), _) => on(repo, Actions::PULL.union(Actions::LIST)),
        (Route::UploadStart(repo), _) => {
            let mut needs = on(repo, Actions::PUSH);
            needs.extend(mount_from.map(|from| Need::Repository(from, Actions::PULL)));
            needs
        }
        (Route::Upload(repo, _), _) => on(repo, Actions::PUSH),
    }
}

/// The repository a mount asks to take a blob from, if it names one.
fn mount_source(uri: &Uri) -> Option<RepoName> {
    let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
        .ok()?
        .0;
    if !pairs.iter().any(|(k, _)| k == "mount") {
        return None;
    }
    pairs.into_iter().find(|(k, _)| k == "from")?.1.parse().ok()
}

/// Whether this instance can serve: both of its stores answer. Load balancers and BOSH DNS
/// health checks take it out of rotation while it answers 503.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let probe = crate::metadata::PageRequest {
        last: None,
        limit: 1,
    };
    let (metadata, content) =
        tokio::join!(state.metadata.repositories(&probe), state.content.check());
    let failure = match (metadata, content) {
        (Ok(_), Ok(())) => return (StatusCode::OK, "ok\n").into_response(),
        (Err(err), _) => format!("metadata: {err}"),
        (_, Err(err)) => format!("storage: {err}"),
    };
    tracing::warn!(error = %failure, "health check failed");
    RegistryError::Unhealthy(failure).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    // Read at each scrape: one row per rule, and exact at that moment.
    if let Ok(quotas) = state.metadata.quota_usage().await {
        state.metrics.set_quotas(&quotas);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn dispatch(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().strip_prefix("/v2/").unwrap_or_default();
    let route = match route::parse(path) {
        Ok(route) => route,
        Err(err) => return err.into_response(),
    };
    let label = route.label();
    let mount_from = match route {
        Route::UploadStart(_) => mount_source(&parts.uri),
        _ => None,
    };
    let grant = match state
        .auth
        .authorize(
            &request_info(&parts),
            &needs(&route, &parts.method, mount_from.as_ref()),
        )
        .await
    {
        Ok(grant) => grant,
        Err(err) => {
            let mut response = err.into_response();
            response.extensions_mut().insert(RouteLabel(label));
            return response;
        }
    };
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let head = method == Method::HEAD;
    if let Some(repo) = route.repository()
        && !matches!(method, Method::GET | Method::HEAD)
        && state.proxy.is_proxied(repo)
    {
        let mut response = RegistryError::ProxiedReadOnly(repo.to_string()).into_response();
        response.extensions_mut().insert(RouteLabel(label));
        return response;
    }
    // Authorized as spelled (policies are per namespace, which this keeps), stored as one name.
    let route = route.map_repository(|repo| state.proxy.canonical(repo));
    let shared = &state;
    let state = &*state;
    let allow = route.allowed_methods();
    let result = match (route, method) {
        (Route::Manifest(repo, Ok(reference)), Method::GET | Method::HEAD) => {
            manifests::get(state, &repo, &reference, &headers, head).await
        }
        (Route::Manifest(_, Err(invalid)), Method::GET | Method::HEAD) => {
            Err(RegistryError::ManifestUnknown(invalid.text))
        }
        (Route::Manifest(repo, Ok(reference)), Method::PUT) => {
            manifests::put(state, &repo, &reference, &headers, body).await
        }
        (Route::Manifest(repo, Ok(reference)), Method::DELETE) => {
            manifests::delete(state, &repo, &reference).await
        }
        (Route::Manifest(_, Err(invalid)), Method::PUT | Method::DELETE) => Err(invalid.into()),
        (Route::Blob(repo, digest), Method::GET | Method::HEAD) => {
            let file_sender = (parts.version < Version::HTTP_2)
                .then(|| parts.extensions.get::<FileSender>())
                .flatten();
            blobs::get(shared, &repo, &digest, &headers, head, file_sender).await
        }
        (Route::Blob(repo, digest), Method::DELETE) => blobs::delete(state, &repo, &digest).await,
        (Route::UploadStart(repo), Method::POST) => {
            uploads::start(state, &repo, &uri, body, &grant).await
        }
        (Route::Upload(repo, id), Method::PATCH) => {
            uploads::patch(state, &repo, id, &headers, body).await
        }
        (Route::Upload(repo, id), Method::PUT) => {
            uploads::finish(state, &repo, id, &uri, &headers, body).await
        }
        (Route::Upload(repo, id), Method::GET) => uploads::status(state, &repo, id).await,
        (Route::Upload(repo, id), Method::DELETE) => uploads::cancel(state, &repo, id).await,
        (Route::Tags(repo), Method::GET) => listing::tags(state, &repo, &uri).await,
        (Route::Catalog, Method::GET) => listing::catalog(state, &uri, &grant).await,
        (Route::Referrers(repo, subject), Method::GET) => {
            referrers::list(state, &repo, &subject, &uri).await
        }
        _ => Err(RegistryError::MethodNotAllowed { allow: Some(allow) }),
    };
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    response.extensions_mut().insert(RouteLabel(label));
    response
}

/// One log line and one metrics sample per request, and the API version header on every response.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let version = request.version();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    response.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    let status = response.status().as_u16();
    // The length a HEAD answer declares is that of the body a GET would send; none is sent.
    // Bodies built whole (error JSON, small answers) get their length header only from hyper,
    // later: their size is known here all the same.
    let bytes = if method == Method::HEAD {
        0
    } else {
        response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .or_else(|| axum::body::HttpBody::size_hint(response.body()).exact())
            .unwrap_or(0)
    };
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or("other", |r| r.0);
    let storage_failed = response.extensions().get::<StorageFailure>().is_some();
    state
        .metrics
        .observe_request(route, &method, status, bytes, storage_failed);
    tracing::info!(
        target: "berth_registry::request",
        method = %method,
        path,
        version = ?version,
        status,
        bytes,
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
    );
    response
}

/// How much of a request body its handler left unread is still read, and thrown away, before
/// answering.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads what the handler left of the request body before the response goes out. An answer
/// decided before the body was read (a 404, 413 or 416) would otherwise close the connection on
/// unread data, and a client still sending would see a reset instead of the answer. A client
/// waiting for `100 Continue` sends nothing until asked, so its body is left alone.
async fn drain_request_body(request: Request, next: Next) -> Response {
    let waits_for_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // Most requests (every GET and HEAD) have no body at all: nothing to drain, nothing to wrap.
    if waits_for_continue || axum::body::HttpBody::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let unread = Arc::new(Mutex::new(body.into_data_stream()));
    let handler_side = unread.clone();
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        let mut stream = handler_side.lock().expect("body lock poisoned");
        stream.poll_next_unpin(cx)
    }));
    let response = next.run(Request::from_parts(parts, body)).await;
    // The handler has dropped its side by now; the rest of the body is ours.
    if let Ok(rest) = Arc::try_unwrap(unread) {
        let mut rest = rest.into_inner().expect("body lock poisoned");
        let mut drained = 0;
        while drained <= DRAIN_LIMIT
            && let Some(Ok(chunk)) = rest.next().await
        {
            drained += chunk.len() as u64;
        }
    }
    response
}

/// `Location` of a resource inside a repository.
fn location(repo: &berth_oci::RepoName, rest: std::fmt::Arguments<'_>) -> HeaderValue {
    HeaderValue::try_from(format!("/v2/{repo}/{rest}")).expect("validated names make valid headers")
}

fn header_value(value: impl ToString) -> HeaderValue {
    HeaderValue::try_from(value.to_string()).expect("digests, sizes and ids make valid headers")
}

/// A response with the given status, headers and no body.
fn empty(
    status: StatusCode,
    headers: impl IntoIterator<Item = (&'static str, HeaderValue)>,
) -> Response {
    let mut response = (status, Body::empty()).into_response();
    let map = response.headers_mut();
    for (name, value) in headers {
        map.insert(name, value);
    }
    map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}

type HandlerResult = Result<Response>;

#[cfg(test)]
mod tests {
    use axum::http::Uri;
    use proptest::prelude::*;

    use super::{Route, listing, mount_source, route, uploads};
    use crate::api::strategies::CASES;

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// A path below `/v2/`: the API's own words, names, digests, session ids and junk, joined
    /// with `/`.
    fn api_path() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            4 => prop::sample::select(vec![
                "blobs", "uploads", "manifests", "tags", "list", "referrers", "_catalog", "",
                "..", ".", "%2e", "%2F", DIGEST, "sha256:", "0b3ad7c4-6c2e-4a4f-9d51-1f2a3b4c5d6e",
            ])
            .prop_map(str::to_owned),
            4 => "[a-zA-Z0-9._:%-]{0,24}",
            // Session ids in the forms a UUID parser may take: hyphenated, simple, braced, URN.
            1 => "(urn:uuid:|\\{)?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\\}?",
            1 => any::<String>(),
        ];
        prop::collection::vec(segment, 0..8).prop_map(|segments| segments.join("/"))
    }

    /// The path a parsed route came from, up to the optional `/` after `uploads`.
    fn path_of(route: &Route) -> String {
        match route {
            Route::Catalog => "_catalog".to_owned(),
            Route::Manifest(name, Ok(reference)) => format!("{name}/manifests/{reference}"),
            Route::Manifest(name, Err(invalid)) => format!("{name}/manifests/{}", invalid.text),
            Route::Blob(name, digest) => format!("{name}/blobs/{digest}"),
            Route::UploadStart(name) => format!("{name}/blobs/uploads"),
            Route::Upload(name, _) => format!("{name}/blobs/uploads/"),
            Route::Tags(name) => format!("{name}/tags/list"),
            Route::Referrers(name, digest) => format!("{name}/referrers/{digest}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn any_path_gives_the_route_it_spells_or_an_error(path in api_path()) {
            if let Ok(route) = route::parse(&path) {
                let spelled = path_of(&route);
                if let Route::Upload(_, id) = &route {
                    // A session id may be spelled in any form the UUID parser takes.
                    let parsed = path.strip_prefix(&spelled).and_then(|t| t.parse().ok());
                    prop_assert_eq!(parsed.as_ref(), Some(id));
                } else {
                    prop_assert!(
                        path == spelled || path == format!("{spelled}/"),
                        "{path:?} parsed as {route:?}"
                    );
                }
            }
        }

        #[test]
        fn any_query_parses_or_is_refused_without_panics(
            query in prop_oneof![
                "((mount|from|digest|n|last|scope|service)=[a-z0-9:/%+&=._-]{0,30}&?){0,4}",
                any::<String>(),
            ],
            n in prop::option::of(any::<u64>()),
        ) {
            let n = n.map(|n| format!("&n={n}")).unwrap_or_default();
            if let Ok(uri) = format!("/v2/a/blobs/uploads/?{query}{n}").parse::<Uri>() {
                let _ = mount_source(&uri);
                let _ = uploads::query(&uri);
                if let Ok(page) = listing::page_request(&uri, 100) {
                    prop_assert!(page.limit <= 100);
                }
            }
        }
    }
}
