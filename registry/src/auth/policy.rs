//! The access policy: which identity may pull, push, delete or list which repositories.

use std::collections::HashMap;

use berth_oci::RepoName;
use serde::Deserialize;

use super::config::{AccessRule, AnonymousAccess, AuthConfig};
use crate::config::ConfigError;

/// What a grant in the configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    /// Push and pull by exact name, never seeing the catalog or a tag list: for a robot whose
    /// credential travels where others may read it (the cacher's, in the staging bundle), so a
    /// leaked copy cannot find what others stored.
    #[serde(rename = "push-by-name")]
    PushByName,
    Delete,
    /// Everything, including listing.
    Admin,
}

/// A set of permissions on one repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    /// Read manifests, blobs and referrers by name.
    pub const PULL: Actions = Actions(1);
    pub const PUSH: Actions = Actions(2);
    pub const DELETE: Actions = Actions(4);
    /// See the repository in the catalog and its tags: pull that is not by exact name only.
    pub const LIST: Actions = Actions(8);
    pub const ALL: Actions = Actions(15);

    pub fn contains(self, other: Actions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    /// The token-scope words for these permissions (`pull`, `push`, `delete`).
    pub fn scope_words(self) -> Vec<&'static str> {
        [
            (Actions::PULL, "pull"),
            (Actions::PUSH, "push"),
            (Actions::DELETE, "delete"),
        ]
        .into_iter()
        .filter(|(a, _)| self.contains(*a))
        .map(|(_, word)| word)
        .collect()
    }

    /// Parses one token-scope action word; `*` means all of them.
    pub fn from_scope_word(word: &str) -> Actions {
        match word {
            "pull" => Actions::PULL,
            "push" => Actions::PUSH,
            "delete" => Actions::DELETE,
            "*" => Actions::PULL.union(Actions::PUSH).union(Actions::DELETE),
            _ => Actions::NONE,
        }
    }
}

impl From<Action> for Actions {
    fn from(action: Action) -> Actions {
        match action {
            // Pushing needs the reads every client does around it (blob HEAD, manifest GET).
            Action::Pull => Actions::PULL.union(Actions::LIST),
            Action::Push => Actions::PUSH.union(Actions::PULL).union(Actions::LIST),
            Action::PushByName => Actions::PUSH.union(Actions::PULL),
            Action::Delete => Actions::DELETE,
            Action::Admin => Actions::ALL,
        }
    }
}

/// Who is asking: a user (with the groups it belongs to) or nobody in particular.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<String>,
    pub groups: Vec<String>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity::default()
    }

    pub fn is_anonymous(&self) -> bool {
        self.user.is_none()
    }

    /// Whether this is a Cloud Foundry app, known by its instance identity certificate.
    pub fn is_app(&self) -> bool {
        self.user.as_deref().is_some_and(|user| {
            user.split_once(NAMESPACE_SEPARATOR)
                .is_some_and(|(namespace, _)| namespace == APP_NAMESPACE)
        })
    }
}

/// How htpasswd names a robot account: `robot$NAME`.
const ROBOT_PREFIX: &str = "robot$";

/// Names from a trusted issuer are `ISSUER:NAME`; local names never hold a `:` (htpasswd cannot
/// store one, and configured group names are checked), so the two never meet.
const NAMESPACE_SEPARATOR: char = ':';

/// The namespaces of Cloud Foundry instance identities: an app is the user `app:GUID`, its space
/// and organization are the groups `space:GUID` and `organization:GUID`. No trusted issuer may
/// take these names, so nothing else can ever be called that.
const APP_NAMESPACE: &str = "app";
const SPACE_NAMESPACE: &str = "space";
const ORGANIZATION_NAMESPACE: &str = "organization";
pub(super) const RESERVED_NAMESPACES: [&str; 3] =
    [APP_NAMESPACE, SPACE_NAMESPACE, ORGANIZATION_NAMESPACE];

