//! Dataset registry: versioned, validated datasets with lineage.
//!
//! Owns the Postgres schema `dataset_registry` and the routes under /v1/datasets. An upload is
//! validated, hashed and stored in one streaming pass ([`ingest`]); its bytes live once in
//! object storage at `datasets/<sha256>` and every version holding them points there
//! ([`register`]). Versions derive from others by splits ([`split`]); token counts come from
//! a registered model's tokenizer ([`tokens`]).
//!
//! The feedback collector's `PreferenceExportRequested` (a campaign's rankings turned into a
//! preference dataset whose versions carry `campaign_id`) is consumed here once that service
//! exists; until then no consumer is mounted and `campaign_id` stays empty.

pub mod content;
pub mod domain;
pub mod error;
pub mod ingest;
pub mod register;
pub mod routes;
pub mod scan;
pub mod split;
pub mod store;
pub mod tokens;
pub mod validate;

use std::sync::Arc;

use actix_web::web;
use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DatasetRegistry;

#[derive(utoipa::OpenApi)]
#[openapi(
    tags((name = "dataset-registry", description = "Dataset registry: versioned, validated datasets with lineage.")),
    paths(
        routes::datasets::upload,
        routes::datasets::list,
        routes::datasets::show,
        routes::datasets::versions,
        routes::datasets::set_alias,
        routes::datasets::delete_alias,
        routes::versions::resolve,
        routes::versions::show,
        routes::versions::content,
        routes::versions::lineage,
        routes::versions::split,
        routes::versions::token_stats,
        routes::versions::list_token_stats,
    )
)]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for DatasetRegistry {
    fn name(&self) -> &'static str {
        "dataset-registry"
    }

    fn schema(&self) -> &'static str {
        "dataset_registry"
    }

    fn migrator(&self) -> Option<Migrator> {
        Some(sqlx::migrate!("../../migrations/dataset_registry"))
    }

    async fn mount(&self, ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let state = web::Data::new(routes::State {
            pool: ctx.pool.clone(),
            storage: ctx.storage.clone(),
            limits: ctx.settings.datasets.clone(),
            peers: ctx.peers.clone(),
        });
        Ok(Mounted::routes(
            Arc::new(move |cfg| {
                cfg.app_data(state.clone());
                routes::configure(cfg);
            }),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
