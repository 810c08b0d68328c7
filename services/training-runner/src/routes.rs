//! REST under `/v1/jobs`: submit, list, inspect, metrics, logs, checkpoints, cancel.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use ferrite_platform::amqp::outbox;
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::http::{Json, endpoint};
use ferrite_platform::peers::Peers;
use ferrite_platform::{ApiError, Settings};
use ferrite_proto::JobRequested;
use ferrite_training::job::JobKind;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{JobSpec, JobState};
use crate::events::{self, Outcome};
use crate::store::{self, AttemptRow, CheckpointRow, LogLine, MetricPoint};
use crate::submit;

/// What the handlers share.
#[derive(Clone)]
pub struct JobsApi {
    pub pool: PgPool,
    pub peers: Peers,
    pub settings: Arc<Settings>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(endpoint("/v1/jobs").post(create_job).get(list_jobs))
        .service(endpoint("/v1/jobs/{id}").get(get_job))
        .service(endpoint("/v1/jobs/{id}/metrics").get(job_metrics))
        .service(endpoint("/v1/jobs/{id}/logs").get(job_logs))
        .service(endpoint("/v1/jobs/{id}/checkpoints").get(job_checkpoints))
        .service(endpoint("/v1/jobs/{id}/cancel").post(cancel_job));
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        create_job,
        list_jobs,
        get_job,
        job_metrics,
        job_logs,
        job_checkpoints,
        cancel_job
    ),
    components(schemas(
        JobSpec,
        JobView,
        AttemptRow,
        CheckpointRow,
        LogLine,
        MetricPoint,
        JobState
    ))
)]
pub struct Api;

/// A job as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub kind: String,
    pub state: JobState,
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// The versions the references resolved to at submission.
    #[schema(value_type = Object)]
    pub resolved: serde_json::Value,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub attempts: Vec<AttemptRow>,
    pub progress: Progress,
    /// The latest value of each metric.
    pub last_metrics: BTreeMap<String, f64>,
    /// Where the output artifact is, once the job succeeded.
    pub artifact_prefix: Option<String>,
    pub final_metrics: Option<BTreeMap<String, f64>>,
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub step: i64,
    pub total_steps: i64,
}

async fn view(pool: &PgPool, row: store::JobRow) -> Result<JobView, ApiError> {
    let attempts = store::attempts(pool, row.id).await?;
    let last_metrics = store::last_metrics(pool, row.id).await?;
    let state = row
        .state
        .parse()
        .map_err(|e: String| ApiError::internal(&*anyhow::anyhow!(e)))?;
    let resolved = serde_json::to_value(&row.resolved.0).map_err(|e| ApiError::internal(&e))?;
    Ok(JobView {
        id: row.id,
        kind: row.kind,
        state,
        spec: row.spec.0,
        resolved,
        max_attempts: row.max_attempts,
        cancel_requested: row.cancel_requested,
        attempts,
        progress: Progress {
            step: row.progress_step,
            total_steps: row.total_steps,
        },
        last_metrics,
        artifact_prefix: row.artifact_prefix,
        final_metrics: row.final_metrics.map(|m| m.0),
        error: row.error,
        created_by: row.created_by,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
    })
}

/// Checks the caller may read jobs and that job `id` exists.
async fn readable(principal: &Principal, api: &JobsApi, id: Uuid) -> Result<(), ApiError> {
    principal.require(&[Role::Engineer])?;
    existing(&api.pool, id).await.map(|_| ())
}

async fn existing(pool: &PgPool, id: Uuid) -> Result<store::JobRow, ApiError> {
    store::job(pool, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", &id.to_string()))
}

/// Validates a spec, resolves its references, stores the job and sends JobRequested.
#[utoipa::path(post, path = "/v1/jobs", tag = "training-runner", request_body = JobSpec,
    responses((status = 201, body = JobView), (status = 400), (status = 401), (status = 403),
        (status = 503)))]
#[tracing::instrument(skip_all, fields(job.id, job.kind = %body.kind))]
async fn create_job(
    principal: Principal,
    api: web::Data<JobsApi>,
    body: Json<JobSpec>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let spec = body.into_inner();
    let (kind, max_attempts) = submit::check(&spec, api.settings.worker.max_attempts)?;
    let id = Uuid::now_v7();
    tracing::Span::current().record("job.id", tracing::field::display(id));
    let resolved = submit::resolve(&api.peers, &spec, kind, id).await?;
    let spec_json = serde_json::to_value(&spec).map_err(|e| ApiError::internal(&e))?;

    let mut tx = api.pool.begin().await?;
    let job = store::NewJob {
        id,
        spec: &spec_json,
        resolved: &resolved,
        max_attempts,
        created_by: &principal.name,
    };
    store::insert_job(&mut tx, &job).await?;
    store::log(&mut tx, id, None, "info", "job submitted").await?;
    let event = JobRequested {
        job_id: id.to_string(),
        kind: kind.as_str().to_owned(),
        spec_json: spec_json.to_string(),
        attempt: 0,
    };
    outbox::enqueue(&mut tx, &event)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    tx.commit().await?;
    tracing::info!(job.id = %id, job.kind = %kind, "job submitted");

    let view = view(&api.pool, existing(&api.pool, id).await?).await?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/v1/jobs/{id}")))
        .json(view))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// queued, running, succeeded, failed or cancelled.
    pub state: Option<String>,
    pub kind: Option<String>,
    /// At most this many jobs, newest first (default 100, at most 1000).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize)]