/// The placeholder that binds a rule's repositories to the calling app: `cache/{app}` covers
/// `cache/<any guid>/...`, and the principal `app:{app}` matches only the app of that GUID.
const APP_PLACEHOLDER: &str = "{app}";

pub(super) fn app_user(guid: &str) -> String {
    format!("{APP_NAMESPACE}:{guid}")
}

pub(super) fn space_group(guid: &str) -> String {
    format!("{SPACE_NAMESPACE}:{guid}")
}

pub(super) fn organization_group(guid: &str) -> String {
    format!("{ORGANIZATION_NAMESPACE}:{guid}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    User(String),
    Group(String),
    /// Every local user except robots.
    Authenticated,
    /// Every user a trusted issuer's tokens name.
    AuthenticatedBy(String),
    /// `app:{app}`: the app whose GUID the rule's placeholder took from the repository name.
    OwnApp,
}

impl Principal {
    /// Parses a principal of the configuration; `issuers` are the names of the trusted issuers,
    /// which a principal naming one must use.
    fn parse(text: &str, issuers: &[&str]) -> Result<Principal, ConfigError> {
        let invalid = |why: &str| {
            ConfigError::Invalid(format!(
                "auth principal {text:?}: {why}; expected user:NAME, group:NAME, robot:NAME, \
                 authenticated, user:ISSUER:NAME, group:ISSUER:NAME, authenticated:ISSUER for a \
                 trusted issuer, or app:GUID, app:{{app}}, space:GUID, organization:GUID for Cloud \
                 Foundry instance identities"
            ))
        };
        let issuer_known = |name: &str| match name.split_once(NAMESPACE_SEPARATOR) {
            None => Ok(()),
            Some((issuer, rest)) if issuers.contains(&issuer) && !rest.is_empty() => Ok(()),
            Some((issuer, _)) => Err(invalid(&format!("no trusted issuer is named {issuer:?}"))),
        };
        let guid = |guid: &str| {
            if berth_oci::is_app_guid(guid) {
                Ok(())
            } else {
                Err(invalid("not a GUID"))
            }
        };
        let principal = match text.split_once(':') {
            Some(("user", name)) if !name.is_empty() => {
                issuer_known(name)?;
                Principal::User(name.into())
            }
            Some(("robot", name)) if !name.is_empty() && !name.contains(NAMESPACE_SEPARATOR) => {
                Principal::User(format!("{ROBOT_PREFIX}{name}"))
            }
            Some(("group", name)) if !name.is_empty() => {
                issuer_known(name)?;
                Principal::Group(name.into())
            }
            Some(("authenticated", issuer)) if issuers.contains(&issuer) => {
                Principal::AuthenticatedBy(issuer.into())
            }
            Some(("authenticated", issuer)) => {
                return Err(invalid(&format!("no trusted issuer is named {issuer:?}")));
            }
            Some((APP_NAMESPACE, APP_PLACEHOLDER)) => Principal::OwnApp,
            Some((APP_NAMESPACE, id)) => {
                guid(id)?;
                Principal::User(app_user(id))
            }
            Some((SPACE_NAMESPACE, id)) => {
                guid(id)?;
                Principal::Group(space_group(id))
            }
            Some((ORGANIZATION_NAMESPACE, id)) => {
                guid(id)?;
                Principal::Group(organization_group(id))
            }
            None if text == "authenticated" => Principal::Authenticated,
            _ => return Err(invalid("unknown form")),
        };
        Ok(principal)
    }

    /// Whether the principal names `who`; `app` is the GUID a rule's placeholder took from the
    /// repository name, if it has one.
    fn matches(&self, who: &Identity, app: Option<&str>) -> bool {
        match (self, &who.user) {
            (_, None) => false,
            // People, not robots: a robot's credential sits in automation and may leak, so it gets
            // only what a grant names it for. Nor anyone a trusted issuer vouches for: such an
            // issuer (a foundation's UAA) speaks for many more people than this registry's users.
            // Nor apps, which hold an identity of their own, not an account.
            (Principal::Authenticated, Some(user)) => {
                !user.starts_with(ROBOT_PREFIX) && !user.contains(NAMESPACE_SEPARATOR)
            }
            (Principal::AuthenticatedBy(issuer), Some(user)) => user
                .split_once(NAMESPACE_SEPARATOR)
                .is_some_and(|(namespace, _)| namespace == issuer),
            (Principal::User(name), Some(user)) => name == user,
            (Principal::Group(group), Some(_)) => who.groups.iter().any(|g| g == group),
            (Principal::OwnApp, Some(user)) => app.is_some_and(|app| *user == app_user(app)),
        }
    }
}

/// One path component of a rule's repositories.
#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{app}`: any GUID, which `app:{app}` grants then compare with the caller's.
    App,
}

