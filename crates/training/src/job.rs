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
use crate::pretrain::{Metrics, PretrainConfig, PretrainError, Pretrainer};
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
    let total_steps = match kind {
        JobKind::Tokenizer => return parse::<TokenizerJobConfig>(hyper_parameters)?.check(),
        JobKind::Pretrain => {
            let config = parse::<PretrainJobConfig>(hyper_parameters)?;
            config.check()?;
            config.run.total_steps
        }
        JobKind::Sft | JobKind::Lora | JobKind::Qlora => {
            let config = parse::<SftConfig>(hyper_parameters)?;
            crate::sft_job::check(&config).map_err(|(name, message)| field(name, message))?;
            config.total_steps
        }
        JobKind::Reward | JobKind::Ppo | JobKind::Grpo => return Err(unsupported(kind)),
    };
    check_warmup(hyper_parameters, total_steps)
}

/// A warmup the spec asks for must fit in the run. The default warmup is only cut short by a
/// short run (the schedule handles that), so only an explicit `warmup_steps` is held to it.
fn check_warmup(
    hyper_parameters: &serde_json::Value,
    total_steps: usize,
) -> Result<(), FieldError> {
    match hyper_parameters
        .get("warmup_steps")
        .and_then(|v| v.as_u64())
    {
        Some(warmup) if warmup > total_steps as u64 => Err(field(
            "warmup_steps",
            format!("must be at most total_steps ({total_steps})"),
        )),
        _ => Ok(()),
    }
}

/// Most dataset references one job may name.
pub const MAX_DATASETS: usize = 16;

/// Checks a job's inputs as the registries resolved them, before anything is downloaded:
/// whether a base model is needed and of which kind (`base_model` is the base version's
/// registry kind, e.g. `model` or `adapter`), and the kind and role of every dataset
/// (`datasets` holds each dataset's registry kind and role, in the spec's order). Errors name
/// `base_model` or `datasets[i]`, the way the spec spells them.
pub fn check_inputs(
    kind: JobKind,
    base_model: Option<&str>,
    datasets: &[(&str, DatasetRole)],
) -> Result<(), FieldError> {
    let (bases, readable): (&[&str], &[&str]) = match kind {
        JobKind::Tokenizer => (&[], &["text"]),
        // The base of a pretraining run is the folder holding its tokenizer: a tokenizer, or a
        // model saved with its tokenizer.
        JobKind::Pretrain => (&["tokenizer", "model"], &["text"]),
        // Fine-tuning loads the base's weights and tokenizer; an adapter holds neither.
        JobKind::Sft | JobKind::Lora | JobKind::Qlora => (&["model"], &crate::sft_job::KINDS),
        JobKind::Reward | JobKind::Ppo | JobKind::Grpo => return Err(unsupported(kind)),
    };
    check_base(kind, bases, base_model)?;
    if datasets.len() > MAX_DATASETS {
        return Err(FieldError {
            field: "datasets".into(),
            message: format!("a job names at most {MAX_DATASETS} datasets"),
        });
    }
    // Tokenizer and pretraining jobs read one text and hold out their own evaluation data;
    // fine-tuning reads one train set and at most one eval set.
    let eval_allowed = usize::from(kind != JobKind::Tokenizer && kind != JobKind::Pretrain);
    let mut counts = [0usize; 2];
    for (index, &(dataset_kind, role)) in datasets.iter().enumerate() {
        let at = |message: String| FieldError {
            field: format!("datasets[{index}]"),
            message,
        };
        if !readable.contains(&dataset_kind) {
            return Err(at(format!(
                "is a `{dataset_kind}` dataset; a `{kind}` job reads {}",
                readable.join(" or ")
            )));
        }
        let (slot, limit) = match role {
            DatasetRole::Train => (0, 1),
            DatasetRole::Eval => (1, eval_allowed),
        };
        counts[slot] += 1;
        if counts[slot] > limit {
            return Err(at(format!(
                "a `{kind}` job takes at most {limit} {role:?} dataset(s)"
            )));
        }
    }
    if counts[0] == 0 {
        return Err(FieldError {
            field: "datasets".into(),
            message: format!("a `{kind}` job needs exactly one train dataset"),
        });
    }
    Ok(())
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
            crate::sft_job::check(&config)
                .map_err(|(name, message)| invalid(field(name, message)))?;
            crate::sft_job::run_sft(kind, config, inputs, observer)
        }
        other => Err(JobError::Unsupported(other)),
    }
}

