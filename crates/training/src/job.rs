//! One training job as a worker runs it.
//!
//! This is the seam between the training runner (queue, lease, storage, metrics table) and the
//! trainers: a job is a [`JobKind`], hyper-parameters as JSON, inputs already on the local disk,
//! and a [`JobObserver`] that receives metrics and finished checkpoints and can ask the run to
//! stop. The runner validates hyper-parameters with [`validate`] when a job is submitted, so a
//! bad value is a 4xx at the API and never a failed attempt.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ferrite_model::ModelConfig;
use ferrite_model::tokenizer::{Tokenizer, TrainConfig};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::data;
use crate::pretrain::{Metrics, PretrainConfig, Pretrainer};
use crate::sft::SftConfig;

/// What a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A byte-level BPE tokenizer trained on a text dataset; the artifact holds only it.
    Tokenizer,
    /// Next-token pretraining of a freshly initialised model.
    Pretrain,
    /// Supervised fine-tuning of every weight.
    Sft,
    /// SFT of a LoRA adapter over a frozen base.
    Lora,
    /// SFT of a LoRA adapter over a frozen NF4 base.
    Qlora,
    /// A scalar reward model from preference pairs or rankings.
    Reward,
    /// RLHF with PPO against a reward model.
    Ppo,
    /// GRPO with verifiable rewards.
    Grpo,
}

impl JobKind {
    /// Every kind, in pipeline order.
    pub const ALL: [JobKind; 8] = [
        JobKind::Tokenizer,
        JobKind::Pretrain,
        JobKind::Sft,
        JobKind::Lora,
        JobKind::Qlora,
        JobKind::Reward,
        JobKind::Ppo,
        JobKind::Grpo,
    ];

    /// The lower-case name used in specs, events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Tokenizer => "tokenizer",
            JobKind::Pretrain => "pretrain",
            JobKind::Sft => "sft",
            JobKind::Lora => "lora",
            JobKind::Qlora => "qlora",
            JobKind::Reward => "reward",
            JobKind::Ppo => "ppo",
            JobKind::Grpo => "grpo",
        }
    }

    /// Whether the artifact is an adapter over the base model rather than a whole model.
    pub fn produces_adapter(self) -> bool {
        matches!(self, JobKind::Lora | JobKind::Qlora)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<_> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown job kind `{name}`; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// A dataset version, downloaded to the worker's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInput {
    /// The dataset registry's version id, for lineage and logs.
    pub version_id: String,
    /// The registry's dataset kind: `text`, `sft`, `chat`, `preference`, `ranking`, `prompts`.
    pub kind: String,
    /// `train` or `eval`; a job without an `eval` dataset holds out part of its train data.
    pub role: DatasetRole,
    /// The file: JSON Lines for structured kinds, UTF-8 text for `text`.
    pub path: PathBuf,
}

/// What a dataset is for within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DatasetRole {
    #[default]
    Train,
    Eval,
}

/// Everything a job reads and where it writes, all on the local disk.
#[derive(Debug, Clone)]
pub struct JobInputs {
    /// The base model's Hugging Face folder (for `pretrain`, a folder holding the tokenizer).
    pub base_model: Option<PathBuf>,
    pub datasets: Vec<DatasetInput>,
    /// An empty folder for the final artifact.
    pub output_dir: PathBuf,
    /// A folder for checkpoints; each is written to a fresh sub-folder.
    pub checkpoint_dir: PathBuf,
    /// The last checkpoint of an earlier attempt, to continue from.
    pub resume_from: Option<PathBuf>,
    pub device: Device,
}

/// The worker side of a running job.
pub trait JobObserver {
    /// Measurements after a step; `values` use the names the metrics API serves
    /// (`loss`, `lr`, `grad_norm`, `tokens_per_second`, `eval_loss`, ...).
    fn metrics(&mut self, step: u64, total_steps: u64, values: &BTreeMap<String, f64>);
    /// A complete checkpoint of `step` is on disk at `dir`; the runner uploads it before the
    /// call returns. An error stops the run.
    fn checkpoint(&mut self, step: u64, dir: &Path) -> Result<(), String>;
    /// True once the job was cancelled or its lease lost; the trainer stops at the next step.
    fn should_stop(&mut self) -> bool;
}

