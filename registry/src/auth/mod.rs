//! Access control: who a request comes from (Basic or Bearer), what it may do (the policy), the
//! challenge it gets when it may not, and the tokens the registry issues.

mod certificate;
mod config;
mod htpasswd;
mod limiter;
mod policy;
mod token;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use berth_oci::RepoName;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};

pub use config::{
    AccessRule, AnonymousAccess, AuthConfig, AuthMode, InstanceIdentityConfig, TokenConfig,
    TrustedIssuer,
};
pub use htpasswd::entry as htpasswd_entry;
pub use policy::{Action, Actions, Identity};
pub use token::{AccessEntry, IssuedToken, SigningKey};

use crate::config::ConfigError;
use crate::error::RegistryError;
use certificate::InstanceIdentity;
use htpasswd::Htpasswd;
use limiter::FailureLimiter;
use policy::Policy;
use token::{TokenIssuer, TokenVerifier, VerifiedToken};

/// Where the token endpoint is served.
pub const TOKEN_PATH: &str = "/auth/token";
/// Longest Authorization header looked at; anything longer is refused unread.
const MAX_AUTHORIZATION_BYTES: usize = 8192;
/// How long a password that passed bcrypt is remembered, so that Basic mode does not pay bcrypt on
/// every request.
const LOGIN_MEMORY: Duration = Duration::from_secs(300);

/// What a request wants to do.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// `GET /v2/`: prove who you are (anonymous callers are challenged).
    Login,
    /// List repositories: only those the caller may list are shown.
    Catalog,
    Repository(&'a RepoName, Actions),
}

/// The parts of a request authorization looks at.
pub struct RequestInfo<'a> {
    pub headers: &'a HeaderMap,
    /// The host the client addressed, for the default token realm.
    pub host: Option<&'a str>,
    pub peer: Option<IpAddr>,
    /// Whether the request arrived over TLS.
    pub secure: bool,
    /// The chain the client presented in the TLS handshake (leaf first), whose key it proved to
    /// hold; not yet validated.
    pub client_certificates: Option<&'a [CertificateDer<'static>]>,
}

enum Presented {
    Nothing,
    Basic { user: String, password: String },
    Bearer(String),
    Malformed,
}

fn presented(headers: &HeaderMap) -> Presented {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Presented::Nothing;
    };
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Presented::Malformed;
    }
    let Ok(text) = value.to_str() else {
        return Presented::Malformed;
    };
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        match decoded.as_deref().and_then(|d| d.split_once(':')) {
            // containers/image (skopeo, podman) answers a Basic challenge with an empty user and
            // password when it has no credentials: that is an anonymous request.
            Some(("", "")) => Presented::Nothing,
            Some((user, password)) => Presented::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            },
            None => Presented::Malformed,
        }
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Presented::Bearer(rest.to_owned())
    } else {
        Presented::Malformed
    }
}

/// Who the caller turned out to be, kept for handlers that filter what they return.
#[derive(Clone)]
pub struct Grant {
    kind: GrantKind,
    state: Arc<AuthState>,
}

#[derive(Clone)]
enum GrantKind {
    Open,
    Identity(Identity),
    Token(Arc<VerifiedToken>),
}

impl Grant {
    /// Whether the caller may do `actions` in `repo`.
    pub fn allows(&self, repo: &RepoName, actions: Actions) -> bool {
        let policy = &self.state.policy;
        match &self.kind {
            GrantKind::Open => true,
            GrantKind::Identity(who) => policy.allowed(who, repo).contains(actions),
            GrantKind::Token(token) => match &token.access {
                Some(access) => {
                    let granted = |word: &str| {
                        access
                            .iter()
                            .any(|entry| entry.allows("repository", repo.as_str(), word))
                    };
                    let words_ok = [
                        (Actions::PULL, "pull"),
                        (Actions::PUSH, "push"),
                        (Actions::DELETE, "delete"),
                    ]
                    .iter()
                    .all(|(action, word)| !actions.contains(*action) || granted(word));
                    // Listing is not a token action: it takes pull in the token and a policy
                    // that lets the token's subject list the repository.
                    let list_ok = !actions.contains(Actions::LIST)
                        || (granted("pull")
                            && policy
                                .allowed(&self.state.token_identity(token), repo)
                                .contains(Actions::LIST));
                    // A token never grants less than no token at all would.
                    (words_ok && list_ok)
                        || policy
                            .allowed(&Identity::anonymous(), repo)
                            .contains(actions)
                }
                None => policy
                    .allowed(&self.state.token_identity(token), repo)
                    .contains(actions),
            },
        }
    }

