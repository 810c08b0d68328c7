//! Inference gateway: OpenAI-compatible serving of registered models.
//!
//! Owns the Postgres schema `inference_gateway` and the routes under /v1/models, /v1/completions, /v1/chat/completions, /v1/deployments.

use std::sync::Arc;

use ferrite_platform::app::Mounted;
use ferrite_platform::{ServiceContext, ServiceModule};
use sqlx::migrate::Migrator;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct InferenceGateway;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "inference-gateway", description = "Inference gateway: OpenAI-compatible serving of registered models.")))]
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
        None
    }

    async fn mount(&self, _ctx: ServiceContext) -> anyhow::Result<Mounted> {
        // TODO: the resource routes (/v1/models, /v1/completions, /v1/chat/completions, /v1/deployments) arrive with this service's issue; until then
        // the service serves only the operational routes every process has.
        Ok(Mounted::routes(
            Arc::new(|_| {}),
            <Api as utoipa::OpenApi>::openapi(),
        ))
    }
}