/// What a finished job leaves behind.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    /// `JobInputs::output_dir`, now holding a model folder, an adapter folder or a tokenizer.
    pub artifact_dir: PathBuf,
    /// Metrics to record on the registered version (`eval_loss`, baselines, ...).
    pub final_metrics: BTreeMap<String, f64>,
    /// Optimizer steps done in total, over all attempts.
    pub steps: u64,
}

/// Why a job did not finish.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A hyper-parameter or input is unusable; retrying will not help.
    #[error("{0}")]
    Invalid(String),
    /// The run stopped because [`JobObserver::should_stop`] said so.
    #[error("stopped before the end")]
    Stopped,
    /// The kind has no trainer yet.
    #[error("job kind `{0}` is not available in this version of Ferrite")]
    Unsupported(JobKind),
    /// Anything else (I/O, checkpoint files); another attempt may succeed.
    #[error("{0}")]
    Failed(String),
}

/// A problem with one hyper-parameter, named by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Checks `hyper_parameters` for `kind` without running anything.
pub fn validate(kind: JobKind, hyper_parameters: &serde_json::Value) -> Result<(), FieldError> {
    match kind {
        JobKind::Tokenizer => parse::<TokenizerJobConfig>(hyper_parameters)?.check(),
        JobKind::Pretrain => parse::<PretrainJobConfig>(hyper_parameters)?.check(),
        JobKind::Sft | JobKind::Lora | JobKind::Qlora => parse::<SftConfig>(hyper_parameters)?
            .check()
            .map_err(|(name, message)| field(name, message)),
        JobKind::Reward | JobKind::Ppo | JobKind::Grpo => Err(unsupported(kind)),
    }
}

/// Runs `kind` to the end, or until the observer asks it to stop.
pub fn run(
    kind: JobKind,
    hyper_parameters: &serde_json::Value,
    inputs: &JobInputs,
    observer: &mut dyn JobObserver,
) -> Result<JobOutput, JobError> {
    let invalid =
        |error: FieldError| JobError::Invalid(format!("{}: {}", error.field, error.message));
    match kind {
        JobKind::Tokenizer => {
            let config = parse::<TokenizerJobConfig>(hyper_parameters).map_err(invalid)?;
            run_tokenizer(&config, inputs)
        }
        JobKind::Pretrain => {
            let config = parse::<PretrainJobConfig>(hyper_parameters).map_err(invalid)?;
            run_pretrain(&config, inputs, observer)
        }
        JobKind::Sft | JobKind::Lora | JobKind::Qlora => {
            let config = parse::<SftConfig>(hyper_parameters).map_err(invalid)?;
            config
                .check()
                .map_err(|(name, message)| invalid(field(name, message)))?;
            crate::sft_job::run_sft(kind, config, inputs, observer)
        }
        other => Err(JobError::Unsupported(other)),
    }
}

fn unsupported(kind: JobKind) -> FieldError {
    FieldError {
        field: "kind".into(),
        message: format!("job kind `{kind}` is not available in this version of Ferrite"),
    }
}

/// Deserialises hyper-parameters, naming the offending field on failure.
fn parse<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, FieldError> {
    let value = if value.is_null() {
        serde_json::json!({})
    } else {
        value.clone()
    };
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        // A flat config deserialised by hand reports `field: message` at the root.
        match message.split_once(": ") {
            Some((name, rest)) if path == "." && !name.contains(' ') && name != "." => {
                field(name, rest)
            }
            _ if path == "." => FieldError {
                field: "hyper_parameters".into(),
                message,
            },
            _ => field(&path, message),
        }
    })
}

pub(crate) fn field(name: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: format!("hyper_parameters.{name}"),
        message: message.into(),
    }
}

/// Hyper-parameters of a `tokenizer` job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerJobConfig {
    pub vocab_size: usize,
    /// Use at most this many bytes of the corpus; 0 means all of it.
    pub max_bytes: usize,
}

impl Default for TokenizerJobConfig {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            max_bytes: 0,
        }
    }
}

impl TokenizerJobConfig {
    fn check(&self) -> Result<(), FieldError> {
        if !(256..=1 << 20).contains(&self.vocab_size) {
            return Err(field("vocab_size", "must lie in 256..=1048576"));
        }
        Ok(())
    }
}

