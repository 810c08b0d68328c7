//! Inference gateway: OpenAI-compatible serving of registered models.
//!
//! Owns the Postgres schema `inference_gateway` and the routes under /v1/models,
//! /v1/completions, /v1/chat/completions and /v1/deployments. A deployment is a model registry
//! version loaded into an in-process [`engine`]; requests are routed by their `model` name.

pub mod deployments;
pub mod engine;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use actix_web::web;
use ferrite_platform::app::Mounted;
use ferrite_platform::http::endpoint;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::PgPool;
use sqlx::migrate::Migrator;

use crate::deployments::{Deployments, Loader};

/// Sequences one engine steps together; more wait in its queue.
// TODO: one fixed bound for every deployment and one engine each; replica counts scaled by
// queue depth and per-deployment batch sizes are still to come.
const MAX_BATCH_SEQUENCES: usize = 8;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct InferenceGateway;

/// What every route of the gateway shares.
pub struct Gateway {
    pub deployments: Arc<Deployments>,
    pub pool: PgPool,
    pub loader: Loader,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        routes::openai::list_models,
        routes::openai::get_model,
        routes::openai::completions,
        routes::openai::chat_completions,
        routes::deployments::create,
        routes::deployments::list,
        routes::deployments::get,
        routes::deployments::delete,
    ),
    components(schemas(
        routes::deployments::CreateDeployment,
        store::DeploymentRecord,
        openai::response::Usage,
    )),
    tags((name = "inference-gateway", description = "Inference gateway: OpenAI-compatible serving of registered models."))
)]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for InferenceGateway {
    fn name(&self) -> &'static str {
        "inference-gateway"
    }

    fn schema(&self) -> &'static str {
        "inference_gateway"
    }

    fn migrator(&self) -> Option<Migrator> {
        Some(sqlx::migrate!("../../migrations/inference_gateway"))
    }

    async fn mount(&self, ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let cache_dir = cache_dir_for(ctx.settings.worker.scratch_dir.clone());
        let gateway = web::Data::new(Gateway {
            deployments: Arc::new(Deployments::default()),
            pool: ctx.pool.clone(),
            loader: Loader {
                storage: ctx.storage.clone(),
                peers: ctx.peers.clone(),
                metrics: ctx.metrics.clone(),
                cache_dir,
                max_batch_sequences: MAX_BATCH_SEQUENCES,
            },
        });
        let reload = Box::pin(reload(gateway.clone().into_inner()));
        Ok(Mounted {
            routes: Arc::new(move |cfg| {
                cfg.app_data(gateway.clone())
                    .service(endpoint("/v1/models").get(routes::openai::list_models))
                    .service(endpoint("/v1/models/{model}").get(routes::openai::get_model))
                    .service(endpoint("/v1/completions").post(routes::openai::completions))
                    .service(
                        endpoint("/v1/chat/completions").post(routes::openai::chat_completions),
                    )
                    .service(
                        endpoint("/v1/deployments")
                            .post(routes::deployments::create)
                            .get(routes::deployments::list),
                    )
                    .service(
                        endpoint("/v1/deployments/{name}")
                            .get(routes::deployments::get)
                            .delete(routes::deployments::delete),
                    );
            }),
            openapi: <Api as utoipa::OpenApi>::openapi(),
            consumers: Vec::new(),
            tasks: vec![reload],
        })
    }
}

/// Loads every recorded deployment again, one after another, from object storage alone.
/// A deployment that fails to load is logged and left recorded, so deleting it still works.
async fn reload(gateway: Arc<Gateway>) -> anyhow::Result<()> {
    let records = store::list(&gateway.pool, None).await?;
    for record in records {
        let name = record.name.clone();
        let metrics = gateway
            .deployments
            .metrics_for(&gateway.loader.metrics, &name);
        match gateway.loader.load(record, metrics).await {
            Ok(deployment) => gateway.deployments.insert(deployment),
            Err(error) => {
                tracing::error!(deployment = %name, error = %ferrite_platform::error::ErrorChain(&error), "cannot reload deployment");
            }
        }
    }
    Ok(())
}

/// The folder deployments' artifacts are copied into (the worker scratch folder's, or the
/// system temp folder's).
fn cache_dir_for(scratch: Option<PathBuf>) -> PathBuf {
    scratch
        .unwrap_or_else(std::env::temp_dir)
        .join("ferrite-gateway-models")
}
