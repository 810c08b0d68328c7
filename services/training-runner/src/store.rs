//! The service's SQL: jobs, attempts, the lease, metrics, checkpoints and logs.
//!
//! The lease lives on the job row (`lease_attempt`, `lease_expires_at`), and every write a
//! worker makes is conditional on still holding it, so an attempt the runner has given up on
//! can no longer change the job even if its process lives on for a moment. Times come from
//! Postgres's `now()`, never from a worker's clock.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{JobState, ResolvedJob};

/// A job row as the API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub kind: String,
    pub state: String,
    pub spec: Json<serde_json::Value>,
    pub resolved: Json<ResolvedJob>,
    pub max_attempts: i32,
    pub current_attempt: i32,
    pub cancel_requested: bool,
    pub progress_step: i64,
    pub total_steps: i64,
    pub artifact_prefix: Option<String>,
    pub final_metrics: Option<Json<BTreeMap<String, f64>>>,
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const JOB_COLUMNS: &str = "id, kind, state, spec, resolved, max_attempts, current_attempt, \
     cancel_requested, progress_step, total_steps, artifact_prefix, final_metrics, error, \
     created_by, created_at, started_at, finished_at";

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AttemptRow {
    pub number: i32,
    /// starting, running, succeeded, failed, lost or cancelled.
    pub state: String,
    pub backend: String,
    pub worker_pid: Option<i32>,
    /// The checkpoint step the attempt continued from; absent when it started afresh.
    pub resumed_from_step: Option<i64>,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct MetricPoint {
    #[serde(skip)]
    pub name: String,
    pub step: i64,
    pub value: f64,
    pub attempt: i32,
    pub time: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct CheckpointRow {
    pub step: i64,
    pub attempt: i32,
    /// Object-storage prefix holding the checkpoint folder.
    pub prefix: String,
    pub bytes: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct LogLine {
    pub attempt: Option<i32>,
    pub level: String,
    pub message: String,
    pub time: DateTime<Utc>,
}

/// A new job, as the API stores it.
#[derive(Debug)]
pub struct NewJob<'a> {
    pub id: Uuid,
    pub spec: &'a serde_json::Value,
    pub resolved: &'a ResolvedJob,
    pub max_attempts: u32,
    pub created_by: &'a str,
}

pub async fn insert_job(tx: &mut PgConnection, job: &NewJob<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO jobs (id, kind, spec, resolved, max_attempts, created_by)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(job.id)
    .bind(job.resolved.kind.as_str())
    .bind(Json(job.spec))
    .bind(Json(job.resolved))
    .bind(i32::try_from(job.max_attempts).unwrap_or(i32::MAX))
    .bind(job.created_by)
    .execute(tx)
    .await?;
    Ok(())
}

pub async fn job(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Newest first, at most `limit`.
pub async fn jobs(
    pool: &PgPool,
    state: Option<JobState>,
    kind: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR kind = $2)
         ORDER BY created_at DESC, id DESC LIMIT $3"
    ))
    .bind(state.map(JobState::as_str))
    .bind(kind)
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn attempts(pool: &PgPool, id: Uuid) -> sqlx::Result<Vec<AttemptRow>> {
    sqlx::query_as(
        "SELECT number, state, backend, worker_pid, resumed_from_step, error, started_at,
                heartbeat_at, ended_at
         FROM attempts WHERE job_id = $1 ORDER BY number",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// The latest value of every metric of the job.
pub async fn last_metrics(pool: &PgPool, id: Uuid) -> sqlx::Result<BTreeMap<String, f64>> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT DISTINCT ON (name) name, value FROM metrics
         WHERE job_id = $1 ORDER BY name, step DESC, recorded_at DESC",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Every value of the named metrics (all metrics when `names` is empty), by step.
pub async fn metric_series(
    pool: &PgPool,
    id: Uuid,
    names: &[String],
) -> sqlx::Result<Vec<MetricPoint>> {
    sqlx::query_as(
        "SELECT name, step, value, attempt, recorded_at AS time FROM metrics
         WHERE job_id = $1 AND (cardinality($2::text[]) = 0 OR name = ANY($2))
         ORDER BY name, step, recorded_at",
    )
    .bind(id)
    .bind(names)
    .fetch_all(pool)
    .await
}

pub async fn checkpoints(pool: &PgPool, id: Uuid) -> sqlx::Result<Vec<CheckpointRow>> {
    sqlx::query_as(
        "SELECT step, attempt, prefix, bytes, created_at FROM checkpoints
         WHERE job_id = $1 ORDER BY step",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

pub async fn logs(pool: &PgPool, id: Uuid, limit: i64) -> sqlx::Result<Vec<LogLine>> {
    sqlx::query_as(
        "SELECT attempt, level, message, logged_at AS time FROM job_logs
         WHERE job_id = $1 ORDER BY id LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Appends a line to the job's log.
pub async fn log(
    conn: &mut PgConnection,
    id: Uuid,
    attempt: Option<u32>,
    level: &str,
    message: &str,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO job_logs (job_id, attempt, level, message) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(attempt.map(to_i32))
        .bind(level)
        .bind(message)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks the job as having come through the queue; false when it already had (a duplicate
/// JobRequested) or does not exist.
pub async fn accept(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let updated =
        sqlx::query("UPDATE jobs SET accepted_at = now() WHERE id = $1 AND accepted_at IS NULL")
            .bind(id)
            .execute(tx)
            .await?;
    Ok(updated.rows_affected() == 1)
}

/// What cancelling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The job had not started: it is cancelled now.
    Now,
    /// An attempt runs: its worker stops at its next step and records the cancellation.
    Requested,
    /// The job had already ended in this state.
    AlreadyFinal(JobState),
}

pub async fn cancel(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Cancelled>> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(state) = state else {
        return Ok(None);
    };
    let state: JobState = state
        .parse()
        .map_err(|e: String| sqlx::Error::Decode(e.into()))?;
    let outcome = match state {
        JobState::Queued => {
            sqlx::query(
                "UPDATE jobs SET state = 'cancelled', cancel_requested = true,
                     finished_at = now(), lease_attempt = NULL, lease_expires_at = NULL
                 WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            Cancelled::Now
        }
        JobState::Running => {
            sqlx::query("UPDATE jobs SET cancel_requested = true WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            Cancelled::Requested
        }
        other => Cancelled::AlreadyFinal(other),
    };
    Ok(Some(outcome))
}

/// A job the scheduler may start now.
#[derive(Debug, sqlx::FromRow)]
pub struct Startable {
    pub id: Uuid,
    pub current_attempt: i32,
    pub resolved: Json<ResolvedJob>,
}

/// Locks the oldest queued job that came through the queue; skipped by other runners.
pub async fn next_startable(tx: &mut PgConnection) -> sqlx::Result<Option<Startable>> {
    sqlx::query_as(
        "SELECT id, current_attempt, resolved FROM jobs
         WHERE state = 'queued' AND accepted_at IS NOT NULL AND NOT cancel_requested
         ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(tx)
    .await
}

/// Records attempt `number` and gives it the lease for `lease` (time to start and take it).
pub async fn start_attempt(
    tx: &mut PgConnection,
    id: Uuid,
    number: u32,
    backend: &str,
    lease: Duration,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = 'running', current_attempt = $2, lease_attempt = $2,
             lease_expires_at = now() + make_interval(secs => $3),
             started_at = coalesce(started_at, now())
         WHERE id = $1",
    )
    .bind(id)
    .bind(to_i32(number))
    .bind(lease.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO attempts (job_id, number, backend) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(to_i32(number))
        .bind(backend)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Running jobs whose lease ran out: `(job, attempt)`.
pub async fn expired_leases(pool: &PgPool) -> sqlx::Result<Vec<(Uuid, i32)>> {
    sqlx::query_as(
        "SELECT id, current_attempt FROM jobs
         WHERE state = 'running' AND lease_expires_at < now()",
    )
    .fetch_all(pool)
    .await
}

/// How an attempt ended without the job succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The worker reported an error that another attempt may not repeat.
    Failed,
    /// The worker vanished: killed, crashed, or stopped heartbeating.
    Lost,
}

impl AttemptEnd {
    fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Failed => "failed",
            AttemptEnd::Lost => "lost",
        }
    }
}

/// Ends attempt `number` and decides the job: queued for another attempt while attempts
/// remain, cancelled when a cancel was asked for, failed otherwise. Returns the job's new
/// state, or `None` when the attempt was no longer the job's current one (already handled).
pub async fn end_attempt(
    tx: &mut PgConnection,
    id: Uuid,
    number: u32,
    end: AttemptEnd,
    error: &str,
) -> sqlx::Result<Option<JobState>> {
    sqlx::query(
        "UPDATE attempts SET state = $3, error = coalesce(error, $4), ended_at = now()
         WHERE job_id = $1 AND number = $2 AND state IN ('starting', 'running')",
    )
    .bind(id)
    .bind(to_i32(number))
    .bind(end.as_str())
    .bind(error)
    .execute(&mut *tx)
    .await?;
    let state: Option<String> = sqlx::query_scalar(
        "UPDATE jobs SET
             state = CASE WHEN cancel_requested THEN 'cancelled'
                          WHEN current_attempt >= max_attempts THEN 'failed'
                          ELSE 'queued' END,
             error = $3, lease_attempt = NULL, lease_expires_at = NULL,
             finished_at = CASE WHEN cancel_requested OR current_attempt >= max_attempts
                                THEN now() END
         WHERE id = $1 AND current_attempt = $2 AND state = 'running'
         RETURNING state",
    )
    .bind(id)
    .bind(to_i32(number))
    .bind(error)
    .fetch_optional(&mut *tx)
    .await?;
    state
        .map(|s| s.parse().map_err(|e: String| sqlx::Error::Decode(e.into())))
        .transpose()
}

/// Takes the lease the scheduler set aside for attempt `number`; false when it is gone.
pub async fn take_lease(
    pool: &PgPool,
    id: Uuid,
    number: u32,
    lease: Duration,
    pid: u32,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let taken = renew_lease(&mut tx, id, number, lease).await?.is_some();
    if taken {
        sqlx::query(
            "UPDATE attempts SET state = 'running', worker_pid = $3, heartbeat_at = now()
             WHERE job_id = $1 AND number = $2",
        )
        .bind(id)
        .bind(to_i32(number))
        .bind(i32::try_from(pid).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(taken)
}

/// Extends the lease; `Some(cancel_requested)` while attempt `number` holds it, `None` once
/// it is lost.
pub async fn renew_lease(
    conn: &mut PgConnection,
    id: Uuid,
    number: u32,
    lease: Duration,
) -> sqlx::Result<Option<bool>> {
    sqlx::query_scalar(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
         WHERE id = $1 AND lease_attempt = $2 AND state = 'running'
         RETURNING cancel_requested",
    )
    .bind(id)
    .bind(to_i32(number))
    .bind(lease.as_secs_f64())
    .fetch_optional(conn)
    .await
}

pub async fn heartbeat(
    pool: &PgPool,
    id: Uuid,
    number: u32,
    lease: Duration,
) -> sqlx::Result<Option<bool>> {
    let mut tx = pool.begin().await?;
    let held = renew_lease(&mut tx, id, number, lease).await?;
    sqlx::query("UPDATE attempts SET heartbeat_at = now() WHERE job_id = $1 AND number = $2")
        .bind(id)
        .bind(to_i32(number))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(held)
}

/// Locks the job row if attempt `number` holds the lease; every write a worker makes first
/// calls this in its transaction.
pub async fn hold_lease(tx: &mut PgConnection, id: Uuid, number: u32) -> sqlx::Result<bool> {
    let held: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = $1 AND lease_attempt = $2 AND state = 'running'
         FOR UPDATE",
    )
    .bind(id)
    .bind(to_i32(number))
    .fetch_optional(tx)
    .await?;
    Ok(held.is_some())
}

pub async fn resolved_job(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<ResolvedJob>> {
    let row: Option<Json<ResolvedJob>> =
        sqlx::query_scalar("SELECT resolved FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|json| json.0))
}

pub async fn last_checkpoint(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<CheckpointRow>> {
    sqlx::query_as(
        "SELECT step, attempt, prefix, bytes, created_at FROM checkpoints
         WHERE job_id = $1 ORDER BY step DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn set_resumed_from(pool: &PgPool, id: Uuid, number: u32, step: u64) -> sqlx::Result<()> {
    sqlx::query("UPDATE attempts SET resumed_from_step = $3 WHERE job_id = $1 AND number = $2")
        .bind(id)
        .bind(to_i32(number))
        .bind(to_i64(step))
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn insert_checkpoint(
    tx: &mut PgConnection,
    id: Uuid,
    number: u32,
    step: u64,
    prefix: &str,
    bytes: u64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO checkpoints (job_id, step, attempt, prefix, bytes) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (job_id, step) DO UPDATE
             SET attempt = excluded.attempt, prefix = excluded.prefix, bytes = excluded.bytes,
                 created_at = now()",
    )
    .bind(id)
    .bind(to_i64(step))
    .bind(to_i32(number))
    .bind(prefix)
    .bind(to_i64(bytes))
    .execute(tx)
    .await?;
    Ok(())
}

/// Deletes the rows of job `id`'s checkpoints beyond the newest `keep` by step and returns
/// them, oldest first. It runs in the transaction that records the newest checkpoint, before
/// any object is deleted, so no reader ever finds a row whose objects are gone.
pub async fn prune_checkpoints(
    tx: &mut PgConnection,
    id: Uuid,
    keep: NonZeroU32,
) -> sqlx::Result<Vec<CheckpointRow>> {
    let mut pruned: Vec<CheckpointRow> = sqlx::query_as(
        "DELETE FROM checkpoints WHERE job_id = $1 AND step IN (
             SELECT step FROM checkpoints WHERE job_id = $1 ORDER BY step DESC OFFSET $2)
         RETURNING step, attempt, prefix, bytes, created_at",
    )
    .bind(id)
    .bind(i64::from(keep.get()))
    .fetch_all(tx)
    .await?;
    // RETURNING has no order of its own.
    pruned.sort_by_key(|checkpoint| checkpoint.step);
    Ok(pruned)
}

/// One measured value.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricValue {
    pub name: String,
    pub step: u64,
    pub value: f64,
}

/// Writes a batch of metric values and the job's progress in one statement each.
pub async fn insert_metrics(
    tx: &mut PgConnection,
    id: Uuid,
    number: u32,
    values: &[MetricValue],
    progress: (u64, u64),
) -> sqlx::Result<()> {
    let names: Vec<&str> = values.iter().map(|v| v.name.as_str()).collect();
    let steps: Vec<i64> = values.iter().map(|v| to_i64(v.step)).collect();
    let numbers: Vec<f64> = values.iter().map(|v| v.value).collect();
    sqlx::query(
        "INSERT INTO metrics (job_id, attempt, name, step, value)
         SELECT $1, $2, name, step, value
         FROM unnest($3::text[], $4::bigint[], $5::float8[]) AS m(name, step, value)",
    )
    .bind(id)
    .bind(to_i32(number))
    .bind(&names)
    .bind(&steps)
    .bind(&numbers)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE jobs SET progress_step = $2, total_steps = $3 WHERE id = $1")
        .bind(id)
        .bind(to_i64(progress.0))
        .bind(to_i64(progress.1))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Marks the job and its attempt succeeded.
pub async fn succeed(
    tx: &mut PgConnection,
    id: Uuid,
    number: u32,
    artifact_prefix: &str,
    final_metrics: &BTreeMap<String, f64>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = 'succeeded', artifact_prefix = $2, final_metrics = $3,
             finished_at = now(), lease_attempt = NULL, lease_expires_at = NULL, error = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(artifact_prefix)
    .bind(Json(final_metrics))
    .execute(&mut *tx)
    .await?;
    close_attempt(tx, id, number, "succeeded", None).await
}

/// Ends the job now in `state` (failed or cancelled), whatever attempts remain.
pub async fn finish_job(
    tx: &mut PgConnection,
    id: Uuid,
    number: u32,
    state: JobState,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = $2, error = $3, finished_at = now(),
             lease_attempt = NULL, lease_expires_at = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(state.as_str())
    .bind(error)
    .execute(&mut *tx)
    .await?;
    let attempt_state = match state {
        JobState::Cancelled => "cancelled",
        _ => "failed",
    };
    close_attempt(tx, id, number, attempt_state, error).await
}

async fn close_attempt(
    tx: &mut PgConnection,
    id: Uuid,
    number: u32,
    state: &str,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE attempts SET state = $3, error = $4, ended_at = now()
         WHERE job_id = $1 AND number = $2",
    )
    .bind(id)
    .bind(to_i32(number))
    .bind(state)
    .bind(error)
    .execute(tx)
    .await?;
    Ok(())
}

/// Attempt numbers and steps fit Postgres's signed columns; saturate rather than wrap.
fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
