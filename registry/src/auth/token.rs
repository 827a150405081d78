//! Bearer tokens (JWT): issuing ours with ES256, verifying ours and those of trusted issuers.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::config::{TokenConfig, TrustedIssuer};
use crate::config::ConfigError;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 10;
/// Verified tokens remembered, so a request costs a hash and a lookup instead of a signature check.
const VERIFIED_CACHE_ENTRIES: usize = 16_384;
/// Least time between two fetches of a JWKS document prompted by unknown key ids.
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// Algorithms accepted for EC and RSA keys. Asymmetric only: an HMAC algorithm would let a public
/// key act as a shared secret.
const EC_ALGORITHMS: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const RSA_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One entry of a token's `access` claim, as the Docker token specification spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl AccessEntry {
    pub fn allows(&self, kind: &str, name: &str, action: &str) -> bool {
        self.kind == kind
            && self.name == name
            && self.actions.iter().any(|a| a == action || a == "*")
    }
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: &'a [AccessEntry],
}

/// The libtrust key id distribution expects in `kid`: the SHA-256 of the DER public key, cut to
/// 240 bits, in base32, in colon-separated groups of four.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(spki_der);
    let mut encoded = String::with_capacity(48);
    for chunk in digest[..30].chunks(5) {
        let bits = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        for shift in (0..8).rev() {
            encoded.push(ALPHABET[((bits >> (shift * 5)) & 31) as usize] as char);
        }
    }
    encoded
        .as_bytes()
        .chunks(4)
        .map(|group| std::str::from_utf8(group).expect("base32 is ASCII"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The DER SubjectPublicKeyInfo of a P-256 public key given as an uncompressed point.
fn p256_spki(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes) }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    [&PREFIX[..], point].concat()
}

/// The key this registry signs its tokens with.
pub struct SigningKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
}

