//! The service's SQL: deployments in the `inference_gateway` schema.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// A deployment as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DeploymentRecord {
    /// The name clients put in `model`.
    pub name: String,
    /// The reference it was created from, e.g. `chat@prod` or `chat:3`.
    pub model_reference: String,
    /// The registry version it serves.
    pub version_id: Uuid,
    pub model_name: String,
    pub version_number: i64,
    pub artifact_prefix: String,
    /// For an adapter, its base model's folder; it is loaded first and the adapter merged in.
    pub base_artifact_prefix: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Adds a deployment; `false` when the name is taken.
pub async fn insert(pool: &PgPool, record: &DeploymentRecord) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO deployments (name, model_reference, version_id, model_name, \
         version_number, artifact_prefix, base_artifact_prefix, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(&record.name)
    .bind(&record.model_reference)
    .bind(record.version_id)
    .bind(&record.model_name)
    .bind(record.version_number)
    .bind(&record.artifact_prefix)
    .bind(&record.base_artifact_prefix)
    .bind(record.created_at)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Every deployment, or those serving `version_id`, by name.
pub async fn list(
    pool: &PgPool,
    version_id: Option<Uuid>,
) -> Result<Vec<DeploymentRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, model_reference, version_id, model_name, version_number, \
         artifact_prefix, base_artifact_prefix, created_at FROM deployments \
         WHERE $1::uuid IS NULL OR version_id = $1 ORDER BY name",
    )
    .bind(version_id)
    .fetch_all(pool)
    .await
}

/// One deployment by name.
pub async fn get(pool: &PgPool, name: &str) -> Result<Option<DeploymentRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, model_reference, version_id, model_name, version_number, \
         artifact_prefix, base_artifact_prefix, created_at FROM deployments WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
}

/// Removes a deployment; `false` when there was none by that name.
pub async fn delete(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM deployments WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() == 1)
}
