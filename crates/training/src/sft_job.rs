//! `sft`, `lora` and `qlora` jobs: read the conversations, build or resume the trainer, run
//! it under the observer, and write a model folder or a PEFT adapter folder.

use std::collections::BTreeMap;
use std::path::Path;

use ferrite_model::tokenizer::Tokenizer;

use crate::job::{
    self, DatasetInput, DatasetRole, JobError, JobInputs, JobKind, JobObserver, JobOutput,
};
use crate::sft::{self, Method, SftConfig, SftData, SftTrainer};
use crate::sft_data::{self, Example};

/// Dataset kinds a fine-tuning job reads.
pub(crate) const KINDS: [&str; 2] = ["sft", "chat"];

/// Largest conversations per step, tokens per conversation and tokens per step: far above
/// what the presets train with, far below what would exhaust a worker's memory before the
/// first step (a batch of 1e8 once asked a worker for terabytes).
const MAX_BATCH_SIZE: usize = 4096;
const MAX_LENGTH: usize = 131_072;
const MAX_TOKENS_PER_STEP: usize = 1 << 20;
/// No useful learning rate reaches 1; a larger one only produces NaNs.
const MAX_LR: f64 = 1.0;
/// Threads libtorch may be given.
const MAX_THREADS: i32 = 1024;

/// [`SftConfig::check`] plus upper bounds, as (field, what is wrong).
pub(crate) fn check(config: &SftConfig) -> Result<(), (&'static str, &'static str)> {
    config.check()?;
    if config.batch_size > MAX_BATCH_SIZE {
        return Err(("batch_size", "must be at most 4096"));
    }
    if config.max_length > MAX_LENGTH {
        return Err(("max_length", "must be at most 131072"));
    }
    if config.batch_size * config.max_length > MAX_TOKENS_PER_STEP {
        return Err(("batch_size", "times max_length must be at most 1048576"));
    }
    if config.lr > MAX_LR {
        return Err(("lr", "must be at most 1"));
    }
    if config
        .threads
        .is_some_and(|threads| !(1..=MAX_THREADS).contains(&threads))
    {
        return Err(("threads", "must lie in 1..=1024 when set"));
    }
    Ok(())
}

fn method_of(kind: JobKind) -> Method {
    match kind {
        JobKind::Lora => Method::Lora,
        JobKind::Qlora => Method::Qlora,
        _ => Method::Full,
    }
}

/// The one dataset of `role`, which must be of a kind fine-tuning reads.
fn dataset(inputs: &JobInputs, role: DatasetRole) -> Result<Option<&DatasetInput>, JobError> {
    let mut matching = inputs
        .datasets
        .iter()
        .filter(|dataset| dataset.role == role);
    let (first, second) = (matching.next(), matching.next());
    if second.is_some() {
        return Err(JobError::Invalid(format!(
            "fine-tuning takes at most one {role:?} dataset"
        )));
    }
    if let Some(dataset) = first
        && !KINDS.contains(&dataset.kind.as_str())
    {
        return Err(JobError::Invalid(format!(
            "dataset {} is of kind `{}`; fine-tuning needs `sft` or `chat`",
            dataset.version_id, dataset.kind
        )));
    }
    Ok(first)
}

/// Reads and tokenises a dataset file; errors name the file, the line or record, and the field.
fn examples(
    dataset: &DatasetInput,
    tokenizer: &Tokenizer,
    max_length: usize,
) -> Result<Vec<Example>, JobError> {
    let text = std::fs::read_to_string(&dataset.path).map_err(|error| {
        JobError::Failed(format!("cannot read {}: {error}", dataset.path.display()))
    })?;
    let conversations = sft_data::parse_conversations(&text)
        .map_err(|error| JobError::Invalid(format!("dataset {}: {error}", dataset.version_id)))?;
    let mut examples = Vec::with_capacity(conversations.len());
    for messages in &conversations {
        let encoded = Example::encode(tokenizer, messages, max_length)
            .map_err(|error| JobError::Failed(error.to_string()))?;
        examples.extend(encoded);
    }
    if examples.is_empty() {
        return Err(JobError::Invalid(format!(
            "dataset {} has no conversation with an assistant reply within max_length",
            dataset.version_id
        )));
    }
    Ok(examples)
}