impl SigningKey {
    pub fn load(path: &Path) -> Result<SigningKey, ConfigError> {
        let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let invalid = |what: &str| {
            ConfigError::Invalid(format!(
                "{}: {what}; create one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`",
                path.display()
            ))
        };
        let key = rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|_| invalid("not a PEM private key"))?
            .ok_or_else(|| invalid("holds no PEM private key"))?;
        match key {
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(der) => {
                SigningKey::from_pkcs8(der.secret_pkcs8_der())
                    .map_err(|_| invalid("not an EC P-256 key"))
            }
            _ => Err(invalid(
                "not in PKCS#8 form (convert it with `openssl pkcs8 -topk8 -nocrypt`)",
            )),
        }
    }

    pub fn generate() -> SigningKey {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .expect("the system random source works");
        SigningKey::from_pkcs8(pkcs8.as_ref()).expect("a freshly generated key is valid")
    }

    fn from_pkcs8(der: &[u8]) -> Result<SigningKey, ring::error::KeyRejected> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())?;
        let point = pair.public_key().as_ref();
        let (x, y) = (&point[1..33], &point[33..]);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let decoding = DecodingKey::from_ec_components(&b64.encode(x), &b64.encode(y))
            .expect("a P-256 point splits into valid coordinates");
        Ok(SigningKey {
            encoding: EncodingKey::from_ec_der(der),
            decoding,
            kid: libtrust_key_id(&p256_spki(point)),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// A token as the token endpoint returns it.
pub struct IssuedToken {
    pub token: String,
    pub expires_in: u64,
}

/// Issues this registry's tokens.
pub(super) struct TokenIssuer {
    key: Arc<SigningKey>,
    issuer: String,
    service: String,
    lifetime: u64,
}

impl TokenIssuer {
    pub(super) fn new(key: Arc<SigningKey>, config: &TokenConfig) -> TokenIssuer {
        TokenIssuer {
            key,
            issuer: config.issuer.clone(),
            service: config.service.clone(),
            lifetime: config.lifetime_seconds,
        }
    }

    pub(super) fn service(&self) -> &str {
        &self.service
    }

    /// A token for `subject` (empty for anonymous) carrying exactly `access`.
    pub(super) fn issue(&self, subject: &str, access: &[AccessEntry]) -> IssuedToken {
        let now = unix_now();
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".into());
        header.kid = Some(self.key.kid.clone());
        let claims = IssuedClaims {
            iss: &self.issuer,
            sub: subject,
            aud: &self.service,
            exp: now + self.lifetime,
            nbf: now.saturating_sub(1),
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key.encoding)
            .expect("an ES256 key signs any claims");
        IssuedToken {
            token,
            expires_in: self.lifetime,
        }
    }
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct VerifiedToken {
    /// `None` for an anonymous token.
    pub user: Option<String>,
    /// Group memberships from a trusted issuer's groups claim.
    pub groups: Vec<String>,
    /// The `access` claim; a trusted issuer's token without one is judged by the policy instead.
    pub access: Option<Vec<AccessEntry>>,
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum TokenError {
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    #[error("token is not signed by a trusted key")]
    UnknownKey,
    #[error("token rejected: {0}")]
    Rejected(#[from] jsonwebtoken::errors::Error),
}

#[derive(Clone)]
struct KeyEntry {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: &'static [Algorithm],
}

/// Keys of a trusted issuer: fixed ones from certificates, or a JWKS document fetched on demand.
enum KeySource {
    Fixed(Vec<KeyEntry>),
    Jwks {
        url: String,
        client: reqwest::Client,
        keys: RwLock<Arc<Vec<KeyEntry>>>,
        last_fetch: Mutex<Option<Instant>>,
    },
}

struct Trusted {
    /// Prefix of the principals its tokens name.
    name: String,
    trust_access_claim: bool,
    issuer: String,
    audience: String,
    user_claim: String,
    groups_claim: Option<String>,
    keys: KeySource,
}

fn keys_from_pem_bundle(path: &Path) -> Result<Vec<KeyEntry>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let blocks = pem::parse_many(&text)
        .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for block in blocks {
        let encoded = pem::encode(&block);
        let key = DecodingKey::from_ec_pem(encoded.as_bytes())
            .map(|key| (key, EC_ALGORITHMS))
            .or_else(|_| {
                DecodingKey::from_rsa_pem(encoded.as_bytes()).map(|key| (key, RSA_ALGORITHMS))
            })
            .map_err(|e| {
                ConfigError::Invalid(format!(
                    "{}: a {} block is not a usable EC or RSA key: {e}",
                    path.display(),
                    block.tag()
                ))
            })?;
        keys.push(KeyEntry {
            kid: None,
            key: key.0,
            algorithms: key.1,
        });
    }
    if keys.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{} holds no PEM certificate or public key",
            path.display()
        )));
    }
    Ok(keys)
}

fn keys_from_jwks(jwks: &JwkSet) -> Vec<KeyEntry> {
    jwks.keys
        .iter()
        .filter_map(|jwk| {
            let algorithms = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => EC_ALGORITHMS,
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => RSA_ALGORITHMS,
                _ => return None,
            };
            Some(KeyEntry {
                kid: jwk.common.key_id.clone(),
                key: DecodingKey::from_jwk(jwk).ok()?,
                algorithms,
            })
        })
        .collect()
}

