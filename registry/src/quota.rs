//! Byte quotas per repository prefix: the rule syntax, which scope a repository falls in, and the
//! refusal a push gets when its scope is full.
//!
//! A rule `cache` makes one scope of every repository named `cache` or `cache/...`; a rule
//! `cache/*` makes one scope per child, `cache/<child>` (holding `cache/<child>` and
//! `cache/<child>/...`), each with the whole limit; `*` alone makes one per top-level namespace.
//! A scope's usage counts each digest (blob or manifest) once, however many of its repositories
//! hold it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One configured quota: a repository prefix, or every child of one, and its limit in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub repositories: Rule,
    pub max_bytes: ByteSize,
}

/// Which repositories a quota covers, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Rule {
    text: String,
    /// Repositories named this or below it; empty with `each_child` for `*`.
    prefix: String,
    /// Each child of `prefix` is a scope of its own.
    each_child: bool,
}

impl Rule {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The scope `repo` counts in under this rule, if the rule covers it.
    pub fn scope_of(&self, repo: &str) -> Option<String> {
        let below = if self.prefix.is_empty() {
            Some(repo)
        } else if repo == self.prefix {
            return (!self.each_child).then(|| repo.to_owned());
        } else {
            repo.strip_prefix(&self.prefix)
                .and_then(|rest| rest.strip_prefix('/'))
        }?;
        if !self.each_child {
            return Some(self.prefix.clone());
        }
        let child = below.split('/').next().unwrap_or(below);
        Some(match self.prefix.as_str() {
            "" => child.to_owned(),
            prefix => format!("{prefix}/{child}"),
        })
    }
}

impl TryFrom<String> for Rule {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (prefix, each_child) = match text.strip_suffix('*') {
            Some("") => ("", true),
            Some(parent) => match parent.strip_suffix('/') {
                Some(parent) => (parent, true),
                None => return Err(format!("{text:?}: `*` stands only for a whole child")),
            },
            None => (text, false),
        };
        let valid = match prefix {
            "" => each_child,
            prefix => prefix.parse::<berth_oci::RepoName>().is_ok(),
        };
        if !valid {
            return Err(format!(
                "{text:?}: expected a repository name prefix, `PREFIX/*` or `*`"
            ));
        }
        Ok(Rule {
            text: text.to_owned(),
            prefix: prefix.to_owned(),
            each_child,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A number of bytes, written as an integer or with a binary unit (`KiB`, `MiB`, `GiB`, `TiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeText")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeText {
    Number(u64),
    Text(String),
}

impl TryFrom<SizeText> for ByteSize {
    type Error = String;

    fn try_from(size: SizeText) -> Result<Self, Self::Error> {
        let text = match size {
            SizeText::Number(bytes) => return Ok(ByteSize(bytes)),
            SizeText::Text(text) => text,
        };
        let trimmed = text.trim();
        let digits = trimmed.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let shift = match trimmed[digits.len()..].trim_start() {
            "" | "B" => 0,
            "KiB" => 10,
            "MiB" => 20,
            "GiB" => 30,
            "TiB" => 40,
            _ => {
                return Err(format!(
                    "{text:?}: expected bytes, or a number with KiB, MiB, GiB or TiB"
                ));
            }
        };
        digits
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << shift))
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?}: not a byte count that fits 64 bits"))
    }
}

/// Checks a list of quotas: limits above zero, each rule once.
pub fn validate(quotas: &[Quota]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for quota in quotas {
        if quota.max_bytes.0 == 0 {
            return Err(format!(
                "quotas {}: max_bytes must be above zero",
                quota.repositories
            ));
        }
        if !seen.insert(&quota.repositories) {
            return Err(format!(
                "quotas {}: listed more than once",
                quota.repositories
            ));
        }
    }
    Ok(())
}

/// A push refused because it would take a scope past its quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaExceeded {
    /// The rule as configured, e.g. `cache/*`.
    pub quota: String,
    /// The scope that is full, e.g. `cache/<app guid>`.
    pub scope: String,
    pub max_bytes: u64,
    pub used_bytes: u64,
    /// What the push would have added to the scope.
    pub needed_bytes: u64,
}

impl fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "quota {:?} exceeded: {} holds {} of its {}; this push needs {} more",
            self.quota,
            self.scope,
            Human(self.used_bytes),
            Human(self.max_bytes),
            Human(self.needed_bytes)
        )
    }
}

/// Bytes for people: the exact count, with a binary unit beside it when that is shorter to read.
struct Human(u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        let units = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
        match units.iter().find(|(shift, _)| bytes >= 1 << shift) {
            Some((shift, unit)) => write!(
                f,
                "{:.1} {unit} ({bytes} bytes)",
                bytes as f64 / (1u64 << shift) as f64
            ),
            None => write!(f, "{bytes} bytes"),
        }
    }
}

/// Use against one rule, for `/metrics`: per-child rules have one scope per child, so what is
/// reported is their count and the fullest one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaUsage {
    pub quota: String,
    pub max_bytes: u64,
    /// Scopes holding anything.
    pub scopes: u64,
    /// The bytes of the fullest scope (the only one for a plain prefix).
    pub max_used_bytes: u64,
}

/// What one scope holds against its quota, for `berth-registry usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeUsage {
    pub quota: String,
    pub scope: String,
    pub bytes: u64,
    pub max_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        text.parse().unwrap()
    }

    #[test]
    fn a_prefix_is_one_scope_on_component_boundaries() {
        let cache = rule("cache");
        assert_eq!(cache.scope_of("cache").as_deref(), Some("cache"));
        assert_eq!(cache.scope_of("cache/a/b").as_deref(), Some("cache"));
        assert_eq!(cache.scope_of("cachet/a"), None);
        assert_eq!(cache.scope_of("other/cache"), None);
        let deep = rule("team/a");
        assert_eq!(deep.scope_of("team/a/x").as_deref(), Some("team/a"));
        assert_eq!(deep.scope_of("team/ab"), None);
    }

    #[test]
    fn a_star_makes_each_child_its_own_scope() {
        let apps = rule("cache/*");
        assert_eq!(
            apps.scope_of("cache/guid-1/r1").as_deref(),
            Some("cache/guid-1")
        );
        assert_eq!(
            apps.scope_of("cache/guid-1").as_deref(),
            Some("cache/guid-1")
        );
        assert_eq!(
            apps.scope_of("cache/guid-2/r/s").as_deref(),
            Some("cache/guid-2")
        );
        assert_eq!(apps.scope_of("cache"), None, "the parent is no child");
        assert_eq!(apps.scope_of("cachet/x"), None);
        let namespaces = rule("*");
        assert_eq!(namespaces.scope_of("team/app").as_deref(), Some("team"));
        assert_eq!(namespaces.scope_of("solo").as_deref(), Some("solo"));
    }

    #[test]
    fn rules_are_prefixes_with_an_optional_final_star() {
        for bad in ["", "cache*", "cache/*/x", "Cache", "cache/", "/cache", "**"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?}");
        }
        for good in ["cache", "cache/*", "*", "a/b/c/*"] {
            assert_eq!(rule(good).to_string(), good);
        }
    }

