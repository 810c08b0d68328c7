//! Model registry: models, versions, aliases and lineage.
//!
//! Owns the Postgres schema `model_registry` and the routes under /v1/registry.

use std::sync::Arc;

use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ModelRegistry;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "model-registry", description = "Model registry: models, versions, aliases and lineage.")))]
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
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        // TODO: the resource routes (/v1/registry) arrive with this service's issue; until then
        // the service serves only the operational routes every process has.
        Ok(Mounted::routes(
            Arc::new(|_| {}),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
