//! Supervised fine-tuning of a base model on conversations: every weight (`full`), a LoRA
//! adapter over the frozen base (`lora`), or a LoRA adapter over a frozen NF4 base
//! (`qlora`). Loss is next-token cross-entropy on the tokens the assistant wrote, averaged
//! over those tokens. Checkpoints hold the weights or the adapter, the AdamW moments, the step
//! and the data position; dropout is reseeded from the step, so a resumed run repeats the
//! same updates.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use ferrite_model::adapter::{self, AdapterError};
use ferrite_model::checkpoint::{self, Checkpoint, CheckpointError};
use ferrite_model::llama::{BlockInputs, ForwardOptions, Llama};
use ferrite_model::lora::{LoraAdapter, LoraConfig, TargetModules};
use ferrite_model::rng::Rng;
use ferrite_model::tokenizer::Tokenizer;
use ferrite_model::{ModelConfig, nf4};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor, nn};

use crate::adamw::{AdamW, AdamWConfig, AdamWError};
use crate::schedule::WarmupCosine;
use crate::sft_data::{self, Batch, Example, IGNORE};
use crate::state_file::{self, StateFileError};

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every weight.
    Full,
    /// A LoRA adapter; the base is frozen in f32.
    Lora,
    /// A LoRA adapter; the base is frozen in NF4.
    Qlora,
}

/// Target modules as written in a config: `"all-linear"` or a list of names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    One(String),
    Many(Vec<String>),
}

impl Targets {
    fn modules(&self) -> TargetModules {
        match self {
            Self::One(name) if name == "all-linear" => TargetModules::AllLinear,
            Self::One(name) => TargetModules::Names(vec![name.clone()]),
            Self::Many(names) => TargetModules::Names(names.clone()),
        }
    }
}

/// Hyper-parameters of a fine-tuning run, flat as a job spec gives them; keys left out take
/// their defaults and unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Conversations per optimizer step (or per packed group).
    pub batch_size: usize,
    /// Tokens per conversation; longer ones are cut.
    pub max_length: usize,
    /// Optimizer steps in the run.
    pub total_steps: usize,
    pub warmup_steps: usize,
    /// Learning rate after warmup.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    pub weight_decay: f64,
    /// Clip the joint gradient norm to this; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every this many steps (and at the end); 0 only at the end.
    pub eval_interval: usize,
    /// Write a checkpoint every this many steps; 0 never (the job still writes its output).
    pub checkpoint_interval: usize,
    /// Fraction of the train data held out when no eval dataset is given.
    pub eval_fraction: f64,
    /// Pack a batch's conversations into rows of `max_length` with attention kept inside each.
    pub packing: bool,
    /// Seeds the adapter's init, the data order, the held-out split and dropout.
    pub seed: u64,
    /// Threads libtorch may use; `None` leaves its default.
    pub threads: Option<i32>,
    /// LoRA rank (lora and qlora only).
    pub lora_r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// `"all-linear"` or module names such as `["q_proj", "v_proj"]`.
    pub target_modules: Targets,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Keep only each block's input between the forward and backward pass and run the block
    /// again in backward: about a third more compute for far less memory. Unset means on for
    /// qlora (as peft's `prepare_model_for_kbit_training` does) and off otherwise.
    pub gradient_checkpointing: Option<bool>,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            max_length: 512,
            total_steps: 200,
            warmup_steps: 10,
            lr: 2e-4,
            min_lr: 0.0,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            eval_interval: 50,
            checkpoint_interval: 100,
            eval_fraction: 0.05,
            packing: false,
            seed: 0,
            threads: None,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: Targets::Many(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            gradient_checkpointing: None,
        }
    }
}

