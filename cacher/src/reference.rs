//! Image references as Docker writes them (`ubuntu`, `host:5000/ns/app:1.0@sha256:...`), normalised.

use std::fmt;

use berth_oci::{Digest, RepoName, Tag};

/// The registry Docker means when a reference names none.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {0:?} has an invalid repository name: {1}")]
    Name(String, berth_oci::NameError),
    #[error("image reference {0:?} has an invalid tag")]
    Tag(String),
    #[error("image reference {0:?} has an invalid digest: {1}")]
    Digest(String, berth_oci::DigestError),
}

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// `docker.io` for Docker Hub, else the `host[:port]` as written.
    pub registry: String,
    pub repository: RepoName,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl ImageReference {
    /// Parses `input` the way `docker pull` does: the first component is a registry only if it
    /// contains `.` or `:` or is `localhost`; Docker Hub's single-component names live under
    /// `library/`; with neither tag nor digest the tag is `latest`.
    pub fn parse(input: &str) -> Result<ImageReference, ReferenceError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_and_tag, digest) = match input.split_once('@') {
            Some((name, digest)) => {
                let digest = digest
                    .parse::<Digest>()
                    .map_err(|e| ReferenceError::Digest(input.to_owned(), e))?;
                (name, Some(digest))
            }
            None => (input, None),
        };
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(colon) => {
                let at = last_slash + colon;
                let tag = name_and_tag[at + 1..]
                    .parse::<Tag>()
                    .map_err(|_| ReferenceError::Tag(input.to_owned()))?;
                (&name_and_tag[..at], Some(tag))
            }
            None => (name_and_tag, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if is_registry_host(first) => (first.to_owned(), rest.to_owned()),
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let repository = path
            .parse::<RepoName>()
            .map_err(|e| ReferenceError::Name(input.to_owned(), e))?;
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".parse().expect("latest is a valid tag")),
            (tag, _) => tag,
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The `host[:port]` whose `/v2/` API serves this image.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.to_string(),
            (None, None) => unreachable!("parse always sets a tag or a digest"),
        }
    }

    /// The form the Docker lifecycle builder has always written to `docker_image`: Docker Hub
    /// images without their registry (`library/ubuntu:latest`), others with it. A Docker Hub
    /// repository whose first component reads as a host (`docker.io/localhost/app`) keeps its
    /// registry, or whoever reads the result would pull from that host.
    pub fn builder_form(&self) -> String {
        let first = self
            .repository
            .as_str()
            .split('/')
            .next()
            .unwrap_or_default();
        let mut out = if self.registry == DOCKER_HUB && !is_registry_host(first) {
            self.repository.to_string()
        } else {
            format!("{}/{}", self.registry, self.repository)
        };
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag.as_str());
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(&digest.to_string());
        }
        out
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn is_registry_host(component: &str) -> bool {
    component.contains('.')
        || component.contains(':')
        || component == "localhost"
        || component.bytes().any(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(input: &str) -> (String, String, Option<String>, Option<String>) {
        let r = ImageReference::parse(input).unwrap();
        (
            r.registry.clone(),
            r.repository.to_string(),
            r.tag.map(|t| t.to_string()),
            r.digest.map(|d| d.to_string()),
        )
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_short_names_normalise_like_docker() {
        assert_eq!(
            parts("ubuntu"),
            (
                "docker.io".into(),
                "library/ubuntu".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(parts("index.docker.io/ubuntu:22.04").1, "library/ubuntu");
        assert_eq!(parts("docker.io/bitnami/nginx").1, "bitnami/nginx");
        assert_eq!(
            ImageReference::parse("ubuntu").unwrap().api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn first_component_is_a_host_only_with_dot_colon_or_localhost() {
        assert_eq!(parts("myorg/app").0, "docker.io");
        assert_eq!(parts("localhost/app").0, "localhost");
        assert_eq!(parts("localhost:5000/app:1").0, "localhost:5000");
        assert_eq!(parts("registry.example.com/a/b/c:v1").1, "a/b/c");
    }

    #[test]
    fn tags_and_digests() {
        let (reg, repo, tag, digest) = parts(&format!("127.0.0.1:5000/ns/app:1.0@{D}"));
        assert_eq!((reg.as_str(), repo.as_str()), ("127.0.0.1:5000", "ns/app"));
        assert_eq!(tag.as_deref(), Some("1.0"));
        assert_eq!(digest.as_deref(), Some(D));
        // A digest alone does not imply :latest.
        assert_eq!(parts(&format!("app@{D}")).2, None);
        let pinned = ImageReference::parse(&format!("app@{D}")).unwrap();
        assert_eq!(pinned.manifest_reference(), D);
    }

    #[test]
    fn builder_form_matches_the_lifecycle_builder() {
        let form = |s: &str| ImageReference::parse(s).unwrap().builder_form();
        assert_eq!(form("ubuntu"), "library/ubuntu:latest");
        assert_eq!(form("r.example.com:443/x/y:2"), "r.example.com:443/x/y:2");
        assert_eq!(
            form("docker.io/localhost/app"),
            "docker.io/localhost/app:latest"
        );
        assert_eq!(form("docker.io/my.org/app:1"), "docker.io/my.org/app:1");
        assert_eq!(
            ImageReference::parse("r.example.com/x:2")
                .unwrap()
                .to_string(),
            "r.example.com/x:2"
        );
    }

    #[test]
    fn invalid_references_are_rejected() {
        for bad in [
            "",
            "ns/UPPER",
            "app:bad tag",
            "a/../b",
            "app@sha256:xyz",
            "app:",
        ] {
            assert!(
                ImageReference::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::generated::{CASES, text_of};

    const PIECES: &[&str] = &[
        "/",
        "/",
        ":",
        "@",
        ".",
        "-",
        "_",
        "__",
        " ",
        "localhost",
        "docker.io",
        "index.docker.io",
        "host:5000",
        "sha256:",
        "library",
        "latest",
        "UPPER",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// Whatever Cloud Controller passes as `-dockerRef`, parsing answers without panicking,
        /// and what it accepts it writes back in a form it reads as the same reference.
        #[test]
        fn any_reference_parses_or_is_refused(input in text_of(PIECES)) {
            if let Ok(reference) = ImageReference::parse(&input) {
                reference.manifest_reference();
                reference.api_host();
                prop_assert_eq!(ImageReference::parse(&reference.to_string()), Ok(reference.clone()));
                prop_assert_eq!(ImageReference::parse(&reference.builder_form()), Ok(reference));
            }
        }
    }
}
