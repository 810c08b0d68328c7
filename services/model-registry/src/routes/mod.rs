//! The registry's REST API under `/v1/registry`.

pub mod aliases;
pub mod lineage;
pub mod models;
pub mod uploads;
pub mod versions;

use actix_web::web;
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::peers::Peers;
use ferrite_platform::storage::Storage;
use sqlx::PgPool;

/// What every handler shares.
#[derive(Clone)]
pub struct RegistryState {
    pub pool: PgPool,
    pub storage: Storage,
    pub peers: Peers,
}

/// Reading and writing the registry is an engineer's work (services call as engineers too).
fn require_engineer(principal: &Principal) -> Result<(), ferrite_platform::ApiError> {
    principal.require(&[Role::Engineer])
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1/registry")
            .route("/models", web::post().to(models::create_model))
            .route("/models", web::get().to(models::list_models))
            .route("/models/{name}", web::get().to(models::get_model))
            .route(
                "/models/{name}/versions",
                web::get().to(models::list_versions),
            )
            .route(
                "/models/{name}/versions",
                web::post().to(models::register_version),
            )
            .route("/models/{name}/uploads", web::post().to(uploads::upload))
            .route(
                "/models/{name}/aliases/{alias}",
                web::put().to(aliases::set_alias),
            )
            .route(
                "/models/{name}/aliases/{alias}",
                web::delete().to(aliases::delete_alias),
            )
            .route("/versions/{id}", web::get().to(versions::get_version))
            .route("/versions/{id}/files", web::get().to(versions::list_files))
            .route(
                "/versions/{id}/files/{path:.*}",
                web::get().to(versions::download_file),
            )
            .route("/versions/{id}/lineage", web::get().to(lineage::lineage))
            .route("/resolve/{reference}", web::get().to(versions::resolve)),
    );
}
