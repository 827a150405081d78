//! Tag and repository listings, paginated with `n`/`last` and a `Link` header.

use axum::Json;
use axum::extract::Query;
use axum::http::{HeaderValue, Uri, header};
use axum::response::IntoResponse;
use berth_oci::RepoName;
use serde::Deserialize;

use super::{AppState, HandlerResult};
use crate::auth::Grant;
use crate::error::RegistryError;
use crate::metadata::{Page, PageRequest};

#[derive(Deserialize)]
struct PageQuery {
    n: Option<u32>,
    last: Option<String>,
}

pub(super) fn page_request(uri: &Uri, max: u32) -> Result<PageRequest, RegistryError> {
    let query = Query::<PageQuery>::try_from_uri(uri)
        .map_err(|e| RegistryError::Unsupported(format!("pagination parameters: {e}")))?
        .0;
    Ok(PageRequest {
        last: query.last,
        limit: query.n.unwrap_or(max).min(max),
    })
}

/// The `Link` header pointing at the page after `page`, if there is one.
fn next_link(path: &str, request: &PageRequest, page: &Page) -> Option<HeaderValue> {
    let last = page.entries.last().filter(|_| page.more)?;
    // Names and tags never need percent-encoding: the grammar allows only URL-safe characters.
    HeaderValue::try_from(format!(
        "<{path}?n={}&last={last}>; rel=\"next\"",
        request.limit
    ))
    .ok()
}

fn listing(
    uri: &Uri,
    request: &PageRequest,
    page: &Page,
    body: serde_json::Value,
) -> axum::response::Response {
    let mut response = Json(body).into_response();
    if let Some(link) = next_link(uri.path(), request, page) {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

pub(super) async fn tags(state: &AppState, repo: &RepoName, uri: &Uri) -> HandlerResult {
    let request = page_request(uri, state.limits.max_page_entries)?;
    let page = state
        .metadata
        .tags(repo, &request)
        .await?
        .ok_or_else(|| RegistryError::NameUnknown(repo.to_string()))?;
    let body = serde_json::json!({ "name": repo.as_str(), "tags": page.entries });
    Ok(listing(uri, &request, &page, body))
}

/// The catalog, showing only repositories the caller may list. Filtering happens page by page, so
/// a page may need several store pages to fill.
pub(super) async fn catalog(state: &AppState, uri: &Uri, grant: &Grant) -> HandlerResult {
    let request = page_request(uri, state.limits.max_page_entries)?;
    let mut entries = Vec::new();
    let mut cursor = request.clone();
    let more = loop {
        let page = state.metadata.repositories(&cursor).await?;
        cursor.last = page.entries.last().cloned().or(cursor.last);
        for name in page.entries {
            let listable = name
                .parse::<RepoName>()
                .is_ok_and(|repo| grant.lists(&repo));
            if listable {
                entries.push(name);
            }
        }
        if entries.len() >= request.limit as usize || !page.more {
            break page.more || entries.len() > request.limit as usize;
        }
    };
    entries.truncate(request.limit as usize);
    let page = Page { entries, more };
    let body = serde_json::json!({ "repositories": page.entries });
    Ok(listing(uri, &request, &page, body))
}
