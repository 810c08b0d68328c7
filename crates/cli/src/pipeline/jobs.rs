//! Training stages: tokenizer, pretrain, sft, lora and qlora, each one training-runner job.
//!
//! The stage submits `POST /v1/jobs`, follows the job (state, step, live metrics) until it ends,
//! then waits for the model registry to register the job's output, which it does on its own
//! when the runner's `JobFinished` event arrives. A rerun whose state names a job attaches to
//! it instead of submitting a second one. The CLI follows jobs over REST (state, progress and
//! metric series) rather than on the broker: it is an outside client, like any user's script.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use ferrite_training::job::{self, JobKind};
use serde_json::{Value, json};

use super::client::field;
use super::progress::{self, JobBar};
use super::runner::Run;
use super::spec::{StageKind, StageSpec};
use super::stages::{InputRules, Need, Stage, check_inputs};
use super::yaml::{self, LineError};

/// Metrics followed live and kept as curves in the report.
const CURVES: [&str; 4] = ["loss", "eval_loss", "tokens_per_second", "lr"];

/// How often the live metrics are fetched while a job runs.
const METRICS_INTERVAL: Duration = Duration::from_secs(2);

/// How long a finished job's output may take to appear in the model registry.
const REGISTRATION_PATIENCE: Duration = Duration::from_secs(120);

/// The job ended without success; a rerun submits a new one.
#[derive(Debug, thiserror::Error)]
#[error("job {job_id} {state}: {reason}")]
pub struct JobEnded {
    pub job_id: String,
    pub state: String,
    pub reason: String,
}

/// Job-level options a training stage passes to the runner as they are: how many attempts
/// the job gets, and how many of its newest checkpoints storage keeps.
const JOB_OPTIONS: [&str; 2] = ["max_attempts", "keep_checkpoints"];

/// A stage that is one training job.
#[derive(Debug)]
pub struct TrainingStage;

#[async_trait]
impl Stage for TrainingStage {
    fn options(&self) -> &'static [&'static str] {
        &[
            "hyper_parameters",
            "output_model_name",
            "max_attempts",
            "keep_checkpoints",
        ]
    }

    fn check(&self, stage: &StageSpec) -> Vec<LineError> {
        let mut problems = check_inputs(stage, rules(stage.kind));
        for option in JOB_OPTIONS {
            // The runner refuses 0 too; saying so here fails the file before any upload.
            if let Some(node) = stage.node.get(option)
                && !matches!(node.value, yaml::Value::Integer(count)
                    if (1..=i64::from(u32::MAX)).contains(&count))
            {
                let found = match &node.value {
                    yaml::Value::Integer(count) => count.to_string(),
                    other => other.describe().to_owned(),
                };
                problems.push(LineError::new(
                    node.line,
                    format!(
                        "{option}: must be a whole number from 1 to {}, not {found}",
                        u32::MAX
                    ),
                ));
            }
        }
        let Ok(kind) = stage.kind.as_str().parse::<JobKind>() else {
            return problems;
        };
        // The same check the runner makes at submission, so a typo fails before any upload.
        if let Err(error) = job::validate(kind, &stage.hyper_parameters) {
            let line = if error.field == "kind" {
                stage.line_of("kind")
            } else {
                stage.line_of(&error.field)
            };
            problems.push(LineError::new(
                line,
                format!("{}: {}", error.field, error.message),
            ));
        }
        problems
    }

    async fn run(&self, stage: &StageSpec, run: &mut Run) -> anyhow::Result<()> {
        let job_id = match run.record(stage).job_id.clone() {
            Some(job_id) => job_id,
            None => submit(stage, run).await?,
        };
        let bar = progress::job_bar(run.bars(), &stage.name, stage.kind.as_str());
        let finished = follow(run, &job_id, &bar).await;
        let job = match finished {
            Ok(job) => job,
            Err(error) => {
                bar.fail(&format!("{error:#}"));
                return Err(error);
            }
        };
        let series = metric_series(run, &job_id).await.unwrap_or_default();
        let output_name = output_model_name(stage, &run.pipeline_name());
        let version = wait_for_version(run, &output_name, &job_id).await?;
        let label = version_label(&version);
        bar.finish(&format!("registered {label}"));

        let record = run.record(stage);
        record.model_version_id = Some(field(&version, "id", "the registered version")?.to_owned());
        record.model_label = Some(label);
        record.metrics = final_metrics(&job, &version);
        record.series = series;
        record.details = json!({ "job": job, "version": version });
        Ok(())
    }
}

