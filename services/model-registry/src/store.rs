//! The registry's SQL: models, versions and aliases in the `model_registry` schema.
//!
//! Functions take a connection, so callers decide the transaction: a registration writes the
//! version and its `ModelVersionRegistered` event together, an alias move its `AliasMoved`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ferrite_platform::amqp::outbox;
use ferrite_proto::ModelVersionRegistered;
use serde::Serialize;
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::{AliasName, ModelName, VersionKind, VersionReference};
use crate::error::{RegistryError, on_unique_violation};

/// A registered model: a name that versions are numbered under.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Model {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// One version of a model, with its lineage.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ModelVersion {
    pub id: Uuid,
    pub model_id: Uuid,
    pub model_name: String,
    pub number: i32,
    /// `model`, `adapter`, `tokenizer` or `reward_model`.
    pub kind: String,
    /// Object-storage prefix of the Hugging Face folder, ending in `/`.
    pub artifact_prefix: String,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub origin: Origin,
    #[schema(value_type = BTreeMap<String, f64>)]
    pub metrics: Json<BTreeMap<String, f64>>,
    pub description: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// The aliases that point at this version now.
    pub aliases: Vec<String>,
}

/// Where a version came from: its lineage, as registered.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Origin {
    /// An adapter's base model version.
    pub base_version_id: Option<Uuid>,
    /// A quantised variant's source version.
    pub source_version_id: Option<Uuid>,
    pub quantization: Option<String>,
    /// The version this one was trained or derived from; the lineage chain follows it.
    pub parent_version_id: Option<Uuid>,
    pub source_job_id: Option<Uuid>,
    pub dataset_version_ids: Vec<Uuid>,
    /// Reward and RL models: the preference datasets and labeling campaigns behind them.
    pub preference_dataset_version_ids: Vec<Uuid>,
    pub campaign_ids: Vec<Uuid>,
}

/// An alias and the version it points at.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Alias {
    pub alias: String,
    pub version_id: Uuid,
    pub version_number: i32,
    pub protected: bool,
    pub updated_by: String,
    pub updated_at: DateTime<Utc>,
}

/// What a registration adds; the number is allocated by [`insert_version`].
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub kind: VersionKind,
    pub artifact_prefix: String,
    pub origin: Origin,
    pub metrics: BTreeMap<String, f64>,
    pub description: Option<String>,
    pub created_by: String,
}

const VERSION_COLUMNS: &str = "
    SELECT v.id, v.model_id, m.name AS model_name, v.number, v.kind, v.artifact_prefix,
           v.base_version_id, v.source_version_id, v.quantization, v.parent_version_id,
           v.source_job_id, v.dataset_version_ids, v.preference_dataset_version_ids,
           v.campaign_ids, v.metrics, v.description, v.created_by, v.created_at,
           ARRAY(SELECT a.alias FROM aliases a WHERE a.version_id = v.id ORDER BY a.alias)
               AS aliases
    FROM model_versions v JOIN models m ON m.id = v.model_id";

