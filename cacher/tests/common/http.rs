//! Plain blocking requests, for checking what a registry holds.

use super::*;

pub struct HttpResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// One plain request (manifest types accepted), for checking what a registry holds.
pub fn http(method: reqwest::Method, url: &str) -> HttpResponse {
    http_as(method, url, None)
}

/// Like [`http`], presenting `authorization` (a whole `Authorization` header value).
pub fn http_as(method: reqwest::Method, url: &str, authorization: Option<&str>) -> HttpResponse {
    block_on(async {
        let mut request = reqwest::Client::new()
            .request(method, url)
            .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT);
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        HttpResponse {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.expect("a response body").to_vec(),
        }
    })
}
