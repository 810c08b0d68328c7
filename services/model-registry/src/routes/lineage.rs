//! The whole lineage of a version in one call.
//!
//! The registry holds the chain of versions (each with its job and dataset version ids); the
//! dataset registry holds what those datasets are and where they came from, and the gateway
//! where the version is deployed. Those two are asked over REST; when one is down or does not
//! serve the route yet, the answer leaves its part out and says so in `notes`, because a
//! lineage without dataset details is still worth more than an error.

use actix_web::{HttpResponse, web};
use ferrite_platform::ApiError;
use ferrite_platform::auth::Principal;
use ferrite_platform::peers::{PeerError, Peers};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::{RegistryState, require_engineer};
use crate::store::{self, ModelVersion};

/// Parents followed at most; a longer chain is cut with a note (none is that deep in practice,
/// and the bound keeps one request's work finite).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LineageReport {
    /// The version asked about, then its parent, the parent's parent, and so on.
    pub chain: Vec<LineageStep>,
    /// Deployments of the version from the gateway; absent when it could not say.
    #[schema(value_type = Option<Object>)]
    pub deployments: Option<Value>,
    /// What was left out and why (a peer down, a dataset unknown to it).
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LineageStep {
    pub version: ModelVersion,
    pub source_job_id: Option<Uuid>,
    pub datasets: Vec<DatasetLink>,
    pub preference_datasets: Vec<DatasetLink>,
    pub campaign_ids: Vec<Uuid>,
}

/// A dataset version as the dataset registry describes it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatasetLink {
    pub id: Uuid,
    /// The dataset version, as `GET /v1/datasets/resolve/{id}` returns it.
    #[schema(value_type = Option<Object>)]
    pub version: Option<Value>,
    /// Its own lineage, as `GET /v1/datasets/versions/{id}/lineage` returns it.
    #[schema(value_type = Option<Object>)]
    pub lineage: Option<Value>,
}

#[utoipa::path(get, path = "/v1/registry/versions/{id}/lineage", tag = "model-registry",
    responses((status = 200, body = LineageReport), (status = 404)))]
#[tracing::instrument(skip_all, fields(version.id = %id))]
pub async fn lineage(
    principal: Principal,
    state: web::Data<RegistryState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    require_engineer(&principal)?;
    let chain = chain(&state, *id).await?;
    let mut notes = Vec::new();
    if chain.len() > MAX_DEPTH {
        notes.push(format!("the chain was cut after {MAX_DEPTH} versions"));
    }
    let mut datasets = DatasetRegistry::new(&state.peers);
    let mut steps = Vec::with_capacity(chain.len());
    for version in chain.into_iter().take(MAX_DEPTH) {
        steps.push(LineageStep {
            source_job_id: version.origin.source_job_id,
            datasets: datasets.describe(&version.origin.dataset_version_ids).await,
            preference_datasets: datasets
                .describe(&version.origin.preference_dataset_version_ids)
                .await,
            campaign_ids: version.origin.campaign_ids.clone(),
            version,
        });
    }
    notes.extend(datasets.notes);
    let deployments = deployments(&state.peers, *id, &mut notes).await;
    Ok(HttpResponse::Ok().json(LineageReport {
        chain: steps,
        deployments,
        notes,
    }))
}

/// The version and its parents, up to one past [`MAX_DEPTH`] so a cut can be told apart.
async fn chain(state: &RegistryState, id: Uuid) -> Result<Vec<ModelVersion>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let mut chain = vec![store::version(&mut conn, id).await?];
    while chain.len() <= MAX_DEPTH {
        let Some(parent) = chain.last().and_then(|v| v.origin.parent_version_id) else {
            break;
        };
        chain.push(store::version(&mut conn, parent).await?);
    }
    Ok(chain)
}

/// Why a peer gave no answer: it is absent (down, or not serving the route) or it refused.
enum Missing {
    Unreachable(String),
    Refused(String),
}

fn classify(error: PeerError) -> Missing {
    match &error {
        PeerError::Transport { .. } => Missing::Unreachable(error.to_string()),
        PeerError::Status { status, code, .. }
            if *status >= 500 || code.as_deref() == Some("route_not_found") =>
        {
            Missing::Unreachable(error.to_string())
        }
        PeerError::Status { .. } => Missing::Refused(error.to_string()),
    }
}

/// Asks the dataset registry, and stops asking after the first sign that it is away.
struct DatasetRegistry<'a> {
    peers: &'a Peers,
    away: bool,
    notes: Vec<String>,
}

impl<'a> DatasetRegistry<'a> {
    fn new(peers: &'a Peers) -> Self {
        Self {
            peers,
            away: false,
            notes: Vec::new(),
        }
    }

    async fn describe(&mut self, ids: &[Uuid]) -> Vec<DatasetLink> {
        let mut links = Vec::with_capacity(ids.len());
        for id in ids {
            let version = self.ask(&format!("/v1/datasets/resolve/{id}")).await;
            let lineage = match version {
                Some(_) => {
                    self.ask(&format!("/v1/datasets/versions/{id}/lineage"))
                        .await
                }
                None => None,
            };
            links.push(DatasetLink {
                id: *id,
                version,
                lineage,
            });
        }
        links
    }

    async fn ask(&mut self, path: &str) -> Option<Value> {
        if self.away {
            return None;
        }
        match self.peers.get_json(path).await {
            Ok(value) => Some(value),
            Err(error) => {
                match classify(error) {
                    Missing::Unreachable(why) => {
                        tracing::warn!(error = %why, "dataset registry unreachable for lineage");
                        self.away = true;
                        self.notes.push(format!(
                            "dataset details left out: the dataset registry did not answer ({why})"
                        ));
                    }
                    Missing::Refused(why) => self.notes.push(why),
                }
                None
            }
        }
    }
}

async fn deployments(peers: &Peers, id: Uuid, notes: &mut Vec<String>) -> Option<Value> {
    match peers
        .get_json(&format!("/v1/deployments?version_id={id}"))
        .await
    {
        Ok(value) => Some(value),
        Err(error) => {
            let why = match classify(error) {
                Missing::Unreachable(why) | Missing::Refused(why) => why,
            };
            notes.push(format!(
                "deployments left out: the gateway did not answer ({why})"
            ));
            None
        }
    }
}