    #[test]
    fn sizes_take_binary_units() {
        let size = |text: &str| ByteSize::try_from(SizeText::Text(text.into()));
        assert_eq!(size("10GiB"), Ok(ByteSize(10 << 30)));
        assert_eq!(size("512 MiB"), Ok(ByteSize(512 << 20)));
        assert_eq!(size("4096"), Ok(ByteSize(4096)));
        assert_eq!(size("1 KiB"), Ok(ByteSize(1024)));
        for bad in ["10GB", "lots", "GiB", "99999999999 TiB", "-1"] {
            assert!(size(bad).is_err(), "{bad}");
        }
        let quotas: Vec<Quota> = serde_norway::from_str(
            "- {repositories: cache, max_bytes: 1TiB}\n- {repositories: cache/*, max_bytes: 1000}\n",
        )
        .unwrap();
        assert_eq!(quotas[0].max_bytes, ByteSize(1 << 40));
        assert_eq!(quotas[1].max_bytes, ByteSize(1000));
        assert!(validate(&quotas).is_ok());
    }

    #[test]
    fn zero_limits_and_repeated_rules_are_refused() {
        let quota = |text: &str, bytes| Quota {
            repositories: rule(text),
            max_bytes: ByteSize(bytes),
        };
        assert!(validate(&[quota("cache", 0)]).is_err());
        assert!(validate(&[quota("cache", 1), quota("cache", 2)]).is_err());
        assert!(validate(&[quota("cache", 1), quota("cache/*", 2)]).is_ok());
    }

    #[test]
    fn the_refusal_names_the_quota_and_the_usage() {
        let refusal = QuotaExceeded {
            quota: "cache/*".into(),
            scope: "cache/guid-1".into(),
            max_bytes: 10 << 20,
            used_bytes: 9 << 20,
            needed_bytes: 2 << 20,
        };
        assert_eq!(
            refusal.to_string(),
            "quota \"cache/*\" exceeded: cache/guid-1 holds 9.0 MiB (9437184 bytes) of its \
             10.0 MiB (10485760 bytes); this push needs 2.0 MiB (2097152 bytes) more"
        );
    }
}