/// Whether `name` can name a trusted issuer: short, lower case, and free of the `:` that separates
/// it from the names its tokens carry.
pub(super) fn valid_issuer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl Trusted {
    fn new(config: &TrustedIssuer, service: &str) -> Result<Trusted, ConfigError> {
        if !valid_issuer_name(&config.name) {
            return Err(ConfigError::Invalid(format!(
                "trusted issuer {:?}: name {:?} must be 1-64 characters of a-z, 0-9, '.', '_' and '-'",
                config.issuer, config.name
            )));
        }
        let keys = match (&config.certificates, &config.jwks_url) {
            (Some(path), None) => KeySource::Fixed(keys_from_pem_bundle(path)?),
            (None, Some(url)) => KeySource::Jwks {
                url: url.clone(),
                client: crate::config::outbound_client(
                    config.ca_file.as_deref(),
                    Duration::from_secs(10),
                    "JWKS",
                )?,
                keys: RwLock::new(Arc::new(Vec::new())),
                last_fetch: Mutex::new(None),
            },
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "trusted issuer {:?}: set exactly one of certificates and jwks_url",
                    config.issuer
                )));
            }
        };
        Ok(Trusted {
            name: config.name.clone(),
            trust_access_claim: config.trust_access_claim,
            issuer: config.issuer.clone(),
            audience: config
                .audience
                .clone()
                .unwrap_or_else(|| service.to_owned()),
            user_claim: config.user_claim.clone(),
            groups_claim: config.groups_claim.clone(),
            keys,
        })
    }

    /// Fetches the JWKS document unless it was fetched within [`JWKS_REFETCH_INTERVAL`].
    async fn refresh(&self) {
        let KeySource::Jwks {
            url,
            client,
            keys,
            last_fetch,
        } = &self.keys
        else {
            return;
        };
        {
            let mut last = last_fetch.lock().expect("JWKS fetch lock");
            if last.is_some_and(|at| at.elapsed() < JWKS_REFETCH_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let fetched = async {
            let response = client.get(url).send().await?.error_for_status()?;
            response.json::<JwkSet>().await
        };
        match fetched.await {
            Ok(jwks) => {
                let entries = keys_from_jwks(&jwks);
                tracing::info!(issuer = %self.issuer, keys = entries.len(), "fetched JWKS");
                *keys.write().expect("JWKS keys lock") = Arc::new(entries);
            }
            Err(err) => {
                tracing::warn!(issuer = %self.issuer, %url, error = %err, "fetching JWKS failed")
            }
        }
    }

    fn candidates(&self, kid: Option<&str>) -> Vec<KeyEntry> {
        let pick = |entries: &[KeyEntry]| {
            entries
                .iter()
                .filter(|e| kid.is_none() || e.kid.is_none() || e.kid.as_deref() == kid)
                .cloned()
                .collect()
        };
        match &self.keys {
            KeySource::Fixed(entries) => pick(entries),
            KeySource::Jwks { keys, .. } => pick(&keys.read().expect("JWKS keys lock")),
        }
    }
}

fn validation(issuer: &str, audience: &str, algorithms: &[Algorithm]) -> Validation {
    let mut validation = Validation::new(Algorithm::ES256);
    validation.algorithms = algorithms.to_vec();
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation
}

/// Verifies bearer tokens, remembering the ones that passed until they expire.
pub(super) struct TokenVerifier {
    own_key: Arc<SigningKey>,
    own_issuer: String,
    service: String,
    trusted: Vec<Trusted>,
    verified: quick_cache::sync::Cache<[u8; 32], Arc<VerifiedToken>>,
}

#[derive(Deserialize)]
struct IssuerOnly {
    iss: Option<String>,
}

impl TokenVerifier {
    pub(super) fn new(
        own_key: Arc<SigningKey>,
        config: &TokenConfig,
    ) -> Result<TokenVerifier, ConfigError> {
        let trusted: Vec<Trusted> = config
            .trusted_issuers
            .iter()
            .map(|issuer| Trusted::new(issuer, &config.service))
            .collect::<Result<_, _>>()?;
        let mut names = std::collections::HashSet::new();
        if let Some(twice) = trusted.iter().find(|t| !names.insert(t.name.as_str())) {
            return Err(ConfigError::Invalid(format!(
                "two trusted issuers are named {:?}",
                twice.name
            )));
        }
        Ok(TokenVerifier {
            own_key,
            own_issuer: config.issuer.clone(),
            service: config.service.clone(),
            trusted,
            verified: quick_cache::sync::Cache::new(VERIFIED_CACHE_ENTRIES),
        })
    }

    /// Fetches every trusted issuer's JWKS document.
    pub(super) async fn fetch_keys(&self) {
        for trusted in &self.trusted {
            trusted.refresh().await;
        }
    }

    pub(super) async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, TokenError> {
        let fingerprint: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        if let Some(hit) = self.verified.get(&fingerprint)
            && hit.expires_at + LEEWAY_SECONDS > now
        {
            return Ok(hit);
        }
        let verified = Arc::new(self.verify_uncached(token).await?);
        self.verified.insert(fingerprint, verified.clone());
        Ok(verified)
    }

    async fn verify_uncached(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let payload = token.split('.').nth(1).ok_or(TokenError::Malformed)?;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| TokenError::Malformed)?;
        let issuer = serde_json::from_slice::<IssuerOnly>(&payload)
            .map_err(|_| TokenError::Malformed)?
            .iss
            .ok_or(TokenError::UnknownIssuer)?;
        if issuer == self.own_issuer {
            if header
                .kid
                .as_deref()
                .is_some_and(|kid| kid != self.own_key.kid)
            {
                return Err(TokenError::UnknownKey);
            }
            let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &self.own_key.decoding,
                &validation(&self.own_issuer, &self.service, &[Algorithm::ES256]),
            )?
            .claims;
            return Ok(read_claims(&claims, "sub", None, None));
        }
        let trusted = self
            .trusted
            .iter()
            .find(|t| t.issuer == issuer)
            .ok_or(TokenError::UnknownIssuer)?;
        let kid = header.kid.as_deref();
        let mut candidates = trusted.candidates(kid);
        if candidates.is_empty() {
            trusted.refresh().await;
            candidates = trusted.candidates(kid);
        }
        let mut last_error = TokenError::UnknownKey;
        for entry in candidates {
            let validation = validation(&trusted.issuer, &trusted.audience, entry.algorithms);
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &entry.key,
                &validation,
            ) {
                Ok(data) => {
                    let mut verified = read_claims(
                        &data.claims,
                        &trusted.user_claim,
                        trusted.groups_claim.as_deref(),
                        Some(&trusted.name),
                    );
                    if !trusted.trust_access_claim {
                        verified.access = None;
                    }
                    return Ok(verified);
                }
                Err(err) => {
                    if !matches!(
                        err.kind(),
                        jsonwebtoken::errors::ErrorKind::InvalidSignature
                            | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                    ) {
                        last_error = TokenError::Rejected(err);
                    }
                }
            }
        }
        Err(last_error)
    }
}