/// A job that reads a base (`bases` names the registry kinds it can start from) needs one of
/// those kinds; an adapter given where a model belongs would otherwise fail only once the
/// worker opened it. A job that reads none (`bases` empty) takes none: the worker would
/// download a base it never opens, and the output's lineage would name it as its parent.
fn check_base(kind: JobKind, bases: &[&str], base_model: Option<&str>) -> Result<(), FieldError> {
    let base_error = |message| FieldError {
        field: "base_model".into(),
        message,
    };
    match base_model {
        None if bases.is_empty() => Ok(()),
        Some(_) if bases.is_empty() => Err(base_error(format!(
            "cannot be the base of a `{kind}` job, which starts from its datasets alone; \
             leave base_model out"
        ))),
        None => Err(base_error(format!("a `{kind}` job needs a base model"))),
        Some(base) if bases.contains(&base) => Ok(()),
        Some(base) => {
            let wanted = bases.iter().map(|b| format!("`{b}`")).collect::<Vec<_>>();
            let hint = if base == "adapter" {
                " (an adapter holds only its low-rank weights; start from the model it adapts)"
            } else {
                ""
            };
            Err(base_error(format!(
                "is a version of kind `{base}`; a `{kind}` job starts from one of kind {}{hint}",
                wanted.join(" or ")
            )))
        }
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
    // Absent or null means every default; anything but an object is a mistake (serde would
    // read an array as a struct's fields in order).
    let value = match value {
        serde_json::Value::Null => serde_json::json!({}),
        serde_json::Value::Object(_) => value.clone(),
        _ => {
            return Err(FieldError {
                field: "hyper_parameters".into(),
                message: "must be a JSON object".into(),
            });
        }
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

/// Refuses to go on once a loss is NaN or infinite: every later step and the artifact would be
/// too, and the same seed diverges the same way again, so the job fails for good rather than
/// registering a broken model.
pub(crate) fn check_finite(what: &str, value: f64, step: usize) -> Result<(), JobError> {
    if value.is_finite() {
        return Ok(());
    }
    let hint = if step == 0 {
        "the base model's weights are not finite"
    } else {
        "training diverged; a lower lr or max_grad_norm may help"
    };
    Err(JobError::Invalid(format!(
        "the {what} is {value} at step {step}: {hint}"
    )))
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
    .map_err(|error| match error {
        // Too little data or a bad setting will not improve on another attempt.
        PretrainError::Data(_) | PretrainError::Invalid(_) => JobError::Invalid(error.to_string()),
        other => failed(&other),
    })?;

    let total = trainer.config().total_steps;
    let interval = if config.checkpoint_interval == 0 {
        total
    } else {
        config.checkpoint_interval
    };
    let mut last_eval = f64::NAN;
    let mut last_loss = 0.0;
    while trainer.step_count() < total {
        if observer.should_stop() {
            return Err(JobError::Stopped);
        }
        let target = (trainer.step_count() + 1).min(total);
        trainer.run_until(target, &mut |metrics| {
            if let Metrics::Train(train) = metrics {
                last_loss = train.loss;
            }
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
        check_finite("training loss", last_loss, step)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use DatasetRole::{Eval, Train};

    fn field_of(result: Result<(), FieldError>) -> String {
        result.expect_err("refused").field
    }

    #[test]
    fn inputs_a_job_can_run_pass() {
        assert_eq!(
            check_inputs(JobKind::Tokenizer, None, &[("text", Train)]),
            Ok(())
        );
        assert_eq!(
            check_inputs(JobKind::Pretrain, Some("tokenizer"), &[("text", Train)]),
            Ok(())
        );
        let chats = [("chat", Train), ("sft", Eval)];
        assert_eq!(check_inputs(JobKind::Qlora, Some("model"), &chats), Ok(()));
    }

    #[test]
    fn inputs_that_cannot_run_name_their_field() {
        // Every fine-tuning kind and pretraining load their tokenizer from the base model.
        for kind in [
            JobKind::Pretrain,
            JobKind::Sft,
            JobKind::Lora,
            JobKind::Qlora,
        ] {
            let dataset = if kind == JobKind::Pretrain {
                "text"
            } else {
                "sft"
            };
            assert_eq!(
                field_of(check_inputs(kind, None, &[(dataset, Train)])),
                "base_model"
            );
        }
        // Wrong kinds: the first dataset is the offender.
        assert_eq!(
            field_of(check_inputs(JobKind::Tokenizer, None, &[("sft", Train)])),
            "datasets[0]"
        );
        assert_eq!(
            field_of(check_inputs(
                JobKind::Sft,
                Some("model"),
                &[("text", Train)]
            )),
            "datasets[0]"
        );
        // Counts: the second train dataset is one too many; an eval-only job has no train set;
        // a tokenizer holds out its own evaluation text.
        let two = [("text", Train), ("text", Train)];
        assert_eq!(
            field_of(check_inputs(JobKind::Tokenizer, None, &two)),
            "datasets[1]"
        );
        assert_eq!(
            field_of(check_inputs(JobKind::Sft, Some("model"), &[("chat", Eval)])),
            "datasets"
        );
        let with_eval = [("text", Train), ("text", Eval)];
        assert_eq!(
            field_of(check_inputs(JobKind::Pretrain, Some("model"), &with_eval)),
            "datasets[1]"
        );
        let two_evals = [("chat", Train), ("chat", Eval), ("chat", Eval)];
        assert_eq!(
            field_of(check_inputs(JobKind::Lora, Some("model"), &two_evals)),
            "datasets[2]"
        );
    }

    #[test]
    fn a_base_of_a_kind_the_job_cannot_start_from_is_refused() {
        // Regression: an adapter as an SFT base was accepted and failed only in the worker,
        // which found no tokenizer.json in it. No job starts from an adapter, and fine-tuning
        // needs a whole model, not a tokenizer alone.
        let chats = [("chat", Train)];
        for (kind, base, datasets) in [
            (JobKind::Sft, "adapter", &chats[..]),
            (JobKind::Lora, "adapter", &chats[..]),
            (JobKind::Qlora, "tokenizer", &chats[..]),
            (JobKind::Pretrain, "adapter", &[("text", Train)][..]),
        ] {
            let error = check_inputs(kind, Some(base), datasets).expect_err("refused");
            assert_eq!(error.field, "base_model", "{kind} on {base}");
            assert!(error.message.contains(base), "{}", error.message);
        }
    }

    #[test]
    fn a_tokenizer_job_refuses_any_base() {
        // Regression: a tokenizer job named an adapter as its base and was accepted; the worker
        // downloaded it for nothing and the tokenizer's lineage named it as the parent. A
        // tokenizer trains from its text alone, so every kind of base is refused.
        for base in ["adapter", "model", "tokenizer"] {
            let error = check_inputs(JobKind::Tokenizer, Some(base), &[("text", Train)])
                .expect_err("refused");
            assert_eq!(error.field, "base_model", "{base}");
            assert!(
                error.message.contains("leave base_model out"),
                "{}",
                error.message
            );
        }
    }

    #[test]
    fn hyper_parameters_that_are_not_an_object_are_refused() {
        // null means every default; an array would otherwise be read as fields in order.
        assert_eq!(validate(JobKind::Sft, &serde_json::Value::Null), Ok(()));
        for kind in [JobKind::Tokenizer, JobKind::Pretrain, JobKind::Sft] {
            assert_eq!(
                field_of(validate(kind, &serde_json::json!([]))),
                "hyper_parameters"
            );
        }
    }

    #[test]
    fn absurd_hyper_parameters_are_refused_by_name() {
        use serde_json::json;
        // Each value is the tester's, far past the caps (4096 rows, 131072 tokens, 2^20
        // tokens a step, lr 1, 1..=1024 threads).
        let cases = [
            (
                JobKind::Pretrain,
                json!({"batch_size": 1_000_000_000u64}),
                "batch_size",
            ),
            (
                JobKind::Pretrain,
                json!({"sequence_length": 1_000_000_000u64}),
                "sequence_length",
            ),
            (JobKind::Pretrain, json!({"peak_lr": 1e300}), "peak_lr"),
            (JobKind::Pretrain, json!({"threads": 0}), "threads"),
            (JobKind::Pretrain, json!({"threads": 100_000}), "threads"),
            (
                JobKind::Pretrain,
                json!({"total_steps": 10, "warmup_steps": 11}),
                "warmup_steps",
            ),
            (
                JobKind::Sft,
                json!({"batch_size": 100_000_000u64}),
                "batch_size",
            ),
            (
                JobKind::Sft,
                json!({"max_length": 10_000_000_000u64}),
                "max_length",
            ),
            (JobKind::Sft, json!({"lr": 1e300}), "lr"),
            (JobKind::Lora, json!({"threads": 0}), "threads"),
            (
                JobKind::Qlora,
                json!({"total_steps": 5, "warmup_steps": 6}),
                "warmup_steps",
            ),
            // 2048 rows of 1024 tokens: each under its own cap, 2^21 tokens together.
            (
                JobKind::Sft,
                json!({"batch_size": 2048, "max_length": 1024}),
                "batch_size",
            ),
        ];
        for (kind, hyper_parameters, name) in cases {
            assert_eq!(
                field_of(validate(kind, &hyper_parameters)),
                format!("hyper_parameters.{name}"),
                "{kind} {hyper_parameters}"
            );
        }
        // The default warmup (50 pretraining steps) is only cut short by a short run.
        assert_eq!(
            validate(JobKind::Pretrain, &json!({"total_steps": 6})),
            Ok(())
        );
    }
}