struct List<T> {
    data: Vec<T>,
}

#[utoipa::path(get, path = "/v1/jobs", tag = "training-runner", params(ListQuery),
    responses((status = 200, body = [JobView]), (status = 400), (status = 401)))]
async fn list_jobs(
    principal: Principal,
    api: web::Data<JobsApi>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let state = match &query.state {
        Some(state) => Some(
            state
                .parse::<JobState>()
                .map_err(|e| ApiError::invalid_request("invalid_value", e).with_param("state"))?,
        ),
        None => None,
    };
    if let Some(kind) = &query.kind {
        kind.parse::<JobKind>()
            .map_err(|e| ApiError::invalid_request("invalid_value", e).with_param("kind"))?;
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(
            ApiError::invalid_request("invalid_value", "must lie in 1..=1000").with_param("limit"),
        );
    }
    let rows = store::jobs(&api.pool, state, query.kind.as_deref(), limit).await?;
    let mut data = Vec::with_capacity(rows.len());
    for row in rows {
        data.push(view(&api.pool, row).await?);
    }
    Ok(HttpResponse::Ok().json(List { data }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "training-runner",
    responses((status = 200, body = JobView), (status = 404)))]
async fn get_job(
    principal: Principal,
    api: web::Data<JobsApi>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let row = existing(&api.pool, *id).await?;
    Ok(HttpResponse::Ok().json(view(&api.pool, row).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    /// Comma-separated metric names, e.g. `loss,eval_loss`; every metric when absent.
    pub names: Option<String>,
}

#[derive(Debug, Serialize)]
struct MetricSeries {
    job_id: Uuid,
    series: BTreeMap<String, Vec<MetricPoint>>,
}

/// Metric time series: per name, every value with its step and time.
#[utoipa::path(get, path = "/v1/jobs/{id}/metrics", tag = "training-runner",
    params(MetricsQuery), responses((status = 200), (status = 404)))]
async fn job_metrics(
    principal: Principal,
    api: web::Data<JobsApi>,
    id: web::Path<Uuid>,
    query: web::Query<MetricsQuery>,
) -> Result<HttpResponse, ApiError> {
    readable(&principal, &api, *id).await?;
    let names: Vec<String> = query
        .names
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    let mut series: BTreeMap<String, Vec<MetricPoint>> = names
        .iter()
        .map(|name| (name.clone(), Vec::new()))
        .collect();
    for point in store::metric_series(&api.pool, *id, &names).await? {
        series.entry(point.name.clone()).or_default().push(point);
    }
    Ok(HttpResponse::Ok().json(MetricSeries {
        job_id: *id,
        series,
    }))
}

/// The job's log: submission, attempts, downloads, checkpoints, the outcome.
#[utoipa::path(get, path = "/v1/jobs/{id}/logs", tag = "training-runner",
    responses((status = 200, body = [LogLine]), (status = 404)))]
async fn job_logs(
    principal: Principal,
    api: web::Data<JobsApi>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    readable(&principal, &api, *id).await?;
    let data = store::logs(&api.pool, *id, 10_000).await?;
    Ok(HttpResponse::Ok().json(List { data }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/checkpoints", tag = "training-runner",
    responses((status = 200, body = [CheckpointRow]), (status = 404)))]
async fn job_checkpoints(
    principal: Principal,
    api: web::Data<JobsApi>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    readable(&principal, &api, *id).await?;
    Ok(HttpResponse::Ok().json(List {
        data: store::checkpoints(&api.pool, *id).await?,
    }))
}

/// Cancels a job: at once when it has not started, at the worker's next step when it runs.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "training-runner",
    responses((status = 202, body = JobView), (status = 404), (status = 409)))]
#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn cancel_job(
    principal: Principal,
    api: web::Data<JobsApi>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    principal.require(&[Role::Engineer])?;
    let id = *id;
    let mut tx = api.pool.begin().await?;
    let cancelled = store::cancel(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", &id.to_string()))?;
    match cancelled {
        store::Cancelled::AlreadyFinal(state) => {
            return Err(ApiError::conflict(
                "job_finished",
                format!("the job has already {state}"),
            ));
        }
        store::Cancelled::Now => {
            if let Some(resolved) = store::resolved_job(&api.pool, id).await? {
                let event = events::finished(id, &resolved, &Outcome::Cancelled);
                outbox::enqueue(&mut tx, &event)
                    .await
                    .map_err(|e| ApiError::internal(&e))?;
            }
            store::log(&mut tx, id, None, "info", "cancelled before it started").await?;
        }
        store::Cancelled::Requested => {
            store::log(&mut tx, id, None, "info", "cancel requested").await?;
        }
    }
    tx.commit().await?;
    tracing::info!(job.id = %id, "job cancel requested");
    let view = view(&api.pool, existing(&api.pool, id).await?).await?;
    Ok(HttpResponse::Accepted().json(view))
}
