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
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|e| form_invalid(e.to_string()))?;
    let request = oauth_request(&bytes)?;
    let issued = state
        .auth
        .issue_token(
            &request_info(parts),
            request.credentials,
            request.service.as_deref(),
            &request.scopes,
        )
        .await?;
    Ok(token_response(&issued))
}

fn form_invalid(what: String) -> RegistryError {
    RegistryError::Unsupported(format!("token request form: {what}"))
}

/// What an OAuth2 password-grant form asks for.
struct OAuthRequest {
    credentials: TokenCredentials,
    service: Option<String>,
    scopes: Vec<String>,
}

fn oauth_request(form: &[u8]) -> Result<OAuthRequest, RegistryError> {
    let form: Vec<(String, String)> =
        serde_urlencoded::from_bytes(form).map_err(|e| form_invalid(e.to_string()))?;
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
            return Err(form_invalid(format!(
                "grant_type {other:?} is not supported; use password"
            )));
        }
    };
    // OAuth2 joins scopes with spaces in one field; some clients repeat the field instead.
    let scopes = form
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    Ok(OAuthRequest {
        credentials,
        service: field("service").map(str::to_owned),
        scopes,
    })
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

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;
    use base64::Engine;
    use proptest::prelude::*;

    use super::*;
    use crate::api::strategies::{CASES, header_value};

    /// An `Authorization` value: a scheme, then base64 of `user:password` or a token, or junk.
    fn authorization() -> impl Strategy<Value = String> {
        let scheme = prop::sample::select(vec!["Basic", "basic", "BEARER", "Bearer", "Digest", ""]);
        let credentials = prop_oneof![
            ".{0,20}".prop_map(|pair| base64::engine::general_purpose::STANDARD.encode(pair)),
            "[A-Za-z0-9+/=:._-]{0,60}",
        ];
        (
            scheme,
            prop_oneof![Just(" "), Just(""), Just("  ")],
            credentials,
        )
            .prop_map(|(scheme, space, credentials)| format!("{scheme}{space}{credentials}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn any_authorization_is_credentials_anonymous_or_malformed(
            value in header_value(authorization()),
        ) {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.clone());
            if let TokenCredentials::Password { user, password } =
                TokenCredentials::from_headers(&headers)
            {
                // Only what Basic credentials spell: `user:password` in base64.
                let text = value.to_str().unwrap_or_default();
                let (scheme, encoded) = text.split_once(' ').unwrap_or_default();
                prop_assert!(scheme.eq_ignore_ascii_case("basic"));
                let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim());
                prop_assert_eq!(decoded.ok(), Some(format!("{user}:{password}").into_bytes()));
            }
        }

        #[test]
        fn any_oauth_form_is_a_password_grant_or_refused(
            form in prop_oneof![
                "((grant_type|username|password|scope|service)=[a-z0-9:/%+&=._ -]{0,20}&?){0,5}",
                ".{0,60}",
            ],
        ) {
            match oauth_request(form.as_bytes()) {
                Ok(request) => {
                    let password = matches!(request.credentials, TokenCredentials::Password { .. });
                    prop_assert!(password);
                    prop_assert!(form.contains("grant_type=password"));
                }
                Err(err) => prop_assert!(matches!(err, RegistryError::Unsupported(_))),
            }
        }
    }
}
