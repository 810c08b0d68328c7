//! Dataset registry: versioned, validated datasets with lineage.
//!
//! Owns the Postgres schema `dataset_registry` and the routes under /v1/datasets.

use std::sync::Arc;

use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DatasetRegistry;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "dataset-registry", description = "Dataset registry: versioned, validated datasets with lineage.")))]
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
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        // TODO: the resource routes (/v1/datasets) arrive with this service's issue; until then
        // the service serves only the operational routes every process has.
        Ok(Mounted::routes(
            Arc::new(|_| {}),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
