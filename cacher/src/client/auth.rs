//! Registry authentication: `WWW-Authenticate` challenges, Basic credentials, and the Docker
//! token flow with tokens cached per scope until they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_oci::Challenge;
use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::retry::RetryPolicy;
use super::{ClientError, Credentials, Scope};
use crate::secret::Secret;

/// Token responses hold a token or two of a few kilobytes; anything far bigger is not one.
const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;

/// Lifetime assumed when a token service does not say, per the token specification.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

#[derive(Default)]
struct State {
    challenge: Option<Challenge>,
    tokens: HashMap<String, CachedToken>,
}

/// Authentication state for one registry. The lock is never held across an await.
pub(super) struct Authenticator {
    credentials: Option<Credentials>,
    state: Mutex<State>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    access_token: Option<Secret>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Authenticator {
    pub(super) fn new(credentials: Option<Credentials>) -> Authenticator {
        Authenticator {
            credentials,
            state: Mutex::default(),
        }
    }

    pub(super) fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub(super) fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// Remembers the challenge of a 401 and forgets the token that earned it.
    pub(super) fn note_challenge(&self, headers: &HeaderMap, scope: &Scope) {
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(Challenge::parse);
        let mut state = self.state.lock().expect("auth state lock");
        state.tokens.remove(&scope.key());
        if challenge.is_some() {
            state.challenge = challenge;
        }
    }

    /// The `Authorization` header for a request needing `scope`, if the registry has asked for
    /// one; fetches a token when there is no fresh one for this scope.
    pub(super) async fn authorization(
        &self,
        http: &reqwest::Client,
        retry: &RetryPolicy,
        scope: &Scope,
    ) -> Result<Option<HeaderValue>, ClientError> {
        let challenge = self
            .state
            .lock()
            .expect("auth state lock")
            .challenge
            .clone();
        let value = match challenge {
            None => return Ok(None),
            Some(Challenge::Basic) => match &self.credentials {
                Some(credentials) => basic_value(credentials),
                None => return Ok(None),
            },
            Some(Challenge::Bearer { realm, service, .. }) => {
                let token = self
                    .token(http, retry, &realm, service.as_deref(), scope)
                    .await?;
                Zeroizing::new(format!("Bearer {}", token.expose()))
            }
        };
        let mut header = HeaderValue::from_str(&value).map_err(|_| {
            ClientError::Auth("the credentials contain characters HTTP cannot carry".into())
        })?;
        header.set_sensitive(true);
        Ok(Some(header))
    }

    async fn token(
        &self,
        http: &reqwest::Client,
        retry: &RetryPolicy,
        realm: &str,
        service: Option<&str>,
        scope: &Scope,
    ) -> Result<Secret, ClientError> {
        let key = scope.key();
        {
            let state = self.state.lock().expect("auth state lock");
            if let Some(cached) = state.tokens.get(&key)
                && cached.refresh_at > Instant::now()
            {
                return Ok(cached.value.clone());
            }
        }
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = service {
            query.push(("service", service));
        }
        for scope in scope.entries() {
            query.push(("scope", scope));
        }
        let requested = Instant::now();
        let response = retry
            .send("token request", || {
                let request = http.get(realm).query(&query);
                match &self.credentials {
                    Some(c) => request.basic_auth(&c.username, Some(c.password.expose())),
                    None => request,
                }
            })
            .await
            .map_err(|e| ClientError::transport("requesting a token", e))?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(match (status.as_u16(), self.has_credentials()) {
                (401 | 403, true) => ClientError::Auth(format!(
                    "the token service refused the credentials ({status})"
                )),
                (401 | 403, false) => ClientError::Auth(format!(
                    "the token service requires credentials for this image ({status})"
                )),
                // A token service in trouble is the registry in trouble.
                _ => ClientError::Status {
                    context: "requesting a token".into(),
                    status,
                    codes: Vec::new(),
                    detail: String::new(),
                    rate_limit: None,
                },
            });
        }
        let what = "reading the token response";
        let body = super::read_limited_vec(response, MAX_TOKEN_RESPONSE, what).await?;
        let body = Zeroizing::new(body);
        let body: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Invalid(format!("{what}: {e}")))?;
        let value = body
            .token
            .or(body.access_token)
            .filter(|t| !t.expose().is_empty())
            .ok_or_else(|| ClientError::Auth("the token service returned no token".into()))?;
        let lifetime = body
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        // Refresh a little early so a token never expires between check and use.
        let refresh_at = requested + lifetime.mul_f64(0.9);
        self.state.lock().expect("auth state lock").tokens.insert(
            key,
            CachedToken {
                value: value.clone(),
                refresh_at,
            },
        );
        Ok(value)
    }
}

fn basic_value(credentials: &Credentials) -> Zeroizing<String> {
    use base64::Engine as _;
    let raw = Zeroizing::new(format!(
        "{}:{}",
        credentials.username,
        credentials.password.expose()
    ));
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*raw));
    Zeroizing::new(format!("Basic {}", *encoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_is_base64_of_user_colon_password() {
        let credentials = Credentials {
            username: "user".into(),
            password: Secret::new("pass".into()),
        };
        assert_eq!(*basic_value(&credentials), "Basic dXNlcjpwYXNz");
    }
}