/// The bearer a token describes. Names from a trusted issuer get its `namespace` as a prefix.
fn read_claims(
    claims: &serde_json::Map<String, serde_json::Value>,
    user_claim: &str,
    groups_claim: Option<&str>,
    namespace: Option<&str>,
) -> VerifiedToken {
    let named = |name: &str| match namespace {
        Some(namespace) => format!("{namespace}:{name}"),
        None => name.to_owned(),
    };
    let user = claims
        .get(user_claim)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(named);
    let groups = match groups_claim.and_then(|c| claims.get(c)) {
        Some(serde_json::Value::String(s)) => s.split_whitespace().map(named).collect(),
        Some(serde_json::Value::Array(values)) => values
            .iter()
            .filter_map(|v| v.as_str().map(named))
            .collect(),
        _ => Vec::new(),
    };
    let access = claims
        .get("access")
        .and_then(|v| serde_json::from_value::<Vec<AccessEntry>>(v.clone()).ok());
    VerifiedToken {
        user,
        groups,
        access,
        expires_at: claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TokenConfig {
        TokenConfig::default()
    }

    fn entry(name: &str, actions: &[&str]) -> AccessEntry {
        AccessEntry {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn libtrust_key_ids_have_twelve_groups_of_four() {
        let kid = libtrust_key_id(b"any key");
        assert_eq!(kid.len(), 59);
        assert_eq!(kid.split(':').count(), 12);
        assert!(kid.split(':').all(|g| {
            g.len() == 4
                && g.bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        }));
    }

    #[tokio::test]
    async fn issued_tokens_verify_and_carry_their_access() {
        let key = Arc::new(SigningKey::generate());
        let issuer = TokenIssuer::new(key.clone(), &config());
        let verifier = TokenVerifier::new(key, &config()).unwrap();
        let access = vec![entry("a/b", &["pull", "push"])];
        let token = issuer.issue("alice", &access).token;
        let verified = verifier.verify(&token).await.unwrap();
        assert_eq!(verified.user.as_deref(), Some("alice"));
        assert_eq!(verified.access.as_deref(), Some(&access[..]));
        assert!(verified.access.as_ref().unwrap()[0].allows("repository", "a/b", "push"));
        assert!(!verified.access.as_ref().unwrap()[0].allows("repository", "a/c", "pull"));
        let anonymous = verifier.verify(&issuer.issue("", &[]).token).await.unwrap();
        assert_eq!(anonymous.user, None);
    }

    #[tokio::test]
    async fn foreign_keys_tampering_and_other_services_are_refused() {
        let key = Arc::new(SigningKey::generate());
        let verifier = TokenVerifier::new(key.clone(), &config()).unwrap();
        let stranger = TokenIssuer::new(Arc::new(SigningKey::generate()), &config());
        let forged = stranger.issue("alice", &[entry("a", &["*"])]).token;
        assert!(verifier.verify(&forged).await.is_err());

        let other_service = TokenConfig {
            service: "another-registry".into(),
            ..config()
        };
        let wrong_audience = TokenIssuer::new(key.clone(), &other_service)
            .issue("alice", &[])
            .token;
        assert!(verifier.verify(&wrong_audience).await.is_err());

        let genuine = TokenIssuer::new(key, &config())
            .issue("alice", &[entry("a", &["pull"])])
            .token;
        let mut parts: Vec<String> = genuine.split('.').map(str::to_owned).collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
        claims["access"][0]["actions"] = serde_json::json!(["push"]);
        parts[1] = b64.encode(claims.to_string());
        assert!(verifier.verify(&parts.join(".")).await.is_err());

        // alg: none, unsigned.
        let none_header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(verifier.verify(&unsigned).await.is_err());
    }

    #[tokio::test]
    async fn expired_tokens_are_refused() {
        let key = Arc::new(SigningKey::generate());
        let verifier = TokenVerifier::new(key.clone(), &config()).unwrap();
        let now = unix_now();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        let claims = serde_json::json!({
            "iss": "berth-registry", "sub": "alice", "aud": "berth-registry",
            "exp": now - 120, "nbf": now - 400, "iat": now - 400, "access": [],
        });
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap();
        assert!(matches!(
            verifier.verify(&token).await,
            Err(TokenError::Rejected(_))
        ));
    }

    /// A key pair as an outside issuer would hold it: the signing key and its public half as
    /// SubjectPublicKeyInfo DER.
    fn outside_key() -> (SigningKey, Vec<u8>) {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &SystemRandom::new(),
        )
        .unwrap();
        let spki = p256_spki(pair.public_key().as_ref());
        (SigningKey::from_pkcs8(pkcs8.as_ref()).unwrap(), spki)
    }

    fn uaa_token(key: &SigningKey, kid: Option<&str>, audience: &str) -> String {
        let now = unix_now();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        let claims = serde_json::json!({
            "iss": "https://uaa.example/oauth/token", "aud": audience, "exp": now + 60,
            "user_name": "carol", "scope": "openid berth.admins",
        });
        jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
    }

    fn trusted(extra: serde_json::Value) -> TokenConfig {
        let mut issuer = serde_json::json!({
            "name": "uaa",
            "issuer": "https://uaa.example/oauth/token",
            "user_claim": "user_name",
            "groups_claim": "scope",
        });
        issuer
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        TokenConfig {
            trusted_issuers: vec![serde_json::from_value(issuer).unwrap()],
            ..config()
        }
    }

    #[tokio::test]
    async fn trusted_issuers_by_certificate_bundle() {
        let (uaa, spki) = outside_key();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("uaa.pem");
        std::fs::write(&bundle, pem::encode(&pem::Pem::new("PUBLIC KEY", spki))).unwrap();
        let config = trusted(serde_json::json!({ "certificates": bundle }));
        let verifier = TokenVerifier::new(Arc::new(SigningKey::generate()), &config).unwrap();
        let verified = verifier
            .verify(&uaa_token(&uaa, None, "berth-registry"))
            .await
            .unwrap();
        assert_eq!(verified.user.as_deref(), Some("uaa:carol"));
        assert_eq!(verified.groups, ["uaa:openid", "uaa:berth.admins"]);
        assert_eq!(verified.access, None);
        assert!(
            verifier
                .verify(&uaa_token(&uaa, None, "elsewhere"))
                .await
                .is_err()
        );
        let (impostor, _) = outside_key();
        assert!(
            verifier
                .verify(&uaa_token(&impostor, None, "berth-registry"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_trusted_issuers_access_claim_counts_only_where_configured() {
        let (uaa, spki) = outside_key();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("uaa.pem");
        std::fs::write(&bundle, pem::encode(&pem::Pem::new("PUBLIC KEY", spki))).unwrap();
        let claims = serde_json::json!({
            "iss": "https://uaa.example/oauth/token", "aud": "berth-registry",
            "exp": unix_now() + 60, "user_name": "carol",
            "access": [{"type": "repository", "name": "cache/x", "actions": ["push"]}],
        });
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &uaa.encoding).unwrap();
        for (trust, expected) in [
            (false, None),
            (true, Some(vec![entry("cache/x", &["push"])])),
        ] {
            let config = trusted(serde_json::json!({
                "certificates": bundle, "trust_access_claim": trust,
            }));
            let verifier = TokenVerifier::new(Arc::new(SigningKey::generate()), &config).unwrap();
            let verified = verifier.verify(&token).await.unwrap();
            assert_eq!(verified.access, expected, "trust_access_claim: {trust}");
        }
    }

    #[test]
    fn trusted_issuers_need_distinct_plain_names() {
        let (_, spki) = outside_key();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("uaa.pem");
        std::fs::write(&bundle, pem::encode(&pem::Pem::new("PUBLIC KEY", spki))).unwrap();
        for name in ["", "UAA", "u:a", "a b"] {
            let config = trusted(serde_json::json!({ "certificates": bundle, "name": name }));
            assert!(
                TokenVerifier::new(Arc::new(SigningKey::generate()), &config).is_err(),
                "{name:?}"
            );
        }
        let mut config = trusted(serde_json::json!({ "certificates": bundle }));
        config
            .trusted_issuers
            .push(config.trusted_issuers[0].clone());
        assert!(TokenVerifier::new(Arc::new(SigningKey::generate()), &config).is_err());
    }

    #[tokio::test]
    async fn trusted_issuers_by_jwks_fetched_on_an_unknown_kid() {
        let (uaa, spki) = outside_key();
        let point = &spki[26..];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "kid": "uaa-1", "use": "sig", "alg": "ES256",
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..]),
        }]});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token_keys", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/token_keys",
            axum::routing::get(move || async move { axum::Json(jwks) }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = trusted(serde_json::json!({ "jwks_url": url }));
        let verifier = TokenVerifier::new(Arc::new(SigningKey::generate()), &config).unwrap();
        // Nothing fetched yet: the unknown kid triggers the fetch.
        let verified = verifier
            .verify(&uaa_token(&uaa, Some("uaa-1"), "berth-registry"))
            .await
            .unwrap();
        assert_eq!(verified.user.as_deref(), Some("uaa:carol"));
        assert!(
            verifier
                .verify(&uaa_token(&uaa, Some("uaa-2"), "berth-registry"))
                .await
                .is_err()
        );
    }
}
