//! berth-registry in-process: the internal registry, or an upstream with access control.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tempfile::TempDir;

use super::*;

/// berth-registry in-process with its own storage root: the internal registry the cacher copies
/// into, or (with access control) an upstream of the kind the cacher pulls from.
pub struct Berth {
    dir: TempDir,
    root: PathBuf,
    server: BackgroundServer,
    tls: bool,
}

impl Berth {
    /// Open to everyone, as the internal registry on a trusted network.
    pub fn start() -> Berth {
        let dir = tempdir("berth-cacher-e2e-");
        let root = dir.path().join("root");
        Berth::serve(dir, root, None, None)
    }

    /// Like [`Berth::start`], storing everything under `root` (a small disk, say).
    pub fn start_on(root: &Path) -> Berth {
        Berth::serve(tempdir("berth-cacher-e2e-"), root.to_owned(), None, None)
    }

    /// Open to everyone, with `quotas_yaml` (a list, as under `quotas:` in its configuration) in
    /// force. The registry keeps its quotas in its database, so they are put there before it
    /// serves.
    pub fn start_with_quotas(quotas_yaml: &str) -> Berth {
        use berth_registry::metadata::{MetadataStore, SqliteMetadataStore};

        let dir = tempdir("berth-cacher-e2e-quota-");
        let quotas: Vec<berth_registry::quota::Quota> =
            serde_norway::from_str(quotas_yaml).expect("a quota list");
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("create the storage root");
        let metadata = SqliteMetadataStore::open(&root.join("metadata.sqlite"))
            .expect("open the metadata store");
        block_on(metadata.set_quotas(&quotas)).expect("put the quotas in force");
        Berth::serve(dir, root, None, None)
    }

    /// With access control: `auth_yaml` is an `auth:` section (`mode`, `access`, `token`, ...);
    /// `users` become the htpasswd file (bcrypt) its `htpasswd` is pointed at.
    pub fn start_with_auth(auth_yaml: &str, users: &[(&str, &str)]) -> Berth {
        let dir = tempdir("berth-cacher-e2e-auth-");
        let mut config: berth_registry::auth::AuthConfig =
            serde_norway::from_str(auth_yaml).expect("an auth configuration");
        if !users.is_empty() {
            let htpasswd = dir.path().join("htpasswd");
            write_htpasswd(&htpasswd, users);
            config.htpasswd.get_or_insert(htpasswd);
        }
        let root = dir.path().join("root");
        Berth::serve(dir, root, Some(config), None)
    }

    /// Over HTTPS with the certificate and key `tls`, asking clients for a certificate: with
    /// `auth_yaml` naming an `instance_identity` bundle, apps present their instance identity.
    pub fn start_with_identity(
        auth_yaml: &str,
        (certificate, private_key): (&Path, &Path),
    ) -> Berth {
        let config: berth_registry::auth::AuthConfig =
            serde_norway::from_str(auth_yaml).expect("an auth configuration");
        let tls = berth_registry::server::ServerTls::load(&berth_registry::config::TlsConfig {
            certificate: certificate.to_owned(),
            private_key: private_key.to_owned(),
        })
        .expect("load the server certificate");
        tls.request_client_certificates(true);
        let dir = tempdir("berth-cacher-e2e-identity-");
        let root = dir.path().join("root");
        Berth::serve(dir, root, Some(config), Some(tls))
    }

    /// Open to everyone, mirroring upstreams as a pull-through cache: `proxy_yaml` is the list
    /// under `proxy:` in its configuration.
    pub fn start_with_proxy(proxy_yaml: &str) -> Berth {
        let upstreams: Vec<berth_registry::proxy::UpstreamConfig> =
            serde_norway::from_str(proxy_yaml).expect("a proxy section");
        let dir = tempdir("berth-cacher-e2e-proxy-");
        let root = dir.path().join("root");
        Berth::serve_proxying(dir, root, None, None, upstreams)
    }