fn rules(kind: StageKind) -> InputRules {
    let base_model = match kind {
        StageKind::Tokenizer => Need::Refused,
        _ => Need::Required,
    };
    InputRules {
        datasets: Need::Required,
        base_model,
        model: Need::Refused,
    }
}

/// The name the output is registered under: the stage's option, else `<pipeline>-<stage>`.
pub fn output_model_name(stage: &StageSpec, pipeline: &str) -> String {
    stage
        .option("output_model_name")
        .map_or_else(|| format!("{pipeline}-{}", stage.name), str::to_owned)
}

async fn submit(stage: &StageSpec, run: &mut Run) -> anyhow::Result<String> {
    let mut datasets = Vec::new();
    for input in &stage.inputs.datasets {
        let reference = run.resolve(&input.reference.value)?;
        datasets.push(json!({ "reference": reference, "role": input.role }));
    }
    let base_model = match &stage.inputs.base_model {
        Some(reference) => Some(run.resolve(&reference.value)?),
        None => None,
    };
    let mut spec = json!({
        "kind": stage.kind.as_str(),
        "base_model": base_model,
        "datasets": datasets,
        "hyper_parameters": stage.hyper_parameters,
        "output_model_name": output_model_name(stage, &run.pipeline_name()),
    });
    for option in JOB_OPTIONS {
        if let Some(node) = stage.node.get(option) {
            spec[option] = node.to_json();
        }
    }
    let job = run
        .client()
        .post("/v1/jobs", &spec)
        .await
        .with_context(|| {
            format!(
                "stage `{}` (line {}): the job was refused",
                stage.name, stage.line
            )
        })?;
    let job_id = field(&job, "id", "the submitted job")?.to_owned();
    run.record(stage).job_id = Some(job_id.clone());
    run.save()?;
    Ok(job_id)
}

/// Polls the job until it ends, updating the bar; returns the final job.
async fn follow(run: &Run, job_id: &str, bar: &JobBar) -> anyhow::Result<Value> {
    let path = format!("/v1/jobs/{job_id}");
    let mut last_metrics: Option<Instant> = None;
    loop {
        let job = run.client().get(&path).await?;
        let state = field(&job, "state", "the job")?.to_owned();
        let (step, total) = job_progress(&job);
        bar.set_progress(step, total);
        if last_metrics.is_none_or(|at| at.elapsed() > METRICS_INTERVAL) {
            last_metrics = Some(Instant::now());
            if let Ok(series) = metric_series(run, job_id).await {
                bar.set_metrics(&latest(&series), &state);
            }
        }
        match state.as_str() {
            "succeeded" => return Ok(job),
            "failed" | "cancelled" => {
                return Err(JobEnded {
                    job_id: job_id.to_owned(),
                    state,
                    reason: job["error"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_owned(),
                }
                .into());
            }
            _ => tokio::time::sleep(run.poll_interval()).await,
        }
    }
}

/// The step reached and the steps planned, from whichever fields the job carries.
fn job_progress(job: &Value) -> (u64, Option<u64>) {
    let progress = &job["progress"];
    let step = ["step", "steps_done", "current_step"]
        .iter()
        .find_map(|name| progress[*name].as_u64())
        .unwrap_or(0);
    let total = ["total_steps", "total"]
        .iter()
        .find_map(|name| progress[*name].as_u64())
        .or_else(|| job["spec"]["hyper_parameters"]["total_steps"].as_u64())
        .or_else(|| job["hyper_parameters"]["total_steps"].as_u64());
    (step, total)
}

async fn metric_series(
    run: &Run,
    job_id: &str,
) -> anyhow::Result<BTreeMap<String, Vec<(u64, f64)>>> {
    let path = format!("/v1/jobs/{job_id}/metrics?names={}", CURVES.join(","));
    Ok(parse_series(&run.client().get(&path).await?))
}

/// Reads a metrics answer into curves. Accepts `{name: [{step, value}]}` (optionally under
/// `series`) and flat lists of `{name, step, value}` (optionally under `data` or `points`).
pub fn parse_series(answer: &Value) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut curves: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    let point = |item: &Value| Some((item["step"].as_u64()?, item["value"].as_f64()?));
    let flat = ["data", "points", "metrics"]
        .iter()
        .find_map(|key| answer[*key].as_array())
        .or_else(|| answer.as_array());
    if let Some(items) = flat {
        for item in items {
            if let (Some(name), Some(point)) = (item["name"].as_str(), point(item)) {
                curves.entry(name.to_owned()).or_default().push(point);
            }
        }
        return curves;
    }
    let named = answer["series"].as_object().or_else(|| answer.as_object());
    for (name, points) in named.into_iter().flatten() {
        let points = points
            .as_array()
            .or_else(|| points["points"].as_array())
            .into_iter()
            .flatten();
        let points: Vec<_> = points.filter_map(point).collect();
        if !points.is_empty() {
            curves.insert(name.clone(), points);
        }
    }
    curves
}

