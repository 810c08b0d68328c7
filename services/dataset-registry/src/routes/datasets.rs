//! Datasets: upload a version, list and show datasets, move aliases.

use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::http::Json;
use futures::StreamExt;
use serde::Deserialize;

use super::State;
use crate::domain::{AliasName, DataFormat, DatasetKind, DatasetName, VersionReference};
use crate::error::{RegistryError, ValidationErrorBody};
use crate::ingest::{self, IngestError, IngestSpec};
use crate::register::{self, Provenance, Registration};
use crate::store::{self, Dataset, DatasetVersion};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UploadQuery {
    /// text, sft, chat, preference, ranking or prompts.
    pub kind: Option<String>,
    /// jsonl, json or text; by default text for text kinds, else json when the body starts
    /// with `[` and jsonl otherwise.
    pub format: Option<String>,
}

/// Uploads the body as the next version of `name` (created on first upload). The body is
/// validated, hashed and stored as it streams; `Content-Encoding: gzip` is inflated on the fly.
#[utoipa::path(
    post,
    path = "/v1/datasets/{name}/versions",
    tag = "dataset-registry",
    params(("name" = String, Path, description = "dataset name"), UploadQuery),
    request_body(content = String, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "a new version", body = DatasetVersion),
        (status = 200, description = "the same bytes were already this dataset's version", body = DatasetVersion),
        (status = 400, description = "the report of problems, by line and field", body = ValidationErrorBody),
        (status = 409, description = "the dataset holds another kind"),
        (status = 413, description = "larger than the upload limit after decompression"),
    )
)]
#[tracing::instrument(skip_all, fields(dataset.name = %path))]
pub async fn upload(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<String>,
    query: web::Query<UploadQuery>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let name = DatasetName::parse(&path)?;
    let kind = DatasetKind::parse(query.kind.as_deref().ok_or(RegistryError::Invalid {
        field: "kind",
        message: "the query parameter `kind` is required".into(),
    })?)?;
    let format = match query.format.as_deref() {
        Some(format) => Some(DataFormat::parse(format)?.check_for(kind)?),
        None if kind == DatasetKind::Text => Some(DataFormat::Text),
        None => None,
    };
    let gzip = check_encoding(&request)?;
    check_declared_length(&request, state.limits.max_upload_bytes)?;

    let body = actix_web::dev::Decompress::from_headers(payload.into_inner(), request.headers())
        .map(move |chunk| chunk.map_err(|e| body_error(e, gzip)));
    let spec = IngestSpec {
        kind,
        format,
        max_line_bytes: state.limits.max_line_bytes,
        max_bytes: state.limits.max_upload_bytes,
    };
    let ingested = ingest::ingest(&state.storage, spec, body).await?;
    let provenance = Provenance {
        created_by: principal.name.clone(),
        derived_from: None,
        derivation: None,
        campaign_id: None,
    };
    let registered = register::register(Registration {
        pool: &state.pool,
        storage: &state.storage,
        name: &name,
        kind,
        ingested: &ingested,
        provenance: &provenance,
    })
    .await?;
    Ok(if registered.created {
        HttpResponse::Created().json(registered.version)
    } else {
        HttpResponse::Ok().json(registered.version)
    })
}

/// Only plain and gzip bodies: anything else would be validated as if it were plain.
/// True for gzip.
fn check_encoding(request: &HttpRequest) -> Result<bool, RegistryError> {
    let Some(encoding) = request.headers().get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let encoding = encoding.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match encoding.as_str() {
        "gzip" | "x-gzip" => Ok(true),
        "identity" => Ok(false),
        _ => Err(RegistryError::Encoding(encoding)),
    }
}

/// Says what went wrong with the body in words: actix's own messages for an inflating failure
/// carry the Rust debug form of the inner error.
fn body_error(error: PayloadError, gzip: bool) -> String {
    match error {
        PayloadError::Incomplete(Some(_)) | PayloadError::Io(_) if gzip => {
            "the body is not valid gzip".into()
        }
        PayloadError::Incomplete(_) => "the body ended before it was complete".into(),
        other => other.to_string(),
    }
}

/// A plain body that announces more bytes than the limit is refused before it is read.
fn check_declared_length(request: &HttpRequest, limit: u64) -> Result<(), RegistryError> {
    if request.headers().contains_key(header::CONTENT_ENCODING) {
        return Ok(());
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit => Err(IngestError::TooLarge { limit }.into()),
        _ => Ok(()),
    }
}

