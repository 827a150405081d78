//! The referrers API: manifests whose `subject` is a given digest, as an OCI index.

use axum::Json;
use axum::extract::Query;
use axum::http::{HeaderValue, Uri, header};
use axum::response::IntoResponse;
use berth_oci::{Digest, RepoName, media_type};
use serde::Deserialize;

use super::{AppState, HandlerResult};
use crate::error::RegistryError;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReferrersQuery {
    artifact_type: Option<String>,
}

pub(super) async fn list(
    state: &AppState,
    repo: &RepoName,
    subject: &Digest,
    uri: &Uri,
) -> HandlerResult {
    let query = Query::<ReferrersQuery>::try_from_uri(uri)
        .map_err(|e| RegistryError::Unsupported(format!("referrers parameters: {e}")))?
        .0;
    let filter = query.artifact_type.filter(|t| !t.is_empty());
    let manifests = state
        .metadata
        .referrers(repo, subject, filter.as_deref())
        .await?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": manifests,
    });
    let mut response = Json(index).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(media_type::OCI_INDEX),
    );
    if filter.is_some() {
        headers.insert(
            "OCI-Filters-Applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(response)
}
