//! App identities from TLS client certificates: Cloud Foundry's instance identity certificates,
//! which Diego issues to every container (staging tasks included) with the app's GUID in an OU.
//!
//! The TLS layer accepts any client certificate whose holder proves possession of its key, so
//! that a certificate that does not belong here gets `401` with the OCI error JSON rather than a
//! TLS alert. Trust is decided here, per request, against the configured CA bundle: a connection
//! may outlive its certificate, and the bundle is reloaded with the rest of access control.

use std::path::Path;

use tokio_rustls::rustls::crypto;
use tokio_rustls::rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::policy::{Identity, app_user, organization_group, space_group};
use crate::config::ConfigError;

/// Why a client certificate does not identify an app. Logged, never shown to the client beyond
/// `401`: the reasons would help whoever probes with forged certificates.
#[derive(Debug, thiserror::Error)]
pub(super) enum CertificateRefused {
    #[error("no instance identity CA bundle is configured")]
    NotConfigured,
    #[error("the chain does not validate for client authentication: {0}")]
    Chain(webpki::Error),
    #[error("the certificate does not parse: {0}")]
    Parse(String),
    #[error("its key usage does not allow digital signatures")]
    KeyUsage,
    #[error("its subject has no OU app:<guid>")]
    NoApp,
    #[error("its subject names more than one app")]
    SeveralApps,
    #[error("OU {0:?} does not hold a GUID")]
    BadGuid(String),
}

/// The CA bundle instance identity certificates must chain to.
pub(super) struct InstanceIdentity {
    anchors: Vec<TrustAnchor<'static>>,
}

impl InstanceIdentity {
    /// Loads every certificate of the PEM bundle at `path` as a trust anchor (on Cloud Foundry:
    /// the instance identity CA and the application CA that signs it, so that a rotation of the
    /// former under the same root goes on being trusted).
    pub(super) fn load(path: &Path) -> Result<InstanceIdentity, ConfigError> {
        let invalid = |why: String| {
            ConfigError::Invalid(format!(
                "auth.instance_identity.ca_file {}: {why}",
                path.display()
            ))
        };
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let certificates: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut bytes.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(e.to_string()))?;
        if certificates.is_empty() {
            return Err(invalid("holds no PEM certificate".into()));
        }
        let anchors = certificates
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| invalid(format!("{e:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(InstanceIdentity { anchors })
    }

    /// The app `chain` (leaf first, as the client sent it) identifies at `now`.
    pub(super) fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Identity, CertificateRefused> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(CertificateRefused::Parse("no certificate".into()))?;
        let end_entity =
            webpki::EndEntityCert::try_from(leaf).map_err(CertificateRefused::Chain)?;
        end_entity
            .verify_for_usage(
                crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .all,
                &self.anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(CertificateRefused::Chain)?;
        app_identity(leaf)
    }
}

/// Reads the identity out of a leaf whose chain validated: the app from its one `app:<guid>` OU,
/// groups from `space:<guid>` and `organization:<guid>`. The extended key usage was checked with
/// the chain; the key usage, which webpki leaves to the caller, is checked here.
fn app_identity(leaf: &CertificateDer<'_>) -> Result<Identity, CertificateRefused> {
    let (_, certificate) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| CertificateRefused::Parse(e.to_string()))?;
    let key_usage = certificate
        .key_usage()
        .map_err(|e| CertificateRefused::Parse(e.to_string()))?;
    if key_usage.is_some_and(|usage| !usage.value.digital_signature()) {
        return Err(CertificateRefused::KeyUsage);
    }
    let mut app = None;
    let mut groups = Vec::new();
    for unit in certificate.subject().iter_organizational_unit() {
        let Ok(unit) = unit.as_str() else { continue };
        let Some((kind, guid)) = unit.split_once(':') else {
            continue;
        };
        let group = match kind {
            "app" => {
                if !berth_oci::is_app_guid(guid) {
                    return Err(CertificateRefused::BadGuid(unit.into()));
                }
                if app.replace(guid).is_some() {
                    return Err(CertificateRefused::SeveralApps);
                }
                continue;
            }
            "space" => space_group(guid),
            "organization" => organization_group(guid),
            _ => continue,
        };
        if !berth_oci::is_app_guid(guid) {
            return Err(CertificateRefused::BadGuid(unit.into()));
        }
        groups.push(group);
    }
    let app = app.ok_or(CertificateRefused::NoApp)?;
    Ok(Identity {
        user: Some(app_user(app)),
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_testkit::{DiegoCa, Leaf};

    const GUID: &str = "5f9c2a1e-0b7d-4c3e-9a61-2d8f4e7b1c90";

    fn chain(path: &Path) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(path).unwrap();
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn the_app_and_its_groups_come_from_the_ous_of_a_leaf_that_chains() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DiegoCa::generate(dir.path(), "diego");
        let trust = InstanceIdentity::load(&ca.bundle).unwrap();
        let verify = |name: &str, units: &[&str]| {
            let leaf = Leaf {
                organizational_units: units.iter().map(|u| u.to_string()).collect(),
                ..Leaf::for_app("o", "s", GUID)
            };
            trust.verify(&chain(&ca.issue(name, &leaf).certificate), UnixTime::now())
        };
        let who = verify(
            "good",
            &["organization:0c1d", "space:5a6b", &format!("app:{GUID}")],
        )
        .unwrap();
        assert_eq!(who.user.as_deref(), Some(format!("app:{GUID}").as_str()));
        // One multi-valued RDN, as Go writes it: DER orders a SET's members, so order is lost.
        let mut groups = who.groups.clone();
        groups.sort();
        assert_eq!(groups, ["organization:0c1d", "space:5a6b"]);
        assert!(who.is_app());
        // Other OUs are ignored; an ambiguous or malformed app is refused.
        let plain = verify("plain", &["team:x", &format!("app:{GUID}")]).unwrap();
        assert!(plain.groups.is_empty());
        assert!(matches!(
            verify("two", &["app:aaaa", "app:bbbb"]),
            Err(CertificateRefused::SeveralApps)
        ));
        for bad in ["app:..x", "app:", "app:UPPER", "space:Not_Guid"] {
            assert!(
                matches!(
                    verify("bad", &[bad, "app:aaaa"]),
                    Err(CertificateRefused::BadGuid(_))
                ),
                "{bad}"
            );
        }
        // The leaf alone, without the instance identity CA the client sends with it, still
        // chains: the CA is in the trusted bundle.
        let full = chain(
            &ca.issue("alone", &Leaf::for_app("o", "s", GUID))
                .certificate,
        );
        assert!(trust.verify(&full[..1], UnixTime::now()).is_ok());
        assert!(matches!(
            trust.verify(&[], UnixTime::now()),
            Err(CertificateRefused::Parse(_))
        ));
    }

    #[test]
    fn a_bundle_without_certificates_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = InstanceIdentity::load(&path).err().unwrap().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }
}
