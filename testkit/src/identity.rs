//! Cloud Foundry instance identity certificates as Diego issues them, made with openssl: an
//! application root CA (`appRootCA`), the instance identity CA it signs (`instanceIdentityCA`),
//! and short-lived leaves with the container GUID as CN, the OUs `organization:`, `space:` and
//! `app:` in one multi-valued RDN, an RSA key in PKCS#1 PEM, key usages digitalSignature,
//! keyEncipherment and keyAgreement, extended key usages clientAuth and serverAuth; the
//! certificate file holds the leaf then the instance identity CA, as `CF_INSTANCE_CERT` does.
//!
//! Also the self-signed server certificate the tests serve HTTPS with.
//!
//! `openssl ca` is used for leaves because it sets validity to the second, which expired and
//! not-yet-valid certificates need.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::process::{require_tool, run_bytes};

/// The two CAs and the bundle a registry trusts, in a directory of their own.
pub struct DiegoCa {
    dir: PathBuf,
    intermediate: PathBuf,
    intermediate_key: PathBuf,
    /// The instance identity CA then the application root CA, as the BOSH job writes it.
    pub bundle: PathBuf,
}

/// What a leaf says; [`Leaf::for_app`] is what Diego gives a staging task.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub organizational_units: Vec<String>,
    /// Seconds from now; negative for the past.
    pub not_before: i64,
    pub not_after: i64,
    pub extended_key_usage: &'static str,
    pub key_usage: &'static str,
}

impl Leaf {
    /// A leaf for app `app` in space `space` of organization `org`, valid from a minute ago for
    /// the next hour.
    pub fn for_app(org: &str, space: &str, app: &str) -> Leaf {
        Leaf {
            organizational_units: vec![
                format!("organization:{org}"),
                format!("space:{space}"),
                format!("app:{app}"),
            ],
            not_before: -60,
            not_after: 3600,
            extended_key_usage: "clientAuth,serverAuth",
            key_usage: "critical,digitalSignature,keyEncipherment,keyAgreement",
        }
    }
}

