//! Routes every Ferrite process serves (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`), the
//! request middleware that traces and measures each request, and what every service's routes are
//! built from: [`endpoint`]s and the [`Json`] body extractor.

mod endpoint;
mod json;

pub use endpoint::{Endpoint, endpoint};
pub use json::{Json, JsonLimit, from_slice};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use serde::Serialize;
use sqlx::PgPool;
use tracing::Instrument;

use crate::amqp::Broker;
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::telemetry;

/// What `/readyz` checks: every pool of the process, the broker and the store.
#[derive(Clone)]
pub struct Readiness {
    pub pools: Vec<(&'static str, PgPool)>,
    pub broker: Broker,
    pub storage: Storage,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadinessReport {
    /// `ready` or `unready`.
    pub status: &'static str,
    /// Each dependency and whether it answered: `ok` or the reason it did not.
    pub checks: BTreeMap<String, String>,
}

/// How long one dependency may take to answer before it counts as down. Probes usually give
/// up after a few seconds, so a hung dependency must not hold the whole report.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    /// Checks every dependency at once, each within [`CHECK_TIMEOUT`].
    pub async fn report(&self) -> ReadinessReport {
        let postgres = self.pools.iter().map(|(name, pool)| async move {
            // The migrations table proves the schema is there, not just the server.
            let check = sqlx::query("SELECT 1 FROM _sqlx_migrations LIMIT 1").execute(pool);
            (format!("postgres:{name}"), within(check).await)
        });
        let storage = async {
            (
                "object_storage".to_owned(),
                within(self.storage.check()).await,
            )
        };
        let broker = if self.broker.is_connected() {
            "ok".to_owned()
        } else {
            "not connected to RabbitMQ".to_owned()
        };

        let (postgres, storage) = futures::join!(futures::future::join_all(postgres), storage);
        let mut checks: BTreeMap<String, String> = postgres.into_iter().collect();
        checks.insert(storage.0, storage.1);
        checks.insert("rabbitmq".into(), broker);
        let ready = checks.values().all(|v| v == "ok");
        ReadinessReport {
            status: if ready { "ready" } else { "unready" },
            checks,
        }
    }
}

/// `ok`, or why not, without internal detail such as file paths: the route is public.
async fn within<T, E: std::fmt::Display>(check: impl Future<Output = Result<T, E>>) -> String {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(_)) => "ok".into(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check failed");
            "failed".into()
        }
        Err(_) => format!("no answer within {} s", CHECK_TIMEOUT.as_secs()),
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200)))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Postgres, RabbitMQ and object storage are all reachable.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = ReadinessReport), (status = 503, body = ReadinessReport)))]
async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let report = readiness.report().await;
    if report.status == "ready" {
        HttpResponse::Ok().json(report)
    } else {
        HttpResponse::ServiceUnavailable().json(report)
    }
}

/// Metrics in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200)))]
async fn metrics(metrics: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics.render())
}

/// The OpenAPI document of the routes this process serves.
async fn openapi(document: web::Data<utoipa::openapi::OpenApi>) -> HttpResponse {
    HttpResponse::Ok().json(document.get_ref())
}

pub fn operation_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(endpoint("/healthz").get(healthz))
        .service(endpoint("/readyz").get(readyz))
        .service(endpoint("/metrics").get(metrics))
        .service(endpoint("/openapi.json").get(openapi));
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(healthz, readyz, metrics))]
pub struct OperationsApi;

/// Traces each request as a child of its incoming `traceparent`, and records its metrics.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let method = req.method().to_string();
    // The route pattern, not the path, keeps metric labels bounded.
    let route = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let remote: Vec<(String, String)> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| {
            let value = req.headers().get(name)?.to_str().ok()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.method = %method,
        http.route = %route,
        http.status_code = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    );
    telemetry::set_remote_parent(&span, &remote);
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();

    let started = Instant::now();
    let response = next.call(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();

    let status = match &response {
        Ok(response) => response.status().as_u16(),
        Err(e) => e.as_response_error().status_code().as_u16(),
    };
    span.record("http.status_code", status);
    span.record("duration_ms", elapsed.as_secs_f64() * 1e3);
    if let Some(metrics) = metrics {
        metrics.observe_http(&method, &route, status, elapsed.as_secs_f64());
    }
    response
}
