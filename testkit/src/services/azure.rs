//! Azurite's Blob service (npm `azurite`): a fresh container per test.

use std::net::TcpStream;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{
    PrivateServer, ServerCell, ServerUrl, Started, http, server_dir, server_value,
    spawn_supervised, start_retrying, unique_name, wait_ready,
};
use crate::process::{free_port, require_tool};

const VARIABLE: &str = "BERTH_TEST_AZURE";

/// Azurite's well-known development account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Its well-known key (base64), the one Azure's SDKs and docs give for Azurite.
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The REST API version the requests here speak.
const API_VERSION: &str = "2021-08-06";

/// An empty container of its own, deleted with this value.
pub struct AzureContainer {
    /// The blob endpoint, account included: `http://127.0.0.1:PORT/devstoreaccount1`.
    pub endpoint: String,
    pub account: String,
    /// The account key, base64.
    pub access_key: String,
    pub container: String,
}

/// A new empty container on the shared Azurite server.
pub fn azure_container() -> AzureContainer {
    static SERVER: ServerCell = ServerCell::new();
    let endpoint = server_value(VARIABLE, &SERVER, start).trim_end_matches('/');
    let container = AzureContainer {
        endpoint: endpoint.to_owned(),
        account: AZURITE_ACCOUNT.to_owned(),
        access_key: AZURITE_KEY.to_owned(),
        container: unique_name('-'),
    };
    let (status, body) = container.request("PUT", None, b"");
    assert_eq!(
        status, 201,
        "creating container {} answered {status}: {body}",
        container.container
    );
    container
}

impl AzureContainer {
    /// A request signed with the account's Shared Key, on the container itself (`blob` `None`:
    /// `PUT` creates it, `DELETE` deletes it, `GET` lists it) or on one of its blobs (`PUT` of a
    /// block blob, `GET`, `HEAD`, `DELETE`): the status and body of the answer. For checking
    /// what a backend stored without going through it.
    pub fn request(&self, method: &str, blob: Option<&str>, body: &[u8]) -> (u16, String) {
        let server = ServerUrl::parse(VARIABLE, &self.endpoint);
        let mut path = format!("{}/{}", server.path, self.container);
        let mut headers = vec![
            ("x-ms-date", httpdate::fmt_http_date(SystemTime::now())),
            ("x-ms-version", API_VERSION.to_owned()),
        ];
        let (query, canonical_query) = match blob {
            Some(blob) => {
                path = format!("{path}/{blob}");
                if method == "PUT" {
                    headers.insert(0, ("x-ms-blob-type", "BlockBlob".to_owned()));
                }
                ("", "")
            }
            None if method == "GET" => (
                "?restype=container&comp=list",
                "\ncomp:list\nrestype:container",
            ),
            None => ("?restype=container", "\nrestype:container"),
        };
        let length = if body.is_empty() {
            String::new()
        } else {
            body.len().to_string()
        };
        let canonical_headers: String = headers
            .iter()
            .map(|(name, value)| format!("{name}:{value}\n"))
            .collect();
        let string_to_sign = format!(
            "{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n{canonical_headers}/{}{path}{canonical_query}",
            self.account
        );
        let key = STANDARD
            .decode(&self.access_key)
            .expect("the account key is base64");
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key");
        mac.update(string_to_sign.as_bytes());
        let signature = STANDARD.encode(mac.finalize().into_bytes());
        headers.push((
            "Authorization",
            format!("SharedKey {}:{signature}", self.account),
        ));
        http(
            &server.host,
            server.port,
            method,
            &format!("{path}{query}"),
            &headers,
            body,
        )
        .unwrap_or_else(|| panic!("{} cannot be reached", self.endpoint))
    }
}

impl Drop for AzureContainer {
    fn drop(&mut self) {
        let _ = self.request("DELETE", None, b"");
    }
}

pub(super) fn start() -> PrivateServer {
    start_retrying("Azurite", attempt)
}

fn attempt() -> Started {
    let dir = server_dir("berth-az");
    let log = dir.path.join("azurite.log");
    let port = free_port();
    let args = [
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        &port.to_string(),
        "--location",
        &dir.path.join("data").display().to_string(),
        "--skipApiVersionCheck",
        "--loose",
        "--silent",
    ]
    .map(String::from);
    let mut watchdog = spawn_supervised(
        &dir.path,
        &log,
        "TERM",
        &require_tool("azurite-blob"),
        &args,
    );
    wait_ready(&dir.path, &mut watchdog, &log, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok(PrivateServer {
        variable: VARIABLE,
        value: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
        watchdog,
        log,
    })
}