/// Hyper-parameters of a `pretrain` job: a model preset and the pretraining run, in one flat
/// object (`{"preset": "tiny", "total_steps": 200, "peak_lr": 2e-3}`).
#[derive(Debug, Clone)]
pub struct PretrainJobConfig {
    /// Model preset: `tiny`, `small`, `gpt2`, `medium`.
    pub preset: String,
    /// Use at most this many bytes of the corpus; 0 means all of it.
    pub max_bytes: usize,
    /// Write a checkpoint every this many steps (and at the end); 0 only at the end.
    pub checkpoint_interval: usize,
    /// Every other key: the fields of [`PretrainConfig`].
    pub run: PretrainConfig,
}

/// The job-level keys, kept apart from the run's because serde cannot both flatten a struct
/// and refuse unknown keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PretrainJobKeys {
    preset: String,
    max_bytes: usize,
    checkpoint_interval: usize,
}

impl Default for PretrainJobKeys {
    fn default() -> Self {
        Self {
            preset: "small".into(),
            max_bytes: 0,
            checkpoint_interval: 100,
        }
    }
}

impl<'de> Deserialize<'de> for PretrainJobConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut map = serde_json::Map::deserialize(deserializer)?;
        let keys: serde_json::Map<_, _> = ["preset", "max_bytes", "checkpoint_interval"]
            .into_iter()
            .filter_map(|key| map.remove_entry(key))
            .collect();
        // Inner errors keep their own field name: `batch_size: invalid type ...`.
        let named = |error: serde_path_to_error::Error<serde_json::Error>| {
            D::Error::custom(format!("{}: {}", error.path(), error.inner()))
        };
        let job: PretrainJobKeys =
            serde_path_to_error::deserialize(serde_json::Value::from(keys)).map_err(named)?;
        let run: PretrainConfig =
            serde_path_to_error::deserialize(serde_json::Value::from(map)).map_err(named)?;
        Ok(Self {
            preset: job.preset,
            max_bytes: job.max_bytes,
            checkpoint_interval: job.checkpoint_interval,
            run,
        })
    }
}

impl PretrainJobConfig {
    fn check(&self) -> Result<(), FieldError> {
        ModelConfig::preset(&self.preset).map_err(|error| field("preset", error.to_string()))?;
        self.run
            .check()
            .map_err(|(name, message)| field(name, message))
    }
}

/// The one dataset of `role`, or an error naming what is missing.
fn single_dataset<'a>(inputs: &'a JobInputs, kind: &str) -> Result<&'a DatasetInput, JobError> {
    let mut train = inputs
        .datasets
        .iter()
        .filter(|dataset| dataset.role == DatasetRole::Train);
    match (train.next(), train.next()) {
        (Some(dataset), None) if dataset.kind == kind => Ok(dataset),
        (Some(dataset), None) => Err(JobError::Invalid(format!(
            "dataset {} is of kind `{}`; this job needs `{kind}`",
            dataset.version_id, dataset.kind
        ))),
        _ => Err(JobError::Invalid(format!(
            "this job needs exactly one train dataset of kind `{kind}`"
        ))),
    }
}

fn read_corpus(dataset: &DatasetInput, max_bytes: usize) -> Result<String, JobError> {
    let mut text = std::fs::read_to_string(&dataset.path).map_err(|error| {
        JobError::Failed(format!("cannot read {}: {error}", dataset.path.display()))
    })?;
    if max_bytes > 0 && text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    Ok(text)
}

fn run_tokenizer(config: &TokenizerJobConfig, inputs: &JobInputs) -> Result<JobOutput, JobError> {
    let corpus = read_corpus(single_dataset(inputs, "text")?, config.max_bytes)?;
    let train = TrainConfig {
        vocab_size: config.vocab_size,
        ..TrainConfig::default()
    };
    let tokenizer = Tokenizer::train(&train, corpus.lines())
        .map_err(|error| JobError::Failed(format!("tokenizer training failed: {error}")))?;
    tokenizer
        .save(&inputs.output_dir)
        .map_err(|error| JobError::Failed(error.to_string()))?;
    let tokens: usize = corpus
        .split("\n\n")
        .map(|paragraph| {
            tokenizer
                .encode(paragraph, false)
                .map_or(0, |ids| ids.len())
        })
        .sum();
    let metrics = BTreeMap::from([
        ("vocab_size".to_owned(), tokenizer.vocab_size() as f64),
        (
            "bytes_per_token".to_owned(),
            corpus.len() as f64 / tokens.max(1) as f64,
        ),
    ]);
    Ok(JobOutput {
        artifact_dir: inputs.output_dir.clone(),
        final_metrics: metrics,
        steps: 0,
    })
}

