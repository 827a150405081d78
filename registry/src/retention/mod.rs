//! Retention: which tags and manifests go before each garbage collection, so the collector then
//! frees their bytes.
//!
//! *Cache retention* covers what berth-cacher stores under `<namespace>/<app guid>/<id>`. A
//! *staging* is a manifest a tag points at in a repository under `<namespace>/<app guid>/`; its
//! time is when a tag was last pointed at it (the cacher tags every staging it pushes, so a
//! restage of the same image makes it new again). Of each app's stagings the newest
//! `keep_stagings` stay, and so does every staging pulled within `pulled_within_days`, pushed
//! within the grace period, or named by a droplet Cloud Controller still has (when asked to
//! check). The rest lose their tags, and their manifests go with the last tag.
//!
//! *Rules* do the same per tag for other repositories, Harbor-style: a tag matched by rules is
//! kept if any of them keeps it (among the newest `keep_last` it matches in its repository, or
//! pulled within `pulled_within_days`).
//!
//! Every deletion is one metadata transaction that checks again that the tag was not moved or
//! pushed again, and that no pull was recorded since the plan was made.

mod cloud_controller;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

pub use cloud_controller::{CloudController, CloudControllerError, InUse};

use crate::api::AppState;
use crate::config::ConfigError;
use crate::gc::GcReport;
use crate::metadata::{MetadataError, TaggedManifest};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Record the last pull (manifest GET) of each manifest.
    pub track_pulls: bool,
    /// Seconds between writes of the pulls noted meanwhile.
    pub pull_flush_seconds: u64,
    pub cache: CacheRetention,
    /// Retention for other repositories; none by default.
    pub rules: Vec<RetentionRule>,
    /// Keep every image a staged droplet names; retention deletes nothing in a run where Cloud
    /// Controller does not answer.
    pub cloud_controller: Option<CloudControllerConfig>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            track_pulls: true,
            pull_flush_seconds: 5,
            cache: CacheRetention::default(),
            rules: Vec::new(),
            cloud_controller: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheRetention {
    pub enabled: bool,
    /// The cacher's `namespace`.
    pub namespace: String,
    /// The newest stagings of each app that stay whatever else holds.
    pub keep_stagings: usize,
    /// Stagings pulled within this many days stay.
    pub pulled_within_days: u64,
}

impl Default for CacheRetention {
    fn default() -> Self {
        CacheRetention {
            enabled: true,
            namespace: "cache".into(),
            keep_stagings: 3,
            pulled_within_days: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// A repository name prefix (the repository itself and those below it), or `*` for all.
    pub repositories: String,
    /// Tags the rule covers: a pattern where `*` matches any run of characters and `?` one.
    #[serde(default = "every_tag")]
    pub tags: String,
    /// Keep the newest this many matching tags of each repository.
    pub keep_last: Option<usize>,
    /// Keep matching tags whose manifest was pulled within this many days.
    pub pulled_within_days: Option<u64>,
}

fn every_tag() -> String {
    "*".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudControllerConfig {
    /// Cloud Controller's API, e.g. `https://api.sys.example.com`.
    pub api_url: String,
    /// UAA, e.g. `https://uaa.sys.example.com`; tokens come from `<uaa_url>/oauth/token`.
    pub uaa_url: String,
    /// A UAA client with the client credentials grant and a read-only scope such as
    /// `cloud_controller.global_auditor`.
    pub client_id: String,
    /// File holding the client's secret.
    pub client_secret_file: PathBuf,
    /// Extra PEM certificates to trust for both.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

fn default_timeout() -> u64 {
    30
}

impl RetentionConfig {
    /// Checks what `config check` and start-up check.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.pull_flush_seconds == 0 {
            return invalid("retention.pull_flush_seconds must be greater than zero".into());
        }
        let cache = &self.cache;
        if cache.enabled {
            if cache.namespace.parse::<berth_oci::RepoName>().is_err() {
                return invalid(format!(
                    "retention.cache.namespace {:?}: expected a repository name prefix",
                    cache.namespace
                ));
            }
            if cache.keep_stagings == 0 {
                return invalid(
                    "retention.cache.keep_stagings must be at least 1, so an app keeps the staging it runs".into(),
                );
            }
        }
        for rule in &self.rules {
            let name = &rule.repositories;
            if name != "*" && name.parse::<berth_oci::RepoName>().is_err() {
                return invalid(format!(
                    "retention.rules repositories {name:?}: expected * or a repository name prefix"
                ));
            }
            if rule.tags.is_empty() {
                return invalid(format!("retention.rules {name:?}: tags must not be empty"));
            }
            if rule.keep_last.is_none() && rule.pulled_within_days.is_none() {
                return invalid(format!(
                    "retention.rules {name:?}: set keep_last, pulled_within_days or both"
                ));
            }
        }
        if let Some(cc) = &self.cloud_controller {
            CloudController::new(cc)?;
        }
        Ok(())
    }
}

/// Retention as configured, run by the collector.
pub struct Retention {
    config: RetentionConfig,
    cloud_controller: Option<CloudController>,
}

/// A tag to expire, and the pull time it must not have reached meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub tag: TaggedManifest,
    pub pulled_before: Option<SystemTime>,
    /// Whether the tag is a cache staging's.
    pub staging: bool,
}

/// What one run would expire.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub stagings: u64,
    pub expiries: Vec<Expiry>,
}