impl SftConfig {
    /// The first out-of-range value, as (field, what is wrong).
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let sizes = [
            ("batch_size", self.batch_size),
            ("max_length", self.max_length),
            ("total_steps", self.total_steps),
        ];
        if let Some((name, _)) = sizes.into_iter().find(|&(_, size)| size == 0) {
            return Err((name, "must be positive"));
        }
        if self.max_length < 2 {
            return Err(("max_length", "must be at least 2"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(("lr", "must be positive and finite"));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(("min_lr", "must lie in [0, lr]"));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err(("weight_decay", "must be non-negative"));
        }
        if self
            .max_grad_norm
            .is_some_and(|norm| norm.is_nan() || norm <= 0.0)
        {
            return Err(("max_grad_norm", "must be positive when set"));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(("eval_fraction", "must lie in [0, 1)"));
        }
        if self.lora_r <= 0 {
            return Err(("lora_r", "must be positive"));
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            return Err(("lora_alpha", "must be positive and finite"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(("lora_dropout", "must lie in [0, 1)"));
        }
        if matches!(&self.target_modules, Targets::Many(names) if names.is_empty()) {
            return Err(("target_modules", "must name at least one module"));
        }
        Ok(())
    }

    /// The adapter these settings describe.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.target_modules.modules(),
            use_rslora: self.use_rslora,
        }
    }
}

/// Why fine-tuning could not start, checkpoint or resume.
#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Optimizer(#[from] AdamWError),
    /// The base folder has no tokenizer, or a hyper-parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The trainer state file could not be written or read.
    #[error("trainer state {path}: {problem}")]
    State { path: String, problem: String },
}

impl From<StateFileError> for SftError {
    fn from(error: StateFileError) -> Self {
        SftError::State {
            path: error.path,
            problem: error.problem,
        }
    }
}

/// Measurements of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    /// Mean cross-entropy (nats) per assistant token.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Real (non-padding) tokens through the model per second.
    pub tokens_per_second: f64,
    pub tokens_seen: u64,
}

/// Trainer state beyond weights and moments, stored as `trainer_state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    method: Method,
    step: usize,
    tokens_seen: u64,
    epoch: u64,
    cursor: usize,
    base_eval_loss: f64,
    config: SftConfig,
}

const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Conversations in a shuffled order, reshuffled every epoch from `seed` and the epoch number,
/// so `(epoch, cursor)` is the whole data position.
#[derive(Debug)]
struct EpochOrder {
    seed: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
}

