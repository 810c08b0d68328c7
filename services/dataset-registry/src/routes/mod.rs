//! HTTP routes under /v1/datasets.

pub mod datasets;
pub mod versions;

use actix_web::web;
use ferrite_platform::peers::Peers;
use ferrite_platform::settings::DatasetSettings;
use ferrite_platform::storage::Storage;
use sqlx::PgPool;

/// What every handler needs.
#[derive(Clone)]
pub struct State {
    pub pool: PgPool,
    pub storage: Storage,
    pub limits: DatasetSettings,
    pub peers: Peers,
}

/// Registers every route; fixed segments (`resolve`, `versions`) before `{name}`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/datasets", web::get().to(datasets::list))
        .route(
            "/v1/datasets/resolve/{reference}",
            web::get().to(versions::resolve),
        )
        .route("/v1/datasets/versions/{id}", web::get().to(versions::show))
        .route(
            "/v1/datasets/versions/{id}/content",
            web::get().to(versions::content),
        )
        .route(
            "/v1/datasets/versions/{id}/lineage",
            web::get().to(versions::lineage),
        )
        .route(
            "/v1/datasets/versions/{id}/split",
            web::post().to(versions::split),
        )
        .route(
            "/v1/datasets/versions/{id}/stats",
            web::post().to(versions::token_stats),
        )
        .route(
            "/v1/datasets/versions/{id}/stats",
            web::get().to(versions::list_token_stats),
        )
        .route("/v1/datasets/{name}", web::get().to(datasets::show))
        .route(
            "/v1/datasets/{name}/versions",
            web::get().to(datasets::versions),
        )
        .route(
            "/v1/datasets/{name}/versions",
            web::post().to(datasets::upload),
        )
        .route(
            "/v1/datasets/{name}/aliases/{alias}",
            web::put().to(datasets::set_alias),
        )
        .route(
            "/v1/datasets/{name}/aliases/{alias}",
            web::delete().to(datasets::delete_alias),
        );
}
