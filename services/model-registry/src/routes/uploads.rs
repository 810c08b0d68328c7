//! Uploading a model folder as a tar archive: checked whole, then stored, then registered.
//!
//! The body is spooled to a temporary file (the archive's entries may come in any order, and
//! the folder is checked before a byte reaches storage), unpacked, and checked; the files go to
//! `models/<name>/<uuid>/` and the version is registered. A failure at any step deletes what
//! was stored, so a refused or broken upload leaves nothing in storage or the database.

use actix_web::{HttpRequest, HttpResponse, web};
use ferrite_platform::ApiError;
use ferrite_platform::auth::Principal;
use ferrite_platform::storage::ObjectKey;
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

use super::models::{Lineage, new_version, parse_model_name};
use super::{RegistryState, require_engineer};
use crate::artifacts::{self, ArtifactFile};
use crate::domain::{ModelName, VersionKind};
use crate::error::RegistryError;
use crate::store;

/// The largest archive accepted. Big enough for a 30B-parameter model in bf16.
// TODO: a setting of its own would let operators lower it; none exists for models yet.
const MAX_UPLOAD_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Metadata of an upload, in the query string; lists are comma-separated.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// `model` (default), `adapter`, `tokenizer` or `reward_model`.
    pub kind: Option<String>,
    pub base_version: Option<String>,
    pub source_version: Option<String>,
    pub quantization: Option<String>,
    pub parent_version: Option<String>,
    /// Comma-separated dataset version ids.
    pub dataset_version_ids: Option<String>,
    pub description: Option<String>,
}

impl UploadQuery {
    fn lineage(&self) -> Lineage {
        let list = |text: &Option<String>| -> Vec<String> {
            text.iter()
                .flat_map(|t| t.split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Lineage {
            base_version: self.base_version.clone(),
            source_version: self.source_version.clone(),
            quantization: self.quantization.clone(),
            parent_version: self.parent_version.clone(),
            dataset_version_ids: list(&self.dataset_version_ids),
            description: self.description.clone(),
            ..Lineage::default()
        }
    }
}

#[utoipa::path(post, path = "/v1/registry/models/{name}/uploads", tag = "model-registry",
    params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 201, body = store::ModelVersion), (status = 400), (status = 404),
        (status = 409, description = "the model holds versions of another kind"),
        (status = 413), (status = 415)))]
#[tracing::instrument(skip_all, fields(model.name = %name, upload.size_bytes))]
pub async fn upload(
    principal: Principal,
    state: web::Data<RegistryState>,
    name: web::Path<String>,
    query: web::Query<UploadQuery>,
    request: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    identity_encoding(&request)?;
    let name = parse_model_name(&name)?;
    let kind = match &query.kind {
        Some(kind) => VersionKind::parse(kind).map_err(|e| RegistryError::invalid("kind", e))?,
        None => VersionKind::Model,
    };
    // Known before the body is read, so a missing model costs the client nothing more.
    store::model(&mut *state.pool.acquire().await?, &name).await?;

    let scratch = tempfile::tempdir().map_err(RegistryError::io("cannot make a scratch folder"))?;
    let archive = scratch.path().join("upload.tar");
    let size_bytes = spool(body, &archive).await?;
    tracing::Span::current().record("upload.size_bytes", size_bytes);
    let unpacked = scratch.path().join("folder");
    let files = tokio::task::spawn_blocking(move || unpack_and_check(&archive, &unpacked, kind))
        .await
        .map_err(|e| RegistryError::io("the archive check failed")(std::io::Error::other(e)))??;

    let prefix = ObjectKey::parse(&format!("models/{name}/{}", Uuid::now_v7()))
        .map_err(RegistryError::from)?;
    artifacts::store_files(&state.storage, &prefix, &files).await?;
    match register(&state, &name, kind, &prefix, &query.lineage(), &principal).await {
        Ok(version) => Ok(HttpResponse::Created().json(version)),
        Err(error) => {
            artifacts::delete_prefix(&state.storage, &prefix).await;
            Err(error.into())
        }
    }
}

/// `web::Payload` hands over the bytes as sent: a compressed archive would reach the tar reader
/// still compressed and be called corrupt, so any encoding but identity is refused up front.
fn identity_encoding(request: &HttpRequest) -> Result<(), RegistryError> {
    let Some(value) = request
        .headers()
        .get(actix_web::http::header::CONTENT_ENCODING)
    else {
        return Ok(());
    };
    let encoding = String::from_utf8_lossy(value.as_bytes()).trim().to_owned();
    if encoding.is_empty() || encoding.eq_ignore_ascii_case("identity") {
        Ok(())
    } else {
        Err(RegistryError::UnsupportedEncoding(encoding))
    }
}

fn unpack_and_check(
    archive: &std::path::Path,
    dir: &std::path::Path,
    kind: VersionKind,
) -> Result<Vec<ArtifactFile>, RegistryError> {
    std::fs::create_dir_all(dir).map_err(RegistryError::io("cannot make a scratch folder"))?;
    artifacts::unpack_tar(archive, dir)?;
    let root = artifacts::model_root(dir)?;
    let files = artifacts::files(&root)?;
    artifacts::check_folder(&root, &files, kind)?;
    Ok(files)
}

async fn register(
    state: &RegistryState,
    name: &ModelName,
    kind: VersionKind,
    prefix: &ObjectKey,
    lineage: &Lineage,
    principal: &Principal,
) -> Result<store::ModelVersion, RegistryError> {
    let mut tx = state.pool.begin().await?;
    let model = store::model(&mut tx, name).await?;
    let new = new_version(&mut tx, kind, format!("{prefix}/"), lineage, principal).await?;
    let version = store::insert_version(&mut tx, &model, &new).await?;
    tx.commit().await?;
    Ok(version)
}

/// Writes the body to `path`, refusing it past [`MAX_UPLOAD_BYTES`]. Returns its size.
async fn spool(mut body: web::Payload, path: &std::path::Path) -> Result<u64, RegistryError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(RegistryError::io("cannot spool the upload"))?;
    let mut size_bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| RegistryError::Invalid {
            message: format!("the body could not be read: {e}"),
            param: Some("body".into()),
        })?;
        size_bytes += chunk.len() as u64;
        if size_bytes > MAX_UPLOAD_BYTES {
            return Err(RegistryError::TooLarge {
                limit_bytes: MAX_UPLOAD_BYTES,
            });
        }
        file.write_all(&chunk)
            .await
            .map_err(RegistryError::io("cannot spool the upload"))?;
    }
    file.flush()
        .await
        .map_err(RegistryError::io("cannot spool the upload"))?;
    Ok(size_bytes)
}
