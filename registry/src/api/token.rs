//! The token endpoint of the Docker token specification: `GET /auth/token?service=&scope=`.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, RouteLabel, request_info};
use crate::error::RegistryError;

pub(super) async fn issue(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let mut response = issue_for(&state, &parts)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    response.extensions_mut().insert(RouteLabel("token"));
    response
}

async fn issue_for(
    state: &AppState,
    parts: &axum::http::request::Parts,
) -> Result<Response, RegistryError> {
    // Scopes repeat (`scope=a&scope=b`), which only a list of pairs can hold.
    let pairs = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map_err(|e| RegistryError::Unsupported(format!("token request parameters: {e}")))?
        .0;
    let service = pairs
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.as_str());
    let scopes: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let issued = state
        .auth
        .issue_token(&request_info(parts), service, &scopes)
        .await?;
    let body = serde_json::json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
    });
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
