//! GRPO evaluator: verifiable rewards, group-relative scoring and evaluations.
//!
//! Owns the Postgres schema `grpo_evaluator` and the routes under /v1/verifiers, /v1/evaluations, /v1/rewards.

use std::sync::Arc;

use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct GrpoEvaluator;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "grpo-evaluator", description = "GRPO evaluator: verifiable rewards, group-relative scoring and evaluations.")))]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for GrpoEvaluator {
    fn name(&self) -> &'static str {
        "grpo-evaluator"
    }

    fn schema(&self) -> &'static str {
        "grpo_evaluator"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        // TODO: the resource routes (/v1/verifiers, /v1/evaluations, /v1/rewards) arrive with this service's issue; until then
        // the service serves only the operational routes every process has.
        Ok(Mounted::routes(
            Arc::new(|_| {}),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
