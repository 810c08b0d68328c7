//! Jobs as the API takes them (a spec) and as a worker needs them (resolved inputs).
//!
//! A spec names its inputs by reference (`name:3`, `name@alias`, a version id); the runner
//! resolves them once, at submission, and stores the answer with the job. Every attempt then
//! trains on exactly the versions the engineer saw accepted, even if an alias moves meanwhile.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use ferrite_training::job::{DatasetRole, JobKind};
use serde::{Deserialize, Serialize};

use crate::backend::Resources;

/// The body of `POST /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `tokenizer`, `pretrain`, `sft`, `lora`, `qlora` (`reward`, `ppo`, `grpo` are refused for now).
    pub kind: String,
    /// A model version reference: `<uuid>`, `<name>:<number>`, `<name>@<alias>` or `<name>`.
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub datasets: Vec<DatasetRef>,
    /// The trainer's hyper-parameters; which keys exist depends on `kind`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyper_parameters: serde_json::Value,
    #[serde(default)]
    pub resources: Resources,
    /// The model name the output is registered under; `<kind>-<job id>` when absent.
    #[serde(default)]
    pub output_model_name: Option<String>,
    /// Attempts in all before the job fails; the runner's setting when absent.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_attempts: Option<u32>,
    /// Checkpoints kept in storage, the newest by step; each new one deletes those beyond
    /// (Hugging Face's `save_total_limit`). Every checkpoint is kept when absent.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub keep_checkpoints: Option<u32>,
}

/// A dataset named by reference, with what the job uses it for.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetRef {
    pub reference: String,
    #[serde(default)]
    #[schema(value_type = String, example = "train")]
    pub role: DatasetRole,
}

/// Most attempts a spec may ask for; more would hide a job that can never succeed.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

/// A dataset version as the dataset registry resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedDataset {
    pub reference: String,
    pub role: DatasetRole,
    pub version_id: String,
    /// text, sft, chat, preference, ranking or prompts.
    pub kind: String,
    /// jsonl, json or text: how the object's bytes are laid out.
    pub format: String,
    pub object_key: String,
}

/// A model version as the model registry resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedModel {
    pub reference: String,
    pub version_id: String,
    pub artifact_prefix: String,
}

/// Everything a worker needs, stored with the job at submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedJob {
    pub kind: JobKind,
    pub base_model: Option<ResolvedModel>,
    pub datasets: Vec<ResolvedDataset>,
    pub hyper_parameters: serde_json::Value,
    pub resources: Resources,
    pub output_model_name: String,
    /// How many checkpoints the worker keeps; `None` keeps every one, as do jobs stored
    /// before the option existed (their JSON has no such key).
    #[serde(default)]
    pub keep_checkpoints: Option<NonZeroU32>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed and cancelled jobs never change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .ok_or_else(|| {
                format!("unknown job state `{name}`; expected queued, running, succeeded, failed or cancelled")
            })
    }
}

/// The registered name of a job's output when the spec gives none.
pub fn default_output_name(kind: JobKind, job_id: uuid::Uuid) -> String {
    format!("{kind}-{}", job_id.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_parses_back_from_its_name() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        assert!("paused".parse::<JobState>().is_err());
    }

    #[test]
    fn a_spec_with_an_unknown_field_is_refused() {
        let spec = serde_json::json!({"kind": "pretrain", "epochs": 3});
        let error = serde_json::from_value::<JobSpec>(spec).expect_err("unknown field");
        assert!(error.to_string().contains("epochs"), "{error}");
    }

    #[test]
    fn a_job_stored_before_retention_existed_keeps_every_checkpoint() {
        // A `resolved` column as submissions wrote it before `keep_checkpoints` existed.
        let stored = serde_json::json!({
            "kind": "pretrain", "base_model": null, "datasets": [],
            "hyper_parameters": {}, "resources": {}, "output_model_name": "tiny-lm",
        });
        let job: ResolvedJob = serde_json::from_value(stored).expect("an old job still loads");
        assert_eq!(job.keep_checkpoints, None);
    }

    #[test]
    fn a_dataset_without_a_role_trains() {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "kind": "tokenizer",
            "datasets": [{"reference": "corpus:1"}],
        }))
        .expect("valid spec");
        assert_eq!(spec.datasets[0].role, DatasetRole::Train);
    }
}
