//! Reward-model service: reward models trained from rankings, and scoring.
//!
//! Owns the Postgres schema `reward_model` and the routes under /v1/reward-models, /v1/score.

use std::sync::Arc;

use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RewardModel;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "reward-model", description = "Reward-model service: reward models trained from rankings, and scoring.")))]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for RewardModel {
    fn name(&self) -> &'static str {
        "reward-model"
    }

    fn schema(&self) -> &'static str {
        "reward_model"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        // TODO: the resource routes (/v1/reward-models, /v1/score) arrive with this service's issue; until then
        // the service serves only the operational routes every process has.
        Ok(Mounted::routes(
            Arc::new(|_| {}),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