    /// Whether the caller may pull from `repo` by a grant of its own, or the repository is
    /// public (listed to anyone). Anonymous by-name access does not count: it proves no right to
    /// the repository, only knowledge of a name. For a token this asks the policy about its
    /// subject: a mount without `from` cannot name its sources in the token's scopes, since the
    /// client does not know them.
    pub fn pulls_by_grant(&self, repo: &RepoName) -> bool {
        let policy = &self.state.policy;
        let may = |who: &Identity| {
            policy.granted(who, repo).contains(Actions::PULL)
                || policy
                    .allowed(who, repo)
                    .contains(Actions::PULL.union(Actions::LIST))
        };
        match &self.kind {
            GrantKind::Open => true,
            GrantKind::Identity(who) => may(who),
            GrantKind::Token(token) => may(&self.state.token_identity(token)),
        }
    }

    /// Whether the catalog shows `repo` to the caller. A token's `registry:catalog:*` entry lets
    /// its subject see what the policy lets it list: a token never names every repository.
    pub fn lists(&self, repo: &RepoName) -> bool {
        let listing = Actions::PULL.union(Actions::LIST);
        match &self.kind {
            GrantKind::Token(token) if token.access.is_some() => {
                self.allows_catalog()
                    && self
                        .state
                        .policy
                        .allowed(&self.state.token_identity(token), repo)
                        .contains(listing)
            }
            _ => self.allows(repo, listing),
        }
    }

    fn allows_catalog(&self) -> bool {
        match &self.kind {
            GrantKind::Open => true,
            GrantKind::Identity(who) => !who.is_anonymous() && !who.is_app(),
            GrantKind::Token(token) => match &token.access {
                Some(access) => access
                    .iter()
                    .any(|entry| entry.allows("registry", "catalog", "*")),
                None => token.user.is_some(),
            },
        }
    }

    fn is_anonymous(&self) -> bool {
        match &self.kind {
            GrantKind::Open => false,
            GrantKind::Identity(who) => who.is_anonymous(),
            GrantKind::Token(token) => token.user.is_none(),
        }
    }

    fn satisfies(&self, need: &Need<'_>) -> bool {
        match need {
            Need::Login => !self.is_anonymous() || matches!(self.kind, GrantKind::Token(_)),
            Need::Catalog => self.allows_catalog(),
            Need::Repository(repo, actions) => self.allows(repo, *actions),
        }
    }
}

/// Passwords that recently passed bcrypt, as keyed MACs so the memory never holds a password.
struct LoginMemory {
    key: [u8; 32],
    entries: Mutex<HashMap<String, ([u8; 32], Instant)>>,
}

