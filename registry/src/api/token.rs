//! The token endpoint of the Docker token specification: `GET /auth/token?service=&scope=` with
//! Basic credentials, and the OAuth2 password grant `POST /auth/token` that containerd prefers.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, RouteLabel, request_info};
use crate::auth::{IssuedToken, TokenCredentials};
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
    let credentials = TokenCredentials::from_headers(&parts.headers);
    let issued = state
        .auth
        .issue_token(&request_info(parts), credentials, service, &scopes)
        .await?;
    Ok(token_response(&issued))
}

/// Largest OAuth2 form accepted.
const MAX_FORM_BYTES: usize = 64 << 10;

pub(super) async fn issue_oauth(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut response = oauth_for(&state, &parts, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    response.extensions_mut().insert(RouteLabel("token"));
    response
}

async fn oauth_for(
    state: &AppState,
    parts: &axum::http::request::Parts,
    body: axum::body::Body,
) -> Result<Response, RegistryError> {
    let invalid = |what: String| RegistryError::Unsupported(format!("token request form: {what}"));
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|e| invalid(e.to_string()))?;
    let form: Vec<(String, String)> =
        serde_urlencoded::from_bytes(&bytes).map_err(|e| invalid(e.to_string()))?;
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let credentials = match field("grant_type") {
        Some("password") => TokenCredentials::Password {
            user: field("username").unwrap_or_default().to_owned(),
            password: field("password").unwrap_or_default().to_owned(),
        },
        // No refresh tokens are ever issued, so none can be redeemed.
        other => {
            return Err(invalid(format!(
                "grant_type {other:?} is not supported; use password"
            )));
        }
    };
    // OAuth2 joins scopes with spaces in one field; some clients repeat the field instead.
    let scopes: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let issued = state
        .auth
        .issue_token(&request_info(parts), credentials, field("service"), &scopes)
        .await?;
    Ok(token_response(&issued))
}

fn token_response(issued: &IssuedToken) -> Response {
    let body = serde_json::json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
    });
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
