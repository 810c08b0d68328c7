//! The events this service publishes, built from a job's stored facts.

use std::collections::{BTreeMap, HashMap};

use ferrite_proto::{JobFinished, JobOutcome};
use uuid::Uuid;

use crate::domain::ResolvedJob;

/// Where a job's final artifact goes: the contract the model registry reads.
pub fn output_prefix(job_id: Uuid) -> String {
    format!("jobs/{job_id}/output/")
}

/// Where every checkpoint of a job goes, each in a folder of its own.
pub fn checkpoints_root(job_id: Uuid) -> String {
    format!("jobs/{job_id}/checkpoints/")
}

/// Where the checkpoint of `step` goes.
pub fn checkpoint_prefix(job_id: Uuid, step: u64) -> String {
    format!("{}step-{step}/", checkpoints_root(job_id))
}

/// The step whose checkpoint folder holds `key`, an object key under
/// [`checkpoints_root`]`(job_id)`; `None` for a key outside any step folder.
pub fn checkpoint_step_of(job_id: Uuid, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(&checkpoints_root(job_id))?;
    let (folder, _) = rest.split_once('/')?;
    folder.strip_prefix("step-")?.parse().ok()
}

/// How a job ended, with what the event carries for that outcome.
#[derive(Debug, Clone)]
pub enum Outcome<'a> {
    Succeeded {
        final_metrics: &'a BTreeMap<String, f64>,
    },
    Failed {
        error: &'a str,
    },
    Cancelled,
}

/// `JobFinished` for `job`, with its lineage (base version, dataset versions).
pub fn finished(job_id: Uuid, job: &ResolvedJob, outcome: &Outcome<'_>) -> JobFinished {
    let (code, artifact_prefix, final_metrics, error) = match outcome {
        Outcome::Succeeded { final_metrics } => (
            JobOutcome::Succeeded,
            Some(output_prefix(job_id)),
            final_metrics
                .iter()
                .map(|(name, value)| (name.clone(), *value))
                .collect::<HashMap<_, _>>(),
            None,
        ),
        Outcome::Failed { error } => (
            JobOutcome::Failed,
            None,
            HashMap::new(),
            Some((*error).to_owned()),
        ),
        Outcome::Cancelled => (JobOutcome::Cancelled, None, HashMap::new(), None),
    };
    JobFinished {
        job_id: job_id.to_string(),
        kind: job.kind.as_str().to_owned(),
        outcome: code as i32,
        artifact_prefix,
        base_model_version_id: job.base_model.as_ref().map(|m| m.version_id.clone()),
        dataset_version_ids: job.datasets.iter().map(|d| d.version_id.clone()).collect(),
        final_metrics,
        error,
        output_model_name: job.output_model_name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use ferrite_training::job::{DatasetRole, JobKind};

    use super::*;
    use crate::domain::{ResolvedDataset, ResolvedModel};

    fn job() -> ResolvedJob {
        ResolvedJob {
            kind: JobKind::Pretrain,
            base_model: Some(ResolvedModel {
                reference: "tok:1".into(),
                version_id: "base-version".into(),
                artifact_prefix: "models/tok/".into(),
            }),
            datasets: vec![ResolvedDataset {
                reference: "corpus".into(),
                role: DatasetRole::Train,
                version_id: "data-version".into(),
                kind: "text".into(),
                format: "text".into(),
                object_key: "datasets/abc".into(),
            }],
            hyper_parameters: serde_json::json!({}),
            resources: Default::default(),
            output_model_name: "tiny-lm".into(),
            keep_checkpoints: None,
        }
    }

    #[test]
    fn a_success_carries_the_artifact_prefix_and_lineage() {
        let id = Uuid::nil();
        let metrics = BTreeMap::from([("eval_loss".to_owned(), 2.5)]);
        let event = finished(
            id,
            &job(),
            &Outcome::Succeeded {
                final_metrics: &metrics,
            },
        );
        assert_eq!(event.outcome, JobOutcome::Succeeded as i32);
        assert_eq!(
            event.artifact_prefix.as_deref(),
            Some("jobs/00000000-0000-0000-0000-000000000000/output/")
        );
        assert_eq!(event.base_model_version_id.as_deref(), Some("base-version"));
        assert_eq!(event.dataset_version_ids, vec!["data-version".to_owned()]);
        assert_eq!(event.final_metrics.get("eval_loss"), Some(&2.5));
        assert_eq!(event.output_model_name, "tiny-lm");
    }

    #[test]
    fn a_failure_has_no_artifact_and_says_why() {
        let event = finished(Uuid::nil(), &job(), &Outcome::Failed { error: "boom" });
        assert_eq!(event.outcome, JobOutcome::Failed as i32);
        assert_eq!(event.artifact_prefix, None);
        assert_eq!(event.error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_key_names_its_checkpoint_step_only_inside_a_step_folder_of_its_job() {
        let job = Uuid::from_u128(7);
        let key = |rest: &str| format!("{}{rest}", checkpoints_root(job));
        assert_eq!(
            checkpoint_step_of(job, &key("step-12/model.safetensors")),
            Some(12)
        );
        assert_eq!(
            checkpoint_step_of(job, &checkpoint_prefix(job, 40)),
            Some(40),
            "the folder's own prefix"
        );
        for outside in [key("step-x/a"), key("notes.txt"), key("step-3")] {
            assert_eq!(checkpoint_step_of(job, &outside), None, "{outside}");
        }
        let other_job = format!("{}step-1/a", checkpoints_root(Uuid::from_u128(8)));
        assert_eq!(checkpoint_step_of(job, &other_job), None);
    }
}
