//! Versions: resolve a reference, show, download, lineage, splits and token statistics.

use actix_web::{HttpResponse, web};
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::http::Json;
use ferrite_platform::storage::ObjectKey;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::State;
use crate::domain::VersionReference;
use crate::error::RegistryError;
use crate::split::{self, SplitRequest, SplitResult};
use crate::store::{self, DatasetVersion, TokenStats};
use crate::tokens;

/// Resolves `<uuid>`, `<name>:<number>`, `<name>@<alias>` or `<name>` (the latest version).
#[utoipa::path(get, path = "/v1/datasets/resolve/{reference}", tag = "dataset-registry",
    params(("reference" = String, Path)),
    responses((status = 200, body = DatasetVersion), (status = 404)))]
pub async fn resolve(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<String>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let reference = VersionReference::parse(&path)?;
    let version = store::resolve(&state.pool, &reference)
        .await?
        .ok_or_else(|| RegistryError::not_found("dataset_version", path.as_str()))?;
    Ok(HttpResponse::Ok().json(version))
}

#[utoipa::path(get, path = "/v1/datasets/versions/{id}", tag = "dataset-registry",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = DatasetVersion), (status = 404)))]
pub async fn show(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    Ok(HttpResponse::Ok().json(find(&state, *path).await?))
}

/// The stored bytes, streamed from object storage.
#[utoipa::path(get, path = "/v1/datasets/versions/{id}/content", tag = "dataset-registry",
    params(("id" = Uuid, Path)),
    responses((status = 200, content_type = "application/octet-stream"), (status = 404)))]
pub async fn content(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let version = find(&state, *path).await?;
    let key = ObjectKey::parse(&version.object_key)?;
    let stream = state.storage.get_stream(&key).await?;
    let content_type = match version.format.as_str() {
        "text" => "text/plain; charset=utf-8",
        "json" => "application/json",
        _ => "application/jsonl",
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("x-content-sha256", version.sha256.clone()))
        .streaming(stream.map_err(|e| actix_web::error::ErrorInternalServerError(e.to_string()))))
}

/// A version and its ancestry.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = DatasetLineage)]
pub struct Lineage {
    pub version: DatasetVersion,
    /// The versions it was derived from, nearest first.
    pub derived_from: Vec<DatasetVersion>,
    /// The labeling campaign that produced it, when one did.
    pub campaign_id: Option<Uuid>,
}

#[utoipa::path(get, path = "/v1/datasets/versions/{id}/lineage", tag = "dataset-registry",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Lineage), (status = 404)))]
pub async fn lineage(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let mut chain = store::lineage(&state.pool, *path).await?.into_iter();
    let version = chain
        .next()
        .ok_or_else(|| RegistryError::not_found("dataset_version", path.to_string()))?;
    Ok(HttpResponse::Ok().json(Lineage {
        campaign_id: version.campaign_id,
        version,
        derived_from: chain.collect(),
    }))
}

/// Splits a version into train and eval versions, deterministically for a seed.
#[utoipa::path(post, path = "/v1/datasets/versions/{id}/split", tag = "dataset-registry",
    params(("id" = Uuid, Path)),
    request_body = SplitRequest,
    responses((status = 200, body = SplitResult), (status = 400), (status = 404)))]
pub async fn split(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<Uuid>,
    body: Json<SplitRequest>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let source = find(&state, *path).await?;
    let result = split::split(&state, &source, &body, &principal.name).await?;
    Ok(HttpResponse::Ok().json(result))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TokenStatsRequest {
    /// A model version reference whose artifacts hold `tokenizer.json`.
    pub tokenizer: String,
}

/// Counts each row's tokens under a registered model's tokenizer and records the distribution.
#[utoipa::path(post, path = "/v1/datasets/versions/{id}/stats", tag = "dataset-registry",
    params(("id" = Uuid, Path)),
    request_body = TokenStatsRequest,
    responses((status = 200, body = TokenStats), (status = 400), (status = 404)))]
pub async fn token_stats(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<Uuid>,
    body: Json<TokenStatsRequest>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let version = find(&state, *path).await?;
    let stats = tokens::count(&state, &version, &body.tokenizer).await?;
    Ok(HttpResponse::Ok().json(stats))
}

/// The token counts recorded for a version, one entry per tokenizer.
#[utoipa::path(get, path = "/v1/datasets/versions/{id}/stats", tag = "dataset-registry",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<TokenStats>), (status = 404)))]
pub async fn list_token_stats(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let version = find(&state, *path).await?;
    Ok(HttpResponse::Ok().json(store::list_token_stats(&state.pool, version.id).await?))
}

async fn find(state: &State, id: Uuid) -> Result<DatasetVersion, RegistryError> {
    let mut conn = state.pool.acquire().await?;
    store::find_version(&mut conn, id)
        .await?
        .ok_or_else(|| RegistryError::not_found("dataset_version", id.to_string()))
}
