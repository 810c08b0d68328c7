//! HTTP routes under /v1/datasets.

pub mod datasets;
pub mod versions;

use actix_web::web;
use ferrite_platform::http::endpoint;
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
    cfg.service(endpoint("/v1/datasets").get(datasets::list))
        .service(endpoint("/v1/datasets/resolve/{reference}").get(versions::resolve))
        .service(endpoint("/v1/datasets/versions/{id}").get(versions::show))
        .service(endpoint("/v1/datasets/versions/{id}/content").get(versions::content))
        .service(endpoint("/v1/datasets/versions/{id}/lineage").get(versions::lineage))
        .service(endpoint("/v1/datasets/versions/{id}/split").post(versions::split))
        .service(
            endpoint("/v1/datasets/versions/{id}/stats")
                .post(versions::token_stats)
                .get(versions::list_token_stats),
        )
        .service(endpoint("/v1/datasets/{name}").get(datasets::show))
        .service(
            endpoint("/v1/datasets/{name}/versions")
                .get(datasets::versions)
                .post(datasets::upload),
        )
        .service(
            endpoint("/v1/datasets/{name}/aliases/{alias}")
                .put(datasets::set_alias)
                .delete(datasets::delete_alias),
        );
}