    fn serve(
        dir: TempDir,
        root: PathBuf,
        auth: Option<berth_registry::auth::AuthConfig>,
        tls: Option<berth_registry::server::ServerTls>,
    ) -> Berth {
        Berth::serve_proxying(dir, root, auth, tls, Vec::new())
    }

    fn serve_proxying(
        dir: TempDir,
        root: PathBuf,
        auth: Option<berth_registry::auth::AuthConfig>,
        tls: Option<berth_registry::server::ServerTls>,
        upstreams: Vec<berth_registry::proxy::UpstreamConfig>,
    ) -> Berth {
        use berth_registry::api::{AppState, router};
        use berth_registry::auth::Auth;
        use berth_registry::config::Limits;
        use berth_registry::content::FsContentStore;
        use berth_registry::metadata::SqliteMetadataStore;

        let auth = auth.map(|config| block_on(Auth::load(&config)).expect("load the auth config"));
        let https = tls.is_some();
        let store = root.clone();
        let server = BackgroundServer::start("berth-registry", tls, move || {
            let root = store;
            let content = FsContentStore::open(&root).expect("open the content store");
            let metadata = SqliteMetadataStore::open(&root.join("metadata.sqlite"))
                .expect("open the metadata store");
            let proxy = berth_registry::proxy::Proxy::new(&upstreams).expect("set up the proxy");
            let state = AppState::new(Arc::new(content), Arc::new(metadata), Limits::default())
                .with_proxy(proxy);
            router(Arc::new(match auth {
                Some(auth) => state.with_auth(auth),
                None => state,
            }))
        });
        Berth {
            dir,
            root,
            server,
            tls: https,
        }
    }

    /// `127.0.0.1:PORT`, as image references spell it.
    pub fn host(&self) -> String {
        self.server.addr.to_string()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.server.addr)
    }

    /// `host/repo@digest`: the reference pinning manifest `digest` of `repo` here.
    pub fn pinned(&self, repo: &str, digest: &str) -> String {
        format!("{}/{repo}@{digest}", self.host())
    }

    pub fn root(&self) -> PathBuf {
        self.root.clone()
    }

    pub fn catalog(&self) -> Vec<String> {
        let response = http(reqwest::Method::GET, &format!("{}/v2/_catalog", self.url()));
        assert_eq!(response.status, 200, "GET /v2/_catalog");
        let catalog: Value = serde_json::from_slice(&response.body).expect("catalog JSON");
        serde_json::from_value(catalog["repositories"].clone()).expect("a repository list")
    }

    /// The tags of `repo`; none for a repository that does not exist.
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let response = http(
            reqwest::Method::GET,
            &format!("{}/v2/{repo}/tags/list", self.url()),
        );
        if response.status == 404 {
            return Vec::new();
        }
        assert_eq!(response.status, 200, "GET tags of {repo}");
        let list: Value = serde_json::from_slice(&response.body).expect("tag list JSON");
        serde_json::from_value(list["tags"].clone()).unwrap_or_default()
    }

    /// The bytes of manifest `reference` in `repo`, if it is there.
    pub fn manifest(&self, repo: &str, reference: &str) -> Option<Vec<u8>> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        let response = http(reqwest::Method::GET, &url);
        match response.status {
            200 => Some(response.body),
            404 => None,
            status => panic!("GET {url} answered {status}"),
        }
    }

    pub fn has_blob(&self, repo: &str, digest: &str) -> bool {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.url());
        match http(reqwest::Method::HEAD, &url).status {
            200 => true,
            404 => false,
            status => panic!("HEAD {url} answered {status}"),
        }
    }

    /// Pushes `top` and `blobs` below it as `repo_tag` with skopeo, logging in with
    /// `credentials` when given.
    pub fn push(
        &self,
        repo_tag: &str,
        top: &Blob,
        blobs: &[&Blob],
        credentials: Option<(&str, &str)>,
    ) {
        let destination = format!("{}/{repo_tag}", self.host());
        skopeo_push(self.dir.path(), &destination, top, blobs, credentials);
    }

    /// Stops serving; the storage stays until the value is dropped.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}
