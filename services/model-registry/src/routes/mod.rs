//! The registry's REST API under `/v1/registry`.

pub mod aliases;
pub mod lineage;
pub mod models;
pub mod uploads;
pub mod versions;

use actix_web::web;
use ferrite_platform::auth::{Principal, Role};
use ferrite_platform::http::endpoint;
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
            .service(
                endpoint("/models")
                    .post(models::create_model)
                    .get(models::list_models),
            )
            .service(endpoint("/models/{name}").get(models::get_model))
            .service(
                endpoint("/models/{name}/versions")
                    .get(models::list_versions)
                    .post(models::register_version),
            )
            .service(endpoint("/models/{name}/uploads").post(uploads::upload))
            .service(
                endpoint("/models/{name}/aliases/{alias}")
                    .put(aliases::set_alias)
                    .delete(aliases::delete_alias),
            )
            .service(endpoint("/versions/{id}").get(versions::get_version))
            .service(endpoint("/versions/{id}/files").get(versions::list_files))
            .service(endpoint("/versions/{id}/files/{path:.*}").get(versions::download_file))
            .service(endpoint("/versions/{id}/lineage").get(lineage::lineage))
            .service(endpoint("/resolve/{reference}").get(versions::resolve)),
    );
}
