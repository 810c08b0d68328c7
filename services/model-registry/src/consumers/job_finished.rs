//! Registers the output of every successful training job, with no human step.
//!
//! A `JobFinished` with outcome succeeded becomes the next version of `output_model_name`
//! (the model is created when new), with the job, its base version and its dataset versions
//! as lineage and its final metrics. The version is unique per job, so a second delivery of
//! the same event, even under another message id, registers nothing more.
//!
//! The output folder is checked as an upload is before it becomes a version. A folder that
//! fails the check, or an output of another kind than the model's versions so far, will fail
//! the same way on every delivery, so the message is dead-lettered at once and nothing is
//! registered.

use ferrite_platform::amqp::{Handler, HandlerError, IncomingMessage};
use ferrite_platform::storage::{ObjectKey, Storage};
use ferrite_proto::{JobFinished, JobOutcome};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::artifacts;
use crate::domain::{ModelName, VersionKind, parse_ids};
use crate::error::RegistryError;
use crate::store::{self, NewVersion, Origin};

/// The queue's name under the events exchange, so each deployment (and test) has its own.
pub fn queue_name(exchange: &str) -> String {
    format!("{exchange}.model-registry.job-finished")
}

pub struct RegisterJobOutput {
    /// Where the runner stored the job's output, to check it.
    pub storage: Storage,
}

#[async_trait::async_trait]
impl Handler for RegisterJobOutput {
    #[tracing::instrument(skip_all, fields(messaging.message_id = %message.message_id, job.id))]
    async fn handle(
        &self,
        message: &IncomingMessage,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(), HandlerError> {
        let event: JobFinished = message.decode()?;
        tracing::Span::current().record("job.id", event.job_id.as_str());
        if event.outcome != JobOutcome::Succeeded as i32 {
            return Ok(());
        }
        let job = Registration::parse(&event).map_err(HandlerError::Permanent)?;
        if store::version_of_job(tx, job.job_id)
            .await
            .map_err(transient)?
            .is_some()
        {
            tracing::info!("job output already registered");
            return Ok(());
        }
        // The runner records success only after the output is stored, so a folder that is
        // missing or broken now stays so.
        artifacts::check_stored(&self.storage, &job.prefix, job.version.kind)
            .await
            .map_err(|error| match error {
                RegistryError::BadArtifact { .. } => HandlerError::Permanent(anyhow::anyhow!(
                    "the output of job {} at `{}` is not a usable {}: {error}",
                    job.job_id,
                    job.version.artifact_prefix,
                    job.version.kind.as_str()
                )),
                error => transient(error),
            })?;
        let model = store::ensure_model(tx, &job.model_name, &format!("job:{}", job.job_id))
            .await
            .map_err(transient)?;
        match store::insert_version(tx, &model, &job.version).await {
            Ok(_) => Ok(()),
            // A base version that is not in the registry will never appear: the runner
            // resolved it from here.
            Err(RegistryError::Database(sqlx::Error::Database(db)))
                if db.is_foreign_key_violation() || db.is_check_violation() =>
            {
                Err(HandlerError::Permanent(anyhow::anyhow!(
                    "job {} names a base version the registry does not hold: {db}",
                    job.job_id
                )))
            }
            Err(error @ RegistryError::KindMismatch { .. }) => {
                Err(HandlerError::Permanent(anyhow::anyhow!(
                    "the output of job {} is not registered: {error}",
                    job.job_id
                )))
            }
            Err(error) => Err(transient(error)),
        }
    }
}

fn transient(error: RegistryError) -> HandlerError {
    HandlerError::Transient(error.into())
}

/// A successful job's event, checked and turned into a registration.
struct Registration {
    job_id: Uuid,
    model_name: ModelName,
    /// The output folder's key; `version.artifact_prefix` is the same with its trailing `/`.
    prefix: ObjectKey,
    version: NewVersion,
}

impl Registration {
    fn parse(event: &JobFinished) -> anyhow::Result<Self> {
        let job_id = Uuid::parse_str(&event.job_id)
            .map_err(|_| anyhow::anyhow!("job id `{}` is not a UUID", event.job_id))?;
        let model_name = ModelName::parse(&event.output_model_name)?;
        let artifact_prefix = event
            .artifact_prefix
            .clone()
            .filter(|prefix| !prefix.is_empty())
            .ok_or_else(|| anyhow::anyhow!("job {job_id} succeeded without an artifact prefix"))?;
        let prefix = ObjectKey::parse(artifact_prefix.trim_end_matches('/')).map_err(|error| {
            anyhow::anyhow!("job {job_id} has an unusable artifact prefix: {error}")
        })?;
        let base = event
            .base_model_version_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .map(Uuid::parse_str)
            .transpose()
            .map_err(|_| anyhow::anyhow!("job {job_id} has a base version that is not a UUID"))?;
        let kind = VersionKind::of_job(&event.kind);
        if kind == VersionKind::Adapter && base.is_none() {
            anyhow::bail!(
                "{} job {job_id} produced an adapter without a base",
                event.kind
            );
        }
        let version = NewVersion {
            kind,
            artifact_prefix,
            origin: Origin {
                base_version_id: base.filter(|_| kind == VersionKind::Adapter),
                parent_version_id: base,
                source_job_id: Some(job_id),
                dataset_version_ids: parse_ids("dataset version", &event.dataset_version_ids)?,
                ..Origin::default()
            },
            metrics: event
                .final_metrics
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            description: None,
            created_by: format!("job:{job_id}"),
        };
        Ok(Self {
            job_id,
            model_name,
            prefix,
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(kind: &str, base: Option<&str>) -> JobFinished {
        JobFinished {
            job_id: "0190c2a4-0000-7000-8000-000000000001".into(),
            kind: kind.into(),
            outcome: JobOutcome::Succeeded as i32,
            artifact_prefix: Some("jobs/0190c2a4-0000-7000-8000-000000000001/output/".into()),
            base_model_version_id: base.map(str::to_owned),
            dataset_version_ids: vec!["0190c2a4-0000-7000-8000-00000000000d".into()],
            output_model_name: "tiny-sft".into(),
            ..JobFinished::default()
        }
    }

    #[test]
    fn an_sft_output_is_a_model_whose_parent_is_the_base() {
        let base = "0190c2a4-0000-7000-8000-0000000000b0";
        let job = Registration::parse(&finished("sft", Some(base))).expect("valid");
        assert_eq!(job.version.kind, VersionKind::Model);
        assert_eq!(
            job.version
                .origin
                .parent_version_id
                .map(|id| id.to_string())
                .as_deref(),
            Some(base)
        );
        assert_eq!(
            job.version.origin.base_version_id, None,
            "only adapters have a base"
        );
        assert_eq!(job.version.origin.dataset_version_ids.len(), 1);
    }

    #[test]
    fn a_lora_output_is_an_adapter_on_its_base_and_needs_one() {
        let base = "0190c2a4-0000-7000-8000-0000000000b0";
        let job = Registration::parse(&finished("lora", Some(base))).expect("valid");
        assert_eq!(job.version.kind, VersionKind::Adapter);
        assert!(job.version.origin.base_version_id.is_some());
        assert!(Registration::parse(&finished("qlora", None)).is_err());
    }

    #[test]
    fn a_dataset_id_that_is_not_a_uuid_is_refused() {
        let mut event = finished("sft", None);
        event.dataset_version_ids = vec!["alpaca:1".into()];
        assert!(Registration::parse(&event).is_err());
    }
}
