//! One version: by id, by reference, and its files.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use ferrite_platform::ApiError;
use ferrite_platform::auth::Principal;
use ferrite_platform::storage::{ObjectKey, StorageError};
use futures::TryStreamExt as _;
use serde::Serialize;
use uuid::Uuid;

use super::{RegistryState, require_engineer};
use crate::artifacts::relative_key;
use crate::domain::VersionReference;
use crate::error::RegistryError;
use crate::store::{self, ModelVersion};

#[utoipa::path(get, path = "/v1/registry/versions/{id}", tag = "model-registry",
    responses((status = 200, body = ModelVersion), (status = 404)))]
pub async fn get_version(
    principal: Principal,
    state: web::Data<RegistryState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let mut conn = state.pool.acquire().await?;
    Ok(HttpResponse::Ok().json(store::version(&mut conn, *id).await?))
}

/// Any of `<uuid>`, `<name>:<number>`, `<name>@<alias>`, `<name>` (the latest version).
#[utoipa::path(get, path = "/v1/registry/resolve/{reference}", tag = "model-registry",
    responses((status = 200, body = ModelVersion), (status = 400), (status = 404)))]
pub async fn resolve(
    principal: Principal,
    state: web::Data<RegistryState>,
    reference: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let parsed =
        VersionReference::parse(&reference).map_err(|e| RegistryError::invalid("reference", e))?;
    let mut conn = state.pool.acquire().await?;
    Ok(HttpResponse::Ok().json(store::resolve(&mut conn, &parsed).await?))
}

/// A file of a version's folder.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionFile {
    /// Path inside the folder, e.g. `model.safetensors`.
    pub path: String,
    pub size_bytes: u64,
}

/// The object-storage folder of a version.
async fn version_folder(
    state: &RegistryState,
    id: Uuid,
) -> Result<(ModelVersion, ObjectKey), RegistryError> {
    let mut conn = state.pool.acquire().await?;
    let version = store::version(&mut conn, id).await?;
    let prefix = ObjectKey::parse(version.artifact_prefix.trim_end_matches('/'))?;
    Ok((version, prefix))
}

#[utoipa::path(get, path = "/v1/registry/versions/{id}/files", tag = "model-registry",
    responses((status = 200, body = Vec<VersionFile>), (status = 404)))]
pub async fn list_files(
    principal: Principal,
    state: web::Data<RegistryState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let (_, prefix) = version_folder(&state, *id).await?;
    let files: Vec<VersionFile> = state
        .storage
        .list(&prefix)
        .await
        .map_err(RegistryError::from)?
        .into_iter()
        .filter_map(|object| {
            relative_key(&prefix, &object.key).map(|path| VersionFile {
                path,
                size_bytes: object.size_bytes,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(files))
}

#[utoipa::path(get, path = "/v1/registry/versions/{id}/files/{path}", tag = "model-registry",
    responses((status = 200, content_type = "application/octet-stream"), (status = 404)))]
pub async fn download_file(
    principal: Principal,
    state: web::Data<RegistryState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let (id, file) = path.into_inner();
    let (_, prefix) = version_folder(&state, id).await?;
    let key = prefix.join(&file).map_err(|e| RegistryError::Invalid {
        message: e.to_string(),
        param: Some("path".into()),
    })?;
    let chunks = match state.storage.get_stream(&key).await {
        Ok(chunks) => chunks,
        Err(StorageError::NotFound(_)) => return Err(RegistryError::FileNotFound(file).into()),
        Err(error) => return Err(RegistryError::from(error).into()),
    };
    let body = chunks.map_err(|e| {
        tracing::warn!(error = %e, "a download broke off");
        std::io::Error::other(e)
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"))
        .streaming(body))
}