pub async fn create_model(
    conn: &mut PgConnection,
    name: &ModelName,
    description: Option<&str>,
    created_by: &str,
) -> Result<Model, RegistryError> {
    sqlx::query_as(
        "INSERT INTO models (id, name, description, created_by) VALUES ($1, $2, $3, $4)
         RETURNING id, name, description, created_by, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(name.as_str())
    .bind(description)
    .bind(created_by)
    .fetch_one(conn)
    .await
    .map_err(|e| on_unique_violation(e, RegistryError::ModelExists(name.to_string())))
}

/// The model named `name`, created first when it does not exist (a training job's output).
pub async fn ensure_model(
    conn: &mut PgConnection,
    name: &ModelName,
    created_by: &str,
) -> Result<Model, RegistryError> {
    sqlx::query(
        "INSERT INTO models (id, name, created_by) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(name.as_str())
    .bind(created_by)
    .execute(&mut *conn)
    .await?;
    model(conn, name).await
}

pub async fn model(conn: &mut PgConnection, name: &ModelName) -> Result<Model, RegistryError> {
    sqlx::query_as(
        "SELECT id, name, description, created_by, created_at FROM models WHERE name = $1",
    )
    .bind(name.as_str())
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| RegistryError::ModelNotFound(name.to_string()))
}

pub async fn models(conn: &mut PgConnection) -> Result<Vec<Model>, RegistryError> {
    Ok(sqlx::query_as(
        "SELECT id, name, description, created_by, created_at FROM models ORDER BY name",
    )
    .fetch_all(conn)
    .await?)
}

pub async fn versions(
    conn: &mut PgConnection,
    model_id: Uuid,
) -> Result<Vec<ModelVersion>, RegistryError> {
    Ok(sqlx::query_as(&format!(
        "{VERSION_COLUMNS} WHERE v.model_id = $1 ORDER BY v.number"
    ))
    .bind(model_id)
    .fetch_all(conn)
    .await?)
}

pub async fn version(conn: &mut PgConnection, id: Uuid) -> Result<ModelVersion, RegistryError> {
    sqlx::query_as(&format!("{VERSION_COLUMNS} WHERE v.id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| RegistryError::VersionNotFound(id.to_string()))
}

pub async fn version_of_job(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> Result<Option<ModelVersion>, RegistryError> {
    Ok(
        sqlx::query_as(&format!("{VERSION_COLUMNS} WHERE v.source_job_id = $1"))
            .bind(job_id)
            .fetch_optional(conn)
            .await?,
    )
}

/// The version a reference names, in any of its four forms.
pub async fn resolve(
    conn: &mut PgConnection,
    reference: &VersionReference,
) -> Result<ModelVersion, RegistryError> {
    let filter = match reference {
        VersionReference::Id(_) => "WHERE v.id = $1",
        VersionReference::Number(..) => "WHERE m.name = $1 AND v.number = $2",
        VersionReference::Alias(..) => {
            "WHERE m.name = $1 AND v.id = \
             (SELECT al.version_id FROM aliases al WHERE al.model_id = m.id AND al.alias = $2)"
        }
        VersionReference::Latest(_) => "WHERE m.name = $1 ORDER BY v.number DESC LIMIT 1",
    };
    let sql = format!("{VERSION_COLUMNS} {filter}");
    let query = sqlx::query_as(&sql);
    let query = match reference {
        VersionReference::Id(id) => query.bind(*id),
        VersionReference::Number(name, number) => query.bind(name.as_str()).bind(*number),
        VersionReference::Alias(name, alias) => query.bind(name.as_str()).bind(alias.as_str()),
        VersionReference::Latest(name) => query.bind(name.as_str()),
    };
    query
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| RegistryError::VersionNotFound(reference.to_string()))
}

/// Registers the next version of `model` and writes its `ModelVersionRegistered` event to the
/// outbox, both in the caller's transaction. A version of another kind than the model's
/// versions so far is refused with [`RegistryError::KindMismatch`].
pub async fn insert_version(
    conn: &mut PgConnection,
    model: &Model,
    new: &NewVersion,
) -> Result<ModelVersion, RegistryError> {
    // The row lock serialises registrations of one model, so numbers never collide and two
    // registrations of different kinds cannot both find the model empty.
    sqlx::query("SELECT id FROM models WHERE id = $1 FOR UPDATE")
        .bind(model.id)
        .execute(&mut *conn)
        .await?;
    let other: Option<String> = sqlx::query_scalar(
        "SELECT kind FROM model_versions WHERE model_id = $1 AND kind <> $2
         ORDER BY number DESC LIMIT 1",
    )
    .bind(model.id)
    .bind(new.kind.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(existing) = other {
        return Err(RegistryError::KindMismatch {
            model: model.name.clone(),
            existing,
            new: new.kind,
        });
    }
    let number: i32 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(number), 0) + 1 FROM model_versions WHERE model_id = $1",
    )
    .bind(model.id)
    .fetch_one(&mut *conn)
    .await?;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO model_versions (id, model_id, number, kind, artifact_prefix,
             base_version_id, source_version_id, quantization, parent_version_id, source_job_id,
             dataset_version_ids, preference_dataset_version_ids, campaign_ids, metrics,
             description, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(id)
    .bind(model.id)
    .bind(number)
    .bind(new.kind.as_str())
    .bind(&new.artifact_prefix)
    .bind(new.origin.base_version_id)
    .bind(new.origin.source_version_id)
    .bind(new.origin.quantization.as_deref())
    .bind(new.origin.parent_version_id)
    .bind(new.origin.source_job_id)
    .bind(&new.origin.dataset_version_ids)
    .bind(&new.origin.preference_dataset_version_ids)
    .bind(&new.origin.campaign_ids)
    .bind(Json(&new.metrics))
    .bind(new.description.as_deref())
    .bind(&new.created_by)
    .execute(&mut *conn)
    .await?;

    let event = ModelVersionRegistered {
        model_id: model.id.to_string(),
        model_name: model.name.clone(),
        version_id: id.to_string(),
        version: u32::try_from(number).unwrap_or_default(),
        artifact_prefix: new.artifact_prefix.clone(),
        source_job_id: new.origin.source_job_id.map(|job| job.to_string()),
    };
    outbox::enqueue(&mut *conn, &event).await?;
    tracing::info!(
        model.name = %model.name,
        version.id = %id,
        version.number = number,
        "model version registered"
    );
    version(conn, id).await
}

pub async fn aliases(conn: &mut PgConnection, model_id: Uuid) -> Result<Vec<Alias>, RegistryError> {
    Ok(sqlx::query_as(
        "SELECT a.alias, a.version_id, v.number AS version_number, a.protected, a.updated_by,
                a.updated_at
         FROM aliases a JOIN model_versions v ON v.id = a.version_id
         WHERE a.model_id = $1 ORDER BY a.alias",
    )
    .bind(model_id)
    .fetch_all(conn)
    .await?)
}

/// The alias as it stands, locked until the caller's transaction ends.
pub async fn alias_for_update(
    conn: &mut PgConnection,
    model_id: Uuid,
    alias: &AliasName,
) -> Result<Option<Alias>, RegistryError> {
    Ok(sqlx::query_as(
        "SELECT a.alias, a.version_id, v.number AS version_number, a.protected, a.updated_by,
                a.updated_at
         FROM aliases a JOIN model_versions v ON v.id = a.version_id
         WHERE a.model_id = $1 AND a.alias = $2 FOR UPDATE OF a",
    )
    .bind(model_id)
    .bind(alias.as_str())
    .fetch_optional(conn)
    .await?)
}

pub async fn set_alias(
    conn: &mut PgConnection,
    model_id: Uuid,
    alias: &AliasName,
    version_id: Uuid,
    protected: bool,
    updated_by: &str,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO aliases (model_id, alias, version_id, protected, updated_by)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (model_id, alias) DO UPDATE SET version_id = EXCLUDED.version_id,
             protected = EXCLUDED.protected, updated_by = EXCLUDED.updated_by,
             updated_at = now()",
    )
    .bind(model_id)
    .bind(alias.as_str())
    .bind(version_id)
    .bind(protected)
    .bind(updated_by)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn delete_alias(
    conn: &mut PgConnection,
    model_id: Uuid,
    alias: &AliasName,
) -> Result<(), RegistryError> {
    sqlx::query("DELETE FROM aliases WHERE model_id = $1 AND alias = $2")
        .bind(model_id)
        .bind(alias.as_str())
        .execute(conn)
        .await?;
    Ok(())
}