#[derive(Debug)]
struct Rule {
    /// As configured (`*`, `team-a`, `cache/{app}`), to name the rule in errors.
    text: String,
    /// Empty for every repository.
    pattern: Vec<Segment>,
    anonymous: Actions,
    foreign_credentials_as_anonymous: bool,
    grants: Vec<(Principal, Actions)>,
}

impl Rule {
    fn compile(rule: &AccessRule, issuers: &[&str]) -> Result<Rule, ConfigError> {
        let invalid = || {
            ConfigError::Invalid(format!(
                "auth.access repositories {:?}: expected * or a repository name prefix, in which \
                 one whole path component may be {APP_PLACEHOLDER}",
                rule.repositories
            ))
        };
        let pattern: Vec<Segment> = match rule.repositories.as_str() {
            "*" => Vec::new(),
            prefix => {
                let pattern: Vec<Segment> = prefix
                    .split('/')
                    .map(|component| match component {
                        APP_PLACEHOLDER => Segment::App,
                        literal => Segment::Literal(literal.to_owned()),
                    })
                    .collect();
                // Checked as a name with a sample GUID in the placeholder's place.
                prefix
                    .replace(APP_PLACEHOLDER, "0")
                    .parse::<RepoName>()
                    .map_err(|_| invalid())?;
                if pattern.iter().filter(|s| **s == Segment::App).count() > 1 {
                    return Err(invalid());
                }
                pattern
            }
        };
        let anonymous = match rule.anonymous {
            AnonymousAccess::None => Actions::NONE,
            AnonymousAccess::Pull => Actions::from(Action::Pull),
            AnonymousAccess::ByName => Actions::PULL,
        };
        let grants: Vec<(Principal, Actions)> = rule
            .grants
            .iter()
            .map(|(who, actions)| {
                let actions = actions
                    .iter()
                    .fold(Actions::NONE, |all, a| all.union((*a).into()));
                Ok((Principal::parse(who, issuers)?, actions))
            })
            .collect::<Result<_, ConfigError>>()?;
        if !pattern.contains(&Segment::App)
            && grants.iter().any(|(who, _)| *who == Principal::OwnApp)
        {
            return Err(ConfigError::Invalid(format!(
                "auth.access repositories {:?}: app:{APP_PLACEHOLDER} needs {APP_PLACEHOLDER} in \
                 the repositories, e.g. cache/{APP_PLACEHOLDER}",
                rule.repositories
            )));
        }
        Ok(Rule {
            text: rule.repositories.clone(),
            pattern,
            anonymous,
            foreign_credentials_as_anonymous: rule.foreign_credentials_as_anonymous,
            grants,
        })
    }

    /// Whether the rule covers `repo` (its prefix on path-component boundaries), and the GUID its
    /// placeholder took, if it has one.
    fn covers<'r>(&self, repo: &'r str) -> Option<Option<&'r str>> {
        let mut components = repo.split('/');
        let mut app = None;
        for segment in &self.pattern {
            let component = components.next()?;
            match segment {
                Segment::Literal(literal) if literal == component => {}
                Segment::Literal(_) => return None,
                Segment::App => app = Some(component),
            }
        }
        Some(app)
    }

    /// Sort key putting the most specific rule first: more components, then literals before the
    /// placeholder (`cache/special` decides over `cache/{app}`).
    fn specificity(&self) -> (usize, bool) {
        (self.pattern.len(), !self.pattern.contains(&Segment::App))
    }
}

