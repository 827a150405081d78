//! The `proxy:` section: which local prefix mirrors which upstream registry, and how to log in to it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// One upstream registry mirrored under a local prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The first path component of the local repositories that mirror this upstream (`hub`).
    pub prefix: String,
    /// The upstream's base URL (`https://registry-1.docker.io`).
    pub url: String,
    /// Docker Hub's naming: a single-component name (`alpine`) is `library/alpine` there.
    #[serde(default)]
    pub docker_hub: bool,
    /// Pull as this user instead of anonymously; needs `password_file`.
    pub username: Option<String>,
    /// The password (or access token) of `username`, in a file read at start-up.
    pub password_file: Option<PathBuf>,
    /// PEM certificates to trust for this upstream besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A cached tag is checked against the upstream (with a `HEAD`, which Docker Hub does not
    /// count as a pull) at most this often.
    #[serde(default = "default_revalidate_seconds")]
    pub revalidate_seconds: u64,
}

fn default_revalidate_seconds() -> u64 {
    300
}

impl UpstreamConfig {
    pub fn revalidate_after(&self) -> Duration {
        Duration::from_secs(self.revalidate_seconds)
    }

    /// The credentials from `username` and `password_file`, read now.
    pub(super) fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        let (Some(username), Some(file)) = (&self.username, &self.password_file) else {
            return Ok(None);
        };
        Ok(Some(Credentials {
            username: username.clone(),
            password: read_secret(file)?,
        }))
    }
}

/// A username and password for an upstream. Its `Debug` leaves the password out, so no log line
/// or error can carry it.
#[derive(Clone)]
pub(super) struct Credentials {
    pub(super) username: String,
    pub(super) password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

fn read_secret(file: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.into(),
        source,
    })?;
    // Files written by hand or by BOSH templates end with a newline that is no part of it.
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Whether `text` is one repository path component as the distribution spec spells it:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(text: &str) -> bool {
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let separators = text.split(alphanumeric).filter(|run| !run.is_empty());
    let mut runs_ok = true;
    for run in separators {
        runs_ok &= matches!(run, "." | "_" | "__") || run.chars().all(|c| c == '-');
    }
    runs_ok && text.starts_with(alphanumeric) && text.ends_with(alphanumeric)
}

/// Checks every upstream on its own and against the others.
pub(crate) fn validate(upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
    let invalid = |prefix: &str, message: String| {
        ConfigError::Invalid(format!("proxy upstream {prefix:?}: {message}"))
    };
    let mut prefixes = HashSet::new();
    for upstream in upstreams {
        let prefix = upstream.prefix.as_str();
        if !is_path_component(prefix) {
            return Err(invalid(
                prefix,
                "prefix must be one repository path component (lowercase letters, digits, \
                 separated by '.', '_', '__' or '-')"
                    .into(),
            ));
        }
        // Prefixes are single components, so two overlap exactly when they are equal.
        if !prefixes.insert(prefix) {
            return Err(invalid(prefix, "prefix is configured twice".into()));
        }
        let url = url::Url::parse(&upstream.url)
            .map_err(|e| invalid(prefix, format!("url {:?}: {e}", upstream.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                prefix,
                format!("url {:?} must be http(s)://host", upstream.url),
            ));
        }
        if upstream.username.is_some() != upstream.password_file.is_some() {
            return Err(invalid(
                prefix,
                "username and password_file go together".into(),
            ));
        }
        if upstream.revalidate_seconds == 0 {
            // Zero would turn every pull of a tag into an upstream request, which a registry
            // cache is there to avoid; a short interval does the same job.
            return Err(invalid(
                prefix,
                "revalidate_seconds must be at least 1".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
impl UpstreamConfig {
    /// Docker Hub mirrored anonymously under `prefix` with the default window: the tests' usual
    /// upstream, changed field by field where a test needs another.
    pub(crate) fn hub(prefix: &str) -> UpstreamConfig {
        UpstreamConfig {
            prefix: prefix.into(),
            url: "https://registry-1.docker.io".into(),
            docker_hub: true,
            username: None,
            password_file: None,
            ca_file: None,
            revalidate_seconds: 300,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_single_unique_path_components() {
        for good in ["hub", "ghcr.io", "quay", "a-b", "a__b", "x1"] {
            assert!(validate(&[UpstreamConfig::hub(good)]).is_ok(), "{good}");
        }
        for bad in [
            "", "Hub", "hub/x", "-hub", "hub-", "a..b", "a___b", "a._b", "hub:1", "*",
        ] {
            assert!(validate(&[UpstreamConfig::hub(bad)]).is_err(), "{bad:?}");
        }
        let twice = validate(&[
            UpstreamConfig::hub("hub"),
            UpstreamConfig::hub("ghcr"),
            UpstreamConfig::hub("hub"),
        ]);
        assert!(twice.unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn urls_and_credentials_are_checked() {
        let mut bad_url = UpstreamConfig::hub("hub");
        bad_url.url = "registry-1.docker.io".into();
        assert!(validate(&[bad_url]).is_err());
        let mut ftp = UpstreamConfig::hub("hub");
        ftp.url = "ftp://example.org".into();
        assert!(validate(&[ftp]).is_err());
        let mut half = UpstreamConfig::hub("hub");
        half.username = Some("me".into());
        assert!(
            validate(&[half])
                .unwrap_err()
                .to_string()
                .contains("together")
        );
        let mut never = UpstreamConfig::hub("hub");
        never.revalidate_seconds = 0;
        assert!(validate(&[never]).is_err());
    }

    #[test]
    fn credentials_come_from_the_file_and_stay_out_of_debug() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret-pass\n").unwrap();
        let mut config = UpstreamConfig::hub("hub");
        config.username = Some("puller".into());
        config.password_file = Some(file);
        let credentials = config.credentials().unwrap().unwrap();
        assert_eq!(credentials.password, "s3cret-pass");
        let shown = format!("{credentials:?}");
        assert!(
            shown.contains("puller") && !shown.contains("s3cret"),
            "{shown}"
        );
        config.password_file = Some(dir.path().join("missing"));
        assert!(config.credentials().is_err());
    }

    #[test]
    fn the_section_parses_with_defaults() {
        let parsed: Vec<UpstreamConfig> = serde_norway::from_str(
            "- prefix: hub\n  url: https://registry-1.docker.io\n  docker_hub: true\n\
             - prefix: ghcr\n  url: https://ghcr.io\n  revalidate_seconds: 60\n",
        )
        .unwrap();
        assert!(parsed[0].docker_hub && parsed[0].revalidate_seconds == 300);
        assert!(!parsed[1].docker_hub && parsed[1].revalidate_after() == Duration::from_secs(60));
        assert!(
            serde_norway::from_str::<Vec<UpstreamConfig>>("- prefix: a\n  url: x\n  bogus: 1\n")
                .is_err()
        );
    }
}
