//! Models and the registration of versions whose artifact is already in storage.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use ferrite_platform::ApiError;
use ferrite_platform::auth::Principal;
use ferrite_platform::http::Json;
use ferrite_platform::storage::ObjectKey;
use serde::{Deserialize, Serialize};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use super::{RegistryState, require_engineer};
use crate::artifacts;
use crate::domain::{InvalidInput, ModelName, VersionKind, VersionReference, parse_ids};
use crate::error::RegistryError;
use crate::store::{self, Alias, Model, ModelVersion, NewVersion, Origin};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    pub name: String,
    pub description: Option<String>,
}

/// A model with its aliases and how many versions it has.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelDetail {
    #[serde(flatten)]
    pub model: Model,
    pub versions: usize,
    pub latest_version: Option<i32>,
    pub aliases: Vec<Alias>,
}

#[utoipa::path(post, path = "/v1/registry/models", tag = "model-registry",
    request_body = CreateModel,
    responses((status = 201, body = Model), (status = 409, description = "the name is taken")))]
#[tracing::instrument(skip_all, fields(model.name = %body.name))]
pub async fn create_model(
    principal: Principal,
    state: web::Data<RegistryState>,
    body: Json<CreateModel>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let name = ModelName::parse(&body.name).map_err(|e| RegistryError::invalid("name", e))?;
    let mut conn = state.pool.acquire().await?;
    let model = store::create_model(
        &mut conn,
        &name,
        body.description.as_deref(),
        &principal.name,
    )
    .await?;
    tracing::info!(model.id = %model.id, "model created");
    Ok(HttpResponse::Created().json(model))
}

#[utoipa::path(get, path = "/v1/registry/models", tag = "model-registry",
    responses((status = 200, body = Vec<Model>)))]
pub async fn list_models(
    principal: Principal,
    state: web::Data<RegistryState>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let mut conn = state.pool.acquire().await?;
    Ok(HttpResponse::Ok().json(store::models(&mut conn).await?))
}

pub(crate) fn parse_model_name(text: &str) -> Result<ModelName, RegistryError> {
    ModelName::parse(text).map_err(|e| RegistryError::invalid("name", e))
}

/// The model a read route names, with the connection that found it.
async fn named_model(
    principal: &Principal,
    state: &RegistryState,
    name: &str,
) -> Result<(PoolConnection<Postgres>, Model), ApiError> {
    require_engineer(principal)?;
    let name = parse_model_name(name)?;
    let mut conn = state.pool.acquire().await?;
    let model = store::model(&mut conn, &name).await?;
    Ok((conn, model))
}

#[utoipa::path(get, path = "/v1/registry/models/{name}", tag = "model-registry",
    responses((status = 200, body = ModelDetail), (status = 404)))]
pub async fn get_model(
    principal: Principal,
    state: web::Data<RegistryState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (mut conn, model) = named_model(&principal, &state, &name).await?;
    let versions = store::versions(&mut conn, model.id).await?;
    let aliases = store::aliases(&mut conn, model.id).await?;
    Ok(HttpResponse::Ok().json(ModelDetail {
        versions: versions.len(),
        latest_version: versions.last().map(|v| v.number),
        model,
        aliases,
    }))
}

#[utoipa::path(get, path = "/v1/registry/models/{name}/versions", tag = "model-registry",
    responses((status = 200, body = Vec<ModelVersion>), (status = 404)))]
pub async fn list_versions(
    principal: Principal,
    state: web::Data<RegistryState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (mut conn, model) = named_model(&principal, &state, &name).await?;
    Ok(HttpResponse::Ok().json(store::versions(&mut conn, model.id).await?))
}

/// What a registration says about a version's origin; shared by registration and upload.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(as = VersionLineage)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// An adapter's base model version (any reference form).
    pub base_version: Option<String>,
    /// A quantised variant's source version; needs `quantization`.
    pub source_version: Option<String>,
    /// How the variant was quantised, e.g. `nf4`, `int8`.
    pub quantization: Option<String>,
    /// The version this one was trained from; defaults to the base, then the source.
    pub parent_version: Option<String>,
    pub source_job_id: Option<Uuid>,
    #[serde(default)]
    pub dataset_version_ids: Vec<String>,
    #[serde(default)]
    pub preference_dataset_version_ids: Vec<String>,
    #[serde(default)]
    pub campaign_ids: Vec<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterVersion {
    /// `model`, `adapter`, `tokenizer` or `reward_model`.
    pub kind: String,
    /// Where the folder already is in object storage.
    pub artifact_prefix: String,
    // TODO: serde_path_to_error cannot follow a value into `flatten`, so a lineage field of the
    // wrong type (`"metrics": {"loss": "low"}`) is refused without `param`, and so is an
    // unknown field of the body (`flatten` takes the unknown keys); declaring the lineage
    // fields here instead would name both.
    #[serde(flatten)]
    pub lineage: Lineage,
}

#[utoipa::path(post, path = "/v1/registry/models/{name}/versions", tag = "model-registry",
    request_body = RegisterVersion,
    responses((status = 201, body = ModelVersion), (status = 400), (status = 404),
        (status = 409, description = "the model holds versions of another kind")))]
#[tracing::instrument(skip_all, fields(model.name = %name))]
pub async fn register_version(
    principal: Principal,
    state: web::Data<RegistryState>,
    name: web::Path<String>,
    body: Json<RegisterVersion>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let name = parse_model_name(&name)?;
    let kind = VersionKind::parse(&body.kind).map_err(|e| RegistryError::invalid("kind", e))?;
    let prefix = artifact_key(&body.artifact_prefix)?;
    artifacts::check_stored(&state.storage, &prefix, kind).await?;

    let mut tx = state.pool.begin().await?;
    let model = store::model(&mut tx, &name).await?;
    let new = new_version(
        &mut tx,
        kind,
        format!("{prefix}/"),
        &body.lineage,
        &principal,
    )
    .await?;
    let version = store::insert_version(&mut tx, &model, &new).await?;
    tx.commit().await?;
    Ok(HttpResponse::Created().json(version))
}

