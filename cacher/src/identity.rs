//! The staging container's own instance identity: the certificate and key Diego writes for every
//! container (`CF_INSTANCE_CERT`, `CF_INSTANCE_KEY`), presented to the internal registry as the
//! TLS client identity instead of a password. The app's GUID is read from the certificate, the
//! only GUID the registry will let it push under.

use std::path::{Path, PathBuf};

use x509_parser::pem::Pem;

/// Environment variables naming the PEM files: the certificate file holds the leaf, then the
/// instance identity CA.
pub const CERT_ENV: &str = "CF_INSTANCE_CERT";
pub const KEY_ENV: &str = "CF_INSTANCE_KEY";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("registry.identity is instance, but {CERT_ENV} and {KEY_ENV} are not both set")]
    Missing,
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

/// Where the files are, as the environment says.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl IdentityFiles {
    /// The files the environment names; a variable set to nothing names none.
    pub fn from_env() -> Option<IdentityFiles> {
        let path = |name| std::env::var_os(name).filter(|value| !value.is_empty());
        Some(IdentityFiles {
            certificate: path(CERT_ENV)?.into(),
            key: path(KEY_ENV)?.into(),
        })
    }
}

/// The loaded identity: what TLS presents, and the app it names.
pub struct InstanceIdentity {
    pub tls: reqwest::Identity,
    pub app_guid: String,
}

impl InstanceIdentity {
    pub fn load(files: Option<&IdentityFiles>) -> Result<InstanceIdentity, IdentityError> {
        let files = files.ok_or(IdentityError::Missing)?;
        let read =
            |path: &Path| std::fs::read(path).map_err(|e| IdentityError::Read(path.to_owned(), e));
        let certificate = read(&files.certificate)?;
        let invalid = |why: String| IdentityError::Invalid(files.certificate.clone(), why);
        let app_guid = app_guid(&certificate).map_err(invalid)?;
        let mut pem = certificate;
        pem.push(b'\n');
        pem.extend(read(&files.key)?);
        let tls = reqwest::Identity::from_pem(&pem)
            .map_err(|e| invalid(format!("with the key in {}: {e}", files.key.display())))?;
        Ok(InstanceIdentity { tls, app_guid })
    }
}

/// The GUID of the leaf's (the file's first certificate's) `app:<guid>` OU.
fn app_guid(pem: &[u8]) -> Result<String, String> {
    let leaf = Pem::iter_from_buffer(pem)
        .next()
        .ok_or("holds no PEM certificate")?
        .map_err(|e| e.to_string())?;
    let certificate = leaf.parse_x509().map_err(|e| e.to_string())?;
    let mut apps = certificate
        .subject()
        .iter_organizational_unit()
        .filter_map(|unit| unit.as_str().ok()?.strip_prefix("app:"));
    match (apps.next(), apps.next()) {
        (Some(guid), None) => Ok(guid.to_owned()),
        (None, _) => Err("the certificate has no OU app:<guid>".into()),
        (Some(_), Some(_)) => Err("the certificate names more than one app".into()),
    }
}
