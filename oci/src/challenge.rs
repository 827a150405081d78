//! `WWW-Authenticate` challenges of a registry: Basic, or Bearer with the token service to ask (the registry's pull-through cache and the cacher both answer them).

use std::collections::HashMap;

/// What a registry asks for before it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Send the credentials with every request (distribution with htpasswd).
    Basic,
    /// Get a token from `realm` for `service` and `scope`, then send it (Docker Hub, GHCR, Quay).
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses one `WWW-Authenticate` value: `Basic realm="x"` or
    /// `Bearer realm="https://auth",service="registry",scope="repository:a:pull,push"`. The scheme
    /// is case-insensitive; parameter values may be quoted (with backslash escapes) or bare
    /// tokens. `None` for a scheme a registry client cannot answer, or a Bearer without realm.
    pub fn parse(value: &str) -> Option<Challenge> {
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut parameters = parameters(rest);
        Some(Challenge::Bearer {
            realm: parameters.remove("realm")?,
            service: parameters.remove("service"),
            scope: parameters.remove("scope"),
        })
    }
}

/// `key="quoted, value",key2=token` pairs, keys lowercased; quoted values may hold commas and `\"`.
fn parameters(input: &str) -> HashMap<String, String> {
    let mut parameters = HashMap::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            return parameters;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
        }
        parameters.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_bearer_challenge() {
        let value = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            Challenge::parse(value),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn spacing_case_bare_tokens_and_escapes() {
        let value = r#"bearer  realm = "https://ghcr.io/token" , scope="repository:a/b:pull,push", service=ghcr.io, error="x\"y""#;
        assert_eq!(
            Challenge::parse(value),
            Some(Challenge::Bearer {
                realm: "https://ghcr.io/token".into(),
                service: Some("ghcr.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        let parameters = parameters(r#"realm="a\"b", scope="x:y:pull,push",Error=invalid_token"#);
        assert_eq!(parameters["realm"], "a\"b");
        assert_eq!(parameters["scope"], "x:y:pull,push");
        assert_eq!(parameters["error"], "invalid_token");
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("BASIC"), Some(Challenge::Basic));
    }

    #[test]
    fn unusable_challenges_are_none() {
        assert_eq!(Challenge::parse(""), None);
        assert_eq!(Challenge::parse(r#"Digest realm="x""#), None);
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse(r#"Bearer service="no realm""#), None);
        assert_eq!(Challenge::parse("Bearer"), None);
    }

    mod properties {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::*;

        const PIECES: &[&str] = &[
            "Bearer ",
            "Basic ",
            "bearer",
            " ",
            ",",
            "=",
            "\"",
            "\\",
            "realm",
            "service",
            "scope",
            "error",
            "=\"",
            "\",",
            "https://auth.example/token",
            "repository:a/b:pull,push",
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(100_000))]

            /// Whatever a registry sends as `WWW-Authenticate`, parsing answers without panicking.
            #[test]
            fn any_challenge_parses_or_is_ignored(
                header in prop::collection::vec(prop::sample::select(PIECES), 0..24)
                    .prop_map(|pieces| pieces.concat())
            ) {
                if let Some(Challenge::Bearer { realm, .. }) = Challenge::parse(&header) {
                    prop_assert!(header.to_ascii_lowercase().contains("realm"), "{}", realm);
                }
            }

            /// Quoted values come back as they were, whatever they hold.
            #[test]
            fn quoted_parameters_round_trip(
                sent in prop::collection::btree_map("[a-z]{1,8}", any::<String>(), 0..5)
            ) {
                let header: Vec<String> = sent
                    .iter()
                    .map(|(key, value)| {
                        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
                        format!("{key}=\"{escaped}\"")
                    })
                    .collect();
                let parsed: BTreeMap<String, String> =
                    parameters(&header.join(", ")).into_iter().collect();
                let expected: BTreeMap<String, String> = sent
                    .into_iter()
                    .map(|(key, value)| (key, value.trim().to_owned()))
                    .collect();
                prop_assert_eq!(parsed, expected);
            }
        }
    }
}
