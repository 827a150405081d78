//! The server's TLS certificate: loaded from PEM files, swapped in place on reload so that a
//! rotated certificate takes effect without dropping a connection.

use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::WebPkiSupportedAlgorithms;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{
    DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme, crypto,
};

use crate::config::{ConfigError, TlsConfig};

/// The certificate every new handshake gets. Handshakes already done keep the one they used.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("certificate lock").clone())
    }
}

/// Optional client certificates, accepted at the TLS layer whoever signed them: the client only
/// has to prove it holds the certificate's key (rustls checks its CertificateVerify signature
/// here). Whether the certificate means anything is decided per request, against the instance
/// identity CA bundle, so that a certificate that does not validate is answered with `401` and the
/// OCI error JSON instead of a TLS alert the client cannot explain.
#[derive(Debug)]
struct AnyClientCertificate {
    /// Whether handshakes ask for a certificate at all: only with instance identity configured,
    /// read per handshake so a reload can turn it on or off.
    requested: AtomicBool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS acceptor (HTTP/2 and HTTP/1.1 by ALPN) whose certificate can be replaced while serving.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<CurrentCertificate>,
    clients: Arc<AnyClientCertificate>,
    acceptor: TlsAcceptor,
}

impl ServerTls {
    /// Loads the certificate chain and key named by `tls`, checking that they belong together.
    pub fn load(tls: &TlsConfig) -> Result<ServerTls, ConfigError> {
        let current = Arc::new(CurrentCertificate(RwLock::new(certified_key(tls)?)));
        let clients = Arc::new(AnyClientCertificate {
            requested: AtomicBool::new(false),
            algorithms: crypto::ring::default_provider().signature_verification_algorithms,
        });
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(clients.clone())
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            current,
            clients,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Whether new handshakes ask clients for an (optional) certificate.
    pub fn request_client_certificates(&self, requested: bool) {
        self.clients.requested.store(requested, Ordering::Relaxed);
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again and serves the new pair from the next handshake on. A pair that does
    /// not load is reported and the running one kept.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), ConfigError> {
        let loaded = certified_key(tls)?;
        *self.current.0.write().expect("certificate lock") = loaded;
        Ok(())
    }
}

fn read_pem(path: &Path) -> Result<BufReader<std::fs::File>, ConfigError> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })
}

fn certified_key(tls: &TlsConfig) -> Result<Arc<CertifiedKey>, ConfigError> {
    let certificates: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read_pem(&tls.certificate)?)
            .collect::<Result<_, _>>()
            .map_err(|source| ConfigError::Read {
                path: tls.certificate.clone(),
                source,
            })?;
    if certificates.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{} holds no PEM certificate",
            tls.certificate.display()
        )));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read_pem(&tls.private_key)?)
        .map_err(|source| ConfigError::Read {
            path: tls.private_key.clone(),
            source,
        })?
        .ok_or_else(|| {
            ConfigError::Invalid(format!(
                "{} holds no PEM private key",
                tls.private_key.display()
            ))
        })?;
    let provider = crypto::ring::default_provider();
    CertifiedKey::from_der(certificates, key, &provider)
        .map(Arc::new)
        .map_err(|e| {
            ConfigError::Invalid(format!(
                "TLS certificate {} and key {}: {e}",
                tls.certificate.display(),
                tls.private_key.display()
            ))
        })
}