impl Retention {
    pub fn new(config: RetentionConfig) -> Result<Retention, ConfigError> {
        let cloud_controller = config
            .cloud_controller
            .as_ref()
            .map(CloudController::new)
            .transpose()?;
        Ok(Retention {
            config,
            cloud_controller,
        })
    }

    /// Whether there is anything to do at all.
    fn active(&self) -> bool {
        self.config.cache.enabled || !self.config.rules.is_empty()
    }

    /// Expires what the configuration says (dry: only counts it). Stagings and tags pushed after
    /// `young_after` stay. If Cloud Controller was to be asked and did not answer, nothing is
    /// deleted and the report says why.
    pub async fn run(
        &self,
        state: &AppState,
        young_after: SystemTime,
        report: &mut GcReport,
    ) -> Result<(), MetadataError> {
        if !self.active() {
            return Ok(());
        }
        let metadata = state.metadata.as_ref();
        // The decision sees every pull served so far.
        state.pulls.flush(metadata).await?;
        let in_use = match &self.cloud_controller {
            Some(cc) => match cc.in_use().await {
                Ok(in_use) => in_use,
                Err(err) => {
                    tracing::error!(error = %err, "Cloud Controller did not say which images droplets use; retention deletes nothing this run");
                    state.metrics.retention_skipped();
                    report.retention_skipped = Some(err.to_string());
                    return Ok(());
                }
            },
            None => InUse::default(),
        };
        let now = SystemTime::now();
        let mut plan = Plan::default();
        let mut listed = Vec::new();
        if self.config.cache.enabled {
            let cache = &self.config.cache;
            let tags = metadata.tags_under(&cache.namespace).await?;
            let cached = plan_cache(&tags, cache, now, young_after, &in_use);
            plan.stagings += cached.stagings;
            plan.expiries.extend(cached.expiries);
            listed = tags;
        }
        if !self.config.rules.is_empty() {
            let cache = self
                .config
                .cache
                .enabled
                .then_some(&self.config.cache.namespace);
            let tags = metadata.tags_under("").await?;
            let ruled = plan_rules(&tags, &self.config.rules, cache, now, young_after, &in_use);
            plan.expiries.extend(ruled.expiries);
            // Everything, the cache's tags included.
            listed = tags;
        }
        if report.dry_run {
            report.expired_stagings = plan.stagings;
            report.expired_tags = plan.expiries.len() as u64;
            report.expired_manifests = left_untagged(&plan.expiries, &listed);
            return Ok(());
        }
        // A staging counts once, if any of its tags went (a restage racing retention keeps it).
        let mut stagings = std::collections::HashSet::new();
        for expiry in &plan.expiries {
            let tag = &expiry.tag;
            let expired = metadata
                .expire_tag(
                    &tag.repo,
                    &tag.tag,
                    &tag.digest,
                    tag.tagged_at,
                    expiry.pulled_before,
                )
                .await?;
            report.expired_tags += expired.tags;
            report.expired_manifests += expired.manifests;
            if expiry.staging && expired.tags > 0 {
                stagings.insert((&tag.repo, &tag.digest));
            }
        }
        report.expired_stagings = stagings.len() as u64;
        Ok(())
    }
}

/// How many manifests `expiries` leave with no tag among `listed`: a dry run's count, which
/// leaves out the images of indexes.
fn left_untagged(expiries: &[Expiry], listed: &[TaggedManifest]) -> u64 {
    let key = |t: &TaggedManifest| (t.repo.as_str().to_owned(), t.digest.to_string());
    let mut remaining: HashMap<(String, String), usize> = HashMap::new();
    for tag in listed {
        *remaining.entry(key(tag)).or_default() += 1;
    }
    let mut untagged = 0;
    for expiry in expiries {
        if let Some(left) = remaining.get_mut(&key(&expiry.tag)) {
            *left -= 1;
            if *left == 0 {
                untagged += 1;
            }
        }
    }
    untagged
}

