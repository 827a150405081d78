//! The cacher's own configuration (provided by the operator, never by the app): where the internal
//! registry is, how to reach and authenticate to it, and the caching policy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::reference::ImageReference;
use crate::secret::Secret;

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "BERTH_CACHER_CONFIG";
/// File looked for next to the executable when [`CONFIG_ENV`] is unset: the BOSH job ships it in
/// the lifecycle bundle beside the builder.
pub const CONFIG_FILE_NAME: &str = "berth-cacher.yml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, serde_norway::Error),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacherConfig {
    pub registry: InternalRegistry,
    /// First path component of every cache repository.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Hex key that makes each app's repository name unguessable but stable across stagings.
    /// Without it every staging gets a fresh random repository.
    #[serde(default)]
    pub repository_key: Option<Secret>,
    /// Cache every app unless it opts out, instead of only apps that opt in.
    #[serde(default)]
    pub cache_by_default: bool,
    /// Platform picked from multi-platform images.
    #[serde(default = "default_platform")]
    pub platform: String,
    /// Also copy every other platform and the index itself.
    #[serde(default)]
    pub keep_index: bool,
    /// Blobs copied at the same time.
    #[serde(default = "default_parallel")]
    pub parallel_blobs: usize,
    /// Attempts per request or blob before the copy fails.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// How long copying an image may take before the cacher stops it.
    #[serde(default = "default_copy_timeout")]
    pub copy_timeout_seconds: u64,
    /// What a staging does when the internal registry cannot take the copy.
    #[serde(default)]
    pub on_cache_failure: OnCacheFailure,
    /// Source registries the internal registry mirrors as a pull-through cache, each with the
    /// prefix it mirrors it under (`docker.io: hub`): public images of these registries are read
    /// through it, so a foundation pulls each from the Internet once.
    #[serde(default)]
    pub proxies: BTreeMap<String, String>,
}

