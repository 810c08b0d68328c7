//! Aliases: movable names for versions (`champion`, `candidate`, ...).
//!
//! A protected alias (`champion` always, any other created with `protected: true`) decides
//! what is served, so only an admin may move, unprotect or delete it. Every move is written
//! to the outbox as `AliasMoved`, naming the version it left, in the same transaction.

use actix_web::{HttpResponse, web};
use ferrite_platform::ApiError;
use ferrite_platform::amqp::outbox;
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::http::Json;
use ferrite_proto::AliasMoved;
use serde::Deserialize;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::models::parse_model_name;
use super::{RegistryState, require_engineer};
use crate::domain::{AliasName, InvalidInput, VersionReference};
use crate::error::RegistryError;
use crate::store::{self, Alias, Model};

/// A version by its number within the model or by its id.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum VersionSelector {
    Number(i32),
    Id(Uuid),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    pub version: VersionSelector,
    /// Protect the alias (admin only); absent keeps what it was.
    pub protected: Option<bool>,
}

fn parse_alias(text: &str) -> Result<AliasName, RegistryError> {
    AliasName::parse(text).map_err(|e| RegistryError::invalid("alias", e))
}

/// Checks the caller and the path, and opens the transaction an alias change runs in.
async fn begin<'a>(
    principal: &Principal,
    state: &'a RegistryState,
    path: &(String, String),
) -> Result<(Transaction<'a, Postgres>, Model, AliasName), ApiError> {
    require_engineer(principal)?;
    let name = parse_model_name(&path.0)?;
    let alias = parse_alias(&path.1)?;
    let mut tx = state.pool.begin().await?;
    let model = store::model(&mut tx, &name).await?;
    Ok((tx, model, alias))
}

/// Refuses a non-admin when the alias is protected before or after the change.
fn check_protection(
    principal: &Principal,
    alias: &AliasName,
    protected: bool,
) -> Result<(), RegistryError> {
    if protected && principal.role != Role::Admin {
        return Err(RegistryError::Forbidden(format!(
            "the alias `{alias}` is protected; only an admin may change it"
        )));
    }
    Ok(())
}

#[utoipa::path(put, path = "/v1/registry/models/{name}/aliases/{alias}", tag = "model-registry",
    request_body = SetAlias,
    responses((status = 200, body = Alias), (status = 403), (status = 404)))]
#[tracing::instrument(skip_all, fields(model.name = %path.0, alias = %path.1))]
pub async fn set_alias(
    principal: Principal,
    state: web::Data<RegistryState>,
    path: web::Path<(String, String)>,
    body: Json<SetAlias>,
) -> Result<HttpResponse, ApiError> {
    let (mut tx, model, alias) = begin(&principal, &state, &path).await?;
    let target = selected_version(&mut tx, &model, &body.version).await?;
    let existing = store::alias_for_update(&mut tx, model.id, &alias).await?;

    let was_protected = existing.as_ref().is_some_and(|a| a.protected);
    let protected = body.protected.unwrap_or(was_protected) || alias.is_always_protected();
    check_protection(&principal, &alias, protected || was_protected)?;

    store::set_alias(
        &mut tx,
        model.id,
        &alias,
        target,
        protected,
        &principal.name,
    )
    .await?;
    let previous = existing.map(|a| a.version_id);
    if previous != Some(target) {
        let event = AliasMoved {
            model_name: model.name.clone(),
            alias: alias.to_string(),
            version_id: target.to_string(),
            previous_version_id: previous.map(|id| id.to_string()),
            moved_by: principal.name.clone(),
        };
        outbox::enqueue(&mut tx, &event)
            .await
            .map_err(RegistryError::from)?;
        tracing::info!(version.id = %target, previous.id = ?previous, "alias moved");
    }
    let current = store::alias_for_update(&mut tx, model.id, &alias)
        .await?
        .ok_or_else(|| RegistryError::AliasNotFound(alias.to_string()))?;
    tx.commit().await?;
    Ok(HttpResponse::Ok().json(current))
}

async fn selected_version(
    conn: &mut sqlx::PgConnection,
    model: &Model,
    selector: &VersionSelector,
) -> Result<Uuid, RegistryError> {
    let version = match selector {
        VersionSelector::Number(number) => {
            let name = parse_model_name(&model.name)?;
            store::resolve(conn, &VersionReference::Number(name, *number)).await
        }
        VersionSelector::Id(id) => store::version(conn, *id).await,
    };
    match version {
        Ok(version) if version.model_id == model.id => Ok(version.id),
        Ok(_) => Err(RegistryError::invalid(
            "version",
            InvalidInput(format!(
                "that version belongs to another model than `{}`",
                model.name
            )),
        )),
        Err(RegistryError::VersionNotFound(reference)) => Err(RegistryError::invalid(
            "version",
            InvalidInput(format!("the version `{reference}` does not exist")),
        )),
        Err(error) => Err(error),
    }
}

#[utoipa::path(delete, path = "/v1/registry/models/{name}/aliases/{alias}",
    tag = "model-registry",
    responses((status = 204), (status = 403), (status = 404)))]
#[tracing::instrument(skip_all, fields(model.name = %path.0, alias = %path.1))]
pub async fn delete_alias(
    principal: Principal,
    state: web::Data<RegistryState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (mut tx, model, alias) = begin(&principal, &state, &path).await?;
    let existing = store::alias_for_update(&mut tx, model.id, &alias)
        .await?
        .ok_or_else(|| RegistryError::AliasNotFound(alias.to_string()))?;
    check_protection(
        &principal,
        &alias,
        existing.protected || alias.is_always_protected(),
    )?;
    // TODO: a deleted alias emits no event (AliasMoved needs a target version), so a gateway
    // serving `name@alias` learns of the deletion only when it next resolves the alias.
    store::delete_alias(&mut tx, model.id, &alias).await?;
    tx.commit().await?;
    tracing::info!("alias deleted");
    Ok(HttpResponse::NoContent().finish())
}
