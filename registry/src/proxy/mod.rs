//! Pull-through cache: repositories under a configured prefix mirror an upstream registry, filled on demand and read-only to clients.
//!
//! A manifest is fetched when first asked for and stored with its tag; its blobs are recorded
//! from their descriptors and fetched when first pulled ([`fetch`]). A cached tag is checked
//! against the upstream with a `HEAD` at most once per `revalidate_seconds`; a manifest asked for
//! by digest is served from the cache without asking the upstream.

mod config;
mod fetch;
mod manifests;
mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use berth_oci::RepoName;

pub use config::UpstreamConfig;
pub(crate) use config::validate;
pub use fetch::{BlobFetches, Served, fetch_blob};
pub use manifests::refresh_manifest;
pub use upstream::{Upstream, UpstreamError};

use crate::api::AppState;
use crate::config::ConfigError;
use crate::error::RegistryError;
use crate::lease::{Held, Lease};

/// How often an instance waiting on another's upstream fetch looks for what it stored.
const FETCH_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Whose turn it is to fetch something from the upstream, among instances sharing the stores.
enum Turn {
    /// This instance's: it fetches, holding the lease (none when no other instance shares the
    /// stores) until [`Turn::done`].
    Mine(Option<Held>),
    /// Another instance fetched it meanwhile, and it is stored.
    Stored,
}

impl Turn {
    /// Takes the lease `name` for this instance or, while another instance holds it (fetching the
    /// same thing), waits until `stored` says that thing is stored. So concurrent first pulls
    /// through several instances make one upstream request, not one per instance.
    async fn take<Fut>(
        state: &AppState,
        name: String,
        mut stored: impl FnMut() -> Fut,
    ) -> Result<Turn, RegistryError>
    where
        Fut: Future<Output = Result<bool, RegistryError>>,
    {
        if !state.metadata.is_shared() {
            return Ok(Turn::Mine(None));
        }
        let lease = Lease::new(state.metadata.clone(), name, &state.instance);
        loop {
            if let Some(held) = lease.hold().await? {
                // The instance that held it before may have stored the thing just now.
                if stored().await? {
                    held.release().await;
                    return Ok(Turn::Stored);
                }
                return Ok(Turn::Mine(Some(held)));
            }
            tokio::time::sleep(FETCH_POLL).await;
            if stored().await? {
                return Ok(Turn::Stored);
            }
        }
    }

    /// Ends this instance's turn: the next instance to ask may fetch at once.
    async fn done(self) {
        if let Turn::Mine(Some(held)) = self {
            held.release().await;
        }
    }
}

/// A lease name for fetching `what`: hashed, since lease names are short and names may be long.
fn lease_name(kind: &str, what: &str) -> String {
    let key = berth_oci::Digest::sha256_of(what.as_bytes());
    format!("proxy-{kind}:{}", &key.hex()[..40])
}

/// A repository of a proxied prefix: the upstream it mirrors and its name there.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub upstream: Arc<Upstream>,
    pub remote: String,
}

/// Every configured upstream, and what the cache remembers in memory about them.
#[derive(Debug, Default)]
pub struct Proxy {
    upstreams: Vec<Arc<Upstream>>,
    /// When each cached tag (`repo:tag`) was last found current upstream. Kept in memory only:
    /// after a restart, or on another instance, a tag costs one more `HEAD`, which is free.
    checked: Mutex<HashMap<String, Instant>>,
    /// One manifest fetch per `repo:reference` at a time, so concurrent first pulls of a tag
    /// make one upstream `GET`.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub blobs: BlobFetches,
}

impl Proxy {
    /// Reads the credentials of `configs` and builds a client for each.
    pub fn new(configs: &[UpstreamConfig]) -> Result<Proxy, ConfigError> {
        validate(configs)?;
        let upstreams = configs
            .iter()
            .map(|config| Upstream::new(config).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Proxy {
            upstreams,
            ..Proxy::default()
        })
    }

    /// The upstream `repo` mirrors, if its first component is a proxied prefix.
    pub fn mirror(&self, repo: &RepoName) -> Option<Mirror> {
        let (prefix, name) = repo.as_str().split_once('/')?;
        let upstream = self.upstreams.iter().find(|u| u.prefix == prefix)?;
        Some(Mirror {
            upstream: upstream.clone(),
            remote: upstream.remote_name(name),
        })
    }