/// The app a repository under `namespace` belongs to: `<namespace>/<guid>/<more>`.
fn app_of<'a>(repo: &'a str, namespace: &str) -> Option<&'a str> {
    let rest = repo.strip_prefix(namespace)?.strip_prefix('/')?;
    let (guid, below) = rest.split_once('/')?;
    (!below.is_empty()).then_some(guid)
}

/// One staging: a manifest and the tags pointing at it.
struct Staging<'a> {
    tags: Vec<&'a TaggedManifest>,
    time: SystemTime,
    pulled_at: Option<SystemTime>,
}

pub fn plan_cache(
    tags: &[TaggedManifest],
    cache: &CacheRetention,
    now: SystemTime,
    young_after: SystemTime,
    in_use: &InUse,
) -> Plan {
    let pulled_since = now - DAY * cache.pulled_within_days as u32;
    let mut apps: HashMap<&str, HashMap<(&str, String), Staging<'_>>> = HashMap::new();
    for tag in tags {
        let Some(app) = app_of(tag.repo.as_str(), &cache.namespace) else {
            continue;
        };
        let staging = apps
            .entry(app)
            .or_default()
            .entry((tag.repo.as_str(), tag.digest.to_string()))
            .or_insert_with(|| Staging {
                tags: Vec::new(),
                time: tag.tagged_at,
                pulled_at: tag.pulled_at,
            });
        staging.time = staging.time.max(tag.tagged_at);
        staging.tags.push(tag);
    }
    let mut plan = Plan::default();
    for stagings in apps.into_values() {
        let mut stagings: Vec<_> = stagings.into_iter().collect();
        stagings.sort_by(|(a_key, a), (b_key, b)| b.time.cmp(&a.time).then(a_key.cmp(b_key)));
        for ((repo, digest), staging) in stagings.into_iter().skip(cache.keep_stagings) {
            let kept = staging.pulled_at.is_some_and(|at| at >= pulled_since)
                || staging.time > young_after
                || in_use.names(repo, &digest)
                || staging
                    .tags
                    .iter()
                    .any(|t| in_use.names(repo, t.tag.as_str()));
            if kept {
                continue;
            }
            plan.stagings += 1;
            plan.expiries
                .extend(staging.tags.into_iter().map(|tag| Expiry {
                    tag: tag.clone(),
                    pulled_before: Some(pulled_since),
                    staging: true,
                }));
        }
    }
    plan
}

fn under(repo: &str, prefix: &str) -> bool {
    prefix == "*"
        || repo == prefix
        || repo
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Tags `rules` expire, leaving alone repositories under `cache` (cache retention's).
pub fn plan_rules(
    tags: &[TaggedManifest],
    rules: &[RetentionRule],
    cache: Option<&String>,
    now: SystemTime,
    young_after: SystemTime,
    in_use: &InUse,
) -> Plan {
    // Per tag: whether a rule covers it, whether one keeps it, and the earliest pull time that
    // keeps it.
    let mut matched = vec![false; tags.len()];
    let mut kept = vec![false; tags.len()];
    let mut pulled_before: Vec<Option<SystemTime>> = vec![None; tags.len()];
    for rule in rules {
        let since = rule.pulled_within_days.map(|days| now - DAY * days as u32);
        let mut rank: HashMap<&str, usize> = HashMap::new();
        // Tags come newest first per repository.
        for (i, tag) in tags.iter().enumerate() {
            let repo = tag.repo.as_str();
            if !under(repo, &rule.repositories)
                || cache.is_some_and(|namespace| under(repo, namespace))
                || !glob(&rule.tags, tag.tag.as_str())
            {
                continue;
            }
            let position = rank.entry(repo).or_default();
            matched[i] = true;
            kept[i] |= rule.keep_last.is_some_and(|n| *position < n)
                || since.is_some_and(|since| tag.pulled_at.is_some_and(|at| at >= since));
            if let Some(since) = since {
                pulled_before[i] =
                    Some(pulled_before[i].map_or(since, |b: SystemTime| b.min(since)));
            }
            *position += 1;
        }
    }
    let mut plan = Plan::default();
    for (i, tag) in tags.iter().enumerate() {
        if matched[i]
            && !kept[i]
            && tag.tagged_at <= young_after
            && !in_use.names(tag.repo.as_str(), &tag.digest.to_string())
            && !in_use.names(tag.repo.as_str(), tag.tag.as_str())
        {
            plan.expiries.push(Expiry {
                tag: tag.clone(),
                pulled_before: pulled_before[i],
                staging: false,
            });
        }
    }
    plan
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters and `?` for one.
fn glob(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), text.chars().collect());
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests;