/// A leaf's files: the chain (leaf, then the CA that signed it) and the key.
#[derive(Clone, Debug)]
pub struct InstanceIdentity {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl InstanceIdentity {
    /// The chain and key as one PEM document, as reqwest takes a client identity.
    pub fn pem(&self) -> Vec<u8> {
        let mut pem = fs::read(&self.certificate).expect("read the instance certificate");
        pem.extend(fs::read(&self.key).expect("read the instance key"));
        pem
    }
}

fn openssl() -> Command {
    Command::new(require_tool("openssl"))
}

/// `YYYYMMDDHHMMSSZ`, as `openssl ca -startdate` takes it, `offset` seconds from now.
fn generalized_time(offset: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64;
    let seconds = now + offset;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

impl DiegoCa {
    /// A root and an instance identity CA under `dir`, named `name` in their CNs (so two of
    /// them are two different CAs).
    pub fn generate(dir: &Path, name: &str) -> DiegoCa {
        let dir = dir.join(name);
        fs::create_dir_all(dir.join("issued")).expect("create the CA directory");
        let root = dir.join("root.pem");
        let root_key = dir.join("root.key");
        let intermediate = dir.join("instance-identity-ca.pem");
        let intermediate_key = dir.join("instance-identity-ca.key");
        let ca_extensions = dir.join("ca.ext");
        fs::write(
            &ca_extensions,
            "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n",
        )
        .expect("write the CA extensions");
        run_bytes(
            openssl()
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", &format!("/CN=appRootCA {name}")])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&root_key)
                .arg("-out")
                .arg(&root),
        );
        let request = dir.join("instance-identity-ca.csr");
        run_bytes(
            openssl()
                .args(["req", "-new", "-newkey", "rsa:2048", "-nodes"])
                .args(["-subj", &format!("/CN=instanceIdentityCA {name}")])
                .arg("-keyout")
                .arg(&intermediate_key)
                .arg("-out")
                .arg(&request),
        );
        run_bytes(
            openssl()
                .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
                .arg("-in")
                .arg(&request)
                .arg("-CA")
                .arg(&root)
                .arg("-CAkey")
                .arg(&root_key)
                .arg("-extfile")
                .arg(&ca_extensions)
                .arg("-out")
                .arg(&intermediate),
        );
        let bundle = dir.join("bundle.pem");
        let mut pem = fs::read(&intermediate).expect("read the instance identity CA");
        pem.extend(fs::read(&root).expect("read the root CA"));
        fs::write(&bundle, pem).expect("write the CA bundle");
        fs::write(dir.join("index.txt"), "").expect("write the CA database");
        fs::write(dir.join("serial"), "1000\n").expect("write the CA serial");
        fs::write(
            dir.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = diego\n\
                 [diego]\ndatabase = {dir}/index.txt\nnew_certs_dir = {dir}/issued\n\
                 serial = {dir}/serial\ndefault_md = sha256\npolicy = any\n\
                 unique_subject = no\n\
                 [any]\ncommonName = supplied\norganizationalUnitName = optional\n",
                dir = dir.display()
            ),
        )
        .expect("write the CA configuration");
        DiegoCa {
            dir,
            intermediate,
            intermediate_key,
            bundle,
        }
    }

    /// Issues `leaf` into `NAME.crt` (leaf, then the instance identity CA) and `NAME.key`.
    pub fn issue(&self, name: &str, leaf: &Leaf) -> InstanceIdentity {
        let key = self.dir.join(format!("{name}.key"));
        run_bytes(
            openssl()
                .args(["genrsa", "-traditional", "-out"])
                .arg(&key)
                .arg("2048"),
        );
        let mut subject = format!("/CN={name}");
        for (i, unit) in leaf.organizational_units.iter().enumerate() {
            subject.push(if i == 0 { '/' } else { '+' });
            subject.push_str(&format!("OU={unit}"));
        }
        let request = self.dir.join(format!("{name}.csr"));
        run_bytes(
            openssl()
                .args(["req", "-new", "-key"])
                .arg(&key)
                .args(["-subj", &subject, "-out"])
                .arg(&request),
        );
        let extensions = self.dir.join(format!("{name}.ext"));
        fs::write(
            &extensions,
            format!(
                "[leaf]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = {}\n\
                 extendedKeyUsage = {}\n",
                leaf.key_usage, leaf.extended_key_usage
            ),
        )
        .expect("write the leaf extensions");
        let leaf_only = self.dir.join(format!("{name}.leaf.pem"));
        run_bytes(
            openssl()
                .args(["ca", "-batch", "-notext", "-preserveDN", "-config"])
                .arg(self.dir.join("ca.cnf"))
                .arg("-cert")
                .arg(&self.intermediate)
                .arg("-keyfile")
                .arg(&self.intermediate_key)
                .args(["-startdate", &generalized_time(leaf.not_before)])
                .args(["-enddate", &generalized_time(leaf.not_after)])
                .arg("-extfile")
                .arg(&extensions)
                .args(["-extensions", "leaf", "-in"])
                .arg(&request)
                .arg("-out")
                .arg(&leaf_only),
        );
        let certificate = self.dir.join(format!("{name}.crt"));
        let mut chain = fs::read(&leaf_only).expect("read the leaf");
        chain.extend(fs::read(&self.intermediate).expect("read the instance identity CA"));
        fs::write(&certificate, chain).expect("write the instance certificate");
        InstanceIdentity { certificate, key }
    }
}

/// A self-signed server certificate for 127.0.0.1 (EC P-256, two days) as `cert.pem` and
/// `key.pem` in `dir`, its own trust anchor (CA:FALSE, or rustls refuses it as a leaf); returns
/// the certificate's and the key's paths.
pub fn loopback_server_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (certificate, private_key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run_bytes(
        openssl()
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .arg("ec_paramgen_curve:prime256v1")
            .args(["-nodes", "-days", "2", "-subj", "/CN=berth-test"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .arg("-keyout")
            .arg(&private_key)
            .arg("-out")
            .arg(&certificate),
    );
    (certificate, private_key)
}