#[derive(Debug)]
pub(super) struct Policy {
    admins: Vec<Principal>,
    /// Most specific first, so the first rule covering a repository is the one that decides.
    rules: Vec<Rule>,
    groups_of: HashMap<String, Vec<String>>,
}

impl Policy {
    pub(super) fn new(config: &AuthConfig) -> Result<Policy, ConfigError> {
        let issuers: Vec<&str> = config
            .token
            .trusted_issuers
            .iter()
            .map(|issuer| issuer.name.as_str())
            .collect();
        if let Some(issuer) = issuers
            .iter()
            .find(|issuer| RESERVED_NAMESPACES.contains(issuer))
        {
            return Err(ConfigError::Invalid(format!(
                "auth.token.trusted_issuers name {issuer:?} is kept for Cloud Foundry instance \
                 identities; choose another"
            )));
        }
        if let Some(group) = config
            .groups
            .keys()
            .find(|g| g.contains(NAMESPACE_SEPARATOR))
        {
            return Err(ConfigError::Invalid(format!(
                "auth.groups {group:?}: a group name may not hold ':' (kept for trusted issuers' groups)"
            )));
        }
        let mut rules = config
            .access
            .iter()
            .map(|rule| Rule::compile(rule, &issuers))
            .collect::<Result<Vec<_>, _>>()?;
        if rules.is_empty() {
            rules.push(Rule {
                text: "*".into(),
                pattern: Vec::new(),
                anonymous: Actions::NONE,
                foreign_credentials_as_anonymous: false,
                grants: vec![(Principal::Authenticated, Actions::ALL)],
            });
        }
        let mut prefixes = std::collections::HashSet::new();
        for rule in &rules {
            if !prefixes.insert(rule.text.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "auth.access: two rules for repositories {:?}",
                    rule.text
                )));
            }
        }
        rules.sort_by_key(|rule| std::cmp::Reverse(rule.specificity()));
        let mut groups_of: HashMap<String, Vec<String>> = HashMap::new();
        for (group, members) in &config.groups {
            for member in members {
                groups_of
                    .entry(member.clone())
                    .or_default()
                    .push(group.clone());
            }
        }
        let admins = config
            .admins
            .iter()
            .map(|who| match Principal::parse(who, &issuers)? {
                Principal::OwnApp => Err(ConfigError::Invalid(format!(
                    "auth.admins {who:?}: {APP_PLACEHOLDER} only has a meaning in a rule's grants"
                ))),
                admin => Ok(admin),
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            admins,
            rules,
            groups_of,
        })
    }

    /// The identity of a user this registry authenticated, with its configured groups.
    pub(super) fn identity(&self, user: &str) -> Identity {
        Identity {
            user: Some(user.to_owned()),
            groups: self.groups_of.get(user).cloned().unwrap_or_default(),
        }
    }

    /// The rule deciding for `repo`, and the GUID its placeholder took from the name.
    fn rule<'r>(&self, repo: &'r str) -> Option<(&Rule, Option<&'r str>)> {
        self.rules
            .iter()
            .find_map(|rule| Some((rule, rule.covers(repo)?)))
    }

    /// Everything `who` may do in `repo`. Anonymous permissions apply to everyone.
    pub(super) fn allowed(&self, who: &Identity, repo: &RepoName) -> Actions {
        let anonymous = self
            .rule(repo.as_str())
            .map_or(Actions::NONE, |(rule, _)| rule.anonymous);
        self.granted(who, repo).union(anonymous)
    }

    /// What `who` may do in `repo` because a grant (or `admins`) names it, leaving out what
    /// anyone may do there.
    pub(super) fn granted(&self, who: &Identity, repo: &RepoName) -> Actions {
        if self.admins.iter().any(|admin| admin.matches(who, None)) {
            return Actions::ALL;
        }
        let Some((rule, app)) = self.rule(repo.as_str()) else {
            return Actions::NONE;
        };
        rule.grants
            .iter()
            .filter(|(principal, _)| principal.matches(who, app))
            .fold(Actions::NONE, |all, (_, actions)| all.union(*actions))
    }

    /// Whether credentials this registry cannot verify count as anonymous when pulling `repo`.
    pub(super) fn foreign_credentials_as_anonymous(&self, repo: &RepoName) -> bool {
        self.rule(repo.as_str())
            .is_some_and(|(rule, _)| rule.foreign_credentials_as_anonymous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        let config: AuthConfig = serde_norway::from_str(yaml).unwrap();
        Policy::new(&config).unwrap()
    }

    fn repo(name: &str) -> RepoName {
        name.parse().unwrap()
    }

    const RULES: &str = r#"
groups:
  platform: [alice]
  operators: [olga]
admins: ["group:operators"]
access:
  - repositories: "*"
    grants: { "group:platform": [admin] }
  - repositories: cache
    anonymous: by-name
    foreign_credentials_as_anonymous: true
    grants: { "robot:cacher": [push] }
  - repositories: public
    anonymous: pull
  - repositories: team-a
    grants: { "user:bob": [push], "authenticated": [pull] }
  - repositories: team-a/prod
    grants: { "user:bob": [pull] }
"#;

    #[test]
    fn longest_prefix_decides() {
        let p = policy(RULES);
        let bob = p.identity("bob");
        assert!(p.allowed(&bob, &repo("team-a/app")).contains(Actions::PUSH));
        let prod = p.allowed(&bob, &repo("team-a/prod/app"));
        assert!(prod.contains(Actions::PULL) && !prod.contains(Actions::PUSH));
        // A prefix only matches whole path components.
        assert_eq!(p.allowed(&bob, &repo("team-ab/app")), Actions::NONE);
    }

    #[test]
    fn anonymous_and_by_name_access() {
        let p = policy(RULES);
        let nobody = Identity::anonymous();
        let public = p.allowed(&nobody, &repo("public/x"));
        assert!(public.contains(Actions::PULL) && public.contains(Actions::LIST));
        assert!(!public.contains(Actions::PUSH));
        let cache = p.allowed(&nobody, &repo("cache/app/abc"));
        assert!(cache.contains(Actions::PULL) && !cache.contains(Actions::LIST));
        assert!(p.foreign_credentials_as_anonymous(&repo("cache/app/abc")));
        assert!(!p.foreign_credentials_as_anonymous(&repo("team-a/app")));
        assert_eq!(p.allowed(&nobody, &repo("team-a/app")), Actions::NONE);
    }

    #[test]
    fn robots_groups_and_the_catch_all() {
        let p = policy(RULES);
        let robot = p.identity("robot$cacher");
        assert!(
            p.allowed(&robot, &repo("cache/x/y"))
                .contains(Actions::PUSH)
        );
        assert!(
            !p.allowed(&robot, &repo("cache/x/y"))
                .contains(Actions::DELETE)
        );
        assert_eq!(p.allowed(&robot, &repo("other/x")), Actions::NONE);
        let alice = p.identity("alice");
        assert_eq!(p.allowed(&alice, &repo("other/x")), Actions::ALL);
        // The more specific cache rule decides for alice too, and grants her nothing extra.
        assert!(!p.allowed(&alice, &repo("cache/x")).contains(Actions::PUSH));
        // Admins are above the rules.
        let olga = p.identity("olga");
        for name in ["cache/x", "team-a/prod/app", "anything/else"] {
            assert_eq!(p.allowed(&olga, &repo(name)), Actions::ALL, "{name}");
        }
    }

    #[test]
    fn push_by_name_never_lists() {
        let p = policy("access: [{repositories: cache, grants: {'robot:cacher': [push-by-name]}}]");
        let robot = p.identity("robot$cacher");
        let cache = p.allowed(&robot, &repo("cache/x/y"));
        assert!(cache.contains(Actions::PUSH) && cache.contains(Actions::PULL));
        assert!(!cache.contains(Actions::LIST) && !cache.contains(Actions::DELETE));
    }

    #[test]
    fn authenticated_means_people_not_robots() {
        let p = policy(RULES);
        let robot = p.identity("robot$cacher");
        assert_eq!(p.allowed(&robot, &repo("team-a/app")), Actions::NONE);
        assert!(
            p.allowed(&p.identity("carol"), &repo("team-a/app"))
                .contains(Actions::PULL)
        );
        let open = policy("{}");
        assert_eq!(
            open.allowed(&open.identity("robot$x"), &repo("a/b")),
            Actions::NONE
        );
    }

    const WITH_UAA: &str = r#"
groups:
  platform: [alice, "uaa:dora"]
admins: ["user:admin"]
token:
  trusted_issuers:
    - { name: uaa, issuer: "https://uaa.example/oauth/token" }
access:
  - repositories: cache
    grants: { "robot:berth-cacher": [push-by-name] }
  - repositories: team
    grants: { "authenticated": [pull], "group:platform": [push], "group:uaa:berth.admin": [delete] }
  - repositories: uaa-readers
    grants: { "authenticated:uaa": [pull], "user:uaa:carol": [push] }
"#;

    /// Someone a trusted issuer's token names, as the verifier hands them over.
    fn from_uaa(p: &Policy, user: &str, groups: &[&str]) -> Identity {
        let mut who = p.identity(&format!("uaa:{user}"));
        who.groups
            .extend(groups.iter().map(|group| format!("uaa:{group}")));
        who
    }

    #[test]
    fn a_trusted_issuers_names_never_meet_local_ones() {
        let p = policy(WITH_UAA);
        // Named like local accounts, with a scope named like a local group: nothing of theirs.
        for name in ["admin", "alice", "robot$berth-cacher"] {
            let impostor = from_uaa(&p, name, &["platform"]);
            assert_eq!(
                p.allowed(&impostor, &repo("cache/app/x")),
                Actions::NONE,
                "{name}"
            );
            assert_eq!(
                p.allowed(&impostor, &repo("team/app")),
                Actions::NONE,
                "{name}"
            );
            assert_eq!(
                p.allowed(&impostor, &repo("other")),
                Actions::NONE,
                "{name}"
            );
        }
        // Rules that name them explicitly do grant.
        let carol = from_uaa(&p, "carol", &["berth.admin"]);
        assert!(
            p.allowed(&carol, &repo("uaa-readers/x"))
                .contains(Actions::PUSH)
        );
        assert!(
            p.allowed(&carol, &repo("team/app"))
                .contains(Actions::DELETE)
        );
        assert!(!p.allowed(&carol, &repo("team/app")).contains(Actions::PULL));
        let erin = from_uaa(&p, "erin", &[]);
        assert!(
            p.allowed(&erin, &repo("uaa-readers/x"))
                .contains(Actions::PULL)
        );
        assert!(
            !p.allowed(&erin, &repo("uaa-readers/x"))
                .contains(Actions::PUSH)
        );
        // A local group may list a trusted issuer's user by its full name.
        let dora = from_uaa(&p, "dora", &[]);
        assert!(p.allowed(&dora, &repo("team/app")).contains(Actions::PUSH));
        // Local users are unchanged.
        assert!(
            p.allowed(&p.identity("bob"), &repo("team/app"))
                .contains(Actions::PULL)
        );
        assert_eq!(
            p.allowed(&p.identity("bob"), &repo("uaa-readers/x")),
            Actions::NONE
        );
    }

    #[test]
    fn principals_naming_an_unknown_issuer_are_configuration_errors() {
        for (yaml, wanted) in [
            (
                "access: [{repositories: a, grants: {'user:ldap:x': [pull]}}]",
                "ldap",
            ),
            (
                "access: [{repositories: a, grants: {'authenticated:ldap': [pull]}}]",
                "ldap",
            ),
            ("admins: ['group:ldap:ops']", "ldap"),
            ("groups: {'uaa:ops': [x]}", "may not hold"),
        ] {
            let config: AuthConfig = serde_norway::from_str(yaml).unwrap();
            let err = Policy::new(&config).unwrap_err().to_string();
            assert!(err.contains(wanted), "{yaml}: {err}");
        }
    }

    const APPS: &str = r#"
token:
  trusted_issuers:
    - { name: uaa, issuer: "https://uaa.example/oauth/token" }
access:
  - repositories: "*"
    grants: { "authenticated": [pull], "authenticated:uaa": [pull] }
  - repositories: cache/{app}
    anonymous: by-name
    grants: { "app:{app}": [push-by-name], "robot:berth-cacher": [push-by-name] }
  - repositories: cache/special
    grants: { "app:5f9c2a1e-0000-4000-8000-000000000001": [pull] }
  - repositories: shared
    grants: { "space:5a6b": [pull], "organization:0c1d": [push] }
"#;

    fn app(p: &Policy, guid: &str, groups: &[&str]) -> Identity {
        let mut who = p.identity(&app_user(guid));
        who.groups.extend(groups.iter().map(|g| g.to_string()));
        who
    }

    #[test]
    fn the_app_placeholder_binds_an_app_to_its_own_repositories() {
        let p = policy(APPS);
        let a = app(&p, "aaaa", &[]);
        let own = p.allowed(&a, &repo("cache/aaaa/x"));
        assert!(own.contains(Actions::PUSH) && own.contains(Actions::PULL));
        assert!(!own.contains(Actions::LIST) && !own.contains(Actions::DELETE));
        assert!(p.allowed(&a, &repo("cache/aaaa")).contains(Actions::PUSH));
        // Another app's repositories: what anyone may do there, nothing of its own.
        assert_eq!(p.allowed(&a, &repo("cache/bbbb/x")), Actions::PULL);
        assert_eq!(p.granted(&a, &repo("cache/bbbb/x")), Actions::NONE);
        assert_eq!(p.granted(&a, &repo("cache/aaaab/x")), Actions::NONE);
        // The rule's other grants cover every app's repositories.
        let robot = p.identity("robot$berth-cacher");
        assert!(
            p.allowed(&robot, &repo("cache/bbbb/x"))
                .contains(Actions::PUSH)
        );
        // A literal rule as deep as the placeholder is more specific.
        let special = app(&p, "5f9c2a1e-0000-4000-8000-000000000001", &[]);
        assert_eq!(
            p.allowed(&special, &repo("cache/special/x")),
            Actions::PULL.union(Actions::LIST)
        );
        assert_eq!(
            p.allowed(&app(&p, "special", &[]), &repo("cache/special/x")),
            Actions::NONE
        );
        // Apps are neither local users nor a trusted issuer's: `authenticated` does not cover them.
        assert_eq!(p.allowed(&a, &repo("team/x")), Actions::NONE);
        // Spaces and organizations are the app's groups.
        let grouped = app(&p, "aaaa", &["space:5a6b", "organization:0c1d"]);
        assert!(
            p.allowed(&grouped, &repo("shared/x"))
                .contains(Actions::PUSH)
        );
        assert!(a.is_app() && !p.identity("alice").is_app());
    }

    #[test]
    fn no_rules_means_authenticated_users_only() {
        let p = policy("{}");
        assert_eq!(p.allowed(&p.identity("x"), &repo("a/b")), Actions::ALL);
        assert_eq!(
            p.allowed(&Identity::anonymous(), &repo("a/b")),
            Actions::NONE
        );
    }

    #[test]
    fn bad_rules_are_configuration_errors() {
        for yaml in [
            "access: [{repositories: '../x'}]",
            "access: [{repositories: a, grants: {'team:x': [pull]}}]",
            "access: [{repositories: a}, {repositories: a}]",
        ] {
            let config: AuthConfig = serde_norway::from_str(yaml).unwrap();
            assert!(Policy::new(&config).is_err(), "{yaml}");
        }
        assert!(
            serde_norway::from_str::<AuthConfig>(
                "access: [{repositories: a, grants: {'user:x': [fly]}}]"
            )
            .is_err()
        );
    }
}