#[utoipa::path(get, path = "/v1/datasets", tag = "dataset-registry",
    responses((status = 200, body = Vec<Dataset>)))]
pub async fn list(
    principal: Principal,
    state: web::Data<State>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    Ok(HttpResponse::Ok().json(store::list_datasets(&state.pool).await?))
}

#[utoipa::path(get, path = "/v1/datasets/{name}", tag = "dataset-registry",
    params(("name" = String, Path)),
    responses((status = 200, body = Dataset), (status = 404)))]
pub async fn show(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<String>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let dataset = find_dataset(&state, &path).await?;
    Ok(HttpResponse::Ok().json(dataset))
}

#[utoipa::path(get, path = "/v1/datasets/{name}/versions", tag = "dataset-registry",
    params(("name" = String, Path)),
    responses((status = 200, body = Vec<DatasetVersion>), (status = 404)))]
pub async fn versions(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<String>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let name = DatasetName::parse(&path)?;
    // A dataset exists only with its first version, so no versions means no dataset.
    let versions = store::list_versions(&state.pool, &name).await?;
    if versions.is_empty() {
        return Err(RegistryError::not_found("dataset", name.as_str()));
    }
    Ok(HttpResponse::Ok().json(versions))
}

/// The version an alias should point at: a number of this dataset or a version id. Dataset
/// aliases are not protected (any engineer moves them); any other key, `protected` included,
/// is refused rather than ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasRequest {
    #[schema(value_type = Object, example = json!(3))]
    pub version: serde_json::Value,
}

#[utoipa::path(put, path = "/v1/datasets/{name}/aliases/{alias}", tag = "dataset-registry",
    params(("name" = String, Path), ("alias" = String, Path)),
    request_body = AliasRequest,
    responses((status = 200, body = DatasetVersion), (status = 404)))]
pub async fn set_alias(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    body: Json<AliasRequest>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let (name, alias) = path.into_inner();
    let name = DatasetName::parse(&name)?;
    let alias = AliasName::parse(&alias)?;
    // Said before the version is looked up, so a missing dataset is named as such.
    find_dataset(&state, name.as_str()).await?;
    let reference = match &body.version {
        serde_json::Value::Number(n) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n > 0)
            .map(|n| VersionReference::Number(name.clone(), n)),
        serde_json::Value::String(id) => uuid::Uuid::parse_str(id).ok().map(VersionReference::Id),
        _ => None,
    }
    .ok_or(RegistryError::Invalid {
        field: "version",
        message: "`version` is a version number of this dataset or a version id".into(),
    })?;
    let version = store::resolve(&state.pool, &reference)
        .await?
        .filter(|v| v.dataset_name == name.as_str())
        .ok_or_else(|| RegistryError::not_found("dataset_version", body.version.to_string()))?;
    let previous = store::set_alias(&state.pool, &version, &alias, &principal.name).await?;
    tracing::info!(
        dataset.name = %name, dataset.alias = alias.as_str(), dataset.version_id = %version.id,
        previous_version_id = ?previous, "dataset alias moved"
    );
    Ok(HttpResponse::Ok().json(version))
}

#[utoipa::path(delete, path = "/v1/datasets/{name}/aliases/{alias}", tag = "dataset-registry",
    params(("name" = String, Path), ("alias" = String, Path)),
    responses((status = 204), (status = 404)))]
pub async fn delete_alias(
    principal: Principal,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, RegistryError> {
    principal.require(&[Role::Engineer])?;
    let (name, alias) = path.into_inner();
    let dataset = find_dataset(&state, &name).await?;
    let alias = AliasName::parse(&alias)?;
    if !store::delete_alias(&state.pool, dataset.id, &alias).await? {
        return Err(RegistryError::not_found(
            "alias",
            format!("{name}@{}", alias.as_str()),
        ));
    }
    Ok(HttpResponse::NoContent().finish())
}

async fn find_dataset(state: &State, name: &str) -> Result<Dataset, RegistryError> {
    let name = DatasetName::parse(name)?;
    store::find_dataset(&state.pool, &name)
        .await?
        .ok_or_else(|| RegistryError::not_found("dataset", name.as_str()))
}