fn load_data(
    config: &SftConfig,
    inputs: &JobInputs,
    tokenizer: &Tokenizer,
) -> Result<SftData, JobError> {
    let train_input = dataset(inputs, DatasetRole::Train)?.ok_or_else(|| {
        JobError::Invalid("fine-tuning needs one train dataset of kind `sft` or `chat`".into())
    })?;
    let train = examples(train_input, tokenizer, config.max_length)?;
    match dataset(inputs, DatasetRole::Eval)? {
        Some(eval_input) => Ok(SftData {
            train,
            eval: examples(eval_input, tokenizer, config.max_length)?,
        }),
        None if train.len() < 2 => Err(JobError::Invalid(
            "with no eval dataset, the train dataset needs two or more conversations".into(),
        )),
        None => {
            let (train, eval) = sft::hold_out(train, config.eval_fraction, config.seed);
            Ok(SftData { train, eval })
        }
    }
}

/// Runs a fine-tuning job of `kind` to its end or until the observer stops it.
pub(crate) fn run_sft(
    kind: JobKind,
    config: SftConfig,
    inputs: &JobInputs,
    observer: &mut dyn JobObserver,
) -> Result<JobOutput, JobError> {
    let failed = |error: &dyn std::fmt::Display| JobError::Failed(error.to_string());
    // The base and the data are on local disk by now: a base that does not load, or a
    // trainer that refuses its settings, fails the same way on every attempt.
    let invalid = |error: &dyn std::fmt::Display| JobError::Invalid(error.to_string());
    let base = inputs.base_model.as_ref().ok_or_else(|| {
        JobError::Invalid("fine-tuning needs a base model (a folder with tokenizer.json)".into())
    })?;
    let base_name = base.display().to_string();
    if !base.join("tokenizer.json").exists() {
        return Err(JobError::Invalid(
            "the base model has no tokenizer.json: is it an adapter rather than a model?".into(),
        ));
    }
    let tokenizer = Tokenizer::load(base).map_err(|error| invalid(&error))?;
    let data = load_data(&config, inputs, &tokenizer)?;

    let mut trainer = match &inputs.resume_from {
        Some(dir) => SftTrainer::resume(dir, base, data, inputs.device),
        None => {
            let method = method_of(kind);
            let loaded =
                sft::load_base(base, method, inputs.device).map_err(|error| invalid(&error))?;
            SftTrainer::new(loaded, method, config, data)
        }
    }
    .map_err(|error| invalid(&error))?;
    job::check_finite(
        "held-out loss of the base model",
        trainer.base_eval_loss(),
        0,
    )?;

    let total = trainer.config().total_steps;
    let mut eval_loss = f64::NAN;
    while trainer.step_count() < total {
        if observer.should_stop() {
            return Err(JobError::Stopped);
        }
        let metrics = trainer.train_step();
        let step = metrics.step;
        job::check_finite("training loss", metrics.loss, step)?;
        observer.metrics(
            step as u64,
            total as u64,
            &BTreeMap::from([
                ("loss".to_owned(), metrics.loss),
                ("lr".to_owned(), metrics.lr),
                ("grad_norm".to_owned(), metrics.grad_norm),
                ("tokens_per_second".to_owned(), metrics.tokens_per_second),
                ("tokens_seen".to_owned(), metrics.tokens_seen as f64),
            ]),
        );
        let interval = trainer.config().eval_interval;
        if (interval > 0 && step.is_multiple_of(interval)) || step == total {
            eval_loss = trainer.evaluate();
            let values = BTreeMap::from([("eval_loss".to_owned(), eval_loss)]);
            observer.metrics(step as u64, total as u64, &values);
        }
        checkpoint_if_due(&trainer, inputs, observer, &base_name)?;
    }
    if eval_loss.is_nan() {
        eval_loss = trainer.evaluate();
    }
    trainer
        .save_output(&inputs.output_dir, &base_name)
        .map_err(|error| failed(&error))?;
    Ok(JobOutput {
        artifact_dir: inputs.output_dir.clone(),
        final_metrics: BTreeMap::from([
            ("eval_loss".to_owned(), eval_loss),
            ("base_eval_loss".to_owned(), trainer.base_eval_loss()),
            ("steps".to_owned(), total as f64),
            (
                "trainable_parameters".to_owned(),
                trainer.trainable_parameters() as f64,
            ),
        ]),
        steps: total as u64,
    })
}

fn checkpoint_if_due(
    trainer: &SftTrainer,
    inputs: &JobInputs,
    observer: &mut dyn JobObserver,
    base_name: &str,
) -> Result<(), JobError> {
    let step = trainer.step_count();
    let interval = trainer.config().checkpoint_interval;
    if interval == 0 || !step.is_multiple_of(interval) || step >= trainer.config().total_steps {
        return Ok(());
    }
    let dir = inputs.checkpoint_dir.join(format!("step-{step:08}"));
    trainer
        .save_checkpoint(&dir, base_name)
        .map_err(|error| JobError::Failed(error.to_string()))?;
    observer
        .checkpoint(step as u64, Path::new(&dir))
        .map_err(JobError::Failed)
}
