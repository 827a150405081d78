//! Which images staged droplets name, asked of Cloud Controller's v3 API with a UAA client
//! (client credentials grant): `GET /v3/droplets?states=STAGED`, page after page by
//! `pagination.next.href`. A Docker app's droplet carries the image it runs in `image`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use super::CloudControllerConfig;
use crate::config::ConfigError;

/// Far more droplets than a foundation has (pages hold 5,000); a loop of `next` links ends here.
const MAX_PAGES: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum CloudControllerError {
    #[error("reading the UAA client secret from {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Request { url: Url, source: reqwest::Error },
    #[error("{url} answered {status}")]
    Status {
        url: Url,
        status: reqwest::StatusCode,
    },
    #[error("{url}: the next page {next:?} is not on Cloud Controller")]
    ForeignPage { url: Url, next: String },
    #[error("more than {MAX_PAGES} pages of droplets")]
    TooManyPages,
}

/// Images staged droplets name, by repository path (the registry host left out) and tag or
/// digest.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InUse {
    images: HashSet<(String, String)>,
}

impl InUse {
    /// Whether a droplet names `reference` (a tag or digest) of repository `repo`.
    pub fn names(&self, repo: &str, reference: &str) -> bool {
        self.images
            .contains(&(repo.to_owned(), reference.to_owned()))
    }

    /// Adds a droplet's image, `[host[:port]/]path[:tag][@digest]`; both the tag and the digest
    /// count if it has both.
    pub fn add(&mut self, image: &str) {
        let (name, digest) = match image.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (image, None),
        };
        let (path, tag) = match name.rsplit_once(':') {
            Some((path, tag)) if !tag.contains('/') => (path, Some(tag)),
            _ => (name, None),
        };
        // As Docker reads a reference: a first component with a dot or a port, or `localhost`,
        // is the registry.
        let path = match path.split_once('/') {
            Some((host, rest)) if host.contains(['.', ':']) || host == "localhost" => rest,
            _ => path,
        };
        if let Some(digest) = digest {
            self.images.insert((path.to_owned(), digest.to_owned()));
        }
        let tag = tag.or(digest.is_none().then_some("latest"));
        if let Some(tag) = tag {
            self.images.insert((path.to_owned(), tag.to_owned()));
        }
    }
}

#[derive(Deserialize)]
struct Token {
    access_token: String,
}

#[derive(Deserialize)]
struct DropletPage {
    pagination: Pagination,
    resources: Vec<Droplet>,
}

#[derive(Deserialize)]
struct Pagination {
    next: Option<Link>,
}

#[derive(Deserialize)]
struct Link {
    href: String,
}

#[derive(Deserialize)]
struct Droplet {
    image: Option<String>,
}

pub struct CloudController {
    http: reqwest::Client,
    droplets: Url,
    token: Url,
    client_id: String,
    secret_file: PathBuf,
}

fn endpoint(base: &str, path: &str, what: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(&format!("{}{path}", base.trim_end_matches('/'))).map_err(|e| {
        ConfigError::Invalid(format!("retention.cloud_controller.{what} {base:?}: {e}"))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid(format!(
            "retention.cloud_controller.{what} {base:?}: expected an http or https URL"
        )));
    }
    Ok(url)
}

impl CloudController {
    /// Checks the configuration, including that the secret can be read (it is read again for
    /// every run, so a rotated secret is picked up).
    pub fn new(config: &CloudControllerConfig) -> Result<CloudController, ConfigError> {
        let droplets = endpoint(
            &config.api_url,
            "/v3/droplets?states=STAGED&per_page=5000",
            "api_url",
        )?;
        let token = endpoint(&config.uaa_url, "/oauth/token", "uaa_url")?;
        if config.client_id.is_empty() {
            return Err(ConfigError::Invalid(
                "retention.cloud_controller.client_id must not be empty".into(),
            ));
        }
        let secret = std::fs::read_to_string(&config.client_secret_file).map_err(|source| {
            ConfigError::Read {
                path: config.client_secret_file.clone(),
                source,
            }
        })?;
        if secret.trim().is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{} is empty",
                config.client_secret_file.display()
            )));
        }
        Ok(CloudController {
            http: crate::config::outbound_client(
                config.ca_file.as_deref(),
                Duration::from_secs(config.timeout_seconds),
                "Cloud Controller",
            )?,
            droplets,
            token,
            client_id: config.client_id.clone(),
            secret_file: config.client_secret_file.clone(),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        url: &Url,
        request: reqwest::RequestBuilder,
    ) -> Result<T, CloudControllerError> {
        let failed = |source| CloudControllerError::Request {
            url: url.clone(),
            source,
        };
        let response = request
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(failed)?;
        if !response.status().is_success() {
            return Err(CloudControllerError::Status {
                url: url.clone(),
                status: response.status(),
            });
        }
        response.json().await.map_err(failed)
    }

    /// Every image a staged droplet names.
    pub async fn in_use(&self) -> Result<InUse, CloudControllerError> {
        let secret = std::fs::read_to_string(&self.secret_file).map_err(|source| {
            CloudControllerError::Secret {
                path: self.secret_file.clone(),
                source,
            }
        })?;
        let token: Token = self
            .json(
                &self.token,
                self.http
                    .post(self.token.clone())
                    .basic_auth(&self.client_id, Some(secret.trim()))
                    .form(&[("grant_type", "client_credentials")]),
            )
            .await?;
        let mut in_use = InUse::default();
        let mut url = self.droplets.clone();
        for _ in 0..MAX_PAGES {
            let page: DropletPage = self
                .json(
                    &url,
                    self.http.get(url.clone()).bearer_auth(&token.access_token),
                )
                .await?;
            for image in page.resources.iter().filter_map(|d| d.image.as_deref()) {
                in_use.add(image);
            }
            let Some(next) = page.pagination.next else {
                return Ok(in_use);
            };
            // The token goes only to Cloud Controller itself.
            let next_url = url
                .join(&next.href)
                .ok()
                .filter(|next| next.origin() == self.droplets.origin());
            url = next_url.ok_or(CloudControllerError::ForeignPage {
                url,
                next: next.href,
            })?;
        }
        Err(CloudControllerError::TooManyPages)
    }
}
