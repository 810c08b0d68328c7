//! Turns an ingested body into a version: moves it to its content address and records it with
//! its event, or finds the version that already holds the same bytes.

use ferrite_platform::amqp::outbox;
use ferrite_platform::storage::{ObjectKey, Storage};
use ferrite_proto::DatasetVersionCreated;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{DatasetKind, DatasetName};
use crate::error::RegistryError;
use crate::ingest::Ingested;
use crate::store::{self, DatasetVersion, NewVersionRow};

/// Who asks for the version, and where it comes from.
pub struct Provenance {
    pub created_by: String,
    pub derived_from: Option<Uuid>,
    pub derivation: Option<serde_json::Value>,
    pub campaign_id: Option<Uuid>,
}

/// The version, and whether this call created it (false: the same bytes were already there).
pub struct Registered {
    pub version: DatasetVersion,
    pub created: bool,
}

/// A validated body to record as the next version of a dataset.
#[derive(Clone, Copy)]
pub struct Registration<'a> {
    pub pool: &'a PgPool,
    pub storage: &'a Storage,
    pub name: &'a DatasetName,
    pub kind: DatasetKind,
    pub ingested: &'a Ingested,
    pub provenance: &'a Provenance,
}

/// Registers the body as the next version of its dataset, creating the dataset on first use.
/// On failure the temporary object is removed, and so is the content-addressed object when
/// this call created it.
#[tracing::instrument(skip_all)]
pub async fn register(registration: Registration<'_>) -> Result<Registered, RegistryError> {
    let Registration {
        storage, ingested, ..
    } = registration;
    let target = ObjectKey::parse(&format!("datasets/{}", ingested.sha256))?;
    let mut moved = false;
    let result = record(&registration, &target, &mut moved).await;
    if (result.is_err() || !moved)
        && let Err(e) = storage.delete(&ingested.temp_key).await
    {
        tracing::warn!(object.key = %ingested.temp_key, error = %e, "cannot remove a temporary upload");
    }
    if result.is_err() && moved {
        // TODO: a concurrent upload of the same bytes to another dataset may have found this
        // object in the instant between the move and this delete; its version would then
        // point at a missing object. A reference count in the database would close the gap.
        if let Err(e) = storage.delete(&target).await {
            tracing::warn!(object.key = %target, error = %e, "cannot remove an unregistered object");
        }
    }
    result
}

async fn record(
    registration: &Registration<'_>,
    target: &ObjectKey,
    moved: &mut bool,
) -> Result<Registered, RegistryError> {
    let Registration {
        pool,
        storage,
        name,
        kind,
        ingested,
        provenance,
    } = *registration;
    let mut tx = pool.begin().await?;
    let (dataset_id, existing_kind) =
        store::lock_or_create_dataset(&mut tx, name, kind, &provenance.created_by).await?;
    if existing_kind != kind.as_str() {
        return Err(RegistryError::KindMismatch {
            dataset: name.to_string(),
            existing: existing_kind,
            requested: kind.as_str().to_owned(),
        });
    }
    if let Some(id) = store::find_by_sha256(&mut tx, dataset_id, &ingested.sha256).await? {
        let version = store::find_version(&mut tx, id)
            .await?
            .ok_or_else(|| RegistryError::not_found("dataset_version", id.to_string()))?;
        tx.rollback().await?;
        return Ok(Registered {
            version,
            created: false,
        });
    }

    // Another dataset may already hold these bytes; content addressing lets them share it.
    if !storage.exists(target).await? {
        storage.rename(&ingested.temp_key, target).await?;
        *moved = true;
    }
    let id = Uuid::now_v7();
    let stats = serde_json::to_value(ingested.stats).map_err(|e| RegistryError::Internal {
        context: "cannot encode statistics",
        source: Box::new(e),
    })?;
    let row = NewVersionRow {
        id,
        dataset_id,
        sha256: &ingested.sha256,
        kind,
        format: ingested.format.as_str(),
        object_key: target.as_str(),
        bytes: ingested.bytes,
        rows: ingested.rows,
        stats,
        derived_from: provenance.derived_from,
        derivation: provenance.derivation.clone(),
        campaign_id: provenance.campaign_id,
        created_by: &provenance.created_by,
    };
    store::insert_version(&mut tx, &row).await?;
    let version = store::find_version(&mut tx, id)
        .await?
        .ok_or_else(|| RegistryError::not_found("dataset_version", id.to_string()))?;
    let event = DatasetVersionCreated {
        dataset_id: dataset_id.to_string(),
        dataset_name: name.to_string(),
        version_id: id.to_string(),
        sha256: ingested.sha256.clone(),
        kind: kind.as_str().to_owned(),
        rows: ingested.rows,
        derived_from_version_id: provenance.derived_from.map(|id| id.to_string()),
        campaign_id: provenance.campaign_id.map(|id| id.to_string()),
    };
    outbox::enqueue(&mut tx, &event)
        .await
        .map_err(|e| RegistryError::Internal {
            context: "cannot write DatasetVersionCreated to the outbox",
            source: Box::new(e),
        })?;
    tx.commit().await?;
    tracing::info!(dataset.version_id = %id, dataset.rows = ingested.rows, "dataset version created");
    Ok(Registered {
        version,
        created: true,
    })
}
