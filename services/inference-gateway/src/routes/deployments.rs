//! `/v1/deployments`: what engineers deploy, list and remove.

use actix_web::{HttpResponse, web};
use ferrite_platform::ApiError;
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::http::Json;
use serde::Deserialize;
use uuid::Uuid;

use crate::Gateway;
use crate::deployments::{DeploymentError, validate_name};
use crate::store::{self, DeploymentRecord};

/// `POST /v1/deployments`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    /// The name clients will put in `model`.
    pub name: String,
    /// A registry reference: `<uuid>`, `<name>:<number>`, `<name>@<alias>` or `<name>`.
    pub model: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only deployments serving this registry version.
    pub version_id: Option<Uuid>,
}

/// Resolves the model, loads it and serves it under `name`.
#[utoipa::path(
    post, path = "/v1/deployments", tag = "inference-gateway",
    request_body = CreateDeployment,
    responses(
        (status = 201, body = DeploymentRecord),
        (status = 400, body = ferrite_platform::error::ErrorEnvelope),
        (status = 404, body = ferrite_platform::error::ErrorEnvelope),
        (status = 409, body = ferrite_platform::error::ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(deployment = %body.name))]
pub async fn create(
    principal: Principal,
    gateway: web::Data<Gateway>,
    body: Json<CreateDeployment>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let body = body.into_inner();
    validate_name(&body.name)?;
    if gateway.deployments.get(&body.name).is_some() {
        return Err(DeploymentError::NameTaken(body.name).into());
    }
    let reference = body.model.trim();
    if reference.is_empty() {
        return Err(
            ApiError::invalid_request("invalid_value", "`model` is empty").with_param("model"),
        );
    }
    let version = gateway.loader.resolve(reference).await?;
    let (artifact_prefix, base_artifact_prefix) = gateway.loader.artifacts(&version).await?;

    let record = DeploymentRecord {
        name: body.name.clone(),
        model_reference: reference.to_owned(),
        version_id: version.id,
        model_name: version.model_name,
        version_number: version.number,
        artifact_prefix,
        base_artifact_prefix,
        created_at: chrono::Utc::now(),
    };
    let metrics = gateway
        .deployments
        .metrics_for(&gateway.loader.metrics, &record.name);
    let deployment = gateway.loader.load(record.clone(), metrics).await?;
    if !store::insert(&gateway.pool, &record).await? {
        return Err(DeploymentError::NameTaken(record.name).into());
    }
    gateway.deployments.insert(deployment);
    tracing::info!(model.version_id = %record.version_id, "deployment created");
    Ok(HttpResponse::Created().json(record))
}

/// Recorded deployments, optionally only those serving one version.
#[utoipa::path(
    get, path = "/v1/deployments", tag = "inference-gateway",
    params(ListQuery),
    responses((status = 200, body = Vec<DeploymentRecord>)),
    security(("bearer" = []))
)]
pub async fn list(
    principal: Principal,
    gateway: web::Data<Gateway>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let records = store::list(&gateway.pool, query.version_id).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "data": records })))
}

/// One deployment.
#[utoipa::path(
    get, path = "/v1/deployments/{name}", tag = "inference-gateway",
    responses((status = 200, body = DeploymentRecord), (status = 404, body = ferrite_platform::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn get(
    principal: Principal,
    gateway: web::Data<Gateway>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    store::get(&gateway.pool, &name)
        .await?
        .map(|record| HttpResponse::Ok().json(record))
        .ok_or_else(|| DeploymentError::NotFound(name.into_inner()).into())
}

/// Stops serving a deployment and forgets it.
#[utoipa::path(
    delete, path = "/v1/deployments/{name}", tag = "inference-gateway",
    responses((status = 204), (status = 404, body = ferrite_platform::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(deployment = %name))]
pub async fn delete(
    principal: Principal,
    gateway: web::Data<Gateway>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let deleted = store::delete(&gateway.pool, &name).await?;
    let removed = gateway.deployments.remove(&name).is_some();
    if !deleted && !removed {
        return Err(DeploymentError::NotFound(name.into_inner()).into());
    }
    tracing::info!("deployment deleted");
    Ok(HttpResponse::NoContent().finish())
}