/// What becomes of a staging whose image cannot be cached: the internal registry is unreachable,
/// full, over quota or refuses the copy, or the copy runs out of time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCacheFailure {
    /// Stage with the original reference, as the builder does without caching, and warn: an
    /// outage of the internal registry must not stop apps from staging.
    #[default]
    StageUncached,
    /// Fail the staging.
    Fail,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalRegistry {
    /// `https://host:port` or, on a trusted network, `http://host:port`.
    pub url: String,
    /// `host[:port]` written into image references; defaults to the URL's.
    #[serde(default)]
    pub name: Option<String>,
    /// Extra PEM roots to trust for the internal registry.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// How the cacher proves who it is besides (or instead of) a password.
    #[serde(default)]
    pub identity: Option<RegistryIdentity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryIdentity {
    /// The staging container's instance identity certificate (`CF_INSTANCE_CERT`,
    /// `CF_INSTANCE_KEY`) as the TLS client identity: no password, and the app's repositories
    /// are under the GUID the certificate names.
    Instance,
}

fn default_namespace() -> String {
    "cache".into()
}
fn default_platform() -> String {
    "linux/amd64".into()
}
/// Enough streams that one blob's commit (its fsync) overlaps others' transfers; beyond that,
/// more streams only contend for the cores (`ci/bench --only cacher` compares).
fn default_parallel() -> usize {
    8
}
fn default_attempts() -> u32 {
    5
}
/// Within Cloud Controller's default staging timeout (15 minutes), leaving time for the rest of
/// the staging, so the staging log says why the copy ended instead of the staging being killed
/// without a word.
fn default_copy_timeout() -> u64 {
    600
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

impl CacherConfig {
    pub fn load(path: &Path) -> Result<CacherConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let config: CacherConfig =
            serde_norway::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        config.validate()?;
        Ok(config)
    }

    /// Finds the configuration: `$BERTH_CACHER_CONFIG`, else the file beside the executable.
    /// `None` means caching is not set up and the cacher acts as the plain builder.
    pub fn discover() -> Result<Option<CacherConfig>, ConfigError> {
        if let Some(path) = std::env::var_os(CONFIG_ENV) {
            return CacherConfig::load(Path::new(&path)).map(Some);
        }
        let beside_exe = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(CONFIG_FILE_NAME)));
        match beside_exe {
            Some(path) if path.is_file() => CacherConfig::load(&path).map(Some),
            _ => Ok(None),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !(self.registry.url.starts_with("https://") || self.registry.url.starts_with("http://"))
        {
            return invalid(format!(
                "registry.url {:?} must start with https:// or http://",
                self.registry.url
            ));
        }
        if self.namespace.parse::<berth_oci::RepoName>().is_err() || self.namespace.contains('/') {
            return invalid(format!(
                "namespace {:?} must be one lowercase repository path component",
                self.namespace
            ));
        }
        if self.registry.username.is_some() != self.registry.password.is_some() {
            return invalid("registry.username and registry.password go together".into());
        }
        if self.registry.identity == Some(RegistryIdentity::Instance) {
            if self.registry.password.is_some() {
                return invalid(
                    "registry.identity instance needs no password: leave registry.username and \
                     registry.password out"
                        .into(),
                );
            }
            if !self.registry.url.starts_with("https://") {
                return invalid("registry.identity instance needs an https:// registry.url".into());
            }
        }
        if let Some(key) = &self.repository_key
            && (key.expose().len() < 32 || hex::decode(key.expose()).is_err())
        {
            return invalid("repository_key must be at least 16 bytes of hex".into());
        }
        if self.parallel_blobs == 0 || self.attempts == 0 || self.copy_timeout_seconds == 0 {
            return invalid(
                "parallel_blobs, attempts and copy_timeout_seconds must be at least 1".into(),
            );
        }
        crate::copy::Platform::parse(&self.platform)
            .map_err(|e| ConfigError::Invalid(format!("platform: {e}")))?;
        for (registry, prefix) in &self.proxies {
            // Keys are compared with the registry of a parsed reference, so they must be spelt
            // as parsing spells it: `docker.io`, never `registry-1.docker.io`.
            let spelt = ImageReference::parse(&format!("{registry}/proxied/name"))
                .ok()
                .map(|reference| reference.registry);
            if spelt.as_deref() != Some(registry.as_str()) || registry.contains('@') {
                return invalid(format!(
                    "proxies: {registry:?} is not a registry as image references name it \
                     (Docker Hub is docker.io; others are host or host:port)"
                ));
            }
            if prefix.parse::<berth_oci::RepoName>().is_err() || prefix.contains('/') {
                return invalid(format!(
                    "proxies: the prefix {prefix:?} of {registry} must be one lowercase \
                     repository path component"
                ));
            }
            if *prefix == self.namespace {
                return invalid(format!(
                    "proxies: the prefix {prefix:?} of {registry} is the cache namespace"
                ));
            }
        }
        Ok(())
    }

    /// The repository of the internal registry that mirrors `reference`'s, if its registry is
    /// proxied: `hub/library/alpine` for `alpine`.
    pub fn proxy_repository(&self, reference: &ImageReference) -> Option<berth_oci::RepoName> {
        let prefix = self.proxies.get(&reference.registry)?;
        format!("{prefix}/{}", reference.repository).parse().ok()
    }

    /// The `host[:port]` used in image references to the internal registry.
    pub fn registry_name(&self) -> String {
        if let Some(name) = &self.registry.name {
            return name.clone();
        }
        let without_scheme = self
            .registry
            .url
            .split_once("://")
            .map_or(self.registry.url.as_str(), |(_, rest)| rest);
        without_scheme.trim_end_matches('/').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<CacherConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yml");
        std::fs::write(&path, yaml).unwrap();
        CacherConfig::load(&path)
    }

    #[test]
    fn defaults_and_registry_name() {
        let config = parse("registry: {url: 'http://registry.internal:8080/'}").unwrap();
        assert_eq!(config.namespace, "cache");
        assert_eq!(config.platform, "linux/amd64");
        assert_eq!(config.registry_name(), "registry.internal:8080");
        assert!(!config.cache_by_default);
        assert_eq!(config.copy_timeout_seconds, 600);
        assert_eq!(config.on_cache_failure, OnCacheFailure::StageUncached);
        let failing = parse("registry: {url: 'http://r'}\non_cache_failure: fail").unwrap();
        assert_eq!(failing.on_cache_failure, OnCacheFailure::Fail);
        assert!(config.proxies.is_empty());
    }

    #[test]
    fn proxied_registries_map_to_repositories_under_their_prefix() {
        let config = parse(
            "registry: {url: 'http://r'}\nproxies: {docker.io: hub, ghcr.io: ghcr, \
             'localhost:5000': local}",
        )
        .unwrap();
        let proxied = |reference: &str| {
            config
                .proxy_repository(&ImageReference::parse(reference).unwrap())
                .map(|repo| repo.to_string())
        };
        assert_eq!(
            proxied("alpine:3.20").as_deref(),
            Some("hub/library/alpine")
        );
        assert_eq!(
            proxied("registry-1.docker.io/team/app").as_deref(),
            Some("hub/team/app")
        );
        assert_eq!(
            proxied("ghcr.io/org/tool").as_deref(),
            Some("ghcr/org/tool")
        );
        assert_eq!(proxied("localhost:5000/app").as_deref(), Some("local/app"));
        assert_eq!(proxied("quay.io/org/tool"), None);
    }

    #[test]
    fn rejects_what_would_fail_later() {
        for bad in [
            "registry: {url: 'registry:8080'}",
            "registry: {url: 'http://r'}\nnamespace: Bad",
            "registry: {url: 'http://r', username: u}",
            "registry: {url: 'http://r'}\nrepository_key: short",
            "registry: {url: 'http://r'}\nplatform: linux",
            "registry: {url: 'http://r'}\nunknown_key: 1",
            "registry: {url: 'http://r'}\ncopy_timeout_seconds: 0",
            "registry: {url: 'https://r', identity: instance, username: u, password: p}",
            "registry: {url: 'http://r', identity: instance}",
            "registry: {url: 'https://r', identity: password}",
            "registry: {url: 'http://r'}\non_cache_failure: retry",
            "registry: {url: 'http://r'}\nproxies: {docker.io: Hub}",
            "registry: {url: 'http://r'}\nproxies: {docker.io: hub/x}",
            "registry: {url: 'http://r'}\nproxies: {docker.io: cache}",
            "registry: {url: 'http://r'}\nproxies: {registry-1.docker.io: hub}",
            "registry: {url: 'http://r'}\nproxies: {'https://ghcr.io': ghcr}",
            "registry: {url: 'http://r'}\nproxies: {ghcr: ghcr}",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
