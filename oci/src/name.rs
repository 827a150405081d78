//! Repository names and tags, validated by the OCI distribution grammar before anything uses them.

use std::fmt;
use std::str::FromStr;

use crate::Digest;

/// Longest repository name accepted, as in distribution.
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "repository name is invalid: it must match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((.|_|__|-+)[a-z0-9]+)*)* and be at most 255 characters"
    )]
    Name,
    #[error("tag is invalid: it must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag,
    #[error("reference is neither a valid tag nor a valid digest")]
    Reference,
}

/// A repository name such as `library/ubuntu`. Valid names can never contain `..`, `/` at either
/// end, uppercase letters or anything outside `[a-z0-9._/-]`, so they are safe in paths and URLs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first path component: the namespace access policies are written against.
    pub fn namespace(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }
}

/// Whether `text` can be a Cloud Foundry GUID (lowercase UUIDs; any one repository path component
/// of lowercase letters, digits and inner hyphens is accepted) and so name a repository.
pub fn is_app_guid(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

fn is_valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let allowed = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !allowed {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN || !s.split('/').all(is_valid_component) {
            return Err(NameError::Name);
        }
        Ok(RepoName(s.to_owned()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag such as `latest` or `v1.2.3-rc_1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_TAG_LEN
            && word(&bytes[0])
            && bytes.iter().all(|b| word(b) || *b == b'.' || *b == b'-');
        if valid {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::Tag)
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse()
                .map(Reference::Digest)
                .map_err(|_| NameError::Reference)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(tag) => tag.fmt(f),
            Reference::Digest(digest) => digest.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_of_the_grammar() {
        for good in [
            "ubuntu",
            "library/ubuntu",
            "a/b/c",
            "my-app",
            "my--app",
            "my_app",
            "my__app",
            "a.b",
            "cache/0f3a-9b",
        ] {
            assert!(good.parse::<RepoName>().is_ok(), "{good} must be accepted");
        }
    }

    #[test]
    fn rejects_names_outside_the_grammar() {
        let too_long = "a".repeat(256);
        for bad in [
            "",
            "..",
            "../etc",
            "a/../b",
            "a/./b",
            "/abs",
            "a/",
            "Upper",
            "a___b",
            "a.-b",
            "-a",
            "a-",
            "a//b",
            "a\0b",
            "%2e%2e",
            "a b",
            "a:b",
            too_long.as_str(),
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn namespace_is_the_first_component() {
        assert_eq!(
            "cache/app/x".parse::<RepoName>().unwrap().namespace(),
            "cache"
        );
        assert_eq!("solo".parse::<RepoName>().unwrap().namespace(), "solo");
    }

    #[test]
    fn tags_follow_the_grammar() {
        for good in ["latest", "v1.2.3", "_x", "A-b.c_d", &"t".repeat(128)] {
            assert!(good.parse::<Tag>().is_ok(), "{good} must be accepted");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"t".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        let digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(matches!(
            digest.parse::<Reference>(),
            Ok(Reference::Digest(_))
        ));
        assert_eq!("sha256:zz".parse::<Reference>(), Err(NameError::Reference));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Request text: mostly near the grammar (the characters names, tags and digests use,
        /// lengths around the limits), the rest any Unicode.
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-z0-9._/-]{0,300}",
                2 => "[a-zA-Z0-9._:/%-]{0,140}",
                1 => "(sha256|sha512)?:[0-9a-fA-F]{0,130}",
                1 => any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(100_000))]

            #[test]
            fn names_parse_without_panics_and_print_as_given(text in text()) {
                if let Ok(name) = text.parse::<RepoName>() {
                    prop_assert_eq!(name.as_str(), text.as_str());
                    prop_assert!(name.as_str().len() <= MAX_NAME_LEN);
                    prop_assert!(!name.as_str().contains(".."));
                    // The namespace is the first path component, never empty, never a slash.
                    let namespace = name.namespace();
                    prop_assert!(!namespace.is_empty() && !namespace.contains('/'));
                    prop_assert!(text.split('/').next() == Some(namespace));
                }
            }

            #[test]
            fn tags_parse_without_panics_and_print_as_given(text in text()) {
                if let Ok(tag) = text.parse::<Tag>() {
                    prop_assert_eq!(tag.as_str(), text.as_str());
                    prop_assert!(tag.as_str().len() <= MAX_TAG_LEN);
                }
            }

            #[test]
            fn references_parse_without_panics_and_print_as_given(text in text()) {
                if let Ok(reference) = text.parse::<Reference>() {
                    prop_assert_eq!(reference.to_string(), text);
                }
            }
        }
    }
}
