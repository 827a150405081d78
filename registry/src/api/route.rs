//! Turns the path after `/v2/` into a typed route, validating every name, reference and digest.

use berth_oci::{Digest, DigestError, NameError, Reference, RepoName};

use crate::content::UploadId;
use crate::error::RegistryError;

#[derive(Debug, PartialEq)]
pub(crate) enum Route {
    Catalog,
    Manifest(RepoName, Result<Reference, InvalidReference>),
    Blob(RepoName, Digest),
    UploadStart(RepoName),
    Upload(RepoName, UploadId),
    Tags(RepoName),
    Referrers(RepoName, Digest),
}

impl Route {
    /// A low-cardinality label for logs and metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Route::Catalog => "catalog",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) | Route::Upload(..) => "upload",
            Route::Tags(_) => "tags",
            Route::Referrers(..) => "referrers",
        }
    }

    /// The repository the route is about, if it is about one.
    pub(crate) fn repository(&self) -> Option<&RepoName> {
        match self {
            Route::Catalog => None,
            Route::Manifest(repo, _)
            | Route::Blob(repo, _)
            | Route::UploadStart(repo)
            | Route::Upload(repo, _)
            | Route::Tags(repo)
            | Route::Referrers(repo, _) => Some(repo),
        }
    }

    /// The same route, about the repository `rename` makes of its own.
    pub(crate) fn map_repository(self, rename: impl FnOnce(RepoName) -> RepoName) -> Route {
        match self {
            Route::Catalog => Route::Catalog,
            Route::Manifest(repo, reference) => Route::Manifest(rename(repo), reference),
            Route::Blob(repo, digest) => Route::Blob(rename(repo), digest),
            Route::UploadStart(repo) => Route::UploadStart(rename(repo)),
            Route::Upload(repo, id) => Route::Upload(rename(repo), id),
            Route::Tags(repo) => Route::Tags(rename(repo)),
            Route::Referrers(repo, digest) => Route::Referrers(rename(repo), digest),
        }
    }

    /// The methods the route answers, for the `Allow` header of a 405.
    pub(crate) fn allowed_methods(&self) -> &'static str {
        match self {
            Route::Catalog | Route::Tags(_) | Route::Referrers(..) => "GET",
            Route::Manifest(..) => "GET, HEAD, PUT, DELETE",
            Route::Blob(..) => "GET, HEAD, DELETE",
            Route::UploadStart(_) => "POST",
            Route::Upload(..) => "GET, PATCH, PUT, DELETE",
        }
    }
}

/// A manifest reference that is neither a tag nor a digest. No manifest can have it, so reading
/// one is "unknown", as in distribution; writing one is invalid.
#[derive(Debug, PartialEq)]
pub(crate) struct InvalidReference {
    pub(crate) text: String,
    /// Why it is no digest, if it was meant as one (it has a `:`); otherwise it is no tag.
    digest_error: Option<DigestError>,
}

impl From<InvalidReference> for RegistryError {
    fn from(invalid: InvalidReference) -> Self {
        match invalid.digest_error {
            Some(err) => RegistryError::DigestInvalid(err.to_string()),
            None => RegistryError::TagInvalid(NameError::Tag),
        }
    }
}

fn reference(text: &str) -> Result<Reference, InvalidReference> {
    let invalid = |digest_error| InvalidReference {
        text: text.to_owned(),
        digest_error,
    };
    if text.contains(':') {
        text.parse()
            .map(Reference::Digest)
            .map_err(|err| invalid(Some(err)))
    } else {
        text.parse().map(Reference::Tag).map_err(|_| invalid(None))
    }
}

fn digest(text: &str) -> Result<Digest, RegistryError> {
    text.parse()
        .map_err(|e: DigestError| RegistryError::DigestInvalid(e.to_string()))
}

/// Splits `path` at the last `marker` whose remainder holds no `/`: names may contain the
/// markers' words, references and digests never contain `/`.
fn split_last<'a>(path: &'a str, marker: &str) -> Option<(&'a str, &'a str)> {
    let at = path.rfind(marker)?;
    let rest = &path[at + marker.len()..];
    (!rest.contains('/')).then_some((&path[..at], rest))
}