impl EpochOrder {
    fn new(len: usize, seed: u64, epoch: u64, cursor: usize) -> Self {
        Self {
            seed,
            epoch,
            cursor,
            order: shuffled(len, seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    fn take(&mut self, count: usize) -> Vec<usize> {
        let mut picked = Vec::with_capacity(count);
        while picked.len() < count && !self.order.is_empty() {
            if self.cursor == self.order.len() {
                *self = Self::new(self.order.len(), self.seed, self.epoch + 1, 0);
            }
            picked.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        picked
    }
}

/// `0..len` in a Fisher-Yates order drawn from `seed`.
pub fn shuffled(len: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::seed(seed);
    let mut order: Vec<usize> = (0..len).collect();
    for index in (1..len).rev() {
        let other = rng.below(index as u64 + 1) as usize;
        order.swap(index, other);
    }
    order
}

/// Splits conversations into train and held-out parts: a seeded `fraction`, at least one.
pub fn hold_out<T>(items: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let held = ((items.len() as f64 * fraction).round() as usize).clamp(1, items.len().max(1));
    let picked: std::collections::HashSet<usize> = shuffled(items.len(), seed ^ 0x4e1d_u64)
        .into_iter()
        .take(held)
        .collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (index, item) in items.into_iter().enumerate() {
        if picked.contains(&index) {
            eval.push(item);
        } else {
            train.push(item);
        }
    }
    (train, eval)
}

/// Which projections QLoRA stores in NF4: every linear layer of the blocks, targeted by the
/// adapter or not (the output head and embeddings stay in f32, as in the paper).
fn quantised_in_qlora(name: &str) -> bool {
    TargetModules::AllLinear.matches(name)
}

/// Loads the base model in `dir` as `method` trains it: for qlora its projections are
/// quantised to NF4 as they are read, so the f32 base is never whole in memory.
pub fn load_base(dir: &Path, method: Method, device: Device) -> Result<Checkpoint, SftError> {
    Ok(match method {
        Method::Qlora => checkpoint::load_quantized(dir, device, quantised_in_qlora)?,
        Method::Full | Method::Lora => checkpoint::load(dir, device)?,
    })
}

/// The blocks' inputs for a batch, packed or padded.
fn block_inputs(model: &Llama, batch: &Batch) -> BlockInputs {
    match (&batch.document_ids, &batch.position_ids) {
        (Some(documents), Some(positions)) => {
            model.prepare_packed(&batch.input_ids, positions, documents)
        }
        _ => model.prepare(
            &batch.input_ids,
            &ForwardOptions {
                attention_mask: batch.attention_mask.as_ref(),
                position_ids: None,
            },
        ),
    }
}

/// Summed cross-entropy of the final hidden states' next-token predictions over the labelled
/// positions of `labels`.
fn summed_loss(model: &Llama, hidden: &Tensor, labels: &Tensor) -> Tensor {
    let logits = model.logits_from_hidden(hidden);
    let vocab = logits.size()[2];
    logits
        .to_kind(Kind::Float)
        .view([-1, vocab])
        .cross_entropy_loss::<Tensor>(&labels.view([-1]), None, Reduction::Sum, IGNORE, 0.0)
}

/// Summed cross-entropy over labelled positions, and their count.
pub fn sft_loss(model: &Llama, batch: &Batch) -> (Tensor, usize) {
    let hidden = model.run_blocks(&block_inputs(model, batch), None);
    (
        summed_loss(model, &hidden, &batch.labels),
        batch.label_count,
    )
}

/// A fine-tuning run.
#[derive(Debug)]
pub struct SftTrainer {
    config: SftConfig,
    method: Method,
    model_config: ModelConfig,
    var_store: nn::VarStore,
    model: Llama,
    tokenizer: Tokenizer,
    adapter: Option<LoraAdapter>,
    optimizer: AdamW,
    train: Vec<Example>,
    eval: Vec<Example>,
    order: EpochOrder,
    step: usize,
    tokens_seen: u64,
    base_eval_loss: f64,
}

/// The examples a trainer trains and evaluates on.
#[derive(Debug)]
pub struct SftData {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
}

impl SftTrainer {
    /// A fresh run over the model in `base` (a Hugging Face folder with a tokenizer), whose
    /// held-out loss is measured before the first step as `base_eval_loss`.
    pub fn new(
        checkpoint: Checkpoint,
        method: Method,
        config: SftConfig,
        data: SftData,
    ) -> Result<Self, SftError> {
        let mut trainer = Self::assemble(checkpoint, method, config, data, None)?;
        trainer.base_eval_loss = trainer.evaluate();
        Ok(trainer)
    }

    fn assemble(
        checkpoint: Checkpoint,
        method: Method,
        mut config: SftConfig,
        data: SftData,
        saved_adapter: Option<&Path>,
    ) -> Result<Self, SftError> {
        // Settled once, so the saved trainer state says what the run did.
        config
            .gradient_checkpointing
            .get_or_insert(method == Method::Qlora);
        config
            .check()
            .map_err(|(name, message)| SftError::Invalid(format!("{name} {message}")))?;
        if data.train.is_empty() || data.eval.is_empty() {
            return Err(SftError::Invalid(
                "fine-tuning needs at least one train and one held-out example".into(),
            ));
        }
        if let Some(threads) = config.threads {
            tch::set_num_threads(threads);
        }
        let Checkpoint {
            mut var_store,
            mut model,
            config: model_config,
            tokenizer,
        } = checkpoint;
        let tokenizer = tokenizer
            .ok_or_else(|| SftError::Invalid("the base model folder has no tokenizer".into()))?;

        let adapter = match method {
            Method::Full => None,
            Method::Lora | Method::Qlora => {
                var_store.freeze();
                if method == Method::Qlora {
                    // A base from `load_base` is already quantised; one built in memory is
                    // quantised here.
                    nf4::quantize_projections(&mut model, &var_store, quantised_in_qlora);
                }
                Some(match saved_adapter {
                    Some(dir) => adapter::load(dir, &mut model)?.0,
                    None => LoraAdapter::attach(&mut model, config.lora(), config.seed)
                        .map_err(AdapterError::from)?,
                })
            }
        };
        let parameters = match &adapter {
            Some(adapter) => adapter.named_tensors(),
            None => checkpoint::named_tensors_trainable(&var_store),
        };
        let optimizer = AdamW::new(
            parameters,
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: config.weight_decay,
            },
        );
        let order = EpochOrder::new(data.train.len(), config.seed, 0, 0);
        Ok(Self {
            config,
            method,
            model_config,
            var_store,
            model,
            tokenizer,
            adapter,
            optimizer,
            train: data.train,
            eval: data.eval,
            order,
            step: 0,
            tokens_seen: 0,
            base_eval_loss: f64::NAN,
        })
    }

    /// The model being trained (with its adapter attached, for lora and qlora).
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The adapter, for lora and qlora.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// The tokenizer of the base model.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Optimizer steps completed.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The run's hyper-parameters.
    pub fn config(&self) -> &SftConfig {
        &self.config
    }

    /// Held-out loss of the model before any training.
    pub fn base_eval_loss(&self) -> f64 {
        self.base_eval_loss
    }

    /// Whether blocks are recomputed in the backward pass (see
    /// [`SftConfig::gradient_checkpointing`]).
    pub fn gradient_checkpointing(&self) -> bool {
        self.config.gradient_checkpointing == Some(true)
    }

    /// Values the optimizer updates.
    pub fn trainable_parameters(&self) -> i64 {
        match &self.adapter {
            Some(adapter) => adapter.parameter_count(),
            None => checkpoint::named_tensors_trainable(&self.var_store)
                .values()
                .map(|tensor| tensor.numel() as i64)
                .sum(),
        }
    }

    fn batch(&self, examples: &[&Example]) -> Batch {
        let device = self.var_store.device();
        let pad = self.tokenizer.pad_id();
        if self.config.packing {
            sft_data::packed_batch(examples, pad, self.config.max_length, device)
        } else {
            sft_data::padded_batch(examples, pad, device)
        }
    }

    fn set_training(&self, training: bool) {
        if let Some(adapter) = &self.adapter {
            adapter.set_training(training);
        }
    }

    /// One optimizer step over the next `batch_size` conversations.
    pub fn train_step(&mut self) -> StepMetrics {
        let started = Instant::now();
        let picked = self.order.take(self.config.batch_size);
        let examples: Vec<&Example> = picked.iter().map(|&index| &self.train[index]).collect();
        let batch = self.batch(&examples);

        // Dropout draws from libtorch's generator; seeding it from the step (and the block)
        // makes a resumed run draw the same masks as an uninterrupted one, and a checkpointed
        // block's second forward pass the same masks as its first.
        // TODO: the generator is process-wide, so two runs training in one process at once
        // disturb each other's masks (jobs run one per process; tests serialise).
        let seed = (self.config.seed ^ (self.step as u64).wrapping_mul(0x2545_f491)) as i64;
        self.set_training(true);
        self.optimizer.zero_grad();
        let inputs = block_inputs(&self.model, &batch);
        let per_label = 1.0 / batch.label_count.max(1) as f64;
        let mean_loss =
            |hidden: &Tensor| summed_loss(&self.model, hidden, &batch.labels) * per_label;
        let loss = if self.gradient_checkpointing() {
            self.model
                .backward_checkpointed(&inputs, Some(seed), mean_loss)
        } else {
            let loss = mean_loss(&self.model.run_blocks(&inputs, Some(seed)));
            loss.backward();
            loss
        };
        drop(inputs);
        self.set_training(false);

        let grad_norm = match self.config.max_grad_norm {
            Some(max_norm) => self.optimizer.clip_gradient_norm(max_norm),
            None => self.optimizer.gradient_norm(),
        };
        let lr = WarmupCosine {
            peak: self.config.lr,
            floor: self.config.min_lr,
            warmup_steps: self.config.warmup_steps,
            total_steps: self.config.total_steps,
        }
        .at(self.step);
        self.optimizer.step(lr);
        self.step += 1;
        self.tokens_seen += batch.token_count as u64;
        StepMetrics {
            step: self.step,
            loss: loss.double_value(&[]),
            lr,
            grad_norm,
            tokens_per_second: batch.token_count as f64 / started.elapsed().as_secs_f64().max(1e-9),
            tokens_seen: self.tokens_seen,
        }
    }

    /// Mean cross-entropy per assistant token on the held-out conversations.
    pub fn evaluate(&self) -> f64 {
        self.set_training(false);
        let (mut total, mut labels) = (0.0, 0usize);
        tch::no_grad(|| {
            for chunk in self.eval.chunks(self.config.batch_size) {
                let examples: Vec<&Example> = chunk.iter().collect();
                let (loss, count) = sft_loss(&self.model, &self.batch(&examples));
                total += loss.double_value(&[]);
                labels += count;
            }
        });
        total / labels.max(1) as f64
    }

    /// Writes the weights (full) or the adapter, plus optimizer moments and trainer position.
    pub fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<(), SftError> {
        self.save_output(dir, base_model)?;
        self.optimizer.save(&dir.join(OPTIMIZER_FILE))?;
        let state = TrainerState {
            method: self.method,
            step: self.step,
            tokens_seen: self.tokens_seen,
            epoch: self.order.epoch,
            cursor: self.order.cursor,
            base_eval_loss: self.base_eval_loss,
            config: self.config.clone(),
        };
        state_file::write(dir, &state)?;
        tracing::info!(step = self.step, dir = %dir.display(), "fine-tuning checkpoint written");
        Ok(())
    }

    /// Writes the artifact: a Hugging Face model folder (full) or a PEFT adapter folder whose
    /// `base_model_name_or_path` is `base_model`.
    pub fn save_output(&self, dir: &Path, base_model: &str) -> Result<(), SftError> {
        match &self.adapter {
            Some(adapter) => adapter::save(dir, adapter, base_model)?,
            None => checkpoint::save(
                dir,
                &self.var_store,
                &self.model_config,
                Some(&self.tokenizer),
            )?,
        }
        Ok(())
    }

    /// Continues a run saved by [`SftTrainer::save_checkpoint`] on the same data; `base` is the
    /// base model folder (needed again for lora and qlora, whose checkpoints hold only the
    /// adapter).
    pub fn resume(
        dir: &Path,
        base: &Path,
        data: SftData,
        device: Device,
    ) -> Result<Self, SftError> {
        let state: TrainerState = state_file::read(dir)?;
        let mut trainer = match state.method {
            Method::Full => {
                let mut loaded = checkpoint::load(dir, device)?;
                if loaded.tokenizer.is_none() {
                    loaded.tokenizer = checkpoint::load(base, device)?.tokenizer;
                }
                Self::assemble(loaded, state.method, state.config, data, None)?
            }
            Method::Lora | Method::Qlora => {
                let loaded = load_base(base, state.method, device)?;
                Self::assemble(loaded, state.method, state.config, data, Some(dir))?
            }
        };
        trainer.optimizer.load(&dir.join(OPTIMIZER_FILE))?;
        trainer.order = EpochOrder::new(
            trainer.train.len(),
            trainer.config.seed,
            state.epoch,
            state.cursor,
        );
        trainer.step = state.step;
        trainer.tokens_seen = state.tokens_seen;
        trainer.base_eval_loss = state.base_eval_loss;
        Ok(trainer)
    }
}

/// Named tensors of whatever trains, for tests comparing runs.
pub fn trained_tensors(trainer: &SftTrainer) -> BTreeMap<String, Tensor> {
    match &trainer.adapter {
        Some(adapter) => adapter.named_tensors(),
        None => checkpoint::named_tensors(&trainer.var_store),
    }
}
