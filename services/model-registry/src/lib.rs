//! Model registry: models, versions, aliases and lineage.
//!
//! Owns the Postgres schema `model_registry` and the routes under /v1/registry. Versions come
//! in three ways: a finished training job's `JobFinished` (no human step), an engineer
//! registering a folder already in storage, and an engineer uploading a folder as a tar.
//! Each registration emits `ModelVersionRegistered`; each alias move `AliasMoved`.

pub mod artifacts;
pub mod consumers;
pub mod domain;
pub mod error;
pub mod import;
pub mod routes;
pub mod store;

use std::sync::Arc;

use actix_web::web;
use ferrite_platform::amqp::ConsumerSpec;
use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use ferrite_proto::{Event, JobFinished};
use sqlx::migrate::Migrator;

use crate::consumers::job_finished::{RegisterJobOutput, queue_name};
use crate::routes::RegistryState;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ModelRegistry;

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        routes::models::create_model,
        routes::models::list_models,
        routes::models::get_model,
        routes::models::list_versions,
        routes::models::register_version,
        routes::uploads::upload,
        routes::aliases::set_alias,
        routes::aliases::delete_alias,
        routes::versions::get_version,
        routes::versions::resolve,
        routes::versions::list_files,
        routes::versions::download_file,
        routes::lineage::lineage,
    ),
    tags((name = "model-registry", description = "Model registry: models, versions, aliases and lineage."))
)]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for ModelRegistry {
    fn name(&self) -> &'static str {
        "model-registry"
    }

    fn schema(&self) -> &'static str {
        "model_registry"
    }

    fn migrator(&self) -> Option<Migrator> {
        Some(sqlx::migrate!("../../migrations/model_registry"))
    }

    async fn mount(&self, ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let state = web::Data::new(RegistryState {
            pool: ctx.pool.clone(),
            storage: ctx.storage.clone(),
            peers: ctx.peers.clone(),
        });
        let consumer = ConsumerSpec::new(
            queue_name(&ctx.broker.settings().exchange),
            &[JobFinished::ROUTING_KEY],
            &ctx.broker,
            Arc::new(RegisterJobOutput {
                storage: ctx.storage.clone(),
            }),
        );
        Ok(Mounted {
            routes: Arc::new(move |cfg| {
                cfg.app_data(state.clone());
                routes::configure(cfg);
            }),
            openapi: <Api as utoipa::OpenApi>::openapi(),
            consumers: vec![consumer],
            tasks: Vec::new(),
        })
    }
}