/// Parses `path`, the request path without its `/v2/` prefix and still percent-encoded. Nothing
/// percent-encoded is valid in a name, tag or digest, so `%` never gets through.
pub(crate) fn parse(path: &str) -> Result<Route, RegistryError> {
    if path == "_catalog" {
        return Ok(Route::Catalog);
    }
    let name = |text: &str| text.parse::<RepoName>().map_err(RegistryError::from);
    if let Some(name_part) = path.strip_suffix("/tags/list") {
        return Ok(Route::Tags(name(name_part)?));
    }
    if let Some(name_part) = path.strip_suffix("/blobs/uploads") {
        return Ok(Route::UploadStart(name(name_part)?));
    }
    if let Some((name_part, id)) = split_last(path, "/blobs/uploads/") {
        let name = name(name_part)?;
        if id.is_empty() {
            return Ok(Route::UploadStart(name));
        }
        let id = id.parse().map_err(|_| RegistryError::UploadUnknown)?;
        return Ok(Route::Upload(name, id));
    }
    if let Some((name_part, reference)) = split_last(path, "/blobs/") {
        return Ok(Route::Blob(name(name_part)?, digest(reference)?));
    }
    if let Some((name_part, reference)) = split_last(path, "/manifests/") {
        return Ok(Route::Manifest(
            name(name_part)?,
            self::reference(reference),
        ));
    }
    if let Some((name_part, subject)) = split_last(path, "/referrers/") {
        return Ok(Route::Referrers(name(name_part)?, digest(subject)?));
    }
    Err(RegistryError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_every_resource() {
        let repo = |n: &str| n.parse::<RepoName>().unwrap();
        let d: Digest = DIGEST.parse().unwrap();
        assert_eq!(parse("_catalog").unwrap(), Route::Catalog);
        assert_eq!(parse("a/b/tags/list").unwrap(), Route::Tags(repo("a/b")));
        assert_eq!(
            parse("a/blobs/uploads/").unwrap(),
            Route::UploadStart(repo("a"))
        );
        assert_eq!(
            parse("a/blobs/uploads").unwrap(),
            Route::UploadStart(repo("a"))
        );
        let id = UploadId::new();
        assert_eq!(
            parse(&format!("a/blobs/uploads/{id}")).unwrap(),
            Route::Upload(repo("a"), id)
        );
        assert_eq!(
            parse(&format!("a/blobs/{DIGEST}")).unwrap(),
            Route::Blob(repo("a"), d.clone())
        );
        assert_eq!(
            parse("a/manifests/latest").unwrap(),
            Route::Manifest(repo("a"), Ok(Reference::Tag("latest".parse().unwrap())))
        );
        assert_eq!(
            parse(&format!("a/manifests/{DIGEST}")).unwrap(),
            Route::Manifest(repo("a"), Ok(Reference::Digest(d.clone())))
        );
        assert_eq!(
            parse(&format!("a/referrers/{DIGEST}")).unwrap(),
            Route::Referrers(repo("a"), d)
        );
    }

    #[test]
    fn names_may_contain_resource_words() {
        let parsed = parse(&format!("blobs/manifests/blobs/{DIGEST}")).unwrap();
        assert_eq!(
            parsed,
            Route::Blob("blobs/manifests".parse().unwrap(), DIGEST.parse().unwrap())
        );
        assert!(matches!(
            parse("tags/list/tags/list").unwrap(),
            Route::Tags(_)
        ));
    }

    #[test]
    fn hostile_paths_are_rejected_before_any_lookup() {
        for path in [
            "../etc/manifests/latest",
            "%2e%2e/manifests/latest",
            "a/../b/manifests/x",
            "/abs/tags/list",
            "UP/tags/list",
        ] {
            assert!(
                matches!(parse(path), Err(RegistryError::NameInvalid(_))),
                "{path}"
            );
        }
        for (reference, as_digest) in [("bad%2Ftag", false), ("-dash", false), ("sha256:123", true)]
        {
            let Ok(Route::Manifest(_, Err(unusable))) = parse(&format!("a/manifests/{reference}"))
            else {
                panic!("{reference} must parse as a manifest route with an unusable reference");
            };
            assert_eq!(unusable.text, reference);
            let err = RegistryError::from(unusable);
            if as_digest {
                assert!(matches!(err, RegistryError::DigestInvalid(_)), "{err:?}");
            } else {
                assert!(matches!(err, RegistryError::TagInvalid(_)), "{err:?}");
            }
        }
        assert!(matches!(
            parse("a/blobs/sha256:123"),
            Err(RegistryError::DigestInvalid(_))
        ));
        assert!(matches!(
            parse("a/blobs/uploads/not-a-uuid"),
            Err(RegistryError::UploadUnknown)
        ));
        assert!(matches!(
            parse("a/unknown/thing"),
            Err(RegistryError::NotFound)
        ));
    }
}