fn run_pretrain(
    config: &PretrainJobConfig,
    inputs: &JobInputs,
    observer: &mut dyn JobObserver,
) -> Result<JobOutput, JobError> {
    let failed = |error: &dyn fmt::Display| JobError::Failed(error.to_string());
    let base = inputs.base_model.as_ref().ok_or_else(|| {
        JobError::Invalid("pretraining needs a base model folder holding the tokenizer".into())
    })?;
    let tokenizer = Tokenizer::load(base).map_err(|error| failed(&error))?;
    let corpus = read_corpus(single_dataset(inputs, "text")?, config.max_bytes)?;
    let mut tokens = Vec::new();
    for paragraph in corpus.split("\n\n") {
        tokens.extend(
            tokenizer
                .encode(paragraph, false)
                .map_err(|error| failed(&error))?,
        );
        tokens.push(tokenizer.eos_id());
    }
    let (train, held_out) = data::split_held_out_blocks(&tokens, 4096, 50);
    let unigram = data::unigram_cross_entropy(&train, &held_out, tokenizer.vocab_size());
    let model_config = ModelConfig::preset(&config.preset)
        .map_err(|error| JobError::Invalid(error.to_string()))?
        .with_vocab_size(tokenizer.vocab_size() as i64)
        .with_special_tokens(tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id());

    let mut trainer = match &inputs.resume_from {
        Some(dir) => Pretrainer::resume(dir, train, &held_out, inputs.device),
        None => Pretrainer::new(
            model_config,
            config.run.clone(),
            train,
            &held_out,
            inputs.device,
        ),
    }
    .map_err(|error| failed(&error))?;

    let total = trainer.config().total_steps;
    let interval = if config.checkpoint_interval == 0 {
        total
    } else {
        config.checkpoint_interval
    };
    let mut last_eval = f64::NAN;
    while trainer.step_count() < total {
        if observer.should_stop() {
            return Err(JobError::Stopped);
        }
        let target = (trainer.step_count() + 1).min(total);
        trainer.run_until(target, &mut |metrics| {
            let (step, values) = match metrics {
                Metrics::Train(train) => (
                    train.step,
                    BTreeMap::from([
                        ("loss".to_owned(), train.loss),
                        ("lr".to_owned(), train.lr),
                        ("grad_norm".to_owned(), train.grad_norm),
                        ("tokens_per_second".to_owned(), train.tokens_per_second),
                        ("tokens_seen".to_owned(), train.tokens_seen as f64),
                    ]),
                ),
                Metrics::Eval(eval) => {
                    last_eval = eval.loss;
                    (
                        eval.step,
                        BTreeMap::from([
                            ("eval_loss".to_owned(), eval.loss),
                            ("eval_perplexity".to_owned(), eval.perplexity),
                        ]),
                    )
                }
            };
            observer.metrics(step as u64, total as u64, &values);
        });
        let step = trainer.step_count();
        if step.is_multiple_of(interval) && step < total {
            let dir = inputs.checkpoint_dir.join(format!("step-{step:08}"));
            trainer
                .save(&dir, Some(&tokenizer))
                .map_err(|error| failed(&error))?;
            observer
                .checkpoint(step as u64, &dir)
                .map_err(JobError::Failed)?;
        }
    }
    trainer
        .save(&inputs.output_dir, Some(&tokenizer))
        .map_err(|error| failed(&error))?;
    Ok(JobOutput {
        artifact_dir: inputs.output_dir.clone(),
        final_metrics: BTreeMap::from([
            ("eval_loss".to_owned(), last_eval),
            ("unigram_baseline_loss".to_owned(), unigram),
            ("steps".to_owned(), total as f64),
        ]),
        steps: total as u64,
    })
}
