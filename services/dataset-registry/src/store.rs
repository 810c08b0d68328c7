//! The service's SQL: datasets, versions, aliases, lineage and token statistics.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{AliasName, DatasetKind, DatasetName, VersionReference};

/// A dataset version as the API returns it (the contract other services resolve).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DatasetVersion {
    pub id: Uuid,
    pub dataset_id: Uuid,
    pub dataset_name: String,
    pub number: i32,
    pub kind: String,
    pub format: String,
    /// Lowercase hex sha256 of the stored bytes.
    pub sha256: String,
    /// Where the bytes are in object storage: `datasets/<sha256>`.
    pub object_key: String,
    pub bytes: i64,
    pub rows: i64,
    /// Length distribution of rows in characters.
    #[schema(value_type = Object)]
    pub stats: Json<Value>,
    pub derived_from: Option<Uuid>,
    #[schema(value_type = Option<Object>)]
    pub derivation: Option<Json<Value>>,
    pub campaign_id: Option<Uuid>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

const VERSION_SELECT: &str = "SELECT v.id, v.dataset_id, d.name AS dataset_name, v.number, \
     v.kind, v.format, v.sha256, v.object_key, v.bytes, v.rows, v.stats, v.derived_from, \
     v.derivation, v.campaign_id, v.created_by, v.created_at \
     FROM dataset_versions v JOIN datasets d ON d.id = v.dataset_id";

/// A dataset with its version count, latest number and aliases.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Dataset {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    pub versions: i64,
    pub latest_version: Option<i32>,
    /// Alias name to version number.
    #[schema(value_type = Object)]
    pub aliases: Json<Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

const DATASET_SELECT: &str = "SELECT d.id, d.name, d.kind, d.created_by, d.created_at, \
     (SELECT count(*) FROM dataset_versions v WHERE v.dataset_id = d.id) AS versions, \
     (SELECT max(number) FROM dataset_versions v WHERE v.dataset_id = d.id) AS latest_version, \
     (SELECT coalesce(jsonb_object_agg(a.alias, v.number), '{}'::jsonb) FROM dataset_aliases a \
        JOIN dataset_versions v ON v.id = a.version_id WHERE a.dataset_id = d.id) AS aliases \
     FROM datasets d";

pub async fn list_datasets(pool: &PgPool) -> Result<Vec<Dataset>, sqlx::Error> {
    sqlx::query_as(&format!("{DATASET_SELECT} ORDER BY d.name"))
        .fetch_all(pool)
        .await
}

pub async fn find_dataset(
    pool: &PgPool,
    name: &DatasetName,
) -> Result<Option<Dataset>, sqlx::Error> {
    sqlx::query_as(&format!("{DATASET_SELECT} WHERE d.name = $1"))
        .bind(name.as_str())
        .fetch_optional(pool)
        .await
}

pub async fn list_versions(
    pool: &PgPool,
    name: &DatasetName,
) -> Result<Vec<DatasetVersion>, sqlx::Error> {
    sqlx::query_as(&format!(
        "{VERSION_SELECT} WHERE d.name = $1 ORDER BY v.number"
    ))
    .bind(name.as_str())
    .fetch_all(pool)
    .await
}

pub async fn find_version(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<DatasetVersion>, sqlx::Error> {
    sqlx::query_as(&format!("{VERSION_SELECT} WHERE v.id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await
}

pub async fn resolve(
    pool: &PgPool,
    reference: &VersionReference,
) -> Result<Option<DatasetVersion>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    match reference {
        VersionReference::Id(id) => find_version(&mut conn, *id).await,
        VersionReference::Number(name, number) => {
            sqlx::query_as(&format!(
                "{VERSION_SELECT} WHERE d.name = $1 AND v.number = $2"
            ))
            .bind(name.as_str())
            .bind(number)
            .fetch_optional(&mut *conn)
            .await
        }
        VersionReference::Alias(name, alias) => {
            sqlx::query_as(&format!(
                "{VERSION_SELECT} JOIN dataset_aliases a ON a.version_id = v.id \
                 WHERE d.name = $1 AND a.alias = $2"
            ))
            .bind(name.as_str())
            .bind(alias.as_str())
            .fetch_optional(&mut *conn)
            .await
        }
        VersionReference::Latest(name) => {
            sqlx::query_as(&format!(
                "{VERSION_SELECT} WHERE d.name = $1 ORDER BY v.number DESC LIMIT 1"
            ))
            .bind(name.as_str())
            .fetch_optional(&mut *conn)
            .await
        }
    }
}

/// The version and every version it was derived from, newest first.
pub async fn lineage(pool: &PgPool, id: Uuid) -> Result<Vec<DatasetVersion>, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH RECURSIVE chain (id, depth) AS ( \
             SELECT id, 0 FROM dataset_versions WHERE id = $1 \
             UNION ALL \
             SELECT p.derived_from, c.depth + 1 FROM chain c \
             JOIN dataset_versions p ON p.id = c.id WHERE p.derived_from IS NOT NULL) \
         {VERSION_SELECT} JOIN chain c ON c.id = v.id ORDER BY c.depth"
    ))
    .bind(id)
    .fetch_all(pool)
    .await
}

