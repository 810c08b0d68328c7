//! Feedback collector: ranking campaigns, labeler tasks and agreement.
//!
//! Owns the Postgres schema `feedback_collector` and the routes under /v1/campaigns, /v1/tasks.

use std::sync::Arc;

use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FeedbackCollector;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "feedback-collector", description = "Feedback collector: ranking campaigns, labeler tasks and agreement.")))]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for FeedbackCollector {
    fn name(&self) -> &'static str {
        "feedback-collector"
    }

    fn schema(&self) -> &'static str {
        "feedback_collector"
    }

    fn migrator(&self) -> Option<Migrator> {
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        // TODO: the resource routes (/v1/campaigns, /v1/tasks) arrive with this service's issue; until then
        // the service serves only the operational routes every process has.
        Ok(Mounted::routes(
            Arc::new(|_| {}),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
