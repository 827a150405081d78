//! The `auth:` section of the configuration: mode, users, groups, access rules and token settings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::policy::Action;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may do anything: for a registry only reachable from trusted hosts.
    #[default]
    None,
    /// HTTP Basic against the htpasswd file on every request.
    Basic,
    /// Bearer tokens per the Docker token specification, issued at `/auth/token`.
    Token,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// htpasswd file with bcrypt entries (`htpasswd -B`). Users named `robot$NAME` are robot
    /// accounts, granted as `robot:NAME`.
    pub htpasswd: Option<PathBuf>,
    /// Group name to member user names.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Principals (`user:NAME`, `group:NAME`, `robot:NAME`) that may do everything everywhere,
    /// whatever the access rules say.
    pub admins: Vec<String>,
    /// Access rules by repository prefix; the longest matching prefix decides. Without any rule,
    /// every authenticated user may do everything and anonymous callers nothing.
    pub access: Vec<AccessRule>,
    pub token: TokenConfig,
    /// Failed logins allowed per user, client address and minute before that pair gets 429; 0 for
    /// no limit.
    pub max_failures_per_minute: u32,
    /// TLS client certificates accepted as app identities: Cloud Foundry's instance identity
    /// certificates (`app:GUID` with groups `space:GUID`, `organization:GUID` in the rules).
    pub instance_identity: Option<InstanceIdentityConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceIdentityConfig {
    /// PEM bundle of the CAs the certificates must chain to (Diego's instance identity CA and
    /// the application CA above it); reloaded with the rest of `auth` on SIGHUP.
    pub ca_file: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnonymousAccess {
    #[default]
    None,
    /// Public: anyone may pull and list.
    Pull,
    /// Anyone who knows a repository's exact name may pull it; listings never show it.
    ByName,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// A repository name prefix on path-component boundaries (`team-a` covers `team-a/app`), or
    /// `*` for every repository. One whole component may be `{app}` (`cache/{app}`): it stands
    /// for any app's GUID, and the principal `app:{app}` then means that app alone.
    pub repositories: String,
    #[serde(default)]
    pub anonymous: AnonymousAccess,
    /// Credentials this registry does not know (or a wrong password) count as anonymous for pulls
    /// here instead of failing: Diego cells present the origin registry's credentials.
    #[serde(default)]
    pub foreign_credentials_as_anonymous: bool,
    /// `user:NAME`, `group:NAME`, `robot:NAME`, `authenticated`, a trusted issuer's forms, or an
    /// app's (`app:GUID`, `app:{app}`, `space:GUID`, `organization:GUID`), to actions.
    #[serde(default)]
    pub grants: BTreeMap<String, Vec<Action>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Where clients fetch tokens; defaults to `/auth/token` on the host the client asked.
    pub realm: Option<String>,
    /// The `service` (audience) tokens are issued for and must name.
    pub service: String,
    /// The `iss` of tokens this registry issues.
    pub issuer: String,
    /// PKCS#8 PEM EC P-256 key tokens are signed with (ES256). Without it a key is generated at
    /// start-up, which suits a single instance: tokens then do not survive a restart.
    pub signing_key: Option<PathBuf>,
    pub lifetime_seconds: u64,
    /// Other issuers whose tokens are accepted, such as Cloud Foundry's UAA.
    pub trusted_issuers: Vec<TrustedIssuer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// A short name (`uaa`) that prefixes every principal its tokens name, so that they never
    /// meet local ones: its user `alice` is `user:uaa:alice` in the rules, its group (scope)
    /// `berth.admin` is `group:uaa:berth.admin`, and `authenticated:uaa` is any of its users.
    pub name: String,
    /// The `iss` claim of its tokens.
    pub issuer: String,
    /// The `aud` its tokens must carry; defaults to `token.service`.
    pub audience: Option<String>,
    /// PEM certificates or public keys whose keys sign its tokens.
    pub certificates: Option<PathBuf>,
    /// Or a JWKS document listing them, fetched at start-up, on SIGHUP and on an unknown `kid`.
    pub jwks_url: Option<String>,
    /// CA bundle for fetching `jwks_url`, in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// The claim naming the user, when the token carries no `access` claim.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// A claim whose values (a list, or one space-separated string such as UAA's `scope`) count
    /// as group memberships in the access rules.
    pub groups_claim: Option<String>,
    /// Whether its tokens' `access` claim (Docker token scopes) grants anything. Off by default:
    /// its users and groups then get exactly what the access rules name them for.
    #[serde(default)]
    pub trust_access_claim: bool,
}

fn default_user_claim() -> String {
    "sub".into()
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            realm: None,
            service: "berth-registry".into(),
            issuer: "berth-registry".into(),
            signing_key: None,
            lifetime_seconds: 300,
            trusted_issuers: Vec::new(),
        }
    }
}
