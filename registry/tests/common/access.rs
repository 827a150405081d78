//! Access control material: htpasswd lines and keys.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// One htpasswd line for `user` with a bcrypt hash of `password` at `cost`, made by Apache's
/// `htpasswd -nbB -C cost`.
pub fn htpasswd_line(user: &str, password: &str, cost: u32) -> String {
    let line = run_bytes(
        Command::new(require_tool("htpasswd"))
            .arg("-nbB")
            .arg("-C")
            .arg(cost.to_string())
            .arg(user)
            .arg(password),
    );
    let line = String::from_utf8(line).expect("htpasswd prints text");
    let line = line.trim();
    assert!(
        line.starts_with(&format!("{user}:$2")),
        "htpasswd did not print a bcrypt entry for {user}"
    );
    line.to_string()
}

/// An EC P-256 key pair as PEM files: the PKCS#8 private key and a self-signed certificate of
/// its public key (CN=berth-token, two days), made with openssl.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub key: PathBuf,
    pub certificate: PathBuf,
}

impl KeyPair {
    /// Generates `NAME.key.pem` and `NAME.cert.pem` in `dir`.
    pub fn generate(dir: &Path, name: &str) -> KeyPair {
        let openssl = require_tool("openssl");
        let key = dir.join(format!("{name}.key.pem"));
        let certificate = dir.join(format!("{name}.cert.pem"));
        run_bytes(
            Command::new(&openssl)
                .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
                .arg("ec_paramgen_curve:P-256")
                .arg("-out")
                .arg(&key),
        );
        run_bytes(
            Command::new(&openssl)
                .args(["req", "-new", "-x509", "-key"])
                .arg(&key)
                .args(["-subj", "/CN=berth-token", "-days", "2", "-out"])
                .arg(&certificate),
        );
        KeyPair { key, certificate }
    }
}
