//! Training runner: jobs, attempts, leases, metrics and checkpoints.
//!
//! Owns the Postgres schema `training_runner` and the routes under /v1/jobs.

pub mod backend;
pub mod kubernetes;

use std::sync::Arc;

use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrainingRunner;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "training-runner", description = "Training runner: jobs, attempts, leases, metrics and checkpoints.")))]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for TrainingRunner {
    fn name(&self) -> &'static str {
        "training-runner"
    }

    fn schema(&self) -> &'static str {
        "training_runner"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        // TODO: the resource routes (/v1/jobs) arrive with this service's issue; until then
        // the service serves only the operational routes every process has.
        Ok(Mounted::routes(
            Arc::new(|_| {}),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