/// The last value of every curve.
fn latest(series: &BTreeMap<String, Vec<(u64, f64)>>) -> BTreeMap<String, f64> {
    series
        .iter()
        .filter_map(|(name, points)| Some((name.clone(), points.last()?.1)))
        .collect()
}

/// Waits until the registry holds a version of `name` made by `job_id`.
async fn wait_for_version(run: &Run, name: &str, job_id: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + REGISTRATION_PATIENCE;
    let path = format!("/v1/registry/resolve/{name}");
    loop {
        if let Some(version) = run.client().get_optional(&path).await?
            && version["source_job_id"].as_str() == Some(job_id)
        {
            return Ok(version);
        }
        if Instant::now() > deadline {
            bail!(
                "job {job_id} succeeded but no version of `{name}` from it was registered within {} s",
                REGISTRATION_PATIENCE.as_secs()
            );
        }
        tokio::time::sleep(run.poll_interval()).await;
    }
}

/// `name:number` of a registry version.
pub fn version_label(version: &Value) -> String {
    let name = version["model_name"].as_str().unwrap_or("?");
    match version["number"].as_u64() {
        Some(number) => format!("{name}:{number}"),
        None => name.to_owned(),
    }
}

/// The registered version's metrics, over the job's last reported ones.
fn final_metrics(job: &Value, version: &Value) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    for source in [
        &job["last_metrics"],
        &job["final_metrics"],
        &version["metrics"],
    ] {
        for (name, value) in source.as_object().into_iter().flatten() {
            if let Some(number) = value.as_f64().or_else(|| value["value"].as_f64()) {
                metrics.insert(name.clone(), number);
            }
        }
    }
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_flat_metric_answers_read_the_same() {
        let named =
            json!({"series": {"loss": [{"step": 1, "value": 3.5}, {"step": 2, "value": 3.0}]}});
        let flat = json!({"data": [
            {"name": "loss", "step": 1, "value": 3.5},
            {"name": "loss", "step": 2, "value": 3.0}
        ]});
        let expected = BTreeMap::from([("loss".to_owned(), vec![(1, 3.5), (2, 3.0)])]);
        assert_eq!(parse_series(&named), expected);
        assert_eq!(parse_series(&flat), expected);
    }

    #[test]
    fn progress_falls_back_to_the_planned_steps() {
        let job =
            json!({"progress": {"step": 7}, "spec": {"hyper_parameters": {"total_steps": 20}}});
        assert_eq!(job_progress(&job), (7, Some(20)));
    }
}