/// The object key of an artifact prefix as given (with or without its trailing `/`).
///
/// A folder under a job's `checkpoints/` is refused: the training runner deletes older
/// checkpoints as a job goes on (`keep_checkpoints`), so a version registered in place there
/// would be left pointing at nothing. A job's `output/` is the job's for good.
fn artifact_key(prefix: &str) -> Result<ObjectKey, RegistryError> {
    let invalid = |message: String| RegistryError::Invalid {
        message,
        param: Some("artifact_prefix".into()),
    };
    let key = ObjectKey::parse(prefix.trim_end_matches('/')).map_err(|e| invalid(e.to_string()))?;
    let segments: Vec<&str> = key.as_str().split('/').collect();
    if let ["jobs", job, "checkpoints", ..] = segments.as_slice() {
        return Err(invalid(format!(
            "`{key}` is a checkpoint of the job {job}, which the training runner prunes as the \
             job goes on, so it cannot be registered in place; download its files and upload \
             them (POST /v1/registry/models/{{name}}/uploads) to keep it"
        )));
    }
    Ok(key)
}

/// Resolves the references in `lineage` and checks the rules that tie fields together.
pub(crate) async fn new_version(
    conn: &mut PgConnection,
    kind: VersionKind,
    artifact_prefix: String,
    lineage: &Lineage,
    principal: &Principal,
) -> Result<NewVersion, RegistryError> {
    let base = referenced(conn, "base_version", lineage.base_version.as_deref()).await?;
    let source = referenced(conn, "source_version", lineage.source_version.as_deref()).await?;
    let parent = referenced(conn, "parent_version", lineage.parent_version.as_deref()).await?;
    if kind == VersionKind::Adapter && base.is_none() {
        return Err(RegistryError::invalid(
            "base_version",
            InvalidInput("an adapter needs the base version it was trained on".into()),
        ));
    }
    if source.is_some() != lineage.quantization.is_some() {
        return Err(RegistryError::invalid(
            "quantization",
            InvalidInput(
                "a quantised variant needs both `source_version` and `quantization`".into(),
            ),
        ));
    }
    let ids = |field: &str, texts: &[String]| {
        parse_ids(field, texts).map_err(|e| RegistryError::invalid(field, e))
    };
    Ok(NewVersion {
        kind,
        artifact_prefix,
        origin: Origin {
            base_version_id: base,
            source_version_id: source,
            quantization: lineage.quantization.clone(),
            parent_version_id: parent.or(base).or(source),
            source_job_id: lineage.source_job_id,
            dataset_version_ids: ids("dataset_version_ids", &lineage.dataset_version_ids)?,
            preference_dataset_version_ids: ids(
                "preference_dataset_version_ids",
                &lineage.preference_dataset_version_ids,
            )?,
            campaign_ids: ids("campaign_ids", &lineage.campaign_ids)?,
        },
        metrics: lineage.metrics.clone(),
        description: lineage.description.clone(),
        created_by: principal.name.clone(),
    })
}

/// The id of the version `reference` names; a reference to nothing is the caller's mistake.
async fn referenced(
    conn: &mut PgConnection,
    field: &str,
    reference: Option<&str>,
) -> Result<Option<Uuid>, RegistryError> {
    let Some(reference) = reference else {
        return Ok(None);
    };
    let parsed =
        VersionReference::parse(reference).map_err(|e| RegistryError::invalid(field, e))?;
    match store::resolve(conn, &parsed).await {
        Ok(version) => Ok(Some(version.id)),
        Err(RegistryError::VersionNotFound(_)) => Err(RegistryError::invalid(
            field,
            InvalidInput(format!("the version `{reference}` does not exist")),
        )),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_checkpoint_is_refused_in_place_and_a_job_output_is_not() {
        // The runner's layout: `jobs/<id>/checkpoints/step-<n>/` (pruned), `jobs/<id>/output/`.
        let job = "0190c2a4-0000-7000-8000-000000000001";
        for pruned in [
            format!("jobs/{job}/checkpoints/step-50/"),
            format!("jobs/{job}/checkpoints"),
        ] {
            match artifact_key(&pruned) {
                Err(RegistryError::Invalid { message, param }) => {
                    assert_eq!(param.as_deref(), Some("artifact_prefix"));
                    assert!(
                        message.contains("prunes") && message.contains("upload"),
                        "{message}"
                    );
                }
                other => panic!("{pruned} was not refused: {other:?}"),
            }
        }
        for kept in [
            format!("jobs/{job}/output/"),
            "models/m/checkpoints/x".to_owned(),
        ] {
            assert!(artifact_key(&kept).is_ok(), "{kept}");
        }
    }

    #[test]
    fn an_unknown_field_is_refused_beside_the_flattened_lineage() {
        let body = serde_json::json!({"kind": "model", "artifact_prefix": "m/1", "bogus": 1});
        assert!(serde_json::from_value::<RegisterVersion>(body).is_err());
        let body = serde_json::json!({"kind": "model", "artifact_prefix": "m/1", "metrics": {"loss": 2.0}});
        let parsed: RegisterVersion = serde_json::from_value(body).expect("valid");
        assert_eq!(parsed.lineage.metrics.get("loss"), Some(&2.0));
    }
}