impl LoginMemory {
    fn new() -> LoginMemory {
        let mut key = [0; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .expect("the system random source works");
        LoginMemory {
            key,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn mac(&self, user: &str, password: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac
    }

    fn recalls(&self, user: &str, password: &str) -> bool {
        let entries = self.entries.lock().expect("login memory lock");
        let Some((tag, at)) = entries.get(user) else {
            return false;
        };
        at.elapsed() < LOGIN_MEMORY && self.mac(user, password).verify_slice(tag).is_ok()
    }

    fn remember(&self, user: &str, password: &str) {
        let tag = self.mac(user, password).finalize().into_bytes().into();
        self.entries
            .lock()
            .expect("login memory lock")
            .insert(user.to_owned(), (tag, Instant::now()));
    }
}

/// One loaded configuration: replaced whole on reload.
struct AuthState {
    mode: AuthMode,
    policy: Policy,
    htpasswd: Option<Arc<Htpasswd>>,
    signing_key: Option<Arc<SigningKey>>,
    signing_key_generated: bool,
    issuer: Option<TokenIssuer>,
    verifier: Option<TokenVerifier>,
    instance_identity: Option<InstanceIdentity>,
    realm: Option<String>,
    limiter: FailureLimiter,
    logins: LoginMemory,
}

impl AuthState {
    fn build(config: &AuthConfig, previous: Option<&AuthState>) -> Result<AuthState, ConfigError> {
        let policy = Policy::new(config)?;
        let instance_identity = match (&config.instance_identity, config.mode) {
            (Some(_), AuthMode::None) => {
                return Err(ConfigError::Invalid(
                    "auth.instance_identity needs auth.mode basic or token: without access \
                     control an identity grants nothing"
                        .into(),
                ));
            }
            (Some(identity), _) => Some(InstanceIdentity::load(&identity.ca_file)?),
            (None, _) => None,
        };
        let htpasswd = match (&config.htpasswd, config.mode) {
            (Some(path), _) => Some(Arc::new(Htpasswd::load(path)?)),
            (None, AuthMode::Basic) => {
                return Err(ConfigError::Invalid(
                    "auth.mode basic needs auth.htpasswd".into(),
                ));
            }
            (None, _) => None,
        };
        let token = &config.token;
        let (signing_key, signing_key_generated, issuer, verifier) = if config.mode
            == AuthMode::Token
        {
            if token.lifetime_seconds == 0 || token.service.is_empty() || token.issuer.is_empty() {
                return Err(ConfigError::Invalid(
                    "auth.token: service, issuer and lifetime_seconds must be set".into(),
                ));
            }
            let (key, generated) = match (&token.signing_key, previous) {
                (Some(path), _) => (Arc::new(SigningKey::load(path)?), false),
                // A generated key outlives reloads, or every token in flight would turn invalid.
                (None, Some(prev)) if prev.signing_key_generated => {
                    (prev.signing_key.clone().expect("generated key kept"), true)
                }
                (None, _) => (Arc::new(SigningKey::generate()), true),
            };
            let issuer = TokenIssuer::new(key.clone(), token);
            let verifier = TokenVerifier::new(key.clone(), token)?;
            (Some(key), generated, Some(issuer), Some(verifier))
        } else {
            (None, false, None, None)
        };
        Ok(AuthState {
            mode: config.mode,
            policy,
            htpasswd,
            signing_key,
            signing_key_generated,
            issuer,
            verifier,
            instance_identity,
            realm: token.realm.clone(),
            limiter: FailureLimiter::new(config.max_failures_per_minute),
            logins: LoginMemory::new(),
        })
    }

    fn token_identity(&self, token: &VerifiedToken) -> Identity {
        match &token.user {
            None => Identity::anonymous(),
            Some(user) => {
                let mut who = self.policy.identity(user);
                who.groups.extend(token.groups.iter().cloned());
                who
            }
        }
    }

    /// The app the client certificate of the request identifies, checked now (a connection may
    /// outlive its certificate). A certificate that does not identify one is refused, never taken
    /// as no credentials.
    fn certificate_identity(
        &self,
        info: &RequestInfo<'_>,
        needs: &[Need<'_>],
    ) -> Result<Option<Identity>, RegistryError> {
        let Some(chain) = info.client_certificates else {
            return Ok(None);
        };
        let verified = match &self.instance_identity {
            Some(trust) => trust.verify(chain, UnixTime::now()),
            None => Err(certificate::CertificateRefused::NotConfigured),
        };
        verified.map(Some).map_err(|err| {
            tracing::warn!(peer = ?info.peer, error = %err, "client certificate refused");
            RegistryError::Unauthorized {
                challenge: match self.mode {
                    AuthMode::Token => self.bearer_challenge(info, needs, None),
                    _ => self.basic_challenge(),
                },
                message: "the client certificate does not identify an app here",
            }
        })
    }

    async fn password_ok(&self, user: &str, password: &str) -> bool {
        let Some(htpasswd) = self.htpasswd.clone() else {
            return false;
        };
        let (u, p) = (user.to_owned(), password.to_owned());
        let ok = tokio::task::spawn_blocking(move || htpasswd.verify(&u, &p))
            .await
            .unwrap_or(false);
        if ok {
            self.logins.remember(user, password);
        }
        ok
    }

    /// Checks Basic credentials. Where every need is a pull that anonymous callers may make from
    /// a repository whose rule takes foreign credentials as anonymous, the credentials are not
    /// checked at all and the caller is anonymous: a right and a wrong password then get the same
    /// answer, so nothing can be learned there. Elsewhere, once a user has used up its failed
    /// logins from an address, only a password that passed within the last minutes is still
    /// accepted from there; anything else gets 429 without reaching bcrypt.
    async fn basic_login(
        &self,
        user: &str,
        password: &str,
        peer: Option<IpAddr>,
        needs: &[Need<'_>],
    ) -> Result<Identity, RegistryError> {
        let anonymous_pulls_suffice = !needs.is_empty()
            && needs.iter().all(|need| match need {
                Need::Repository(repo, actions) => {
                    Actions::PULL.contains(*actions)
                        && self.policy.foreign_credentials_as_anonymous(repo)
                        && self
                            .policy
                            .allowed(&Identity::anonymous(), repo)
                            .contains(*actions)
                }
                _ => false,
            });
        if anonymous_pulls_suffice {
            return Ok(Identity::anonymous());
        }
        if self.logins.recalls(user, password) {
            return Ok(self.policy.identity(user));
        }
        if self.limiter.is_blocked(user, peer) {
            tracing::warn!(user = ?user, peer = ?peer, "login refused: too many failures");
            return Err(RegistryError::TooManyRequests);
        }
        if self.password_ok(user, password).await {
            return Ok(self.policy.identity(user));
        }
        self.limiter.record_failure(user, peer);
        tracing::warn!(user = ?user, peer = ?peer, "authentication failed");
        Err(RegistryError::Unauthorized {
            challenge: self.basic_challenge(),
            message: "authentication failed",
        })
    }

    fn basic_challenge(&self) -> HeaderValue {
        HeaderValue::from_static("Basic realm=\"berth-registry\"")
    }

    fn bearer_challenge(
        &self,
        info: &RequestInfo<'_>,
        needs: &[Need<'_>],
        error: Option<&str>,
    ) -> HeaderValue {
        let realm = match &self.realm {
            Some(realm) => realm.clone(),
            None => {
                let host = info
                    .host
                    .filter(|h| {
                        h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                    })
                    .unwrap_or("localhost");
                let scheme = if info.secure { "https" } else { "http" };
                format!("{scheme}://{host}{TOKEN_PATH}")
            }
        };
        let service = self.issuer.as_ref().map_or("", |i| i.service());
        let mut value = format!("Bearer realm=\"{realm}\",service=\"{service}\"");
        let scopes: Vec<String> = needs.iter().filter_map(scope_of).collect();
        if !scopes.is_empty() {
            value.push_str(&format!(",scope=\"{}\"", scopes.join(" ")));
        }
        if let Some(error) = error {
            value.push_str(&format!(",error=\"{error}\""));
        }
        HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }
}

fn scope_of(need: &Need<'_>) -> Option<String> {
    match need {
        Need::Login => None,
        Need::Catalog => Some("registry:catalog:*".into()),
        Need::Repository(repo, actions) => {
            let mut words = actions.scope_words();
            if actions.contains(Actions::LIST) && !words.contains(&"pull") {
                words.insert(0, "pull");
            }
            if words.contains(&"push") && !words.contains(&"pull") {
                words.insert(0, "pull");
            }
            Some(format!("repository:{repo}:{}", words.join(",")))
        }
    }
}

/// A requested token scope: `repository:NAME:pull,push` or `registry:catalog:*`.
struct Scope {
    kind: String,
    name: String,
    actions: Vec<String>,
}

fn parse_scopes(scopes: &[String]) -> Vec<Scope> {
    scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(Scope {
                kind: kind.to_owned(),
                name: name.to_owned(),
                actions: actions.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// The credentials a token request brings: in its Authorization header (`GET`) or its OAuth2
/// password-grant form (`POST`).
pub enum TokenCredentials {
    Anonymous,
    Password { user: String, password: String },
    Malformed,
}

impl TokenCredentials {
    pub fn from_headers(headers: &HeaderMap) -> TokenCredentials {
        match presented(headers) {
            Presented::Basic { user, password } => TokenCredentials::Password { user, password },
            // A bearer token proves nothing to the endpoint that issues them.
            Presented::Nothing | Presented::Bearer(_) => TokenCredentials::Anonymous,
            Presented::Malformed => TokenCredentials::Malformed,
        }
    }
}

/// The registry's access control, reloadable while serving.
pub struct Auth {
    state: RwLock<Arc<AuthState>>,
}

impl Auth {
    /// No access control: everyone may do everything.
    pub fn open() -> Auth {
        Auth::from_state(
            AuthState::build(&AuthConfig::default(), None)
                .expect("the default configuration is valid"),
        )
    }

    fn from_state(state: AuthState) -> Auth {
        Auth {
            state: RwLock::new(Arc::new(state)),
        }
    }

    /// Loads keys, users and policy, and fetches trusted issuers' JWKS documents.
    pub async fn load(config: &AuthConfig) -> Result<Auth, ConfigError> {
        let state = AuthState::build(config, None)?;
        if let Some(verifier) = &state.verifier {
            verifier.fetch_keys().await;
        }
        Ok(Auth::from_state(state))
    }

    /// Checks `config` the way [`Auth::load`] would, without fetching anything.
    pub fn check(config: &AuthConfig) -> Result<(), ConfigError> {
        AuthState::build(config, None).map(drop)
    }

    /// Replaces users, keys and policy; requests in flight finish under the old ones.
    pub async fn reload(&self, config: &AuthConfig) -> Result<(), ConfigError> {
        let state = AuthState::build(config, Some(&self.current()))?;
        if let Some(verifier) = &state.verifier {
            verifier.fetch_keys().await;
        }
        *self.state.write().expect("auth state lock") = Arc::new(state);
        Ok(())
    }

    fn current(&self) -> Arc<AuthState> {
        self.state.read().expect("auth state lock").clone()
    }

    pub fn mode(&self) -> AuthMode {
        self.current().mode
    }

    /// Decides whether the request may do everything in `needs`, and says who is asking.
    pub async fn authorize(
        &self,
        info: &RequestInfo<'_>,
        needs: &[Need<'_>],
    ) -> Result<Grant, RegistryError> {
        let state = self.current();
        let app = match state.mode {
            AuthMode::None => None,
            _ => state.certificate_identity(info, needs)?,
        };
        let kind = match (state.mode, app) {
            (AuthMode::None, _) => GrantKind::Open,
            // A certificate that validated is the caller, whatever the headers say.
            (AuthMode::Basic, Some(app)) => GrantKind::Identity(app),
            (AuthMode::Basic, None) => match presented(info.headers) {
                Presented::Nothing => GrantKind::Identity(Identity::anonymous()),
                Presented::Basic { user, password } => GrantKind::Identity(
                    state
                        .basic_login(&user, &password, info.peer, needs)
                        .await?,
                ),
                Presented::Bearer(_) | Presented::Malformed => {
                    return Err(RegistryError::Unauthorized {
                        challenge: state.basic_challenge(),
                        message: "Basic credentials required",
                    });
                }
            },
            (AuthMode::Token, app) => match presented(info.headers) {
                // Basic credentials are for the token endpoint; here they count as none. A
                // certificate needs no token: it is checked on every request anyway.
                Presented::Nothing | Presented::Basic { .. } => {
                    GrantKind::Identity(app.unwrap_or_else(Identity::anonymous))
                }
                Presented::Bearer(token) => {
                    let verifier = state.verifier.as_ref().expect("token mode has a verifier");
                    match verifier.verify(&token).await {
                        Ok(verified) => GrantKind::Token(verified),
                        Err(err) => {
                            tracing::debug!(error = %err, "bearer token refused");
                            return Err(RegistryError::Unauthorized {
                                challenge: state.bearer_challenge(
                                    info,
                                    needs,
                                    Some("invalid_token"),
                                ),
                                message: "invalid or expired token",
                            });
                        }
                    }
                }
                Presented::Malformed => {
                    return Err(RegistryError::Unauthorized {
                        challenge: state.bearer_challenge(info, needs, None),
                        message: "malformed Authorization header",
                    });
                }
            },
        };
        let grant = Grant {
            kind,
            state: state.clone(),
        };
        if needs.iter().all(|need| grant.satisfies(need)) {
            return Ok(grant);
        }
        Err(match (&grant.kind, state.mode) {
            (GrantKind::Token(_), _) => RegistryError::Unauthorized {
                challenge: state.bearer_challenge(info, needs, Some("insufficient_scope")),
                message: "the token does not grant this access",
            },
            (_, AuthMode::Token) => RegistryError::Unauthorized {
                challenge: state.bearer_challenge(info, needs, None),
                message: "authentication required",
            },
            _ if grant.is_anonymous() => RegistryError::Unauthorized {
                challenge: state.basic_challenge(),
                message: "authentication required",
            },
            _ => RegistryError::Denied,
        })
    }

    /// The token endpoint: authenticates the caller (anonymous without credentials) and issues a
    /// token granting what it asked for and the policy allows, nothing more.
    pub async fn issue_token(
        &self,
        info: &RequestInfo<'_>,
        credentials: TokenCredentials,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<IssuedToken, RegistryError> {
        let state = self.current();
        let Some(issuer) = &state.issuer else {
            return Err(RegistryError::NotFound);
        };
        if service.is_some_and(|s| s != issuer.service()) {
            return Err(RegistryError::Unsupported(format!(
                "this token service issues tokens for service {:?} only",
                issuer.service()
            )));
        }
        let requested = parse_scopes(scopes);
        let repos: Vec<(RepoName, Actions)> = requested
            .iter()
            .filter(|s| s.kind == "repository")
            .filter_map(|s| {
                let repo = s.name.parse::<RepoName>().ok()?;
                let actions = s.actions.iter().fold(Actions::NONE, |all, w| {
                    all.union(Actions::from_scope_word(w))
                });
                Some((repo, actions))
            })
            .collect();
        let app = state.certificate_identity(info, &[Need::Login])?;
        let who = match (app, credentials) {
            // A certificate that validated is the caller, whatever the request also carries.
            (Some(app), _) => app,
            (None, TokenCredentials::Password { user, password }) => {
                let needs: Vec<Need<'_>> = if repos.len() == requested.len() {
                    repos.iter().map(|(r, a)| Need::Repository(r, *a)).collect()
                } else {
                    vec![Need::Login]
                };
                state
                    .basic_login(&user, &password, info.peer, &needs)
                    .await?
            }
            (None, TokenCredentials::Anonymous) => Identity::anonymous(),
            (None, TokenCredentials::Malformed) => {
                return Err(RegistryError::Unauthorized {
                    challenge: state.basic_challenge(),
                    message: "malformed Authorization header",
                });
            }
        };
        let mut access = Vec::new();
        for (repo, wanted) in &repos {
            let allowed = state.policy.allowed(&who, repo);
            let words: Vec<String> = wanted
                .scope_words()
                .into_iter()
                .filter(|w| allowed.contains(Actions::from_scope_word(w)))
                .map(str::to_owned)
                .collect();
            if !words.is_empty() {
                access.push(AccessEntry {
                    kind: "repository".into(),
                    name: repo.to_string(),
                    actions: words,
                });
            }
        }
        let wants_catalog = requested
            .iter()
            .any(|s| s.kind == "registry" && s.name == "catalog");
        if wants_catalog && !who.is_anonymous() && !who.is_app() {
            access.push(AccessEntry {
                kind: "registry".into(),
                name: "catalog".into(),
                actions: vec!["*".into()],
            });
        }
        Ok(issuer.issue(who.user.as_deref().unwrap_or(""), &access))
    }
}

#[cfg(test)]
mod tests;
