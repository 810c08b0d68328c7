//! Runs a checked pipeline: uploads its datasets, finds its models, then each stage in order.
//!
//! Stages run in file order, which the checks made a valid order (a `stage:` reference points
//! backwards). The state is saved after every step; a stage that finished with the same spec
//! and the same resolved inputs is skipped on a rerun, so a stage whose upstream ran again runs
//! again too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::MultiProgress;

use super::client::{Client, dataset_format, field};
use super::jobs::JobEnded;
use super::jobs::version_label;
use super::progress;
use super::spec::{DatasetUpload, ModelImport, Pipeline, Reference, StageSpec, stage_references};
use super::stages;
use super::state::{self, DatasetRecord, RunState, StageRecord, StageStatus};

/// A pipeline being run, with its client and state.
pub struct Run {
    client: Client,
    options: RunOptions,
    pipeline: Pipeline,
    state: RunState,
    state_file: PathBuf,
    bars: MultiProgress,
    poll: Duration,
}

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub url: String,
    pub token: String,
    /// The folder holding one sub-folder per pipeline (`.ferrite/runs`).
    pub runs_dir: PathBuf,
    pub poll: Duration,
}

impl Run {
    pub fn new(pipeline: Pipeline, options: &RunOptions) -> anyhow::Result<Self> {
        let state_file = state::path(&options.runs_dir, &pipeline.name);
        let state = state::load(&state_file, &pipeline.name)?;
        Ok(Self {
            client: Client::new(&options.url, &options.token)?,
            options: options.clone(),
            pipeline,
            state,
            state_file,
            bars: MultiProgress::new(),
            poll: options.poll,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bars(&self) -> &MultiProgress {
        &self.bars
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll
    }

    pub fn pipeline_name(&self) -> String {
        self.pipeline.name.clone()
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// The folder of this pipeline's state and report.
    pub fn folder(&self) -> &Path {
        self.state_file.parent().unwrap_or(Path::new("."))
    }

    /// The record of a stage, created when the stage first runs.
    pub fn record(&mut self, stage: &StageSpec) -> &mut StageRecord {
        self.state
            .stages
            .entry(stage.name.clone())
            .or_insert_with(|| StageRecord::new(stage))
    }

    pub fn save(&self) -> anyhow::Result<()> {
        state::save(&self.state_file, &self.state)
    }

    /// What a reference means to the services: an earlier stage's version id, an uploaded
    /// dataset's or imported model's version id, or the reference as written.
    pub fn resolve(&self, reference: &Reference) -> anyhow::Result<String> {
        match reference {
            Reference::Stage(name) => {
                let record = self
                    .state
                    .stages
                    .get(name)
                    .filter(|record| record.status == StageStatus::Succeeded)
                    .with_context(|| format!("stage `{name}` has not finished"))?;
                record
                    .model_version_id
                    .clone()
                    .with_context(|| format!("stage `{name}` produced no model version"))
            }
            Reference::Registry(text) => Ok(self
                .state
                .datasets
                .get(text)
                .map(|dataset| dataset.version_id.clone())
                .or_else(|| self.state.models.get(text).cloned())
                .unwrap_or_else(|| text.clone())),
        }
    }

    /// Runs everything not done yet.
    pub async fn run_all(&mut self) -> anyhow::Result<()> {
        for upload in self.pipeline.datasets.clone() {
            self.upload_dataset(&upload).await?;
        }
        for import in self.pipeline.models.clone() {
            self.find_model(&import).await?;
        }
        self.save()?;
        for stage in self.pipeline.stages.clone() {
            // The digest covers what the stage reads as well as what it says, so a stage whose
            // dataset or upstream model changed runs again.
            let inputs = self.resolved_inputs(&stage);
            let digest = state::digest(&stage, &inputs);
            let previous = self.state.stages.get(&stage.name);
            let done = previous.is_some_and(|record| {
                record.status == StageStatus::Succeeded && record.spec_digest == digest
            });
            if done && self.output_still_registered(&stage.name).await? {
                eprintln!("{:>14} finished earlier, skipped", stage.name);
                continue;
            }
            // A job still running is followed again; anything else starts over.
            let resumable = previous.is_some_and(|record| {
                record.status == StageStatus::Running && record.spec_digest == digest
            });
            if !resumable {
                let mut record = StageRecord::new(&stage);
                record.spec_digest = digest;
                self.state.stages.insert(stage.name.clone(), record);
            }
            self.save()?;
            self.run_stage(&stage).await?;
        }
        Ok(())
    }

    /// Whether a finished stage's version is still in the registry: a state file may outlive
    /// the database it was made against, and then the stage runs again.
    async fn output_still_registered(&self, stage: &str) -> anyhow::Result<bool> {
        let Some(id) = self
            .state
            .stages
            .get(stage)
            .and_then(|record| record.model_version_id.as_ref())
        else {
            return Ok(true);
        };
        let path = format!("/v1/registry/versions/{id}");
        Ok(self.client.get_optional(&path).await?.is_some())
    }

    /// What each of the stage's references means now; an unresolvable one stays as written.
    fn resolved_inputs(&self, stage: &StageSpec) -> Vec<String> {
        stage_references(&stage.inputs)
            .map(|reference| {
                self.resolve(&reference.value)
                    .unwrap_or_else(|_| format!("{:?}", reference.value))
            })
            .collect()
    }

    async fn run_stage(&mut self, stage: &StageSpec) -> anyhow::Result<()> {
        let started = Instant::now();
        let outcome = stages::for_kind(stage.kind).run(stage, self).await;
        let record = self.record(stage);
        record.seconds = Some(record.seconds.unwrap_or(0.0) + started.elapsed().as_secs_f64());
        record.finished_at = Some(chrono::Utc::now());
        record.status = match &outcome {
            Ok(()) => StageStatus::Succeeded,
            // A job that may still be running is followed again by a rerun.
            Err(error) if record.job_id.is_some() && error.downcast_ref::<JobEnded>().is_none() => {
                StageStatus::Running
            }
            Err(_) => StageStatus::Failed,
        };
        if let Err(error) = &outcome {
            record.details["error"] = serde_json::Value::String(format!("{error:#}"));
        }
        self.save()?;
        outcome.with_context(|| format!("stage `{}` (line {})", stage.name, stage.line))
    }

    async fn upload_dataset(&mut self, upload: &DatasetUpload) -> anyhow::Result<()> {
        let path = self.pipeline.path(&upload.path);
        let bar = progress::spinner(&self.bars, &upload.name);
        bar.message(&format!("uploading {}", path.display()));
        let body = read_slice(&path, upload)?;
        let format = dataset_format(&path);
        let version = self
            .client
            .upload_dataset(&upload.name, &upload.kind, format, body)
            .await
            .with_context(|| format!("dataset `{}` (line {})", upload.name, upload.line))?;
        let record = DatasetRecord {
            version_id: field(&version, "id", "the dataset version")?.to_owned(),
            label: format!(
                "{}:{}",
                upload.name,
                version["number"].as_u64().unwrap_or_default()
            ),
            kind: upload.kind.clone(),
            rows: version["rows"].as_u64(),
            bytes: version["bytes"].as_u64(),
            sha256: version["sha256"].as_str().map(str::to_owned),
            licence: upload.licence.clone(),
        };
        bar.finish(&format!(
            "{} ({} rows)",
            record.label,
            record.rows.map_or("?".into(), |rows| rows.to_string())
        ));
        self.state.datasets.insert(upload.name.clone(), record);
        Ok(())
    }

    /// Finds an imported model in the registry, importing its GGUF file first when absent.
    async fn find_model(&mut self, import: &ModelImport) -> anyhow::Result<()> {
        let path = format!("/v1/registry/resolve/{}", import.name);
        let version = match self.client.get_optional(&path).await? {
            Some(version) => version,
            None => {
                self.import_gguf(import).await?;
                self.client.get(&path).await.with_context(|| {
                    format!("model `{}` is still missing after its import", import.name)
                })?
            }
        };
        let id = field(&version, "id", "the model version")?.to_owned();
        eprintln!("{:>14} found {}", import.name, version_label(&version));
        self.state.models.insert(import.name.clone(), id);
        Ok(())
    }

    /// Runs `ferrite model import`, which converts the GGUF file and uploads the folder.
    async fn import_gguf(&self, import: &ModelImport) -> anyhow::Result<()> {
        let gguf = self.pipeline.path(&import.gguf);
        let bar = progress::spinner(&self.bars, &import.name);
        bar.message(&format!("importing {}", gguf.display()));
        let program = std::env::current_exe().context("cannot find the ferrite executable")?;
        let output = tokio::process::Command::new(program)
            .args(["model", "import", "--name", &import.name, "--gguf"])
            .arg(&gguf)
            .env("FERRITE_URL", &self.options.url)
            .env("FERRITE_TOKEN", &self.options.token)
            .output()
            .await
            .context("cannot run `ferrite model import`")?;
        if !output.status.success() {
            let reason = String::from_utf8_lossy(&output.stderr);
            bar.fail(reason.trim());
            bail!(
                "model `{}` (line {}): the import of {} failed: {}",
                import.name,
                import.line,
                gguf.display(),
                reason.trim()
            );
        }
        bar.finish("imported");
        Ok(())
    }
}

/// The bytes to upload: the whole file, or its first rows or bytes when the pipeline says so.
pub fn read_slice(path: &Path, upload: &DatasetUpload) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "dataset `{}`: cannot read {} (run scripts/fetch-data.sh)",
            upload.name,
            path.display()
        )
    })?;
    let format = dataset_format(path);
    let sliced = match (format, upload.max_rows, upload.max_bytes) {
        ("json", Some(rows), _) => {
            let records: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a JSON array", path.display()))?;
            let first: Vec<_> = records.into_iter().take(rows).collect();
            serde_json::to_vec(&first).context("cannot write the JSON slice")?
        }
        (_, Some(rows), _) => {
            let mut kept = Vec::new();
            for line in bytes
                .split(|byte| *byte == b'\n')
                .filter(|line| !line.is_empty())
                .take(rows)
            {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
            kept
        }
        (_, None, Some(limit)) if bytes.len() > limit => {
            let end = bytes[..limit]
                .iter()
                .rposition(|byte| *byte == b'\n')
                .map_or(limit, |newline| newline + 1);
            bytes[..end].to_vec()
        }
        _ => bytes,
    };
    Ok(sliced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(path: &Path, max_rows: Option<usize>, max_bytes: Option<usize>) -> DatasetUpload {
        DatasetUpload {
            line: 1,
            name: "d".into(),
            kind: "sft".into(),
            path: path.to_path_buf(),
            licence: None,
            max_rows,
            max_bytes,
        }
    }

    fn slice(
        name: &str,
        content: &str,
        max_rows: Option<usize>,
        max_bytes: Option<usize>,
    ) -> String {
        let folder = std::env::temp_dir().join(format!("ferrite-slice-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&folder).expect("scratch folder");
        let path = folder.join(name);
        std::fs::write(&path, content).expect("write");
        let bytes = read_slice(&path, &upload(&path, max_rows, max_bytes)).expect("slice");
        std::fs::remove_dir_all(&folder).expect("clean up");
        String::from_utf8(bytes).expect("UTF-8")
    }

    #[test]
    fn a_json_array_keeps_its_first_records_and_stays_an_array() {
        let sliced = slice("a.json", r#"[{"a": 1}, {"a": 2}, {"a": 3}]"#, Some(2), None);
        assert_eq!(sliced, r#"[{"a":1},{"a":2}]"#);
    }

    #[test]
    fn json_lines_keep_their_first_non_empty_lines() {
        let sliced = slice(
            "a.jsonl",
            "{\"a\":1}\n\n{\"a\":2}\n{\"a\":3}\n",
            Some(2),
            None,
        );
        assert_eq!(sliced, "{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn text_is_cut_at_the_last_line_end_within_the_limit() {
        // "one\ntwo\n" is 8 bytes; a 10-byte limit falls inside "three", so the cut is at 8.
        assert_eq!(
            slice("a.txt", "one\ntwo\nthree\n", None, Some(10)),
            "one\ntwo\n"
        );
        assert_eq!(slice("a.txt", "short\n", None, Some(100)), "short\n");
    }
}