/// Creates the dataset if needed and locks its row until the transaction ends, so version
/// numbers are handed out one at a time. Returns its id and kind.
pub async fn lock_or_create_dataset(
    conn: &mut PgConnection,
    name: &DatasetName,
    kind: DatasetKind,
    created_by: &str,
) -> Result<(Uuid, String), sqlx::Error> {
    sqlx::query(
        "INSERT INTO datasets (id, name, kind, created_by) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(name.as_str())
    .bind(kind.as_str())
    .bind(created_by)
    .execute(&mut *conn)
    .await?;
    sqlx::query_as("SELECT id, kind FROM datasets WHERE name = $1 FOR UPDATE")
        .bind(name.as_str())
        .fetch_one(conn)
        .await
}

pub async fn find_by_sha256(
    conn: &mut PgConnection,
    dataset_id: Uuid,
    sha256: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM dataset_versions WHERE dataset_id = $1 AND sha256 = $2")
        .bind(dataset_id)
        .bind(sha256)
        .fetch_optional(conn)
        .await
}

/// A version row to insert; the number is the next one of its dataset.
pub struct NewVersionRow<'a> {
    pub id: Uuid,
    pub dataset_id: Uuid,
    pub sha256: &'a str,
    pub kind: DatasetKind,
    pub format: &'a str,
    pub object_key: &'a str,
    pub bytes: u64,
    pub rows: u64,
    pub stats: Value,
    pub derived_from: Option<Uuid>,
    pub derivation: Option<Value>,
    pub campaign_id: Option<Uuid>,
    pub created_by: &'a str,
}

pub async fn insert_version(
    conn: &mut PgConnection,
    row: &NewVersionRow<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dataset_versions (id, dataset_id, number, sha256, kind, format, object_key, \
             bytes, rows, stats, derived_from, derivation, campaign_id, created_by) \
         VALUES ($1, $2, (SELECT coalesce(max(number), 0) + 1 FROM dataset_versions \
             WHERE dataset_id = $2), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(row.id)
    .bind(row.dataset_id)
    .bind(row.sha256)
    .bind(row.kind.as_str())
    .bind(row.format)
    .bind(row.object_key)
    .bind(i64::try_from(row.bytes).unwrap_or(i64::MAX))
    .bind(i64::try_from(row.rows).unwrap_or(i64::MAX))
    .bind(Json(&row.stats))
    .bind(row.derived_from)
    .bind(row.derivation.as_ref().map(Json))
    .bind(row.campaign_id)
    .bind(row.created_by)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Points `alias` of the version's dataset at it; returns the version it pointed at before.
pub async fn set_alias(
    pool: &PgPool,
    version: &DatasetVersion,
    alias: &AliasName,
    updated_by: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let previous: Option<Uuid> = sqlx::query_scalar(
        "SELECT version_id FROM dataset_aliases WHERE dataset_id = $1 AND alias = $2 FOR UPDATE",
    )
    .bind(version.dataset_id)
    .bind(alias.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO dataset_aliases (dataset_id, alias, version_id, updated_by) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (dataset_id, alias) DO UPDATE \
         SET version_id = excluded.version_id, updated_by = excluded.updated_by, \
             updated_at = now()",
    )
    .bind(version.dataset_id)
    .bind(alias.as_str())
    .bind(version.id)
    .bind(updated_by)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(previous)
}

/// Removes an alias; false when it did not exist.
pub async fn delete_alias(
    pool: &PgPool,
    dataset_id: Uuid,
    alias: &AliasName,
) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM dataset_aliases WHERE dataset_id = $1 AND alias = $2")
        .bind(dataset_id)
        .bind(alias.as_str())
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// Token counts of one version under one tokenizer.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenStats {
    pub version_id: Uuid,
    pub tokenizer_version_id: Uuid,
    pub tokenizer_reference: String,
    #[schema(value_type = Object)]
    pub stats: Json<Value>,
    pub created_at: DateTime<Utc>,
}

pub async fn save_token_stats(
    pool: &PgPool,
    version_id: Uuid,
    tokenizer_version_id: Uuid,
    tokenizer_reference: &str,
    stats: Value,
) -> Result<TokenStats, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO token_stats (version_id, tokenizer_version_id, tokenizer_reference, stats) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (version_id, tokenizer_version_id) DO UPDATE \
         SET stats = excluded.stats, tokenizer_reference = excluded.tokenizer_reference, \
             created_at = now() \
         RETURNING version_id, tokenizer_version_id, tokenizer_reference, stats, created_at",
    )
    .bind(version_id)
    .bind(tokenizer_version_id)
    .bind(tokenizer_reference)
    .bind(Json(stats))
    .fetch_one(pool)
    .await
}

pub async fn list_token_stats(
    pool: &PgPool,
    version_id: Uuid,
) -> Result<Vec<TokenStats>, sqlx::Error> {
    sqlx::query_as(
        "SELECT version_id, tokenizer_version_id, tokenizer_reference, stats, created_at \
         FROM token_stats WHERE version_id = $1 ORDER BY created_at",
    )
    .bind(version_id)
    .fetch_all(pool)
    .await
}