    /// The one local name of what `repo` mirrors: Docker Hub's `alpine` is `library/alpine`, so
    /// `hub/alpine` and `hub/library/alpine` share one cache and cost one Hub pull, not two.
    pub fn canonical(&self, repo: RepoName) -> RepoName {
        let Some(mirror) = self.mirror(&repo) else {
            return repo;
        };
        let local = format!("{}/{}", mirror.upstream.prefix, mirror.remote);
        if local == repo.as_str() {
            repo
        } else {
            local.parse().unwrap_or(repo)
        }
    }

    /// Whether `repo` belongs to a proxied prefix (the prefix alone is no repository of it, but
    /// is refused writes all the same, so nothing is pushed where a mirror would appear).
    pub fn is_proxied(&self, repo: &RepoName) -> bool {
        let prefix = repo.as_str().split('/').next().unwrap_or_default();
        self.upstreams.iter().any(|u| u.prefix == prefix)
    }

    fn checked_within(&self, key: &str, window: std::time::Duration) -> bool {
        self.checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .is_some_and(|at| at.elapsed() < window)
    }

    fn mark_checked(&self, key: String) {
        self.checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Instant::now());
    }

    /// Runs `work` alone among the callers for `key`.
    async fn one_at_a_time<T>(&self, key: &str, work: impl Future<Output = T>) -> T {
        let lock = self
            .fetching
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_default()
            .clone();
        let result = {
            let _turn = lock.lock().await;
            work.await
        };
        let mut fetching = self.fetching.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's own reference and ours: nobody else waits, so the entry can go.
        if Arc::strong_count(&lock) == 2 {
            fetching.remove(key);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy() -> Proxy {
        let hub = UpstreamConfig::hub("hub");
        let ghcr = UpstreamConfig {
            prefix: "ghcr".into(),
            url: "https://ghcr.io".into(),
            docker_hub: false,
            ..hub.clone()
        };
        Proxy::new(&[hub, ghcr]).unwrap()
    }

    fn mirror(proxy: &Proxy, repo: &str) -> Option<(String, String)> {
        let mirror = proxy.mirror(&repo.parse().unwrap())?;
        Some((mirror.upstream.prefix.clone(), mirror.remote))
    }

    #[test]
    fn local_names_map_to_upstream_names() {
        let proxy = proxy();
        let hub = |remote: &str| Some(("hub".to_owned(), remote.to_owned()));
        assert_eq!(mirror(&proxy, "hub/alpine"), hub("library/alpine"));
        assert_eq!(mirror(&proxy, "hub/library/alpine"), hub("library/alpine"));
        assert_eq!(mirror(&proxy, "hub/bitnami/redis"), hub("bitnami/redis"));
        assert_eq!(
            mirror(&proxy, "ghcr/alpine"),
            Some(("ghcr".to_owned(), "alpine".to_owned()))
        );
        assert_eq!(mirror(&proxy, "hub"), None);
        assert_eq!(mirror(&proxy, "hubx/alpine"), None);
        assert_eq!(mirror(&proxy, "cache/hub/alpine"), None);
        assert!(proxy.is_proxied(&"hub".parse().unwrap()));
        let canonical = |repo: &str| proxy.canonical(repo.parse().unwrap()).to_string();
        assert_eq!(canonical("hub/alpine"), "hub/library/alpine");
        assert_eq!(canonical("hub/library/alpine"), "hub/library/alpine");
        assert_eq!(canonical("hub/bitnami/redis"), "hub/bitnami/redis");
        assert_eq!(canonical("ghcr/alpine"), "ghcr/alpine");
        assert_eq!(canonical("hub"), "hub");
        assert_eq!(canonical("cache/alpine"), "cache/alpine");
        // Too long with `library/`: left as it is (the upstream is asked for the long name).
        let long = format!("hub/{}", "a".repeat(250));
        assert_eq!(canonical(&long), long);
        assert!(!proxy.is_proxied(&"cache/hub".parse().unwrap()));
    }
}
