//! What a run has done so far, kept in `.ferrite/runs/<pipeline>/state.json`.
//!
//! The runner saves the state after every change (a dataset uploaded, a job submitted, a stage
//! finished), writing a temporary file and renaming it over the old one, so a process that dies
//! leaves either the old or the new state and never half of one. A rerun skips finished stages
//! whose spec is unchanged, and waits on a submitted job instead of submitting it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::{StageKind, StageSpec};

/// The whole run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    pub pipeline: String,
    /// Uploaded datasets by their name in the file.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetRecord>,
    /// Imported models by their name in the file: the registry version id.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    #[serde(default)]
    pub stages: BTreeMap<String, StageRecord>,
}

/// A dataset version the run registered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetRecord {
    pub version_id: String,
    /// `name:number`, for people.
    pub label: String,
    pub kind: String,
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    /// The licence file's first line, when the pipeline names one.
    pub licence: Option<String>,
}

/// Where a stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Submitted (a job id is known) but not seen finished.
    Running,
    Succeeded,
    Failed,
}

/// One stage's progress and outputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub kind: StageKind,
    pub status: StageStatus,
    /// The digest of the stage as written; a changed stage runs again.
    pub spec_digest: String,
    pub job_id: Option<String>,
    /// The registry version the stage produced or acted on.
    pub model_version_id: Option<String>,
    /// `name:number` of that version, for people.
    pub model_label: Option<String>,
    pub deployment: Option<String>,
    /// Final numbers (eval_loss, baselines, ...), as the services reported them.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Loss curves: metric name -> (step, value) points.
    #[serde(default)]
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
    /// Anything else worth showing (lineage, alias, error).
    #[serde(default)]
    pub details: serde_json::Value,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Seconds spent by this process and earlier ones on the stage.
    pub seconds: Option<f64>,
}

impl StageRecord {
    pub fn new(stage: &StageSpec) -> Self {
        Self {
            kind: stage.kind,
            status: StageStatus::Running,
            spec_digest: String::new(),
            job_id: None,
            model_version_id: None,
            model_label: None,
            deployment: None,
            metrics: BTreeMap::new(),
            series: BTreeMap::new(),
            details: serde_json::Value::Null,
            started_at: Some(chrono::Utc::now()),
            finished_at: None,
            seconds: None,
        }
    }
}

/// A stable digest of what a stage asks for (kind, inputs and options as written, not their
/// line numbers) and of what its inputs resolved to.
pub fn digest(stage: &StageSpec, resolved_inputs: &[String]) -> String {
    let written = serde_json::json!([stage.node.to_json(), resolved_inputs]);
    hex::encode(Sha256::digest(written.to_string().as_bytes()))
}

/// The state file of a pipeline under `runs_dir`.
pub fn path(runs_dir: &Path, pipeline: &str) -> PathBuf {
    runs_dir.join(pipeline).join("state.json")
}

/// Reads the state, or starts a fresh one when there is none.
pub fn load(file: &Path, pipeline: &str) -> anyhow::Result<RunState> {
    match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a run state; delete it to start over",
                file.display()
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(RunState {
            pipeline: pipeline.to_owned(),
            ..RunState::default()
        }),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Writes the state atomically (a temporary file renamed over the old one).
pub fn save(file: &Path, state: &RunState) -> anyhow::Result<()> {
    let folder = file.parent().context("the state file has no folder")?;
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let temporary = file.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(state).context("cannot serialise the run state")?;
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, file).with_context(|| format!("cannot replace {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_reads_back_equal() {
        let folder = std::env::temp_dir().join(format!("ferrite-state-{}", uuid::Uuid::new_v4()));
        let file = path(&folder, "demo");
        let mut state = load(&file, "demo").expect("a missing file is a fresh state");
        assert!(state.stages.is_empty());
        state.models.insert("smollm2".into(), "v1".into());
        save(&file, &state).expect("saved");
        assert_eq!(load(&file, "demo").expect("read back"), state);
        std::fs::remove_dir_all(&folder).expect("cleaned up");
    }
}
